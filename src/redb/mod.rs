//! The redb engine under a [`Store`](crate::Store): runs operations through the rules against
//! the tables of one redb file, answering reads from a read transaction and queueing writes
//! for group commit.
//!
//! - `storage`: the redb handle: open, read, write, reopen after a failed commit, close;
//! - `schema`: the tables and the meta table, opening and initialising a file;
//! - `writer`: one write transaction's changes, merges and sweeps;
//! - `scan`: reads over the tables, counts and the whole-file check;
//! - `journal`: the journal that makes a commit cheap, and its in-memory overlay;
//! - `codec`: the record envelope (version, CRC32, bincode);
//! - `backend`: the file backend that times fsyncs and restores the last synced header;
//! - `guard`: redb panics as errors, and files whose creation a crash cut short;
//! - `file`: creating a store file, private and durable.

pub(crate) mod backend;
pub(crate) mod codec;
mod commit;
pub(crate) mod file;
pub(crate) mod guard;
pub(crate) mod journal;
mod reads;
pub(crate) mod scan;
pub(crate) mod schema;
pub(crate) mod storage;
pub(crate) mod writer;

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use redb::StorageBackend;

use crate::batch::{self, Batcher};
use crate::clock::Clock;
use crate::config::{Config, Durability};
use crate::error::{Error, Result};
use crate::key::Key;
use crate::notify::KeyEvents;
use crate::rules::queued::{Pending, Queued};
use crate::rules::{self, Change, Context, Namespace, Rule};
use crate::stats::Counters;
use journal::Backlog;
use schema::Location;
use storage::Storage;

/// One caller's request to the writer. Each leaves its answer in a slot of its own (see
/// [`Pending`]); the batcher's reply says only whether the commit holding it succeeded.
pub(crate) enum Work {
    /// One operation on one key.
    One(Arc<dyn Queued>),
    /// Several operations applied all or nothing, in order: a refusal of any is the reply.
    Many(Vec<Arc<dyn Queued>>),
    /// Remove due records (see [`Sweep`]).
    Sweep(Arc<Sweep>),
    /// Move the oldest [`journal::MERGE_CHUNK`] or so keys from the journal into the tables.
    Merge,
    /// Make everything committed so far durable.
    Flush,
}

/// A sweep of up to `limit` due records; `thorough` merges everything first.
pub(crate) struct Sweep {
    limit: usize,
    thorough: bool,
    /// How many records it removed, and whether more are due.
    swept: Mutex<(usize, bool)>,
}

impl Work {
    fn weight(&self) -> usize {
        match self {
            Work::One(op) => batch::weight(1, op.payload_len()),
            Work::Many(ops) => {
                batch::weight(ops.len(), ops.iter().map(|op| op.payload_len()).sum())
            }
            Work::Sweep(sweep) => batch::weight(sweep.limit, 0),
            Work::Flush => 1,
            Work::Merge => batch::weight(journal::MERGE_CHUNK, 0),
        }
    }
}

pub(crate) struct Engine {
    storage: Storage,
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    pub counters: Counters,
    events: KeyEvents,
    batcher: Batcher<Work, Result<()>>,
    /// When the last durable commit finished, for `Durability::Periodic`.
    last_durable: Mutex<Instant>,
    /// Whether a commit since then was not durable.
    dirty: AtomicBool,
    /// Whether some caller is running a merge that the overlay's size asked for.
    merging: AtomicBool,
    /// How many records the store holds, live or expired and not yet swept: what the key
    /// budget counts. Changed only by the batch leader, after each commit.
    records: AtomicU64,
    /// Claims in progress held, less those held at open: what commits since open added.
    in_progress_since_open: AtomicI64,
    /// Claims in progress held at open, counted (by reading every record) only when first
    /// asked for: the `dedupe_in_progress_keys` gauge.
    in_progress_at_open: OnceLock<i64>,
    /// Held by the batch leader from before its commit until the counts above are updated,
    /// so that a count read under it matches the commits.
    counting: Mutex<()>,
}

fn stored(key: &Key, namespace: Namespace) -> Vec<u8> {
    scan::stored_key(namespace.tag(), key.as_bytes())
}

fn corrupt(key: &Key, reason: String) -> Error {
    Error::Corrupt {
        key: key.clone(),
        reason,
    }
}

impl Engine {
    /// Opens (or initialises) the store on `backend`; `location` names it in errors.
    pub(crate) fn open(
        backend: Arc<dyn StorageBackend>,
        location: Location,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine> {
        let storage = Storage::open(backend, location, config.cache_size, config.quick_repair)?;
        Engine::new(storage, clock, config)
    }

    fn new(storage: Storage, clock: Arc<dyn Clock>, config: Config) -> Result<Engine> {
        // At time zero nothing is due, so this reads only the records' count.
        let (records, _) = storage.read_merged(&[], |txn, pending| scan::count(txn, pending, 0))?;
        Ok(Engine {
            storage,
            clock,
            config,
            counters: Counters::default(),
            events: KeyEvents::new(),
            // Operations may join a running batch; sweeps, merges and flushes wait for their own.
            batcher: Batcher::new(|work| matches!(work, Work::One(..) | Work::Many(_))),
            last_durable: Mutex::new(Instant::now()),
            dirty: AtomicBool::new(false),
            merging: AtomicBool::new(false),
            records: AtomicU64::new(records),
            in_progress_since_open: AtomicI64::new(0),
            in_progress_at_open: OnceLock::new(),
            counting: Mutex::new(()),
        })
    }

    pub(crate) fn now(&self) -> u64 {
        self.clock.now_millis()
    }

    /// Answers `rule` on `key` from a read transaction when it would change nothing (a
    /// replay, a live claim, a mismatch, a duplicate mark, a new key at the budget). `None`
    /// means it must go to the writer.
    pub(crate) fn peek<R: Rule>(&self, key: &Key, rule: &R) -> Result<Option<Result<R::Answer>>> {
        let decision = match self.load(&stored(key, rule.namespace()))? {
            Some(Err(err)) => rule.damaged(key, &err.0),
            loaded => {
                let current = loaded.and_then(|loaded| loaded.ok());
                let ctx = Context {
                    key,
                    now: self.now(),
                    next_token: 0,
                    store_id: self.storage.store_id(),
                    // A new key refused at the budget is answered here too, so a flood of
                    // them costs reads, not commits.
                    full: self.full(self.records.load(Ordering::Acquire), 0),
                };
                rules::apply(rule, current.as_ref(), &ctx)
            }
        };
        if decision.change != Change::Keep {
            return Ok(None);
        }
        self.counters.count(rules::tally::<R>(&decision.answer));
        Ok(Some(decision.answer))
    }

    /// Answers `rule` on `key`: from a read transaction when that changes nothing ([`peek`]),
    /// else through the next group commit ([`one`]).
    ///
    /// [`peek`]: Self::peek
    /// [`one`]: Self::one
    pub(crate) fn decide<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        match self.peek(&key, &rule)? {
            Some(answer) => answer,
            None => self.one(key, rule),
        }
    }

    /// Reads one key's record.
    pub(crate) fn load(&self, stored_key: &[u8]) -> Result<scan::Loaded> {
        self.storage.load(stored_key)
    }

    /// Queues `work` for the next commit and waits for its answer. Then, if merging has fallen
    /// behind the writes (or, under `Periodic`, whose batches carry no merges, if a merge is
    /// due), this caller merges the backlog down (one caller at a time).
    pub(crate) fn submit(&self, work: Work) -> Result<()> {
        let reply = self.submit_now(work);
        let threshold = match self.config.durability {
            Durability::Immediate => Backlog::Behind,
            Durability::Periodic(_) => Backlog::Due,
        };
        if self.storage.backlog() >= threshold && !self.merging.swap(true, Ordering::AcqRel) {
            // The caller's own work is done. It merges, a chunk per commit so that other
            // writers go on between them, until no merge is due, but no more than the backlog
            // it found: a large atomic batch pays for merging itself, and no caller merges for
            // ever behind writers that outpace it. A failed merge leaves the journal as it
            // was, for the next one.
            let chunks = self.storage.pending_keys() / journal::MERGE_CHUNK + 1;
            for _ in 0..chunks {
                if self.storage.backlog() == Backlog::Small || self.submit_now(Work::Merge).is_err()
                {
                    break;
                }
            }
            self.merging.store(false, Ordering::Release);
        }
        reply
    }

    fn submit_now(&self, work: Work) -> Result<()> {
        let weight = work.weight();
        // A sweep or merge commits alone, so that no claim waits for its hundreds of
        // table writes.
        let solo = matches!(work, Work::Sweep(_) | Work::Merge);
        self.batcher.submit(
            work,
            weight,
            solo,
            |works, batch| self.execute(works, batch),
            || Err(Error::CommitPanicked),
        )
    }

    /// Applies one operation through the writer.
    pub(crate) fn one<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        let pending = Arc::new(Pending::new(key, rule));
        self.submit(Work::One(pending.clone()))?;
        pending.take()
    }

    /// Applies several operations atomically: all of them, or none and the first refusal.
    pub(crate) fn many<R: Rule>(&self, ops: Vec<(Key, R)>) -> Result<Vec<R::Answer>> {
        let (pending, queued) = Pending::group(ops);
        self.submit(Work::Many(queued))?;
        pending.iter().map(|pending| pending.take()).collect()
    }

    /// Removes up to `limit` due records in one transaction (see [`Writer::sweep`] for
    /// `thorough`); answers how many it removed and whether more are due.
    ///
    /// [`Writer::sweep`]: writer::Writer::sweep
    pub(crate) fn sweep_batch(&self, limit: usize, thorough: bool) -> Result<(usize, bool)> {
        let sweep = Arc::new(Sweep {
            limit,
            thorough,
            swept: Mutex::new((0, false)),
        });
        self.submit(Work::Sweep(sweep.clone()))?;
        let swept = *sweep.swept.lock();
        Ok(swept)
    }

    /// Under `Durability::Periodic`, makes the commits of the last interval durable if that is
    /// due. Does nothing under `Immediate`.
    pub(crate) fn flush_if_due(&self) -> Result<()> {
        let Durability::Periodic(every) = self.config.durability else {
            return Ok(());
        };
        if self.dirty.load(Ordering::Acquire) && self.last_durable.lock().elapsed() >= every {
            self.submit(Work::Flush)?;
        }
        Ok(())
    }

    /// Under `Durability::Immediate`, makes commits durable that a sweep left without an
    /// fsync, if any. Under `Periodic` the interval's flush covers them.
    pub(crate) fn flush_if_dirty(&self) -> Result<()> {
        if self.config.durability == Durability::Immediate && self.dirty.load(Ordering::Acquire) {
            self.submit(Work::Flush)?;
        }
        Ok(())
    }

    /// How many claims in progress the store holds, whatever their lease and expiry. The first
    /// call reads every record (under the commit lock, so no commit slips between the count
    /// and the changes since open); later calls add up.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn in_progress_keys(&self) -> Result<u64> {
        let at_open = match self.in_progress_at_open.get() {
            Some(at_open) => *at_open,
            None => {
                let _counting = self.counting.lock();
                let now_held = self.storage.read_merged(&[], scan::count_in_progress)?;
                let since_open = self.in_progress_since_open.load(Ordering::Acquire);
                *self
                    .in_progress_at_open
                    .get_or_init(|| now_held as i64 - since_open)
            }
        };
        let since_open = self.in_progress_since_open.load(Ordering::Acquire);
        Ok((at_open + since_open).max(0) as u64)
    }
}
