//! In-process notification of key changes, so that `claim_or_wait` sleeps until the owner it
//! waits for completes, releases or is swept, instead of polling the file.
//!
//! Keys hash onto a fixed set of shards, each a generation counter and a condvar. A committed
//! change to a key bumps its shard's generation; a waiter reads the generation *before* it
//! looks at the key and sleeps until the generation moves, so a change that lands between the
//! look and the sleep is never missed. Waiters on other keys of the same shard wake for nothing
//! and go back to sleep.
//!
//! With the `http` feature each shard also wakes async waiters (the HTTP layer's requests that
//! wait for a first request), which hold a task rather than a thread while they wait.

use std::hash::BuildHasher;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

const SHARDS: usize = 64;

struct Shard {
    generation: Mutex<u64>,
    changed: Condvar,
    #[cfg(feature = "http")]
    changed_async: tokio::sync::Notify,
}

pub(crate) struct KeyEvents {
    shards: Vec<Shard>,
    hasher: std::collections::hash_map::RandomState,
}

impl KeyEvents {
    pub(crate) fn new() -> KeyEvents {
        KeyEvents {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    generation: Mutex::new(0),
                    changed: Condvar::new(),
                    #[cfg(feature = "http")]
                    changed_async: tokio::sync::Notify::new(),
                })
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn shard(&self, stored_key: &[u8]) -> &Shard {
        // The modulo keeps the index below SHARDS, which fits in usize.
        &self.shards[(self.hasher.hash_one(stored_key) % SHARDS as u64) as usize]
    }

    /// The current generation of the key's shard.
    pub(crate) fn generation(&self, stored_key: &[u8]) -> u64 {
        *self.shard(stored_key).generation.lock()
    }

    /// Records that the key changed, waking its waiters.
    pub(crate) fn changed(&self, stored_key: &[u8]) {
        let shard = self.shard(stored_key);
        *shard.generation.lock() += 1;
        shard.changed.notify_all();
        #[cfg(feature = "http")]
        shard.changed_async.notify_waiters();
    }

    /// Wakes every waiter (after a sweep, which may touch any key).
    pub(crate) fn changed_all(&self) {
        for shard in &self.shards {
            *shard.generation.lock() += 1;
            shard.changed.notify_all();
            #[cfg(feature = "http")]
            shard.changed_async.notify_waiters();
        }
    }

    /// A future that completes at the next change to the key's shard after this call, whether
    /// or not it was polled yet: create it *before* looking at the key, so that a change
    /// between the look and the wait is not missed.
    #[cfg(feature = "http")]
    pub(crate) fn changed_async(&self, stored_key: &[u8]) -> tokio::sync::futures::Notified<'_> {
        self.shard(stored_key).changed_async.notified()
    }

    /// Sleeps until the key's shard moves past `seen` or `until` passes. Returns true when it
    /// moved.
    pub(crate) fn wait(&self, stored_key: &[u8], seen: u64, until: Instant) -> bool {
        let shard = self.shard(stored_key);
        let mut generation = shard.generation.lock();
        while *generation == seen {
            if shard.changed.wait_until(&mut generation, until).timed_out() {
                return *generation != seen;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_change_wakes_a_waiter() {
        let events = Arc::new(KeyEvents::new());
        let seen = events.generation(b"k");
        let notifier = {
            let events = events.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                events.changed(b"k");
            })
        };
        assert!(events.wait(b"k", seen, Instant::now() + Duration::from_secs(10)));
        notifier.join().expect("notifier thread");
    }

    #[test]
    fn a_change_before_the_wait_is_not_missed() {
        let events = KeyEvents::new();
        let seen = events.generation(b"k");
        events.changed(b"k");
        assert!(events.wait(b"k", seen, Instant::now()));
    }

    #[cfg(feature = "http")]
    #[test]
    fn a_change_completes_an_async_wait_created_before_it() {
        use std::future::Future;
        use std::task::{Context, Waker};

        let events = KeyEvents::new();
        let mut before = std::pin::pin!(events.changed_async(b"k"));
        events.changed(b"k");
        let mut after = std::pin::pin!(events.changed_async(b"k"));
        let mut context = Context::from_waker(Waker::noop());
        assert!(before.as_mut().poll(&mut context).is_ready());
        assert!(after.as_mut().poll(&mut context).is_pending());
        events.changed_all();
        assert!(after.as_mut().poll(&mut context).is_ready());
    }

    #[test]
    fn the_wait_times_out_without_a_change() {
        let events = KeyEvents::new();
        let seen = events.generation(b"k");
        assert!(!events.wait(b"k", seen, Instant::now() + Duration::from_millis(10)));
    }
}
