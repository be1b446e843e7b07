//! The operator's side of a [`Store`]: listing keys, counting, sweeping, verifying and
//! compacting the file.

use super::Store;
use crate::entry::Entry;
use crate::error::Result;
use crate::observe::Outcome;
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
    /// [`Error::Corrupt`](crate::Error::Corrupt) for a damaged record in the range; [`Error::Storage`](crate::Error::Storage).
    pub fn list(&self, prefix: impl AsRef<[u8]>, limit: usize) -> Result<Vec<Entry>> {
        self.observed("list", None, || self.list_inner(prefix.as_ref(), limit))
    }

    fn list_inner(&self, prefix: &[u8], limit: usize) -> Result<Vec<Entry>> {
        Ok(self
            .engine()
            .list(prefix, limit)?
            .into_iter()
            .filter_map(|(key, record)| Entry::from_record(key, record))
            .collect())
    }

    /// Removes every expired record now, in bounded batches (one short transaction each).
    /// Returns how many were removed. It first moves every change waiting in the journal into
    /// the tables, so that afterwards the tables hold everything. The background sweeper
    /// removes expired records the same way on its interval, merging first only when a record
    /// waiting in the journal is due.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage); batches committed before the failure stay removed.
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
    /// [`Error::Storage`](crate::Error::Storage).
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
        let (removed, more) = engine.sweep_batch(engine.config().sweep_batch, false)?;
        if removed > 0 {
            engine.flush_if_dirty()?;
        }
        Ok((removed, more))
    }

    /// Counters since open and gauges read now. Counting expired records awaiting the sweeper
    /// reads their index entries, so this costs time in proportion to that backlog; over
    /// PostgreSQL the count reads every row of the table (`docs/POSTGRES.md`).
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    pub fn stats(&self) -> Result<Stats> {
        self.observed("stats", None, || {
            let (records, due) = self.counts()?;
            let live = records.saturating_sub(due);
            // Counting claims in progress reads every record once per open: only for metrics.
            #[cfg(feature = "metrics")]
            crate::observe::key_gauges(live, due, self.engine().in_progress_keys()?);
            Ok(self.engine().counters().snapshot(live, due))
        })
    }

    fn counts(&self) -> Result<(u64, u64)> {
        self.engine().counts(self.engine().now())
    }

    /// The number of live keys (records not yet expired). Costs what [`stats`](Self::stats)
    /// costs.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    pub fn len(&self) -> Result<u64> {
        let (records, due) = self.counts()?;
        Ok(records.saturating_sub(due))
    }

    /// Whether no key is live. Over PostgreSQL one probe of the expiry index, where
    /// [`len`](Self::len) counts every row.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    pub fn is_empty(&self) -> Result<bool> {
        let engine = self.engine();
        Ok(!engine.any_live(engine.now())?)
    }

    /// Checks the whole file: redb's integrity check (every page checksum, repairing what it
    /// can), then every record's envelope and the expiry index against the records. Records
    /// that the journal has replaced since are counted, not decoded (`expire` may have
    /// replaced a damaged one); the journal's own entries were checked when the file was
    /// opened. Holds off every other call while it runs.
    ///
    /// # Errors
    /// [`Error::CorruptFile`](crate::Error::CorruptFile) if redb cannot repair the file or the index disagrees with the
    /// records; [`Error::Corrupt`](crate::Error::Corrupt) naming the first damaged record; [`Error::Storage`](crate::Error::Storage).
    pub fn verify(&self) -> Result<VerifyReport> {
        self.observed("verify", None, || {
            let (records, repaired) = self.engine().verify()?;
            Ok(VerifyReport { records, repaired })
        })
    }

    /// Rewrites the file to give free space back to the operating system. Holds off every
    /// other call while it runs. Returns whether anything was compacted.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    pub fn compact(&self) -> Result<bool> {
        self.engine().compact()
    }
}

impl Outcome for VerifyReport {
    fn outcome(&self, _op: &'static str) -> &'static str {
        if self.repaired { "repaired" } else { "ok" }
    }
}
