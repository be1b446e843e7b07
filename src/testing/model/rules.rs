//! The model's rules: one operation on one key's record at one instant.

use std::time::Duration;

use crate::SeqCheck;

use super::record::{Op, Rec, RecCheckpoint, RecState, Refusal, Reply, SeqMark};

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
