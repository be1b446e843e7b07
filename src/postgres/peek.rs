//! Answers that need no commit: one key's read, and a new key stored by one `INSERT`.
//!
//! - A call that would change nothing (a replay, a live claim, a mismatch, a duplicate mark, a
//!   stale ticket) is one `SELECT`, with no lock held past it.
//! - A call that stores a record on a key that has none (a fresh claim, a first mark) is one
//!   `INSERT` in autocommit when no commit of its shard is running: the statement reads the
//!   server's clock and draws the fencing token itself (see [`Engine::insert_new`]).
//! - A store whose recent claims and marks found their keys absent tries that `INSERT` first,
//!   before any read: a fresh key then costs one round trip, as a hand-written
//!   `INSERT ... ON CONFLICT DO NOTHING` does. A key that has a row makes the `INSERT` do
//!   nothing (it neither writes nor draws a token), and the read follows. Which comes first is
//!   only a guess about cost (`freshness.rs`); both orders decide alike.
//!
//! Anything else goes to the shard's group commit.

use tokio_postgres::types::Type;

use super::commit::Shared;
use super::engine::Engine;
use super::error::query_error;
use super::pool::Session;
use super::row::{Loaded, RowError, ns, to_row};
use crate::error::{DatabaseErrorKind, Error, Result};
use crate::key::Key;
use crate::record::Record;
use crate::rules::{self, Change, Context, Decision, Namespace, Rule};

/// A key's row as one `SELECT` read it, and the time it was read at (`None` when the key has
/// no row and the server's clock decides: the statement then returns nothing).
pub(super) type Read = (Loaded, Option<u64>);

impl Engine {
    /// Answers `rule` on `key` without a commit when it can (see the module's docs); `None`
    /// means it must go to a commit.
    pub(super) fn peek<R: Rule>(&self, key: &Key, rule: &R) -> Result<Option<Result<R::Answer>>> {
        let namespace = rule.namespace();
        let insert_first = R::CREATES && self.freshness.likely();
        if insert_first {
            // A busy shard's batch tries new keys first itself (`fresh.rs`): join it.
            if !self.shard_idle(key) {
                return Ok(None);
            }
            if let Some(answer) = self.create(key, rule)? {
                self.freshness.saw(true);
                return Ok(Some(self.counted::<R>(answer)));
            }
        }
        let (loaded, now) = self.load(namespace, key)?;
        if R::CREATES {
            self.freshness.saw(matches!(loaded, Loaded::Absent));
        }
        let answer = match (loaded, now) {
            (Loaded::Damaged(reason), _) => keep(rule.damaged(key, &reason)),
            (Loaded::Found(record), Some(now)) => {
                keep(self.decide_read(rule, key, Some(&record), now))
            }
            (Loaded::Absent, _) if insert_first => None,
            (Loaded::Absent, _) => self.create(key, rule)?,
            (Loaded::Found(_), None) => {
                return Err(Error::Database {
                    action: "read a key",
                    kind: DatabaseErrorKind::Other,
                    message: "the server answered a row without its time".to_string(),
                    source: None,
                });
            }
        };
        Ok(answer.map(|answer| self.counted::<R>(answer)))
    }

    fn counted<R: Rule>(&self, answer: Result<R::Answer>) -> Result<R::Answer> {
        self.counters.count(rules::tally::<R>(&answer));
        answer
    }

    /// Answers `rule` on a key with no row: at once when that changes nothing (a stale ticket,
    /// say), by [`insert_new`](Self::insert_new) when it stores a new record with a new token
    /// and the key's shard has no commit running. `None` when neither can answer: the key has
    /// a row after all, or the call must join a commit.
    fn create<R: Rule>(&self, key: &Key, rule: &R) -> Result<Option<Result<R::Answer>>> {
        // Decided at `origin`; the stored record's times are moved to the server's time by the
        // insert. A record the rules make for an absent key is its times' distances from `now`,
        // so moving them is deciding at the server's time.
        let origin = self.test_clock_now().unwrap_or(0);
        let decision = self.decide_read(rule, key, None, u64::try_from(origin).unwrap_or(0));
        let record = match decision.change {
            Change::Keep => return Ok(Some(decision.answer)),
            Change::Put(record) if decision.issued_token && self.shard_idle(key) => record,
            _ => return Ok(None),
        };
        let Some((token, now)) = self.insert_new(rule.namespace(), key, &record, origin)? else {
            return Ok(None);
        };
        self.counters.wrote(1);
        let ctx = Context {
            key,
            now,
            next_token: token,
            store_id: self.shared.store_id,
            full: None,
        };
        let decided = rules::apply(rule, None, &ctx);
        debug_assert_eq!(
            decided.change,
            Change::Put(Record {
                fencing_token: token,
                ..shifted(
                    record,
                    now.saturating_sub(u64::try_from(origin).unwrap_or(0))
                )
            }),
            "the insert stored what the rules decide at the server's time"
        );
        Ok(Some(decided.answer))
    }

    /// Stores `record`, decided at time `origin`, as the record of a key that has no row: in
    /// one statement in autocommit, with its times moved by the server's time less `origin`
    /// and its fencing token drawn by the statement. The token and the server's time, or
    /// `None` if the key has a row by then (the statement then writes nothing and draws no
    /// token).
    ///
    /// Drawing the token in the `INSERT` keeps it above every earlier owner's: a row inserted
    /// and removed before the statement ran drew its token before, and one inserted by a
    /// transaction still running makes this insert wait for it and then do nothing.
    fn insert_new(
        &self,
        namespace: Namespace,
        key: &Key,
        record: &Record,
        origin: i64,
    ) -> Result<Option<(u64, u64)>> {
        let corrupt = |err: RowError| Error::Corrupt {
            key: key.clone(),
            reason: err.reason,
        };
        let row = to_row(record).map_err(corrupt)?.since(origin);
        let key_bytes = key.as_bytes();
        let test_now = self.test_clock_now();
        let inserted = self.call(async move |shared: &Shared, client: &mut Session| {
            let rows = client
                .query_prepared(
                    &shared.sql.insert_new,
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
                        (&test_now, Type::INT8),
                    ],
                )
                .await
                .map_err(|err| query_error("insert a key", err))?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let token: i64 = row
                .try_get(0)
                .map_err(|err| query_error("insert a key", err))?;
            let now: i64 = row
                .try_get(1)
                .map_err(|err| query_error("insert a key", err))?;
            Ok(Some((token, now)))
        })?;
        let Some((token, now)) = inserted else {
            return Ok(None);
        };
        self.shared.add_records(1);
        if test_now.is_none() {
            self.saw_server_time(u64::try_from(now).unwrap_or(0));
        }
        Ok(Some((
            u64::try_from(token).unwrap_or(0),
            u64::try_from(now).unwrap_or(0),
        )))
    }

    /// One key's stored record and the time to judge it by, from one `SELECT`.
    pub(super) fn load(&self, namespace: Namespace, key: &Key) -> Result<Read> {
        let key = key.as_bytes();
        let read = self.call(async move |shared: &Shared, client: &mut Session| {
            let rows = client
                .query_prepared(
                    &shared.sql.load,
                    &[(&ns(namespace), Type::INT2), (&key, Type::BYTEA)],
                )
                .await
                .map_err(|err| query_error("read a key", err))?;
            let Some(row) = rows.first() else {
                return Ok((Loaded::Absent, None));
            };
            let server: i64 = row
                .try_get("now")
                .map_err(|err| query_error("read a key", err))?;
            Ok((Loaded::of(row), Some(shared.time(server))))
        })?;
        if let (None, (_, Some(now))) = (&self.shared.clock, &read) {
            self.saw_server_time(*now);
        }
        Ok(read)
    }

    fn decide_read<R: Rule>(
        &self,
        rule: &R,
        key: &Key,
        current: Option<&Record>,
        now: u64,
    ) -> Decision<R::Answer> {
        let ctx = Context {
            key,
            now,
            next_token: 0,
            store_id: self.shared.store_id,
            full: self.shared.full(0),
        };
        rules::apply(rule, current, &ctx)
    }
}

/// The decision's answer when it changes nothing; `None` when it must be committed.
fn keep<A>(decision: Decision<A>) -> Option<Result<A>> {
    match decision.change {
        Change::Keep => Some(decision.answer),
        _ => None,
    }
}

/// `record` with every time moved `by` milliseconds later.
fn shifted(mut record: Record, by: u64) -> Record {
    use crate::record::RecordState;
    let later = |time: &mut u64| *time = time.saturating_add(by);
    later(&mut record.expires_at);
    match &mut record.state {
        RecordState::InProgress {
            claimed_at,
            lease_until,
            checkpoint,
            ..
        } => {
            later(claimed_at);
            later(lease_until);
            if let Some(checkpoint) = checkpoint {
                later(&mut checkpoint.recorded_at);
            }
        }
        RecordState::Completed { completed_at, .. } => later(completed_at),
        RecordState::Sequence { updated_at, .. } => later(updated_at),
    }
    record
}
