//! The state machine against the shared model of `docs/SEMANTICS.md` (`testing::Model`):
//! random sequences of claims (with and without fingerprints), completes, releases, extends,
//! checkpoints, expires, marks, sequence marks, sweeps, clock jumps in both directions and
//! reopens of the file, every answer compared with the model's.
//!
//! `PROPTEST_CASES` sets the number of cases (default 1000, up to 100 steps each).

mod common;

use std::time::Duration;

use common::T0;
use dedupe_store::testing::{Model, Op, Refusal, Reply};
use dedupe_store::{Claim, ClaimOptions, Error, ManualClock, SequenceOptions, Store, Ticket};
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

struct Harness {
    dir: tempfile::TempDir,
    clock: ManualClock,
    store: Option<Store>,
    model: Model,
    /// The clock's reading, as the model takes it.
    now: u64,
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
            model: Model::default(),
            now: T0,
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
        let now = self.now;
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
                let op = Op::Claim {
                    fingerprint: fp,
                    lease: lease.unwrap_or(STORE_LEASE),
                    ttl: ttl.unwrap_or(STORE_TTL),
                };
                let expected = self.model.apply(&name, &op, now);
                prop_assert_eq!(Reply::of_claim(&got), expected);
                if let Claim::Acquired(ticket) = got {
                    self.tickets.push(ticket);
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
                let got = match ttl {
                    Some(ttl) => self.store()?.complete_with_ttl(
                        &ticket,
                        [*response],
                        Duration::from_millis(*ttl),
                    ),
                    None => self.store()?.complete(&ticket, [*response]),
                };
                let op = Op::Complete {
                    token: ticket.fencing_token(),
                    response: vec![*response],
                    ttl: ttl.unwrap_or(STORE_TTL),
                };
                self.owner_call(&ticket, got, &op)?;
            }
            Step::Release { ticket } => {
                let Some(ticket) = self.ticket(*ticket) else {
                    return Ok(());
                };
                let got = self.store()?.release(&ticket);
                let op = Op::Release {
                    token: ticket.fencing_token(),
                };
                self.owner_call(&ticket, got, &op)?;
            }
            Step::Extend { ticket, lease } => {
                let Some(mut ticket) = self.ticket(*ticket) else {
                    return Ok(());
                };
                let key = ticket.key().as_bytes().to_vec();
                let got = self
                    .store()?
                    .extend(&mut ticket, Duration::from_millis(*lease));
                let op = Op::Extend {
                    token: ticket.fencing_token(),
                    lease: *lease,
                };
                let expected = self.model.apply(&key, &op, now);
                let got = match got {
                    Ok(()) => Reply::Extended {
                        lease_until: ticket.lease_until(),
                    },
                    Err(Error::LeaseLost { .. }) => Reply::Refused(Refusal::LeaseLost),
                    Err(err) => return Err(fail(err)),
                };
                prop_assert_eq!(got, expected);
            }
            Step::Checkpoint { ticket, step } => {
                let Some(ticket) = self.ticket(*ticket) else {
                    return Ok(());
                };
                let name = format!("step-{step}");
                let got = self.store()?.checkpoint(&ticket, &name, [*step]);
                let op = Op::Checkpoint {
                    token: ticket.fencing_token(),
                    step: name,
                    state: vec![*step],
                };
                self.owner_call(&ticket, got, &op)?;
            }
            Step::Expire { key } => {
                let name = key_name(*key);
                let got = self.store()?.expire(&name).map_err(fail)?;
                prop_assert_eq!(got, self.model.expire(&name, now));
            }
            Step::MarkSeen { key } => {
                let name = key_name(*key);
                let got = self.store()?.mark_seen(&name).map_err(fail)?;
                prop_assert_eq!(got, self.model.mark_seen(&name, STORE_TTL, now));
            }
            Step::MarkSeenMany { keys } => {
                let names: Vec<Vec<u8>> = keys.iter().map(|k| key_name(*k)).collect();
                let got = self.store()?.mark_seen_many(&names).map_err(fail)?;
                let expected: Vec<bool> = names
                    .iter()
                    .map(|n| self.model.mark_seen(n, STORE_TTL, now))
                    .collect();
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
                let expected = self
                    .model
                    .advance_sequence(&name, seq, *contiguous, STORE_TTL, now);
                prop_assert_eq!(got, expected);
            }
            Step::Sweep => {
                let swept = self.store()?.sweep().map_err(fail)?;
                prop_assert_eq!(swept, self.model.sweep(now));
            }
            Step::Forward { millis } => {
                self.clock.advance(Duration::from_millis(*millis));
                self.now += millis;
            }
            Step::Backward { millis } => {
                self.clock.rewind(Duration::from_millis(*millis));
                self.now -= millis;
            }
            Step::Reopen => {
                drop(self.store.take());
                self.store = Some(open(&self.dir, &self.clock)?);
            }
        }
        Ok(())
    }

    /// `complete`, `release` and `checkpoint`: the store's answer against the model's.
    fn owner_call(
        &mut self,
        ticket: &Ticket,
        got: Result<(), Error>,
        op: &Op,
    ) -> Result<(), TestCaseError> {
        let got = Reply::of_owner_call(got).map_err(fail)?;
        let expected = self.model.apply(ticket.key().as_bytes(), op, self.now);
        prop_assert_eq!(got, expected);
        Ok(())
    }

    /// Compares one key's `get` with the model.
    fn check_key(&self, key: u8) -> Result<(), TestCaseError> {
        let name = key_name(key);
        let got = self.store()?.get(&name).map_err(fail)?;
        prop_assert_eq!(got, self.model.entry(&name, self.now));
        Ok(())
    }

    /// Compares the whole store with the model.
    fn check_all(&self) -> Result<(), TestCaseError> {
        for key in 0..KEYS {
            self.check_key(key)?;
        }
        let stats = self.store()?.stats().map_err(fail)?;
        let (live, expired_pending) = self.model.key_counts(self.now);
        prop_assert_eq!(stats.live_keys, live);
        prop_assert_eq!(stats.expired_pending, expired_pending);
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
