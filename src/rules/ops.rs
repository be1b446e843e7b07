//! The operations, one type each, and the rules that decide them (docs/SEMANTICS.md). Durations
//! are validated milliseconds.

use std::time::Duration;

use super::{Change, Context, Decision, Namespace, Rule, deadline, live};
use crate::claim::{self, Checkpoint as TicketCheckpoint, Outcome, Ticket};
use crate::error::Error;
use crate::key::Key;
use crate::record::{ByteString, Record, RecordState, StoredCheckpoint};
use crate::sequence::SeqCheck;
use crate::stats::Tally;

/// Claims a key (SEMANTICS.md §4, §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    pub fingerprint: Option<Vec<u8>>,
    pub lease: u64,
    pub ttl: u64,
}

/// Completes the claim the fencing token owns, storing `response` (§6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Complete {
    pub fencing_token: u64,
    pub response: Vec<u8>,
    pub ttl: u64,
}

/// Gives up the claim the fencing token owns (§6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Release {
    pub fencing_token: u64,
}

/// Moves the lease of the claim the fencing token owns to `now + lease`; answers the new
/// `lease_until` (§6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extend {
    pub fencing_token: u64,
    pub lease: u64,
}

/// Records a finished step of the claim the fencing token owns; answers its `lease_until`
/// (§9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub fencing_token: u64,
    pub step: String,
    pub state: Vec<u8>,
    /// Also extend the lease to `now + lease`.
    pub lease: Option<u64>,
}

/// Forgets a key; answers whether it was live (§7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expire;

/// Marks a key seen; answers whether this was the first time (§8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MarkSeen {
    pub ttl: u64,
}

/// Advances a stream's high-water mark (§10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AdvanceSequence {
    pub seq: u64,
    pub ttl: u64,
    /// Refuse a `seq` that skips past `mark + 1`.
    pub contiguous: bool,
}

impl Rule for Claim {
    type Answer = claim::Claim;
    const CREATES: bool = true;

    fn payload_len(&self) -> usize {
        self.fingerprint.as_ref().map_or(0, Vec::len)
    }

    fn decide(&self, current: Option<&Record>, ctx: &Context<'_>) -> Decision<claim::Claim> {
        let Some(record) = live(current, ctx.now) else {
            return acquire(None, self, ctx);
        };
        // The fingerprint is checked first, whatever the state and whether or not the lease
        // passed.
        if let (Some(stored), Some(given)) = (&record.fingerprint, &self.fingerprint)
            && &stored.0 != given
        {
            return Decision::keep(claim::Claim::Mismatch {
                completed: matches!(record.state, RecordState::Completed { .. }),
            });
        }
        match &record.state {
            RecordState::Completed {
                completed_at,
                response,
            } => Decision::keep(claim::Claim::Completed(Outcome {
                response: response.0.clone(),
                completed_at: *completed_at,
                expires_at: record.expires_at,
                attempt: record.attempt,
                fencing_token: record.fencing_token,
            })),
            RecordState::InProgress { lease_until, .. } if ctx.now < *lease_until => {
                Decision::keep(claim::Claim::InProgress {
                    lease_until: *lease_until,
                    retry_after: Duration::from_millis(lease_until.saturating_sub(ctx.now)),
                    attempt: record.attempt,
                })
            }
            RecordState::InProgress { .. } => acquire(Some(record), self, ctx),
            RecordState::Sequence { .. } => Decision::refuse(wrong_kind(ctx.key)),
        }
    }

    fn tally(answer: &claim::Claim) -> Tally {
        match answer {
            claim::Claim::Acquired(ticket) => Tally::Acquired {
                takeover: ticket.is_takeover(),
            },
            claim::Claim::Completed(_) => Tally::Replay,
            // Counted by the store, once per answer a caller gets: a `claim_or_wait` claims
            // again each time it wakes.
            claim::Claim::InProgress { .. } => Tally::Nothing,
            claim::Claim::Mismatch { .. } => Tally::Mismatch,
        }
    }
}

/// A fresh claim (`previous` is `None`) or a takeover of a claim whose lease ran out.
fn acquire(previous: Option<&Record>, claim: &Claim, ctx: &Context<'_>) -> Decision<claim::Claim> {
    let (lease_until, ttl_deadline) = match (
        deadline(ctx.now, claim.lease, "lease"),
        deadline(ctx.now, claim.ttl, "ttl"),
    ) {
        (Ok(lease_until), Ok(ttl_deadline)) => (lease_until, ttl_deadline),
        (Err(err), _) | (_, Err(err)) => return Decision::refuse(err),
    };
    let given = || claim.fingerprint.clone().map(ByteString);
    let (attempt, fingerprint, checkpoint) = match previous {
        Some(previous) => {
            let checkpoint = match &previous.state {
                RecordState::InProgress { checkpoint, .. } => checkpoint.clone(),
                _ => None,
            };
            (
                previous.attempt.saturating_add(1),
                previous.fingerprint.clone().or_else(given),
                checkpoint,
            )
        }
        None => (1, given(), None),
    };
    let record = Record {
        fencing_token: ctx.next_token,
        attempt,
        fingerprint,
        expires_at: ttl_deadline.max(lease_until),
        state: RecordState::InProgress {
            claimed_at: ctx.now,
            lease_until,
            claim_ttl: claim.ttl,
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
        checkpoint: checkpoint.map(TicketCheckpoint::from),
        store_id: ctx.store_id,
    };
    Decision::write(Change::Put(record), claim::Claim::Acquired(ticket)).with_token()
}

/// The live in-progress record `fencing_token` owns, or `LeaseLost`.
fn owned<'r>(
    current: Option<&'r Record>,
    fencing_token: u64,
    ctx: &Context<'_>,
) -> Result<&'r Record, Error> {
    match live(current, ctx.now) {
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

impl Rule for Complete {
    type Answer = ();

    fn payload_len(&self) -> usize {
        self.response.len()
    }

    fn decide(&self, current: Option<&Record>, ctx: &Context<'_>) -> Decision<()> {
        let record = match owned(current, self.fencing_token, ctx) {
            Ok(record) => record,
            Err(err) => return Decision::refuse(err),
        };
        let expires_at = match deadline(ctx.now, self.ttl, "ttl") {
            Ok(expires_at) => expires_at,
            Err(err) => return Decision::refuse(err),
        };
        let record = Record {
            fencing_token: record.fencing_token,
            attempt: record.attempt,
            fingerprint: record.fingerprint.clone(),
            expires_at,
            state: RecordState::Completed {
                completed_at: ctx.now,
                response: ByteString(self.response.clone()),
            },
        };
        Decision::write(Change::Put(record), ())
    }

    fn tally(_: &()) -> Tally {
        Tally::Completed
    }
}

impl Rule for Release {
    type Answer = ();

    fn decide(&self, current: Option<&Record>, ctx: &Context<'_>) -> Decision<()> {
        match owned(current, self.fencing_token, ctx) {
            Ok(_) => Decision::write(Change::Delete, ()),
            Err(err) => Decision::refuse(err),
        }
    }

    fn tally(_: &()) -> Tally {
        Tally::Released
    }
}

impl Rule for Extend {
    type Answer = u64;

    fn decide(&self, current: Option<&Record>, ctx: &Context<'_>) -> Decision<u64> {
        let record = match owned(current, self.fencing_token, ctx) {
            Ok(record) => record,
            Err(err) => return Decision::refuse(err),
        };
        let lease_until = match deadline(ctx.now, self.lease, "lease") {
            Ok(lease_until) => lease_until,
            Err(err) => return Decision::refuse(err),
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
        Decision::write(Change::Put(next), lease_until)
    }

    fn tally(_: &u64) -> Tally {
        Tally::Extended
    }
}

impl Rule for Checkpoint {
    type Answer = u64;

    fn payload_len(&self) -> usize {
        self.step.len() + self.state.len()
    }

    fn decide(&self, current: Option<&Record>, ctx: &Context<'_>) -> Decision<u64> {
        let record = match owned(current, self.fencing_token, ctx) {
            Ok(record) => record,
            Err(err) => return Decision::refuse(err),
        };
        let new_lease = match self.lease.map(|lease| deadline(ctx.now, lease, "lease")) {
            None => None,
            Some(Ok(lease_until)) => Some(lease_until),
            Some(Err(err)) => return Decision::refuse(err),
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
                step: self.step.clone(),
                state: ByteString(self.state.clone()),
                recorded_at: ctx.now,
            });
        }
        Decision::write(Change::Put(next), answer_lease)
    }

    fn tally(_: &u64) -> Tally {
        Tally::Checkpointed
    }
}

impl Rule for Expire {
    type Answer = bool;

    fn decide(&self, current: Option<&Record>, ctx: &Context<'_>) -> Decision<bool> {
        // Remove an expired leftover too, but only a live record counts as expired now.
        let was_live = live(current, ctx.now).is_some();
        let change = if current.is_some() {
            Change::Delete
        } else {
            Change::Keep
        };
        Decision::write(change, was_live)
    }

    /// Expiring is the operator's way out of a damaged record: it is removed.
    fn damaged(&self, _: &Key, _: &str) -> Decision<bool> {
        Decision::write(Change::Delete, true)
    }

    fn tally(was_live: &bool) -> Tally {
        if *was_live {
            Tally::Expired
        } else {
            Tally::Nothing
        }
    }
}

impl Rule for MarkSeen {
    type Answer = bool;
    const CREATES: bool = true;

    fn decide(&self, current: Option<&Record>, ctx: &Context<'_>) -> Decision<bool> {
        if live(current, ctx.now).is_some() {
            return Decision::keep(false);
        }
        let expires_at = match deadline(ctx.now, self.ttl, "ttl") {
            Ok(expires_at) => expires_at,
            Err(err) => return Decision::refuse(err),
        };
        let record = Record {
            fencing_token: ctx.next_token,
            attempt: 1,
            fingerprint: None,
            expires_at,
            state: RecordState::Completed {
                completed_at: ctx.now,
                response: ByteString(Vec::new()),
            },
        };
        Decision::write(Change::Put(record), true).with_token()
    }

    fn tally(first: &bool) -> Tally {
        if *first {
            Tally::Marked
        } else {
            Tally::Duplicate
        }
    }
}

impl Rule for AdvanceSequence {
    type Answer = SeqCheck;

    fn namespace(&self) -> Namespace {
        Namespace::Sequence
    }

    fn decide(&self, current: Option<&Record>, ctx: &Context<'_>) -> Decision<SeqCheck> {
        let mark = match live(current, ctx.now).map(|record| &record.state) {
            None => None,
            Some(RecordState::Sequence { mark, .. }) => Some(*mark),
            Some(_) => {
                return Decision::refuse(Error::Corrupt {
                    key: ctx.key.clone(),
                    reason: "an idempotency record is stored under a sequence key".to_string(),
                });
            }
        };
        if let Some(mark) = mark {
            if self.seq == mark {
                return Decision::keep(SeqCheck::Duplicate);
            }
            if self.seq < mark {
                return Decision::keep(SeqCheck::Stale { current: mark });
            }
            let expected = mark.saturating_add(1);
            if self.contiguous && self.seq != expected {
                return Decision::keep(SeqCheck::Gap { expected });
            }
        }
        let expires_at = match deadline(ctx.now, self.ttl, "ttl") {
            Ok(expires_at) => expires_at,
            Err(err) => return Decision::refuse(err),
        };
        let record = Record {
            fencing_token: 0,
            attempt: 0,
            fingerprint: None,
            expires_at,
            state: RecordState::Sequence {
                mark: self.seq,
                updated_at: ctx.now,
            },
        };
        Decision::write(Change::Put(record), SeqCheck::Accepted)
    }

    fn tally(check: &SeqCheck) -> Tally {
        match check {
            SeqCheck::Accepted => Tally::SequenceAccepted,
            _ => Tally::SequenceRejected,
        }
    }
}

fn wrong_kind(key: &Key) -> Error {
    Error::Corrupt {
        key: key.clone(),
        reason: "a sequence mark is stored under an idempotency key".to_string(),
    }
}
