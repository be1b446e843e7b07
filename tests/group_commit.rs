//! Group commit keeps the semantics of serial calls.
//!
//! - Many threads run mixed operations on a few overlapping keys, so that batches are full of
//!   duplicates of one key; every key's history must be linearizable against the shared model
//!   of the rules, `testing::apply` (linearizability is local, so checking each key alone
//!   checks the whole run).
//! - A commit failure injected through a `StorageBackend` fails the callers of that batch only;
//!   state acknowledged before it survives, also across a reopen, and later calls succeed.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use dedupe_store::testing::{Op, Rec, Refusal, Reply, Rng, apply};
use dedupe_store::{Claim, ClaimOptions, Error, ManualClock, StorageBackend, Store, Ticket};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE_MS: u64 = 10_000;
const TTL_MS: u64 = 60_000;
const EXTEND_MS: u64 = 20_000;
const START_MS: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------------
// The checker: each key's history against the shared model of the rules
// (`dedupe_store::testing::apply`), one key at a time.

/// The token the checker gives a record stored by `mark_seen`, whose answer does not show its
/// token: it matches any token the store shows for that record. The store never issues 0.
const UNSEEN_TOKEN: u64 = 0;

/// One call of a key's history: when it started and ended on a global counter, what it asked
/// and what the store answered.
#[derive(Debug, Clone)]
struct Event {
    invoked: u64,
    returned: u64,
    op: Op,
    answer: Reply,
}

/// Whether the store's answer is the model's, a token the model does not know matching any.
fn agrees(model: &Reply, store: &Reply) -> bool {
    match (model, store) {
        (
            Reply::Completed {
                token: UNSEEN_TOKEN,
                response,
                completed_at,
                expires_at,
                attempt,
            },
            Reply::Completed {
                response: r,
                completed_at: c,
                expires_at: e,
                attempt: a,
                ..
            },
        ) => (response, completed_at, expires_at, attempt) == (r, c, e, a),
        (Reply::Got(Some(model)), Reply::Got(Some(store))) if model.token == UNSEEN_TOKEN => {
            Rec {
                token: store.token,
                ..model.clone()
            } == *store
        }
        _ => model == store,
    }
}

/// The model's step: the key's record after `event` if the store's answer is the one the
/// rules give. `max_token` is the largest token this key has seen so far: a new owner's must
/// be larger (SEMANTICS.md §5).
fn step(record: Option<&Rec>, max_token: u64, event: &Event, now: u64) -> Option<Option<Rec>> {
    // A claim's new token is the one the store answered, if it is new enough; a mark's is
    // not shown.
    let new_token = match (&event.op, &event.answer) {
        (Op::Claim { .. }, Reply::Acquired { token, .. }) if *token > max_token => *token,
        (Op::Claim { .. }, Reply::Acquired { .. }) => return None,
        _ => UNSEEN_TOKEN,
    };
    let (reply, next) = apply(record, &event.op, now, new_token);
    agrees(&reply, &event.answer).then_some(next)
}

fn max_token_of(record: Option<&Rec>, max_token: u64) -> u64 {
    record.map_or(max_token, |rec| max_token.max(rec.token))
}

/// Searches for an order of `events` that respects real time (a call that returned before
/// another was invoked comes first) in which every answer is the model's and after which a
/// `get` answers `end`. Returns the key's record after that order, with the token `end`
/// shows.
fn linearize(
    events: &[Event],
    start: Option<&Rec>,
    start_max: u64,
    end: &Reply,
    now: u64,
) -> Option<Option<Rec>> {
    assert!(events.len() <= 64, "too many events per key for the search");
    fn search(
        events: &[Event],
        done: u64,
        record: Option<Rec>,
        max_token: u64,
        end: &Reply,
        now: u64,
        seen: &mut HashSet<(u64, Option<Rec>, u64)>,
    ) -> Option<Option<Rec>> {
        if done.count_ones() as usize == events.len() {
            let (got, _) = apply(record.as_ref(), &Op::Get, now, UNSEEN_TOKEN);
            return agrees(&got, end).then_some(match (record, end) {
                (Some(rec), Reply::Got(Some(shown))) => Some(Rec {
                    token: shown.token,
                    ..rec
                }),
                (record, _) => record,
            });
        }
        if !seen.insert((done, record.clone(), max_token)) {
            return None;
        }
        let pending = || (0..events.len()).filter(move |i| done & (1 << i) == 0);
        let first_return = pending()
            .map(|i| events[i].returned)
            .min()
            .unwrap_or(u64::MAX);
        for i in pending() {
            let event = &events[i];
            // Only a call invoked before every pending call returned can go next.
            if event.invoked > first_return {
                continue;
            }
            if let Some(next) = step(record.as_ref(), max_token, event, now) {
                let max_token = max_token_of(next.as_ref(), max_token);
                if let Some(found) =
                    search(events, done | (1 << i), next, max_token, end, now, seen)
                {
                    return Some(found);
                }
            }
        }
        None
    }
    search(
        events,
        0,
        start.cloned(),
        start_max,
        end,
        now,
        &mut HashSet::new(),
    )
}

// ---------------------------------------------------------------------------------------------
// The concurrent run.

const KEYS: [&str; 5] = ["order-1", "order-2", "order-3", "order-4", "order-5"];
const THREADS: usize = 16;
const CALLS_PER_ROUND: usize = 6;
const ROUNDS: usize = 40;

fn fingerprint(rng: &mut Rng) -> Option<Vec<u8>> {
    match rng.below(4) {
        0 => Some(b"payload-a".to_vec()),
        1 => Some(b"payload-b".to_vec()),
        _ => None,
    }
}

/// Makes one random call; returns its key index, the call and the store's answer.
fn one_call(
    store: &Store,
    rng: &mut Rng,
    tickets: &mut Vec<Ticket>,
    thread: usize,
) -> Result<(usize, Op, Reply), Error> {
    let pick_ticket = |rng: &mut Rng, tickets: &mut Vec<Ticket>| -> Option<Ticket> {
        if tickets.is_empty() {
            return None;
        }
        let i = rng.below_usize(tickets.len());
        Some(tickets.swap_remove(i))
    };
    let key_index = |ticket: &Ticket| {
        KEYS.iter()
            .position(|k| k.as_bytes() == ticket.key().as_bytes())
            .unwrap_or(0)
    };
    let choice = rng.below(100);
    if (30..70).contains(&choice)
        && let Some(mut ticket) = pick_ticket(rng, tickets)
    {
        let k = key_index(&ticket);
        let token = ticket.fencing_token();
        return match choice {
            30..=49 => {
                let response = format!("response of {token} by thread {thread}").into_bytes();
                let answer = Reply::of_owner_call(store.complete(&ticket, &response))?;
                let op = Op::Complete {
                    token,
                    response,
                    ttl: TTL_MS,
                };
                Ok((k, op, answer))
            }
            50..=59 => {
                let answer = Reply::of_owner_call(store.release(&ticket))?;
                Ok((k, Op::Release { token }, answer))
            }
            _ => {
                let answer = match store.extend(&mut ticket, Duration::from_millis(EXTEND_MS)) {
                    Ok(()) => Reply::Extended {
                        lease_until: ticket.lease_until(),
                    },
                    Err(Error::LeaseLost { .. }) => Reply::Refused(Refusal::LeaseLost),
                    Err(err) => return Err(err),
                };
                tickets.push(ticket);
                let op = Op::Extend {
                    token,
                    lease: EXTEND_MS,
                };
                Ok((k, op, answer))
            }
        };
    }
    let k = rng.below_usize(KEYS.len());
    let key = KEYS[k];
    match choice {
        70..=77 => Ok((k, Op::Expire, Reply::Flag(store.expire(key)?))),
        78..=87 => {
            let answer = Reply::Flag(store.mark_seen(key)?);
            Ok((k, Op::MarkSeen { ttl: TTL_MS }, answer))
        }
        88..=99 => {
            // Every claim here takes the store's TTL.
            let answer = Reply::of_entry(store.get(key)?.as_ref(), TTL_MS);
            Ok((k, Op::Get, answer))
        }
        _ => {
            let fingerprint = fingerprint(rng);
            let options = match &fingerprint {
                Some(fp) => ClaimOptions::new().fingerprint(fp),
                None => ClaimOptions::new(),
            };
            let claim = store.claim_with(key, &options)?;
            let answer = Reply::of_claim(&claim);
            if let Claim::Acquired(ticket) = claim {
                tickets.push(ticket);
            }
            let op = Op::Claim {
                fingerprint,
                lease: LEASE_MS,
                ttl: TTL_MS,
            };
            Ok((k, op, answer))
        }
    }
}

#[test]
fn concurrent_mixed_calls_on_overlapping_keys_are_linearizable_per_key() -> TestResult {
    let clock = ManualClock::new(START_MS);
    let dir = tempfile::tempdir()?;
    let store = Store::builder()
        .clock(clock.clone())
        .lease(Duration::from_millis(LEASE_MS))
        .ttl(Duration::from_millis(TTL_MS))
        // The sweeper runs all the while, so sweep batches share commits with the calls.
        .sweep_interval(Duration::from_millis(1))
        .open(dir.path().join("group.redb"))?;
    let sequence = AtomicU64::new(0);
    let mut records: Vec<Option<Rec>> = vec![None; KEYS.len()];
    let mut max_tokens: Vec<u64> = vec![0; KEYS.len()];
    let mut all_tokens: HashSet<u64> = HashSet::new();
    let mut tickets: Vec<Vec<Ticket>> = vec![Vec::new(); THREADS];
    let mut clock_rng = Rng::new(7);
    for round in 0..ROUNDS {
        // Time moves only between rounds: leases lapse (takeovers), records expire.
        let step_ms = [0, 1, 5_000, LEASE_MS + 1, 30_000, TTL_MS + 1][clock_rng.below_usize(6)];
        clock.advance(Duration::from_millis(step_ms));
        let now = clock.now();
        let histories: Mutex<Vec<Vec<Event>>> = Mutex::new(vec![Vec::new(); KEYS.len()]);
        let start_line = Barrier::new(THREADS);
        let returned_tickets: Vec<Vec<Ticket>> = std::thread::scope(|scope| {
            let workers: Vec<_> = tickets
                .drain(..)
                .enumerate()
                .map(|(thread, mut mine)| {
                    let (store, sequence, histories, start_line) =
                        (&store, &sequence, &histories, &start_line);
                    scope.spawn(move || -> Result<Vec<Ticket>, Error> {
                        let mut rng = Rng::new((round * THREADS + thread) as u64 * 7919 + 1);
                        start_line.wait();
                        for _ in 0..CALLS_PER_ROUND {
                            let invoked = sequence.fetch_add(1, Ordering::SeqCst);
                            let (k, op, answer) = one_call(store, &mut rng, &mut mine, thread)?;
                            let returned = sequence.fetch_add(1, Ordering::SeqCst);
                            let mut histories = histories.lock().map_err(|_| Error::Closed)?;
                            histories[k].push(Event {
                                invoked,
                                returned,
                                op,
                                answer,
                            });
                        }
                        Ok(mine)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| Ok(worker.join().map_err(|_| "a worker panicked")??))
                .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()
        })?;
        tickets = returned_tickets;
        let histories = histories
            .into_inner()
            .map_err(|_| "history lock poisoned")?;
        for (k, events) in histories.iter().enumerate() {
            for event in events {
                if let Reply::Acquired { token, .. } = event.answer {
                    assert!(all_tokens.insert(token), "token {token} issued twice");
                }
            }
            let end = Reply::of_entry(store.get(KEYS[k])?.as_ref(), TTL_MS);
            let Some(record) = linearize(events, records[k].as_ref(), max_tokens[k], &end, now)
            else {
                panic!(
                    "round {round}, key {}: no serial order explains these answers \
                     (start {:?}, end {end:?}):\n{events:#?}",
                    KEYS[k], records[k]
                );
            };
            max_tokens[k] = max_token_of(record.as_ref(), max_tokens[k]);
            records[k] = record;
        }
    }
    let stats = store.stats()?;
    assert!(stats.acquired > 0 && stats.completes > 0 && stats.replays > 0);
    assert_eq!(stats.commit_failures, 0);
    Ok(())
}

#[test]
fn one_batch_full_of_claims_of_one_key_has_exactly_one_winner() -> TestResult {
    let store = Store::builder().without_sweeper().in_memory()?;
    for round in 0..50 {
        let key = format!("contended-{round}");
        let start_line = Barrier::new(32);
        let acquired: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..32)
                .map(|_| {
                    let (store, key, start_line) = (&store, &key, &start_line);
                    scope.spawn(move || -> Result<bool, Error> {
                        start_line.wait();
                        Ok(store.claim(key)?.is_acquired())
                    })
                })
                .collect();
            workers.into_iter().try_fold(0usize, |sum, worker| {
                let won = worker.join().map_err(|_| "a worker panicked")??;
                Ok::<_, Box<dyn std::error::Error>>(sum + usize::from(won))
            })
        })?;
        assert_eq!(acquired, 1, "round {round}: {acquired} owners of one key");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Commit failures.

/// What the next `sync_data` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncPlan {
    Succeed,
    /// Park until the test lets it go, then succeed or fail.
    Hold,
    Fail,
}

#[derive(Debug, Default)]
struct Control {
    plans: Vec<SyncPlan>,
    /// Set by a simulated power cut: nothing reaches the disk any more.
    cut: bool,
    /// A sync is parked.
    holding: bool,
    /// How the parked sync ends, once set.
    release: Option<bool>,
    failures: u64,
}

/// Memory that outlives the stores opened on it, so a test can reopen; it keeps the image of
/// the last successful sync too, which is what survives a simulated power cut.
#[derive(Debug, Clone, Default)]
struct SharedDisk {
    bytes: Arc<Mutex<Vec<u8>>>,
    synced: Arc<Mutex<Vec<u8>>>,
    control: Arc<(Mutex<Control>, Condvar)>,
}

/// A storage backend on [`SharedDisk`] whose syncs the test scripts.
#[derive(Debug)]
struct ScriptedBackend(SharedDisk);

fn poisoned<T>(_: T) -> io::Error {
    io::Error::other("test backend lock poisoned")
}

impl StorageBackend for ScriptedBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.bytes.lock().map_err(poisoned)?.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let bytes = self.0.bytes.lock().map_err(poisoned)?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let source = bytes
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.0.bytes.lock().map_err(poisoned)?.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let (control, changed) = &*self.0.control;
        let mut control = control.lock().map_err(poisoned)?;
        if control.cut {
            return Err(io::Error::other("the power is off"));
        }
        let plan = if control.plans.is_empty() {
            SyncPlan::Succeed
        } else {
            control.plans.remove(0)
        };
        let succeed = match plan {
            SyncPlan::Succeed => true,
            SyncPlan::Fail => false,
            SyncPlan::Hold => {
                control.holding = true;
                changed.notify_all();
                loop {
                    if let Some(succeed) = control.release.take() {
                        control.holding = false;
                        break succeed;
                    }
                    control = changed.wait(control).map_err(poisoned)?;
                }
            }
        };
        if succeed {
            let image = self.0.bytes.lock().map_err(poisoned)?.clone();
            *self.0.synced.lock().map_err(poisoned)? = image;
            Ok(())
        } else {
            control.failures += 1;
            Err(io::Error::other("injected: the disk refused the flush"))
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.0.control.0.lock().map_err(poisoned)?.cut {
            return Err(io::Error::other("the power is off"));
        }
        let mut bytes = self.0.bytes.lock().map_err(poisoned)?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[start..end].copy_from_slice(data);
        Ok(())
    }
}

impl SharedDisk {
    fn plan(&self, plans: &[SyncPlan]) -> Result<(), Box<dyn std::error::Error>> {
        let mut control = self.control.0.lock().map_err(|_| "control lock")?;
        control.plans = plans.to_vec();
        Ok(())
    }

    fn wait_until_holding(&self) -> Result<(), Box<dyn std::error::Error>> {
        let (control, changed) = &*self.control;
        let mut control = control.lock().map_err(|_| "control lock")?;
        while !control.holding {
            control = changed.wait(control).map_err(|_| "control lock")?;
        }
        Ok(())
    }

    fn release(&self, succeed: bool) -> Result<(), Box<dyn std::error::Error>> {
        let (control, changed) = &*self.control;
        control.lock().map_err(|_| "control lock")?.release = Some(succeed);
        changed.notify_all();
        Ok(())
    }

    fn failures(&self) -> Result<u64, Box<dyn std::error::Error>> {
        Ok(self.control.0.lock().map_err(|_| "control lock")?.failures)
    }

    /// Cuts the power: later writes fail, and once the store is gone the disk holds only what
    /// was synced.
    fn cut_power(&self) -> Result<(), Box<dyn std::error::Error>> {
        self.control.0.lock().map_err(|_| "control lock")?.cut = true;
        Ok(())
    }

    /// Boots again after [`cut_power`](Self::cut_power): the unsynced writes are gone.
    fn restore_power(&self) -> Result<(), Box<dyn std::error::Error>> {
        let image = self.synced.lock().map_err(|_| "synced lock")?.clone();
        *self.bytes.lock().map_err(|_| "bytes lock")? = image;
        self.control.0.lock().map_err(|_| "control lock")?.cut = false;
        Ok(())
    }

    fn open(&self, quick_repair: bool) -> Result<Store, Error> {
        Store::builder()
            .without_sweeper()
            .quick_repair(quick_repair)
            .open_backend(ScriptedBackend(self.clone()))
    }
}

fn commit_failure_fails_only_its_batch(quick_repair: bool) -> TestResult {
    let disk = SharedDisk::default();
    let store = disk.open(quick_repair)?;

    // Acknowledged before the failure.
    let Claim::Acquired(done) = store.claim("done")? else {
        return Err("a fresh key must be acquired".into());
    };
    store.complete(&done, b"receipt-1")?;
    let Claim::Acquired(held) = store.claim("held")? else {
        return Err("a fresh key must be acquired".into());
    };
    assert!(store.mark_seen("seen")?);

    // The leader's commit parks in its first sync; the followers queue behind it and form
    // the next batch, whose first sync fails (with quick repair a commit is two-phase: two
    // syncs; without, one). Every sync after that succeeds.
    if quick_repair {
        disk.plan(&[SyncPlan::Hold, SyncPlan::Succeed, SyncPlan::Fail])?;
    } else {
        disk.plan(&[SyncPlan::Hold, SyncPlan::Fail])?;
    }
    let followers: Vec<String> = (0..8).map(|i| format!("batch-{i}")).collect();
    let (leader_result, follower_results) = std::thread::scope(|scope| {
        let leader = scope.spawn(|| store.claim("leader"));
        let parked = disk.wait_until_holding();
        let workers: Vec<_> = followers
            .iter()
            .map(|key| {
                let store = &store;
                scope.spawn(move || store.claim(key))
            })
            .collect();
        // Give the followers time to queue; one that is late lands in a later, healthy batch,
        // which the assertions below allow.
        std::thread::sleep(Duration::from_millis(200));
        let released = parked.and_then(|()| disk.release(true));
        let leader_result = leader.join().unwrap_or(Err(Error::Closed));
        let results: Vec<_> = workers
            .into_iter()
            .map(|worker| worker.join().unwrap_or(Err(Error::Closed)))
            .collect();
        // A panicked thread shows as Closed here and fails the assertions below; its panic
        // message is already on stderr.
        released.map(|()| (leader_result, results))
    })?;

    assert!(
        leader_result?.is_acquired(),
        "the leader's batch committed before the failure"
    );
    assert_eq!(disk.failures()?, 1, "exactly one sync was failed");
    let failed: Vec<&String> = followers
        .iter()
        .zip(&follower_results)
        .filter(|(_, result)| result.is_err())
        .map(|(key, _)| key)
        .collect();
    assert!(
        !failed.is_empty(),
        "the failed commit must fail its callers: {follower_results:?}"
    );
    for (key, result) in followers.iter().zip(&follower_results) {
        match result {
            Ok(claim) => assert!(claim.is_acquired(), "{key}: {claim:?}"),
            Err(Error::Storage(_)) => {}
            Err(other) => return Err(format!("{key}: unexpected error {other:?}").into()),
        }
    }
    assert_eq!(store.stats()?.commit_failures, 1);

    // Later calls succeed, and what was acknowledged before is intact.
    store.complete(&held, b"receipt-2")?;
    assert!(store.claim("after")?.is_acquired());
    for key in &failed {
        // Not acknowledged, so undecided: a fresh claim, or the unacknowledged claim in
        // progress, but nothing else.
        let claim = store.claim(key.as_str())?;
        assert!(
            matches!(claim, Claim::Acquired(_) | Claim::InProgress { .. }),
            "{key}: {claim:?}"
        );
    }
    let expect_acknowledged = |store: &Store| -> TestResult {
        match store.claim("done")? {
            Claim::Completed(outcome) => assert_eq!(outcome.response, b"receipt-1"),
            other => return Err(format!("done: {other:?}").into()),
        }
        match store.claim("held")? {
            Claim::Completed(outcome) => assert_eq!(outcome.response, b"receipt-2"),
            other => return Err(format!("held: {other:?}").into()),
        }
        assert!(!store.mark_seen("seen")?);
        assert!(matches!(store.claim("leader")?, Claim::InProgress { .. }));
        Ok(())
    };
    expect_acknowledged(&store)?;

    // And it all survives a reopen of the same bytes.
    store.close()?;
    let reopened = disk.open(quick_repair)?;
    expect_acknowledged(&reopened)?;
    assert!(matches!(reopened.claim("after")?, Claim::InProgress { .. }));
    Ok(())
}

#[test]
fn a_failed_commit_fails_its_batch_and_the_store_goes_on() -> TestResult {
    commit_failure_fails_only_its_batch(false)
}

#[test]
fn a_failed_commit_fails_its_batch_and_the_store_goes_on_with_quick_repair() -> TestResult {
    commit_failure_fails_only_its_batch(true)
}

#[test]
fn a_sweep_is_durable_when_it_returns_though_its_batches_skip_the_fsync() -> TestResult {
    let disk = SharedDisk::default();
    let clock = ManualClock::new(START_MS);
    let open = || {
        Store::builder()
            .clock(clock.clone())
            .ttl(Duration::from_millis(TTL_MS))
            .sweep_batch_size(64)
            .without_sweeper()
            .open_backend(ScriptedBackend(disk.clone()))
    };
    let store = open()?;
    for i in 0..500 {
        let Claim::Acquired(ticket) = store.claim(format!("old-{i}"))? else {
            return Err("a fresh key must be acquired".into());
        };
        store.complete(&ticket, b"ok")?;
    }
    clock.advance(Duration::from_millis(TTL_MS + 1));
    assert!(store.claim("kept")?.is_acquired());
    assert_eq!(store.sweep()?, 500);

    disk.cut_power()?;
    drop(store);
    disk.restore_power()?;

    let store = open()?;
    let stats = store.stats()?;
    assert_eq!(
        stats.expired_pending, 0,
        "the sweep was lost in the power cut"
    );
    assert_eq!(stats.live_keys, 1);
    assert!(matches!(store.claim("kept")?, Claim::InProgress { .. }));
    Ok(())
}
