//! A plain model of the store's semantics, written from `docs/SEMANTICS.md` and nothing else:
//! a sorted map of records, a sorted map of sequence marks, a token counter. The store's own
//! rules live in `crate::rules`; this is the independent second opinion every model test (the
//! state machine, the scenario runner and its fuzz targets, the linearizability check of group
//! commit) checks the store against.
//!
//! It has two levels. [`apply`] is one operation on one key's record at one instant: the answer
//! and the record after it. It knows nothing of other keys, so a per-key checker can search
//! orders of concurrent calls with it. [`Model`] is the whole store built on it: it keeps the
//! records and issues the fencing tokens.

mod record;
mod rules;

use std::collections::BTreeMap;

use crate::{Checkpoint, Claim, Entry, Key, Outcome, SeqCheck, Ticket};

pub use record::{Op, Rec, RecCheckpoint, RecState, Refusal, Reply, SeqMark};
pub use rules::{advance, apply};

/// The model store: every record and mark (expired ones too, until swept), and the last token
/// issued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Records by caller key.
    pub records: BTreeMap<Vec<u8>, Rec>,
    /// Sequence marks by stream, a key space of their own (SEMANTICS.md §1).
    pub marks: BTreeMap<Vec<u8>, SeqMark>,
    /// The last fencing token issued.
    pub last_token: u64,
}

impl Model {
    /// The key's record if it is live at `now`.
    pub fn live(&self, key: &[u8], now: u64) -> Option<&Rec> {
        self.records.get(key).filter(|rec| rec.is_live(now))
    }

    /// The entry `Store::get` must return.
    pub fn entry(&self, key: &[u8], now: u64) -> Option<Entry> {
        self.live(key, now).map(|rec| rec.to_entry(key))
    }

    /// Every live entry in key order, as `Store::list(b"", ..)` must return them.
    pub fn entries(&self, now: u64) -> Vec<Entry> {
        self.records
            .iter()
            .filter(|(_, rec)| rec.is_live(now))
            .map(|(key, rec)| rec.to_entry(key))
            .collect()
    }

    /// `op` on `key` at `now`: the answer. The model takes the record after it, and a new
    /// token when the operation used one.
    pub fn apply(&mut self, key: &[u8], op: &Op, now: u64) -> Reply {
        let new_token = self.last_token + 1;
        let (reply, next) = apply(self.records.get(key), op, now, new_token);
        match next {
            Some(rec) => {
                if rec.token == new_token {
                    self.last_token = new_token;
                }
                self.records.insert(key.to_vec(), rec);
            }
            None => {
                self.records.remove(key);
            }
        }
        reply
    }

    /// A claim, as the store answers it from the store `store_id`.
    pub fn claim(
        &mut self,
        key: &[u8],
        fingerprint: Option<&[u8]>,
        lease: u64,
        ttl: u64,
        now: u64,
        store_id: u64,
    ) -> Claim {
        let op = Op::Claim {
            fingerprint: fingerprint.map(<[u8]>::to_vec),
            lease,
            ttl,
        };
        match self.apply(key, &op, now) {
            Reply::Acquired {
                token,
                attempt,
                takeover,
                claimed_at,
                lease_until,
                checkpoint,
            } => Claim::Acquired(Ticket {
                key: Key::new(key),
                fencing_token: token,
                attempt,
                claimed_at,
                lease_until,
                takeover,
                checkpoint: checkpoint.as_ref().map(Checkpoint::from),
                store_id,
            }),
            Reply::InProgress {
                lease_until,
                retry_after,
                attempt,
            } => Claim::InProgress {
                lease_until,
                retry_after,
                attempt,
            },
            Reply::Completed {
                response,
                completed_at,
                expires_at,
                attempt,
                token,
            } => Claim::Completed(Outcome {
                response,
                completed_at,
                expires_at,
                attempt,
                fencing_token: token,
            }),
            Reply::Mismatch { completed } => Claim::Mismatch { completed },
            other => unreachable!("a claim answered {other:?}"),
        }
    }

    /// `complete` / `complete_with_ttl`.
    pub fn complete(
        &mut self,
        key: &[u8],
        token: u64,
        response: &[u8],
        ttl: u64,
        now: u64,
    ) -> Result<(), Refusal> {
        let op = Op::Complete {
            token,
            response: response.to_vec(),
            ttl,
        };
        match self.apply(key, &op, now) {
            Reply::Refused(refusal) => Err(refusal),
            _ => Ok(()),
        }
    }

    /// `release`.
    pub fn release(&mut self, key: &[u8], token: u64, now: u64) -> Result<(), Refusal> {
        match self.apply(key, &Op::Release { token }, now) {
            Reply::Refused(refusal) => Err(refusal),
            _ => Ok(()),
        }
    }

    /// `extend`: the new lease deadline.
    pub fn extend(&mut self, key: &[u8], token: u64, lease: u64, now: u64) -> Result<u64, Refusal> {
        match self.apply(key, &Op::Extend { token, lease }, now) {
            Reply::Extended { lease_until } => Ok(lease_until),
            Reply::Refused(refusal) => Err(refusal),
            other => unreachable!("extend answered {other:?}"),
        }
    }

    /// `expire`: whether a live record was there. Removes an expired leftover too.
    pub fn expire(&mut self, key: &[u8], now: u64) -> bool {
        matches!(self.apply(key, &Op::Expire, now), Reply::Flag(true))
    }

    /// `mark_seen` / `mark_seen_with_ttl`.
    pub fn mark_seen(&mut self, key: &[u8], ttl: u64, now: u64) -> bool {
        matches!(
            self.apply(key, &Op::MarkSeen { ttl }, now),
            Reply::Flag(true)
        )
    }

    /// `advance_sequence_with`, the mark taking `ttl` when it moves.
    pub fn advance_sequence(
        &mut self,
        stream: &[u8],
        seq: u64,
        contiguous: bool,
        ttl: u64,
        now: u64,
    ) -> SeqCheck {
        let (check, next) = advance(self.marks.get(stream), seq, contiguous, ttl, now);
        if let Some(mark) = next {
            self.marks.insert(stream.to_vec(), mark);
        }
        check
    }

    /// `sweep`: how many expired records and marks it removes.
    pub fn sweep(&mut self, now: u64) -> usize {
        let before = self.records.len() + self.marks.len();
        self.records.retain(|_, rec| rec.is_live(now));
        self.marks.retain(|_, mark| now < mark.expires_at);
        before - self.records.len() - self.marks.len()
    }

    /// Records and marks held, as `Store::stats` counts them: live ones, and expired ones not
    /// yet swept.
    pub fn key_counts(&self, now: u64) -> (u64, u64) {
        let live = self.records.values().filter(|rec| rec.is_live(now)).count()
            + self
                .marks
                .values()
                .filter(|mark| now < mark.expires_at)
                .count();
        let held = self.records.len() + self.marks.len();
        (live as u64, (held - live) as u64)
    }
}
