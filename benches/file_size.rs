//! File size under churn: a live set of 100k keys replaced ten times over (claims, completes,
//! expiry, sweeps), against the size at the first full live set. Freed pages must be reused.
//!
//! Each round claims and completes 100k fresh keys from 32 threads (durable, the default),
//! then moves the clock past their TTL and sweeps them, so the next round's keys replace them.
//! Criterion's model does not fit (the figure is a size, not a time), so this bench prints its
//! own: `cargo bench -p dedupe-store-benches --bench file_size`. `DEDUPE_BENCH_KEYS` changes
//! the live set.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dedupe_store::{Claim, ManualClock, Store};

const START_MS: u64 = 1_700_000_000_000;
const TTL: Duration = Duration::from_secs(60);
const ROUNDS: u64 = 10;
const THREADS: u64 = 32;
const RESPONSE: [u8; 200] = [b'r'; 200];

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    let live_set = std::env::var("DEDUPE_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000u64);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("churn.redb");
    let clock = ManualClock::new(START_MS);
    let store = Store::builder()
        .clock(clock.clone())
        .ttl(TTL)
        .without_sweeper()
        .open(&path)
        .expect("open");
    let next = AtomicU64::new(0);
    support::print_machine();
    println!("\n## File size after {ROUNDS}× turnover of a {live_set}-key live set\n");
    println!("| after | live keys | file size | vs first full live set | round time |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut first_full = 0;
    for round in 0..=ROUNDS {
        let started = Instant::now();
        if round > 0 {
            // The previous round's keys expire and are swept before this round's arrive.
            clock.advance(TTL + Duration::from_secs(1));
            store.sweep().expect("sweep");
        }
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= live_set * (round + 1) {
                            break;
                        }
                        let claim = store.claim(format!("churn/{n:012}")).expect("claim");
                        let Claim::Acquired(ticket) = claim else {
                            panic!("a fresh key must be acquired");
                        };
                        store.complete(&ticket, RESPONSE).expect("complete");
                    }
                });
            }
        });
        next.store(live_set * (round + 1), Ordering::Relaxed);
        let size = support::file_size(&path);
        if round == 0 {
            first_full = size;
        }
        println!(
            "| {} | {} | {} | {:.2}× | {:.1} s |",
            if round == 0 {
                "first full live set".to_string()
            } else {
                format!("{round}× turnover")
            },
            store.len().expect("len"),
            mib(size),
            size as f64 / first_full.max(1) as f64,
            started.elapsed().as_secs_f64()
        );
    }
    store.compact().expect("compact");
    let compacted = support::file_size(&path);
    println!(
        "| compact() | {} | {} | {:.2}× | |",
        store.len().expect("len"),
        mib(compacted),
        compacted as f64 / first_full.max(1) as f64
    );
}
