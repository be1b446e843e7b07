//! Opening the store file for one step at a time, and waiting politely for other processes.
//!
//! # Why dedupe never keeps the file open while CMD runs
//!
//! A store holds an exclusive lock on its file for as long as it is open, and a second open
//! fails at once with `AlreadyOpen`. A `dedupe run` that opened the store and kept it for the
//! whole of CMD would make every other dedupe on the file fail (or wait) for minutes or hours,
//! which defeats the point: the other runs must learn *at once* that the key is taken (exit 75)
//! or replay a finished outcome, and runs of other keys must proceed.
//!
//! So each step that touches the file (the claim, each heartbeat's lease extension, the final
//! complete or release, a reader's query) opens the store, does its one operation, and closes
//! it, releasing the lock within milliseconds. That is sound because everything a run needs
//! between steps lives in the file or in its [`Ticket`](dedupe_store::Ticket): tickets carry
//! the file's persisted store id and their fencing token, so a ticket stays valid across a close
//! and reopen of the same file, and the key's ownership is the lease, not the open handle. A
//! dedupe killed between steps holds no lock at all (the kernel drops a dead process's lock);
//! its lease simply runs out and the next run takes over.
//!
//! When another process holds the file for its moment, opening fails with `AlreadyOpen`; we
//! retry with exponential backoff (from 2 ms, doubling up to 100 ms) and jitter (each sleep is
//! a random point in the upper half of the step, so processes that collided once do not
//! collide again in lockstep), up to `--lock-timeout`. Only a holder that keeps the file for
//! longer than that, such as a long-running program that links the library, turns into a
//! store error.
//!
//! A store on PostgreSQL (`--db postgres://...`) is opened the same way, step by step, with the
//! same settings: there is no file lock to wait for (the database serves every process at
//! once), and readers open it as writers do, since reading it changes nothing. The wait that
//! `--lock-timeout` bounds is then the server's: each connection attempt of a step gives up
//! after it (replacing the URL's `connect_timeout`).

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use dedupe_store::{DEFAULT_MAX_RESPONSE_BYTES, Error, Store, StoreBuilder};

use crate::failure::{Failure, STORE_ERROR};
use crate::location::Location;
use crate::read_only::ReadOnlyFile;

const FIRST_BACKOFF: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// How a command may use the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `run`, `mark` and `filter` start a store where there was none (a missing or empty
    /// file).
    Create,
    /// Maintenance changes an existing store, and refuses a missing or empty file rather than
    /// make a store of a mistyped `--db`.
    Existing,
    /// Readers read an existing store through [`ReadOnlyFile`]: a file they may only read is
    /// enough, and nothing they do changes it.
    ReadOnly,
}

/// The store (a file, or a PostgreSQL database) and how to open it.
#[derive(Debug, Clone)]
pub struct StoreFile {
    location: Location,
    lock_timeout: Duration,
    max_response_bytes: usize,
    max_keys: Option<u64>,
    access: Access,
}

impl StoreFile {
    /// The store at `location`, waiting up to `lock_timeout` for other holders of a file.
    pub fn new(location: Location, lock_timeout: Duration, access: Access) -> StoreFile {
        StoreFile {
            location,
            lock_timeout,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_keys: None,
            access,
        }
    }

    /// The store's key budget (`--max-keys`), if any.
    pub fn max_keys(mut self, max_keys: Option<u64>) -> StoreFile {
        self.max_keys = max_keys;
        self
    }

    /// The store will accept responses up to this size (a run's encoded outcome).
    pub fn max_response_bytes(mut self, bytes: usize) -> StoreFile {
        self.max_response_bytes = bytes;
        self
    }

    /// The store file's path; `None` for a store on PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        self.location.path()
    }

    /// The store as messages name it (a URL's password hidden).
    pub fn name(&self) -> String {
        self.location.name()
    }

    /// Opens the store, runs `step` on it and closes it, releasing the file for others. `doing`
    /// names the step in an error message ("cannot claim key \"k\"").
    pub fn with<T>(
        &self,
        doing: &str,
        step: impl FnOnce(&Store) -> dedupe_store::Result<T>,
    ) -> Result<T, Failure> {
        self.with_timeout(self.lock_timeout, doing, step)
    }

    /// [`StoreFile::with`], giving up on a held file after `timeout` instead of
    /// `--lock-timeout`.
    pub fn with_timeout<T>(
        &self,
        timeout: Duration,
        doing: &str,
        step: impl FnOnce(&Store) -> dedupe_store::Result<T>,
    ) -> Result<T, Failure> {
        let store = self.open(timeout, doing)?;
        let result = step(&store);
        let closed = store.close();
        let value = result.map_err(|err| self.failure(&err, doing))?;
        closed.map_err(|err| self.failure(&err, doing))?;
        Ok(value)
    }

    /// The failure for a store error met while `doing` something.
    pub fn failure(&self, err: &Error, doing: &str) -> Failure {
        Failure::store(err, &self.name(), doing)
    }

    /// The builder with the settings every open uses, file or database.
    fn builder(&self) -> StoreBuilder {
        let builder = Store::builder()
            // A dedupe process holds the store for milliseconds: a background sweeper would
            // never get to run. `run` sweeps after each command instead.
            .without_sweeper()
            .max_response_bytes(self.max_response_bytes);
        match self.max_keys {
            Some(max_keys) => builder.max_keys(max_keys),
            None => builder,
        }
    }

    fn open(&self, timeout: Duration, doing: &str) -> Result<Store, Failure> {
        // Without feature `postgres` a file is the only location.
        #[cfg_attr(
            not(feature = "postgres"),
            allow(clippy::infallible_destructuring_match)
        )]
        let path = match &self.location {
            Location::File(path) => path,
            #[cfg(feature = "postgres")]
            Location::Postgres { url, schema } => {
                // Connections are made as calls need them: a step makes one or two, each
                // given the step's timeout (a heartbeat's is a third of the lease, so a beat
                // that cannot connect leaves time for the next). Only the commands that make a
                // store of a missing file make one in a missing schema.
                return self
                    .builder()
                    .postgres_schema(schema.clone())
                    .postgres_connect_timeout(timeout)
                    .postgres_create_schema(self.access == Access::Create)
                    .open_postgres(url)
                    .map_err(|err| self.failure(&err, doing));
            }
        };
        if self.access != Access::Create {
            self.existing(path, doing)?;
        }
        let deadline = Instant::now() + timeout;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let builder = self.builder();
            let opened = match self.access {
                Access::ReadOnly => File::open(path)
                    .and_then(ReadOnlyFile::new)
                    .map_err(|err| Error::Io {
                        path: path.to_path_buf(),
                        action: "open",
                        source: Arc::new(err),
                    })
                    .and_then(|file| builder.open_backend(file)),
                Access::Create | Access::Existing => builder.open(path),
            };
            match opened {
                Err(Error::AlreadyOpen { .. }) if Instant::now() < deadline => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    thread::sleep(jittered(backoff).min(left));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(Error::AlreadyOpen { .. }) => {
                    return Err(Failure::new(
                        STORE_ERROR,
                        format!(
                            "{doing}: {} was held by another process for more than {}; retry \
                             later or raise --lock-timeout (a program using the dedupe-store \
                             library holds its file for as long as it runs)",
                            path.display(),
                            humantime::format_duration(timeout)
                        ),
                    ));
                }
                Err(err) => return Err(self.failure(&err, doing)),
                Ok(store) => return Ok(store),
            }
        }
    }
}

impl StoreFile {
    /// Refuses a missing or empty file: only `run`, `mark` and `filter` make a store of one.
    fn existing(&self, path: &Path, doing: &str) -> Result<(), Failure> {
        let refuse = |what: &str| {
            Err(Failure::new(
                STORE_ERROR,
                format!(
                    "{doing}: {} {what}; check --db or DEDUPE_DB (only `run`, `mark` and \
                     `filter` create a store; nothing was changed)",
                    path.display()
                ),
            ))
        };
        match std::fs::metadata(path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => refuse("does not exist"),
            Ok(meta) if meta.is_file() && meta.len() == 0 => refuse("is empty, not a dedupe store"),
            // Anything else (a directory, an unreadable file) is left to the open, whose error
            // says what is wrong.
            _ => Ok(()),
        }
    }
}

/// A random point in the upper half of `step`.
pub fn jittered(step: Duration) -> Duration {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    let half = step / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX).max(1);
    half + Duration::from_nanos(hasher.finish() % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_the_upper_half() {
        for _ in 0..1000 {
            let sleep = jittered(Duration::from_millis(100));
            assert!(sleep >= Duration::from_millis(50) && sleep < Duration::from_millis(100));
        }
    }
}
