//! The sequence guard: dedupe of ordered streams by a high-water mark.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{T0, TestResult, on_both};
use dedupe_store::{ManualClock, SeqCheck, SequenceOptions, Store};

#[test]
fn numbers_above_the_mark_are_accepted_equal_is_duplicate_below_is_stale() -> TestResult {
    on_both(|f| {
        assert_eq!(f.store.sequence_mark("s")?, None);
        assert_eq!(f.store.advance_sequence("s", 5)?, SeqCheck::Accepted);
        assert_eq!(f.store.advance_sequence("s", 5)?, SeqCheck::Duplicate);
        assert_eq!(
            f.store.advance_sequence("s", 4)?,
            SeqCheck::Stale { current: 5 }
        );
        assert_eq!(
            f.store.advance_sequence("s", 0)?,
            SeqCheck::Stale { current: 5 }
        );
        assert_eq!(f.store.advance_sequence("s", 9)?, SeqCheck::Accepted);
        assert_eq!(f.store.sequence_mark("s")?, Some(9));
        assert_eq!(f.store.advance_sequence("s", u64::MAX)?, SeqCheck::Accepted);
        assert_eq!(
            f.store.advance_sequence("s", u64::MAX)?,
            SeqCheck::Duplicate
        );
        let stats = f.store.stats()?;
        assert_eq!(stats.sequence_accepted, 3);
        assert_eq!(stats.sequence_rejected, 4);
        Ok(())
    })
}

#[test]
fn contiguous_streams_report_the_gap_and_change_nothing() -> TestResult {
    on_both(|f| {
        let strict = SequenceOptions::new().contiguous(true);
        assert_eq!(
            f.store.advance_sequence_with("s", 10, &strict)?,
            SeqCheck::Accepted
        );
        assert_eq!(
            f.store.advance_sequence_with("s", 12, &strict)?,
            SeqCheck::Gap { expected: 11 }
        );
        assert_eq!(f.store.sequence_mark("s")?, Some(10));
        assert_eq!(
            f.store.advance_sequence_with("s", 11, &strict)?,
            SeqCheck::Accepted
        );
        assert_eq!(
            f.store.advance_sequence_with("s", 11, &strict)?,
            SeqCheck::Duplicate
        );
        assert_eq!(
            f.store.advance_sequence_with("s", 3, &strict)?,
            SeqCheck::Stale { current: 11 }
        );
        // The same stream without the option accepts the jump.
        assert_eq!(f.store.advance_sequence("s", 20)?, SeqCheck::Accepted);
        Ok(())
    })
}

#[test]
fn marks_expire_with_their_ttl_and_are_swept() -> TestResult {
    on_both(|f| {
        let short = SequenceOptions::new().ttl(Duration::from_secs(60));
        assert_eq!(
            f.store.advance_sequence_with("s", 7, &short)?,
            SeqCheck::Accepted
        );
        f.advance(Duration::from_secs(59));
        // Each accepted number renews the TTL.
        assert_eq!(
            f.store.advance_sequence_with("s", 8, &short)?,
            SeqCheck::Accepted
        );
        f.advance(Duration::from_secs(59));
        assert_eq!(f.store.sequence_mark("s")?, Some(8));
        // A refusal does not renew it.
        assert_eq!(
            f.store.advance_sequence_with("s", 8, &short)?,
            SeqCheck::Duplicate
        );
        f.advance(Duration::from_secs(1));
        assert_eq!(f.store.sequence_mark("s")?, None);
        assert_eq!(f.store.sweep()?, 1);
        assert_eq!(
            f.store.advance_sequence("s", 1)?,
            SeqCheck::Accepted,
            "a forgotten stream starts over"
        );
        Ok(())
    })
}

#[test]
fn streams_and_idempotency_keys_never_meet() -> TestResult {
    on_both(|f| {
        assert_eq!(
            f.store.advance_sequence("shared-name", 1)?,
            SeqCheck::Accepted
        );
        assert!(f.store.mark_seen("shared-name")?);
        assert!(f.store.expire("shared-name")?);
        assert_eq!(f.store.sequence_mark("shared-name")?, Some(1));
        assert_eq!(f.store.get("shared-name")?, None);
        assert!(
            f.store.list("", 100)?.is_empty(),
            "list shows idempotency keys only"
        );
        Ok(())
    })
}

#[test]
fn reopen_keeps_the_mark() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("seq.redb");
    let clock = ManualClock::new(T0);
    {
        let store = Store::builder().clock(clock.clone()).open(&path)?;
        for seq in 1..=5 {
            assert_eq!(
                store.advance_sequence("orders/17", seq)?,
                SeqCheck::Accepted
            );
        }
    }
    let store = Store::builder().clock(clock).open(&path)?;
    assert_eq!(store.sequence_mark("orders/17")?, Some(5));
    assert_eq!(store.advance_sequence("orders/17", 5)?, SeqCheck::Duplicate);
    assert_eq!(store.advance_sequence("orders/17", 6)?, SeqCheck::Accepted);
    Ok(())
}

/// Producers race to deliver the same numbers to one stream (a redelivery storm): each number
/// is accepted at most once, and the accepted numbers rise in the order they were accepted.
#[test]
fn concurrent_producers_never_both_get_accepted_for_one_number() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("producers.redb"))?;
    const PRODUCERS: usize = 8;
    const NUMBERS: u64 = 300;
    let start = Arc::new(Barrier::new(PRODUCERS));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || -> dedupe_store::Result<Vec<u64>> {
                start.wait();
                let mut accepted = Vec::new();
                for i in 0..NUMBERS {
                    // Each producer delivers the numbers in order, some twice, at its own pace.
                    let seq = i + 1;
                    for _ in 0..=(p + i as usize) % 2 {
                        if store.advance_sequence("stream", seq)? == SeqCheck::Accepted {
                            accepted.push(seq);
                        }
                    }
                }
                Ok(accepted)
            })
        })
        .collect();
    let mut owner: BTreeMap<u64, usize> = BTreeMap::new();
    for (p, producer) in producers.into_iter().enumerate() {
        let accepted = producer.join().map_err(|_| "producer panicked")??;
        assert!(
            accepted.windows(2).all(|w| w[0] < w[1]),
            "producer {p} saw the mark go back"
        );
        for seq in accepted {
            if let Some(other) = owner.insert(seq, p) {
                return Err(format!("{seq} accepted by producers {other} and {p}").into());
            }
        }
    }
    assert_eq!(store.sequence_mark("stream")?, Some(NUMBERS));
    assert_eq!(owner.keys().last(), Some(&NUMBERS));
    assert_eq!(store.stats()?.sequence_accepted, owner.len() as u64);
    Ok(())
}
