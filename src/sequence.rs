//! The sequence guard: dedupe an ordered stream by its high-water mark instead of one record
//! per message.
//!
//! For per-entity event sequence numbers or producer sequence ids: each stream key stores one
//! mark, and a message is accepted only if its number is above it. Stream keys live in a key
//! space of their own, so a stream and an idempotency key may share bytes without meeting.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::limits;
use crate::redb::scan;
use crate::rules::{Answer, Namespace, Op};
use crate::store::{Store, checked_key, expect};

/// Per-call settings for [`Store::advance_sequence_with`].
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

impl Store {
    /// Offers `seq` to the stream `stream`, atomically: [`SeqCheck::Accepted`] when it is above
    /// the stored mark (or the stream is new or expired), which it then becomes;
    /// [`SeqCheck::Duplicate`] when equal; [`SeqCheck::Stale`] when below. Refusals are served
    /// from a read transaction without waiting for the writer.
    ///
    /// ```
    /// use dedupe_store::{SeqCheck, Store};
    ///
    /// let store = Store::in_memory()?;
    /// assert_eq!(store.advance_sequence("order-9/events", 1)?, SeqCheck::Accepted);
    /// assert_eq!(store.advance_sequence("order-9/events", 3)?, SeqCheck::Accepted);
    /// assert_eq!(store.advance_sequence("order-9/events", 3)?, SeqCheck::Duplicate);
    /// assert_eq!(store.advance_sequence("order-9/events", 2)?, SeqCheck::Stale { current: 3 });
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::EmptyKey`], [`Error::KeyTooLarge`], [`Error::Corrupt`], [`Error::Storage`].
    pub fn advance_sequence(&self, stream: impl AsRef<[u8]>, seq: u64) -> Result<SeqCheck> {
        self.advance_sequence_with(stream, seq, &SequenceOptions::new())
    }

    /// [`Store::advance_sequence`] with a TTL of its own or gap detection.
    ///
    /// ```
    /// use dedupe_store::{SeqCheck, SequenceOptions, Store};
    ///
    /// let store = Store::in_memory()?;
    /// let strict = SequenceOptions::new().contiguous(true);
    /// assert_eq!(store.advance_sequence_with("s", 1, &strict)?, SeqCheck::Accepted);
    /// assert_eq!(store.advance_sequence_with("s", 3, &strict)?, SeqCheck::Gap { expected: 2 });
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// As for [`Store::advance_sequence`], and [`Error::InvalidDuration`].
    pub fn advance_sequence_with(
        &self,
        stream: impl AsRef<[u8]>,
        seq: u64,
        options: &SequenceOptions,
    ) -> Result<SeqCheck> {
        let stream = stream.as_ref();
        self.observed("advance_sequence", Some(stream), || {
            let key = checked_key(stream)?;
            let ttl = match options.ttl {
                Some(ttl) => limits::duration_millis("ttl", ttl)?,
                None => self.engine().config.ttl,
            };
            let op = Op::AdvanceSequence {
                seq,
                ttl,
                contiguous: options.contiguous,
            };
            let answer = match self.engine().peek(&key, &op)? {
                Some(answer) => answer,
                None => self.engine().one(key, op)?,
            };
            expect(answer, |answer| match answer {
                Answer::Sequence(check) => Some(check),
                _ => None,
            })
        })
    }

    /// The stream's current mark; `None` if it has none or it expired.
    ///
    /// # Errors
    /// [`Error::EmptyKey`], [`Error::KeyTooLarge`], [`Error::Corrupt`], [`Error::Storage`].
    pub fn sequence_mark(&self, stream: impl AsRef<[u8]>) -> Result<Option<u64>> {
        let key = checked_key(stream.as_ref())?;
        let stored_key = scan::stored_key(Namespace::Sequence.tag(), key.as_bytes());
        let now = self.engine().now();
        match self.engine().load(&stored_key)? {
            None => Ok(None),
            Some(Err(err)) => Err(Error::Corrupt { key, reason: err.0 }),
            Some(Ok(record)) if !record.is_live(now) => Ok(None),
            Some(Ok(record)) => match record.state {
                crate::record::RecordState::Sequence { mark, .. } => Ok(Some(mark)),
                _ => Err(Error::Corrupt {
                    key,
                    reason: "an idempotency record is stored under a sequence key".to_string(),
                }),
            },
        }
    }
}
