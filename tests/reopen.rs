//! Reopen: everything acknowledged is there after the store is dropped and opened again, and
//! fencing tokens keep increasing across opens.

mod common;

use std::time::Duration;

use common::{Fixture, LEASE, T0, TestResult};
use dedupe_store::{Claim, ClaimOptions, Durability, EntryState, ManualClock, SeqCheck, Store};

fn open(path: &std::path::Path, clock: &ManualClock) -> dedupe_store::Result<Store> {
    Fixture::builder(clock).open(path)
}

#[test]
fn acknowledged_state_survives_drop_and_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("reopen.redb");
    let clock = ManualClock::new(T0);
    let (in_progress, completed, released_token);
    {
        let store = open(&path, &clock)?;
        let fp = ClaimOptions::new().fingerprint(b"fp");
        completed = store.claim_with("done", &fp)?.ticket().ok_or("fresh")?;
        store.complete(&completed, b"the outcome")?;
        in_progress = store.claim("running")?.ticket().ok_or("fresh")?;
        store.checkpoint(&in_progress, "step-1", b"state")?;
        let released = store.claim("released")?.ticket().ok_or("fresh")?;
        released_token = released.fencing_token();
        store.release(&released)?;
        assert!(store.mark_seen("seen")?);
        assert_eq!(store.advance_sequence("stream", 7)?, SeqCheck::Accepted);
    }
    let store = open(&path, &clock)?;
    match store.claim_with("done", &ClaimOptions::new().fingerprint(b"other"))? {
        Claim::Mismatch {
            completed: true, ..
        } => {}
        other => return Err(format!("the fingerprint was lost: {other:?}").into()),
    }
    match store.claim("done")? {
        Claim::Completed(outcome) => {
            assert_eq!(outcome.response, b"the outcome");
            assert_eq!(outcome.fencing_token, completed.fencing_token());
        }
        other => return Err(format!("completed record lost: {other:?}").into()),
    }
    let entry = store.get("running")?.ok_or("in-progress record lost")?;
    match &entry.state {
        EntryState::InProgress {
            lease_until,
            checkpoint,
            ..
        } => {
            assert_eq!(*lease_until, in_progress.lease_until());
            assert_eq!(checkpoint.as_ref().map(|c| c.step.as_str()), Some("step-1"));
        }
        other => return Err(format!("expected in progress, got {other:?}").into()),
    }
    assert!(matches!(store.claim("running")?, Claim::InProgress { .. }));
    assert_eq!(store.get("released")?, None);
    assert!(!store.mark_seen("seen")?);
    assert_eq!(store.sequence_mark("stream")?, Some(7));
    // The ticket from before the reopen still owns its key: the file is the same store.
    store.complete(&in_progress, b"finished after reopen")?;
    let next = store.claim("new")?.ticket().ok_or("fresh")?;
    assert!(next.fencing_token() > released_token);
    Ok(())
}

#[test]
fn tokens_keep_increasing_across_many_reopens() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tokens.redb");
    let clock = ManualClock::new(T0);
    let mut last = 0;
    for round in 0..10 {
        let store = open(&path, &clock)?;
        for i in 0..5 {
            let ticket = store
                .claim(format!("k-{round}-{i}"))?
                .ticket()
                .ok_or("fresh")?;
            assert!(
                ticket.fencing_token() > last,
                "token went backwards after a reopen"
            );
            last = ticket.fencing_token();
        }
        if round % 2 == 0 {
            store.close()?;
        }
    }
    Ok(())
}

#[test]
fn periodic_durability_loses_nothing_on_a_clean_close() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("periodic.redb");
    let clock = ManualClock::new(T0);
    let builder = |clock: &ManualClock| {
        Fixture::builder(clock).durability(Durability::Periodic(Duration::from_secs(3600)))
    };
    {
        let store = builder(&clock).open(&path)?;
        for i in 0..100 {
            let ticket = store.claim(format!("k{i}"))?.ticket().ok_or("fresh")?;
            store.complete(&ticket, format!("v{i}"))?;
        }
        store.close()?;
    }
    {
        let store = builder(&clock).open(&path)?;
        assert_eq!(store.len()?, 100);
        let _ = store.claim("dropped-not-closed")?;
    }
    let store = builder(&clock).open(&path)?;
    assert_eq!(store.len()?, 101);
    match store.claim("k42")? {
        Claim::Completed(outcome) => assert_eq!(outcome.response, b"v42"),
        other => return Err(format!("lost: {other:?}").into()),
    }
    Ok(())
}

#[test]
fn expiry_is_judged_by_the_clock_after_a_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("expiry.redb");
    let clock = ManualClock::new(T0);
    {
        let store = open(&path, &clock)?;
        store.mark_seen_with_ttl("short", Duration::from_secs(10))?;
        let _ = store.claim("lease")?;
    }
    clock.advance(LEASE);
    let store = open(&path, &clock)?;
    assert!(
        store.mark_seen("short")?,
        "expired while the store was closed"
    );
    let taken = store
        .claim("lease")?
        .ticket()
        .ok_or("the lease ran out while closed")?;
    assert!(taken.is_takeover());
    Ok(())
}
