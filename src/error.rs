//! The one error type of the crate.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::key::Key;

/// What can go wrong in a [`Store`](crate::Store) call.
///
/// Every variant names something a caller can act on. Errors are cheap to clone (a failed group
/// commit hands the same storage error to every caller of the batch) and keep their cause in
/// [`std::error::Error::source`].
///
/// ```
/// use dedupe_store::{Error, Store};
///
/// let store = Store::in_memory()?;
/// match store.claim("") {
///     Err(Error::EmptyKey) => {}
///     other => panic!("expected EmptyKey, got {other:?}"),
/// }
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another process, or another open [`Store`](crate::Store) in this process, holds the file.
    #[error("{} is already open by another store or process", path.display())]
    AlreadyOpen {
        /// The file that could not be locked.
        path: PathBuf,
    },

    /// The stored record for `key` failed its checksum or did not decode. The record is left
    /// as it is; [`Store::expire`](crate::Store::expire) removes it.
    #[error("the record for key {key} is corrupt: {reason}")]
    Corrupt {
        /// The key whose record is damaged.
        key: Key,
        /// What was wrong with it.
        reason: String,
    },

    /// The file itself is damaged beyond what redb could repair (a page checksum failed, or a
    /// table is missing or malformed).
    #[error("the store file is corrupt: {reason}")]
    CorruptFile {
        /// What redb or the store found.
        reason: String,
    },

    /// The ticket no longer owns its key: the claim was taken over, released, completed,
    /// expired or swept. Nothing was changed.
    #[error("the ticket for key {key} (fencing token {fencing_token}) no longer owns it")]
    LeaseLost {
        /// The ticket's key.
        key: Key,
        /// The ticket's fencing token.
        fencing_token: u64,
    },

    /// Keys must be at least one byte long.
    #[error("a key must not be empty")]
    EmptyKey,

    /// The key is longer than [`MAX_KEY_LEN`](crate::MAX_KEY_LEN).
    #[error("the key is {len} bytes long, over the limit of {max}")]
    KeyTooLarge {
        /// The key's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// The response is longer than the store's configured maximum
    /// ([`StoreBuilder::max_response_bytes`](crate::StoreBuilder::max_response_bytes)).
    #[error("the response is {len} bytes long, over the limit of {max}")]
    ResponseTooLarge {
        /// The response's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// The request fingerprint is longer than
    /// [`MAX_FINGERPRINT_LEN`](crate::MAX_FINGERPRINT_LEN); pass a digest of the request instead.
    #[error("the fingerprint is {len} bytes long, over the limit of {max}")]
    FingerprintTooLarge {
        /// The fingerprint's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// A checkpoint's step name is longer than [`MAX_STEP_LEN`](crate::MAX_STEP_LEN) or its
    /// state is larger than [`MAX_CHECKPOINT_STATE`](crate::MAX_CHECKPOINT_STATE).
    #[error("the checkpoint is {len} bytes long, over the limit of {max}")]
    CheckpointTooLarge {
        /// The step name's or the state's length in bytes.
        len: usize,
        /// The limit it broke.
        max: usize,
    },

    /// A TTL, lease or interval is zero, too large, or would overflow the clock.
    #[error("invalid {what}: {reason}")]
    InvalidDuration {
        /// Which duration: `"ttl"`, `"lease"`, `"sweep interval"`…
        what: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A builder setting other than a duration is out of range.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong with it.
        reason: String,
    },

    /// The ticket was issued by a different store file.
    #[error("the ticket for key {key} was issued by another store")]
    ForeignTicket {
        /// The ticket's key.
        key: Key,
    },

    /// The file was written by a format version this build does not read. Nothing was changed.
    #[error("the store file has format version {found}; this build reads version {supported}")]
    UnsupportedFormat {
        /// The version found in the file.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },

    /// The file is not a dedupe store: a redb database of another program (it has other
    /// tables and none of ours), or not a redb file at all. Nothing was changed.
    #[error("{} is not a dedupe store file", path.display())]
    NotAStore {
        /// The file.
        path: PathBuf,
    },

    /// A claim, mark or new sequence would store one more key, and the store already holds
    /// its budget of keys ([`StoreBuilder::max_keys`](crate::StoreBuilder::max_keys)). Nothing
    /// was changed. Keys that are stored already go on working (replays, completes, releases);
    /// room comes back as keys expire and the sweeper removes them, so retry later.
    #[error("the store holds its budget of {max_keys} keys; retry once keys have expired")]
    KeyBudgetExhausted {
        /// The budget: the most keys, live or expired but not yet swept, the store holds.
        max_keys: u64,
    },

    /// The store was closed with [`Store::close`](crate::Store::close).
    #[error("the store is closed")]
    Closed,

    /// An operation on the file itself failed: opening or creating it, reading its first
    /// bytes, locking it, or releasing its lock at close. `action` says which.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// The file (`<memory>` or `<backend>` for a store that has none).
        path: PathBuf,
        /// What was being done to the file, as it reads after "cannot": `"open"`, `"read"`,
        /// `"lock"`, `"release the lock on"`…
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },

    /// A background thread of the store could not be started (the system is out of threads
    /// or memory). Nothing was opened.
    #[error("cannot start the {thread} thread: {source}")]
    ThreadStart {
        /// Which thread.
        thread: &'static str,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },

    /// A commit panicked inside the storage engine. None of its writes were acknowledged; the
    /// store reopens its file and keeps serving.
    #[error("a commit panicked in the storage engine; none of its writes were acknowledged")]
    CommitPanicked,

    /// The storage engine failed: an I/O error, a full disk, an aborted commit. Nothing in the
    /// failed call was acknowledged; the store reopens its file and keeps serving.
    #[error("storage error: {0}")]
    Storage(#[source] StorageError),

    /// A PostgreSQL-backed store could not do what the call needed: the server could not be
    /// reached or refused us, the connection was lost, or its schema is not one this build can
    /// use. `kind` says which, so a caller can tell a retryable failure from a configuration
    /// one; `message` carries the server's or the client's own words.
    #[error("cannot {action}: {kind}: {message}")]
    Database {
        /// What was being done, as it reads after "cannot": `"connect to the database"`,
        /// `"open the schema"`…
        action: &'static str,
        /// What went wrong, in a form a caller can match on.
        kind: DatabaseErrorKind,
        /// The server's or the client's description of the failure.
        message: String,
        /// The client library's error, when there was one.
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
}

/// What went wrong in an [`Error::Database`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatabaseErrorKind {
    /// The server could not be reached: nothing listens at the address, the host is unknown,
    /// the connection timed out, the server is starting up, or the database does not exist.
    /// Retrying later may succeed.
    Connect,
    /// The server refused the credentials: a wrong password or an unknown role.
    Authentication,
    /// An established connection closed under a call (the server shut down or restarted, the
    /// network dropped). The call's outcome is unknown; the next call reconnects.
    ConnectionLost,
    /// The role lacks a privilege the store needs: creating its schema or tables, or using a
    /// schema another role owns.
    Permission,
    /// The schema was written by a newer version of this crate. Nothing was changed.
    SchemaTooNew {
        /// The version found in the schema's `meta` table.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The schema's tables exist but do not have the columns this build expects (another
    /// program's tables under the same schema name, or a damaged schema). Nothing was changed.
    SchemaShape,
    /// The schema holds no store, and the store was opened with
    /// [`postgres_create_schema(false)`](crate::StoreBuilder::postgres_create_schema) (a
    /// mistyped schema name, say). Nothing was created.
    SchemaMissing,
    /// Any other failure the server or the client reported.
    Other,
}

impl fmt::Display for DatabaseErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseErrorKind::Connect => f.write_str("the server could not be reached"),
            DatabaseErrorKind::Authentication => f.write_str("authentication failed"),
            DatabaseErrorKind::ConnectionLost => {
                f.write_str("the connection to the server was lost")
            }
            DatabaseErrorKind::Permission => f.write_str("permission denied"),
            DatabaseErrorKind::SchemaTooNew { found, supported } => write!(
                f,
                "the schema has version {found}; this build reads version {supported}"
            ),
            DatabaseErrorKind::SchemaShape => {
                f.write_str("the schema's tables do not have the expected shape")
            }
            DatabaseErrorKind::SchemaMissing => f.write_str("the schema holds no dedupe store"),
            DatabaseErrorKind::Other => f.write_str("the database reported an error"),
        }
    }
}

impl Error {
    /// True for errors that come from the disk or the storage engine rather than from the
    /// caller's input or the key's state: retrying later may succeed.
    pub fn is_storage(&self) -> bool {
        matches!(
            self,
            Error::Storage(_)
                | Error::Io { .. }
                | Error::CorruptFile { .. }
                | Error::CommitPanicked
                | Error::Database { .. }
        )
    }
}

/// A failure inside the storage engine (redb), shared by every caller it affected.
///
/// [`source()`](std::error::Error::source) gives the operating system's I/O error when there
/// was one.
#[derive(Clone)]
pub struct StorageError {
    inner: Arc<redb::Error>,
}

impl StorageError {
    /// The I/O error underneath, when the failure was one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self.inner.as_ref() {
            redb::Error::Io(err) => Some(err),
            _ => None,
        }
    }

    /// True when the underlying failure is an I/O error.
    pub fn is_io(&self) -> bool {
        matches!(
            self.inner.as_ref(),
            redb::Error::Io(_) | redb::Error::PreviousIo
        )
    }
}

impl fmt::Debug for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // redb's own error does not expose its I/O cause; keep it reachable here.
        self.io_error()
            .map(|err| err as &(dyn std::error::Error + 'static))
    }
}

impl From<redb::Error> for Error {
    fn from(err: redb::Error) -> Self {
        match err {
            redb::Error::Corrupted(reason) => Error::CorruptFile { reason },
            redb::Error::DatabaseClosed => Error::Closed,
            other => Error::Storage(StorageError {
                inner: Arc::new(other),
            }),
        }
    }
}

macro_rules! from_redb {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Error {
            fn from(err: $ty) -> Self {
                Error::from(redb::Error::from(err))
            }
        }
    )*};
}

from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::CompactionError,
    redb::SetDurabilityError
);

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn storage_error_keeps_the_io_source() {
        let err = Error::from(redb::Error::Io(io::Error::other("disk on fire")));
        let source = err.source().expect("storage error has a source");
        let io = source
            .source()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .expect("the io error is reachable");
        assert_eq!(io.to_string(), "disk on fire");
        assert!(err.is_storage());
    }

    #[test]
    fn io_errors_say_what_was_being_done_and_keep_their_source() {
        for (action, text) in [
            ("open", "cannot open /data/s.redb: denied"),
            ("read", "cannot read /data/s.redb: denied"),
            ("lock", "cannot lock /data/s.redb: denied"),
            (
                "release the lock on",
                "cannot release the lock on /data/s.redb: denied",
            ),
        ] {
            let err = Error::Io {
                path: PathBuf::from("/data/s.redb"),
                action,
                source: Arc::new(io::Error::other("denied")),
            };
            assert_eq!(err.to_string(), text);
            assert_eq!(
                err.source().map(ToString::to_string).as_deref(),
                Some("denied")
            );
            assert!(err.is_storage());
        }
    }

    #[test]
    fn thread_and_commit_failures_are_not_reported_as_io() {
        let err = Error::ThreadStart {
            thread: "sweeper",
            source: Arc::new(io::Error::other("no threads left")),
        };
        assert_eq!(
            err.to_string(),
            "cannot start the sweeper thread: no threads left"
        );
        assert!(err.source().is_some());
        assert!(!err.is_storage());
        let err = Error::CommitPanicked;
        assert!(err.to_string().contains("commit panicked"), "{err}");
        assert!(!err.to_string().contains("I/O"), "{err}");
        assert!(err.is_storage());
    }

    #[test]
    fn database_errors_say_what_failed_and_keep_their_source() {
        let err = Error::Database {
            action: "open the schema",
            kind: DatabaseErrorKind::SchemaTooNew {
                found: 2,
                supported: 1,
            },
            message: "dedupe.meta says version 2".to_string(),
            source: None,
        };
        assert_eq!(
            err.to_string(),
            "cannot open the schema: the schema has version 2; this build reads version 1: \
             dedupe.meta says version 2"
        );
        assert!(err.source().is_none());
        assert!(err.is_storage());
        let err = Error::Database {
            action: "connect to the database",
            kind: DatabaseErrorKind::Connect,
            message: "refused".to_string(),
            source: Some(Arc::new(io::Error::other("refused"))),
        };
        assert!(err.to_string().contains("could not be reached"), "{err}");
        assert_eq!(
            err.source().map(ToString::to_string).as_deref(),
            Some("refused")
        );
    }

    #[test]
    fn redb_corruption_is_a_corrupt_file() {
        let err = Error::from(redb::Error::Corrupted("bad page".into()));
        assert!(matches!(err, Error::CorruptFile { ref reason } if reason == "bad page"));
    }
}
