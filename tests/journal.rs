//! The journal under group commit: a commit appends its batch's changes to the journal and
//! leaves the records table to merges. These tests pin what that must never change: an
//! acknowledged write that reached only the journal survives a power cut, every reader sees
//! it whether or not a merge has moved it yet, and the scanning readers (`list`, `stats`,
//! `len`, `verify`) count it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dedupe_store::testing::{Fate, SimDisk};
use dedupe_store::{Claim, Durability, EntryState, ManualClock, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const T0: u64 = 1_700_000_000_000;

fn open(disk: &SimDisk, clock: &ManualClock) -> dedupe_store::Result<Store> {
    Store::builder()
        .clock(clock.clone())
        .without_sweeper()
        .open_backend(disk.clone())
}

fn completed(store: &Store, key: &str) -> dedupe_store::Result<Option<Vec<u8>>> {
    Ok(store.get(key)?.and_then(|entry| match entry.state {
        EntryState::Completed { response, .. } => Some(response),
        _ => None,
    }))
}

fn acquire(store: &Store, key: &str) -> Result<dedupe_store::Ticket, Box<dyn std::error::Error>> {
    store
        .claim(key)?
        .ticket()
        .ok_or_else(|| format!("{key} was not acquired").into())
}

#[test]
fn acknowledged_writes_in_the_journal_survive_a_power_cut() -> TestResult {
    let clock = ManualClock::new(T0);
    let disk = SimDisk::new();
    let store = open(&disk, &clock)?;
    // Few enough keys that no merge runs: they are in the journal only.
    for i in 0..20 {
        let key = format!("order-{i}");
        let Claim::Acquired(ticket) = store.claim(&key)? else {
            return Err(format!("{key} was not acquired").into());
        };
        if i % 2 == 0 {
            store.complete(&ticket, format!("receipt-{i}"))?;
        }
    }
    assert!(store.mark_seen("message-1")?);
    // Only what an fsync made durable comes back.
    disk.cut_power(Fate::DropAll);
    drop(store);
    let image = disk.power_cut_image().ok_or("the power was cut")?;
    let disk = SimDisk::from_image(image);
    let store = open(&disk, &clock)?;
    for i in 0..20 {
        let key = format!("order-{i}");
        if i % 2 == 0 {
            assert_eq!(
                completed(&store, &key)?,
                Some(format!("receipt-{i}").into_bytes())
            );
        } else {
            assert!(
                matches!(store.claim(&key)?, Claim::InProgress { .. }),
                "{key} lost its owner"
            );
        }
    }
    assert!(
        !store.mark_seen("message-1")?,
        "a seen message was forgotten"
    );
    assert_eq!(store.list("order-", 100)?.len(), 20);
    assert_eq!(store.len()?, 21);
    assert_eq!(store.verify()?.records, 21);
    Ok(())
}

#[test]
fn fencing_tokens_keep_increasing_across_a_power_cut() -> TestResult {
    let clock = ManualClock::new(T0);
    let disk = SimDisk::new();
    let store = open(&disk, &clock)?;
    let mut last = 0;
    for i in 0..5 {
        let Claim::Acquired(ticket) = store.claim(format!("job-{i}"))? else {
            return Err("not acquired".into());
        };
        last = ticket.fencing_token();
    }
    disk.cut_power(Fate::DropAll);
    drop(store);
    let disk = SimDisk::from_image(disk.power_cut_image().ok_or("the power was cut")?);
    let store = open(&disk, &clock)?;
    let Claim::Acquired(ticket) = store.claim("job-next")? else {
        return Err("not acquired".into());
    };
    assert!(
        ticket.fencing_token() > last,
        "token {} after {last}",
        ticket.fencing_token()
    );
    Ok(())
}

#[test]
fn readers_see_every_completed_key_while_merges_move_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Periodic durability only to keep the test quick: merges work the same way.
    let store = Store::builder()
        .without_sweeper()
        .durability(Durability::Periodic(Duration::from_millis(50)))
        .open(dir.path().join("journal.db"))?;
    // Enough keys for several merges (each moves a part of the journal into the tables).
    const KEYS: usize = 5_000;
    let done = Arc::new(AtomicBool::new(false));
    let completed_up_to = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..3)
        .map(|reader| {
            let (store, done, upto) = (store.clone(), done.clone(), completed_up_to.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let mut checks = 0;
                let mut i = reader;
                while !done.load(Ordering::Acquire) {
                    let known = upto.load(Ordering::Acquire);
                    if known == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    i = (i * 7 + 13) % known;
                    let key = format!("charge-{i}");
                    match completed(&store, &key) {
                        Ok(Some(response)) if response == key.as_bytes() => checks += 1,
                        other => return Err(format!("{key}: {other:?}")),
                    }
                }
                Ok(checks)
            })
        })
        .collect();
    for i in 0..KEYS {
        let key = format!("charge-{i}");
        let Claim::Acquired(ticket) = store.claim(&key)? else {
            return Err(format!("{key} was not acquired").into());
        };
        store.complete(&ticket, key.as_bytes())?;
        completed_up_to.store(i + 1, Ordering::Release);
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        let checks = reader.join().map_err(|_| "a reader panicked")??;
        assert!(checks > 0, "a reader checked nothing");
    }
    assert_eq!(store.len()?, KEYS as u64);
    assert_eq!(store.stats()?.live_keys, KEYS as u64);
    assert_eq!(store.list("charge-", usize::MAX)?.len(), KEYS);
    assert_eq!(store.verify()?.records, KEYS as u64);
    // The reopened store answers the same, from the tables and whatever the journal still holds.
    store.close()?;
    let store = Store::builder()
        .without_sweeper()
        .open(dir.path().join("journal.db"))?;
    for i in (0..KEYS).step_by(97) {
        let key = format!("charge-{i}");
        assert_eq!(completed(&store, &key)?, Some(key.into_bytes()));
    }
    Ok(())
}

/// Under `Immediate`, a durable batch carries a merge once enough waits: a power cut at any
/// point of a run that merges, with four writers, keeps every acknowledged claim and
/// completion, and the tables and journal agree afterwards.
#[test]
fn merges_carried_by_batches_lose_nothing_to_a_power_cut() -> TestResult {
    const WRITERS: usize = 4;
    const KEYS_PER_WRITER: usize = 600;
    let clock = ManualClock::new(T0);
    for (round, fate) in [
        Fate::DropAll,
        Fate::Random(7),
        Fate::KeepAll,
        Fate::Random(11),
    ]
    .into_iter()
    .enumerate()
    {
        // The cut falls past the first merges (at 1,024 keys waiting), at a point of the run
        // that differs by round.
        let cut_after = 1100 + 250 * round;
        let disk = SimDisk::new();
        let store = open(&disk, &clock)?;
        let completions = std::sync::atomic::AtomicUsize::new(0);
        // Each writer's acknowledged keys: (key, completed).
        let acknowledged: Vec<Vec<(String, bool)>> = std::thread::scope(|scope| {
            let writers: Vec<_> = (0..WRITERS)
                .map(|writer| {
                    let (store, disk, completions) = (&store, &disk, &completions);
                    scope.spawn(move || {
                        let mut acked = Vec::new();
                        for i in 0..KEYS_PER_WRITER {
                            let key = format!("w{writer}/{i}");
                            let Ok(Claim::Acquired(ticket)) = store.claim(&key) else {
                                break;
                            };
                            acked.push((key.clone(), false));
                            if store.complete(&ticket, key.as_bytes()).is_err() {
                                break;
                            }
                            if let Some(last) = acked.last_mut() {
                                last.1 = true;
                            }
                            if completions.fetch_add(1, Ordering::AcqRel) + 1 == cut_after {
                                disk.cut_power(fate);
                            }
                        }
                        acked
                    })
                })
                .collect();
            writers
                .into_iter()
                .map(|writer| writer.join().unwrap_or_default())
                .collect()
        });
        drop(store);
        let image = disk.power_cut_image().ok_or("the power was not cut")?;
        let store = open(&SimDisk::from_image(image), &clock)?;
        let mut checked = 0;
        for (key, was_completed) in acknowledged.iter().flatten() {
            if *was_completed {
                assert_eq!(
                    completed(&store, key)?,
                    Some(key.clone().into_bytes()),
                    "round {round}: {key} lost its completion"
                );
            } else {
                assert!(
                    store.get(key)?.is_some(),
                    "round {round}: {key} lost its claim"
                );
            }
            checked += 1;
        }
        assert!(
            checked >= cut_after,
            "round {round}: only {checked} keys were acknowledged"
        );
        let report = store.verify()?;
        assert!(
            report.records >= checked as u64,
            "round {round}: {report:?}"
        );
        // Merging goes on after the cut: the next writes are accepted and read back.
        for i in 0..1500 {
            let key = format!("after/{i}");
            assert!(store.mark_seen(&key)?, "round {round}: {key} seen before");
        }
        assert!(!store.mark_seen("after/0")?);
        assert_eq!(store.verify()?.records, report.records + 1500);
    }
    Ok(())
}

/// The background sweeper sweeps the tables without merging the journal first (unless a record
/// waiting there is due). A table record it removes may have been replaced by a newer one in
/// the journal: that newer record must survive, in reads, across a reopen and through the
/// merge that follows.
#[test]
fn the_sweeper_keeps_newer_records_waiting_in_the_journal() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sweep.db");
    let clock = ManualClock::new(T0);
    let open = || {
        Store::builder()
            .clock(clock.clone())
            .ttl(Duration::from_secs(1))
            .sweep_interval(Duration::from_millis(5))
            .open(&path)
    };
    let store = open()?;
    for i in 0..1500 {
        store.complete(&acquire(&store, &format!("k{i}"))?, b"old")?;
    }
    // Everything into the tables, nothing due yet.
    assert_eq!(store.sweep()?, 0);
    clock.advance(Duration::from_secs(2));
    // 500 keys get a new life, which waits in the journal (too few for a merge).
    for i in 0..500 {
        let ticket = acquire(&store, &format!("k{i}"))?;
        store.complete_with_ttl(&ticket, b"new", Duration::from_secs(3600))?;
    }
    // The background sweeper removes the 1,500 due table records, the 500 replaced ones
    // among them.
    let started = std::time::Instant::now();
    while store.stats()?.swept < 1500 {
        if started.elapsed() > Duration::from_secs(20) {
            return Err(format!("only {} swept", store.stats()?.swept).into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let check = |store: &Store| -> TestResult {
        for i in 0..1500 {
            let key = format!("k{i}");
            let expected = (i < 500).then(|| b"new".to_vec());
            assert_eq!(completed(store, &key)?, expected, "{key}");
        }
        assert_eq!(store.len()?, 500);
        assert_eq!(store.verify()?.records, 500);
        Ok(())
    };
    check(&store)?;
    store.close()?;
    let store = open()?;
    check(&store)?;
    // A thorough sweep merges the journal: the tables then hold the new records, indexed.
    assert_eq!(store.sweep()?, 0);
    check(&store)?;
    clock.advance(Duration::from_secs(7200));
    // The background sweeper may take a share of them; together they remove all 500.
    store.sweep()?;
    assert_eq!(store.len()?, 0);
    assert_eq!(store.stats()?.swept, 500);
    Ok(())
}
