//! The store over PostgreSQL: every operation through the public API against a real server,
//! answering as docs/SEMANTICS.md says, as on a file.

use std::time::Duration;

use dedupe_store::testing::postgres::{Probe, TestCluster};
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

/// On the server's clock, runs of fresh claims, of duplicates and of fresh claims again: the
/// store answers each key the same whichever of its two ways it tried first (the `INSERT`
/// when recent keys were fresh, the read when they were not), and what it stores is what the
/// ticket says.
#[test]
fn runs_of_fresh_and_repeated_keys_on_the_servers_clock() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let store = Store::builder()
        .lease(Duration::from_secs(30))
        .ttl(Duration::from_secs(600))
        .without_sweeper()
        .open_postgres(&cluster.create_database("runs"))?;
    let host_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| since.as_millis() as u64)
            .unwrap_or(0)
    };
    let mut tickets = Vec::new();
    let mut last_token = 0;
    // The server runs on this host: its clock and ours agree to well within a minute.
    let agree = |at: u64| at.abs_diff(host_now()) < 60_000;
    for n in 0..40 {
        let Claim::Acquired(ticket) = store.claim(format!("run-{n}"))? else {
            panic!("fresh key run-{n} is acquired");
        };
        assert!(ticket.fencing_token() > last_token);
        last_token = ticket.fencing_token();
        assert!(agree(ticket.claimed_at()), "claimed at the server's time");
        assert_eq!(ticket.lease_until() - ticket.claimed_at(), 30_000);
        let entry = store
            .get(format!("run-{n}"))?
            .expect("the claimed key is stored");
        assert_eq!(entry.fencing_token, ticket.fencing_token());
        assert_eq!(entry.expires_at, ticket.claimed_at() + 600_000);
        match entry.state {
            dedupe_store::EntryState::InProgress {
                claimed_at,
                lease_until,
                ..
            } => {
                assert_eq!(claimed_at, ticket.claimed_at());
                assert_eq!(lease_until, ticket.lease_until());
            }
            other => panic!("run-{n} is in progress, not {other:?}"),
        }
        tickets.push(ticket);
    }
    for ticket in &tickets {
        match store.claim(ticket.key())? {
            Claim::InProgress { lease_until, .. } => assert_eq!(lease_until, ticket.lease_until()),
            other => panic!("a claimed key is in progress, not {other:?}"),
        }
    }
    for ticket in &tickets {
        store.complete(ticket, ticket.key().as_bytes())?;
    }
    for ticket in &tickets {
        match store.claim(ticket.key())? {
            Claim::Completed(outcome) => {
                assert_eq!(outcome.response, ticket.key().as_bytes());
                assert_eq!(outcome.fencing_token, ticket.fencing_token());
            }
            other => panic!("a completed key is replayed, not {other:?}"),
        }
    }
    // After the repeats, fresh keys and marks again, then a repeat of each.
    for n in 40..80 {
        let Claim::Acquired(ticket) = store.claim(format!("run-{n}"))? else {
            panic!("fresh key run-{n} is acquired");
        };
        assert!(ticket.fencing_token() > last_token);
        last_token = ticket.fencing_token();
        assert!(agree(ticket.claimed_at()));
        assert!(store.mark_seen(format!("mark-{n}"))?, "a first mark");
        assert!(!store.mark_seen(format!("mark-{n}"))?, "a repeated mark");
        assert!(matches!(
            store.claim(format!("run-{n}"))?,
            Claim::InProgress { .. }
        ));
    }
    let stats = store.stats()?;
    assert_eq!(stats.live_keys, 120);
    assert_eq!(
        (
            stats.acquired,
            stats.replays,
            stats.marked,
            stats.duplicates
        ),
        (80, 40, 40, 40)
    );
    Ok(())
}

/// Many threads of one store claiming new keys at once, each key by several of them: the
/// busy shards' batches store new keys with one `INSERT` each, and still every key has
/// exactly one owner, the others see it in progress, and no two owners share a token.
#[test]
fn threads_racing_on_new_keys_get_one_owner_each() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let store = Store::builder()
        .lease(Duration::from_secs(60))
        .without_sweeper()
        .open_postgres(&cluster.create_database("race"))?;
    const KEYS: usize = 200;
    const THREADS: usize = 16;
    let outcomes: Vec<Vec<(usize, Claim)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let store = &store;
                scope.spawn(move || {
                    // Each key is claimed by four threads, in different orders.
                    (0..KEYS)
                        .filter(|key| key % 4 == thread % 4)
                        .map(|key| (key, store.claim(format!("race-{key}")).expect("claim")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("worker"))
            .collect()
    });
    let mut owners = vec![Vec::new(); KEYS];
    for (key, claim) in outcomes.into_iter().flatten() {
        match claim {
            Claim::Acquired(ticket) => owners[key].push(ticket.fencing_token()),
            Claim::InProgress { .. } => {}
            other => panic!("race-{key}: {other:?}"),
        }
    }
    let mut tokens: Vec<u64> = Vec::new();
    for (key, owned) in owners.iter().enumerate() {
        assert_eq!(owned.len(), 1, "race-{key} has exactly one owner");
        tokens.extend(owned);
    }
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), KEYS, "no two owners share a token");
    let stats = store.stats()?;
    assert_eq!(
        (stats.live_keys, stats.acquired),
        (KEYS as u64, KEYS as u64)
    );
    Ok(())
}

/// A store listens for other processes' changes only while one of its callers waits: with no
/// one waiting, its own completes do not wake it. A waiter's store starts listening, and the
/// waiter is answered by a completion in another store.
#[test]
fn a_store_listens_only_while_a_caller_waits() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("listening");
    let open = || {
        Store::builder()
            .lease(Duration::from_secs(60))
            .without_sweeper()
            .open_postgres(&url)
    };
    let (waiter, owner) = (open()?, open()?);
    let probe = Probe::new(&url, 1)?;
    let listening =
        || probe.query_text("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN %'");
    for (store, key) in [(&waiter, "mine"), (&owner, "theirs")] {
        let Claim::Acquired(ticket) = store.claim(key)? else {
            panic!("a fresh key is acquired");
        };
        store.complete(&ticket, b"done")?;
    }
    let answered = waiter.claim_or_wait("theirs", &ClaimOptions::new(), Duration::from_secs(5))?;
    assert!(matches!(answered, Claim::Completed(_)), "{answered:?}");
    assert_eq!(
        listening()?,
        "0",
        "no caller waited, so no connection listens"
    );

    let Claim::Acquired(ticket) = owner.claim("held")? else {
        panic!("a fresh key is acquired");
    };
    let answered = std::thread::scope(|scope| -> Result<Claim, Box<dyn std::error::Error>> {
        let waiting = scope
            .spawn(|| waiter.claim_or_wait("held", &ClaimOptions::new(), Duration::from_secs(30)));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while listening()? != "1" {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiting store never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        owner.complete(&ticket, b"from-owner")?;
        Ok(waiting.join().expect("the waiter panicked")?)
    })?;
    match answered {
        Claim::Completed(outcome) => assert_eq!(outcome.response, b"from-owner"),
        other => panic!("expected the owner's completion, got {other:?}"),
    }
    Ok(())
}

/// With a key budget, a store counts the keys every process holds, and the room a sweep frees:
/// after a backlog swept in several batches, it admits exactly what the budget leaves beside
/// another process's keys.
#[test]
fn a_key_budget_counts_other_processes_keys_after_a_backlog_is_swept() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("budget");
    let clock = ManualClock::new(1_000_000);
    let open = |budget: Option<u64>| {
        let mut builder = Store::builder()
            .clock(clock.clone())
            .ttl(Duration::from_secs(60))
            .sweep_batch_size(2)
            .without_sweeper();
        if let Some(budget) = budget {
            builder = builder.max_keys(budget);
        }
        builder.open_postgres(&url)
    };
    let (budgeted, other) = (open(Some(10))?, open(None)?);
    for n in 0..6 {
        assert!(budgeted.mark_seen(format!("old-{n}"))?);
    }
    clock.advance(Duration::from_secs(61));
    for n in 0..3 {
        assert!(other.mark_seen(format!("other-{n}"))?);
    }
    // Three full batches of two, then one that finds nothing more due.
    assert_eq!(budgeted.sweep()?, 6);
    for n in 0..7 {
        assert!(
            budgeted.mark_seen(format!("new-{n}"))?,
            "room for the budget less the other process's 3 keys"
        );
    }
    match budgeted.mark_seen("one-too-many") {
        Err(Error::KeyBudgetExhausted { max_keys: 10 }) => {}
        other => panic!("expected the budget to be full, got {other:?}"),
    }
    Ok(())
}

/// `len` counts the live keys and `is_empty` says whether there is one, by the same clock:
/// an expired record awaiting the sweeper is neither.
#[test]
fn len_and_is_empty_count_live_keys_only() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let clock = ManualClock::new(1_000_000);
    let store = store(&cluster, "live_keys", &clock)?;
    assert!(store.is_empty()?);
    assert!(store.mark_seen_with_ttl("short", Duration::from_secs(1))?);
    assert!(store.mark_seen("long")?);
    assert_eq!(store.len()?, 2);
    assert!(!store.is_empty()?);
    clock.advance(Duration::from_secs(1));
    assert_eq!(store.len()?, 1, "the expired record is not counted");
    assert!(!store.is_empty()?);
    store.expire("long")?;
    assert_eq!(store.len()?, 0);
    assert!(
        store.is_empty()?,
        "only an expired record, awaiting the sweeper, is left"
    );
    Ok(())
}
