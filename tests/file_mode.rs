//! New store files are private to their owner; an existing file's mode is never changed.
#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::TestResult;
use dedupe_store::{Error, Store};

fn mode(path: &Path) -> TestResult<u32> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

#[test]
fn a_new_store_file_is_readable_by_its_owner_only() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("new.redb");
    let store = Store::open(&path)?;
    assert!(store.mark_seen("x")?);
    store.close()?;
    assert_eq!(mode(&path)?, 0o600);
    Ok(())
}

#[test]
fn the_builder_sets_another_mode_for_new_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("shared.redb");
    Store::builder().file_mode(0o640).open(&path)?.close()?;
    // The process umask may take bits away, never add them.
    let got = mode(&path)?;
    assert_eq!(got & !0o640, 0, "mode {got:o}");
    assert_eq!(got & 0o600, 0o600, "mode {got:o}");
    Ok(())
}

#[test]
fn an_existing_files_mode_is_left_alone() -> TestResult {
    let dir = tempfile::tempdir()?;
    // A store made by an earlier version, and an empty file made by the user.
    let store_file = dir.path().join("old.redb");
    Store::open(&store_file)?.close()?;
    let empty = dir.path().join("empty.redb");
    std::fs::write(&empty, b"")?;
    for path in [&store_file, &empty] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
        let store = Store::builder().file_mode(0o600).open(path)?;
        assert!(store.mark_seen("x")?);
        store.close()?;
        assert_eq!(mode(path)?, 0o644, "{}", path.display());
    }
    Ok(())
}

#[test]
fn a_mode_that_is_not_permission_bits_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("never.redb");
    let result = Store::builder().file_mode(0o100600).open(&path);
    assert!(
        matches!(result, Err(Error::InvalidConfig { .. })),
        "{result:?}"
    );
    assert!(!path.exists(), "nothing is created for a refused setting");
    Ok(())
}
