//! A fixed-size pool of connections. A connection is made when the pool has none idle, and
//! one found closed (the server restarted, the network dropped) is discarded and replaced on
//! the next [`Pool::get`], so the engine reconnects by itself.
//!
//! A connection's socket is driven by one of two places, chosen by the thread that asks:
//!
//! - **the caller's thread** ([`Pool::lend`] outside any tokio runtime, or on a thread of the
//!   blocking pool that the HTTP layer marked for its store call, `blocking.rs`): the connection has a
//!   single-threaded runtime of its own, and a call drives the socket on the calling thread
//!   while it waits, as a blocking client does. A round trip then wakes no other thread.
//!   A thread gets back the idle connection it used last when there is one: its server
//!   process then keeps answering the same thread, and the kernel keeps the two on one core,
//!   each running while the other waits. Handed from thread to thread, the same connections
//!   cost each round trip a wake-up across cores; at two threads that measured 0.7x the
//!   throughput of a connection per thread.
//! - **the engine's runtime** (inside a runtime, where blocking on another runtime would
//!   panic): the connection's driver is a task on the engine's runtime, and the caller waits
//!   for its answer, which travels by channel.
//!
//! Both kinds count against one limit of connections. Hand-written rather than a pool crate:
//! the engine needs a bounded set of clients, each prepared the same way on connect, driven as
//! above, and nothing else.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Config, NoTls, Socket};

use super::error::{connect_error, query_error};
use super::runtime::block_on;
use super::session::Session;
use crate::error::{DatabaseErrorKind, Error, Result};

/// How long a connection attempt may take when the URL sets no `connect_timeout`: long enough
/// for a server across a slow network, short enough that a call to a dead host fails instead of
/// hanging.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Statements every connection runs before its first use.
///
/// - `synchronous_commit = on` whatever the server's or the role's default: an acknowledged
///   claim or complete must be on disk (and on a synchronous standby, where one is
///   configured).
/// - No sequential scans, hash joins or merge joins. Every statement of the engine reaches its
///   rows through an index (the key, or `expires_at` for the sweeper). A prepared statement's
///   plan is made once and kept: one made while the table was small (every new schema starts
///   empty) would otherwise join a batch's keys to the table by reading the whole table, and
///   go on doing so as the table grows, until the server analyzes it again. These settings
///   apply to the store's own connections only (`statements.rs` tests the plans).
const ON_CONNECT: &str = "SET synchronous_commit = on; SET enable_seqscan = off; \
     SET enable_hashjoin = off; SET enable_mergejoin = off";

/// A connection's driver: the future that reads and writes its socket.
type Driver = tokio_postgres::Connection<Socket, NoTlsStream>;

/// A connection driven on the caller's thread, with the runtime its socket belongs to.
struct Local {
    session: Session,
    driver: Pin<Box<Driver>>,
    /// `None` once shut down (on drop). A single-threaded runtime with no thread of its own.
    runtime: Option<tokio::runtime::Runtime>,
    /// The driver has stopped: the connection is gone.
    lost: bool,
    /// The thread that ran the connection's last call.
    thread: std::thread::ThreadId,
}

impl Drop for Local {
    fn drop(&mut self) {
        // Dropping a runtime inside another runtime's task panics; shutting it down does not.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Local {
    fn is_closed(&self) -> bool {
        self.lost || self.session.is_closed()
    }

    /// Runs `call` on the calling thread, driving the socket while it waits.
    fn run<T>(&mut self, call: impl AsyncFnOnce(&mut Session) -> Result<T>) -> Result<T> {
        let Local {
            session,
            driver,
            runtime,
            lost,
            ..
        } = self;
        let Some(runtime) = runtime.as_ref() else {
            return Err(lost_connection());
        };
        if *lost {
            return Err(lost_connection());
        }
        let call = call(session);
        runtime.block_on(async {
            let mut call = std::pin::pin!(call);
            std::future::poll_fn(|cx| {
                // Read and write the socket first: that is what answers the call's requests.
                loop {
                    match driver.as_mut().poll_message(cx) {
                        // Notices and notifications: nothing for a pooled connection to do.
                        Poll::Ready(Some(Ok(_))) => continue,
                        Poll::Ready(Some(Err(_)) | None) => {
                            *lost = true;
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
                match call.as_mut().poll(cx) {
                    Poll::Ready(answer) => Poll::Ready(answer),
                    // Nothing will answer the call any more.
                    Poll::Pending if *lost => Poll::Ready(Err(lost_connection())),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        })
    }
}

/// A connection driven by a task on the engine's runtime.
struct Shared {
    session: Session,
}

fn lost_connection() -> Error {
    Error::Database {
        action: "run a database call",
        kind: DatabaseErrorKind::ConnectionLost,
        message: "connection closed".to_string(),
        source: None,
    }
}

/// Up to `size` connections to one database, shared by the engine's calls.
pub(crate) struct Pool {
    config: Config,
    idle: Arc<Mutex<Vec<Shared>>>,
    idle_local: Arc<Mutex<Vec<Local>>>,
    permits: Arc<Semaphore>,
    /// The engine's runtime, where connections for callers inside a runtime are made and
    /// driven (see [`Pool::on_runtime`]).
    runtime: OnceLock<tokio::runtime::Handle>,
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
            idle_local: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(size)),
            runtime: OnceLock::new(),
        })
    }

    /// Bounds each connection attempt by `timeout` (replacing the URL's `connect_timeout`);
    /// `None` keeps the URL's, else [`DEFAULT_CONNECT_TIMEOUT`].
    pub(crate) fn connect_timeout(mut self, timeout: Option<Duration>) -> Pool {
        if let Some(timeout) = timeout {
            self.config.connect_timeout(timeout);
        }
        self
    }

    /// Makes connections for callers inside a runtime on `runtime` from now on, never on a
    /// runtime the caller happens to be in.
    pub(crate) fn on_runtime(&self, runtime: tokio::runtime::Handle) {
        let _ = self.runtime.set(runtime);
    }

    /// Runs `call` with a connection, from synchronous code on any thread: driven on this
    /// thread outside a runtime or on a marked thread, by the engine's runtime otherwise (see
    /// the module's docs).
    /// Waits while all connections are in use.
    ///
    /// # Errors
    /// [`Error::Database`] when a new connection cannot be made (kind `Connect`,
    /// `Authentication`…), [`Error::Closed`] once the pool is closed, and `call`'s own.
    pub(crate) fn lend<T>(&self, call: impl AsyncFnOnce(&mut Session) -> Result<T>) -> Result<T> {
        let permit =
            block_on(Arc::clone(&self.permits).acquire_owned()).map_err(|_| Error::Closed)?;
        // A thread outside every runtime, or one the crate lent to blocking work inside one
        // (`blocking.rs`), drives the connection itself: no hand-off per round trip.
        if tokio::runtime::Handle::try_current().is_err() || crate::blocking::marked() {
            let mut local = self.local()?;
            let answer = local.run(call);
            // A closed pool keeps no connection: the store is being closed.
            if !local.is_closed() && !self.permits.is_closed() {
                self.idle_local.lock().push(local);
            }
            drop(permit);
            return answer;
        }
        let mut shared = match self.pop_shared() {
            Some(shared) => shared,
            None => {
                let Some(runtime) = self.runtime.get() else {
                    return Err(Error::Database {
                        action: "connect",
                        kind: DatabaseErrorKind::Other,
                        message: "no runtime to drive a connection on".to_string(),
                        source: None,
                    });
                };
                let config = self.config.clone();
                let client = block_on(runtime.spawn(async move { connect(&config).await }))
                    .map_err(|_| Error::Database {
                        action: "connect",
                        kind: DatabaseErrorKind::Other,
                        message: "the engine's runtime shut down".to_string(),
                        source: None,
                    })??;
                Shared {
                    session: Session::new(client),
                }
            }
        };
        let answer = block_on(call(&mut shared.session));
        if !shared.session.is_closed() && !self.permits.is_closed() {
            self.idle.lock().push(shared);
        }
        drop(permit);
        answer
    }

    /// A connection for a future that runs on the engine's runtime itself (opening the
    /// schema): an idle one that is still open, or a new one.
    ///
    /// # Errors
    /// As for [`lend`](Self::lend).
    pub(crate) async fn get(&self) -> Result<PooledClient> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let shared = match self.pop_shared() {
            Some(shared) => shared,
            None => Shared {
                session: Session::new(connect(&self.config).await?),
            },
        };
        Ok(PooledClient {
            shared: Some(shared),
            idle: Arc::clone(&self.idle),
            _permit: permit,
        })
    }

    fn pop_shared(&self) -> Option<Shared> {
        loop {
            match self.idle.lock().pop() {
                Some(shared) if shared.session.is_closed() => continue,
                other => return other,
            }
        }
    }

    /// An idle connection driven on the caller's thread, or a new one.
    fn local(&self) -> Result<Local> {
        let me = std::thread::current().id();
        loop {
            let mut idle = self.idle_local.lock();
            // This thread's own connection first: its server process then keeps answering the
            // same thread, which the kernel schedules beside it.
            let mine = idle.iter().rposition(|local| local.thread == me);
            let Some(at) = mine.or_else(|| idle.len().checked_sub(1)) else {
                break;
            };
            let mut local = idle.swap_remove(at);
            drop(idle);
            if local.is_closed() {
                continue;
            }
            local.thread = me;
            return Ok(local);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|err| Error::Database {
                action: "connect",
                kind: DatabaseErrorKind::Other,
                message: format!("cannot start the connection's runtime: {err}"),
                source: None,
            })?;
        let (client, driver) = runtime.block_on(handshake(&self.config))?;
        let mut local = Local {
            session: Session::new(client),
            driver: Box::pin(driver),
            runtime: Some(runtime),
            lost: false,
            thread: me,
        };
        local.run(async |session: &mut Session| {
            session
                .batch_execute(ON_CONNECT)
                .await
                .map_err(|err| query_error("prepare a new connection", err))
        })?;
        Ok(local)
    }

    /// Passes a call's `result` on, after [`failed`](Self::failed) if it is an error.
    pub(crate) fn checked<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(err) = &result {
            self.failed(err);
        }
        result
    }

    /// Notes that a call failed with `err`: on a lost connection, drops every idle connection.
    /// The server most likely restarted, and a connection whose loss its driver has not
    /// noticed yet would fail the next call too.
    pub(crate) fn failed(&self, err: &Error) {
        if let Error::Database {
            kind: DatabaseErrorKind::ConnectionLost,
            ..
        } = err
        {
            self.clear();
        }
    }

    /// Drops every idle connection, so that the next calls connect afresh.
    pub(crate) fn clear(&self) {
        self.idle.lock().clear();
        self.idle_local.lock().clear();
    }

    /// Closes the pool: calls waiting for a connection and later ones fail with
    /// [`Error::Closed`], and idle connections are dropped (those lent out close when returned).
    pub(crate) fn close(&self) {
        self.permits.close();
        self.clear();
    }

    /// A connection of its own, outside the pool, and its driver, which the caller runs: for
    /// `LISTEN`, whose notifications arrive through the driver.
    pub(crate) async fn dedicated(&self) -> Result<(Client, Driver)> {
        handshake(&self.config).await
    }
}

/// Connects and logs in, giving up after the config's connect timeout. The client's own
/// timeout covers only the TCP connect: a server that takes the connection and never answers
/// (overloaded, or not PostgreSQL) would otherwise hold the caller for ever.
async fn handshake(config: &Config) -> Result<(Client, Driver)> {
    let limit = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    match tokio::time::timeout(limit, config.connect(NoTls)).await {
        Ok(connected) => connected.map_err(connect_error),
        Err(_) => Err(Error::Database {
            action: "connect to the database",
            kind: DatabaseErrorKind::Connect,
            message: format!(
                "the server did not complete the connection within {} ms",
                limit.as_millis()
            ),
            source: None,
        }),
    }
}

/// A new connection, its driver spawned on the current runtime.
async fn connect(config: &Config) -> Result<Client> {
    let (client, connection) = handshake(config).await?;
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

/// A connection lent by [`Pool::get`] to a future on the engine's runtime; it goes back to the
/// pool when dropped, unless it closed.
pub(crate) struct PooledClient {
    shared: Option<Shared>,
    idle: Arc<Mutex<Vec<Shared>>>,
    _permit: OwnedSemaphorePermit,
}

impl PooledClient {
    /// The connection's session.
    pub(crate) fn session(&mut self) -> &mut Session {
        &mut self
            .shared
            .as_mut()
            .expect("a lent client is present until it is dropped")
            .session
    }

    /// The client, mutably: transactions need `&mut Client`.
    pub(crate) fn client_mut(&mut self) -> &mut Client {
        self.session().client_mut()
    }
}

impl Deref for PooledClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self
            .shared
            .as_ref()
            .expect("a lent client is present until it is dropped")
            .session
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take()
            && !shared.session.is_closed()
        {
            self.idle.lock().push(shared);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::postgres::TestCluster;
    use std::sync::Barrier;

    /// The server process behind the connection `pool` lends this thread, and the barrier
    /// `hold` waited on while the connection is still lent.
    fn backend(pool: &Pool, hold: Option<&Barrier>) -> Result<i32> {
        pool.lend(async |session: &mut Session| {
            let row = session
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .map_err(|err| query_error("read the server process", err))?;
            if let Some(hold) = hold {
                hold.wait();
            }
            row.try_get(0)
                .map_err(|err| query_error("read the server process", err))
        })
    }

    #[test]
    fn a_thread_gets_back_the_connection_it_used_last() -> Result<()> {
        let Some(cluster) = TestCluster::start() else {
            return Ok(());
        };
        let pool = Pool::new(&cluster.create_database("affinity"), 4)?;
        let both = Barrier::new(2);
        let (first, second) = std::thread::scope(|scope| {
            let pool = &pool;
            let both = &both;
            // Each thread runs once while the other holds its connection (two connections),
            // then again in turn: first thread one, then thread two, then one, then two. The
            // connection returned last is always the other thread's.
            let thread = |me: usize| {
                move || -> Result<Vec<i32>> {
                    let mut seen = vec![backend(pool, Some(both))?];
                    for turn in 0..4 {
                        both.wait();
                        if turn % 2 == me {
                            seen.push(backend(pool, None)?);
                        }
                    }
                    Ok(seen)
                }
            };
            let one = scope.spawn(thread(0));
            let two = scope.spawn(thread(1));
            (one.join(), two.join())
        });
        let first = first.expect("the first thread ran")?;
        let second = second.expect("the second thread ran")?;
        assert_ne!(first[0], second[0], "two connections were open at once");
        assert!(
            first.iter().all(|pid| *pid == first[0]),
            "the first thread kept its connection: {first:?}"
        );
        assert!(
            second.iter().all(|pid| *pid == second[0]),
            "the second thread kept its connection: {second:?}"
        );
        Ok(())
    }

    #[test]
    fn a_marked_thread_of_the_blocking_pool_drives_its_own_connection() -> Result<()> {
        let Some(cluster) = TestCluster::start() else {
            return Ok(());
        };
        // No engine runtime is given to the pool: a call made inside a runtime can only be
        // answered by a connection that the calling thread drives itself.
        let pool = Arc::new(Pool::new(&cluster.create_database("marked"), 2)?);
        let caller = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("the caller's runtime");
        let lend = |marked: bool| {
            let pool = Arc::clone(&pool);
            caller.block_on(async move {
                tokio::task::spawn_blocking(move || {
                    if marked {
                        crate::blocking::run(|| backend(&pool, None))
                    } else {
                        backend(&pool, None)
                    }
                })
                .await
                .expect("the blocking task ran")
            })
        };
        let unmarked = lend(false);
        assert!(
            matches!(&unmarked, Err(Error::Database { message, .. }) if message.contains("no runtime")),
            "an unmarked thread inside a runtime hands its call to the engine's runtime: {unmarked:?}"
        );
        let pid = lend(true)?;
        assert!(pid > 0);
        Ok(())
    }
}
