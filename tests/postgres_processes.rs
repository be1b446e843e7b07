//! The PostgreSQL engine shared by several OS processes, not only threads: claims raced from
//! three processes (and sequence numbers with them), an owner killed with SIGKILL and taken over by one of two racing processes,
//! `claim_or_wait` woken by a completion in another process, and two processes sweeping the
//! same expired records at once.
//!
//! Child processes are this test binary run again on one test, [`child_process`], which does
//! nothing unless `CHILD_ROLE` is set; the role and its parameters travel in environment
//! variables, and the child reports on stdout, one `word value...` line per fact.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dedupe_store::testing::postgres::{Probe, TestCluster};
use dedupe_store::{Claim, ClaimOptions, SeqCheck, Store};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// The environment variables a child reads.
const ROLE: &str = "CHILD_ROLE";
const URL: &str = "CHILD_URL";
const NAME: &str = "CHILD_NAME";
/// Wall-clock milliseconds at which racing children start, so they overlap.
const START_AT: &str = "CHILD_START_AT";

const RACE_KEYS: usize = 50;
const RACE_THREADS: usize = 4;
const KILLED_KEYS: usize = 10;
const SWEPT_KEYS: usize = 2_000;

fn race_key(i: usize) -> String {
    format!("race-{i}")
}

fn killed_key(i: usize) -> String {
    format!("killed-{i}")
}

/// A store over `url` as every process here opens it: the server's clock, no background
/// sweeper (sweeps are called where a test wants them), few connections.
fn open(url: &str) -> TestResult<Store> {
    Ok(Store::builder()
        .without_sweeper()
        .postgres_connections(4)
        .open_postgres(url)?)
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// Sleeps until the wall-clock time `START_AT` names (now when unset).
fn wait_for_start() {
    let start: u64 = std::env::var(START_AT)
        .ok()
        .and_then(|at| at.parse().ok())
        .unwrap_or(0);
    let now = unix_millis();
    if start > now {
        thread::sleep(Duration::from_millis(start - now));
    }
}

/// A child: this binary, on the child test alone, with `role` and the URL in its environment.
struct Spawned {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

fn spawn(role: &str, url: &str, name: &str, env: &[(&str, String)]) -> TestResult<Spawned> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(URL, url)
        .env(NAME, name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().ok_or("the child has no stdout")?;
    Ok(Spawned {
        child,
        lines: BufReader::new(stdout).lines(),
    })
}

impl Spawned {
    /// The reports (`REPORT:word value...`, split into words) up to and including the first
    /// `REPORT:<marker>`; the test harness's own output is dropped.
    fn read_until(&mut self, marker: &str) -> TestResult<Vec<Vec<String>>> {
        let mut facts = Vec::new();
        for line in self.lines.by_ref() {
            let line = line?;
            // The harness's `test child_process ... ` has no line end of its own, so the
            // first report follows it on the same line.
            let Some(at) = line.find("REPORT:") else {
                continue;
            };
            let words: Vec<String> = line[at..].split_whitespace().map(str::to_string).collect();
            let Some(first) = words.first() else {
                continue;
            };
            let done = first == &format!("REPORT:{marker}");
            facts.push(words);
            if done {
                return Ok(facts);
            }
        }
        Err(format!("the child ended before reporting {marker}").into())
    }

    /// Every report line to the end, after which the child must have succeeded.
    fn finish(mut self) -> TestResult<Vec<Vec<String>>> {
        let facts = self.read_until("done")?;
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("the child failed: {status}").into());
        }
        Ok(facts)
    }
}

/// One fact a child reports: `REPORT:<word> <values...>`.
fn report(word: &str, values: &[&dyn std::fmt::Display]) {
    let mut line = format!("REPORT:{word}");
    for value in values {
        line.push(' ');
        line.push_str(&value.to_string());
    }
    println!("{line}");
}

/// The child side of every test here; a no-op in a normal test run.
#[test]
fn child_process() -> TestResult {
    let Ok(role) = std::env::var(ROLE) else {
        return Ok(());
    };
    let url = std::env::var(URL)?;
    let name = std::env::var(NAME)?;
    match role.as_str() {
        "race" => race_child(&url, &name)?,
        "hold_and_die" => hold_and_die_child(&url)?,
        "complete_later" => complete_later_child(&url)?,
        "take_over" => take_over_child(&url)?,
        "sweep" => {
            let store = open(&url)?;
            wait_for_start();
            let swept = store.sweep()?;
            report("swept", &[&swept]);
        }
        other => return Err(format!("unknown role {other}").into()),
    }
    report("done", &[]);
    Ok(())
}

/// Four threads claim every race key, each in its own order; a winner completes with a
/// response naming itself and reports `won <key> <token> <response>`. Then the process reads
/// every key back and reports `replay <key> <response>`.
fn race_child(url: &str, name: &str) -> TestResult {
    let store = open(url)?;
    wait_for_start();
    thread::scope(|scope| -> TestResult {
        let workers: Vec<_> = (0..RACE_THREADS)
            .map(|t| {
                let store = &store;
                scope.spawn(move || -> Result<(), dedupe_store::Error> {
                    for step in 0..RACE_KEYS {
                        // A different walk over the keys per thread, so threads meet on keys
                        // at different moments.
                        let i = (step * (2 * t + 1) + 7 * t) % RACE_KEYS;
                        let key = race_key(i);
                        if let Claim::Acquired(ticket) = store.claim(&key)? {
                            let response = format!("{name}/thread-{t}");
                            store.complete(&ticket, &response)?;
                            report("won", &[&key, &ticket.fencing_token(), &response]);
                        }
                        // The same walk over one sequence stream: a number is accepted at
                        // most once, whoever offers it.
                        let seq = i as u64 + 1;
                        if store.advance_sequence("stream", seq)? == SeqCheck::Accepted {
                            report("accepted", &[&seq]);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| "a race thread panicked")??;
        }
        Ok(())
    })?;
    // Every other process may still be completing its keys: wait for each.
    for i in 0..RACE_KEYS {
        let key = race_key(i);
        let claim = store.claim_or_wait(&key, &ClaimOptions::new(), Duration::from_secs(20))?;
        let Claim::Completed(outcome) = claim else {
            return Err(format!("{key} is not completed: {claim:?}").into());
        };
        report("replay", &[&key, &String::from_utf8(outcome.response)?]);
    }
    Ok(())
}

/// Claims the killed keys with a 2 s lease, reports each token, reports `claimed` and then
/// hangs until it is killed.
fn hold_and_die_child(url: &str) -> TestResult {
    let store = open(url)?;
    let options = ClaimOptions::new().lease(Duration::from_secs(2));
    for i in 0..KILLED_KEYS {
        let key = killed_key(i);
        let Claim::Acquired(ticket) = store.claim_with(&key, &options)? else {
            return Err(format!("{key} is not acquired").into());
        };
        report("token", &[&key, &ticket.fencing_token()]);
    }
    report("claimed", &[]);
    // Never completes: the parent kills this process.
    thread::sleep(Duration::from_secs(120));
    Err("not killed".into())
}

/// Waits out the killed owner's leases and claims each of its keys; when this process wins
/// one, it reports `took <key> <token> <attempt> <is_takeover>` and completes it with
/// `recovered`. Keys the other taker won answer `Completed`.
fn take_over_child(url: &str) -> TestResult {
    let store = open(url)?;
    wait_for_start();
    for i in 0..KILLED_KEYS {
        let key = killed_key(i);
        match store.claim_or_wait(&key, &ClaimOptions::new(), Duration::from_secs(20))? {
            Claim::Acquired(ticket) => {
                report(
                    "took",
                    &[
                        &key,
                        &ticket.fencing_token(),
                        &ticket.attempt(),
                        &ticket.is_takeover(),
                    ],
                );
                store.complete(&ticket, b"recovered")?;
            }
            Claim::Completed(_) => {}
            other => return Err(format!("{key}: {other:?}").into()),
        }
    }
    Ok(())
}

/// Claims `waited` with a 60 s lease, reports `claimed`, and completes it a second later
/// with `from-child`.
fn complete_later_child(url: &str) -> TestResult {
    let store = open(url)?;
    let options = ClaimOptions::new().lease(Duration::from_secs(60));
    let Claim::Acquired(ticket) = store.claim_with("waited", &options)? else {
        return Err("waited is not acquired".into());
    };
    report("claimed", &[]);
    thread::sleep(Duration::from_secs(1));
    store.complete(&ticket, b"from-child")?;
    report("completed", &[]);
    Ok(())
}

/// A database of its own in a fresh cluster, or `None` to skip.
fn database(name: &str) -> Option<(TestCluster, String)> {
    let cluster = TestCluster::start()?;
    let url = cluster.create_database(name);
    Some((cluster, url))
}

#[test]
fn claims_and_sequence_numbers_raced_from_three_processes_have_one_winner_each() -> TestResult {
    let Some((_cluster, url)) = database("race") else {
        return Ok(());
    };
    // The schema is created once before the children race to open it.
    open(&url)?.close()?;
    let start = (unix_millis() + 1_500).to_string();
    let children = (0..3)
        .map(|p| {
            spawn(
                "race",
                &url,
                &format!("process-{p}"),
                &[(START_AT, start.clone())],
            )
        })
        .collect::<TestResult<Vec<_>>>()?;
    let mut winners: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut replays: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut accepted = BTreeSet::new();
    for child in children {
        for fact in child.finish()? {
            match fact.first().map(String::as_str) {
                Some("REPORT:won") => {
                    let [_, key, token, response] = fact.as_slice() else {
                        return Err(format!("malformed {fact:?}").into());
                    };
                    let previous = winners.insert(key.clone(), (token.parse()?, response.clone()));
                    assert!(
                        previous.is_none(),
                        "{key} acquired twice: {previous:?} and {response}"
                    );
                }
                Some("REPORT:accepted") => {
                    let [_, seq] = fact.as_slice() else {
                        return Err(format!("malformed {fact:?}").into());
                    };
                    let seq: u64 = seq.parse()?;
                    assert!(accepted.insert(seq), "sequence number {seq} accepted twice");
                }
                Some("REPORT:replay") => {
                    let [_, key, response] = fact.as_slice() else {
                        return Err(format!("malformed {fact:?}").into());
                    };
                    replays
                        .entry(key.clone())
                        .or_default()
                        .insert(response.clone());
                }
                _ => {}
            }
        }
    }
    assert_eq!(winners.len(), RACE_KEYS, "every key has a winner");
    let tokens: BTreeSet<u64> = winners.values().map(|(token, _)| *token).collect();
    assert_eq!(tokens.len(), RACE_KEYS, "no two winners share a token");
    assert_eq!(replays.len(), RACE_KEYS);
    // Whoever offered the highest number first found the mark below it.
    assert!(
        accepted.contains(&(RACE_KEYS as u64)),
        "the highest number is accepted: {accepted:?}"
    );
    for (key, (_, response)) in &winners {
        // Each of the three processes replayed the winner's response, and nothing else.
        assert_eq!(
            replays[key],
            BTreeSet::from([response.clone()]),
            "replays of {key}"
        );
    }
    Ok(())
}

#[test]
fn claims_of_a_killed_process_are_taken_over_once_with_larger_tokens() -> TestResult {
    let Some((_cluster, url)) = database("killed") else {
        return Ok(());
    };
    let mut holder = spawn("hold_and_die", &url, "holder", &[])?;
    let facts = holder.read_until("claimed")?;
    holder.child.kill()?;
    holder.child.wait()?;
    let mut dead_tokens = BTreeMap::new();
    for fact in &facts {
        if let [word, key, token] = fact.as_slice()
            && word == "REPORT:token"
        {
            dead_tokens.insert(key.clone(), token.parse::<u64>()?);
        }
    }
    assert_eq!(dead_tokens.len(), KILLED_KEYS);

    // Two processes race to take the dead owner's keys over once its lease has passed.
    let start = (unix_millis() + 500).to_string();
    let takers = (0..2)
        .map(|p| {
            spawn(
                "take_over",
                &url,
                &format!("taker-{p}"),
                &[(START_AT, start.clone())],
            )
        })
        .collect::<TestResult<Vec<_>>>()?;
    let mut taken: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for taker in takers {
        for fact in taker.finish()? {
            if let [word, key, rest @ ..] = fact.as_slice()
                && word == "REPORT:took"
            {
                let previous = taken.insert(key.clone(), rest.to_vec());
                assert!(previous.is_none(), "{key} taken over twice");
            }
        }
    }
    assert_eq!(taken.len(), KILLED_KEYS, "every key is taken over once");
    for (key, took) in &taken {
        let [token, attempt, takeover] = took.as_slice() else {
            return Err(format!("malformed report for {key}: {took:?}").into());
        };
        assert_eq!(takeover, "true", "{key} is a takeover");
        assert_eq!(attempt, "2", "{key}'s attempt");
        let token: u64 = token.parse()?;
        assert!(
            token > dead_tokens[key],
            "{key}: token {token} after the dead owner's {}",
            dead_tokens[key]
        );
    }
    let store = open(&url)?;
    for i in 0..KILLED_KEYS {
        let key = killed_key(i);
        match store.claim(&key)? {
            Claim::Completed(outcome) => assert_eq!(outcome.response, b"recovered", "{key}"),
            other => panic!("{key} after the takeover: {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn claim_or_wait_is_woken_by_a_completion_in_another_process() -> TestResult {
    let Some((_cluster, url)) = database("wait") else {
        return Ok(());
    };
    let store = open(&url)?;
    let mut owner = spawn("complete_later", &url, "owner", &[])?;
    owner.read_until("claimed")?;
    // The owner's lease is 60 s, past the 20 s timeout: only the completion (its
    // notification, or the poll behind it) can answer this before the timeout.
    let waited = std::time::Instant::now();
    let claim = store.claim_or_wait("waited", &ClaimOptions::new(), Duration::from_secs(20))?;
    // For the log only; no bound is asserted.
    eprintln!("claim_or_wait answered after {:?}", waited.elapsed());
    match claim {
        Claim::Completed(outcome) => assert_eq!(outcome.response, b"from-child"),
        other => panic!("expected the owner's completion, got {other:?}"),
    }
    owner.finish()?;
    Ok(())
}

#[test]
fn two_processes_sweeping_at_once_remove_each_expired_record_once() -> TestResult {
    let Some((_cluster, url)) = database("sweep") else {
        return Ok(());
    };
    let store = open(&url)?;
    let keys: Vec<String> = (0..SWEPT_KEYS).map(|i| format!("swept-{i}")).collect();
    for chunk in keys.chunks(500) {
        let stored = store.mark_seen_many_with_ttl(chunk, Duration::from_secs(1))?;
        assert!(stored.iter().all(|s| *s));
    }
    // Wait until the server's clock has passed every TTL.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while store.stats()?.live_keys > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the marks never expired"
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(store.stats()?.expired_pending, SWEPT_KEYS as u64);

    let start = (unix_millis() + 1_500).to_string();
    let sweepers = (0..2)
        .map(|p| {
            spawn(
                "sweep",
                &url,
                &format!("sweeper-{p}"),
                &[(START_AT, start.clone())],
            )
        })
        .collect::<TestResult<Vec<_>>>()?;
    let mut counts = Vec::new();
    for sweeper in sweepers {
        for fact in sweeper.finish()? {
            if let [word, swept] = fact.as_slice()
                && word == "REPORT:swept"
            {
                counts.push(swept.parse::<usize>()?);
            }
        }
    }
    // How the work split (for the log only: either split is right).
    eprintln!("swept per process: {counts:?}");
    assert_eq!(counts.len(), 2, "both sweepers reported");
    let total: usize = counts.iter().sum();
    assert_eq!(total, SWEPT_KEYS, "every record swept exactly once");
    let stats = store.stats()?;
    assert_eq!((stats.live_keys, stats.expired_pending), (0, 0));
    let probe = Probe::new(&url, 1)?;
    assert_eq!(
        probe.query_text("SELECT count(*) FROM dedupe.records")?,
        "0"
    );
    Ok(())
}
