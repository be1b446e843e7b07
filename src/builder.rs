//! [`StoreBuilder`]: every setting of a store, with its default, validated once in `open`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "postgres")]
mod postgres;

use redb::StorageBackend;
use redb::backends::{FileBackend, InMemoryBackend};

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Durability};
use crate::error::{Error, Result};
use crate::limits::{
    self, DEFAULT_MAX_RESPONSE_BYTES, MAX_RESPONSE_BYTES_LIMIT, MAX_SWEEP_BATCH_SIZE,
};
use crate::redb::file::{self, DEFAULT_FILE_MODE};
use crate::redb::schema::Location;
use crate::store::Store;

/// Builds a [`Store`]. Every setter states its default.
///
/// ```
/// use std::time::Duration;
/// use dedupe_store::{Durability, Store};
///
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("dedupe.redb");
/// let store = Store::builder()
///     .ttl(Duration::from_secs(24 * 3600))
///     .lease(Duration::from_secs(30))
///     .sweep_interval(Duration::from_secs(10))
///     .durability(Durability::Immediate)
///     .open(&path)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "a builder does nothing until open() or in_memory()"]
pub struct StoreBuilder {
    ttl: Duration,
    lease: Duration,
    sweep_interval: Option<Duration>,
    sweep_batch: usize,
    max_response_bytes: usize,
    /// `None`: the system clock, or over PostgreSQL the server's.
    clock: Option<Arc<dyn Clock>>,
    durability: Durability,
    quick_repair: bool,
    cache_size: usize,
    max_keys: Option<u64>,
    file_mode: u32,
    #[cfg(feature = "postgres")]
    postgres: postgres::PostgresSettings,
}

impl Default for StoreBuilder {
    fn default() -> Self {
        StoreBuilder {
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30),
            sweep_interval: Some(Duration::from_secs(1)),
            sweep_batch: 256,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            clock: None,
            durability: Durability::Immediate,
            quick_repair: false,
            cache_size: 64 * 1024 * 1024,
            max_keys: None,
            file_mode: DEFAULT_FILE_MODE,
            #[cfg(feature = "postgres")]
            postgres: postgres::PostgresSettings::default(),
        }
    }
}

impl fmt::Debug for StoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreBuilder")
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("sweep_interval", &self.sweep_interval)
            .field("sweep_batch", &self.sweep_batch)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("durability", &self.durability)
            .field("quick_repair", &self.quick_repair)
            .field("cache_size", &self.cache_size)
            .field("max_keys", &self.max_keys)
            .field("file_mode", &format_args!("{:o}", self.file_mode))
            .finish_non_exhaustive()
    }
}

impl StoreBuilder {
    /// A builder with every default.
    pub fn new() -> StoreBuilder {
        StoreBuilder::default()
    }

    /// How long a key is remembered after it completes (and after it is claimed, if it never
    /// completes). Per call: [`ClaimOptions::ttl`](crate::ClaimOptions::ttl),
    /// [`Store::complete_with_ttl`](crate::Store::complete_with_ttl). Default: 24 hours.
    pub fn ttl(mut self, ttl: Duration) -> StoreBuilder {
        self.ttl = ttl;
        self
    }

    /// How long a claim is owned before another claim may take it over. Per call:
    /// [`ClaimOptions::lease`](crate::ClaimOptions::lease). Default: 30 seconds.
    pub fn lease(mut self, lease: Duration) -> StoreBuilder {
        self.lease = lease;
        self
    }

    /// How often the background sweeper removes expired records. Default: every second.
    ///
    /// While writers are busy the sweeper pauses 40 ms between batches, as long as it still
    /// removes records well ahead of the rate the writers create them, so that claims rarely
    /// share their fsync with a sweep's pages; it sweeps at full speed otherwise.
    /// [`Store::sweep`](crate::Store::sweep) never pauses. The interval is rounded up to whole
    /// milliseconds.
    pub fn sweep_interval(mut self, interval: Duration) -> StoreBuilder {
        self.sweep_interval = Some(interval);
        self
    }

    /// Runs no background sweeper; expired records still behave as absent and
    /// [`Store::sweep`](crate::Store::sweep) removes them on demand. Default: the sweeper runs.
    pub fn without_sweeper(mut self) -> StoreBuilder {
        self.sweep_interval = None;
        self
    }

    /// How many records one sweep transaction removes at most, so a large backlog never holds
    /// the writer for long: 1 to [`MAX_SWEEP_BATCH_SIZE`](crate::MAX_SWEEP_BATCH_SIZE).
    /// Default: 256.
    pub fn sweep_batch_size(mut self, records: usize) -> StoreBuilder {
        self.sweep_batch = records;
        self
    }

    /// The largest response [`Store::complete`](crate::Store::complete) accepts, in bytes, up
    /// to [`MAX_RESPONSE_BYTES_LIMIT`](crate::MAX_RESPONSE_BYTES_LIMIT). Default: 1 MiB.
    pub fn max_response_bytes(mut self, bytes: usize) -> StoreBuilder {
        self.max_response_bytes = bytes;
        self
    }

    /// The clock the store reads. Default: [`SystemClock`]; tests use
    /// [`ManualClock`](crate::ManualClock).
    pub fn clock(mut self, clock: impl Clock) -> StoreBuilder {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// When acknowledged writes reach the disk. Default: [`Durability::Immediate`].
    pub fn durability(mut self, durability: Durability) -> StoreBuilder {
        self.durability = durability;
        self
    }

    /// Whether each durable commit also saves redb's allocator state (redb's "quick repair"),
    /// so that reopening after a crash loads it instead of checking and walking every page of
    /// the file. Default: off.
    ///
    /// With it a commit is two-phase: the pages, an fsync, then the header that names them,
    /// and a second fsync. Without it a commit is one-phase, with one fsync, and the reopen
    /// after a crash walks the file to check the last commit's checksums (rolling back a last
    /// commit that a crash tore, which no caller was told had succeeded) and to rebuild the
    /// allocator. Either way a failed fsync whose writes the kernel forgets cannot damage the
    /// file: the store writes the last synced header back before it goes on.
    ///
    /// So quick repair trades about half the single-thread commit rate (two fsyncs per commit
    /// instead of one) for a restart in milliseconds instead of a walk of the whole file, which
    /// grows with it (about 0.2 s per million keys with the page cache warm, several times that
    /// cold); `BENCHMARKS.md` ("Restart and file size") has the figures. Turn
    /// quick repair on for a large store whose restart time matters more than its commit
    /// rate. It also changes what a damaged file shows: without it redb cannot tell a last
    /// commit torn by a crash from one whose pages were damaged on the disk afterwards, and
    /// rolls both back; with it the damaged file is refused with [`Error::CorruptFile`]. A
    /// clean close needs no repair either way. Under [`Durability::Periodic`] only the
    /// periodic durable commit pays for it. An [in-memory](Self::in_memory) store has no
    /// crash to recover from and ignores it.
    pub fn quick_repair(mut self, enabled: bool) -> StoreBuilder {
        self.quick_repair = enabled;
        self
    }

    /// Memory for redb's page cache, in bytes. Default: 64 MiB.
    pub fn cache_size(mut self, bytes: usize) -> StoreBuilder {
        self.cache_size = bytes;
        self
    }

    /// The most keys the store holds at once: live records, and expired ones the sweeper has
    /// not removed yet. Default: no limit.
    ///
    /// Anyone who can make a program claim keys can make it claim fresh ones, and each is kept
    /// for its whole TTL; without a budget the file grows until the disk is full, and then
    /// every write of every caller fails. At the budget, a claim, [`mark_seen`](Store::mark_seen)
    /// or first [`advance_sequence`](Store::advance_sequence) that would store a new key gets
    /// [`Error::KeyBudgetExhausted`] and changes nothing, while everything about keys already
    /// stored goes on: replays, in-progress answers, completes, releases, extends, checkpoints,
    /// expires, and the sweeper, which makes room again as keys expire. A claim of an expired
    /// key that the sweeper has not removed yet reuses its record and is not refused. A
    /// [`mark_seen_many`](Store::mark_seen_many) batch is all or nothing here too: refused
    /// whole if its new keys do not all fit.
    ///
    /// The budget bounds the file. Each key takes its record (the key, the stored response up
    /// to [`max_response_bytes`](Self::max_response_bytes), and about 100 bytes of metadata)
    /// and its expiry index entry, and the file holds recent records more than once (in the
    /// journal and in the tables, and in pages that copy-on-write has not reused yet). Size
    /// the disk for `max_keys × 4 × (key + response)` plus 1 MiB, and half again under churn:
    /// floods to the budget measured about 400 bytes per key with 100-byte responses, 2.8 KB
    /// with 1 KiB and 61 KB with 16 KiB (`BENCHMARKS.md`).
    ///
    /// ```
    /// use dedupe_store::{Error, Store};
    ///
    /// let store = Store::builder().max_keys(2).in_memory()?;
    /// assert!(store.mark_seen("a")?);
    /// assert!(store.mark_seen("b")?);
    /// assert!(matches!(store.mark_seen("c"), Err(Error::KeyBudgetExhausted { max_keys: 2 })));
    /// assert!(!store.mark_seen("a")?, "keys already stored are still answered");
    /// # Ok::<(), Error>(())
    /// ```
    pub fn max_keys(mut self, max_keys: u64) -> StoreBuilder {
        self.max_keys = Some(max_keys);
        self
    }

    /// The permission bits of a store file that [`open`](Self::open) creates, less the
    /// process umask (Unix only; ignored elsewhere). Default: `0o600`, read and write for the
    /// owner only, since the file holds every stored response. The mode of a file that exists
    /// already is never changed.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// // Readable by the group too, for an operator account that inspects it with `dedupe get`.
    /// let store = dedupe_store::Store::builder().file_mode(0o640).open(dir.path().join("s.redb"))?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn file_mode(mut self, mode: u32) -> StoreBuilder {
        self.file_mode = mode;
        self
    }

    /// Opens the store file at `path`, creating it if it does not exist.
    ///
    /// A new file gets the builder's [`file_mode`](Self::file_mode) (`0o600` by default), and
    /// its directory is synced before the store is returned, so that the file's creation is as
    /// durable as the first write acknowledged in it.
    ///
    /// # Errors
    /// [`Error::AlreadyOpen`] at once if another process or store holds the file;
    /// [`Error::UnsupportedFormat`] or [`Error::NotAStore`] for a file this build must not
    /// touch; [`Error::InvalidDuration`] or [`Error::InvalidConfig`] for a bad setting;
    /// [`Error::Io`] if the file cannot be opened.
    pub fn open(self, path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref();
        let config = self.config()?;
        let io_error = |err: std::io::Error| Error::Io {
            path: path.to_path_buf(),
            action: "open",
            source: Arc::new(err),
        };
        if self.file_mode & !0o7777 != 0 {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "file_mode is {:o}; it must be permission bits, at most 7777 in octal",
                    self.file_mode
                ),
            });
        }
        let file = file::open_or_create(path, self.file_mode).map_err(io_error)?;
        let backend = FileBackend::new(file).map_err(|err| match err {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::AlreadyOpen {
                path: path.to_path_buf(),
            },
            other => Error::from(other),
        })?;
        Store::start(
            Arc::new(backend),
            Location::File(path.to_path_buf()),
            config,
            self.system_clock(),
        )
    }

    /// A store held in memory: the same semantics, nothing on disk. For tests.
    ///
    /// # Errors
    /// [`Error::InvalidDuration`] or [`Error::InvalidConfig`] for a bad setting.
    pub fn in_memory(self) -> Result<Store> {
        let mut config = self.config()?;
        // Nothing in memory survives a crash, so there is nothing to repair quickly; skipping
        // the allocator-state save doubles the commit rate of in-memory test stores.
        config.quick_repair = false;
        Store::start(
            Arc::new(InMemoryBackend::new()),
            Location::Memory,
            config,
            self.system_clock(),
        )
    }

    /// A store on a storage backend of your own, such as one that injects faults in tests. The
    /// backend must start empty or hold a store.
    ///
    /// # Errors
    /// As for [`open`](Self::open); errors that name the file name it `<backend>`.
    pub fn open_backend(self, backend: impl StorageBackend) -> Result<Store> {
        let config = self.config()?;
        Store::start(
            Arc::new(backend),
            Location::Backend,
            config,
            self.system_clock(),
        )
    }

    /// The builder's clock, or the system clock.
    fn system_clock(&self) -> Arc<dyn Clock> {
        self.clock.clone().unwrap_or_else(|| Arc::new(SystemClock))
    }

    fn config(&self) -> Result<Config> {
        let ttl = limits::duration_millis("ttl", self.ttl)?;
        let lease = limits::duration_millis("lease", self.lease)?;
        let sweep_interval = self
            .sweep_interval
            .map(|every| limits::interval("sweep interval", every))
            .transpose()?;
        let durability = match self.durability {
            Durability::Periodic(every) => {
                Durability::Periodic(limits::interval("durability interval", every)?)
            }
            other => other,
        };
        if self.max_response_bytes > MAX_RESPONSE_BYTES_LIMIT {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "max_response_bytes is {}, over the limit of {MAX_RESPONSE_BYTES_LIMIT}",
                    self.max_response_bytes
                ),
            });
        }
        if !(1..=MAX_SWEEP_BATCH_SIZE).contains(&self.sweep_batch) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "sweep_batch_size is {}; it must be 1 to {MAX_SWEEP_BATCH_SIZE}",
                    self.sweep_batch
                ),
            });
        }
        Ok(Config {
            ttl,
            lease,
            sweep_interval,
            sweep_batch: self.sweep_batch,
            max_response_bytes: self.max_response_bytes,
            durability,
            quick_repair: self.quick_repair,
            cache_size: self.cache_size,
            max_keys: self.max_keys,
        })
    }
}

/// Opening a store: with every default, or through the builder.
impl Store {
    /// Opens the store file at `path` with every default, creating it if needed. See
    /// [`Store::builder`] for the settings.
    ///
    /// # Errors
    /// [`Error::AlreadyOpen`](crate::Error::AlreadyOpen) at once if another process or store holds the file;
    /// [`Error::UnsupportedFormat`](crate::Error::UnsupportedFormat) or [`Error::NotAStore`](crate::Error::NotAStore) for a file this build must not
    /// touch (nothing is rewritten); [`Error::Io`](crate::Error::Io) if it cannot be opened.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        StoreBuilder::new().open(path)
    }

    /// A store in memory with every default: the real semantics, nothing on disk. For tests
    /// of code built on the store; pair it with a [`ManualClock`](crate::ManualClock) through
    /// [`Store::builder`].
    ///
    /// # Errors
    /// Only if the sweeper thread cannot be started.
    pub fn in_memory() -> Result<Store> {
        StoreBuilder::new().in_memory()
    }

    /// A builder for every setting, each with a documented default.
    pub fn builder() -> StoreBuilder {
        StoreBuilder::new()
    }
}
