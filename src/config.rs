//! What a store runs with: its durability, and the settings the builder validated.

use std::time::Duration;

/// When an acknowledged write is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Every acknowledged write is fsynced before the call returns. Concurrent writers share
    /// fsyncs (group commit). The default.
    #[default]
    Immediate,
    /// Writes are committed without an fsync, and a background commit fsyncs them at least this
    /// often. A crash (or power loss) loses at most the writes of the last interval, like Redis'
    /// `appendfsync everysec`. Closing the store, or dropping its last handle, makes every
    /// write durable first; a process that ends without either (`std::process::exit`, a
    /// store kept in a `static`) may lose the last interval as a crash does. A failed flush
    /// (an I/O error, a full disk) loses nothing while the process runs: the store commits the
    /// interval's writes again, durably, once it has reopened the file, and the writes that
    /// come meanwhile get the error. Acknowledged writes are visible to every later call at
    /// once either way. The interval is rounded up
    /// to whole milliseconds.
    Periodic(Duration),
}

/// Settings a store runs with, validated.
#[derive(Clone)]
pub(crate) struct Config {
    pub ttl: u64,
    pub lease: u64,
    pub sweep_interval: Option<Duration>,
    pub sweep_batch: usize,
    pub max_response_bytes: usize,
    pub durability: Durability,
    pub quick_repair: bool,
    pub cache_size: usize,
    /// The most records (live, or expired and not yet swept) the store holds; `None`: no limit.
    pub max_keys: Option<u64>,
}
