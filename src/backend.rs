//! The storage backend the store lends to redb: one file (or in-memory image) shared by every
//! redb database the store opens on it, under one lock that the store itself holds.
//!
//! The store opens redb more than once on one file: a read-only open to check the format
//! before anything is written, the writable open, and a reopen after a failed commit. Each redb
//! database closes (and unlocks) its backend when it drops, so the file lock is taken here, once,
//! before any of them, and released only when the store closes. While the store holds an
//! exclusive lock on the whole file, the lock requests of the databases it opens are already
//! satisfied: they are answered without touching the operating system's locks, which a shared
//! request would otherwise downgrade.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{BackendError, StorageBackend};

use crate::error::{Error, Result};

/// Whether the store holds the backend's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileLock {
    /// An exclusive lock over the whole file, held until [`SharedBackend::release`].
    Held,
    /// The backend does not lock (in memory, or a custom backend without locking); redb's own
    /// requests go through to it.
    Unsupported,
}

/// Takes an exclusive lock over the whole backend, so that no other process or store can open
/// it meanwhile, or reports that the backend has no locks.
///
/// # Errors
/// [`Error::AlreadyOpen`] at once if someone else holds any lock on the file.
pub(crate) fn lock_whole_file(
    backend: &dyn StorageBackend,
    path: Option<&Path>,
) -> Result<FileLock> {
    match backend.try_lock_range(Bound::Unbounded, Bound::Unbounded) {
        Ok(true) => Ok(FileLock::Held),
        Ok(false) => Err(Error::AlreadyOpen {
            path: path.map_or_else(|| PathBuf::from("<memory>"), Path::to_path_buf),
        }),
        Err(BackendError::Unsupported) => Ok(FileLock::Unsupported),
        Err(BackendError::Io(err)) => Err(Error::from(redb::Error::Io(err))),
        Err(other) => Err(Error::from(redb::Error::Io(std::io::Error::other(
            other.to_string(),
        )))),
    }
}

/// A backend shared by successive redb databases. redb's `close` is ignored here; the store
/// calls [`SharedBackend::release`] when it closes.
#[derive(Debug, Clone)]
pub(crate) struct SharedBackend {
    inner: Arc<dyn StorageBackend>,
    lock: FileLock,
}

impl SharedBackend {
    pub(crate) fn new(inner: Arc<dyn StorageBackend>, lock: FileLock) -> SharedBackend {
        SharedBackend { inner, lock }
    }

    /// Closes the backend, releasing its locks. Called once, when the store closes.
    pub(crate) fn release(&self) -> std::io::Result<()> {
        self.inner.close()
    }

    fn lock_held(&self) -> bool {
        self.lock == FileLock::Held
    }
}

impl StorageBackend for SharedBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn try_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<bool, BackendError> {
        if self.lock_held() {
            return Ok(true);
        }
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<bool, BackendError> {
        if self.lock_held() {
            return Ok(true);
        }
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<(), BackendError> {
        if self.lock_held() {
            return Ok(());
        }
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<(), BackendError> {
        if self.lock_held() {
            return Ok(());
        }
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<(), BackendError> {
        // Under the store's lock nothing was locked for redb, so there is nothing to unlock.
        if self.lock_held() {
            return Ok(());
        }
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> std::result::Result<bool, BackendError> {
        // Nobody else can hold a lock on a file the store has locked whole.
        if self.lock_held() {
            return Ok(false);
        }
        self.inner.query_lock_range(start, end)
    }
}
