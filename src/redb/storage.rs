//! The redb file's handle: opening it, reading through the journal's overlay, running a write
//! transaction (group commit's one commit), holding off other calls for verify and compact,
//! reopening the file after a failed commit, and closing it.
//!
//! Nothing here decides what a record should become; that is [`crate::rules`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use redb::{Database, Durability, ReadTransaction, ReadableDatabase, StorageBackend};

use super::scan::{Loaded, load};
use super::schema::{
    JOURNAL, Location, RECORDS, check_before_writing, init_or_check, open_database, recover,
};
use super::writer::{Tables, Writer};
use crate::error::{Error, Result};
use crate::redb::backend::{BeforeSync, SharedBackend, lock_whole_file};
use crate::redb::guard::{FileStart, drop_quietly, guarded, guarded_call, inspect_file};
use crate::redb::journal::{Backlog, Changes, Overlay, Pending};

/// Whether the database is open, broken by a failed commit (to be reopened), or closed.
enum DbState {
    Open(Database),
    /// A commit failed; the next user reopens the file.
    Broken,
    Closed,
}

/// The store file and the redb database on it.
pub(crate) struct Storage {
    database: RwLock<DbState>,
    /// Committed changes not yet in the tables. Lock order: `database`, then `overlay`.
    overlay: RwLock<Overlay>,
    /// Whether the overlay holds any key, set under its write lock: a read finding it false
    /// skips the lock (which two threads reading at once would otherwise bounce between
    /// cores).
    overlay_keys: AtomicBool,
    /// The last fencing token issued (the meta table has it as of the last merge).
    last_token: AtomicU64,
    /// How many times the file was reopened after a failed commit. A reopen replaces the
    /// overlay with the file's journal, so a read that checked the overlay before it must
    /// check again.
    reopens: AtomicU64,
    /// Set by [`Storage::close`], so that reads the overlay could answer get `Closed` too
    /// without taking the database's lock (see `overlay_keys`).
    closed: AtomicBool,
    /// The changes of the commits made since the last durable one (`Durability::Periodic`),
    /// oldest first: a failed commit's reopen loses them from the file, and commits them again.
    undurable: Mutex<Changes>,
    /// Whether commits save redb's allocator state (the store's setting).
    quick_repair: bool,
    /// The outcome of the first [`Storage::close`], once it has finished; held while closing.
    close_outcome: Mutex<Option<Result<()>>>,
    backend: SharedBackend,
    /// The file, or what names the store in errors.
    location: Location,
    cache_size: usize,
    store_id: u64,
}

impl Storage {
    /// Opens (or initialises) a store on `backend`, at `location` (which names it in errors);
    /// `quick_repair` says whether its commits save redb's allocator state.
    pub(crate) fn open(
        backend: Arc<dyn StorageBackend>,
        location: Location,
        cache_size: usize,
        quick_repair: bool,
    ) -> Result<Storage> {
        let opened = lock_whole_file(backend.as_ref(), &location.name()).and_then(|lock| {
            let shared = SharedBackend::new(backend.clone(), lock);
            inspect_file(backend.as_ref(), location.path())
                .and_then(|start| match start {
                    FileStart::Empty => Ok(()),
                    FileStart::Foreign => Err(Error::NotAStore {
                        path: location.name(),
                    }),
                    FileStart::Redb => guarded("reading the file's format", || {
                        check_before_writing(&shared, &location, cache_size)
                    }),
                })
                .and_then(|()| open_database(&shared, &location, cache_size))
                .map(|db| (db, shared))
        });
        let opened = opened.and_then(|(db, shared)| {
            // A database dropped here (its meta table failed the check) may panic too.
            guarded("checking the store's meta table", || {
                let id = init_or_check(&db, &location)?;
                let (token, overlay) = recover(&db)?;
                Ok((db, id, token, overlay, shared))
            })
        });
        match opened {
            Ok((db, store_id, token, overlay, shared)) => Ok(Storage {
                database: RwLock::new(DbState::Open(db)),
                overlay_keys: AtomicBool::new(overlay.has_keys()),
                overlay: RwLock::new(overlay),
                last_token: AtomicU64::new(token),
                reopens: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                close_outcome: Mutex::new(None),
                undurable: Mutex::new(Vec::new()),
                quick_repair,
                backend: shared,
                location,
                cache_size,
                store_id,
            }),
            Err(err) => {
                // Release the lock of a file we could not use.
                let _ = backend.close();
                Err(err)
            }
        }
    }

    /// The random id written into the file when it was created; tickets carry it.
    pub(crate) fn store_id(&self) -> u64 {
        self.store_id
    }

    /// Reads one key's latest committed record: from the overlay if a commit since the last
    /// merge changed it, from the tables otherwise.
    pub(crate) fn load(&self, stored_key: &[u8]) -> Result<Loaded> {
        self.overlay_then_tables(|| {
            if self.overlay_keys.load(Ordering::Acquire)
                && let Some(latest) = self.overlay.read().get(stored_key)
            {
                return Ok(latest.map(Ok));
            }
            self.read(|txn| {
                let records = txn.open_table(RECORDS)?;
                load(&records, stored_key)
            })
        })
    }

    /// Runs `read`, which looks in the overlay and then in a read transaction, again until no
    /// reopen came between the two. The overlay must come first: a merge commits the tables
    /// before it forgets the keys it moved, so a key missing there is current in any read
    /// transaction begun after. A reopen replaces the overlay with the file's journal.
    fn overlay_then_tables<T>(&self, read: impl Fn() -> Result<T>) -> Result<T> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            let reopens = self.reopens.load(Ordering::Acquire);
            let out = read()?;
            if self.reopens.load(Ordering::Acquire) == reopens {
                return Ok(out);
            }
        }
    }

    /// How many keys have changes waiting for a merge.
    pub(crate) fn pending_keys(&self) -> usize {
        self.overlay.read().keys()
    }

    /// How much committed change waits for a merge.
    pub(crate) fn backlog(&self) -> Backlog {
        self.overlay.read().backlog()
    }

    /// Runs `f` on a read transaction together with the overlay's changes to keys starting
    /// with `prefix`, which take precedence over the tables: the scanning readers' view of
    /// everything committed, with no write.
    pub(crate) fn read_merged<T>(
        &self,
        prefix: &[u8],
        f: impl Fn(&ReadTransaction, &Pending) -> Result<T>,
    ) -> Result<T> {
        self.overlay_then_tables(|| {
            let pending = if self.overlay_keys.load(Ordering::Acquire) {
                self.overlay.read().snapshot(prefix)
            } else {
                Pending::new()
            };
            self.read(|txn| f(txn, &pending))
        })
    }

    /// The last fencing token issued.
    #[cfg(feature = "testing")]
    pub(crate) fn last_token(&self) -> u64 {
        self.last_token.load(Ordering::Acquire)
    }

    /// Runs `f` on a read transaction of the last commit.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T>) -> Result<T> {
        loop {
            {
                let database = self.database.read();
                match &*database {
                    DbState::Open(db) => {
                        let result = guarded_call("reading", || f(&db.begin_read()?));
                        drop(database);
                        return result.unwrap_or_else(|panicked| {
                            self.mark_broken();
                            Err(panicked)
                        });
                    }
                    DbState::Closed => return Err(Error::Closed),
                    DbState::Broken => {}
                }
            }
            self.reopen()?;
        }
    }

    /// Runs `f` in one write transaction and commits it. Any storage failure aborts the whole
    /// transaction, and the file is reopened so that later writes can proceed.
    pub(crate) fn write<T>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T>,
    ) -> Result<T> {
        let result = loop {
            {
                let database = self.database.read();
                match &*database {
                    // A panic inside redb leaves the database to be reopened below, as a failed
                    // commit does.
                    DbState::Open(db) => {
                        break guarded("writing", || self.write_in(db, durable, f));
                    }
                    DbState::Closed => return Err(Error::Closed),
                    DbState::Broken => {}
                }
            }
            self.reopen()?;
        };
        if let Err(err) = &result
            && err.is_storage()
        {
            // redb refuses writes after a failed commit until it is reopened. If the reopen
            // fails too, the database stays broken and the next caller tries again.
            self.mark_broken();
            let _ = self.reopen();
        }
        result
    }

    fn write_in<T>(
        &self,
        db: &Database,
        durable: bool,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut txn = db.begin_write()?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        // Saving the allocator state makes redb commit in two phases (two fsyncs); without it a
        // commit takes one. Either survives a failed fsync that Linux forgets: the backend
        // puts the last synced header back before the reopen reads it (`backend.rs`).
        txn.set_quick_repair(self.quick_repair);
        let first_token = self.last_token.load(Ordering::Acquire);
        let (out, entries, merge, token, before_sync) = {
            let mut writer = Writer {
                tables: Tables::open(&txn)?,
                journal: txn.open_table(JOURNAL)?,
                overlay: &self.overlay,
                pending: HashMap::new(),
                order: Vec::new(),
                token: first_token,
                merge: None,
                before_sync: None,
            };
            let out = f(&mut writer)?;
            let entries = writer.append(first_token)?;
            (out, entries, writer.merge, writer.token, writer.before_sync)
        };
        // Armed for this commit's fsync alone: disarmed once the commit returns (or panics),
        // so that a commit that fails before its fsync leaves no hook for a later one.
        let armed = Armed::new(&self.backend, before_sync);
        let committed = txn.commit();
        drop(armed);
        committed?;
        {
            let mut undurable = self.undurable.lock();
            if durable {
                undurable.clear();
            } else {
                undurable.extend(
                    entries
                        .iter()
                        .flat_map(|(_, changes)| changes.iter().cloned()),
                );
            }
        }
        if merge.is_some() || !entries.is_empty() {
            let mut overlay = self.overlay.write();
            if let Some(done) = &merge {
                overlay.merged(done);
            }
            for (seq, changes) in entries {
                overlay.committed(seq, changes);
            }
            self.overlay_keys
                .store(overlay.has_keys(), Ordering::Release);
        }
        self.last_token.store(token, Ordering::Release);
        Ok(out)
    }

    /// Runs `f` with the database to itself: no reads or writes run meanwhile.
    /// `f` also gets the overlay's changes, which take precedence over the tables.
    pub(crate) fn exclusive<T>(
        &self,
        f: impl FnOnce(&mut Database, &Pending) -> Result<T>,
    ) -> Result<T> {
        loop {
            {
                let mut database = self.database.write();
                match &mut *database {
                    DbState::Open(db) => {
                        let pending = self.overlay.read().snapshot(&[]);
                        return guarded_call("checking the file", || f(db, &pending))
                            .unwrap_or_else(|panicked| {
                                let broken = std::mem::replace(&mut *database, DbState::Broken);
                                drop_quietly(broken);
                                Err(panicked)
                            });
                    }
                    DbState::Closed => return Err(Error::Closed),
                    DbState::Broken => {}
                }
            }
            self.reopen()?;
        }
    }

    fn mark_broken(&self) {
        let mut database = self.database.write();
        if matches!(*database, DbState::Open(_)) {
            let broken = std::mem::replace(&mut *database, DbState::Broken);
            drop(database);
            drop_quietly(broken);
        }
    }

    fn reopen(&self) -> Result<()> {
        let mut database = self.database.write();
        match &*database {
            DbState::Open(_) => Ok(()),
            DbState::Closed => Err(Error::Closed),
            DbState::Broken => {
                let db = open_database(&self.backend, &self.location, self.cache_size)?;
                // What the file holds is the truth now: a commit that failed may or may not
                // have reached it, and the overlay may hold commits it lost.
                let (token, overlay) = guarded("reading the journal", || recover(&db))?;
                let before = std::mem::replace(&mut *self.overlay.write(), overlay);
                // Tokens handed out in commits the file lost are never handed out again.
                self.last_token.fetch_max(token, Ordering::AcqRel);
                // Commits that skipped their fsync (`Durability::Periodic`) were acknowledged,
                // and the process did not crash: they are committed again, durably, before
                // anything else. Until that succeeds, reads keep seeing them.
                if let Err(err) = self.recommit_undurable(&db) {
                    *self.overlay.write() = before;
                    return Err(err);
                }
                self.overlay_keys
                    .store(self.overlay.read().has_keys(), Ordering::Release);
                self.reopens.fetch_add(1, Ordering::AcqRel);
                crate::observe::reopened();
                *database = DbState::Open(db);
                Ok(())
            }
        }
    }

    /// After a reopen, commits durably the changes of the commits since the last durable one,
    /// which the file lost, in their order. A no-op when every commit was durable.
    fn recommit_undurable(&self, db: &Database) -> Result<()> {
        let lost = self.undurable.lock().clone();
        if lost.is_empty() {
            return Ok(());
        }
        guarded("committing again what the file lost", || {
            self.write_in(db, true, |writer| {
                for (stored_key, record) in lost {
                    writer.change(&stored_key, record);
                }
                Ok(())
            })
        })
    }

    /// Closes the database and releases the file. Later operations get [`Error::Closed`].
    ///
    /// Closers take turns: one that finds another closing waits for it and returns its
    /// outcome, so that whichever `close` returns, the file is durable and released.
    pub(crate) fn close(&self) -> Result<()> {
        let mut outcome = self.close_outcome.lock();
        if let Some(outcome) = &*outcome {
            return outcome.clone();
        }
        self.closed.store(true, Ordering::Release);
        let previous = std::mem::replace(&mut *self.database.write(), DbState::Closed);
        let closed = match previous {
            DbState::Open(db) => guarded("closing", || db.close().map_err(Error::from)),
            DbState::Broken | DbState::Closed => Ok(()),
        };
        let released = self.backend.release().map_err(|err| Error::Io {
            path: self.location.name(),
            action: "release the lock on",
            source: Arc::new(err),
        });
        let result = closed.and(released);
        *outcome = Some(result.clone());
        result
    }

    /// The file the store is on; `None` in memory or on a caller's backend.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.location.path()
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The backend's before-sync hook, armed for as long as this lives.
struct Armed<'b>(&'b SharedBackend);

impl<'b> Armed<'b> {
    fn new(backend: &'b SharedBackend, hook: Option<BeforeSync>) -> Armed<'b> {
        backend.before_next_sync(hook);
        Armed(backend)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.before_next_sync(None);
    }
}
