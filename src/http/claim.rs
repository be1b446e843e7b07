//! The claim's life inside one request: every store call made off the async runtime's worker
//! threads, and what happens to a claim when the request's future is dropped half-way.
//!
//! Store calls can wait for an fsync (a claim, a complete), so each runs on tokio's blocking
//! pool with [`spawn_blocking`](tokio::task::spawn_blocking) and the request's future awaits
//! it. A blocking call, once started, runs to its end even if the request is dropped meanwhile,
//! so a `complete` or `release` that was begun is never lost half-way. Each such call marks
//! its thread (`blocking.rs`), so that over PostgreSQL the store drives its connection on that
//! thread rather than handing every round trip to its engine's runtime.
//!
//! Waiting for another request (with [`InFlight::Wait`]) is not a blocking call: between its
//! looks at the key, a waiting request is a task parked on the store's notification of changes
//! to the key, holding no thread, so a retry storm of duplicates cannot exhaust the blocking
//! pool that every other request's store calls need.

use std::pin::pin;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::claim::{Claim, ClaimOptions, Ticket};
use crate::error::Error;
use crate::key::Key;
use crate::store::{NextLook, Store, next_look};

/// What a request gets when the first request with its key is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum InFlight {
    /// Answer `409 Conflict` at once, with a [`Retry-After`](super::IdempotencyLayerBuilder::retry_after)
    /// header. The default.
    #[default]
    Reject,
    /// Wait up to this long for the first request to finish, then replay its response (or run
    /// the handler, if the first request failed and gave the key back). Still running after
    /// the wait: `409`, as for `Reject`.
    ///
    /// A waiting request is a parked task, woken when the store reports a change to its key
    /// (or the first request's lease ends): it holds no thread while it waits, so thousands of
    /// duplicates can wait without starving other requests of tokio's blocking pool. The
    /// runtime needs its timer (`enable_time`, on with `#[tokio::main]`).
    Wait(Duration),
}

/// A store call that could not give its answer.
#[derive(Debug)]
pub(crate) enum StoreFailure {
    /// The store refused or failed.
    Error(Error),
    /// The blocking task never answered: the runtime is shutting down.
    Interrupted,
}

impl std::fmt::Display for StoreFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreFailure::Error(err) => err.fmt(f),
            StoreFailure::Interrupted => f.write_str("the store call was interrupted"),
        }
    }
}

/// Runs `work` on the runtime's blocking pool, detached; on a thread with no runtime (a drop
/// outside of one), right here, where blocking harms no one.
fn detach(work: impl FnOnce() + Send + 'static) {
    match Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(|| crate::blocking::run(work))),
        Err(_) => work(),
    }
}

/// Runs `work` on the blocking pool and waits for its answer without blocking a worker.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, StoreFailure> {
    match tokio::task::spawn_blocking(|| crate::blocking::run(work)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(StoreFailure::Error(err)),
        Err(_) => Err(StoreFailure::Interrupted),
    }
}

/// How often a waiting request re-reads the store's clock while it waits for a lease to run out
/// with no change to its key, so a clock that jumps (or a [`ManualClock`](crate::ManualClock)
/// moved by a test) is noticed. Each recheck is a clock read, not a store call.
const CLOCK_RECHECK: Duration = Duration::from_millis(250);

/// Which look at a key a claim is, for the store's in-progress count: a wait counts as one
/// in-progress answer, however often it looks again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Look {
    First,
    Again,
}

/// Claims `key`, waiting for a first request in flight when `in_flight` says so.
///
/// The wait is a loop of looks: register for the key's next change, claim (on the blocking
/// pool), and if the key is still in progress, await the change, the end of the owner's lease
/// (by the store's clock) or the wait's deadline, whichever is first. At the deadline it looks
/// once more and answers as that claim does, so a key still in progress is `409`.
pub(crate) async fn claim(
    store: &Store,
    key: Key,
    options: ClaimOptions,
    in_flight: InFlight,
) -> Result<Claim, StoreFailure> {
    let InFlight::Wait(timeout) = in_flight else {
        return claim_once(store, &key, &options, Look::First).await;
    };
    let deadline = Instant::now().checked_add(timeout);
    let deadline_std = deadline.map(Instant::into_std);
    let mut look = Look::First;
    loop {
        // Registered before the look, so a change between the look and the wait wakes it.
        let mut changed = pin!(store.key_changed(&key));
        let claim = claim_once(store, &key, &options, look).await?;
        look = Look::Again;
        let Claim::InProgress { lease_until, .. } = claim else {
            return Ok(claim);
        };
        // A store shared with other processes watches for their changes from now on, and
        // wakes `changed` when it starts to, for one more look.
        store.engine().will_wait();
        loop {
            match next_look(
                deadline_std,
                lease_until,
                store.engine().now(),
                CLOCK_RECHECK,
            ) {
                NextLook::Deadline => {
                    return claim_once(store, &key, &options, Look::Again).await;
                }
                NextLook::LeaseOver => break,
                NextLook::WaitUntil(until) => {
                    if tokio::time::timeout_at(Instant::from_std(until), changed.as_mut())
                        .await
                        .is_ok()
                    {
                        break;
                    }
                }
            }
        }
    }
}

/// One claim of `key` on the blocking pool.
///
/// If the request is dropped while the claim is being made, the claim may still be acquired
/// on the blocking pool after nobody is left to run the handler. The answer travels over a
/// oneshot channel whose two ends settle who gives such a key back: the sender when the
/// receiver was already gone, the receiver's drop when the answer had already arrived. Nothing
/// ran, so the key is released and the client's retry can claim it at once.
async fn claim_once(
    store: &Store,
    key: &Key,
    options: &ClaimOptions,
    look: Look,
) -> Result<Claim, StoreFailure> {
    let (answer, receiver) = oneshot::channel();
    let worker = store.clone();
    let (key, options) = (key.clone(), options.clone());
    detach(move || {
        let claim = match look {
            Look::First => worker.claim_with(&key, &options),
            Look::Again => worker.claim_uncounted(key.as_bytes(), &options),
        };
        if let Err(Ok(Claim::Acquired(ticket))) = answer.send(claim) {
            let _ = worker.release(&ticket);
        }
    });
    let mut pending = PendingClaim {
        store: store.clone(),
        receiver: Some(receiver),
    };
    pending.answer().await
}

struct PendingClaim {
    store: Store,
    receiver: Option<oneshot::Receiver<crate::Result<Claim>>>,
}

impl PendingClaim {
    async fn answer(&mut self) -> Result<Claim, StoreFailure> {
        let Some(receiver) = self.receiver.as_mut() else {
            return Err(StoreFailure::Interrupted);
        };
        let answer = receiver.await;
        self.receiver = None;
        match answer {
            Ok(Ok(claim)) => Ok(claim),
            Ok(Err(err)) => Err(StoreFailure::Error(err)),
            Err(_) => Err(StoreFailure::Interrupted),
        }
    }
}

impl Drop for PendingClaim {
    fn drop(&mut self) {
        let Some(mut receiver) = self.receiver.take() else {
            return;
        };
        receiver.close();
        if let Ok(Ok(Claim::Acquired(ticket))) = receiver.try_recv() {
            let store = self.store.clone();
            detach(move || {
                let _ = store.release(&ticket);
            });
        }
    }
}

/// The ticket of a claim whose handler is running, and what becomes of it if the request ends
/// without an answer to store: the client disconnected and the server dropped the request's
/// future, a timeout layer outside cancelled it, or the handler panicked.
///
/// Such an attempt is *abandoned*: its lease is cut to a millisecond (the record stays), so the
/// client's retry takes the key over at once, as the next attempt, with
/// [`Ticket::is_takeover`] set and the attempt's checkpoints in its ticket. The two obvious
/// alternatives are both worse:
///
/// - Releasing the key would let the retry run as a fresh attempt 1, with no sign that a
///   handler cancelled half-way may already have charged the card; the takeover flag is how
///   the next attempt knows to check.
/// - Leaving the lease to run out would answer every retry `409` for up to the whole lease
///   (30 s by default) after a plain disconnect, the most common failure there is.
///
/// The cut runs on the blocking pool, detached, since a drop cannot wait. If it never runs (the
/// runtime is shutting down, the store fails), the lease still ends the claim on time.
pub(crate) struct ClaimGuard {
    store: Store,
    ticket: Option<Ticket>,
}

/// How long an abandoned attempt keeps its key: the shortest lease the store takes.
const ABANDONED_LEASE: Duration = Duration::from_millis(1);

impl ClaimGuard {
    pub(crate) fn new(store: Store, ticket: Ticket) -> ClaimGuard {
        ClaimGuard {
            store,
            ticket: Some(ticket),
        }
    }

    /// The ticket, for the handler's request extensions.
    pub(crate) fn ticket(&self) -> Option<&Ticket> {
        self.ticket.as_ref()
    }

    /// Completes the claim with `response`. The attempt is over either way: a failure (a
    /// storage error, a takeover after the lease ran out) leaves the record to its lease.
    pub(crate) async fn complete(mut self, response: Vec<u8>, ttl: Option<Duration>) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let store = self.store.clone();
        let _ = blocking(move || match ttl {
            Some(ttl) => store.complete_with_ttl(&ticket, response, ttl),
            None => store.complete(&ticket, response),
        })
        .await;
    }

    /// Gives the key back so the client may retry: the handler failed in a way it reported.
    pub(crate) async fn release(mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let store = self.store.clone();
        let _ = blocking(move || store.release(&ticket)).await;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some(mut ticket) = self.ticket.take() else {
            return;
        };
        let store = self.store.clone();
        detach(move || {
            let _ = store.extend(&mut ticket, ABANDONED_LEASE);
        });
    }
}
