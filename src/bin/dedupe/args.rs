//! The command line: every subcommand, option and help text (the parsers of their values are
//! in `values.rs`). Anything refused here exits 2 with clap's usage message.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::values::{
    KeyArg, parse_duration, parse_fingerprint, parse_key, parse_lease, parse_max_output,
};

const ABOUT: &str =
    "Run a command at most once per key, and dedupe ids, on one durable store file.";

const LONG_ABOUT: &str = "\
Run a command at most once per key, and dedupe ids, on one durable store file.

`dedupe run` runs CMD the first time a key is seen and stores its exit status and output;
every later run of the key within its TTL prints that output and exits with that status
instead of running CMD again. `dedupe mark` is the plain \"have I seen this id?\" test for
shell scripts, and `dedupe filter` the same for a stream of ids in a pipeline. The other commands inspect and maintain the store file.

Several dedupe processes may use one file at once: each holds the file only for the moment
it reads or writes it, and waits (up to --lock-timeout) while another holds it.";

const EXIT_CODES: &str = "\
Exit codes:
  run      CMD's own status; 128+N when CMD was killed by signal N; the stored status on a
           replay; 75 while another run holds the key; 65 when the key was run with another
           --fingerprint; 126/127 when CMD cannot be executed / is not found; 74 for a store
           error before CMD ran (CMD did not run); 73 when CMD ran but neither its outcome nor
           its exit status could be stored (the message says what state the key is in)
  mark     0 the first time the key is seen, 1 when it was seen before, 74 on a store error
  filter   0 at the end of stdin, 65 at a line that is not a valid id, 74 on a store error
  others   1 for a store error (one line: what, which file, what to do)
  all      2 for bad arguments; 70 for an internal error in dedupe (please report it)

Durations: 300ms, 90s, 10m, 24h, 30d, or combined as 1h30m.
Sizes: bytes, or with a unit: 64KiB, 1MiB, 2MB.";

const RUN_LONG_ABOUT: &str = "\
Run CMD at most once per key.

First run: CMD runs with dedupe's stdin; its stdout and stderr stream live to dedupe's while
dedupe captures them (up to --max-output bytes in all; a note on stderr says when the capture
was cut; the live output is never cut). When CMD exits 0 (or with --remember-failures, with
any status) its status and captured output are stored for --ttl, and dedupe exits with CMD's
status. A CMD that exits non-zero releases the key, so the next run tries again. A CMD killed
by signal N exits 128+N, as in a shell.

When the outcome cannot be stored (the file is held, the disk is full), dedupe retries a few
times, renewing the lease as it goes, then stores the exit status without the output (replays
then exit with it and print nothing, and a note says so), and if even that fails exits 73 with
a message that says what state the key is left in.

Repeat within the TTL: the stored stdout and stderr are printed and dedupe exits with the stored
status; CMD does not run. A one-line note on stderr says so (--quiet drops it; --quiet-replay
drops the replayed output).

While another dedupe runs the key: exit 75 with one line naming the key and when its lease
ends, or with --wait, wait up to that long for it to finish and then answer as above (replay
its outcome, or run CMD if it failed and released the key).

While CMD runs, dedupe renews its lease on the key every third of --lease (the heartbeat;
--lease is at least 1s so that a live dedupe always renews it in time). If
dedupe itself dies (kill -9, a crash, a reboot), the heartbeat stops, and once the lease has run
out the next run takes the key over and says so on stderr.

CMD runs in a process group of its own, under a small supervisor (a copy of dedupe): if dedupe
is killed, even with kill -9, the supervisor kills CMD's whole group with SIGKILL (at once on
Linux, Android and FreeBSD, within 200ms elsewhere), so that a takeover never runs beside a
CMD left behind. Processes that leave CMD's group (setsid, daemons) are not killed. SIGTERM,
SIGHUP, SIGINT and SIGQUIT sent to dedupe are passed on to CMD's group; from a terminal, CMD's
group is in the foreground, so Ctrl-C reaches it directly. Either way dedupe waits for CMD and
records how it ended.

CMD finds in its environment DEDUPE_KEY (the key; absent for a key with a NUL byte),
DEDUPE_KEY_HEX (the hex of its bytes), DEDUPE_ATTEMPT (1, or more after a
takeover) and DEDUPE_FENCING_TOKEN (larger for every new owner of the key: pass it to the
systems CMD writes to, so that they can refuse a stale owner's writes).

Stored outcome (the key's response bytes, version 1, integers little-endian):
  bytes 0-3    magic \"DRUN\"
  byte  4      encoding version, 1
  byte  5      flags: bit 0 stdout was cut, bit 1 stderr was cut, bit 2 killed by a signal
  bytes 6-9    u32: the exit code (0-255), or the signal number when bit 2 is set
  bytes 10-13  u32: length of the captured stdout
  bytes 14-17  u32: length of the captured stderr
  then the captured stdout, then the captured stderr
A dedupe that finds a version it does not know refuses to replay it rather than guess.";

/// `dedupe`: its global options and one subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "dedupe",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXIT_CODES,
    propagate_version = true
)]
pub struct Cli {
    /// The store file, created by `run`, `mark` and `filter` if it does not exist; or a
    /// postgres:// URL (in a dedupe built with feature `postgres`): see docs/POSTGRES.md.
    #[arg(
        long,
        global = true,
        env = "DEDUPE_DB",
        default_value = "dedupe.redb",
        value_name = "FILE|URL"
    )]
    pub db: PathBuf,

    /// `--pg-schema`, for a store on PostgreSQL.
    #[command(flatten)]
    pub postgres: crate::location::PgArgs,

    /// How long to wait for another process that holds the store file before giving up with
    /// a store error. Each dedupe holds it only for a few milliseconds at a time. Over
    /// PostgreSQL: how long a connection attempt may take (replacing the URL's
    /// connect_timeout). Lease renewals wait at most a third of --lease either way.
    #[arg(long, global = true, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub lock_timeout: Duration,

    /// The most keys the store may hold (live, or expired and not yet swept). At the budget,
    /// `run`, `mark` and `filter` of a new key exit 69 and record nothing, while keys already stored
    /// still replay; `dedupe sweep` makes room as keys expire. Default: no limit.
    #[arg(long, global = true, env = "DEDUPE_MAX_KEYS", value_name = "N")]
    pub max_keys: Option<u64>,

    /// KEY arguments are the hex of the key's bytes (`6a6f62` for `job`), for keys that are not
    /// text; with `filter`, so are the lines read and printed.
    #[arg(long, global = true)]
    pub hex: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run CMD at most once per key; replay its stored output and status afterwards.
    #[command(long_about = RUN_LONG_ABOUT, after_help = EXIT_CODES)]
    Run(RunArgs),

    /// Exit 0 the first time KEY is seen, 1 if it was seen before (within its TTL).
    #[command(
        long_about = "Exit 0 the first time KEY is seen, 1 if it was seen before within its TTL.\n\n\
        Meant for shell scripts that must process each delivery id, message id or file once:\n    \
        if dedupe mark \"$id\"; then process \"$id\"; fi\n\
        A store error exits 74, never 1, so a failure is not mistaken for a duplicate.\n\
        Marks share the key space with `run`: a key that a run holds or completed is seen."
    )]
    Mark(MarkArgs),

    /// Read ids from stdin, one per line, and print those not seen before, marking them.
    #[command(
        long_about = "Read ids from stdin, one per line, and print those not seen before (within \
        their TTL), marking them as seen.\n\n\
        For pipelines that must pass each id on once:\n    \
        consume-events | jq -r .id | dedupe filter --ttl 7d | process-new-ids\n\
        Lines are marked in batches, each one commit (as many lines as are waiting, up to \
        --batch), and a batch's new ids are printed once it is committed. Like `mark`, an id \
        is marked before it is passed on: if the reader downstream fails, those ids are not \
        offered again. A line's end (\\n or \\r\\n) is not part of the id; empty lines are \
        skipped. With --hex, lines are the hex of the ids' bytes.\n\n\
        Exits 0 at the end of stdin, 65 at a line that is not a valid id (the lines before it \
        were handled), 74 on a store error or when stdout fails."
    )]
    Filter(FilterArgs),

    /// Show one key's state (and a run's stored status and output sizes).
    Get(GetArgs),

    /// List live keys in key order.
    List(ListArgs),

    /// Forget a key now, whatever its state, so the next run or mark starts afresh.
    Expire(ExpireArgs),

    /// Remove every expired record from the file now (`run` removes up to 256 after each
    /// command).
    Sweep,

    /// Show what the store file holds: live keys, expired records awaiting a sweep, file size.
    Stats(StatsArgs),

    /// Check the whole file: page checksums, every record's checksum, the expiry index.
    Verify(JsonArgs),

    /// Rewrite the file to give free space back to the operating system.
    Compact,

    /// Internal to `dedupe run`: runs CMD in a process group of its own and kills the group
    /// if the dedupe that started it dies.
    #[command(name = "__supervise", hide = true)]
    Supervise(SuperviseArgs),
}

/// `dedupe __supervise`, started by `dedupe run` only.
#[derive(Debug, Args)]
pub struct SuperviseArgs {
    /// The process id of the dedupe that started it.
    #[arg(long, value_name = "PID")]
    pub parent: i32,

    /// The process group to give the terminal's foreground back to when CMD has ended.
    #[arg(long, value_name = "PGID")]
    pub foreground_of: Option<i32>,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

/// `dedupe run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The key that identifies this piece of work, e.g. `nightly-report-2024-06-01`.
    #[arg(long, value_parser = parse_key)]
    pub key: KeyArg,

    /// How long the outcome is kept (and replayed) after CMD finishes.
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Duration,

    /// How long the key stays ours if dedupe stops renewing it (if it is killed). The heartbeat
    /// renews it every third of this while CMD runs; at least 1s.
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = parse_lease)]
    pub lease: Duration,

    /// A digest of CMD's input: a later run of the key with a different fingerprint is refused
    /// (exit 65) instead of being answered with the other input's outcome.
    #[arg(long, value_name = "TEXT", value_parser = parse_fingerprint)]
    pub fingerprint: Option<String>,

    /// Store a failing CMD's status and output too, so it is replayed rather than retried.
    #[arg(long)]
    pub remember_failures: bool,

    /// How many bytes of CMD's stdout and stderr, together, are stored for replays. Output
    /// beyond it is still shown live, just not stored.
    #[arg(
        long,
        default_value = "1MiB",
        value_name = "SIZE",
        value_parser = parse_max_output
    )]
    pub max_output: usize,

    /// While another dedupe runs the key, wait up to this long for it instead of exiting 75.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait: Option<Duration>,

    /// On a replay, do not print the stored output (the status is still replayed).
    #[arg(long)]
    pub quiet_replay: bool,

    /// Do not print dedupe's own notes (such as "replayed"); warnings and errors still show.
    #[arg(long, short)]
    pub quiet: bool,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<OsString>,
}

/// `dedupe mark`.
#[derive(Debug, Args)]
pub struct MarkArgs {
    /// The id to mark as seen.
    #[arg(value_parser = parse_key)]
    pub key: KeyArg,

    /// How long the key is remembered.
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Duration,
}

/// `dedupe filter`.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// How long each id is remembered.
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Duration,

    /// At most this many ids in one commit.
    #[arg(long, default_value_t = 1000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: u32,
}

/// `dedupe get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The key to show.
    #[arg(value_parser = parse_key)]
    pub key: KeyArg,

    /// Print one JSON object instead of a table (see the README for its fields); includes the
    /// stored stdout and stderr of a run.
    #[arg(long)]
    pub json: bool,
}

/// `dedupe list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only keys that start with this.
    #[arg(long, default_value = "", value_name = "P")]
    pub prefix: String,

    /// At most this many keys.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub limit: usize,

    /// Print JSON instead of a table (see the README for its fields).
    #[arg(long)]
    pub json: bool,
}

/// `dedupe expire`.
#[derive(Debug, Args)]
pub struct ExpireArgs {
    /// The key to forget.
    #[arg(value_parser = parse_key)]
    pub key: KeyArg,
}

/// Readers that only choose their output format.
#[derive(Debug, Args)]
pub struct JsonArgs {
    /// Print JSON instead of a table (see the README for its fields).
    #[arg(long)]
    pub json: bool,
}

/// `stats`: a table, JSON, or the Prometheus text format.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print JSON instead of a table (see the README for its fields).
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,

    /// Print the gauges in the Prometheus text format, for node-exporter's textfile
    /// collector (write to a temporary file, then rename it into the collector's directory).
    #[arg(long)]
    pub prometheus: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
