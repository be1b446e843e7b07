//! A fixed-size pool of connections. A connection is made when the pool has none idle, and
//! one found closed (the server restarted, the network dropped) is discarded and replaced on
//! the next [`Pool::get`], so the engine reconnects by itself.
//!
//! Hand-written rather than a pool crate: the engine needs a bounded set of clients, each
//! prepared the same way on connect, and nothing else.

use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::OnceLock;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config, NoTls, Statement};

use super::error::{connect_error, query_error};
use crate::error::{Error, Result};

/// How long a connection attempt may take when the URL sets no `connect_timeout`: long enough
/// for a server across a slow network, short enough that a call to a dead host fails instead of
/// hanging.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Statements every connection runs before its first use. `synchronous_commit = on` whatever
/// the server's or the role's default: an acknowledged claim or complete must be on disk (and
/// on a synchronous standby, where one is configured).
const ON_CONNECT: &str = "SET synchronous_commit = on";

/// Up to `size` connections to one database, shared by the engine's calls.
pub(crate) struct Pool {
    config: Config,
    idle: Arc<Mutex<Vec<Connection>>>,
    permits: Arc<Semaphore>,
    /// The engine's runtime, where new connections are made and driven, whatever thread asks
    /// for one (see [`Pool::on_runtime`]).
    runtime: OnceLock<tokio::runtime::Handle>,
}

/// A client and the statements prepared on its connection, by their SQL.
struct Connection {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl Pool {
    /// A pool of at most `size` connections to the database `url` names (a `postgres://` URL
    /// or a `key=value` connection string). Connects lazily: nothing is contacted here.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the URL does not parse or `size` is zero.
    pub(crate) fn new(url: &str, size: usize) -> Result<Pool> {
        if size == 0 {
            return Err(Error::InvalidConfig {
                reason: "the PostgreSQL pool needs at least one connection".to_string(),
            });
        }
        // The parser's message never repeats the URL, so a password in it stays out of logs.
        let mut config = Config::from_str(url).map_err(|err| Error::InvalidConfig {
            reason: format!("invalid PostgreSQL URL: {err}"),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        Ok(Pool {
            config,
            idle: Arc::new(Mutex::new(Vec::with_capacity(size))),
            permits: Arc::new(Semaphore::new(size)),
            runtime: OnceLock::new(),
        })
    }

    /// Makes new connections on `runtime` from now on. The engine's calls run on their
    /// callers' threads (a pooled client's requests go through channels to its connection's
    /// driver), but a connection must be made and driven on the engine's own runtime, never
    /// on a runtime the caller happens to be in.
    pub(crate) fn on_runtime(&self, runtime: tokio::runtime::Handle) {
        let _ = self.runtime.set(runtime);
    }

    /// A connection for one call, waiting while all `size` are in use: an idle one that is
    /// still open, or a new one. Must run on the engine's runtime (the connection's driver is
    /// spawned there).
    ///
    /// # Errors
    /// [`Error::Database`] when a new connection cannot be made (kind `Connect`,
    /// `Authentication`…).
    pub(crate) async fn get(&self) -> Result<PooledClient> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        loop {
            let candidate = self.idle.lock().pop();
            match candidate {
                Some(connection) if connection.client.is_closed() => continue,
                Some(connection) => return Ok(self.lend(connection, permit)),
                None => break,
            }
        }
        let client = match self.runtime.get() {
            Some(runtime) => {
                let config = self.config.clone();
                runtime
                    .spawn(async move { connect(&config).await })
                    .await
                    .map_err(|_| Error::Database {
                        action: "connect",
                        kind: crate::error::DatabaseErrorKind::Other,
                        message: "the engine's runtime shut down".to_string(),
                        source: None,
                    })??
            }
            None => connect(&self.config).await?,
        };
        Ok(self.lend(
            Connection {
                client,
                statements: HashMap::new(),
            },
            permit,
        ))
    }

    /// Passes a call's `result` on; when it failed on a lost connection, first drops every idle
    /// connection: the server most likely restarted, and a connection whose loss its driver
    /// has not noticed yet would fail the next call too.
    pub(crate) fn checked<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(Error::Database {
            kind: crate::error::DatabaseErrorKind::ConnectionLost,
            ..
        }) = &result
        {
            self.clear();
        }
        result
    }

    /// Drops every idle connection, so that the next calls connect afresh.
    pub(crate) fn clear(&self) {
        self.idle.lock().clear();
    }

    /// Closes the pool: calls waiting in [`get`](Self::get) and later ones fail with
    /// [`Error::Closed`], and idle connections are dropped (those lent out close when returned).
    pub(crate) fn close(&self) {
        self.permits.close();
        self.clear();
    }

    /// A connection of its own, outside the pool, and its driver, which the caller runs: for
    /// `LISTEN`, whose notifications arrive through the driver.
    pub(crate) async fn dedicated(
        &self,
    ) -> Result<(
        Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    )> {
        self.config.connect(NoTls).await.map_err(connect_error)
    }

    fn lend(&self, connection: Connection, permit: OwnedSemaphorePermit) -> PooledClient {
        PooledClient {
            connection: Some(connection),
            idle: Arc::clone(&self.idle),
            _permit: permit,
        }
    }
}

/// A new connection, its driver spawned on the current runtime.
async fn connect(config: &Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await.map_err(connect_error)?;
    // The driver ends when the connection closes; the client then reports `is_closed`, and
    // its error reaches the caller through the call that failed.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute(ON_CONNECT)
        .await
        .map_err(|err| query_error("prepare a new connection", err))?;
    Ok(client)
}

/// A connection lent by the [`Pool`]; it goes back to the pool when dropped, unless it closed.
pub(crate) struct PooledClient {
    connection: Option<Connection>,
    idle: Arc<Mutex<Vec<Connection>>>,
    _permit: OwnedSemaphorePermit,
}

impl PooledClient {
    fn connection(&mut self) -> &mut Connection {
        self.connection
            .as_mut()
            .expect("a lent client is present until it is dropped")
    }

    /// The client, mutably: transactions need `&mut Client`.
    pub(crate) fn client_mut(&mut self) -> &mut Client {
        &mut self.connection().client
    }

    /// Runs `sql`, prepared once per connection (see [`statement`](Self::statement)), with
    /// `params` and their types.
    pub(crate) async fn query_prepared(
        &mut self,
        sql: &str,
        params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)],
    ) -> std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let types: Vec<Type> = params.iter().map(|(_, ty)| ty.clone()).collect();
        let statement = self.statement(sql, &types).await?;
        let values: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|(value, _)| *value).collect();
        self.connection().client.query(&statement, &values).await
    }

    /// `sql` prepared on this connection with parameters of `types`, once per connection:
    /// a prepared statement is parsed and planned by the server once, and each use of it is
    /// one round trip.
    pub(crate) async fn statement(
        &mut self,
        sql: &str,
        types: &[Type],
    ) -> std::result::Result<Statement, tokio_postgres::Error> {
        let connection = self.connection();
        if let Some(statement) = connection.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = connection.client.prepare_typed(sql, types).await?;
        connection
            .statements
            .insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

impl Deref for PooledClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self
            .connection
            .as_ref()
            .expect("a lent client is present until it is dropped")
            .client
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take()
            && !connection.client.is_closed()
        {
            self.idle.lock().push(connection);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_url_is_invalid_config() {
        for url in ["postgres://host:notaport/db", "postgres://[::1", "port=x"] {
            match Pool::new(url, 2) {
                Err(Error::InvalidConfig { reason }) => {
                    assert!(reason.contains("invalid PostgreSQL URL"), "{reason}")
                }
                Err(other) => panic!("{url}: expected InvalidConfig, got {other:?}"),
                Ok(_) => panic!("{url}: expected InvalidConfig, got a pool"),
            }
        }
    }

    #[test]
    fn a_pool_needs_a_connection() {
        assert!(matches!(
            Pool::new("postgres://localhost/db", 0),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(Pool::new("postgres://localhost/db", 3).is_ok());
    }
}
