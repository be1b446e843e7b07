//! In-process notification of key changes, so that `claim_or_wait` sleeps until the owner it
//! waits for completes, releases or is swept, instead of polling the file.
//!
//! Keys hash onto a fixed set of shards, each a generation counter and a condvar. A committed
//! change to a key bumps its shard's generation; a waiter reads the generation *before* it
//! looks at the key and sleeps until the generation moves, so a change that lands between the
//! look and the sleep is never missed. Waiters on other keys of the same shard wake for nothing
//! and go back to sleep.

use std::hash::BuildHasher;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

const SHARDS: usize = 64;

struct Shard {
    generation: Mutex<u64>,
    changed: Condvar,
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
    }

    /// Wakes every waiter (after a sweep, which may touch any key).
    pub(crate) fn changed_all(&self) {
        for shard in &self.shards {
            *shard.generation.lock() += 1;
            shard.changed.notify_all();
        }
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

    #[test]
    fn the_wait_times_out_without_a_change() {
        let events = KeyEvents::new();
        let seen = events.generation(b"k");
        assert!(!events.wait(b"k", seen, Instant::now() + Duration::from_millis(10)));
    }
}
