//! The background sweeper: a named thread that removes expired records on an interval, in
//! bounded batches, and under `Durability::Periodic` makes recent commits durable.
//!
//! It sleeps on a condvar with a timeout, so a shutdown wakes it at once, and it checks for
//! shutdown between batches, so even a large backlog does not delay a close. Its failures are
//! counted in [`Stats`](crate::Stats) and it keeps running.
//!
//! While writers are busy it yields to them. A sweep batch commits without an fsync of its
//! own, so the next claim's fsync writes the pages the batch dirtied: a lone writer claiming
//! during a long sweep would pay for every batch. So between two batches the sweeper pauses ([`YIELD_PAUSE`]) whenever operations were
//! committed meanwhile, as long as the paced sweep still removes records faster than
//! [`YIELD_HEADROOM`] times the rate of those operations, which bounds the records any
//! workload can leave waiting; it sweeps at full speed when writers outpace that, and when
//! they are idle. An explicit [`Store::sweep`](crate::Store::sweep) never pauses.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::config::Durability;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// The thread's name, as shown by debuggers and `top -H`.
pub(crate) const THREAD_NAME: &str = "dedupe-sweeper";

/// The background sweeper's pause between two batches while writers are busy.
pub(crate) const YIELD_PAUSE: Duration = Duration::from_millis(40);

/// How much faster than the writes (operations per second) the paced sweep must remove
/// records for the sweeper to pause: each operation leaves at most one record to expire.
pub(crate) const YIELD_HEADROOM: f64 = 1.25;

/// Whether to pause between two batches: `removed` records went in the last batch, which took
/// `took`; `busy` says an operation was committed within the last [`YIELD_PAUSE`], and
/// `writes` were committed over `window` (the sweep so far).
pub(crate) fn pause_after(
    removed: usize,
    took: Duration,
    busy: bool,
    writes: u64,
    window: Duration,
) -> Option<Duration> {
    if !busy || removed == 0 {
        return None;
    }
    let write_rate = writes as f64 / window.as_secs_f64().max(1e-6);
    let paced_rate = removed as f64 / (took + YIELD_PAUSE).as_secs_f64();
    (paced_rate >= YIELD_HEADROOM * write_rate).then_some(YIELD_PAUSE)
}

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
        let sweep_every = engine.config().sweep_interval;
        let flush_every = match engine.config().durability {
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
            .map_err(|err| Error::ThreadStart {
                thread: THREAD_NAME,
                source: std::sync::Arc::new(err),
            })?;
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
                engine.counters().sweeper_failed(&err);
            }
            next_flush = Some(now + every);
        }
        if let (Some(at), Some(every)) = (next_sweep, sweep_every)
            && now >= at
        {
            // Not thorough: a merge of everything each interval would hold the writer for a
            // long commit on a large store of scattered keys, to sweep nothing.
            let paced = Pacing {
                sleep: &|pause| signal.sleep_until(Instant::now() + pause),
            };
            if let Err(err) = sweep_all(engine, false, Some(&paced), || signal.stopped()) {
                engine.counters().sweeper_failed(&err);
            }
            next_sweep = Some(Instant::now() + every);
        }
    }
}

/// How a background sweep yields to writers: `sleep` waits the given time and says whether the
/// sweeper was stopped meanwhile.
pub(crate) struct Pacing<'a> {
    pub sleep: &'a dyn Fn(Duration) -> bool,
}

/// Sweeps in batches until nothing is due or `stop()` says so, then makes the removals
/// durable (sweep batches commit without an fsync of their own). Returns how many were
/// removed. `thorough` merges the journal first whatever it holds (see
/// [`Writer::sweep`](crate::redb::writer::Writer::sweep)). With `pacing`, pauses between batches
/// while writers are busy (see the module docs).
pub(crate) fn sweep_all(
    engine: &Engine,
    thorough: bool,
    pacing: Option<&Pacing<'_>>,
    stop: impl Fn() -> bool,
) -> Result<usize> {
    let mut total = 0;
    let sweep_start = Instant::now();
    let writes_at_start = engine.counters().written();
    let mut writes_seen = writes_at_start;
    // When the count of committed operations last moved.
    let mut last_write: Option<Instant> = None;
    let swept = loop {
        let started = Instant::now();
        match engine.sweep_batch(engine.config().sweep_batch, thorough) {
            Ok((removed, more)) => {
                total += removed;
                if !more || stop() {
                    break Ok(total);
                }
                if let Some(pacing) = pacing {
                    let writes = engine.counters().written();
                    if writes != writes_seen {
                        writes_seen = writes;
                        last_write = Some(Instant::now());
                    }
                    let busy = last_write.is_some_and(|at| at.elapsed() < YIELD_PAUSE);
                    let pause = pause_after(
                        removed,
                        started.elapsed(),
                        busy,
                        writes.saturating_sub(writes_at_start),
                        sweep_start.elapsed(),
                    );
                    if let Some(pause) = pause
                        && (pacing.sleep)(pause)
                    {
                        break Ok(total);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_pause_while_writers_are_idle() {
        // Nothing written lately, however busy the sweep's start was.
        assert_eq!(pause_after(256, MS, false, 4, MS), None);
        assert_eq!(pause_after(0, MS, true, 4, MS), None);
    }

    #[test]
    fn pauses_while_the_paced_sweep_outruns_the_writes() {
        // 256 records per 41 ms is about 6,240/s: it outruns 4,000 writes a second by 1.25×.
        assert_eq!(pause_after(256, MS, true, 4, MS), Some(YIELD_PAUSE));
    }

    #[test]
    fn full_speed_when_writes_would_outrun_the_paced_sweep() {
        // 40,000 writes a second would leave records faster than 6,240/s removes them.
        assert_eq!(pause_after(256, MS, true, 40, MS), None);
        // So would 5,000 a second, within the headroom.
        assert_eq!(pause_after(256, MS, true, 5, MS), None);
    }
}
