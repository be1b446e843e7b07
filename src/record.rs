//! The record model: one key's state as the rules reason about it and every engine stores it.
//! How the redb engine writes it to disk (its envelope) is `redb/codec.rs`.

use serde::{Deserialize, Serialize};

/// One key's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The token of the claim (or mark) that wrote this record.
    pub fencing_token: u64,
    /// 1 for a fresh claim, one more for each takeover.
    pub attempt: u32,
    /// The request fingerprint the key belongs to, if the claim gave one.
    pub fingerprint: Option<ByteString>,
    /// From this instant (milliseconds since the epoch) the record behaves as absent.
    pub expires_at: u64,
    /// What the key holds.
    pub state: RecordState,
}

/// Bytes serialized as one length-prefixed run rather than element by element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct ByteString(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The states a record can be in. New variants go at the end: bincode stores the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RecordState {
    /// Claimed and not yet completed.
    InProgress {
        claimed_at: u64,
        lease_until: u64,
        /// The claim's TTL in milliseconds: `expires_at` is the later of `claimed_at + ttl` and
        /// `lease_until`, so extending the lease recomputes it.
        claim_ttl: u64,
        /// The last step the owner recorded as done, for a takeover to resume from.
        checkpoint: Option<StoredCheckpoint>,
    },
    /// Completed with a response that is replayed to retries.
    Completed {
        completed_at: u64,
        response: ByteString,
    },
    /// A stream's high-water mark (the sequence guard).
    Sequence { mark: u64, updated_at: u64 },
}

/// A recovery point inside an in-progress claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredCheckpoint {
    pub step: String,
    pub state: ByteString,
    pub recorded_at: u64,
}

impl Record {
    /// Whether the record is a claim in progress, whatever its lease and expiry.
    pub fn is_in_progress(&self) -> bool {
        matches!(self.state, RecordState::InProgress { .. })
    }

    /// True while the record still counts (`now < expires_at`).
    pub fn is_live(&self, now: u64) -> bool {
        now < self.expires_at
    }
}

/// A record with its namespace tag and its caller's key.
#[cfg(feature = "testing")]
pub(crate) type TaggedRecord = (u8, crate::key::Key, Record);
