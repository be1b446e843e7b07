//! Test support shared by the crate's reliability tests and its fuzz targets (cargo feature
//! `testing`; hidden, not part of the supported API).
//!
//! It lives in the library, behind a feature, rather than in `tests/common`, for two reasons:
//! the fuzz crate (`fuzz/`, a crate of its own) must reach the same code as the stable tests
//! that replay its seed corpus, and the record-decoding target must reach the crate-private
//! record envelope. Nothing here is compiled without the feature.
//!
//! - [`SimDisk`]: a storage backend that fails chosen I/O calls and simulates power loss.
//! - [`Model`]: the SPEC's semantics as a plain map, written independently of `rules`.
//! - [`run`] / [`run_armed`]: a sequence of [`Step`]s against store and model side by side.
//! - [`decode_record`]: the record envelope decoder, for fuzzing.

mod disk;
mod model;
mod rng;
mod scenario;

pub use disk::{Fate, Fault, IoCall, IoCounts, IoFailure, SECTOR, SimDisk};
pub use model::{Model, Rec, RecState, Refusal};
pub use rng::Rng;
pub use scenario::{Arm, LEASE, MAX_STEPS, Report, START_MILLIS, Step, TTL, run, run_armed};

/// Decodes `bytes` as a stored record envelope for key `stored_key`. Never panics; a record
/// that decodes must encode back to bytes that decode to the same record.
///
/// # Panics
/// When that round trip fails, which is what the fuzz target looks for.
pub fn decode_record(bytes: &[u8]) -> bool {
    match crate::record::decode(bytes) {
        Ok(record) => {
            let again = crate::record::decode(&crate::record::encode(&record));
            assert_eq!(again.as_ref(), Ok(&record), "a decoded record does not round-trip");
            true
        }
        Err(_) => false,
    }
}

/// Steps from fuzz bytes, as the fuzz targets and the corpus replay read them.
pub fn steps_from_bytes(bytes: &[u8]) -> Vec<Step> {
    let mut input = arbitrary::Unstructured::new(bytes);
    let mut steps = Vec::new();
    while steps.len() < MAX_STEPS && !input.is_empty() {
        match <Step as arbitrary::Arbitrary>::arbitrary(&mut input) {
            Ok(step) => steps.push(step),
            Err(_) => break,
        }
    }
    steps
}
