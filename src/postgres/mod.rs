//! The PostgreSQL engine under a [`Store`](crate::Store) (feature `postgres`):
//!
//! - `engine`: the engine: writes alone or in group commit, sweeps, waits;
//! - `peek`: answers with no commit: one key's read, a new key's one `INSERT`; `freshness`:
//!   which of the two a claim tries first;
//! - `reads`: a prefix's live keys, counts, every row;
//! - `commit`: one batch in one transaction (lock, draw tokens, decide, write, notify);
//!   `fresh`: a batch's new keys in one `INSERT` before it; `key_lock`: the lock every
//!   token of a key is drawn under;
//! - `columns`: a batch's rows column by column, written by one statement;
//! - `listen`: LISTEN/NOTIFY, so waiters wake when another process ends a claim;
//! - `runtime`: the tokio runtime the engine owns; `pool`: its connections;
//! - `schema`: the tables, created on first open, and the version check;
//! - `statements`: the one-key statements' SQL, built once per schema;
//! - `row`: a [`Record`](crate::record::Record) as a row of `records`, and back;
//! - `clock`: the server's clock in SQL; `error`: PostgreSQL's errors as the store's.
//!
//! Callers are synchronous; every database call runs on the engine's own runtime
//! (`runtime.rs`) and the caller waits for its answer, so the store can be used from inside
//! another tokio runtime. Nothing outside this folder reaches past this file.

mod clock;
mod columns;
mod commit;
mod engine;
mod error;
mod fresh;
mod freshness;
mod key_lock;
mod listen;
mod peek;
mod pool;
mod reads;
mod row;
mod runtime;
mod schema;
mod session;
mod statements;

pub(crate) use engine::{Engine, Settings};
pub(crate) use schema::DEFAULT_SCHEMA;

#[cfg(feature = "testing")]
pub(crate) use error::query_error;
#[cfg(feature = "testing")]
pub(crate) use pool::Pool;
#[cfg(feature = "testing")]
pub(crate) use runtime::Runtime;
#[cfg(feature = "testing")]
pub(crate) use schema::open_schema;
