//! The background sweeper: removes expired records on its interval, stops and is joined when
//! the last handle drops or on close, and leaves no thread and no file lock behind.

mod common;

use std::time::{Duration, Instant};

use common::{T0, TestResult};
use dedupe_store::{ManualClock, Store};

/// The threads of this process named like the sweeper.
fn sweeper_threads() -> TestResult<usize> {
    let mut count = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        if comm.trim() == "dedupe-sweeper" {
            count += 1;
        }
    }
    Ok(count)
}

/// Whether exactly `n` sweeper threads run, allowing a new thread the moment it takes to
/// name itself.
fn sweepers_settle_at(n: usize) -> TestResult<bool> {
    eventually(|| Ok(sweeper_threads()? == n))
}

/// Polls `condition` for up to 20 s (a generous bound: the sweeper runs every 10 ms here).
fn eventually(mut condition: impl FnMut() -> TestResult<bool>) -> TestResult<bool> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if condition()? {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(false)
}

// One test function, so that no other test's store runs a sweeper thread meanwhile.
#[test]
fn the_sweeper_sweeps_and_is_joined_on_drop_and_close() -> TestResult {
    assert_eq!(sweeper_threads()?, 0);

    // It removes expired records in the background, in batches, leaving live ones.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sweeper.redb");
    let clock = ManualClock::new(T0);
    let store = Store::builder()
        .clock(clock.clone())
        .sweep_interval(Duration::from_millis(10))
        .sweep_batch_size(64)
        .open(&path)?;
    assert!(sweepers_settle_at(1)?);
    let keys: Vec<String> = (0..1000).map(|i| format!("m{i}")).collect();
    store.mark_seen_many_with_ttl(&keys, Duration::from_secs(60))?;
    store.mark_seen("lives-on")?;
    clock.advance(Duration::from_secs(60));
    assert!(
        eventually(|| Ok(store.stats()?.swept == 1000))?,
        "the sweeper did not remove the expired records"
    );
    let stats = store.stats()?;
    assert_eq!(stats.expired_pending, 0);
    assert_eq!(stats.live_keys, 1);
    assert_eq!(stats.sweeper_errors, 0);

    // While a writer is busy the sweeper pauses between batches, and still clears a backlog.
    let keys: Vec<String> = (0..2000).map(|i| format!("backlog{i}")).collect();
    store.mark_seen_many_with_ttl(&keys, Duration::from_secs(60))?;
    clock.advance(Duration::from_secs(60));
    let writing = std::sync::atomic::AtomicBool::new(true);
    let cleared = std::thread::scope(|scope| {
        let writer = scope.spawn(|| -> Result<u64, dedupe_store::Error> {
            let mut written = 0;
            while writing.load(std::sync::atomic::Ordering::Acquire) {
                store.mark_seen(format!("fresh{written}"))?;
                written += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(written)
        });
        let cleared = eventually(|| Ok(store.stats()?.swept == 3000));
        writing.store(false, std::sync::atomic::Ordering::Release);
        let written = writer.join().map_err(|_| "the writer panicked")??;
        assert!(written > 0);
        cleared
    })?;
    assert!(cleared, "the sweeper starved behind a busy writer");
    assert_eq!(store.stats()?.expired_pending, 0);

    // Clones share one sweeper; it stops when the last one drops, and the file is free.
    let clone = store.clone();
    drop(store);
    assert_eq!(sweeper_threads()?, 1);
    drop(clone);
    assert_eq!(
        sweeper_threads()?,
        0,
        "the sweeper outlived the last handle"
    );
    let store = Store::builder()
        .clock(clock.clone())
        .sweep_interval(Duration::from_secs(3600))
        .open(&path)?;
    assert!(sweepers_settle_at(1)?);

    // close() stops it at once, even with a long interval.
    let started = Instant::now();
    store.close()?;
    assert_eq!(sweeper_threads()?, 0);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "close waited for the interval"
    );

    // No sweeper at all when asked.
    let store = Store::builder().without_sweeper().open(&path)?;
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(sweeper_threads()?, 0);
    drop(store);
    Ok(())
}
