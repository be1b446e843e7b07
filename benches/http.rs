//! Requests per second through the `Idempotency-Key` layer, against the same axum server
//! without it, on loopback: replays (a completed key, answered from a read transaction) and
//! fresh keys (a claim and a complete, each an fsynced group commit), one request at a time and
//! 32 in flight. The same cases run with the store over PostgreSQL when the server's binaries
//! are installed (a throwaway local server, fsync on), named `..._postgres`.
//!
//! `cargo bench -p dedupe-store-benches --bench http`. Criterion's "thrpt" is requests per second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use dedupe_store::Store;
use dedupe_store::http::IdempotencyLayer;
use dedupe_store::testing::postgres::TestCluster;
use tokio::runtime::Runtime;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The handler both servers run: a small JSON answer, as a payments API gives.
fn app() -> Router {
    Router::new().route(
        "/payments",
        post(|body: String| async move {
            (
                axum::http::StatusCode::CREATED,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                format!(r#"{{"id":"pay_1","status":"succeeded","request":{body:?}}}"#),
            )
        }),
    )
}

async fn serve(app: Router) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}/payments"))
}

/// Where each request's key comes from.
#[derive(Clone)]
enum Keys {
    /// The same, already completed key: every request is a replay.
    Replay,
    /// A new key per request: every request claims, runs the handler and completes.
    Fresh(Arc<AtomicU64>),
}

impl Keys {
    fn next(&self) -> String {
        match self {
            Keys::Replay => "replayed-key".to_string(),
            Keys::Fresh(counter) => format!("fresh-{}", counter.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

/// Sends `iters` rounds of `in_flight` concurrent requests and returns the time they took.
fn rounds(
    runtime: &Runtime,
    client: &reqwest::Client,
    url: &str,
    keys: &Keys,
    in_flight: usize,
    iters: u64,
) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let requests: Vec<_> = (0..in_flight)
                .map(|_| {
                    let request = client
                        .post(url)
                        .header("idempotency-key", keys.next())
                        .body("amount=4200&currency=eur");
                    tokio::spawn(async move {
                        let response = request.send().await?;
                        assert!(response.status().is_success(), "{}", response.status());
                        response.bytes().await
                    })
                })
                .collect();
            for request in requests {
                let answer = request.await.expect("the request task");
                answer.expect("a benchmark request");
            }
        }
        start.elapsed()
    })
}

fn http_layer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open(dir.path().join("bench.redb")).expect("the store");
    // Kept until the end: dropping it stops the server.
    let cluster = TestCluster::start();
    let postgres = cluster.as_ref().map(|cluster| {
        Store::builder()
            .open_postgres(&cluster.create_database("http"))
            .expect("the store on PostgreSQL")
    });
    let (plain, layered, layered_postgres) = runtime
        .block_on(async {
            let plain = serve(app()).await?;
            let layered = serve(app().layer(IdempotencyLayer::new(store.clone()))).await?;
            let layered_postgres = match &postgres {
                Some(store) => {
                    Some(serve(app().layer(IdempotencyLayer::new(store.clone()))).await?)
                }
                None => None,
            };
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((plain, layered, layered_postgres))
        })
        .expect("the servers");
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .expect("the client");
    // Complete the replayed key once, so every measured request is a replay.
    rounds(&runtime, &client, &layered, &Keys::Replay, 1, 1);
    if let Some(url) = &layered_postgres {
        rounds(&runtime, &client, url, &Keys::Replay, 1, 1);
    }

    let mut group = c.benchmark_group("http");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    let fresh = Keys::Fresh(Arc::new(AtomicU64::new(0)));
    for in_flight in [1, 32] {
        group.throughput(Throughput::Elements(in_flight as u64));
        let mut cases = vec![
            ("without_layer", &plain, &fresh),
            ("replay", &layered, &Keys::Replay),
            ("fresh_key", &layered, &fresh),
        ];
        if let Some(url) = &layered_postgres {
            cases.push(("replay_postgres", url, &Keys::Replay));
            cases.push(("fresh_key_postgres", url, &fresh));
        }
        for (name, url, keys) in cases {
            group.bench_with_input(BenchmarkId::new(name, in_flight), &in_flight, |b, &n| {
                b.iter_custom(|iters| rounds(&runtime, &client, url, keys, n, iters));
            });
        }
    }
    group.finish();
    drop(runtime);
    store.close().expect("the store closes");
    if let Some(store) = postgres {
        store.close().expect("the store on PostgreSQL closes");
    }
    drop(cluster);
}

criterion_group!(benches, http_layer);
criterion_main!(benches);
