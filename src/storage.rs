//! The redb file: its tables, opening and initialising it, reading and writing records, and
//! reopening it after a failed commit.
//!
//! Nothing here decides what a record should become; that is [`crate::rules`].

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use redb::{
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, StorageBackend, Table, TableDefinition,
};

use crate::backend::{BeforeSync, SharedBackend, lock_whole_file};
use crate::error::{Error, Result};
use crate::guard::{FileStart, drop_quietly, guarded, guarded_call, inspect_file};
use crate::journal::{self, Backlog, Changes, Merge, Overlay, Pending};
use crate::record::{self, DecodeError, RECORD_VERSION, Record};

/// Records by stored key (namespace tag + key): the envelope bytes.
pub(crate) const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
/// The expiry index: `(expires_at, stored key)` for every record, so the sweeper reads only
/// what is due.
pub(crate) const EXPIRY: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("expiry");
/// Format version, store id, last fencing token.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Group commits not yet merged into the tables, by sequence number (see
/// [`crate::journal`]).
pub(crate) const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");

const META_FORMAT_VERSION: &str = "format_version";
const META_STORE_ID: &str = "store_id";
const META_LAST_TOKEN: &str = "last_token";

/// The on-disk format version this build reads and writes.
pub const FORMAT_VERSION: u32 = RECORD_VERSION as u32;

/// One key's record as loaded: absent, decoded, or damaged.
pub(crate) type Loaded = Option<std::result::Result<Record, DecodeError>>;

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

/// Where a store lives: a file, or no file, for what names it in errors.
#[derive(Debug)]
pub(crate) enum Location {
    File(PathBuf),
    /// `Store::in_memory`.
    Memory,
    /// A backend of the caller's (`StoreBuilder::open_backend`).
    Backend,
}

impl Location {
    /// The file, if the store is on one.
    pub(crate) fn path(&self) -> Option<&Path> {
        match self {
            Location::File(path) => Some(path),
            Location::Memory | Location::Backend => None,
        }
    }

    /// How errors name the store: its path, `<memory>` or `<backend>`.
    pub(crate) fn name(&self) -> PathBuf {
        match self {
            Location::File(path) => path.clone(),
            Location::Memory => PathBuf::from("<memory>"),
            Location::Backend => PathBuf::from("<backend>"),
        }
    }
}

fn open_error(err: DatabaseError, location: &Location) -> Error {
    match err {
        DatabaseError::DatabaseAlreadyOpen => Error::AlreadyOpen {
            path: location.name(),
        },
        DatabaseError::UpgradeRequired(found) => Error::UnsupportedFormat {
            found: u32::from(found),
            supported: FORMAT_VERSION,
        },
        other => Error::from(other),
    }
}

fn open_database(
    backend: &SharedBackend,
    location: &Location,
    cache_size: usize,
) -> Result<Database> {
    guarded("opening the file", || {
        open_database_unguarded(backend, location, cache_size)
    })
}

fn open_database_unguarded(
    backend: &SharedBackend,
    location: &Location,
    cache_size: usize,
) -> Result<Database> {
    Database::builder()
        .set_cache_size(cache_size)
        .create_with_backend(backend.clone())
        .map_err(|err| open_error(err, location))
}

/// Reads an existing redb file's format through a read-only open, so that a file this build
/// must not touch is refused before redb opens it for writing (which rewrites its header).
///
/// A file left by a crash cannot be opened read-only; the writable open repairs it and
/// [`init_or_check`] then checks it.
fn check_before_writing(
    backend: &SharedBackend,
    location: &Location,
    cache_size: usize,
) -> Result<()> {
    let db = match Database::builder()
        .set_cache_size(cache_size)
        .open_read_only_with_backend(backend.clone())
    {
        Ok(db) => db,
        Err(DatabaseError::RepairAborted) => return Ok(()),
        Err(err) => return Err(open_error(err, location)),
    };
    let txn = db.begin_read()?;
    match txn.open_table(META) {
        Ok(meta) => check_meta(&meta).map(|_| ()),
        Err(redb::TableError::TableDoesNotExist(_)) if txn.list_tables()?.next().is_some() => {
            Err(Error::NotAStore {
                path: location.name(),
            })
        }
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Checks the file's format, or writes the meta table into a new file. Returns the store id.
fn init_or_check(db: &Database, location: &Location) -> Result<u64> {
    {
        let txn = db.begin_read()?;
        match txn.open_table(META) {
            Ok(meta) => return check_meta(&meta),
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(err) => return Err(err.into()),
        }
        if txn.list_tables()?.next().is_some() {
            return Err(Error::NotAStore {
                path: location.name(),
            });
        }
    }
    let store_id = random_id();
    let mut txn = db.begin_write()?;
    // Two phases, once per file: should the fsync fail (and Linux forget the writes it was
    // to make, "fsyncgate") the header still names the empty file, and the next open creates
    // the tables again.
    txn.set_quick_repair(true);
    txn.set_two_phase_commit(true);
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(META_FORMAT_VERSION, u64::from(FORMAT_VERSION))?;
        meta.insert(META_STORE_ID, store_id)?;
        meta.insert(META_LAST_TOKEN, 0)?;
        txn.open_table(RECORDS)?;
        txn.open_table(EXPIRY)?;
        txn.open_table(JOURNAL)?;
    }
    txn.commit()?;
    Ok(store_id)
}

fn check_meta(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64> {
    let corrupt = |what: &str| Error::CorruptFile {
        reason: format!("the meta table has no {what}"),
    };
    let version = meta
        .get(META_FORMAT_VERSION)?
        .ok_or_else(|| corrupt(META_FORMAT_VERSION))?
        .value();
    if version != u64::from(FORMAT_VERSION) {
        return Err(Error::UnsupportedFormat {
            found: u32::try_from(version).unwrap_or(u32::MAX),
            supported: FORMAT_VERSION,
        });
    }
    meta.get(META_LAST_TOKEN)?
        .ok_or_else(|| corrupt(META_LAST_TOKEN))?;
    Ok(meta
        .get(META_STORE_ID)?
        .ok_or_else(|| corrupt(META_STORE_ID))?
        .value())
}

/// A random 64-bit id, from the standard library's per-process hash seed and the time.
fn random_id() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// The stored key: the namespace tag, then the caller's key.
pub(crate) fn stored_key(tag: u8, key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(key.len() + 1);
    stored.push(tag);
    stored.extend_from_slice(key);
    stored
}

/// Reads one record.
pub(crate) fn load(
    records: &impl ReadableTable<&'static [u8], &'static [u8]>,
    stored_key: &[u8],
) -> Result<Loaded> {
    Ok(records
        .get(stored_key)?
        .map(|bytes| record::decode(stored_key, bytes.value())))
}

/// An expiry-index key: `(expires_at, stored key)`.
pub(crate) type IndexKey = (u64, &'static [u8]);

/// The range of expiry-index entries due at `now` (`expires_at <= now`).
pub(crate) fn due_range(now: u64) -> (Bound<IndexKey>, Bound<IndexKey>) {
    match now.checked_add(1) {
        Some(end) => (Bound::Unbounded, Bound::Excluded((end, &[][..]))),
        None => (Bound::Unbounded, Bound::Unbounded),
    }
}

/// Reads what the journal holds (the file was not closed cleanly) into a fresh overlay, so that
/// reads see it at once and the next merge moves it into the tables; returns it with the
/// last fencing token issued. A file closed cleanly has an empty journal.
fn recover(db: &Database) -> Result<(u64, Overlay)> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let mut token = last_token(&meta)?;
    let mut overlay = Overlay::default();
    let journal = match txn.open_table(JOURNAL) {
        Ok(journal) => journal,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((token, overlay)),
        Err(err) => return Err(err.into()),
    };
    for entry in journal.iter()? {
        let (seq, bytes) = entry?;
        let seq = seq.value();
        let (entry_token, changes) =
            journal::decode(bytes.value()).map_err(|reason| Error::CorruptFile {
                reason: format!("journal entry {seq}: {reason}"),
            })?;
        token = token.max(entry_token);
        overlay.committed(seq, changes);
    }
    Ok((token, overlay))
}

fn last_token(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64> {
    match meta.get(META_LAST_TOKEN)? {
        Some(token) => Ok(token.value()),
        None => Err(Error::CorruptFile {
            reason: format!("the meta table has no {META_LAST_TOKEN}"),
        }),
    }
}

/// The records, the expiry index and the meta table, in one write transaction.
struct Tables<'t> {
    records: Table<'t, &'static [u8], &'static [u8]>,
    expiry: Table<'t, (u64, &'static [u8]), ()>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Tables<'t>> {
        Ok(Tables {
            records: txn.open_table(RECORDS)?,
            expiry: txn.open_table(EXPIRY)?,
            meta: txn.open_table(META)?,
        })
    }

    /// Makes `record` (or its absence) the key's record, keeping the expiry index in step.
    /// The record it replaces comes back from the insert or removal itself, so each key costs
    /// one descent of the records table, not two.
    fn apply(&mut self, stored_key: &[u8], record: Option<&Record>) -> Result<()> {
        let old = match record {
            Some(record) => self
                .records
                .insert(stored_key, record::encode(stored_key, record).as_slice())?,
            None => self.records.remove(stored_key)?,
        };
        let replaced =
            old.map(|old| record::decode(stored_key, old.value()).map(|old| old.expires_at));
        let new_expires_at = record.map(|record| record.expires_at);
        match replaced {
            Some(Ok(old)) if Some(old) != new_expires_at => {
                self.expiry.remove((old, stored_key))?;
            }
            None | Some(Ok(_)) => {}
            // Only `expire` replaces a damaged record (other operations refuse it), and its
            // `expires_at` cannot be trusted: every index entry naming the key goes.
            Some(Err(_)) => self.forget_index_entries(stored_key)?,
        }
        if let Some(expires_at) = new_expires_at {
            self.expiry.insert((expires_at, stored_key), ())?;
        }
        Ok(())
    }

    /// Removes every index entry naming `stored_key`, found by a scan (for a record that does
    /// not decode, whose `expires_at` cannot be trusted).
    fn forget_index_entries(&mut self, stored_key: &[u8]) -> Result<()> {
        let mut stale = Vec::new();
        for entry in self.expiry.iter()? {
            let (index_key, _) = entry?;
            let (expires_at, key) = index_key.value();
            if key == stored_key {
                stale.push(expires_at);
            }
        }
        for expires_at in stale {
            self.expiry.remove((expires_at, stored_key))?;
        }
        Ok(())
    }

    /// Moves a merge's changes into the tables and retires its journal entries.
    fn merge(
        &mut self,
        journal: &mut Table<'_, u64, &'static [u8]>,
        work: &Merge,
        token: u64,
    ) -> Result<()> {
        for (stored_key, record) in &work.changes {
            self.apply(stored_key, record.as_ref())?;
        }
        journal.retain_in(..work.retire_below, |_, _| false)?;
        self.meta.insert(META_LAST_TOKEN, token)?;
        Ok(())
    }
}

/// One write transaction as the engine sees it: reads see the tables, the overlay and this
/// transaction's own changes; changes go to one journal entry, appended when it commits.
pub(crate) struct Writer<'t> {
    tables: Tables<'t>,
    journal: Table<'t, u64, &'static [u8]>,
    overlay: &'t RwLock<Overlay>,
    /// This transaction's changes by key, and the keys in the order first changed.
    pending: HashMap<Vec<u8>, Option<Record>>,
    order: Vec<Vec<u8>>,
    /// The last fencing token issued, this transaction's included.
    token: u64,
    /// What this transaction merged, for the overlay to forget once it commits.
    merge: Option<Merge>,
    /// Runs just before the commit's fsync, if it has one.
    before_sync: Option<BeforeSync>,
}

impl Writer<'_> {
    /// Has `hook` run just before this transaction's commit reaches its fsync, with how long
    /// recent fsyncs took. It does not run if the commit has no fsync or fails before it.
    pub(crate) fn before_sync(&mut self, hook: BeforeSync) {
        self.before_sync = Some(hook);
    }

    /// The key's record as this transaction sees it.
    pub(crate) fn load(&self, stored_key: &[u8]) -> Result<Loaded> {
        if let Some(record) = self.pending.get(stored_key) {
            return Ok(record.clone().map(Ok));
        }
        if let Some(record) = self.overlay.read().get(stored_key) {
            return Ok(record.map(Ok));
        }
        load(&self.tables.records, stored_key)
    }

    /// Makes `record` the key's record.
    pub(crate) fn put(&mut self, stored_key: &[u8], record: Record) {
        self.change(stored_key, Some(record));
    }

    /// Removes the key's record, damaged or not.
    pub(crate) fn delete(&mut self, stored_key: &[u8]) {
        self.change(stored_key, None);
    }

    fn change(&mut self, stored_key: &[u8], record: Option<Record>) {
        if self.pending.insert(stored_key.to_vec(), record).is_none() {
            self.order.push(stored_key.to_vec());
        }
    }

    /// Moves the oldest changes waiting in the overlay (about `limit` keys; all if `None`) into
    /// the tables. Runs in a transaction of its own, before any change of its own.
    pub(crate) fn merge(&mut self, limit: Option<usize>) -> Result<()> {
        debug_assert!(self.pending.is_empty() && self.merge.is_none());
        let Some(work) = self.overlay.read().merge(limit) else {
            return Ok(());
        };
        self.tables.merge(&mut self.journal, &work, self.token)?;
        self.merge = Some(work);
        Ok(())
    }

    /// Removes up to `limit` records due at `now`. Returns how many were removed and whether
    /// more are due.
    ///
    /// It sweeps the tables. Records still in the journal reach the index only once merged,
    /// so a `thorough` sweep, or one that finds a due record waiting there, merges everything
    /// first. Otherwise it leaves the journal alone: removing a table record that the journal
    /// has since replaced is safe, since reads and the later merge both take the journal's
    /// version, and the merge finds no old record to unindex.
    ///
    /// The index entry is only a pointer: a record is removed only if it decodes and is itself
    /// due under the index entry's time. A damaged or stray index entry (one that names a live
    /// record, a damaged one, or none) is dropped and its record left alone, so that damage in
    /// the index can never delete a live completed record.
    pub(crate) fn sweep(
        &mut self,
        now: u64,
        limit: usize,
        thorough: bool,
    ) -> Result<(usize, usize, bool)> {
        if thorough || self.overlay.read().has_due(now) {
            self.merge(None)?;
        }
        let tables = &mut self.tables;
        let mut due = Vec::new();
        for entry in tables
            .expiry
            .range(due_range(now))?
            .take(limit.saturating_add(1))
        {
            let (index_key, _) = entry?;
            let (expires_at, key) = index_key.value();
            due.push((expires_at, key.to_vec()));
        }
        let more = due.len() > limit;
        due.truncate(limit);
        let mut removed = 0;
        let mut removed_in_progress = 0;
        for (expires_at, key) in &due {
            tables.expiry.remove((*expires_at, key.as_slice()))?;
            let due = match load(&tables.records, key)? {
                Some(Ok(record)) if record.expires_at == *expires_at && !record.is_live(now) => {
                    Some(record.is_in_progress())
                }
                _ => None,
            };
            if let Some(in_progress) = due {
                tables.records.remove(key.as_slice())?;
                removed += 1;
                removed_in_progress += usize::from(in_progress);
            }
        }
        Ok((removed, removed_in_progress, more))
    }

    /// The last fencing token issued.
    pub(crate) fn last_token(&self) -> u64 {
        self.token
    }

    pub(crate) fn set_last_token(&mut self, token: u64) {
        self.token = token;
    }

    /// Appends this transaction's changes to the journal, as entries of about a page each
    /// (a larger value would need contiguous pages, which fragments the file); returns each
    /// entry's sequence number and changes, for the overlay.
    fn append(&mut self, first_token: u64) -> Result<Vec<(u64, Changes)>> {
        if self.order.is_empty() && self.token == first_token {
            return Ok(Vec::new());
        }
        let mut entries: Vec<(u64, Changes)> = Vec::new();
        let mut seq = self.overlay.read().next_seq();
        let mut current: Changes = Vec::new();
        let mut size = 0usize;
        for key in std::mem::take(&mut self.order) {
            let record = self.pending.remove(&key).flatten();
            let weight = journal::weight(&key, record.as_ref());
            if !current.is_empty() && size.saturating_add(weight) > journal::ENTRY_BYTES {
                entries.push((seq, std::mem::take(&mut current)));
                seq = seq.saturating_add(1);
                size = 0;
            }
            size = size.saturating_add(weight);
            current.push((key, record));
        }
        // Also when nothing but the token changed: the entry carries it.
        entries.push((seq, current));
        for (seq, changes) in &entries {
            self.journal
                .insert(*seq, journal::encode(self.token, changes).as_slice())?;
        }
        Ok(entries)
    }
}

/// Counts of records and of those due at `now`, for `stats()` and `len()`: the tables', with
/// the overlay's changes applied.
pub(crate) fn count(txn: &ReadTransaction, pending: &Pending, now: u64) -> Result<(u64, u64)> {
    let table = txn.open_table(RECORDS)?;
    let mut records = table.len()?;
    let expiry = txn.open_table(EXPIRY)?;
    let mut due = 0u64;
    for entry in expiry.range(due_range(now))? {
        entry?;
        due += 1;
    }
    for (stored_key, latest) in pending {
        // Take the table's record out of the counts (a damaged one counts as not due, as its
        // time cannot be trusted), then put the latest one in.
        match load(&table, stored_key)? {
            Some(Ok(old)) => {
                records = records.saturating_sub(1);
                if !old.is_live(now) {
                    due = due.saturating_sub(1);
                }
            }
            Some(Err(_)) => records = records.saturating_sub(1),
            None => {}
        }
        if let Some(record) = latest {
            records += 1;
            if !record.is_live(now) {
                due += 1;
            }
        }
    }
    Ok((records, due))
}

/// How many records are claims in progress, the journal's pending records counted in place
/// of the tables' (a damaged record counts as not in progress). Reads every record.
pub(crate) fn count_in_progress(txn: &ReadTransaction, pending: &Pending) -> Result<u64> {
    let table = txn.open_table(RECORDS)?;
    let mut in_progress = 0u64;
    for row in table.iter()? {
        let (key, value) = row?;
        if pending.contains_key(key.value()) {
            continue;
        }
        if crate::record::decode(key.value(), value.value()).is_ok_and(|r| r.is_in_progress()) {
            in_progress += 1;
        }
    }
    for latest in pending.values() {
        if latest.as_ref().is_some_and(Record::is_in_progress) {
            in_progress += 1;
        }
    }
    Ok(in_progress)
}

/// Checks that every record decodes and that records and expiry index agree.
/// A record the journal has replaced since (`pending`) is counted but not decoded: `expire`
/// may have replaced it because it was damaged.
pub(crate) fn check_tables(txn: &ReadTransaction, pending: &Pending) -> Result<(u64, u64)> {
    let records = txn.open_table(RECORDS)?;
    let expiry = txn.open_table(EXPIRY)?;
    let mut record_count = 0u64;
    for entry in records.iter()? {
        let (key, value) = entry?;
        let stored_key = key.value();
        if pending.contains_key(stored_key) {
            record_count += 1;
            continue;
        }
        let record = record::decode(stored_key, value.value()).map_err(|err| Error::Corrupt {
            key: crate::Key::new(stored_key.get(1..).unwrap_or_default()),
            reason: err.0,
        })?;
        if expiry.get((record.expires_at, stored_key))?.is_none() {
            return Err(Error::CorruptFile {
                reason: format!(
                    "the record for key {} has no expiry index entry",
                    crate::Key::new(stored_key.get(1..).unwrap_or_default())
                ),
            });
        }
        record_count += 1;
    }
    let index_count = expiry.len()?;
    if index_count != record_count {
        return Err(Error::CorruptFile {
            reason: format!(
                "the expiry index has {index_count} entries for {record_count} records"
            ),
        });
    }
    Ok((record_count, index_count))
}
