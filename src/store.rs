//! [`Store`]: the public API. Checks the caller's input, then hands each operation to the
//! engine: reads and duplicate hits are answered from a read transaction, writes go through
//! group commit.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redb::StorageBackend;

use crate::claim::{Claim, ClaimOptions};
use crate::clock::Clock;
use crate::config::Config;
use crate::engine::Engine;
use crate::error::Result;
use crate::key::Key;
use crate::limits;
use crate::observe::{self, Outcome};
use crate::redb::schema::Location;
use crate::rules::ops;
use crate::sweeper::Sweeper;

pub(crate) mod maintenance;
mod marks;
mod owner;
mod sequence;

/// How often `claim_or_wait` re-reads the clock while it waits for a lease to run out, so a
/// clock that jumps (or a [`ManualClock`](crate::ManualClock) moved by a test) is noticed.
const CLOCK_RECHECK: Duration = Duration::from_millis(10);

/// An idempotency and dedupe store on one redb file.
///
/// Cheap to clone: clones share one file, one writer and one sweeper. The sweeper stops and the
/// file is released when the last clone is dropped, or at once on [`close`](Store::close).
///
/// # Close semantics
/// Dropping the last handle stops the sweeper, joins it, commits anything not yet durable and
/// releases the file lock, ignoring errors; [`close`](Store::close) does the same and returns
/// the error. After `close`, calls on other clones return [`Error::Closed`](crate::Error::Closed).
///
/// # Example
/// ```
/// use dedupe_store::{Claim, Store};
///
/// # let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path().join("dedupe.redb"))?;
/// match store.claim("charge:order-42")? {
///     Claim::Acquired(ticket) => {
///         let receipt = b"charged 42.00"; // do the side effect once
///         store.complete(&ticket, receipt)?;
///     }
///     Claim::Completed(outcome) => println!("replay: {:?}", outcome.response),
///     Claim::InProgress { retry_after, .. } => println!("busy, retry in {retry_after:?}"),
///     Claim::Mismatch { .. } => println!("same key, different request"),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Store {
    handle: Arc<Handle>,
}

/// What the clones share. Its drop stops the sweeper before the engine (and the file) go.
struct Handle {
    engine: Arc<Engine>,
    sweeper: Mutex<Option<Sweeper>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Dropping the sweeper stops and joins its thread; the engine, and with it the file,
        // is released once this handle's reference is the last.
        drop(self.sweeper.lock().take());
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store on a redb file, in memory or on a caller's backend.
    pub(crate) fn start(
        backend: Arc<dyn StorageBackend>,
        location: Location,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Store> {
        let engine = crate::redb::Engine::open(backend, location, config, clock)?;
        Store::on(Engine::Redb(engine))
    }

    /// A store on an engine that is open, with its sweeper started.
    pub(crate) fn on(engine: Engine) -> Result<Store> {
        let engine = Arc::new(engine);
        let sweeper = Sweeper::spawn(&engine)?;
        Ok(Store {
            handle: Arc::new(Handle {
                engine,
                sweeper: Mutex::new(sweeper),
            }),
        })
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.handle.engine
    }

    /// The file this store is on; `None` in memory, on a backend of your own or on
    /// PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        self.handle.engine.path()
    }

    /// Claims `key` with the store's lease and TTL and no fingerprint. See [`Store::claim_with`].
    ///
    /// # Errors
    /// As for [`Store::claim_with`].
    pub fn claim(&self, key: impl AsRef<[u8]>) -> Result<Claim> {
        self.claim_with(key, &ClaimOptions::new())
    }

    /// Claims `key`, atomically:
    ///
    /// - absent, expired or released: [`Claim::Acquired`] with a new fencing token, attempt 1;
    /// - in progress with a live lease: [`Claim::InProgress`], nothing changes;
    /// - in progress whose lease ran out: a takeover, [`Claim::Acquired`] with a larger token,
    ///   the next attempt number and [`Ticket::is_takeover`](crate::Ticket::is_takeover);
    /// - completed: [`Claim::Completed`] with the stored outcome (the replay);
    /// - a different fingerprint than the key's (in either state): [`Claim::Mismatch`].
    ///
    /// Answers that change nothing are served from a read transaction without waiting for the
    /// writer; only a claim that may write joins the next group commit.
    ///
    /// ```
    /// use dedupe_store::{Claim, ClaimOptions, Store};
    ///
    /// let store = Store::in_memory()?;
    /// let first = ClaimOptions::new().fingerprint(b"amount=10");
    /// let Claim::Acquired(ticket) = store.claim_with("pay-1", &first)? else { unreachable!() };
    /// store.complete(&ticket, b"ok")?;
    ///
    /// assert!(matches!(store.claim_with("pay-1", &first)?, Claim::Completed(_)));
    /// let other = ClaimOptions::new().fingerprint(b"amount=99");
    /// assert!(matches!(store.claim_with("pay-1", &other)?, Claim::Mismatch { .. }));
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::EmptyKey`](crate::Error::EmptyKey), [`Error::KeyTooLarge`](crate::Error::KeyTooLarge), [`Error::FingerprintTooLarge`](crate::Error::FingerprintTooLarge),
    /// [`Error::InvalidDuration`](crate::Error::InvalidDuration) for bad input; [`Error::Corrupt`](crate::Error::Corrupt) if the key's record is
    /// damaged; [`Error::Storage`](crate::Error::Storage) if the commit failed (the claim was not acquired).
    pub fn claim_with(&self, key: impl AsRef<[u8]>, options: &ClaimOptions) -> Result<Claim> {
        let key = key.as_ref();
        self.observed("claim", Some(key), || {
            let key = checked_key(key)?;
            let op = self.claim_op(options)?;
            let claim = self.run_claim(key, op)?;
            Ok(self.answered(claim))
        })
    }

    /// Runs public operation `op` on `key` (if it has one) under the store's spans and
    /// metrics (features `tracing` and `metrics`; without them, just runs it).
    pub(crate) fn observed<T: Outcome>(
        &self,
        op: &'static str,
        key: Option<&[u8]>,
        run: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        observe::operation(op, key.map(|key| (self.engine().store_id(), key)), run)
    }

    /// Like [`Store::claim_with`], without counting an in-progress answer: a look of a wait
    /// that already counted its one in-progress answer.
    #[cfg(feature = "http")]
    pub(crate) fn claim_uncounted(&self, key: &[u8], options: &ClaimOptions) -> Result<Claim> {
        let key = checked_key(key)?;
        let op = self.claim_op(options)?;
        self.run_claim(key, op)
    }

    /// A future that completes at the next change to the idempotency key `key` (or another
    /// key of its notification shard) after this call: create it before looking at the key.
    #[cfg(feature = "http")]
    pub(crate) fn key_changed(&self, key: &Key) -> tokio::sync::futures::Notified<'_> {
        self.engine().key_changed(key)
    }

    /// Counts the claim's answer as the caller gets it.
    fn answered(&self, claim: Claim) -> Claim {
        if matches!(claim, Claim::InProgress { .. }) {
            self.engine().counters().in_progress();
        }
        claim
    }

    fn claim_op(&self, options: &ClaimOptions) -> Result<ops::Claim> {
        let config = &self.engine().config();
        if let Some(fingerprint) = &options.fingerprint {
            limits::check_fingerprint(fingerprint)?;
        }
        let lease = match options.lease {
            Some(lease) => limits::duration_millis("lease", lease)?,
            None => config.lease,
        };
        let ttl = match options.ttl {
            Some(ttl) => limits::duration_millis("ttl", ttl)?,
            None => config.ttl,
        };
        Ok(ops::Claim {
            fingerprint: options.fingerprint.clone(),
            lease,
            ttl,
        })
    }

    fn run_claim(&self, key: Key, op: ops::Claim) -> Result<Claim> {
        self.engine().decide(key, op)
    }

    /// Like [`Store::claim_with`], but when another owner holds a live lease, waits (on an
    /// in-process notification, not by polling the file) until that owner completes, releases
    /// or loses its lease, or `timeout` passes, then answers as `claim_with` would then. A
    /// handler can so return the first attempt's outcome to a retry instead of a 409.
    ///
    /// The timeout is real time; lease deadlines are read from the store's clock.
    ///
    /// # Errors
    /// As for [`Store::claim_with`].
    pub fn claim_or_wait(
        &self,
        key: impl AsRef<[u8]>,
        options: &ClaimOptions,
        timeout: Duration,
    ) -> Result<Claim> {
        let key = key.as_ref();
        self.observed("claim_or_wait", Some(key), || {
            self.claim_or_wait_inner(key, options, timeout)
        })
    }

    fn claim_or_wait_inner(
        &self,
        key: &[u8],
        options: &ClaimOptions,
        timeout: Duration,
    ) -> Result<Claim> {
        let key = checked_key(key)?;
        let op = self.claim_op(options)?;
        let deadline = Instant::now().checked_add(timeout);
        let engine = self.engine();
        // A wait that meets the key in progress counts as one in-progress answer, however
        // often it looks again.
        let mut counted = false;
        loop {
            let seen = engine.generation(&key);
            let claim = self.run_claim(key.clone(), op.clone())?;
            let Claim::InProgress { lease_until, .. } = claim else {
                return Ok(claim);
            };
            if !std::mem::replace(&mut counted, true) {
                self.engine().counters().in_progress();
            }
            loop {
                match next_look(deadline, lease_until, engine.now(), CLOCK_RECHECK) {
                    // Answer as a claim would now: the lease may have run out, or moved on,
                    // since the last look.
                    NextLook::Deadline => return self.run_claim(key, op),
                    NextLook::LeaseOver => break,
                    NextLook::WaitUntil(until) => {
                        if engine.wait_for_change(&key, seen, until) {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Stops and joins the sweeper, makes every commit durable and releases the file, returning
    /// any error (dropping the last handle does the same and ignores errors). Other clones get
    /// [`Error::Closed`](crate::Error::Closed) afterwards. A `close` on another clone, during or after this one, waits
    /// for this one to finish and returns its result, so that once any `close` returns, the
    /// file is durable and can be opened again.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage) or [`Error::Io`](crate::Error::Io) if the final flush or the release failed.
    pub fn close(self) -> Result<()> {
        self.observed("close", None, || {
            drop(self.handle.sweeper.lock().take());
            // Callers waiting in `claim_or_wait` on other clones look again, and get `Closed`.
            self.engine().close()
        })
    }
}

/// What a wait for a key in progress does next.
pub(crate) enum NextLook {
    /// The wait's deadline has come: look once more and answer as that claim does.
    Deadline,
    /// The owner's lease has run out by the store's clock: look again now.
    LeaseOver,
    /// Wait for the key to change until this instant, then decide again. It is never later
    /// than the deadline nor than `recheck` from now, so a clock that jumps is noticed.
    WaitUntil(Instant),
}

/// Decides a `claim_or_wait`'s next step (and the HTTP layer's wait's), for a key whose
/// owner holds it until `lease_until` by the store's clock, which reads `clock_now`.
pub(crate) fn next_look(
    deadline: Option<Instant>,
    lease_until: u64,
    clock_now: u64,
    recheck: Duration,
) -> NextLook {
    let now = Instant::now();
    if deadline.is_some_and(|deadline| now >= deadline) {
        return NextLook::Deadline;
    }
    let lease_left = Duration::from_millis(lease_until.saturating_sub(clock_now));
    if lease_left.is_zero() {
        return NextLook::LeaseOver;
    }
    let until = now + lease_left.min(recheck);
    NextLook::WaitUntil(deadline.map_or(until, |deadline| until.min(deadline)))
}

pub(crate) fn checked_key(key: &[u8]) -> Result<Key> {
    limits::check_key(key)?;
    Ok(Key::new(key))
}
