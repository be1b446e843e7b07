//! What the engine answers without the writer: one key's record, the live keys under a prefix,
//! counts, the whole-file check and compaction, and the waits of `claim_or_wait`. The store
//! above asks in its own terms (a namespace and a key); the stored key, its namespace tag and
//! the journal's overlay stay down here.

use std::path::Path;
use std::time::Instant;

use redb::ReadableDatabase;

use super::schema::RECORDS;
use super::{Engine, codec, corrupt, scan};
use crate::error::Result;
use crate::key::Key;
use crate::record::Record;
use crate::rules::Namespace;

#[cfg(feature = "testing")]
use crate::record::TaggedRecord;

/// The caller's key of a stored key: the stored key without its namespace tag.
fn caller_key(stored_key: &[u8]) -> Key {
    Key::new(stored_key.get(1..).unwrap_or_default())
}

impl Engine {
    /// The random id of the store's file; tickets carry it.
    pub(crate) fn store_id(&self) -> u64 {
        self.storage.store_id()
    }

    /// The file the store is on; `None` in memory or on a caller's backend.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.storage.path()
    }

    /// The record of `key` in `namespace`, expired or not; `Error::Corrupt` if it is damaged.
    pub(crate) fn get(&self, namespace: Namespace, key: &Key) -> Result<Option<Record>> {
        match self.load(&scan::stored_key(namespace.tag(), key.as_bytes()))? {
            None => Ok(None),
            Some(Ok(record)) => Ok(Some(record)),
            Some(Err(err)) => Err(corrupt(key, err.0)),
        }
    }

    /// The record of `key` in `namespace` if it is live now.
    pub(crate) fn get_live(&self, namespace: Namespace, key: &Key) -> Result<Option<Record>> {
        let record = self.get(namespace, key)?;
        let now = self.now();
        Ok(record.filter(|record| record.is_live(now)))
    }

    /// The idempotency records whose keys start with `prefix` and that are live now.
    pub(crate) fn list_live(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Key, Record)>> {
        self.list(prefix, limit, self.now())
    }

    /// The idempotency records whose keys start with `prefix` and that are live at `now`, in
    /// key order, at most `limit` of them.
    pub(crate) fn list(&self, prefix: &[u8], limit: usize, now: u64) -> Result<Vec<(Key, Record)>> {
        let start = scan::stored_key(Namespace::Idempotency.tag(), prefix);
        self.storage.read_merged(&start, |txn, pending| {
            let records = txn.open_table(RECORDS)?;
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
            let mut live = Vec::new();
            // Both in key order: walk them together, the overlay's record winning a tie.
            while live.len() < limit {
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
                    let record = codec::decode(&stored_key, &value)
                        .map_err(|err| corrupt(&caller_key(&stored_key), err.0))?;
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
                {
                    live.push((caller_key(&stored_key), record));
                }
            }
            Ok(live)
        })
    }

    /// How many records the store holds, and how many of them are due for the sweeper at
    /// `now`. Counting the due ones reads their index entries.
    pub(crate) fn counts(&self, now: u64) -> Result<(u64, u64)> {
        self.storage
            .read_merged(&[], |txn, pending| scan::count(txn, pending, now))
    }

    /// Whether any record is live at `now`: the records held outnumber those due.
    pub(crate) fn any_live(&self, now: u64) -> Result<bool> {
        let (records, due) = self.counts(now)?;
        Ok(records > due)
    }

    /// Checks the whole file (redb's integrity check, repairing what it can, then every record
    /// against the expiry index), holding off every other call. Returns the records held and
    /// whether redb repaired anything.
    pub(crate) fn verify(&self) -> Result<(u64, bool)> {
        let repaired = self.storage.exclusive(|db, pending| {
            let clean = db.check_integrity()?;
            let txn = db.begin_read()?;
            scan::check_tables(&txn, pending)?;
            Ok(!clean)
        })?;
        // The journal's entries were checked when the file was opened; count them in.
        let (records, _) = self.counts(self.now())?;
        Ok((records, repaired))
    }

    /// Rewrites the file to give free space back; whether anything was compacted.
    pub(crate) fn compact(&self) -> Result<bool> {
        self.storage.exclusive(|db, _| Ok(db.compact()?))
    }

    /// Closes the file, and wakes every `claim_or_wait` so that it sees the store closed.
    pub(crate) fn close(&self) -> Result<()> {
        let closed = self.storage.close();
        self.events.changed_all();
        closed
    }

    /// A number that changes whenever the idempotency key `key` may have changed.
    pub(crate) fn generation(&self, key: &Key) -> u64 {
        self.events.generation(&scan::stored_key(
            Namespace::Idempotency.tag(),
            key.as_bytes(),
        ))
    }

    /// Waits until the idempotency key `key` changes after `seen` (its [`generation`]
    /// then), or until `until`; whether it changed.
    ///
    /// [`generation`]: Self::generation
    pub(crate) fn wait_for_change(&self, key: &Key, seen: u64, until: Instant) -> bool {
        let stored_key = scan::stored_key(Namespace::Idempotency.tag(), key.as_bytes());
        self.events.wait(&stored_key, seen, until)
    }

    /// A future that completes at the next change of the idempotency key `key` (or another
    /// key of its notification shard): create it before looking at the key.
    #[cfg(feature = "http")]
    pub(crate) fn key_changed(&self, key: &Key) -> tokio::sync::futures::Notified<'_> {
        let stored_key = scan::stored_key(Namespace::Idempotency.tag(), key.as_bytes());
        self.events.changed_async(&stored_key)
    }

    /// Every record the store holds, expired ones too, by namespace and key, and the last
    /// fencing token issued: what the file holds, read past the rules, for the tests.
    #[cfg(feature = "testing")]
    pub(crate) fn every_record(&self) -> Result<(Vec<TaggedRecord>, u64)> {
        use redb::ReadableTable;
        let records = self.storage.read_merged(&[], |txn, pending| {
            let table = txn.open_table(RECORDS)?;
            let mut latest = std::collections::BTreeMap::new();
            for row in table.iter()? {
                let (stored_key, value) = row?;
                let record = codec::decode(stored_key.value(), value.value())
                    .map_err(|err| corrupt(&caller_key(stored_key.value()), err.0))?;
                latest.insert(stored_key.value().to_vec(), Some(record));
            }
            // The journal's changes not yet merged into the table take precedence.
            latest.extend(pending.clone());
            Ok(latest
                .into_iter()
                .filter_map(|(stored_key, record)| {
                    let tag = *stored_key.first()?;
                    Some((tag, caller_key(&stored_key), record?))
                })
                .collect())
        })?;
        Ok((records, self.storage.last_token()))
    }
}
