//! A walk through the store on a real file: a retry storm, a crash and takeover, a replay, a
//! payload mismatch, a reopen and a sweep. Prints what happened at each step.
//!
//! Run with `cargo run --release --example tour [FILE]`; without FILE it uses a temporary one.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dedupe_store::{Claim, ClaimOptions, Store};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = match std::env::args_os().nth(1) {
        Some(path) => path.into(),
        None => dir.path().join("tour.redb"),
    };
    println!("store file: {}\n", path.display());
    let store = builder().open(&path)?;

    retry_storm(&store)?;
    crash_and_takeover(&store)?;
    mismatch(&store)?;
    let store = reopen(store, &path)?;
    sweep(&store)?;

    let stats = store.stats()?;
    println!("\n== stats since the reopen");
    println!(
        "  acquired {}, takeovers {}, replays {}, in progress {}, mismatches {}, completes {}, swept {}, live keys {}",
        stats.acquired,
        stats.takeovers,
        stats.replays,
        stats.in_progress,
        stats.mismatches,
        stats.completes,
        stats.swept,
        stats.live_keys
    );
    store.close()?;
    Ok(())
}

/// Short leases so the takeover shows quickly; the background sweeper is slowed down so the
/// sweep step below is the one that removes the expired ids.
fn builder() -> dedupe_store::StoreBuilder {
    Store::builder()
        .lease(Duration::from_millis(300))
        .sweep_interval(Duration::from_secs(60))
}

/// 32 clients retry the same payment at once: one charges, the rest are told to wait, and
/// every later retry gets the stored receipt.
fn retry_storm(store: &Store) -> Result<()> {
    println!("== a retry storm: 32 threads send payment pay-1 at the same moment");
    let start = Arc::new(Barrier::new(32));
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let store = store.clone();
            let start = start.clone();
            std::thread::spawn(move || -> dedupe_store::Result<&'static str> {
                start.wait();
                Ok(match store.claim("pay-1")? {
                    Claim::Acquired(ticket) => {
                        // The side effect runs exactly here, once.
                        std::thread::sleep(Duration::from_millis(20));
                        store.complete(&ticket, b"charged 42.00, receipt r-1001")?;
                        "acquired and charged"
                    }
                    Claim::InProgress { .. } => "told 409: in progress",
                    Claim::Completed(_) => "replayed the receipt",
                    Claim::Mismatch { .. } => "mismatch",
                })
            })
        })
        .collect();
    let mut tally = std::collections::BTreeMap::new();
    for thread in threads {
        let answer = thread.join().map_err(|_| "a client thread panicked")??;
        *tally.entry(answer).or_insert(0) += 1;
    }
    for (answer, count) in &tally {
        println!("  {count:>2} × {answer}");
    }
    if let Claim::Completed(outcome) = store.claim("pay-1")? {
        println!(
            "  a retry now replays: {:?} (attempt {}, expires at {})",
            String::from_utf8_lossy(&outcome.response),
            outcome.attempt,
            outcome.expires_at
        );
    }
    Ok(())
}

/// A worker claims a nightly job and dies without completing; once its lease runs out, the
/// next worker takes over with a larger fencing token.
fn crash_and_takeover(store: &Store) -> Result<()> {
    println!("\n== a crash and a takeover: job nightly-2026-11-22, lease 300 ms");
    let Claim::Acquired(crashed) = store.claim("nightly-2026-11-22")? else {
        return Err("the first worker should acquire the job".into());
    };
    println!(
        "  worker A acquired it (fencing token {}) and then crashed",
        crashed.fencing_token()
    );
    if let Claim::InProgress { retry_after, .. } = store.claim("nightly-2026-11-22")? {
        println!("  worker B is told it is in progress; retry after {retry_after:?}");
    }
    std::thread::sleep(Duration::from_millis(350));
    let Claim::Acquired(ticket) = store.claim("nightly-2026-11-22")? else {
        return Err("the lease ran out, so the next claim should take over".into());
    };
    println!(
        "  after the lease: worker B takes over (takeover: {}, attempt {}, fencing token {})",
        ticket.is_takeover(),
        ticket.attempt(),
        ticket.fencing_token()
    );
    match store.complete(&crashed, b"A's late result") {
        Err(err) => println!("  worker A comes back and tries to complete: {err}"),
        Ok(()) => return Err("a stale ticket must not complete".into()),
    }
    store.complete(&ticket, b"exported 1204 rows")?;
    println!("  worker B completes the job");
    Ok(())
}

/// The same idempotency key sent with a different request body is refused.
fn mismatch(store: &Store) -> Result<()> {
    println!("\n== a payload mismatch: key refund-9 reused with another amount");
    let first = ClaimOptions::new().fingerprint(b"amount=10.00");
    let Claim::Acquired(ticket) = store.claim_with("refund-9", &first)? else {
        return Err("refund-9 should be fresh".into());
    };
    store.complete(&ticket, b"refunded 10.00")?;
    let other = ClaimOptions::new().fingerprint(b"amount=99.00");
    match store.claim_with("refund-9", &other)? {
        Claim::Mismatch { completed, .. } => {
            println!(
                "  amount=99.00 with the same key: mismatch (completed: {completed}), answer 422"
            )
        }
        other => return Err(format!("expected a mismatch, got {other:?}").into()),
    }
    if let Claim::Completed(outcome) = store.claim_with("refund-9", &first)? {
        println!(
            "  amount=10.00 again: replay {:?}",
            String::from_utf8_lossy(&outcome.response)
        );
    }
    Ok(())
}

/// Everything acknowledged is still there after the file is closed and opened again.
fn reopen(store: Store, path: &std::path::Path) -> Result<Store> {
    println!("\n== close and reopen the file");
    store.close()?;
    let started = Instant::now();
    let store = builder().open(path)?;
    println!("  reopened in {:?}", started.elapsed());
    for key in ["pay-1", "nightly-2026-11-22", "refund-9"] {
        if let Some(entry) = store.get(key)?
            && let Some(outcome) = entry.outcome()
        {
            println!(
                "  {key}: completed, {:?}",
                String::from_utf8_lossy(&outcome.response)
            );
        }
    }
    let Claim::Acquired(ticket) = store.claim("after-reopen")? else {
        return Err("after-reopen should be fresh".into());
    };
    println!(
        "  a new claim gets fencing token {}: larger than any issued before the reopen",
        ticket.fencing_token()
    );
    store.release(&ticket)?;
    Ok(store)
}

/// Message ids marked with a short redelivery window are forgotten and swept once it passes.
fn sweep(store: &Store) -> Result<()> {
    println!("\n== dedupe of message ids, then a sweep");
    let ids: Vec<String> = (0..1000).map(|i| format!("msg-{i}")).collect();
    let window = Duration::from_millis(500);
    let fresh = store.mark_seen_many_with_ttl(&ids, window)?;
    let again = store.mark_seen_many_with_ttl(&ids[..10], window)?;
    let count_new = |marks: &[bool]| marks.iter().filter(|&&new| new).count();
    println!(
        "  a batch of {} ids in one write: {} new; a redelivery of 10 of them: {} new",
        ids.len(),
        count_new(&fresh),
        count_new(&again)
    );
    std::thread::sleep(window + Duration::from_millis(100));
    let before = store.stats()?;
    println!(
        "  after the TTL: {} live keys, {} expired records awaiting the sweeper",
        before.live_keys, before.expired_pending
    );
    let swept = store.sweep()?;
    println!(
        "  sweep removed {swept} records; {} live keys remain",
        store.len()?
    );
    Ok(())
}
