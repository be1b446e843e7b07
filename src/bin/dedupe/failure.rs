//! Why a dedupe command stops: an exit code and one line for stderr saying what failed, on
//! which file, and what to do about it.

use dedupe_store::{DatabaseErrorKind, Error};

/// Exit status of the readers and maintenance commands for a store error.
pub const STORE_ERROR: u8 = 1;
/// Exit status for bad arguments (clap uses it too).
pub const USAGE: u8 = 2;
/// Exit status of `run` when the key was claimed with another fingerprint (sysexits'
/// EX_DATAERR).
pub const MISMATCH: u8 = 65;
/// Exit status of `mark` on a store error, and of `run` on a store error before CMD ran
/// (sysexits' EX_IOERR): a script never reads a failure as "already seen", nor as a CMD that
/// exited 1.
pub const IO_ERROR: u8 = 74;
/// Exit status of `run`, `mark` and `filter` when the store holds its budget of keys (`--max-keys`) and
/// takes no new one until keys expire (sysexits' EX_UNAVAILABLE).
pub const KEY_BUDGET: u8 = 69;
/// Exit status when dedupe itself has a bug (sysexits' EX_SOFTWARE).
pub const INTERNAL_ERROR: u8 = 70;
/// Exit status of `run` when CMD ran but neither its outcome nor its exit status could be
/// stored (sysexits' EX_CANTCREAT): the key stays claimed until its lease runs out, and then
/// runs again.
pub const NOT_RECORDED: u8 = 73;
/// Exit status of `run` while another run holds the key (sysexits' EX_TEMPFAIL).
pub const BUSY: u8 = 75;
/// Exit status of `run` when CMD exists but cannot be executed, as in a shell.
pub const NOT_EXECUTABLE: u8 = 126;
/// Exit status of `run` when CMD is not found, as in a shell.
pub const NOT_FOUND: u8 = 127;

/// A command that stopped early, with its exit code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The process's exit status.
    pub code: u8,
    /// One line, without the `dedupe: ` prefix.
    pub message: String,
}

impl Failure {
    /// A failure with this exit code and message.
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// The same failure with the exit code `code` when it is a store error (exit
    /// [`STORE_ERROR`]); other failures keep theirs.
    pub fn store_code(self, code: u8) -> Failure {
        if self.code == STORE_ERROR {
            Failure { code, ..self }
        } else {
            self
        }
    }

    /// A store error met while `doing` something on `db` (a file's path or a database's URL,
    /// password hidden), with advice that fits the error.
    pub fn store(err: &Error, db: &str, doing: &str) -> Failure {
        let message = match err {
            Error::AlreadyOpen { .. } => format!(
                "{doing}: {db} is held by another process; retry later or raise --lock-timeout \
                 (a program using the dedupe-store library holds its file for as long as it runs)"
            ),
            Error::Io { .. } => format!(
                "{doing}: {err}; check the path and its permissions, or choose another file \
                 with --db or DEDUPE_DB"
            ),
            Error::NotAStore { .. } => format!(
                "{doing}: {db} is not a dedupe store file (nothing was changed); point --db or \
                 DEDUPE_DB at a dedupe store file"
            ),
            Error::UnsupportedFormat { .. } => format!(
                "{doing}: {db}: {err}; use the dedupe version that wrote the file (nothing was \
                 changed)"
            ),
            Error::CorruptFile { .. } => format!(
                "{doing}: {db}: {err}; run `dedupe --db {db} verify`, and restore the file from \
                 a backup if it fails"
            ),
            Error::KeyBudgetExhausted { .. } => {
                return Failure::new(
                    KEY_BUDGET,
                    format!(
                        "{doing}: {db}: {err}; nothing was recorded: run `dedupe --db {db} \
                         sweep` to remove expired keys, or raise --max-keys"
                    ),
                );
            }
            Error::Corrupt { key, .. } => format!(
                "{doing}: {db}: {err}; `dedupe --db {db} expire {key}` removes the damaged record"
            ),
            // A mistyped schema, refused as a missing file is.
            Error::Database {
                kind: DatabaseErrorKind::SchemaMissing,
                ..
            } => format!(
                "{doing}: {db}: {err}; check --pg-schema or DEDUPE_PG_SCHEMA (only `run`, `mark` \
                 and `filter` create a store; nothing was changed)"
            ),
            // Before the storage arm: a database is not a disk, and a lost connection may
            // have cut a commit short (such a call was not acknowledged).
            Error::Database { .. } => format!(
                "{doing}: {db}: {err}; check that the server is up and reachable and the URL's \
                 database, user and password, and the role's privileges, then retry"
            ),
            err if err.is_storage() => format!(
                "{doing}: {db}: {err}; check free disk space and the file's permissions, then \
                 retry (nothing was recorded)"
            ),
            other => format!("{doing}: {db}: {other}"),
        };
        Failure::new(STORE_ERROR, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_are_one_line_naming_the_file_and_a_remedy() {
        let db = "/var/lib/jobs.redb";
        let errors = [
            Error::AlreadyOpen { path: db.into() },
            Error::NotAStore { path: db.into() },
            Error::UnsupportedFormat {
                found: 9,
                supported: 1,
            },
            Error::CorruptFile {
                reason: "bad page".into(),
            },
        ];
        for err in errors {
            let failure = Failure::store(&err, db, "cannot claim key \"k\"");
            assert_eq!(failure.code, STORE_ERROR);
            assert!(!failure.message.contains('\n'), "{}", failure.message);
            assert!(failure.message.contains("/var/lib/jobs.redb"));
            assert!(failure.message.contains("; "), "{}", failure.message);
        }
    }
}
