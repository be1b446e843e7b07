//! Helpers shared by the fault tests (crash, power loss, I/O faults, corruption, clock
//! faults). Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::io::Write;
use std::sync::mpsc;
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

/// Aborts the test binary, saying why, if the test holding it runs past its limit: a hang in
/// the store (a deadlock after a failed commit, say) must fail the run, not stall CI.
/// `DEDUPE_WATCHDOG_SECS` overrides the limit for long runs.
pub struct Watchdog {
    _stop: mpsc::Sender<()>,
}

impl Watchdog {
    /// Starts watching; dropping the watchdog stops it.
    pub fn new(test: &'static str) -> Watchdog {
        let limit = budget("DEDUPE_WATCHDOG_SECS", 900);
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(limit) {
                // Straight to stderr: the test harness's capture would die with the process.
                let _ = writeln!(
                    std::io::stderr(),
                    "[{test}] still running after {limit:?}: a hang; aborting"
                );
                std::process::abort();
            }
        });
        Watchdog { _stop: stop }
    }
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

#[cfg(feature = "testing")]
pub mod concurrent {
    //! Several threads writing at once (so group commit batches them) to a store on a
    //! [`SimDisk`], keeping a log of what was acknowledged, and the check of a reopened image
    //! against that log.

    use std::sync::{Arc, Mutex};

    use dedupe_store::testing::{Rng, SimDisk};
    use dedupe_store::{Claim, EntryState, ManualClock, Store};

    /// What the writers were told succeeded.
    #[derive(Debug, Default)]
    pub struct Acknowledged {
        /// Keys claimed (in progress unless completed below).
        pub claimed: Vec<String>,
        /// Keys completed, with their responses.
        pub completed: Vec<(String, Vec<u8>)>,
        /// Keys marked seen.
        pub marked: Vec<String>,
        /// Calls that failed.
        pub failed: u64,
    }

    /// The store every run uses: a clock that never moves, so nothing expires.
    pub fn open(disk: &SimDisk) -> dedupe_store::Result<Store> {
        Store::builder()
            .clock(ManualClock::new(1_700_000_000_000))
            .without_sweeper()
            .open_backend(disk.clone())
    }

    /// Runs `threads` writers for `ops` operations each on fresh keys. A writer stops at its
    /// first failure when `stop_on_failure` (the disk is gone), else carries on.
    pub fn write(
        store: &Store,
        threads: u64,
        ops: u64,
        seed: u64,
        stop_on_failure: bool,
    ) -> Acknowledged {
        let log = Arc::new(Mutex::new(Acknowledged::default()));
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let (store, log) = (store.clone(), log.clone());
                std::thread::spawn(move || {
                    let mut rng = Rng::new(seed ^ (thread << 32));
                    for index in 0..ops {
                        let key = format!("t{thread}-{index}");
                        let ok = if rng.chance(25) {
                            let keys = [format!("{key}-a"), format!("{key}-b")];
                            match store.mark_seen_many(&keys) {
                                Ok(_) => {
                                    if let Ok(mut log) = log.lock() {
                                        log.marked.extend(keys);
                                    }
                                    true
                                }
                                Err(_) => false,
                            }
                        } else {
                            match store.claim(&key) {
                                Ok(Claim::Acquired(ticket)) => {
                                    if let Ok(mut log) = log.lock() {
                                        log.claimed.push(key.clone());
                                    }
                                    let response = format!("done {key}").into_bytes();
                                    match store.complete(&ticket, &response) {
                                        Ok(()) => {
                                            if let Ok(mut log) = log.lock() {
                                                log.completed.push((key, response));
                                            }
                                            true
                                        }
                                        Err(_) => false,
                                    }
                                }
                                Ok(_) => true,
                                Err(_) => false,
                            }
                        };
                        if !ok {
                            if let Ok(mut log) = log.lock() {
                                log.failed += 1;
                            }
                            if stop_on_failure {
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            let _ = worker.join();
        }
        match Arc::try_unwrap(log) {
            Ok(log) => log.into_inner().unwrap_or_default(),
            Err(_) => Acknowledged::default(),
        }
    }

    /// Opens `image` and checks that everything acknowledged is there.
    pub fn check(image: Vec<u8>, acknowledged: &Acknowledged) -> Result<(), String> {
        let store = open(&SimDisk::from_image(image))
            .map_err(|err| format!("the image did not open: {err}"))?;
        store.verify().map_err(|err| format!("verify: {err}"))?;
        let completed: std::collections::BTreeMap<_, _> =
            acknowledged.completed.iter().cloned().collect();
        for key in &acknowledged.claimed {
            let entry = store
                .get(key)
                .map_err(|err| format!("get({key}): {err}"))?
                .ok_or_else(|| format!("acknowledged claim of {key} lost"))?;
            match (&entry.state, completed.get(key)) {
                (EntryState::Completed { response, .. }, Some(want)) if response == want => {}
                (EntryState::InProgress { .. }, None) => {}
                (EntryState::Completed { .. }, None) => {}
                (state, want) => {
                    return Err(format!("{key}: holds {state:?}, acknowledged {want:?}"));
                }
            }
        }
        for key in &acknowledged.marked {
            if store
                .get(key)
                .map_err(|err| format!("get({key}): {err}"))?
                .is_none()
            {
                return Err(format!("acknowledged mark of {key} lost"));
            }
        }
        Ok(())
    }
}
