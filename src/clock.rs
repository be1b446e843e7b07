//! Where the store reads the time: the system clock, or a clock tests move by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A wall clock in milliseconds since the Unix epoch.
///
/// The store reads it for every decision (lease deadlines, expiry). It may jump in either
/// direction: the store never panics on it, never removes a completed record before its
/// `expires_at` by this clock, and never lets two tickets own one key. A record is removed (by
/// a sweep) only once the clock has passed its `expires_at`; should the clock then go back,
/// the record stays gone: expired is final once swept.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The operating system's wall clock. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        // A clock set before 1970 reads as the epoch rather than failing.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            })
    }
}

/// A clock that only moves when told to, for deterministic tests of code built on the store.
///
/// Clones share one time, so keep a clone and hand another to
/// [`StoreBuilder::clock`](crate::StoreBuilder::clock).
///
/// ```
/// use std::time::Duration;
/// use dedupe_store::{Claim, ManualClock, Store};
///
/// let clock = ManualClock::new(1_000_000);
/// let store = Store::builder()
///     .clock(clock.clone())
///     .lease(Duration::from_secs(30))
///     .in_memory()?;
///
/// let Claim::Acquired(_crashed) = store.claim("job")? else { unreachable!() };
/// clock.advance(Duration::from_secs(31));
/// let Claim::Acquired(ticket) = store.claim("job")? else { unreachable!() };
/// assert!(ticket.is_takeover());
/// # Ok::<(), dedupe_store::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start_millis`.
    pub fn new(start_millis: u64) -> ManualClock {
        ManualClock {
            now: Arc::new(AtomicU64::new(start_millis)),
        }
    }

    /// The current reading.
    pub fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    /// Sets the reading, forwards or backwards.
    pub fn set(&self, millis: u64) {
        self.now.store(millis, Ordering::SeqCst);
    }

    /// Moves the clock forward (saturating at `u64::MAX`).
    pub fn advance(&self, by: Duration) {
        let by = duration_millis(by);
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(by))
            });
    }

    /// Moves the clock backward (saturating at zero), as a misbehaving wall clock might.
    pub fn rewind(&self, by: Duration) {
        let by = duration_millis(by);
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_sub(by))
            });
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.now()
    }
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_saturates() {
        let clock = ManualClock::new(10);
        let shared = clock.clone();
        clock.advance(Duration::from_millis(5));
        assert_eq!(shared.now_millis(), 15);
        clock.rewind(Duration::from_secs(1));
        assert_eq!(shared.now_millis(), 0);
        clock.set(u64::MAX - 1);
        clock.advance(Duration::MAX);
        assert_eq!(shared.now_millis(), u64::MAX);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_millis() > 1_577_836_800_000);
    }
}
