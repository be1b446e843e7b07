//! Group commit: writes that arrive while a commit is in flight are applied together in the
//! next transaction, with one fsync for all of them.
//!
//! Leader/follower rather than a committer thread: the first caller to find no commit in flight
//! runs the batch itself, so a lone writer pays no thread handoff (its latency stays one
//! commit), and under load each leader takes everything queued behind it. A caller queues its
//! work and sleeps on its own slot until a leader answers it or hands it the lead. A leader runs
//! exactly one batch, answers every caller in it, then passes the lead to the oldest waiting
//! caller, whose work is at the front of the queue and therefore in the next batch, so no caller
//! waits for more than one batch beyond the one in flight when it arrived.
//!
//! The lead is handed on only after the answered callers are woken: handing it on first lets
//! the next commit start sooner, but before those callers have queued their next work, so the
//! batches shrink and cost more than they save (`BENCHMARKS.md`, "Tried and not kept").
//!
//! A batch also takes in work that queued while it was being applied, until nothing more is
//! waiting, and only then commits: a caller that arrives just after the batch began shares its
//! fsync instead of waiting a whole commit for the next one. The batcher's `joins` says which
//! work may join; the rest waits for a batch of its own making.
//!
//! **Waking callers during the fsync.** Waking a sleeping thread costs the waker a futex wake and
//! an inter-processor interrupt per caller, so answering a whole batch after its fsync adds that
//! cost to every commit cycle, while both CPUs sit idle during the fsync itself. So, once a batch takes in nothing more, the leader arms a hook that the backend runs
//! just before the commit's fsync (`redb/backend.rs`): it wakes the callers in a relay, each woken
//! caller waking part of the rest (see [`wake_early`]), and each caller then waits for its answer
//! awake, letting other threads run (`yield_now`) rather than sleeping. The answer is still given
//! only after the fsync; it is then a store to a flag the caller watches, with no wake-up. A caller
//! waits awake for twice the expected fsync at most (a moving average of the recent ones, see
//! [`awake_for`]), then sleeps until answered as before, and callers are woken early only while
//! fsyncs take under [`EARLY_WAKE_SYNC`]: on a slow disk the CPU spent awake would exceed what it
//! saves. Answered together, those callers queue their next work together too, so the next leader,
//! finding nothing queued yet, yields a few times for them before it commits a small batch.
//!
//! The waiting callers spend CPU during the fsync that was idle before; a program with other
//! work for those CPUs gets them, since the callers yield. Waking a whole batch with one futex
//! call would not help: the kernel's wake-up of each thread is what takes the time.
//!
//! Some work runs alone ("solo"): a sweep batch removes hundreds of records, and a claim that
//! shared its commit would wait for all of them. A leader skips solo work queued behind it;
//! that work is then at the front, so it leads the very next batch, by itself.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

/// Runs just before a commit's fsync, given how long recent fsyncs took: an engine whose
/// commits it can see into runs it so that a batch's callers are woken during the fsync.
pub(crate) type BeforeSync = Box<dyn FnOnce(Duration) + Send>;

/// The most weight one batch takes (a plain operation weighs 1; see [`weight`]).
pub(crate) const MAX_BATCH_WEIGHT: usize = 1024;

/// Callers are woken before their batch's fsync only if fsyncs have been taking less than
/// this; on a slower disk the wait awake would cost more CPU than the wake-ups it saves.
const EARLY_WAKE_SYNC: Duration = Duration::from_millis(1);
/// The shortest and longest a caller woken early stays awake for its answer.
const MIN_AWAKE: Duration = Duration::from_micros(100);
const MAX_AWAKE: Duration = Duration::from_millis(2);
/// How many times a leader lets other threads run, when nothing is queued, for the callers of
/// the previous batch (woken early, answered at once) to queue again before it commits.
const HERD_YIELDS: usize = 16;

/// Bytes that weigh as much as one operation when sizing batches.
const BYTES_PER_UNIT: usize = 16 * 1024;

/// The weight of a request of `ops` operations carrying `bytes` bytes of payload.
pub(crate) fn weight(ops: usize, bytes: usize) -> usize {
    ops.max(1).saturating_add(bytes / BYTES_PER_UNIT)
}

enum SlotState<R> {
    Waiting,
    /// Woken before the batch's fsync: the answer follows within `until`, so the caller waits
    /// for it awake, after waking `relay` in turn.
    Soon {
        relay: Vec<Arc<Slot<R>>>,
        until: Instant,
    },
    Lead,
    Done(R),
}

/// What a waiting caller wakes to.
enum Woken<R> {
    Lead,
    Done(R),
}

struct Slot<R> {
    state: Mutex<SlotState<R>>,
    wake: Condvar,
    /// Set with the answer (or the lead), for a caller woken early to watch without the lock.
    answered: AtomicBool,
}

impl<R> Slot<R> {
    fn new() -> Slot<R> {
        Slot {
            state: Mutex::new(SlotState::Waiting),
            wake: Condvar::new(),
            answered: AtomicBool::new(false),
        }
    }

    /// Answers the slot (or hands it the lead).
    fn set(&self, next: SlotState<R>) {
        *self.state.lock() = next;
        self.answered.store(true, Ordering::Release);
        // Without a sleeper (a caller woken early and still awake) this makes no system call.
        self.wake.notify_one();
    }

    /// Wakes the caller to wait for its answer awake until `until`, and to wake `relay`.
    fn wake_early(&self, relay: Vec<Arc<Slot<R>>>, until: Instant) {
        let mut state = self.state.lock();
        if matches!(*state, SlotState::Waiting) {
            *state = SlotState::Soon { relay, until };
            drop(state);
            self.wake.notify_one();
        } else {
            // Answered already: the others are this thread's to wake.
            drop(state);
            wake_early(relay, until);
        }
    }

    /// Sleeps until the slot is answered or handed the lead.
    fn wait(&self) -> Woken<R> {
        let mut state = self.state.lock();
        loop {
            match &mut *state {
                SlotState::Waiting => self.wake.wait(&mut state),
                SlotState::Soon { relay, until } => {
                    let (relay, until) = (std::mem::take(relay), *until);
                    MutexGuard::unlocked(&mut state, || {
                        wake_early(relay, until);
                        while !self.answered.load(Ordering::Acquire) && Instant::now() < until {
                            std::thread::yield_now();
                        }
                    });
                    if matches!(*state, SlotState::Soon { .. }) {
                        // The fsync is taking longer than expected: sleep until answered.
                        *state = SlotState::Waiting;
                    }
                }
                SlotState::Lead | SlotState::Done(_) => break,
            }
        }
        match std::mem::replace(&mut *state, SlotState::Waiting) {
            SlotState::Done(answer) => Woken::Done(answer),
            _ => Woken::Lead,
        }
    }
}

/// Wakes `slots` early, spreading the wake-ups over the callers: this thread wakes one, handing
/// it the back half to wake in turn, then another with the back half of what remains, and so
/// on, so that all are awake after about log2(n) wake-ups' time instead of n.
fn wake_early<R>(mut slots: Vec<Arc<Slot<R>>>, until: Instant) {
    while !slots.is_empty() {
        let mut theirs = slots.split_off(slots.len() / 2);
        let first = theirs.remove(0);
        first.wake_early(theirs, until);
    }
}

/// How long a caller woken early stays awake for its answer: twice the expected fsync, within
/// bounds. Past it the caller sleeps, and is woken by the answer as usual.
fn awake_for(expected_sync: Duration) -> Duration {
    (expected_sync * 2).clamp(MIN_AWAKE, MAX_AWAKE)
}

struct Queued<W, R> {
    work: W,
    weight: usize,
    /// Runs in a batch of its own.
    solo: bool,
    slot: Arc<Slot<R>>,
}

struct Queue<W, R> {
    pending: VecDeque<Queued<W, R>>,
    /// Whether some caller is running (or about to run) a batch.
    leader: bool,
    /// Whether the last batch answered callers it had woken early: they come back at once.
    herd: bool,
}

/// What a batch's `run` may ask of the batcher while it runs.
pub(crate) trait Running<W> {
    /// Takes the work queued since the batch began that may join it: callers that arrived
    /// while it was being applied share its commit instead of waiting for the next one.
    fn join(&mut self) -> Vec<W>;

    /// A hook for the commit to run just before its fsync, given how long recent fsyncs took:
    /// it wakes the batch's other callers, who then wait for their answers awake. `None` if
    /// the batch has no other callers. Call it once the batch takes in nothing more.
    fn wake_early(&mut self) -> Option<BeforeSync>;
}

/// A queue of write requests `W` answered with `R`.
pub(crate) struct Batcher<W, R> {
    queue: Mutex<Queue<W, R>>,
    /// Whether a work may join a batch that is already running.
    joins: fn(&W) -> bool,
}

impl<W, R: Send + 'static> Batcher<W, R> {
    /// A batcher whose running batches take in queued work for which `joins` is true.
    pub(crate) fn new(joins: fn(&W) -> bool) -> Batcher<W, R> {
        Batcher {
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                leader: false,
                herd: false,
            }),
            joins,
        }
    }

    /// Whether no batch is running nor queued: a caller now would lead at once.
    pub(crate) fn is_idle(&self) -> bool {
        !self.queue.lock().leader
    }

    /// Submits `work` and returns its answer.
    ///
    /// If this caller becomes the leader it calls `run` once with a batch that starts with its
    /// own work; `run` must return one answer per item, in order. Should `run` panic, every
    /// caller in the batch gets `on_panic()` and the lead passes on, so no caller is left
    /// asleep. `solo` work never shares a batch.
    pub(crate) fn submit(
        &self,
        work: W,
        weight: usize,
        solo: bool,
        run: impl FnOnce(Vec<W>, &mut dyn Running<W>) -> Vec<R>,
        on_panic: fn() -> R,
    ) -> R {
        let slot = Arc::new(Slot::new());
        let lead_now = {
            let mut queue = self.queue.lock();
            queue.pending.push_back(Queued {
                work,
                weight,
                solo,
                slot: slot.clone(),
            });
            !std::mem::replace(&mut queue.leader, true)
        };
        if !lead_now && let Woken::Done(answer) = slot.wait() {
            return answer;
        }
        self.lead(&slot, run, on_panic)
    }

    fn lead(
        &self,
        own: &Arc<Slot<R>>,
        run: impl FnOnce(Vec<W>, &mut dyn Running<W>) -> Vec<R>,
        on_panic: fn() -> R,
    ) -> R {
        // The lead passes on even if `run` panics, answering this batch's callers first.
        let mut handoff = Handoff {
            batcher: self,
            joinable: false,
            taken: 0,
            slots: Vec::new(),
            herd: false,
            woke_early: Arc::new(AtomicBool::new(false)),
            on_panic,
        };
        let works = {
            let mut queue = self.queue.lock();
            handoff.herd = std::mem::take(&mut queue.herd);
            // The leader's own work is at the front: it is always taken, alone if it is solo.
            match queue.pending.pop_front() {
                Some(first) => {
                    handoff.taken = first.weight;
                    handoff.slots.push(first.slot);
                    let mut works = vec![first.work];
                    if !first.solo {
                        handoff.joinable = true;
                        works.extend(handoff.take(&mut queue, |_| true));
                    }
                    works
                }
                None => Vec::new(),
            }
        };
        let answers = run(works, &mut handoff);
        handoff.finish(own, answers)
    }
}

/// Answers a batch's callers and passes the lead on, also when the batch panicked.
struct Handoff<'b, W, R> {
    batcher: &'b Batcher<W, R>,
    /// Whether work queued since the batch began may join it (not when it runs solo work).
    joinable: bool,
    /// The batch's weight so far.
    taken: usize,
    /// The batch's callers, the leader first.
    slots: Vec<Arc<Slot<R>>>,
    /// Whether the previous batch's callers were woken early, and so are queueing again all
    /// at once.
    herd: bool,
    /// Set when this batch's callers are woken early.
    woke_early: Arc<AtomicBool>,
    on_panic: fn() -> R,
}

impl<W, R> Handoff<'_, W, R> {
    /// Moves the queued work that `accepts` allows into the batch, oldest first, up to the
    /// batch's weight. Solo work, and work it does not accept, keeps its place: the oldest of
    /// it leads the next batch.
    fn take(&mut self, queue: &mut Queue<W, R>, accepts: impl Fn(&W) -> bool) -> Vec<W> {
        let mut works = Vec::new();
        let mut next = 0;
        while let Some(candidate) = queue.pending.get(next) {
            if candidate.solo || !accepts(&candidate.work) {
                next += 1;
                continue;
            }
            if self.taken.saturating_add(candidate.weight) > MAX_BATCH_WEIGHT {
                break;
            }
            let Some(queued) = queue.pending.remove(next) else {
                break;
            };
            self.taken = self.taken.saturating_add(queued.weight);
            works.push(queued.work);
            self.slots.push(queued.slot);
        }
        works
    }

    fn finish(mut self, own: &Arc<Slot<R>>, answers: Vec<R>) -> R {
        let mut mine = None;
        let mut answers = answers.into_iter();
        for slot in std::mem::take(&mut self.slots) {
            let answer = answers.next().unwrap_or_else(self.on_panic);
            if Arc::ptr_eq(&slot, own) {
                mine = Some(answer);
            } else {
                slot.set(SlotState::Done(answer));
            }
        }
        // The leader's own work is always first in its batch, so `mine` is set.
        mine.unwrap_or_else(self.on_panic)
    }
}

impl<W, R: Send + 'static> Running<W> for Handoff<'_, W, R> {
    fn join(&mut self) -> Vec<W> {
        if !self.joinable {
            return Vec::new();
        }
        let batcher = self.batcher;
        let mut joined = self.take(&mut batcher.queue.lock(), batcher.joins);
        if self.herd {
            // The previous batch's callers were answered together and are queueing again,
            // two CPUs' worth at a time: give them the processor rather than commit without
            // them, as long as they keep coming.
            for _ in 0..HERD_YIELDS {
                if !joined.is_empty() {
                    break;
                }
                std::thread::yield_now();
                joined = self.take(&mut batcher.queue.lock(), batcher.joins);
            }
        }
        joined
    }

    fn wake_early(&mut self) -> Option<BeforeSync> {
        // The leader is first; the others are woken.
        let others = self
            .slots
            .get(1..)
            .filter(|others| !others.is_empty())?
            .to_vec();
        let woke_early = self.woke_early.clone();
        Some(Box::new(move |expected_sync| {
            if expected_sync < EARLY_WAKE_SYNC {
                woke_early.store(true, Ordering::Release);
                wake_early(others, Instant::now() + awake_for(expected_sync));
            }
        }))
    }
}

impl<W, R> Drop for Handoff<'_, W, R> {
    fn drop(&mut self) {
        for slot in self.slots.drain(..) {
            slot.set(SlotState::Done((self.on_panic)()));
        }
        let mut queue = self.batcher.queue.lock();
        queue.herd = self.woke_early.load(Ordering::Acquire);
        match queue.pending.front() {
            Some(next) => {
                next.slot.set(SlotState::Lead);
            }
            None => queue.leader = false,
        }
    }
}

#[cfg(test)]
mod tests;
