//! [`Store`]: the public API. Checks the caller's input, then hands each operation to the
//! engine: reads and duplicate hits are answered from a read transaction, writes go through
//! group commit.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redb::StorageBackend;

use crate::builder::{Config, StoreBuilder};
use crate::claim::{Claim, ClaimOptions, Ticket};
use crate::clock::Clock;
use crate::entry::Entry;
use crate::error::{Error, Result};
use crate::key::{self, Key};
use crate::limits;
use crate::observe::{self, Outcome};
use crate::redb::Engine;
use crate::redb::scan;
use crate::redb::storage::{Location, Storage};
use crate::rules::{Answer, Namespace, Op};
use crate::sweeper::Sweeper;

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
/// the error. After `close`, calls on other clones return [`Error::Closed`].
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

/// Takes the answer `pick` expects, or the refusal as an error.
pub(crate) fn expect<T>(answer: Answer, pick: impl FnOnce(Answer) -> Option<T>) -> Result<T> {
    match answer {
        Answer::Refused(err) => Err(err),
        other => match pick(other) {
            Some(value) => Ok(value),
            None => unreachable!("the writer answered a different operation"),
        },
    }
}

impl Store {
    /// Opens the store file at `path` with every default, creating it if needed. See
    /// [`Store::builder`] for the settings.
    ///
    /// # Errors
    /// [`Error::AlreadyOpen`] at once if another process or store holds the file;
    /// [`Error::UnsupportedFormat`] or [`Error::NotAStore`] for a file this build must not
    /// touch (nothing is rewritten); [`Error::Io`] if it cannot be opened.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        StoreBuilder::new().open(path)
    }

    /// A store in memory with every default: the real semantics, nothing on disk. For tests
    /// of code built on the store; pair it with a [`ManualClock`](crate::ManualClock) through
    /// [`Store::builder`].
    ///
    /// # Errors
    /// Only if the sweeper thread cannot be started.
    pub fn in_memory() -> Result<Store> {
        StoreBuilder::new().in_memory()
    }

    /// A builder for every setting, each with a documented default.
    pub fn builder() -> StoreBuilder {
        StoreBuilder::new()
    }

    pub(crate) fn start(
        backend: Arc<dyn StorageBackend>,
        location: Location,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Store> {
        let storage = Storage::open(backend, location, config.cache_size, config.quick_repair)?;
        let engine = Arc::new(Engine::new(storage, clock, config)?);
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

    /// The file this store is on; `None` in memory or on a backend of your own.
    pub fn path(&self) -> Option<&Path> {
        self.handle.engine.storage.path()
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
    ///   the next attempt number and [`Ticket::is_takeover`];
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
    /// [`Error::EmptyKey`], [`Error::KeyTooLarge`], [`Error::FingerprintTooLarge`],
    /// [`Error::InvalidDuration`] for bad input; [`Error::Corrupt`] if the key's record is
    /// damaged; [`Error::Storage`] if the commit failed (the claim was not acquired).
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
        observe::operation(
            op,
            key.map(|key| (self.engine().storage.store_id(), key)),
            run,
        )
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
        let stored_key = scan::stored_key(Namespace::Idempotency.tag(), key.as_bytes());
        self.engine().events.changed_async(&stored_key)
    }

    /// Counts the claim's answer as the caller gets it.
    fn answered(&self, claim: Claim) -> Claim {
        if matches!(claim, Claim::InProgress { .. }) {
            self.engine().counters.in_progress();
        }
        claim
    }

    fn claim_op(&self, options: &ClaimOptions) -> Result<Op> {
        let config = &self.engine().config;
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
        Ok(Op::Claim {
            fingerprint: options.fingerprint.clone(),
            lease,
            ttl,
        })
    }

    fn run_claim(&self, key: Key, op: Op) -> Result<Claim> {
        let answer = match self.engine().peek(&key, &op)? {
            Some(answer) => answer,
            None => self.engine().one(key, op)?,
        };
        expect(answer, |answer| match answer {
            Answer::Claim(claim) => Some(claim),
            _ => None,
        })
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
        let stored_key = scan::stored_key(Namespace::Idempotency.tag(), key.as_bytes());
        let deadline = Instant::now().checked_add(timeout);
        let events = &self.engine().events;
        // A wait that meets the key in progress counts as one in-progress answer, however
        // often it looks again.
        let mut counted = false;
        loop {
            let seen = events.generation(&stored_key);
            let claim = self.run_claim(key.clone(), op.clone())?;
            let Claim::InProgress { lease_until, .. } = claim else {
                return Ok(claim);
            };
            if !std::mem::replace(&mut counted, true) {
                self.engine().counters.in_progress();
            }
            loop {
                let now = Instant::now();
                if deadline.is_some_and(|deadline| now >= deadline) {
                    // Answer as a claim would now: the lease may have run out, or moved on,
                    // since the last look.
                    return self.run_claim(key, op);
                }
                let lease_left =
                    Duration::from_millis(lease_until.saturating_sub(self.engine().now()));
                if lease_left.is_zero() {
                    break;
                }
                let mut until = now + lease_left.min(CLOCK_RECHECK);
                if let Some(deadline) = deadline {
                    until = until.min(deadline);
                }
                if events.wait(&stored_key, seen, until) {
                    break;
                }
            }
        }
    }

    fn check_ticket(&self, ticket: &Ticket) -> Result<()> {
        if ticket.store_id != self.engine().storage.store_id() {
            return Err(Error::ForeignTicket {
                key: ticket.key.clone(),
            });
        }
        Ok(())
    }

    /// Completes the ticket's claim with `response`, kept for the store's TTL and replayed to
    /// every later claim of the key. A ticket whose lease ran out may still complete as long as
    /// nobody took over.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the ticket no longer owns the key (taken over, released,
    /// completed, expired or swept); nothing changes. [`Error::ResponseTooLarge`],
    /// [`Error::ForeignTicket`]; [`Error::Storage`] if the commit failed (not completed).
    pub fn complete(&self, ticket: &Ticket, response: impl AsRef<[u8]>) -> Result<()> {
        self.complete_inner(ticket, response.as_ref(), self.engine().config.ttl)
    }

    /// Like [`Store::complete`], keeping the outcome for `ttl` instead of the store's TTL.
    ///
    /// # Errors
    /// As for [`Store::complete`], and [`Error::InvalidDuration`] for a zero or huge `ttl`.
    pub fn complete_with_ttl(
        &self,
        ticket: &Ticket,
        response: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<()> {
        let ttl = limits::duration_millis("ttl", ttl)?;
        self.complete_inner(ticket, response.as_ref(), ttl)
    }

    fn complete_inner(&self, ticket: &Ticket, response: &[u8], ttl: u64) -> Result<()> {
        self.observed("complete", Some(ticket.key.as_bytes()), || {
            self.check_ticket(ticket)?;
            limits::check_response(response, self.engine().config.max_response_bytes)?;
            let op = Op::Complete {
                fencing_token: ticket.fencing_token,
                response: response.to_vec(),
                ttl,
            };
            let answer = self.engine().one(ticket.key.clone(), op)?;
            expect(answer, |answer| {
                matches!(answer, Answer::Completed).then_some(())
            })
        })
    }

    /// Gives the key up after a failure worth retrying: the in-progress record is removed so
    /// the next claim acquires at once.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the ticket no longer owns the key; [`Error::ForeignTicket`];
    /// [`Error::Storage`].
    pub fn release(&self, ticket: &Ticket) -> Result<()> {
        self.observed("release", Some(ticket.key.as_bytes()), || {
            self.check_ticket(ticket)?;
            let op = Op::Release {
                fencing_token: ticket.fencing_token,
            };
            let answer = self.engine().one(ticket.key.clone(), op)?;
            expect(answer, |answer| {
                matches!(answer, Answer::Released).then_some(())
            })
        })
    }

    /// Heartbeat for long work: moves the lease deadline to `now + lease` and updates the
    /// ticket's [`lease_until`](Ticket::lease_until).
    ///
    /// # Errors
    /// [`Error::LeaseLost`], [`Error::ForeignTicket`], [`Error::InvalidDuration`],
    /// [`Error::Storage`].
    pub fn extend(&self, ticket: &mut Ticket, lease: Duration) -> Result<()> {
        let key = ticket.key.clone();
        ticket.lease_until = self.observed("extend", Some(key.as_bytes()), || {
            self.check_ticket(ticket)?;
            let op = Op::Extend {
                fencing_token: ticket.fencing_token,
                lease: limits::duration_millis("lease", lease)?,
            };
            let answer = self.engine().one(key.clone(), op)?;
            expect(answer, |answer| match answer {
                Answer::Extended { lease_until } => Some(lease_until),
                _ => None,
            })
        })?;
        Ok(())
    }

    /// Records, atomically and durably, that the owner finished `step`, with a small `state`
    /// blob to resume from. A takeover's ticket carries the last checkpoint
    /// ([`Ticket::checkpoint`]), so a new owner resumes after the last finished step instead of
    /// starting over; [`Store::get`] shows it too; `complete` drops it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dedupe_store::{Claim, ManualClock, Store};
    ///
    /// let clock = ManualClock::new(0);
    /// let store = Store::builder().clock(clock.clone()).lease(Duration::from_secs(5)).in_memory()?;
    /// let Claim::Acquired(first) = store.claim("checkout-7")? else { unreachable!() };
    /// store.checkpoint(&first, "order-created", b"order_id=991")?;
    /// // The first owner dies here; its lease runs out.
    /// clock.advance(Duration::from_secs(6));
    /// let Claim::Acquired(second) = store.claim("checkout-7")? else { unreachable!() };
    /// let resume = second.checkpoint().expect("the first owner's checkpoint");
    /// assert_eq!(resume.step, "order-created");
    /// assert_eq!(resume.state, b"order_id=991");
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::LeaseLost`] if the ticket no longer owns the key; [`Error::CheckpointTooLarge`];
    /// [`Error::ForeignTicket`]; [`Error::Storage`] if the commit failed (not recorded).
    pub fn checkpoint(&self, ticket: &Ticket, step: &str, state: impl AsRef<[u8]>) -> Result<()> {
        self.checkpoint_inner(ticket, step, state.as_ref(), None)
            .map(|_| ())
    }

    /// [`Store::checkpoint`] that also extends the lease to `now + lease` in the same write,
    /// updating the ticket's [`lease_until`](Ticket::lease_until).
    ///
    /// # Errors
    /// As for [`Store::checkpoint`], and [`Error::InvalidDuration`].
    pub fn checkpoint_and_extend(
        &self,
        ticket: &mut Ticket,
        step: &str,
        state: impl AsRef<[u8]>,
        lease: Duration,
    ) -> Result<()> {
        let lease = limits::duration_millis("lease", lease)?;
        ticket.lease_until = self.checkpoint_inner(ticket, step, state.as_ref(), Some(lease))?;
        Ok(())
    }

    fn checkpoint_inner(
        &self,
        ticket: &Ticket,
        step: &str,
        state: &[u8],
        lease: Option<u64>,
    ) -> Result<u64> {
        self.observed("checkpoint", Some(ticket.key.as_bytes()), || {
            self.check_ticket(ticket)?;
            limits::check_checkpoint(step, state)?;
            let op = Op::Checkpoint {
                fencing_token: ticket.fencing_token,
                step: step.to_string(),
                state: state.to_vec(),
                lease,
            };
            let answer = self.engine().one(ticket.key.clone(), op)?;
            expect(answer, |answer| match answer {
                Answer::Checkpointed { lease_until } => Some(lease_until),
                _ => None,
            })
        })
    }

    /// The key's state, without changing it; `None` if it is absent or expired.
    ///
    /// # Errors
    /// [`Error::EmptyKey`], [`Error::KeyTooLarge`], [`Error::Corrupt`], [`Error::Storage`].
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        let key = key.as_ref();
        self.observed("get", Some(key), || {
            let key = checked_key(key)?;
            let stored_key = scan::stored_key(Namespace::Idempotency.tag(), key.as_bytes());
            let now = self.engine().now();
            match self.engine().load(&stored_key)? {
                None => Ok(None),
                Some(Err(err)) => Err(Error::Corrupt { key, reason: err.0 }),
                Some(Ok(record)) if record.is_live(now) => Ok(Entry::from_record(key, record)),
                Some(Ok(_)) => Ok(None),
            }
        })
    }

    /// Removes the key now, whatever its state (an operator's tool; it also clears a record
    /// that fails its checksum). Returns whether a live record was there.
    ///
    /// # Errors
    /// [`Error::EmptyKey`], [`Error::KeyTooLarge`], [`Error::Storage`].
    pub fn expire(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        self.observed("expire", Some(key), || {
            let key = checked_key(key)?;
            let answer = self.engine().one(key, Op::Expire)?;
            expect(answer, |answer| match answer {
                Answer::Expired(was_live) => Some(was_live),
                _ => None,
            })
        })
    }

    /// The dedupe set for message ids: `true` the first time `key` is seen within the TTL,
    /// `false` after. Shares the key space with [`Store::claim`]: a key with any live record
    /// is seen; otherwise a completed record with an empty response is stored.
    ///
    /// ```
    /// use dedupe_store::Store;
    ///
    /// let store = Store::in_memory()?;
    /// assert!(store.mark_seen("msg-1")?);
    /// assert!(!store.mark_seen("msg-1")?);
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::EmptyKey`], [`Error::KeyTooLarge`], [`Error::Corrupt`], [`Error::Storage`].
    pub fn mark_seen(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.mark_seen_inner(key.as_ref(), self.engine().config.ttl)
    }

    /// Like [`Store::mark_seen`], remembering the key for `ttl` (say, the broker's redelivery
    /// window) instead of the store's TTL.
    ///
    /// # Errors
    /// As for [`Store::mark_seen`], and [`Error::InvalidDuration`].
    pub fn mark_seen_with_ttl(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<bool> {
        let ttl = limits::duration_millis("ttl", ttl)?;
        self.mark_seen_inner(key.as_ref(), ttl)
    }

    fn mark_seen_inner(&self, key: &[u8], ttl: u64) -> Result<bool> {
        self.observed("mark_seen", Some(key), || {
            let key = checked_key(key)?;
            let op = Op::MarkSeen { ttl };
            let answer = match self.engine().peek(&key, &op)? {
                Some(answer) => answer,
                None => self.engine().one(key, op)?,
            };
            expect(answer, |answer| match answer {
                Answer::Seen(first) => Some(first),
                _ => None,
            })
        })
    }

    /// [`Store::mark_seen`] for a batch, in one atomic write: all keys are marked or, on an
    /// error, none. A key repeated within the batch is `true` once, then `false`.
    ///
    /// ```
    /// use dedupe_store::Store;
    ///
    /// let store = Store::in_memory()?;
    /// store.mark_seen("m2")?;
    /// assert_eq!(store.mark_seen_many(["m1", "m2", "m1"])?, vec![true, false, false]);
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// As for [`Store::mark_seen`]; nothing is written.
    pub fn mark_seen_many<I, K>(&self, keys: I) -> Result<Vec<bool>>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        self.mark_seen_many_inner(keys, self.engine().config.ttl)
    }

    /// [`Store::mark_seen_many`] remembering the keys for `ttl` (say, the broker's redelivery
    /// window) instead of the store's TTL.
    ///
    /// # Errors
    /// As for [`Store::mark_seen_many`], and [`Error::InvalidDuration`].
    pub fn mark_seen_many_with_ttl<I, K>(&self, keys: I, ttl: Duration) -> Result<Vec<bool>>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        let ttl = limits::duration_millis("ttl", ttl)?;
        self.mark_seen_many_inner(keys, ttl)
    }

    fn mark_seen_many_inner<I, K>(&self, keys: I, ttl: u64) -> Result<Vec<bool>>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        self.observed("mark_seen_many", None, || {
            let ops = keys
                .into_iter()
                .map(|key| Ok((checked_key(key.as_ref())?, Op::MarkSeen { ttl })))
                .collect::<Result<Vec<_>>>()?;
            if ops.is_empty() {
                return Ok(Vec::new());
            }
            self.engine()
                .many(ops)?
                .into_iter()
                .map(|answer| {
                    expect(answer, |answer| match answer {
                        Answer::Seen(first) => Some(first),
                        _ => None,
                    })
                })
                .collect()
        })
    }

    /// Stops and joins the sweeper, makes every commit durable and releases the file, returning
    /// any error (dropping the last handle does the same and ignores errors). Other clones get
    /// [`Error::Closed`] afterwards. A `close` on another clone, during or after this one, waits
    /// for this one to finish and returns its result, so that once any `close` returns, the
    /// file is durable and can be opened again.
    ///
    /// # Errors
    /// [`Error::Storage`] or [`Error::Io`] if the final flush or the release failed.
    pub fn close(self) -> Result<()> {
        self.observed("close", None, || {
            drop(self.handle.sweeper.lock().take());
            let closed = self.engine().storage.close();
            // Callers waiting in `claim_or_wait` on other clones look again, and get `Closed`.
            self.engine().events.changed_all();
            closed
        })
    }
}

pub(crate) fn checked_key(key: &[u8]) -> Result<Key> {
    key::validate(key)?;
    Ok(Key::new(key))
}
