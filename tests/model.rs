//! The state machine against a plain in-memory model written from the SPEC: random sequences
//! of claims (with and without fingerprints), completes, releases, extends, checkpoints,
//! expires, marks, sequence marks, sweeps, clock jumps in both directions and reopens of the
//! file, every answer compared with the model's.
//!
//! `PROPTEST_CASES` sets the number of cases (default 1000, up to 100 steps each).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::T0;
use dedupe_store::{
    Claim, ClaimOptions, EntryState, Error, ManualClock, SeqCheck, SequenceOptions, Store, Ticket,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const STORE_TTL: u64 = 10_000;
const STORE_LEASE: u64 = 3_000;
const KEYS: u8 = 4;

#[derive(Debug, Clone)]
enum Step {
    Claim {
        key: u8,
        fingerprint: Option<u8>,
        lease: Option<u64>,
        ttl: Option<u64>,
    },
    Complete {
        ticket: usize,
        response: u8,
        ttl: Option<u64>,
    },
    Release {
        ticket: usize,
    },
    Extend {
        ticket: usize,
        lease: u64,
    },
    Checkpoint {
        ticket: usize,
        step: u8,
    },
    Expire {
        key: u8,
    },
    MarkSeen {
        key: u8,
    },
    MarkSeenMany {
        keys: Vec<u8>,
    },
    Get {
        key: u8,
    },
    Sequence {
        key: u8,
        seq: u8,
        contiguous: bool,
    },
    Sweep,
    Forward {
        millis: u64,
    },
    Backward {
        millis: u64,
    },
    Reopen,
}

fn millis() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1),
        Just(999),
        Just(1_000),
        Just(2_999),
        Just(3_000),
        Just(5_000),
        Just(10_000)
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let ticket = 0usize..16;
    prop_oneof![
        6 => (0..KEYS, prop::option::of(0u8..2), prop::option::of(millis()), prop::option::of(millis()))
            .prop_map(|(key, fingerprint, lease, ttl)| Step::Claim { key, fingerprint, lease, ttl }),
        3 => (ticket.clone(), any::<u8>(), prop::option::of(millis()))
            .prop_map(|(ticket, response, ttl)| Step::Complete { ticket, response, ttl }),
        2 => ticket.clone().prop_map(|ticket| Step::Release { ticket }),
        2 => (ticket.clone(), millis()).prop_map(|(ticket, lease)| Step::Extend { ticket, lease }),
        1 => (ticket, 0u8..3).prop_map(|(ticket, step)| Step::Checkpoint { ticket, step }),
        1 => (0..KEYS).prop_map(|key| Step::Expire { key }),
        2 => (0..KEYS).prop_map(|key| Step::MarkSeen { key }),
        1 => prop::collection::vec(0..KEYS, 0..5).prop_map(|keys| Step::MarkSeenMany { keys }),
        2 => (0..KEYS).prop_map(|key| Step::Get { key }),
        1 => (0..2u8, 0u8..6, any::<bool>())
            .prop_map(|(key, seq, contiguous)| Step::Sequence { key, seq, contiguous }),
        1 => Just(Step::Sweep),
        4 => millis().prop_map(|millis| Step::Forward { millis }),
        1 => prop_oneof![Just(1_000u64), Just(4_000), Just(3_600_000)]
            .prop_map(|millis| Step::Backward { millis }),
        1 => Just(Step::Reopen),
    ]
}

/// The model's view of one key: what the SPEC says it holds.
#[derive(Debug, Clone, PartialEq)]
struct ModelRecord {
    token: u64,
    attempt: u32,
    fingerprint: Option<Vec<u8>>,
    expires_at: u64,
    state: ModelState,
}

#[derive(Debug, Clone, PartialEq)]
enum ModelState {
    InProgress {
        claimed_at: u64,
        lease_until: u64,
        claim_ttl: u64,
        checkpoint: Option<String>,
    },
    Completed {
        completed_at: u64,
        response: Vec<u8>,
    },
}

#[derive(Default)]
struct Model {
    now: u64,
    last_token: u64,
    records: BTreeMap<Vec<u8>, ModelRecord>,
    /// Sequence marks: (mark, expires_at).
    marks: BTreeMap<Vec<u8>, (u64, u64)>,
}

impl Model {
    fn live(&self, key: &[u8]) -> Option<&ModelRecord> {
        self.records.get(key).filter(|r| self.now < r.expires_at)
    }

    /// The owner check of complete, release, extend and checkpoint: the record `token` owns.
    fn owned(&mut self, key: &[u8], token: u64) -> Option<&mut ModelRecord> {
        let now = self.now;
        self.records.get_mut(key).filter(|r| {
            now < r.expires_at
                && r.token == token
                && matches!(r.state, ModelState::InProgress { .. })
        })
    }

    fn acquire(&mut self, key: &[u8], fp: Option<Vec<u8>>, lease: u64, ttl: u64) -> ModelRecord {
        let previous = self.live(key).cloned();
        self.last_token += 1;
        let lease_until = self.now + lease;
        let record = ModelRecord {
            token: self.last_token,
            attempt: previous.as_ref().map_or(1, |p| p.attempt + 1),
            fingerprint: previous.as_ref().and_then(|p| p.fingerprint.clone()).or(fp),
            expires_at: (self.now + ttl).max(lease_until),
            state: ModelState::InProgress {
                claimed_at: self.now,
                lease_until,
                claim_ttl: ttl,
                checkpoint: previous.and_then(|p| match p.state {
                    ModelState::InProgress { checkpoint, .. } => checkpoint,
                    ModelState::Completed { .. } => None,
                }),
            },
        };
        self.records.insert(key.to_vec(), record.clone());
        record
    }

    fn mark_seen(&mut self, key: &[u8]) -> bool {
        if self.live(key).is_some() {
            return false;
        }
        self.last_token += 1;
        let record = ModelRecord {
            token: self.last_token,
            attempt: 1,
            fingerprint: None,
            expires_at: self.now + STORE_TTL,
            state: ModelState::Completed {
                completed_at: self.now,
                response: Vec::new(),
            },
        };
        self.records.insert(key.to_vec(), record);
        true
    }
}

struct Harness {
    dir: tempfile::TempDir,
    clock: ManualClock,
    store: Option<Store>,
    model: Model,
    tickets: Vec<Ticket>,
}

fn key_name(key: u8) -> Vec<u8> {
    format!("key-{key}").into_bytes()
}

fn open(dir: &tempfile::TempDir, clock: &ManualClock) -> Result<Store, TestCaseError> {
    Store::builder()
        .clock(clock.clone())
        .ttl(Duration::from_millis(STORE_TTL))
        .lease(Duration::from_millis(STORE_LEASE))
        .without_sweeper()
        .open(dir.path().join("model.redb"))
        .map_err(|err| TestCaseError::fail(format!("open: {err}")))
}

fn fail(err: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(err.to_string())
}

impl Harness {
    fn new() -> Result<Harness, TestCaseError> {
        // tmpfs makes fsync free, so the real (Immediate) commit path runs fast.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .map_err(fail)?;
        let clock = ManualClock::new(T0);
        let store = open(&dir, &clock)?;
        Ok(Harness {
            dir,
            clock,
            store: Some(store),
            model: Model {
                now: T0,
                ..Model::default()
            },
            tickets: Vec::new(),
        })
    }

    fn store(&self) -> Result<&Store, TestCaseError> {
        self.store.as_ref().ok_or_else(|| fail("no store"))
    }

    fn ticket(&self, index: usize) -> Option<Ticket> {
        (!self.tickets.is_empty()).then(|| self.tickets[index % self.tickets.len()].clone())
    }

    fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let now = self.model.now;
        match step {
            Step::Claim {
                key,
                fingerprint,
                lease,
                ttl,
            } => {
                let name = key_name(*key);
                let fp = fingerprint.map(|f| vec![f]);
                let mut options = ClaimOptions::new();
                if let Some(fp) = &fp {
                    options = options.fingerprint(fp);
                }
                if let Some(lease) = lease {
                    options = options.lease(Duration::from_millis(*lease));
                }
                if let Some(ttl) = ttl {
                    options = options.ttl(Duration::from_millis(*ttl));
                }
                let got = self.store()?.claim_with(&name, &options).map_err(fail)?;
                let lease = lease.unwrap_or(STORE_LEASE);
                let ttl = ttl.unwrap_or(STORE_TTL);
                match self.model.live(&name).cloned() {
                    Some(r) if matches!((&r.fingerprint, &fp), (Some(a), Some(b)) if a != b) => {
                        let completed = matches!(r.state, ModelState::Completed { .. });
                        prop_assert!(
                            matches!(got, Claim::Mismatch { completed: c, .. } if c == completed),
                            "{got:?}"
                        );
                    }
                    Some(ModelRecord {
                        state:
                            ModelState::Completed {
                                completed_at,
                                response,
                            },
                        attempt,
                        token,
                        expires_at,
                        ..
                    }) => {
                        let Claim::Completed(outcome) = got else {
                            return Err(fail(format!("expected replay, got {got:?}")));
                        };
                        prop_assert_eq!(outcome.response, response);
                        prop_assert_eq!(outcome.completed_at, completed_at);
                        prop_assert_eq!(outcome.expires_at, expires_at);
                        prop_assert_eq!(outcome.attempt, attempt);
                        prop_assert_eq!(outcome.fencing_token, token);
                    }
                    Some(ModelRecord {
                        state: ModelState::InProgress { lease_until, .. },
                        attempt,
                        ..
                    }) if now < lease_until => {
                        let Claim::InProgress {
                            lease_until: got_lease,
                            retry_after,
                            attempt: got_attempt,
                            ..
                        } = got
                        else {
                            return Err(fail(format!("expected in progress, got {got:?}")));
                        };
                        prop_assert_eq!(got_lease, lease_until);
                        prop_assert_eq!(retry_after, Duration::from_millis(lease_until - now));
                        prop_assert_eq!(got_attempt, attempt);
                    }
                    previous => {
                        let takeover = previous.is_some();
                        let expected = self.model.acquire(&name, fp, lease, ttl);
                        let Claim::Acquired(ticket) = got else {
                            return Err(fail(format!("expected acquire, got {got:?}")));
                        };
                        prop_assert_eq!(ticket.fencing_token(), expected.token);
                        prop_assert_eq!(ticket.attempt(), expected.attempt);
                        prop_assert_eq!(ticket.is_takeover(), takeover);
                        prop_assert_eq!(ticket.claimed_at(), now);
                        prop_assert_eq!(ticket.lease_until(), now + lease);
                        let expected_checkpoint = match &expected.state {
                            ModelState::InProgress { checkpoint, .. } => checkpoint.clone(),
                            ModelState::Completed { .. } => None,
                        };
                        prop_assert_eq!(
                            ticket.checkpoint().map(|c| c.step.clone()),
                            expected_checkpoint
                        );
                        self.tickets.push(ticket);
                    }
                }
            }
            Step::Complete {
                ticket,
                response,
                ttl,
            } => {
                let Some(ticket) = self.ticket(*ticket) else {
                    return Ok(());
                };
                let key = ticket.key().as_bytes().to_vec();
                let got = match ttl {
                    Some(ttl) => self.store()?.complete_with_ttl(
                        &ticket,
                        [*response],
                        Duration::from_millis(*ttl),
                    ),
                    None => self.store()?.complete(&ticket, [*response]),
                };
                if let Some(record) = self.model.owned(&key, ticket.fencing_token()) {
                    got.map_err(fail)?;
                    record.expires_at = now + ttl.unwrap_or(STORE_TTL);
                    record.state = ModelState::Completed {
                        completed_at: now,
                        response: vec![*response],
                    };
                } else {
                    prop_assert!(matches!(got, Err(Error::LeaseLost { .. })), "{got:?}");
                }
            }
            Step::Release { ticket } => {
                let Some(ticket) = self.ticket(*ticket) else {
                    return Ok(());
                };
                let key = ticket.key().as_bytes().to_vec();
                let got = self.store()?.release(&ticket);
                if self.model.owned(&key, ticket.fencing_token()).is_some() {
                    got.map_err(fail)?;
                    self.model.records.remove(&key);
                } else {
                    prop_assert!(matches!(got, Err(Error::LeaseLost { .. })), "{got:?}");
                }
            }
            Step::Extend { ticket, lease } => {
                let Some(mut ticket) = self.ticket(*ticket) else {
                    return Ok(());
                };
                let key = ticket.key().as_bytes().to_vec();
                let got = self
                    .store()?
                    .extend(&mut ticket, Duration::from_millis(*lease));
                if let Some(record) = self.model.owned(&key, ticket.fencing_token()) {
                    got.map_err(fail)?;
                    prop_assert_eq!(ticket.lease_until(), now + lease);
                    if let ModelState::InProgress {
                        claimed_at,
                        lease_until,
                        claim_ttl,
                        ..
                    } = &mut record.state
                    {
                        *lease_until = now + lease;
                        record.expires_at = (*claimed_at + *claim_ttl).max(now + lease);
                    }
                } else {
                    prop_assert!(matches!(got, Err(Error::LeaseLost { .. })), "{got:?}");
                }
            }
            Step::Checkpoint { ticket, step } => {
                let Some(ticket) = self.ticket(*ticket) else {
                    return Ok(());
                };
                let key = ticket.key().as_bytes().to_vec();
                let name = format!("step-{step}");
                let got = self.store()?.checkpoint(&ticket, &name, [*step]);
                if let Some(record) = self.model.owned(&key, ticket.fencing_token()) {
                    got.map_err(fail)?;
                    if let ModelState::InProgress { checkpoint, .. } = &mut record.state {
                        *checkpoint = Some(name);
                    }
                } else {
                    prop_assert!(matches!(got, Err(Error::LeaseLost { .. })), "{got:?}");
                }
            }
            Step::Expire { key } => {
                let name = key_name(*key);
                let got = self.store()?.expire(&name).map_err(fail)?;
                prop_assert_eq!(got, self.model.live(&name).is_some());
                self.model.records.remove(&name);
            }
            Step::MarkSeen { key } => {
                let name = key_name(*key);
                let got = self.store()?.mark_seen(&name).map_err(fail)?;
                prop_assert_eq!(got, self.model.mark_seen(&name));
            }
            Step::MarkSeenMany { keys } => {
                let names: Vec<Vec<u8>> = keys.iter().map(|k| key_name(*k)).collect();
                let got = self.store()?.mark_seen_many(&names).map_err(fail)?;
                let expected: Vec<bool> = names.iter().map(|n| self.model.mark_seen(n)).collect();
                prop_assert_eq!(got, expected);
            }
            Step::Get { key } => self.check_key(*key)?,
            Step::Sequence {
                key,
                seq,
                contiguous,
            } => {
                let name = key_name(*key);
                let seq = u64::from(*seq);
                let options = SequenceOptions::new().contiguous(*contiguous);
                let got = self
                    .store()?
                    .advance_sequence_with(&name, seq, &options)
                    .map_err(fail)?;
                let mark = self
                    .model
                    .marks
                    .get(&name)
                    .filter(|(_, exp)| now < *exp)
                    .map(|(m, _)| *m);
                let expected = match mark {
                    Some(mark) if seq == mark => SeqCheck::Duplicate,
                    Some(mark) if seq < mark => SeqCheck::Stale { current: mark },
                    Some(mark) if *contiguous && seq != mark + 1 => {
                        SeqCheck::Gap { expected: mark + 1 }
                    }
                    _ => {
                        self.model.marks.insert(name, (seq, now + STORE_TTL));
                        SeqCheck::Accepted
                    }
                };
                prop_assert_eq!(got, expected);
            }
            Step::Sweep => {
                let swept = self.store()?.sweep().map_err(fail)?;
                let before = self.model.records.len() + self.model.marks.len();
                self.model.records.retain(|_, r| now < r.expires_at);
                self.model.marks.retain(|_, (_, exp)| now < *exp);
                prop_assert_eq!(
                    swept,
                    before - self.model.records.len() - self.model.marks.len()
                );
            }
            Step::Forward { millis } => {
                self.clock.advance(Duration::from_millis(*millis));
                self.model.now += millis;
            }
            Step::Backward { millis } => {
                self.clock.rewind(Duration::from_millis(*millis));
                self.model.now -= millis;
            }
            Step::Reopen => {
                drop(self.store.take());
                self.store = Some(open(&self.dir, &self.clock)?);
            }
        }
        Ok(())
    }

    /// Compares one key's `get` with the model.
    fn check_key(&self, key: u8) -> Result<(), TestCaseError> {
        let name = key_name(key);
        let got = self.store()?.get(&name).map_err(fail)?;
        match (got, self.model.live(&name)) {
            (None, None) => {}
            (Some(entry), Some(expected)) => {
                prop_assert_eq!(entry.fencing_token, expected.token);
                prop_assert_eq!(entry.attempt, expected.attempt);
                prop_assert_eq!(&entry.fingerprint, &expected.fingerprint);
                prop_assert_eq!(entry.expires_at, expected.expires_at);
                match (&entry.state, &expected.state) {
                    (
                        EntryState::InProgress {
                            claimed_at,
                            lease_until,
                            checkpoint,
                            ..
                        },
                        ModelState::InProgress {
                            claimed_at: c,
                            lease_until: l,
                            checkpoint: cp,
                            ..
                        },
                    ) => {
                        prop_assert_eq!(claimed_at, c);
                        prop_assert_eq!(lease_until, l);
                        prop_assert_eq!(checkpoint.as_ref().map(|c| &c.step), cp.as_ref());
                    }
                    (
                        EntryState::Completed {
                            completed_at,
                            response,
                            ..
                        },
                        ModelState::Completed {
                            completed_at: c,
                            response: r,
                        },
                    ) => {
                        prop_assert_eq!(completed_at, c);
                        prop_assert_eq!(response, r);
                    }
                    (got, expected) => {
                        return Err(fail(format!("state {got:?} vs model {expected:?}")));
                    }
                }
            }
            (got, expected) => return Err(fail(format!("get {got:?} vs model {expected:?}"))),
        }
        Ok(())
    }

    /// Compares the whole store with the model.
    fn check_all(&self) -> Result<(), TestCaseError> {
        for key in 0..KEYS {
            self.check_key(key)?;
        }
        let stats = self.store()?.stats().map_err(fail)?;
        let live = self
            .model
            .records
            .values()
            .filter(|r| self.model.now < r.expires_at)
            .count()
            + self
                .model
                .marks
                .values()
                .filter(|(_, exp)| self.model.now < *exp)
                .count();
        let present = self.model.records.len() + self.model.marks.len();
        prop_assert_eq!(stats.live_keys, live as u64);
        prop_assert_eq!(stats.expired_pending, (present - live) as u64);
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_store_behaves_as_the_model(steps in prop::collection::vec(step(), 1..=100)) {
        let mut harness = Harness::new()?;
        for (i, step) in steps.iter().enumerate() {
            harness.run(step).map_err(|err| fail(format!("step {i} {step:?}: {err}")))?;
        }
        harness.check_all()?;
        // And once more from the file.
        harness.run(&Step::Reopen)?;
        harness.check_all()?;
    }
}
