//! What the PostgreSQL engine reads without a commit: the live keys under a prefix, counts,
//! and every row (the whole-store check and the tests).

use tokio_postgres::types::Type;

use super::commit::Shared;
use super::engine::Engine;
use super::error::query_error;
use super::row::{IN_PROGRESS, Loaded, ns};
use super::session::Session;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::record::Record;
use crate::rules::Namespace;

impl Engine {
    /// The idempotency records whose keys start with `prefix` and that are live now (by the
    /// builder's clock if it has one, else the server's, read by the same statement), in key
    /// order, at most `limit` of them.
    pub(crate) fn list_live(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Key, Record)>> {
        let prefix = prefix.to_vec();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let now = self.test_clock_now();
        self.call(async move |shared: &Shared, client: &mut Session| {
            let idempotency = ns(Namespace::Idempotency);
            // Keys from the prefix up to the first key past it; no bound when nothing is.
            let end = successor(&prefix);
            // Unprepared: planned with the bounds given, as a range of the key index.
            let rows = client
                .query_typed(
                    &shared.sql.list,
                    &[
                        (&idempotency, Type::INT2),
                        (&prefix, Type::BYTEA),
                        (&end, Type::BYTEA),
                        (&now, Type::INT8),
                        (&limit, Type::INT8),
                    ],
                )
                .await;
            let rows = rows.map_err(|err| query_error("list keys", err))?;
            let mut listed = Vec::with_capacity(rows.len());
            for row in &rows {
                let key: Vec<u8> = row
                    .try_get("key")
                    .map_err(|err| query_error("list keys", err))?;
                let key = Key::new(key);
                match Loaded::of(row) {
                    Loaded::Found(record) => listed.push((key, record)),
                    Loaded::Damaged(reason) => return Err(Error::Corrupt { key, reason }),
                    Loaded::Absent => {}
                }
            }
            Ok(listed)
        })
    }

    pub(crate) fn counts(&self, now: u64) -> Result<(u64, u64)> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        self.call(async move |shared: &Shared, client: &mut Session| {
            let row = client
                .query_typed_one(&shared.sql.counts, &[(&now, Type::INT8)])
                .await
                .map_err(|err| query_error("count keys", err))?;
            let held: i64 = row
                .try_get(0)
                .map_err(|err| query_error("count keys", err))?;
            let due: i64 = row
                .try_get(1)
                .map_err(|err| query_error("count keys", err))?;
            Ok((held.max(0) as u64, due.max(0) as u64))
        })
    }

    /// Whether any record is live at `now`: one probe of the `expires_at` index, where a
    /// count would read every row.
    pub(crate) fn any_live(&self, now: u64) -> Result<bool> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        self.call(async move |shared: &Shared, client: &mut Session| {
            let row = client
                .query_typed_one(&shared.sql.any_live, &[(&now, Type::INT8)])
                .await
                .map_err(|err| query_error("look for a live key", err))?;
            row.try_get(0)
                .map_err(|err| query_error("look for a live key", err))
        })
    }

    pub(crate) fn in_progress_keys(&self) -> Result<u64> {
        self.call(async move |shared: &Shared, client: &mut Session| {
            let row = client
                .query_typed_one(&shared.sql.count_state, &[(&IN_PROGRESS, Type::INT2)])
                .await
                .map_err(|err| query_error("count claims in progress", err))?;
            let held: i64 = row
                .try_get(0)
                .map_err(|err| query_error("count claims in progress", err))?;
            Ok(held.max(0) as u64)
        })
    }

    /// Reads every row and checks that it is a record; answers how many rows there are. The
    /// database checks its own pages; nothing is repaired here.
    pub(crate) fn verify(&self) -> Result<(u64, bool)> {
        let every = self.every_row()?;
        for (_, key, loaded) in &every.0 {
            if let Loaded::Damaged(reason) = loaded {
                return Err(Error::Corrupt {
                    key: key.clone(),
                    reason: reason.clone(),
                });
            }
        }
        Ok((every.0.len() as u64, false))
    }

    /// Every row, with its namespace tag and key, and the last fencing token issued.
    fn every_row(&self) -> Result<(Vec<TaggedRow>, u64)> {
        self.call(async move |shared: &Shared, client: &mut Session| {
            let rows = client
                .query_typed(&shared.sql.every_row, &[])
                .await
                .map_err(|err| query_error("read every key", err))?;
            let mut every = Vec::with_capacity(rows.len());
            for row in &rows {
                let tag: i16 = row
                    .try_get("ns")
                    .map_err(|err| query_error("read every key", err))?;
                let key: Vec<u8> = row
                    .try_get("key")
                    .map_err(|err| query_error("read every key", err))?;
                every.push((
                    u8::try_from(tag).unwrap_or(0),
                    Key::new(key),
                    Loaded::of(row),
                ));
            }
            let last: i64 = client
                .query_typed_one(&shared.sql.last_token, &[])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|err| query_error("read the last fencing token", err))?;
            Ok((every, last.max(0) as u64))
        })
    }

    /// Every record with its namespace tag, and the last fencing token issued, for the tests.
    #[cfg(feature = "testing")]
    pub(crate) fn every_record(&self) -> Result<(Vec<crate::record::TaggedRecord>, u64)> {
        let (every, last) = self.every_row()?;
        let mut records = Vec::with_capacity(every.len());
        for (tag, key, loaded) in every {
            match loaded {
                Loaded::Found(record) => records.push((tag, key, record)),
                Loaded::Damaged(reason) => return Err(Error::Corrupt { key, reason }),
                Loaded::Absent => {}
            }
        }
        Ok((records, last))
    }
}

/// The smallest byte string above every string that starts with `prefix`; `None` when there is
/// none (an empty prefix, or one of all 0xFF bytes).
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A row with its namespace tag and key.
type TaggedRow = (u8, Key, Loaded);

#[cfg(test)]
mod tests {
    use super::successor;

    #[test]
    fn the_successor_of_a_prefix_bounds_its_range() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(successor(b"\xff\xff"), None);
        assert_eq!(successor(b""), None);
    }
}
