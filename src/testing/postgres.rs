//! A throwaway PostgreSQL server per test (features `testing` and `postgres`).
//!
//! [`TestCluster::start`] runs `initdb` into a fresh temporary directory and starts the server
//! on a free port of 127.0.0.1 with fsync on, so durability tests see what a real server does.
//! The superuser `postgres` connects without a password; every other role authenticates with
//! its password (SCRAM), so tests can meet a wrong password. Each cluster is independent, so tests run in parallel; dropping
//! one stops its server at once and deletes its files.
//!
//! The server binaries come from `PATH` or from `/usr/lib/postgresql/*/bin` (the highest
//! version), where Debian's `postgresql` package puts them. Without them a test is skipped
//! with a note on stderr, unless `CI=true`, where a missing server is a failure. The server
//! refuses to run as root, so as root the cluster's files belong to the `postgres` user and
//! its commands run as that user through `runuser`.
//!
//! [`Probe`] reaches the engine's connection layer (runtime, pool, schema) from integration
//! tests, which cannot name crate-private items.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::postgres::{Pool, Runtime, open_schema};

/// The role the cluster is created with and the URLs name.
const SUPERUSER: &str = "postgres";

/// Who may connect how: the superuser without a password (the harness's own commands, and
/// tests that need no other role), every other role with its password.
const HBA: &str = "local all postgres trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
";

/// Tells clusters started by one process apart.
static NEXT_CLUSTER: AtomicU64 = AtomicU64::new(0);

/// A PostgreSQL server of its own, in a temporary directory, for one test.
#[derive(Debug)]
pub struct TestCluster {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    as_postgres_user: bool,
}

impl TestCluster {
    /// Creates and starts a cluster, or returns `None` (after saying why on stderr) when the
    /// PostgreSQL server binaries are not installed.
    ///
    /// # Panics
    /// When the binaries are missing and the environment variable `CI` is `true`, and when
    /// the binaries are there but the cluster cannot be created or started (the message
    /// includes the server's log).
    pub fn start() -> Option<TestCluster> {
        let Some(bin) = server_binaries() else {
            return unavailable(
                "PostgreSQL server binaries not found (apt-get install postgresql)",
            );
        };
        let as_postgres_user = running_as_root();
        if as_postgres_user && !user_exists(SUPERUSER) {
            return unavailable(
                "running as root and there is no postgres user to run the server as \
                 (apt-get install postgresql creates it)",
            );
        }
        let root = std::env::temp_dir().join(format!(
            "dedupe-pg-{}-{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        ));
        // A directory left by an earlier process with the same id.
        let _ = std::fs::remove_dir_all(&root);
        let made = std::fs::create_dir_all(root.join("sockets"));
        assert!(made.is_ok(), "cannot create {}: {made:?}", root.display());
        let cluster = TestCluster {
            bin,
            root,
            port: free_port(),
            as_postgres_user,
        };
        if as_postgres_user {
            let output = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.root)
                .output();
            cluster.expect_success("chown the cluster's directory", output);
        }
        let output = cluster
            .command("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(cluster.data())
            .output();
        cluster.expect_success("initdb", output);
        // Rewritten in place, so it keeps the owner initdb gave it.
        let written = std::fs::write(cluster.data().join("pg_hba.conf"), HBA);
        assert!(written.is_ok(), "cannot write pg_hba.conf: {written:?}");
        cluster.start_again();
        Some(cluster)
    }

    /// The URL of the cluster's `postgres` database, as its superuser.
    pub fn url(&self) -> String {
        self.database_url(SUPERUSER)
    }

    /// The port the server listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` in this cluster (which may not exist).
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database `name` and returns its URL, so each test gets its own.
    ///
    /// # Panics
    /// When `name` is not a plain identifier or `createdb` fails.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "database names here are plain identifiers, not {name:?}"
        );
        let output = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .arg(name)
            .output();
        self.expect_success("createdb", output);
        self.database_url(name)
    }

    /// Runs SQL statements through `psql` against database `name`, for test setup that the
    /// store must not be able to do itself (a newer schema version, another program's table).
    ///
    /// # Panics
    /// When a statement fails.
    pub fn psql(&self, name: &str, sql: &str) {
        let output = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                name,
                "-c",
                sql,
            ])
            .output();
        self.expect_success("psql", output);
    }

    /// Stops the server the way a crash or a power cut would: no checkpoint, no goodbye to
    /// clients (`pg_ctl stop -m immediate`).
    ///
    /// # Panics
    /// When `pg_ctl` fails.
    pub fn stop_immediate(&self) {
        let output = self.stop_command().output();
        self.expect_success("pg_ctl stop", output);
    }

    /// Starts the server again on the same port and data, after
    /// [`stop_immediate`](Self::stop_immediate).
    ///
    /// # Panics
    /// When the server does not start (the message includes its log).
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=100 \
             -c shared_buffers=16MB",
            self.port,
            self.root.join("sockets").display()
        );
        let output = self
            .command("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .args(["-o", &options, "start"])
            .output();
        self.expect_success("pg_ctl start", output);
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn log(&self) -> PathBuf {
        self.root.join("server.log")
    }

    fn stop_command(&self) -> Command {
        let mut command = self.command("pg_ctl");
        command
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop");
        command
    }

    /// A server binary, run as the postgres user when we are root.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut command = if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", SUPERUSER, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        // The postgres user may not be allowed into the test's working directory.
        command.current_dir(&self.root);
        command
    }

    fn expect_success(&self, what: &str, output: std::io::Result<Output>) {
        match output {
            Ok(output) if output.status.success() => {}
            Ok(output) => panic!(
                "{what} failed ({}):\n{}{}\nserver log:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                std::fs::read_to_string(self.log()).unwrap_or_default()
            ),
            Err(err) => panic!("cannot run {what}: {err}"),
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.stop_command().output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Skips the test, or fails it on CI.
fn unavailable(reason: &str) -> Option<TestCluster> {
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{reason}; CI must run the PostgreSQL tests");
    }
    eprintln!("skipping: {reason}");
    None
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: the one `PATH` leads to (through
/// symlinks), else the highest version under `/usr/lib/postgresql`.
fn server_binaries() -> Option<PathBuf> {
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|name| dir.join(name).is_file())
    };
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .filter_map(|dir| std::fs::canonicalize(dir.join("initdb")).ok())
        .filter_map(|initdb| initdb.parent().map(Path::to_path_buf))
        .find(|dir| complete(dir));
    if on_path.is_some() {
        return on_path;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| complete(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether this process runs as root, from `/proc/self/status` (its real uid), else `id -u`.
fn running_as_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(uid) = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().next())
    {
        return uid == "0";
    }
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

fn user_exists(name: &str) -> bool {
    Command::new("id")
        .arg(name)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// A port nothing listens on now. Another process may take it before the server binds it; the
/// window is short enough for tests.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port on 127.0.0.1");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .port()
}

/// The engine's connection layer (its runtime, pool and schema) for integration tests.
pub struct Probe {
    pool: Arc<Pool>,
    // Dropped after the pool, whose connections' drivers run on it.
    runtime: Runtime,
}

impl Probe {
    /// A pool of `connections` to `url`. Nothing is contacted until the first call.
    ///
    /// # Errors
    /// As the engine's pool: [`crate::Error::InvalidConfig`] for a malformed URL, or
    /// [`crate::Error::ThreadStart`].
    pub fn new(url: &str, connections: usize) -> Result<Probe> {
        let pool = Arc::new(Pool::new(url, connections)?);
        Ok(Probe {
            pool,
            runtime: Runtime::new()?,
        })
    }

    /// Opens (creating if need be) the engine's tables in `schema`; returns the store's id.
    ///
    /// # Errors
    /// As the engine's schema open.
    pub fn open_schema(&self, schema: &str) -> Result<u64> {
        let pool = Arc::clone(&self.pool);
        let schema = schema.to_string();
        self.runtime.call(async move {
            let mut client = pool.get().await?;
            Ok(open_schema(client.client_mut(), &schema, true)
                .await?
                .store_id)
        })
    }

    /// Runs `sql` (one or more statements without parameters) on a pooled connection.
    ///
    /// # Errors
    /// [`crate::Error::Database`] as the engine maps the failure.
    pub fn execute(&self, sql: &str) -> Result<()> {
        let pool = Arc::clone(&self.pool);
        let sql = sql.to_string();
        let result = self.runtime.call(async move {
            let client = pool.get().await?;
            client
                .batch_execute(&sql)
                .await
                .map_err(|err| crate::postgres::query_error("run a statement", err))
        });
        self.pool.checked(result)
    }

    /// The first column of the first row of `sql`, read as text.
    ///
    /// # Errors
    /// [`crate::Error::Database`] as the engine maps the failure.
    pub fn query_text(&self, sql: &str) -> Result<String> {
        let pool = Arc::clone(&self.pool);
        let sql = format!("SELECT ({sql})::text");
        let result = self.runtime.call(async move {
            let client = pool.get().await?;
            let row = client
                .query_one(&sql, &[])
                .await
                .map_err(|err| crate::postgres::query_error("run a query", err))?;
            row.try_get(0)
                .map_err(|err| crate::postgres::query_error("read a query's answer", err))
        });
        self.pool.checked(result)
    }
}
