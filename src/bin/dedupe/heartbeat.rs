//! The heartbeat: while CMD runs, renew the lease on the key every third of the lease, so a
//! long command is never taken over while dedupe is alive, and a dead dedupe's key is free
//! within one lease.
//!
//! Each beat opens the store, extends the ticket and closes the store again (see `open.rs` for
//! why nothing holds the file between steps). A beat that cannot get the file in time is
//! retried at the next beat; two more chances remain before the lease can run out.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use dedupe_store::{Error, Ticket};

use crate::console;
use crate::open::StoreFile;

/// The shortest `--lease` accepted. A beat comes every third of the lease and may itself
/// wait up to a third for the file (another dedupe holding it, a commit's fsync), which leaves
/// a third for the process to be scheduled at all: under a second that margin is a few
/// hundred milliseconds or less, which a loaded machine can miss, and a live owner would be
/// taken over.
pub const MIN_LEASE: Duration = Duration::from_secs(1);

/// Beats are at least this far apart, however short the lease.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// The running heartbeat thread.
#[derive(Debug)]
pub struct Heartbeat {
    stop: Sender<()>,
    thread: JoinHandle<Ticket>,
    /// The ticket as it was when the heartbeat started, in case the thread died.
    started_with: Ticket,
}

impl Heartbeat {
    /// Starts renewing `ticket`'s lease for `lease` at a time.
    pub fn start(file: StoreFile, ticket: Ticket, lease: Duration) -> std::io::Result<Heartbeat> {
        let (stop, stopped) = mpsc::channel::<()>();
        let started_with = ticket.clone();
        let interval = (lease / 3).max(MIN_INTERVAL);
        let thread = thread::Builder::new()
            .name("dedupe-heartbeat".to_string())
            .spawn(move || {
                let mut ticket = ticket;
                loop {
                    match stopped.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return ticket,
                    }
                    if beat(&file, &mut ticket, lease, interval) {
                        // Keep waiting for the stop, but beat no more: the key is not ours.
                        let _ = stopped.recv();
                        return ticket;
                    }
                }
            })?;
        Ok(Heartbeat {
            stop,
            thread,
            started_with,
        })
    }

    /// Stops the heartbeat and hands back the ticket, with the lease deadline of the last
    /// extension.
    pub fn stop(self) -> Ticket {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or(self.started_with)
    }
}

/// One lease extension. Returns true when the key was lost to another run.
fn beat(file: &StoreFile, ticket: &mut Ticket, lease: Duration, interval: Duration) -> bool {
    let key = ticket.key().clone();
    let extended = file.with_timeout(interval, "cannot renew the lease", |store| {
        match store.extend(ticket, lease) {
            Err(Error::LeaseLost { .. }) => Ok(false),
            Err(err) => Err(err),
            Ok(()) => Ok(true),
        }
    });
    match extended {
        Ok(true) => false,
        Ok(false) => {
            console::say(&format!(
                "lost key {key} to another run (the lease ran out before this heartbeat); CMD \
                 goes on, but its outcome will not be stored"
            ));
            true
        }
        Err(failure) => {
            console::say(&format!("{}; the next heartbeat retries", failure.message));
            false
        }
    }
}
