//! `dedupe`: run a command at most once per key, and dedupe ids from shell scripts, on one
//! durable [`dedupe_store`] file. See `dedupe --help` and the README's "The dedupe command".
//!
//! One module per concept: `args` (the command line), `open` (opening the file for one step at
//! a time, and why), `run` with `capture`, `heartbeat`, `signals` and `supervise` (the `run` command),
//! `outcome` (the stored outcome's layout), `mark`, `filter` (the pipeline filter), `location` (a store file or a PostgreSQL URL), `read_only` (reading a file without writing to it), `report` (the readers and their table and
//! JSON output), `maintenance`, `failure` (exit codes and messages) and `console`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

#[cfg(not(unix))]
compile_error!("the dedupe command needs a Unix (it handles signals and process exit statuses)");

mod args;
mod capture;
mod console;
mod failure;
mod filter;
mod heartbeat;
mod location;
mod maintenance;
mod mark;
mod open;
mod outcome;
mod read_only;
mod report;
mod run;
mod signals;
mod supervise;
mod values;

use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};

use clap::Parser;

use crate::args::{Cli, Command};
use crate::failure::Failure;
use crate::open::{Access, StoreFile};

/// The message of the latest panic, for the one line of an internal error.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn main() -> ExitCode {
    // The hook only remembers the message: the library turns a panic inside redb (a damaged
    // file) into a store error with its own `catch_unwind`, which a hook that printed or
    // exited would pre-empt. A panic that reaches `main` is a bug in dedupe: one line and
    // exit 70, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(PoisonError::into_inner) = Some(info.to_string());
    }));
    // Exits 2 with a usage message on bad arguments, 0 for --help and --version.
    let cli = Cli::parse();
    match panic::catch_unwind(AssertUnwindSafe(|| dispatch(cli))) {
        Ok(Ok(code)) => ExitCode::from(code),
        Ok(Err(failure)) => {
            console::say(&failure.message);
            ExitCode::from(failure.code)
        }
        Err(_) => {
            let message = LAST_PANIC
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .unwrap_or_else(|| "a panic without a message".to_string());
            console::say(&format!("internal error, please report it: {message}"));
            ExitCode::from(failure::INTERNAL_ERROR)
        }
    }
}

fn dispatch(mut cli: Cli) -> Result<u8, Failure> {
    if let Command::Supervise(args) = &cli.command {
        return Ok(supervise::supervise(args));
    }
    let key = match &mut cli.command {
        Command::Run(args) => Some(&mut args.key),
        Command::Mark(args) => Some(&mut args.key),
        Command::Get(args) => Some(&mut args.key),
        Command::Expire(args) => Some(&mut args.key),
        _ => None,
    };
    if let Some(key) = key {
        let checked = if cli.hex {
            key.decode_hex()
        } else {
            values::check_key_len(key.as_bytes().len())
        };
        checked.map_err(|why| {
            Failure::new(
                failure::USAGE,
                format!("invalid KEY: {why}; see dedupe --help"),
            )
        })?;
    }
    let access = match cli.command {
        Command::Run(_) | Command::Mark(_) | Command::Filter(_) => Access::Create,
        Command::Expire(_) | Command::Sweep | Command::Compact => Access::Existing,
        Command::Get(_)
        | Command::List(_)
        | Command::Stats(_)
        | Command::Verify(_)
        | Command::Supervise(_) => Access::ReadOnly,
    };
    let location = location::Location::new(cli.db, cli.postgres)?;
    let file = StoreFile::new(location, cli.lock_timeout, access).max_keys(cli.max_keys);
    match &cli.command {
        Command::Run(args) => run::run(file, args),
        Command::Mark(args) => mark::mark(&file, args),
        Command::Filter(args) => filter::filter(&file, args, cli.hex),
        Command::Get(args) => report::get(&file, args),
        Command::List(args) => report::list(&file, args),
        Command::Stats(args) => report::stats(&file, args),
        Command::Verify(args) => report::verify(&file, args),
        Command::Expire(args) => maintenance::expire(&file, args),
        Command::Sweep => maintenance::sweep(&file),
        Command::Compact => maintenance::compact(&file),
        Command::Supervise(args) => Ok(supervise::supervise(args)),
    }
}
