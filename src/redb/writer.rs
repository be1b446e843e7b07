//! The writer of one write transaction: the records a batch changes, the expiry index kept in
//! step with them, the journal entries that make the commit cheap, merges of the journal into
//! the tables, and sweeps of due records.

use std::collections::HashMap;

use parking_lot::RwLock;
use redb::{ReadableTable, Table};

use super::codec;
use super::scan::Loaded;
use super::scan::{due_range, load};
use super::schema::{EXPIRY, META, META_LAST_TOKEN, RECORDS};
use crate::error::Result;
use crate::record::Record;
use crate::redb::backend::BeforeSync;
use crate::redb::journal::{self, Changes, Merge, Overlay};

/// The records, the expiry index and the meta table, in one write transaction.
pub(super) struct Tables<'t> {
    pub(super) records: Table<'t, &'static [u8], &'static [u8]>,
    pub(super) expiry: Table<'t, (u64, &'static [u8]), ()>,
    pub(super) meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    pub(super) fn open(txn: &'t redb::WriteTransaction) -> Result<Tables<'t>> {
        Ok(Tables {
            records: txn.open_table(RECORDS)?,
            expiry: txn.open_table(EXPIRY)?,
            meta: txn.open_table(META)?,
        })
    }

    /// Makes `record` (or its absence) the key's record, keeping the expiry index in step.
    /// The record it replaces comes back from the insert or removal itself, so each key costs
    /// one descent of the records table, not two.
    pub(super) fn apply(&mut self, stored_key: &[u8], record: Option<&Record>) -> Result<()> {
        let old = match record {
            Some(record) => self
                .records
                .insert(stored_key, codec::encode(stored_key, record).as_slice())?,
            None => self.records.remove(stored_key)?,
        };
        let replaced =
            old.map(|old| codec::decode(stored_key, old.value()).map(|old| old.expires_at));
        let new_expires_at = record.map(|record| record.expires_at);
        match replaced {
            Some(Ok(old)) if Some(old) != new_expires_at => {
                self.expiry.remove((old, stored_key))?;
            }
            None | Some(Ok(_)) => {}
            // Only `expire` replaces a damaged record (other operations refuse it), and its
            // `expires_at` cannot be trusted: every index entry naming the key goes.
            Some(Err(_)) => self.forget_index_entries(stored_key)?,
        }
        if let Some(expires_at) = new_expires_at {
            self.expiry.insert((expires_at, stored_key), ())?;
        }
        Ok(())
    }

    /// Removes every index entry naming `stored_key`, found by a scan (for a record that does
    /// not decode, whose `expires_at` cannot be trusted).
    pub(super) fn forget_index_entries(&mut self, stored_key: &[u8]) -> Result<()> {
        let mut stale = Vec::new();
        for entry in self.expiry.iter()? {
            let (index_key, _) = entry?;
            let (expires_at, key) = index_key.value();
            if key == stored_key {
                stale.push(expires_at);
            }
        }
        for expires_at in stale {
            self.expiry.remove((expires_at, stored_key))?;
        }
        Ok(())
    }

    /// Moves a merge's changes into the tables and retires its journal entries.
    pub(super) fn merge(
        &mut self,
        journal: &mut Table<'_, u64, &'static [u8]>,
        work: &Merge,
        token: u64,
    ) -> Result<()> {
        for (stored_key, record) in &work.changes {
            self.apply(stored_key, record.as_ref())?;
        }
        journal.retain_in(..work.retire_below, |_, _| false)?;
        self.meta.insert(META_LAST_TOKEN, token)?;
        Ok(())
    }
}

/// One write transaction as the engine sees it: reads see the tables, the overlay and this
/// transaction's own changes; changes go to one journal entry, appended when it commits.
pub(crate) struct Writer<'t> {
    pub(super) tables: Tables<'t>,
    pub(super) journal: Table<'t, u64, &'static [u8]>,
    pub(super) overlay: &'t RwLock<Overlay>,
    /// This transaction's changes by key, and the keys in the order first changed.
    pub(super) pending: HashMap<Vec<u8>, Option<Record>>,
    pub(super) order: Vec<Vec<u8>>,
    /// The last fencing token issued, this transaction's included.
    pub(super) token: u64,
    /// What this transaction merged, for the overlay to forget once it commits.
    pub(super) merge: Option<Merge>,
    /// Runs just before the commit's fsync, if it has one.
    pub(super) before_sync: Option<BeforeSync>,
}

impl Writer<'_> {
    /// Has `hook` run just before this transaction's commit reaches its fsync, with how long
    /// recent fsyncs took. It does not run if the commit has no fsync or fails before it.
    pub(crate) fn before_sync(&mut self, hook: BeforeSync) {
        self.before_sync = Some(hook);
    }

    /// The key's record as this transaction sees it.
    pub(crate) fn load(&self, stored_key: &[u8]) -> Result<Loaded> {
        if let Some(record) = self.pending.get(stored_key) {
            return Ok(record.clone().map(Ok));
        }
        if let Some(record) = self.overlay.read().get(stored_key) {
            return Ok(record.map(Ok));
        }
        load(&self.tables.records, stored_key)
    }

    /// Makes `record` the key's record.
    pub(crate) fn put(&mut self, stored_key: &[u8], record: Record) {
        self.change(stored_key, Some(record));
    }

    /// Removes the key's record, damaged or not.
    pub(crate) fn delete(&mut self, stored_key: &[u8]) {
        self.change(stored_key, None);
    }

    pub(super) fn change(&mut self, stored_key: &[u8], record: Option<Record>) {
        if self.pending.insert(stored_key.to_vec(), record).is_none() {
            self.order.push(stored_key.to_vec());
        }
    }

    /// Moves the oldest changes waiting in the overlay (about `limit` keys; all if `None`) into
    /// the tables. Runs in a transaction of its own, before any change of its own.
    pub(crate) fn merge(&mut self, limit: Option<usize>) -> Result<()> {
        debug_assert!(self.pending.is_empty() && self.merge.is_none());
        let Some(work) = self.overlay.read().merge(limit) else {
            return Ok(());
        };
        self.tables.merge(&mut self.journal, &work, self.token)?;
        self.merge = Some(work);
        Ok(())
    }

    /// Removes up to `limit` records due at `now`. Returns how many were removed and whether
    /// more are due.
    ///
    /// It sweeps the tables. Records still in the journal reach the index only once merged,
    /// so a `thorough` sweep, or one that finds a due record waiting there, merges everything
    /// first. Otherwise it leaves the journal alone: removing a table record that the journal
    /// has since replaced is safe, since reads and the later merge both take the journal's
    /// version, and the merge finds no old record to unindex.
    ///
    /// The index entry is only a pointer: a record is removed only if it decodes and is itself
    /// due under the index entry's time. A damaged or stray index entry (one that names a live
    /// record, a damaged one, or none) is dropped and its record left alone, so that damage in
    /// the index can never delete a live completed record.
    pub(crate) fn sweep(
        &mut self,
        now: u64,
        limit: usize,
        thorough: bool,
    ) -> Result<(usize, usize, bool)> {
        if thorough || self.overlay.read().has_due(now) {
            self.merge(None)?;
        }
        let tables = &mut self.tables;
        let mut due = Vec::new();
        for entry in tables
            .expiry
            .range(due_range(now))?
            .take(limit.saturating_add(1))
        {
            let (index_key, _) = entry?;
            let (expires_at, key) = index_key.value();
            due.push((expires_at, key.to_vec()));
        }
        let more = due.len() > limit;
        due.truncate(limit);
        let mut removed = 0;
        let mut removed_in_progress = 0;
        for (expires_at, key) in &due {
            tables.expiry.remove((*expires_at, key.as_slice()))?;
            let due = match load(&tables.records, key)? {
                Some(Ok(record)) if record.expires_at == *expires_at && !record.is_live(now) => {
                    Some(record.is_in_progress())
                }
                _ => None,
            };
            if let Some(in_progress) = due {
                tables.records.remove(key.as_slice())?;
                removed += 1;
                removed_in_progress += usize::from(in_progress);
            }
        }
        Ok((removed, removed_in_progress, more))
    }

    /// The last fencing token issued.
    pub(crate) fn last_token(&self) -> u64 {
        self.token
    }

    pub(crate) fn set_last_token(&mut self, token: u64) {
        self.token = token;
    }

    /// Appends this transaction's changes to the journal, as entries of about a page each
    /// (a larger value would need contiguous pages, which fragments the file); returns each
    /// entry's sequence number and changes, for the overlay.
    pub(super) fn append(&mut self, first_token: u64) -> Result<Vec<(u64, Changes)>> {
        if self.order.is_empty() && self.token == first_token {
            return Ok(Vec::new());
        }
        let mut entries: Vec<(u64, Changes)> = Vec::new();
        let mut seq = self.overlay.read().next_seq();
        let mut current: Changes = Vec::new();
        let mut size = 0usize;
        for key in std::mem::take(&mut self.order) {
            let record = self.pending.remove(&key).flatten();
            let weight = journal::weight(&key, record.as_ref());
            if !current.is_empty() && size.saturating_add(weight) > journal::ENTRY_BYTES {
                entries.push((seq, std::mem::take(&mut current)));
                seq = seq.saturating_add(1);
                size = 0;
            }
            size = size.saturating_add(weight);
            current.push((key, record));
        }
        // Also when nothing but the token changed: the entry carries it.
        entries.push((seq, current));
        for (seq, changes) in &entries {
            self.journal
                .insert(*seq, journal::encode(self.token, changes).as_slice())?;
        }
        Ok(entries)
    }
}
