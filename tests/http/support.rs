//! What the HTTP tests share: test servers and handlers, the client, and answer checks.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use axum::routing::{any, post};
use dedupe_store::{EntryState, Store, Ticket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

pub(crate) type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How many times the handler ran.
#[derive(Clone, Default)]
pub(crate) struct Runs(Arc<AtomicUsize>);

impl Runs {
    pub(crate) fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A charge handler: 201, a stored `Location`, an unstored `X-Run`, the run number and the
/// request body in the JSON body.
pub(crate) fn charges(runs: &Runs) -> Router {
    let runs = runs.clone();
    let handler = move |body: String| {
        let run = runs.next();
        async move {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(
                header::LOCATION,
                HeaderValue::from_str(&format!("/charges/{run}"))
                    .unwrap_or(HeaderValue::from_static("/")),
            );
            headers.insert("x-run", HeaderValue::from(run));
            (
                StatusCode::CREATED,
                headers,
                format!(r#"{{"charge":{run},"request":{body:?}}}"#),
            )
        }
    };
    Router::new()
        .route("/charges", any(handler.clone()))
        .route("/refunds", post(handler))
}

/// Serves `app` on an ephemeral loopback port until the test's runtime ends.
pub(crate) async fn serve(app: Router) -> Result<String> {
    // A backlog deep enough for a few thousand clients connecting at once.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener = socket.listen(4096)?;
    let addr: SocketAddr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

pub(crate) fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?)
}

pub(crate) async fn keyed_post(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &str,
) -> Result<reqwest::Response> {
    Ok(client
        .post(url)
        .header("idempotency-key", key)
        .body(body.to_string())
        .send()
        .await?)
}

/// The status and the problem `type` of a problem+json answer.
pub(crate) async fn problem(response: reqwest::Response) -> Result<(StatusCode, String)> {
    let status = response.status();
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await?)?;
    let kind = body["type"].as_str().ok_or("a problem type")?;
    Ok((
        status,
        kind.trim_start_matches("urn:dedupe-store:idempotency:")
            .to_string(),
    ))
}

pub(crate) fn replayed(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("idempotency-replayed")
        .is_some_and(|v| v == "true")
}

/// A handler that tells `entered` it started and then waits for `open`.
pub(crate) fn gated(runs: &Runs, entered: &Arc<Notify>, open: &Arc<Notify>) -> Router {
    let (runs, entered, open) = (runs.clone(), entered.clone(), open.clone());
    Router::new().route(
        "/slow",
        post(move || async move {
            let run = runs.next();
            entered.notify_one();
            open.notified().await;
            (StatusCode::CREATED, format!("run {run}"))
        }),
    )
}

/// A tower service that fails its first call with an error, not a response.
#[derive(Clone)]
pub(crate) struct FailsOnce(pub(crate) Runs);

impl tower::Service<Request<Body>> for FailsOnce {
    type Response = Response<Body>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Response<Body>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        let run = self.0.next();
        Box::pin(async move {
            match run {
                1 => Err(std::io::Error::other("connection to the bank reset")),
                _ => Ok(Response::new(Body::from("charged"))),
            }
        })
    }
}

/// Sends a raw chunked HTTP/1.1 request (no Content-Length) and returns the status line.
pub(crate) async fn chunked_post(
    base: &str,
    path: &str,
    key: &str,
    chunks: &[&[u8]],
) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\nidempotency-key: {key}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    for chunk in chunks {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await?;
        stream.write_all(chunk).await?;
        stream.write_all(b"\r\n").await?;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    // The server may close without reading what it refused; what it sent before still counts.
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    Ok(response.lines().next().unwrap_or_default().to_string())
}

/// Waits until the store shows the key's lease as over.
pub(crate) async fn lease_ended(store: &Store, key: &dedupe_store::Key) -> Result {
    eventually("the abandoned claim's lease is cut", || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        Ok(matches!(
            store.get(key)?.map(|entry| entry.state),
            Some(EntryState::InProgress { lease_until, .. }) if u128::from(lease_until) <= now
        ))
    })
    .await
}

/// Waits (at most 10 s) until `done` holds: a bound on waits for what happens on the server,
/// so that a broken behaviour fails the test instead of hanging it.
pub(crate) async fn eventually(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done()? {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting until {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A handler that records each attempt's ticket; the first never answers (`hang`) or panics.
pub(crate) fn attempts(runs: &Runs, first: &'static str) -> Router {
    let runs = runs.clone();
    Router::new().route(
        "/work",
        post(move |Extension(ticket): Extension<Ticket>| async move {
            if runs.next() == 1 {
                match first {
                    "panic" => panic!("the handler panics on its first attempt"),
                    _ => std::future::pending::<()>().await,
                }
            }
            format!(
                "attempt {} takeover {}",
                ticket.attempt(),
                ticket.is_takeover()
            )
        }),
    )
}

/// Serves [`attempts`] behind the layer with a 30 s lease; returns the route's URL.
pub(crate) async fn serve_attempts(
    runs: &Runs,
    store: &Store,
    first: &'static str,
) -> Result<String> {
    let layer = dedupe_store::http::IdempotencyLayer::builder(store.clone())
        .lease(Duration::from_secs(30))
        .build()?;
    let base = serve(attempts(runs, first).layer(layer)).await?;
    Ok(format!("{base}/work"))
}

/// Counts, when dropped, one request whose future the server dropped.
pub(crate) struct DropSignal(pub(crate) Runs);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.next();
    }
}
