//! The `dedupe` command line, driven as users drive it: real processes on a real store file,
//! several at once where that is the point. Leases and TTLs are short so the suite stays fast.
#![cfg(feature = "cli")]

mod cli_support;

use std::fs;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use cli_support::{PATIENCE, Scratch, TestResult, bare_dedupe, finish, one_line, wait_for};

#[test]
fn a_first_run_streams_and_stores_and_a_repeat_replays_without_running() -> TestResult {
    let scratch = Scratch::new()?;
    let cmd = "echo ran >> count; echo report written; echo careful >&2";
    let first = scratch.run(&["run", "--key", "nightly", "--", "sh", "-c", cmd])?;
    assert_eq!(first.code, Some(0));
    assert_eq!(first.stdout, "report written\n");
    assert_eq!(first.stderr, "careful\n");

    let again = scratch.run(&["run", "--key", "nightly", "--", "sh", "-c", cmd])?;
    assert_eq!(again.code, Some(0));
    assert_eq!(again.stdout, "report written\n");
    assert!(again.stderr.starts_with("careful\n"), "{}", again.stderr);
    let notes = again.notes();
    assert_eq!(notes.len(), 1);
    assert!(
        notes[0].contains("replayed key \"nightly\""),
        "{}",
        notes[0]
    );
    assert_eq!(scratch.count("count"), 1, "CMD ran on the replay");

    let quiet = scratch.run(&["run", "--key", "nightly", "--quiet", "--", "sh", "-c", cmd])?;
    assert_eq!(
        (quiet.stdout.as_str(), quiet.stderr.as_str()),
        ("report written\n", "careful\n")
    );
    let silent = scratch.run(&["run", "--key", "nightly", "--quiet-replay", "--", "true"])?;
    assert_eq!(silent.stdout, "");
    assert_eq!(silent.notes().len(), 1);
    assert!(!silent.stderr.contains("careful"));
    assert_eq!(scratch.count("count"), 1);
    Ok(())
}

#[test]
fn a_failing_cmd_releases_the_key_unless_failures_are_remembered() -> TestResult {
    let scratch = Scratch::new()?;
    let cmd = "echo ran >> count; echo broken >&2; exit 3";
    for attempt in 1..=2 {
        let failed = scratch.run(&["run", "--key", "flaky", "--", "sh", "-c", cmd])?;
        assert_eq!(failed.code, Some(3));
        assert_eq!(scratch.count("count"), attempt, "a failure must be retried");
    }
    assert_eq!(scratch.get("flaky")?["state"], "absent");

    let remembered = [
        "run",
        "--key",
        "kept",
        "--remember-failures",
        "--",
        "sh",
        "-c",
        cmd,
    ];
    assert_eq!(scratch.run(&remembered)?.code, Some(3));
    let replayed = scratch.run(&remembered)?;
    assert_eq!(replayed.code, Some(3));
    assert!(replayed.stderr.starts_with("broken\n"));
    assert_eq!(
        scratch.count("count"),
        3,
        "a remembered failure is replayed, not rerun"
    );
    let entry = scratch.get("kept")?;
    assert_eq!(entry["run"]["status"], 3);
    assert_eq!(entry["run"]["exit_code"], 3);
    Ok(())
}

#[test]
fn a_cmd_killed_by_a_signal_exits_128_plus_the_signal() -> TestResult {
    let scratch = Scratch::new()?;
    let killed = scratch.run(&["run", "--key", "sig", "--", "sh", "-c", "kill -KILL $$"])?;
    assert_eq!(killed.code, Some(137));
    assert_eq!(scratch.get("sig")?["state"], "absent");

    let remembered = [
        "run",
        "--key",
        "sig2",
        "--remember-failures",
        "--",
        "sh",
        "-c",
        "kill -TERM $$",
    ];
    assert_eq!(scratch.run(&remembered)?.code, Some(143));
    let entry = scratch.get("sig2")?;
    assert_eq!(entry["run"]["signal"], 15);
    assert_eq!(entry["run"]["exit_code"], Value::Null);
    assert_eq!(
        scratch.run(&remembered)?.code,
        Some(143),
        "the replay exits as CMD did"
    );
    Ok(())
}

#[test]
fn sigterm_to_dedupe_reaches_cmd_and_the_key_is_released() -> TestResult {
    let scratch = Scratch::new()?;
    let child = scratch
        .dedupe(&[
            "run",
            "--key",
            "term",
            "--",
            "sh",
            "-c",
            "touch started; exec sleep 30",
        ])
        .spawn()?;
    wait_for(&scratch.path("started"))?;
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(sent.success());
    let finished = finish(child)?;
    assert_eq!(finished.code, Some(143), "{}", finished.stderr);
    assert_eq!(scratch.get("term")?["state"], "absent");
    Ok(())
}

#[test]
fn a_cmd_that_cannot_run_exits_126_or_127_and_releases_the_key() -> TestResult {
    let scratch = Scratch::new()?;
    let missing = scratch.run(&["run", "--key", "k", "--", "no-such-command-here"])?;
    assert_eq!(missing.code, Some(127));
    one_line(&missing);
    assert!(
        missing
            .stderr
            .contains("no-such-command-here: command not found")
    );
    assert!(missing.stderr.contains("released"));
    assert_eq!(scratch.get("k")?["state"], "absent");

    let script = scratch.path("not-executable.sh");
    fs::write(&script, "#!/bin/sh\necho hi\n")?;
    let refused = scratch.run(&["run", "--key", "k", "--", &script.to_string_lossy()])?;
    assert_eq!(refused.code, Some(126));
    one_line(&refused);
    assert_eq!(scratch.get("k")?["state"], "absent");

    let ok = scratch.run(&["run", "--key", "k", "--", "echo", "now it runs"])?;
    assert_eq!((ok.code, ok.stdout.as_str()), (Some(0), "now it runs\n"));
    Ok(())
}

#[test]
fn ten_concurrent_waiting_runs_run_cmd_once_and_all_answer_with_its_outcome() -> TestResult {
    let scratch = Scratch::new()?;
    let cmd = "echo ran >> count; sleep 0.5; echo the output; echo its stderr >&2; exit 7";
    let runs = (0..10)
        .map(|_| {
            scratch
                .dedupe(&[
                    "run",
                    "--key",
                    "deploy",
                    "--wait",
                    "50s",
                    "--remember-failures",
                    "--quiet",
                    "--",
                    "sh",
                    "-c",
                    cmd,
                ])
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    for run in runs {
        let finished = finish(run)?;
        assert_eq!(finished.code, Some(7), "{}", finished.stderr);
        assert_eq!(finished.stdout, "the output\n");
        assert_eq!(finished.stderr, "its stderr\n");
    }
    assert_eq!(scratch.count("count"), 1, "CMD ran more than once");
    Ok(())
}

#[test]
fn ten_concurrent_runs_without_wait_run_cmd_once_and_the_others_exit_75() -> TestResult {
    let scratch = Scratch::new()?;
    let cmd = "echo ran >> count; while [ ! -f go ]; do sleep 0.02; done; echo finished";
    let runs = (0..10)
        .map(|_| {
            scratch
                .dedupe(&["run", "--key", "backup", "--", "sh", "-c", cmd])
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The owner waits for `go`; every other run must give up on its own first.
    let mut busy = 0;
    let mut pending: Vec<Child> = runs;
    let deadline = Instant::now() + PATIENCE;
    while busy < 9 {
        assert!(Instant::now() < deadline, "the other runs did not exit 75");
        let mut still = Vec::new();
        for mut run in pending {
            match run.try_wait()? {
                Some(_) => {
                    let finished = finish(run)?;
                    assert_eq!(finished.code, Some(75), "{finished:?}");
                    one_line(&finished);
                    assert!(finished.stderr.contains("key \"backup\""));
                    assert!(finished.stderr.contains("lease ends at"));
                    busy += 1;
                }
                None => still.push(run),
            }
        }
        pending = still;
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pending.len(), 1);
    fs::write(scratch.path("go"), "")?;
    let owner = finish(pending.pop().ok_or("no owner")?)?;
    assert_eq!((owner.code, owner.stdout.as_str()), (Some(0), "finished\n"));
    assert_eq!(scratch.count("count"), 1);
    Ok(())
}

#[test]
fn the_heartbeat_keeps_a_long_cmd_from_being_taken_over() -> TestResult {
    let scratch = Scratch::new()?;
    let long = "touch started; while [ ! -f go ]; do sleep 0.02; done; echo done";
    let owner = scratch
        .dedupe(&[
            "run", "--key", "long", "--lease", "2s", "--", "sh", "-c", long,
        ])
        .spawn()?;
    wait_for(&scratch.path("started"))?;
    // Well past the first lease: only the heartbeat keeps the key.
    thread::sleep(Duration::from_millis(4500));
    let other = scratch.run(&[
        "run", "--key", "long", "--lease", "2s", "--", "echo", "second",
    ])?;
    assert_eq!(other.code, Some(75), "{other:?}");
    fs::write(scratch.path("go"), "")?;
    let owner = finish(owner)?;
    assert_eq!((owner.code, owner.stdout.as_str()), (Some(0), "done\n"));
    assert_eq!(scratch.get("long")?["attempt"], 1, "no takeover happened");
    Ok(())
}

#[test]
fn a_killed_dedupe_is_taken_over_after_its_lease() -> TestResult {
    let scratch = Scratch::new()?;
    let mut victim = scratch
        .dedupe(&[
            "run",
            "--key",
            "crash",
            "--lease",
            "1s",
            "--",
            "sh",
            "-c",
            "echo $$ > cmd.pid; exec sleep 30",
        ])
        .spawn()?;
    wait_for(&scratch.path("cmd.pid"))?;
    thread::sleep(Duration::from_millis(50));
    victim.kill()?; // SIGKILL to dedupe itself: no chance to release anything.
    victim.wait()?;
    let cmd_pid = fs::read_to_string(scratch.path("cmd.pid"))?;
    Command::new("kill")
        .args(["-KILL", cmd_pid.trim()])
        .status()?;
    assert_eq!(scratch.get("crash")?["state"], "in_progress");

    let next = scratch.run(&[
        "run",
        "--key",
        "crash",
        "--lease",
        "1s",
        "--wait",
        "30s",
        "--",
        "echo",
        "second attempt",
    ])?;
    assert_eq!(next.code, Some(0), "{next:?}");
    assert_eq!(next.stdout, "second attempt\n");
    assert!(
        next.stderr.contains("took over key \"crash\""),
        "{}",
        next.stderr
    );
    let entry = scratch.get("crash")?;
    assert_eq!(entry["state"], "completed");
    assert_eq!(entry["attempt"], 2);
    Ok(())
}

#[test]
fn the_output_cap_bounds_what_is_stored_not_what_is_shown() -> TestResult {
    let scratch = Scratch::new()?;
    let chatty = [
        "run",
        "--key",
        "big",
        "--max-output",
        "1KiB",
        "--",
        "sh",
        "-c",
        "printf '%05000d' 0",
    ];
    let first = scratch.run(&chatty)?;
    assert_eq!(first.code, Some(0));
    assert_eq!(first.stdout.len(), 5000, "the live output is never cut");
    assert!(first.stderr.contains("--max-output"), "{}", first.stderr);
    let replay = scratch.run(&chatty)?;
    assert_eq!(replay.stdout, "0".repeat(1024));
    assert!(replay.stderr.contains("cut"), "{}", replay.stderr);
    let entry = scratch.get("big")?;
    assert_eq!(entry["run"]["stdout_cut"], true);
    assert_eq!(entry["run"]["stdout_bytes"], 1024);

    // --max-output raises the store's response limit (1 MiB by default) to match.
    let large = 1536 * 1024;
    let format = format!("printf '%0{large}d' 0");
    let roomy = [
        "run",
        "--key",
        "roomy",
        "--max-output",
        "2MiB",
        "--",
        "sh",
        "-c",
        &format,
    ];
    let first = scratch.run(&roomy)?;
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    assert_eq!(first.stderr, "");
    let replay = scratch.run(&roomy)?;
    assert_eq!(replay.stdout.len(), large);
    Ok(())
}

#[test]
fn mark_exits_0_then_1_and_forgets_after_its_ttl() -> TestResult {
    let scratch = Scratch::new()?;
    let mark = ["mark", "delivery-81", "--ttl", "1s"];
    assert_eq!(scratch.run(&mark)?.code, Some(0));
    let seen = scratch.run(&mark)?;
    assert_eq!(
        (seen.code, seen.stdout.as_str(), seen.stderr.as_str()),
        (Some(1), "", "")
    );
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(scratch.run(&mark)?.code, Some(0), "forgotten after its TTL");

    // Marks and runs share keys: a marked key is done, and a run's key is seen.
    let on_marked = scratch.run(&[
        "run",
        "--key",
        "delivery-81",
        "--",
        "sh",
        "-c",
        "echo ran >> count",
    ])?;
    assert_eq!(on_marked.code, Some(0));
    assert_eq!(scratch.count("count"), 0);
    assert_eq!(
        scratch.run(&["run", "--key", "job", "--", "true"])?.code,
        Some(0)
    );
    assert_eq!(scratch.run(&["mark", "job"])?.code, Some(1));
    Ok(())
}

#[test]
fn a_different_fingerprint_is_refused_with_65() -> TestResult {
    let scratch = Scratch::new()?;
    let first = [
        "run",
        "--key",
        "import",
        "--fingerprint",
        "sha-aaa",
        "--",
        "true",
    ];
    assert_eq!(scratch.run(&first)?.code, Some(0));
    assert_eq!(scratch.run(&first)?.code, Some(0));
    let other = scratch.run(&[
        "run",
        "--key",
        "import",
        "--fingerprint",
        "sha-bbb",
        "--",
        "true",
    ])?;
    assert_eq!(other.code, Some(65));
    one_line(&other);
    assert!(other.stderr.contains("--fingerprint"));
    Ok(())
}

#[test]
fn bad_arguments_exit_2_with_usage_and_no_backtrace() -> TestResult {
    let scratch = Scratch::new()?;
    let bad: [&[&str]; 9] = [
        &[],
        &["run", "--key", "k"],
        &["run", "--key", "", "--", "true"],
        &["run", "--key", "k", "--ttl", "0s", "--", "true"],
        &["run", "--key", "k", "--lease", "ten", "--", "true"],
        &["run", "--key", "k", "--max-output", "300MiB", "--", "true"],
        &["run", "--key", &"x".repeat(1025), "--", "true"],
        &["mark"],
        &["frobnicate"],
    ];
    for args in bad {
        let finished = scratch.run(args)?;
        assert_eq!(finished.code, Some(2), "{args:?}: {finished:?}");
        assert!(finished.stderr.contains("Usage") || finished.stderr.contains("--help"));
    }
    assert!(
        !scratch.db().exists(),
        "bad arguments must not touch the store"
    );

    let help = scratch.run(&["run", "--help"])?;
    assert_eq!(help.code, Some(0));
    for promise in [
        "Exit codes",
        "DRUN",
        "--remember-failures",
        "--wait",
        "heartbeat",
    ] {
        assert!(help.stdout.contains(promise), "run --help lacks {promise}");
    }
    Ok(())
}

#[test]
fn store_errors_exit_1_with_one_line_naming_the_file() -> TestResult {
    let scratch = Scratch::new()?;
    let held = dedupe_store::Store::open(scratch.db())?;
    let waited = scratch.run(&["--lock-timeout", "200ms", "get", "k"])?;
    assert_eq!(waited.code, Some(1));
    one_line(&waited);
    assert!(waited.stderr.contains(&scratch.db().display().to_string()));
    assert!(waited.stderr.contains("--lock-timeout"));
    let mark = scratch.run(&["--lock-timeout", "200ms", "mark", "k"])?;
    assert_eq!(
        mark.code,
        Some(74),
        "a failed mark must not look like a duplicate"
    );
    drop(held);
    assert_eq!(scratch.run(&["get", "k"])?.code, Some(0));

    let junk = scratch.path("junk.redb");
    fs::write(&junk, "this is not a store file at all")?;
    let mut command = bare_dedupe(scratch.dir.path());
    let finished = finish(command.arg("--db").arg(&junk).args(["get", "k"]).spawn()?)?;
    assert_eq!(finished.code, Some(1));
    one_line(&finished);
    assert!(finished.stderr.contains("junk.redb"));

    let missing = scratch.path("missing.redb");
    let mut command = bare_dedupe(scratch.dir.path());
    let finished = finish(command.arg("--db").arg(&missing).arg("stats").spawn()?)?;
    assert_eq!(finished.code, Some(1));
    one_line(&finished);
    assert!(!missing.exists(), "a reader must not create a store");
    Ok(())
}

#[test]
fn the_store_file_comes_from_db_then_dedupe_db_then_the_current_directory() -> TestResult {
    let scratch = Scratch::new()?;
    let from_env = scratch.path("from-env.redb");
    let mut command = bare_dedupe(scratch.dir.path());
    command.env("DEDUPE_DB", &from_env).args(["mark", "a"]);
    assert_eq!(finish(command.spawn()?)?.code, Some(0));
    assert!(from_env.exists());

    let mut command = bare_dedupe(scratch.dir.path());
    assert_eq!(finish(command.args(["mark", "a"]).spawn()?)?.code, Some(0));
    assert!(scratch.path("dedupe.redb").exists());
    Ok(())
}

#[test]
fn json_readers_parse_and_carry_the_documented_fields() -> TestResult {
    let scratch = Scratch::new()?;
    scratch.run(&[
        "run",
        "--key",
        "job/1",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2",
    ])?;
    scratch.run(&["mark", "job/2"])?;
    scratch.run(&["mark", "other"])?;

    let entry = scratch.get("job/1")?;
    for field in [
        "key",
        "key_hex",
        "state",
        "attempt",
        "fencing_token",
        "fingerprint",
        "expires_at",
        "expires_at_utc",
        "completed_at",
        "completed_at_utc",
        "response_bytes",
        "run",
    ] {
        assert!(entry.get(field).is_some(), "get lacks {field}: {entry}");
    }
    assert_eq!(entry["key"], "job/1");
    assert_eq!(entry["key_hex"], "6a6f622f31");
    assert_eq!(entry["state"], "completed");
    let run = &entry["run"];
    for field in [
        "status",
        "exit_code",
        "signal",
        "stdout_bytes",
        "stderr_bytes",
        "stdout_cut",
        "stderr_cut",
        "stdout",
        "stderr",
    ] {
        assert!(run.get(field).is_some(), "run lacks {field}: {run}");
    }
    assert_eq!(run["stdout"], "out\n");
    assert_eq!(run["stderr"], "err\n");
    assert_eq!(scratch.get("job/2")?["run"], Value::Null);
    assert_eq!(scratch.get("nothing")?["state"], "absent");

    let listed: Value = serde_json::from_str(
        &scratch
            .run(&["list", "--prefix", "job/", "--limit", "1", "--json"])?
            .stdout,
    )?;
    assert_eq!(listed["truncated"], true);
    let entries = listed["entries"]
        .as_array()
        .ok_or("entries is not an array")?;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["key"], "job/1");
    assert!(
        entries[0]["run"].get("stdout").is_none(),
        "list leaves the output out"
    );
    let all: Value = serde_json::from_str(&scratch.run(&["list", "--json"])?.stdout)?;
    assert_eq!(all["truncated"], false);
    assert_eq!(all["entries"].as_array().map(Vec::len), Some(3));

    let stats: Value = serde_json::from_str(&scratch.run(&["stats", "--json"])?.stdout)?;
    for field in [
        "db",
        "file_bytes",
        "live_keys",
        "expired_pending",
        "format_version",
    ] {
        assert!(stats.get(field).is_some(), "stats lacks {field}: {stats}");
    }
    assert_eq!(stats["live_keys"], 3);

    let verify: Value = serde_json::from_str(&scratch.run(&["verify", "--json"])?.stdout)?;
    for field in ["db", "ok", "records", "repaired", "error"] {
        assert!(
            verify.get(field).is_some(),
            "verify lacks {field}: {verify}"
        );
    }
    assert_eq!(verify["ok"], true);
    assert_eq!(verify["records"], 3);

    let table = scratch.run(&["list"])?;
    assert!(table.stdout.starts_with("KEY"), "{}", table.stdout);
    assert_eq!(table.stdout.lines().count(), 4);
    Ok(())
}

#[test]
fn expire_sweep_and_compact_maintain_the_file() -> TestResult {
    let scratch = Scratch::new()?;
    let job = [
        "run",
        "--key",
        "once",
        "--",
        "sh",
        "-c",
        "echo ran >> count",
    ];
    scratch.run(&job)?;
    let expired = scratch.run(&["expire", "once"])?;
    assert_eq!(expired.code, Some(0));
    assert!(expired.stdout.starts_with("expired key"));
    scratch.run(&job)?;
    assert_eq!(scratch.count("count"), 2, "an expired key runs again");

    scratch.run(&["mark", "short", "--ttl", "200ms"])?;
    thread::sleep(Duration::from_millis(300));
    let stats: Value = serde_json::from_str(&scratch.run(&["stats", "--json"])?.stdout)?;
    assert_eq!(stats["expired_pending"], 1);
    let swept = scratch.run(&["sweep"])?;
    assert_eq!(swept.stdout, "removed 1 expired records\n");
    let stats: Value = serde_json::from_str(&scratch.run(&["stats", "--json"])?.stdout)?;
    assert_eq!(stats["expired_pending"], 0);
    assert_eq!(scratch.run(&["compact"])?.code, Some(0));
    assert_eq!(scratch.run(&["verify"])?.code, Some(0));
    Ok(())
}

#[test]
fn a_store_error_before_cmd_ran_exits_74_not_1() -> TestResult {
    let scratch = Scratch::new()?;
    let failing = scratch.run(&["run", "--key", "a", "--", "sh", "-c", "exit 1"])?;
    assert_eq!(failing.code, Some(1), "CMD's own status 1");

    let nowhere = scratch.path("no-such-dir/x.redb");
    let mut command = bare_dedupe(scratch.dir.path());
    command.arg("--db").arg(&nowhere).args([
        "run",
        "--key",
        "a",
        "--",
        "sh",
        "-c",
        "echo ran >> count",
    ]);
    let finished = finish(command.spawn()?)?;
    assert_eq!(finished.code, Some(74), "{finished:?}");
    one_line(&finished);
    assert!(
        finished.stderr.contains("no-such-dir"),
        "{}",
        finished.stderr
    );

    let held = dedupe_store::Store::open(scratch.db())?;
    let waited = scratch.run(&[
        "--lock-timeout",
        "200ms",
        "run",
        "--key",
        "b",
        "--",
        "sh",
        "-c",
        "echo ran >> count",
    ])?;
    assert_eq!(waited.code, Some(74), "{waited:?}");
    one_line(&waited);
    drop(held);
    assert_eq!(
        scratch.count("count"),
        0,
        "CMD must not run after a store error"
    );

    let help = scratch.run(&["--help"])?;
    assert!(help.stdout.contains("74") && help.stdout.contains("70"));
    Ok(())
}

/// Flips bytes all through a real store file (in its pages that hold anything) and runs the
/// readers and `run` on each damaged copy: every answer is the data, or a store error in one
/// line (exit 1, or 74 for `run`), never exit 70 and never a panic trace. Some of these flips
/// make redb panic; the library turns that into a corrupt-file error, which must reach the
/// user as such.
#[test]
fn damaged_files_are_store_errors_never_internal_errors() -> TestResult {
    let scratch = Scratch::new()?;
    {
        let store = dedupe_store::Store::open(scratch.db())?;
        for index in 0..40 {
            let key = format!("key-{index}");
            if index % 3 == 0 {
                store.mark_seen(&key)?;
            } else if let dedupe_store::Claim::Acquired(ticket) = store.claim(&key)? {
                store.complete(&ticket, vec![index as u8; 200 + index * 150])?;
            }
        }
        store.close()?;
    }
    let clean = fs::read(scratch.db())?;
    let pages: Vec<usize> = (0..clean.len() / 4096)
        .filter(|page| {
            clean[page * 4096..(page + 1) * 4096]
                .iter()
                .any(|&b| b != 0)
        })
        .collect();
    let damaged = scratch.path("damaged.redb");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut errors, mut caught_panics) = (0, 0);
    for round in 0..120 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let page = pages[round % pages.len()];
        let at = page * 4096 + (seed % 4096) as usize;
        let mut image = clean.clone();
        image[at] ^= 1 << ((seed >> 32) % 8);
        let commands: [&[&str]; 4] = [
            &["verify"],
            &["get", "key-7"],
            &["list", "--json"],
            &["run", "--key", "key-new", "--", "true"],
        ];
        let command = commands[round % commands.len()];
        fs::write(&damaged, &image)?;
        let mut dedupe = bare_dedupe(scratch.dir.path());
        dedupe.arg("--db").arg(&damaged).args(command);
        let finished = finish(dedupe.spawn()?)?;
        let store_error = if command[0] == "run" { 74 } else { 1 };
        match finished.code {
            Some(0) => {}
            Some(code) if code == store_error => {
                one_line(&finished);
                assert!(
                    finished.stderr.contains("damaged.redb"),
                    "{}",
                    finished.stderr
                );
                errors += 1;
                if finished.stderr.contains("engine panicked") {
                    caught_panics += 1;
                }
            }
            other => panic!("{command:?} with byte {at} flipped exited {other:?}: {finished:?}"),
        }
    }
    println!("{errors} store errors, {caught_panics} of them caught panics inside redb");
    assert!(errors > 0, "no flip was noticed: the test damaged nothing");
    Ok(())
}

#[test]
fn a_lease_shorter_than_the_heartbeat_can_keep_is_refused() -> TestResult {
    let scratch = Scratch::new()?;
    for lease in ["1ms", "999ms"] {
        let refused = scratch.run(&[
            "run",
            "--key",
            "lm",
            "--lease",
            lease,
            "--",
            "sh",
            "-c",
            "echo ran >> count",
        ])?;
        assert_eq!(refused.code, Some(2), "--lease {lease}: {refused:?}");
        assert!(
            refused.stderr.contains("at least 1s"),
            "the message names the minimum: {}",
            refused.stderr
        );
    }
    assert_eq!(scratch.count("count"), 0);
    assert!(
        !scratch.db().exists(),
        "a refused lease must not touch the store"
    );

    // At the minimum a live owner keeps its key past several leases.
    let owner = scratch
        .dedupe(&[
            "run",
            "--key",
            "lm",
            "--lease",
            "1s",
            "--",
            "sh",
            "-c",
            "touch started; while [ ! -f go ]; do sleep 0.02; done; echo ran >> count",
        ])
        .spawn()?;
    wait_for(&scratch.path("started"))?;
    thread::sleep(Duration::from_millis(2500));
    let second = scratch.run(&["run", "--key", "lm", "--", "echo", "SECOND"])?;
    assert_eq!(second.code, Some(75), "{second:?}");
    fs::write(scratch.path("go"), "")?;
    assert_eq!(finish(owner)?.code, Some(0));
    assert_eq!(scratch.count("count"), 1);
    assert_eq!(scratch.get("lm")?["attempt"], 1, "no takeover happened");
    Ok(())
}

/// `runuser -u nobody`, when this test runs as root and the command exists.
fn as_nobody() -> Option<Command> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        println!("skipping the unprivileged reader: not running as root");
        return None;
    }
    let probe = Command::new("runuser")
        .args(["-u", "nobody", "--", "true"])
        .status();
    if !probe.is_ok_and(|status| status.success()) {
        println!("skipping the unprivileged reader: `runuser -u nobody` is not available");
        return None;
    }
    let mut command = Command::new("runuser");
    command
        .args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_dedupe")])
        .env_remove("DEDUPE_DB")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    Some(command)
}

#[test]
fn readers_work_on_a_read_only_file_and_never_create_or_change_a_store() -> TestResult {
    use std::os::unix::fs::PermissionsExt;

    let scratch = Scratch::new()?;
    assert_eq!(scratch.run(&["mark", "seen"])?.code, Some(0));
    assert_eq!(
        scratch
            .run(&["run", "--key", "job", "--", "echo", "hi"])?
            .code,
        Some(0)
    );
    let before = fs::read(scratch.db())?;
    let readers: [&[&str]; 5] = [
        &["get", "job", "--json"],
        &["get", "seen"],
        &["list", "--json"],
        &["stats", "--json"],
        &["verify"],
    ];
    for args in readers {
        let read = scratch.run(args)?;
        assert_eq!(read.code, Some(0), "{args:?}: {read:?}");
    }
    assert_eq!(fs::read(scratch.db())?, before, "a reader changed the file");

    // An empty file is refused, not made a store, by readers and maintenance alike.
    let empty = scratch.path("empty.redb");
    let missing = scratch.path("missing.redb");
    fs::write(&empty, "")?;
    for args in [
        &["stats"][..],
        &["get", "k"],
        &["list"],
        &["verify"],
        &["sweep"],
        &["compact"],
        &["expire", "k"],
    ] {
        for db in [&empty, &missing] {
            let mut command = bare_dedupe(scratch.dir.path());
            let finished = finish(command.arg("--db").arg(db).args(args).spawn()?)?;
            assert_eq!(finished.code, Some(1), "{args:?} on {}", db.display());
            one_line(&finished);
            assert!(
                finished
                    .stderr
                    .contains("only `run`, `mark` and `filter` create a store")
            );
        }
        assert_eq!(
            fs::metadata(&empty)?.len(),
            0,
            "{args:?} wrote to an empty file"
        );
        assert!(!missing.exists(), "{args:?} created a missing file");
    }

    // A file its user may only read. As root a 0444 file is still writable, so this part runs
    // as nobody.
    let Some(mut nobody) = as_nobody() else {
        return Ok(());
    };
    fs::set_permissions(scratch.dir.path(), fs::Permissions::from_mode(0o755))?;
    fs::set_permissions(scratch.db(), fs::Permissions::from_mode(0o444))?;
    let finished = finish(
        nobody
            .arg("--db")
            .arg(scratch.db())
            .args(["get", "job", "--json"])
            .spawn()?,
    )?;
    assert_eq!(finished.code, Some(0), "{finished:?}");
    let entry: Value = serde_json::from_str(&finished.stdout)?;
    assert_eq!(entry["run"]["stdout"], "hi\n");
    for args in [&["list"][..], &["stats"], &["verify"]] {
        let mut nobody = as_nobody().ok_or("runuser went away")?;
        let finished = finish(nobody.arg("--db").arg(scratch.db()).args(args).spawn()?)?;
        assert_eq!(finished.code, Some(0), "{args:?}: {finished:?}");
    }
    // A writer as nobody fails as a store error, saying what it could not do.
    let mut nobody = as_nobody().ok_or("runuser went away")?;
    let finished = finish(
        nobody
            .arg("--db")
            .arg(scratch.db())
            .args(["mark", "new"])
            .spawn()?,
    )?;
    assert_eq!(finished.code, Some(74), "{finished:?}");
    assert!(
        finished.stderr.contains("cannot open"),
        "{}",
        finished.stderr
    );
    assert_eq!(
        fs::read(scratch.db())?,
        before,
        "the read-only file changed"
    );
    Ok(())
}

fn expired_pending(scratch: &Scratch) -> Result<u64, Box<dyn std::error::Error>> {
    let stats = scratch.run(&["stats", "--json"])?;
    assert_eq!(stats.code, Some(0), "{stats:?}");
    let stats: Value = serde_json::from_str(&stats.stdout)?;
    stats["expired_pending"]
        .as_u64()
        .ok_or_else(|| "no expired_pending".into())
}

#[test]
fn a_run_sweeps_one_batch_of_a_backlog_and_sweep_clears_the_rest() -> TestResult {
    let scratch = Scratch::new()?;
    let backlog = 3000;
    {
        let store = dedupe_store::Store::builder()
            .without_sweeper()
            .open(scratch.db())?;
        let keys: Vec<String> = (0..backlog).map(|i| format!("old-{i}")).collect();
        store.mark_seen_many_with_ttl(&keys, Duration::from_millis(1))?;
        store.close()?;
    }
    thread::sleep(Duration::from_millis(20));
    assert_eq!(expired_pending(&scratch)?, backlog);

    assert_eq!(
        scratch.run(&["run", "--key", "x", "--", "true"])?.code,
        Some(0)
    );
    let left = expired_pending(&scratch)?;
    assert!(left < backlog, "the run swept nothing");
    assert!(left > 0, "one run paid for the whole backlog");
    assert_eq!(
        scratch.run(&["run", "--key", "y", "--", "true"])?.code,
        Some(0)
    );
    assert!(expired_pending(&scratch)? < left, "the next run sweeps on");

    let swept = scratch.run(&["sweep"])?;
    assert_eq!(swept.code, Some(0), "{swept:?}");
    assert_eq!(expired_pending(&scratch)?, 0);
    assert_eq!(scratch.get("x")?["state"], "completed");
    Ok(())
}

#[test]
fn a_new_key_past_max_keys_exits_69_and_stored_keys_still_answer() -> TestResult {
    let scratch = Scratch::new()?;
    for key in ["a", "b"] {
        assert_eq!(
            scratch.run(&["--max-keys", "2", "mark", key])?.code,
            Some(0)
        );
    }
    let refused = scratch.run(&["--max-keys", "2", "mark", "c"])?;
    assert_eq!(refused.code, Some(69), "{}", refused.stderr);
    one_line(&refused);
    assert!(refused.stderr.contains("budget"), "{}", refused.stderr);
    let run = scratch.run(&[
        "--max-keys",
        "2",
        "run",
        "--key",
        "job",
        "--",
        "sh",
        "-c",
        "echo ran >> count",
    ])?;
    assert_eq!(run.code, Some(69), "{}", run.stderr);
    assert_eq!(
        scratch.count("count"),
        0,
        "CMD ran although its key was refused"
    );
    assert_eq!(
        scratch.run(&["--max-keys", "2", "mark", "a"])?.code,
        Some(1)
    );
    // Without the budget the same file takes new keys again.
    assert_eq!(scratch.run(&["mark", "c"])?.code, Some(0));
    Ok(())
}

fn file_len(path: &std::path::Path) -> u64 {
    fs::metadata(path).map_or(0, |meta| meta.len())
}

#[test]
fn kill_9_of_dedupe_stops_cmd_and_its_children_and_cmd_sees_its_ticket() -> TestResult {
    let scratch = Scratch::new()?;
    let ticker = "echo \"$DEDUPE_FENCING_TOKEN $DEDUPE_ATTEMPT $DEDUPE_KEY\" > env; \
                  (while :; do echo tick >> child-ticks; sleep 0.02; done) & \
                  while :; do echo tick >> ticks; sleep 0.02; done";
    let mut victim = scratch
        .dedupe(&[
            "run", "--key", "tick/1", "--lease", "1s", "--", "sh", "-c", ticker,
        ])
        .spawn()?;
    wait_for(&scratch.path("child-ticks"))?;
    wait_for(&scratch.path("ticks"))?;
    victim.kill()?; // SIGKILL to dedupe alone, not to CMD or its child
    victim.wait()?;

    // Give the supervisor time to notice, then the ticks must have stopped for good.
    let (ticks, child_ticks) = (scratch.path("ticks"), scratch.path("child-ticks"));
    let deadline = Instant::now() + PATIENCE;
    loop {
        let before = (file_len(&ticks), file_len(&child_ticks));
        thread::sleep(Duration::from_millis(500));
        if (file_len(&ticks), file_len(&child_ticks)) == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "CMD or its child outlived dedupe"
        );
    }
    let env = fs::read_to_string(scratch.path("env"))?;
    let entry = scratch.get("tick/1")?;
    assert_eq!(
        env.trim(),
        format!("{} 1 tick/1", entry["fencing_token"]),
        "CMD's environment"
    );

    // The takeover runs CMD as attempt 2 with a larger token, and nothing else is running.
    let next = scratch.run(&[
        "run",
        "--key",
        "tick/1",
        "--lease",
        "1s",
        "--wait",
        "30s",
        "--",
        "sh",
        "-c",
        "echo \"$DEDUPE_FENCING_TOKEN $DEDUPE_ATTEMPT\"",
    ])?;
    assert_eq!(next.code, Some(0), "{next:?}");
    let second: Vec<u64> = next
        .stdout
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    assert_eq!(second.get(1), Some(&2));
    assert!(second[0] > entry["fencing_token"].as_u64().unwrap_or(u64::MAX));
    let frozen = (file_len(&ticks), file_len(&child_ticks));
    thread::sleep(Duration::from_millis(200));
    assert_eq!((file_len(&ticks), file_len(&child_ticks)), frozen);
    Ok(())
}

/// Opens the store in this process, waiting while a dedupe holds it, and so holds the file.
fn hold(scratch: &Scratch) -> Result<dedupe_store::Store, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match dedupe_store::Store::open(scratch.db()) {
            Err(dedupe_store::Error::AlreadyOpen { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(2));
            }
            held => return Ok(held?),
        }
    }
}

const WAITS_FOR_GO: &str = "touch started; while [ ! -f go ]; do sleep 0.02; done; echo the output";

#[test]
fn an_outcome_that_cannot_be_stored_at_once_is_retried_while_the_key_is_kept() -> TestResult {
    let scratch = Scratch::new()?;
    let run = scratch
        .dedupe(&[
            "--lock-timeout",
            "100ms",
            "run",
            "--key",
            "retry",
            "--lease",
            "3s",
            "--",
            "sh",
            "-c",
            WAITS_FOR_GO,
        ])
        .spawn()?;
    wait_for(&scratch.path("started"))?;
    let held = hold(&scratch)?;
    fs::write(scratch.path("go"), "")?;
    // CMD ends now, and its dedupe finds the file held for its first tries.
    thread::sleep(Duration::from_millis(600));
    held.close()?;
    let finished = finish(run)?;
    assert_eq!(finished.code, Some(0), "{finished:?}");
    let entry = scratch.get("retry")?;
    assert_eq!(entry["state"], "completed");
    assert_eq!(entry["run"]["stdout"], "the output\n");
    Ok(())
}

#[test]
fn output_too_large_for_the_disk_falls_back_to_the_exit_status() -> TestResult {
    let scratch = Scratch::new()?;
    assert_eq!(scratch.run(&["mark", "first"])?.code, Some(0));
    // A file size limit (ulimit -f, with SIGXFSZ ignored so that writes fail with EFBIG)
    // stands for a full disk: the store cannot grow to hold 3 MB of output, but its exit status
    // fits in the file as it is.
    let script = format!(
        "trap '' XFSZ; ulimit -f 2048; exec \"{}\" --db \"{}\" run --key big --max-output 4MiB \
         -- sh -c 'head -c 3000000 /dev/zero | tr \"\\\\0\" x'",
        env!("CARGO_BIN_EXE_dedupe"),
        scratch.db().display()
    );
    let mut shell = Command::new("sh");
    shell
        .args(["-c", &script])
        .current_dir(scratch.dir.path())
        .env_remove("DEDUPE_DB")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let finished = finish(shell.spawn()?)?;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert_eq!(finished.stdout.len(), 3_000_000, "the live output is whole");
    assert!(
        finished
            .stderr
            .contains("its exit status 0 was stored without it"),
        "{}",
        finished.stderr
    );
    let entry = scratch.get("big")?;
    assert_eq!(entry["state"], "completed");
    assert_eq!(entry["run"]["status"], 0);
    assert_eq!(entry["run"]["stdout_bytes"], 0);
    assert_eq!(entry["run"]["stdout_cut"], true);

    let replay = scratch.run(&["run", "--key", "big", "--", "sh", "-c", "echo ran >> count"])?;
    assert_eq!(replay.code, Some(0));
    assert_eq!(
        scratch.count("count"),
        0,
        "a stored status is replayed, not run again"
    );
    Ok(())
}

#[test]
fn when_nothing_can_be_stored_the_run_exits_73_and_says_the_key_is_still_claimed() -> TestResult {
    let scratch = Scratch::new()?;
    let run = scratch
        .dedupe(&[
            "--lock-timeout",
            "100ms",
            "run",
            "--key",
            "stuck",
            "--lease",
            "3s",
            "--",
            "sh",
            "-c",
            WAITS_FOR_GO,
        ])
        .spawn()?;
    wait_for(&scratch.path("started"))?;
    let held = hold(&scratch)?;
    fs::write(scratch.path("go"), "")?;
    let finished = finish(run)?;
    held.close()?;
    assert_eq!(finished.code, Some(73), "{finished:?}");
    assert_eq!(finished.stdout, "the output\n");
    let note = finished
        .notes()
        .last()
        .map(|line| line.to_string())
        .unwrap_or_default();
    assert!(
        note.contains("neither its outcome nor its exit status"),
        "{note}"
    );
    assert!(
        note.contains("\"stuck\" is still claimed by this run"),
        "{note}"
    );
    let entry = scratch.get("stuck")?;
    assert_eq!(entry["state"], "in_progress");
    assert_eq!(entry["attempt"], 1);
    Ok(())
}

/// `dedupe ARGS` with `input` on its stdin, to the end.
fn with_input(
    scratch: &Scratch,
    args: &[&str],
    input: &[u8],
) -> Result<cli_support::Finished, Box<dyn std::error::Error>> {
    let mut child = scratch
        .dedupe(args)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&input);
    });
    let finished = finish(child)?;
    let _ = writer.join();
    Ok(finished)
}

#[test]
fn filter_passes_on_each_id_once_across_batches_and_runs() -> TestResult {
    let scratch = Scratch::new()?;
    let first = with_input(&scratch, &["filter"], b"a\nb\na\n\nc\r\nb\n")?;
    assert_eq!(
        (first.code, first.stdout.as_str()),
        (Some(0), "a\nb\nc\n"),
        "{first:?}"
    );
    let second = with_input(&scratch, &["filter", "--ttl", "1h"], b"c\nd\na\ne")?;
    assert_eq!((second.code, second.stdout.as_str()), (Some(0), "d\ne\n"));
    assert_eq!(
        scratch.run(&["mark", "d"])?.code,
        Some(1),
        "filter marks like mark"
    );

    // Many ids, each twice, in small batches: each comes out once, in input order.
    let ids: Vec<String> = (0..3000).map(|i| format!("id-{i}")).collect();
    let mut input = String::new();
    for pair in ids.chunks(2) {
        for id in pair.iter().chain(pair) {
            input.push_str(id);
            input.push('\n');
        }
    }
    let many = with_input(&scratch, &["filter", "--batch", "64"], input.as_bytes())?;
    assert_eq!(many.code, Some(0), "{}", many.stderr);
    assert_eq!(many.stdout.lines().collect::<Vec<_>>(), ids);
    let again = with_input(&scratch, &["filter"], input.as_bytes())?;
    assert_eq!((again.code, again.stdout.as_str()), (Some(0), ""));

    // A line that is no id stops the filter with 65 after the lines before it.
    let long = format!("new-1\n{}\nnew-2\n", "x".repeat(2000));
    let bad = with_input(&scratch, &["filter"], long.as_bytes())?;
    assert_eq!(
        (bad.code, bad.stdout.as_str()),
        (Some(65), "new-1\n"),
        "{bad:?}"
    );
    assert!(bad.stderr.contains("line 2"), "{}", bad.stderr);
    assert_eq!(scratch.get("new-2")?["state"], "absent");
    Ok(())
}

#[test]
fn hex_keys_name_any_bytes_and_binary_output_is_base64() -> TestResult {
    let scratch = Scratch::new()?;
    let run = scratch.run(&[
        "--hex",
        "run",
        "--key",
        "00ff01",
        "--",
        "sh",
        "-c",
        "echo \"$DEDUPE_KEY_HEX ${DEDUPE_KEY-none}\"; printf '\\377\\376' >&2",
    ])?;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(
        run.stdout, "00ff01 none\n",
        "a key with a NUL byte is in DEDUPE_KEY_HEX only"
    );

    let got = scratch.run(&["--hex", "get", "00FF01", "--json"])?;
    assert_eq!(got.code, Some(0), "{got:?}");
    let entry: Value = serde_json::from_str(&got.stdout)?;
    assert_eq!(entry["key_hex"], "00ff01");
    assert_eq!(entry["run"]["stdout"], "00ff01 none\n");
    assert_eq!(entry["run"]["stdout_encoding"], "utf-8");
    assert_eq!(entry["run"]["stderr"], "//4=");
    assert_eq!(entry["run"]["stderr_encoding"], "base64");
    let table = scratch.run(&["--hex", "get", "00ff01"])?;
    assert!(table.stdout.contains("0x00ff01"), "{}", table.stdout);

    // The same bytes as text and as hex are one key.
    assert_eq!(scratch.run(&["mark", "job"])?.code, Some(0));
    assert_eq!(scratch.run(&["--hex", "mark", "6a6f62"])?.code, Some(1));
    let hex_filter = with_input(&scratch, &["--hex", "filter"], b"6a6f62\n6a6f63\n")?;
    assert_eq!(
        (hex_filter.code, hex_filter.stdout.as_str()),
        (Some(0), "6a6f63\n")
    );
    assert_eq!(scratch.get("jod")?["state"], "absent");
    assert_eq!(scratch.get("joc")?["state"], "completed");

    let expired = scratch.run(&["--hex", "expire", "00ff01"])?;
    assert_eq!(expired.code, Some(0), "{expired:?}");
    assert_eq!(
        scratch.run(&["--hex", "get", "00ff01", "--json"])?.code,
        Some(0)
    );
    let bad = scratch.run(&["--hex", "get", "0g"])?;
    assert_eq!(bad.code, Some(2));
    one_line(&bad);
    Ok(())
}

#[test]
fn stats_prints_the_gauges_for_the_prometheus_textfile_collector() -> TestResult {
    let scratch = Scratch::new()?;
    assert_eq!(scratch.run(&["mark", "a"])?.code, Some(0));
    assert_eq!(scratch.run(&["mark", "b"])?.code, Some(0));
    let stats = scratch.run(&["stats", "--prometheus"])?;
    assert_eq!(stats.code, Some(0), "{}", stats.stderr);
    let db = scratch.db().display().to_string();
    assert!(
        stats
            .stdout
            .contains(&format!("dedupe_live_keys{{db=\"{db}\"}} 2\n")),
        "{}",
        stats.stdout
    );
    assert!(
        stats
            .stdout
            .contains("# TYPE dedupe_expired_pending_keys gauge\n")
    );
    for line in stats.stdout.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().ok_or("a value")?;
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    let both = scratch.run(&["stats", "--prometheus", "--json"])?;
    assert_eq!(both.code, Some(2), "--json and --prometheus conflict");
    Ok(())
}

#[cfg(unix)]
#[test]
fn a_store_file_dedupe_creates_is_readable_by_its_owner_only() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let scratch = Scratch::new()?;
    assert_eq!(scratch.run(&["mark", "x"])?.code, Some(0));
    let mode = fs::metadata(scratch.db())?.permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    // A file that exists keeps its mode.
    fs::set_permissions(scratch.db(), fs::Permissions::from_mode(0o640))?;
    assert_eq!(scratch.run(&["mark", "y"])?.code, Some(0));
    let mode = fs::metadata(scratch.db())?.permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "mode {mode:o}");
    Ok(())
}
