//! Answers that need no commit: one key's read, and a new key stored by one `INSERT`.
//!
//! - A call that would change nothing (a replay, a live claim, a mismatch, a duplicate mark, a
//!   stale ticket) is one `SELECT`, with no lock held past it.
//! - A call that stores a record on a key that has none (a fresh claim, a first mark) is one
//!   `INSERT` in autocommit while the engine sends writes alone (few calls in flight, no commit
//!   running: `Engine::alone`): the statement reads the server's clock and draws
//!   the fencing token itself (see [`Engine::insert_new`]).
//! - A store whose recent claims and marks found their keys absent tries that `INSERT` first,
//!   before any read: a fresh key then costs one round trip, as a hand-written
//!   `INSERT ... ON CONFLICT DO NOTHING` does. A key that has a row makes the `INSERT` do
//!   nothing (it neither writes nor draws a token), and the read follows. Which comes first is
//!   only a guess about cost (`freshness.rs`); both orders decide alike.
//!
//! - A call that changes the record of a key that has one, without a new token (a complete, an
//!   extend, a checkpoint, a release, an expire), decided on that one `SELECT`, is then one
//!   `UPDATE` (or `DELETE`, when the record goes) in autocommit while the engine sends writes
//!   alone (and, for an owner's call, no other such change is in flight:
//!   `Engine::one`). The statement changes the row only if it is still the version the
//!   `SELECT` read (`xmin`): any write between the two made a new version, and the call then
//!   goes to a commit, which decides again under the row's lock. Unchanged in between, the
//!   record is the one the rules decided on, as a commit's locked read would have found it;
//!   only the time they decided by is the read's, a round trip earlier.
//!
//! Anything else goes to the group commit.

use tokio_postgres::types::{ToSql, Type};

use super::commit::{Shared, event_key};
use super::engine::Engine;
use super::error::query_error;
use super::key_lock;
use super::listen::encode;
use super::row::{Loaded, RowError, TOKEN_COLUMN, ns, to_row};
use super::session::Session;
use crate::error::{DatabaseErrorKind, Error, Result};
use crate::key::Key;
use crate::record::Record;
use crate::rules::{self, Change, Context, Decision, Namespace, Rule};

/// A key's row as one `SELECT` read it.
pub(super) struct Read {
    pub loaded: Loaded,
    /// The time it was read at: `None` when the key has no row and the server's clock
    /// decides (the statement then returns nothing).
    pub now: Option<u64>,
    /// The row's version (`xmin`), `None` when the key has no row.
    pub version: Option<i64>,
}

impl Engine {
    /// Answers `rule` on `key` without a commit when it can (see the module's docs); `None`
    /// means it must go to a commit.
    pub(super) fn peek<R: Rule>(&self, key: &Key, rule: &R) -> Result<Option<Result<R::Answer>>> {
        let namespace = rule.namespace();
        let insert_first = R::CREATES && self.freshness.likely();
        if insert_first {
            // Under load the group commit tries new keys first itself (`fresh.rs`): join it.
            if !self.alone() {
                return Ok(None);
            }
            if let Some(answer) = self.create(key, rule)? {
                self.freshness.saw(true);
                return Ok(Some(self.counted::<R>(answer)));
            }
        }
        let Read {
            loaded,
            now,
            version,
        } = self.load(namespace, key)?;
        if R::CREATES {
            self.freshness.saw(matches!(loaded, Loaded::Absent));
        }
        let answer = match (loaded, now) {
            (Loaded::Damaged(reason), _) => keep(rule.damaged(key, &reason)),
            (Loaded::Found(record), Some(now)) => {
                let decision = self.decide_read(rule, key, Some(&record), now);
                let changed = match &decision.change {
                    Change::Keep => return Ok(Some(self.counted::<R>(decision.answer))),
                    Change::Put(changed) => Some(changed),
                    Change::Delete => None,
                };
                match version {
                    Some(version) if !decision.issued_token && self.alone() => {
                        let ended =
                            record.is_in_progress() && !changed.is_some_and(Record::is_in_progress);
                        self.write_unchanged(namespace, key, version, changed, ended)?
                            .then_some(decision.answer)
                    }
                    _ => None,
                }
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
    /// and the engine sends writes alone (`Engine::alone`). `None` when neither can answer: the
    /// key has a row after all, or the call must join a commit.
    fn create<R: Rule>(&self, key: &Key, rule: &R) -> Result<Option<Result<R::Answer>>> {
        // Decided at `origin`; the stored record's times are moved to the server's time by the
        // insert. A record the rules make for an absent key is its times' distances from `now`,
        // so moving them is deciding at the server's time.
        let origin = self.test_clock_now().unwrap_or(0);
        let decision = self.decide_read(rule, key, None, u64::try_from(origin).unwrap_or(0));
        let record = match decision.change {
            Change::Keep => return Ok(Some(decision.answer)),
            Change::Put(record) if decision.issued_token && self.alone() => record,
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
    /// The statement takes the key's lock (`key_lock.rs`) before it draws the token, so the
    /// token is above every earlier owner's: every other draw for the key, in any process,
    /// took the lock too, and ended with its row committed before this draw.
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
            let ns = ns(namespace);
            let lock_id = key_lock::id(shared.key_seed, ns, key_bytes);
            let mut params: Vec<(&(dyn ToSql + Sync), Type)> =
                vec![(&ns, Type::INT2), (&key_bytes, Type::BYTEA)];
            // The statement draws the token itself.
            params.extend(
                row.typed()
                    .into_iter()
                    .enumerate()
                    .filter(|(column, _)| *column != TOKEN_COLUMN)
                    .map(|(_, param)| param),
            );
            params.push((&test_now, Type::INT8));
            params.push((&lock_id, Type::INT8));
            let rows = client
                .query_prepared(&shared.sql.insert_new, &params)
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

    /// One key's stored record, its row version and the time to judge it by, from one
    /// `SELECT`.
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
                return Ok(Read {
                    loaded: Loaded::Absent,
                    now: None,
                    version: None,
                });
            };
            let failed = |err| query_error("read a key", err);
            let server: i64 = row.try_get("now").map_err(failed)?;
            let version: i64 = row.try_get("version").map_err(failed)?;
            Ok(Read {
                loaded: Loaded::of(row),
                now: Some(shared.time(server)),
                version: Some(version),
            })
        })?;
        if let (None, Some(now)) = (&self.shared.clock, read.now) {
            self.saw_server_time(now);
        }
        Ok(read)
    }

    /// Stores `record` as the record of `key` (`None`: removes the key's row) in one statement
    /// in autocommit, if the key's row is still at `version`; tells waiters in every process
    /// when the claim `ended`. Whether it did: `false` when another write changed the row
    /// first (nothing is written then).
    fn write_unchanged(
        &self,
        namespace: Namespace,
        key: &Key,
        version: i64,
        record: Option<&Record>,
        ended: bool,
    ) -> Result<bool> {
        let row = record
            .map(to_row)
            .transpose()
            .map_err(|err| Error::Corrupt {
                key: key.clone(),
                reason: err.reason,
            })?;
        let ended = ended.then(|| event_key(namespace, key));
        let event = ended.as_deref().map(encode);
        let key_bytes = key.as_bytes();
        let removing = row.is_none();
        let written = self.call(async move |shared: &Shared, client: &mut Session| {
            let ns = ns(namespace);
            let rows = match &row {
                Some(row) => {
                    let mut params: Vec<(&(dyn ToSql + Sync), Type)> =
                        vec![(&ns, Type::INT2), (&key_bytes, Type::BYTEA)];
                    params.extend(row.typed());
                    params.extend([
                        (&version as &(dyn ToSql + Sync), Type::INT8),
                        (&shared.channel, Type::TEXT),
                        (&event, Type::TEXT),
                    ]);
                    client
                        .query_prepared(&shared.sql.update_unchanged, &params)
                        .await
                }
                None => {
                    client
                        .query_prepared(
                            &shared.sql.delete_unchanged,
                            &[
                                (&ns, Type::INT2),
                                (&key_bytes, Type::BYTEA),
                                (&version, Type::INT8),
                                (&shared.channel, Type::TEXT),
                                (&event, Type::TEXT),
                            ],
                        )
                        .await
                }
            };
            let rows = rows.map_err(|err| query_error("change a key", err))?;
            Ok(!rows.is_empty())
        })?;
        if written {
            self.counters.wrote(1);
            if removing {
                self.shared.add_records(-1);
            }
            if let Some(ended) = &ended {
                self.shared.events.changed(ended);
            }
        }
        Ok(written)
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

#[cfg(all(test, feature = "testing"))]
mod tests {
    use std::time::Duration;

    use super::Read;
    use crate::engine::Engine as Engines;
    use crate::key::Key;
    use crate::postgres::row::Loaded;
    use crate::record::Record;
    use crate::rules::Namespace;
    use crate::testing::postgres::TestCluster;
    use crate::{Claim, Store};

    fn record(read: &Read) -> Record {
        match &read.loaded {
            Loaded::Found(record) => record.clone(),
            Loaded::Absent => panic!("the key has a record"),
            Loaded::Damaged(reason) => panic!("the key's record is damaged: {reason}"),
        }
    }

    /// The write after a read changes the row only at the version the rules decided on: a
    /// write in between makes it change nothing, so the call goes to a commit instead.
    #[test]
    fn an_update_lands_only_on_the_row_version_it_was_decided_on() -> crate::Result<()> {
        let Some(cluster) = TestCluster::start() else {
            return Ok(());
        };
        let store = Store::builder()
            .without_sweeper()
            .open_postgres(&cluster.create_database("versions"))?;
        let Engines::Postgres(engine) = store.engine() else {
            panic!("a store opened on PostgreSQL has the PostgreSQL engine");
        };
        let key = Key::new("versioned");
        let Claim::Acquired(mut ticket) = store.claim("versioned")? else {
            panic!("a fresh key is acquired");
        };
        let first = engine.load(Namespace::Idempotency, &key)?;
        let stale = first.version.expect("a row has a version");
        // Another write (here, the owner's extend) makes a new version of the row.
        store.extend(&mut ticket, Duration::from_secs(600))?;
        let extended = engine.load(Namespace::Idempotency, &key)?;
        let current = extended.version.expect("a row has a version");
        assert_ne!(current, stale, "a write makes a new row version");
        let mut decided = record(&first);
        decided.expires_at += 1;
        assert!(!engine.write_unchanged(
            Namespace::Idempotency,
            &key,
            stale,
            Some(&decided),
            false
        )?);
        let after = engine.load(Namespace::Idempotency, &key)?;
        assert_eq!(record(&after), record(&extended), "nothing was written");
        assert_eq!(after.version, Some(current));
        assert!(engine.write_unchanged(
            Namespace::Idempotency,
            &key,
            current,
            Some(&decided),
            false
        )?);
        let updated = engine.load(Namespace::Idempotency, &key)?;
        assert_eq!(record(&updated), decided);
        // A removal too lands only on the version it was decided on.
        assert!(!engine.write_unchanged(Namespace::Idempotency, &key, current, None, true)?);
        let latest = updated.version.expect("a row has a version");
        assert!(engine.write_unchanged(Namespace::Idempotency, &key, latest, None, true)?);
        assert!(matches!(
            engine.load(Namespace::Idempotency, &key)?.loaded,
            Loaded::Absent
        ));
        Ok(())
    }
}
