//! The engine's tables inside one PostgreSQL schema (`dedupe` by default): creating them on
//! first open, and refusing a schema this build cannot use.
//!
//! - `meta(name, value)`: `version` (the schema version, [`SCHEMA_VERSION`]) and `store_id`
//!   (a random id made once, the redb file's `store_id` counterpart).
//! - `records`: one row per key, as `row.rs` lays out a record, keyed by namespace and key,
//!   with an index on `expires_at` for the sweeper.
//! - `tokens`: the sequence fencing tokens are drawn from.
//!
//! Opening takes a transaction-level advisory lock keyed by the schema's name, so processes
//! that open the same schema at once create it once and never see it half made; `meta` is
//! written last, in the same transaction, so a schema that has it is complete.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::error::query_error;
use crate::error::{DatabaseErrorKind, Error, Result};

/// The schema the engine uses when the caller names none.
pub(crate) const DEFAULT_SCHEMA: &str = "dedupe";

/// The version of the tables this build creates and reads.
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// The first key of the advisory lock taken while opening ("ddup"); the second is the hash of
/// the schema's name, so opening different schemas does not serialise.
const LOCK_CLASS: i32 = 0x6464_7570;

const ACTION: &str = "open the schema";

/// The columns of `records` and their types as `information_schema` names them.
const RECORDS_SHAPE: [(&str, &str); 17] = [
    ("ns", "smallint"),
    ("key", "bytea"),
    ("state", "smallint"),
    ("fencing_token", "bigint"),
    ("attempt", "bigint"),
    ("fingerprint", "bytea"),
    ("expires_at", "bigint"),
    ("claimed_at", "bigint"),
    ("lease_until", "bigint"),
    ("claim_ttl", "bigint"),
    ("checkpoint_step", "text"),
    ("checkpoint_state", "bytea"),
    ("checkpoint_at", "bigint"),
    ("completed_at", "bigint"),
    ("response", "bytea"),
    ("seq_mark", "bigint"),
    ("seq_updated_at", "bigint"),
];

/// What opening a schema found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchemaInfo {
    /// The schema's name, quoted for use in statements (`"dedupe"`).
    pub quoted: String,
    /// The store's random id, made when the schema was created.
    pub store_id: u64,
    /// Whether this open created the tables.
    pub created: bool,
}

/// Checks that `name` can name the engine's schema: 1 to 63 bytes of lowercase ASCII letters,
/// digits and `_`, not starting with a digit nor with `pg_` (reserved by PostgreSQL). Quoting
/// such a name changes nothing, so it reads the same in `psql`.
///
/// # Errors
/// [`Error::InvalidConfig`] otherwise.
pub(crate) fn check_schema_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with("pg_")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidConfig {
            reason: format!(
                "invalid PostgreSQL schema name {name:?}: use 1 to 63 lowercase letters, digits \
                 and underscores, not starting with a digit or pg_"
            ),
        })
    }
}

/// Opens the engine's tables in schema `name`, creating them if the schema has none and
/// `create` allows it.
///
/// # Errors
/// - [`Error::InvalidConfig`] when `name` is not a valid schema name.
/// - [`Error::Database`] of kind `SchemaTooNew` when a newer build wrote the schema,
///   `SchemaShape` when its tables are not the engine's, `Permission` when the role may not
///   create or use them, `SchemaMissing` when it has none and `create` is false, and the
///   connection's kinds when the server fails.
pub(crate) async fn open_schema(
    client: &mut Client,
    name: &str,
    create: bool,
) -> Result<SchemaInfo> {
    check_schema_name(name)?;
    let quoted = format!("\"{name}\"");
    let tx = client.transaction().await.map_err(schema_error)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&LOCK_CLASS, &name],
    )
    .await
    .map_err(schema_error)?;
    let has_meta: bool = exists(
        &tx,
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables \
             WHERE schemaname = $1 AND tablename = 'meta')",
        name,
    )
    .await?;
    let created = !has_meta;
    if created && !create {
        return Err(Error::Database {
            action: "open the store",
            kind: DatabaseErrorKind::SchemaMissing,
            message: format!(
                "schema {quoted} holds no dedupe store, and creating one was not allowed"
            ),
            source: None,
        });
    }
    if created {
        // `CREATE SCHEMA IF NOT EXISTS` needs CREATE on the database even when the schema
        // exists, so a role given a schema of its own beforehand must not run it.
        let has_schema: bool = exists(
            &tx,
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
            name,
        )
        .await?;
        if !has_schema {
            tx.batch_execute(&format!("CREATE SCHEMA {quoted}"))
                .await
                .map_err(schema_error)?;
        }
        tx.batch_execute(&create_statements(&quoted))
            .await
            .map_err(schema_error)?;
    }
    let store_id = read_meta(&tx, &quoted).await?;
    check_shape(&tx, name).await?;
    tx.commit().await.map_err(schema_error)?;
    Ok(SchemaInfo {
        quoted,
        store_id,
        created,
    })
}

/// Whether the catalogue query `sql` (a `SELECT EXISTS` over `$1`, the schema's name) finds
/// what it looks for.
async fn exists(tx: &tokio_postgres::Transaction<'_>, sql: &str, name: &str) -> Result<bool> {
    tx.query_one(sql, &[&name])
        .await
        .map_err(schema_error)?
        .try_get(0)
        .map_err(schema_error)
}

/// Every table, index and sequence, then `meta` with its rows. `IF NOT EXISTS` on all but
/// `meta`, so that a schema whose creation was never finished, or another program's table of
/// the same name, is then judged by the shape check rather than failing here.
fn create_statements(schema: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.records (
             ns smallint NOT NULL,
             key bytea NOT NULL,
             state smallint NOT NULL,
             fencing_token bigint NOT NULL,
             attempt bigint NOT NULL,
             fingerprint bytea,
             expires_at bigint NOT NULL,
             claimed_at bigint,
             lease_until bigint,
             claim_ttl bigint,
             checkpoint_step text,
             checkpoint_state bytea,
             checkpoint_at bigint,
             completed_at bigint,
             response bytea,
             seq_mark bigint,
             seq_updated_at bigint,
             PRIMARY KEY (ns, key)
         );
         CREATE INDEX IF NOT EXISTS records_expires_at ON {schema}.records (expires_at);
         CREATE SEQUENCE IF NOT EXISTS {schema}.tokens AS bigint MINVALUE 1;
         CREATE TABLE {schema}.meta (name text PRIMARY KEY, value bigint NOT NULL);
         INSERT INTO {schema}.meta (name, value) VALUES
             ('version', {SCHEMA_VERSION}),
             ('store_id', ('x' || substr(md5(gen_random_uuid()::text), 1, 16))::bit(64)::bigint);"
    )
}

/// The store's id, once `meta` says the schema is a version this build reads.
async fn read_meta(tx: &tokio_postgres::Transaction<'_>, schema: &str) -> Result<u64> {
    let rows = tx
        .query(&format!("SELECT name, value FROM {schema}.meta"), &[])
        .await
        .map_err(schema_error)?;
    let mut version = None;
    let mut store_id = None;
    for row in &rows {
        let name: &str = row.try_get(0).map_err(schema_error)?;
        let value: i64 = row.try_get(1).map_err(schema_error)?;
        match name {
            "version" => version = Some(value),
            "store_id" => store_id = Some(value),
            _ => {}
        }
    }
    let version = version.ok_or_else(|| shape_error(format!("{schema}.meta has no version")))?;
    if version > i64::from(SCHEMA_VERSION) {
        return Err(Error::Database {
            action: ACTION,
            kind: DatabaseErrorKind::SchemaTooNew {
                found: u32::try_from(version).unwrap_or(u32::MAX),
                supported: SCHEMA_VERSION,
            },
            message: format!("{schema}.meta says version {version}; nothing was changed"),
            source: None,
        });
    }
    if version != i64::from(SCHEMA_VERSION) {
        return Err(shape_error(format!(
            "{schema}.meta says version {version}, which no build wrote"
        )));
    }
    let store_id = store_id.ok_or_else(|| shape_error(format!("{schema}.meta has no store_id")))?;
    Ok(u64::from_ne_bytes(store_id.to_ne_bytes()))
}

/// Fails unless `records` has exactly the columns of [`RECORDS_SHAPE`] and `tokens` exists.
async fn check_shape(tx: &tokio_postgres::Transaction<'_>, schema: &str) -> Result<()> {
    let rows = tx
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = 'records'",
            &[&schema],
        )
        .await
        .map_err(schema_error)?;
    let mut found = Vec::with_capacity(rows.len());
    for row in &rows {
        let column: String = row.try_get(0).map_err(schema_error)?;
        let data_type: String = row.try_get(1).map_err(schema_error)?;
        found.push((column, data_type));
    }
    for (column, data_type) in RECORDS_SHAPE {
        match found.iter().find(|(name, _)| name == column) {
            None => {
                return Err(shape_error(format!(
                    "\"{schema}\".records has no column {column}"
                )));
            }
            Some((_, actual)) if actual != data_type => {
                return Err(shape_error(format!(
                    "\"{schema}\".records.{column} is {actual}, not {data_type}"
                )));
            }
            Some(_) => {}
        }
    }
    if let Some((column, _)) = found
        .iter()
        .find(|(name, _)| !RECORDS_SHAPE.iter().any(|(known, _)| known == name))
    {
        return Err(shape_error(format!(
            "\"{schema}\".records has a column {column} this build does not know"
        )));
    }
    let has_tokens: bool = exists(
        tx,
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_sequences \
             WHERE schemaname = $1 AND sequencename = 'tokens')",
        schema,
    )
    .await?;
    if has_tokens {
        Ok(())
    } else {
        Err(shape_error(format!("\"{schema}\".tokens does not exist")))
    }
}

fn shape_error(message: String) -> Error {
    Error::Database {
        action: ACTION,
        kind: DatabaseErrorKind::SchemaShape,
        message,
        source: None,
    }
}

/// A server error while opening; a table or column of the wrong name or type means the
/// schema is not ours.
fn schema_error(err: tokio_postgres::Error) -> Error {
    let wrong_shape = err.code().is_some_and(|code| {
        *code == SqlState::UNDEFINED_COLUMN
            || *code == SqlState::UNDEFINED_TABLE
            || *code == SqlState::DATATYPE_MISMATCH
            || *code == SqlState::WRONG_OBJECT_TYPE
    });
    match query_error(ACTION, err) {
        Error::Database {
            action,
            message,
            source,
            ..
        } if wrong_shape => Error::Database {
            action,
            kind: DatabaseErrorKind::SchemaShape,
            message,
            source,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["dedupe", "_x", "tenant_7", &"a".repeat(63)] {
            assert!(check_schema_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Dedupe",
            "7tenant",
            "pg_dedupe",
            "a\"b",
            "a b",
            "dé",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(check_schema_name(bad), Err(Error::InvalidConfig { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_created_table_has_the_checked_shape() {
        let statements = create_statements("\"dedupe\"");
        for (column, data_type) in RECORDS_SHAPE {
            assert!(
                statements.contains(&format!("{column} {data_type}")),
                "{column} {data_type}"
            );
        }
    }
}
