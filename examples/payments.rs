//! A tiny payments API made safe to retry with one layer: `POST /payments` charges an account
//! (the bank takes three seconds), and a retry with the same `Idempotency-Key` gets the same
//! payment back instead of a second charge.
//!
//! Run with `cargo run --example payments --features http -- [FILE]` (without FILE it uses a
//! temporary store file), then follow the README's "HTTP middleware" section with curl. It
//! listens on 127.0.0.1:3000, or on `PAYMENTS_ADDR`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use dedupe_store::Store;
use dedupe_store::Ticket;
use dedupe_store::http::IdempotencyLayer;
use serde::Deserialize;

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
    let dir = tempfile::tempdir()?;
    let path = match std::env::args_os().nth(1) {
        Some(path) => path.into(),
        None => dir.path().join("payments.redb"),
    };
    let store = Store::open(&path)?;

    let idempotency = IdempotencyLayer::builder(store.clone())
        .require_key(true)
        // Each account has its own keys: one account's key never blocks another's.
        .scope(|request: &axum::http::request::Parts| account(&request.headers).to_string())
        .lease(Duration::from_secs(30))
        .ttl(Duration::from_secs(24 * 3600))
        .build()?;
    let app = Router::new()
        .route("/payments", post(create_payment))
        .with_state(Arc::new(Bank::default()))
        .layer(idempotency);

    let addr = std::env::var("PAYMENTS_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("payments API on http://{addr}, store {}", path.display());
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
        println!("attempt {} takes over {}", ticket.attempt(), ticket.key());
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
