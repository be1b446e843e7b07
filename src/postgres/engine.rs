//! The PostgreSQL engine under a [`Store`](crate::Store): the same rules, over a table that
//! any number of processes and hosts share.
//!
//! - Reads that change nothing (a replay, a live claim, a mismatch, a duplicate mark) are one
//!   `SELECT`, with no lock held past it.
//! - Writes go through group commit (`batch.rs`), one batcher per shard of keys so that
//!   several transactions run at once: a batch locks its keys' rows in key order, draws fencing
//!   tokens from the `tokens` sequence after the locks are held, decides every operation with
//!   the rules, writes the rows and commits (`commit.rs`).
//! - Leases and expiry go by the database's clock, so every host agrees on them, unless the
//!   builder was given a clock (tests).
//! - A waiter in `claim_or_wait` wakes when any process completes or releases the key it waits
//!   for (`listen.rs`, LISTEN/NOTIFY), and polls once a second should a notification be lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio_postgres::types::Type;

use super::clock::NOW_MILLIS;
use super::commit::{self, Shared, Work};
use super::error::query_error;
use super::listen::Listener;
use super::pool::{Pool, Session};
use super::row::{Loaded, RECORD_COLUMNS, ns, to_row};
use super::runtime::Runtime;
use super::schema::open_schema;
use crate::batch::Batcher;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::notify::KeyEvents;
use crate::record::Record;
use crate::rules::queued::Pending;
use crate::rules::{self, Change, Context, Namespace, Rule};
use crate::stats::Counters;

/// How many batchers (and so transactions at once) the engine runs; keys are spread over them
/// by hash. One would serialise every commit of the process behind one round trip to the
/// server; a few let the server group their WAL flushes.
const SHARDS: usize = 4;

/// Where the engine connects and how.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub url: String,
    pub schema: String,
    pub connections: usize,
}

pub(crate) struct Engine {
    /// Where the connections' drivers and the listener run; calls run on their callers'
    /// threads (`runtime::block_on`).
    _runtime: Runtime,
    shared: Arc<Shared>,
    pub config: Config,
    pub counters: Counters,
    batchers: Vec<Batcher<Work, Result<()>>>,
    listener: Listener,
    closed: AtomicBool,
}

impl Engine {
    /// Connects, creates the schema if needed and starts listening for changes.
    pub(crate) fn open(
        settings: Settings,
        config: Config,
        clock: Option<Arc<dyn Clock>>,
    ) -> Result<Engine> {
        let runtime = Runtime::new()?;
        let pool = Arc::new(Pool::new(&settings.url, settings.connections)?);
        pool.on_runtime(runtime.handle().clone());
        let schema = settings.schema.clone();
        let info = runtime.call({
            let pool = pool.clone();
            async move {
                let mut client = pool.get().await?;
                open_schema(client.client_mut(), &schema).await
            }
        })?;
        let events = Arc::new(KeyEvents::new());
        let channel = commit::channel(&settings.schema);
        let listener = Listener::start(&runtime, pool.clone(), channel.clone(), events.clone());
        let shared = Arc::new(Shared {
            pool,
            schema: info.quoted,
            channel,
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
            batchers: (0..SHARDS).map(|_| Batcher::new(|_| true)).collect(),
            listener,
            closed: AtomicBool::new(false),
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
            .clock
            .as_ref()
            .map(|clock| i64::try_from(clock.now_millis()).unwrap_or(i64::MAX))
    }

    pub(crate) fn now(&self) -> u64 {
        match &self.shared.clock {
            Some(clock) => clock.now_millis(),
            // A failed read of the server's clock falls back to this host's: `now` only
            // serves reads here (`get`, `list`, the waits); every decision that writes reads
            // the server's clock in its own transaction.
            None => self
                .database_now()
                .unwrap_or_else(|_| crate::clock::SystemClock.now_millis()),
        }
    }

    fn database_now(&self) -> Result<u64> {
        self.call(async |_shared: &Shared, client: &mut Session| {
            let row = client
                .query_one(&format!("SELECT {NOW_MILLIS}"), &[])
                .await
                .map_err(|err| query_error("read the server's clock", err))?;
            let now: i64 = row
                .try_get(0)
                .map_err(|err| query_error("read the server's clock", err))?;
            Ok(u64::try_from(now).unwrap_or(0))
        })
    }

    /// A database has no file of the store's.
    pub(crate) fn path(&self) -> Option<&std::path::Path> {
        None
    }

    pub(crate) fn store_id(&self) -> u64 {
        self.shared.store_id
    }

    /// Answers `rule` on `key` from one `SELECT` when it would change nothing, and a new key
    /// on a shard with no commit running from one `INSERT` more (see [`insert_new`]). `None`
    /// means it must go to a commit.
    ///
    /// [`insert_new`]: Self::insert_new
    fn peek<R: Rule>(&self, key: &Key, rule: &R) -> Result<Option<Result<R::Answer>>> {
        let (loaded, now) = self.load(rule.namespace(), key)?;
        let absent = matches!(loaded, Loaded::Absent);
        let decision = match loaded {
            Loaded::Damaged(reason) => rule.damaged(key, &reason),
            Loaded::Found(record) => self.decide_read(rule, key, Some(&record), now),
            Loaded::Absent => self.decide_read(rule, key, None, now),
        };
        let answer = match decision.change {
            Change::Keep => decision.answer,
            Change::Put(record)
                if absent && decision.issued_token && self.batchers[self.shard(key)].is_idle() =>
            {
                let (Some(token), Ok(answer)) = (
                    self.insert_new(rule.namespace(), key, &record)?,
                    decision.answer,
                ) else {
                    // Another process stored the key meanwhile: decide again in a commit.
                    return Ok(None);
                };
                self.counters.wrote(1);
                Ok(R::with_token(answer, token))
            }
            _ => return Ok(None),
        };
        self.counters.count(rules::tally::<R>(&answer));
        Ok(Some(answer))
    }

    /// Stores the record of a key that had none, in one statement in autocommit, its fencing
    /// token drawn by that statement; the token, or `None` if the key has a row by then.
    ///
    /// Drawing the token in the `INSERT` keeps it above every earlier owner's: a row inserted
    /// and removed before the statement ran drew its token before, and one inserted by a
    /// transaction still running makes this insert wait for it and then do nothing. For a
    /// lone writer this costs one round trip where a commit costs two; under load the shard's
    /// batch groups the writes instead.
    fn insert_new(&self, namespace: Namespace, key: &Key, record: &Record) -> Result<Option<u64>> {
        let row = to_row(record).map_err(|err| Error::Corrupt {
            key: key.clone(),
            reason: err.reason,
        })?;
        let key_bytes = key.as_bytes().to_vec();
        let inserted = self.call(async move |shared: &Shared, client: &mut Session| {
            let sql = format!(
                "INSERT INTO {s}.records (ns, key, {RECORD_COLUMNS}) VALUES ($1, $2, $3, \
                 nextval('{s}.tokens'), $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                 $16) ON CONFLICT DO NOTHING RETURNING fencing_token",
                s = shared.schema
            );
            let row = client
                .query_prepared(
                    &sql,
                    &[
                        (&ns(namespace), Type::INT2),
                        (&key_bytes, Type::BYTEA),
                        (&row.state, Type::INT2),
                        (&row.attempt, Type::INT8),
                        (&row.fingerprint, Type::BYTEA),
                        (&row.expires_at, Type::INT8),
                        (&row.claimed_at, Type::INT8),
                        (&row.lease_until, Type::INT8),
                        (&row.claim_ttl, Type::INT8),
                        (&row.checkpoint_step, Type::TEXT),
                        (&row.checkpoint_state, Type::BYTEA),
                        (&row.checkpoint_at, Type::INT8),
                        (&row.completed_at, Type::INT8),
                        (&row.response, Type::BYTEA),
                        (&row.seq_mark, Type::INT8),
                        (&row.seq_updated_at, Type::INT8),
                    ],
                )
                .await
                .map_err(|err| query_error("insert a key", err))?;
            row.first()
                .map(|row| row.try_get::<_, i64>(0))
                .transpose()
                .map_err(|err| query_error("insert a key", err))
        })?;
        if inserted.is_some() {
            self.shared.add_records(1);
        }
        Ok(inserted.map(|token| token.max(0) as u64))
    }

    fn decide_read<R: Rule>(
        &self,
        rule: &R,
        key: &Key,
        current: Option<&Record>,
        now: u64,
    ) -> rules::Decision<R::Answer> {
        let ctx = Context {
            key,
            now,
            next_token: 0,
            store_id: self.shared.store_id,
            full: self.shared.full(0),
        };
        rules::apply(rule, current, &ctx)
    }

    pub(crate) fn decide<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        match self.peek(&key, &rule)? {
            Some(answer) => answer,
            None => self.one(key, rule),
        }
    }

    pub(crate) fn one<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        let shard = self.shard(&key);
        let pending = Arc::new(Pending::new(key, rule));
        self.submit(shard, Work::One(pending.clone()))?;
        pending.take()
    }

    pub(crate) fn many<R: Rule>(&self, ops: Vec<(Key, R)>) -> Result<Vec<R::Answer>> {
        let Some((first, _)) = ops.first() else {
            return Ok(Vec::new());
        };
        let shard = self.shard(first);
        let (pending, queued) = Pending::group(ops);
        self.submit(shard, Work::Many(queued))?;
        pending.iter().map(|pending| pending.take()).collect()
    }

    fn shard(&self, key: &Key) -> usize {
        crc32fast::hash(key.as_bytes()) as usize % SHARDS
    }

    fn submit(&self, shard: usize, work: Work) -> Result<()> {
        self.check_open()?;
        let weight = work.weight();
        self.batchers[shard].submit(
            work,
            weight,
            false,
            |works, _| {
                let count = works.len();
                let replies = self.call(async move |shared: &Shared, session: &mut Session| {
                    Ok(commit::run(shared, session, works).await)
                });
                if let Ok(replies) = &replies
                    && let Some(Err(err)) = replies.replies.first()
                {
                    let _ = self.shared.pool.checked::<()>(Err(err.clone()));
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

    /// One key's stored record and the time to judge it by, from one `SELECT`.
    fn load(&self, namespace: Namespace, key: &Key) -> Result<(Loaded, u64)> {
        let key = key.as_bytes().to_vec();
        let clock = self.shared.clock.clone();
        self.call(async move |shared: &Shared, client: &mut Session| {
            let sql = format!(
                "SELECT {NOW_MILLIS} AS now, {RECORD_COLUMNS} FROM (SELECT 1) AS one \
                 LEFT JOIN {}.records ON ns = $1 AND key = $2",
                shared.schema
            );
            let rows = client
                .query_prepared(&sql, &[(&ns(namespace), Type::INT2), (&key, Type::BYTEA)])
                .await
                .map_err(|err| query_error("read a key", err))?;
            let Some(row) = rows.first() else {
                return Err(Error::Database {
                    action: "read a key",
                    kind: crate::error::DatabaseErrorKind::Other,
                    message: "the server answered no row".to_string(),
                    source: None,
                });
            };
            let now = match clock {
                Some(clock) => clock.now_millis(),
                None => {
                    let now: i64 = row
                        .try_get("now")
                        .map_err(|err| query_error("read a key", err))?;
                    u64::try_from(now).unwrap_or(0)
                }
            };
            let state: Option<i16> = row
                .try_get("state")
                .map_err(|err| query_error("read a key", err))?;
            if state.is_none() {
                return Ok((Loaded::Absent, now));
            }
            Ok((Loaded::of(row), now))
        })
    }

    /// The record of `key` if it is live by the time read with it, in one `SELECT`.
    pub(crate) fn get_live(&self, namespace: Namespace, key: &Key) -> Result<Option<Record>> {
        let (loaded, now) = self.load(namespace, key)?;
        match loaded {
            Loaded::Absent => Ok(None),
            Loaded::Found(record) => Ok(Some(record).filter(|record| record.is_live(now))),
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
            let sql = format!(
                "DELETE FROM {s}.records WHERE (ns, key) IN (SELECT ns, key FROM {s}.records \
                 WHERE expires_at <= COALESCE($2, {NOW_MILLIS}) ORDER BY expires_at LIMIT $1 \
                 FOR UPDATE SKIP LOCKED)",
                s = shared.schema
            );
            let removed = client
                .execute_typed(&sql, &[(&limit_sql, Type::INT8), (&now, Type::INT8)])
                .await
                .map_err(|err| query_error("sweep due keys", err))?;
            Ok(removed as usize)
        })?;
        self.counters.swept(removed);
        crate::observe::swept(removed, removed >= limit);
        if removed > 0 {
            self.shared.events.changed_all();
            // Other processes add keys too: with a key budget, count them all again.
            if self.config.max_keys.is_some() {
                self.refresh_records()?;
            }
        }
        Ok((removed, removed >= limit))
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
        self.shared
            .events
            .wait(&commit::event_key(Namespace::Idempotency, key), seen, until)
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
