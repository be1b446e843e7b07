//! Races between threads: exactly one owner per key, and a stale ticket never wins, with the
//! background sweeper running all the while.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{LEASE, T0, TestResult};
use dedupe_store::{Claim, Error, ManualClock, Store};

const THREADS: usize = 32;
const KEYS: usize = 2_000;

/// Keeps the sweeper busy: marks that expire as the clock moves.
fn churn(store: &Store, stop: &AtomicBool) -> dedupe_store::Result<usize> {
    let mut marked = 0;
    while !stop.load(Ordering::Relaxed) {
        store.mark_seen_with_ttl(format!("churn-{marked}"), Duration::from_millis(1))?;
        marked += 1;
    }
    Ok(marked)
}

#[test]
fn thirty_two_threads_claiming_one_fresh_key_acquire_it_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::builder()
        .sweep_interval(Duration::from_millis(5))
        .open(dir.path().join("races.redb"))?;
    let acquired: Arc<Vec<AtomicUsize>> =
        Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let start = Arc::new(Barrier::new(THREADS));
    let stop = Arc::new(AtomicBool::new(false));
    let churner = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || churn(&store, &stop))
    };
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (store, acquired, start) = (store.clone(), acquired.clone(), start.clone());
            std::thread::spawn(move || -> dedupe_store::Result<()> {
                for (key, count) in acquired.iter().enumerate() {
                    start.wait();
                    match store.claim(format!("key-{key}"))? {
                        Claim::Acquired(ticket) => {
                            count.fetch_add(1, Ordering::SeqCst);
                            if key % 2 == 0 {
                                store.complete(&ticket, b"done")?;
                            }
                        }
                        Claim::InProgress { .. } | Claim::Completed(_) => {}
                        Claim::Mismatch { .. } => unreachable!("no fingerprints in this test"),
                    }
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "claimer panicked")??;
    }
    stop.store(true, Ordering::Relaxed);
    let churned = churner.join().map_err(|_| "churner panicked")??;
    for (key, count) in acquired.iter().enumerate() {
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "key-{key} was acquired {count:?} times"
        );
    }
    let stats = store.stats()?;
    assert_eq!(stats.acquired, KEYS as u64);
    assert_eq!(stats.completes, (KEYS / 2) as u64);
    assert_eq!(stats.sweeper_errors, 0);
    assert!(churned > 0);
    Ok(())
}

/// A ticket whose lease ran out races its own completion against takeovers: either the
/// completion lands first (and every claimer then sees the replay) or one takeover does (and
/// the stale ticket gets `LeaseLost`), never both.
#[test]
fn completes_racing_takeovers_never_both_win() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(T0);
    let store = Store::builder()
        .clock(clock.clone())
        .lease(LEASE)
        .sweep_interval(Duration::from_millis(5))
        .open(dir.path().join("takeover.redb"))?;
    const ROUNDS: usize = 300;
    const TAKERS: usize = 3;
    let stop = Arc::new(AtomicBool::new(false));
    let churner = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || churn(&store, &stop))
    };
    let (mut stale_won, mut takeover_won) = (0, 0);
    for round in 0..ROUNDS {
        let key = format!("job-{round}");
        let stale = store.claim(&key)?.ticket().ok_or("fresh key is acquired")?;
        clock.advance(LEASE);
        let start = Arc::new(Barrier::new(TAKERS + 1));
        let takers: Vec<_> = (0..TAKERS)
            .map(|_| {
                let (store, key, start) = (store.clone(), key.clone(), start.clone());
                std::thread::spawn(move || -> dedupe_store::Result<Claim> {
                    start.wait();
                    store.claim(&key)
                })
            })
            .collect();
        start.wait();
        let completed = store.complete(&stale, b"stale owner");
        let claims = takers
            .into_iter()
            .map(|t| t.join().map_err(|_| "taker panicked"))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let winners: Vec<_> = claims.iter().filter(|c| c.is_acquired()).collect();
        match completed {
            Ok(()) => {
                stale_won += 1;
                // Completed first: claimers after it replay; claimers before it could not
                // acquire, because the stale ticket still owned the key when it completed.
                assert!(
                    winners.is_empty(),
                    "round {round}: stale completion and a takeover both won"
                );
            }
            Err(Error::LeaseLost { .. }) => {
                takeover_won += 1;
                assert_eq!(winners.len(), 1, "round {round}: exactly one takeover");
                let Claim::Acquired(ticket) = winners[0] else {
                    unreachable!()
                };
                assert!(ticket.is_takeover());
                assert!(ticket.fencing_token() > stale.fencing_token());
                store.complete(ticket, b"new owner")?;
            }
            Err(other) => return Err(other.into()),
        }
        let expected: &[u8] = if winners.is_empty() {
            b"stale owner"
        } else {
            b"new owner"
        };
        match store.claim(&key)? {
            Claim::Completed(outcome) => assert_eq!(outcome.response, expected),
            other => return Err(format!("round {round}: expected a replay, got {other:?}").into()),
        }
        clock.advance(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    churner.join().map_err(|_| "churner panicked")??;
    assert_eq!(stale_won + takeover_won, ROUNDS);
    assert_eq!(store.stats()?.sweeper_errors, 0);
    Ok(())
}

/// Many threads each run a claim / complete-or-release loop over a small hot key space. Every
/// completed key's response names the ticket that completed it, and that ticket was the last
/// one acquired for the key.
#[test]
fn hot_keys_under_mixed_operations_keep_one_owner() -> TestResult {
    let store = Store::builder()
        .lease(Duration::from_secs(60))
        .sweep_interval(Duration::from_millis(5))
        .in_memory()?;
    const HOT: usize = 8;
    let owners: Arc<Vec<parking_lot::Mutex<Option<u64>>>> =
        Arc::new((0..HOT).map(|_| parking_lot::Mutex::new(None)).collect());
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let (store, owners) = (store.clone(), owners.clone());
            std::thread::spawn(move || -> dedupe_store::Result<()> {
                for i in 0..400 {
                    let slot = (t + i) % HOT;
                    let key = format!("hot-{slot}");
                    if let Claim::Acquired(ticket) = store.claim(&key)? {
                        {
                            let mut owner = owners[slot].lock();
                            assert_eq!(*owner, None, "{key} acquired while owned");
                            *owner = Some(ticket.fencing_token());
                        }
                        // Hold the key for a moment, then let go of the ownership record before
                        // the store lets go of the key.
                        std::thread::yield_now();
                        *owners[slot].lock() = None;
                        if i % 5 == 0 {
                            store.complete(&ticket, ticket.fencing_token().to_le_bytes())?;
                            store.expire(&key)?;
                        } else {
                            store.release(&ticket)?;
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "worker panicked")??;
    }
    let stats = store.stats()?;
    assert_eq!(stats.acquired, stats.releases + stats.completes);
    assert_eq!(stats.lease_lost, 0);
    Ok(())
}
