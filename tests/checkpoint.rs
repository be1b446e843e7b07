//! Recovery points: a multi-step handler killed after any step resumes at the next one on
//! takeover, and each step's side effect happens exactly once.

mod common;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{LEASE, TestResult, on_both};
use dedupe_store::{
    Claim, ClaimOptions, EntryState, Error, MAX_CHECKPOINT_STATE, MAX_STEP_LEN, Store,
};

const STEPS: [&str; 3] = ["create-order", "charge-card", "send-mail"];
const CHILD_ENV: &str = "DEDUPE_CHECKPOINT_CHILD";
const KEY: &str = "checkout-42";
const CHILD_LEASE: Duration = Duration::from_millis(300);

/// Appends one line to the side-effect log and makes it durable: the "charge".
fn side_effect(log: &Path, line: &str) -> std::io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(log)?;
    writeln!(file, "{line}")?;
    file.sync_data()
}

/// The handler under test: runs the steps after the last checkpoint, recording each one, then
/// completes. With `stop_after` it announces that step and waits to be killed instead of going
/// on.
fn run_handler(store: &Store, log: &Path, stop_after: Option<usize>) -> TestResult<Vec<u8>> {
    let claim = store.claim_or_wait(
        KEY,
        &ClaimOptions::new().lease(CHILD_LEASE),
        Duration::from_secs(30),
    )?;
    let ticket = match claim {
        Claim::Acquired(ticket) => ticket,
        Claim::Completed(outcome) => return Ok(outcome.response),
        other => return Err(format!("unexpected claim: {other:?}").into()),
    };
    let resume_after = ticket
        .checkpoint()
        .and_then(|cp| STEPS.iter().position(|s| *s == cp.step));
    let mut state = ticket
        .checkpoint()
        .map(|cp| cp.state.clone())
        .unwrap_or_default();
    let first = resume_after.map_or(0, |done| done + 1);
    for (index, step) in STEPS.iter().enumerate().skip(first) {
        side_effect(log, step)?;
        state.extend_from_slice(step.as_bytes());
        state.push(b';');
        store.checkpoint(&ticket, step, &state)?;
        if stop_after == Some(index) {
            println!("checkpointed {index}");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
    }
    store.complete(&ticket, &state)?;
    Ok(state)
}

/// Not a test of its own: the child process, which runs the handler until it is killed.
#[test]
fn child_runs_the_handler() -> TestResult {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return Ok(());
    };
    let mut parts = spec.splitn(3, '|');
    let (Some(db), Some(log), Some(stop)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("bad {CHILD_ENV}: {spec}").into());
    };
    let store = Store::open(db)?;
    run_handler(&store, Path::new(log), Some(stop.parse()?))?;
    Ok(())
}

fn spawn_and_kill_after(db: &Path, log: &Path, step: usize) -> TestResult {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "child_runs_the_handler",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{}|{}|{step}", db.display(), log.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let marker = format!("checkpointed {step}");
    loop {
        let line = lines
            .next()
            .ok_or("the child exited before its checkpoint")??;
        if line.contains(&marker) {
            break;
        }
    }
    child.kill()?; // SIGKILL, mid-handler
    child.wait()?;
    Ok(())
}

fn side_effects(log: &Path) -> TestResult<Vec<String>> {
    Ok(std::fs::read_to_string(log)?
        .lines()
        .map(str::to_string)
        .collect())
}

#[test]
fn a_handler_killed_after_each_step_resumes_at_the_next_and_repeats_nothing() -> TestResult {
    for killed_after in 0..STEPS.len() {
        let dir = tempfile::tempdir()?;
        let db: PathBuf = dir.path().join("checkout.redb");
        let log = dir.path().join("side-effects.log");
        spawn_and_kill_after(&db, &log, killed_after)?;
        assert_eq!(side_effects(&log)?, STEPS[..=killed_after].to_vec());

        // The next worker waits out the dead owner's lease, takes over and resumes.
        let store = Store::open(&db)?;
        let response = run_handler(&store, &log, None)?;
        assert_eq!(
            side_effects(&log)?,
            STEPS.to_vec(),
            "killed after step {killed_after}: every side effect exactly once, in order"
        );
        assert_eq!(response, b"create-order;charge-card;send-mail;");
        let entry = store.get(KEY)?.ok_or("completed")?;
        assert_eq!(entry.attempt, 2, "one takeover");
        assert!(
            entry.is_completed(),
            "complete keeps the outcome and drops the checkpoint"
        );
        // A retry after completion replays.
        assert_eq!(run_handler(&store, &log, None)?, response);
        assert_eq!(side_effects(&log)?.len(), STEPS.len());
    }
    Ok(())
}

#[test]
fn a_takeover_carries_the_last_checkpoint_and_get_shows_it() -> TestResult {
    on_both(|f| {
        let first = f.acquire("k")?;
        assert!(first.checkpoint().is_none());
        f.store.checkpoint(&first, "one", b"s1")?;
        f.store.checkpoint(&first, "two", b"s2")?;
        let entry = f.store.get("k")?.ok_or("stored")?;
        match entry.state {
            EntryState::InProgress {
                checkpoint: Some(cp),
                ..
            } => {
                assert_eq!(
                    (cp.step.as_str(), cp.state.as_slice(), cp.recorded_at),
                    ("two", &b"s2"[..], f.now())
                );
            }
            other => return Err(format!("expected a checkpoint, got {other:?}").into()),
        }
        f.advance(LEASE);
        let second = f.acquire("k")?;
        let cp = second
            .checkpoint()
            .ok_or("the takeover carries the checkpoint")?;
        assert_eq!((cp.step.as_str(), cp.state.as_slice()), ("two", &b"s2"[..]));
        // The stale owner can no longer record progress.
        assert!(matches!(
            f.store.checkpoint(&first, "three", b""),
            Err(Error::LeaseLost { .. })
        ));
        // A takeover of the takeover still carries it.
        f.advance(LEASE);
        let third = f.acquire("k")?;
        assert_eq!(third.checkpoint().map(|c| c.step.as_str()), Some("two"));
        f.store.checkpoint(&third, "three", b"s3")?;
        f.store.complete(&third, b"done")?;
        let entry = f.store.get("k")?.ok_or("stored")?;
        assert!(entry.is_completed());
        Ok(())
    })
}

#[test]
fn released_and_expired_claims_forget_their_checkpoints() -> TestResult {
    on_both(|f| {
        let ticket = f.acquire("k")?;
        f.store.checkpoint(&ticket, "one", b"")?;
        f.store.release(&ticket)?;
        assert!(
            f.acquire("k")?.checkpoint().is_none(),
            "a release starts over"
        );
        f.store.expire("k")?;
        let ticket = f.acquire("k")?;
        f.store.checkpoint(&ticket, "one", b"")?;
        f.advance(common::TTL);
        assert!(
            f.acquire("k")?.checkpoint().is_none(),
            "an expired claim starts over"
        );
        Ok(())
    })
}

#[test]
fn checkpoint_and_extend_moves_the_lease_in_the_same_write() -> TestResult {
    on_both(|f| {
        let mut ticket = f.acquire("k")?;
        f.advance(Duration::from_secs(20));
        f.store
            .checkpoint_and_extend(&mut ticket, "step", b"x", Duration::from_secs(60))?;
        assert_eq!(ticket.lease_until(), f.now() + 60_000);
        f.advance(Duration::from_secs(59));
        assert!(matches!(f.store.claim("k")?, Claim::InProgress { .. }));
        // A plain checkpoint leaves the lease where it is.
        let before = ticket.lease_until();
        f.store.checkpoint(&ticket, "step-2", b"y")?;
        f.advance(Duration::from_secs(1));
        assert_eq!(f.now(), before);
        assert!(f.acquire("k")?.is_takeover());
        Ok(())
    })
}

#[test]
fn oversized_checkpoints_are_refused_and_change_nothing() -> TestResult {
    on_both(|f| {
        let mut ticket = f.acquire("k")?;
        let long_step = "s".repeat(MAX_STEP_LEN + 1);
        let big_state = vec![0u8; MAX_CHECKPOINT_STATE + 1];
        assert!(matches!(
            f.store.checkpoint(&ticket, &long_step, b""),
            Err(Error::CheckpointTooLarge { .. })
        ));
        assert!(matches!(
            f.store
                .checkpoint_and_extend(&mut ticket, "ok", &big_state, LEASE),
            Err(Error::CheckpointTooLarge { .. })
        ));
        assert!(matches!(
            f.store
                .checkpoint_and_extend(&mut ticket, "ok", b"", Duration::ZERO),
            Err(Error::InvalidDuration { .. })
        ));
        match f.store.get("k")?.ok_or("stored")?.state {
            EntryState::InProgress {
                checkpoint: None, ..
            } => {}
            other => return Err(format!("nothing should be recorded: {other:?}").into()),
        }
        f.store.checkpoint(
            &ticket,
            &"s".repeat(MAX_STEP_LEN),
            vec![1u8; MAX_CHECKPOINT_STATE],
        )?;
        Ok(())
    })
}
