#![cfg(feature = "http")]
//! The `Idempotency-Key` layer behind a real axum server on 127.0.0.1, driven by a real HTTP
//! client: every behaviour of the layer, a retry storm, a panicking handler, a client that
//! disconnects, and (in `http/restart.rs`) a server process restarted between a request and
//! its retry.

#[path = "http/budget.rs"]
mod budget;
#[path = "http/restart.rs"]
mod restart;
#[path = "http/support.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::Extension;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, header};
use axum::routing::post;
use dedupe_store::http::{IdempotencyLayer, InFlight, credentials_scope, scoped_key};
use dedupe_store::{ManualClock, Store, Ticket};
use tokio::sync::Notify;
use tower::Layer;

use support::{
    DropSignal, FailsOnce, Result, Runs, charges, chunked_post, client, eventually, gated,
    keyed_post, lease_ended, problem, replayed, serve, serve_attempts,
};

#[tokio::test]
async fn a_first_request_runs_once_and_its_retry_replays_the_stored_response() -> Result {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("http.redb"))?;
    let runs = Runs::default();
    let base = serve(charges(&runs).layer(IdempotencyLayer::new(store.clone()))).await?;
    let client = client()?;

    let first = keyed_post(&client, &format!("{base}/charges"), "order-1", "amount=10").await?;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!replayed(&first));
    assert_eq!(first.headers()["x-run"], "1");
    let location = first.headers()[header::LOCATION].clone();
    let body = first.text().await?;

    let retry = keyed_post(&client, &format!("{base}/charges"), "order-1", "amount=10").await?;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(replayed(&retry));
    assert_eq!(retry.headers()[header::LOCATION], location);
    assert_eq!(retry.headers()[header::CONTENT_TYPE], "application/json");
    assert!(
        retry.headers().get("x-run").is_none(),
        "x-run is not a stored header"
    );
    assert_eq!(retry.text().await?, body);
    assert_eq!(runs.get(), 1);

    let key = scoped_key(&anonymous(), b"order-1");
    assert!(store.get(&key)?.ok_or("the key is stored")?.is_completed());
    Ok(())
}

#[tokio::test]
async fn other_methods_and_keyless_requests_pass_through() -> Result {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(Store::in_memory()?);
    let base = serve(charges(&runs).layer(layer)).await?;
    let client = client()?;
    let url = format!("{base}/charges");
    for method in [Method::GET, Method::PUT] {
        for _ in 0..2 {
            let response = client
                .request(method.clone(), &url)
                .header("idempotency-key", "k")
                .send()
                .await?;
            assert!(!replayed(&response));
        }
    }
    for _ in 0..2 {
        assert!(!replayed(&client.post(&url).body("no key").send().await?));
    }
    assert_eq!(runs.get(), 6);
    // PATCH is covered by default.
    for _ in 0..2 {
        client
            .patch(&url)
            .header("idempotency-key", "k")
            .send()
            .await?;
    }
    assert_eq!(runs.get(), 7);
    Ok(())
}

#[tokio::test]
async fn methods_header_names_and_ttl_are_configurable() -> Result {
    let runs = Runs::default();
    let clock = ManualClock::new(1_000_000);
    let store = Store::builder().clock(clock.clone()).in_memory()?;
    let layer = IdempotencyLayer::builder(store)
        .methods([Method::PUT])
        .key_header(HeaderName::from_static("x-request-id"))
        .replayed_header(HeaderName::from_static("x-replayed"))
        .ttl(Duration::from_secs(60))
        .build()?;
    let base = serve(charges(&runs).layer(layer)).await?;
    let client = client()?;
    let url = format!("{base}/charges");
    let put = || client.put(&url).header("x-request-id", "r1").send();
    assert!(put().await?.headers().get("x-replayed").is_none());
    assert_eq!(put().await?.headers()["x-replayed"], "true");
    assert_eq!(runs.get(), 1);
    // POST is no longer covered, and the default header name means nothing now.
    for _ in 0..2 {
        keyed_post(&client, &url, "r1", "").await?;
    }
    assert_eq!(runs.get(), 3);
    // The response is forgotten once its TTL passes.
    clock.advance(Duration::from_secs(60));
    assert!(put().await?.headers().get("x-replayed").is_none());
    assert_eq!(runs.get(), 4);
    Ok(())
}

#[tokio::test]
async fn a_required_key_is_enforced_and_bad_keys_are_refused() -> Result {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(Store::in_memory()?)
        .require_key(true)
        .build()?;
    let base = serve(charges(&runs).layer(layer)).await?;
    let client = client()?;
    let url = format!("{base}/charges");

    let missing = client.post(&url).body("x").send().await?;
    assert_eq!(
        problem(missing).await?,
        (StatusCode::BAD_REQUEST, "missing-key".into())
    );
    let too_long = "k".repeat(256);
    for bad in [&too_long[..], "", "a b", "tab\there"] {
        let response = keyed_post(&client, &url, bad, "x").await?;
        assert_eq!(
            problem(response).await?,
            (StatusCode::BAD_REQUEST, "invalid-key".into()),
            "{bad:?}"
        );
    }
    let latin1 = client
        .post(&url)
        .header("idempotency-key", HeaderValue::from_bytes(b"caf\xe9")?)
        .send()
        .await?;
    assert_eq!(problem(latin1).await?.1, "invalid-key");
    let twice = client
        .post(&url)
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .send()
        .await?;
    assert_eq!(problem(twice).await?.1, "invalid-key");
    assert_eq!(runs.get(), 0, "no bad request reached the handler");

    let longest = "k".repeat(255);
    assert_eq!(
        keyed_post(&client, &url, &longest, "x").await?.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        client.get(&url).send().await?.status(),
        StatusCode::CREATED,
        "GET needs no key"
    );
    assert_eq!(runs.get(), 2);
    Ok(())
}

#[tokio::test]
async fn keys_are_scoped_by_tenant_and_name_one_request() -> Result {
    let runs = Runs::default();
    let store = Store::in_memory()?;
    let layer = IdempotencyLayer::builder(store.clone())
        .scope(|request: &axum::http::request::Parts| {
            request
                .headers
                .get("x-tenant")
                .map(|t| t.as_bytes().to_vec())
                .unwrap_or_default()
        })
        .build()?;
    let base = serve(charges(&runs).layer(layer)).await?;
    let client = client()?;
    let send = |tenant: &'static str, path: &'static str| {
        client
            .post(format!("{base}{path}"))
            .header("x-tenant", tenant)
            .header("idempotency-key", "same")
            .body("x")
            .send()
    };
    assert!(!replayed(&send("acme", "/charges").await?));
    assert!(
        !replayed(&send("globex", "/charges").await?),
        "another tenant's key is its own"
    );
    assert_eq!(
        problem(send("acme", "/refunds").await?).await?,
        (StatusCode::UNPROCESSABLE_ENTITY, "key-reused".into()),
        "a key names one request, whatever its path"
    );
    assert!(replayed(&send("acme", "/charges").await?));
    assert_eq!(runs.get(), 2);
    assert!(store.get(scoped_key(b"globex", b"same"))?.is_some());
    Ok(())
}

#[tokio::test]
async fn a_key_reused_on_another_method_or_path_is_422() -> Result {
    let runs = Runs::default();
    let base = serve(charges(&runs).layer(IdempotencyLayer::new(Store::in_memory()?))).await?;
    let client = client()?;
    let url = format!("{base}/charges");
    assert_eq!(
        keyed_post(&client, &url, "k", "amount=10").await?.status(),
        StatusCode::CREATED
    );
    let patch = client
        .patch(&url)
        .header("idempotency-key", "k")
        .body("amount=10")
        .send()
        .await?;
    assert_eq!(
        problem(patch).await?,
        (StatusCode::UNPROCESSABLE_ENTITY, "key-reused".into())
    );
    let other_path = keyed_post(&client, &format!("{base}/refunds"), "k", "amount=10").await?;
    assert_eq!(
        problem(other_path).await?,
        (StatusCode::UNPROCESSABLE_ENTITY, "key-reused".into())
    );
    assert_eq!(runs.get(), 1);
    Ok(())
}

#[tokio::test]
async fn answers_that_say_the_request_never_ran_are_not_replayed() -> Result {
    let runs = Runs::default();
    let handler_runs = runs.clone();
    let store = Store::in_memory()?;
    let app = Router::new().route(
        "/payments",
        post(move || async move {
            match handler_runs.next() {
                1 => (StatusCode::NOT_FOUND, "no such account yet"),
                2 => (StatusCode::TOO_MANY_REQUESTS, "slow down"),
                _ => (StatusCode::CREATED, "charged"),
            }
        }),
    );
    let base = serve(app.layer(IdempotencyLayer::new(store.clone()))).await?;
    let client = client()?;
    let url = format!("{base}/payments");
    let key = scoped_key(&anonymous(), b"order-1001");

    // The router's own 405 (the route takes POST only), twice: never stored, never replayed.
    for _ in 0..2 {
        let patch = client
            .patch(&url)
            .header("idempotency-key", "order-1001")
            .send()
            .await?;
        assert_eq!(
            (patch.status(), replayed(&patch)),
            (StatusCode::METHOD_NOT_ALLOWED, false)
        );
        assert!(store.get(&key)?.is_none(), "the 405 gave the key back");
    }
    // The handler's 404 and 429 give the key back too; its 201 is kept.
    for expected in [
        StatusCode::NOT_FOUND,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::CREATED,
    ] {
        let response = keyed_post(&client, &url, "order-1001", "").await?;
        assert_eq!((response.status(), replayed(&response)), (expected, false));
    }
    let replay = keyed_post(&client, &url, "order-1001", "").await?;
    assert_eq!(
        (replay.status(), replayed(&replay)),
        (StatusCode::CREATED, true)
    );
    assert_eq!(runs.get(), 3);
    Ok(())
}

#[tokio::test]
async fn a_quoted_key_and_its_bare_form_are_one_key() -> Result {
    let runs = Runs::default();
    let store = Store::in_memory()?;
    let base = serve(charges(&runs).layer(IdempotencyLayer::new(store.clone()))).await?;
    let client = client()?;
    let url = format!("{base}/charges");
    let first = keyed_post(&client, &url, r#""q-1""#, "amount=10").await?;
    assert_eq!(
        (first.status(), replayed(&first)),
        (StatusCode::CREATED, false)
    );
    let bare = keyed_post(&client, &url, "q-1", "amount=10").await?;
    assert_eq!(
        (bare.status(), replayed(&bare)),
        (StatusCode::CREATED, true),
        "the bare form is the same key: no second charge"
    );
    assert!(store.get(scoped_key(&anonymous(), b"q-1"))?.is_some());

    // The draft's strings may hold spaces and escaped quotes.
    for _ in 0..2 {
        let spaced = keyed_post(&client, &url, r#""a b \"c\"""#, "amount=10").await?;
        assert_eq!(spaced.status(), StatusCode::CREATED);
    }
    assert!(
        store
            .get(scoped_key(&anonymous(), br#"a b "c""#))?
            .is_some()
    );
    assert_eq!(runs.get(), 2);

    for bad in [r#""unterminated"#, r#""a"b"#, r#""a\nb""#, r#""""#] {
        let response = keyed_post(&client, &url, bad, "amount=10").await?;
        assert_eq!(
            problem(response).await?,
            (StatusCode::BAD_REQUEST, "invalid-key".into()),
            "{bad}"
        );
    }
    assert_eq!(runs.get(), 2);
    Ok(())
}

/// The scope of requests without credentials.
fn anonymous() -> Vec<u8> {
    credentials_scope(&axum::http::HeaderMap::new())
}

/// Two callers with different credentials send the same key and body.
async fn two_callers(layer: IdempotencyLayer) -> Result<(Runs, [(bool, String); 4])> {
    let runs = Runs::default();
    let base = serve(charges(&runs).layer(layer)).await?;
    let client = client()?;
    let mut answers = Vec::new();
    for token in ["Bearer alice", "Bearer bob", "Bearer alice", "Bearer bob"] {
        let response = client
            .post(format!("{base}/charges"))
            .header(header::AUTHORIZATION, token)
            .header("idempotency-key", "order-1")
            .body("amount=10")
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::CREATED);
        answers.push((replayed(&response), response.text().await?));
    }
    let answers: [(bool, String); 4] = answers.try_into().map_err(|_| "four answers")?;
    Ok((runs, answers))
}

#[tokio::test]
async fn callers_with_other_credentials_never_share_keys_by_default() -> Result {
    let store = Store::in_memory()?;
    let (runs, [alice, bob, alice_again, bob_again]) =
        two_callers(IdempotencyLayer::new(store.clone())).await?;
    assert_eq!(runs.get(), 2, "each caller's request ran");
    assert!(!alice.0 && !bob.0, "neither first request is a replay");
    assert_ne!(alice.1, bob.1, "bob did not get alice's response");
    assert_eq!(alice_again, (true, alice.1), "alice's retry replays hers");
    assert_eq!(bob_again, (true, bob.1), "bob's retry replays his");

    // A builder without .scope() scopes by credentials too; cookies count as credentials.
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(store).build()?;
    let base = serve(charges(&runs).layer(layer)).await?;
    let client = client()?;
    for cookie in ["session=alice", "session=bob", "session=alice"] {
        client
            .post(format!("{base}/charges"))
            .header(header::COOKIE, cookie)
            .header("idempotency-key", "order-2")
            .body("amount=10")
            .send()
            .await?;
    }
    assert_eq!(runs.get(), 2, "one run per session");
    Ok(())
}

#[tokio::test]
async fn a_shared_scope_replays_across_callers() -> Result {
    let layer = IdempotencyLayer::builder(Store::in_memory()?)
        .shared_scope()
        .build()?;
    let (runs, answers) = two_callers(layer).await?;
    assert_eq!(runs.get(), 1, "one execution for everyone");
    assert!(!answers[0].0);
    for answer in &answers[1..] {
        assert_eq!(answer, &(true, answers[0].1.clone()));
    }
    Ok(())
}

#[tokio::test]
async fn the_same_key_with_another_request_is_422() -> Result {
    let runs = Runs::default();
    let base = serve(charges(&runs).layer(IdempotencyLayer::new(Store::in_memory()?))).await?;
    let client = client()?;
    let url = format!("{base}/charges");
    assert_eq!(
        keyed_post(&client, &url, "k", "amount=10").await?.status(),
        StatusCode::CREATED
    );
    let other_body = keyed_post(&client, &url, "k", "amount=99").await?;
    assert_eq!(
        problem(other_body).await?,
        (StatusCode::UNPROCESSABLE_ENTITY, "key-reused".into())
    );
    let other_query = keyed_post(&client, &format!("{url}?currency=usd"), "k", "amount=10").await?;
    assert_eq!(
        problem(other_query).await?.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert!(replayed(
        &keyed_post(&client, &url, "k", "amount=10").await?
    ));
    assert_eq!(runs.get(), 1);
    Ok(())
}

/// The `Retry-After` a retry gets while the first request with its key runs, behind `layer`;
/// checks that the first request then completes and is replayed.
async fn retry_after_while_the_first_runs(layer: IdempotencyLayer) -> Result<u64> {
    let (runs, entered, open) = (
        Runs::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let base = serve(gated(&runs, &entered, &open).layer(layer)).await?;
    let client = client()?;
    let url = format!("{base}/slow");
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { keyed_post(&client, &url, "k", "").await }
    });
    entered.notified().await;

    let conflict = keyed_post(&client, &url, "k", "").await?;
    let retry_after: u64 = conflict.headers()[header::RETRY_AFTER].to_str()?.parse()?;
    assert_eq!(
        problem(conflict).await?,
        (StatusCode::CONFLICT, "key-in-use".into())
    );

    open.notify_one();
    let first = first.await??;
    assert_eq!(first.text().await?, "run 1");
    let replay = keyed_post(&client, &url, "k", "").await?;
    assert!(replayed(&replay));
    assert_eq!(replay.text().await?, "run 1");
    assert_eq!(runs.get(), 1);
    Ok(retry_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_the_first_runs_is_409_with_a_retry_after_hint() -> Result {
    let with = |lease: u64, hint: Option<u64>| {
        let mut builder =
            IdempotencyLayer::builder(Store::in_memory()?).lease(Duration::from_secs(lease));
        if let Some(hint) = hint {
            builder = builder.retry_after(Duration::from_secs(hint));
        }
        builder.build()
    };
    // A 30 s lease: the default hint, 1 s, not the lease's 29 s or so left.
    assert_eq!(retry_after_while_the_first_runs(with(30, None)?).await?, 1);
    assert_eq!(
        retry_after_while_the_first_runs(with(30, Some(5))?).await?,
        5
    );
    // A hint longer than the lease is cut to the lease's end.
    let cut = retry_after_while_the_first_runs(with(10, Some(60))?).await?;
    assert!((1..=10).contains(&cut), "Retry-After {cut}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_identical_posts_run_the_handler_once() -> Result {
    let runs = Runs::default();
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("storm.redb"))?;
    let layer = IdempotencyLayer::builder(store)
        .in_flight(InFlight::Wait(Duration::from_secs(20)))
        .build()?;
    let handler_runs = runs.clone();
    let app = Router::new().route(
        "/pay",
        post(move |body: String| async move {
            let run = handler_runs.next();
            // Long enough for the other 49 to arrive while it runs.
            tokio::time::sleep(Duration::from_millis(200)).await;
            format!("paid {body} in run {run}")
        }),
    );
    let base = serve(app.layer(layer)).await?;
    let client = client()?;
    let requests: Vec<_> = (0..50)
        .map(|_| {
            let (client, url) = (client.clone(), format!("{base}/pay"));
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
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "paid 42 in run 1")
        );
        fresh += usize::from(!was_replayed);
    }
    assert_eq!(runs.get(), 1, "the handler ran once");
    assert_eq!(fresh, 1, "one answer is the original, 49 are replays");
    Ok(())
}

/// Duplicates that wait for a first request hold tasks, not threads of the blocking pool: with
/// a pool of 16 threads, 2,000 of them wait while other requests on the same server, whose
/// store calls need that pool, are still served.
#[test]
fn two_thousand_waiting_duplicates_leave_the_blocking_pool_to_other_requests() -> Result {
    const WAITERS: usize = 2000;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Small, so that a thread held by each waiting request would exhaust it at once.
        .max_blocking_threads(16)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (runs, entered, open) = (
            Runs::default(),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        );
        let others = Runs::default();
        let store = Store::in_memory()?;
        let layer = IdempotencyLayer::builder(store.clone())
            .lease(Duration::from_secs(60))
            .in_flight(InFlight::Wait(Duration::from_secs(60)))
            .build()?;
        let app = gated(&runs, &entered, &open).merge(charges(&others));
        let base = serve(app.layer(layer)).await?;
        let client = client()?;
        let url = format!("{base}/slow");
        let first = tokio::spawn({
            let (client, url) = (client.clone(), url.clone());
            async move { keyed_post(&client, &url, "storm", "").await }
        });
        entered.notified().await;

        let waiters: Vec<_> = (0..WAITERS)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let response = keyed_post(&client, &url, "storm", "").await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                        response.status(),
                        replayed(&response),
                        response.text().await?,
                    ))
                })
            })
            .collect();
        eventually("every duplicate waits for the first request", || {
            Ok(store.stats()?.in_progress >= WAITERS as u64)
        })
        .await?;

        for other in 0..20 {
            let response = keyed_post(
                &client,
                &format!("{base}/charges"),
                &format!("other-{other}"),
                "amount=10",
            )
            .await?;
            assert_eq!(response.status(), StatusCode::CREATED);
        }
        assert_eq!(others.get(), 20, "other requests were served");
        assert_eq!(runs.get(), 1);
        assert!(
            waiters.iter().all(|waiter| !waiter.is_finished()),
            "meanwhile the duplicates still wait"
        );

        open.notify_one();
        assert_eq!(first.await??.text().await?, "run 1");
        for waiter in waiters {
            let (status, was_replayed, body) = waiter.await??;
            assert_eq!(
                (status, was_replayed, body.as_str()),
                (StatusCode::CREATED, true, "run 1")
            );
        }
        assert_eq!(runs.get(), 1, "the slow request ran once");
        Ok(())
    })
}

/// A waiting request notices the first request's lease run out (here by the store's clock,
/// with no change to the key to wake it) and takes the key over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_takes_over_once_the_first_requests_lease_ends() -> Result {
    let runs = Runs::default();
    let clock = ManualClock::new(1_000_000);
    let store = Store::builder().clock(clock.clone()).in_memory()?;
    let layer = IdempotencyLayer::builder(store.clone())
        .lease(Duration::from_secs(30))
        .in_flight(InFlight::Wait(Duration::from_secs(20)))
        .build()?;
    let base = serve(support::attempts(&runs, "hang").layer(layer)).await?;
    let client = client()?;
    let url = format!("{base}/work");
    let hung = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { keyed_post(&client, &url, "k", "").await }
    });
    eventually("the first attempt runs", || Ok(runs.get() >= 1)).await?;
    let waiter = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { keyed_post(&client, &url, "k", "").await }
    });
    eventually("the second request waits", || {
        Ok(store.stats()?.in_progress >= 1)
    })
    .await?;
    clock.advance(Duration::from_secs(31));
    let taken_over = waiter.await??;
    assert_eq!(taken_over.text().await?, "attempt 2 takeover true");
    assert_eq!(runs.get(), 2);
    hung.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_first_request_gives_up_with_409() -> Result {
    let (runs, entered, open) = (
        Runs::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let layer = IdempotencyLayer::builder(Store::in_memory()?)
        .in_flight(InFlight::Wait(Duration::from_millis(200)))
        .build()?;
    let base = serve(gated(&runs, &entered, &open).layer(layer)).await?;
    let client = client()?;
    let url = format!("{base}/slow");
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { keyed_post(&client, &url, "k", "").await }
    });
    entered.notified().await;
    assert_eq!(
        problem(keyed_post(&client, &url, "k", "").await?).await?.0,
        StatusCode::CONFLICT
    );
    open.notify_one();
    assert_eq!(first.await??.status(), StatusCode::CREATED);
    Ok(())
}

#[tokio::test]
async fn a_server_error_releases_the_key_unless_configured_to_store_it() -> Result {
    for store_server_errors in [false, true] {
        let runs = Runs::default();
        let handler_runs = runs.clone();
        let app = Router::new().route(
            "/flaky",
            post(move || async move {
                match handler_runs.next() {
                    1 => (StatusCode::SERVICE_UNAVAILABLE, "bank down"),
                    _ => (StatusCode::CREATED, "charged"),
                }
            }),
        );
        let store = Store::in_memory()?;
        let layer = IdempotencyLayer::builder(store.clone())
            .store_server_errors(store_server_errors)
            .build()?;
        let base = serve(app.layer(layer)).await?;
        let client = client()?;
        let url = format!("{base}/flaky");
        assert_eq!(
            keyed_post(&client, &url, "k", "").await?.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Released (gone) before the answer left, not merely abandoned to a takeover.
        let key = scoped_key(&anonymous(), b"k");
        assert_eq!(store.get(&key)?.is_some(), store_server_errors);
        let retry = keyed_post(&client, &url, "k", "").await?;
        if store_server_errors {
            assert_eq!(
                (retry.status(), replayed(&retry)),
                (StatusCode::SERVICE_UNAVAILABLE, true)
            );
            assert_eq!(runs.get(), 1);
        } else {
            assert_eq!(
                (retry.status(), replayed(&retry)),
                (StatusCode::CREATED, false)
            );
            assert_eq!(runs.get(), 2);
        }
    }
    Ok(())
}

#[tokio::test]
async fn an_inner_service_error_releases_the_key() -> Result {
    let (runs, store) = (Runs::default(), Store::in_memory()?);
    let idempotent = IdempotencyLayer::new(store.clone()).layer(FailsOnce(runs.clone()));
    let service = HandleErrorLayer::new(|err: std::io::Error| async move {
        (StatusCode::BAD_GATEWAY, err.to_string())
    })
    .layer(idempotent);
    let base = serve(Router::new().route_service("/charge", service)).await?;
    let client = client()?;
    let url = format!("{base}/charge");
    assert_eq!(
        keyed_post(&client, &url, "k", "").await?.status(),
        StatusCode::BAD_GATEWAY
    );
    let key = scoped_key(&anonymous(), b"k");
    assert!(
        store.get(&key)?.is_none(),
        "released before the answer left"
    );
    let retry = keyed_post(&client, &url, "k", "").await?;
    assert_eq!(
        (retry.status(), retry.text().await?),
        (StatusCode::OK, "charged".to_string())
    );
    assert_eq!(runs.get(), 2);
    Ok(())
}

#[tokio::test]
async fn request_bodies_over_the_limit_are_413_before_the_handler() -> Result {
    let runs = Runs::default();
    let layer = IdempotencyLayer::builder(Store::in_memory()?)
        .max_request_body(16)
        .build()?;
    let base = serve(charges(&runs).layer(layer)).await?;
    let client = client()?;
    let url = format!("{base}/charges");
    let declared = keyed_post(&client, &url, "k", "seventeen bytes!!").await?;
    assert_eq!(
        problem(declared).await?,
        (StatusCode::PAYLOAD_TOO_LARGE, "request-too-large".into())
    );
    let streamed = chunked_post(&base, "/charges", "k", &[b"0123456789", b"0123456789"]).await?;
    assert_eq!(streamed, "HTTP/1.1 413 Payload Too Large");
    assert_eq!(runs.get(), 0);
    // The key was never claimed: the same key with a body in bounds runs.
    assert_eq!(
        chunked_post(&base, "/charges", "k", &[b"0123456789", b"012345"]).await?,
        "HTTP/1.1 201 Created"
    );
    assert_eq!(runs.get(), 1);
    Ok(())
}

#[tokio::test]
async fn a_response_too_large_to_store_reaches_its_client_and_is_never_rerun() -> Result {
    let runs = Runs::default();
    let handler_runs = runs.clone();
    let app = Router::new().route(
        "/export",
        post(move || async move { (StatusCode::CREATED, "x".repeat(5000 + handler_runs.next())) }),
    );
    let layer = IdempotencyLayer::builder(Store::in_memory()?)
        .max_response_body(1024)
        .build()?;
    let base = serve(app.layer(layer)).await?;
    let client = client()?;
    let url = format!("{base}/export");
    let first = keyed_post(&client, &url, "k", "").await?;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(
        first.text().await?.len(),
        5001,
        "the first client gets the whole response"
    );
    let retry = keyed_post(&client, &url, "k", "").await?;
    assert_eq!(
        problem(retry).await?,
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "response-not-replayable".into()
        )
    );
    assert_eq!(runs.get(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_abandons_the_attempt_and_its_retry_takes_over() -> Result {
    let (runs, store) = (Runs::default(), Store::in_memory()?);
    let url = serve_attempts(&runs, &store, "hang").await?;
    let client = client()?;
    // The client gives up once the handler runs: its request future (and connection) is dropped.
    let gone = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { keyed_post(&client, &url, "k", "").await }
    });
    eventually("the first attempt runs", || Ok(runs.get() >= 1)).await?;
    gone.abort();
    assert!(gone.await.is_err_and(|err| err.is_cancelled()));
    // With the 30 s lease left alone, the retry would get 409 for 30 s.
    lease_ended(&store, &scoped_key(&anonymous(), b"k")).await?;
    let retry = keyed_post(&client, &url, "k", "").await?;
    assert_eq!(retry.text().await?, "attempt 2 takeover true");
    assert_eq!(runs.get(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_abandons_the_attempt() -> Result {
    let (runs, store) = (Runs::default(), Store::in_memory()?);
    let url = serve_attempts(&runs, &store, "panic").await?;
    let client = client()?;
    assert!(
        keyed_post(&client, &url, "k", "").await.is_err(),
        "the connection dies with the handler"
    );
    lease_ended(&store, &scoped_key(&anonymous(), b"k")).await?;
    let retry = keyed_post(&client, &url, "k", "").await?;
    assert_eq!(retry.text().await?, "attempt 2 takeover true");
    let replay = keyed_post(&client, &url, "k", "").await?;
    assert!(replayed(&replay));
    assert_eq!(runs.get(), 2);
    Ok(())
}

/// A request that gives up while it waits for the first one must not keep the key: its claim,
/// acquired on the blocking pool after it left, is given back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_that_disconnects_leaves_no_claim_behind() -> Result {
    let (runs, entered, open) = (
        Runs::default(),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let handler_runs = runs.clone();
    let (handler_entered, handler_open) = (entered.clone(), open.clone());
    let app = Router::new().route(
        "/work",
        post(move |Extension(ticket): Extension<Ticket>| async move {
            if handler_runs.next() == 1 {
                handler_entered.notify_one();
                handler_open.notified().await;
                return (StatusCode::SERVICE_UNAVAILABLE, "bank down".to_string());
            }
            let answer = format!(
                "attempt {} takeover {}",
                ticket.attempt(),
                ticket.is_takeover()
            );
            (StatusCode::CREATED, answer)
        }),
    );
    // Counts requests whose future the server dropped (finished or cancelled).
    let dropped = Runs::default();
    let count_drops = {
        let dropped = dropped.clone();
        axum::middleware::from_fn(
            move |request: Request<Body>, next: axum::middleware::Next| {
                let on_drop = DropSignal(dropped.clone());
                async move {
                    let _on_drop = on_drop;
                    next.run(request).await
                }
            },
        )
    };
    let store = Store::in_memory()?;
    let layer = IdempotencyLayer::builder(store.clone())
        .lease(Duration::from_secs(30))
        .in_flight(InFlight::Wait(Duration::from_secs(5)))
        .build()?;
    let base = serve(app.layer(layer).layer(count_drops)).await?;
    let client = client()?;
    let url = format!("{base}/work");
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { keyed_post(&client, &url, "k", "").await }
    });
    entered.notified().await;
    // A second request waits for the first (its claim saw the key in progress), then its
    // client gives up.
    let waiter = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { keyed_post(&client, &url, "k", "").await }
    });
    eventually("the second request waits", || {
        Ok(store.stats()?.in_progress >= 1)
    })
    .await?;
    waiter.abort();
    assert!(waiter.await.is_err_and(|err| err.is_cancelled()));
    eventually("the server drops the waiting request", || {
        Ok(dropped.get() >= 1)
    })
    .await?;
    // The first request fails and gives the key back; the departed waiter's claim takes it.
    open.notify_one();
    assert_eq!(first.await??.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Had that claim been kept, this retry would wait 5 s and get 409.
    let retry = keyed_post(&client, &url, "k", "").await?;
    assert_eq!(retry.text().await?, "attempt 1 takeover false");
    assert_eq!(runs.get(), 2);
    Ok(())
}

#[tokio::test]
async fn a_failing_store_is_503_and_an_unreadable_answer_500() -> Result {
    let runs = Runs::default();
    let store = Store::in_memory()?;
    let base = serve(charges(&runs).layer(IdempotencyLayer::new(store.clone()))).await?;
    let url = format!("{base}/charges");
    // An answer the layer did not write (no version byte it knows) is never misread.
    let key = scoped_key(&anonymous(), b"foreign");
    let ticket = store.claim(&key)?.ticket().ok_or("claimed")?;
    store.complete(&ticket, b"\x07not a stored response")?;
    let foreign = keyed_post(&client()?, &url, "foreign", "").await?;
    assert_eq!(
        problem(foreign).await?,
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "stored-response-corrupt".into()
        )
    );

    store.close()?;
    let response = keyed_post(&client()?, &url, "k", "").await?;
    assert_eq!(
        problem(response).await?,
        (StatusCode::SERVICE_UNAVAILABLE, "store-unavailable".into())
    );
    assert_eq!(runs.get(), 0);
    Ok(())
}
