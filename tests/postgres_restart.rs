//! The PostgreSQL engine when the server goes away: killed mid-load (`pg_ctl stop -m
//! immediate`, as a crash would) and started again, the same `Store` carries on by itself and
//! every call it acknowledged is still there (SEMANTICS.md §10); calls while the server is
//! down fail with `Error::Database` and acknowledge nothing. Fencing tokens stay above every
//! earlier one across a sweep and a server restart (§5), and a `mark_seen_many` batch cut by a
//! crash is stored whole or not at all (§10), as are checkpoints and extensions. A server that is not there at all is
//! `DatabaseErrorKind::Connect`.

use std::net::TcpListener;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dedupe_store::testing::postgres::TestCluster;
use dedupe_store::{Claim, DatabaseErrorKind, Error, ManualClock, Store};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

const WORKERS: usize = 4;

/// How long the store is given to reach the restarted server.
const RECONNECT: Duration = Duration::from_secs(30);

/// What the load threads saw, shared with the test.
#[derive(Default)]
struct Ledger {
    /// Keys whose claim answered `Acquired`.
    claimed: Mutex<Vec<String>>,
    /// Keys whose `complete` answered `Ok`, with the response.
    completed: Mutex<Vec<(String, String)>>,
    /// Acknowledgements (claims and completes) so far.
    acks: AtomicUsize,
    /// Calls made and answered entirely while the server was down, all of which failed.
    failed_while_down: AtomicUsize,
    /// Anything a thread saw that the rules forbid, as a sentence.
    violations: Mutex<Vec<String>>,
    /// Set from just after the server is stopped to just before it is started again.
    down: AtomicBool,
    stop: AtomicBool,
}

impl Ledger {
    fn violation(&self, what: String) {
        self.violations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(what);
    }

    /// Checks a failed call: a database error of any kind, or a violation.
    fn failed(&self, call: &str, key: &str, err: &Error, down_before: bool) {
        if !matches!(err, Error::Database { .. }) {
            self.violation(format!(
                "{call} {key} failed with {err:?}, not Error::Database"
            ));
        }
        if down_before && self.down.load(Ordering::SeqCst) {
            self.failed_while_down.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Checks a call that answered: one made and answered while the server was down cannot
    /// have been stored, so answering it is a violation.
    fn answered(&self, call: &str, key: &str, down_before: bool) {
        if down_before && self.down.load(Ordering::SeqCst) {
            self.violation(format!("{call} {key} answered while the server was down"));
        }
    }

    fn acks(&self) -> usize {
        self.acks.load(Ordering::SeqCst)
    }
}

/// One load thread: claim and complete fresh keys until told to stop, recording every
/// acknowledgement in `ledger`.
fn load(store: &Store, worker: usize, ledger: &Ledger) {
    let mut n = 0;
    // Each claim here starts after the previous one answered, so its token is larger
    // (SEMANTICS.md §5), across the restart too.
    let mut last_token = 0;
    while !ledger.stop.load(Ordering::SeqCst) {
        // A fresh key every time: a failed call's outcome is unknown, so its key is never
        // claimed again.
        let key = format!("w{worker}-{n}");
        n += 1;
        let down = ledger.down.load(Ordering::SeqCst);
        let ticket = match store.claim(&key) {
            Ok(Claim::Acquired(ticket)) => {
                ledger.answered("claim", &key, down);
                if ticket.fencing_token() <= last_token {
                    ledger.violation(format!(
                        "{key} got token {} after this thread's {last_token}",
                        ticket.fencing_token()
                    ));
                }
                last_token = ticket.fencing_token();
                ledger
                    .claimed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(key.clone());
                ledger.acks.fetch_add(1, Ordering::SeqCst);
                ticket
            }
            Ok(other) => {
                ledger.violation(format!("fresh key {key} answered {other:?}"));
                continue;
            }
            Err(err) => {
                ledger.failed("claim", &key, &err, down);
                thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let response = format!("response-{key}");
        let down = ledger.down.load(Ordering::SeqCst);
        match store.complete(&ticket, &response) {
            Ok(()) => {
                ledger.answered("complete", &key, down);
                ledger
                    .completed
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push((key, response));
                ledger.acks.fetch_add(1, Ordering::SeqCst);
            }
            Err(err) => {
                ledger.failed("complete", &key, &err, down);
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Waits, up to `limit`, until `done` holds.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("gave up waiting: {what}").into());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn a_server_crash_mid_load_loses_no_acknowledged_write_and_the_store_reconnects() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("restart");
    let store = Store::builder()
        .lease(Duration::from_secs(60))
        .without_sweeper()
        .postgres_connections(8)
        .open_postgres(&url)?;
    let ledger = Ledger::default();
    thread::scope(|scope| -> TestResult {
        let workers: Vec<_> = (0..WORKERS)
            .map(|worker| {
                let (store, ledger) = (&store, &ledger);
                scope.spawn(move || load(store, worker, ledger))
            })
            .collect();
        let result = (|| -> TestResult {
            wait_until(Duration::from_secs(20), "40 acknowledgements", || {
                ledger.acks() >= 40
            })?;
            cluster.stop_immediate();
            ledger.down.store(true, Ordering::SeqCst);
            // The load keeps calling into the dead server for a while; so does this thread.
            thread::sleep(Duration::from_secs(1));
            match store.claim("while-down") {
                Err(Error::Database { .. }) => {}
                other => panic!("a claim while the server is down answered {other:?}"),
            }
            assert!(
                ledger.failed_while_down.load(Ordering::SeqCst) > 0,
                "the load made calls while the server was down"
            );
            ledger.down.store(false, Ordering::SeqCst);
            let before_restart = ledger.acks();
            cluster.start_again();
            // The same store, not reopened, acknowledges again.
            wait_until(RECONNECT, "acknowledgements after the restart", || {
                ledger.acks() >= before_restart + 20
            })
        })();
        ledger.stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.join().map_err(|_| "a load thread panicked")?;
        }
        result
    })?;

    let violations = ledger
        .violations
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    assert!(violations.is_empty(), "{violations:#?}");
    let claimed = ledger
        .claimed
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let completed = ledger
        .completed
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    eprintln!(
        "acknowledged {} claims and {} completes; {} calls failed while the server was down",
        claimed.len(),
        completed.len(),
        ledger.failed_while_down.load(Ordering::SeqCst)
    );
    for key in &claimed {
        // In progress or completed: present either way.
        assert!(
            store.get(key)?.is_some(),
            "acknowledged claim {key} is gone"
        );
    }
    for (key, response) in &completed {
        match store.claim(key)? {
            Claim::Completed(outcome) => {
                assert_eq!(outcome.response, response.as_bytes(), "{key}")
            }
            other => panic!("acknowledged complete {key} answers {other:?}"),
        }
    }
    store.close()?;
    Ok(())
}

#[test]
fn a_mark_seen_many_batch_is_all_or_nothing_across_a_server_crash() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("batches");
    let store = Store::builder()
        .without_sweeper()
        .postgres_connections(4)
        .open_postgres(&url)?;
    const BATCH: usize = 10;
    let acked = Mutex::new(Vec::new());
    let failed = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let batches = AtomicUsize::new(0);
    thread::scope(|scope| -> TestResult {
        let workers: Vec<_> = (0..2)
            .map(|worker| {
                let (store, acked, failed, stop, batches) =
                    (&store, &acked, &failed, &stop, &batches);
                scope.spawn(move || -> Result<(), String> {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let keys: Vec<String> =
                            (0..BATCH).map(|i| format!("w{worker}-b{n}-{i}")).collect();
                        n += 1;
                        match store.mark_seen_many(&keys) {
                            Ok(stored) if stored.iter().all(|s| *s) => {
                                acked.lock().map_err(|e| e.to_string())?.push(keys);
                                batches.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(stored) => return Err(format!("fresh keys answered {stored:?}")),
                            Err(Error::Database { .. }) => {
                                failed.lock().map_err(|e| e.to_string())?.push(keys);
                                thread::sleep(Duration::from_millis(20));
                            }
                            Err(err) => return Err(format!("mark_seen_many: {err:?}")),
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        let result = (|| -> TestResult {
            wait_until(Duration::from_secs(20), "20 batches", || {
                batches.load(Ordering::SeqCst) >= 20
            })?;
            cluster.stop_immediate();
            thread::sleep(Duration::from_millis(500));
            cluster.start_again();
            let before = batches.load(Ordering::SeqCst);
            wait_until(RECONNECT, "batches after the restart", || {
                batches.load(Ordering::SeqCst) >= before + 10
            })
        })();
        stop.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.join().map_err(|_| "a batch thread panicked")??;
        }
        result
    })?;
    let acked = acked.into_inner().map_err(|e| e.to_string())?;
    let failed = failed.into_inner().map_err(|e| e.to_string())?;
    eprintln!(
        "{} batches acknowledged, {} failed",
        acked.len(),
        failed.len()
    );
    for keys in &acked {
        for key in keys {
            assert!(store.get(key)?.is_some(), "acknowledged mark {key} is gone");
        }
    }
    // A failed batch's outcome is unknown, but it is one outcome for the whole batch.
    for keys in &failed {
        let mut present = Vec::new();
        for key in keys {
            present.push(store.get(key)?.is_some());
        }
        assert!(
            present.iter().all(|p| *p) || present.iter().all(|p| !*p),
            "a failed batch was stored in part: {keys:?} {present:?}"
        );
    }
    Ok(())
}

/// A claim of a fresh key on `store`, retried (each time on a new key, since a failed
/// call's outcome is unknown) while the server is out of reach, up to [`RECONNECT`].
fn claim_fresh(store: &Store, prefix: &str) -> TestResult<dedupe_store::Ticket> {
    let deadline = Instant::now() + RECONNECT;
    for attempt in 0.. {
        match store.claim(format!("{prefix}-{attempt}")) {
            Ok(Claim::Acquired(ticket)) => return Ok(ticket),
            Ok(other) => return Err(format!("a fresh key answered {other:?}").into()),
            Err(Error::Database { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(100));
            }
            Err(err) => return Err(err.into()),
        }
    }
    unreachable!("the loop returns")
}

#[test]
fn fencing_tokens_grow_across_a_sweep_and_a_server_restart() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("tokens");
    let clock = ManualClock::new(1_795_305_600_000);
    let open = || {
        Store::builder()
            .clock(clock.clone())
            .lease(Duration::from_secs(5))
            .ttl(Duration::from_secs(60))
            .without_sweeper()
            .open_postgres(&url)
    };
    let store = open()?;
    let Claim::Acquired(first) = store.claim("order")? else {
        panic!("a fresh key is acquired");
    };
    store.complete(&first, b"done")?;
    // Expired by the clock, then swept: the record is gone, not its token.
    clock.advance(Duration::from_secs(61));
    assert!(store.get("order")?.is_none());
    assert_eq!(store.sweep()?, 1);
    let Claim::Acquired(second) = store.claim("order")? else {
        panic!("a swept key is acquired again");
    };
    assert_eq!(second.attempt(), 1, "a fresh claim after the sweep");
    assert!(
        second.fencing_token() > first.fencing_token(),
        "{} after the swept {}",
        second.fencing_token(),
        first.fencing_token()
    );
    // And explicitly expired, same again.
    assert!(store.expire("order")?);
    let Claim::Acquired(third) = store.claim("order")? else {
        panic!("an expired key is acquired again");
    };
    assert!(third.fencing_token() > second.fencing_token());
    store.complete(&third, b"done")?;

    cluster.stop_immediate();
    cluster.start_again();
    // The same store, once it has reconnected.
    let fourth = claim_fresh(&store, "after-restart")?;
    assert!(
        fourth.fencing_token() > third.fencing_token(),
        "{} after the restart, {} before",
        fourth.fencing_token(),
        third.fencing_token()
    );
    // A store opened after the restart (another process, say) as well.
    let reopened = open()?;
    let fifth = claim_fresh(&reopened, "reopened")?;
    assert!(fifth.fencing_token() > fourth.fencing_token());
    // The completed record from before the crash still replays.
    assert!(matches!(reopened.claim("order")?, Claim::Completed(_)));
    Ok(())
}

#[test]
fn checkpoints_and_extensions_acknowledged_before_a_crash_are_kept() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("owners");
    let clock = ManualClock::new(1_795_305_600_000);
    let store = Store::builder()
        .clock(clock.clone())
        .lease(Duration::from_secs(5))
        .ttl(Duration::from_secs(600))
        .without_sweeper()
        .open_postgres(&url)?;
    let Claim::Acquired(checkpointed) = store.claim("checkpointed")? else {
        panic!("a fresh key is acquired");
    };
    store.checkpoint(&checkpointed, "charged", b"receipt-7")?;
    let Claim::Acquired(mut extended) = store.claim("extended")? else {
        panic!("a fresh key is acquired");
    };
    store.extend(&mut extended, Duration::from_secs(20))?;

    cluster.stop_immediate();
    cluster.start_again();
    // Past the 5 s lease, inside the 20 s extension.
    clock.advance(Duration::from_secs(6));
    let deadline = Instant::now() + RECONNECT;
    let taken = loop {
        match store.claim("checkpointed") {
            Ok(claim) => break claim,
            Err(Error::Database { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(100));
            }
            Err(err) => return Err(err.into()),
        }
    };
    let Claim::Acquired(taken) = taken else {
        panic!("the checkpointed claim is taken over after its lease, got {taken:?}");
    };
    assert!(taken.is_takeover());
    let checkpoint = taken
        .checkpoint()
        .ok_or("the takeover carries no checkpoint")?;
    assert_eq!(
        (checkpoint.step.as_str(), checkpoint.state.as_slice()),
        ("charged", b"receipt-7".as_slice())
    );
    assert!(
        matches!(store.claim("extended")?, Claim::InProgress { .. }),
        "the extension survived the crash"
    );
    store.complete(&extended, b"done")?;
    Ok(())
}

#[test]
fn a_server_that_refuses_connections_is_a_connect_error() -> TestResult {
    // A port nothing listens on: bound, then released.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let result = Store::builder()
        .without_sweeper()
        .open_postgres(&format!("postgres://postgres@127.0.0.1:{port}/postgres"));
    match result {
        Err(Error::Database {
            kind: DatabaseErrorKind::Connect,
            ..
        }) => Ok(()),
        other => panic!("expected a Connect error, got {other:?}"),
    }
}
