//! Reads and plain marks: `get`, `expire`, and the dedupe set of `mark_seen` and
//! `mark_seen_many` (SEMANTICS.md §7).

use std::time::Duration;

use super::{Store, checked_key};
use crate::entry::Entry;
use crate::error::Result;
use crate::limits;
use crate::rules::Namespace;
use crate::rules::ops::{Expire, MarkSeen};

impl Store {
    /// The key's state, without changing it; `None` if it is absent or expired.
    ///
    /// # Errors
    /// [`Error::EmptyKey`](crate::Error::EmptyKey), [`Error::KeyTooLarge`](crate::Error::KeyTooLarge), [`Error::Corrupt`](crate::Error::Corrupt), [`Error::Storage`](crate::Error::Storage).
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        let key = key.as_ref();
        self.observed("get", Some(key), || {
            let key = checked_key(key)?;
            match self.engine().get_live(Namespace::Idempotency, &key)? {
                Some(record) => Ok(Entry::from_record(key, record)),
                None => Ok(None),
            }
        })
    }

    /// Removes the key now, whatever its state (an operator's tool; it also clears a record
    /// that fails its checksum). Returns whether a live record was there.
    ///
    /// # Errors
    /// [`Error::EmptyKey`](crate::Error::EmptyKey), [`Error::KeyTooLarge`](crate::Error::KeyTooLarge), [`Error::Storage`](crate::Error::Storage).
    pub fn expire(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        self.observed("expire", Some(key), || {
            let key = checked_key(key)?;
            self.engine().one(key, Expire)
        })
    }

    /// The dedupe set for message ids: `true` the first time `key` is seen within the TTL,
    /// `false` after. Shares the key space with [`Store::claim`]: a key with any live record
    /// is seen; otherwise a completed record with an empty response is stored.
    ///
    /// ```
    /// use dedupe_store::Store;
    ///
    /// let store = Store::in_memory()?;
    /// assert!(store.mark_seen("msg-1")?);
    /// assert!(!store.mark_seen("msg-1")?);
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::EmptyKey`](crate::Error::EmptyKey), [`Error::KeyTooLarge`](crate::Error::KeyTooLarge), [`Error::Corrupt`](crate::Error::Corrupt), [`Error::Storage`](crate::Error::Storage).
    pub fn mark_seen(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.mark_seen_inner(key.as_ref(), self.engine().config().ttl)
    }

    /// Like [`Store::mark_seen`], remembering the key for `ttl` (say, the broker's redelivery
    /// window) instead of the store's TTL.
    ///
    /// # Errors
    /// As for [`Store::mark_seen`], and [`Error::InvalidDuration`](crate::Error::InvalidDuration).
    pub fn mark_seen_with_ttl(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<bool> {
        let ttl = limits::duration_millis("ttl", ttl)?;
        self.mark_seen_inner(key.as_ref(), ttl)
    }

    fn mark_seen_inner(&self, key: &[u8], ttl: u64) -> Result<bool> {
        self.observed("mark_seen", Some(key), || {
            let key = checked_key(key)?;
            self.engine().decide(key, MarkSeen { ttl })
        })
    }

    /// [`Store::mark_seen`] for a batch, in one atomic write: all keys are marked or, on an
    /// error, none. A key repeated within the batch is `true` once, then `false`.
    ///
    /// ```
    /// use dedupe_store::Store;
    ///
    /// let store = Store::in_memory()?;
    /// store.mark_seen("m2")?;
    /// assert_eq!(store.mark_seen_many(["m1", "m2", "m1"])?, vec![true, false, false]);
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// As for [`Store::mark_seen`]; nothing is written.
    pub fn mark_seen_many<I, K>(&self, keys: I) -> Result<Vec<bool>>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        self.mark_seen_many_inner(keys, self.engine().config().ttl)
    }

    /// [`Store::mark_seen_many`] remembering the keys for `ttl` (say, the broker's redelivery
    /// window) instead of the store's TTL.
    ///
    /// # Errors
    /// As for [`Store::mark_seen_many`], and [`Error::InvalidDuration`](crate::Error::InvalidDuration).
    pub fn mark_seen_many_with_ttl<I, K>(&self, keys: I, ttl: Duration) -> Result<Vec<bool>>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        let ttl = limits::duration_millis("ttl", ttl)?;
        self.mark_seen_many_inner(keys, ttl)
    }

    fn mark_seen_many_inner<I, K>(&self, keys: I, ttl: u64) -> Result<Vec<bool>>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        self.observed("mark_seen_many", None, || {
            let ops = keys
                .into_iter()
                .map(|key| Ok((checked_key(key.as_ref())?, MarkSeen { ttl })))
                .collect::<Result<Vec<_>>>()?;
            if ops.is_empty() {
                return Ok(Vec::new());
            }
            self.engine().many(ops)
        })
    }
}
