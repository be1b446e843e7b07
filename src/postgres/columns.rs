//! Rows of `records` column by column, for statements that write a whole batch's rows at once
//! through `unnest` of one array per column.

use tokio_postgres::types::{ToSql, Type};

use super::row::RecordRow;

/// The types of [`Columns::params`], in order.
pub(super) const COLUMN_TYPES: [Type; 17] = [
    Type::INT2_ARRAY,
    Type::BYTEA_ARRAY,
    Type::INT2_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::BYTEA_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::BYTEA_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::BYTEA_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
];

/// Rows of `records`, column by column, for one statement over `unnest` of every column.
#[derive(Default)]
pub(super) struct Columns<'k> {
    ns: Vec<i16>,
    key: Vec<&'k [u8]>,
    state: Vec<i16>,
    fencing_token: Vec<i64>,
    attempt: Vec<i64>,
    fingerprint: Vec<Option<Vec<u8>>>,
    expires_at: Vec<i64>,
    claimed_at: Vec<Option<i64>>,
    lease_until: Vec<Option<i64>>,
    claim_ttl: Vec<Option<i64>>,
    checkpoint_step: Vec<Option<String>>,
    checkpoint_state: Vec<Option<Vec<u8>>>,
    checkpoint_at: Vec<Option<i64>>,
    completed_at: Vec<Option<i64>>,
    response: Vec<Option<Vec<u8>>>,
    seq_mark: Vec<Option<i64>>,
    seq_updated_at: Vec<Option<i64>>,
}

impl<'k> Columns<'k> {
    pub(super) fn is_empty(&self) -> bool {
        self.ns.is_empty()
    }

    pub(super) fn push(&mut self, ns: i16, key: &'k [u8], row: RecordRow) {
        self.ns.push(ns);
        self.key.push(key);
        self.state.push(row.state);
        self.fencing_token.push(row.fencing_token);
        self.attempt.push(row.attempt);
        self.fingerprint.push(row.fingerprint);
        self.expires_at.push(row.expires_at);
        self.claimed_at.push(row.claimed_at);
        self.lease_until.push(row.lease_until);
        self.claim_ttl.push(row.claim_ttl);
        self.checkpoint_step.push(row.checkpoint_step);
        self.checkpoint_state.push(row.checkpoint_state);
        self.checkpoint_at.push(row.checkpoint_at);
        self.completed_at.push(row.completed_at);
        self.response.push(row.response);
        self.seq_mark.push(row.seq_mark);
        self.seq_updated_at.push(row.seq_updated_at);
    }

    /// The columns as the parameters `$1` to `$17` of an `unnest`, in `RECORD_COLUMNS`' order
    /// after `ns` and `key`.
    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 17] {
        [
            &self.ns,
            &self.key,
            &self.state,
            &self.fencing_token,
            &self.attempt,
            &self.fingerprint,
            &self.expires_at,
            &self.claimed_at,
            &self.lease_until,
            &self.claim_ttl,
            &self.checkpoint_step,
            &self.checkpoint_state,
            &self.checkpoint_at,
            &self.completed_at,
            &self.response,
            &self.seq_mark,
            &self.seq_updated_at,
        ]
    }
}
