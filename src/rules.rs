//! The rules of the store, with no I/O: given a key's current record (or none), an operation
//! and the time, decide the new record and the caller's answer.
//!
//! The redb layer only loads, stores and batches what this module decides; the model test and
//! every backend share these rules.

use std::time::Duration;

use crate::claim::{Checkpoint, Claim, Outcome, Ticket};
use crate::error::Error;
use crate::key::Key;
use crate::record::{ByteString, Record, RecordState, StoredCheckpoint};
use crate::sequence::SeqCheck;

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

/// A write to one key. Durations are already validated milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Claim {
        fingerprint: Option<Vec<u8>>,
        lease: u64,
        ttl: u64,
    },
    Complete {
        fencing_token: u64,
        response: Vec<u8>,
        ttl: u64,
    },
    Release {
        fencing_token: u64,
    },
    Extend {
        fencing_token: u64,
        lease: u64,
    },
    Expire,
    MarkSeen {
        ttl: u64,
    },
    Checkpoint {
        fencing_token: u64,
        step: String,
        state: Vec<u8>,
        /// Also extend the lease to `now + lease`.
        lease: Option<u64>,
    },
    AdvanceSequence {
        seq: u64,
        ttl: u64,
        /// Refuse a `seq` that skips past `mark + 1`.
        contiguous: bool,
    },
}

impl Op {
    pub(crate) fn namespace(&self) -> Namespace {
        match self {
            Op::AdvanceSequence { .. } => Namespace::Sequence,
            _ => Namespace::Idempotency,
        }
    }

    /// Bytes the operation carries, for sizing commit batches.
    pub(crate) fn payload_len(&self) -> usize {
        match self {
            Op::Complete { response, .. } => response.len(),
            Op::Checkpoint { step, state, .. } => step.len() + state.len(),
            Op::Claim {
                fingerprint: Some(fp),
                ..
            } => fp.len(),
            _ => 0,
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

/// The caller's answer.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    Claim(Claim),
    Completed,
    Released,
    Extended { lease_until: u64 },
    Checkpointed { lease_until: u64 },
    Expired(bool),
    Seen(bool),
    Sequence(SeqCheck),
    Refused(Error),
}

/// The decision for one operation.
#[derive(Debug, Clone)]
pub(crate) struct Transition {
    pub change: Change,
    pub answer: Answer,
    /// Whether `Context::next_token` was used.
    pub issued_token: bool,
}

impl Transition {
    fn keep(answer: Answer) -> Transition {
        Transition {
            change: Change::Keep,
            answer,
            issued_token: false,
        }
    }

    fn refuse(err: Error) -> Transition {
        Transition::keep(Answer::Refused(err))
    }
}

/// Decides `op` on a key whose stored record is `current`.
///
/// An operation that would store a key that has no record while the store is full is refused
/// with [`Error::KeyBudgetExhausted`]; one that replaces a record, even an expired one, is not,
/// since it takes no more room.
pub(crate) fn apply(current: Option<&Record>, op: &Op, ctx: &Context<'_>) -> Transition {
    let transition = decide(current, op, ctx);
    match ctx.full {
        Some(max_keys) if current.is_none() && matches!(transition.change, Change::Put(_)) => {
            Transition::refuse(Error::KeyBudgetExhausted { max_keys })
        }
        _ => transition,
    }
}

fn decide(current: Option<&Record>, op: &Op, ctx: &Context<'_>) -> Transition {
    // A record past its expires_at behaves exactly as absent.
    let live = current.filter(|record| record.is_live(ctx.now));
    match op {
        Op::Claim {
            fingerprint,
            lease,
            ttl,
        } => claim(live, fingerprint.as_deref(), *lease, *ttl, ctx),
        Op::Complete {
            fencing_token,
            response,
            ttl,
        } => complete(live, *fencing_token, response, *ttl, ctx),
        Op::Release { fencing_token } => match owned(live, *fencing_token, ctx) {
            Ok(_) => Transition {
                change: Change::Delete,
                answer: Answer::Released,
                issued_token: false,
            },
            Err(err) => Transition::refuse(err),
        },
        Op::Extend {
            fencing_token,
            lease,
        } => extend(live, *fencing_token, *lease, ctx),
        Op::Expire => Transition {
            // Remove an expired leftover too, but only a live record counts as expired now.
            change: if current.is_some() {
                Change::Delete
            } else {
                Change::Keep
            },
            answer: Answer::Expired(live.is_some()),
            issued_token: false,
        },
        Op::MarkSeen { ttl } => mark_seen(live, *ttl, ctx),
        Op::Checkpoint {
            fencing_token,
            step,
            state,
            lease,
        } => checkpoint(live, *fencing_token, step, state, *lease, ctx),
        Op::AdvanceSequence {
            seq,
            ttl,
            contiguous,
        } => advance_sequence(live, *seq, *ttl, *contiguous, ctx),
    }
}

fn claim(
    live: Option<&Record>,
    fingerprint: Option<&[u8]>,
    lease: u64,
    ttl: u64,
    ctx: &Context<'_>,
) -> Transition {
    let Some(record) = live else {
        return acquire(None, fingerprint, lease, ttl, ctx);
    };
    // The fingerprint is checked first, whatever the state and whether or not the lease passed.
    if let (Some(stored), Some(given)) = (&record.fingerprint, fingerprint)
        && stored.0 != given
    {
        return Transition::keep(Answer::Claim(Claim::Mismatch {
            completed: matches!(record.state, RecordState::Completed { .. }),
        }));
    }
    match &record.state {
        RecordState::Completed {
            completed_at,
            response,
        } => Transition::keep(Answer::Claim(Claim::Completed(Outcome {
            response: response.0.clone(),
            completed_at: *completed_at,
            expires_at: record.expires_at,
            attempt: record.attempt,
            fencing_token: record.fencing_token,
        }))),
        RecordState::InProgress { lease_until, .. } if ctx.now < *lease_until => {
            Transition::keep(Answer::Claim(Claim::InProgress {
                lease_until: *lease_until,
                retry_after: Duration::from_millis(lease_until.saturating_sub(ctx.now)),
                attempt: record.attempt,
            }))
        }
        RecordState::InProgress { .. } => acquire(Some(record), fingerprint, lease, ttl, ctx),
        RecordState::Sequence { .. } => Transition::refuse(wrong_kind(ctx.key)),
    }
}

/// A fresh claim (`previous` is `None`) or a takeover of a claim whose lease ran out.
fn acquire(
    previous: Option<&Record>,
    fingerprint: Option<&[u8]>,
    lease: u64,
    ttl: u64,
    ctx: &Context<'_>,
) -> Transition {
    let (lease_until, ttl_deadline) = match (
        deadline(ctx.now, lease, "lease"),
        deadline(ctx.now, ttl, "ttl"),
    ) {
        (Ok(lease_until), Ok(ttl_deadline)) => (lease_until, ttl_deadline),
        (Err(err), _) | (_, Err(err)) => return Transition::refuse(err),
    };
    let (attempt, stored_fingerprint, checkpoint) = match previous {
        Some(previous) => {
            let checkpoint = match &previous.state {
                RecordState::InProgress { checkpoint, .. } => checkpoint.clone(),
                _ => None,
            };
            (
                previous.attempt.saturating_add(1),
                previous
                    .fingerprint
                    .clone()
                    .or_else(|| fingerprint.map(|fp| ByteString(fp.to_vec()))),
                checkpoint,
            )
        }
        None => (1, fingerprint.map(|fp| ByteString(fp.to_vec())), None),
    };
    let record = Record {
        fencing_token: ctx.next_token,
        attempt,
        fingerprint: stored_fingerprint,
        expires_at: ttl_deadline.max(lease_until),
        state: RecordState::InProgress {
            claimed_at: ctx.now,
            lease_until,
            claim_ttl: ttl,
            checkpoint: checkpoint.clone(),
        },
    };
    let ticket = Ticket {
        key: ctx.key.clone(),
        fencing_token: ctx.next_token,
        attempt,
        claimed_at: ctx.now,
        lease_until,
        takeover: previous.is_some(),
        checkpoint: checkpoint.map(Checkpoint::from),
        store_id: ctx.store_id,
    };
    Transition {
        change: Change::Put(record),
        answer: Answer::Claim(Claim::Acquired(ticket)),
        issued_token: true,
    }
}

/// The live in-progress record `fencing_token` owns, or `LeaseLost`.
fn owned<'r>(
    live: Option<&'r Record>,
    fencing_token: u64,
    ctx: &Context<'_>,
) -> Result<&'r Record, Error> {
    match live {
        Some(record)
            if record.fencing_token == fencing_token
                && matches!(record.state, RecordState::InProgress { .. }) =>
        {
            Ok(record)
        }
        _ => Err(Error::LeaseLost {
            key: ctx.key.clone(),
            fencing_token,
        }),
    }
}

fn complete(
    live: Option<&Record>,
    fencing_token: u64,
    response: &[u8],
    ttl: u64,
    ctx: &Context<'_>,
) -> Transition {
    let record = match owned(live, fencing_token, ctx) {
        Ok(record) => record,
        Err(err) => return Transition::refuse(err),
    };
    let expires_at = match deadline(ctx.now, ttl, "ttl") {
        Ok(expires_at) => expires_at,
        Err(err) => return Transition::refuse(err),
    };
    Transition {
        change: Change::Put(Record {
            fencing_token: record.fencing_token,
            attempt: record.attempt,
            fingerprint: record.fingerprint.clone(),
            expires_at,
            state: RecordState::Completed {
                completed_at: ctx.now,
                response: ByteString(response.to_vec()),
            },
        }),
        answer: Answer::Completed,
        issued_token: false,
    }
}

fn extend(live: Option<&Record>, fencing_token: u64, lease: u64, ctx: &Context<'_>) -> Transition {
    let record = match owned(live, fencing_token, ctx) {
        Ok(record) => record,
        Err(err) => return Transition::refuse(err),
    };
    let lease_until = match deadline(ctx.now, lease, "lease") {
        Ok(lease_until) => lease_until,
        Err(err) => return Transition::refuse(err),
    };
    let mut next = record.clone();
    if let RecordState::InProgress {
        claimed_at,
        lease_until: stored_lease,
        claim_ttl,
        ..
    } = &mut next.state
    {
        *stored_lease = lease_until;
        next.expires_at = claimed_at.saturating_add(*claim_ttl).max(lease_until);
    }
    Transition {
        change: Change::Put(next),
        answer: Answer::Extended { lease_until },
        issued_token: false,
    }
}

fn checkpoint(
    live: Option<&Record>,
    fencing_token: u64,
    step: &str,
    state: &[u8],
    lease: Option<u64>,
    ctx: &Context<'_>,
) -> Transition {
    let record = match owned(live, fencing_token, ctx) {
        Ok(record) => record,
        Err(err) => return Transition::refuse(err),
    };
    let new_lease = match lease.map(|lease| deadline(ctx.now, lease, "lease")) {
        None => None,
        Some(Ok(lease_until)) => Some(lease_until),
        Some(Err(err)) => return Transition::refuse(err),
    };
    let mut next = record.clone();
    let mut answer_lease = 0;
    if let RecordState::InProgress {
        claimed_at,
        lease_until,
        claim_ttl,
        checkpoint,
    } = &mut next.state
    {
        if let Some(new_lease) = new_lease {
            *lease_until = new_lease;
            next.expires_at = claimed_at.saturating_add(*claim_ttl).max(new_lease);
        }
        answer_lease = *lease_until;
        *checkpoint = Some(StoredCheckpoint {
            step: step.to_string(),
            state: ByteString(state.to_vec()),
            recorded_at: ctx.now,
        });
    }
    Transition {
        change: Change::Put(next),
        answer: Answer::Checkpointed {
            lease_until: answer_lease,
        },
        issued_token: false,
    }
}

fn advance_sequence(
    live: Option<&Record>,
    seq: u64,
    ttl: u64,
    contiguous: bool,
    ctx: &Context<'_>,
) -> Transition {
    let mark = match live.map(|record| &record.state) {
        None => None,
        Some(RecordState::Sequence { mark, .. }) => Some(*mark),
        Some(_) => {
            return Transition::refuse(Error::Corrupt {
                key: ctx.key.clone(),
                reason: "an idempotency record is stored under a sequence key".to_string(),
            });
        }
    };
    if let Some(mark) = mark {
        if seq == mark {
            return Transition::keep(Answer::Sequence(SeqCheck::Duplicate));
        }
        if seq < mark {
            return Transition::keep(Answer::Sequence(SeqCheck::Stale { current: mark }));
        }
        let expected = mark.saturating_add(1);
        if contiguous && seq != expected {
            return Transition::keep(Answer::Sequence(SeqCheck::Gap { expected }));
        }
    }
    let expires_at = match deadline(ctx.now, ttl, "ttl") {
        Ok(expires_at) => expires_at,
        Err(err) => return Transition::refuse(err),
    };
    Transition {
        change: Change::Put(Record {
            fencing_token: 0,
            attempt: 0,
            fingerprint: None,
            expires_at,
            state: RecordState::Sequence {
                mark: seq,
                updated_at: ctx.now,
            },
        }),
        answer: Answer::Sequence(SeqCheck::Accepted),
        issued_token: false,
    }
}

fn mark_seen(live: Option<&Record>, ttl: u64, ctx: &Context<'_>) -> Transition {
    if live.is_some() {
        return Transition::keep(Answer::Seen(false));
    }
    let expires_at = match deadline(ctx.now, ttl, "ttl") {
        Ok(expires_at) => expires_at,
        Err(err) => return Transition::refuse(err),
    };
    Transition {
        change: Change::Put(Record {
            fencing_token: ctx.next_token,
            attempt: 1,
            fingerprint: None,
            expires_at,
            state: RecordState::Completed {
                completed_at: ctx.now,
                response: ByteString(Vec::new()),
            },
        }),
        answer: Answer::Seen(true),
        issued_token: true,
    }
}

/// `now + millis`, or an error when that would overflow the clock.
fn deadline(now: u64, millis: u64, what: &'static str) -> Result<u64, Error> {
    now.checked_add(millis).ok_or(Error::InvalidDuration {
        what,
        reason: "the deadline overflows the clock",
    })
}

fn wrong_kind(key: &Key) -> Error {
    Error::Corrupt {
        key: key.clone(),
        reason: "a sequence mark is stored under an idempotency key".to_string(),
    }
}

#[cfg(test)]
mod tests;
