//! Durable claims of fresh keys at 1, 8, 32 and 64 threads: this store (with its defaults,
//! whose commits are one-phase, and with quick repair on, whose commits are two-phase) against
//! raw redb with one durable transaction per claim and against SQLite (WAL, synchronous=FULL,
//! `INSERT ... ON CONFLICT DO NOTHING`, one transaction per claim). Raw redb runs two ways:
//! with its default one-phase commits (the baseline of the ratios), and with two-phase
//! commits, as the store commits with quick repair. SQLite runs two ways too: one connection
//! shared behind a mutex (writers queue in the process), and a connection per thread (writers
//! contend for SQLite's lock and back off in its busy handler, as with a connection pool). One
//! more row shows `Durability::Periodic(100 ms)`, which acknowledges before the fsync: it is
//! not durable per claim, so no peer compares with it.
//!
//! `cargo bench -p dedupe-store-benches --bench durable_claims` prints criterion's estimates,
//! then a table of ops/s, the ratio to raw redb at the same thread count, and p50/p99/max
//! per-claim latency. A criterion filter runs part of it:
//! `cargo bench -p dedupe-store-benches --bench durable_claims -- /32`.

mod support;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use dedupe_store::{Claim, Durability, Store};
use support::{Recorder, raw_redb, sqlite};

const THREADS: [usize; 4] = [1, 8, 32, 64];
const SYSTEMS: [&str; 7] = [
    "dedupe-store",
    "dedupe-store, quick repair on",
    "dedupe-store, Periodic(100 ms)",
    "raw redb",
    "raw redb, two-phase",
    "sqlite, shared connection",
    "sqlite, connection per thread",
];

fn name(system: &str, threads: usize) -> String {
    format!("{system}/{threads}")
}

fn bench(c: &mut Criterion, recorder: &Recorder) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = AtomicU64::new(0);
    let mut group = c.benchmark_group("durable_claims");
    support::configure(&mut group, Duration::from_secs(4));
    group.throughput(Throughput::Elements(1));
    for threads in THREADS {
        for system in SYSTEMS {
            let id = name(system, threads);
            let path = dir
                .path()
                .join(format!("{}-{threads}.db", system.replace([' ', ','], "")));
            match system {
                "raw redb" | "raw redb, two-phase" => {
                    let db = raw_redb::create(&path);
                    let two_phase = system == "raw redb, two-phase";
                    support::bench_parallel(
                        &mut group,
                        &id,
                        recorder,
                        threads,
                        &ids,
                        || (),
                        |(), n| {
                            assert!(raw_redb::claim_committed(&db, &support::key(n), two_phase));
                        },
                    );
                }
                "sqlite, shared connection" => {
                    sqlite::create(&path);
                    let shared = std::sync::Mutex::new(sqlite::connect(&path));
                    support::bench_parallel(
                        &mut group,
                        &id,
                        recorder,
                        threads,
                        &ids,
                        || (),
                        |(), n| {
                            let conn = shared.lock().expect("connection lock");
                            assert!(sqlite::claim(&conn, &support::key(n), n));
                        },
                    );
                }
                "sqlite, connection per thread" => {
                    sqlite::create(&path);
                    support::bench_parallel(
                        &mut group,
                        &id,
                        recorder,
                        threads,
                        &ids,
                        || sqlite::connect(&path),
                        |conn, n| assert!(sqlite::claim(conn, &support::key(n), n)),
                    );
                }
                _ => {
                    let builder = match system {
                        "dedupe-store, quick repair on" => Store::builder().quick_repair(true),
                        "dedupe-store, Periodic(100 ms)" => Store::builder()
                            .durability(Durability::Periodic(Duration::from_millis(100))),
                        _ => Store::builder(),
                    };
                    let store = builder.open(&path).expect("open store");
                    support::bench_parallel(
                        &mut group,
                        &id,
                        recorder,
                        threads,
                        &ids,
                        || (),
                        |(), n| {
                            let claim = store.claim(support::key(n)).expect("claim");
                            assert!(matches!(claim, Claim::Acquired(_)));
                        },
                    );
                    store.close().expect("close store");
                }
            }
        }
    }
    group.finish();
}

fn main() {
    let recorder = support::run_criterion(bench);
    support::print_header("Durable claims of fresh keys", "raw redb");
    for threads in THREADS {
        let baseline = recorder.figures(&name("raw redb", threads));
        for system in SYSTEMS {
            let label = format!("{system}, {threads} threads");
            support::print_row(&label, recorder.figures(&name(system, threads)), baseline);
        }
    }
}
