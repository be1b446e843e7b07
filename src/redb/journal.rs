//! The journal: how a group commit stays a few page writes however many keys it carries.
//!
//! A commit of scattered keys into the records table rewrites one B-tree leaf per key, and the
//! fsync has to write all of them: that, not the fsync itself, bounded durable claims per
//! second. So a batch's changes go to the journal instead, as entries of about half a page
//! appended under the next sequence numbers (the tail leaf, whatever the keys), and into an
//! in-memory overlay that every read consults before the tables. Merges move the overlay into
//! the records and expiry tables later, a few hundred keys at a time in key order, so that
//! each leaf is written once for all the keys landing in it. A merge deletes the journal
//! entries it covered in the same transaction.
//!
//! On open, whatever the journal holds (the file was not closed cleanly, or recently) is read
//! into the overlay in entry order, with no write: the next merge moves it. A reopen after a
//! failed commit does the same, since the file, not the overlay, is then the truth.
//!
//! Only writes merge. Once a merge is due, the next durable batch carries one chunk in its own
//! transaction, ahead of its writes, so the merge shares the batch's fsyncs. Should merging
//! fall behind (one large atomic batch, or `Durability::Periodic`, whose batches skip the
//! fsync and so carry no merge), the writer that finds it merges the backlog down in commits
//! of their own, one chunk each, after its own commit. `Store::sweep` merges everything
//! first; the background sweeper only when a record waiting here is due (it sweeps the
//! tables, and records here reach the expiry index once merged). Readers that scan the
//! tables (`list`, `stats`, `len`, `verify`) apply a snapshot of the overlay to what they
//! read instead, and `close` leaves the journal as it is, so that no read and no close writes
//! to a file that may be damaged.
//!
//! An entry is `[crc32: u32 LE][token: u64 LE][count: u32 LE]` followed by `count` changes,
//! each `[key length: u32 LE][stored key][value length: u32 LE][record envelope]`, where a
//! value length of `u32::MAX` (and no envelope) removes the key. The CRC covers everything
//! after it; each envelope also carries its own.

use std::collections::{HashMap, VecDeque};

use super::codec;
use crate::record::{Record, RecordState};

/// The value length that marks a removal.
const REMOVED: u32 = u32::MAX;

/// Keys waiting in the overlay that make a merge due: the next durable batch carries one.
pub(crate) const MERGE_KEYS: usize = 1024;
/// Bytes of records waiting in the overlay that make a merge due.
pub(crate) const MERGE_BYTES: usize = 2 << 20;
/// Keys (or, times the same factor, bytes) waiting that show merging behind: the writer that
/// finds it merges the backlog down in commits of their own.
pub(crate) const BEHIND_FACTOR: usize = 4;
/// The most keys one merge moves, so that it holds the writer briefly. Larger chunks write each
/// leaf for more keys, but the claims of the batch that carries a merge wait for it: 512 keeps
/// the p99 at 32 threads under 5 ms, which 1,024 did not (`BENCHMARKS.md`).
pub(crate) const MERGE_CHUNK: usize = 512;
/// The most bytes of records one merge moves (unless one record alone is larger).
pub(crate) const MERGE_CHUNK_BYTES: usize = 2 << 20;

/// How much waits in the overlay, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Backlog {
    /// Less than a merge's worth.
    Small,
    /// A merge is due.
    Due,
    /// Merging has fallen behind the writes.
    Behind,
}

/// The size a journal entry is kept under (unless one change alone is larger): about half a
/// page, so that an entry never needs a run of contiguous pages.
pub(crate) const ENTRY_BYTES: usize = 2048;

/// Keys' latest records from the overlay, in key order; `None` if removed.
pub(crate) type Pending = std::collections::BTreeMap<Vec<u8>, Option<Record>>;

/// One batch's changes: each stored key's record after the batch, `None` if removed.
pub(crate) type Changes = Vec<(Vec<u8>, Option<Record>)>;

/// Encodes a journal entry.
pub(crate) fn encode(token: u64, changes: &Changes) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    out.extend_from_slice(&token.to_le_bytes());
    out.extend_from_slice(&len_u32(changes.len()).to_le_bytes());
    for (key, record) in changes {
        out.extend_from_slice(&len_u32(key.len()).to_le_bytes());
        out.extend_from_slice(key);
        match record {
            Some(record) => {
                let envelope = codec::encode(key, record);
                out.extend_from_slice(&len_u32(envelope.len()).to_le_bytes());
                out.extend_from_slice(&envelope);
            }
            None => out.extend_from_slice(&REMOVED.to_le_bytes()),
        }
    }
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Keys are at most a few KiB and records at most the configured response limit plus a little,
/// far below 4 GiB; saturating keeps a length that cannot be written from wrapping around.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(REMOVED - 1)
}

/// Decodes a journal entry into its fencing token and changes; the reason if it is damaged.
pub(crate) fn decode(bytes: &[u8]) -> Result<(u64, Changes), String> {
    let (crc, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or("the entry is shorter than its checksum")?;
    if u32::from_le_bytes(*crc) != crc32fast::hash(rest) {
        return Err("the entry fails its checksum".to_string());
    }
    let mut reader = Reader(rest);
    let token = u64::from_le_bytes(reader.array()?);
    let count = u32::from_le_bytes(reader.array()?);
    let mut changes = Vec::new();
    for _ in 0..count {
        let key_len = u32::from_le_bytes(reader.array()?);
        let key = reader.take(key_len)?.to_vec();
        let value_len = u32::from_le_bytes(reader.array()?);
        let record = if value_len == REMOVED {
            None
        } else {
            let envelope = reader.take(value_len)?;
            Some(codec::decode(&key, envelope).map_err(|err| err.0)?)
        };
        changes.push((key, record));
    }
    if !reader.0.is_empty() {
        return Err("the entry has bytes after its last change".to_string());
    }
    Ok((token, changes))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: u32) -> Result<&'a [u8], String> {
        let len = usize::try_from(len).map_err(|_| "a length does not fit".to_string())?;
        if len > self.0.len() {
            return Err("the entry is cut short".to_string());
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (head, tail) = self
            .0
            .split_first_chunk::<N>()
            .ok_or("the entry is cut short")?;
        self.0 = tail;
        Ok(*head)
    }
}

/// The changes committed to the journal and not yet merged into the tables.
#[derive(Default)]
pub(crate) struct Overlay {
    /// Each key's latest record; `None` if it was removed.
    latest: HashMap<Vec<u8>, Option<Record>>,
    /// The journal entries not yet merged, oldest first: sequence number and keys.
    entries: VecDeque<(u64, Vec<Vec<u8>>)>,
    /// The sequence number of the next entry.
    next_seq: u64,
    /// Bytes of the records in `latest`, roughly.
    bytes: usize,
}

/// One merge's work: the journal entries it retires and each key's latest record.
pub(crate) struct Merge {
    /// Entries with sequence numbers below this are retired.
    pub retire_below: u64,
    pub changes: Changes,
}

impl Overlay {
    /// The key's latest committed record if the overlay has one: `Some(None)` if removed.
    pub(crate) fn get(&self, stored_key: &[u8]) -> Option<Option<Record>> {
        self.latest.get(stored_key).cloned()
    }

    /// The latest record of every key starting with `prefix`, in key order.
    pub(crate) fn snapshot(&self, prefix: &[u8]) -> Pending {
        self.latest
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(key, record)| (key.clone(), record.clone()))
            .collect()
    }

    /// The sequence number the next journal entry takes.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Takes in a batch's changes once its journal entry `seq` has committed.
    pub(crate) fn committed(&mut self, seq: u64, changes: Changes) {
        let mut keys = Vec::with_capacity(changes.len());
        for (key, record) in changes {
            self.bytes = self.bytes.saturating_add(weight(&key, record.as_ref()));
            if let Some(old) = self.latest.insert(key.clone(), record) {
                self.bytes = self.bytes.saturating_sub(weight(&key, old.as_ref()));
            }
            keys.push(key);
        }
        self.entries.push_back((seq, keys));
        self.next_seq = seq.saturating_add(1);
    }

    /// How much waits for a merge.
    pub(crate) fn backlog(&self) -> Backlog {
        let (keys, bytes) = (self.latest.len(), self.bytes);
        if keys >= MERGE_KEYS * BEHIND_FACTOR || bytes >= MERGE_BYTES * BEHIND_FACTOR {
            Backlog::Behind
        } else if keys >= MERGE_KEYS || bytes >= MERGE_BYTES {
            Backlog::Due
        } else {
            Backlog::Small
        }
    }

    /// How many keys have changes here.
    pub(crate) fn keys(&self) -> usize {
        self.latest.len()
    }

    /// Whether a record here is due at `now` (a sweep would miss it until merged).
    pub(crate) fn has_due(&self, now: u64) -> bool {
        self.latest
            .values()
            .any(|record| record.as_ref().is_some_and(|record| !record.is_live(now)))
    }

    /// Whether any key has a record here (entries may remain whose keys were all merged).
    pub(crate) fn has_keys(&self) -> bool {
        !self.latest.is_empty()
    }

    /// The oldest entries holding about `limit` keys (all of them if `None`) and at most about
    /// [`MERGE_CHUNK_BYTES`] with a limit, with the latest record of every key they name.
    /// `None` if nothing waits.
    pub(crate) fn merge(&self, limit: Option<usize>) -> Option<Merge> {
        let mut changes = Vec::new();
        let mut bytes = 0usize;
        let mut seen = std::collections::HashSet::new();
        let mut retire_below = None;
        for (seq, keys) in &self.entries {
            if let Some(limit) = limit
                && !changes.is_empty()
                && (changes.len() >= limit || bytes >= MERGE_CHUNK_BYTES)
            {
                break;
            }
            for key in keys {
                if let Some(record) = self.latest.get(key)
                    && seen.insert(key.as_slice())
                {
                    bytes = bytes.saturating_add(weight(key, record.as_ref()));
                    changes.push((key.clone(), record.clone()));
                }
            }
            retire_below = Some(seq.saturating_add(1));
        }
        // Adjacent keys land in the same leaves: applying them in order writes each leaf once.
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        retire_below.map(|retire_below| Merge {
            retire_below,
            changes,
        })
    }

    /// Forgets what a committed merge moved into the tables.
    pub(crate) fn merged(&mut self, done: &Merge) {
        while let Some((seq, _)) = self.entries.front()
            && *seq < done.retire_below
        {
            self.entries.pop_front();
        }
        for (key, _) in &done.changes {
            if let Some(old) = self.latest.remove(key) {
                self.bytes = self.bytes.saturating_sub(weight(key, old.as_ref()));
            }
        }
    }
}

/// Roughly the bytes a change takes in memory and in a journal entry.
pub(crate) fn weight(key: &[u8], record: Option<&Record>) -> usize {
    let payload = match record.map(|record| &record.state) {
        Some(RecordState::Completed { response, .. }) => response.0.len(),
        Some(RecordState::InProgress {
            checkpoint: Some(checkpoint),
            ..
        }) => checkpoint
            .step
            .len()
            .saturating_add(checkpoint.state.0.len()),
        _ => 0,
    };
    key.len().saturating_add(64).saturating_add(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ByteString;

    fn record(expires_at: u64) -> Record {
        Record {
            fencing_token: 3,
            attempt: 1,
            fingerprint: None,
            expires_at,
            state: RecordState::Completed {
                completed_at: 1,
                response: ByteString(vec![1, 2, 3]),
            },
        }
    }

    #[test]
    fn entries_round_trip() {
        let changes = vec![
            (b"\x01alpha".to_vec(), Some(record(10))),
            (b"\x01beta".to_vec(), None),
        ];
        let bytes = encode(42, &changes);
        let (token, decoded) = decode(&bytes).expect("decodes");
        assert_eq!(token, 42);
        assert_eq!(decoded, changes);
    }

    #[test]
    fn every_single_byte_flip_and_truncation_is_caught() {
        let changes = vec![(b"\x01alpha".to_vec(), Some(record(10)))];
        let bytes = encode(7, &changes);
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x40;
            assert!(decode(&flipped).is_err(), "flip at {i} was not caught");
            assert!(decode(&bytes[..i]).is_err(), "cut at {i} was not caught");
        }
    }

    #[test]
    fn the_byte_count_returns_to_zero_once_everything_is_merged() {
        let mut overlay = Overlay::default();
        // The same keys changed again and again, as claims then completions are.
        for seq in 0..100u64 {
            let key = format!("key-{}", seq % 7).into_bytes();
            let change = if seq % 5 == 0 {
                None
            } else {
                Some(record(seq))
            };
            overlay.committed(seq, vec![(key, change)]);
        }
        let expected: usize = overlay
            .latest
            .iter()
            .map(|(key, record)| weight(key, record.as_ref()))
            .sum();
        assert_eq!(overlay.bytes, expected);
        let all = overlay.merge(None).expect("work waits");
        overlay.merged(&all);
        assert_eq!(overlay.bytes, 0);
        assert_eq!(overlay.backlog(), Backlog::Small);
    }

    #[test]
    fn a_merge_takes_the_latest_record_and_retires_its_entries() {
        let mut overlay = Overlay::default();
        overlay.committed(0, vec![(b"a".to_vec(), Some(record(1)))]);
        overlay.committed(1, vec![(b"b".to_vec(), Some(record(2)))]);
        overlay.committed(2, vec![(b"a".to_vec(), None)]);
        let first = overlay.merge(Some(1)).expect("work waits");
        assert_eq!(first.retire_below, 1);
        assert_eq!(first.changes, vec![(b"a".to_vec(), None)]);
        overlay.merged(&first);
        assert_eq!(overlay.get(b"a"), None);
        assert_eq!(overlay.get(b"b"), Some(Some(record(2))));
        let rest = overlay.merge(None).expect("work waits");
        assert_eq!(rest.retire_below, 3);
        assert_eq!(rest.changes, vec![(b"b".to_vec(), Some(record(2)))]);
        overlay.merged(&rest);
        assert!(!overlay.has_keys());
        assert!(overlay.merge(None).is_none());
        assert_eq!(overlay.next_seq(), 3);
    }
}
