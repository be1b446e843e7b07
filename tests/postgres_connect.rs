//! The PostgreSQL engine's connection layer against a real server: its schema is created once
//! and reopened, refused when it is not ours, and every failure to reach or use the server is
//! a typed error; a pool reconnects by itself after the server restarts.

use std::thread;
use std::time::Duration;

use dedupe_store::testing::postgres::{Probe, TestCluster};
use dedupe_store::{DatabaseErrorKind, Error, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The kind of a database error, or a failure naming what came instead.
fn kind_of<T: std::fmt::Debug>(result: Result<T, Error>) -> DatabaseErrorKind {
    match result {
        Err(Error::Database { kind, .. }) => kind,
        other => panic!("expected a database error, got {other:?}"),
    }
}

#[test]
fn the_schema_is_created_on_first_open_and_reopened_after() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let probe = Probe::new(&cluster.create_database("reopen"), 2)?;
    let store_id = probe.open_schema("dedupe")?;
    assert_eq!(
        probe.open_schema("dedupe")?,
        store_id,
        "reopening keeps the id"
    );
    assert_eq!(
        probe.query_text("SELECT value FROM dedupe.meta WHERE name = 'version'")?,
        "1"
    );
    assert_eq!(
        probe.query_text("SELECT nextval('dedupe.tokens')")?,
        "1",
        "the token sequence starts at 1"
    );
    let other = probe.open_schema("tenant_7")?;
    assert_ne!(other, store_id, "each schema is a store of its own");

    // A new pool (another process) opens the same store.
    let again = Probe::new(&cluster.database_url("reopen"), 1)?;
    assert_eq!(again.open_schema("dedupe")?, store_id);
    Ok(())
}

#[test]
fn racing_opens_create_the_schema_once() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("race");
    let ids = thread::scope(|scope| {
        let opens: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| -> Result<u64, Error> { Probe::new(&url, 1)?.open_schema("dedupe") })
            })
            .collect();
        opens
            .into_iter()
            .map(|open| open.join().expect("an open thread panicked"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    assert!(ids.windows(2).all(|pair| pair[0] == pair[1]), "{ids:?}");
    Ok(())
}

#[test]
fn a_newer_schema_version_is_refused() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let probe = Probe::new(&cluster.create_database("newer"), 1)?;
    probe.open_schema("dedupe")?;
    cluster.psql(
        "newer",
        "UPDATE dedupe.meta SET value = 2 WHERE name = 'version'",
    );
    assert_eq!(
        kind_of(probe.open_schema("dedupe")),
        DatabaseErrorKind::SchemaTooNew {
            found: 2,
            supported: 1
        }
    );
    Ok(())
}

#[test]
fn tables_of_another_shape_are_refused() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let probe = Probe::new(&cluster.create_database("shape"), 1)?;
    // Another program's `records` table in a schema of the same name.
    cluster.psql(
        "shape",
        "CREATE SCHEMA dedupe; CREATE TABLE dedupe.records (id serial PRIMARY KEY, body text);",
    );
    assert_eq!(
        kind_of(probe.open_schema("dedupe")),
        DatabaseErrorKind::SchemaShape
    );

    // Ours, with a column of the wrong type.
    probe.open_schema("other")?;
    cluster.psql(
        "shape",
        "ALTER TABLE other.records ALTER COLUMN response TYPE text USING encode(response, 'hex')",
    );
    let err = probe.open_schema("other").expect_err("wrong column type");
    assert!(err.to_string().contains("response"), "{err}");
    assert_eq!(kind_of(Err::<(), _>(err)), DatabaseErrorKind::SchemaShape);
    Ok(())
}

#[test]
fn a_role_without_privileges_gets_a_permission_error() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    cluster.create_database("perm");
    cluster.psql(
        "perm",
        "CREATE ROLE visitor LOGIN PASSWORD 'visitor'; REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
         REVOKE CREATE ON DATABASE perm FROM PUBLIC; CREATE SCHEMA owned;",
    );
    let url = format!(
        "postgres://visitor:visitor@127.0.0.1:{}/perm",
        cluster.port()
    );
    let probe = Probe::new(&url, 1)?;
    assert_eq!(
        kind_of(probe.open_schema("dedupe")),
        DatabaseErrorKind::Permission
    );
    assert_eq!(
        kind_of(probe.open_schema("owned")),
        DatabaseErrorKind::Permission
    );
    Ok(())
}

#[test]
fn refused_credentials_are_authentication_errors() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    cluster.psql("postgres", "CREATE ROLE payer LOGIN PASSWORD 'right'");
    let url = |credentials: &str| {
        format!(
            "postgres://{credentials}@127.0.0.1:{}/postgres",
            cluster.port()
        )
    };
    assert_eq!(
        Probe::new(&url("payer:right"), 1)?.query_text("current_user")?,
        "payer"
    );
    for (credentials, says) in [
        ("payer:wrong", "password authentication failed"),
        ("nobody:secret", "password authentication failed"),
        ("payer", "password missing"),
    ] {
        let err = Probe::new(&url(credentials), 1)?
            .execute("SELECT 1")
            .expect_err("refused");
        assert!(err.to_string().contains(says), "{credentials}: {err}");
        assert!(
            !err.to_string().contains("wrong"),
            "the password stays out: {err}"
        );
        assert_eq!(
            kind_of(Err::<(), _>(err)),
            DatabaseErrorKind::Authentication,
            "{credentials}"
        );
    }
    Ok(())
}

#[test]
fn nothing_listening_is_a_connect_error() -> TestResult {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let probe = Probe::new(&format!("postgres://postgres@127.0.0.1:{port}/postgres"), 1)?;
    assert_eq!(
        kind_of(probe.execute("SELECT 1")),
        DatabaseErrorKind::Connect
    );
    Ok(())
}

#[test]
fn a_malformed_url_is_invalid_config() {
    for url in [
        "postgres://127.0.0.1:notaport/db",
        "host=x port=",
        "postgres://[::1",
    ] {
        assert!(
            matches!(Probe::new(url, 1), Err(Error::InvalidConfig { .. })),
            "{url}"
        );
    }
    assert!(matches!(
        Probe::new("postgres://127.0.0.1/db", 0),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn a_lost_connection_is_typed_and_the_pool_reconnects_after_a_restart() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let probe = Probe::new(&cluster.create_database("restart"), 2)?;
    probe.open_schema("dedupe")?;

    // A call in flight when the server dies.
    let lost = thread::scope(|scope| {
        let call = scope.spawn(|| probe.execute("SELECT pg_sleep(30)"));
        thread::sleep(Duration::from_millis(500));
        cluster.stop_immediate();
        call.join().expect("the call's thread panicked")
    });
    assert_eq!(kind_of(lost), DatabaseErrorKind::ConnectionLost);

    // While the server is down, a call cannot connect (or finds its idle connection gone).
    let down = kind_of(probe.execute("SELECT 1"));
    assert!(
        matches!(
            down,
            DatabaseErrorKind::Connect | DatabaseErrorKind::ConnectionLost
        ),
        "{down:?}"
    );

    cluster.start_again();
    // Every pooled connection was lost; the pool replaces them without being told.
    for _ in 0..4 {
        assert_eq!(probe.query_text("SELECT 1")?, "1");
    }
    probe.open_schema("dedupe")?;
    Ok(())
}

#[test]
fn a_terminated_backend_is_a_lost_connection_and_replaced() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let probe = Probe::new(&cluster.create_database("terminate"), 1)?;
    let pid = probe.query_text("pg_backend_pid()")?;
    assert_eq!(
        kind_of(probe.execute("SELECT pg_terminate_backend(pg_backend_pid())")),
        DatabaseErrorKind::ConnectionLost
    );
    assert_ne!(
        probe.query_text("pg_backend_pid()")?,
        pid,
        "a new connection"
    );
    assert_eq!(
        probe.query_text("current_setting('synchronous_commit')")?,
        "on"
    );
    Ok(())
}

#[test]
fn a_role_that_owns_a_schema_made_beforehand_opens_the_store_in_it() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    cluster.create_database("owned");
    // The role may not create schemas in the database: an operator made its schema for it.
    cluster.psql(
        "owned",
        "CREATE ROLE app LOGIN PASSWORD 'pw'; \
         REVOKE CREATE ON DATABASE owned FROM PUBLIC; \
         CREATE SCHEMA dedupe AUTHORIZATION app;",
    );
    let url = format!("postgres://app:pw@127.0.0.1:{}/owned", cluster.port());
    let store = dedupe_store::Store::builder()
        .without_sweeper()
        .open_postgres(&url)?;
    let dedupe_store::Claim::Acquired(ticket) = store.claim("k")? else {
        panic!("a fresh key is acquired");
    };
    store.complete(&ticket, b"done")?;
    // Another schema the role may not create is a permission error, not a panic.
    let other = dedupe_store::Store::builder()
        .without_sweeper()
        .postgres_schema("elsewhere")
        .open_postgres(&url);
    assert_eq!(kind_of(other), DatabaseErrorKind::Permission);
    Ok(())
}

#[test]
fn a_store_that_may_not_create_refuses_a_schema_without_one() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("nocreate");
    let existing_only = || {
        dedupe_store::Store::builder()
            .postgres_schema("jobs")
            .postgres_create_schema(false)
            .without_sweeper()
            .open_postgres(&url)
    };
    let refused = existing_only();
    assert!(
        refused
            .as_ref()
            .err()
            .is_some_and(|err| err.to_string().contains("\"jobs\"")),
        "{:?}",
        refused.as_ref().err()
    );
    assert_eq!(kind_of(refused), DatabaseErrorKind::SchemaMissing);
    let probe = Probe::new(&url, 1)?;
    assert_eq!(
        probe.query_text("SELECT count(*) FROM pg_namespace WHERE nspname = 'jobs'")?,
        "0",
        "nothing was created"
    );
    // Once a store exists there, it opens.
    let store_id = probe.open_schema("jobs")?;
    let store = existing_only()?;
    assert!(store.mark_seen("k")?);
    drop(store);
    assert_eq!(probe.open_schema("jobs")?, store_id);
    Ok(())
}

/// A server that takes the connection and never answers (overloaded, or not PostgreSQL) is a
/// connect error once the connect timeout passes, not a call that hangs: the timeout covers
/// the whole handshake, not only the TCP connect.
#[test]
fn a_server_that_never_answers_is_a_connect_error_after_the_timeout() -> TestResult {
    let result = open_on_a_silent_server("connect_timeout=1", Store::builder())?;
    assert_eq!(kind_of(result), DatabaseErrorKind::Connect);
    Ok(())
}

/// Opens a store, set up by `builder`, on a listener that takes connections and never
/// answers, its URL ending in `?params`: what the open answered. Fails the test if the open
/// has not given up within a minute.
fn open_on_a_silent_server(
    params: &str,
    builder: dedupe_store::StoreBuilder,
) -> Result<dedupe_store::Result<()>, Box<dyn std::error::Error>> {
    // The kernel completes the TCP handshake into the listener's backlog; nothing reads.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!(
        "postgres://app@127.0.0.1:{}/jobs?{params}",
        silent.local_addr()?.port()
    );
    let (answer, opened) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = answer.send(builder.without_sweeper().open_postgres(&url).map(|_| ()));
    });
    let result = opened
        .recv_timeout(Duration::from_secs(60))
        .expect("opening gave up instead of hanging");
    drop(silent);
    Ok(result)
}

#[test]
fn the_builders_connect_timeout_replaces_the_urls() -> TestResult {
    // Far less than the URL's two minutes: the builder's 300 ms decides.
    let builder = Store::builder().postgres_connect_timeout(Duration::from_millis(300));
    let result = open_on_a_silent_server("connect_timeout=120", builder)?;
    assert_eq!(kind_of(result), DatabaseErrorKind::Connect);

    let zero = dedupe_store::Store::builder()
        .postgres_connect_timeout(Duration::ZERO)
        .open_postgres("postgres://app@127.0.0.1:1/jobs");
    assert!(
        matches!(zero, Err(dedupe_store::Error::InvalidConfig { .. })),
        "{zero:?}"
    );
    Ok(())
}
