//! The background sweeper: a named thread that removes expired records on an interval, in
//! bounded batches, and under `Durability::Periodic` makes recent commits durable.
//!
//! It sleeps on a condvar with a timeout, so a shutdown wakes it at once, and it checks for
//! shutdown between batches, so even a large backlog does not delay a close. Its failures are
//! counted in [`Stats`](crate::Stats) and it keeps running.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::builder::Durability;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// The thread's name, as shown by debuggers and `top -H`.
pub(crate) const THREAD_NAME: &str = "dedupe-sweeper";

#[derive(Default)]
struct Signal {
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Signal {
    fn stopped(&self) -> bool {
        *self.stop.lock()
    }

    /// Sleeps until `until` or a stop; returns true on stop.
    fn sleep_until(&self, until: Instant) -> bool {
        let mut stop = self.stop.lock();
        while !*stop {
            if self.wake.wait_until(&mut stop, until).timed_out() {
                break;
            }
        }
        *stop
    }
}

/// The running thread. Dropping it stops and joins the thread.
pub(crate) struct Sweeper {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<()>>,
}

impl Sweeper {
    /// Starts the thread if the store needs one (a sweep interval, or periodic durability).
    pub(crate) fn spawn(engine: &Arc<Engine>) -> Result<Option<Sweeper>> {
        let sweep_every = engine.config.sweep_interval;
        let flush_every = match engine.config.durability {
            Durability::Periodic(every) => Some(every),
            Durability::Immediate => None,
        };
        if sweep_every.is_none() && flush_every.is_none() {
            return Ok(None);
        }
        let signal = Arc::new(Signal::default());
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.to_string())
            .spawn({
                let engine = engine.clone();
                let signal = signal.clone();
                move || run(&engine, &signal, sweep_every, flush_every)
            })
            .map_err(|err| Error::from(redb::Error::Io(err)))?;
        Ok(Some(Sweeper {
            signal,
            thread: Some(thread),
        }))
    }

    /// Stops the thread and waits for it.
    pub(crate) fn stop(&mut self) {
        *self.signal.stop.lock() = true;
        self.signal.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            // A panic in the sweeper has already been counted as a failure; nothing to add.
            let _ = thread.join();
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    engine: &Engine,
    signal: &Signal,
    sweep_every: Option<Duration>,
    flush_every: Option<Duration>,
) {
    let start = Instant::now();
    let mut next_sweep = sweep_every.map(|every| start + every);
    let mut next_flush = flush_every.map(|every| start + every);
    loop {
        let wake_at = match (next_sweep, next_flush) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return,
        };
        if signal.sleep_until(wake_at) {
            return;
        }
        let now = Instant::now();
        if let (Some(at), Some(every)) = (next_flush, flush_every)
            && now >= at
        {
            if let Err(err) = engine.flush_if_due() {
                engine.counters.sweeper_failed(&err);
            }
            next_flush = Some(now + every);
        }
        if let (Some(at), Some(every)) = (next_sweep, sweep_every)
            && now >= at
        {
            // Not thorough: a merge of everything each interval would hold the writer for a
            // long commit on a large store of scattered keys, to sweep nothing.
            if let Err(err) = sweep_all(engine, false, || signal.stopped()) {
                engine.counters.sweeper_failed(&err);
            }
            next_sweep = Some(Instant::now() + every);
        }
    }
}

/// Sweeps in batches until nothing is due or `stop()` says so, then makes the removals
/// durable (sweep batches commit without an fsync of their own). Returns how many were
/// removed. `thorough` merges the journal first whatever it holds (see
/// [`Writer::sweep`](crate::storage::Writer::sweep)).
pub(crate) fn sweep_all(engine: &Engine, thorough: bool, stop: impl Fn() -> bool) -> Result<usize> {
    let mut total = 0;
    let swept = loop {
        match engine.sweep_batch(engine.config.sweep_batch, thorough) {
            Ok((removed, more)) => {
                total += removed;
                if !more || stop() {
                    break Ok(total);
                }
            }
            Err(err) => break Err(err),
        }
    };
    if total > 0 {
        engine.flush_if_dirty()?;
    }
    swept
}
