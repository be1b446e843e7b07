//! A [`Record`] as one row of the `records` table, and back.
//!
//! The row keeps every field of the record in a column of its own, so that the sweeper can
//! find expired keys by index and an operator can read the table. Which columns are set
//! depends on `state`; a row whose columns do not fit its state, or whose values no record can
//! have, is a [`RowError`], never a panic.
//!
//! Times, tokens and attempts are non-negative `bigint`s; a value past `i64::MAX` (some 292
//! million years of milliseconds) cannot be stored. A sequence mark is any `u64` the caller
//! chose, so it is stored bit for bit (`u64::MAX` as `-1`) and only ever compared in Rust.

use std::fmt;

use tokio_postgres::types::{ToSql, Type};

use crate::record::{ByteString, Record, RecordState, StoredCheckpoint};

/// `state` of a claim in progress.
pub(crate) const IN_PROGRESS: i16 = 1;
/// `state` of a completed claim.
const COMPLETED: i16 = 2;
/// `state` of a stream's high-water mark.
const SEQUENCE: i16 = 3;

/// A key's row as read.
pub(crate) enum Loaded {
    Absent,
    Found(Record),
    /// The row holds no record this build can read; why.
    Damaged(String),
}

impl Loaded {
    /// The record in a row that has the record columns.
    pub(crate) fn of(row: &tokio_postgres::Row) -> Loaded {
        match RecordRow::from_pg(row) {
            Ok(values) => match from_row(&values) {
                Ok(record) => Loaded::Found(record),
                Err(err) => Loaded::Damaged(err.reason),
            },
            Err(err) => Loaded::Damaged(format!("unreadable row: {err}")),
        }
    }
}

/// The `ns` column of a key in `namespace`: the byte its stored keys start with in a redb file.
pub(crate) fn ns(namespace: crate::rules::Namespace) -> i16 {
    i16::from(namespace.tag())
}

/// The columns of a [`RecordRow`] in the order [`RecordRow::from_pg`] and `Columns::params`
/// (`columns.rs`) use, for `SELECT` and `INSERT` statements.
pub(crate) const RECORD_COLUMNS: &str = "state, fencing_token, attempt, fingerprint, expires_at, \
     claimed_at, lease_until, claim_ttl, checkpoint_step, checkpoint_state, checkpoint_at, \
     completed_at, response, seq_mark, seq_updated_at";

/// How many columns [`RECORD_COLUMNS`] names.
const RECORD_COLUMN_COUNT: usize = 15;

/// The values of one row of `records`, apart from its key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RecordRow {
    pub state: i16,
    pub fencing_token: i64,
    pub attempt: i64,
    pub fingerprint: Option<Vec<u8>>,
    pub expires_at: i64,
    pub claimed_at: Option<i64>,
    pub lease_until: Option<i64>,
    pub claim_ttl: Option<i64>,
    pub checkpoint_step: Option<String>,
    pub checkpoint_state: Option<Vec<u8>>,
    pub checkpoint_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub response: Option<Vec<u8>>,
    pub seq_mark: Option<i64>,
    pub seq_updated_at: Option<i64>,
}

/// Why a record cannot become a row, or a row a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowError {
    /// What was wrong, naming the column.
    pub reason: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

fn invalid(reason: impl Into<String>) -> RowError {
    RowError {
        reason: reason.into(),
    }
}

/// The row that stores `record`.
///
/// # Errors
/// When a time, token or TTL is past `i64::MAX`.
pub(crate) fn to_row(record: &Record) -> Result<RecordRow, RowError> {
    let mut row = RecordRow {
        fencing_token: signed("fencing_token", record.fencing_token)?,
        attempt: i64::from(record.attempt),
        fingerprint: record.fingerprint.as_ref().map(|bytes| bytes.0.clone()),
        expires_at: signed("expires_at", record.expires_at)?,
        ..RecordRow::default()
    };
    match &record.state {
        RecordState::InProgress {
            claimed_at,
            lease_until,
            claim_ttl,
            checkpoint,
        } => {
            row.state = IN_PROGRESS;
            row.claimed_at = Some(signed("claimed_at", *claimed_at)?);
            row.lease_until = Some(signed("lease_until", *lease_until)?);
            row.claim_ttl = Some(signed("claim_ttl", *claim_ttl)?);
            if let Some(checkpoint) = checkpoint {
                row.checkpoint_step = Some(checkpoint.step.clone());
                row.checkpoint_state = Some(checkpoint.state.0.clone());
                row.checkpoint_at = Some(signed("checkpoint_at", checkpoint.recorded_at)?);
            }
        }
        RecordState::Completed {
            completed_at,
            response,
        } => {
            row.state = COMPLETED;
            row.completed_at = Some(signed("completed_at", *completed_at)?);
            row.response = Some(response.0.clone());
        }
        RecordState::Sequence { mark, updated_at } => {
            row.state = SEQUENCE;
            row.seq_mark = Some(i64::from_ne_bytes(mark.to_ne_bytes()));
            row.seq_updated_at = Some(signed("seq_updated_at", *updated_at)?);
        }
    }
    Ok(row)
}

/// The record `row` stores.
///
/// # Errors
/// When `state` is unknown, a column the state needs is NULL, a column of another state is
/// set, or a time, token or attempt is negative or out of range.
pub(crate) fn from_row(row: &RecordRow) -> Result<Record, RowError> {
    let state = match row.state {
        IN_PROGRESS => {
            only_columns_of("in progress", row, &["completed_at", "response", "seq"])?;
            let checkpoint = match (
                &row.checkpoint_step,
                &row.checkpoint_state,
                row.checkpoint_at,
            ) {
                (None, None, None) => None,
                (Some(step), Some(state), Some(at)) => Some(StoredCheckpoint {
                    step: step.clone(),
                    state: ByteString(state.clone()),
                    recorded_at: unsigned("checkpoint_at", at)?,
                }),
                _ => return Err(invalid("the checkpoint columns are only partly set")),
            };
            RecordState::InProgress {
                claimed_at: unsigned("claimed_at", required("claimed_at", row.claimed_at)?)?,
                lease_until: unsigned("lease_until", required("lease_until", row.lease_until)?)?,
                claim_ttl: unsigned("claim_ttl", required("claim_ttl", row.claim_ttl)?)?,
                checkpoint,
            }
        }
        COMPLETED => {
            only_columns_of("completed", row, &["claim", "checkpoint", "seq"])?;
            RecordState::Completed {
                completed_at: unsigned(
                    "completed_at",
                    required("completed_at", row.completed_at)?,
                )?,
                response: ByteString(required("response", row.response.clone())?),
            }
        }
        SEQUENCE => {
            only_columns_of(
                "sequence",
                row,
                &["claim", "checkpoint", "completed_at", "response"],
            )?;
            RecordState::Sequence {
                mark: u64::from_ne_bytes(required("seq_mark", row.seq_mark)?.to_ne_bytes()),
                updated_at: unsigned(
                    "seq_updated_at",
                    required("seq_updated_at", row.seq_updated_at)?,
                )?,
            }
        }
        other => return Err(invalid(format!("unknown state {other}"))),
    };
    Ok(Record {
        fencing_token: unsigned("fencing_token", row.fencing_token)?,
        attempt: u32::try_from(row.attempt)
            .map_err(|_| invalid(format!("attempt {} is out of range", row.attempt)))?,
        fingerprint: row.fingerprint.clone().map(ByteString),
        expires_at: unsigned("expires_at", row.expires_at)?,
        state,
    })
}

/// Fails when a column group that `state` does not use is set.
fn only_columns_of(state: &str, row: &RecordRow, unused: &[&str]) -> Result<(), RowError> {
    for group in unused {
        let set = match *group {
            "claim" => {
                row.claimed_at.is_some() || row.lease_until.is_some() || row.claim_ttl.is_some()
            }
            "checkpoint" => {
                row.checkpoint_step.is_some()
                    || row.checkpoint_state.is_some()
                    || row.checkpoint_at.is_some()
            }
            "completed_at" => row.completed_at.is_some(),
            "response" => row.response.is_some(),
            "seq" => row.seq_mark.is_some() || row.seq_updated_at.is_some(),
            _ => false,
        };
        if set {
            return Err(invalid(format!("a {state} row has {group} columns set")));
        }
    }
    Ok(())
}

fn required<T>(column: &str, value: Option<T>) -> Result<T, RowError> {
    value.ok_or_else(|| invalid(format!("{column} is NULL")))
}

fn signed(column: &str, value: u64) -> Result<i64, RowError> {
    i64::try_from(value).map_err(|_| invalid(format!("{column} {value} is past i64::MAX")))
}

fn unsigned(column: &str, value: i64) -> Result<u64, RowError> {
    u64::try_from(value).map_err(|_| invalid(format!("{column} {value} is negative")))
}

/// Where `fencing_token` is among [`RECORD_COLUMNS`].
pub(crate) const TOKEN_COLUMN: usize = 1;

impl RecordRow {
    /// Each column of [`RECORD_COLUMNS`], in that order, with its type: a statement's
    /// parameters.
    pub(crate) fn typed(&self) -> [(&(dyn ToSql + Sync), Type); RECORD_COLUMN_COUNT] {
        [
            (&self.state, Type::INT2),
            (&self.fencing_token, Type::INT8),
            (&self.attempt, Type::INT8),
            (&self.fingerprint, Type::BYTEA),
            (&self.expires_at, Type::INT8),
            (&self.claimed_at, Type::INT8),
            (&self.lease_until, Type::INT8),
            (&self.claim_ttl, Type::INT8),
            (&self.checkpoint_step, Type::TEXT),
            (&self.checkpoint_state, Type::BYTEA),
            (&self.checkpoint_at, Type::INT8),
            (&self.completed_at, Type::INT8),
            (&self.response, Type::BYTEA),
            (&self.seq_mark, Type::INT8),
            (&self.seq_updated_at, Type::INT8),
        ]
    }

    /// Reads the columns of [`RECORD_COLUMNS`] from a row that selected them together, in
    /// that order.
    ///
    /// # Errors
    /// When a column is missing or of another type.
    pub(crate) fn from_pg(row: &tokio_postgres::Row) -> Result<RecordRow, tokio_postgres::Error> {
        // Every statement lists RECORD_COLUMNS together and in order: find the first once
        // rather than each by name. A row without them fails on its first `try_get`.
        let first = row
            .columns()
            .iter()
            .position(|column| column.name() == "state")
            .unwrap_or(usize::MAX - RECORD_COLUMN_COUNT);
        let at = |offset: usize| first + offset;
        Ok(RecordRow {
            state: row.try_get(at(0))?,
            fencing_token: row.try_get(at(1))?,
            attempt: row.try_get(at(2))?,
            fingerprint: row.try_get(at(3))?,
            expires_at: row.try_get(at(4))?,
            claimed_at: row.try_get(at(5))?,
            lease_until: row.try_get(at(6))?,
            claim_ttl: row.try_get(at(7))?,
            checkpoint_step: row.try_get(at(8))?,
            checkpoint_state: row.try_get(at(9))?,
            checkpoint_at: row.try_get(at(10))?,
            completed_at: row.try_get(at(11))?,
            response: row.try_get(at(12))?,
            seq_mark: row.try_get(at(13))?,
            seq_updated_at: row.try_get(at(14))?,
        })
    }

    /// The row with every time given as its distance from `origin` (for a statement that
    /// adds the server's time to each).
    pub(crate) fn since(mut self, origin: i64) -> RecordRow {
        let since = |time: &mut i64| *time = time.saturating_sub(origin);
        since(&mut self.expires_at);
        for time in [
            &mut self.claimed_at,
            &mut self.lease_until,
            &mut self.checkpoint_at,
            &mut self.completed_at,
            &mut self.seq_updated_at,
        ]
        .into_iter()
        .flatten()
        {
            since(time);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_795_305_600_000;

    fn record(state: RecordState, fingerprint: Option<&[u8]>) -> Record {
        Record {
            fencing_token: 7,
            attempt: 3,
            fingerprint: fingerprint.map(|bytes| ByteString(bytes.to_vec())),
            expires_at: T0 + 3_600_000,
            state,
        }
    }

    fn every_state() -> Vec<Record> {
        vec![
            record(
                RecordState::InProgress {
                    claimed_at: T0,
                    lease_until: T0 + 30_000,
                    claim_ttl: 3_600_000,
                    checkpoint: None,
                },
                Some(b"sha256:abc"),
            ),
            record(
                RecordState::InProgress {
                    claimed_at: T0,
                    lease_until: T0 + 30_000,
                    claim_ttl: 3_600_000,
                    checkpoint: Some(StoredCheckpoint {
                        step: "charged".to_string(),
                        state: ByteString(Vec::new()),
                        recorded_at: T0 + 10,
                    }),
                },
                None,
            ),
            record(
                RecordState::Completed {
                    completed_at: T0 + 5,
                    response: ByteString(b"201 created".to_vec()),
                },
                Some(b""),
            ),
            record(
                RecordState::Completed {
                    completed_at: T0 + 5,
                    response: ByteString(Vec::new()),
                },
                None,
            ),
            record(
                RecordState::Sequence {
                    mark: 41,
                    updated_at: T0,
                },
                None,
            ),
            record(
                RecordState::Sequence {
                    mark: u64::MAX,
                    updated_at: T0,
                },
                None,
            ),
        ]
    }

    #[test]
    fn every_state_round_trips() -> Result<(), RowError> {
        for record in every_state() {
            let row = to_row(&record)?;
            assert_eq!(from_row(&row)?, record, "{row:?}");
        }
        Ok(())
    }

    #[test]
    fn an_unknown_state_is_an_error() -> Result<(), RowError> {
        let mut row = to_row(&every_state()[0])?;
        for state in [0, 4, -1, i16::MAX] {
            row.state = state;
            let err = from_row(&row).expect_err("unknown state");
            assert!(err.reason.contains("unknown state"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn impossible_rows_are_errors() -> Result<(), RowError> {
        let [in_progress, checkpointed, completed, _, sequence, _] = &every_state()[..] else {
            panic!("six sample records");
        };
        let breakages: Vec<(RecordRow, &str)> = vec![
            (
                RecordRow {
                    claimed_at: None,
                    ..to_row(in_progress)?
                },
                "claimed_at is NULL",
            ),
            (
                RecordRow {
                    checkpoint_at: None,
                    ..to_row(checkpointed)?
                },
                "partly set",
            ),
            (
                RecordRow {
                    response: Some(b"x".to_vec()),
                    ..to_row(in_progress)?
                },
                "response columns set",
            ),
            (
                RecordRow {
                    response: None,
                    ..to_row(completed)?
                },
                "response is NULL",
            ),
            (
                RecordRow {
                    lease_until: Some(1),
                    ..to_row(completed)?
                },
                "claim columns set",
            ),
            (
                RecordRow {
                    seq_mark: None,
                    ..to_row(sequence)?
                },
                "seq_mark is NULL",
            ),
            (
                RecordRow {
                    expires_at: -1,
                    ..to_row(sequence)?
                },
                "expires_at -1 is negative",
            ),
            (
                RecordRow {
                    attempt: i64::from(u32::MAX) + 1,
                    ..to_row(sequence)?
                },
                "attempt",
            ),
        ];
        for (row, expected) in breakages {
            let err = from_row(&row).expect_err(expected);
            assert!(err.reason.contains(expected), "{err} (wanted {expected})");
        }
        Ok(())
    }

    /// Every state written to a real `records` table and read back, through the statements'
    /// column list and parameters the engine uses.
    #[cfg(feature = "testing")]
    #[test]
    fn every_state_round_trips_through_the_table() -> crate::Result<()> {
        use crate::postgres::columns::Columns;
        use crate::postgres::statements::Statements;
        use crate::postgres::{Pool, Runtime, open_schema, query_error};
        use crate::testing::postgres::TestCluster;
        use std::sync::Arc;

        let Some(cluster) = TestCluster::start() else {
            return Ok(());
        };
        let pool = Arc::new(Pool::new(&cluster.create_database("rows"), 1)?);
        let runtime = Runtime::new()?;
        let records = every_state();
        let read = runtime.call(async move {
            let mut client = pool.get().await?;
            let schema = open_schema(client.client_mut(), "dedupe", true)
                .await?
                .quoted;
            // Written as a batch writes rows: one statement over every column's array.
            let keys: Vec<Vec<u8>> = (0..records.len())
                .map(|index| vec![u8::try_from(index).unwrap_or(u8::MAX)])
                .collect();
            let mut columns = Columns::default();
            for (record, key) in records.iter().zip(&keys) {
                let row = to_row(record)
                    .map_err(|err| crate::Error::InvalidConfig { reason: err.reason })?;
                columns.push(1, key, row);
            }
            client
                .execute(&Statements::new(&schema).insert, &columns.params())
                .await
                .map_err(|err| query_error("insert the records", err))?;
            let rows = client
                .query(
                    &format!("SELECT {RECORD_COLUMNS} FROM {schema}.records ORDER BY key"),
                    &[],
                )
                .await
                .map_err(|err| query_error("read the records", err))?;
            rows.iter()
                .map(|row| RecordRow::from_pg(row).map_err(|err| query_error("read a record", err)))
                .collect::<crate::Result<Vec<_>>>()
        })?;
        let expected = every_state();
        assert_eq!(read.len(), expected.len());
        for (row, record) in read.iter().zip(&expected) {
            assert_eq!(from_row(row).as_ref(), Ok(record), "{row:?}");
        }
        Ok(())
    }

    #[test]
    fn times_past_i64_max_cannot_be_stored() {
        let mut record = every_state().remove(0);
        record.expires_at = u64::MAX;
        let err = to_row(&record).expect_err("too late");
        assert!(err.reason.contains("expires_at"), "{err}");
    }
}
