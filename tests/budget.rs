//! The key budget: a flood of new keys stops at `max_keys`, while everything about the keys
//! already held goes on, and room comes back as keys expire and are swept.

mod common;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{Fixture, LEASE, TTL, TestResult};
use dedupe_store::{Claim, Error, Store};

fn is_budget(result: &dedupe_store::Result<Claim>) -> bool {
    matches!(result, Err(Error::KeyBudgetExhausted { .. }))
}

fn held(store: &Store) -> TestResult<u64> {
    let stats = store.stats()?;
    Ok(stats.live_keys + stats.expired_pending)
}

#[test]
fn a_flood_of_new_keys_from_many_threads_stops_at_the_budget() -> TestResult {
    const BUDGET: u64 = 120;
    let fixture = Fixture::on_file(|b| b.max_keys(BUDGET))?;
    let store = Arc::new(fixture.store.clone());
    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let store = store.clone();
            thread::spawn(move || -> Result<(u64, u64), String> {
                let (mut acquired, mut refused) = (0, 0);
                for i in 0..60 {
                    let key = format!("flood-{thread}-{i}");
                    match store.claim(&key) {
                        Ok(Claim::Acquired(ticket)) => {
                            acquired += 1;
                            store
                                .complete(&ticket, format!("response of {key}").as_bytes())
                                .map_err(|err| format!("complete {key}: {err}"))?;
                        }
                        Err(Error::KeyBudgetExhausted { max_keys: BUDGET }) => refused += 1,
                        other => return Err(format!("claim {key}: {other:?}")),
                    }
                }
                Ok((acquired, refused))
            })
        })
        .collect();
    let (mut acquired, mut refused) = (0, 0);
    for handle in threads {
        let (a, r) = handle.join().map_err(|_| "a flooding thread panicked")??;
        acquired += a;
        refused += r;
    }
    assert_eq!(acquired, BUDGET, "exactly the budget was admitted");
    assert_eq!(refused, 8 * 60 - BUDGET);
    assert_eq!(held(&store)?, BUDGET);

    // Every admitted key still replays its own response, and marks of held keys still answer.
    let mut replayed = 0;
    for thread in 0..8 {
        for i in 0..60 {
            let key = format!("flood-{thread}-{i}");
            match store.claim(&key) {
                Ok(Claim::Completed(outcome)) => {
                    assert_eq!(outcome.response, format!("response of {key}").as_bytes());
                    assert!(!store.mark_seen(&key)?, "a held key is no new key");
                    replayed += 1;
                }
                result if is_budget(&result) => {}
                other => return Err(format!("{key}: {other:?}").into()),
            }
        }
    }
    assert_eq!(replayed, BUDGET);
    Ok(())
}

#[test]
fn held_claims_complete_release_and_extend_at_the_budget() -> TestResult {
    common::on_both_with(
        |b| b.max_keys(3),
        |f| {
            let first = f.acquire("first")?;
            let mut second = f.acquire("second")?;
            let third = f.acquire("third")?;
            assert!(is_budget(&f.store.claim("fourth")), "{}", f.kind);
            assert!(matches!(
                f.store.mark_seen("fourth"),
                Err(Error::KeyBudgetExhausted { max_keys: 3 })
            ));
            assert!(matches!(
                f.store.advance_sequence("stream", 1),
                Err(Error::KeyBudgetExhausted { max_keys: 3 })
            ));
            f.store.extend(&mut second, LEASE)?;
            f.store.checkpoint(&second, "step", b"state")?;
            f.store.complete(&first, b"one")?;
            assert!(
                is_budget(&f.store.claim("fourth")),
                "a completed key is still held"
            );
            // A release gives its key back, and with it the room.
            f.store.release(&third)?;
            f.acquire("fourth")?;
            assert!(is_budget(&f.store.claim("fifth")));
            // So does an operator's expire.
            assert!(f.store.expire("fourth")?);
            assert!(f.store.mark_seen("fifth")?);
            f.store.complete(&second, b"two")?;
            Ok(())
        },
    )
}

#[test]
fn room_comes_back_when_keys_expire_and_are_swept() -> TestResult {
    common::on_both_with(
        |b| b.max_keys(2),
        |f| {
            let first = f.acquire("first")?;
            f.store.complete(&first, b"one")?;
            assert!(f.store.mark_seen("second")?);
            assert!(is_budget(&f.store.claim("third")));
            f.advance(TTL);
            // Expired records still take their room until the sweeper removes them, but a
            // claim of an expired key reuses its record.
            assert!(is_budget(&f.store.claim("third")), "{}", f.kind);
            f.acquire("first")?;
            assert_eq!(f.store.sweep()?, 1, "{}: the expired mark is swept", f.kind);
            f.acquire("third")?;
            assert!(is_budget(&f.store.claim("fourth")));
            Ok(())
        },
    )
}

#[test]
fn a_batch_of_marks_is_refused_whole_when_its_new_keys_do_not_fit() -> TestResult {
    common::on_both_with(
        |b| b.max_keys(3),
        |f| {
            assert_eq!(f.store.mark_seen_many(["a", "b"])?, vec![true, true]);
            assert!(matches!(
                f.store.mark_seen_many(["a", "c", "d"]),
                Err(Error::KeyBudgetExhausted { max_keys: 3 })
            ));
            assert!(
                f.store.get("c")?.is_none(),
                "nothing of the refused batch was stored"
            );
            assert_eq!(
                f.store.mark_seen_many(["a", "b", "c"])?,
                vec![false, false, true]
            );
            Ok(())
        },
    )
}

#[test]
fn the_budget_counts_what_the_file_holds_when_reopened() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("budget.redb");
    let clock = dedupe_store::ManualClock::new(common::T0);
    {
        let store = Fixture::builder(&clock).open(&path)?;
        assert_eq!(store.mark_seen_many(["a", "b", "c"])?, vec![true; 3]);
    }
    let store = Fixture::builder(&clock).max_keys(3).open(&path)?;
    assert!(matches!(
        store.mark_seen("d"),
        Err(Error::KeyBudgetExhausted { max_keys: 3 })
    ));
    clock.advance(TTL + Duration::from_secs(1));
    store.sweep()?;
    assert!(store.mark_seen("d")?);
    Ok(())
}

/// A refused claim writes nothing: a flood far past the budget leaves the file the size that
/// the admitted keys make it.
#[test]
fn refused_claims_do_not_grow_the_file() -> TestResult {
    const BUDGET: u64 = 1_000;
    let response = vec![7u8; 1024];
    let fill = |store: &Store, keys: std::ops::Range<u64>| -> TestResult<u64> {
        let mut refused = 0;
        for i in keys {
            match store.claim(format!("key-{i}")) {
                Ok(Claim::Acquired(ticket)) => store.complete(&ticket, &response)?,
                Err(Error::KeyBudgetExhausted { .. }) => refused += 1,
                other => return Err(format!("key-{i}: {other:?}").into()),
            }
        }
        Ok(refused)
    };
    let f = Fixture::on_file(|b| b.max_keys(BUDGET))?;
    let path = f.path.clone().ok_or("a file fixture")?;
    assert_eq!(fill(&f.store, 0..BUDGET)?, 0);
    let at_budget = std::fs::metadata(&path)?.len();
    assert_eq!(fill(&f.store, BUDGET..20 * BUDGET)?, 19 * BUDGET);
    let after_flood = std::fs::metadata(&path)?.len();
    assert_eq!(after_flood, at_budget, "refused claims grew the file");
    // The bound the docs give: max_keys × 4 × (key + response), plus 1 MiB.
    let key_and_response = "key-19999".len() as u64 + response.len() as u64;
    assert!(
        after_flood <= BUDGET * 4 * key_and_response + 1024 * 1024,
        "{after_flood} bytes for {BUDGET} keys"
    );
    Ok(())
}
