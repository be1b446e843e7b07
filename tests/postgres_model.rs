//! The model test of tests/model.rs against the PostgreSQL engine: the same random step
//! sequences (tests/model_support), every answer compared with `testing::Model`, on a store
//! over a real server. One cluster serves the whole test; each case gets a schema of its own,
//! and a `Reopen` step opens a new `Store` on the same URL and schema.
//!
//! `POSTGRES_MODEL_CASES` sets the number of cases (default 40, up to 100 steps each).

mod common;
mod model_support;

use std::sync::atomic::{AtomicUsize, Ordering};

use dedupe_store::ManualClock;
use dedupe_store::testing::postgres::TestCluster;
use model_support::{Tokens, builder, fail, run_case, steps};
use proptest::test_runner::{Config, TestError, TestRunner};

fn cases() -> u32 {
    std::env::var("POSTGRES_MODEL_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(40)
}

#[test]
fn the_postgres_store_behaves_as_the_model() {
    let Some(cluster) = TestCluster::start() else {
        return;
    };
    let url = cluster.create_database("model");
    // Every case, shrinking included, gets a fresh schema, so no case sees another's records.
    let next_case = AtomicUsize::new(0);
    let config = Config {
        cases: cases(),
        // The runner is driven by hand, with no source file to store regressions next to;
        // a failure prints its shrunk steps instead.
        failure_persistence: None,
        // Each shrink step is a case over the server; bound the time a failure takes.
        max_shrink_iters: 256,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&steps(), |steps| {
        let schema = format!("case_{}", next_case.fetch_add(1, Ordering::Relaxed));
        let url = url.clone();
        run_case(
            Box::new(move |clock: &ManualClock| {
                builder(clock)
                    .postgres_schema(schema.clone())
                    .postgres_connections(2)
                    .open_postgres(&url)
                    .map_err(|err| fail(format!("open: {err}")))
            }),
            Tokens::Increasing,
            &steps,
        )
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, steps)) => {
            panic!("{reason}\nminimal failing steps: {steps:#?}")
        }
        Err(TestError::Abort(reason)) => panic!("aborted: {reason}"),
    }
}
