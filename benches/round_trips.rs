//! Claim + complete round trips of fresh keys at 32 threads, the whole life of an idempotent
//! request: this store against raw redb (a durable transaction for the claim and another for
//! the response) and SQLite (an `INSERT ... ON CONFLICT DO NOTHING`, then an `UPDATE`, on one
//! connection shared behind a mutex: SQLite's fastest setup for many writer threads, see
//! `durable_claims`).
//!
//! `cargo bench -p dedupe-store-benches --bench round_trips`; the summary table follows
//! criterion's report.

mod support;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use dedupe_store::{Claim, Store};
use support::{Recorder, raw_redb, sqlite};

const THREADS: usize = 32;
const RESPONSE: [u8; 200] = [b'r'; 200];
const SYSTEMS: [&str; 3] = ["dedupe-store", "raw redb", "sqlite"];

fn bench(c: &mut Criterion, recorder: &Recorder) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = AtomicU64::new(0);
    let mut group = c.benchmark_group("round_trips");
    support::configure(&mut group, Duration::from_secs(4));
    group.throughput(Throughput::Elements(1));

    let store = Store::open(dir.path().join("store.redb")).expect("open store");
    support::bench_parallel(
        &mut group,
        "dedupe-store",
        recorder,
        THREADS,
        &ids,
        || (),
        |(), n| {
            let Claim::Acquired(ticket) = store.claim(support::key(n)).expect("claim") else {
                panic!("a fresh key must be acquired");
            };
            store.complete(&ticket, RESPONSE).expect("complete");
        },
    );
    store.close().expect("close store");

    let db = raw_redb::create(&dir.path().join("raw.redb"));
    support::bench_parallel(
        &mut group,
        "raw redb",
        recorder,
        THREADS,
        &ids,
        || (),
        |(), n| {
            let key = support::key(n);
            assert!(raw_redb::claim(&db, &key));
            raw_redb::complete(&db, &key, &RESPONSE);
        },
    );

    let path = dir.path().join("sqlite.db");
    sqlite::create(&path);
    let shared = std::sync::Mutex::new(sqlite::connect(&path));
    support::bench_parallel(
        &mut group,
        "sqlite",
        recorder,
        THREADS,
        &ids,
        || (),
        |(), n| {
            let key = support::key(n);
            assert!(sqlite::claim(&shared.lock().expect("lock"), &key, n));
            sqlite::complete(&shared.lock().expect("lock"), &key, &RESPONSE);
        },
    );
    group.finish();
}

fn main() {
    let recorder = support::run_criterion(bench);
    support::print_header("Claim + complete round trips, 32 threads", "raw redb");
    let baseline = recorder.figures("raw redb");
    for name in SYSTEMS {
        support::print_row(name, recorder.figures(name), baseline);
    }
}
