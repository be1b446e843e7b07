//! The `Idempotency-Key` layer over a store on PostgreSQL, behind real axum servers on a
//! multi-thread tokio runtime: the engine's own runtime runs its database calls while the
//! layer calls the store from inside the server's, and two servers on one database (two
//! store handles, as two processes would have) share every key. Each test starts its own
//! throwaway cluster and is skipped (passes without checking) where the PostgreSQL binaries
//! are missing.

// The helpers are shared with tests/http.rs; this file uses some of them.
#[allow(dead_code)]
#[path = "http/support.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::post;
use dedupe_store::Store;
use dedupe_store::http::{IdempotencyLayer, InFlight, credentials_scope, scoped_key};
use dedupe_store::testing::postgres::TestCluster;
use tokio::sync::Notify;

use support::{Result, Runs, charges, client, gated, keyed_post, problem, replayed, serve};

fn store(url: &str) -> dedupe_store::Result<Store> {
    Store::builder().postgres_connections(4).open_postgres(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_runs_its_retry_replays_and_another_body_is_422() -> Result {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let store = store(&cluster.create_database("http_basics"))?;
    let runs = Runs::default();
    let base = serve(charges(&runs).layer(IdempotencyLayer::new(store.clone()))).await?;
    let client = client()?;
    let url = format!("{base}/charges");

    let first = keyed_post(&client, &url, "order-1", "amount=10").await?;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!replayed(&first));
    let location = first.headers()[header::LOCATION].clone();
    let body = first.text().await?;

    let retry = keyed_post(&client, &url, "order-1", "amount=10").await?;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(replayed(&retry));
    assert_eq!(retry.headers()[header::LOCATION], location);
    assert_eq!(retry.text().await?, body);
    assert_eq!(runs.get(), 1);

    let other_body = keyed_post(&client, &url, "order-1", "amount=99").await?;
    assert_eq!(
        problem(other_body).await?,
        (StatusCode::UNPROCESSABLE_ENTITY, "key-reused".into())
    );
    assert_eq!(runs.get(), 1);

    let key = scoped_key(
        &credentials_scope(&axum::http::HeaderMap::new()),
        b"order-1",
    );
    assert!(store.get(&key)?.ok_or("the key is stored")?.is_completed());
    // Closed and dropped inside the server's runtime: the engine's must not mind.
    store.close()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_while_the_first_runs_gets_409_or_waits_across_stores() -> Result {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("http_in_flight");
    let (runs, entered, open) = (
        Runs::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    // Two servers, each on a store handle of its own over the same database: the first
    // rejects duplicates at once, the second waits for the first request to finish.
    let rejecting =
        serve(gated(&runs, &entered, &open).layer(IdempotencyLayer::new(store(&url)?))).await?;
    let waiting_layer = IdempotencyLayer::builder(store(&url)?)
        .in_flight(InFlight::Wait(Duration::from_secs(20)))
        .build()?;
    let waiting = serve(gated(&runs, &entered, &open).layer(waiting_layer)).await?;
    let client = client()?;

    let first = tokio::spawn({
        let (client, url) = (client.clone(), format!("{rejecting}/slow"));
        async move { keyed_post(&client, &url, "k", "").await }
    });
    entered.notified().await;

    let conflict = keyed_post(&client, &format!("{rejecting}/slow"), "k", "").await?;
    assert!(conflict.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(
        problem(conflict).await?,
        (StatusCode::CONFLICT, "key-in-use".into())
    );

    // The waiter parks on the other store; the first request's completion wakes it
    // (LISTEN/NOTIFY, or the engine's poll each second).
    let waiter = tokio::spawn({
        let (client, url) = (client.clone(), format!("{waiting}/slow"));
        async move { keyed_post(&client, &url, "k", "").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the duplicate did not wait");
    open.notify_one();
    let first = first.await??;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(first.text().await?, "run 1");
    let waited = tokio::time::timeout(Duration::from_secs(10), waiter).await???;
    assert_eq!(waited.status(), StatusCode::CREATED);
    assert!(replayed(&waited));
    assert_eq!(waited.text().await?, "run 1");
    assert_eq!(runs.get(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_posts_to_two_servers_run_the_handler_once() -> Result {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    let url = cluster.create_database("http_storm");
    let runs = Runs::default();
    let mut bases = Vec::new();
    for _ in 0..2 {
        let layer = IdempotencyLayer::builder(store(&url)?)
            .in_flight(InFlight::Wait(Duration::from_secs(20)))
            .build()?;
        let handler_runs = runs.clone();
        let app = Router::new().route(
            "/pay",
            post(move |body: String| async move {
                let run = handler_runs.next();
                // Long enough for the others to arrive while it runs.
                tokio::time::sleep(Duration::from_millis(200)).await;
                format!("paid {body} in run {run}")
            }),
        );
        bases.push(serve(app.layer(layer)).await?);
    }
    let client = client()?;
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let (client, url) = (client.clone(), format!("{}/pay", bases[i % 2]));
            tokio::spawn(async move {
                let response = keyed_post(&client, &url, "storm", "42").await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                    response.status(),
                    replayed(&response),
                    response.text().await?,
                ))
            })
        })
        .collect();
    let mut fresh = 0;
    for request in requests {
        let (status, was_replayed, body) = request.await??;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "paid 42 in run 1");
        fresh += usize::from(!was_replayed);
    }
    assert_eq!(fresh, 1, "one response is the handler's own");
    assert_eq!(runs.get(), 1);
    Ok(())
}
