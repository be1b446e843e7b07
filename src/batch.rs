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
//! Measured (see `BENCHMARKS.md`): handing the lead on *before* waking the answered callers
//! lets the next commit start sooner but halves the batches (the callers have not queued their
//! next request yet), which cost more than it saved. Waking them first is the natural batching
//! window.
//!
//! A batch also takes in work that queued while it was being applied, until nothing more is
//! waiting, and only then commits: a caller that arrives just after the batch began shares its
//! fsync instead of waiting a whole commit for the next one. Measured at 32 threads
//! (`durable_claims`, alternating builds): 38.4–39.8k claims/s against 36.5–37.1k/s. The
//! batcher's `joins` says which work may join; the rest waits for a batch of its own making.
//!
//! Also measured and left out: waking a whole batch with one futex call (every caller asleep
//! on one word) costs as much as waking each caller, since the kernel's wake-up of each thread
//! is what takes the time on this VM, and the herd of woken callers delays the leader's
//! hand-off of the lead.
//!
//! Some work runs alone ("solo"): a sweep batch removes hundreds of records, and a claim that
//! shared its commit would wait for all of them. A leader skips solo work queued behind it;
//! that work is then at the front, so it leads the very next batch, by itself.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// The most weight one batch takes (a plain operation weighs 1; see [`weight`]).
pub(crate) const MAX_BATCH_WEIGHT: usize = 1024;

/// Bytes that weigh as much as one operation when sizing batches.
const BYTES_PER_UNIT: usize = 16 * 1024;

/// The weight of a request of `ops` operations carrying `bytes` bytes of payload.
pub(crate) fn weight(ops: usize, bytes: usize) -> usize {
    ops.max(1).saturating_add(bytes / BYTES_PER_UNIT)
}

enum SlotState<R> {
    Waiting,
    Lead,
    Done(R),
}

struct Slot<R> {
    state: Mutex<SlotState<R>>,
    wake: Condvar,
}

impl<R> Slot<R> {
    fn set(&self, next: SlotState<R>) {
        *self.state.lock() = next;
        self.wake.notify_one();
    }

    /// Sleeps until the slot is answered or handed the lead.
    fn wait(&self) -> SlotState<R> {
        let mut state = self.state.lock();
        while matches!(*state, SlotState::Waiting) {
            self.wake.wait(&mut state);
        }
        std::mem::replace(&mut *state, SlotState::Waiting)
    }
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
}

/// A queue of write requests `W` answered with `R`.
pub(crate) struct Batcher<W, R> {
    queue: Mutex<Queue<W, R>>,
    /// Whether a work may join a batch that is already running.
    joins: fn(&W) -> bool,
}

impl<W, R> Batcher<W, R> {
    /// A batcher whose running batches take in queued work for which `joins` is true.
    pub(crate) fn new(joins: fn(&W) -> bool) -> Batcher<W, R> {
        Batcher {
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                leader: false,
            }),
            joins,
        }
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
        run: impl FnOnce(Vec<W>, &mut dyn FnMut() -> Vec<W>) -> Vec<R>,
        on_panic: fn() -> R,
    ) -> R {
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState::Waiting),
            wake: Condvar::new(),
        });
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
        if !lead_now {
            match slot.wait() {
                SlotState::Done(answer) => return answer,
                SlotState::Lead | SlotState::Waiting => {}
            }
        }
        self.lead(&slot, run, on_panic)
    }

    fn lead(
        &self,
        own: &Arc<Slot<R>>,
        run: impl FnOnce(Vec<W>, &mut dyn FnMut() -> Vec<W>) -> Vec<R>,
        on_panic: fn() -> R,
    ) -> R {
        // The lead passes on even if `run` panics, answering this batch's callers first.
        let mut handoff = Handoff {
            batcher: self,
            joinable: false,
            taken: 0,
            slots: Vec::new(),
            on_panic,
        };
        let works = {
            let mut queue = self.queue.lock();
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
        let answers = run(works, &mut || handoff.join());
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
    slots: Vec<Arc<Slot<R>>>,
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

    /// Takes the work queued since the batch began that may join it: callers that arrived
    /// while it was being applied share its commit instead of waiting for the next one.
    fn join(&mut self) -> Vec<W> {
        if !self.joinable {
            return Vec::new();
        }
        let batcher = self.batcher;
        let mut queue = batcher.queue.lock();
        self.take(&mut queue, batcher.joins)
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

impl<W, R> Drop for Handoff<'_, W, R> {
    fn drop(&mut self) {
        for slot in self.slots.drain(..) {
            slot.set(SlotState::Done((self.on_panic)()));
        }
        let mut queue = self.batcher.queue.lock();
        match queue.pending.front() {
            Some(next) => next.slot.set(SlotState::Lead),
            None => queue.leader = false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[test]
    fn a_lone_caller_leads_its_own_batch() {
        let batcher: Batcher<u32, u32> = Batcher::new(|_| true);
        let answer = batcher.submit(
            7,
            1,
            false,
            |works, _| {
                assert_eq!(works, vec![7]);
                works.iter().map(|w| w * 2).collect()
            },
            || 0,
        );
        assert_eq!(answer, 14);
    }

    #[test]
    fn concurrent_callers_share_batches_and_each_gets_its_own_answer() {
        let batcher: Arc<Batcher<usize, usize>> = Arc::new(Batcher::new(|_| true));
        let batches = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let batcher = batcher.clone();
                let batches = batches.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let work = t * 1_000 + i;
                        let answer = batcher.submit(
                            work,
                            1,
                            false,
                            |works, _| {
                                batches.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_micros(200));
                                works.iter().map(|w| w + 1).collect()
                            },
                            || usize::MAX,
                        );
                        assert_eq!(answer, work + 1);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("worker thread");
        }
        let batches = batches.load(Ordering::SeqCst);
        assert!(
            batches < 16 * 200,
            "{batches} batches for 3200 requests: nothing was grouped"
        );
    }

    #[test]
    fn a_panicking_batch_answers_everyone_and_passes_the_lead() {
        let batcher: Batcher<u32, u32> = Batcher::new(|_| true);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            batcher.submit(1, 1, false, |_, _| panic!("boom"), || 0)
        }));
        assert!(result.is_err());
        // The batcher is usable afterwards: the lead was released.
        assert_eq!(batcher.submit(2, 1, false, |w, _| w, || 0), 2);
    }

    #[test]
    fn work_queued_while_a_batch_runs_joins_it() {
        // Odd work may join a running batch, even work may not.
        let batcher: Arc<Batcher<u32, u32>> = Arc::new(Batcher::new(|work| work % 2 == 1));
        let batches = Batches::default();
        let release = Arc::new(AtomicBool::new(false));
        let first = held_leader(&batcher, &batches, &release, 1, true);
        let queued = queue_in_order(
            &batcher,
            &batches,
            &[(2, false), (3, false), (4, false), (5, true), (7, false)],
        );
        release.store(true, Ordering::SeqCst);
        assert_eq!(first.join().expect("first"), 1);
        for (work, handle) in queued {
            assert_eq!(handle.join().expect("queued"), work);
        }
        // 3 and 7 joined the running batch; 2 and 4 may not join, and 5 runs solo.
        let batches = batches.lock().clone();
        assert_eq!(batches, vec![vec![1, 3, 7], vec![2, 4], vec![5]]);
    }

    #[test]
    fn joining_stops_at_the_batch_weight() {
        let batcher: Batcher<u32, u32> = Batcher::new(|_| true);
        {
            let mut queue = batcher.queue.lock();
            queue.leader = true;
            for work in 0..3 {
                queue.pending.push_back(Queued {
                    work,
                    weight: MAX_BATCH_WEIGHT / 2,
                    solo: false,
                    slot: Arc::new(Slot {
                        state: Mutex::new(SlotState::Waiting),
                        wake: Condvar::new(),
                    }),
                });
            }
        }
        let mut handoff = Handoff {
            batcher: &batcher,
            joinable: true,
            taken: 1,
            slots: Vec::new(),
            on_panic: || u32::MAX,
        };
        // One half-weight work fits beside the running one; the next would pass the cap.
        assert_eq!(handoff.join(), vec![0]);
        assert!(handoff.join().is_empty());
        assert_eq!(queued(&batcher), 2);
        let answered = handoff.slots.clone();
        drop(handoff);
        // Dropped unfinished (as by a panic), the batch answers its joiner and passes the lead.
        assert!(matches!(
            *answered[0].state.lock(),
            SlotState::Done(u32::MAX)
        ));
        assert!(matches!(
            *batcher.queue.lock().pending[0].slot.state.lock(),
            SlotState::Lead
        ));
    }

    #[test]
    fn a_solo_batch_takes_no_joiners() {
        let batcher: Arc<Batcher<u32, u32>> = Arc::new(Batcher::new(|_| true));
        let joined = batcher.submit(
            9,
            1,
            true,
            |works, more| {
                let late = {
                    let mut queue = batcher.queue.lock();
                    queue.pending.push_back(Queued {
                        work: 10,
                        weight: 1,
                        solo: false,
                        slot: Arc::new(Slot {
                            state: Mutex::new(SlotState::Waiting),
                            wake: Condvar::new(),
                        }),
                    });
                    queue.pending.len()
                };
                assert_eq!(late, 1);
                assert!(more().is_empty(), "solo work must commit alone");
                works
            },
            || u32::MAX,
        );
        assert_eq!(joined, 9);
        // The late work now leads the next batch.
        assert!(matches!(
            *batcher.queue.lock().pending[0].slot.state.lock(),
            SlotState::Lead
        ));
    }

    fn queued(batcher: &Batcher<u32, u32>) -> usize {
        batcher.queue.lock().pending.len()
    }

    fn wait_for_queue(batcher: &Batcher<u32, u32>, len: usize) {
        while queued(batcher) != len {
            std::thread::yield_now();
        }
    }

    /// The batches a test's callers formed, in commit order.
    type Batches = Arc<Mutex<Vec<Vec<u32>>>>;

    /// Records a batch and answers each work with itself.
    fn record(batches: &Mutex<Vec<Vec<u32>>>, works: Vec<u32>) -> Vec<u32> {
        batches.lock().push(works.clone());
        works
    }

    /// Starts a leader with `work` that holds its batch until `release`, then (if `join`)
    /// takes in what queued meanwhile, and records it. Returns once the leader has taken its
    /// own work out of the queue.
    fn held_leader(
        batcher: &Arc<Batcher<u32, u32>>,
        batches: &Batches,
        release: &Arc<AtomicBool>,
        work: u32,
        join: bool,
    ) -> std::thread::JoinHandle<u32> {
        let (leader, batches, release) = (batcher.clone(), batches.clone(), release.clone());
        let handle = std::thread::spawn(move || {
            leader.submit(
                work,
                1,
                false,
                |mut works, more| {
                    while !release.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                    if join {
                        loop {
                            let joined = more();
                            if joined.is_empty() {
                                break;
                            }
                            works.extend(joined);
                        }
                    }
                    record(&batches, works)
                },
                || u32::MAX,
            )
        });
        while !(batcher.queue.lock().leader && queued(batcher) == 0) {
            std::thread::yield_now();
        }
        handle
    }

    /// Queues each `(work, solo)` behind the running batch, in the order given; the batches
    /// they lead are recorded.
    fn queue_in_order(
        batcher: &Arc<Batcher<u32, u32>>,
        batches: &Batches,
        works: &[(u32, bool)],
    ) -> Vec<(u32, std::thread::JoinHandle<u32>)> {
        works
            .iter()
            .enumerate()
            .map(|(position, &(work, solo))| {
                let (submitter, batches) = (batcher.clone(), batches.clone());
                let handle = std::thread::spawn(move || {
                    submitter.submit(
                        work,
                        1,
                        solo,
                        |works, _| record(&batches, works),
                        || u32::MAX,
                    )
                });
                wait_for_queue(batcher, position + 1);
                (work, handle)
            })
            .collect()
    }

    #[test]
    fn solo_work_never_shares_a_batch_and_waits_at_most_one() {
        let batcher: Arc<Batcher<u32, u32>> = Arc::new(Batcher::new(|_| true));
        let batches = Batches::default();
        let release = Arc::new(AtomicBool::new(false));
        let first = held_leader(&batcher, &batches, &release, 0, false);
        let queued = queue_in_order(
            &batcher,
            &batches,
            &[(1, false), (2, true), (3, false), (4, false)],
        );
        release.store(true, Ordering::SeqCst);
        assert_eq!(first.join().expect("first"), 0);
        for (work, handle) in queued {
            assert_eq!(handle.join().expect("queued"), work);
        }
        let batches = batches.lock().clone();
        assert_eq!(batches, vec![vec![0], vec![1, 3, 4], vec![2]]);
    }
}
