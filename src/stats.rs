//! Counters since open, and the [`Stats`] snapshot callers read.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// What the store did since it was opened, and what it holds now.
///
/// Counters count answers given to callers; gauges are read from the file when
/// [`Store::stats`](crate::Store::stats) is called.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Claims answered `Acquired`, takeovers included.
    pub acquired: u64,
    /// Of those, takeovers of a claim whose lease had run out.
    pub takeovers: u64,
    /// Claims answered `Completed`: replays of a stored outcome.
    pub replays: u64,
    /// Claims answered `InProgress`. A [`Store::claim_or_wait`](crate::Store::claim_or_wait)
    /// that finds the key in progress counts once, however often it looks again while it
    /// waits, and then counts the answer it ends with.
    pub in_progress: u64,
    /// Claims answered `Mismatch`.
    pub mismatches: u64,
    /// Successful completes.
    pub completes: u64,
    /// Successful releases.
    pub releases: u64,
    /// Successful lease extensions.
    pub extends: u64,
    /// Successful checkpoints.
    pub checkpoints: u64,
    /// Sequence numbers accepted by the sequence guard.
    pub sequence_accepted: u64,
    /// Sequence numbers refused as duplicate, stale or gapped.
    pub sequence_rejected: u64,
    /// Complete, release, extend and checkpoint calls refused with `LeaseLost`.
    pub lease_lost: u64,
    /// `mark_seen` answers of `true` (first sighting).
    pub marked: u64,
    /// `mark_seen` answers of `false` (duplicate).
    pub duplicates: u64,
    /// Live keys removed by `expire`.
    pub expired: u64,
    /// Expired records removed by `sweep` or the background sweeper.
    pub swept: u64,
    /// Commits that failed (each failed every call in its batch).
    pub commit_failures: u64,
    /// Background sweeps that failed.
    pub sweeper_errors: u64,
    /// The last background sweeper failure, if any.
    pub last_sweeper_error: Option<String>,
    /// Keys whose record is live now.
    pub live_keys: u64,
    /// Records past their `expires_at` that the sweeper has not removed yet.
    pub expired_pending: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    acquired: AtomicU64,
    takeovers: AtomicU64,
    replays: AtomicU64,
    in_progress: AtomicU64,
    mismatches: AtomicU64,
    completes: AtomicU64,
    releases: AtomicU64,
    extends: AtomicU64,
    checkpoints: AtomicU64,
    sequence_accepted: AtomicU64,
    sequence_rejected: AtomicU64,
    lease_lost: AtomicU64,
    marked: AtomicU64,
    duplicates: AtomicU64,
    expired: AtomicU64,
    swept: AtomicU64,
    /// Operations committed by the writer (not counted in [`Stats`]; the sweeper paces
    /// itself by them).
    written: AtomicU64,
    commit_failures: AtomicU64,
    sweeper_errors: AtomicU64,
    last_sweeper_error: Mutex<Option<String>>,
}

/// What one answer adds to the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tally {
    Acquired {
        takeover: bool,
    },
    Replay,
    Mismatch,
    Completed,
    Released,
    Extended,
    Checkpointed,
    SequenceAccepted,
    SequenceRejected,
    Expired,
    Marked,
    Duplicate,
    LeaseLost,
    /// Nothing counted (an in-progress answer is counted by the store, see `in_progress`).
    Nothing,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    /// Counts an answer given to a caller.
    pub(crate) fn count(&self, tally: Tally) {
        let counter = match tally {
            Tally::Acquired { takeover } => {
                if takeover {
                    bump(&self.takeovers, 1);
                }
                &self.acquired
            }
            Tally::Replay => &self.replays,
            Tally::Mismatch => &self.mismatches,
            Tally::Completed => &self.completes,
            Tally::Released => &self.releases,
            Tally::Extended => &self.extends,
            Tally::Checkpointed => &self.checkpoints,
            Tally::SequenceAccepted => &self.sequence_accepted,
            Tally::SequenceRejected => &self.sequence_rejected,
            Tally::Expired => &self.expired,
            Tally::Marked => &self.marked,
            Tally::Duplicate => &self.duplicates,
            Tally::LeaseLost => &self.lease_lost,
            Tally::Nothing => return,
        };
        bump(counter, 1);
    }

    /// Counts a claim answered `InProgress`.
    pub(crate) fn in_progress(&self) {
        bump(&self.in_progress, 1);
    }

    pub(crate) fn swept(&self, removed: usize) {
        bump(&self.swept, removed as u64);
    }

    /// Counts operations the writer committed.
    pub(crate) fn wrote(&self, ops: usize) {
        bump(&self.written, ops as u64);
    }

    /// Operations the writer committed since open.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub(crate) fn commit_failed(&self) {
        bump(&self.commit_failures, 1);
    }

    pub(crate) fn sweeper_failed(&self, err: &crate::Error) {
        bump(&self.sweeper_errors, 1);
        *self.last_sweeper_error.lock() = Some(err.to_string());
    }

    /// A snapshot of the counters with the given gauges.
    pub(crate) fn snapshot(&self, live_keys: u64, expired_pending: u64) -> Stats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            acquired: get(&self.acquired),
            takeovers: get(&self.takeovers),
            replays: get(&self.replays),
            in_progress: get(&self.in_progress),
            mismatches: get(&self.mismatches),
            completes: get(&self.completes),
            releases: get(&self.releases),
            extends: get(&self.extends),
            checkpoints: get(&self.checkpoints),
            sequence_accepted: get(&self.sequence_accepted),
            sequence_rejected: get(&self.sequence_rejected),
            lease_lost: get(&self.lease_lost),
            marked: get(&self.marked),
            duplicates: get(&self.duplicates),
            expired: get(&self.expired),
            swept: get(&self.swept),
            commit_failures: get(&self.commit_failures),
            sweeper_errors: get(&self.sweeper_errors),
            last_sweeper_error: self.last_sweeper_error.lock().clone(),
            live_keys,
            expired_pending,
        }
    }
}
