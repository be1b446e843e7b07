//! SQL texts the engine runs on every call, built once per schema rather than on each call.

use super::clock::NOW_MILLIS;
use super::row::RECORD_COLUMNS;

/// Every column of a batch's rows as arrays `$1` to `$17` (`columns.rs`), one row each.
const UNNEST_ROWS: &str = "unnest($1::smallint[], $2::bytea[], $3::smallint[], \
     $4::bigint[], $5::bigint[], $6::bytea[], $7::bigint[], $8::bigint[], $9::bigint[], \
     $10::bigint[], $11::text[], $12::bytea[], $13::bigint[], $14::bigint[], $15::bytea[], \
     $16::bigint[], $17::bigint[])";

/// Keys as arrays `$1` (namespaces) and `$2` (keys).
const UNNEST_KEYS: &str = "unnest($1::smallint[], $2::bytea[])";

/// The statements of the engine's calls in one schema.
pub(super) struct Statements {
    /// One key's record and the clock (`peek.rs`).
    pub load: String,
    /// `load` of several keys, each row with its key (`fresh.rs`).
    pub load_batch: String,
    /// A new key's record, its token drawn and its times moved to the clock (`peek.rs`).
    pub insert_new: String,
    /// A batch's new keys at once (`fresh.rs`): `insert_new` over `unnest` of every
    /// column, in the order given (key order, so that two processes never deadlock).
    pub insert_batch: String,
    /// A batch's rows, locked in key order (`commit.rs`).
    pub lock: String,
    /// The clock and `$1` fencing tokens (`commit.rs`).
    pub draw: String,
    /// A batch's new, changed and removed rows (`commit.rs`).
    pub insert: String,
    pub update: String,
    pub delete: String,
    /// Up to `$1` rows due by `$2` or the clock, skipping locked ones (the sweeper).
    pub sweep: String,
}

impl Statements {
    pub(super) fn new(schema: &str) -> Statements {
        Statements {
            load: format!(
                "SELECT {NOW_MILLIS} AS now, {RECORD_COLUMNS} FROM {schema}.records \
                 WHERE ns = $1 AND key = $2"
            ),
            load_batch: format!(
                "SELECT {NOW_MILLIS} AS now, ns, key, {RECORD_COLUMNS} FROM {schema}.records \
                 WHERE (ns, key) IN (SELECT * FROM {UNNEST_KEYS})"
            ),
            // `NOT EXISTS` first: on a key that has a row the statement must not draw a token
            // (a drawn token may make the statement a write that waits for a WAL flush).
            insert_new: format!(
                "INSERT INTO {schema}.records (ns, key, {RECORD_COLUMNS}) \
                 SELECT $1, $2, $3, nextval('{schema}.tokens'), $4, $5, at + $6, at + $7, at + $8, $9, \
                 $10, $11, at + $12, at + $13, $14, $15, at + $16 \
                 FROM (SELECT COALESCE($17, {NOW_MILLIS}) AS at) AS server \
                 WHERE NOT EXISTS (SELECT 1 FROM {schema}.records WHERE ns = $1 AND key = $2) \
                 ON CONFLICT DO NOTHING RETURNING fencing_token, expires_at - $6"
            ),
            insert_batch: format!(
                "INSERT INTO {schema}.records (ns, key, {RECORD_COLUMNS}) \
                 SELECT u.ns, u.key, u.state, nextval('{schema}.tokens'), u.attempt, \
                 u.fingerprint, at + u.expires_at, at + u.claimed_at, at + u.lease_until, \
                 u.claim_ttl, u.checkpoint_step, u.checkpoint_state, at + u.checkpoint_at, \
                 at + u.completed_at, u.response, u.seq_mark, at + u.seq_updated_at \
                 FROM (SELECT COALESCE($18, {NOW_MILLIS}) AS at) AS server, \
                 {UNNEST_ROWS} AS u(ns, key, {RECORD_COLUMNS}) \
                 WHERE NOT EXISTS (SELECT 1 FROM {schema}.records AS r \
                 WHERE r.ns = u.ns AND r.key = u.key) \
                 ON CONFLICT DO NOTHING RETURNING ns, key, fencing_token, expires_at"
            ),
            lock: format!(
                "SELECT ns, key, {RECORD_COLUMNS} FROM {schema}.records \
                 WHERE (ns, key) IN (SELECT * FROM {UNNEST_KEYS}) ORDER BY ns, key FOR UPDATE"
            ),
            draw: format!(
                "SELECT {NOW_MILLIS}, \
                 array(SELECT nextval('{schema}.tokens') FROM generate_series(1, $1))"
            ),
            insert: format!(
                "INSERT INTO {schema}.records (ns, key, {RECORD_COLUMNS}) \
                 SELECT * FROM {UNNEST_ROWS}"
            ),
            update: format!(
                "UPDATE {schema}.records AS r SET ({RECORD_COLUMNS}) = \
                 (u.state, u.fencing_token, u.attempt, u.fingerprint, u.expires_at, \
                 u.claimed_at, u.lease_until, u.claim_ttl, u.checkpoint_step, \
                 u.checkpoint_state, u.checkpoint_at, u.completed_at, u.response, u.seq_mark, \
                 u.seq_updated_at) \
                 FROM {UNNEST_ROWS} AS u(ns, key, {RECORD_COLUMNS}) \
                 WHERE r.ns = u.ns AND r.key = u.key"
            ),
            delete: format!(
                "DELETE FROM {schema}.records WHERE (ns, key) IN (SELECT * FROM {UNNEST_KEYS})"
            ),
            sweep: format!(
                "DELETE FROM {schema}.records WHERE (ns, key) IN (SELECT ns, key \
                 FROM {schema}.records WHERE expires_at <= COALESCE($2, {NOW_MILLIS}) \
                 ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
        }
    }
}
