//! Clock faults: the wall clock jumps back an hour and forward a day in the middle of live
//! leases and TTLs. No panic, never two live owners of a key, and no completed record lost
//! before its TTL by the clock it was written with. (The scenario runner behind the
//! power-loss, I/O-fault and fuzz tests also jumps the clock, against its model.)

mod fault_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dedupe_store::testing::Rng;
use dedupe_store::{Claim, ClaimOptions, Error, ManualClock, Store, Ticket};

use fault_support::Watchdog;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const T0: u64 = 1_700_000_000_000;
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn store(clock: &ManualClock) -> Result<Store, Error> {
    Store::builder()
        .clock(clock.clone())
        .lease(Duration::from_secs(30))
        .ttl(DAY)
        .sweep_interval(Duration::from_millis(2))
        .in_memory()
}

#[test]
fn a_live_lease_survives_the_clock_jumping_back_an_hour() -> TestResult {
    let clock = ManualClock::new(T0);
    let store = store(&clock)?;
    let Claim::Acquired(ticket) = store.claim("job")? else {
        return Err("not acquired".into());
    };
    clock.rewind(HOUR);
    match store.claim("job")? {
        Claim::InProgress {
            lease_until,
            retry_after,
            ..
        } => {
            assert_eq!(lease_until, ticket.lease_until());
            assert_eq!(retry_after, HOUR + Duration::from_secs(30));
        }
        other => return Err(format!("a live lease was not honoured: {other:?}").into()),
    }
    store.complete(&ticket, b"done")?;
    assert!(matches!(store.claim("job")?, Claim::Completed(_)));
    Ok(())
}

#[test]
fn a_completed_record_lives_exactly_its_ttl_by_the_clock_it_was_written_with() -> TestResult {
    let clock = ManualClock::new(T0);
    let store = store(&clock)?;
    let Claim::Acquired(ticket) = store.claim("charge")? else {
        return Err("not acquired".into());
    };
    store.complete(&ticket, b"charged")?;
    let expires_at = T0 + DAY.as_millis() as u64;
    for now in [T0 - HOUR.as_millis() as u64, T0 + 1, expires_at - 1] {
        clock.set(now);
        std::thread::sleep(Duration::from_millis(10)); // the sweeper runs meanwhile
        assert_eq!(store.sweep()?, 0, "swept at {now}, before {expires_at}");
        let entry = store.get("charge")?.ok_or(format!("lost at {now}"))?;
        assert_eq!(entry.expires_at, expires_at);
        assert!(matches!(store.claim("charge")?, Claim::Completed(_)));
    }
    clock.set(expires_at);
    assert_eq!(store.get("charge")?, None, "still there at its expires_at");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(store.stats()?.live_keys, 0);
    Ok(())
}

#[test]
fn a_day_forward_mid_lease_hands_the_key_over_exactly_once() -> TestResult {
    let clock = ManualClock::new(T0);
    let store = store(&clock)?;
    let options = ClaimOptions::new().ttl(HOUR);
    let Claim::Acquired(first) = store.claim_with("job", &options)? else {
        return Err("not acquired".into());
    };
    clock.advance(DAY);
    let Claim::Acquired(second) = store.claim_with("job", &options)? else {
        return Err("not handed over after its lease and TTL passed".into());
    };
    assert!(second.fencing_token() > first.fencing_token());
    // The clock comes back an hour: the second owner's lease is live again, further away.
    clock.rewind(HOUR);
    assert!(matches!(
        store.claim_with("job", &options)?,
        Claim::InProgress { .. }
    ));
    assert!(matches!(
        store.complete(&first, b"stale"),
        Err(Error::LeaseLost { .. })
    ));
    store.complete(&second, b"second")?;
    let outcome = store.get("job")?.and_then(|entry| entry.outcome());
    assert_eq!(outcome.map(|o| o.response), Some(b"second".to_vec()));
    Ok(())
}

/// Who completed each key: (fencing token, response).
type Completions = Arc<Mutex<BTreeMap<String, Vec<(u64, Vec<u8>)>>>>;

/// Completes `ticket` and records it; a lost lease is an expected answer.
fn complete(store: &Store, ticket: &Ticket, completions: &Completions) -> Result<(), String> {
    let key = String::from_utf8_lossy(ticket.key().as_bytes()).into_owned();
    let response = format!("{key}:{}", ticket.fencing_token());
    match store.complete(ticket, &response) {
        Ok(()) => {
            completions
                .lock()
                .map_err(|_| "poisoned")?
                .entry(key)
                .or_default()
                .push((ticket.fencing_token(), response.into_bytes()));
            Ok(())
        }
        Err(Error::LeaseLost { .. }) => Ok(()),
        Err(err) => Err(err.to_string()),
    }
}

/// Claims and completes from several threads while another thread throws the clock around.
#[test]
fn concurrent_owners_while_the_clock_jumps() -> TestResult {
    let _watchdog = Watchdog::new("clock_faults::concurrent_owners_while_the_clock_jumps");
    let clock = ManualClock::new(T0);
    let store = Store::builder()
        .clock(clock.clone())
        .lease(Duration::from_secs(30))
        .ttl(Duration::from_secs(30 * 24 * 3600))
        .sweep_interval(Duration::from_millis(1))
        .in_memory()?;
    let completions = Completions::default();
    let stop = Arc::new(AtomicBool::new(false));
    let jumper = {
        let (clock, stop) = (clock.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(3);
            let mut days = 0;
            while !stop.load(Ordering::Relaxed) {
                match rng.below(4) {
                    0 if days < 10 => {
                        clock.advance(DAY);
                        days += 1;
                    }
                    1 => clock.rewind(HOUR),
                    _ => clock.advance(Duration::from_secs(rng.below(40))),
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let workers: Vec<_> = (0..4)
        .map(|thread| {
            let (store, completions) = (store.clone(), completions.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut rng = Rng::new(thread);
                let mut held = Vec::new();
                for _ in 0..1500 {
                    let key = format!("job-{}", rng.below(400));
                    match store.claim(&key).map_err(|err| err.to_string())? {
                        Claim::Acquired(ticket) if rng.chance(70) => {
                            complete(&store, &ticket, &completions)?;
                        }
                        Claim::Acquired(ticket) => held.push(ticket),
                        _ => {}
                    }
                    // Now and then an owner that stalled comes back and completes late.
                    if rng.chance(10) && !held.is_empty() {
                        complete(&store, &held.remove(0), &completions)?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| "a worker panicked")??;
    }
    stop.store(true, Ordering::Relaxed);
    jumper.join().map_err(|_| "the clock thread panicked")?;
    let completions = completions.lock().map_err(|_| "poisoned")?;
    let stats = store.stats()?;
    eprintln!(
        "[clock_faults] {} keys completed; {} acquired, {} takeovers, {} lease-lost, {} swept",
        completions.len(),
        stats.acquired,
        stats.takeovers,
        stats.lease_lost,
        stats.swept
    );
    assert!(completions.len() >= 200 && stats.takeovers > 0 && stats.lease_lost > 0);
    for (key, done) in completions.iter() {
        // Two completions of one key within its 30-day TTL would be two owners.
        assert_eq!(done.len(), 1, "{key} was completed by two owners: {done:?}");
        let (token, response) = &done[0];
        let outcome = store
            .get(key)?
            .and_then(|entry| entry.outcome())
            .ok_or(format!("{key}: completed record lost before its TTL"))?;
        assert_eq!(
            (&outcome.fencing_token, &outcome.response),
            (token, response)
        );
    }
    Ok(())
}
