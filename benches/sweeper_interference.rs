//! Sweeper interference: claim latency while the background sweeper removes one million
//! expired records, against the same store whose records are not yet due.
//!
//! Both runs start from a copy of one template file of 1M keys, so file size and tree depth
//! are the same; only the clock differs (before or after the keys' expiry). Each run claims
//! fresh keys for a fixed time and records every claim's latency. Criterion's iteration model
//! does not fit (a sweep consumes its backlog), so this bench prints its own figures:
//! `cargo bench -p dedupe-store-benches --bench sweeper_interference`. `DEDUPE_BENCH_KEYS`
//! changes the backlog size, `DEDUPE_BENCH_SWEEP_BATCH` the sweeper's batch size. Keys are
//! scattered over the tree, as real idempotency keys are, so each sweep batch rewrites many
//! leaf pages.

mod support;

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use dedupe_store::{Claim, ManualClock, Store};

const START_MS: u64 = 1_700_000_000_000;
const TTL: Duration = Duration::from_secs(60);
const RUN: Duration = Duration::from_secs(5);

fn run(
    template: &std::path::Path,
    work: &std::path::Path,
    due: bool,
    threads: usize,
) -> (support::Figures, u64, Duration) {
    support::copy_file(template, work);
    let now = if due {
        START_MS + 2 * TTL.as_millis() as u64
    } else {
        START_MS
    };
    let mut builder = Store::builder()
        .clock(ManualClock::new(now))
        .sweep_interval(Duration::from_millis(10));
    if let Some(batch) = std::env::var("DEDUPE_BENCH_SWEEP_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.sweep_batch_size(batch);
    }
    let store = builder.open(work).expect("open the copy");
    let ids = AtomicU64::new(0);
    let started = Instant::now();
    let run = support::parallel_for(threads, RUN, &ids, |n| {
        let claim = store
            .claim(format!("interference/{:016x}", support::scatter(n)))
            .expect("claim");
        assert!(matches!(claim, Claim::Acquired(_)));
    });
    let elapsed = started.elapsed();
    let swept = store.stats().expect("stats").swept;
    store.close().expect("close");
    (support::figures_of(run), swept, elapsed)
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    let keys = std::env::var("DEDUPE_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000u64);
    let dir = tempfile::tempdir().expect("tempdir");
    let template = dir.path().join("template.redb");
    {
        let store = Store::builder()
            .clock(ManualClock::new(START_MS))
            .without_sweeper()
            .open(&template)
            .expect("create the template");
        support::fill(&store, keys, TTL);
        store.close().expect("close the template");
    }
    let work = dir.path().join("work.redb");
    support::print_machine();
    println!("\n## Sweeper interference: claims while {keys} expired records are swept\n");
    println!("| threads | backlog | claims/s | p50 | p99 | max | swept during the run |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    for threads in [1usize, 32] {
        let mut p99s = Vec::new();
        for due in [false, true] {
            let (f, swept, _) = run(&template, &work, due, threads);
            p99s.push(f.p99);
            println!(
                "| {threads} | {} | {:.0} | {} | {} | {} | {swept} |",
                if due {
                    "all due, sweeper busy"
                } else {
                    "none due"
                },
                f.ops_per_sec,
                support::human(f.p50),
                support::human(f.p99),
                support::human(f.max)
            );
        }
        if let [quiet, busy] = p99s[..] {
            println!(
                "| {threads} | p99 ratio busy / quiet | {:.2}× | | | | |",
                busy.as_secs_f64() / quiet.as_secs_f64().max(f64::MIN_POSITIVE)
            );
        }
    }
}
