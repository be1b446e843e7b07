//! The model test's steps and runner, shared by tests/model.rs (a store file) and
//! tests/postgres_model.rs (a PostgreSQL schema): random sequences of claims (with and without
//! fingerprints), completes, releases, extends, checkpoints, expires, marks, sequence marks,
//! sweeps, clock jumps in both directions and reopens, every answer compared with
//! `testing::Model` (docs/SEMANTICS.md restated as a plain map). Each test file says only how
//! its store is opened.

use std::collections::BTreeMap;
use std::time::Duration;

use dedupe_store::testing::{Model, Op, Refusal, Reply};
use dedupe_store::{
    Claim, ClaimOptions, Error, ManualClock, SequenceOptions, Store, StoreBuilder, Ticket,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::common::T0;

pub const STORE_TTL: u64 = 10_000;
pub const STORE_LEASE: u64 = 3_000;
pub const KEYS: u8 = 4;

#[derive(Debug, Clone)]
pub enum Step {
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

/// One random step of a sequence.
pub fn step() -> impl Strategy<Value = Step> {
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

/// Opens a store on the clock the harness drives: the same file (or URL and schema) every
/// time, so a `Reopen` step sees what the previous store wrote.
pub type Opener = Box<dyn Fn(&ManualClock) -> Result<Store, TestCaseError>>;

/// How the store's fencing tokens are held against the model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    /// Equal: the store issues 1, 2, 3, ... as the model does (the file engine).
    Exact,
    /// In the same order: the store may skip numbers (the PostgreSQL engine draws tokens from
    /// a sequence, one per operation of a batch, and a sequence has gaps), so each store
    /// token is renumbered to the model's token it stands for, failing unless the
    /// renumbering keeps the order: a token greater than every earlier one stays greater
    /// (SEMANTICS.md §5), and no token stands for two.
    #[allow(dead_code)] // tests/model.rs, on a file, uses `Exact` only
    Increasing,
}

pub struct Harness {
    tokens: Tokens,
    /// Store token to model token, for `Tokens::Increasing`.
    renumbered: BTreeMap<u64, u64>,
    open: Opener,
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

/// The builder every harness store starts from: the harness's clock, the model's TTL and
/// lease, no background sweeper (sweeps are steps).
pub fn builder(clock: &ManualClock) -> StoreBuilder {
    Store::builder()
        .clock(clock.clone())
        .ttl(Duration::from_millis(STORE_TTL))
        .lease(Duration::from_millis(STORE_LEASE))
        .without_sweeper()
}

pub fn fail(err: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(err.to_string())
}

impl Harness {
    /// A harness whose store `open` opens, starting at `T0` with an empty model.
    pub fn new(open: Opener, tokens: Tokens) -> Result<Harness, TestCaseError> {
        let clock = ManualClock::new(T0);
        let store = open(&clock)?;
        Ok(Harness {
            tokens,
            renumbered: BTreeMap::new(),
            open,
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

    pub fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
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
                let reply = self.renumber_reply(Reply::of_claim(&got), &expected)?;
                prop_assert_eq!(reply, expected);
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
                    token: self.model_token(ticket.fencing_token()),
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
                    token: self.model_token(ticket.fencing_token()),
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
                    token: self.model_token(ticket.fencing_token()),
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
                    token: self.model_token(ticket.fencing_token()),
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
                self.store = Some((self.open)(&self.clock)?);
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

    /// The model's token for a store token a ticket carries (the store's own under
    /// `Tokens::Exact`, or one never seen, which no model record holds).
    fn model_token(&self, store: u64) -> u64 {
        match self.tokens {
            Tokens::Exact => store,
            Tokens::Increasing => self.renumbered.get(&store).copied().unwrap_or(u64::MAX),
        }
    }

    /// The model token a store token stands for, given the one the model expects in its
    /// place. Under `Tokens::Increasing` a store token seen for the first time takes the
    /// model's, unless that breaks the order of the tokens seen so far: the failure then says
    /// which tokens were issued out of order.
    fn renumber(&mut self, store: u64, model: u64) -> Result<u64, TestCaseError> {
        if self.tokens == Tokens::Exact {
            return Ok(store);
        }
        if let Some(known) = self.renumbered.get(&store) {
            return Ok(*known);
        }
        let below = self.renumbered.range(..store).next_back();
        let above = self.renumbered.range(store + 1..).next();
        let in_order =
            below.is_none_or(|(_, m)| *m < model) && above.is_none_or(|(_, m)| *m > model);
        if !in_order {
            return Err(fail(format!(
                "store token {store} (model token {model}) is out of order: the nearest \
                 tokens seen are {below:?} below and {above:?} above (store, model)"
            )));
        }
        self.renumbered.insert(store, model);
        Ok(model)
    }

    /// A claim's reply with its store token renumbered to the model's (`renumber`).
    fn renumber_reply(&mut self, got: Reply, expected: &Reply) -> Result<Reply, TestCaseError> {
        Ok(match (got, expected) {
            (
                Reply::Acquired {
                    token,
                    attempt,
                    takeover,
                    claimed_at,
                    lease_until,
                    checkpoint,
                },
                Reply::Acquired { token: model, .. },
            ) => Reply::Acquired {
                token: self.renumber(token, *model)?,
                attempt,
                takeover,
                claimed_at,
                lease_until,
                checkpoint,
            },
            (
                Reply::Completed {
                    response,
                    completed_at,
                    expires_at,
                    attempt,
                    token,
                },
                Reply::Completed { token: model, .. },
            ) => Reply::Completed {
                token: self.renumber(token, *model)?,
                response,
                completed_at,
                expires_at,
                attempt,
            },
            (got, _) => got,
        })
    }

    /// Compares one key's `get` with the model.
    fn check_key(&mut self, key: u8) -> Result<(), TestCaseError> {
        let name = key_name(key);
        let mut got = self.store()?.get(&name).map_err(fail)?;
        let expected = self.model.entry(&name, self.now);
        if let (Some(got), Some(expected)) = (&mut got, &expected) {
            got.fencing_token = self.renumber(got.fencing_token, expected.fencing_token)?;
        }
        prop_assert_eq!(got, expected);
        Ok(())
    }

    /// Compares the whole store with the model.
    pub fn check_all(&mut self) -> Result<(), TestCaseError> {
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

/// A case: up to 100 steps.
pub fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 1..=100)
}

/// Runs one case on a store `open` opens: every step against the model, then the whole store
/// compared with it, and once more after a reopen.
pub fn run_case(open: Opener, tokens: Tokens, steps: &[Step]) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(open, tokens)?;
    for (i, step) in steps.iter().enumerate() {
        harness
            .run(step)
            .map_err(|err| fail(format!("step {i} {step:?}: {err}")))?;
    }
    harness.check_all()?;
    // And once more from what the store wrote.
    harness.run(&Step::Reopen)?;
    harness.check_all()
}
