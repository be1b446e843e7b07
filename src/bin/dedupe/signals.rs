//! Signals sent while CMD runs. dedupe must outlive CMD so that it can record how CMD ended
//! (and release the key if it failed); dying first would leave the key claimed until its lease
//! ran out, and CMD orphaned.
//!
//! CMD runs in a process group of its own (see `supervise.rs`), so signals sent to dedupe or
//! to dedupe's group do not reach it by themselves: SIGTERM, SIGHUP (a supervisor, `timeout`,
//! `kill PID`, a closed terminal), SIGINT and SIGQUIT are passed on to CMD's group. From a
//! terminal, Ctrl-C and Ctrl-\ reach CMD's group directly, as it is in the foreground while it
//! runs; dedupe does not see them then.

use std::process::Child;
use std::thread::{self, JoinHandle};

use rustix::process::{Pid, Signal, kill_process_group};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

/// The signal handlers, installed before CMD is spawned so that no signal in between kills
/// dedupe; signals caught before [`Caught::forward_to`] are held and passed on then.
#[derive(Debug)]
pub struct Caught {
    signals: Signals,
}

impl Caught {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Caught> {
        Ok(Caught {
            signals: Signals::new([SIGTERM, SIGHUP, SIGINT, SIGQUIT])?,
        })
    }

    /// Forwards SIGTERM, SIGHUP, SIGINT and SIGQUIT to the process group that `child` leads,
    /// those caught so far included, until [`Forwarder::stop`].
    pub fn forward_to(self, child: &Child) -> std::io::Result<Forwarder> {
        let mut signals = self.signals;
        let handle = signals.handle();
        let pid = Pid::from_child(child);
        let thread = thread::Builder::new()
            .name("dedupe-signals".to_string())
            .spawn(move || {
                for signal in signals.forever() {
                    if let Some(signal) = Signal::from_named_raw(signal) {
                        // CMD may have exited already; there is nothing left to tell it then.
                        let _ = kill_process_group(pid, signal);
                    }
                }
            })?;
        Ok(Forwarder { handle, thread })
    }
}

/// The thread forwarding signals to CMD.
#[derive(Debug)]
pub struct Forwarder {
    handle: Handle,
    thread: JoinHandle<()>,
}

impl Forwarder {
    /// Stops forwarding. The handlers stay installed, so a late signal cannot kill dedupe
    /// while it records the outcome; they do nothing more than that.
    pub fn stop(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}
