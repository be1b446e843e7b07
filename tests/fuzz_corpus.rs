//! Replays the fuzz targets' checked-in seed corpus (`fuzz/corpus/<target>/`) on stable, so CI
//! exercises the same logic `cargo +nightly fuzz run` does. A crash the fuzzer finds is fixed
//! and its input added to the corpus, where this test keeps it fixed.

use std::path::{Path, PathBuf};

use dedupe_store::testing::{decode_record, run, sample_envelopes, steps_from_bytes};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn corpus(target: &str) -> Result<Vec<(PathBuf, Vec<u8>)>, std::io::Error> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() {
            let bytes = std::fs::read(&path)?;
            inputs.push((path, bytes));
        }
    }
    inputs.sort();
    Ok(inputs)
}

#[test]
fn record_decode_corpus() -> TestResult {
    let inputs = corpus("record_decode")?;
    assert!(!inputs.is_empty(), "the record_decode corpus is empty");
    let decoded = inputs
        .iter()
        .filter(|(_, bytes)| decode_record(bytes))
        .count();
    assert!(decoded > 0, "no seed in the corpus is a valid record");
    Ok(())
}

#[test]
fn sample_envelopes_decode_and_every_flip_is_refused() -> TestResult {
    for envelope in sample_envelopes() {
        assert!(decode_record(&envelope));
        for at in 0..envelope.len() {
            let mut flipped = envelope.clone();
            flipped[at] ^= 0x20;
            assert!(!decode_record(&flipped), "a flip at byte {at} decoded");
        }
    }
    Ok(())
}

fn replay(target: &str, faults: bool) -> TestResult {
    let inputs = corpus(target)?;
    assert!(!inputs.is_empty(), "the {target} corpus is empty");
    for (path, bytes) in &inputs {
        run(&steps_from_bytes(bytes), faults)
            .map_err(|err| format!("{}: {err}", path.display()))?;
    }
    Ok(())
}

#[test]
fn model_ops_corpus() -> TestResult {
    replay("model_ops", false)
}

#[test]
fn faulty_ops_corpus() -> TestResult {
    replay("faulty_ops", true)
}
