//! The operator's tools: compacting the file, verifying it, listing and counting keys.

mod common;

use std::time::Duration;

use common::{Fixture, TestResult};

#[test]
fn compact_gives_space_back_after_churn_and_keeps_every_live_key() -> TestResult {
    let f = Fixture::on_file(|b| b)?;
    let path = f.path.clone().ok_or("file fixture")?;
    let response = vec![7u8; 4096];
    for i in 0..2_000 {
        let ticket = f.acquire(&format!("churn-{i}"))?;
        f.store
            .complete_with_ttl(&ticket, &response, Duration::from_secs(1))?;
    }
    let keep = f.acquire("keep")?;
    f.store.complete(&keep, b"kept")?;
    f.advance(Duration::from_secs(1));
    assert_eq!(f.store.sweep()?, 2_000);
    let before = std::fs::metadata(&path)?.len();
    assert!(f.store.compact()?, "there was space to give back");
    // redb may need a second pass to move the last pages.
    while f.store.compact()? {}
    let after = std::fs::metadata(&path)?.len();
    assert!(after < before / 2, "compact left {after} of {before} bytes");
    assert_eq!(f.store.len()?, 1);
    assert_eq!(
        f.store
            .get("keep")?
            .and_then(|e| e.outcome())
            .map(|o| o.response),
        Some(b"kept".to_vec())
    );
    assert_eq!(f.store.verify()?.records, 1);
    // Still writable.
    assert!(f.store.mark_seen("after-compact")?);
    Ok(())
}

#[test]
fn verify_reports_every_record_of_a_healthy_store() -> TestResult {
    common::on_both(|f| {
        for i in 0..100 {
            f.store.mark_seen(format!("m{i}"))?;
        }
        f.store.advance_sequence("stream", 3)?;
        let _busy = f.acquire("busy")?;
        let report = f.store.verify()?;
        assert_eq!(report.records, 102);
        assert!(!report.repaired);
        // Other calls proceed normally afterwards.
        assert!(!f.store.mark_seen("m1")?);
        Ok(())
    })
}

#[test]
fn len_and_is_empty_count_live_keys_only() -> TestResult {
    common::on_both(|f| {
        assert!(f.store.is_empty()?);
        f.store
            .mark_seen_with_ttl("short", Duration::from_secs(1))?;
        f.store.mark_seen("long")?;
        assert_eq!(f.store.len()?, 2);
        f.advance(Duration::from_secs(1));
        assert_eq!(
            f.store.len()?,
            1,
            "an expired record awaiting the sweeper is not counted"
        );
        f.store.expire("long")?;
        assert!(f.store.is_empty()?);
        Ok(())
    })
}
