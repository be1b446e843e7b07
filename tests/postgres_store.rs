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
