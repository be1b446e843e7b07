//! A batch's new keys stored by one `INSERT` in autocommit, before the batch's transaction.
//!
//! While claims and marks are finding their keys absent (`freshness.rs`), most of a busy
//! batch is new keys. Rather than lock, read, draw tokens and write in a transaction
//! of two round trips, one statement inserts every such key that still has no row, drawing
//! each token and reading the server's clock itself, as a lone new key's `INSERT` does
//! (`peek.rs`): one round trip and one WAL flush for the lot. What it did not insert (a key
//! that has a row by then, and every other operation) goes on to the batch's transaction,
//! except the calls on keys that had a row which one read with no lock answers, as it would
//! answer them alone (a replay, a claim in progress).

use std::collections::HashSet;
use std::sync::Arc;

use tokio_postgres::types::{ToSql, Type};

use super::columns::{COLUMN_TYPES, Columns};
use super::commit::{self, Replies, Shared, Work};
use super::error::query_error;
use super::key_lock;
use super::row::{Loaded, RowError, ns, to_row};
use super::session::Session;
use crate::error::{Error, Result};
use crate::record::Record;
use crate::rules::queued::Queued;
use crate::rules::{Change, Context};
use crate::stats::Tally;

/// What the `INSERT` stored: which works it answered, and what the counters count for them.
pub(super) struct Stored {
    /// One per work of the batch: whether it is answered.
    pub answered: Vec<bool>,
    pub tallies: Vec<Tally>,
    /// Candidates that found their key absent, and that found it with a row.
    pub absent: usize,
    pub present: usize,
}

/// Runs a batch and answers every work in it: first, when `fresh_first`, the new keys by one
/// `INSERT` (below), then the rest in a transaction, again after a conflict or deadlock.
pub(super) async fn run(
    shared: &Shared,
    session: &mut Session,
    works: Vec<Work>,
    fresh_first: bool,
) -> Replies {
    if !fresh_first {
        return commit::run(shared, session, &works).await;
    }
    let stored = match insert(shared, session, &works).await {
        Ok(stored) => stored,
        Err(err) => return commit::failed(&works, err),
    };
    let mut slots: Vec<Result<()>> = Vec::with_capacity(works.len());
    let (mut indexes, mut rest) = (Vec::new(), Vec::new());
    for (index, work) in works.into_iter().enumerate() {
        slots.push(Ok(()));
        if !stored.answered[index] {
            indexes.push(index);
            rest.push(work);
        }
    }
    let mut replies = Replies {
        replies: Vec::new(),
        tallies: stored.tallies,
        ops: slots.len() - rest.len(),
        fresh: (stored.absent, stored.present),
    };
    if !rest.is_empty() {
        let others = commit::run(shared, session, &rest).await;
        for (index, reply) in indexes.into_iter().zip(others.replies) {
            slots[index] = reply;
        }
        replies.tallies.extend(others.tallies);
        replies.ops += others.ops;
    }
    replies.replies = slots;
    replies
}

/// Inserts the new keys of `works` that have no row (see the module's docs). A work is a
/// candidate when it is one operation that creates a record on an absent key (a claim, a
/// mark), the first of the batch on its key; each is decided by the rules at `origin` and
/// its times moved to the server's clock by the statement, then decided again at the time and
/// token the statement answered, which leaves its answer.
pub(super) async fn insert(
    shared: &Shared,
    client: &mut Session,
    works: &[Work],
) -> Result<Stored> {
    let origin = shared.test_now().unwrap_or(0);
    let mut seen: HashSet<(i16, &[u8])> = HashSet::new();
    let mut candidates: Vec<(usize, &Arc<dyn Queued>, Record)> = Vec::new();
    for (index, work) in works.iter().enumerate() {
        let Work::One(op) = work else {
            continue;
        };
        let row_key = (ns(op.namespace()), op.key().as_bytes());
        if !op.creates() || !seen.insert(row_key) {
            continue;
        }
        let ctx = Context {
            key: op.key(),
            now: origin,
            next_token: 0,
            store_id: shared.store_id,
            full: None,
        };
        let effect = op.apply(None, &ctx);
        if let (Change::Put(record), true) = (effect.change, effect.issued_token) {
            candidates.push((index, op, record));
        }
    }
    let mut stored = Stored {
        answered: vec![false; works.len()],
        tallies: Vec::new(),
        absent: 0,
        present: 0,
    };
    if candidates.is_empty() {
        return Ok(stored);
    }
    // In key order, as a transaction locks rows, so that two processes inserting the same
    // keys wait for each other rather than deadlock.
    candidates.sort_by(|a, b| {
        (ns(a.1.namespace()), a.1.key().as_bytes())
            .cmp(&(ns(b.1.namespace()), b.1.key().as_bytes()))
    });
    let origin_sql = i64::try_from(origin).unwrap_or(i64::MAX);
    let mut columns = Columns::default();
    for (_, op, record) in &candidates {
        let row = to_row(record).map_err(|err: RowError| Error::Corrupt {
            key: op.key().clone(),
            reason: err.reason,
        })?;
        columns.push(
            ns(op.namespace()),
            op.key().as_bytes(),
            row.since(origin_sql),
        );
    }
    let test_now = shared.clock.as_ref().map(|_| origin_sql);
    let lock_ids = key_lock::ids(
        shared.key_seed,
        candidates
            .iter()
            .map(|(_, op, _)| (ns(op.namespace()), op.key().as_bytes())),
    );
    let statement = client
        .statement(&shared.sql.insert_batch, &insert_types())
        .await
        .map_err(|err| query_error("insert new keys", err))?;
    let mut params: Vec<&(dyn ToSql + Sync)> = columns.params().to_vec();
    params.push(&test_now);
    params.push(&lock_ids);
    let rows = client
        .query(&statement, &params)
        .await
        .map_err(|err| query_error("insert new keys", err))?;
    let mut inserted = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let fail = |err| query_error("insert new keys", err);
        let namespace: i16 = row.try_get(0).map_err(fail)?;
        let key: Vec<u8> = row.try_get(1).map_err(fail)?;
        let token: i64 = row.try_get(2).map_err(fail)?;
        let expires_at: i64 = row.try_get(3).map_err(fail)?;
        inserted.insert((namespace, key), (token, expires_at));
    }
    shared.add_records(i64::try_from(inserted.len()).unwrap_or(i64::MAX));
    let mut present = Vec::new();
    for (index, op, record) in &candidates {
        let row_key = (ns(op.namespace()), op.key().as_bytes().to_vec());
        let Some(&(token, expires_at)) = inserted.get(&row_key) else {
            stored.present += 1;
            present.push((*index, *op));
            continue;
        };
        stored.absent += 1;
        // The server's time the statement added to every time of the row.
        let at = expires_at.saturating_sub(
            i64::try_from(record.expires_at)
                .unwrap_or(i64::MAX)
                .saturating_sub(origin_sql),
        );
        let ctx = Context {
            key: op.key(),
            now: u64::try_from(at).unwrap_or(0),
            next_token: u64::try_from(token).unwrap_or(0),
            store_id: shared.store_id,
            full: None,
        };
        let effect = op.apply(None, &ctx);
        debug_assert!(
            matches!(&effect.change, Change::Put(record) if record.fencing_token == ctx.next_token),
            "the insert stored what the rules decide at the server's time"
        );
        stored.tallies.push(effect.tally);
        stored.answered[*index] = true;
    }
    read(shared, client, &present, &mut stored).await?;
    Ok(stored)
}

/// Answers the candidates whose keys had a row (a repeat the guess did not foresee) as a
/// lone call would: from one read with no lock, when the rules change nothing (a replay, a
/// claim in progress, a duplicate mark). The others go on to the batch's transaction.
async fn read(
    shared: &Shared,
    client: &mut Session,
    present: &[(usize, &Arc<dyn Queued>)],
    stored: &mut Stored,
) -> Result<()> {
    if present.is_empty() {
        return Ok(());
    }
    let namespaces: Vec<i16> = present.iter().map(|(_, op)| ns(op.namespace())).collect();
    let keys: Vec<&[u8]> = present.iter().map(|(_, op)| op.key().as_bytes()).collect();
    let statement = client
        .statement(
            &shared.sql.load_batch,
            &[Type::INT2_ARRAY, Type::BYTEA_ARRAY],
        )
        .await
        .map_err(|err| query_error("read keys", err))?;
    let params: [&(dyn ToSql + Sync); 2] = [&namespaces, &keys];
    let rows = client
        .query(&statement, &params)
        .await
        .map_err(|err| query_error("read keys", err))?;
    let mut loaded = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let fail = |err| query_error("read keys", err);
        let namespace: i16 = row.try_get("ns").map_err(fail)?;
        let key: Vec<u8> = row.try_get("key").map_err(fail)?;
        let now: i64 = row.try_get("now").map_err(fail)?;
        loaded.insert((namespace, key), (Loaded::of(row), now));
    }
    for (index, op) in present {
        let row_key = (ns(op.namespace()), op.key().as_bytes().to_vec());
        let Some((Loaded::Found(record), now)) = loaded.get(&row_key) else {
            continue;
        };
        let ctx = Context {
            key: op.key(),
            now: shared.time(*now),
            next_token: 0,
            store_id: shared.store_id,
            full: shared.full(0),
        };
        let effect = op.apply(Some(record), &ctx);
        if effect.change == Change::Keep {
            stored.tallies.push(effect.tally);
            stored.answered[*index] = true;
        }
    }
    Ok(())
}

fn insert_types() -> Vec<Type> {
    let mut types = COLUMN_TYPES.to_vec();
    types.push(Type::INT8);
    types.push(Type::INT8_ARRAY);
    types
}
