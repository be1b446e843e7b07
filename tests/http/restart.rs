//! A server *process* killed between a request and its retry: the test binary re-runs itself
//! as the server, is killed with SIGKILL, and a new process on the same file replays.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use dedupe_store::Store;
use dedupe_store::http::IdempotencyLayer;

use crate::support::{Result, client, replayed};

const CHILD_DB: &str = "DEDUPE_HTTP_TEST_CHILD_DB";

/// Not a test on its own: the server process of the restart test, run when `CHILD_DB` names
/// its store file. It prints its port and serves until it is killed.
#[test]
fn child_server_process() -> Result {
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return Ok(());
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let store = Store::open(path)?;
        let pid = std::process::id();
        let app = Router::new().route(
            "/charges",
            post(move || async move { format!("charged by process {pid}") }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("child-port={}", listener.local_addr()?.port());
        axum::serve(listener, app.layer(IdempotencyLayer::new(store))).await?;
        Ok(())
    })
}

/// A child server process, killed when dropped.
struct ChildServer {
    process: Child,
    base: String,
}

impl ChildServer {
    fn start(path: &std::path::Path) -> Result<ChildServer> {
        let mut process = Command::new(std::env::current_exe()?)
            .args([
                "--exact",
                "restart::child_server_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DB, path)
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = process.stdout.take().ok_or("the child's stdout")?;
        let mut server = ChildServer {
            process,
            base: String::new(),
        };
        // Read the port on a thread, so a child that hangs before printing it fails the test
        // (the child is killed on drop) instead of hanging it.
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::io::Result::ok)
            {
                // libtest prints "test child_server_process ... " on the same line first.
                if let Some((_, port)) = line.split_once("child-port=") {
                    let _ = port_tx.send(port.to_string());
                    return;
                }
            }
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "the child server printed no port")?;
        server.base = format!("http://127.0.0.1:{port}");
        Ok(server)
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[test]
fn a_replay_survives_a_restart_of_the_server_process() -> Result {
    if std::env::var_os(CHILD_DB).is_some() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("restart.redb");
    let runtime = tokio::runtime::Runtime::new()?;
    let client = client()?;
    let charge = |server: &ChildServer, key: &'static str| {
        let request = client
            .post(format!("{}/charges", server.base))
            .header("idempotency-key", key)
            .body("amount=10");
        runtime.block_on(async move {
            let response = request.send().await?;
            Ok::<_, reqwest::Error>((replayed(&response), response.text().await?))
        })
    };

    let first_server = ChildServer::start(&path)?;
    let first_pid = first_server.process.id();
    let (was_replayed, first) = charge(&first_server, "order-7")?;
    assert_eq!(
        (was_replayed, first.as_str()),
        (false, &*format!("charged by process {first_pid}"))
    );
    drop(first_server); // SIGKILL: no clean shutdown

    let second_server = ChildServer::start(&path)?;
    let (was_replayed, retry) = charge(&second_server, "order-7")?;
    assert!(was_replayed);
    assert_eq!(retry, first, "the retry gets the first process's answer");
    let (_, fresh) = charge(&second_server, "order-8")?;
    assert_eq!(
        fresh,
        format!("charged by process {}", second_server.process.id())
    );
    Ok(())
}
