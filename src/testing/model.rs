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

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{Checkpoint, Claim, Entry, EntryState, Error, Key, Outcome, SeqCheck, Ticket};

/// What a key holds in the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rec {
    /// The token of the claim or mark that wrote it.
    pub token: u64,
    /// 1, plus one per takeover.
    pub attempt: u32,
    /// The fingerprint the key belongs to.
    pub fingerprint: Option<Vec<u8>>,
    /// From this instant the record behaves as absent.
    pub expires_at: u64,
    /// In progress or completed.
    pub state: RecState,
}

/// The two states of a model record (SEMANTICS.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RecState {
    /// Claimed.
    InProgress {
        /// When the current owner claimed it.
        claimed_at: u64,
        /// When its lease ends.
        lease_until: u64,
        /// The claim's TTL in milliseconds.
        claim_ttl: u64,
        /// The last checkpoint an owner recorded; a takeover keeps it.
        checkpoint: Option<RecCheckpoint>,
    },
    /// Completed (or marked seen, with an empty response).
    Completed {
        /// When.
        completed_at: u64,
        /// The stored response.
        response: Vec<u8>,
    },
}

/// A checkpoint as the model keeps it (SEMANTICS.md §6).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecCheckpoint {
    /// The name of the finished step.
    pub step: String,
    /// The state saved with it.
    pub state: Vec<u8>,
    /// When it was recorded.
    pub recorded_at: u64,
}

impl From<&Checkpoint> for RecCheckpoint {
    fn from(checkpoint: &Checkpoint) -> RecCheckpoint {
        RecCheckpoint {
            step: checkpoint.step.clone(),
            state: checkpoint.state.clone(),
            recorded_at: checkpoint.recorded_at,
        }
    }
}

impl From<&RecCheckpoint> for Checkpoint {
    fn from(checkpoint: &RecCheckpoint) -> Checkpoint {
        Checkpoint {
            step: checkpoint.step.clone(),
            state: checkpoint.state.clone(),
            recorded_at: checkpoint.recorded_at,
        }
    }
}

/// A stream's sequence mark (SEMANTICS.md §8), in its own key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqMark {
    /// The highest number accepted.
    pub mark: u64,
    /// From this instant the mark behaves as absent.
    pub expires_at: u64,
}

/// Why the model refuses an operation (the store must refuse it the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The ticket does not own the key.
    LeaseLost,
}

/// One operation on one key's record, with every duration resolved to milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// `claim_with`.
    Claim {
        /// The claim's fingerprint, if any.
        fingerprint: Option<Vec<u8>>,
        /// The lease.
        lease: u64,
        /// The claim's TTL.
        ttl: u64,
    },
    /// `complete` / `complete_with_ttl`.
    Complete {
        /// The ticket's fencing token.
        token: u64,
        /// The response to store.
        response: Vec<u8>,
        /// The completion's TTL.
        ttl: u64,
    },
    /// `release`.
    Release {
        /// The ticket's fencing token.
        token: u64,
    },
    /// `extend`.
    Extend {
        /// The ticket's fencing token.
        token: u64,
        /// The new lease, from now.
        lease: u64,
    },
    /// `checkpoint`.
    Checkpoint {
        /// The ticket's fencing token.
        token: u64,
        /// The step's name.
        step: String,
        /// The state saved with it.
        state: Vec<u8>,
    },
    /// `expire`.
    Expire,
    /// `mark_seen` / `mark_seen_with_ttl`.
    MarkSeen {
        /// The mark's TTL.
        ttl: u64,
    },
    /// `get`.
    Get,
}

/// The answer the store must give to an [`Op`], reduced to what the caller sees (a ticket
/// without its key and store, an entry without its key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `Claim::Acquired` with a ticket holding these.
    Acquired {
        /// The new fencing token.
        token: u64,
        /// The attempt.
        attempt: u32,
        /// Whether it took over a passed lease.
        takeover: bool,
        /// When it was claimed.
        claimed_at: u64,
        /// When its lease ends.
        lease_until: u64,
        /// The checkpoint the takeover inherits.
        checkpoint: Option<RecCheckpoint>,
    },
    /// `Claim::InProgress`.
    InProgress {
        /// When the owner's lease ends.
        lease_until: u64,
        /// How long until then.
        retry_after: Duration,
        /// The owner's attempt.
        attempt: u32,
    },
    /// `Claim::Completed`: the replayed outcome.
    Completed {
        /// The stored response.
        response: Vec<u8>,
        /// When it was completed.
        completed_at: u64,
        /// When it expires.
        expires_at: u64,
        /// The attempt that completed it.
        attempt: u32,
        /// The token of the claim (or mark) that wrote it.
        token: u64,
    },
    /// `Claim::Mismatch`.
    Mismatch {
        /// Whether the record is completed.
        completed: bool,
    },
    /// An owner operation other than `extend` succeeded.
    Done,
    /// `extend` succeeded.
    Extended {
        /// The new end of the lease.
        lease_until: u64,
    },
    /// An owner operation was refused.
    Refused(Refusal),
    /// The boolean answer of `expire` and `mark_seen`.
    Flag(bool),
    /// The live record, as `get` shows it.
    Got(Option<Rec>),
}

impl Reply {
    /// A store's answer to a claim, as a [`Reply`].
    pub fn of_claim(claim: &Claim) -> Reply {
        match claim {
            Claim::Acquired(ticket) => Reply::Acquired {
                token: ticket.fencing_token,
                attempt: ticket.attempt,
                takeover: ticket.takeover,
                claimed_at: ticket.claimed_at,
                lease_until: ticket.lease_until,
                checkpoint: ticket.checkpoint.as_ref().map(RecCheckpoint::from),
            },
            Claim::InProgress {
                lease_until,
                retry_after,
                attempt,
            } => Reply::InProgress {
                lease_until: *lease_until,
                retry_after: *retry_after,
                attempt: *attempt,
            },
            Claim::Completed(outcome) => Reply::Completed {
                response: outcome.response.clone(),
                completed_at: outcome.completed_at,
                expires_at: outcome.expires_at,
                attempt: outcome.attempt,
                token: outcome.fencing_token,
            },
            Claim::Mismatch { completed } => Reply::Mismatch {
                completed: *completed,
            },
        }
    }

    /// A store's answer to `complete`, `release` or `checkpoint`: `Done`, or the refusal.
    /// Any other error is no answer the model gives, and is passed on.
    ///
    /// # Errors
    /// The store's error when it is not `LeaseLost`.
    pub fn of_owner_call(result: crate::Result<()>) -> crate::Result<Reply> {
        match result {
            Ok(()) => Ok(Reply::Done),
            Err(Error::LeaseLost { .. }) => Ok(Reply::Refused(Refusal::LeaseLost)),
            Err(err) => Err(err),
        }
    }

    /// A store's entry, as [`Reply::Got`] holds it. `claim_ttl` is the claim's TTL, which an
    /// entry does not show.
    pub fn of_entry(entry: Option<&Entry>, claim_ttl: u64) -> Reply {
        Reply::Got(entry.map(|entry| Rec::of_entry(entry, claim_ttl)))
    }
}

impl Rec {
    /// Whether the record is live at `now` (SEMANTICS.md §2).
    pub fn is_live(&self, now: u64) -> bool {
        now < self.expires_at
    }

    /// An entry as a record; `claim_ttl` is the claim's TTL, which an entry does not show.
    pub fn of_entry(entry: &Entry, claim_ttl: u64) -> Rec {
        Rec {
            token: entry.fencing_token,
            attempt: entry.attempt,
            fingerprint: entry.fingerprint.clone(),
            expires_at: entry.expires_at,
            state: match &entry.state {
                EntryState::InProgress {
                    claimed_at,
                    lease_until,
                    checkpoint,
                } => RecState::InProgress {
                    claimed_at: *claimed_at,
                    lease_until: *lease_until,
                    claim_ttl,
                    checkpoint: checkpoint.as_ref().map(RecCheckpoint::from),
                },
                EntryState::Completed {
                    completed_at,
                    response,
                } => RecState::Completed {
                    completed_at: *completed_at,
                    response: response.clone(),
                },
            },
        }
    }

    /// The record as `get` shows it under `key`.
    pub fn to_entry(&self, key: &[u8]) -> Entry {
        Entry {
            key: Key::new(key),
            fencing_token: self.token,
            attempt: self.attempt,
            fingerprint: self.fingerprint.clone(),
            expires_at: self.expires_at,
            state: match &self.state {
                RecState::InProgress {
                    claimed_at,
                    lease_until,
                    checkpoint,
                    ..
                } => EntryState::InProgress {
                    claimed_at: *claimed_at,
                    lease_until: *lease_until,
                    checkpoint: checkpoint.as_ref().map(Checkpoint::from),
                },
                RecState::Completed {
                    completed_at,
                    response,
                } => EntryState::Completed {
                    completed_at: *completed_at,
                    response: response.clone(),
                },
            },
        }
    }
}

/// One operation on one key: the answer, and what the key holds after it.
///
/// `record` is what the key holds before, expired or not (an expired record behaves as
/// absent, SEMANTICS.md §2). `new_token` is the token a claim or mark that stores a new record
/// takes; it must be greater than every token issued before (§5), so a record holding it after
/// the operation is how the caller knows the token was used.
pub fn apply(record: Option<&Rec>, op: &Op, now: u64, new_token: u64) -> (Reply, Option<Rec>) {
    let live = record.filter(|rec| rec.is_live(now));
    let unchanged = || record.cloned();
    // The owner check of §6: the live in-progress record `token` owns.
    let owned = |token: u64| {
        live.filter(|rec| rec.token == token && matches!(rec.state, RecState::InProgress { .. }))
            .cloned()
            .ok_or(Refusal::LeaseLost)
    };
    match op {
        Op::Claim {
            fingerprint,
            lease,
            ttl,
        } => claim(record, fingerprint.as_deref(), *lease, *ttl, now, new_token),
        Op::Complete {
            token,
            response,
            ttl,
        } => match owned(*token) {
            Ok(mut rec) => {
                rec.expires_at = now + ttl;
                rec.state = RecState::Completed {
                    completed_at: now,
                    response: response.clone(),
                };
                (Reply::Done, Some(rec))
            }
            Err(refusal) => (Reply::Refused(refusal), unchanged()),
        },
        Op::Release { token } => match owned(*token) {
            Ok(_) => (Reply::Done, None),
            Err(refusal) => (Reply::Refused(refusal), unchanged()),
        },
        Op::Extend { token, lease } => match owned(*token) {
            Ok(mut rec) => {
                let new_lease = now + lease;
                if let RecState::InProgress {
                    claimed_at,
                    lease_until,
                    claim_ttl,
                    ..
                } = &mut rec.state
                {
                    *lease_until = new_lease;
                    rec.expires_at = (*claimed_at + *claim_ttl).max(new_lease);
                }
                (
                    Reply::Extended {
                        lease_until: new_lease,
                    },
                    Some(rec),
                )
            }
            Err(refusal) => (Reply::Refused(refusal), unchanged()),
        },
        Op::Checkpoint { token, step, state } => match owned(*token) {
            Ok(mut rec) => {
                if let RecState::InProgress { checkpoint, .. } = &mut rec.state {
                    *checkpoint = Some(RecCheckpoint {
                        step: step.clone(),
                        state: state.clone(),
                        recorded_at: now,
                    });
                }
                (Reply::Done, Some(rec))
            }
            Err(refusal) => (Reply::Refused(refusal), unchanged()),
        },
        // Removes an expired leftover too, answering whether a live record was there (§7).
        Op::Expire => (Reply::Flag(live.is_some()), None),
        Op::MarkSeen { ttl } => match live {
            Some(_) => (Reply::Flag(false), unchanged()),
            None => (
                Reply::Flag(true),
                Some(Rec {
                    token: new_token,
                    attempt: 1,
                    fingerprint: None,
                    expires_at: now + ttl,
                    state: RecState::Completed {
                        completed_at: now,
                        response: Vec::new(),
                    },
                }),
            ),
        },
        Op::Get => (Reply::Got(live.cloned()), unchanged()),
    }
}

/// A claim, in the order SEMANTICS.md §4 decides it.
fn claim(
    record: Option<&Rec>,
    fingerprint: Option<&[u8]>,
    lease: u64,
    ttl: u64,
    now: u64,
    new_token: u64,
) -> (Reply, Option<Rec>) {
    let live = record.filter(|rec| rec.is_live(now));
    if let Some(rec) = live {
        if let (Some(stored), Some(given)) = (&rec.fingerprint, fingerprint)
            && stored.as_slice() != given
        {
            let completed = matches!(rec.state, RecState::Completed { .. });
            return (Reply::Mismatch { completed }, record.cloned());
        }
        match &rec.state {
            RecState::Completed {
                completed_at,
                response,
            } => {
                let replay = Reply::Completed {
                    response: response.clone(),
                    completed_at: *completed_at,
                    expires_at: rec.expires_at,
                    attempt: rec.attempt,
                    token: rec.token,
                };
                return (replay, record.cloned());
            }
            RecState::InProgress { lease_until, .. } if now < *lease_until => {
                let busy = Reply::InProgress {
                    lease_until: *lease_until,
                    retry_after: Duration::from_millis(lease_until - now),
                    attempt: rec.attempt,
                };
                return (busy, record.cloned());
            }
            RecState::InProgress { .. } => {}
        }
    }
    let lease_until = now + lease;
    let (attempt, fingerprint, checkpoint) = match live {
        Some(rec) => (
            rec.attempt + 1,
            rec.fingerprint
                .clone()
                .or_else(|| fingerprint.map(<[u8]>::to_vec)),
            match &rec.state {
                RecState::InProgress { checkpoint, .. } => checkpoint.clone(),
                RecState::Completed { .. } => None,
            },
        ),
        None => (1, fingerprint.map(<[u8]>::to_vec), None),
    };
    let reply = Reply::Acquired {
        token: new_token,
        attempt,
        takeover: live.is_some(),
        claimed_at: now,
        lease_until,
        checkpoint: checkpoint.clone(),
    };
    let rec = Rec {
        token: new_token,
        attempt,
        fingerprint,
        expires_at: (now + ttl).max(lease_until),
        state: RecState::InProgress {
            claimed_at: now,
            lease_until,
            claim_ttl: ttl,
            checkpoint,
        },
    };
    (reply, Some(rec))
}

/// `advance_sequence` on one stream's mark (SEMANTICS.md §8): the answer, and the mark after.
pub fn advance(
    mark: Option<&SeqMark>,
    seq: u64,
    contiguous: bool,
    ttl: u64,
    now: u64,
) -> (SeqCheck, Option<SeqMark>) {
    let unchanged = mark.copied();
    match mark.filter(|mark| now < mark.expires_at) {
        Some(live) if seq == live.mark => (SeqCheck::Duplicate, unchanged),
        Some(live) if seq < live.mark => (SeqCheck::Stale { current: live.mark }, unchanged),
        Some(live) if contiguous && seq != live.mark + 1 => (
            SeqCheck::Gap {
                expected: live.mark + 1,
            },
            unchanged,
        ),
        _ => (
            SeqCheck::Accepted,
            Some(SeqMark {
                mark: seq,
                expires_at: now + ttl,
            }),
        ),
    }
}

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
