//! SQL texts the engine runs on every call, built once per schema rather than on each call.

use super::clock::NOW_MILLIS;
use super::row::RECORD_COLUMNS;

/// The statements of the one-key read and the one-statement insert of a new key (`peek.rs`) in a schema, built once.
pub(super) struct Statements {
    pub load: String,
    pub insert_new: String,
}

impl Statements {
    pub(super) fn new(schema: &str) -> Statements {
        Statements {
            load: format!(
                "SELECT {NOW_MILLIS} AS now, {RECORD_COLUMNS} FROM {schema}.records \
                 WHERE ns = $1 AND key = $2"
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
        }
    }
}
