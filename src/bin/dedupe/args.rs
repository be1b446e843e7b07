//! The command line: every subcommand, option and help text, and the parsers for durations,
//! sizes and keys. Anything refused here exits 2 with clap's usage message.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dedupe_store::{MAX_DURATION, MAX_FINGERPRINT_LEN, MAX_KEY_LEN, MAX_RESPONSE_BYTES_LIMIT};

use crate::heartbeat::MIN_LEASE;
use crate::outcome;

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
    /// a store error. Each dedupe holds it only for a few milliseconds at a time.
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

/// A duration as humans write it: `300ms`, `90s`, `10m`, `24h`, `30d`, `1h30m`; more than
/// zero and at most the store's 100-year limit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|err| format!("{err} (write it like 90s, 10m, 24h or 30d)"))?;
    if duration.is_zero() {
        return Err("it must be longer than zero".to_string());
    }
    if duration > MAX_DURATION {
        return Err("it must be at most 100 years".to_string());
    }
    Ok(duration)
}

/// A size in bytes: a plain number, or one with a unit (`B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB`;
/// `K`, `M` and `G` alone are the binary units).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (write it like 65536, 64KiB or 1MiB)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "k" | "kib" => 1 << 10,
        "mb" => 1000 * 1000,
        "m" | "mib" => 1 << 20,
        "gb" => 1000 * 1000 * 1000,
        "g" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    number
        .checked_mul(multiplier)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = parse_duration(text)?;
    if lease < MIN_LEASE {
        return Err(format!(
            "the lease must be at least {} (the heartbeat renews it every third of the lease, \
             and a shorter one could run out while dedupe is alive and CMD still runs)",
            humantime::format_duration(MIN_LEASE)
        ));
    }
    Ok(lease)
}

fn parse_max_output(text: &str) -> Result<usize, String> {
    let bytes = parse_size(text)?;
    let max = MAX_RESPONSE_BYTES_LIMIT - outcome::HEADER_LEN;
    if bytes > max {
        return Err(format!(
            "at most {max} bytes (256 MiB less the outcome header)"
        ));
    }
    Ok(bytes)
}

/// A key from the command line: its text, and its bytes (the text's, or with `--hex` the
/// bytes the text spells, once [`KeyArg::decode_hex`] ran).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyArg {
    text: String,
    bytes: Vec<u8>,
}

impl KeyArg {
    /// Reads the text as hex (for `--hex`).
    pub fn decode_hex(&mut self) -> Result<(), String> {
        self.bytes = decode_hex(&self.text)?;
        check_key_len(self.bytes.len())
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The command line that names the key to `dedupe`, after `dedupe` (`expire "k"`).
    pub fn expire_command(&self) -> String {
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => format!("dedupe expire {text:?}"),
            Err(_) => format!("dedupe --hex expire {}", encode_hex(&self.bytes)),
        }
    }
}

impl AsRef<[u8]> for KeyArg {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Text keys quoted (`"job/1"`), others as `0x` and their hex.
impl std::fmt::Display for KeyArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => write!(f, "{text:?}"),
            Err(_) => write!(f, "0x{}", encode_hex(&self.bytes)),
        }
    }
}

fn parse_key(text: &str) -> Result<KeyArg, String> {
    if text.is_empty() {
        return Err("a key must not be empty".to_string());
    }
    // A hex key is twice as long as its bytes; its own length is checked once decoded.
    if text.len() > 2 * MAX_KEY_LEN {
        check_key_len(text.len())?;
    }
    Ok(KeyArg {
        text: text.to_string(),
        bytes: text.as_bytes().to_vec(),
    })
}

/// Refuses a key longer than the store takes.
pub fn check_key_len(len: usize) -> Result<(), String> {
    if len == 0 {
        return Err("a key must not be empty".to_string());
    }
    if len > MAX_KEY_LEN {
        return Err(format!(
            "the key is {len} bytes long, over the limit of {MAX_KEY_LEN}"
        ));
    }
    Ok(())
}

/// The bytes that `text` spells in hex (either case, an even number of digits).
pub fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err(format!(
            "{text:?} is not hex: it has an odd number of digits"
        ));
    }
    let digit = |byte: u8| match byte {
        b'0'..=b'9' => Ok(byte - b'0'),
        b'a'..=b'f' => Ok(byte - b'a' + 10),
        b'A'..=b'F' => Ok(byte - b'A' + 10),
        _ => Err(format!(
            "{text:?} is not hex: {:?} is not a hex digit",
            char::from(byte)
        )),
    };
    digits
        .chunks(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// `bytes` in lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

fn parse_fingerprint(text: &str) -> Result<String, String> {
    if text.len() > MAX_FINGERPRINT_LEN {
        return Err(format!(
            "the fingerprint is {} bytes long, over the limit of {MAX_FINGERPRINT_LEN}; pass a digest such as $(sha256sum < input)",
            text.len()
        ));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_as_humans_write_them() -> Result<(), String> {
        assert_eq!(parse_duration("90s")?, Duration::from_secs(90));
        assert_eq!(parse_duration("10m")?, Duration::from_secs(600));
        assert_eq!(parse_duration("24h")?, Duration::from_secs(86_400));
        assert_eq!(parse_duration("30d")?, Duration::from_secs(30 * 86_400));
        assert_eq!(parse_duration("300ms")?, Duration::from_millis(300));
        for bad in ["", "0s", "5", "ten minutes", "200years", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
        Ok(())
    }

    #[test]
    fn hex_keys_decode_and_show() -> Result<(), String> {
        assert_eq!(decode_hex("6a6F62")?, b"job");
        assert_eq!(decode_hex("")?, b"");
        for bad in ["6", "6g", "zz", "6a 6f"] {
            assert!(decode_hex(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(encode_hex(&[0, 0xff, 0x10]), "00ff10");
        let mut key = parse_key("00ff")?;
        assert_eq!(key.to_string(), "\"00ff\"");
        key.decode_hex()?;
        assert_eq!(key.as_bytes(), [0, 0xff]);
        assert_eq!(key.to_string(), "0x00ff");
        assert_eq!(key.expire_command(), "dedupe --hex expire 00ff");
        let mut longest = parse_key(&"ab".repeat(MAX_KEY_LEN))?;
        longest.decode_hex()?;
        assert_eq!(longest.as_bytes().len(), MAX_KEY_LEN);
        assert!(parse_key(&"ab".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(
            parse_key(&"x".repeat(MAX_KEY_LEN + 1))
                .is_ok_and(|key| key.as_bytes().len() > MAX_KEY_LEN)
        );
        Ok(())
    }

    #[test]
    fn sizes_with_and_without_units() -> Result<(), String> {
        assert_eq!(parse_size("0")?, 0);
        assert_eq!(parse_size("1500")?, 1500);
        assert_eq!(parse_size("64KiB")?, 65_536);
        assert_eq!(parse_size("1MiB")?, 1 << 20);
        assert_eq!(parse_size("2MB")?, 2_000_000);
        assert_eq!(parse_size("1 GiB")?, 1 << 30);
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "12 parsecs",
            "-3",
            "99999999999999999999GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(parse_max_output("256MiB").is_err());
        assert!(parse_lease("999ms").is_err());
        assert_eq!(parse_lease("1s")?, MIN_LEASE);
        assert!(parse_max_output("255MiB").is_ok());
        Ok(())
    }
}
