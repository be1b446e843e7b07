//! One group commit on PostgreSQL: a batch's operations decided by the rules and written in one
//! transaction.
//!
//! 1. Take every key's advisory lock (`key_lock.rs`, ascending ids), which every draw of a
//!    token for the key in any process takes, then lock the rows of the keys that have one,
//!    in key order (`SELECT ... FOR UPDATE`), so two batches never wait on each other in a
//!    cycle. A key with no row gets its row from a plain `INSERT`; should a program that does
//!    not take the key's lock insert it meanwhile, the unique key fails that `INSERT`, and the
//!    batch rolls back and runs again.
//! 2. Read the server's clock and draw fencing tokens from the `tokens` sequence, after the
//!    locks are held. A token drawn then is above that of every earlier owner, also one whose
//!    row was inserted and removed since the batch looked.
//! 3. Decide each operation in order against the records as the batch has changed them so far;
//!    a group (`Work::Many`) is undone as a whole when one of its operations is refused.
//! 4. Write the rows that changed, in key order, and tell listeners in other processes about
//!    claims that ended (`pg_notify`); then commit, durably (`synchronous_commit = on`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::columns::{COLUMN_TYPES, Columns};
use super::error::query_error;
use super::key_lock;
use super::listen::encode;
use super::pool::Pool;
use super::row::{Loaded, to_row};
use super::session::Session;
use super::statements::Statements;
use crate::batch;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::notify::KeyEvents;
use crate::record::Record;
use crate::rules::queued::Queued;
use crate::rules::{Change, Context, Namespace};
use crate::stats::Tally;

/// How many times a batch runs again after a conflict or deadlock before its callers get the
/// error.
const ATTEMPTS: usize = 8;

/// One caller's request to a batch: one operation, or several all or nothing.
pub(crate) enum Work {
    One(Arc<dyn Queued>),
    Many(Vec<Arc<dyn Queued>>),
}

impl Work {
    pub(crate) fn weight(&self) -> usize {
        match self {
            Work::One(op) => batch::weight(1, op.payload_len()),
            Work::Many(ops) => {
                batch::weight(ops.len(), ops.iter().map(|op| op.payload_len()).sum())
            }
        }
    }
}

/// What the engine's calls share with the tasks on its runtime.
pub(crate) struct Shared {
    pub pool: Arc<Pool>,
    /// The engine's statements in its schema.
    pub sql: Statements,
    /// The LISTEN/NOTIFY channel of the schema.
    pub channel: String,
    /// The schema's start of every key's lock id (`key_lock.rs`).
    pub key_seed: u64,
    pub store_id: u64,
    /// The builder's clock, if it was given one; else the server's clock decides.
    pub clock: Option<Arc<dyn Clock>>,
    pub events: Arc<KeyEvents>,
    pub max_keys: Option<u64>,
    /// The records held, as last counted plus this process's commits since: what the key
    /// budget weighs.
    pub records: AtomicU64,
}

impl Shared {
    /// Counts `delta` records more (or fewer) held; never below zero.
    pub(crate) fn add_records(&self, delta: i64) {
        let _ = self
            .records
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_add_signed(delta))
            });
    }

    /// The builder's clock's time, if it was given one; `None` when the server's clock decides.
    pub(crate) fn test_now(&self) -> Option<u64> {
        self.clock.as_ref().map(|clock| clock.now_millis())
    }

    /// The time to decide by, given the server's time `server` as a statement read it: the
    /// builder's clock if it was given one, else `server`.
    pub(crate) fn time(&self, server: i64) -> u64 {
        self.test_now()
            .unwrap_or_else(|| u64::try_from(server).unwrap_or(0))
    }

    /// `Some(budget)` when `records + added` records fill the key budget.
    pub(crate) fn full(&self, added: i64) -> Option<u64> {
        let max_keys = self.max_keys?;
        let held = i128::from(self.records.load(Ordering::Acquire)) + i128::from(added);
        (held >= i128::from(max_keys)).then_some(max_keys)
    }
}

/// The LISTEN/NOTIFY channel of the schema named `schema`.
pub(crate) fn channel(schema: &str) -> String {
    format!("dedupe_{schema}")
}

/// The key under which [`KeyEvents`] tracks `key`: its namespace tag, then the key.
pub(crate) fn event_key(namespace: Namespace, key: &Key) -> Vec<u8> {
    let mut stored = Vec::with_capacity(key.as_bytes().len() + 1);
    stored.push(namespace.tag());
    stored.extend_from_slice(key.as_bytes());
    stored
}

/// What a batch answered.
pub(crate) struct Replies {
    /// One per work, in order: `Ok` once committed, or the refusal of a group, or the error.
    pub replies: Vec<Result<()>>,
    /// What the counters count, once committed.
    pub tallies: Vec<Tally>,
    /// Operations committed.
    pub ops: usize,
    /// Claims and marks of new keys that found their keys absent, and that found a row, when
    /// the batch tried new keys first (`fresh.rs`).
    pub fresh: (usize, usize),
}

/// Runs a batch in one transaction, again after a conflict or deadlock.
pub(crate) async fn run(shared: &Shared, session: &mut Session, works: &[Work]) -> Replies {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match attempt(shared, session, works).await {
            Ok(replies) => return replies,
            Err(Retry::Again(err)) => last = Some(err),
            Err(Retry::Fail(err)) => return failed(works, err),
        }
    }
    let err = last.unwrap_or(Error::CommitPanicked);
    failed(works, err)
}

pub(super) fn failed(works: &[Work], err: Error) -> Replies {
    Replies {
        replies: works.iter().map(|_| Err(err.clone())).collect(),
        tallies: Vec::new(),
        ops: 0,
        fresh: (0, 0),
    }
}

/// Why an attempt did not commit.
enum Retry {
    /// Another transaction got in the way; running the batch again will do.
    Again(Error),
    Fail(Error),
}

fn retry_or_fail(action: &'static str) -> impl Fn(tokio_postgres::Error) -> Retry {
    move |err| {
        let again = matches!(
            err.code(),
            Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::UNIQUE_VIOLATION
        );
        let err = query_error(action, err);
        if again {
            Retry::Again(err)
        } else {
            Retry::Fail(err)
        }
    }
}

/// One key's row during a batch.
struct Slot {
    /// What the database held when the batch locked it.
    held: Loaded,
    /// The record now, as the batch has changed it.
    current: Option<Record>,
    /// Whether the batch changed it.
    touched: bool,
    /// Whether it was a claim in progress when the batch found it.
    was_in_progress: bool,
    /// The record is damaged and an operation was refused on it: it stays as it is.
    damaged: Option<String>,
}

type RowKey = (i16, Vec<u8>);

async fn attempt(
    shared: &Shared,
    client: &mut Session,
    works: &[Work],
) -> std::result::Result<Replies, Retry> {
    let ops: Vec<&Arc<dyn Queued>> = works
        .iter()
        .flat_map(|work| match work {
            Work::One(op) => std::slice::from_ref(op),
            Work::Many(ops) => ops.as_slice(),
        })
        .collect();
    let begun = begin(shared, client, &ops).await;
    let (mut slots, now, tokens) = match begun {
        Ok(begun) => begun,
        Err(retry) => {
            // Leave no transaction open on a connection that goes back to the pool.
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(retry);
        }
    };
    let mut tokens = tokens.into_iter();
    let mut next_token = tokens.next().unwrap_or(0);
    let mut replies = Vec::with_capacity(works.len());
    let mut tallies = Vec::with_capacity(ops.len());
    let mut added = 0i64;
    for work in works {
        let group: &[Arc<dyn Queued>] = match work {
            Work::One(op) => std::slice::from_ref(op),
            Work::Many(ops) => ops.as_slice(),
        };
        // A group is undone as a whole on a refusal: keep what it may change.
        let saved: Vec<(RowKey, Option<Record>, bool)> = if group.len() > 1 {
            group
                .iter()
                .filter_map(|op| {
                    let key = row_key(op.as_ref());
                    let slot = slots.get(&key)?;
                    Some((key, slot.current.clone(), slot.touched))
                })
                .collect()
        } else {
            Vec::new()
        };
        let (saved_token, saved_added, saved_tallies) = (next_token, added, tallies.len());
        let mut refused = None;
        for op in group {
            let key = row_key(op.as_ref());
            let Some(slot) = slots.get_mut(&key) else {
                continue;
            };
            let effect = match (&slot.held, slot.touched) {
                (Loaded::Damaged(reason), false) => {
                    if group.len() > 1 {
                        // A group is refused at a damaged record, whatever its operations.
                        refused = Some(Error::Corrupt {
                            key: op.key().clone(),
                            reason: reason.clone(),
                        });
                        break;
                    }
                    let effect = op.damaged(reason);
                    if effect.change == Change::Keep {
                        slot.damaged = Some(reason.clone());
                    }
                    effect
                }
                _ => {
                    let ctx = Context {
                        key: op.key(),
                        now,
                        next_token,
                        store_id: shared.store_id,
                        full: shared.full(added),
                    };
                    op.apply(slot.current.as_ref(), &ctx)
                }
            };
            if let Some(err) = effect.refused.clone()
                && group.len() > 1
            {
                refused = Some(err);
                break;
            }
            if effect.issued_token {
                next_token = tokens.next().unwrap_or(next_token.saturating_add(1));
            }
            let existed = slot.current.is_some() || matches!(slot.held, Loaded::Damaged(_));
            match effect.change {
                Change::Keep => {}
                Change::Put(record) => {
                    added += i64::from(!existed);
                    slot.current = Some(record);
                    slot.touched = true;
                }
                Change::Delete => {
                    added -= i64::from(existed);
                    slot.current = None;
                    slot.touched = true;
                }
            }
            tallies.push(effect.tally);
        }
        match refused {
            Some(err) => {
                for (key, current, touched) in saved.into_iter().rev() {
                    if let Some(slot) = slots.get_mut(&key) {
                        slot.current = current;
                        slot.touched = touched;
                    }
                }
                next_token = saved_token;
                added = saved_added;
                tallies.truncate(saved_tallies);
                replies.push(Err(err));
            }
            None => replies.push(Ok(())),
        }
    }
    let ended = match finish(shared, client, &slots).await {
        Ok(ended) => ended,
        Err(retry) => {
            // A statement that failed before `COMMIT` went out leaves the transaction open.
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(retry);
        }
    };
    shared.add_records(added);
    for key in ended {
        shared.events.changed(&key);
    }
    let ops = tallies.len();
    Ok(Replies {
        replies,
        tallies,
        ops,
        fresh: (0, 0),
    })
}

fn row_key(op: &dyn Queued) -> RowKey {
    (super::row::ns(op.namespace()), op.key().as_bytes().to_vec())
}

/// Begins the batch's transaction, takes the lock of every key the operations touch
/// (`key_lock.rs`), locks their rows (in key order) and reads them, then reads the clock and
/// draws `ops.len()` fencing tokens: four statements sent at once, run by the server in that
/// order.
async fn begin(
    shared: &Shared,
    client: &mut Session,
    ops: &[&Arc<dyn Queued>],
) -> std::result::Result<(BTreeMap<RowKey, Slot>, u64, Vec<u64>), Retry> {
    let mut slots: BTreeMap<RowKey, Slot> = BTreeMap::new();
    for op in ops {
        slots.entry(row_key(op.as_ref())).or_insert(Slot {
            held: Loaded::Absent,
            current: None,
            touched: false,
            was_in_progress: false,
            damaged: None,
        });
    }
    let namespaces: Vec<i16> = slots.keys().map(|(ns, _)| *ns).collect();
    let keys: Vec<&[u8]> = slots.keys().map(|(_, key)| key.as_slice()).collect();
    let count = i64::try_from(ops.len()).unwrap_or(i64::MAX);
    let lock_ids = key_lock::ids(
        shared.key_seed,
        slots.keys().map(|(ns, key)| (*ns, key.as_slice())),
    );
    let lock_keys = client
        .statement(&shared.sql.lock_keys, &[Type::INT8_ARRAY])
        .await
        .map_err(retry_or_fail("lock keys"))?;
    let lock = client
        .statement(&shared.sql.lock, &[Type::INT2_ARRAY, Type::BYTEA_ARRAY])
        .await
        .map_err(retry_or_fail("lock keys"))?;
    let draw = client
        .statement(&shared.sql.draw, &[Type::INT8])
        .await
        .map_err(retry_or_fail("draw fencing tokens"))?;
    let client: &Client = client;
    let lock_params: [&(dyn ToSql + Sync); 2] = [&namespaces, &keys];
    let draw_params: [&(dyn ToSql + Sync); 1] = [&count];
    let lock_keys_params: [&(dyn ToSql + Sync); 1] = [&lock_ids];
    let (begun, locked, rows, clock) = tokio::join!(
        client.batch_execute("BEGIN"),
        client.query_one(&lock_keys, &lock_keys_params),
        client.query(&lock, &lock_params),
        client.query_one(&draw, &draw_params),
    );
    begun.map_err(retry_or_fail("begin a transaction"))?;
    locked.map_err(retry_or_fail("lock keys"))?;
    let rows = rows.map_err(retry_or_fail("lock keys"))?;
    let clock = clock.map_err(retry_or_fail("draw fencing tokens"))?;
    for row in &rows {
        let ns: i16 = row
            .try_get("ns")
            .map_err(|err| Retry::Fail(query_error("lock keys", err)))?;
        let key: Vec<u8> = row
            .try_get("key")
            .map_err(|err| Retry::Fail(query_error("lock keys", err)))?;
        if let Some(slot) = slots.get_mut(&(ns, key)) {
            slot.held = Loaded::of(row);
            if let Loaded::Found(record) = &slot.held {
                slot.current = Some(record.clone());
                slot.was_in_progress = record.is_in_progress();
            }
        }
    }
    let fail = |err| Retry::Fail(query_error("draw fencing tokens", err));
    let server_now: i64 = clock.try_get(0).map_err(fail)?;
    let tokens: Vec<i64> = clock.try_get(1).map_err(fail)?;
    Ok((
        slots,
        shared.time(server_now),
        tokens.into_iter().map(|t| t.max(0) as u64).collect(),
    ))
}

/// Writes the rows the batch changed and commits: new rows, changed rows, removed rows and the
/// notifications of claims that ended, each one statement for the whole batch, then `COMMIT`,
/// all sent at once. New rows are inserted without `ON CONFLICT`: a key another process
/// inserted since the batch looked fails the insert, the server then rolls the transaction
/// back at `COMMIT`, and the batch runs again. Answers the event keys of claims that ended.
async fn finish(
    shared: &Shared,
    client: &mut Session,
    slots: &BTreeMap<RowKey, Slot>,
) -> std::result::Result<Vec<Vec<u8>>, Retry> {
    let mut inserts = Columns::default();
    let mut updates = Columns::default();
    let mut deletes: (Vec<i16>, Vec<&[u8]>) = (Vec::new(), Vec::new());
    let mut ended = Vec::new();
    for ((ns, key), slot) in slots {
        if !slot.touched || slot.damaged.is_some() {
            continue;
        }
        let existed = !matches!(slot.held, Loaded::Absent);
        match &slot.current {
            Some(record) => {
                let row = to_row(record).map_err(|err| {
                    Retry::Fail(Error::Corrupt {
                        key: Key::new(key.clone()),
                        reason: err.reason,
                    })
                })?;
                let columns = if existed { &mut updates } else { &mut inserts };
                columns.push(*ns, key, row);
            }
            None if existed => {
                deletes.0.push(*ns);
                deletes.1.push(key);
            }
            None => {}
        }
        let still_in_progress = slot.current.as_ref().is_some_and(Record::is_in_progress);
        if slot.was_in_progress && !still_in_progress {
            let mut event = Vec::with_capacity(key.len() + 1);
            event.push(u8::try_from(*ns).unwrap_or(0));
            event.extend_from_slice(key);
            ended.push(event);
        }
    }
    let notify_sql = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload";
    let payloads: Vec<String> = ended.iter().map(|key| encode(key)).collect();
    // Each statement is prepared once per connection, before the batch's statements go out.
    let insert = prepare(
        client,
        &shared.sql.insert,
        !inserts.is_empty(),
        &COLUMN_TYPES,
    )
    .await
    .map_err(retry_or_fail("insert keys"))?;
    let update = prepare(
        client,
        &shared.sql.update,
        !updates.is_empty(),
        &COLUMN_TYPES,
    )
    .await
    .map_err(retry_or_fail("update keys"))?;
    let delete_types = [Type::INT2_ARRAY, Type::BYTEA_ARRAY];
    let delete = prepare(
        client,
        &shared.sql.delete,
        !deletes.0.is_empty(),
        &delete_types,
    )
    .await
    .map_err(retry_or_fail("remove keys"))?;
    let notify_types = [Type::TEXT, Type::TEXT_ARRAY];
    let notify = prepare(client, notify_sql, !payloads.is_empty(), &notify_types)
        .await
        .map_err(retry_or_fail("notify waiters"))?;
    let client: &Client = client;
    let (inserted, updated, deleted, notified, committed) = tokio::join!(
        async {
            match &insert {
                Some(insert) => client.execute(insert, &inserts.params()).await,
                None => Ok(0),
            }
        },
        async {
            match &update {
                Some(update) => client.execute(update, &updates.params()).await,
                None => Ok(0),
            }
        },
        async {
            match &delete {
                Some(delete) => client.execute(delete, &[&deletes.0, &deletes.1]).await,
                None => Ok(0),
            }
        },
        async {
            match &notify {
                Some(notify) => client.query(notify, &[&shared.channel, &payloads]).await,
                None => Ok(Vec::new()),
            }
        },
        client.batch_execute("COMMIT"),
    );
    // A failed statement aborts the transaction, and the server answers its `COMMIT` with a
    // rollback: nothing of the batch is stored.
    inserted.map_err(retry_or_fail("insert keys"))?;
    updated.map_err(retry_or_fail("update keys"))?;
    deleted.map_err(retry_or_fail("remove keys"))?;
    notified.map_err(retry_or_fail("notify waiters"))?;
    committed.map_err(|err| Retry::Fail(query_error("commit", err)))?;
    Ok(ended)
}

/// `sql` prepared on the batch's connection, if the batch `needs` it.
async fn prepare(
    client: &mut Session,
    sql: &str,
    needed: bool,
    types: &[Type],
) -> std::result::Result<Option<Statement>, tokio_postgres::Error> {
    if !needed {
        return Ok(None);
    }
    client.statement(sql, types).await.map(Some)
}
