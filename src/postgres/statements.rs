//! SQL texts the engine runs on every call, built once per schema rather than on each call.

use super::clock::NOW_MILLIS;
use super::row::RECORD_COLUMNS;

/// Every column of a batch's rows as arrays `$1` to `$17` (`columns.rs`), one row each.
const UNNEST_ROWS: &str = "unnest($1::smallint[], $2::bytea[], $3::smallint[], \
     $4::bigint[], $5::bigint[], $6::bytea[], $7::bigint[], $8::bigint[], $9::bigint[], \
     $10::bigint[], $11::text[], $12::bytea[], $13::bigint[], $14::bigint[], $15::bytea[], \
     $16::bigint[], $17::bigint[])";

/// A query that takes the advisory locks of the ids in the array parameter `$param`
/// (`key_lock.rs`), in the array's order, and answers one row (their count).
fn lock_keys(param: u8) -> String {
    format!("SELECT count(*) FROM unnest(${param}::bigint[]) AS id, pg_advisory_xact_lock(id)")
}

/// Keys as arrays `$1` (namespaces) and `$2` (keys).
const UNNEST_KEYS: &str = "unnest($1::smallint[], $2::bytea[])";

/// The statements of the engine's calls in one schema.
pub(super) struct Statements {
    /// The server's clock alone (`Engine::now` before any statement measured it).
    pub clock: String,
    /// One key's record, its row version (`xmin`) and the clock (`peek.rs`).
    pub load: String,
    /// `load` of several keys, each row with its key (`fresh.rs`).
    pub load_batch: String,
    /// A new key's record, its token drawn under the key's lock `$18` and its times moved to
    /// the clock (`peek.rs`).
    pub insert_new: String,
    /// One key's record replaced in autocommit if its row is still the version `$18` that
    /// `load` read, and waiters told (`pg_notify($19, $20)`) when `$20` is not `NULL`: a row
    /// when it was replaced, none when another write got there first (`peek.rs`).
    pub update_unchanged: String,
    /// One key's row removed in autocommit if it is still the version `$3`, and waiters told
    /// (`pg_notify($4, $5)`) when `$5` is not `NULL`: a row when it was removed (`peek.rs`).
    pub delete_unchanged: String,
    /// A batch's new keys at once (`fresh.rs`): `insert_new` over `unnest` of every
    /// column, in the order given, the keys' locks `$19` taken first.
    pub insert_batch: String,
    /// The locks of a batch's keys, ids `$1` (`key_lock.rs`), before its rows (`commit.rs`).
    pub lock_keys: String,
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
    /// Live idempotency records from key `$2` up to `$3` (`NULL`: no bound), live by `$4` or
    /// the clock, at most `$5`, in key order (`reads.rs`).
    pub list: String,
    /// Whether a row is live at `$1`.
    pub any_live: String,
    /// How many rows, and how many of them due by `$1`.
    pub counts: String,
    /// How many rows are in state `$1`.
    pub count_state: String,
    /// Every row with its key, in key order.
    pub every_row: String,
    /// The last fencing token drawn, 0 before the first.
    pub last_token: String,
}

impl Statements {
    pub(super) fn new(schema: &str) -> Statements {
        Statements {
            clock: format!("SELECT {NOW_MILLIS}"),
            load: format!(
                "SELECT {NOW_MILLIS} AS now, xmin::text::bigint AS version, {RECORD_COLUMNS} \
                 FROM {schema}.records WHERE ns = $1 AND key = $2"
            ),
            load_batch: format!(
                "SELECT {NOW_MILLIS} AS now, ns, key, {RECORD_COLUMNS} FROM {schema}.records \
                 WHERE (ns, key) IN (SELECT * FROM {UNNEST_KEYS})"
            ),
            // The key's lock (`key_lock.rs`) before the clock is read and the token drawn.
            // `NOT EXISTS`: on a key that has a row the statement must not draw a token (a
            // drawn token may make the statement a write that waits for a WAL flush).
            insert_new: format!(
                "INSERT INTO {schema}.records (ns, key, {RECORD_COLUMNS}) \
                 SELECT $1, $2, $3, nextval('{schema}.tokens'), $4, $5, at + $6, at + $7, at + $8, $9, \
                 $10, $11, at + $12, at + $13, $14, $15, at + $16 \
                 FROM (SELECT COALESCE($17, {NOW_MILLIS}) AS at \
                 FROM pg_advisory_xact_lock($18)) AS server \
                 WHERE NOT EXISTS (SELECT 1 FROM {schema}.records WHERE ns = $1 AND key = $2) \
                 ON CONFLICT DO NOTHING RETURNING fencing_token, expires_at - $6"
            ),
            // Every write of the row makes a new row version with a new `xmin`, so an unchanged
            // `xmin` means the record is the one the rules decided on.
            update_unchanged: format!(
                "WITH changed AS (UPDATE {schema}.records SET ({RECORD_COLUMNS}) = \
                 ($3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
                 WHERE ns = $1 AND key = $2 AND xmin::text::bigint = $18 RETURNING 1) \
                 SELECT 1 FROM changed LEFT JOIN LATERAL \
                 (SELECT pg_notify($19, $20) WHERE $20::text IS NOT NULL) AS told ON true"
            ),
            delete_unchanged: format!(
                "WITH gone AS (DELETE FROM {schema}.records \
                 WHERE ns = $1 AND key = $2 AND xmin::text::bigint = $3 RETURNING 1) \
                 SELECT 1 FROM gone LEFT JOIN LATERAL \
                 (SELECT pg_notify($4, $5) WHERE $5::text IS NOT NULL) AS told ON true"
            ),
            insert_batch: format!(
                "INSERT INTO {schema}.records (ns, key, {RECORD_COLUMNS}) \
                 SELECT u.ns, u.key, u.state, nextval('{schema}.tokens'), u.attempt, \
                 u.fingerprint, at + u.expires_at, at + u.claimed_at, at + u.lease_until, \
                 u.claim_ttl, u.checkpoint_step, u.checkpoint_state, at + u.checkpoint_at, \
                 at + u.completed_at, u.response, u.seq_mark, at + u.seq_updated_at \
                 FROM (SELECT COALESCE($18, {NOW_MILLIS}) AS at FROM ({held}) AS held) \
                 AS server, {UNNEST_ROWS} AS u(ns, key, {RECORD_COLUMNS}) \
                 WHERE NOT EXISTS (SELECT 1 FROM {schema}.records AS r \
                 WHERE r.ns = u.ns AND r.key = u.key) \
                 ON CONFLICT DO NOTHING RETURNING ns, key, fencing_token, expires_at",
                held = lock_keys(19)
            ),
            lock_keys: lock_keys(1),
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
            // The due rows found through `expires_at` and removed by their row address: the
            // rows are locked, so their addresses hold until the statement ends. The cutoff is
            // a subquery, read once: the clock is volatile, and compared directly it would be a
            // filter on every row of the index rather than the bound of the index scan, so a
            // sweep that finds fewer due rows than its limit would read the whole index.
            sweep: format!(
                "DELETE FROM {schema}.records AS r USING (SELECT ctid AS row_address \
                 FROM {schema}.records WHERE expires_at <= (SELECT COALESCE($2, {NOW_MILLIS})) \
                 ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) AS due \
                 WHERE r.ctid = due.row_address"
            ),
            list: format!(
                "SELECT key, {RECORD_COLUMNS} FROM {schema}.records WHERE ns = $1 AND key >= $2 \
                 AND ($3::bytea IS NULL OR key < $3) \
                 AND expires_at > (SELECT COALESCE($4, {NOW_MILLIS})) \
                 ORDER BY key LIMIT $5"
            ),
            any_live: format!(
                "SELECT EXISTS (SELECT 1 FROM {schema}.records WHERE expires_at > $1)"
            ),
            counts: format!(
                "SELECT count(*), count(*) FILTER (WHERE expires_at <= $1) FROM {schema}.records"
            ),
            count_state: format!("SELECT count(*) FROM {schema}.records WHERE state = $1"),
            every_row: format!(
                "SELECT ns, key, {RECORD_COLUMNS} FROM {schema}.records ORDER BY ns, key"
            ),
            last_token: format!(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {schema}.tokens"
            ),
        }
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::postgres::pool::PooledClient;
    use crate::postgres::{Pool, Runtime, open_schema, query_error};
    use crate::testing::postgres::TestCluster;
    use std::sync::Arc;
    use tokio_postgres::types::{ToSql, Type};

    /// Every statement of the engine that reads `records`, with its parameters' types and
    /// values to plan it with.
    fn statements(sql: &Statements) -> Vec<(&'static str, &str, String, String)> {
        let scalars = "smallint, bytea, smallint, bigint, bytea, bigint, bigint, bigint, bigint, \
                       text, bytea, bigint, bigint, bytea, bigint, bigint";
        let arrays = "smallint[], bytea[], smallint[], bigint[], bigint[], bytea[], bigint[], \
                      bigint[], bigint[], bigint[], text[], bytea[], bigint[], bigint[], bytea[], \
                      bigint[], bigint[]";
        let row = "1, 'k', 2, 1, NULL, 1, NULL, NULL, NULL, NULL, NULL, NULL, 0, 'r', NULL, NULL";
        let rows = "'{1}', '{k}', '{2}', '{7}', '{1}', '{NULL}', '{1}', '{NULL}', '{NULL}', \
                    '{NULL}', '{NULL}', '{NULL}', '{NULL}', '{0}', '{r}', '{NULL}', '{NULL}'";
        let keys = (
            "smallint[], bytea[]".to_string(),
            "'{1}', '{k}'".to_string(),
        );
        vec![
            ("load", &sql.load, "smallint, bytea".into(), "1, 'k'".into()),
            (
                "load_batch",
                &sql.load_batch,
                keys.0.clone(),
                keys.1.clone(),
            ),
            (
                "insert_new",
                &sql.insert_new,
                format!("{scalars}, bigint, bigint"),
                format!("{row}, NULL, 7"),
            ),
            (
                "update_unchanged",
                &sql.update_unchanged,
                "smallint, bytea, smallint, bigint, bigint, bytea, bigint, bigint, bigint, \
                 bigint, text, bytea, bigint, bigint, bytea, bigint, bigint, bigint, text, text"
                    .into(),
                "1, 'k', 2, 7, 1, NULL, 1, NULL, NULL, NULL, NULL, NULL, NULL, 0, 'r', NULL, \
                 NULL, 5, 'c', NULL"
                    .into(),
            ),
            (
                "delete_unchanged",
                &sql.delete_unchanged,
                "smallint, bytea, bigint, text, text".into(),
                "1, 'k', 5, 'c', NULL".into(),
            ),
            (
                "insert_batch",
                &sql.insert_batch,
                format!("{arrays}, bigint, bigint[]"),
                format!("{rows}, NULL, '{{7}}'"),
            ),
            ("lock", &sql.lock, keys.0.clone(), keys.1.clone()),
            ("insert", &sql.insert, arrays.into(), rows.into()),
            ("update", &sql.update, arrays.into(), rows.into()),
            ("delete", &sql.delete, keys.0, keys.1),
            (
                "sweep",
                &sql.sweep,
                "bigint, bigint".into(),
                "100, NULL".into(),
            ),
            ("any_live", &sql.any_live, "bigint".into(), "0".into()),
            (
                "list",
                &sql.list,
                "smallint, bytea, bytea, bigint, bigint".into(),
                "1, 'k', NULL, NULL, 10".into(),
            ),
        ]
    }

    /// Runs `test` on a connection to a new database `db` on a throwaway server, with the
    /// engine's schema made in it, given the schema's statements and quoted name; `None` when
    /// no server can be started here.
    fn on_new_schema<T, F, Fut>(db: &str, test: F) -> crate::Result<Option<T>>
    where
        T: Send + 'static,
        F: FnOnce(PooledClient, Statements, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = crate::Result<T>> + Send,
    {
        let Some(cluster) = TestCluster::start() else {
            return Ok(None);
        };
        let pool = Arc::new(Pool::new(&cluster.create_database(db), 1)?);
        let runtime = Runtime::new()?;
        runtime
            .call(async move {
                let mut client = pool.get().await?;
                let schema = open_schema(client.client_mut(), "dedupe", true)
                    .await?
                    .quoted;
                test(client, Statements::new(&schema), schema).await
            })
            .map(Some)
    }

    /// Every row a batch's `INSERT` stores gets the one time the statement read from the
    /// server's clock, and each row's times keep the distances the rules gave them (lease,
    /// expiry): the clock is read once per statement, not once per row or per column.
    #[test]
    fn a_batch_stores_its_new_keys_at_one_server_time() -> crate::Result<()> {
        let times = on_new_schema("one_time", async |client, sql, schema| {
            let failed = |err| query_error("run a statement", err);
            // 3,000 keys claimed by one batch `INSERT`, each with a lease of 5 s and a TTL of
            // 60 s from the statement's time.
            let rows = 3_000i64;
            let each = |value: i64| vec![value; 3_000];
            let none_i64 = vec![None::<i64>; 3_000];
            let none_bytes = vec![None::<Vec<u8>>; 3_000];
            let none_text = vec![None::<String>; 3_000];
            let (ns, state) = (vec![107i16; 3_000], vec![1i16; 3_000]);
            let keys: Vec<Vec<u8>> = (0..rows).map(|n| n.to_be_bytes().to_vec()).collect();
            let (token, attempt, expires, claimed) = (each(0), each(1), each(60_000), each(0));
            let (lease, ttl) = (each(5_000), each(60_000));
            let ids: Vec<i64> = (0..rows).collect();
            let test_now: Option<i64> = None;
            let mut types = crate::postgres::columns::COLUMN_TYPES.to_vec();
            types.extend([Type::INT8, Type::INT8_ARRAY]);
            let insert = client
                .prepare_typed(&sql.insert_batch, &types)
                .await
                .map_err(failed)?;
            let params: [&(dyn ToSql + Sync); 19] = [
                &ns,
                &keys,
                &state,
                &token,
                &attempt,
                &none_bytes,
                &expires,
                &claimed,
                &lease,
                &ttl,
                &none_text,
                &none_bytes,
                &none_i64,
                &none_i64,
                &none_bytes,
                &none_i64,
                &none_i64,
                &test_now,
                &ids,
            ];
            client.execute(&insert, &params).await.map_err(failed)?;
            let row = client
                .query_one(
                    &format!(
                        "SELECT count(*), count(DISTINCT claimed_at), \
                         count(*) FILTER (WHERE lease_until - claimed_at <> 5000 \
                         OR expires_at - claimed_at <> 60000) FROM {schema}.records"
                    ),
                    &[],
                )
                .await
                .map_err(failed)?;
            let times: (i64, i64, i64) = (
                row.try_get(0).map_err(failed)?,
                row.try_get(1).map_err(failed)?,
                row.try_get(2).map_err(failed)?,
            );
            Ok(times)
        })?;
        let Some(times) = times else {
            return Ok(());
        };
        assert_eq!(
            times,
            (3_000, 1, 0),
            "(rows, distinct claim times, rows whose lease or expiry is off the rules)"
        );
        Ok(())
    }

    /// A prepared statement keeps the plan the server made for it. The store's connections
    /// must make plans that find rows by their key or expiry, never by reading the whole
    /// table (or the whole expiry index), even when the plan is made on an empty table and
    /// then used on a large one.
    #[test]
    fn plans_made_on_an_empty_table_still_find_rows_by_index_on_a_large_one() -> crate::Result<()> {
        let plans = on_new_schema("plans", async |client, sql, schema| {
            let failed = |err| query_error("plan a statement", err);
            // Every use of a prepared statement with the plan made at its first use.
            client
                .batch_execute("SET plan_cache_mode = force_generic_plan")
                .await
                .map_err(failed)?;
            let explain = async |name: &str, values: &str| {
                let rows = client
                    .simple_query(&format!("EXPLAIN EXECUTE {name}({values})"))
                    .await
                    .map_err(failed)?;
                let lines: Vec<String> = rows
                    .iter()
                    .filter_map(|message| match message {
                        tokio_postgres::SimpleQueryMessage::Row(row) => {
                            row.get(0).map(str::to_string)
                        }
                        _ => None,
                    })
                    .collect();
                Ok::<_, crate::Error>(lines.join("\n"))
            };
            for (name, text, types, values) in statements(&sql) {
                client
                    .batch_execute(&format!("PREPARE {name}({types}) AS {text}"))
                    .await
                    .map_err(failed)?;
                // Planned now, on the empty table.
                explain(name, &values).await?;
            }
            client
                .batch_execute(&format!(
                    "INSERT INTO {schema}.records (ns, key, state, fencing_token, attempt, \
                     expires_at, completed_at, response) \
                     SELECT 1, int8send(n), 2, n, 1, n, 0, 'r' \
                     FROM generate_series(1, 20000) AS n"
                ))
                .await
                .map_err(failed)?;
            let mut plans = Vec::new();
            for (name, _, _, values) in statements(&sql) {
                plans.push((name, explain(name, &values).await?));
            }
            Ok(plans)
        })?;
        let Some(plans) = plans else {
            return Ok(());
        };
        assert_eq!(plans.len(), 13);
        for (name, plan) in plans {
            // A hash or merge join reads all of one side: here, the table.
            for whole_table in ["Seq Scan", "Hash Cond", "Merge Cond"] {
                assert!(
                    !plan.contains(whole_table),
                    "{name} reads the whole table ({whole_table}):\n{plan}"
                );
            }
            assert!(
                plan.contains("Index") || plan.contains("Tid Scan") || name == "insert",
                "{name} finds its rows by an index:\n{plan}"
            );
            // The sweep's cutoff bounds its scan of the expiry index: as a mere filter, every
            // sweep that finds fewer due rows than its limit would read the whole index.
            assert!(
                name != "sweep" || plan.contains("Index Cond: (expires_at <="),
                "{name} bounds its index scan by the cutoff:\n{plan}"
            );
        }
        Ok(())
    }
}
