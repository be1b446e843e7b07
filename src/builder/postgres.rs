//! Opening a store on PostgreSQL (feature `postgres`): the same [`Store`], its records in a
//! database that several processes and hosts share.

use std::time::Duration;

use super::StoreBuilder;
use crate::config::Durability;
use crate::error::{Error, Result};
use crate::store::Store;

use crate::postgres::DEFAULT_SCHEMA;

/// Connections a store opens at most unless [`StoreBuilder::postgres_connections`] says.
const DEFAULT_CONNECTIONS: usize = 16;

/// The most connections a store may be given.
const MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, Clone)]
pub(super) struct PostgresSettings {
    schema: String,
    connections: usize,
    create: bool,
    connect_timeout: Option<Duration>,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        PostgresSettings {
            schema: DEFAULT_SCHEMA.to_string(),
            connections: DEFAULT_CONNECTIONS,
            create: true,
            connect_timeout: None,
        }
    }
}

impl StoreBuilder {
    /// The PostgreSQL schema the store's tables live in (created on first open). Default:
    /// `dedupe`. Stores in different schemas of one database share nothing.
    pub fn postgres_schema(mut self, schema: impl Into<String>) -> StoreBuilder {
        self.postgres.schema = schema.into();
        self
    }

    /// How many connections the store opens at most (made as calls need them). Default: 16.
    pub fn postgres_connections(mut self, connections: usize) -> StoreBuilder {
        self.postgres.connections = connections;
        self
    }

    /// Whether opening creates the store's schema and tables when the schema holds none
    /// (default: true). A program that only reads or maintains a store someone else made
    /// turns it off, so that a mistyped schema name is an error rather than a new, empty
    /// store: [`Error::Database`] of kind
    /// [`SchemaMissing`](crate::DatabaseErrorKind::SchemaMissing).
    ///
    /// ```no_run
    /// use dedupe_store::{DatabaseErrorKind, Error, Store};
    ///
    /// match Store::builder()
    ///     .postgres_schema("payments")
    ///     .postgres_create_schema(false)
    ///     .open_postgres("postgres://ops@db.internal/app")
    /// {
    ///     Ok(store) => println!("{} live keys", store.stats()?.live_keys),
    ///     Err(Error::Database { kind: DatabaseErrorKind::SchemaMissing, .. }) => {
    ///         eprintln!("no store in schema payments")
    ///     }
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    pub fn postgres_create_schema(mut self, create: bool) -> StoreBuilder {
        self.postgres.create = create;
        self
    }

    /// How long one connection attempt may take, from the TCP connect to the end of the
    /// login, before it fails with [`Error::Database`] of kind
    /// [`Connect`](crate::DatabaseErrorKind::Connect). Default: the URL's `connect_timeout`,
    /// else 10 seconds. Set, it replaces the URL's.
    ///
    /// Opening the store connects, and so does any call that finds no idle connection (after
    /// the server restarted, say): a call against a server that stopped answering waits this
    /// long at most. A program that renews leases should keep it well under the renewal
    /// interval, so that a renewal that could not connect leaves time for the next one.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use dedupe_store::Store;
    ///
    /// let store = Store::builder()
    ///     .postgres_connect_timeout(Duration::from_secs(2))
    ///     .open_postgres("postgres://app@db.internal/app")?;
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    pub fn postgres_connect_timeout(mut self, timeout: Duration) -> StoreBuilder {
        self.postgres.connect_timeout = Some(timeout);
        self
    }

    /// Opens the store on the PostgreSQL database `url` names (`postgres://user:pass@host/db`
    /// or a `key=value` connection string), creating its tables on first open.
    ///
    /// The store behaves as on a file (docs/SEMANTICS.md), with these differences: leases and
    /// TTLs go by the database server's clock, so every host agrees (unless [`clock`] sets
    /// one, for tests); every commit is durable (`synchronous_commit = on`), so
    /// [`Durability::Periodic`] is refused; and a lost connection fails the calls in flight
    /// with [`Error::Database`], none of them acknowledged, while the store connects again by
    /// itself.
    ///
    /// [`clock`]: StoreBuilder::clock
    ///
    /// ```no_run
    /// use dedupe_store::{Claim, Store};
    ///
    /// let store = Store::builder().open_postgres("postgres://app@db.internal/app")?;
    /// if let Claim::Acquired(ticket) = store.claim("charge:order-42")? {
    ///     store.complete(&ticket, b"charged")?;
    /// }
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a malformed URL, schema name or setting;
    /// [`Error::Database`] when the server cannot be reached or refuses (its
    /// [`kind`](crate::DatabaseErrorKind) says why: connection, authentication, permission, a
    /// schema written by a newer version or tables of another shape).
    pub fn open_postgres(self, url: &str) -> Result<Store> {
        let config = self.config()?;
        if let Durability::Periodic(_) = config.durability {
            return Err(Error::InvalidConfig {
                reason: "Durability::Periodic is for store files; over PostgreSQL every commit \
                         is durable"
                    .to_string(),
            });
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.postgres.connections) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "postgres_connections is {}; it must be 1 to {MAX_CONNECTIONS}",
                    self.postgres.connections
                ),
            });
        }
        if self.postgres.connect_timeout == Some(Duration::ZERO) {
            return Err(Error::InvalidConfig {
                reason: "postgres_connect_timeout must be longer than zero".to_string(),
            });
        }
        let settings = crate::postgres::Settings {
            url: url.to_string(),
            schema: self.postgres.schema.clone(),
            connections: self.postgres.connections,
            create: self.postgres.create,
            connect_timeout: self.postgres.connect_timeout,
        };
        let engine = crate::postgres::Engine::open(settings, config, self.clock.clone())?;
        Store::on(crate::engine::Engine::Postgres(engine))
    }
}
