//! The store's key budget seen over HTTP: a new key at the budget is `503` with `Retry-After`
//! and a problem type, while keys already stored still replay.

use axum::http::{StatusCode, header};
use dedupe_store::Store;
use dedupe_store::http::IdempotencyLayer;

use super::support::{Result, Runs, charges, client, keyed_post, problem, replayed, serve};

#[tokio::test]
async fn a_new_key_at_the_budget_is_503_and_stored_keys_still_replay() -> Result {
    let dir = tempfile::tempdir()?;
    let store = Store::builder()
        .max_keys(2)
        .open(dir.path().join("budget.redb"))?;
    let runs = Runs::default();
    let base = serve(charges(&runs).layer(IdempotencyLayer::new(store))).await?;
    let client = client()?;
    let url = format!("{base}/charges");

    for key in ["order-1", "order-2"] {
        let first = keyed_post(&client, &url, key, "amount=10").await?;
        assert_eq!(first.status(), StatusCode::CREATED, "{key}");
    }
    let refused = keyed_post(&client, &url, "order-3", "amount=10").await?;
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    assert_eq!(
        problem(refused).await?,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "key-budget-exhausted".to_string()
        )
    );
    assert_eq!(
        runs.get(),
        2,
        "the refused request never reached the handler"
    );

    let retry = keyed_post(&client, &url, "order-1", "amount=10").await?;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert!(replayed(&retry));
    assert_eq!(runs.get(), 2);
    Ok(())
}
