//! What the store reports through `metrics` and `tracing`: a retry storm, a takeover, a
//! mismatch, a lost lease and a sweep each show up with the right labels and span fields, and
//! no raw key appears in any label or span.
#![cfg(all(feature = "metrics", feature = "tracing"))]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex, MutexGuard, OnceLock};
use std::thread;

use common::{Fixture, LEASE, TTL, TestResult};
use dedupe_store::{Claim, ClaimOptions, Error};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

/// Every span's fields, by the order the spans were made.
#[derive(Default)]
struct Spans {
    fields: Vec<HashMap<String, String>>,
    index: HashMap<u64, usize>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Spans>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut fields = HashMap::from([("name".to_string(), attrs.metadata().name().to_string())]);
        attrs.record(&mut Fields(&mut fields));
        let at = spans.fields.len();
        spans.fields.push(fields);
        spans.index.insert(id.into_u64(), at);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&at) = spans.index.get(&id.into_u64()) {
            values.record(&mut Fields(&mut spans.fields[at]));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut fields =
            HashMap::from([("event".to_string(), event.metadata().target().to_string())]);
        event.record(&mut Fields(&mut fields));
        spans.fields.push(fields);
    }
}

/// The process-wide recorder and subscriber, and a lock so that one test at a time reads them.
struct Observed {
    snapshotter: Snapshotter,
    capture: Capture,
    serial: Mutex<()>,
}

fn observed() -> &'static Observed {
    static OBSERVED: OnceLock<Observed> = OnceLock::new();
    OBSERVED.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _ = recorder.install();
        let capture = Capture::default();
        let _ = tracing::subscriber::set_global_default(Registry::default().with(capture.clone()));
        Observed {
            snapshotter,
            capture,
            serial: Mutex::new(()),
        }
    })
}

/// What one test recorded: counter totals by name and labels, histogram sample counts, and
/// every span and event.
struct Recorded {
    counters: HashMap<(String, Vec<(String, String)>), u64>,
    histograms: HashMap<String, usize>,
    gauges: HashMap<String, f64>,
    labels: Vec<String>,
    spans: Vec<HashMap<String, String>>,
}

impl Recorded {
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        self.counters
            .iter()
            .filter(|((n, l), _)| n == name && want.iter().all(|w| l.contains(w)))
            .map(|(_, v)| v)
            .sum()
    }

    fn spans_of(&self, op: &str) -> Vec<&HashMap<String, String>> {
        self.spans
            .iter()
            .filter(|s| s.get("op").map(String::as_str) == Some(op))
            .collect()
    }

    /// Fails if `raw` appears in any label value, span field or event field.
    fn assert_never_shows(&self, raw: &str) {
        for label in &self.labels {
            assert!(
                !label.contains(raw),
                "the raw key {raw:?} is in label {label:?}"
            );
        }
        for fields in &self.spans {
            for value in fields.values() {
                assert!(!value.contains(raw), "the raw key {raw:?} is in {fields:?}");
            }
        }
    }
}

/// Runs `scenario` alone, with a fresh view of the metrics and spans it made.
fn recording(scenario: impl FnOnce() -> TestResult) -> TestResult<Recorded> {
    let observed = observed();
    let _serial: MutexGuard<'_, ()> = observed.serial.lock().unwrap_or_else(|e| e.into_inner());
    // A snapshot resets the debugging recorder's counters and histograms.
    drop(observed.snapshotter.snapshot());
    let before = observed
        .capture
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .fields
        .len();
    scenario()?;
    let mut recorded = Recorded {
        counters: HashMap::new(),
        histograms: HashMap::new(),
        gauges: HashMap::new(),
        labels: Vec::new(),
        spans: observed
            .capture
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fields[before..]
            .to_vec(),
    };
    for (key, _, _, value) in observed.snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_string();
        let mut labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|l| (l.key().to_string(), l.value().to_string()))
            .collect();
        labels.sort();
        recorded
            .labels
            .extend(labels.iter().map(|(k, v)| format!("{k}={v}")));
        match value {
            DebugValue::Counter(n) => *recorded.counters.entry((name, labels)).or_default() += n,
            DebugValue::Histogram(samples) => {
                *recorded.histograms.entry(name).or_default() += samples.len()
            }
            DebugValue::Gauge(value) => {
                recorded.gauges.insert(name, value.into_inner());
            }
        }
    }
    Ok(recorded)
}

#[test]
fn a_retry_storm_records_one_acquired_claim_and_the_rest_in_progress() -> TestResult {
    const CALLERS: usize = 16;
    const KEY: &str = "storm/customer-4711@example.com";
    let f = Fixture::on_file(|b| b)?;
    let store = f.store.clone();
    let recorded = recording(|| {
        let barrier = Arc::new(Barrier::new(CALLERS));
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let (store, barrier) = (store.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    store.claim(KEY)
                })
            })
            .collect();
        let mut acquired = 0;
        for caller in callers {
            if let Claim::Acquired(_) = caller.join().map_err(|_| "a caller panicked")?? {
                acquired += 1;
            }
        }
        assert_eq!(acquired, 1);
        Ok(())
    })?;
    assert_eq!(
        recorded.counter("dedupe_claims_total", &[("outcome", "acquired")]),
        1
    );
    assert_eq!(
        recorded.counter("dedupe_claims_total", &[("outcome", "in_progress")]),
        CALLERS as u64 - 1
    );
    assert_eq!(
        recorded.counter(
            "dedupe_operations_total",
            &[("operation", "claim"), ("outcome", "in_progress")]
        ),
        CALLERS as u64 - 1
    );
    assert!(recorded.histograms["dedupe_operation_duration_seconds"] >= CALLERS);
    assert!(recorded.histograms["dedupe_commit_batch_size"] >= 1);
    assert!(recorded.histograms["dedupe_fsync_duration_seconds"] >= 1);

    let spans = recorded.spans_of("claim");
    assert_eq!(spans.len(), CALLERS);
    let acquired: Vec<_> = spans
        .iter()
        .filter(|s| s["outcome"] == "acquired")
        .collect();
    assert_eq!(acquired.len(), 1);
    assert_eq!(acquired[0]["attempt"], "1");
    assert!(acquired[0]["fencing_token"].parse::<u64>().is_ok());
    assert_eq!(acquired[0]["engine"], "redb");
    let hash = &spans[0]["key_hash"];
    assert_eq!(hash.len(), 8);
    assert!(
        spans.iter().all(|s| &s["key_hash"] == hash),
        "one key, one hash"
    );
    recorded.assert_never_shows(KEY);
    recorded.assert_never_shows("customer-4711");
    Ok(())
}

#[test]
fn a_takeover_a_mismatch_a_lost_lease_and_a_sweep_are_labelled() -> TestResult {
    const KEY: &str = "payment/order-1001";
    let f = Fixture::on_file(|b| b)?;
    let recorded = recording(|| {
        let fp = ClaimOptions::new().fingerprint(b"amount=10");
        let first = f.store.claim_with(KEY, &fp)?.ticket().ok_or("acquired")?;
        f.advance(LEASE);
        let second = f.store.claim_with(KEY, &fp)?.ticket().ok_or("taken over")?;
        assert!(second.is_takeover());
        let other = ClaimOptions::new().fingerprint(b"amount=99");
        assert!(matches!(
            f.store.claim_with(KEY, &other)?,
            Claim::Mismatch { .. }
        ));
        assert!(matches!(
            f.store.complete(&first, b"late"),
            Err(Error::LeaseLost { .. })
        ));
        f.store.complete(&second, b"receipt")?;
        assert!(matches!(f.store.claim_with(KEY, &fp)?, Claim::Completed(_)));
        assert!(f.store.mark_seen("message-77")?);
        assert!(!f.store.mark_seen("message-77")?);
        f.advance(TTL);
        assert_eq!(f.store.sweep()?, 2);
        Ok(())
    })?;
    for (outcome, count) in [
        ("acquired", 1),
        ("takeover", 1),
        ("mismatch", 1),
        ("replayed", 1),
    ] {
        assert_eq!(
            recorded.counter("dedupe_claims_total", &[("outcome", outcome)]),
            count,
            "{outcome}"
        );
    }
    assert_eq!(
        recorded.counter(
            "dedupe_operations_total",
            &[("operation", "complete"), ("outcome", "lease_lost")]
        ),
        1
    );
    assert_eq!(
        recorded.counter(
            "dedupe_operations_total",
            &[("operation", "complete"), ("outcome", "ok")]
        ),
        1
    );
    for (outcome, count) in [("first", 1), ("duplicate", 1)] {
        assert_eq!(
            recorded.counter(
                "dedupe_operations_total",
                &[("operation", "mark_seen"), ("outcome", outcome)]
            ),
            count
        );
    }
    assert_eq!(recorded.counter("dedupe_swept_total", &[]), 2);

    let takeover = recorded
        .spans_of("claim")
        .into_iter()
        .find(|s| s["outcome"] == "takeover")
        .ok_or("a takeover span")?;
    assert_eq!(takeover["attempt"], "2");
    assert!(
        recorded
            .spans
            .iter()
            .any(|s| s.get("message").is_some_and(|m| m.contains("took over"))),
        "a takeover event"
    );
    assert!(
        recorded
            .spans
            .iter()
            .any(|s| s.get("event").is_some_and(|t| t == "dedupe_store::sweep")),
        "a sweep event"
    );
    recorded.assert_never_shows("order-1001");
    recorded.assert_never_shows("message-77");
    Ok(())
}

/// The HTTP layer labels its requests by route template, never by raw path or key.
#[cfg(feature = "http")]
#[test]
fn http_requests_are_labelled_by_route_template_and_outcome() -> TestResult {
    use axum::extract::MatchedPath;
    use dedupe_store::http::IdempotencyLayer;

    const KEY: &str = "order-secret-5150";
    let f = Fixture::on_file(|b| b)?;
    let store = f.store.clone();
    let recorded = recording(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let layer = IdempotencyLayer::builder(store)
                .route_label(|request: &http::request::Parts| {
                    request
                        .extensions
                        .get::<MatchedPath>()
                        .map(|path| path.as_str().to_string())
                })
                .build()?;
            let app: axum::Router = axum::Router::new()
                .route(
                    "/payments/{id}",
                    axum::routing::post(|| async { (axum::http::StatusCode::CREATED, "paid") }),
                )
                .route_layer(layer);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}/payments/pay_77", listener.local_addr()?);
            tokio::spawn(async move { axum::serve(listener, app).await });
            let client = reqwest::Client::builder().no_proxy().build()?;
            for _ in 0..2 {
                let response = client
                    .post(&url)
                    .header("idempotency-key", KEY)
                    .body("amount=10")
                    .send()
                    .await?;
                assert_eq!(response.status(), 201);
            }
            Ok::<(), Box<dyn std::error::Error>>(())
        })
    })?;
    for outcome in ["executed", "replayed"] {
        assert_eq!(
            recorded.counter(
                "dedupe_http_requests_total",
                &[("route", "/payments/{id}"), ("outcome", outcome)]
            ),
            1,
            "{outcome}"
        );
    }
    assert!(recorded.histograms["dedupe_http_request_duration_seconds"] >= 2);
    let spans: Vec<_> = recorded
        .spans
        .iter()
        .filter(|s| s.get("name").is_some_and(|n| n == "dedupe_http"))
        .collect();
    assert_eq!(spans.len(), 2);
    assert!(
        spans
            .iter()
            .any(|s| s["outcome"] == "replayed" && s["status"] == "201")
    );
    recorded.assert_never_shows("pay_77");
    recorded.assert_never_shows(KEY);
    Ok(())
}

/// The in-progress gauge counts claims held in progress, across a reopen, takeovers,
/// completes, releases and a sweep of abandoned claims.
#[test]
fn the_in_progress_gauge_follows_the_claims_held() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("gauges.redb");
    let clock = dedupe_store::ManualClock::new(common::T0);
    {
        let store = Fixture::builder(&clock).open(&path)?;
        for key in ["held-1", "held-2", "done"] {
            assert!(store.claim(key)?.is_acquired());
        }
        let done = store.claim("done-too")?.ticket().ok_or("acquired")?;
        store.complete(&done, b"ok")?;
    }
    let store = Fixture::builder(&clock).open(&path)?;
    let gauge = |recorded: &Recorded| recorded.gauges.get("dedupe_in_progress_keys").copied();
    // Counted from the file at the first stats() after the open.
    let recorded = recording(|| {
        store.stats()?;
        Ok(())
    })?;
    assert_eq!(gauge(&recorded), Some(3.0));
    assert_eq!(recorded.gauges.get("dedupe_live_keys"), Some(&4.0));
    // Then kept by every commit.
    let recorded = recording(|| {
        let fresh = store.claim("fresh")?.ticket().ok_or("acquired")?;
        store.release(&fresh)?;
        let another = store.claim("another")?.ticket().ok_or("acquired")?;
        store.complete(&another, b"ok")?;
        assert!(store.claim("one-more")?.is_acquired());
        Ok(())
    })?;
    assert_eq!(gauge(&recorded), Some(4.0));
    // A takeover keeps the count; a complete after it lowers it.
    let recorded = recording(|| {
        clock.advance(LEASE);
        let taken = store.claim("held-1")?.ticket().ok_or("taken over")?;
        assert!(taken.is_takeover());
        store.complete(&taken, b"ok")?;
        Ok(())
    })?;
    assert_eq!(gauge(&recorded), Some(3.0));
    // Abandoned claims expire and are swept; one new claim is then the only one.
    let recorded = recording(|| {
        clock.advance(TTL);
        assert_eq!(store.sweep()?, 6);
        assert!(store.claim("after-the-sweep")?.is_acquired());
        Ok(())
    })?;
    assert_eq!(gauge(&recorded), Some(1.0));
    Ok(())
}
