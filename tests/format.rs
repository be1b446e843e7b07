//! The on-disk format: versioning, foreign files, damaged records, and the checked-in file of
//! each released format version.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Fixture, T0, TestResult};
use dedupe_store::{
    Claim, ClaimOptions, EntryState, Error, FORMAT_VERSION, Key, ManualClock, SeqCheck, Store,
};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
const EXPIRY: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("expiry");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

fn new_store_file(dir: &Path) -> TestResult<PathBuf> {
    let path = dir.join("store.redb");
    let store = Store::open(&path)?;
    let ticket = store.claim("k")?.ticket().ok_or("fresh")?;
    store.complete(&ticket, b"v")?;
    // A sweep merges the journal into the records table, where the tests below edit it.
    store.sweep()?;
    store.close()?;
    Ok(path)
}

/// Rewrites one record's stored bytes through redb directly.
fn tamper_record(path: &Path, key: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> TestResult {
    let db = redb::Database::create(path)?;
    let txn = db.begin_write()?;
    {
        let mut records = txn.open_table(RECORDS)?;
        let stored_key = [b"k", key].concat();
        let mut bytes = records
            .get(stored_key.as_slice())?
            .ok_or("no such record")?
            .value()
            .to_vec();
        edit(&mut bytes);
        records.insert(stored_key.as_slice(), bytes.as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

#[test]
fn an_unknown_format_version_is_refused_and_nothing_is_rewritten() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = new_store_file(dir.path())?;
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        txn.open_table(META)?.insert("format_version", 99)?;
        txn.commit()?;
    }
    let before = std::fs::read(&path)?;
    match Store::open(&path) {
        Err(Error::UnsupportedFormat { found, supported }) => {
            assert_eq!(found, 99);
            assert_eq!(supported, FORMAT_VERSION);
        }
        other => return Err(format!("expected UnsupportedFormat, got {other:?}").into()),
    }
    assert!(std::fs::read(&path)? == before, "the file was rewritten");
    // The refusal releases the file.
    assert!(matches!(
        Store::open(&path),
        Err(Error::UnsupportedFormat { .. })
    ));
    Ok(())
}

#[test]
fn a_redb_file_of_another_program_is_not_a_store() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("other.redb");
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        txn.open_table(TableDefinition::<u64, u64>::new("their_table"))?
            .insert(1, 2)?;
        txn.commit()?;
    }
    let before = std::fs::read(&path)?;
    assert!(matches!(Store::open(&path), Err(Error::NotAStore { .. })));
    assert!(std::fs::read(&path)? == before, "the file was rewritten");
    Ok(())
}

#[test]
fn errors_name_a_store_without_a_file_by_where_it_lives() -> TestResult {
    use redb::StorageBackend;
    let backend = redb::backends::InMemoryBackend::new();
    let text = b"this is not a database, just some text that is long enough".repeat(200);
    backend.set_len(text.len() as u64)?;
    backend.write(0, &text)?;
    let store = Store::builder().open_backend(backend);
    match store {
        Err(Error::NotAStore { path }) => assert_eq!(path, Path::new("<backend>")),
        Err(other) => return Err(format!("unexpected error: {other:?}").into()),
        Ok(_) => return Err("a backend holding text opened as a store".into()),
    }
    // An in-memory store and one on a backend have no file.
    assert_eq!(Store::in_memory()?.path(), None);
    let on_backend = Store::builder().open_backend(redb::backends::InMemoryBackend::new())?;
    assert_eq!(on_backend.path(), None);
    Ok(())
}

#[test]
fn a_file_that_is_not_redb_is_an_error_not_a_panic() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("garbage.redb");
    std::fs::write(
        &path,
        b"this is not a database, just some text that is long enough".repeat(200),
    )?;
    let before = std::fs::read(&path)?;
    let err = Store::open(&path)
        .err()
        .ok_or("a text file opened as a store")?;
    assert!(
        matches!(err, Error::NotAStore { .. }),
        "unexpected error: {err:?}"
    );
    assert!(std::fs::read(&path)? == before, "the file was rewritten");
    // Too short to hold redb's header at all.
    std::fs::write(&path, b"text")?;
    assert!(matches!(Store::open(&path), Err(Error::NotAStore { .. })));
    let missing_dir = dir.path().join("no/such/dir/store.redb");
    assert!(matches!(Store::open(missing_dir), Err(Error::Io { .. })));
    Ok(())
}

#[test]
fn a_record_failing_its_checksum_is_reported_as_corrupt_never_answered() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = new_store_file(dir.path())?;
    tamper_record(&path, b"k", |bytes| {
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01; // a flipped bit in the response
    })?;
    let store = Store::open(&path)?;
    let is_corrupt_k =
        |err: Error| matches!(err, Error::Corrupt { ref key, .. } if key.as_bytes() == b"k");
    assert!(is_corrupt_k(
        store
            .claim("k")
            .err()
            .ok_or("answered from a damaged record")?
    ));
    assert!(is_corrupt_k(
        store.get("k").err().ok_or("read a damaged record")?
    ));
    assert!(is_corrupt_k(
        store
            .mark_seen("k")
            .err()
            .ok_or("answered from a damaged record")?
    ));
    assert!(is_corrupt_k(
        store
            .verify()
            .err()
            .ok_or("verify passed a damaged record")?
    ));
    assert!(is_corrupt_k(
        store.list("", 10).err().ok_or("listed a damaged record")?
    ));
    // Other keys are unaffected; expire clears the damage.
    assert!(store.claim("other")?.is_acquired());
    assert!(store.expire("k")?);
    assert!(store.claim("k")?.is_acquired());
    let report = store.verify()?;
    assert_eq!(report.records, 2);
    Ok(())
}

#[test]
fn a_record_of_an_unknown_version_or_truncated_is_corrupt() -> TestResult {
    for edit in [
        (|b: &mut Vec<u8>| b[0] = 2) as fn(&mut Vec<u8>),
        |b| b.truncate(3),
        |b| b.clear(),
        |b| b.push(0),
    ] {
        let dir = tempfile::tempdir()?;
        let path = new_store_file(dir.path())?;
        tamper_record(&path, b"k", edit)?;
        let store = Store::open(&path)?;
        assert!(matches!(store.claim("k"), Err(Error::Corrupt { .. })));
        assert!(matches!(
            store.complete(&store.claim("x")?.ticket().ok_or("fresh")?, b""),
            Ok(())
        ));
    }
    Ok(())
}

#[test]
fn verify_finds_an_index_that_disagrees_with_the_records() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = new_store_file(dir.path())?;
    {
        let db = redb::Database::create(&path)?;
        let txn = db.begin_write()?;
        let mut expiry = txn.open_table(EXPIRY)?;
        let stale: Vec<(u64, Vec<u8>)> = expiry
            .iter()?
            .map(|row| row.map(|(k, _)| (k.value().0, k.value().1.to_vec())))
            .collect::<Result<_, _>>()?;
        for (at, key) in &stale {
            expiry.remove((*at, key.as_slice()))?;
        }
        drop(expiry);
        txn.commit()?;
    }
    let store = Store::open(&path)?;
    assert!(matches!(store.verify(), Err(Error::CorruptFile { .. })));
    Ok(())
}

// The file written by format version 1, and what it must contain. Regenerate it (only when a
// new format version is released, keeping the old file too) with
// `DEDUPE_WRITE_FIXTURE=1 cargo test --test format write_fixture`.
const FIXTURE_V1: &str = "tests/fixtures/format-v1.redb";
const FIXTURE_CLOCK: u64 = T0;
const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn fixture_builder(clock: &ManualClock) -> dedupe_store::StoreBuilder {
    Fixture::builder(clock).ttl(CENTURY).lease(CENTURY)
}

#[test]
fn write_fixture() -> TestResult {
    if std::env::var_os("DEDUPE_WRITE_FIXTURE").is_none() {
        return Ok(());
    }
    let _ = std::fs::remove_file(FIXTURE_V1);
    let clock = ManualClock::new(FIXTURE_CLOCK);
    let store = fixture_builder(&clock).open(FIXTURE_V1)?;
    let fp = ClaimOptions::new().fingerprint(b"fingerprint");
    let done = store
        .claim_with(Key::scoped(["tenant", "done"]), &fp)?
        .ticket()
        .ok_or("fresh")?;
    store.complete(&done, b"stored response")?;
    let running = store.claim("running")?.ticket().ok_or("fresh")?;
    store.checkpoint(&running, "step-2", b"resume here")?;
    store.mark_seen("message-1")?;
    store.advance_sequence("stream", 41)?;
    store.close()?;
    Ok(())
}

#[test]
fn the_format_v1_fixture_opens_with_its_contents() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("v1.redb");
    std::fs::copy(FIXTURE_V1, &path)?;
    let clock = ManualClock::new(FIXTURE_CLOCK + 1_000);
    let store = fixture_builder(&clock).open(&path)?;
    assert_eq!(store.verify()?.records, 4);
    let fp = ClaimOptions::new().fingerprint(b"fingerprint");
    match store.claim_with(Key::scoped(["tenant", "done"]), &fp)? {
        Claim::Completed(outcome) => {
            assert_eq!(outcome.response, b"stored response");
            assert_eq!(outcome.completed_at, FIXTURE_CLOCK);
            assert_eq!(outcome.attempt, 1);
        }
        other => return Err(format!("expected the stored outcome, got {other:?}").into()),
    }
    let running = store.get("running")?.ok_or("the in-progress record")?;
    match running.state {
        EntryState::InProgress { checkpoint, .. } => {
            let checkpoint = checkpoint.ok_or("the checkpoint")?;
            assert_eq!(checkpoint.step, "step-2");
            assert_eq!(checkpoint.state, b"resume here");
        }
        other => return Err(format!("expected in progress, got {other:?}").into()),
    }
    assert!(!store.mark_seen("message-1")?);
    assert_eq!(store.advance_sequence("stream", 41)?, SeqCheck::Duplicate);
    let next = store.claim("new")?.ticket().ok_or("fresh")?;
    assert!(next.fencing_token() > running.fencing_token);
    Ok(())
}

#[test]
fn the_raw_tables_hold_what_docs_format_md_says() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("layout.redb");
    let clock = ManualClock::new(T0);
    {
        let store = Fixture::builder(&clock).open(&path)?;
        let ticket = store.claim("k1")?.ticket().ok_or("fresh")?;
        store.complete(&ticket, b"resp")?;
        store.advance_sequence("k1", 5)?;
        // A sweep merges the journal into the tables this test reads.
        store.sweep()?;
    }
    let db = redb::Database::open(&path)?;
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    assert_eq!(
        meta.get("format_version")?.map(|v| v.value()),
        Some(u64::from(FORMAT_VERSION))
    );
    assert_eq!(meta.get("last_token")?.map(|v| v.value()), Some(1));
    assert!(meta.get("store_id")?.is_some());
    let records = txn.open_table(RECORDS)?;
    let envelope = records
        .get(&b"kk1"[..])?
        .ok_or("idempotency key under tag k")?;
    let bytes = envelope.value();
    assert_eq!(bytes[0], 1, "version byte");
    let crc = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let mut covered = (b"kk1".len() as u32).to_le_bytes().to_vec();
    covered.extend_from_slice(b"kk1");
    covered.extend_from_slice(&bytes[5..]);
    assert_eq!(
        crc,
        crc32fast::hash(&covered),
        "CRC32 of the stored key's length, the stored key and the payload, little-endian"
    );
    assert!(
        records.get(&b"sk1"[..])?.is_some(),
        "sequence key under tag s"
    );
    let expiry = txn.open_table(EXPIRY)?;
    let expected_expiry = T0 + common::TTL.as_millis() as u64;
    assert!(expiry.get((expected_expiry, &b"kk1"[..]))?.is_some());
    assert_eq!(expiry.len()?, 2);
    Ok(())
}
