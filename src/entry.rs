//! [`Entry`]: a key's state as [`Store::get`](crate::Store::get) and
//! [`Store::list`](crate::Store::list) show it.

use crate::claim::{Checkpoint, Outcome};
use crate::key::Key;
use crate::record::{Record, RecordState};

/// A live key's state, read without changing it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// The key.
    pub key: Key,
    /// The fencing token of the claim (or mark) that wrote it.
    pub fencing_token: u64,
    /// The attempt number: 1, plus one per takeover.
    pub attempt: u32,
    /// The fingerprint the key belongs to, if its claim gave one.
    pub fingerprint: Option<Vec<u8>>,
    /// When the key will be forgotten (milliseconds since the epoch).
    pub expires_at: u64,
    /// In progress or completed, with the details of each.
    pub state: EntryState,
}

/// The two states a live key can be in.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EntryState {
    /// Claimed, not yet completed.
    #[non_exhaustive]
    InProgress {
        /// When the current owner claimed it (milliseconds since the epoch).
        claimed_at: u64,
        /// When the current owner's lease ends (milliseconds since the epoch).
        lease_until: u64,
        /// The last recovery point the owner recorded.
        checkpoint: Option<Checkpoint>,
    },
    /// Completed, with the outcome that retries get.
    #[non_exhaustive]
    Completed {
        /// When it was completed (milliseconds since the epoch).
        completed_at: u64,
        /// The stored response.
        response: Vec<u8>,
    },
}

impl Entry {
    /// True when the key is completed.
    pub fn is_completed(&self) -> bool {
        matches!(self.state, EntryState::Completed { .. })
    }

    /// True when the key is in progress.
    pub fn is_in_progress(&self) -> bool {
        matches!(self.state, EntryState::InProgress { .. })
    }

    /// The outcome, when the key is completed.
    pub fn outcome(&self) -> Option<Outcome> {
        match &self.state {
            EntryState::Completed {
                completed_at,
                response,
            } => Some(Outcome {
                response: response.clone(),
                completed_at: *completed_at,
                expires_at: self.expires_at,
                attempt: self.attempt,
                fencing_token: self.fencing_token,
            }),
            EntryState::InProgress { .. } => None,
        }
    }

    /// The entry for a stored idempotency record; `None` for a sequence mark.
    pub(crate) fn from_record(key: Key, record: Record) -> Option<Entry> {
        let state = match record.state {
            RecordState::InProgress {
                claimed_at,
                lease_until,
                checkpoint,
                ..
            } => EntryState::InProgress {
                claimed_at,
                lease_until,
                checkpoint: checkpoint.map(Checkpoint::from),
            },
            RecordState::Completed {
                completed_at,
                response,
            } => EntryState::Completed {
                completed_at,
                response: response.0,
            },
            RecordState::Sequence { .. } => return None,
        };
        Some(Entry {
            key,
            fencing_token: record.fencing_token,
            attempt: record.attempt,
            fingerprint: record.fingerprint.map(|fp| fp.0),
            expires_at: record.expires_at,
            state,
        })
    }
}

impl From<crate::record::StoredCheckpoint> for Checkpoint {
    fn from(stored: crate::record::StoredCheckpoint) -> Checkpoint {
        Checkpoint {
            step: stored.step,
            state: stored.state.0,
            recorded_at: stored.recorded_at,
        }
    }
}
