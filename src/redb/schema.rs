//! The file's tables and meta table: their definitions, opening a file and checking its format
//! before anything is written, initialising a new one, and recovering the last token and the
//! journal at open.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};

use super::codec::RECORD_VERSION;
use crate::error::{Error, Result};
use crate::redb::backend::SharedBackend;
use crate::redb::guard::guarded;
use crate::redb::journal::{self, Overlay};

/// Records by stored key (namespace tag + key): the envelope bytes.
pub(crate) const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");

/// The expiry index: `(expires_at, stored key)` for every record, so the sweeper reads only
/// what is due.
pub(crate) const EXPIRY: TableDefinition<(u64, &[u8]), ()> = TableDefinition::new("expiry");

/// Format version, store id, last fencing token.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Group commits not yet merged into the tables, by sequence number (see
/// [`crate::redb::journal`]).
pub(crate) const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");

pub(super) const META_FORMAT_VERSION: &str = "format_version";

pub(super) const META_STORE_ID: &str = "store_id";

pub(super) const META_LAST_TOKEN: &str = "last_token";

/// The on-disk format version this build reads and writes.
pub const FORMAT_VERSION: u32 = RECORD_VERSION as u32;

pub(super) fn open_error(err: DatabaseError, location: &Location) -> Error {
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

pub(super) fn open_database(
    backend: &SharedBackend,
    location: &Location,
    cache_size: usize,
) -> Result<Database> {
    guarded("opening the file", || {
        open_database_unguarded(backend, location, cache_size)
    })
}

pub(super) fn open_database_unguarded(
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
pub(super) fn check_before_writing(
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
pub(super) fn init_or_check(db: &Database, location: &Location) -> Result<u64> {
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

pub(super) fn check_meta(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64> {
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
pub(super) fn random_id() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Reads what the journal holds (the file was not closed cleanly) into a fresh overlay, so that
/// reads see it at once and the next merge moves it into the tables; returns it with the
/// last fencing token issued. A file closed cleanly has an empty journal.
pub(super) fn recover(db: &Database) -> Result<(u64, Overlay)> {
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

pub(super) fn last_token(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64> {
    match meta.get(META_LAST_TOKEN)? {
        Some(token) => Ok(token.value()),
        None => Err(Error::CorruptFile {
            reason: format!("the meta table has no {META_LAST_TOKEN}"),
        }),
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
