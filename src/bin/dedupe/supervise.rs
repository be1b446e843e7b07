//! CMD must not outlive the dedupe that runs it: a `kill -9` of dedupe would otherwise leave
//! CMD running while the next run, once the lease is out, takes the key over and starts a
//! second copy beside it.
//!
//! So `dedupe run` does not start CMD itself. It starts a copy of itself, `dedupe __supervise`
//! (hidden), as the leader of a new process group; the supervisor starts CMD in that group,
//! waits for it, and ends as CMD ended (its exit code, or killed by the same signal), so that
//! `dedupe run` records CMD's ending through it. When the dedupe that started it dies, the
//! supervisor kills the whole group with SIGKILL: CMD, every process CMD started that stayed
//! in its group, and itself. It learns of the death
//!
//! - on Linux, Android and FreeBSD at once, from the parent-death signal it sets on itself
//!   (SIGTERM, caught: any signal it catches makes it check who its parent is);
//! - everywhere, within [`POLL`], by watching its parent process id change (a dead parent's
//!   children are handed to another process).
//!
//! Setting the parent-death signal races with the parent's death, so the supervisor checks its
//! parent once more after setting it, before CMD starts.
//!
//! What remains: processes that CMD moves out of its group (`setsid`, a daemon) are not
//! killed, and a SIGKILL sent to the supervisor itself (not to dedupe) leaves CMD running, as
//! it would without it. Signals that `dedupe run` receives (SIGTERM, SIGHUP, SIGINT, SIGQUIT)
//! are passed on to the group; the supervisor survives them and waits for CMD.
//!
//! A group of its own is not in the terminal's foreground, where a terminal's reads and
//! Ctrl-C go. When dedupe's stdin is its terminal and dedupe is in the foreground, `dedupe run`
//! hands the foreground to CMD's group; the supervisor waits for that before starting CMD, and
//! gives the foreground back when CMD has ended (only a foreground group may do so without
//! being stopped). Ctrl-Z then stops CMD's group, not dedupe, so the shell does not see a
//! stopped job: `kill -CONT -PGID` (CMD's group) resumes it.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, getpgrp, getppid, kill_process_group};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::args::SuperviseArgs;
use crate::console;
use crate::failure::{NOT_EXECUTABLE, NOT_FOUND};

/// How often the supervisor checks that its parent is alive, where no parent-death signal
/// tells it.
pub const POLL: Duration = Duration::from_millis(200);

/// How long the supervisor waits for the terminal's foreground before starting CMD anyway.
const FOREGROUND_WAIT: Duration = Duration::from_secs(2);

/// The hidden subcommand's name.
pub const SUBCOMMAND: &str = "__supervise";

/// Runs CMD as `dedupe run`'s supervised child; returns the exit status to end with (after
/// trying to end by CMD's signal).
pub fn supervise(args: &SuperviseArgs) -> u8 {
    let parent = Pid::from_raw(args.parent);
    if parent.is_none() {
        return crate::failure::USAGE;
    }
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    if let Err(err) = rustix::process::set_parent_process_death_signal(Some(Signal::TERM)) {
        console::say(&format!(
            "cannot ask to be told of dedupe's death ({err}); checking every {} instead",
            humantime::format_duration(POLL)
        ));
    }
    // Handlers first, so that no signal kills the supervisor before CMD has ended.
    let signals = Signals::new([SIGTERM, SIGHUP, SIGINT, SIGQUIT]);
    // The parent may have died before the parent-death signal was set.
    if getppid() != parent {
        kill_group();
        return NOT_EXECUTABLE;
    }
    match signals {
        Ok(mut signals) => {
            let watch = thread::Builder::new()
                .name("dedupe-supervise-signals".to_string())
                .spawn(move || {
                    for _ in signals.forever() {
                        // The group had the signal too; only a dead parent needs more.
                        if getppid() != parent {
                            kill_group();
                        }
                    }
                });
            if let Err(err) = watch {
                console::say(&format!("cannot watch for signals ({err})"));
            }
        }
        Err(err) => console::say(&format!("cannot catch signals ({err})")),
    }
    let poll = thread::Builder::new()
        .name("dedupe-supervise-parent".to_string())
        .spawn(move || {
            loop {
                thread::sleep(POLL);
                if getppid() != parent {
                    kill_group();
                }
            }
        });
    if let Err(err) = poll {
        console::say(&format!("cannot watch dedupe ({err})"));
    }

    if args.foreground_of.is_some() {
        wait_for_foreground();
    }
    let Some((program, program_args)) = args.cmd.split_first() else {
        return crate::failure::USAGE;
    };
    let status = Command::new(program).args(program_args).status();
    if let Some(group) = args.foreground_of.and_then(Pid::from_raw) {
        give_foreground_back(group);
    }
    match status {
        Ok(status) => end_as(status),
        Err(err) => {
            let (code, what) = match err.kind() {
                io::ErrorKind::NotFound => (NOT_FOUND, "command not found"),
                io::ErrorKind::PermissionDenied => (NOT_EXECUTABLE, "permission denied"),
                _ => (NOT_EXECUTABLE, "cannot execute it"),
            };
            console::say(&format!("{}: {what} ({err})", program.to_string_lossy()));
            code
        }
    }
}

/// Kills the supervisor's group, itself included.
fn kill_group() {
    let _ = kill_process_group(getpgrp(), Signal::KILL);
    // Not reached unless the kill failed; do not leave CMD without its supervisor's watch
    // silently.
    std::process::exit(i32::from(NOT_EXECUTABLE));
}

/// Ends the supervisor the way CMD ended, so that `dedupe run` sees CMD's ending.
fn end_as(status: ExitStatus) -> u8 {
    if let Some(signal) = status.signal() {
        // Ends the process for signals whose default is to end it; others (a stop) return.
        let _ = signal_hook::low_level::emulate_default_handler(signal);
        return 128u8.saturating_add(u8::try_from(signal).unwrap_or(u8::MAX - 128));
    }
    status
        .code()
        .map_or(u8::MAX, |code| u8::try_from(code & 0xff).unwrap_or(u8::MAX))
}

fn wait_for_foreground() {
    let deadline = Instant::now() + FOREGROUND_WAIT;
    while Instant::now() < deadline {
        match rustix::termios::tcgetpgrp(io::stdin()) {
            Ok(group) if group == getpgrp() => return,
            Ok(_) => thread::sleep(Duration::from_millis(1)),
            Err(_) => return,
        }
    }
}

fn give_foreground_back(group: Pid) {
    if rustix::termios::tcgetpgrp(io::stdin()).is_ok_and(|now| now == getpgrp()) {
        let _ = rustix::termios::tcsetpgrp(io::stdin(), group);
    }
}

/// Whether `dedupe run` should hand the terminal's foreground to CMD's group: its stdin is a
/// terminal whose foreground group is dedupe's own. Returns dedupe's group then.
pub fn foreground_group() -> Option<Pid> {
    let stdin = io::stdin();
    if !rustix::termios::isatty(&stdin) {
        return None;
    }
    let ours = getpgrp();
    (rustix::termios::tcgetpgrp(&stdin).ok()? == ours).then_some(ours)
}
