//! I/O errors and a full disk: the Nth write, set_len or sync_data fails with EIO or ENOSPC,
//! for every N over a workload. The failing call must return an error, nothing unacknowledged
//! may show as done, the store must reopen redb by itself and go on, and every acknowledged
//! record must be intact (checked against the model, then after a power cut that keeps only
//! what is durable). Then once on a real full filesystem.
//!
//! `DEDUPE_FAULT_SEEDS` and `DEDUPE_FAULT_RANDOM` raise the counts.

mod fault_support;

use std::process::Command;
use std::time::{Duration, Instant};

use dedupe_store::testing::{
    Arm, Fate, Fault, IoCall, IoFailure, Rng, RunOptions, SimDisk, Step, run, run_armed, run_with,
};
use dedupe_store::{Claim, ClaimOptions, Store};

use fault_support::{Watchdog, concurrent, figure, knob, workload};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const CALLS: [IoCall; 3] = [IoCall::Write, IoCall::SetLen, IoCall::Sync];
const FAILURES: [IoFailure; 2] = [IoFailure::Eio, IoFailure::Enospc];

#[test]
fn every_write_set_len_and_sync_fails_in_turn() -> TestResult {
    let _watchdog = Watchdog::new("io_faults::every_write_set_len_and_sync_fails_in_turn");
    let started = Instant::now();
    let seeds = knob("DEDUPE_FAULT_SEEDS", 2);
    let (mut runs, mut fired, mut failed_calls) = (0u64, 0u64, 0usize);
    for seed in 0..seeds {
        let steps = workload::small(1000 + seed, 24);
        let io = run(&steps, false)?.io;
        for call in CALLS {
            for nth in 1..=io.of(call) {
                for failure in FAILURES {
                    let fault = Fault {
                        call,
                        nth,
                        times: 1,
                        failure,
                    };
                    let report = run_armed(&steps, false, Arm::Fault(fault))
                        .map_err(|err| format!("seed {seed}, {fault:?}: {err}"))?;
                    // redb retries a failed write-buffer eviction at the commit's flush, so
                    // not every failed write fails a call. The last few calls of a run may not
                    // happen at all: the order of a batch's keys, and with it the page layout,
                    // varies between runs.
                    if report.io.failed > 0 {
                        fired += 1;
                    }
                    failed_calls += report.failed_calls;
                    runs += 1;
                }
            }
        }
    }
    figure(
        "io_faults",
        &format!("{runs} single faults, {fired} fired, {failed_calls} failed calls"),
        started,
    );
    assert!(
        fired * 100 >= runs * 95,
        "only {fired} of {runs} faults fired"
    );
    Ok(())
}

#[test]
fn a_disk_that_stays_full_for_a_while() -> TestResult {
    let _watchdog = Watchdog::new("io_faults::a_disk_that_stays_full_for_a_while");
    let started = Instant::now();
    let mut rng = Rng::new(7);
    let runs = knob("DEDUPE_FAULT_FULL", 150);
    for index in 0..runs {
        let steps = workload::small(rng.next_u64(), 30);
        let fault = Fault {
            call: CALLS[rng.below_usize(2)],
            nth: 1 + rng.below(80),
            times: 2 + rng.below(6),
            failure: IoFailure::Enospc,
        };
        run_armed(&steps, false, Arm::Fault(fault))
            .map_err(|err| format!("run {index}, {fault:?}: {err}"))?;
    }
    figure("io_faults", &format!("{runs} full-disk spells"), started);
    Ok(())
}

#[test]
fn faults_and_power_cuts_mixed_into_random_workloads() -> TestResult {
    let _watchdog = Watchdog::new("io_faults::faults_and_power_cuts_mixed_into_random_workloads");
    let started = Instant::now();
    let mut rng = Rng::new(0xfa17);
    let runs = knob("DEDUPE_FAULT_RANDOM", 300);
    let mut report_total = (0usize, 0usize);
    for index in 0..runs {
        let seed = rng.next_u64();
        let mut steps = workload::small(seed, 40);
        for _ in 0..1 + rng.below(5) {
            let at = rng.below_usize(steps.len());
            let step = if rng.chance(80) {
                Step::Fail {
                    call: CALLS[rng.below_usize(3)],
                    nth: rng.byte(),
                    times: rng.byte(),
                    failure: FAILURES[rng.below_usize(2)],
                }
            } else {
                Step::PowerCut {
                    at_sync: rng.byte(),
                    seed: rng.byte(),
                }
            };
            steps.insert(at, step);
        }
        let report = run(&steps, true).map_err(|err| format!("run {index}, seed {seed}: {err}"))?;
        report_total.0 += report.failed_calls;
        report_total.1 += report.power_cuts;
    }
    figure(
        "io_faults",
        &format!(
            "{runs} random runs: {} failed calls, {} power cuts",
            report_total.0, report_total.1
        ),
        started,
    );
    Ok(())
}

/// Mounts a small tmpfs, or says why not.
struct SmallFilesystem {
    dir: tempfile::TempDir,
}

impl SmallFilesystem {
    fn mount(size: &str) -> Result<SmallFilesystem, String> {
        let dir = tempfile::tempdir().map_err(|err| err.to_string())?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map_err(|err| format!("cannot run mount: {err}"))?;
        if !status.success() {
            return Err(format!("mount -t tmpfs failed ({status}); this needs root"));
        }
        Ok(SmallFilesystem { dir })
    }

    fn resize(&self, size: &str) -> Result<(), String> {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .map_err(|err| err.to_string())?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("remount failed: {status}"))
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_real_full_filesystem() -> TestResult {
    let _watchdog = Watchdog::new("io_faults::a_real_full_filesystem");
    let filesystem = match SmallFilesystem::mount("3m") {
        Ok(filesystem) => filesystem,
        Err(reason) => {
            eprintln!("[io_faults] skipping the real full filesystem: {reason}");
            return Ok(());
        }
    };
    let path = filesystem.dir.path().join("full.redb");
    let store = Store::builder()
        .lease(Duration::from_secs(60))
        .without_sweeper()
        .open(&path)?;
    let mut acknowledged = Vec::new();
    let mut refusals = 0;
    for index in 0..2_000 {
        let key = format!("job-{index}");
        let response = vec![(index % 251) as u8; 32 * 1024];
        let outcome = match store.claim_with(&key, &ClaimOptions::new()) {
            Ok(Claim::Acquired(ticket)) => store.complete(&ticket, &response),
            Ok(other) => return Err(format!("fresh key {key} answered {other:?}").into()),
            Err(err) => Err(err),
        };
        match outcome {
            Ok(()) => acknowledged.push((key, response)),
            Err(err) => {
                assert!(
                    err.is_storage(),
                    "a full disk is a storage error, got {err:?}"
                );
                refusals += 1;
                if refusals >= 5 {
                    break;
                }
            }
        }
    }
    assert!(refusals > 0, "3 MiB never filled up");
    assert!(!acknowledged.is_empty());
    // Reads still work on a full disk, and every acknowledged outcome is there.
    for (key, response) in &acknowledged {
        let entry = store.get(key)?.ok_or_else(|| format!("{key} lost"))?;
        assert_eq!(entry.outcome().map(|o| o.response).as_ref(), Some(response));
    }
    // Space comes back: the same store goes on writing, without being reopened by the caller.
    filesystem.resize("64m")?;
    let Claim::Acquired(ticket) = store.claim("after-the-disk-filled")? else {
        return Err("a fresh claim after freeing space was not acquired".into());
    };
    store.complete(&ticket, b"done")?;
    store.close()?;
    let store = Store::open(&path)?;
    store.verify()?;
    for (key, response) in &acknowledged {
        let entry = store
            .get(key)?
            .ok_or_else(|| format!("{key} lost after reopen"))?;
        assert_eq!(entry.outcome().map(|o| o.response).as_ref(), Some(response));
    }
    eprintln!(
        "[io_faults] real full filesystem: {} completes acknowledged, {refusals} refused with ENOSPC",
        acknowledged.len()
    );
    Ok(())
}

/// A failed fsync on Linux may mark the pages it failed to write clean ("fsyncgate"): reads
/// still see them, no later fsync writes them, a power cut loses them. Run with one-phase
/// commits (the default) and with quick repair's two phases: the one-phase run fails unless
/// the backend writes the last synced header back after the failure (`src/backend.rs`).
#[test]
fn a_failed_sync_that_forgets_its_writes() -> TestResult {
    let _watchdog = Watchdog::new("io_faults::a_failed_sync_that_forgets_its_writes");
    let started = Instant::now();
    let (mut runs, mut failures) = (0, Vec::new());
    for seed in 0..knob("DEDUPE_FAULT_FSYNCGATE", 4) {
        let steps = workload::small(2000 + seed, 24);
        for quick_repair in [true, false] {
            let options = RunOptions::default().quick_repair(quick_repair);
            let syncs = run_with(&steps, false, Arm::Nothing, options)?.io.syncs;
            for nth in 1..=syncs {
                let fault = Fault {
                    call: IoCall::Sync,
                    nth,
                    times: 1,
                    failure: IoFailure::Eio,
                };
                runs += 1;
                if let Err(err) = run_with(&steps, false, Arm::FaultForgetting(fault), options) {
                    failures.push(format!(
                        "seed {seed}, quick repair {quick_repair}, sync {nth}: {err}"
                    ));
                }
            }
        }
    }
    figure(
        "io_faults",
        &format!(
            "{runs} forgetting sync failures, {} lost data",
            failures.len()
        ),
        started,
    );
    match failures.first() {
        Some(first) => Err(format!(
            "{} of {runs} runs failed; the first: {first}",
            failures.len()
        )
        .into()),
        None => Ok(()),
    }
}

/// Four threads write at once while an I/O call fails: every caller of the failed batch gets
/// the error, the store reopens redb and the writers go on, and after a power cut that keeps
/// only what is durable everything acknowledged is there.
#[test]
fn concurrent_writers_through_failing_io() -> TestResult {
    let _watchdog = Watchdog::new("io_faults::concurrent_writers_through_failing_io");
    let started = Instant::now();
    let runs = knob("DEDUPE_FAULT_CONCURRENT", 150);
    let mut rng = Rng::new(99);
    let (mut failed, mut acknowledged_total) = (0, 0);
    for index in 0..runs {
        let disk = SimDisk::new();
        let store = concurrent::open(&disk)?;
        let fault = Fault {
            call: CALLS[rng.below_usize(3)],
            nth: 1 + rng.below(150),
            times: 1 + rng.below(4),
            failure: FAILURES[rng.below_usize(2)],
        };
        disk.arm(fault);
        let seed = rng.next_u64();
        let acknowledged = concurrent::write(&store, 4, 40, seed, false);
        disk.cut_power(Fate::DropAll);
        drop(store);
        let image = disk.power_cut_image().ok_or("no power cut")?;
        concurrent::check(image, &acknowledged)
            .map_err(|err| format!("run {index}, seed {seed}, {fault:?}: {err}"))?;
        failed += acknowledged.failed;
        acknowledged_total += acknowledged.completed.len() + acknowledged.marked.len();
    }
    figure(
        "io_faults",
        &format!(
            "{runs} faults under four concurrent writers: {failed} failed calls, \
             {acknowledged_total} acknowledged writes checked"
        ),
        started,
    );
    assert!(failed > 0, "no call failed");
    Ok(())
}

/// Under `Durability::Periodic`, a failed flush makes the store reopen redb, which goes back
/// to the last durable commit. The commits of the interval before it were acknowledged and the
/// process did not crash: they must survive, and their fencing tokens must not be handed out
/// again.
#[test]
fn a_failed_periodic_flush_keeps_the_interval_acknowledged_before_it() -> TestResult {
    let interval = Duration::from_millis(100);
    for attempt in 0..20 {
        let disk = SimDisk::new();
        let store = Store::builder()
            .clock(dedupe_store::ManualClock::new(1_700_000_000_000))
            .without_sweeper()
            .durability(dedupe_store::Durability::Periodic(interval))
            .open_backend(disk.clone())?;
        let syncs = disk.counts().of(IoCall::Sync);
        let first = store.claim("first")?.ticket().ok_or("a fresh key")?;
        assert!(store.mark_seen("seen")?);
        if disk.counts().of(IoCall::Sync) != syncs {
            // The interval ran out before these writes (a slow machine): they were durable
            // and prove nothing. Try again.
            eprintln!("attempt {attempt}: the writes were durable, trying again");
            continue;
        }
        // The interval's durable commit (the background flush) fails its fsync.
        disk.arm(Fault {
            call: IoCall::Sync,
            nth: 1,
            times: 1,
            failure: IoFailure::Eio,
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while disk.counts().failed == 0 {
            if Instant::now() > deadline {
                return Err("the interval's flush never ran".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        disk.disarm();
        // The flush's thread reopens redb; a write that comes in before may still be refused.
        let next = retried(|| store.claim("next"))?
            .ticket()
            .ok_or("a fresh key")?;
        let entry = store
            .get("first")?
            .ok_or("the acknowledged claim was lost")?;
        assert_eq!(entry.fencing_token, first.fencing_token());
        assert!(!store.mark_seen("seen")?, "an acknowledged mark was lost");
        // The owner still owns its key, and new tokens are larger than every one handed out.
        assert!(matches!(store.claim("first")?, Claim::InProgress { .. }));
        assert!(next.fencing_token() > first.fencing_token());
        store.complete(&first, b"done")?;
        store.close()?;
        // And it all reached the disk.
        let reopened = Store::builder()
            .without_sweeper()
            .clock(dedupe_store::ManualClock::new(1_700_000_000_000))
            .open_backend(SimDisk::from_image(disk.durable_image()))?;
        assert!(matches!(reopened.claim("first")?, Claim::Completed(_)));
        assert!(!reopened.mark_seen("seen")?);
        return Ok(());
    }
    Err("the interval's writes were durable in every attempt".into())
}

/// Runs `op` until it succeeds, up to a few times: for a call that may land while the store is
/// still reopening after a failed commit.
fn retried<T>(op: impl Fn() -> dedupe_store::Result<T>) -> dedupe_store::Result<T> {
    let mut tries = 0;
    loop {
        match op() {
            Err(_) if tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}
