//! The store over PostgreSQL, on a throwaway local server (fsync on), against what a
//! hand-written idempotency table pays and against the embedded store:
//!
//! - durable claims of fresh keys at 1, 8, 32 and 64 threads: this store over PostgreSQL
//!   against one `INSERT ... ON CONFLICT DO NOTHING` per claim in autocommit, on a connection
//!   per thread (the floor of any PostgreSQL idempotency table), and the embedded store on a
//!   file;
//! - duplicate hits at 2 threads: replays of completed keys against one `SELECT` of the stored
//!   response per call;
//! - the whole life of a key at 1 and 32 threads: a claim and then its complete, against the
//!   hand-written `INSERT` and then an `UPDATE` of the response fenced by the owner's token,
//!   each in autocommit.
//!
//! `cargo bench -p dedupe-store-benches --bench postgres` starts the server itself from the
//! PostgreSQL binaries (Debian's `postgresql` package) and prints criterion's estimates, then a
//! table of ops/s, the ratio to the hand-written statement and p50/p99/max per call. It skips
//! with a message when the binaries are missing.

mod support;

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use dedupe_store::testing::postgres::TestCluster;
use dedupe_store::{Claim, Store};
use support::Recorder;

const THREADS: [usize; 4] = [1, 8, 32, 64];
const CLAIMS: [&str; 3] = [
    "dedupe-store on PostgreSQL",
    "hand-written INSERT ... ON CONFLICT",
    "dedupe-store on a file",
];
const REPLAYS: [&str; 2] = ["dedupe-store on PostgreSQL", "hand-written SELECT"];
const REPLAY_THREADS: usize = 2;
/// Named apart from the claims' runs: the recorder keys figures by name.
const LIFE: [&str; 2] = [
    "dedupe-store claim, then complete",
    "hand-written INSERT, then UPDATE",
];
const LIFE_THREADS: [usize; 2] = [1, 32];
const REPLAY_KEYS: u64 = 10_000;
/// A typical small HTTP response body.
const RESPONSE: [u8; 200] = [b'r'; 200];

fn name(system: &str, threads: usize) -> String {
    format!("{system}/{threads}")
}

/// The hand-written table: a key, its owner's token and its stored response.
const PEER_TABLE: &str = "CREATE TABLE peer (key text PRIMARY KEY, token bigint NOT NULL, \
                          response bytea)";

fn connect(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("connect the peer")
}

/// A schema with the peer's table and a store over it, for one group of runs.
fn databases(cluster: &TestCluster, name: &str) -> (String, Store) {
    let url = cluster.create_database(name);
    connect(&url).batch_execute(PEER_TABLE).expect("peer table");
    let store = Store::builder()
        .postgres_connections(16)
        .open_postgres(&url)
        .expect("open the store on PostgreSQL");
    (url, store)
}

/// A peer's connections, kept from one of criterion's samples to the next as an application's
/// pool keeps them, one per thread. Connecting afresh for each sample would time every new
/// server process's first statements (its caches of the catalog being filled), which a
/// running application does not pay, and the store's own pool does not either.
struct Kept<S> {
    idle: Mutex<Vec<S>>,
}

impl<S> Kept<S> {
    fn new() -> Kept<S> {
        Kept {
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A kept connection, or a new one from `connect`; back to the kept ones when dropped.
    fn take(&self, connect: impl FnOnce() -> S) -> Lease<'_, S> {
        let kept = self.idle.lock().expect("kept connections").pop();
        Lease {
            kept: self,
            state: Some(kept.unwrap_or_else(connect)),
        }
    }
}

struct Lease<'a, S> {
    kept: &'a Kept<S>,
    state: Option<S>,
}

impl<S> Lease<'_, S> {
    fn get(&mut self) -> &mut S {
        self.state
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl<S> Drop for Lease<'_, S> {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            self.kept.idle.lock().expect("kept connections").push(state);
        }
    }
}

/// A peer's connection and its prepared claim: the hand-written `INSERT`.
fn peer_insert(url: &str) -> (postgres::Client, postgres::Statement) {
    let mut client = connect(url);
    let insert = client
        .prepare("INSERT INTO peer (key, token) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .expect("prepare");
    (client, insert)
}

/// A group of runs of 4 s each, in operations per second.
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    support::configure(&mut group, Duration::from_secs(4));
    group.throughput(Throughput::Elements(1));
    group
}

fn claims(c: &mut Criterion, recorder: &Recorder, cluster: &TestCluster) {
    let (url, store) = databases(cluster, "claims");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = Store::open(dir.path().join("store.redb")).expect("open the store file");
    let ids = AtomicU64::new(0);
    let peers = Kept::new();
    let mut group = group(c, "postgres_claims");
    for threads in THREADS {
        for system in CLAIMS {
            let id = name(system, threads);
            match system {
                "hand-written INSERT ... ON CONFLICT" => support::bench_parallel(
                    &mut group,
                    &id,
                    recorder,
                    threads,
                    &ids,
                    || peers.take(|| peer_insert(&url)),
                    |peer, n| {
                        let (client, insert) = peer.get();
                        let token = i64::try_from(n).expect("token");
                        let inserted = client
                            .execute(&*insert, &[&support::key(n), &token])
                            .expect("insert");
                        assert_eq!(inserted, 1);
                    },
                ),
                _ => {
                    let store = if system == "dedupe-store on a file" {
                        &file
                    } else {
                        &store
                    };
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
                }
            }
        }
    }
    group.finish();
}

fn replay_key(n: u64) -> String {
    format!("replay-{}", n % REPLAY_KEYS)
}

fn replays(c: &mut Criterion, recorder: &Recorder, cluster: &TestCluster) {
    let url = cluster.create_database("replays");
    let store = Store::builder()
        .open_postgres(&url)
        .expect("open the store on PostgreSQL");
    let mut peer = connect(&url);
    peer.batch_execute(PEER_TABLE).expect("peer table");
    for n in 0..REPLAY_KEYS {
        let ticket = store
            .claim(replay_key(n))
            .expect("claim")
            .ticket()
            .expect("fresh key");
        store.complete(&ticket, RESPONSE).expect("complete");
        let token = i64::try_from(n).expect("token");
        peer.execute(
            "INSERT INTO peer (key, token, response) VALUES ($1, $2, $3)",
            &[&replay_key(n), &token, &&RESPONSE[..]],
        )
        .expect("peer row");
    }
    let ids = AtomicU64::new(0);
    let peers = Kept::new();
    let mut group = group(c, "postgres_replays");
    for system in REPLAYS {
        let id = name(system, REPLAY_THREADS);
        match system {
            "hand-written SELECT" => support::bench_parallel(
                &mut group,
                &id,
                recorder,
                REPLAY_THREADS,
                &ids,
                || {
                    peers.take(|| {
                        let mut client = connect(&url);
                        let select = client
                            .prepare("SELECT response FROM peer WHERE key = $1")
                            .expect("prepare");
                        (client, select)
                    })
                },
                |peer, n| {
                    let (client, select) = peer.get();
                    let row = client
                        .query_one(&*select, &[&replay_key(n)])
                        .expect("select");
                    let response: Vec<u8> = row.get(0);
                    assert_eq!(response.len(), RESPONSE.len());
                },
            ),
            _ => support::bench_parallel(
                &mut group,
                &id,
                recorder,
                REPLAY_THREADS,
                &ids,
                || (),
                |(), n| {
                    let claim = store.claim(replay_key(n)).expect("claim");
                    assert!(matches!(claim, Claim::Completed(_)));
                },
            ),
        }
    }
    group.finish();
}

/// A claim and then its complete, per key.
fn lives(c: &mut Criterion, recorder: &Recorder, cluster: &TestCluster) {
    let (url, store) = databases(cluster, "lives");
    let ids = AtomicU64::new(0);
    let peers = Kept::new();
    let mut group = group(c, "postgres_claim_complete");
    for threads in LIFE_THREADS {
        for system in LIFE {
            let id = name(system, threads);
            match system {
                "hand-written INSERT, then UPDATE" => support::bench_parallel(
                    &mut group,
                    &id,
                    recorder,
                    threads,
                    &ids,
                    || {
                        peers.take(|| {
                            let (mut client, insert) = peer_insert(&url);
                            let update = client
                                .prepare(
                                    "UPDATE peer SET response = $3 WHERE key = $1 AND token = $2",
                                )
                                .expect("prepare");
                            (client, insert, update)
                        })
                    },
                    |peer, n| {
                        let (client, insert, update) = peer.get();
                        let token = i64::try_from(n).expect("token");
                        let key = support::key(n);
                        assert_eq!(
                            client.execute(&*insert, &[&key, &token]).expect("insert"),
                            1
                        );
                        let response: &[u8] = &RESPONSE;
                        let updated = client
                            .execute(&*update, &[&key, &token, &response])
                            .expect("update");
                        assert_eq!(updated, 1);
                    },
                ),
                _ => support::bench_parallel(
                    &mut group,
                    &id,
                    recorder,
                    threads,
                    &ids,
                    || (),
                    |(), n| {
                        let ticket = store
                            .claim(support::key(n))
                            .expect("claim")
                            .ticket()
                            .expect("a fresh key");
                        store.complete(&ticket, RESPONSE).expect("complete");
                    },
                ),
            }
        }
    }
    group.finish();
}

fn main() {
    let Some(cluster) = TestCluster::start() else {
        eprintln!("skipping the PostgreSQL benchmarks: no PostgreSQL server binaries");
        return;
    };
    let recorder = support::run_criterion(|c, recorder| {
        claims(c, recorder, &cluster);
        replays(c, recorder, &cluster);
        lives(c, recorder, &cluster);
    });
    support::print_header(
        "Durable claims of fresh keys over PostgreSQL",
        "hand-written INSERT",
    );
    for threads in THREADS {
        let baseline = recorder.figures(&name("hand-written INSERT ... ON CONFLICT", threads));
        for system in CLAIMS {
            let label = format!("{system}, {threads} threads");
            support::print_row(&label, recorder.figures(&name(system, threads)), baseline);
        }
    }
    support::print_header("Duplicate hits over PostgreSQL", "hand-written SELECT");
    let baseline = recorder.figures(&name("hand-written SELECT", REPLAY_THREADS));
    for system in REPLAYS {
        let label = format!("{system}, {REPLAY_THREADS} threads");
        support::print_row(
            &label,
            recorder.figures(&name(system, REPLAY_THREADS)),
            baseline,
        );
    }
    support::print_header(
        "A claim and its complete over PostgreSQL",
        "hand-written INSERT, then UPDATE",
    );
    for threads in LIFE_THREADS {
        let baseline = recorder.figures(&name("hand-written INSERT, then UPDATE", threads));
        for system in LIFE {
            let label = format!("{system}, {threads} threads");
            support::print_row(&label, recorder.figures(&name(system, threads)), baseline);
        }
    }
}
