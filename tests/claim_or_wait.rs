//! `claim_or_wait`: waits for the owner on an in-process notification, then answers as a claim.

mod common;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Fixture, LEASE, TestResult, on_both};
use dedupe_store::{Claim, ClaimOptions, Store, Ticket};

const LONG: Duration = Duration::from_secs(30);

/// A thread waiting on key "k" for up to [`LONG`].
fn waiter(store: &Store) -> JoinHandle<dedupe_store::Result<Claim>> {
    let store = store.clone();
    std::thread::spawn(move || store.claim_or_wait("k", &ClaimOptions::new(), LONG))
}

/// Claims "k" and starts a [`waiter`] on it, which has begun to wait once this returns.
fn owner_and_waiter(f: &Fixture) -> TestResult<(Ticket, JoinHandle<dedupe_store::Result<Claim>>)> {
    let ticket = f.acquire("k")?;
    let waiter = waiter(&f.store);
    std::thread::sleep(Duration::from_millis(50));
    Ok((ticket, waiter))
}

#[test]
fn returns_the_outcome_when_the_owner_completes_during_the_wait() -> TestResult {
    on_both(|f| {
        let (ticket, waiter) = owner_and_waiter(f)?;
        f.store.complete(&ticket, b"first attempt's answer")?;
        match waiter.join().map_err(|_| "waiter panicked")?? {
            Claim::Completed(outcome) => assert_eq!(outcome.response, b"first attempt's answer"),
            other => return Err(format!("expected the outcome, got {other:?}").into()),
        }
        Ok(())
    })
}

#[test]
fn acquires_when_the_owner_releases_during_the_wait() -> TestResult {
    on_both(|f| {
        let (ticket, waiter) = owner_and_waiter(f)?;
        f.store.release(&ticket)?;
        let claim = waiter.join().map_err(|_| "waiter panicked")??;
        let next = claim
            .ticket()
            .ok_or("the waiter acquires the released key")?;
        assert!(!next.is_takeover());
        Ok(())
    })
}

#[test]
fn times_out_as_in_progress() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        let started = Instant::now();
        match f
            .store
            .claim_or_wait("k", &ClaimOptions::new(), Duration::from_millis(100))?
        {
            Claim::InProgress { lease_until, .. } => assert_eq!(lease_until, ticket.lease_until()),
            other => return Err(format!("expected InProgress, got {other:?}").into()),
        }
        assert!(
            started.elapsed() >= Duration::from_millis(100),
            "returned before the timeout"
        );
        // A zero timeout is a plain claim.
        assert!(matches!(
            f.store
                .claim_or_wait("k", &ClaimOptions::new(), Duration::ZERO)?,
            Claim::InProgress { .. }
        ));
        Ok(())
    })
}

#[test]
fn takes_over_when_the_owner_lease_passes_during_the_wait() -> TestResult {
    on_both(|f| {
        let (crashed, waiter) = owner_and_waiter(f)?;
        // Nobody writes: only the clock moves past the lease.
        f.advance(LEASE);
        let ticket = waiter
            .join()
            .map_err(|_| "waiter panicked")??
            .ticket()
            .ok_or("the waiter takes over")?;
        assert!(ticket.is_takeover());
        assert!(ticket.fencing_token() > crashed.fencing_token());
        Ok(())
    })
}

#[test]
fn answers_at_once_when_nobody_holds_the_key() -> TestResult {
    on_both(|f| {
        assert!(
            f.store
                .claim_or_wait("free", &ClaimOptions::new(), LONG)?
                .is_acquired()
        );
        let done = f.acquire("done")?;
        f.store.complete(&done, b"x")?;
        assert!(matches!(
            f.store.claim_or_wait("done", &ClaimOptions::new(), LONG)?,
            Claim::Completed(_)
        ));
        let mismatch = ClaimOptions::new().fingerprint(b"other");
        let _busy = f
            .store
            .claim_with("busy", &ClaimOptions::new().fingerprint(b"mine"))?;
        assert!(matches!(
            f.store.claim_or_wait("busy", &mismatch, LONG)?,
            Claim::Mismatch { .. }
        ));
        Ok(())
    })
}

#[test]
fn many_waiters_get_the_one_outcome() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        let waiters: Vec<_> = (0..8).map(|_| waiter(&f.store)).collect();
        std::thread::sleep(Duration::from_millis(50));
        f.store.complete(&ticket, b"shared")?;
        for waiter in waiters {
            match waiter.join().map_err(|_| "waiter panicked")?? {
                Claim::Completed(outcome) => assert_eq!(outcome.response, b"shared"),
                other => return Err(format!("expected the outcome, got {other:?}").into()),
            }
        }
        Ok(())
    })
}

#[test]
fn at_the_timeout_answers_as_a_claim_would_then() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        let store = f.store.clone();
        let waiting = std::thread::spawn(move || {
            store.claim_or_wait("k", &ClaimOptions::new(), Duration::from_millis(300))
        });
        std::thread::sleep(Duration::from_millis(50));
        // The lease is still live at the timeout, but a third of it has passed meanwhile.
        f.advance(LEASE / 3);
        match waiting.join().map_err(|_| "waiter panicked")?? {
            Claim::InProgress {
                lease_until,
                retry_after,
                ..
            } => {
                assert_eq!(lease_until, ticket.lease_until());
                assert_eq!(retry_after, LEASE - LEASE / 3);
            }
            other => return Err(format!("expected InProgress, got {other:?}").into()),
        }
        Ok(())
    })
}

#[test]
fn a_wait_counts_the_answer_its_caller_gets() -> TestResult {
    on_both(|f| {
        let (mut ticket, waiter) = owner_and_waiter(f)?;
        // Heartbeats wake the waiter, which looks again each time.
        for _ in 0..3 {
            f.store.extend(&mut ticket, LEASE)?;
            std::thread::sleep(Duration::from_millis(20));
        }
        f.store.complete(&ticket, b"done")?;
        assert!(matches!(
            waiter.join().map_err(|_| "waiter panicked")??,
            Claim::Completed(_)
        ));
        // The wait met the key in progress (once, however often it looked) and ended with
        // the replay.
        let stats = f.store.stats()?;
        assert_eq!((stats.in_progress, stats.replays), (1, 1));
        // A wait that times out counts once too.
        let _busy = f.acquire("busy")?;
        let timed_out =
            f.store
                .claim_or_wait("busy", &ClaimOptions::new(), Duration::from_millis(30))?;
        assert!(matches!(timed_out, Claim::InProgress { .. }));
        assert_eq!(f.store.stats()?.in_progress, 2);
        assert!(matches!(f.store.claim("busy")?, Claim::InProgress { .. }));
        assert_eq!(f.store.stats()?.in_progress, 3);
        Ok(())
    })
}

#[test]
fn closing_the_store_ends_the_wait() -> TestResult {
    on_both(|f| {
        let (_held, waiter) = owner_and_waiter(f)?;
        let closed_at = Instant::now();
        f.store.clone().close()?;
        // The lease has 30 s to run and the wait 30 s more: only the close can end it now.
        match waiter.join().map_err(|_| "waiter panicked")? {
            Err(dedupe_store::Error::Closed) => {}
            other => return Err(format!("expected Closed, got {other:?}").into()),
        }
        assert!(
            closed_at.elapsed() < Duration::from_secs(10),
            "the waiter slept on after the close"
        );
        // Reads the store could still answer from memory are refused too.
        assert!(matches!(f.store.get("k"), Err(dedupe_store::Error::Closed)));
        assert!(matches!(
            f.store.claim("k"),
            Err(dedupe_store::Error::Closed)
        ));
        Ok(())
    })
}
