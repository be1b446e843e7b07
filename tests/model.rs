//! The state machine against the shared model of `docs/SEMANTICS.md` (`testing::Model`):
//! random sequences of claims (with and without fingerprints), completes, releases, extends,
//! checkpoints, expires, marks, sequence marks, sweeps, clock jumps in both directions and
//! reopens of the file, every answer compared with the model's. The steps and the runner are
//! in `model_support`, shared with tests/postgres_model.rs.
//!
//! `PROPTEST_CASES` sets the number of cases (default 1000, up to 100 steps each).

mod common;
mod model_support;

use dedupe_store::ManualClock;
use model_support::{Tokens, builder, fail, run_case, steps};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn the_store_behaves_as_the_model(steps in steps()) {
        // tmpfs makes fsync free, so the real (Immediate) commit path runs fast.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .map_err(fail)?;
        let path = dir.path().join("model.redb");
        // The opener owns the directory, so the file lives as long as the case.
        run_case(
            Box::new(move |clock: &ManualClock| {
                let _dir = &dir;
                builder(clock)
                    .open(&path)
                    .map_err(|err| fail(format!("open: {err}")))
            }),
            Tokens::Exact,
            &steps,
        )?;
    }
}
