//! The sequence guard's calls: `advance_sequence` and `sequence_mark` (SEMANTICS.md §8).

use super::{Store, checked_key};
use crate::error::{Error, Result};
use crate::limits;
use crate::rules::Namespace;
use crate::rules::ops::AdvanceSequence;
use crate::sequence::{SeqCheck, SequenceOptions};

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
                None => self.engine().config().ttl,
            };
            let op = AdvanceSequence {
                seq,
                ttl,
                contiguous: options.contiguous,
            };
            self.engine().decide(key, op)
        })
    }

    /// The stream's current mark; `None` if it has none or it expired.
    ///
    /// # Errors
    /// [`Error::EmptyKey`], [`Error::KeyTooLarge`], [`Error::Corrupt`], [`Error::Storage`].
    pub fn sequence_mark(&self, stream: impl AsRef<[u8]>) -> Result<Option<u64>> {
        let key = checked_key(stream.as_ref())?;
        match self.engine().get_live(Namespace::Sequence, &key)? {
            None => Ok(None),
            Some(record) => match record.state {
                crate::record::RecordState::Sequence { mark, .. } => Ok(Some(mark)),
                _ => Err(Error::Corrupt {
                    key,
                    reason: "an idempotency record is stored under a sequence key".to_string(),
                }),
            },
        }
    }
}
