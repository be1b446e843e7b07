//! Reads over the tables: stored keys and their namespace tag, loading one record, the due
//! range of the expiry index, counts, and the whole-file check.

use std::ops::Bound;

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};

use super::codec::{self, DecodeError};
use super::schema::{EXPIRY, RECORDS};
use crate::error::{Error, Result};
use crate::record::Record;
use crate::redb::journal::Pending;

/// One key's record as loaded: absent, decoded, or damaged.
pub(crate) type Loaded = Option<std::result::Result<Record, DecodeError>>;

/// The stored key: the namespace tag, then the caller's key.
pub(crate) fn stored_key(tag: u8, key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(key.len() + 1);
    stored.push(tag);
    stored.extend_from_slice(key);
    stored
}

/// Reads one record.
pub(crate) fn load(
    records: &impl ReadableTable<&'static [u8], &'static [u8]>,
    stored_key: &[u8],
) -> Result<Loaded> {
    Ok(records
        .get(stored_key)?
        .map(|bytes| codec::decode(stored_key, bytes.value())))
}

/// An expiry-index key: `(expires_at, stored key)`.
pub(crate) type IndexKey = (u64, &'static [u8]);

/// The range of expiry-index entries due at `now` (`expires_at <= now`).
pub(crate) fn due_range(now: u64) -> (Bound<IndexKey>, Bound<IndexKey>) {
    match now.checked_add(1) {
        Some(end) => (Bound::Unbounded, Bound::Excluded((end, &[][..]))),
        None => (Bound::Unbounded, Bound::Unbounded),
    }
}

/// Counts of records and of those due at `now`, for `stats()` and `len()`: the tables', with
/// the overlay's changes applied.
pub(crate) fn count(txn: &ReadTransaction, pending: &Pending, now: u64) -> Result<(u64, u64)> {
    let table = txn.open_table(RECORDS)?;
    let mut records = table.len()?;
    let expiry = txn.open_table(EXPIRY)?;
    let mut due = 0u64;
    for entry in expiry.range(due_range(now))? {
        entry?;
        due += 1;
    }
    for (stored_key, latest) in pending {
        // Take the table's record out of the counts (a damaged one counts as not due, as its
        // time cannot be trusted), then put the latest one in.
        match load(&table, stored_key)? {
            Some(Ok(old)) => {
                records = records.saturating_sub(1);
                if !old.is_live(now) {
                    due = due.saturating_sub(1);
                }
            }
            Some(Err(_)) => records = records.saturating_sub(1),
            None => {}
        }
        if let Some(record) = latest {
            records += 1;
            if !record.is_live(now) {
                due += 1;
            }
        }
    }
    Ok((records, due))
}

/// How many records are claims in progress, the journal's pending records counted in place
/// of the tables' (a damaged record counts as not in progress). Reads every record.
pub(crate) fn count_in_progress(txn: &ReadTransaction, pending: &Pending) -> Result<u64> {
    let table = txn.open_table(RECORDS)?;
    let mut in_progress = 0u64;
    for row in table.iter()? {
        let (key, value) = row?;
        if pending.contains_key(key.value()) {
            continue;
        }
        if crate::redb::codec::decode(key.value(), value.value()).is_ok_and(|r| r.is_in_progress())
        {
            in_progress += 1;
        }
    }
    for latest in pending.values() {
        if latest.as_ref().is_some_and(Record::is_in_progress) {
            in_progress += 1;
        }
    }
    Ok(in_progress)
}

/// Checks that every record decodes and that records and expiry index agree.
/// A record the journal has replaced since (`pending`) is counted but not decoded: `expire`
/// may have replaced it because it was damaged.
pub(crate) fn check_tables(txn: &ReadTransaction, pending: &Pending) -> Result<(u64, u64)> {
    let records = txn.open_table(RECORDS)?;
    let expiry = txn.open_table(EXPIRY)?;
    let mut record_count = 0u64;
    for entry in records.iter()? {
        let (key, value) = entry?;
        let stored_key = key.value();
        if pending.contains_key(stored_key) {
            record_count += 1;
            continue;
        }
        let record = codec::decode(stored_key, value.value()).map_err(|err| Error::Corrupt {
            key: crate::Key::new(stored_key.get(1..).unwrap_or_default()),
            reason: err.0,
        })?;
        if expiry.get((record.expires_at, stored_key))?.is_none() {
            return Err(Error::CorruptFile {
                reason: format!(
                    "the record for key {} has no expiry index entry",
                    crate::Key::new(stored_key.get(1..).unwrap_or_default())
                ),
            });
        }
        record_count += 1;
    }
    let index_count = expiry.len()?;
    if index_count != record_count {
        return Err(Error::CorruptFile {
            reason: format!(
                "the expiry index has {index_count} entries for {record_count} records"
            ),
        });
    }
    Ok((record_count, index_count))
}
