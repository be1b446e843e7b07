//! Group commit keeps the semantics of serial calls.
//!
//! - Many threads run mixed operations on a few overlapping keys, so that batches are full of
//!   duplicates of one key; every key's history must be linearizable against a plain model of
//!   the rules (linearizability is local, so checking each key alone checks the whole run).
//! - A commit failure injected through a `StorageBackend` fails the callers of that batch only;
//!   state acknowledged before it survives, also across a reopen, and later calls succeed.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use dedupe_store::{
    Claim, ClaimOptions, Entry, EntryState, Error, ManualClock, StorageBackend, Store, Ticket,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE_MS: u64 = 10_000;
const TTL_MS: u64 = 60_000;
const EXTEND_MS: u64 = 20_000;
const START_MS: u64 = 1_700_000_000_000;

/// A small deterministic generator (splitmix64): the test needs reproducible mixes, not
/// cryptographic randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------------------------
// The model: one key's state under the rules, at a fixed time.

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum State {
    Absent,
    InProgress {
        token: u64,
        attempt: u32,
        fingerprint: Option<Vec<u8>>,
        claimed_at: u64,
        lease_until: u64,
        expires_at: u64,
    },
    Completed {
        /// Unknown until observed when a `mark_seen` wrote the record.
        token: Option<u64>,
        attempt: u32,
        fingerprint: Option<Vec<u8>>,
        completed_at: u64,
        response: Vec<u8>,
        expires_at: u64,
    },
}

impl State {
    fn live(&self, now: u64) -> &State {
        match self {
            State::InProgress { expires_at, .. } | State::Completed { expires_at, .. }
                if now < *expires_at =>
            {
                self
            }
            _ => &State::Absent,
        }
    }

    fn from_entry(entry: Option<&Entry>) -> State {
        let Some(entry) = entry else {
            return State::Absent;
        };
        match &entry.state {
            EntryState::InProgress {
                claimed_at,
                lease_until,
                ..
            } => State::InProgress {
                token: entry.fencing_token,
                attempt: entry.attempt,
                fingerprint: entry.fingerprint.clone(),
                claimed_at: *claimed_at,
                lease_until: *lease_until,
                expires_at: entry.expires_at,
            },
            EntryState::Completed {
                completed_at,
                response,
                ..
            } => State::Completed {
                token: Some(entry.fencing_token),
                attempt: entry.attempt,
                fingerprint: entry.fingerprint.clone(),
                completed_at: *completed_at,
                response: response.clone(),
                expires_at: entry.expires_at,
            },
            _ => State::Absent,
        }
    }

    /// Whether an observed state is this one (a token the model does not know matches any).
    fn matches(&self, observed: &State) -> bool {
        match (self, observed) {
            (
                State::Completed {
                    token: None,
                    attempt,
                    fingerprint,
                    completed_at,
                    response,
                    expires_at,
                },
                State::Completed {
                    attempt: a,
                    fingerprint: f,
                    completed_at: c,
                    response: r,
                    expires_at: e,
                    ..
                },
            ) => (attempt, fingerprint, completed_at, response, expires_at) == (a, f, c, r, e),
            _ => self == observed,
        }
    }
}

/// One call as a thread made it.
#[derive(Debug, Clone)]
enum Call {
    Claim { fingerprint: Option<Vec<u8>> },
    Complete { token: u64, response: Vec<u8> },
    Release { token: u64 },
    Extend { token: u64 },
    Expire,
    MarkSeen,
    Get,
}

/// What the store answered, reduced to what the model can predict.
#[derive(Debug, Clone)]
enum Answer {
    Acquired {
        token: u64,
        attempt: u32,
        takeover: bool,
        claimed_at: u64,
        lease_until: u64,
    },
    InProgress {
        lease_until: u64,
        attempt: u32,
    },
    Replay {
        response: Vec<u8>,
        completed_at: u64,
        expires_at: u64,
        attempt: u32,
    },
    Mismatch {
        completed: bool,
    },
    Done,
    Extended {
        lease_until: u64,
    },
    LeaseLost,
    Flag(bool),
    Got(State),
}

/// One call of a key's history: when it started and ended on a global counter, what it asked
/// and what it got.
#[derive(Debug, Clone)]
struct Event {
    invoked: u64,
    returned: u64,
    call: Call,
    answer: Answer,
}

/// The model's step: the state after `call` if the store's `answer` is what the rules give.
/// `max_token` is the largest token this key has seen so far: a new owner's must be larger.
fn step(state: &State, max_token: u64, call: &Call, answer: &Answer, now: u64) -> Option<State> {
    let live = state.live(now);
    let owner = |token: u64| matches!(live, State::InProgress { token: t, .. } if *t == token);
    match (call, answer) {
        (Call::Claim { fingerprint }, answer) => {
            let (stored_fp, completed) = match live {
                State::Absent => (None, false),
                State::InProgress { fingerprint, .. } => (fingerprint.clone(), false),
                State::Completed { fingerprint, .. } => (fingerprint.clone(), true),
            };
            if let (Some(stored), Some(given)) = (&stored_fp, fingerprint)
                && stored != given
            {
                return matches!(answer, Answer::Mismatch { completed: c } if *c == completed)
                    .then(|| state.clone());
            }
            let acquire = |previous: Option<(u32, Option<Vec<u8>>)>| -> Option<State> {
                let Answer::Acquired {
                    token,
                    attempt,
                    takeover,
                    claimed_at,
                    lease_until,
                } = answer
                else {
                    return None;
                };
                let (want_attempt, want_fp) = match &previous {
                    Some((attempt, fp)) => (attempt + 1, fp.clone().or(fingerprint.clone())),
                    None => (1, fingerprint.clone()),
                };
                let ok = *token > max_token
                    && *attempt == want_attempt
                    && *takeover == previous.is_some()
                    && *claimed_at == now
                    && *lease_until == now + LEASE_MS;
                ok.then(|| State::InProgress {
                    token: *token,
                    attempt: *attempt,
                    fingerprint: want_fp,
                    claimed_at: now,
                    lease_until: now + LEASE_MS,
                    expires_at: (now + TTL_MS).max(now + LEASE_MS),
                })
            };
            match live {
                State::Absent => acquire(None),
                State::InProgress {
                    lease_until,
                    attempt,
                    fingerprint: fp,
                    ..
                } => {
                    if now < *lease_until {
                        matches!(answer, Answer::InProgress { lease_until: l, attempt: a }
                            if l == lease_until && a == attempt)
                        .then(|| state.clone())
                    } else {
                        acquire(Some((*attempt, fp.clone())))
                    }
                }
                State::Completed {
                    response,
                    completed_at,
                    expires_at,
                    attempt,
                    ..
                } => matches!(answer, Answer::Replay { response: r, completed_at: c, expires_at: e, attempt: a }
                    if r == response && c == completed_at && e == expires_at && a == attempt)
                .then(|| state.clone()),
            }
        }
        (Call::Complete { token, response }, Answer::Done) if owner(*token) => {
            let State::InProgress {
                attempt,
                fingerprint,
                ..
            } = live
            else {
                return None;
            };
            Some(State::Completed {
                token: Some(*token),
                attempt: *attempt,
                fingerprint: fingerprint.clone(),
                completed_at: now,
                response: response.clone(),
                expires_at: now + TTL_MS,
            })
        }
        (Call::Release { token }, Answer::Done) if owner(*token) => Some(State::Absent),
        (Call::Extend { token }, Answer::Extended { lease_until }) if owner(*token) => {
            let State::InProgress {
                token,
                attempt,
                fingerprint,
                claimed_at,
                ..
            } = live
            else {
                return None;
            };
            (*lease_until == now + EXTEND_MS).then(|| State::InProgress {
                token: *token,
                attempt: *attempt,
                fingerprint: fingerprint.clone(),
                claimed_at: *claimed_at,
                lease_until: *lease_until,
                expires_at: (claimed_at + TTL_MS).max(*lease_until),
            })
        }
        (
            Call::Complete { token, .. } | Call::Release { token } | Call::Extend { token },
            Answer::LeaseLost,
        ) => (!owner(*token)).then(|| state.clone()),
        (Call::Expire, Answer::Flag(was_live)) => {
            (*was_live == !matches!(live, State::Absent)).then_some(State::Absent)
        }
        (Call::MarkSeen, Answer::Flag(first)) => match live {
            State::Absent => first.then(|| State::Completed {
                token: None,
                attempt: 1,
                fingerprint: None,
                completed_at: now,
                response: Vec::new(),
                expires_at: now + TTL_MS,
            }),
            _ => (!first).then(|| state.clone()),
        },
        (Call::Get, Answer::Got(observed)) => live.matches(observed).then(|| state.clone()),
        _ => None,
    }
}

fn max_token_of(state: &State, max_token: u64) -> u64 {
    match state {
        State::InProgress { token, .. }
        | State::Completed {
            token: Some(token), ..
        } => max_token.max(*token),
        _ => max_token,
    }
}

/// Searches for an order of `events` that respects real time (a call that returned before
/// another was invoked comes first) in which every answer is the model's, ending in `end`.
fn linearizable(events: &[Event], start: &State, start_max: u64, end: &State, now: u64) -> bool {
    assert!(events.len() <= 64, "too many events per key for the search");
    fn search(
        events: &[Event],
        done: u64,
        state: &State,
        max_token: u64,
        end: &State,
        now: u64,
        seen: &mut HashSet<(u64, State, u64)>,
    ) -> bool {
        if done.count_ones() as usize == events.len() {
            return state.live(now).matches(end.live(now));
        }
        if !seen.insert((done, state.clone(), max_token)) {
            return false;
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
            if let Some(next) = step(state, max_token, &event.call, &event.answer, now)
                && search(
                    events,
                    done | (1 << i),
                    &next,
                    max_token_of(&next, max_token),
                    end,
                    now,
                    seen,
                )
            {
                return true;
            }
        }
        false
    }
    search(events, 0, start, start_max, end, now, &mut HashSet::new())
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
) -> Result<(usize, Call, Answer), Error> {
    let pick_ticket = |rng: &mut Rng, tickets: &mut Vec<Ticket>| -> Option<Ticket> {
        if tickets.is_empty() {
            return None;
        }
        let i = rng.below(tickets.len() as u64) as usize;
        Some(tickets.swap_remove(i))
    };
    let lost = |err: Error| match err {
        Error::LeaseLost { .. } => Ok(Answer::LeaseLost),
        other => Err(other),
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
                let answer = store
                    .complete(&ticket, &response)
                    .map(|()| Answer::Done)
                    .or_else(lost)?;
                Ok((k, Call::Complete { token, response }, answer))
            }
            50..=59 => {
                let answer = store
                    .release(&ticket)
                    .map(|()| Answer::Done)
                    .or_else(lost)?;
                Ok((k, Call::Release { token }, answer))
            }
            _ => {
                let answer = match store.extend(&mut ticket, Duration::from_millis(EXTEND_MS)) {
                    Ok(()) => Answer::Extended {
                        lease_until: ticket.lease_until(),
                    },
                    Err(err) => lost(err)?,
                };
                tickets.push(ticket);
                Ok((k, Call::Extend { token }, answer))
            }
        };
    }
    let k = rng.below(KEYS.len() as u64) as usize;
    let key = KEYS[k];
    match choice {
        70..=77 => Ok((k, Call::Expire, Answer::Flag(store.expire(key)?))),
        78..=87 => Ok((k, Call::MarkSeen, Answer::Flag(store.mark_seen(key)?))),
        88..=99 => {
            let entry = store.get(key)?;
            Ok((k, Call::Get, Answer::Got(State::from_entry(entry.as_ref()))))
        }
        _ => {
            let fingerprint = fingerprint(rng);
            let options = match &fingerprint {
                Some(fp) => ClaimOptions::new().fingerprint(fp),
                None => ClaimOptions::new(),
            };
            let answer = match store.claim_with(key, &options)? {
                Claim::Acquired(ticket) => {
                    let answer = Answer::Acquired {
                        token: ticket.fencing_token(),
                        attempt: ticket.attempt(),
                        takeover: ticket.is_takeover(),
                        claimed_at: ticket.claimed_at(),
                        lease_until: ticket.lease_until(),
                    };
                    tickets.push(ticket);
                    answer
                }
                Claim::InProgress {
                    lease_until,
                    attempt,
                    ..
                } => Answer::InProgress {
                    lease_until,
                    attempt,
                },
                Claim::Completed(outcome) => Answer::Replay {
                    response: outcome.response,
                    completed_at: outcome.completed_at,
                    expires_at: outcome.expires_at,
                    attempt: outcome.attempt,
                },
                Claim::Mismatch { completed, .. } => Answer::Mismatch { completed },
            };
            Ok((k, Call::Claim { fingerprint }, answer))
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
    let mut states: Vec<State> = vec![State::Absent; KEYS.len()];
    let mut max_tokens: Vec<u64> = vec![0; KEYS.len()];
    let mut all_tokens: HashSet<u64> = HashSet::new();
    let mut tickets: Vec<Vec<Ticket>> = vec![Vec::new(); THREADS];
    let mut clock_rng = Rng(7);
    for round in 0..ROUNDS {
        // Time moves only between rounds: leases lapse (takeovers), records expire.
        let step_ms = [0, 1, 5_000, LEASE_MS + 1, 30_000, TTL_MS + 1][clock_rng.below(6) as usize];
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
                        let mut rng = Rng((round * THREADS + thread) as u64 * 7919 + 1);
                        start_line.wait();
                        for _ in 0..CALLS_PER_ROUND {
                            let invoked = sequence.fetch_add(1, Ordering::SeqCst);
                            let (k, call, answer) = one_call(store, &mut rng, &mut mine, thread)?;
                            let returned = sequence.fetch_add(1, Ordering::SeqCst);
                            let mut histories = histories.lock().map_err(|_| Error::Closed)?;
                            histories[k].push(Event {
                                invoked,
                                returned,
                                call,
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
                if let Answer::Acquired { token, .. } = event.answer {
                    assert!(all_tokens.insert(token), "token {token} issued twice");
                }
            }
            let end = State::from_entry(store.get(KEYS[k])?.as_ref());
            assert!(
                linearizable(events, &states[k], max_tokens[k], &end, now),
                "round {round}, key {}: no serial order explains these answers \
                 (start {:?}, end {end:?}):\n{events:#?}",
                KEYS[k],
                states[k]
            );
            max_tokens[k] = max_token_of(&end, max_tokens[k]);
            states[k] = end;
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
