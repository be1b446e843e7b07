//! The PostgreSQL engine under a [`Store`](crate::Store): the same rules, over a table that
//! any number of processes and hosts share.
//!
//! - Reads that change nothing (a replay, a live claim, a mismatch, a duplicate mark) are one
//!   `SELECT`, with no lock held past it.
//! - While few calls are in flight, a write goes alone in autocommit (`peek.rs`); under load,
//!   writes go through group commit (`batch.rs`): a batch takes its keys' locks and rows'
//!   locks, draws fencing tokens from the `tokens` sequence after the locks are held, decides
//!   every operation with the rules, writes the rows and commits (`commit.rs`). Every token
//!   of a key, in any process, is drawn under the key's lock (`key_lock.rs`).
//! - Leases and expiry go by the database's clock, so every host agrees on them, unless the
//!   builder was given a clock (tests).
//! - A waiter in `claim_or_wait` wakes when any process completes or releases the key it waits
//!   for (`listen.rs`, LISTEN/NOTIFY), and polls once a second should a notification be lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use tokio_postgres::types::Type;

use super::commit::{self, Shared, Work};
use super::error::query_error;
use super::fresh;
use super::freshness::Freshness;
use super::key_lock;
use super::listen::Listener;
use super::pool::Pool;
use super::row::Loaded;
use super::runtime::Runtime;
use super::schema::open_schema;
use super::session::Session;
use super::statements::Statements;
use crate::batch::Batcher;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::notify::KeyEvents;
use crate::record::Record;
use crate::rules::queued::Pending;
use crate::rules::{Namespace, Rule};
use crate::stats::Counters;

/// The most calls in flight at which a write still goes alone, outside the group commit
/// ([`Engine::alone`]), when the pool has as many connections. Measured with fresh claims
/// (`BENCHMARKS.md`): at 8 threads, writes alone ran 25% faster than grouped, the server
/// grouping their WAL flushes itself; at 32 threads, grouped writes ran half as fast again,
/// at half the server's CPU per claim, and writes alone would keep the commits, seeing
/// nothing queued, from ever forming.
const MAX_ALONE: usize = 8;

/// A call counted in flight ([`Engine::enter`]) until dropped.
pub(super) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// [`Engine::clock_offset`] before the server's clock was first read.
const UNMEASURED: i64 = i64::MIN;

/// This host's clock, in milliseconds since the Unix epoch.
fn host_millis() -> u64 {
    crate::clock::SystemClock.now_millis()
}

/// Where the engine connects and how.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub url: String,
    pub schema: String,
    pub connections: usize,
    /// Create the schema's tables when they are missing.
    pub create: bool,
    /// How long a connection attempt may take; `None`: the URL's, else the pool's default.
    pub connect_timeout: Option<std::time::Duration>,
}

pub(crate) struct Engine {
    /// Where the connections' drivers and the listener run; calls run on their callers'
    /// threads (`runtime::block_on`).
    _runtime: Runtime,
    pub(super) shared: Arc<Shared>,
    pub config: Config,
    pub counters: Counters,
    /// Whether claims and marks are likely to find their keys absent (`peek.rs`).
    pub(super) freshness: Freshness,
    /// The server's clock less this host's, in milliseconds, as last measured; `UNMEASURED`
    /// before the first measure.
    clock_offset: AtomicI64,
    /// The group commit. One: writes reach it only under load (below that they go alone,
    /// [`Engine::alone`]), and there one batch of all that queued costs the server less than
    /// several smaller ones at once. Measured with fresh claims (scratch harness, 4 s each):
    /// 13.6 thousand claims/s at 16 threads, 18.4 at 32 and 23.7 at 64 with one, against 7.2,
    /// 11.3 and 18.1 with four spread over the keys by hash, and 7.8 at 32 with eight.
    batcher: Batcher<Work, Result<()>>,
    /// How many calls that may write are in flight ([`Engine::alone`]).
    calls: AtomicUsize,
    /// [`MAX_ALONE`], or the pool's size if smaller.
    alone_limit: usize,
    /// An owner's change is being made by a read and a conditional write (`one`).
    lone: AtomicBool,
    listener: Listener,
    closed: AtomicBool,
    /// A sweep removed records since the key budget's count was last refreshed
    /// ([`sweep_batch`](Self::sweep_batch)).
    swept_uncounted: AtomicBool,
}

impl Engine {
    /// Connects, creates the schema if needed and starts listening for changes.
    pub(crate) fn open(
        settings: Settings,
        config: Config,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<Engine> {
        let runtime = Runtime::new()?;
        let pool = Pool::new(&settings.url, settings.connections)?;
        let pool = Arc::new(pool.connect_timeout(settings.connect_timeout));
        pool.on_runtime(runtime.handle().clone());
        let (schema, create) = (settings.schema.clone(), settings.create);
        let info = runtime.call({
            let pool = pool.clone();
            async move {
                let mut client = pool.get().await?;
                open_schema(client.client_mut(), &schema, create).await
            }
        })?;
        let events = Arc::new(KeyEvents::new());
        let channel = commit::channel(&settings.schema);
        let listener = Listener::start(&runtime, pool.clone(), channel.clone(), events.clone());
        let shared = Arc::new(Shared {
            pool,
            sql: Statements::new(&info.quoted),
            channel,
            key_seed: key_lock::seed(&settings.schema),
            store_id: info.store_id,
            clock,
            events,
            max_keys: config.max_keys,
            records: AtomicU64::new(0),
        });
        let engine = Engine {
            _runtime: runtime,
            shared,
            config,
            counters: Counters::default(),
            freshness: Freshness::new(),
            clock_offset: AtomicI64::new(UNMEASURED),
            batcher: Batcher::new(|_| true),
            calls: AtomicUsize::new(0),
            alone_limit: settings.connections.clamp(1, MAX_ALONE),
            lone: AtomicBool::new(false),
            listener,
            closed: AtomicBool::new(false),
            swept_uncounted: AtomicBool::new(false),
        };
        if engine.config.max_keys.is_some() {
            engine.refresh_records()?;
        }
        Ok(engine)
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Runs a database call on the engine's runtime.
    pub(super) fn call<T>(
        &self,
        run: impl AsyncFnOnce(&Shared, &mut Session) -> Result<T>,
    ) -> Result<T> {
        self.check_open()?;
        let shared = &*self.shared;
        let answer = shared
            .pool
            .lend(async |session: &mut Session| run(shared, session).await);
        shared.pool.checked(answer)
    }

    /// The builder's clock's time, if it was given one; `None` when the server's clock decides.
    pub(super) fn test_clock_now(&self) -> Option<i64> {
        self.shared
            .test_now()
            .map(|now| i64::try_from(now).unwrap_or(i64::MAX))
    }

    /// The store's time: the builder's clock if it was given one, else the server's, as this
    /// host's clock plus the difference last measured between the two (see
    /// [`saw_server_time`](Self::saw_server_time)), so that a waiter looking at a lease every
    /// few milliseconds costs no round trip. Only waits and counts use it: every decision reads
    /// the server's clock in its own statement.
    pub(crate) fn now(&self) -> u64 {
        if let Some(now) = self.shared.test_now() {
            return now;
        }
        let host = host_millis();
        match self.clock_offset.load(Ordering::Relaxed) {
            UNMEASURED => self
                .database_now()
                // A failed read of the server's clock falls back to this host's.
                .unwrap_or(host),
            offset => u64::try_from(
                i64::try_from(host)
                    .unwrap_or(i64::MAX)
                    .saturating_add(offset),
            )
            .unwrap_or(0),
        }
    }

    /// Notes that the server's clock read `server` milliseconds just now (a statement's answer
    /// has arrived), for [`now`](Self::now).
    pub(super) fn saw_server_time(&self, server: u64) {
        let offset = i64::try_from(server)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(host_millis()).unwrap_or(i64::MAX));
        self.clock_offset
            .store(offset.max(UNMEASURED + 1), Ordering::Relaxed);
    }

    fn database_now(&self) -> Result<u64> {
        let now = self.call(async |shared: &Shared, client: &mut Session| {
            let row = client
                .query_typed_one(&shared.sql.clock, &[])
                .await
                .map_err(|err| query_error("read the server's clock", err))?;
            let now: i64 = row
                .try_get(0)
                .map_err(|err| query_error("read the server's clock", err))?;
            Ok(u64::try_from(now).unwrap_or(0))
        })?;
        self.saw_server_time(now);
        Ok(now)
    }

    /// A database has no file of the store's.
    pub(crate) fn path(&self) -> Option<&std::path::Path> {
        None
    }

    pub(crate) fn store_id(&self) -> u64 {
        self.shared.store_id
    }

    pub(crate) fn decide<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        let _call = self.enter();
        self.peek_or_commit(key, rule)
    }

    /// Answers without a commit when `peek` can, else through the group commit.
    fn peek_or_commit<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        match self.peek(&key, &rule)? {
            Some(answer) => answer,
            None => self.commit_one(key, rule),
        }
    }

    /// An operation the caller expects to write (a complete, a release, an extend...). Sent
    /// alone ([`alone`](Self::alone)) with no other such change in flight, one read and one
    /// conditional write in autocommit (`peek.rs`) cost fewer round trips than a transaction;
    /// otherwise it joins the group commit, so that concurrent writes share transactions and
    /// WAL flushes rather than each paying its own.
    pub(crate) fn one<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        let _call = self.enter();
        let lone = &self.lone;
        if self.alone()
            && lone
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            /// Gives the turn back, also if deciding panics.
            struct Turn<'a>(&'a AtomicBool);
            impl Drop for Turn<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _turn = Turn(lone);
            return self.peek_or_commit(key, rule);
        }
        self.commit_one(key, rule)
    }

    fn commit_one<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        let pending = Arc::new(Pending::new(key, rule));
        self.submit(Work::One(pending.clone()))?;
        pending.take()
    }

    pub(crate) fn many<R: Rule>(&self, ops: Vec<(Key, R)>) -> Result<Vec<R::Answer>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let _call = self.enter();
        let (pending, queued) = Pending::group(ops);
        self.submit(Work::Many(queued))?;
        pending.iter().map(|pending| pending.take()).collect()
    }

    /// Whether a write is best sent alone, in autocommit, rather than in the group commit: no
    /// group commit is running or waiting, and at most [`MAX_ALONE`] calls are in flight.
    /// Under more load, writes made alone would each pay a commit and a WAL flush of their
    /// own, and keep the group commit, seeing nothing queued, from ever forming.
    pub(super) fn alone(&self) -> bool {
        self.calls.load(Ordering::Relaxed) <= self.alone_limit && self.batcher.is_idle()
    }

    /// Counts a call in flight until the guard is dropped, also if the call panics.
    pub(super) fn enter(&self) -> InFlight<'_> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.calls)
    }

    fn submit(&self, work: Work) -> Result<()> {
        self.check_open()?;
        let weight = work.weight();
        self.batcher.submit(
            work,
            weight,
            false,
            |works, _| {
                let count = works.len();
                // New keys first while claims and marks are finding their keys absent; not
                // with a key budget, which the transaction weighs.
                let fresh_first = self.freshness.likely() && self.config.max_keys.is_none();
                let replies = self.call(async move |shared: &Shared, session: &mut Session| {
                    Ok(fresh::run(shared, session, works, fresh_first).await)
                });
                if let Ok(replies) = &replies {
                    let (absent, present) = replies.fresh;
                    self.freshness.saw_many(absent, present);
                }
                // A batch answered in parts (`fresh.rs`) may have failed in its second part only.
                if let Ok(replies) = &replies
                    && let Some(Err(err)) = replies.replies.iter().find(|reply| reply.is_err())
                {
                    self.shared.pool.failed(err);
                }
                match replies {
                    Ok(replies) => {
                        for tally in replies.tallies {
                            self.counters.count(tally);
                        }
                        self.counters.wrote(replies.ops);
                        replies.replies
                    }
                    Err(err) => {
                        self.counters.commit_failed();
                        (0..count).map(|_| Err(err.clone())).collect()
                    }
                }
            },
            || Err(Error::CommitPanicked),
        )
    }

    /// The record of `key` if it is live by the time read with it, in one `SELECT`.
    pub(crate) fn get_live(&self, namespace: Namespace, key: &Key) -> Result<Option<Record>> {
        let read = self.load(namespace, key)?;
        let now = read.now;
        match read.loaded {
            Loaded::Absent => Ok(None),
            Loaded::Found(record) => {
                Ok(Some(record).filter(|record| now.is_some_and(|now| record.is_live(now))))
            }
            Loaded::Damaged(reason) => Err(Error::Corrupt {
                key: key.clone(),
                reason,
            }),
        }
    }

    /// The database gives space back by itself (autovacuum): nothing to do.
    pub(crate) fn compact(&self) -> Result<bool> {
        self.check_open()?;
        Ok(false)
    }

    /// Removes up to `limit` records due by the database's clock, skipping rows another
    /// process holds, in one statement.
    pub(crate) fn sweep_batch(&self, limit: usize, _thorough: bool) -> Result<(usize, bool)> {
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let now = self.test_clock_now();
        let removed = self.call(async move |shared: &Shared, client: &mut Session| {
            let removed = client
                .execute_typed(
                    &shared.sql.sweep,
                    &[(&limit_sql, Type::INT8), (&now, Type::INT8)],
                )
                .await
                .map_err(|err| query_error("sweep due keys", err))?;
            Ok(removed as usize)
        })?;
        let more = removed >= limit;
        self.counters.swept(removed);
        crate::observe::swept(removed, more);
        if removed > 0 {
            self.shared.events.changed_all();
            self.shared
                .add_records(-i64::try_from(removed).unwrap_or(i64::MAX));
            self.swept_uncounted.store(true, Ordering::Relaxed);
        }
        // Other processes add and remove keys too: with a key budget, count them all again
        // once what was due is swept. Once per pass rather than per batch: the count reads
        // every row, and a backlog is swept in many batches.
        if !more
            && self.config.max_keys.is_some()
            && self.swept_uncounted.swap(false, Ordering::Relaxed)
            && let Err(err) = self.refresh_records()
        {
            // Counted at the end of the next pass instead.
            self.swept_uncounted.store(true, Ordering::Relaxed);
            return Err(err);
        }
        Ok((removed, more))
    }

    /// Counts the rows the key budget weighs, from the table: other processes add keys too.
    fn refresh_records(&self) -> Result<()> {
        let (held, _) = self.counts(0)?;
        self.shared.records.store(held, Ordering::Release);
        Ok(())
    }

    /// Every commit is durable: nothing to flush.
    pub(crate) fn flush_if_due(&self) -> Result<()> {
        Ok(())
    }

    /// Every commit is durable: nothing to flush.
    pub(crate) fn flush_if_dirty(&self) -> Result<()> {
        Ok(())
    }

    /// Closes the connections; later calls get [`Error::Closed`], and waiters wake to see it.
    pub(crate) fn close(&self) -> Result<()> {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.listener.stop();
            self.shared.pool.close();
        }
        self.shared.events.changed_all();
        Ok(())
    }

    pub(crate) fn generation(&self, key: &Key) -> u64 {
        self.shared
            .events
            .generation(&commit::event_key(Namespace::Idempotency, key))
    }

    pub(crate) fn wait_for_change(&self, key: &Key, seen: u64, until: Instant) -> bool {
        self.listener.wanted();
        self.shared
            .events
            .wait(&commit::event_key(Namespace::Idempotency, key), seen, until)
    }

    /// A caller of [`key_changed`](Self::key_changed) is about to wait: listen for other
    /// processes' changes (`listen.rs`).
    #[cfg(feature = "http")]
    pub(crate) fn will_wait(&self) {
        self.listener.wanted();
    }

    #[cfg(feature = "http")]
    pub(crate) fn key_changed(&self, key: &Key) -> tokio::sync::futures::Notified<'_> {
        self.shared
            .events
            .changed_async(&commit::event_key(Namespace::Idempotency, key))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::UNMEASURED;
    use crate::testing::postgres::TestCluster;
    use crate::{Claim, Store};
    use std::sync::atomic::Ordering;

    /// A waiter looks at the time every few milliseconds: after the first statement that
    /// read the server's clock, the engine's time costs no round trip.
    #[test]
    fn the_servers_clock_is_measured_by_statements_and_then_followed() -> crate::Result<()> {
        let Some(cluster) = TestCluster::start() else {
            return Ok(());
        };
        let store = Store::builder()
            .without_sweeper()
            .open_postgres(&cluster.create_database("offset"))?;
        let crate::engine::Engine::Postgres(engine) = store.engine() else {
            panic!("a store opened on PostgreSQL has the PostgreSQL engine");
        };
        assert_eq!(engine.clock_offset.load(Ordering::Relaxed), UNMEASURED);
        let Claim::Acquired(ticket) = store.claim("measured")? else {
            panic!("a fresh key is acquired");
        };
        let offset = engine.clock_offset.load(Ordering::Relaxed);
        assert_ne!(
            offset, UNMEASURED,
            "the claim's statement measured the clock"
        );
        // The server runs on this host: the two clocks agree to well within a second.
        assert!(offset.abs() < 1_000, "offset {offset} ms");
        cluster.stop_immediate();
        // With the server gone, the time still follows the server's, from this host's clock.
        let now = engine.now();
        assert!(now >= ticket.claimed_at() && now < ticket.claimed_at() + 60_000);
        assert_eq!(engine.clock_offset.load(Ordering::Relaxed), offset);
        Ok(())
    }

    /// Writes go alone only while few calls are in flight, and every call, answered or failed,
    /// stops counting when it returns.
    #[test]
    fn writes_go_alone_only_while_few_calls_are_in_flight() -> crate::Result<()> {
        let Some(cluster) = TestCluster::start() else {
            return Ok(());
        };
        let store = Store::builder()
            .without_sweeper()
            .postgres_connections(2)
            .open_postgres(&cluster.create_database("alone"))?;
        let crate::engine::Engine::Postgres(engine) = store.engine() else {
            panic!("a store opened on PostgreSQL has the PostgreSQL engine");
        };
        assert_eq!(engine.alone_limit, 2, "bounded by the pool's size");
        let first = engine.enter();
        let second = engine.enter();
        assert!(engine.alone(), "two calls in flight: at the limit");
        let third = engine.enter();
        assert!(!engine.alone(), "three calls in flight: past the limit");
        drop((first, second, third));
        assert!(engine.alone());
        let Claim::Acquired(ticket) = store.claim("alone")? else {
            panic!("a fresh key is acquired");
        };
        store.complete(&ticket, b"done")?;
        assert!(matches!(store.claim("alone")?, Claim::Completed(_)));
        engine.close()?;
        assert!(
            store.claim("after").is_err(),
            "a closed engine refuses calls"
        );
        assert_eq!(engine.calls.load(Ordering::Relaxed), 0);
        Ok(())
    }
}
