//! What the model holds and speaks: records, operations and replies.

use std::time::Duration;

use crate::{Checkpoint, Claim, Entry, EntryState, Error, Key};

/// What a key holds in the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rec {
    /// The token of the claim or mark that wrote it.
    pub token: u64,
    /// 1, plus one per takeover.
    pub attempt: u32,
    /// The fingerprint the key belongs to.
    pub fingerprint: Option<Vec<u8>>,
    /// From this instant the record behaves as absent.
    pub expires_at: u64,
    /// In progress or completed.
    pub state: RecState,
}

/// The two states of a model record (SEMANTICS.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecState {
    /// Claimed.
    InProgress {
        /// When the current owner claimed it.
        claimed_at: u64,
        /// When its lease ends.
        lease_until: u64,
        /// The claim's TTL in milliseconds.
        claim_ttl: u64,
        /// The last checkpoint an owner recorded; a takeover keeps it.
        checkpoint: Option<RecCheckpoint>,
    },
    /// Completed (or marked seen, with an empty response).
    Completed {
        /// When.
        completed_at: u64,
        /// The stored response.
        response: Vec<u8>,
    },
}

/// A checkpoint as the model keeps it (SEMANTICS.md §6).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecCheckpoint {
    /// The name of the finished step.
    pub step: String,
    /// The state saved with it.
    pub state: Vec<u8>,
    /// When it was recorded.
    pub recorded_at: u64,
}

impl From<&Checkpoint> for RecCheckpoint {
    fn from(checkpoint: &Checkpoint) -> RecCheckpoint {
        RecCheckpoint {
            step: checkpoint.step.clone(),
            state: checkpoint.state.clone(),
            recorded_at: checkpoint.recorded_at,
        }
    }
}

impl From<&RecCheckpoint> for Checkpoint {
    fn from(checkpoint: &RecCheckpoint) -> Checkpoint {
        Checkpoint {
            step: checkpoint.step.clone(),
            state: checkpoint.state.clone(),
            recorded_at: checkpoint.recorded_at,
        }
    }
}

/// A stream's sequence mark (SEMANTICS.md §8), in its own key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqMark {
    /// The highest number accepted.
    pub mark: u64,
    /// From this instant the mark behaves as absent.
    pub expires_at: u64,
}

/// Why the model refuses an operation (the store must refuse it the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The ticket does not own the key.
    LeaseLost,
}

/// One operation on one key's record, with every duration resolved to milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// `claim_with`.
    Claim {
        /// The claim's fingerprint, if any.
        fingerprint: Option<Vec<u8>>,
        /// The lease.
        lease: u64,
        /// The claim's TTL.
        ttl: u64,
    },
    /// `complete` / `complete_with_ttl`.
    Complete {
        /// The ticket's fencing token.
        token: u64,
        /// The response to store.
        response: Vec<u8>,
        /// The completion's TTL.
        ttl: u64,
    },
    /// `release`.
    Release {
        /// The ticket's fencing token.
        token: u64,
    },
    /// `extend`.
    Extend {
        /// The ticket's fencing token.
        token: u64,
        /// The new lease, from now.
        lease: u64,
    },
    /// `checkpoint`.
    Checkpoint {
        /// The ticket's fencing token.
        token: u64,
        /// The step's name.
        step: String,
        /// The state saved with it.
        state: Vec<u8>,
    },
    /// `expire`.
    Expire,
    /// `mark_seen` / `mark_seen_with_ttl`.
    MarkSeen {
        /// The mark's TTL.
        ttl: u64,
    },
    /// `get`.
    Get,
}

/// The answer the store must give to an [`Op`], reduced to what the caller sees (a ticket
/// without its key and store, an entry without its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `Claim::Acquired` with a ticket holding these.
    Acquired {
        /// The new fencing token.
        token: u64,
        /// The attempt.
        attempt: u32,
        /// Whether it took over a passed lease.
        takeover: bool,
        /// When it was claimed.
        claimed_at: u64,
        /// When its lease ends.
        lease_until: u64,
        /// The checkpoint the takeover inherits.
        checkpoint: Option<RecCheckpoint>,
    },
    /// `Claim::InProgress`.
    InProgress {
        /// When the owner's lease ends.
        lease_until: u64,
        /// How long until then.
        retry_after: Duration,
        /// The owner's attempt.
        attempt: u32,
    },
    /// `Claim::Completed`: the replayed outcome.
    Completed {
        /// The stored response.
        response: Vec<u8>,
        /// When it was completed.
        completed_at: u64,
        /// When it expires.
        expires_at: u64,
        /// The attempt that completed it.
        attempt: u32,
        /// The token of the claim (or mark) that wrote it.
        token: u64,
    },
    /// `Claim::Mismatch`.
    Mismatch {
        /// Whether the record is completed.
        completed: bool,
    },
    /// An owner operation other than `extend` succeeded.
    Done,
    /// `extend` succeeded.
    Extended {
        /// The new end of the lease.
        lease_until: u64,
    },
    /// An owner operation was refused.
    Refused(Refusal),
    /// The boolean answer of `expire` and `mark_seen`.
    Flag(bool),
    /// The live record, as `get` shows it.
    Got(Option<Rec>),
}

impl Reply {
    /// A store's answer to a claim, as a [`Reply`].
    pub fn of_claim(claim: &Claim) -> Reply {
        match claim {
            Claim::Acquired(ticket) => Reply::Acquired {
                token: ticket.fencing_token,
                attempt: ticket.attempt,
                takeover: ticket.takeover,
                claimed_at: ticket.claimed_at,
                lease_until: ticket.lease_until,
                checkpoint: ticket.checkpoint.as_ref().map(RecCheckpoint::from),
            },
            Claim::InProgress {
                lease_until,
                retry_after,
                attempt,
            } => Reply::InProgress {
                lease_until: *lease_until,
                retry_after: *retry_after,
                attempt: *attempt,
            },
            Claim::Completed(outcome) => Reply::Completed {
                response: outcome.response.clone(),
                completed_at: outcome.completed_at,
                expires_at: outcome.expires_at,
                attempt: outcome.attempt,
                token: outcome.fencing_token,
            },
            Claim::Mismatch { completed } => Reply::Mismatch {
                completed: *completed,
            },
        }
    }

    /// A store's answer to `complete`, `release` or `checkpoint`: `Done`, or the refusal.
    /// Any other error is no answer the model gives, and is passed on.
    ///
    /// # Errors
    /// The store's error when it is not `LeaseLost`.
    pub fn of_owner_call(result: crate::Result<()>) -> crate::Result<Reply> {
        match result {
            Ok(()) => Ok(Reply::Done),
            Err(Error::LeaseLost { .. }) => Ok(Reply::Refused(Refusal::LeaseLost)),
            Err(err) => Err(err),
        }
    }

    /// A store's entry, as [`Reply::Got`] holds it. `claim_ttl` is the claim's TTL, which an
    /// entry does not show.
    pub fn of_entry(entry: Option<&Entry>, claim_ttl: u64) -> Reply {
        Reply::Got(entry.map(|entry| Rec::of_entry(entry, claim_ttl)))
    }
}

impl Rec {
    /// Whether the record is live at `now` (SEMANTICS.md §2).
    pub fn is_live(&self, now: u64) -> bool {
        now < self.expires_at
    }

    /// An entry as a record; `claim_ttl` is the claim's TTL, which an entry does not show.
    pub fn of_entry(entry: &Entry, claim_ttl: u64) -> Rec {
        Rec {
            token: entry.fencing_token,
            attempt: entry.attempt,
            fingerprint: entry.fingerprint.clone(),
            expires_at: entry.expires_at,
            state: match &entry.state {
                EntryState::InProgress {
                    claimed_at,
                    lease_until,
                    checkpoint,
                } => RecState::InProgress {
                    claimed_at: *claimed_at,
                    lease_until: *lease_until,
                    claim_ttl,
                    checkpoint: checkpoint.as_ref().map(RecCheckpoint::from),
                },
                EntryState::Completed {
                    completed_at,
                    response,
                } => RecState::Completed {
                    completed_at: *completed_at,
                    response: response.clone(),
                },
            },
        }
    }

    /// The record as `get` shows it under `key`.
    pub fn to_entry(&self, key: &[u8]) -> Entry {
        Entry {
            key: Key::new(key),
            fencing_token: self.token,
            attempt: self.attempt,
            fingerprint: self.fingerprint.clone(),
            expires_at: self.expires_at,
            state: match &self.state {
                RecState::InProgress {
                    claimed_at,
                    lease_until,
                    checkpoint,
                    ..
                } => EntryState::InProgress {
                    claimed_at: *claimed_at,
                    lease_until: *lease_until,
                    checkpoint: checkpoint.as_ref().map(Checkpoint::from),
                },
                RecState::Completed {
                    completed_at,
                    response,
                } => EntryState::Completed {
                    completed_at: *completed_at,
                    response: response.clone(),
                },
            },
        }
    }
}
