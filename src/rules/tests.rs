//! Unit tests of `rules`.
use std::time::Duration;

use super::ops::{AdvanceSequence, Claim as ClaimOp, Complete, MarkSeen};
use super::*;
use crate::claim::Claim;
use crate::record::ByteString;

const STORE: u64 = 99;

fn ctx(key: &Key, now: u64, next_token: u64) -> Context<'_> {
    Context {
        key,
        now,
        next_token,
        store_id: STORE,
        full: None,
    }
}

fn claim_op(fp: Option<&[u8]>) -> ClaimOp {
    ClaimOp {
        fingerprint: fp.map(<[u8]>::to_vec),
        lease: 100,
        ttl: 1_000,
    }
}

fn put<A>(t: &Decision<A>) -> &Record {
    match &t.change {
        Change::Put(record) => record,
        other => panic!("expected a put, got {other:?}"),
    }
}

#[test]
fn fresh_claim_expires_at_the_later_of_ttl_and_lease() {
    let key = Key::from("k");
    let short_ttl = ClaimOp {
        fingerprint: None,
        lease: 500,
        ttl: 100,
    };
    let t = apply(&short_ttl, None, &ctx(&key, 10, 1));
    assert_eq!(put(&t).expires_at, 510);
    let t = apply(&claim_op(None), None, &ctx(&key, 10, 1));
    assert_eq!(put(&t).expires_at, 1_010);
    assert!(t.issued_token);
}

#[test]
fn takeover_keeps_the_first_fingerprint_and_bumps_the_attempt() {
    let key = Key::from("k");
    let first = apply(&claim_op(Some(b"a")), None, &ctx(&key, 0, 1));
    let record = put(&first).clone();
    let t = apply(&claim_op(None), Some(&record), &ctx(&key, 100, 2));
    let taken = put(&t);
    assert_eq!(taken.attempt, 2);
    assert_eq!(taken.fencing_token, 2);
    assert_eq!(taken.fingerprint, Some(ByteString(b"a".to_vec())));
    match t.answer {
        Ok(Claim::Acquired(ticket)) => assert!(ticket.is_takeover()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn mismatch_wins_even_after_the_lease_passed() {
    let key = Key::from("k");
    let record = put(&apply(&claim_op(Some(b"a")), None, &ctx(&key, 0, 1))).clone();
    let t = apply(&claim_op(Some(b"b")), Some(&record), &ctx(&key, 500, 2));
    assert_eq!(t.change, Change::Keep);
    assert!(matches!(t.answer, Ok(Claim::Mismatch { completed: false })));
}

#[test]
fn overflowing_deadlines_are_refused() {
    let key = Key::from("k");
    let t = apply(&claim_op(None), None, &ctx(&key, u64::MAX - 5, 1));
    assert_eq!(t.change, Change::Keep);
    assert!(matches!(t.answer, Err(Error::InvalidDuration { .. })));
}

#[test]
fn retry_after_is_never_negative() {
    let key = Key::from("k");
    let record = put(&apply(&claim_op(None), None, &ctx(&key, 1_000, 1))).clone();
    // The clock went back: the lease is further away than the lease length.
    let t = apply(&claim_op(None), Some(&record), &ctx(&key, 0, 2));
    match t.answer {
        Ok(Claim::InProgress { retry_after, .. }) => {
            assert_eq!(retry_after, Duration::from_millis(1_100));
        }
        other => panic!("{other:?}"),
    }
}
#[test]
fn a_full_store_refuses_new_keys_but_not_records_it_holds() {
    let key = Key::from("k");
    let full = |now, next_token| Context {
        full: Some(7),
        ..ctx(&key, now, next_token)
    };
    let claim = apply(&claim_op(None), None, &full(0, 1));
    let mark = apply(&MarkSeen { ttl: 1_000 }, None, &full(0, 1));
    for (change, issued_token, refusal) in [
        (claim.change, claim.issued_token, claim.answer.err()),
        (mark.change, mark.issued_token, mark.answer.err()),
    ] {
        assert_eq!(change, Change::Keep);
        assert!(!issued_token);
        assert!(
            matches!(refusal, Some(Error::KeyBudgetExhausted { max_keys: 7 })),
            "{refusal:?}"
        );
    }
    let seq = AdvanceSequence {
        seq: 1,
        ttl: 1_000,
        contiguous: false,
    };
    let seq_key = Key::from("s");
    let t = apply(
        &seq,
        None,
        &Context {
            full: Some(7),
            ..ctx(&seq_key, 0, 1)
        },
    );
    assert!(matches!(t.answer, Err(Error::KeyBudgetExhausted { .. })));

    // A held claim still completes, and a completed record still replays.
    let claimed = put(&apply(&claim_op(None), None, &ctx(&key, 0, 1))).clone();
    let done = apply(
        &Complete {
            fencing_token: 1,
            response: b"r".to_vec(),
            ttl: 1_000,
        },
        Some(&claimed),
        &full(10, 2),
    );
    assert!(matches!(done.answer, Ok(())), "{:?}", done.answer);
    let completed = put(&done).clone();
    let replay = apply(&claim_op(None), Some(&completed), &full(20, 2));
    assert!(matches!(replay.answer, Ok(Claim::Completed(_))));
    // An expired record's room is reused by a new claim.
    let fresh = apply(&claim_op(None), Some(&completed), &full(5_000, 2));
    assert!(matches!(fresh.answer, Ok(Claim::Acquired(_))));
}
