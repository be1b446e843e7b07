//! What quick repair costs and what it buys, on a store of one million keys:
//!
//! - the cost: durable claims per second at 1 and 32 threads with quick repair on and off, of
//!   new keys that sort together (`cost/N`, a counter) and of new keys scattered over the
//!   tree (as UUIDs or hashes are), whose merges write one leaf per key;
//! - the gain: how long `open` takes after the process writing the store was killed with
//!   SIGKILL in the middle of its commits (redb must repair a file that was not closed
//!   cleanly: quickly from the saved allocator state, or by walking every tree).
//!
//! Criterion's iteration model does not fit a kill -9 (each run consumes its file), so this
//! bench measures and prints its own figures. It re-runs its own executable as the child that
//! gets killed. `cargo bench -p dedupe-store-benches --bench crash_reopen`;
//! `DEDUPE_BENCH_KEYS` changes the store size (default 1,000,000) and `DEDUPE_BENCH_ROUNDS`
//! the kills per setting (default 5).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dedupe_store::{Claim, Store};

const CHILD_ENV: &str = "DEDUPE_BENCH_REOPEN_CHILD";
const CHILD_QUICK_REPAIR_ENV: &str = "DEDUPE_BENCH_REOPEN_QUICK_REPAIR";
const CHILD_WRITERS: usize = 8;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The child: writes claims and completes from several threads until it is killed.
fn child(path: &Path, quick_repair: bool) {
    let store = Store::builder()
        .quick_repair(quick_repair)
        .open(path)
        .expect("child opens the store");
    let claims = AtomicU64::new(0);
    let said_ready = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for writer in 0..CHILD_WRITERS {
            let (store, claims, said_ready) = (&store, &claims, &said_ready);
            scope.spawn(move || {
                for n in 0u64.. {
                    let key = format!("child/{writer}/{n}");
                    if let Claim::Acquired(ticket) = store.claim(&key).expect("claim") {
                        store.complete(&ticket, b"done").expect("complete");
                    }
                    if claims.fetch_add(1, Ordering::Relaxed) == 200
                        && !said_ready.swap(true, Ordering::Relaxed)
                    {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ready").expect("tell the parent");
                        out.flush().expect("flush");
                    }
                }
            });
        }
    });
}

/// Runs a child on `path`, lets it write for a while, kills it with SIGKILL.
fn write_and_kill(path: &Path, quick_repair: bool) {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, path)
        .env(CHILD_QUICK_REPAIR_ENV, if quick_repair { "1" } else { "0" })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the child's ready line");
    assert_eq!(line.trim(), "ready", "the child failed before writing");
    std::thread::sleep(Duration::from_millis(300));
    // Child::kill sends SIGKILL on Unix: no destructor, no clean close.
    child.kill().expect("kill the child");
    child.wait().expect("reap the child");
}

/// Writes the file's dirty pages back and drops it from the page cache, as after a reboot
/// (GNU dd's `iflag=nocache count=0` advises the kernel to drop the whole file). Returns false
/// where that is not available.
fn drop_from_page_cache(path: &Path) -> bool {
    let synced = std::fs::File::open(path).and_then(|file| file.sync_all());
    let dropped = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status();
    synced.is_ok() && dropped.is_ok_and(|status| status.success())
}

fn timed_open(path: &Path, quick_repair: bool) -> Duration {
    let started = Instant::now();
    let store = Store::builder()
        .quick_repair(quick_repair)
        .without_sweeper()
        .open(path)
        .expect("reopen after kill -9");
    let took = started.elapsed();
    drop(store);
    took
}

fn claims_per_sec(
    path: &Path,
    quick_repair: bool,
    scattered: bool,
    threads: usize,
    count: u64,
) -> support::Figures {
    let store = Store::builder()
        .quick_repair(quick_repair)
        .open(path)
        .expect("open the copy");
    let ids = AtomicU64::new(0);
    let recorder = support::Recorder::default();
    let run = support::parallel(
        threads,
        count,
        &ids,
        || (),
        |(), n| {
            let key = if scattered {
                format!("cost/{:016x}", support::scatter(n))
            } else {
                format!("cost/{n}")
            };
            let claim = store.claim(key).expect("claim");
            assert!(matches!(claim, Claim::Acquired(_)));
        },
    );
    recorder.record("run", run);
    store.close().expect("close");
    recorder.figures("run").expect("figures")
}

fn main() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        let quick_repair = std::env::var(CHILD_QUICK_REPAIR_ENV).as_deref() == Ok("1");
        child(&PathBuf::from(path), quick_repair);
        return;
    }
    if std::env::args().any(|arg| arg == "--list") {
        return; // `cargo bench -- --list` and test discovery: nothing to list.
    }
    let keys = env_u64("DEDUPE_BENCH_KEYS", 1_000_000);
    let rounds = env_u64("DEDUPE_BENCH_ROUNDS", 5);
    let dir = tempfile::tempdir().expect("tempdir");
    let template = dir.path().join("template.redb");
    let started = Instant::now();
    {
        let store = Store::builder()
            .without_sweeper()
            .open(&template)
            .expect("create the template");
        support::fill(&store, keys, Duration::from_secs(7 * 24 * 3600));
        store.close().expect("close the template");
    }
    let template_size = support::file_size(&template);
    println!(
        "template: {keys} keys, {:.1} MiB, built in {:.1} s",
        template_size as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let work = dir.path().join("work.redb");

    support::print_machine();
    println!("\n## Quick repair: per-claim cost on a {keys}-key store\n");
    println!("| new keys | quick repair | threads | claims/s | p50 | p99 | max |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for scattered in [false, true] {
        for threads in [1usize, 32] {
            let count = if threads == 1 { 2_000 } else { 40_000 };
            for quick_repair in [true, false] {
                support::copy_file(&template, &work);
                let f = claims_per_sec(&work, quick_repair, scattered, threads, count);
                println!(
                    "| {} | {} | {threads} | {:.0} | {} | {} | {} |",
                    if scattered { "scattered" } else { "in order" },
                    if quick_repair { "on" } else { "off" },
                    f.ops_per_sec,
                    support::human(f.p50),
                    support::human(f.p99),
                    support::human(f.max)
                );
            }
        }
    }

    println!("\n## Reopen after kill -9 of a {keys}-key store ({rounds} kills each)\n");
    println!(
        "| quick repair | clean close | kill -9, warm cache: median | max | kill -9, cold cache: median | max |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for quick_repair in [true, false] {
        support::copy_file(&template, &work);
        let clean = timed_open(&work, quick_repair);
        let mut warm = Vec::new();
        let mut cold = Vec::new();
        for round in 0..rounds * 2 {
            support::copy_file(&template, &work);
            write_and_kill(&work, quick_repair);
            if round % 2 == 1 {
                if !drop_from_page_cache(&work) {
                    continue;
                }
                cold.push(timed_open(&work, quick_repair));
            } else {
                warm.push(timed_open(&work, quick_repair));
            }
        }
        let (warm_median, warm_max) = support::median_max(warm);
        let (cold_median, cold_max) = support::median_max(cold);
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            if quick_repair { "on" } else { "off" },
            support::human(clean),
            support::human(warm_median),
            support::human(warm_max),
            support::human(cold_median),
            support::human(cold_max)
        );
    }
}
