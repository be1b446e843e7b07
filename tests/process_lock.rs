//! One file, one holder: a second open, in this process or another, gets `AlreadyOpen` at
//! once; a holder killed with SIGKILL leaves nothing behind that stops the next open.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::TestResult;
use dedupe_store::{Claim, Durability, Error, Store};

const CHILD_ENV: &str = "DEDUPE_LOCK_TEST_HOLD";

/// Not a test of its own: the body of the child process. It opens the store named by the
/// environment, acknowledges a completed key on stdout, then holds the file until killed.
#[test]
fn child_holds_the_store() -> TestResult {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return Ok(());
    };
    let store = Store::open(&path)?;
    let ticket = store
        .claim("written-by-child")?
        .ticket()
        .ok_or("fresh key")?;
    store.complete(&ticket, b"child's outcome")?;
    println!("ready {}", ticket.fencing_token());
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Opens `path` on another thread; an open that does not return within the limit has hung
/// (waiting for the lock instead of failing at once).
fn open_without_hanging(path: &Path) -> TestResult<Result<Store, Error>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Store::open(&path));
    });
    Ok(rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| "Store::open blocked on a held file instead of failing")?)
}

#[test]
fn another_process_holding_the_file_gives_already_open_until_it_is_killed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("held.redb");
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "child_holds_the_store",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let child_token: u64 = loop {
        let line = lines.next().ok_or("child exited before it was ready")??;
        // libtest may print "test NAME ... " on the same line first.
        if let Some((_, token)) = line.split_once("ready ") {
            break token.trim().parse()?;
        }
    };

    match open_without_hanging(&path)? {
        Err(Error::AlreadyOpen { path: reported }) => assert_eq!(reported, path),
        other => return Err(format!("expected AlreadyOpen, got {other:?}").into()),
    }

    child.kill()?; // SIGKILL
    child.wait()?;

    let store = open_without_hanging(&path)??;
    match store.claim("written-by-child")? {
        Claim::Completed(outcome) => assert_eq!(outcome.response, b"child's outcome"),
        other => {
            return Err(format!("the child's acknowledged completion is lost: {other:?}").into());
        }
    }
    let ticket = store.claim("after")?.ticket().ok_or("fresh key")?;
    assert!(ticket.fencing_token() > child_token);
    Ok(())
}

#[test]
fn a_second_open_in_the_same_process_gives_already_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("twice.redb");
    let first = Store::open(&path)?;
    assert!(matches!(
        open_without_hanging(&path)?,
        Err(Error::AlreadyOpen { .. })
    ));
    // A clone is the way to share a store; it does not take the lock again.
    let clone = first.clone();
    assert!(clone.mark_seen("k")?);
    drop(first);
    assert!(
        matches!(open_without_hanging(&path)?, Err(Error::AlreadyOpen { .. })),
        "a live clone still holds the file"
    );
    drop(clone);
    let reopened = open_without_hanging(&path)??;
    assert!(!reopened.mark_seen("k")?);
    Ok(())
}

#[test]
fn close_releases_the_file_for_every_clone() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("closed.redb");
    let store = Store::open(&path)?;
    let clone = store.clone();
    store.close()?;
    assert!(matches!(clone.claim("k"), Err(Error::Closed)));
    assert!(matches!(clone.mark_seen("k"), Err(Error::Closed)));
    assert!(matches!(clone.get("k"), Err(Error::Closed)));
    assert!(matches!(clone.stats(), Err(Error::Closed)));
    let reopened = open_without_hanging(&path)??;
    assert!(reopened.claim("k")?.is_acquired());
    drop(clone);
    reopened.close()?;
    Ok(())
}

/// Two clones closing at once: whichever close returns first has released the file and made
/// every write durable, whether it did the closing or waited for the other clone's close.
#[test]
fn racing_closes_both_return_after_the_file_is_released() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("raced.redb");
    for round in 0..40 {
        let store = Store::builder()
            .durability(Durability::Periodic(Duration::from_secs(3600)))
            .open(&path)?;
        let key = format!("round-{round}");
        let keys: Vec<String> = (0..200).map(|i| format!("{key}-{i}")).collect();
        assert!(store.mark_seen_many(&keys)?.iter().all(|first| *first));
        let other = store.clone();
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let closer = {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                other.close()
            })
        };
        start.wait();
        store.close()?;
        // This close returned: the file is free, whichever thread closed it.
        let reopened = Store::open(&path);
        let joined = closer.join().map_err(|_| "closer panicked")?;
        joined?;
        let reopened = reopened?;
        for key in &keys {
            assert!(!reopened.mark_seen(key)?, "round {round}: {key} was lost");
        }
        reopened.close()?;
    }
    Ok(())
}

/// Many openers race to create and use one new file, each with its own file handle (as separate
/// processes have): each open either succeeds or gets `AlreadyOpen`, never finds a file another
/// opener is still creating and takes it for damaged.
#[test]
fn concurrent_opens_of_a_new_file_never_see_it_half_made() -> TestResult {
    for round in 0..20 {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("racy.redb");
        let start = std::sync::Arc::new(std::sync::Barrier::new(8));
        let openers: Vec<_> = (0..8)
            .map(|opener| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || -> Result<usize, String> {
                    start.wait();
                    let mut marked = 0;
                    for attempt in 0..200 {
                        match Store::open(&path) {
                            Ok(store) => {
                                store
                                    .mark_seen(format!("opener-{opener}"))
                                    .map_err(|e| e.to_string())?;
                                marked += 1;
                                return Ok(marked);
                            }
                            Err(Error::AlreadyOpen { .. }) => {
                                std::thread::sleep(Duration::from_millis(1 + attempt % 5));
                            }
                            Err(other) => return Err(format!("round {round}: {other}")),
                        }
                    }
                    Err(format!("round {round}: never got the file"))
                })
            })
            .collect();
        for opener in openers {
            opener.join().map_err(|_| "opener panicked")??;
        }
        let store = Store::open(&path)?;
        assert_eq!(
            store.len()?,
            8,
            "round {round}: every opener's mark is there"
        );
    }
    Ok(())
}
