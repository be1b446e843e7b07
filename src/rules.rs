//! The rules of the store, with no I/O: given a key's stored record (or none), an operation and
//! the time, decide the new record and the caller's answer (docs/SEMANTICS.md).
//!
//! Each public operation is a type of its own implementing [`Rule`], with the answer its caller
//! gets: a [`ops::Claim`] is answered with a [`Claim`](crate::Claim), an [`ops::Expire`] with
//! whether the key was live, and so on. Engines only load, store and batch what the rules
//! decide; they carry operations of every kind through one commit as [`Queued`](queued::Queued) ones.
//!
//! - `ops`: the operations, one type each, and their rules;
//! - `queued`: an operation on its way through an engine, with the slot its answer is left in.

use crate::error::Error;
use crate::key::Key;
use crate::record::Record;
use crate::stats::Tally;

pub(crate) mod ops;
pub(crate) mod queued;

/// Which part of the key space an operation works in. Idempotency records (claims and marks)
/// and sequence marks never see each other's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Namespace {
    Idempotency,
    Sequence,
}

impl Namespace {
    /// The byte that starts every stored key of this namespace.
    pub(crate) fn tag(self) -> u8 {
        match self {
            Namespace::Idempotency => b'k',
            Namespace::Sequence => b's',
        }
    }
}

/// What the rules need to know besides the record and the operation.
pub(crate) struct Context<'a> {
    pub key: &'a Key,
    pub now: u64,
    /// The token a new claim or mark would get.
    pub next_token: u64,
    pub store_id: u64,
    /// `Some(budget)` when the store holds its budget of keys: no new key may be stored.
    pub full: Option<u64>,
}

/// What happens to the stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Keep,
    Put(Record),
    Delete,
}

/// The decision for one operation: the change to store and the caller's answer. A refusal
/// (`Err`) never changes anything.
#[derive(Debug, Clone)]
pub(crate) struct Decision<A> {
    pub change: Change,
    pub answer: Result<A, Error>,
    /// Whether `Context::next_token` was used.
    pub issued_token: bool,
}

impl<A> Decision<A> {
    pub(crate) fn keep(answer: A) -> Decision<A> {
        Decision {
            change: Change::Keep,
            answer: Ok(answer),
            issued_token: false,
        }
    }

    pub(crate) fn refuse(err: Error) -> Decision<A> {
        Decision {
            change: Change::Keep,
            answer: Err(err),
            issued_token: false,
        }
    }

    pub(crate) fn write(change: Change, answer: A) -> Decision<A> {
        Decision {
            change,
            answer: Ok(answer),
            issued_token: false,
        }
    }

    /// The same decision, having used `Context::next_token`.
    pub(crate) fn with_token(self) -> Decision<A> {
        Decision {
            issued_token: true,
            ..self
        }
    }
}

/// One kind of operation on one key: what the store does with the key's record, and what it
/// answers.
pub(crate) trait Rule: Send + Sync + 'static {
    /// What the caller gets when the operation is not refused.
    type Answer: Send + 'static;

    /// Whether the operation stores a new record, with a new fencing token, on a key that has
    /// none (a claim, a mark). An engine may then try to store it before reading the key.
    const CREATES: bool = false;

    /// The key space the operation works in.
    fn namespace(&self) -> Namespace {
        Namespace::Idempotency
    }

    /// Bytes the operation carries, for sizing commit batches.
    fn payload_len(&self) -> usize {
        0
    }

    /// Decides the operation on a key whose stored record is `current`, live or not.
    fn decide(&self, current: Option<&Record>, ctx: &Context<'_>) -> Decision<Self::Answer>;

    /// Decides the operation on a key whose stored record cannot be read (`reason` says why):
    /// refused as [`Error::Corrupt`], unless the operation is the way out of it.
    fn damaged(&self, key: &Key, reason: &str) -> Decision<Self::Answer> {
        Decision::refuse(Error::Corrupt {
            key: key.clone(),
            reason: reason.to_string(),
        })
    }

    /// What the store's counters count for `answer`.
    fn tally(answer: &Self::Answer) -> Tally;
}

/// Decides `rule` on a key whose stored record is `current`.
///
/// An operation that would store a key that has no record while the store is full is refused
/// with [`Error::KeyBudgetExhausted`]; one that replaces a record, even an expired one, is not,
/// since it takes no more room.
pub(crate) fn apply<R: Rule>(
    rule: &R,
    current: Option<&Record>,
    ctx: &Context<'_>,
) -> Decision<R::Answer> {
    let decision = rule.decide(current, ctx);
    match ctx.full {
        Some(max_keys) if current.is_none() && matches!(decision.change, Change::Put(_)) => {
            Decision::refuse(Error::KeyBudgetExhausted { max_keys })
        }
        _ => decision,
    }
}

/// What the counters count for a decided answer: the answer's tally, or a lost lease.
pub(crate) fn tally<R: Rule>(answer: &Result<R::Answer, Error>) -> Tally {
    match answer {
        Ok(answer) => R::tally(answer),
        Err(Error::LeaseLost { .. }) => Tally::LeaseLost,
        Err(_) => Tally::Nothing,
    }
}

/// The record if it is live at `now`: a record past its `expires_at` behaves exactly as absent
/// (SEMANTICS.md §3).
pub(crate) fn live(current: Option<&Record>, now: u64) -> Option<&Record> {
    current.filter(|record| record.is_live(now))
}

/// `now + millis`, or an error when that would overflow the clock.
pub(crate) fn deadline(now: u64, millis: u64, what: &'static str) -> Result<u64, Error> {
    now.checked_add(millis).ok_or(Error::InvalidDuration {
        what,
        reason: "the deadline overflows the clock",
    })
}

#[cfg(test)]
mod tests;
