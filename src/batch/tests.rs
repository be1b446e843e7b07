//! Unit tests of `batch`.
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
    let first = held_leader(&batcher, &batches, &release, 1, join_all());
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
                slot: Arc::new(Slot::new()),
            });
        }
    }
    let mut handoff = Handoff {
        batcher: &batcher,
        joinable: true,
        taken: 1,
        slots: Vec::new(),
        herd: false,
        woke_early: Arc::new(AtomicBool::new(false)),
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
                    slot: Arc::new(Slot::new()),
                });
                queue.pending.len()
            };
            assert_eq!(late, 1);
            assert!(more.join().is_empty(), "solo work must commit alone");
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

/// What a held leader does with its batch once released, before recording it.
type Then = Box<dyn FnOnce(&mut Vec<u32>, &mut dyn Running<u32>) + Send>;

/// Takes in everything queued, until nothing more is.
fn join_all() -> Then {
    Box::new(|works, batch| {
        loop {
            let joined = batch.join();
            if joined.is_empty() {
                break;
            }
            works.extend(joined);
        }
    })
}

/// Starts a leader with `work` that holds its batch until `release`, then runs `then` on
/// it and records it. Returns once the leader has taken its own work out of the queue.
fn held_leader(
    batcher: &Arc<Batcher<u32, u32>>,
    batches: &Batches,
    release: &Arc<AtomicBool>,
    work: u32,
    then: Then,
) -> std::thread::JoinHandle<u32> {
    let (leader, batches, release) = (batcher.clone(), batches.clone(), release.clone());
    let handle = std::thread::spawn(move || {
        leader.submit(
            work,
            1,
            false,
            |mut works, batch| {
                while !release.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                then(&mut works, batch);
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
    let first = held_leader(&batcher, &batches, &release, 0, Box::new(|_, _| {}));
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

/// A slot, and the caller asleep on it, who returns what it wakes to.
type Sleeper = (Arc<Slot<u32>>, std::thread::JoinHandle<Option<u32>>);

fn sleepers(n: u32) -> Vec<Sleeper> {
    (0..n)
        .map(|_| {
            let slot = Arc::new(Slot::new());
            let sleeper = slot.clone();
            let handle = std::thread::spawn(move || match sleeper.wait() {
                Woken::Done(answer) => Some(answer),
                Woken::Lead => None,
            });
            (slot, handle)
        })
        .collect()
}

fn is_waiting(slot: &Slot<u32>) -> bool {
    matches!(*slot.state.lock(), SlotState::Waiting)
}

#[test]
fn callers_woken_early_wake_each_other_and_get_their_own_answers() {
    let callers = sleepers(9);
    let slots: Vec<_> = callers.iter().map(|(slot, _)| slot.clone()).collect();
    wake_early(slots.clone(), Instant::now() + Duration::from_secs(60));
    // The relay reaches every caller, each of which then waits awake.
    for slot in &slots {
        while is_waiting(slot) {
            std::thread::yield_now();
        }
    }
    for (n, slot) in (0..).zip(&slots) {
        assert!(
            matches!(*slot.state.lock(), SlotState::Soon { .. }),
            "caller {n} waits awake"
        );
        slot.set(SlotState::Done(n));
    }
    for (n, (_, handle)) in (0..).zip(callers) {
        assert_eq!(handle.join().expect("caller"), Some(n));
    }
}

#[test]
fn callers_woken_early_sleep_again_when_the_answer_is_late() {
    let callers = sleepers(5);
    let slots: Vec<_> = callers.iter().map(|(slot, _)| slot.clone()).collect();
    // Already past: every caller woken goes back to sleep at once, and must still be woken
    // by its answer.
    wake_early(slots.clone(), Instant::now());
    std::thread::sleep(Duration::from_millis(20));
    for (n, slot) in (0..).zip(&slots) {
        slot.set(SlotState::Done(n));
    }
    for (n, (_, handle)) in (0..).zip(callers) {
        assert_eq!(handle.join().expect("caller"), Some(n));
    }
}

#[test]
fn waking_early_skips_a_lone_batch_and_a_slow_disk() {
    // A batch of the leader alone has no one to wake.
    let batcher: Batcher<u32, u32> = Batcher::new(|_| true);
    let alone = batcher.submit(
        1,
        1,
        false,
        |works, batch| {
            assert!(batch.join().is_empty());
            assert!(batch.wake_early().is_none());
            works
        },
        || u32::MAX,
    );
    assert_eq!(alone, 1);
    // With callers behind it, whether they are woken depends on the expected fsync.
    for (expected_sync, woken) in [(Duration::from_micros(200), true), (EARLY_WAKE_SYNC, false)] {
        let batcher: Arc<Batcher<u32, u32>> = Arc::new(Batcher::new(|_| true));
        let batches = Batches::default();
        let release = Arc::new(AtomicBool::new(false));
        let then: Then = Box::new(move |works, batch| {
            join_all()(works, batch);
            let hook = batch.wake_early().expect("callers to wake");
            hook(expected_sync);
        });
        let first = held_leader(&batcher, &batches, &release, 0, then);
        let queued = queue_in_order(&batcher, &batches, &[(1, false), (2, false), (3, false)]);
        release.store(true, Ordering::SeqCst);
        assert_eq!(first.join().expect("leader"), 0);
        for (work, handle) in queued {
            assert_eq!(handle.join().expect("caller"), work);
        }
        assert_eq!(*batches.lock(), vec![vec![0, 1, 2, 3]]);
        // The next batch knows whether its callers were answered awake.
        assert_eq!(
            batcher.queue.lock().herd,
            woken,
            "expected fsync {expected_sync:?}"
        );
    }
}
