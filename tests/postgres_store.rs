//! The store over PostgreSQL: every operation through the public API against a real server,
//! answering as docs/SEMANTICS.md says, as on a file.

use std::time::Duration;

use dedupe_store::testing::postgres::TestCluster;
use dedupe_store::{Claim, ClaimOptions, Error, ManualClock, SeqCheck, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn store(cluster: &TestCluster, db: &str, clock: &ManualClock) -> Result<Store, Error> {
    Store::builder()
        .clock(clock.clone())
        .lease(Duration::from_secs(5))
        .ttl(Duration::from_secs(60))
        .without_sweeper()
        .open_postgres(&cluster.create_database(db))
}

#[test]
fn claim_complete_replay_release_and_takeover() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let clock = ManualClock::new(1_000_000);
    let store = store(&cluster, "basics", &clock)?;
    let Claim::Acquired(first) = store.claim("order-1")? else {
        panic!("a fresh key is acquired");
    };
    assert!(!first.is_takeover());
    assert!(matches!(store.claim("order-1")?, Claim::InProgress { .. }));
    store.complete(&first, b"charged")?;
    match store.claim("order-1")? {
        Claim::Completed(outcome) => assert_eq!(outcome.response, b"charged"),
        other => panic!("expected the replay, got {other:?}"),
    }
    assert!(matches!(
        store.complete(&first, b"again"),
        Err(Error::LeaseLost { .. })
    ));

    let Claim::Acquired(second) = store.claim("order-2")? else {
        panic!("a fresh key is acquired");
    };
    store.release(&second)?;
    let Claim::Acquired(third) = store.claim("order-2")? else {
        panic!("a released key is acquired again");
    };
    assert!(third.fencing_token() > second.fencing_token());
    clock.advance(Duration::from_secs(6));
    let Claim::Acquired(fourth) = store.claim("order-2")? else {
        panic!("a claim whose lease ran out is taken over");
    };
    assert!(fourth.is_takeover());
    assert_eq!(fourth.attempt(), 2);
    assert!(fourth.fencing_token() > third.fencing_token());
    assert!(matches!(
        store.complete(&third, b"late"),
        Err(Error::LeaseLost { .. })
    ));

    let fp = ClaimOptions::new().fingerprint(b"a");
    let other = ClaimOptions::new().fingerprint(b"b");
    let Claim::Acquired(ticket) = store.claim_with("pay", &fp)? else {
        panic!("acquired");
    };
    assert!(matches!(
        store.claim_with("pay", &other)?,
        Claim::Mismatch {
            completed: false,
            ..
        }
    ));
    store.complete(&ticket, b"ok")?;

    assert!(store.mark_seen("msg-1")?);
    assert!(!store.mark_seen("msg-1")?);
    assert_eq!(
        store.mark_seen_many(["msg-1", "msg-2", "msg-2"])?,
        [false, true, false]
    );
    assert_eq!(store.advance_sequence("stream", 3)?, SeqCheck::Accepted);
    assert_eq!(store.advance_sequence("stream", 3)?, SeqCheck::Duplicate);
    assert!(store.expire("msg-1")?);
    assert!(!store.expire("msg-1")?);
    assert!(store.get("pay")?.is_some());
    let listed = store.list("order-", 10)?;
    assert_eq!(listed.len(), 2);

    clock.advance(Duration::from_secs(120));
    assert!(store.get("pay")?.is_none(), "expired");
    let swept = store.sweep()?;
    assert!(swept >= 4, "swept {swept}");
    assert_eq!(store.stats()?.live_keys, 0);
    store.close()?;
    Ok(())
}

#[test]
fn two_stores_on_one_database_give_each_key_exactly_one_owner() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("race");
    let open = || {
        Store::builder()
            .lease(Duration::from_secs(60))
            .without_sweeper()
            .open_postgres(&url)
    };
    let stores = [open()?, open()?];
    let keys: Vec<String> = (0..40).map(|n| format!("race-{n}")).collect();
    let acquired = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for thread in 0..8 {
            let store = stores[thread % 2].clone();
            let (keys, acquired) = (&keys, &acquired);
            scope.spawn(move || -> Result<(), Error> {
                for key in keys {
                    if let Claim::Acquired(ticket) = store.claim(key)? {
                        store.complete(&ticket, format!("thread {thread}"))?;
                        acquired.lock().map_err(|_| Error::CommitPanicked)?.push((
                            key.clone(),
                            thread,
                            ticket.fencing_token(),
                        ));
                    }
                }
                Ok(())
            });
        }
    });
    let mut acquired = acquired.into_inner().map_err(|_| "poisoned")?;
    acquired.sort();
    let owners: Vec<&String> = acquired.iter().map(|(key, _, _)| key).collect();
    let mut expected: Vec<&String> = keys.iter().collect();
    expected.sort();
    assert_eq!(owners, expected, "exactly one owner per key");
    let mut tokens: Vec<u64> = acquired.iter().map(|(_, _, token)| *token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), keys.len(), "no token is issued twice");
    for (key, thread, _) in &acquired {
        for store in &stores {
            match store.claim(key)? {
                Claim::Completed(outcome) => {
                    assert_eq!(outcome.response, format!("thread {thread}").as_bytes());
                }
                other => panic!("{key}: expected the winner's replay, got {other:?}"),
            }
        }
    }
    Ok(())
}
