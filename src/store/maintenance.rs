//! The operator's side of a [`Store`]: listing keys, counting, sweeping, verifying and
//! compacting the file.

use redb::ReadableDatabase;

use super::Store;
use crate::entry::Entry;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::observe::Outcome;
use crate::redb::scan;
use crate::redb::schema;
use crate::rules::Namespace;
use crate::stats::Stats;
use crate::sweeper;

/// What [`Store::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Records in the store, the journal's included (each passed its checksum).
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
        self.observed("list", None, || self.list_inner(prefix.as_ref(), limit))
    }

    fn list_inner(&self, prefix: &[u8], limit: usize) -> Result<Vec<Entry>> {
        let start = scan::stored_key(Namespace::Idempotency.tag(), prefix);
        let now = self.engine().now();
        self.engine().storage.read_merged(&start, |txn, pending| {
            let records = txn.open_table(schema::RECORDS)?;
            let mut rows = records
                .range(start.as_slice()..)?
                .map_while(|row| match row {
                    Ok((key, value)) if key.value().starts_with(&start) => {
                        Some(Ok((key.value().to_vec(), value.value().to_vec())))
                    }
                    Ok(_) => None,
                    Err(err) => Some(Err(err)),
                })
                .peekable();
            let mut pending = pending.iter().peekable();
            let mut entries = Vec::new();
            // Both in key order: walk them together, the overlay's record winning a tie.
            while entries.len() < limit {
                let from_table = match (rows.peek(), pending.peek()) {
                    (None, None) => break,
                    (Some(Err(_)), _) => true,
                    (Some(Ok((table_key, _))), Some((pending_key, _))) => table_key < *pending_key,
                    (Some(Ok(_)), None) => true,
                    (None, Some(_)) => false,
                };
                let (stored_key, record) = if from_table {
                    let Some(row) = rows.next() else { break };
                    let (stored_key, value) = row?;
                    let record =
                        crate::redb::codec::decode(&stored_key, &value).map_err(|err| {
                            Error::Corrupt {
                                key: Key::new(stored_key.get(1..).unwrap_or_default()),
                                reason: err.0,
                            }
                        })?;
                    (stored_key, Some(record))
                } else {
                    let Some((stored_key, record)) = pending.next() else {
                        break;
                    };
                    if let Some(Ok((table_key, _))) = rows.peek()
                        && table_key == stored_key
                    {
                        rows.next();
                    }
                    (stored_key.clone(), record.clone())
                };
                if let Some(record) = record
                    && record.is_live(now)
                    && let Some(entry) = Entry::from_record(
                        Key::new(stored_key.get(1..).unwrap_or_default()),
                        record,
                    )
                {
                    entries.push(entry);
                }
            }
            Ok(entries)
        })
    }

    /// Removes every expired record now, in bounded batches (one short transaction each).
    /// Returns how many were removed. It first moves every change waiting in the journal into
    /// the tables, so that afterwards the tables hold everything. The background sweeper
    /// removes expired records the same way on its interval, merging first only when a record
    /// waiting in the journal is due.
    ///
    /// # Errors
    /// [`Error::Storage`]; batches committed before the failure stay removed.
    pub fn sweep(&self) -> Result<usize> {
        self.observed("sweep", None, || {
            sweeper::sweep_all(self.engine(), true, None, || false)
        })
    }

    /// Removes at most one batch of expired records
    /// ([`sweep_batch_size`](crate::StoreBuilder::sweep_batch_size) of them) in one short
    /// transaction, and makes the removal durable: a bounded share of a sweep, for a caller
    /// that must not pay for a whole backlog at once (a short-lived process without the
    /// background sweeper). Returns how many were removed and whether more are due.
    ///
    /// # Errors
    /// [`Error::Storage`].
    ///
    /// ```
    /// # fn main() -> Result<(), dedupe_store::Error> {
    /// let store = dedupe_store::Store::builder().without_sweeper().in_memory()?;
    /// let (removed, more) = store.sweep_batch()?;
    /// assert_eq!((removed, more), (0, false));
    /// # Ok(())
    /// # }
    /// ```
    pub fn sweep_batch(&self) -> Result<(usize, bool)> {
        let engine = self.engine();
        let (removed, more) = engine.sweep_batch(engine.config.sweep_batch, false)?;
        if removed > 0 {
            engine.flush_if_dirty()?;
        }
        Ok((removed, more))
    }

    /// Counters since open and gauges read now. Counting expired records awaiting the sweeper
    /// reads their index entries, so this costs time in proportion to that backlog.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub fn stats(&self) -> Result<Stats> {
        self.observed("stats", None, || {
            let (records, due) = self.counts()?;
            let live = records.saturating_sub(due);
            // Counting claims in progress reads every record once per open: only for metrics.
            #[cfg(feature = "metrics")]
            crate::observe::key_gauges(live, due, self.engine().in_progress_keys()?);
            Ok(self.engine().counters.snapshot(live, due))
        })
    }

    fn counts(&self) -> Result<(u64, u64)> {
        let now = self.engine().now();
        self.engine()
            .storage
            .read_merged(&[], |txn, pending| scan::count(txn, pending, now))
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
    /// can), then every record's envelope and the expiry index against the records. Records
    /// that the journal has replaced since are counted, not decoded (`expire` may have
    /// replaced a damaged one); the journal's own entries were checked when the file was
    /// opened. Holds off every other call while it runs.
    ///
    /// # Errors
    /// [`Error::CorruptFile`] if redb cannot repair the file or the index disagrees with the
    /// records; [`Error::Corrupt`] naming the first damaged record; [`Error::Storage`].
    pub fn verify(&self) -> Result<VerifyReport> {
        self.observed("verify", None, || {
            let repaired = self.engine().storage.exclusive(|db, pending| {
                let clean = db.check_integrity()?;
                let txn = db.begin_read()?;
                scan::check_tables(&txn, pending)?;
                Ok(!clean)
            })?;
            // The journal's entries were checked when the file was opened; count them in.
            let (records, _) = self.counts()?;
            Ok(VerifyReport { records, repaired })
        })
    }

    /// Rewrites the file to give free space back to the operating system. Holds off every
    /// other call while it runs. Returns whether anything was compacted.
    ///
    /// # Errors
    /// [`Error::Storage`].
    pub fn compact(&self) -> Result<bool> {
        self.engine().storage.exclusive(|db, _| Ok(db.compact()?))
    }
}

impl Outcome for VerifyReport {
    fn outcome(&self, _op: &'static str) -> &'static str {
        if self.repaired { "repaired" } else { "ok" }
    }
}
