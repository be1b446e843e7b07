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
//!
//! The backend also keeps the file's header honest after a failed write or sync. A commit
//! writes its pages and then the header that names them; when the fsync fails, Linux may mark
//! the unwritten pages clean ("fsyncgate"), so the page cache shows the new header and pages
//! while the disk has neither, and no later fsync writes them. A redb reopened on that cache
//! would build new commits on pages the disk never got, and a power cut would then leave a
//! file whose every root is corrupt. So the backend remembers the header as of the last sync
//! that succeeded and, after a failure, writes it back (and syncs it) before anything else
//! reaches the file; until then, reads of the header see it. The reopened redb then starts
//! from the last durable commit, whose pages are on disk: redb never reuses them before a
//! newer commit is durable. This holds for one-phase commits as for two-phase ones, so the
//! store needs no second fsync per commit to survive a failed one.
//!
//! Last, the backend times its fsyncs and runs a hook, when the store arms one, just before the
//! next: the batcher uses it to wake a batch's callers while the fsync is in flight
//! (`batch.rs`).

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
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
pub(crate) fn lock_whole_file(backend: &dyn StorageBackend, name: &Path) -> Result<FileLock> {
    match backend.try_lock_range(Bound::Unbounded, Bound::Unbounded) {
        Ok(true) => Ok(FileLock::Held),
        Ok(false) => Err(Error::AlreadyOpen {
            path: name.to_path_buf(),
        }),
        Err(BackendError::Unsupported) => Ok(FileLock::Unsupported),
        Err(BackendError::Io(err)) => Err(lock_error(name, err)),
        Err(other) => Err(lock_error(name, std::io::Error::other(other.to_string()))),
    }
}

fn lock_error(name: &Path, err: std::io::Error) -> Error {
    Error::Io {
        path: name.to_path_buf(),
        action: "lock",
        source: Arc::new(err),
    }
}

/// The bytes at the start of a redb file that say which commit is current: the magic number,
/// the god byte and both commit slots (redb's `DB_HEADER_SIZE`, fixed by its file format).
const HEADER_LEN: usize = 320;

/// What the backend knows of the file's header.
#[derive(Debug, Default)]
struct Header {
    /// The header as last written, or as first read before any write.
    written: Option<Vec<u8>>,
    /// The header as of the last sync that succeeded.
    synced: Option<Vec<u8>>,
}

impl Header {
    /// Takes the part of a write (or of a first read) at `offset` that falls in the header.
    fn note(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= HEADER_LEN {
            return;
        }
        let end = start.saturating_add(data.len()).min(HEADER_LEN);
        let written = match &mut self.written {
            Some(written) => written,
            // Until the whole header has been seen, a part of it says too little.
            None if start == 0 && end == HEADER_LEN => self.written.insert(vec![0; HEADER_LEN]),
            None => return,
        };
        written[start..end].copy_from_slice(&data[..end - start]);
    }

    /// Everything written is now on disk.
    fn sync_done(&mut self) {
        self.synced.clone_from(&self.written);
    }
}

pub(crate) use crate::batch::BeforeSync;

/// A backend shared by successive redb databases. redb's `close` is ignored here; the store
/// calls [`SharedBackend::release`] when it closes.
#[derive(Clone)]
pub(crate) struct SharedBackend {
    inner: Arc<dyn StorageBackend>,
    lock: FileLock,
    header: Arc<Mutex<Header>>,
    /// A write or sync failed, and the synced header has not been written back since.
    restore: Arc<AtomicBool>,
    /// Runs before the next fsync, once ([`SharedBackend::before_next_sync`]).
    before_sync: Arc<Mutex<Option<BeforeSync>>>,
    /// How long fsyncs take: a moving average over the last few, in nanoseconds.
    sync_nanos: Arc<AtomicU64>,
}

impl std::fmt::Debug for SharedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBackend")
            .field("inner", &self.inner)
            .field("lock", &self.lock)
            .field("restore", &self.restore)
            .field("sync_nanos", &self.sync_nanos)
            .finish_non_exhaustive()
    }
}

impl SharedBackend {
    pub(crate) fn new(inner: Arc<dyn StorageBackend>, lock: FileLock) -> SharedBackend {
        SharedBackend {
            inner,
            lock,
            header: Arc::new(Mutex::new(Header::default())),
            restore: Arc::new(AtomicBool::new(false)),
            before_sync: Arc::new(Mutex::new(None)),
            sync_nanos: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Arms `hook` to run just before the next fsync, replacing any armed before; `None`
    /// disarms. Only the writer arms it, around its commit.
    pub(crate) fn before_next_sync(&self, hook: Option<BeforeSync>) {
        *self.before_sync.lock() = hook;
    }

    /// Folds one fsync's duration into the moving average (one eighth per sample).
    fn timed_sync(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let average = self.sync_nanos.load(Ordering::Relaxed);
        let next = if average == 0 {
            took
        } else {
            average - average / 8 + took / 8
        };
        self.sync_nanos.store(next, Ordering::Relaxed);
    }

    /// After a failure, puts the header of the last successful sync back on the disk, so that
    /// nothing is built on a commit whose fsync failed. A no-op when nothing failed.
    fn restore_header(&self, header: &mut Header) -> std::io::Result<()> {
        if !self.restore.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(synced) = header.synced.clone() {
            self.inner.write(0, &synced)?;
            self.inner.sync_data()?;
            header.written = Some(synced);
        }
        self.restore.store(false, Ordering::Release);
        Ok(())
    }

    fn failed(&self, err: std::io::Error) -> std::io::Error {
        self.restore.store(true, Ordering::Release);
        err
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
        self.inner.read(offset, out)?;
        if offset >= HEADER_LEN as u64 {
            return Ok(());
        }
        let mut header = self.header.lock();
        if header.written.is_none() {
            // Nothing written yet: the file's header is as durable as anything known.
            header.note(offset, out);
            header.sync_done();
        }
        if self.restore.load(Ordering::Acquire)
            && let Some(synced) = &header.synced
        {
            // The disk's header is in doubt until it is written back: show the durable one.
            let start = offset as usize;
            let end = start.saturating_add(out.len()).min(HEADER_LEN);
            out[..end - start].copy_from_slice(&synced[start..end]);
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len < HEADER_LEN as u64 {
            let mut header = self.header.lock();
            self.restore_header(&mut header)?;
            // A file cut shorter than its header is being made anew.
            *header = Header::default();
            return self.inner.set_len(len);
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        let hook = self.before_sync.lock().take();
        if let Some(hook) = hook {
            hook(Duration::from_nanos(
                self.sync_nanos.load(Ordering::Relaxed),
            ));
        }
        let mut header = self.header.lock();
        self.restore_header(&mut header)?;
        let started = Instant::now();
        match self.inner.sync_data() {
            Ok(()) => {
                let took = started.elapsed();
                self.timed_sync(took);
                crate::observe::fsync(took);
                header.sync_done();
                Ok(())
            }
            Err(err) => {
                let err = self.failed(err);
                // At once, while nothing else writes; if it fails, the next write tries again.
                let _ = self.restore_header(&mut header);
                Err(err)
            }
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if offset >= HEADER_LEN as u64 && !self.restore.load(Ordering::Acquire) {
            return self
                .inner
                .write(offset, data)
                .map_err(|err| self.failed(err));
        }
        let mut header = self.header.lock();
        self.restore_header(&mut header)?;
        self.inner
            .write(offset, data)
            .map_err(|err| self.failed(err))?;
        header.note(offset, data);
        Ok(())
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

// The project's simulated disk, which can fail a sync and forget its writes as Linux does, is
// part of the `testing` feature.
#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::testing::{Fault, IoCall, IoFailure, SimDisk};

    /// A backend on a disk whose failed sync forgets the writes it was to persist.
    fn setup() -> (SimDisk, SharedBackend) {
        let disk = SimDisk::new();
        disk.failed_sync_forgets_writes(true);
        let backend = SharedBackend::new(Arc::new(disk.clone()), FileLock::Unsupported);
        (disk, backend)
    }

    /// Fails the next `times` calls of `call`.
    fn fail_next(disk: &SimDisk, call: IoCall, times: u64) {
        disk.arm(Fault {
            call,
            nth: 1,
            times,
            failure: IoFailure::Eio,
        });
    }

    fn header(byte: u8) -> Vec<u8> {
        vec![byte; HEADER_LEN]
    }

    /// The header as the disk holds it durably, and as reads see it.
    fn durable_header(disk: &SimDisk) -> Vec<u8> {
        disk.durable_image()[..HEADER_LEN].to_vec()
    }

    fn cached_header(disk: &SimDisk) -> Vec<u8> {
        disk.current_image()[..HEADER_LEN].to_vec()
    }

    /// Header 1 synced, then header 2 written over it and not yet synced.
    fn synced_then_rewritten(backend: &SharedBackend) {
        backend.write(0, &header(1)).expect("write");
        backend.sync_data().expect("sync");
        backend.write(0, &header(2)).expect("write");
    }

    fn read_header(backend: &SharedBackend) -> Vec<u8> {
        let mut out = header(0);
        backend.read(0, &mut out).expect("read the header");
        out
    }

    #[test]
    fn a_failed_sync_puts_the_synced_header_back() {
        let (disk, backend) = setup();
        backend.write(4096, &[9; 100]).expect("write a page");
        synced_then_rewritten(&backend);
        fail_next(&disk, IoCall::Sync, 1);
        assert!(backend.sync_data().is_err());
        // The header is back, on disk and in the cache, and nothing is left to restore.
        assert_eq!(durable_header(&disk), header(1));
        assert_eq!(read_header(&backend), header(1));
        assert!(!backend.restore.load(Ordering::Acquire));
        // Later commits carry on from the restored header.
        backend.write(0, &header(3)).expect("write");
        backend.sync_data().expect("sync");
        assert_eq!(durable_header(&disk), header(3));
    }

    #[test]
    fn until_the_header_is_back_reads_see_the_synced_one() {
        let (disk, backend) = setup();
        synced_then_rewritten(&backend);
        // The sync and the restore's own sync fail.
        fail_next(&disk, IoCall::Sync, 2);
        assert!(backend.sync_data().is_err());
        assert_eq!(cached_header(&disk), header(1));
        assert!(backend.restore.load(Ordering::Acquire));
        // A reopen reads the durable header, whatever the cache holds.
        disk.write(0, &header(2)).expect("write the cache");
        assert_eq!(read_header(&backend), header(1));
        let mut part = [0u8; 8];
        backend
            .read(100, &mut part)
            .expect("read part of the header");
        assert_eq!(part, [1; 8]);
        // The next write puts it back first.
        backend.write(8192, &[7; 10]).expect("write");
        assert_eq!(durable_header(&disk), header(1));
        assert!(!backend.restore.load(Ordering::Acquire));
    }

    #[test]
    fn a_failed_write_restores_the_header_before_the_next_one() {
        let (disk, backend) = setup();
        synced_then_rewritten(&backend);
        fail_next(&disk, IoCall::Write, 1);
        assert!(backend.write(4096, &[5; 10]).is_err());
        assert_eq!(read_header(&backend), header(1));
        backend.write(4096, &[6; 10]).expect("write");
        assert_eq!(cached_header(&disk), header(1));
        assert_eq!(durable_header(&disk), header(1));
    }

    #[test]
    fn a_header_first_read_counts_as_synced() {
        let (disk, backend) = setup();
        disk.write(0, &header(4)).expect("write");
        disk.sync_data().expect("sync");
        assert_eq!(read_header(&backend), header(4));
        backend.write(0, &header(5)).expect("write");
        fail_next(&disk, IoCall::Sync, 1);
        assert!(backend.sync_data().is_err());
        assert_eq!(read_header(&backend), header(4));
    }

    #[test]
    fn without_a_known_header_nothing_is_restored() {
        let (disk, backend) = setup();
        // Only part of the header was ever written: there is nothing whole to put back.
        backend.write(0, &[3; 16]).expect("write");
        fail_next(&disk, IoCall::Sync, 1);
        assert!(backend.sync_data().is_err());
        assert_eq!(disk.current_image()[..16], [3; 16]);
        assert!(!backend.restore.load(Ordering::Acquire));
    }

    #[test]
    fn an_armed_hook_runs_once_just_before_the_next_sync() {
        let (disk, backend) = setup();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let arm = |backend: &SharedBackend| {
            let (disk, ran) = (disk.clone(), ran.clone());
            backend.before_next_sync(Some(Box::new(move |expected| {
                // The commit's writes are in, and not yet durable.
                let written = disk.current_image()[..HEADER_LEN] == header(1)[..];
                let durable = disk.durable_image().get(..HEADER_LEN) == Some(&header(1)[..]);
                ran.lock().push((expected, written, durable));
            })));
        };
        arm(&backend);
        backend.write(0, &header(1)).expect("write");
        backend.sync_data().expect("sync");
        backend.sync_data().expect("a second sync");
        {
            let ran = ran.lock();
            assert_eq!(ran.len(), 1, "the hook runs at one sync only");
            // No sync had been timed yet.
            assert_eq!(ran[0], (Duration::ZERO, true, false));
        }
        // Armed again, it is told how long syncs have taken; disarmed, it does not run.
        arm(&backend);
        backend.sync_data().expect("sync");
        assert_eq!(ran.lock().len(), 2);
        assert!(ran.lock()[1].0 > Duration::ZERO, "the syncs were timed");
        arm(&backend);
        backend.before_next_sync(None);
        backend.sync_data().expect("sync");
        assert_eq!(ran.lock().len(), 2);
    }
}
