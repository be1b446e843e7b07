//! The sequence guard: dedupe an ordered stream by its high-water mark instead of one record
//! per message.
//!
//! For per-entity event sequence numbers or producer sequence ids: each stream key stores one
//! mark, and a message is accepted only if its number is above it. Stream keys live in a key
//! space of their own, so a stream and an idempotency key may share bytes without meeting.

use std::time::Duration;

/// Per-call settings for [`Store::advance_sequence_with`](crate::Store::advance_sequence_with).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SequenceOptions {
    pub(crate) ttl: Option<Duration>,
    pub(crate) contiguous: bool,
}

impl SequenceOptions {
    /// The store's TTL, gaps allowed.
    pub fn new() -> SequenceOptions {
        SequenceOptions::default()
    }

    /// How long the stream's mark is remembered after its last accepted number. Default: the
    /// store's [`ttl`](crate::StoreBuilder::ttl).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> SequenceOptions {
        self.ttl = Some(ttl);
        self
    }

    /// Require each accepted number to be exactly one above the mark; a number that skips
    /// ahead gets [`SeqCheck::Gap`]. Default: off (any number above the mark is accepted).
    #[must_use]
    pub fn contiguous(mut self, contiguous: bool) -> SequenceOptions {
        self.contiguous = contiguous;
        self
    }
}

/// The answer of the sequence guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// `seq` was above the stream's mark (or the stream was new) and is now the mark.
    Accepted,
    /// `seq` equals the mark: this message was processed already.
    Duplicate,
    /// `seq` is below the mark.
    Stale {
        /// The stream's mark.
        current: u64,
    },
    /// The guard requires `seq == mark + 1` and `seq` skipped ahead. Nothing changed.
    Gap {
        /// The sequence number the stream expects next.
        expected: u64,
    },
}
