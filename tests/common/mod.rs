//! Helpers shared by the reliability tests. Each test file compiles this module on its own and
//! uses part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// A count from the environment, or `default` (the CI figure).
pub fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Prints a figure for docs/RELIABILITY.md, shown with `--nocapture`.
pub fn figure(test: &str, what: &str, started: Instant) {
    eprintln!(
        "[{test}] {what} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The default time budget of a loop that also has a count.
pub fn budget(name: &str, default_secs: u64) -> Duration {
    Duration::from_secs(knob(name, default_secs))
}

#[cfg(feature = "testing")]
pub mod workload {
    use dedupe_store::testing::{Rng, Step};

    /// A small, deterministic workload touching every kind of write: claims (with
    /// fingerprints, per-call leases and TTLs), completes (some spanning pages), releases,
    /// extends, expires, marks, a batch mark, sweeps, clock movement and a reopen.
    pub fn small(seed: u64, len: usize) -> Vec<Step> {
        let mut rng = Rng::new(seed);
        let mut steps = Vec::with_capacity(len);
        for index in 0..len {
            let byte = |rng: &mut Rng| rng.byte();
            let step = match rng.below(20) {
                0..=5 => Step::Claim {
                    key: byte(&mut rng),
                    fingerprint: byte(&mut rng) % 3,
                    lease: if rng.chance(50) { 0 } else { byte(&mut rng) },
                    ttl: if rng.chance(70) { 0 } else { byte(&mut rng) },
                },
                6..=8 => Step::Complete {
                    ticket: byte(&mut rng),
                    response: if rng.chance(15) {
                        255
                    } else {
                        byte(&mut rng) % 250
                    },
                    ttl: if rng.chance(70) { 0 } else { byte(&mut rng) },
                },
                9 => Step::Release {
                    ticket: byte(&mut rng),
                },
                10 => Step::Extend {
                    ticket: byte(&mut rng),
                    lease: byte(&mut rng),
                },
                11 => Step::Expire {
                    key: byte(&mut rng),
                },
                12 => Step::MarkSeen {
                    key: byte(&mut rng),
                    ttl: if rng.chance(50) { 0 } else { byte(&mut rng) },
                },
                13 => Step::MarkSeenMany {
                    keys: [byte(&mut rng), byte(&mut rng), byte(&mut rng)],
                },
                14 => Step::Get {
                    key: byte(&mut rng),
                },
                15 => Step::Sweep,
                16 | 17 => Step::Tick {
                    secs: byte(&mut rng) % 90,
                },
                18 => Step::Leap {
                    kind: byte(&mut rng),
                },
                _ if index > len / 2 => Step::Reopen,
                _ => Step::Tick { secs: 40 },
            };
            steps.push(step);
        }
        steps
    }
}
