//! `dedupe run`: claim the key, then either replay the stored outcome, report the run that
//! holds the key, or run CMD with a heartbeat and store how it ended.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use dedupe_store::{Claim, ClaimOptions, Error, Outcome, Ticket};
use rustix::process::Pid;

use crate::args::RunArgs;
use crate::capture::{self, Budget, Captured};
use crate::console;
use crate::failure::{self, Failure};
use crate::heartbeat::Heartbeat;
use crate::open::{self, StoreFile};
use crate::outcome::{self, Ending, RunOutcome};
use crate::signals::Caught;
use crate::supervise;
use crate::values;

/// CMD's environment: its fencing token, for the systems it writes to to refuse a stale
/// owner's writes.
pub const ENV_FENCING_TOKEN: &str = "DEDUPE_FENCING_TOKEN";
/// CMD's environment: which attempt at the key this is (1 the first time, more after a
/// takeover).
pub const ENV_ATTEMPT: &str = "DEDUPE_ATTEMPT";
/// CMD's environment: the key (unless it has a NUL byte, which no environment variable can
/// hold).
pub const ENV_KEY: &str = "DEDUPE_KEY";
/// CMD's environment: the hex of the key's bytes.
pub const ENV_KEY_HEX: &str = "DEDUPE_KEY_HEX";

/// The first pause between polls of a busy key under `--wait`; it doubles up to
/// [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(25);
/// Waiters notice a finished run within this long.
const MAX_POLL: Duration = Duration::from_millis(500);

/// Runs the command; returns dedupe's exit status.
pub fn run(db: StoreFile, args: &RunArgs) -> Result<u8, Failure> {
    if args.cmd.is_empty() {
        return Err(Failure::new(failure::USAGE, "no CMD given after --"));
    }
    let file = db.max_response_bytes(args.max_output + outcome::HEADER_LEN);
    let mut options = ClaimOptions::new().lease(args.lease).ttl(args.ttl);
    if let Some(fingerprint) = &args.fingerprint {
        options = options.fingerprint(fingerprint);
    }
    // A store error before CMD ran exits 74: CMD's own status 1 must not be mistaken for it.
    let start =
        claim(&file, args, &options).map_err(|failure| failure.store_code(failure::IO_ERROR))?;
    match start {
        Start::Replay(outcome) => replay(args, &outcome),
        Start::Run(ticket) => {
            if ticket.is_takeover() {
                console::say(&format!(
                    "took over key {} from an earlier run that stopped renewing its lease \
                     (killed or crashed); running CMD again as attempt {}",
                    ticket.key(),
                    ticket.attempt()
                ));
            }
            execute(&file, args, ticket)
        }
    }
}

enum Start {
    Run(Ticket),
    Replay(Outcome),
}

/// Claims the key, polling while another run holds it if `--wait` allows.
///
/// Waiting polls the file: the store's own `claim_or_wait` is woken by an in-process
/// notification, which cannot reach another process. Each poll is a read-only claim answered
/// without a commit, and the pause between polls never runs past the holder's lease deadline,
/// so a takeover of a dead holder's key is not delayed either.
fn claim(file: &StoreFile, args: &RunArgs, options: &ClaimOptions) -> Result<Start, Failure> {
    let doing = format!("cannot claim key {}", args.key);
    let started = Instant::now();
    let deadline = args.wait.map(|wait| started + wait);
    let mut pause = FIRST_POLL;
    loop {
        match file.with(&doing, |store| {
            store.claim_with(args.key.as_bytes(), options)
        })? {
            Claim::Acquired(ticket) => return Ok(Start::Run(ticket)),
            Claim::Completed(outcome) => return Ok(Start::Replay(outcome)),
            Claim::Mismatch { completed, .. } => {
                let state = if completed { "ran" } else { "is running" };
                return Err(Failure::new(
                    failure::MISMATCH,
                    format!(
                        "key {} {state} with a different --fingerprint; use a key of its own \
                         for this input, or `dedupe expire` the key first",
                        args.key
                    ),
                ));
            }
            Claim::InProgress {
                lease_until,
                retry_after,
                attempt,
                ..
            } => {
                let now = Instant::now();
                let Some(deadline) = deadline.filter(|deadline| now < *deadline) else {
                    return Err(busy(args, lease_until, attempt, started));
                };
                let until_lease_ends = retry_after + Duration::from_millis(5);
                thread::sleep(
                    open::jittered(pause)
                        .min(until_lease_ends)
                        .min(deadline - now),
                );
                pause = (pause * 2).min(MAX_POLL);
            }
        }
    }
}

fn busy(args: &RunArgs, lease_until: u64, attempt: u32, started: Instant) -> Failure {
    let waited = match args.wait {
        Some(_) => format!(
            " after waiting {}",
            humantime::format_duration(round_to_millis(started.elapsed()))
        ),
        None => String::new(),
    };
    let advice = match args.wait {
        Some(_) => "retry later or wait longer",
        None => "retry later, or pass --wait DURATION to wait for it",
    };
    Failure::new(
        failure::BUSY,
        format!(
            "key {} is still being run by another dedupe (attempt {attempt}){waited}; its \
             lease ends at {} unless renewed; {advice}",
            args.key,
            utc(lease_until)
        ),
    )
}

fn replay(args: &RunArgs, outcome: &Outcome) -> Result<u8, Failure> {
    if outcome.response.is_empty() {
        if !args.quiet {
            console::say(&format!(
                "key {} was marked done without an outcome (by `dedupe mark`) at {}; not \
                 running CMD",
                args.key,
                utc(outcome.completed_at)
            ));
        }
        return Ok(0);
    }
    let stored = RunOutcome::decode(&outcome.response).map_err(|why| {
        Failure::new(
            failure::IO_ERROR,
            format!(
                "key {} is completed but cannot be replayed: {why}; `{}` clears it if CMD \
                 should run again",
                args.key,
                args.key.expire_command()
            ),
        )
    })?;
    if !args.quiet_replay {
        console::out(&stored.stdout);
        console::err_bytes(&stored.stderr);
    }
    if !args.quiet {
        let cut = if stored.stdout_cut || stored.stderr_cut {
            " (its output was cut when it was captured)"
        } else {
            ""
        };
        console::say(&format!(
            "replayed key {}: it ran at {} with {}{cut}; CMD was not run again",
            args.key,
            utc(outcome.completed_at),
            stored.ending
        ));
    }
    Ok(stored.ending.exit_code())
}

/// Runs CMD as the key's owner and stores (or releases) the key by how it ended.
fn execute(file: &StoreFile, args: &RunArgs, ticket: Ticket) -> Result<u8, Failure> {
    let (program, program_args) = match args.cmd.split_first() {
        Some(split) => split,
        None => {
            finish(file, args, &ticket, None)?;
            return Err(Failure::new(failure::USAGE, "no CMD given after --"));
        }
    };
    let caught = Caught::install();
    let foreground = supervise::foreground_group();
    let spawned = runnable(program).and_then(|()| {
        // CMD runs under `dedupe __supervise`, which kills CMD's group if we die.
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg(supervise::SUBCOMMAND)
            .arg("--parent")
            .arg(std::process::id().to_string());
        if let Some(group) = foreground {
            command
                .arg("--foreground-of")
                .arg(group.as_raw_pid().to_string());
        }
        command
            .arg("--")
            .arg(program)
            .args(program_args)
            .process_group(0)
            .env(ENV_FENCING_TOKEN, ticket.fencing_token().to_string())
            .env(ENV_ATTEMPT, ticket.attempt().to_string())
            .env(ENV_KEY_HEX, values::encode_hex(ticket.key().as_bytes()))
            .stdin(Stdio::inherit())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // An environment variable cannot hold a NUL byte; such a key is in DEDUPE_KEY_HEX only.
        let key = ticket.key().as_bytes();
        if !key.contains(&0) {
            command.env(ENV_KEY, OsStr::from_bytes(key));
        }
        command.spawn()
    });
    let mut child = match spawned {
        Ok(child) => {
            if foreground.is_some() {
                // Our group is the terminal's foreground, so this is allowed; the supervisor
                // waits for it before starting CMD and gives the foreground back after.
                let _ = rustix::termios::tcsetpgrp(io::stdin(), Pid::from_child(&child));
            }
            child
        }
        Err(err) => {
            let (code, what) = match err.kind() {
                io::ErrorKind::NotFound => (failure::NOT_FOUND, "command not found"),
                io::ErrorKind::PermissionDenied => (failure::NOT_EXECUTABLE, "permission denied"),
                _ => (failure::NOT_EXECUTABLE, "cannot execute it"),
            };
            let released = finish(file, args, &ticket, None);
            let key_state = match released {
                Ok(()) => "the key was released".to_string(),
                Err(failure) => failure.message,
            };
            return Err(Failure::new(
                code,
                format!("{}: {what} ({err}); {key_state}", program.to_string_lossy()),
            ));
        }
    };

    let budget = Budget::new(args.max_output);
    let stdout_tee = child
        .stdout
        .take()
        .map(|pipe| capture::tee(pipe, io::stdout(), budget.clone()));
    let stderr_tee = child
        .stderr
        .take()
        .map(|pipe| capture::tee(pipe, io::stderr(), budget.clone()));
    let heartbeat = Heartbeat::start(file.clone(), ticket.clone(), args.lease);
    let forwarder = caught.and_then(|caught| caught.forward_to(&child));
    if let Err(err) = &heartbeat {
        console::say(&format!(
            "cannot start the heartbeat ({err}); the lease will not be renewed while CMD runs"
        ));
    }
    if let Err(err) = &forwarder {
        console::say(&format!(
            "cannot watch for signals ({err}); they will not reach CMD"
        ));
    }

    let status = child.wait();
    let stdout = join(stdout_tee);
    let stderr = join(stderr_tee);
    if let Ok(forwarder) = forwarder {
        forwarder.stop();
    }
    let ticket = match heartbeat {
        Ok(heartbeat) => heartbeat.stop(),
        Err(_) => ticket,
    };
    let ending = match status {
        Ok(status) => ending(status),
        Err(err) => {
            // Nothing is known of how CMD ended: do not store a guess; let the next run retry.
            let released = finish(file, args, &ticket, None);
            let key_state = match released {
                Ok(()) => "the key was released".to_string(),
                Err(failure) => failure.message,
            };
            return Err(Failure::new(
                failure::STORE_ERROR,
                format!("cannot wait for CMD ({err}); {key_state}"),
            ));
        }
    };

    if stdout.cut || stderr.cut {
        console::say(&format!(
            "CMD printed more than --max-output ({} bytes); the stored outcome keeps only the \
             first {} bytes of its stdout and {} of its stderr (the live output above is \
             complete)",
            args.max_output,
            stdout.bytes.len(),
            stderr.bytes.len()
        ));
    }
    for (stream, captured) in [("stdout", &stdout), ("stderr", &stderr)] {
        if let Some(err) = &captured.read_error {
            console::say(&format!("reading CMD's {stream} failed: {err}"));
        }
    }
    let outcome = RunOutcome {
        ending,
        stdout_cut: stdout.cut || stdout.read_error.is_some(),
        stderr_cut: stderr.cut || stderr.read_error.is_some(),
        stdout: stdout.bytes,
        stderr: stderr.bytes,
    };
    let code = ending.exit_code();
    let keep = ending.success() || args.remember_failures;
    let recorded = if keep {
        record(file, args, ticket, &outcome)
    } else {
        finish(file, args, &ticket, None)
    };
    match recorded {
        Ok(()) => Ok(code),
        // CMD did run and nothing was lost that a retry would not redo: its status is still
        // this run's answer, with the warning above it.
        Err(failure) if failure.code == failure::STORE_ERROR => {
            console::say(&failure.message);
            Ok(code)
        }
        Err(failure) => Err(failure),
    }
}

/// How many times a run tries to store CMD's outcome before it falls back to storing the
/// exit status alone, and as many again for that.
const RECORD_TRIES: u32 = 4;
/// The first pause between two tries; it doubles, up to a third of the lease.
const FIRST_RECORD_PAUSE: Duration = Duration::from_millis(250);

/// What one try to complete the key found.
enum Recorded {
    Stored,
    /// Another run took the key over.
    Lost,
    /// The store refuses the outcome whatever the retries: it is too large.
    Refused(String),
}

/// Stores the outcome of a CMD that ran. A failed try renews the lease in the same step, when
/// the store still takes that, so the key stays this run's while it retries. When the whole
/// outcome cannot be stored, the exit status is stored without the output; when even that
/// fails, the run ends with [`failure::NOT_RECORDED`] and a message that says what state the
/// key is left in.
fn record(
    file: &StoreFile,
    args: &RunArgs,
    mut ticket: Ticket,
    outcome: &RunOutcome,
) -> Result<(), Failure> {
    let doing = format!("cannot store the outcome of key {}", args.key);
    let why = match try_to_record(file, args, &mut ticket, &outcome.encode(), &doing)? {
        None => return Ok(()),
        Some(why) => why,
    };
    let bare = RunOutcome {
        ending: outcome.ending,
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_cut: outcome.stdout_cut || !outcome.stdout.is_empty(),
        stderr_cut: outcome.stderr_cut || !outcome.stderr.is_empty(),
    };
    let doing = format!("cannot store the exit status of key {}", args.key);
    match try_to_record(file, args, &mut ticket, &bare.encode(), &doing)? {
        None => {
            console::say(&format!(
                "CMD's output could not be stored ({why}); its {} was stored without it, so \
                 replays of key {} exit with it and print nothing",
                outcome.ending, args.key
            ));
            Ok(())
        }
        Some(bare_why) => Err(Failure::new(
            failure::NOT_RECORDED,
            format!(
                "CMD ran and ended with {}, but neither its outcome nor its exit status could be \
                 stored ({bare_why}); key {} is still claimed by this run (attempt {}) until \
                 its lease ends at {}; then the next run takes it over and runs CMD again",
                outcome.ending,
                args.key,
                ticket.attempt(),
                utc(ticket.lease_until())
            ),
        )),
    }
}

/// Tries to complete the key with `bytes` up to [`RECORD_TRIES`] times. Returns `None` once it
/// is stored, or why it could not be.
fn try_to_record(
    file: &StoreFile,
    args: &RunArgs,
    ticket: &mut Ticket,
    bytes: &[u8],
    doing: &str,
) -> Result<Option<String>, Failure> {
    let mut pause = FIRST_RECORD_PAUSE;
    let mut why = String::new();
    for try_number in 1..=RECORD_TRIES {
        let tried = file.with(doing, |store| {
            match store.complete_with_ttl(ticket, bytes, args.ttl) {
                Ok(()) => {
                    // A failed sweep loses nothing; the next run or `dedupe sweep` tries again.
                    let _ = store.sweep_batch();
                    Ok(Recorded::Stored)
                }
                Err(Error::LeaseLost { .. }) => Ok(Recorded::Lost),
                Err(err @ Error::ResponseTooLarge { .. }) => Ok(Recorded::Refused(err.to_string())),
                Err(err) => match store.extend(ticket, args.lease) {
                    Err(Error::LeaseLost { .. }) => Ok(Recorded::Lost),
                    _ => Err(err),
                },
            }
        });
        match tried {
            Ok(Recorded::Stored) => return Ok(None),
            Ok(Recorded::Lost) => return Err(taken_over(args)),
            Ok(Recorded::Refused(reason)) => return Ok(Some(reason)),
            Err(failure) => why = failure.message,
        }
        if try_number < RECORD_TRIES {
            thread::sleep(pause.min(args.lease / 3));
            pause *= 2;
        }
    }
    Ok(Some(why))
}

fn taken_over(args: &RunArgs) -> Failure {
    Failure::new(
        failure::STORE_ERROR,
        format!(
            "key {} was taken over by another run while CMD ran (this run's lease had run \
             out); this run's outcome was not stored",
            args.key
        ),
    )
}

/// Checks that `program` can be run, as a shell does before it starts it, so that a CMD that
/// is missing or not executable is told apart from one that ran and exited 126 or 127.
fn runnable(program: &OsStr) -> io::Result<()> {
    let executable = |path: &Path| {
        std::fs::metadata(path)
            .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let not_executable = || io::Error::new(io::ErrorKind::PermissionDenied, "not executable");
    if program.as_bytes().contains(&b'/') {
        let path = Path::new(program);
        if !path.exists() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such file"));
        }
        return if executable(path) {
            Ok(())
        } else {
            Err(not_executable())
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    let mut found = false;
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(program);
        if executable(&candidate) {
            return Ok(());
        }
        found |= candidate.is_file();
    }
    if found {
        Err(not_executable())
    } else {
        Err(io::Error::new(io::ErrorKind::NotFound, "not in PATH"))
    }
}

/// Completes the key with `outcome`, or releases it when there is none, then removes one batch
/// of expired records: no background sweeper runs in a short-lived dedupe, so each run tidies
/// up a bounded share, and a large backlog is left to the next runs or `dedupe sweep` rather
/// than held against this one (the file stays locked while it sweeps).
fn finish(
    file: &StoreFile,
    args: &RunArgs,
    ticket: &Ticket,
    outcome: Option<&RunOutcome>,
) -> Result<(), Failure> {
    let doing = match outcome {
        Some(_) => format!("cannot store the outcome of key {}", args.key),
        None => format!("cannot release key {}", args.key),
    };
    let recorded = file.with(&doing, |store| {
        let recorded = match outcome {
            Some(outcome) => store.complete_with_ttl(ticket, outcome.encode(), args.ttl),
            None => store.release(ticket),
        };
        match recorded {
            Err(Error::LeaseLost { .. }) => Ok(false),
            Err(err) => Err(err),
            Ok(()) => {
                // A failed sweep loses nothing; the next run or `dedupe sweep` tries again.
                let _ = store.sweep_batch();
                Ok(true)
            }
        }
    })?;
    if recorded {
        Ok(())
    } else {
        Err(taken_over(args))
    }
}

fn join(tee: Option<io::Result<thread::JoinHandle<Captured>>>) -> Captured {
    match tee {
        Some(Ok(thread)) => thread.join().unwrap_or_default(),
        Some(Err(err)) => Captured {
            bytes: Vec::new(),
            cut: true,
            read_error: Some(err),
        },
        None => Captured::default(),
    }
}

fn ending(status: ExitStatus) -> Ending {
    match (status.code(), status.signal()) {
        (Some(code), _) => Ending::Exited(u8::try_from(code & 0xff).unwrap_or(u8::MAX)),
        (None, Some(signal)) => Ending::Signalled(u8::try_from(signal).unwrap_or(u8::MAX)),
        // Neither an exit nor a signal (stopped): report a failure rather than success.
        (None, None) => Ending::Exited(u8::MAX),
    }
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
pub fn utc(millis: u64) -> String {
    let time = SystemTime::UNIX_EPOCH + Duration::from_millis(millis);
    humantime::format_rfc3339_seconds(time).to_string()
}

fn round_to_millis(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}
