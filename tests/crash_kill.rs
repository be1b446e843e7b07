//! The kill -9 loop. The test re-runs its own binary as a child that opens a store file and
//! hammers it from several threads (claims with short leases, completes, releases, abandoned
//! tickets completed late, marks and batch marks, the sweeper on), printing an acknowledgement
//! line only after each call returned `Ok`. The parent SIGKILLs the child at a random moment
//! (sometimes while it is still opening the file), reopens the file and checks (every other
//! child commits without quick repair, so both of redb's recovery paths run):
//!
//! - every acknowledged completion is there with its exact response;
//! - every acknowledged claim is in progress, completed, released or legitimately expired;
//! - no key was ever acquired by two owners with overlapping live leases;
//! - fencing tokens only increase, across every restart;
//! - `verify()` passes.
//!
//! `DEDUPE_CRASH_CYCLES` sets the number of kills (300 in CI); `DEDUPE_CRASH_SEED` replays a
//! run's kill times and workload choices (the timing of the threads differs anyway).

mod fault_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dedupe_store::testing::Rng;
use dedupe_store::{Claim, ClaimOptions, Clock, EntryState, ManualClock, Store, SystemClock};

use fault_support::{figure, knob};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const CHILD_PATH: &str = "DEDUPE_CRASH_CHILD";
const CHILD_CYCLE: &str = "DEDUPE_CRASH_CHILD_CYCLE";
const CHILD_SEED: &str = "DEDUPE_CRASH_CHILD_SEED";
const THREADS: u64 = 4;
const JOB_KEYS: u64 = 24;
const MSG_KEYS: u64 = 40;
const CLAIM_TTL: Duration = Duration::from_secs(2);
const MARK_TTL: Duration = Duration::from_millis(300);
const COMPLETE_TTL: Duration = Duration::from_secs(3600);
/// A child left running by a parent that died stops by itself.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

fn job_key(cycle: u64, index: u64) -> String {
    format!("job-{}-{index}", cycle / 3)
}

fn msg_key(cycle: u64, index: u64) -> String {
    format!("msg-{}-{index}", cycle / 2)
}

fn response_for(key: &str, token: u64) -> String {
    format!("r:{key}:{token}")
}

fn ack(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ack {line}");
    let _ = out.flush();
}

/// The child half: runs only when the parent starts this binary with the environment set.
#[test]
#[ignore = "the child half of the kill -9 loop; the parent test runs it"]
fn crash_kill_child() -> TestResult {
    let Ok(path) = std::env::var(CHILD_PATH) else {
        eprintln!("crash_kill_child only runs as the child of kill_nine_loop");
        return Ok(());
    };
    let cycle: u64 = std::env::var(CHILD_CYCLE)?.parse()?;
    let seed: u64 = std::env::var(CHILD_SEED)?.parse()?;
    // Every other child commits without quick repair, so the next open walks the whole file
    // (redb's full repair) instead of loading the saved allocator state.
    let store = Store::builder()
        .ttl(COMPLETE_TTL)
        .sweep_interval(Duration::from_millis(25))
        .quick_repair(cycle.is_multiple_of(2))
        .open(&path)?;
    ack(format_args!("ready"));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let store = store.clone();
            std::thread::spawn(move || worker(&store, cycle, seed.wrapping_add(thread)))
        })
        .collect();
    std::thread::sleep(CHILD_LIFETIME);
    drop(threads);
    std::process::exit(0);
}

fn worker(store: &Store, cycle: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut abandoned = Vec::new();
    loop {
        let roll = rng.below(100);
        if roll < 60 {
            let key = job_key(cycle, rng.below(JOB_KEYS));
            let lease = Duration::from_millis(30 + rng.below(120));
            let options = ClaimOptions::new().lease(lease).ttl(CLAIM_TTL);
            match store.claim_with(&key, &options) {
                Ok(Claim::Acquired(ticket)) => {
                    let ttl_until = ticket.claimed_at() + CLAIM_TTL.as_millis() as u64;
                    ack(format_args!(
                        "A {key} {} {} {} {}",
                        ticket.fencing_token(),
                        ticket.claimed_at(),
                        ticket.lease_until(),
                        ttl_until.max(ticket.lease_until())
                    ));
                    match rng.below(100) {
                        0..=54 => {
                            let response = response_for(&key, ticket.fencing_token());
                            if store.complete(&ticket, &response).is_ok() {
                                ack(format_args!("C {key} {}", ticket.fencing_token()));
                            }
                        }
                        55..=74 => {
                            ack(format_args!("r {key} {}", ticket.fencing_token()));
                            if store.release(&ticket).is_ok() {
                                ack(format_args!("R {key} {}", ticket.fencing_token()));
                            }
                        }
                        _ => {
                            if abandoned.len() >= 8 {
                                abandoned.remove(0);
                            }
                            abandoned.push(ticket);
                        }
                    }
                }
                Ok(Claim::Completed(outcome)) => {
                    let expected = response_for(&key, outcome.fencing_token);
                    if outcome.response != expected.as_bytes() {
                        ack(format_args!("X {key} replayed a wrong response"));
                    }
                }
                Ok(_) | Err(_) => {}
            }
        } else if roll < 68 {
            if abandoned.is_empty() {
                continue;
            }
            let ticket = abandoned.remove(rng.below_usize(abandoned.len()));
            let key = String::from_utf8_lossy(ticket.key().as_bytes()).into_owned();
            let response = response_for(&key, ticket.fencing_token());
            if store.complete(&ticket, &response).is_ok() {
                ack(format_args!("C {key} {}", ticket.fencing_token()));
            }
        } else if roll < 95 {
            let key = msg_key(cycle, rng.below(MSG_KEYS));
            let before = SystemClock.now_millis();
            if let Ok(true) = store.mark_seen_with_ttl(&key, MARK_TTL) {
                ack(format_args!(
                    "M {key} {}",
                    before + MARK_TTL.as_millis() as u64
                ));
            }
        } else {
            let keys: Vec<String> = (0..3)
                .map(|_| msg_key(cycle, rng.below(MSG_KEYS)))
                .collect();
            let before = SystemClock.now_millis();
            if let Ok(fresh) = store.mark_seen_many_with_ttl(&keys, MARK_TTL) {
                for (key, fresh) in keys.iter().zip(fresh) {
                    if fresh {
                        ack(format_args!(
                            "M {key} {}",
                            before + MARK_TTL.as_millis() as u64
                        ));
                    }
                }
            }
        }
    }
}

/// An acknowledged claim.
#[derive(Debug, Clone, Copy)]
struct Acquired {
    token: u64,
    claimed_at: u64,
    lease_until: u64,
    expires_at: u64,
}

/// What the children acknowledged about one key, over the whole run.
#[derive(Debug, Default)]
struct KeyLog {
    claims: Vec<Acquired>,
    completed: Option<u64>,
    release_intents: BTreeSet<u64>,
    /// For a mark: the earliest it may expire.
    marked_until: Option<u64>,
}

#[derive(Default)]
struct Log {
    keys: BTreeMap<String, KeyLog>,
    max_token: u64,
    acknowledgements: u64,
}

impl Log {
    /// Takes one child's acknowledgements. A line cut short by the kill is ignored.
    fn take(&mut self, output: &[u8]) -> Result<Vec<String>, String> {
        let text = String::from_utf8_lossy(output);
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        let floor = self.max_token;
        let mut touched = Vec::new();
        for line in complete.lines() {
            let Some(fields) = line.strip_prefix("ack ") else {
                continue;
            };
            let fields: Vec<&str> = fields.split(' ').collect();
            let number = |index: usize| -> Result<u64, String> {
                fields
                    .get(index)
                    .and_then(|field| field.parse().ok())
                    .ok_or_else(|| format!("a malformed acknowledgement: {line}"))
            };
            match fields[0] {
                "ready" => continue,
                "X" => return Err(format!("the child saw a violation: {line}")),
                "A" => {
                    let claim = Acquired {
                        token: number(2)?,
                        claimed_at: number(3)?,
                        lease_until: number(4)?,
                        expires_at: number(5)?,
                    };
                    if claim.token <= floor {
                        return Err(format!(
                            "token {} acknowledged after a restart, not above the {floor} \
                             acknowledged before it",
                            claim.token
                        ));
                    }
                    self.max_token = self.max_token.max(claim.token);
                    let log = self.keys.entry(fields[1].to_string()).or_default();
                    if log.claims.iter().any(|other| other.token == claim.token) {
                        return Err(format!("token {} acknowledged twice", claim.token));
                    }
                    log.claims.push(claim);
                }
                "C" => {
                    self.keys
                        .entry(fields[1].to_string())
                        .or_default()
                        .completed = Some(number(2)?)
                }
                "r" => {
                    self.keys
                        .entry(fields[1].to_string())
                        .or_default()
                        .release_intents
                        .insert(number(2)?);
                }
                "R" => {}
                "M" => {
                    self.keys
                        .entry(fields[1].to_string())
                        .or_default()
                        .marked_until = Some(number(2)?);
                }
                other => return Err(format!("an unknown acknowledgement {other}: {line}")),
            }
            self.acknowledgements += 1;
            touched.push(fields[1].to_string());
        }
        Ok(touched)
    }
}

/// Checks one key's record in the reopened file against what was acknowledged. `store` reads
/// with a clock at zero, so it shows every record the file holds, expired or not; `now` is
/// the real time, after the child died.
fn check_key(store: &Store, key: &str, log: &mut KeyLog, now: u64) -> Result<(), String> {
    let entry = store
        .get(key)
        .map_err(|err| format!("get({key}) after a kill: {err}"))?;
    log.claims.sort_by_key(|claim| claim.token);
    for pair in log.claims.windows(2) {
        let (first, second) = (pair[0], pair[1]);
        if second.claimed_at < first.lease_until
            && !log.release_intents.contains(&first.token)
            && log.completed != Some(first.token)
        {
            return Err(format!(
                "{key}: token {} was acquired at {} while token {} held a live lease until {}",
                second.token, second.claimed_at, first.token, first.lease_until
            ));
        }
    }
    if let Some(response) = entry.as_ref().and_then(|entry| match &entry.state {
        EntryState::Completed { response, .. } => Some(response),
        _ => None,
    }) {
        let token = entry.as_ref().map_or(0, |entry| entry.fencing_token);
        let marked = key.starts_with("msg-") && response.is_empty();
        if !marked && response != response_for(key, token).as_bytes() {
            return Err(format!("{key}: holds a wrong response {response:?}"));
        }
    }
    if let Some(token) = log.completed {
        return match &entry {
            Some(entry) if entry.fencing_token == token && entry.is_completed() => Ok(()),
            other => Err(format!(
                "{key}: completion by token {token} was acknowledged, the file holds {other:?}"
            )),
        };
    }
    if let Some(last) = log.claims.last() {
        match &entry {
            Some(entry) if entry.fencing_token >= last.token => {}
            Some(entry) => {
                return Err(format!(
                    "{key}: claim token {} was acknowledged, the file holds the older {entry:?}",
                    last.token
                ));
            }
            None => {
                let released = log.release_intents.range(last.token..).next().is_some();
                if !released && now < last.expires_at {
                    return Err(format!(
                        "{key}: claim token {} (expiring at {}) was acknowledged and is gone at \
                         {now}",
                        last.token, last.expires_at
                    ));
                }
            }
        }
    }
    if let Some(until) = log.marked_until
        && entry.is_none()
        && now < until
    {
        return Err(format!(
            "{key}: marked until at least {until}, gone at {now}"
        ));
    }
    Ok(())
}

/// Kills the child on the way out of a failing parent.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(path: &Path, cycle: u64, seed: u64) -> Result<Reaper, std::io::Error> {
    let child = Command::new(std::env::current_exe()?)
        .args([
            "crash_kill_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_PATH, path)
        .env(CHILD_CYCLE, cycle.to_string())
        .env(CHILD_SEED, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Reaper(child))
}

/// Runs one child to a random kill; returns its output.
fn one_cycle(
    path: &Path,
    cycle: u64,
    rng: &mut Rng,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let mut child = spawn_child(path, cycle, rng.next_u64())?;
    let mut stdout = child.0.stdout.take().ok_or("the child has no stdout")?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut output = Vec::new();
        let mut chunk = [0u8; 8192];
        let mut ready = Some(ready_tx);
        while let Ok(read) = stdout.read(&mut chunk) {
            if read == 0 {
                break;
            }
            output.extend_from_slice(&chunk[..read]);
            if output.windows(9).any(|w| w == b"ack ready")
                && let Some(ready) = ready.take()
            {
                let _ = ready.send(());
            }
        }
        output
    });
    if rng.chance(15) {
        // Kill it while it may still be opening (and repairing) the file.
        std::thread::sleep(Duration::from_millis(rng.below(40)));
    } else {
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| "the child did not open the store within 20 s")?;
        std::thread::sleep(Duration::from_millis(10 + rng.below(140)));
    }
    child.0.kill()?;
    child.0.wait()?;
    let output = reader.join().map_err(|_| "the reader thread panicked")?;
    Ok(output)
}

fn check_file(path: &Path, log: &mut Log, keys: &[String]) -> Result<Duration, String> {
    let opening = Instant::now();
    let store = Store::builder()
        .clock(ManualClock::new(0))
        .without_sweeper()
        .open(path)
        .map_err(|err| format!("the store did not reopen after a kill: {err}"))?;
    let reopen = opening.elapsed();
    store
        .verify()
        .map_err(|err| format!("verify after a kill: {err}"))?;
    let now = SystemClock.now_millis();
    for key in keys {
        if let Some(key_log) = log.keys.get_mut(key) {
            check_key(&store, key, key_log, now)?;
        }
    }
    store
        .close()
        .map_err(|err| format!("close after checking: {err}"))?;
    Ok(reopen)
}

#[test]
fn kill_nine_loop() -> TestResult {
    let started = Instant::now();
    let cycles = knob("DEDUPE_CRASH_CYCLES", 300);
    let seed = knob("DEDUPE_CRASH_SEED", SystemClock.now_millis());
    eprintln!("[crash_kill] seed {seed} (DEDUPE_CRASH_SEED={seed} replays the kill times)");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir()?;
    let path: PathBuf = dir.path().join("crash.redb");
    let mut log = Log::default();
    let mut slowest_reopen = Duration::ZERO;
    for cycle in 0..cycles {
        let output = one_cycle(&path, cycle, &mut rng)?;
        let touched = log
            .take(&output)
            .map_err(|err| format!("cycle {cycle}: {err}"))?;
        let keys: Vec<String> = if cycle % 25 == 24 || cycle + 1 == cycles {
            log.keys.keys().cloned().collect()
        } else {
            touched
                .into_iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let reopen = check_file(&path, &mut log, &keys)
            .map_err(|err| format!("cycle {cycle} (seed {seed}): {err}"))?;
        slowest_reopen = slowest_reopen.max(reopen);
    }
    let claims: usize = log.keys.values().map(|key| key.claims.len()).sum();
    let completions = log
        .keys
        .values()
        .filter(|key| key.completed.is_some())
        .count();
    assert!(
        claims > 0 && completions > 0,
        "the children acknowledged no work"
    );
    figure(
        "crash_kill",
        &format!(
            "{cycles} kills, {} acknowledgements ({claims} claims, {completions} completions) \
             checked, slowest reopen {slowest_reopen:?}",
            log.acknowledgements
        ),
        started,
    );
    Ok(())
}
