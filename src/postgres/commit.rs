//! One group commit on PostgreSQL: a batch's operations decided by the rules and written in one
//! transaction.
//!
//! 1. Lock the rows of every key the batch touches, in key order (`SELECT ... FOR UPDATE`), so
//!    two batches never wait on each other in a cycle. A key with no row is not locked; its
//!    row is inserted with `ON CONFLICT DO NOTHING`, and a conflict (another process inserted
//!    it meanwhile) rolls the batch back and runs it again.
//! 2. Read the server's clock and draw fencing tokens from the `tokens` sequence, after the
//!    locks are held: a token drawn then is above that of every owner the batch can see, in any
//!    process.
//! 3. Decide each operation in order against the records as the batch has changed them so far;
//!    a group (`Work::Many`) is undone as a whole when one of its operations is refused.
//! 4. Write the rows that changed, in key order, and tell listeners in other processes about
//!    claims that ended (`pg_notify`); then commit, durably (`synchronous_commit = on`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::Transaction;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use super::clock::NOW_MILLIS;
use super::error::query_error;
use super::pool::Pool;
use super::row::{Loaded, RECORD_COLUMNS, to_row};
use crate::batch;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::notify::KeyEvents;
use crate::record::Record;
use crate::rules::queued::Queued;
use crate::rules::{Change, Context, Namespace};
use crate::stats::Tally;

/// The types of [`RecordRow::params`](super::row::RecordRow::params), in its order.
const ROW_TYPES: [Type; 15] = [
    Type::INT2,
    Type::INT8,
    Type::INT8,
    Type::BYTEA,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::BYTEA,
    Type::INT8,
    Type::INT8,
    Type::BYTEA,
    Type::INT8,
    Type::INT8,
];

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
    /// The schema, quoted for statements.
    pub schema: String,
    /// The LISTEN/NOTIFY channel of the schema.
    pub channel: String,
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
}

/// Runs a batch, again after a conflict or deadlock, and answers every work in it.
pub(crate) async fn run(shared: &Shared, works: Vec<Work>) -> Replies {
    let mut last = None;
    for _ in 0..ATTEMPTS {
        match attempt(shared, &works).await {
            Ok(replies) => return replies,
            Err(Retry::Again(err)) => last = Some(err),
            Err(Retry::Fail(err)) => return failed(&works, err),
        }
    }
    let err = last.unwrap_or(Error::CommitPanicked);
    failed(&works, err)
}

fn failed(works: &[Work], err: Error) -> Replies {
    Replies {
        replies: works.iter().map(|_| Err(err.clone())).collect(),
        tallies: Vec::new(),
        ops: 0,
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

async fn attempt(shared: &Shared, works: &[Work]) -> std::result::Result<Replies, Retry> {
    let mut client = shared.pool.get().await.map_err(Retry::Fail)?;
    let tx = client
        .client_mut()
        .transaction()
        .await
        .map_err(retry_or_fail("begin a transaction"))?;
    let ops: Vec<&Arc<dyn Queued>> = works
        .iter()
        .flat_map(|work| match work {
            Work::One(op) => std::slice::from_ref(op),
            Work::Many(ops) => ops.as_slice(),
        })
        .collect();
    let mut slots = lock(shared, &tx, &ops).await?;
    let (now, tokens) = clock_and_tokens(shared, &tx, ops.len()).await?;
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
    let ended = write(shared, &tx, &slots).await?;
    tx.commit()
        .await
        .map_err(|err| Retry::Fail(query_error("commit", err)))?;
    shared
        .records
        .fetch_add(added.max(0) as u64, Ordering::AcqRel);
    if added < 0 {
        shared
            .records
            .fetch_sub(added.unsigned_abs(), Ordering::AcqRel);
    }
    for key in ended {
        shared.events.changed(&key);
    }
    let ops = tallies.len();
    Ok(Replies {
        replies,
        tallies,
        ops,
    })
}

fn row_key(op: &dyn Queued) -> RowKey {
    (super::row::ns(op.namespace()), op.key().as_bytes().to_vec())
}

/// Locks the rows of every key the operations touch, in key order, and reads them.
async fn lock(
    shared: &Shared,
    tx: &Transaction<'_>,
    ops: &[&Arc<dyn Queued>],
) -> std::result::Result<BTreeMap<RowKey, Slot>, Retry> {
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
    let sql = format!(
        "SELECT ns, key, {RECORD_COLUMNS} FROM {}.records \
         WHERE (ns, key) IN (SELECT * FROM unnest($1::smallint[], $2::bytea[])) \
         ORDER BY ns, key FOR UPDATE",
        shared.schema
    );
    let rows = tx
        .query_typed(
            &sql,
            &[(&namespaces, Type::INT2_ARRAY), (&keys, Type::BYTEA_ARRAY)],
        )
        .await
        .map_err(retry_or_fail("lock keys"))?;
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
    Ok(slots)
}

/// The time to decide by, and `count` fresh fencing tokens in increasing order.
async fn clock_and_tokens(
    shared: &Shared,
    tx: &Transaction<'_>,
    count: usize,
) -> std::result::Result<(u64, Vec<u64>), Retry> {
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    let sql = format!(
        "SELECT {NOW_MILLIS}, array(SELECT nextval('{}.tokens') FROM generate_series(1, $1))",
        shared.schema
    );
    let row = tx
        .query_typed_one(&sql, &[(&count, Type::INT8)])
        .await
        .map_err(retry_or_fail("draw fencing tokens"))?;
    let fail = |err| Retry::Fail(query_error("draw fencing tokens", err));
    let server_now: i64 = row.try_get(0).map_err(fail)?;
    let tokens: Vec<i64> = row.try_get(1).map_err(fail)?;
    let now = match &shared.clock {
        Some(clock) => clock.now_millis(),
        None => u64::try_from(server_now).unwrap_or(0),
    };
    Ok((now, tokens.into_iter().map(|t| t.max(0) as u64).collect()))
}

/// Writes the rows the batch changed, in key order; answers the event keys of claims that
/// ended, whose waiters are told.
async fn write(
    shared: &Shared,
    tx: &Transaction<'_>,
    slots: &BTreeMap<RowKey, Slot>,
) -> std::result::Result<Vec<Vec<u8>>, Retry> {
    let insert = format!(
        "INSERT INTO {}.records (ns, key, {RECORD_COLUMNS}) VALUES \
         ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
         ON CONFLICT DO NOTHING",
        shared.schema
    );
    let update = format!(
        "UPDATE {}.records SET ({RECORD_COLUMNS}) = \
         ($3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
         WHERE ns = $1 AND key = $2",
        shared.schema
    );
    let delete = format!(
        "DELETE FROM {}.records WHERE ns = $1 AND key = $2",
        shared.schema
    );
    let mut ended = Vec::new();
    for ((ns, key), slot) in slots {
        if !slot.touched || slot.damaged.is_some() {
            continue;
        }
        let existed = !matches!(slot.held, Loaded::Absent);
        let fail = |reason: String| {
            Retry::Fail(Error::Corrupt {
                key: Key::new(key.clone()),
                reason,
            })
        };
        match &slot.current {
            Some(record) => {
                let values = to_row(record).map_err(|err| fail(err.reason))?;
                let mut params: Vec<(&(dyn ToSql + Sync), Type)> =
                    vec![(ns, Type::INT2), (key, Type::BYTEA)];
                params.extend(values.params().into_iter().zip(ROW_TYPES));
                let sql = if existed { &update } else { &insert };
                let written = tx
                    .execute_typed(sql.as_str(), &params)
                    .await
                    .map_err(retry_or_fail("write a key"))?;
                if written == 0 {
                    // Another process inserted the key since the batch looked: run it again.
                    return Err(Retry::Again(Error::Database {
                        action: "write a key",
                        kind: crate::error::DatabaseErrorKind::Other,
                        message: "another process wrote the key at the same time".to_string(),
                        source: None,
                    }));
                }
            }
            None if existed => {
                tx.execute_typed(delete.as_str(), &[(ns, Type::INT2), (key, Type::BYTEA)])
                    .await
                    .map_err(retry_or_fail("remove a key"))?;
            }
            None => {}
        }
        let still_in_progress = slot.current.as_ref().is_some_and(Record::is_in_progress);
        if slot.was_in_progress && !still_in_progress {
            let mut event = Vec::with_capacity(key.len() + 1);
            event.push(u8::try_from(*ns).unwrap_or(0));
            event.extend_from_slice(key);
            tx.execute_typed(
                "SELECT pg_notify($1, $2)",
                &[
                    (&shared.channel, Type::TEXT),
                    (&super::listen::encode(&event), Type::TEXT),
                ],
            )
            .await
            .map_err(retry_or_fail("notify waiters"))?;
            ended.push(event);
        }
    }
    Ok(ended)
}
