//! The PostgreSQL engine's foundation (feature `postgres`): the tokio runtime it owns, its
//! connection pool, its schema, and the conversion between a [`Record`](crate::record::Record)
//! and a row of its `records` table.
//!
//! Callers are synchronous; every database call runs on the engine's own runtime
//! (`runtime.rs`) and the caller waits for its answer, so the store can be used from inside
//! another tokio runtime. Nothing outside this folder reaches past this file.
// Used by the engine, next step: nothing in `Store` calls into this folder yet.
#![allow(dead_code, unused_imports)]

mod clock;
mod error;
mod pool;
mod row;
mod runtime;
mod schema;

pub(crate) use clock::NOW_MILLIS;
pub(crate) use error::{connect_error, query_error};
pub(crate) use pool::{Pool, PooledClient};
pub(crate) use row::{RECORD_COLUMNS, RecordRow, RowError, from_row, to_row};
pub(crate) use runtime::Runtime;
pub(crate) use schema::{DEFAULT_SCHEMA, SCHEMA_VERSION, SchemaInfo, open_schema};
