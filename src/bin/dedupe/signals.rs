//! Signals sent while CMD runs. dedupe must outlive CMD so that it can record how CMD ended
//! (and release the key if it failed); dying first would leave the key claimed until its lease
//! ran out, and CMD orphaned.
//!
//! - SIGTERM and SIGHUP (a supervisor, `timeout`, `kill PID`, a closed terminal) are usually
//!   sent to dedupe alone: they are passed on to CMD.
//! - SIGINT and SIGQUIT usually come from the terminal, which sends them to the whole
//!   foreground process group, CMD included: passing them on would deliver them twice, so
//!   dedupe only survives them, like a shell waiting for its foreground job.

use std::process::Child;
use std::thread::{self, JoinHandle};

use rustix::process::{Pid, Signal, kill_process};
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

    /// Forwards SIGTERM and SIGHUP to `child`, those caught so far included, until
    /// [`Forwarder::stop`].
    pub fn forward_to(self, child: &Child) -> std::io::Result<Forwarder> {
        let mut signals = self.signals;
        let handle = signals.handle();
        let pid = Pid::from_child(child);
        let thread = thread::Builder::new()
            .name("dedupe-signals".to_string())
            .spawn(move || {
                for signal in signals.forever() {
                    if (signal == SIGTERM || signal == SIGHUP)
                        && let Some(signal) = Signal::from_named_raw(signal)
                    {
                        // CMD may have exited already; there is nothing left to tell it then.
                        let _ = kill_process(pid, signal);
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
