//! A tiny payments API made safe to retry with one layer: `POST /payments` charges an account
//! (the bank takes three seconds), and a retry with the same `Idempotency-Key` gets the same
//! payment back instead of a second charge.
//!
//! Run with `cargo run --example payments --features http,metrics,tracing -- [FILE]` (without
//! FILE it uses a temporary store file, or `PAYMENTS_DB`), then follow the README's "HTTP middleware" section with
//! curl. It listens on 127.0.0.1:3000, or on `PAYMENTS_ADDR`, and keeps at most a million keys,
//! or `PAYMENTS_MAX_KEYS`. `GET /metrics` serves the store's
//! and the layer's metrics in the Prometheus text format, and every request's and store call's
//! span is logged to stderr (`RUST_LOG`-style filtering is left out to keep it small), so a
//! retry storm can be watched being absorbed.
//!
//! Built with `--features http,metrics,tracing,postgres`, FILE (or `PAYMENTS_DB`) may be a
//! `postgres://` URL instead: several copies of the server on other ports then share every key
//! (see docs/POSTGRES.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, MatchedPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dedupe_store::Store;
use dedupe_store::Ticket;
use dedupe_store::http::IdempotencyLayer;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde::Deserialize;
use tracing_subscriber::fmt::format::FmtSpan;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How long the "bank" takes to charge a card: long enough to send a retry meanwhile.
const BANK_LATENCY: Duration = Duration::from_secs(3);

#[derive(Deserialize)]
struct NewPayment {
    amount: u64,
    currency: String,
}

#[derive(Default)]
struct Bank {
    charges: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<()> {
    // Spans to stderr, one line as each closes, with its fields (the outcome among them).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Latencies in seconds, batch sizes in operations.
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            5.0, 10.0,
        ])?
        .set_buckets_for_metric(
            Matcher::Full("dedupe_commit_batch_size".to_string()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )?
        .install_recorder()?;

    let dir = tempfile::tempdir()?;
    let db = std::env::args_os()
        .nth(1)
        .or_else(|| std::env::var_os("PAYMENTS_DB"));
    // A budget of keys, so that a flood of fresh keys gets 503s instead of filling the disk.
    let max_keys = match std::env::var("PAYMENTS_MAX_KEYS") {
        Ok(text) => text
            .parse()
            .map_err(|err| format!("PAYMENTS_MAX_KEYS={text}: {err}"))?,
        Err(_) => 1_000_000,
    };
    let builder = Store::builder().max_keys(max_keys);
    let url = db
        .as_ref()
        .and_then(|db| db.to_str())
        .filter(|db| db.starts_with("postgres://") || db.starts_with("postgresql://"));
    let store = match (url, &db) {
        #[cfg(feature = "postgres")]
        (Some(url), _) => builder.open_postgres(url)?,
        #[cfg(not(feature = "postgres"))]
        (Some(_), _) => return Err("a postgres:// store needs --features postgres".into()),
        (None, Some(path)) => builder.open(std::path::PathBuf::from(path))?,
        (None, None) => builder.open(dir.path().join("payments.redb"))?,
    };
    let location = match store.path() {
        Some(path) => path.display().to_string(),
        None => "on PostgreSQL".to_string(),
    };

    let idempotency = IdempotencyLayer::builder(store.clone())
        .require_key(true)
        // Each account has its own keys: one account's key never blocks another's.
        .scope(|request: &axum::http::request::Parts| account(&request.headers).to_string())
        .lease(Duration::from_secs(30))
        .ttl(Duration::from_secs(24 * 3600))
        // Metrics and spans by route template, which the router knows once it has matched.
        .route_label(|request: &axum::http::request::Parts| {
            request
                .extensions
                .get::<MatchedPath>()
                .map(|path| path.as_str().to_string())
        })
        .build()?;
    let gauges = store.clone();
    let app = Router::new()
        .route("/payments", post(create_payment))
        .with_state(Arc::new(Bank::default()))
        .route_layer(idempotency)
        .route(
            "/metrics",
            get(move || async move {
                // The key gauges are read when scraped.
                let _ = tokio::task::spawn_blocking(move || gauges.stats()).await;
                metrics.render()
            }),
        );

    let addr = std::env::var("PAYMENTS_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("payments API on http://{addr}, store {location}");
    println!("Ctrl-C stops it.");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    store.close()?;
    Ok(())
}

/// The account a request acts for: the bearer token (a real service would verify it first,
/// in an authentication layer outside this one).
fn account(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("anonymous")
}

async fn create_payment(
    State(bank): State<Arc<Bank>>,
    Extension(ticket): Extension<Ticket>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let payment: NewPayment = match serde_json::from_slice(&body) {
        Ok(payment) => payment,
        Err(err) => {
            return (StatusCode::BAD_REQUEST, format!("bad payment: {err}\n")).into_response();
        }
    };
    if ticket.is_takeover() {
        // A previous attempt died half-way; a real service would ask the bank whether it
        // charged before charging again, quoting the fencing token.
        println!(
            "attempt {} takes over a payment (fencing token {})",
            ticket.attempt(),
            ticket.fencing_token()
        );
    }
    tokio::time::sleep(BANK_LATENCY).await;
    let charge = bank.charges.fetch_add(1, Ordering::SeqCst) + 1;
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    let id = format!("pay_{millis:x}{charge}");
    let account = account(&headers);
    println!(
        "charge #{charge}: {} {} to {account}",
        payment.amount, payment.currency
    );
    let body = serde_json::json!({
        "id": id,
        "account": account,
        "amount": payment.amount,
        "currency": payment.currency,
        "status": "succeeded",
    });
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::LOCATION, format!("/payments/{id}")),
        ],
        format!("{body}\n"),
    )
        .into_response()
}
