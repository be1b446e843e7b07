//! Test support shared by the crate's reliability tests and its fuzz targets (cargo feature
//! `testing`; hidden, not part of the supported API).
//!
//! It lives in the library, behind a feature, rather than in `tests/fault_support`, for two
//! reasons: the fuzz crate (`fuzz/`, a crate of its own) must reach the same code as the
//! stable tests that replay its seed corpus, and the record-decoding target must reach the
//! crate-private record envelope. Nothing here is compiled without the feature.
//!
//! - `SimDisk`: a storage backend that fails chosen I/O calls and simulates power loss.
//! - `Model`: the rules of `docs/SEMANTICS.md` as a plain map, written independently of
//!   `rules`, and `apply`, the same rules for one key, for per-key checkers.
//! - `run` / `run_armed`: a sequence of `Step`s against store and model side by side.
//! - `decode_record`: the record envelope decoder, for fuzzing.
//! - `postgres` (with feature `postgres`): a throwaway PostgreSQL server per test, and a probe
//!   of the engine's connection layer.

mod disk;
mod model;
#[cfg(feature = "postgres")]
pub mod postgres;
mod raw;
mod rng;
mod scenario;
mod step;

pub use disk::{Fate, Fault, IoCall, IoCounts, IoFailure, SECTOR, SimDisk};
pub use model::{Model, Op, Rec, RecCheckpoint, RecState, Refusal, Reply, SeqMark, advance, apply};
pub use rng::Rng;
pub use scenario::{Arm, Report, RunOptions, run, run_armed, run_with};
pub use step::{LEASE, MAX_STEPS, START_MILLIS, Step, TTL};

/// Whether a store file was created in `directory` and the directory then synced, so that
/// the file's creation is durable.
pub fn directory_synced(directory: &std::path::Path) -> bool {
    crate::redb::file::synced::contains(directory)
}

/// Decodes fuzz bytes as a stored record: the first byte is the stored key's length, then the
/// stored key, then the envelope. Never panics; a record that decodes must encode back to
/// bytes that decode to the same record. Returns whether it decoded.
///
/// # Panics
/// When that round trip fails, which is what the fuzz target looks for.
pub fn decode_record(bytes: &[u8]) -> bool {
    let (key_len, rest) = match bytes.split_first() {
        Some((len, rest)) => (usize::from(*len).min(rest.len()), rest),
        None => (0, bytes),
    };
    let (stored_key, envelope) = rest.split_at(key_len);
    match crate::redb::codec::decode(stored_key, envelope) {
        Ok(record) => {
            let again = crate::redb::codec::decode(
                stored_key,
                &crate::redb::codec::encode(stored_key, &record),
            );
            assert_eq!(
                again.as_ref(),
                Ok(&record),
                "a decoded record does not round-trip"
            );
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

/// One record of each kind as [`decode_record`] reads them (key length, stored key, envelope):
/// seeds for the decoding target.
pub fn sample_envelopes() -> Vec<Vec<u8>> {
    use crate::record::{ByteString, Record, RecordState, StoredCheckpoint};
    use crate::redb::codec::encode;
    let in_progress = RecordState::InProgress {
        claimed_at: START_MILLIS,
        lease_until: START_MILLIS + 30_000,
        claim_ttl: 3_600_000,
        checkpoint: Some(StoredCheckpoint {
            step: "charged".to_string(),
            state: ByteString(b"charge=ch_1".to_vec()),
            recorded_at: START_MILLIS + 10,
        }),
    };
    let completed = RecordState::Completed {
        completed_at: START_MILLIS,
        response: ByteString(b"201 created".to_vec()),
    };
    let sequence = RecordState::Sequence {
        mark: 41,
        updated_at: START_MILLIS,
    };
    [in_progress, completed, sequence]
        .into_iter()
        .enumerate()
        .map(|(index, state)| {
            let stored_key = format!("kkey-{index}").into_bytes();
            let mut input = vec![stored_key.len() as u8];
            input.extend_from_slice(&stored_key);
            input.extend(encode(
                &stored_key,
                &Record {
                    fencing_token: 7 + index as u64,
                    attempt: 2,
                    fingerprint: (index != 1).then(|| ByteString(b"sha256:abc".to_vec())),
                    expires_at: START_MILLIS + 3_600_000,
                    state,
                },
            ));
            input
        })
        .collect()
}
