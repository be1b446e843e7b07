//! The `dedupe` command line over PostgreSQL (`--db postgres://...`): real processes sharing
//! one database, as on a file. Each test that needs a server starts its own throwaway cluster
//! and is skipped (passes without checking) where the PostgreSQL binaries are missing.

// The helpers are shared with tests/cli.rs; this file uses some of them.
#[allow(dead_code)]
mod cli_support;

use std::path::Path;
use std::process::Command;

use dedupe_store::testing::postgres::TestCluster;
use serde_json::Value;

use cli_support::{Finished, TestResult, bare_dedupe, finish, one_line};

/// `dedupe --db URL ARGS`, run in `dir`.
fn dedupe(dir: &Path, url: &str, args: &[&str]) -> Command {
    let mut command = bare_dedupe(dir);
    command.arg("--db").arg(url).args(args);
    command
}

fn run(dir: &Path, url: &str, args: &[&str]) -> Result<Finished, Box<dyn std::error::Error>> {
    finish(dedupe(dir, url, args).spawn()?)
}

fn json(finished: &Finished) -> Result<Value, Box<dyn std::error::Error>> {
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    Ok(serde_json::from_str(&finished.stdout)?)
}

fn count(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("count")).map_or(0, |text| text.lines().count())
}

#[test]
fn two_concurrent_runs_of_a_key_run_cmd_once() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("cli_run");
    let dir = tempfile::tempdir()?;
    let cmd = "echo ran >> count; echo out; sleep 1";
    let args = ["run", "--key", "nightly", "--", "sh", "-c", cmd];
    let first = dedupe(dir.path(), &url, &args).spawn()?;
    let second = dedupe(dir.path(), &url, &args).spawn()?;
    let runs = [finish(first)?, finish(second)?];
    assert_eq!(count(dir.path()), 1, "CMD ran more than once: {runs:?}");
    // One ran CMD; the other found it in progress (75) or, if it came after, replayed it.
    let ran = runs
        .iter()
        .filter(|run| run.code == Some(0) && run.notes().is_empty())
        .count();
    assert_eq!(ran, 1, "{runs:?}");
    for other in runs.iter().filter(|run| !run.notes().is_empty()) {
        match other.code {
            Some(75) => {
                one_line(other);
                assert!(other.stderr.contains("still being run"), "{}", other.stderr);
            }
            Some(0) => assert!(other.stderr.contains("replayed key"), "{}", other.stderr),
            code => panic!("unexpected exit {code:?}: {}", other.stderr),
        }
    }

    let again = run(dir.path(), &url, &args)?;
    assert_eq!(again.code, Some(0));
    assert_eq!(again.stdout, "out\n");
    assert!(
        again.stderr.contains("replayed key \"nightly\""),
        "{}",
        again.stderr
    );
    assert_eq!(count(dir.path()), 1, "CMD ran on the replay");

    // Two runs started while one holds the key: --wait waits for it and replays.
    let slow = dedupe(
        dir.path(),
        &url,
        &["run", "--key", "slow", "--", "sh", "-c", cmd],
    )
    .spawn()?;
    cli_support::wait_for(&dir.path().join("count"))?;
    while count(dir.path()) < 2 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let waited = run(
        dir.path(),
        &url,
        &[
            "run", "--key", "slow", "--wait", "30s", "--", "sh", "-c", cmd,
        ],
    )?;
    assert_eq!(finish(slow)?.code, Some(0));
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    assert_eq!(waited.stdout, "out\n");
    assert_eq!(count(dir.path()), 2, "the waiting run ran CMD");
    Ok(())
}

#[test]
fn the_heartbeat_keeps_the_key_and_a_killed_run_is_taken_over() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("cli_lease");
    let dir = tempfile::tempdir()?;
    let long = "touch started; while [ ! -f go ]; do sleep 0.02; done; echo done";
    let owner = dedupe(
        dir.path(),
        &url,
        &[
            "run", "--key", "long", "--lease", "2s", "--", "sh", "-c", long,
        ],
    )
    .spawn()?;
    cli_support::wait_for(&dir.path().join("started"))?;
    // Well past the first lease: only the heartbeat, renewing over the database, keeps it.
    std::thread::sleep(std::time::Duration::from_millis(4500));
    let other = run(
        dir.path(),
        &url,
        &["run", "--key", "long", "--", "echo", "second"],
    )?;
    assert_eq!(other.code, Some(75), "{other:?}");
    std::fs::write(dir.path().join("go"), "")?;
    let owner = finish(owner)?;
    assert_eq!((owner.code, owner.stdout.as_str()), (Some(0), "done\n"));
    let first = json(&run(dir.path(), &url, &["get", "long", "--json"])?)?;
    assert_eq!(first["attempt"], 1, "no takeover happened: {first}");

    // A dedupe killed with its CMD: the next run takes the key over after the lease.
    let mut victim = dedupe(
        dir.path(),
        &url,
        &[
            "run",
            "--key",
            "crash",
            "--lease",
            "1s",
            "--",
            "sh",
            "-c",
            "echo $$ > cmd.pid; exec sleep 30",
        ],
    )
    .spawn()?;
    cli_support::wait_for(&dir.path().join("cmd.pid"))?;
    std::thread::sleep(std::time::Duration::from_millis(50));
    victim.kill()?;
    victim.wait()?;
    let cmd_pid = std::fs::read_to_string(dir.path().join("cmd.pid"))?;
    Command::new("kill")
        .args(["-KILL", cmd_pid.trim()])
        .status()?;
    let next = run(
        dir.path(),
        &url,
        &[
            "run", "--key", "crash", "--lease", "1s", "--wait", "30s", "--", "echo", "again",
        ],
    )?;
    assert_eq!(next.code, Some(0), "{next:?}");
    assert_eq!(next.stdout, "again\n");
    assert!(
        next.stderr.contains("took over key \"crash\""),
        "{}",
        next.stderr
    );
    let entry = json(&run(dir.path(), &url, &["get", "crash", "--json"])?)?;
    assert_eq!(entry["state"], "completed", "{entry}");
    assert_eq!(entry["attempt"], 2, "{entry}");
    Ok(())
}

#[test]
fn readers_and_maintenance_work_over_the_url() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("cli_read");
    let dir = tempfile::tempdir()?;
    let ran = run(dir.path(), &url, &["run", "--key", "job/1", "--", "true"])?;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    // DEDUPE_DB names the database as well as --db does.
    let marked = finish(
        bare_dedupe(dir.path())
            .env("DEDUPE_DB", &url)
            .args(["mark", "job/2"])
            .spawn()?,
    )?;
    assert_eq!(marked.code, Some(0), "{}", marked.stderr);

    let got = json(&run(dir.path(), &url, &["get", "job/1", "--json"])?)?;
    assert_eq!(got["state"], "completed", "{got}");
    let listed = json(&run(dir.path(), &url, &["list", "--json"])?)?;
    let keys: Vec<&str> = listed["entries"]
        .as_array()
        .ok_or("no entries")?
        .iter()
        .filter_map(|entry| entry["key"].as_str())
        .collect();
    assert_eq!(keys, ["job/1", "job/2"], "{listed}");
    let stats = json(&run(dir.path(), &url, &["stats", "--json"])?)?;
    assert_eq!(stats["live_keys"], 2, "{stats}");
    assert_eq!(stats["db"], url.as_str());
    let text = run(dir.path(), &url, &["stats"])?;
    assert!(
        text.stdout.contains("live keys        2"),
        "{}",
        text.stdout
    );
    assert!(!text.stdout.contains("file bytes"), "{}", text.stdout);
    let verified = json(&run(dir.path(), &url, &["verify", "--json"])?)?;
    assert_eq!(verified["ok"], true, "{verified}");

    // A schema that holds no store is refused by readers and maintenance, as a missing file
    // is, and none is made there; `mark` makes one, and it is another store.
    for args in [
        &["--pg-schema", "other", "get", "job/1"][..],
        &["--pg-schema", "other", "list"],
        &["--pg-schema", "other", "stats"],
        &["--pg-schema", "other", "expire", "job/1"],
        &["--pg-schema", "other", "sweep"],
    ] {
        let refused = run(dir.path(), &url, args)?;
        assert_eq!(refused.code, Some(1), "{args:?}: {}", refused.stderr);
        one_line(&refused);
        assert!(
            refused.stderr.contains("\"other\"") && refused.stderr.contains("--pg-schema"),
            "{args:?}: {}",
            refused.stderr
        );
    }
    let schemas = dedupe_store::testing::postgres::Probe::new(&url, 1)?
        .query_text("SELECT count(*) FROM pg_namespace WHERE nspname = 'other'")?;
    assert_eq!(schemas, "0", "a reader made no schema");
    let marked = run(dir.path(), &url, &["--pg-schema", "other", "mark", "job/9"])?;
    assert_eq!(marked.code, Some(0), "{}", marked.stderr);
    let other = json(&run(
        dir.path(),
        &url,
        &["--pg-schema", "other", "get", "job/1", "--json"],
    )?)?;
    assert_eq!(other["state"], "absent", "{other}");

    let expired = run(dir.path(), &url, &["expire", "job/1"])?;
    assert_eq!(expired.code, Some(0), "{}", expired.stderr);
    let got = json(&run(dir.path(), &url, &["get", "job/1", "--json"])?)?;
    assert_eq!(got["state"], "absent", "{got}");
    for maintenance in ["sweep", "compact"] {
        let done = run(dir.path(), &url, &[maintenance])?;
        assert_eq!(done.code, Some(0), "{maintenance}: {}", done.stderr);
    }
    Ok(())
}

#[test]
fn a_refused_connection_is_a_store_error_before_cmd_runs() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Port 1 on the loopback: nothing listens there, so the connection is refused at once.
    let url = "postgres://app:s3cret@127.0.0.1:1/jobs";
    let refused = run(
        dir.path(),
        url,
        &["run", "--key", "k", "--", "sh", "-c", "echo ran >> count"],
    )?;
    assert_eq!(refused.code, Some(74), "{}", refused.stderr);
    one_line(&refused);
    assert!(
        refused.stderr.contains("could not be reached"),
        "{}",
        refused.stderr
    );
    assert!(!refused.stderr.contains("s3cret"), "{}", refused.stderr);
    assert_eq!(count(dir.path()), 0, "CMD ran without a claim");

    let mark = run(dir.path(), url, &["mark", "k"])?;
    assert_eq!(mark.code, Some(74), "{}", mark.stderr);
    let get = run(dir.path(), url, &["get", "k"])?;
    assert_eq!(get.code, Some(1), "{}", get.stderr);
    Ok(())
}

#[test]
fn lock_timeout_bounds_the_wait_for_a_server_that_never_answers() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Accepts connections (the kernel does) and never speaks: a hung or overloaded server.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    // The URL's own limit is far longer than the one --lock-timeout sets; the flag wins.
    let url = format!(
        "postgres://app@127.0.0.1:{}/jobs?connect_timeout=120",
        silent.local_addr()?.port()
    );
    let started = std::time::Instant::now();
    let mark = run(dir.path(), &url, &["mark", "k", "--lock-timeout", "300ms"])?;
    assert_eq!(mark.code, Some(74), "{}", mark.stderr);
    one_line(&mark);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "gave up after {:?}, not after --lock-timeout",
        started.elapsed()
    );
    drop(silent);
    Ok(())
}
