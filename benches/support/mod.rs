//! What the benchmarks share: running an operation from many threads while timing every call,
//! the peers (raw redb, SQLite) set up as BENCHMARKS.md describes, and the summary tables.
//!
//! Criterion measures the mean; the tails (p50/p99/max) and the ratios to the peers are taken
//! here, from the same calls criterion times. Criterion runs its warm-up calls first and then
//! exactly `sample_size` measurement calls of equal size (flat sampling), so the summary keeps
//! the last `sample_size` calls of each benchmark and drops the warm-up.

#![allow(dead_code)] // Each bench uses the part of this module its question needs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, SamplingMode, measurement::WallTime};

/// Measurement calls per benchmark.
pub const SAMPLES: usize = 10;

/// One criterion call: how many operations ran, over how long, and each one's latency.
#[derive(Default)]
pub struct Run {
    pub ops: u64,
    pub elapsed: Duration,
    /// Nanoseconds per operation.
    pub latencies: Vec<u64>,
}

/// The figures of one benchmark, over its measurement calls.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Figures {
    fn of(runs: &[Run]) -> Figures {
        let ops: u64 = runs.iter().map(|run| run.ops).sum();
        let elapsed: Duration = runs.iter().map(|run| run.elapsed).sum();
        let mut latencies: Vec<u64> = runs
            .iter()
            .flat_map(|run| run.latencies.iter().copied())
            .collect();
        latencies.sort_unstable();
        Figures {
            ops,
            ops_per_sec: ops as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            max: Duration::from_nanos(latencies.last().copied().unwrap_or(0)),
        }
    }
}

/// The `q` quantile of sorted nanosecond latencies (nearest rank).
pub fn percentile(sorted: &[u64], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    Duration::from_nanos(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Collects the calls of every benchmark in this process, by name.
#[derive(Default)]
pub struct Recorder {
    runs: Mutex<BTreeMap<String, Vec<Run>>>,
}

impl Recorder {
    pub fn record(&self, name: &str, run: Run) {
        self.runs
            .lock()
            .expect("recorder lock")
            .entry(name.to_string())
            .or_default()
            .push(run);
    }

    /// The figures of `name` over its measurement calls (the last [`SAMPLES`]).
    pub fn figures(&self, name: &str) -> Option<Figures> {
        let runs = self.runs.lock().expect("recorder lock");
        let runs = runs.get(name)?;
        let measured = &runs[runs.len().saturating_sub(SAMPLES)..];
        Some(Figures::of(measured))
    }
}

/// Settings every group uses: few, flat samples (each call is seconds of fsyncs, and the
/// summary relies on the measurement calls being the last `SAMPLES`), no plots.
pub fn configure(group: &mut BenchmarkGroup<'_, WallTime>, measurement: Duration) {
    group
        .sample_size(SAMPLES)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(measurement);
}

/// Runs `total` operations spread over `threads` threads and times each one. `setup` builds a
/// thread's state (a connection, say) before the clock starts; `op` runs one operation, given
/// that state and a number unique within this process for fresh keys.
pub fn parallel<S>(
    threads: usize,
    total: u64,
    next_id: &AtomicU64,
    setup: impl Fn() -> S + Sync,
    op: impl Fn(&mut S, u64) + Sync,
) -> Run {
    let threads = threads.max(1);
    let per_thread = |t: usize| -> u64 {
        let base = total / threads as u64;
        base + u64::from((t as u64) < total % threads as u64)
    };
    let start_line = Barrier::new(threads);
    let spans: Vec<(Instant, Instant, Vec<u64>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (setup, op, start_line) = (&setup, &op, &start_line);
                scope.spawn(move || {
                    let count = per_thread(t);
                    let mut state = setup();
                    let mut latencies = Vec::with_capacity(count as usize);
                    start_line.wait();
                    let started = Instant::now();
                    for _ in 0..count {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let before = Instant::now();
                        op(&mut state, id);
                        latencies.push(before.elapsed().as_nanos() as u64);
                    }
                    (started, Instant::now(), latencies)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("bench worker panicked"))
            .collect()
    });
    let first = spans.iter().map(|(start, _, _)| *start).min();
    let last = spans.iter().map(|(_, end, _)| *end).max();
    let elapsed = match (first, last) {
        (Some(first), Some(last)) => last - first,
        _ => Duration::ZERO,
    };
    Run {
        ops: total,
        elapsed,
        latencies: spans.into_iter().flat_map(|(_, _, l)| l).collect(),
    }
}

/// Runs `bench` under criterion (arguments from the command line, no plots), prints
/// criterion's summary and the machine, and returns the latencies the bench recorded for the
/// summary table the caller prints next.
pub fn run_criterion(bench: impl FnOnce(&mut Criterion, &Recorder)) -> Recorder {
    let recorder = Recorder::default();
    let mut criterion = Criterion::default().without_plots().configure_from_args();
    bench(&mut criterion, &recorder);
    criterion.final_summary();
    print_machine();
    recorder
}

/// Benchmarks `op` as `id`: criterion times whole [`parallel`] runs, and `recorder` keeps each
/// run's per-operation latencies for the summary table printed after criterion's report.
pub fn bench_parallel<S>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    recorder: &Recorder,
    threads: usize,
    next_id: &AtomicU64,
    setup: impl Fn() -> S + Sync,
    op: impl Fn(&mut S, u64) + Sync,
) {
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let run = parallel(threads, iters, next_id, &setup, &op);
            let elapsed = run.elapsed;
            recorder.record(id, run);
            elapsed
        })
    });
}

/// A fresh key for operation `id`, shaped like an idempotency key.
pub fn key(id: u64) -> String {
    format!("tenant-{:02}/POST /charges/{id:016x}", id % 32)
}

fn format_duration(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros < 10.0 {
        format!("{micros:.2} µs")
    } else if micros < 1_000.0 {
        format!("{micros:.0} µs")
    } else {
        format!("{:.2} ms", micros / 1_000.0)
    }
}

/// Prints one markdown row of a summary table.
pub fn print_row(label: &str, figures: Option<Figures>, baseline: Option<Figures>) {
    let Some(f) = figures else {
        return;
    };
    let ratio = match baseline {
        Some(b) if b.ops_per_sec > 0.0 => format!("{:.2}×", f.ops_per_sec / b.ops_per_sec),
        _ => "–".to_string(),
    };
    println!(
        "| {label} | {:.0} | {ratio} | {} | {} | {} | {} |",
        f.ops_per_sec,
        format_duration(f.p50),
        format_duration(f.p99),
        format_duration(f.max),
        f.ops
    );
}

/// Prints the header of a summary table.
pub fn print_header(title: &str, ratio_to: &str) {
    println!("\n## {title}\n");
    println!("| run | ops/s | ratio to {ratio_to} | p50 | p99 | max | ops measured |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
}

/// Raw redb, as an application without this crate would use it: one table, one durable write
/// transaction per claim (redb's defaults: 1-phase commit, no quick repair).
pub mod raw_redb {
    use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

    pub const CLAIMS: TableDefinition<&str, &[u8]> = TableDefinition::new("claims");

    /// A 40-byte value, about what the store writes for an in-progress claim.
    pub const CLAIM_VALUE: [u8; 40] = [7; 40];

    pub fn create(path: &std::path::Path) -> Database {
        let db = Database::create(path).expect("create redb");
        let txn = db.begin_write().expect("begin_write");
        txn.open_table(CLAIMS).expect("open table");
        txn.commit().expect("commit");
        db
    }

    /// Claims `key` if it is absent, in its own durable transaction. Returns whether it was.
    pub fn claim(db: &Database, key: &str) -> bool {
        claim_committed(db, key, false)
    }

    /// [`claim`], committed in one phase (redb's default) or two (as the store commits).
    pub fn claim_committed(db: &Database, key: &str, two_phase: bool) -> bool {
        let mut txn = db.begin_write().expect("begin_write");
        txn.set_two_phase_commit(two_phase);
        let fresh = {
            let mut table = txn.open_table(CLAIMS).expect("open table");
            let fresh = table.get(key).expect("get").is_none();
            if fresh {
                table.insert(key, &CLAIM_VALUE[..]).expect("insert");
            }
            fresh
        };
        txn.commit().expect("commit");
        fresh
    }

    /// Stores `response` for `key`, in its own durable transaction.
    pub fn complete(db: &Database, key: &str, response: &[u8]) {
        let txn = db.begin_write().expect("begin_write");
        {
            let mut table = txn.open_table(CLAIMS).expect("open table");
            table.insert(key, response).expect("insert");
        }
        txn.commit().expect("commit");
    }

    /// Reads `key` in a read transaction, copying the value out as a replay would.
    pub fn read(db: &Database, key: &str) -> Option<Vec<u8>> {
        let txn = db.begin_read().expect("begin_read");
        let table = txn.open_table(CLAIMS).expect("open table");
        table
            .get(key)
            .expect("get")
            .map(|value| value.value().to_vec())
    }
}

/// SQLite as the issue sets it up: bundled, WAL, synchronous=FULL, one connection per thread,
/// `INSERT ... ON CONFLICT DO NOTHING` in autocommit (one transaction per claim).
pub mod sqlite {
    use std::path::Path;
    use std::time::Duration;

    use rusqlite::Connection;

    pub fn create(path: &Path) {
        let conn = connect(path);
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS claims (
                 key TEXT PRIMARY KEY,
                 token INTEGER NOT NULL,
                 lease_until INTEGER NOT NULL,
                 expires_at INTEGER NOT NULL,
                 response BLOB
             )",
        )
        .expect("create table");
    }

    pub fn connect(path: &Path) -> Connection {
        let conn = Connection::open(path).expect("open sqlite");
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "synchronous", "FULL")
            .expect("synchronous");
        conn.busy_timeout(Duration::from_secs(60))
            .expect("busy_timeout");
        conn
    }

    /// Claims `key` if absent; returns whether it was.
    pub fn claim(conn: &Connection, key: &str, token: u64) -> bool {
        let mut insert = conn
            .prepare_cached(
                "INSERT INTO claims (key, token, lease_until, expires_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
            )
            .expect("prepare");
        let token = token as i64;
        insert
            .execute((key, token, token + 30_000, token + 86_400_000))
            .expect("insert")
            == 1
    }

    /// Stores `response` for `key`.
    pub fn complete(conn: &Connection, key: &str, response: &[u8]) {
        let mut update = conn
            .prepare_cached("UPDATE claims SET response = ?2 WHERE key = ?1")
            .expect("prepare");
        update.execute((key, response)).expect("update");
    }
}

/// The size of a file in bytes.
pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The machine, for the top of every summary.
pub fn print_machine() {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("\nmachine: {cpus} CPUs, {model}");
}

/// A bijective scramble of `n` (splitmix64's finaliser), so that consecutive numbers make keys
/// scattered over the tree, as real idempotency keys (UUIDs, hashes) are.
pub fn scatter(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `store` with `count` scattered keys through `mark_seen_many`, in large atomic
/// batches, each kept for `ttl` from the store clock's now.
pub fn fill(store: &dedupe_store::Store, count: u64, ttl: Duration) {
    const BATCH: u64 = 10_000;
    let mut next = 0;
    while next < count {
        let end = (next + BATCH).min(count);
        let keys: Vec<String> = (next..end)
            .map(|n| format!("seed/{:016x}", scatter(n)))
            .collect();
        let fresh = store.mark_seen_many_with_ttl(&keys, ttl).expect("fill");
        assert!(fresh.iter().all(|&f| f), "fill keys must be fresh");
        next = end;
    }
}

/// Copies a template store file to `to`, so every run starts from the same bytes.
pub fn copy_file(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copy the template store");
}

/// Median and maximum of a few durations.
pub fn median_max(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    let median = samples.get(samples.len() / 2).copied().unwrap_or_default();
    let max = samples.last().copied().unwrap_or_default();
    (median, max)
}

/// A duration as people read it.
pub fn human(d: Duration) -> String {
    format_duration(d)
}

/// Runs `op` from `threads` threads until `duration` has passed, timing each call.
pub fn parallel_for(
    threads: usize,
    duration: Duration,
    next_id: &AtomicU64,
    op: impl Fn(u64) + Sync,
) -> Run {
    let start_line = Barrier::new(threads);
    let spans: Vec<(u64, Instant, Instant, Vec<u64>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (op, start_line) = (&op, &start_line);
                scope.spawn(move || {
                    let mut latencies = Vec::new();
                    start_line.wait();
                    let started = Instant::now();
                    let deadline = started + duration;
                    let mut ops = 0u64;
                    while Instant::now() < deadline {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let before = Instant::now();
                        op(id);
                        latencies.push(before.elapsed().as_nanos() as u64);
                        ops += 1;
                    }
                    (ops, started, Instant::now(), latencies)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("bench worker panicked"))
            .collect()
    });
    let first = spans.iter().map(|(_, start, _, _)| *start).min();
    let last = spans.iter().map(|(_, _, end, _)| *end).max();
    Run {
        ops: spans.iter().map(|(ops, _, _, _)| ops).sum(),
        elapsed: match (first, last) {
            (Some(first), Some(last)) => last - first,
            _ => Duration::ZERO,
        },
        latencies: spans.into_iter().flat_map(|(_, _, _, l)| l).collect(),
    }
}

/// The figures of a single run.
pub fn figures_of(run: Run) -> Figures {
    Figures::of(std::slice::from_ref(&run))
}
