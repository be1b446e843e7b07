//! The throwaway PostgreSQL server the PostgreSQL tests run against: it starts, serves, stops
//! like a crash and starts again on the same port with the same data.

use dedupe_store::testing::postgres::TestCluster;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `SELECT 1` over a fresh connection to `url`.
async fn select_one(url: &str) -> Result<i32, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let one = client.query_one("SELECT 1", &[]).await?.try_get(0)?;
    drop(client);
    let _ = driver.await;
    Ok(one)
}

#[tokio::test]
async fn a_cluster_serves_survives_an_immediate_stop_and_keeps_its_data() -> TestResult {
    let Some(cluster) = TestCluster::start() else {
        return Ok(());
    };
    assert_eq!(select_one(&cluster.url()).await?, 1);

    let url = cluster.create_database("harness");
    cluster.psql(
        "harness",
        "CREATE TABLE kept (n int); INSERT INTO kept VALUES (7);",
    );

    cluster.stop_immediate();
    assert!(
        select_one(&url).await.is_err(),
        "a stopped server accepts no connection"
    );
    cluster.start_again();

    assert_eq!(select_one(&url).await?, 1);
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let kept: i32 = client
        .query_one("SELECT n FROM kept", &[])
        .await?
        .try_get(0)?;
    assert_eq!(kept, 7, "a committed row survives an immediate stop");
    Ok(())
}

#[test]
fn clusters_are_independent() -> TestResult {
    let (Some(first), Some(second)) = (TestCluster::start(), TestCluster::start()) else {
        return Ok(());
    };
    assert_ne!(first.port(), second.port());
    first.stop_immediate();
    second.psql("postgres", "SELECT 1");
    Ok(())
}
