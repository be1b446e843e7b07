//! The redb engine under a [`Store`](crate::Store): runs operations through the rules against
//! the tables of one redb file, answering reads from a read transaction and queueing writes
//! for group commit.
//!
//! - `batch`: group commit, the batcher that gathers concurrent writers into one commit;
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
pub(crate) mod batch;
pub(crate) mod codec;
pub(crate) mod file;
pub(crate) mod guard;
pub(crate) mod journal;
pub(crate) mod scan;
pub(crate) mod schema;
pub(crate) mod storage;
pub(crate) mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use crate::builder::{Config, Durability};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::key::Key;
use crate::notify::KeyEvents;
use crate::observe;
use crate::record::Record;
use crate::rules::{self, Answer, Change, Context, Op};
use crate::stats::Counters;
use batch::{Batcher, Running};
use journal::Backlog;
use storage::Storage;
use writer::Writer;

/// One caller's request to the writer.
pub(crate) enum Work {
    /// One operation on one key.
    One(Key, Op),
    /// Several operations applied all or nothing, in order.
    Many(Vec<(Key, Op)>),
    /// Remove up to this many due records; `thorough` merges everything first.
    Sweep { limit: usize, thorough: bool },
    /// Move the oldest [`journal::MERGE_CHUNK`] or so keys from the journal into the tables.
    Merge,
    /// Make everything committed so far durable.
    Flush,
}

/// The writer's answer to one [`Work`].
pub(crate) enum Reply {
    One(Answer),
    /// The answers of a `Many`, or the refusal that cancelled all of it.
    Many(std::result::Result<Vec<Answer>, Error>),
    Swept {
        removed: usize,
        more: bool,
    },
    Flushed,
    Merged,
}

impl Work {
    fn weight(&self) -> usize {
        match self {
            Work::One(_, op) => batch::weight(1, op.payload_len()),
            Work::Many(ops) => {
                batch::weight(ops.len(), ops.iter().map(|(_, op)| op.payload_len()).sum())
            }
            Work::Sweep { limit, .. } => batch::weight(*limit, 0),
            Work::Flush => 1,
            Work::Merge => batch::weight(journal::MERGE_CHUNK, 0),
        }
    }
}

pub(crate) struct Engine {
    pub storage: Storage,
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    pub counters: Counters,
    pub events: KeyEvents,
    batcher: Batcher<Work, Result<Reply>>,
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

fn stored(key: &Key, op: &Op) -> Vec<u8> {
    scan::stored_key(op.namespace().tag(), key.as_bytes())
}

fn corrupt(key: &Key, reason: String) -> Error {
    Error::Corrupt {
        key: key.clone(),
        reason,
    }
}

impl Engine {
    pub(crate) fn new(storage: Storage, clock: Arc<dyn Clock>, config: Config) -> Result<Engine> {
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

    /// Answers `op` from a read transaction when it would change nothing (a replay, a live
    /// claim, a mismatch, a duplicate mark, a new key at the budget). `None` means it must go
    /// to the writer.
    pub(crate) fn peek(&self, key: &Key, op: &Op) -> Result<Option<Answer>> {
        let current = match self.load(&stored(key, op))? {
            None => None,
            Some(Ok(record)) => Some(record),
            Some(Err(err)) => return Err(corrupt(key, err.0)),
        };
        let ctx = Context {
            key,
            now: self.now(),
            next_token: 0,
            store_id: self.storage.store_id(),
            // A new key refused at the budget is answered here too, so a flood of them costs
            // reads, not commits.
            full: self.full(self.records.load(Ordering::Acquire), 0),
        };
        let transition = rules::apply(current.as_ref(), op, &ctx);
        if transition.change != Change::Keep {
            return Ok(None);
        }
        self.counters.record(&transition.answer);
        Ok(Some(transition.answer))
    }

    /// Reads one key's record.
    pub(crate) fn load(&self, stored_key: &[u8]) -> Result<storage::Loaded> {
        self.storage.load(stored_key)
    }

    /// Queues `work` for the next commit and waits for its answer. Then, if merging has fallen
    /// behind the writes (or, under `Periodic`, whose batches carry no merges, if a merge is
    /// due), this caller merges the backlog down (one caller at a time).
    pub(crate) fn submit(&self, work: Work) -> Result<Reply> {
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

    fn submit_now(&self, work: Work) -> Result<Reply> {
        let weight = work.weight();
        // A sweep or merge commits alone, so that no claim waits for its hundreds of
        // table writes.
        let solo = matches!(work, Work::Sweep { .. } | Work::Merge);
        self.batcher.submit(
            work,
            weight,
            solo,
            |works, batch| self.execute(works, batch),
            || Err(Error::CommitPanicked),
        )
    }

    /// Applies one operation through the writer.
    pub(crate) fn one(&self, key: Key, op: Op) -> Result<Answer> {
        match self.submit(Work::One(key, op))? {
            Reply::One(answer) => Ok(answer),
            _ => unreachable!("a One work is answered with Reply::One"),
        }
    }

    /// Applies several operations atomically.
    pub(crate) fn many(&self, ops: Vec<(Key, Op)>) -> Result<Vec<Answer>> {
        match self.submit(Work::Many(ops))? {
            Reply::Many(answers) => answers,
            _ => unreachable!("a Many work is answered with Reply::Many"),
        }
    }

    /// Removes up to `limit` due records in one transaction (see [`Writer::sweep`] for
    /// `thorough`).
    pub(crate) fn sweep_batch(&self, limit: usize, thorough: bool) -> Result<(usize, bool)> {
        match self.submit(Work::Sweep { limit, thorough })? {
            Reply::Swept { removed, more } => Ok((removed, more)),
            _ => unreachable!("a Sweep work is answered with Reply::Swept"),
        }
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

    fn durable(&self, works: &[Work]) -> bool {
        // A sweep only removes records that already behave as absent: a crash that loses it
        // loses nothing a caller could see, and the record is swept again. So a batch of
        // nothing but sweeps skips the fsync, and a large backlog does not compete with
        // claims for the disk. The next durable commit (or the flush at the end of the sweep)
        // persists it.
        //
        // A merge, though it only moves what the journal holds durably already, is durable
        // like any other commit: skipping its fsync saves little (the next commit's fsync
        // writes its pages anyway) and let the file grow by half again in `benches/file_size`,
        // since redb reuses the pages a commit frees only after a durable commit.
        if works.iter().all(|work| matches!(work, Work::Sweep { .. })) {
            return false;
        }
        match self.config.durability {
            Durability::Immediate => true,
            Durability::Periodic(every) => {
                works.iter().any(|work| matches!(work, Work::Flush))
                    || self.last_durable.lock().elapsed() >= every
            }
        }
    }

    /// Runs one batch in one write transaction, taking in through `batch` the operations queued
    /// while it is applied. Called by the batch's leader.
    fn execute(&self, mut works: Vec<Work>, batch: &mut dyn Running<Work>) -> Vec<Result<Reply>> {
        let durable = self.durable(&works);
        // A durable batch of writes carries a merge when one is due, which then shares the
        // batch's fsync instead of paying for a commit of its own. A batch that skips its fsync
        // does not: merges are durable (see `durable`).
        let carries_merge = durable
            && works
                .iter()
                .all(|work| matches!(work, Work::One(..) | Work::Many(_) | Work::Flush))
            && self.storage.backlog() >= Backlog::Due;
        let mut changed: Vec<Vec<u8>> = Vec::new();
        let mut swept = 0usize;
        // Records the batch adds (less those it deletes), for the key budget.
        let counting = self.counting.lock();
        let records = self.records.load(Ordering::Acquire);
        let mut added = 0i64;
        let mut in_progress = 0i64;
        let result = self.storage.write(durable, |writer| {
            if carries_merge {
                writer.merge(Some(journal::MERGE_CHUNK))?;
            }
            let first_token = writer.last_token();
            let mut token = first_token;
            let mut replies = Vec::with_capacity(works.len());
            loop {
                let Some(work) = works.get(replies.len()) else {
                    // Everything so far is applied: take in what queued meanwhile, and commit
                    // once nothing more is waiting.
                    let joined = batch.join();
                    if joined.is_empty() {
                        // The batch is complete: its callers may be woken before the fsync.
                        if durable && let Some(hook) = batch.wake_early() {
                            writer.before_sync(hook);
                        }
                        break;
                    }
                    works.extend(joined);
                    continue;
                };
                let reply = match work {
                    Work::One(key, op) => {
                        let mut step = Step {
                            token: &mut token,
                            changed: &mut changed,
                            records,
                            added: &mut added,
                            in_progress: &mut in_progress,
                        };
                        Reply::One(self.apply_one(writer, key, op, &mut step)?)
                    }
                    Work::Many(ops) => {
                        let mut step = Step {
                            token: &mut token,
                            changed: &mut changed,
                            records,
                            added: &mut added,
                            in_progress: &mut in_progress,
                        };
                        Reply::Many(self.apply_many(writer, ops, &mut step)?)
                    }
                    Work::Sweep { limit, thorough } => {
                        let (removed, removed_in_progress, more) =
                            writer.sweep(self.now(), *limit, *thorough)?;
                        swept += removed;
                        in_progress -= removed_in_progress as i64;
                        Reply::Swept { removed, more }
                    }
                    Work::Flush => Reply::Flushed,
                    Work::Merge => {
                        writer.merge(Some(journal::MERGE_CHUNK))?;
                        Reply::Merged
                    }
                };
                replies.push(reply);
            }
            if token != first_token {
                writer.set_last_token(token);
            }
            Ok(replies)
        });
        match result {
            Ok(replies) => {
                if durable {
                    *self.last_durable.lock() = Instant::now();
                    self.dirty.store(false, Ordering::Release);
                } else {
                    self.dirty.store(true, Ordering::Release);
                }
                let mut ops = 0;
                for reply in &replies {
                    match reply {
                        Reply::Swept { removed, more } => observe::swept(*removed, *more),
                        Reply::One(answer) => {
                            ops += 1;
                            self.counters.record(answer);
                        }
                        Reply::Many(Ok(answers)) => {
                            ops += answers.len();
                            answers.iter().for_each(|a| self.counters.record(a))
                        }
                        Reply::Many(Err(_)) | Reply::Flushed | Reply::Merged => {}
                    }
                }
                self.counters.wrote(ops);
                self.counters.swept(swept);
                let now_held = (records as i64)
                    .saturating_add(added)
                    .saturating_sub(swept as i64)
                    .max(0);
                self.records.store(now_held as u64, Ordering::Release);
                let since_open = self
                    .in_progress_since_open
                    .fetch_add(in_progress, Ordering::AcqRel)
                    + in_progress;
                drop(counting);
                observe::commit(
                    replies.len(),
                    durable,
                    true,
                    now_held as u64,
                    self.storage.pending_keys(),
                    self.in_progress_at_open
                        .get()
                        .map(|at_open| (at_open + since_open).max(0) as u64),
                );
                for key in &changed {
                    self.events.changed(key);
                }
                if swept > 0 {
                    self.events.changed_all();
                }
                replies.into_iter().map(Ok).collect()
            }
            Err(err) => {
                self.counters.commit_failed();
                drop(counting);
                observe::commit(works.len(), durable, false, records, 0, None);
                works.iter().map(|_| Err(err.clone())).collect()
            }
        }
    }

    /// Decides and writes one operation. `Err` only for storage failures, which abort the
    /// batch; refusals are answers.
    fn apply_one(
        &self,
        writer: &mut Writer<'_>,
        key: &Key,
        op: &Op,
        step: &mut Step<'_>,
    ) -> Result<Answer> {
        let stored_key = stored(key, op);
        let current = match writer.load(&stored_key)? {
            None => None,
            Some(Ok(record)) => Some(record),
            Some(Err(_)) if matches!(op, Op::Expire) => {
                // The operator's way out of a damaged record.
                writer.delete(&stored_key);
                step.changed.push(stored_key);
                *step.added -= 1;
                // A damaged record was never counted as in progress.
                return Ok(Answer::Expired(true));
            }
            Some(Err(err)) => return Ok(Answer::Refused(corrupt(key, err.0))),
        };
        let ctx = Context {
            key,
            now: self.now(),
            next_token: step.token.saturating_add(1),
            store_id: self.storage.store_id(),
            full: self.full(step.records, *step.added),
        };
        let transition = rules::apply(current.as_ref(), op, &ctx);
        if transition.issued_token {
            *step.token = ctx.next_token;
        }
        *step.added += held_change(current.is_some(), &transition.change);
        *step.in_progress += in_progress_change(current.as_ref(), &transition.change);
        if write_change(writer, &stored_key, transition.change) {
            step.changed.push(stored_key);
        }
        Ok(transition.answer)
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

    /// `Some(budget)` when `records + added` records fill the key budget.
    fn full(&self, records: u64, added: i64) -> Option<u64> {
        let max_keys = self.config.max_keys?;
        let held = i128::from(records) + i128::from(added);
        (held >= i128::from(max_keys)).then_some(max_keys)
    }

    /// Decides every operation against an in-memory overlay first; writes only if none was
    /// refused, so the group is all or nothing.
    fn apply_many(
        &self,
        writer: &mut Writer<'_>,
        ops: &[(Key, Op)],
        step: &mut Step<'_>,
    ) -> Result<std::result::Result<Vec<Answer>, Error>> {
        let now = self.now();
        let mut next_token = *step.token;
        // Records the group adds, kept apart until the whole group is accepted.
        let mut added = 0i64;
        let mut in_progress = 0i64;
        // Per key touched: its record now, and whether any operation changed it.
        let mut overlay: HashMap<Vec<u8>, (Option<Record>, bool)> = HashMap::new();
        let mut order = Vec::new();
        let mut answers = Vec::with_capacity(ops.len());
        for (key, op) in ops {
            let stored_key = stored(key, op);
            if !overlay.contains_key(&stored_key) {
                let current = match writer.load(&stored_key)? {
                    None => None,
                    Some(Ok(record)) => Some(record),
                    Some(Err(err)) => return Ok(Err(corrupt(key, err.0))),
                };
                overlay.insert(stored_key.clone(), (current, false));
                order.push(stored_key.clone());
            }
            let Some((current, touched)) = overlay.get_mut(&stored_key) else {
                continue;
            };
            let ctx = Context {
                key,
                now,
                next_token: next_token.saturating_add(1),
                store_id: self.storage.store_id(),
                full: self.full(step.records, step.added.saturating_add(added)),
            };
            let transition = rules::apply(current.as_ref(), op, &ctx);
            if let Answer::Refused(err) = transition.answer {
                return Ok(Err(err));
            }
            if transition.issued_token {
                next_token = ctx.next_token;
            }
            added += held_change(current.is_some(), &transition.change);
            in_progress += in_progress_change(current.as_ref(), &transition.change);
            match transition.change {
                Change::Keep => {}
                Change::Put(record) => {
                    *current = Some(record);
                    *touched = true;
                }
                Change::Delete => {
                    *current = None;
                    *touched = true;
                }
            }
            answers.push(transition.answer);
        }
        for stored_key in order {
            let Some((current, true)) = overlay.remove(&stored_key) else {
                continue;
            };
            let change = match current {
                Some(record) => Change::Put(record),
                None => Change::Delete,
            };
            if write_change(writer, &stored_key, change) {
                step.changed.push(stored_key);
            }
        }
        *step.token = next_token;
        *step.added += added;
        *step.in_progress += in_progress;
        Ok(Ok(answers))
    }
}

/// What one operation of a batch needs from the batch: the last token issued, the keys changed
/// so far (whose waiters are woken after the commit), and the record count for the key budget.
struct Step<'a> {
    token: &'a mut u64,
    changed: &'a mut Vec<Vec<u8>>,
    /// Records held when the batch began.
    records: u64,
    /// Records the batch has added so far, less those it deleted.
    added: &'a mut i64,
    /// Claims in progress the batch has added so far, less those it ended.
    in_progress: &'a mut i64,
}

/// By how much `change` moves the number of claims in progress held, for a key whose record
/// was `before`.
fn in_progress_change(before: Option<&Record>, change: &Change) -> i64 {
    let was = before.is_some_and(Record::is_in_progress);
    let is = match change {
        Change::Keep => was,
        Change::Put(record) => record.is_in_progress(),
        Change::Delete => false,
    };
    i64::from(is) - i64::from(was)
}

/// By how much `change` moves the number of records held, for a key that held one or not.
fn held_change(held: bool, change: &Change) -> i64 {
    match (held, change) {
        (false, Change::Put(_)) => 1,
        (true, Change::Delete) => -1,
        _ => 0,
    }
}

/// Writes a change; returns whether anything was written.
fn write_change(writer: &mut Writer<'_>, stored_key: &[u8], change: Change) -> bool {
    match change {
        Change::Keep => false,
        Change::Put(record) => {
            writer.put(stored_key, record);
            true
        }
        Change::Delete => {
            writer.delete(stored_key);
            true
        }
    }
}
