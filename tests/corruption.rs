//! Corruption: single-byte flips and truncations of real store files. `open`, `get`, `claim`
//! and `verify` must return a typed error (or the data, after redb's repair), never panic,
//! never hang, and never return a wrong answer: a record whose bytes changed is caught by the
//! CRC32 envelope, which also covers the record's key, so a record moved under another key by
//! a flip in a page's key bytes is caught too.
//!
//! A flip in a key's own bytes inside a B-tree page can make that key unfindable: redb checks
//! page checksums only in `verify()` and its repair, not on every read. Such a key reads as
//! absent until `verify()` reports the file corrupt; the test counts those cases separately.
//!
//! A file that was not closed cleanly is repaired when it opens. With one-phase commits (the
//! default) redb cannot tell a last commit torn by a crash from one damaged afterwards: both
//! fail its checksums, and it rolls that commit back. So a flip in the pages of the last
//! commit of a crashed one-phase file may read as the state before that commit, which the
//! test accepts there and nowhere else; with quick repair (two phases) the same flip refuses
//! the file instead.
//!
//! `DEDUPE_CORRUPTION_FLIPS` sets the number of mutations (10,000 in CI).

mod fault_support;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dedupe_store::testing::{Rng, SimDisk};
use dedupe_store::{Claim, Entry, EntryState, Error, ManualClock, Store};
use redb::{ReadableDatabase, TableDefinition};

use fault_support::{figure, knob};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How long one mutated file may take to open, read, claim and verify before it counts as a
/// hang (a healthy one takes milliseconds).
const HANG: Duration = Duration::from_secs(20);
const KEYS: usize = 30;

fn key(index: usize) -> String {
    format!("key-{}", (index + 1) * 10)
}

/// The images a mutation starts from.
struct Images {
    /// Closed cleanly.
    clean: Vec<u8>,
    /// As a crash leaves it, open and written to.
    crashed: Vec<u8>,
    /// The crashed file as it was one commit earlier: what a rollback of its last commit shows.
    before_last: Vec<u8>,
}

/// A store file with completed keys (some with multi-page responses), claims in progress and
/// marks, its commits one-phase unless `quick_repair`.
fn base_images(
    dir: &std::path::Path,
    quick_repair: bool,
) -> Result<Images, Box<dyn std::error::Error>> {
    let path = dir.join(format!("base-{quick_repair}.redb"));
    let clock = ManualClock::new(1_700_000_000_000);
    let open = || open_file(&path, &clock, quick_repair);
    let store = open()?;
    for index in 0..KEYS {
        let key = key(index);
        match index % 5 {
            0 => {
                store.mark_seen(&key)?;
            }
            1 => {
                let _in_progress = store.claim(&key)?;
            }
            _ => {
                let Claim::Acquired(ticket) = store.claim(&key)? else {
                    return Err(format!("{key} was not acquired").into());
                };
                let response = if index % 7 == 0 {
                    vec![index as u8; 6000]
                } else {
                    format!("response for {key}").into_bytes()
                };
                store.complete(&ticket, response)?;
            }
        }
    }
    // A sweep merges the journal into the tables first: the clean image holds every record in
    // the records table, the crashed one below has its last writes in the journal.
    store.sweep()?;
    store.close()?;
    let clean = std::fs::read(&path)?;
    // The same file, open and written to when the "crash" copies it: not closed cleanly.
    let store = open()?;
    let Claim::Acquired(ticket) = store.claim("late")? else {
        return Err("late was not acquired".into());
    };
    let before_last = std::fs::read(&path)?;
    store.complete(&ticket, b"late response")?;
    let crashed = std::fs::read(&path)?;
    drop(store);
    Ok(Images {
        clean,
        crashed,
        before_last,
    })
}

/// What a store on `image` holds, read with a clock at zero so nothing is expired.
fn contents(image: &[u8]) -> Result<BTreeMap<Vec<u8>, Entry>, Error> {
    let store = open_image(image)?;
    let entries = store.list(b"", usize::MAX)?;
    Ok(entries
        .into_iter()
        .map(|entry| (entry.key.as_bytes().to_vec(), entry))
        .collect())
}

/// The store file at `path`, on `clock`, with no sweeper.
fn open_file(
    path: &std::path::Path,
    clock: &ManualClock,
    quick_repair: bool,
) -> Result<Store, Error> {
    Store::builder()
        .clock(clock.clone())
        .quick_repair(quick_repair)
        .without_sweeper()
        .open(path)
}

fn open_image(image: &[u8]) -> Result<Store, Error> {
    Store::builder()
        .clock(ManualClock::new(0))
        .without_sweeper()
        .open_backend(SimDisk::from_image(image.to_vec()))
}

/// How one mutated file fared.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    runs: u64,
    open_refused: u64,
    exact: u64,
    typed_errors: u64,
    unfindable: u64,
    verify_refused: u64,
    /// Calls on which redb panicked and the store answered `CorruptFile` instead.
    caught_panics: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.runs += other.runs;
        self.open_refused += other.open_refused;
        self.exact += other.exact;
        self.typed_errors += other.typed_errors;
        self.unfindable += other.unfindable;
        self.verify_refused += other.verify_refused;
        self.caught_panics += other.caught_panics;
    }
}

/// [`probe_one`] against each state the file may rightly show, in turn: `Err` only if it
/// answered wrongly for every one.
fn probe(image: &[u8], states: &[BTreeMap<Vec<u8>, Entry>]) -> Result<Tally, String> {
    let mut first_err = None;
    for expected in states {
        match probe_one(image, expected) {
            Ok(tally) => return Ok(tally),
            Err(err) => {
                first_err.get_or_insert(err);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| "no state to compare with".to_string()))
}

/// Opens, reads every key, claims a few, verifies. `Err` only for a wrong answer.
fn probe_one(image: &[u8], expected: &BTreeMap<Vec<u8>, Entry>) -> Result<Tally, String> {
    let mut tally = Tally {
        runs: 1,
        ..Tally::default()
    };
    let store = match open_image(image) {
        Ok(store) => store,
        Err(err) => {
            tally.open_refused = 1;
            tally.caught_panics = u64::from(caught_panic(&err));
            return Ok(tally);
        }
    };
    let (mut errors, mut unfindable) = (false, false);
    for (key, want) in expected {
        match store.get(key) {
            Ok(Some(entry)) if &entry == want => {}
            Ok(Some(entry)) => {
                return Err(format!(
                    "get({key:?}) answered {entry:?}, the file held {want:?}"
                ));
            }
            Ok(None) => unfindable = true,
            Err(err) => {
                errors = true;
                tally.caught_panics += u64::from(caught_panic(&err));
            }
        }
    }
    // Listing must not show anything the file did not hold under that key.
    if let Ok(listed) = store.list(b"", usize::MAX) {
        for entry in listed {
            match expected.get(entry.key.as_bytes()) {
                Some(want) if want == &entry => {}
                _ => {
                    return Err(format!(
                        "list answered {entry:?}, which the file did not hold"
                    ));
                }
            }
        }
    }
    // A key that was never stored must not appear either.
    for stranger in ["key-15", "key-25", "key-105", "nobody"] {
        match store.get(stranger) {
            Ok(Some(entry)) => return Err(format!("never-stored {stranger} answered {entry:?}")),
            Ok(None) => {}
            Err(_) => errors = true,
        }
    }
    // Whatever made a key unfindable, verify() must report it (before any write rewrites the
    // damaged page).
    if store.verify().is_err() {
        tally.verify_refused = 1;
    } else if unfindable {
        return Err("a stored key became unfindable and verify() passed".to_string());
    }
    for (key, want) in expected.iter().take(6) {
        match (store.claim(key), &want.state) {
            (Ok(Claim::Completed(outcome)), EntryState::Completed { response, .. }) => {
                if &outcome.response != response {
                    return Err(format!("claim({key:?}) replayed a wrong response"));
                }
            }
            (Ok(Claim::InProgress { .. }), EntryState::InProgress { .. }) => {}
            (Ok(Claim::Acquired(_)), _) => unfindable = true,
            (Ok(other), _) => {
                return Err(format!(
                    "claim({key:?}) answered {other:?}, the file held {want:?}"
                ));
            }
            (Err(_), _) => errors = true,
        }
    }

    if unfindable {
        tally.unfindable = 1;
    } else if errors {
        tally.typed_errors = 1;
    } else {
        tally.exact = 1;
    }
    Ok(tally)
}

/// Whether the store turned a panic inside redb into this error.
fn caught_panic(err: &Error) -> bool {
    matches!(err, Error::CorruptFile { reason } if reason.contains("panicked"))
}

/// [`probe`] on its own thread, so that a panic or a hang is caught and reported.
fn probe_guarded(
    image: Vec<u8>,
    states: Vec<BTreeMap<Vec<u8>, Entry>>,
    what: &str,
) -> Result<Tally, String> {
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = done_tx.send(probe(&image, &states));
    });
    match done_rx.recv_timeout(HANG) {
        Ok(result) => {
            worker
                .join()
                .map_err(|_| format!("{what}: the probe panicked"))?;
            result.map_err(|err| format!("{what}: {err}"))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("{what}: hung for over {HANG:?}")),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let panic = worker.join().err();
            let message = panic
                .as_ref()
                .and_then(|panic| {
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                })
                .unwrap_or_default();
            Err(format!("{what}: panicked: {message}"))
        }
    }
}

/// Pages (4 KiB) holding anything: flips there hit live structures, not empty space.
fn used_pages(image: &[u8]) -> Vec<usize> {
    image
        .chunks(4096)
        .enumerate()
        .filter(|(_, page)| page.iter().any(|&byte| byte != 0))
        .map(|(index, _)| index)
        .collect()
}

#[test]
fn single_byte_flips_and_truncations() -> TestResult {
    let started = Instant::now();
    let mutations = knob("DEDUPE_CORRUPTION_FLIPS", 10_000);
    let dir = tempfile::tempdir()?;
    let one_phase = base_images(dir.path(), false)?;
    let two_phase = base_images(dir.path(), true)?;
    let bases = [
        ("clean", vec![contents(&one_phase.clean)?], one_phase.clean),
        (
            "crashed one-phase",
            vec![
                contents(&one_phase.crashed)?,
                contents(&one_phase.before_last)?,
            ],
            one_phase.crashed,
        ),
        (
            "crashed two-phase",
            vec![contents(&two_phase.crashed)?],
            two_phase.crashed,
        ),
    ];
    let mut rng = Rng::new(knob("DEDUPE_CORRUPTION_SEED", 0xc0ffee));
    let (mut flips, mut truncations, mut tally) = (0u64, 0u64, Tally::default());
    for index in 0..mutations {
        let (name, expected, base) = &bases[rng.below_usize(bases.len())];
        let mut image = base.clone();
        let what = if rng.chance(10) {
            let len = rng.below_usize(image.len());
            image.truncate(len);
            truncations += 1;
            format!("mutation {index}: {name} file truncated to {len} bytes")
        } else {
            let pages = used_pages(&image);
            let at = if rng.chance(85) && !pages.is_empty() {
                pages[rng.below_usize(pages.len())] * 4096 + rng.below_usize(4096)
            } else {
                rng.below_usize(image.len())
            }
            .min(image.len() - 1);
            let mask = 1 + rng.below(255) as u8;
            image[at] ^= mask;
            flips += 1;
            format!("mutation {index}: {name} file, byte {at} xor {mask:#04x}")
        };
        tally.add(probe_guarded(image, expected.clone(), &what)?);
    }
    figure(
        "corruption",
        &format!("{flips} flips and {truncations} truncations: {tally:?}"),
        started,
    );
    Ok(())
}

/// A real file, opened by path: flips through the file backend rather than memory.
#[test]
fn flips_of_a_file_on_disk() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clean = base_images(dir.path(), false)?.clean;
    let expected = contents(&clean)?;
    let pages = used_pages(&clean);
    let mut rng = Rng::new(17);
    let path = dir.path().join("flipped.redb");
    for index in 0..knob("DEDUPE_CORRUPTION_FILES", 100) {
        let mut image = clean.clone();
        let at = (pages[rng.below_usize(pages.len())] * 4096 + rng.below_usize(4096))
            .min(image.len() - 1);
        image[at] ^= 1 + rng.below(255) as u8;
        std::fs::write(&path, &image)?;
        let Ok(store) = Store::builder()
            .clock(ManualClock::new(0))
            .without_sweeper()
            .open(&path)
        else {
            continue;
        };
        for (key, want) in &expected {
            if let Ok(Some(entry)) = store.get(key)
                && &entry != want
            {
                return Err(format!("file {index}, byte {at}: {key:?} answered {entry:?}").into());
            }
        }
        let _ = store.verify();
        // Closing a file that failed its check may fail too; it must not panic.
        let _ = store.close();
    }
    Ok(())
}

/// Regression: the CRC covered only the payload, so a flip in a page's key bytes could move a
/// record under another key and `get` answered that key with the other key's record.
#[test]
fn a_record_moved_under_another_key_is_caught() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clean = base_images(dir.path(), false)?.clean;
    // Rename the stored key "kkey-20" to "kkey-1:", which sorts where it sits (after
    // "kkey-190", before "kkey-200"), so a lookup of key-1: finds key-20's record.
    let needle = b"kkey-20";
    let mut moved = 0;
    let mut image = clean.clone();
    let mut at = 0;
    while let Some(found) = image[at..].windows(needle.len() + 1).position(|window| {
        &window[..needle.len()] == needle && !window[needle.len()].is_ascii_digit()
    }) {
        image[at + found + needle.len() - 2] = b'1';
        image[at + found + needle.len() - 1] = b':';
        moved += 1;
        at += found + needle.len();
    }
    assert!(moved > 0, "the key bytes were not found in the file");
    let store = open_image(&image)?;
    match store.get("key-1:") {
        Ok(Some(entry)) => return Err(format!("key-1: was never stored: {entry:?}").into()),
        Ok(None) | Err(Error::Corrupt { .. }) => {}
        Err(other) => return Err(format!("expected Corrupt, got {other:?}").into()),
    }
    match store.list(b"", usize::MAX) {
        Ok(entries) => match entries
            .iter()
            .find(|entry| entry.key.as_bytes() == b"key-1:")
        {
            Some(entry) => Err(format!("list shows never-stored key-1: as {entry:?}").into()),
            None => Ok(()),
        },
        Err(Error::Corrupt { .. }) => Ok(()),
        Err(other) => Err(format!("expected Corrupt, got {other:?}").into()),
    }
}

const EXPIRY: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("expiry");

/// Regression: the sweeper deleted whatever record a due expiry-index entry named, so a
/// damaged index entry made it delete a live completed record (and a retry then ran twice).
#[test]
fn the_sweeper_never_deletes_a_live_record_for_a_bad_index_entry() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("index.redb");
    let clock = ManualClock::new(1_700_000_000_000);
    let open = || open_file(&path, &clock, false);
    let store = open()?;
    let Claim::Acquired(ticket) = store.claim("paid")? else {
        return Err("not acquired".into());
    };
    store.complete(&ticket, b"charged once")?;
    store.close()?;
    {
        let db = redb::Database::open(&path)?;
        let txn = db.begin_write()?;
        txn.open_table(EXPIRY)?.insert((0, &b"kpaid"[..]), ())?;
        txn.commit()?;
        let _ = db.begin_read()?;
    }
    let store = open()?;
    assert!(
        store.verify().is_err(),
        "verify missed the stray index entry"
    );
    store.sweep()?;
    let entry = store
        .get("paid")?
        .ok_or("the sweeper deleted a live record")?;
    assert_eq!(
        entry.outcome().map(|outcome| outcome.response),
        Some(b"charged once".to_vec())
    );
    assert!(matches!(store.claim("paid")?, Claim::Completed(_)));
    Ok(())
}
