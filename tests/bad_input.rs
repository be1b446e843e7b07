//! Bad input: each is a typed error, the store is unchanged and still usable, nothing panics.

mod common;

use std::time::Duration;

use common::{Fixture, TestResult, on_both};
use dedupe_store::{
    ClaimOptions, Error, MAX_DURATION, MAX_FINGERPRINT_LEN, MAX_KEY_LEN, SequenceOptions, Store,
};

/// Runs `bad` and checks that the store's contents did not change and it still works.
fn unchanged(f: &Fixture, bad: impl FnOnce() -> bool) -> TestResult {
    let before = f.store.list("", usize::MAX)?;
    let stats_before = f.store.stats()?;
    if !bad() {
        return Err("the call did not fail as expected".into());
    }
    assert_eq!(f.store.list("", usize::MAX)?, before, "contents changed");
    let stats = f.store.stats()?;
    assert_eq!(stats.acquired, stats_before.acquired);
    assert_eq!(stats.completes, stats_before.completes);
    // Still usable.
    let probe = format!("probe-{}", stats.acquired);
    let ticket = f.acquire(&probe)?;
    f.store.release(&ticket)?;
    Ok(())
}

#[test]
fn empty_and_oversized_keys() -> TestResult {
    on_both(|f| {
        let long = vec![b'x'; MAX_KEY_LEN + 1];
        let max = vec![b'y'; MAX_KEY_LEN];
        unchanged(f, || matches!(f.store.claim(""), Err(Error::EmptyKey)))?;
        unchanged(f, || {
            matches!(
                f.store.claim(&long),
                Err(Error::KeyTooLarge { len, max }) if len == MAX_KEY_LEN + 1 && max == MAX_KEY_LEN
            )
        })?;
        unchanged(f, || {
            matches!(f.store.mark_seen(&long), Err(Error::KeyTooLarge { .. }))
        })?;
        unchanged(f, || matches!(f.store.get(""), Err(Error::EmptyKey)))?;
        unchanged(f, || {
            matches!(f.store.expire(&long), Err(Error::KeyTooLarge { .. }))
        })?;
        unchanged(f, || {
            matches!(
                f.store
                    .claim_or_wait("", &ClaimOptions::new(), Duration::from_secs(1)),
                Err(Error::EmptyKey)
            )
        })?;
        unchanged(f, || {
            matches!(
                f.store.advance_sequence(&long, 1),
                Err(Error::KeyTooLarge { .. })
            )
        })?;
        // The limit itself is fine.
        assert!(f.store.claim(&max)?.is_acquired());
        Ok(())
    })
}

#[test]
fn oversized_responses() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        let too_big = vec![0u8; dedupe_store::DEFAULT_MAX_RESPONSE_BYTES + 1];
        unchanged(f, || {
            matches!(
                f.store.complete(&ticket, &too_big),
                Err(Error::ResponseTooLarge { len, .. }) if len == too_big.len()
            )
        })?;
        // The ticket still owns the key and can complete with a response that fits.
        f.store
            .complete(&ticket, vec![1u8; dedupe_store::DEFAULT_MAX_RESPONSE_BYTES])?;
        Ok(())
    })
}

#[test]
fn configured_response_limit() -> TestResult {
    let clock = dedupe_store::ManualClock::new(common::T0);
    let store = Fixture::builder(&clock).max_response_bytes(4).in_memory()?;
    let ticket = store.claim("k")?.ticket().ok_or("acquired")?;
    assert!(matches!(
        store.complete(&ticket, b"12345"),
        Err(Error::ResponseTooLarge { len: 5, max: 4 })
    ));
    store.complete(&ticket, b"1234")?;
    Ok(())
}

#[test]
fn oversized_fingerprints() -> TestResult {
    on_both(|f| {
        let options = ClaimOptions::new().fingerprint(vec![0u8; MAX_FINGERPRINT_LEN + 1]);
        unchanged(f, || {
            matches!(
                f.store.claim_with("k", &options),
                Err(Error::FingerprintTooLarge { .. })
            )
        })
    })
}

#[test]
fn zero_and_huge_durations() -> TestResult {
    on_both(|f| {
        for bad in [
            Duration::ZERO,
            MAX_DURATION + Duration::from_secs(1),
            Duration::MAX,
        ] {
            let is_invalid = |r: Result<_, Error>| matches!(r, Err(Error::InvalidDuration { .. }));
            unchanged(f, || {
                is_invalid(
                    f.store
                        .claim_with("k", &ClaimOptions::new().ttl(bad))
                        .map(|_| ()),
                )
            })?;
            unchanged(f, || {
                is_invalid(
                    f.store
                        .claim_with("k", &ClaimOptions::new().lease(bad))
                        .map(|_| ()),
                )
            })?;
            unchanged(f, || {
                is_invalid(f.store.mark_seen_with_ttl("m", bad).map(|_| ()))
            })?;
            unchanged(f, || {
                is_invalid(f.store.mark_seen_many_with_ttl(["m"], bad).map(|_| ()))
            })?;
            unchanged(f, || {
                is_invalid(
                    f.store
                        .advance_sequence_with("s", 1, &SequenceOptions::new().ttl(bad))
                        .map(|_| ()),
                )
            })?;
            let mut ticket = f.acquire("owned")?;
            unchanged(f, || {
                is_invalid(f.store.complete_with_ttl(&ticket, b"x", bad))
            })?;
            unchanged(f, || is_invalid(f.store.extend(&mut ticket, bad)))?;
            f.store.release(&ticket)?;
        }
        Ok(())
    })
}

#[test]
fn deadlines_that_overflow_the_clock() -> TestResult {
    on_both(|f| {
        let done = f.acquire("done")?;
        f.store.complete(&done, b"kept")?;
        let overflow = |r: Result<(), Error>| matches!(r, Err(Error::InvalidDuration { .. }));
        // Near the end of time, the store's 1 h TTL no longer fits.
        f.clock.set(u64::MAX - 1_000);
        assert!(overflow(f.store.claim("k").map(|_| ())));
        assert!(overflow(f.store.mark_seen("k").map(|_| ())));
        assert!(overflow(f.store.mark_seen_many(["a", "b"]).map(|_| ())));
        assert_eq!(f.store.len()?, 0, "nothing was written");
        // A claim that fits, then an extension and a completion that do not.
        f.clock.set(u64::MAX - 10_000_000);
        let short = ClaimOptions::new()
            .ttl(Duration::from_secs(1))
            .lease(Duration::from_secs(1));
        let mut owned = f
            .store
            .claim_with("owned", &short)?
            .ticket()
            .ok_or("acquired")?;
        assert!(overflow(f.store.extend(&mut owned, MAX_DURATION)));
        assert!(overflow(f.store.complete_with_ttl(
            &owned,
            b"x",
            MAX_DURATION
        )));
        assert!(f.store.get("owned")?.is_some_and(|e| e.is_in_progress()));
        f.store
            .complete_with_ttl(&owned, b"fine", Duration::from_secs(1))?;
        f.clock.set(common::T0);
        assert!(f.store.claim("k")?.is_acquired());
        Ok(())
    })
}

#[test]
fn a_ticket_of_another_store() -> TestResult {
    on_both(|f| {
        let other = Store::in_memory()?;
        let mut foreign = other.claim("k")?.ticket().ok_or("acquired")?;
        let _own = f.acquire("k")?;
        unchanged(f, || {
            matches!(
                f.store.complete(&foreign, b"x"),
                Err(Error::ForeignTicket { .. })
            )
        })?;
        unchanged(f, || {
            matches!(f.store.release(&foreign), Err(Error::ForeignTicket { .. }))
        })?;
        unchanged(f, || {
            matches!(
                f.store.extend(&mut foreign, Duration::from_secs(1)),
                Err(Error::ForeignTicket { .. })
            )
        })?;
        unchanged(f, || {
            matches!(
                f.store.checkpoint(&foreign, "step", b""),
                Err(Error::ForeignTicket { .. })
            )
        })?;
        // The other store is untouched by all this.
        other.complete(&foreign, b"fine")?;
        Ok(())
    })
}

#[test]
fn bad_builder_settings() -> TestResult {
    let invalid_duration =
        |b: dedupe_store::StoreBuilder| matches!(b.in_memory(), Err(Error::InvalidDuration { .. }));
    assert!(invalid_duration(Store::builder().ttl(Duration::ZERO)));
    assert!(invalid_duration(Store::builder().lease(Duration::ZERO)));
    assert!(invalid_duration(Store::builder().lease(Duration::MAX)));
    assert!(invalid_duration(
        Store::builder().sweep_interval(Duration::ZERO)
    ));
    assert!(invalid_duration(
        Store::builder().durability(dedupe_store::Durability::Periodic(Duration::ZERO))
    ));
    assert!(matches!(
        Store::builder().max_response_bytes(usize::MAX).in_memory(),
        Err(Error::InvalidConfig { .. })
    ));
    for records in [0, dedupe_store::MAX_SWEEP_BATCH_SIZE + 1, usize::MAX] {
        assert!(
            matches!(
                Store::builder().sweep_batch_size(records).in_memory(),
                Err(Error::InvalidConfig { .. })
            ),
            "sweep_batch_size({records}) was accepted"
        );
    }
    // A bad setting creates no file.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("never.redb");
    assert!(Store::builder().ttl(Duration::ZERO).open(&path).is_err());
    assert!(!path.exists());
    Ok(())
}

#[test]
fn the_largest_sweep_batch_sweeps() -> TestResult {
    let clock = dedupe_store::ManualClock::new(1_000);
    let store = Store::builder()
        .clock(clock.clone())
        .without_sweeper()
        .sweep_batch_size(dedupe_store::MAX_SWEEP_BATCH_SIZE)
        .in_memory()?;
    for key in ["a", "b", "c"] {
        assert!(store.mark_seen_with_ttl(key, Duration::from_millis(1))?);
    }
    clock.advance(Duration::from_millis(5));
    assert_eq!(store.sweep()?, 3);
    assert_eq!(store.stats()?.swept, 3);
    Ok(())
}

#[test]
fn errors_explain_themselves() -> TestResult {
    let store = Store::in_memory()?;
    let messages = [
        store.claim("").err().map(|e| e.to_string()),
        store.claim(vec![0u8; 2000]).err().map(|e| e.to_string()),
        store
            .claim_with("k", &ClaimOptions::new().ttl(Duration::ZERO))
            .err()
            .map(|e| e.to_string()),
    ];
    let expected = [
        "must not be empty",
        "2000 bytes long, over the limit of 1024",
        "invalid ttl",
    ];
    for (message, expected) in messages.iter().zip(expected) {
        let message = message.as_deref().ok_or("an error was expected")?;
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
    Ok(())
}
