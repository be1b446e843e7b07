//! Every state transition of the table in SEMANTICS.md §3, on a real file and in memory.

mod common;

use std::time::Duration;

use common::{LEASE, TTL, TestResult, on_both, on_both_with};
use dedupe_store::{Claim, ClaimOptions, EntryState, Error, Key};

const MS: u64 = 1;

#[test]
fn absent_key_is_acquired_with_attempt_one() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        assert_eq!(ticket.key().as_bytes(), b"k");
        assert_eq!(ticket.attempt(), 1);
        assert!(!ticket.is_takeover());
        assert!(ticket.fencing_token() > 0);
        assert_eq!(ticket.claimed_at(), f.now());
        assert_eq!(ticket.lease_until(), f.now() + LEASE.as_millis() as u64);
        assert!(ticket.checkpoint().is_none());
        let entry = f.store.get("k")?.ok_or("the claim is stored")?;
        assert!(entry.is_in_progress());
        assert_eq!(entry.fencing_token, ticket.fencing_token());
        assert_eq!(entry.expires_at, f.now() + TTL.as_millis() as u64);
        Ok(())
    })
}

#[test]
fn live_lease_answers_in_progress_and_changes_nothing() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        let before = f.store.get("k")?;
        f.advance(Duration::from_secs(10));
        match f.store.claim("k")? {
            Claim::InProgress {
                lease_until,
                retry_after,
                attempt,
                ..
            } => {
                assert_eq!(lease_until, ticket.lease_until());
                assert_eq!(retry_after, Duration::from_secs(20));
                assert_eq!(attempt, 1);
            }
            other => return Err(format!("expected InProgress, got {other:?}").into()),
        }
        assert_eq!(f.store.get("k")?, before);
        Ok(())
    })
}

#[test]
fn lease_is_live_until_but_not_at_its_deadline() -> TestResult {
    on_both(|f| {
        let first = f.acquire("k")?;
        f.clock.set(first.lease_until() - MS);
        assert!(matches!(f.store.claim("k")?, Claim::InProgress { .. }));
        f.clock.set(first.lease_until());
        let second = f
            .store
            .claim("k")?
            .ticket()
            .ok_or("taken over at the deadline")?;
        assert!(second.is_takeover());
        Ok(())
    })
}

#[test]
fn passed_lease_is_taken_over_with_a_larger_token_and_next_attempt() -> TestResult {
    on_both(|f| {
        let first = f.acquire("k")?;
        f.advance(LEASE);
        let second = f.acquire("k")?;
        assert!(second.is_takeover());
        assert_eq!(second.attempt(), 2);
        assert!(second.fencing_token() > first.fencing_token());
        assert_eq!(second.claimed_at(), f.now());
        f.advance(LEASE);
        let third = f.acquire("k")?;
        assert_eq!(third.attempt(), 3);
        assert!(third.fencing_token() > second.fencing_token());
        // The stale owners can do nothing.
        for stale in [&first, &second] {
            assert!(matches!(
                f.store.complete(stale, b"late"),
                Err(Error::LeaseLost { .. })
            ));
            assert!(matches!(
                f.store.release(stale),
                Err(Error::LeaseLost { .. })
            ));
        }
        f.store.complete(&third, b"done")?;
        Ok(())
    })
}

#[test]
fn complete_stores_the_outcome_and_claims_replay_it() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        f.advance(Duration::from_secs(1));
        f.store.complete(&ticket, b"201 created")?;
        let completed_at = f.now();
        f.advance(Duration::from_secs(5));
        for _ in 0..3 {
            match f.store.claim("k")? {
                Claim::Completed(outcome) => {
                    assert_eq!(outcome.response, b"201 created");
                    assert_eq!(outcome.completed_at, completed_at);
                    assert_eq!(outcome.expires_at, completed_at + TTL.as_millis() as u64);
                    assert_eq!(outcome.attempt, 1);
                    assert_eq!(outcome.fencing_token, ticket.fencing_token());
                }
                other => return Err(format!("expected a replay, got {other:?}").into()),
            }
        }
        let entry = f.store.get("k")?.ok_or("completed key is stored")?;
        assert_eq!(
            entry.outcome().map(|o| o.response),
            Some(b"201 created".to_vec())
        );
        Ok(())
    })
}

#[test]
fn replay_reports_the_attempt_that_completed() -> TestResult {
    on_both(|f| {
        let _crashed = f.acquire("k")?;
        f.advance(LEASE);
        let second = f.acquire("k")?;
        f.store.complete(&second, b"ok")?;
        match f.store.claim("k")? {
            Claim::Completed(outcome) => assert_eq!(outcome.attempt, 2),
            other => return Err(format!("expected a replay, got {other:?}").into()),
        }
        Ok(())
    })
}

#[test]
fn an_expired_lease_without_takeover_may_still_complete() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        f.advance(LEASE * 3);
        f.store.complete(&ticket, b"slow but fine")?;
        assert!(matches!(f.store.claim("k")?, Claim::Completed(_)));
        Ok(())
    })
}

#[test]
fn release_makes_the_key_claimable_at_once() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        f.store.release(&ticket)?;
        assert_eq!(f.store.get("k")?, None);
        let again = f.acquire("k")?;
        assert_eq!(again.attempt(), 1, "a claim after release is fresh");
        assert!(!again.is_takeover());
        assert!(again.fencing_token() > ticket.fencing_token());
        Ok(())
    })
}

#[test]
fn a_ticket_completes_or_releases_once() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("a")?;
        f.store.complete(&ticket, b"1")?;
        assert!(matches!(
            f.store.complete(&ticket, b"2"),
            Err(Error::LeaseLost { .. })
        ));
        assert!(matches!(
            f.store.release(&ticket),
            Err(Error::LeaseLost { .. })
        ));
        match f.store.claim("a")? {
            Claim::Completed(outcome) => assert_eq!(outcome.response, b"1"),
            other => return Err(format!("the first completion stands, got {other:?}").into()),
        }
        let ticket = f.acquire("b")?;
        f.store.release(&ticket)?;
        assert!(matches!(
            f.store.release(&ticket),
            Err(Error::LeaseLost { .. })
        ));
        assert!(matches!(
            f.store.complete(&ticket, b"x"),
            Err(Error::LeaseLost { .. })
        ));
        assert_eq!(f.store.get("b")?, None);
        Ok(())
    })
}

#[test]
fn extend_moves_the_lease_deadline() -> TestResult {
    on_both(|f| {
        let mut ticket = f.acquire("k")?;
        let first_deadline = ticket.lease_until();
        f.advance(Duration::from_secs(20));
        f.store.extend(&mut ticket, Duration::from_secs(60))?;
        assert_eq!(ticket.lease_until(), f.now() + 60_000);
        f.clock.set(first_deadline + 1_000);
        assert!(matches!(f.store.claim("k")?, Claim::InProgress { .. }));
        f.clock.set(ticket.lease_until());
        let taken = f.acquire("k")?;
        assert!(taken.is_takeover());
        assert!(matches!(
            f.store.extend(&mut ticket, LEASE),
            Err(Error::LeaseLost { .. })
        ));
        Ok(())
    })
}

#[test]
fn a_live_lease_never_expires() -> TestResult {
    // TTL shorter than the lease: the record lives until the lease ends.
    on_both(|f| {
        let options = ClaimOptions::new()
            .ttl(Duration::from_secs(5))
            .lease(Duration::from_secs(60));
        let mut ticket = f
            .store
            .claim_with("k", &options)?
            .ticket()
            .ok_or("acquired")?;
        let entry = f.store.get("k")?.ok_or("stored")?;
        assert_eq!(entry.expires_at, ticket.lease_until());
        f.advance(Duration::from_secs(50));
        f.store.extend(&mut ticket, Duration::from_secs(60))?;
        f.advance(Duration::from_secs(50));
        assert!(f.store.get("k")?.is_some(), "extended past the claim TTL");
        f.store.complete(&ticket, b"ok")?;
        Ok(())
    })
}

#[test]
fn unfinished_claims_expire_at_their_ttl() -> TestResult {
    on_both(|f| {
        let options = ClaimOptions::new().ttl(Duration::from_secs(120));
        let ticket = f
            .store
            .claim_with("k", &options)?
            .ticket()
            .ok_or("acquired")?;
        f.advance(Duration::from_secs(120) - Duration::from_millis(1));
        assert!(f.store.get("k")?.is_some());
        f.advance(Duration::from_millis(1));
        assert_eq!(f.store.get("k")?, None, "expired at claimed_at + ttl");
        assert!(matches!(
            f.store.complete(&ticket, b"x"),
            Err(Error::LeaseLost { .. })
        ));
        let fresh = f.acquire("k")?;
        assert_eq!(
            fresh.attempt(),
            1,
            "an expired key is claimed fresh, not taken over"
        );
        Ok(())
    })
}

#[test]
fn completed_keys_expire_at_their_completion_ttl() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("default")?;
        f.store.complete(&ticket, b"a")?;
        let ticket = f.acquire("custom")?;
        f.store
            .complete_with_ttl(&ticket, b"b", Duration::from_secs(10))?;
        let entry = f.store.get("custom")?.ok_or("stored")?;
        assert_eq!(entry.expires_at, f.now() + 10_000);
        f.advance(Duration::from_secs(10));
        assert_eq!(f.store.get("custom")?, None);
        assert!(f.store.claim("custom")?.is_acquired());
        assert!(matches!(f.store.claim("default")?, Claim::Completed(_)));
        f.advance(TTL);
        assert!(f.store.claim("default")?.is_acquired());
        Ok(())
    })
}

#[test]
fn expire_removes_any_state_and_reports_whether_it_was_live() -> TestResult {
    on_both(|f| {
        let _in_progress = f.acquire("a")?;
        let done = f.acquire("b")?;
        f.store.complete(&done, b"x")?;
        assert!(f.store.expire("a")?);
        assert!(f.store.expire("b")?);
        assert!(!f.store.expire("a")?);
        assert!(!f.store.expire("never")?);
        assert_eq!(f.store.get("a")?, None);
        assert!(f.store.claim("b")?.is_acquired());
        // An expired record not yet swept is not live.
        let ttl = ClaimOptions::new()
            .ttl(Duration::from_secs(1))
            .lease(Duration::from_secs(1));
        let _ = f.store.claim_with("c", &ttl)?;
        f.advance(Duration::from_secs(2));
        assert!(!f.store.expire("c")?);
        Ok(())
    })
}

#[test]
fn fingerprints_are_checked_first_in_every_state() -> TestResult {
    on_both(|f| {
        let a = ClaimOptions::new().fingerprint(b"payload-a");
        let b = ClaimOptions::new().fingerprint(b"payload-b");
        let ticket = f.store.claim_with("k", &a)?.ticket().ok_or("acquired")?;
        assert!(matches!(
            f.store.claim_with("k", &b)?,
            Claim::Mismatch {
                completed: false,
                ..
            }
        ));
        // Even after the lease passed: no takeover by another payload.
        f.advance(LEASE);
        assert!(matches!(
            f.store.claim_with("k", &b)?,
            Claim::Mismatch {
                completed: false,
                ..
            }
        ));
        let taken = f
            .store
            .claim_with("k", &a)?
            .ticket()
            .ok_or("takeover by same payload")?;
        f.store.complete(&taken, b"ok")?;
        assert!(matches!(
            f.store.claim_with("k", &b)?,
            Claim::Mismatch {
                completed: true,
                ..
            }
        ));
        assert!(matches!(f.store.claim_with("k", &a)?, Claim::Completed(_)));
        // No fingerprint on either side matches anything.
        assert!(matches!(f.store.claim("k")?, Claim::Completed(_)));
        let entry = f.store.get("k")?.ok_or("stored")?;
        assert_eq!(entry.fingerprint.as_deref(), Some(&b"payload-a"[..]));
        drop(ticket);
        // A key without a fingerprint matches a claim with one.
        let plain = f.acquire("plain")?;
        f.store.complete(&plain, b"p")?;
        assert!(matches!(
            f.store.claim_with("plain", &b)?,
            Claim::Completed(_)
        ));
        Ok(())
    })
}

#[test]
fn a_released_key_belongs_to_the_next_payload() -> TestResult {
    on_both(|f| {
        let a = ClaimOptions::new().fingerprint(b"a");
        let b = ClaimOptions::new().fingerprint(b"b");
        let ticket = f.store.claim_with("k", &a)?.ticket().ok_or("acquired")?;
        f.store.release(&ticket)?;
        assert!(f.store.claim_with("k", &b)?.is_acquired());
        Ok(())
    })
}

#[test]
fn mark_seen_shares_the_key_space_with_claims() -> TestResult {
    on_both(|f| {
        assert!(f.store.mark_seen("m")?);
        assert!(!f.store.mark_seen("m")?);
        let entry = f.store.get("m")?.ok_or("marked key is stored")?;
        match &entry.state {
            EntryState::Completed { response, .. } => assert!(response.is_empty()),
            other => return Err(format!("a mark is a completed record, got {other:?}").into()),
        }
        assert!(matches!(f.store.claim("m")?, Claim::Completed(_)));
        let _ticket = f.acquire("busy")?;
        assert!(!f.store.mark_seen("busy")?, "an in-progress key is seen");
        f.advance(TTL);
        assert!(f.store.mark_seen("m")?, "forgotten after the TTL");
        assert!(
            f.store
                .mark_seen_with_ttl("short", Duration::from_secs(1))?
        );
        f.advance(Duration::from_secs(1));
        assert!(f.store.mark_seen("short")?);
        Ok(())
    })
}

#[test]
fn mark_seen_many_answers_as_serial_calls_would() -> TestResult {
    on_both(|f| {
        f.store.mark_seen("old")?;
        let answers = f.store.mark_seen_many(["a", "old", "b", "a", "b", "c"])?;
        assert_eq!(answers, vec![true, false, true, false, false, true]);
        assert_eq!(
            f.store.mark_seen_many(Vec::<&str>::new())?,
            Vec::<bool>::new()
        );
        assert_eq!(f.store.len()?, 4);
        Ok(())
    })
}

#[test]
fn mark_seen_many_writes_nothing_when_a_key_is_bad() -> TestResult {
    on_both(|f| {
        let long = "x".repeat(2000);
        let err = f.store.mark_seen_many(["a", "b", long.as_str()]);
        assert!(matches!(err, Err(Error::KeyTooLarge { .. })));
        assert!(matches!(
            f.store.mark_seen_many(["a", ""]),
            Err(Error::EmptyKey)
        ));
        assert_eq!(f.store.len()?, 0, "nothing was marked");
        assert!(f.store.mark_seen("a")?);
        Ok(())
    })
}

#[test]
fn get_reads_without_changing_anything() -> TestResult {
    on_both(|f| {
        assert_eq!(f.store.get("k")?, None);
        let ticket = f.acquire("k")?;
        let entry = f.store.get("k")?.ok_or("stored")?;
        match entry.state {
            EntryState::InProgress {
                claimed_at,
                lease_until,
                ..
            } => {
                assert_eq!(claimed_at, ticket.claimed_at());
                assert_eq!(lease_until, ticket.lease_until());
            }
            ref other => return Err(format!("expected in progress, got {other:?}").into()),
        }
        assert_eq!(f.store.get("k")?, Some(entry));
        assert_eq!(f.store.stats()?.acquired, 1);
        Ok(())
    })
}

#[test]
fn sweep_removes_only_expired_records() -> TestResult {
    on_both(|f| {
        for i in 0..600 {
            f.store
                .mark_seen_with_ttl(format!("short-{i}"), Duration::from_secs(10))?;
        }
        let keep = f.acquire("keep")?;
        f.store.complete(&keep, b"kept")?;
        f.advance(Duration::from_secs(10));
        let before = f.store.stats()?;
        assert_eq!(before.live_keys, 1);
        assert_eq!(before.expired_pending, 600);
        assert_eq!(f.store.sweep()?, 600);
        assert_eq!(f.store.sweep()?, 0);
        let after = f.store.stats()?;
        assert_eq!(after.swept, 600);
        assert_eq!(after.expired_pending, 0);
        assert_eq!(after.live_keys, 1);
        assert!(matches!(f.store.claim("keep")?, Claim::Completed(_)));
        assert_eq!(f.store.list("", 10_000)?.len(), 1);
        Ok(())
    })
}

#[test]
fn stats_count_every_kind_of_answer() -> TestResult {
    on_both(|f| {
        let fp = ClaimOptions::new().fingerprint(b"a");
        let other = ClaimOptions::new().fingerprint(b"b");
        let first = f.store.claim_with("k", &fp)?.ticket().ok_or("acquired")?;
        let _ = f.store.claim("k")?; // in progress
        let _ = f.store.claim_with("k", &other)?; // mismatch
        f.advance(LEASE);
        let mut second = f.store.claim("k")?.ticket().ok_or("takeover")?;
        let _ = f.store.complete(&first, b"late"); // lease lost
        f.store.extend(&mut second, LEASE)?;
        f.store.complete(&second, b"ok")?;
        let _ = f.store.claim("k")?; // replay
        let released = f.acquire("r")?;
        f.store.release(&released)?;
        f.store.mark_seen("m")?;
        f.store.mark_seen("m")?;
        f.store.expire("m")?;
        let stats = f.store.stats()?;
        assert_eq!(stats.acquired, 3);
        assert_eq!(stats.takeovers, 1);
        assert_eq!(stats.in_progress, 1);
        assert_eq!(stats.mismatches, 1);
        assert_eq!(stats.lease_lost, 1);
        assert_eq!(stats.extends, 1);
        assert_eq!(stats.completes, 1);
        assert_eq!(stats.replays, 1);
        assert_eq!(stats.releases, 1);
        assert_eq!(stats.marked, 1);
        assert_eq!(stats.duplicates, 1);
        assert_eq!(stats.expired, 1);
        assert_eq!(stats.live_keys, 1);
        assert_eq!(stats.commit_failures, 0);
        Ok(())
    })
}

#[test]
fn list_shows_live_keys_under_a_prefix_in_order() -> TestResult {
    on_both(|f| {
        let acme = |k: &str| Key::scoped(["acme", k]);
        for k in ["b", "a", "c"] {
            f.store.mark_seen(acme(k))?;
        }
        f.store.mark_seen(Key::scoped(["acme-corp", "a"]))?;
        f.store
            .mark_seen_with_ttl(acme("gone"), Duration::from_secs(1))?;
        f.advance(Duration::from_secs(1));
        let listed = f.store.list(Key::scoped(["acme"]), 100)?;
        let keys: Vec<Key> = listed.into_iter().map(|e| e.key).collect();
        assert_eq!(keys, vec![acme("a"), acme("b"), acme("c")]);
        assert_eq!(f.store.list(Key::scoped(["acme"]), 2)?.len(), 2);
        assert_eq!(f.store.list("", 100)?.len(), 4);
        Ok(())
    })
}

#[test]
fn scoped_keys_of_different_tenants_never_collide() -> TestResult {
    on_both(|f| {
        let one = Key::scoped(["tenant-a:b", "c"]);
        let two = Key::scoped(["tenant-a", "b:c"]);
        assert!(f.store.claim(&one)?.is_acquired());
        assert!(
            f.store.claim(&two)?.is_acquired(),
            "another tenant's key is not blocked"
        );
        Ok(())
    })
}

#[test]
fn fencing_tokens_strictly_increase() -> TestResult {
    on_both_with(
        |b| b.lease(Duration::from_millis(1)),
        |f| {
            let mut last = 0;
            for i in 0..50 {
                let key = format!("k{}", i % 5);
                let ticket = f.acquire(&key)?;
                assert!(ticket.fencing_token() > last);
                last = ticket.fencing_token();
                if i % 3 == 0 {
                    f.store.release(&ticket)?;
                }
                f.advance(Duration::from_millis(1));
            }
            Ok(())
        },
    )
}

#[test]
fn a_clock_that_jumps_back_loses_nothing_and_keeps_one_owner() -> TestResult {
    on_both(|f| {
        let done = f.acquire("done")?;
        f.store.complete(&done, b"kept")?;
        let first = f.acquire("busy")?;
        f.advance(LEASE);
        let second = f.acquire("busy")?;
        f.clock.rewind(Duration::from_secs(3600));
        assert!(matches!(f.store.claim("done")?, Claim::Completed(_)));
        match f.store.claim("busy")? {
            Claim::InProgress { retry_after, .. } => {
                assert!(
                    retry_after > LEASE,
                    "retry_after is positive, never negative"
                );
            }
            other => return Err(format!("expected in progress, got {other:?}").into()),
        }
        assert!(matches!(
            f.store.complete(&first, b"x"),
            Err(Error::LeaseLost { .. })
        ));
        f.store.complete(&second, b"y")?;
        f.clock.set(0);
        assert_eq!(f.store.sweep()?, 0);
        assert!(matches!(f.store.claim("done")?, Claim::Completed(_)));
        Ok(())
    })
}
