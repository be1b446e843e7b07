//! Duplicate hits: claims of keys that already completed (the replay a retry storm causes),
//! from 2 threads, against a raw redb read transaction fetching the same bytes. Replays are
//! answered from a read transaction and never wait for the writer.
//!
//! `cargo bench -p dedupe-store-benches --bench replays`; the summary table follows
//! criterion's report.

mod support;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use dedupe_store::{Claim, Store};
use support::{Recorder, raw_redb};

const THREADS: usize = 2;
const KEYS: u64 = 10_000;
/// A typical small HTTP response body.
const RESPONSE: [u8; 200] = [b'r'; 200];

fn replay_key(n: u64) -> String {
    support::key(n % KEYS)
}

fn bench(c: &mut Criterion, recorder: &Recorder) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids = AtomicU64::new(0);

    let store = Store::open(dir.path().join("store.redb")).expect("open store");
    for n in 0..KEYS {
        let ticket = store
            .claim(replay_key(n))
            .expect("claim")
            .ticket()
            .expect("fresh key");
        store.complete(&ticket, RESPONSE).expect("complete");
    }
    let db = raw_redb::create(&dir.path().join("raw.redb"));
    {
        let txn = db.begin_write().expect("begin_write");
        {
            let mut table = txn.open_table(raw_redb::CLAIMS).expect("open table");
            for n in 0..KEYS {
                table
                    .insert(replay_key(n).as_str(), &RESPONSE[..])
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }

    let mut group = c.benchmark_group("replays");
    support::configure(&mut group, Duration::from_secs(3));
    group.throughput(Throughput::Elements(1));
    support::bench_parallel(
        &mut group,
        "dedupe-store",
        recorder,
        THREADS,
        &ids,
        || (),
        |(), n| match store.claim(replay_key(n)).expect("claim") {
            Claim::Completed(outcome) => assert_eq!(outcome.response.len(), RESPONSE.len()),
            other => panic!("expected a replay, got {other:?}"),
        },
    );
    support::bench_parallel(
        &mut group,
        "raw redb read transaction",
        recorder,
        THREADS,
        &ids,
        || (),
        |(), n| {
            let value = raw_redb::read(&db, &replay_key(n)).expect("stored");
            assert_eq!(value.len(), RESPONSE.len());
        },
    );
    group.finish();
}

fn main() {
    let recorder = support::run_criterion(bench);
    support::print_header("Replays from 2 threads", "raw redb read transaction");
    let baseline = recorder.figures("raw redb read transaction");
    for name in ["dedupe-store", "raw redb read transaction"] {
        support::print_row(name, recorder.figures(name), baseline);
    }
}
