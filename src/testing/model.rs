//! A plain model of the store's semantics, written from the SPEC and nothing else: a sorted map
//! of records, a token counter and the time. The store's own rules live in `crate::rules`; this
//! is the independent second opinion the fault and fuzz tests check the store against.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{Claim, Entry, EntryState, Key, Outcome, Ticket};

/// What a key holds in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The two states of a model record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecState {
    /// Claimed.
    InProgress {
        /// When the current owner claimed it.
        claimed_at: u64,
        /// When its lease ends.
        lease_until: u64,
        /// The claim's TTL in milliseconds.
        claim_ttl: u64,
    },
    /// Completed (or marked seen, with an empty response).
    Completed {
        /// When.
        completed_at: u64,
        /// The stored response.
        response: Vec<u8>,
    },
}

/// Why the model refuses an operation (the store must refuse it the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The ticket does not own the key.
    LeaseLost,
}

/// The model store: every record (expired ones too, until swept), and the last token issued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Records by caller key.
    pub records: BTreeMap<Vec<u8>, Rec>,
    /// The last fencing token issued.
    pub last_token: u64,
}

impl Model {
    /// The key's record if it is live at `now`.
    pub fn live(&self, key: &[u8], now: u64) -> Option<&Rec> {
        self.records.get(key).filter(|rec| now < rec.expires_at)
    }

    /// The entry `Store::get` must return.
    pub fn entry(&self, key: &[u8], now: u64) -> Option<Entry> {
        self.live(key, now).map(|rec| to_entry(key, rec))
    }

    /// Every live entry in key order, as `Store::list(b"", ..)` must return them.
    pub fn entries(&self, now: u64) -> Vec<Entry> {
        self.records
            .iter()
            .filter(|(_, rec)| now < rec.expires_at)
            .map(|(key, rec)| to_entry(key, rec))
            .collect()
    }

    /// A claim, as the SPEC's rules decide it.
    pub fn claim(
        &mut self,
        key: &[u8],
        fingerprint: Option<&[u8]>,
        lease: u64,
        ttl: u64,
        now: u64,
        store_id: u64,
    ) -> Claim {
        let previous = self.live(key, now).cloned();
        if let Some(rec) = &previous {
            if let (Some(stored), Some(given)) = (&rec.fingerprint, fingerprint)
                && stored.as_slice() != given
            {
                return Claim::Mismatch {
                    completed: matches!(rec.state, RecState::Completed { .. }),
                };
            }
            match &rec.state {
                RecState::Completed {
                    completed_at,
                    response,
                } => {
                    return Claim::Completed(Outcome {
                        response: response.clone(),
                        completed_at: *completed_at,
                        expires_at: rec.expires_at,
                        attempt: rec.attempt,
                        fencing_token: rec.token,
                    });
                }
                RecState::InProgress { lease_until, .. } if now < *lease_until => {
                    return Claim::InProgress {
                        lease_until: *lease_until,
                        retry_after: Duration::from_millis(lease_until - now),
                        attempt: rec.attempt,
                    };
                }
                RecState::InProgress { .. } => {}
            }
        }
        self.last_token += 1;
        let token = self.last_token;
        let lease_until = now + lease;
        let (attempt, fingerprint) = match &previous {
            Some(rec) => (
                rec.attempt + 1,
                rec.fingerprint
                    .clone()
                    .or_else(|| fingerprint.map(<[u8]>::to_vec)),
            ),
            None => (1, fingerprint.map(<[u8]>::to_vec)),
        };
        self.records.insert(
            key.to_vec(),
            Rec {
                token,
                attempt,
                fingerprint,
                expires_at: (now + ttl).max(lease_until),
                state: RecState::InProgress {
                    claimed_at: now,
                    lease_until,
                    claim_ttl: ttl,
                },
            },
        );
        Claim::Acquired(Ticket {
            key: Key::new(key),
            fencing_token: token,
            attempt,
            claimed_at: now,
            lease_until,
            takeover: previous.is_some(),
            checkpoint: None,
            store_id,
        })
    }

    fn owned(&mut self, key: &[u8], token: u64, now: u64) -> Result<&mut Rec, Refusal> {
        match self.records.get_mut(key) {
            Some(rec)
                if now < rec.expires_at
                    && rec.token == token
                    && matches!(rec.state, RecState::InProgress { .. }) =>
            {
                Ok(rec)
            }
            _ => Err(Refusal::LeaseLost),
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
        let rec = self.owned(key, token, now)?;
        rec.expires_at = now + ttl;
        rec.state = RecState::Completed {
            completed_at: now,
            response: response.to_vec(),
        };
        Ok(())
    }

    /// `release`.
    pub fn release(&mut self, key: &[u8], token: u64, now: u64) -> Result<(), Refusal> {
        self.owned(key, token, now)?;
        self.records.remove(key);
        Ok(())
    }

    /// `extend`: the new lease deadline.
    pub fn extend(&mut self, key: &[u8], token: u64, lease: u64, now: u64) -> Result<u64, Refusal> {
        let rec = self.owned(key, token, now)?;
        let new_lease = now + lease;
        if let RecState::InProgress {
            claimed_at,
            lease_until,
            claim_ttl,
        } = &mut rec.state
        {
            *lease_until = new_lease;
            rec.expires_at = (*claimed_at + *claim_ttl).max(new_lease);
        }
        Ok(new_lease)
    }

    /// `expire`: whether a live record was there. Removes an expired leftover too.
    pub fn expire(&mut self, key: &[u8], now: u64) -> bool {
        let was_live = self.live(key, now).is_some();
        self.records.remove(key);
        was_live
    }

    /// `mark_seen` / `mark_seen_with_ttl`.
    pub fn mark_seen(&mut self, key: &[u8], ttl: u64, now: u64) -> bool {
        if self.live(key, now).is_some() {
            return false;
        }
        self.last_token += 1;
        self.records.insert(
            key.to_vec(),
            Rec {
                token: self.last_token,
                attempt: 1,
                fingerprint: None,
                expires_at: now + ttl,
                state: RecState::Completed {
                    completed_at: now,
                    response: Vec::new(),
                },
            },
        );
        true
    }

    /// `sweep`: how many expired records it removes.
    pub fn sweep(&mut self, now: u64) -> usize {
        let before = self.records.len();
        self.records.retain(|_, rec| now < rec.expires_at);
        before - self.records.len()
    }
}

fn to_entry(key: &[u8], rec: &Rec) -> Entry {
    Entry {
        key: Key::new(key),
        fencing_token: rec.token,
        attempt: rec.attempt,
        fingerprint: rec.fingerprint.clone(),
        expires_at: rec.expires_at,
        state: match &rec.state {
            RecState::InProgress {
                claimed_at,
                lease_until,
                ..
            } => EntryState::InProgress {
                claimed_at: *claimed_at,
                lease_until: *lease_until,
                checkpoint: None,
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
