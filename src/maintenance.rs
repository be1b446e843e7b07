//! The operator's side of a [`Store`]: listing keys, counting, sweeping, verifying and
//! compacting the file.

use redb::ReadableDatabase;

use crate::entry::Entry;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::rules::Namespace;
use crate::stats::Stats;
use crate::storage;
use crate::store::Store;
use crate::sweeper;

/// What [`Store::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Records checked (all decoded and passed their checksum).
    pub records: u64,
    /// Whether redb had to repair the file (after which it passed).
    pub repaired: bool,
}

impl Store {
    /// Live keys starting with `prefix`, in key order, at most `limit` of them.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for a damaged record in the range; [`Error::Storage`].
    pub fn list(&self, prefix: impl AsRef<[u8]>, limit: usize) -> Result<Vec<Entry>> {
        let start = storage::stored_key(Namespace::Idempotency.tag(), prefix.as_ref());
        let now = self.engine().now();
        self.engine().read_tables(|txn| {
            let records = txn.open_table(storage::RECORDS)?;
            let mut entries = Vec::new();
            for row in records.range(start.as_slice()..)? {
                if entries.len() >= limit {
                    break;
                }
                let (stored_key, value) = row?;
                let stored_key = stored_key.value();
                if !stored_key.starts_with(&start) {
                    break;
                }
                let key = Key::new(&stored_key[1..]);
                let record = crate::record::decode(stored_key, value.value()).map_err(|err| {
                    Error::Corrupt {
                        key: key.clone(),
                        reason: err.0,
                    }
                })?;
                if record.is_live(now)
                    && let Some(entry) = Entry::from_record(key, record)
                {
                    entries.push(entry);
                }
            }
            Ok(entries)
        })
    }

    /// Removes every expired record now, in bounded batches (one short transaction each).
    /// Returns how many were removed. The background sweeper does the same on its interval.
    ///
    /// # Errors
    /// [`Error::Storage`]; batches committed before the failure stay removed.
    pub fn sweep(&self) -> Result<usize> {
        sweeper::sweep_all(self.engine(), || false)
    }

    /// Counters since open and gauges read now. Counting expired records awaiting the sweeper
    /// reads their index entries, so this costs time in proportion to that backlog.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub fn stats(&self) -> Result<Stats> {
        let (records, due) = self.counts()?;
        Ok(self
            .engine()
            .counters
            .snapshot(records.saturating_sub(due), due))
    }

    fn counts(&self) -> Result<(u64, u64)> {
        let now = self.engine().now();
        self.engine().read_tables(|txn| storage::count(txn, now))
    }

    /// The number of live keys (records not yet expired).
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub fn len(&self) -> Result<u64> {
        let (records, due) = self.counts()?;
        Ok(records.saturating_sub(due))
    }

    /// Whether no key is live.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Checks the whole file: redb's integrity check (every page checksum, repairing what it
    /// can), then every record's envelope and the expiry index against the records. Holds off
    /// every other call while it runs.
    ///
    /// # Errors
    /// [`Error::CorruptFile`] if redb cannot repair the file or the index disagrees with the
    /// records; [`Error::Corrupt`] naming the first damaged record; [`Error::Storage`].
    pub fn verify(&self) -> Result<VerifyReport> {
        self.engine().checkpoint_all()?;
        self.engine().storage.exclusive(|db| {
            let clean = db.check_integrity()?;
            let txn = db.begin_read()?;
            let (records, _) = storage::check_tables(&txn)?;
            Ok(VerifyReport {
                records,
                repaired: !clean,
            })
        })
    }

    /// Rewrites the file to give free space back to the operating system. Holds off every
    /// other call while it runs. Returns whether anything was compacted.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub fn compact(&self) -> Result<bool> {
        self.engine().checkpoint_all()?;
        self.engine().storage.exclusive(|db| Ok(db.compact()?))
    }
}
