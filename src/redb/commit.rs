//! One group commit: the leader of a batch applies every operation in it (and those that join
//! it while it runs) through the rules, inside one write transaction, then commits with one
//! fsync or, under `Durability::Periodic`, without one.

use super::journal::{self, Backlog};
use super::writer::Writer;
use super::{Engine, Work, corrupt, stored};
use crate::batch::Running;
use crate::config::Durability;
use crate::error::Result;
use crate::observe;
use crate::record::Record;
use crate::rules::queued::Queued;
use crate::rules::{Change, Context};
use crate::stats::Tally;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Engine {
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
        if works.iter().all(|work| matches!(work, Work::Sweep(_))) {
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
    pub(super) fn execute(
        &self,
        mut works: Vec<Work>,
        batch: &mut dyn Running<Work>,
    ) -> Vec<Result<()>> {
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
        // What the counters count for the answers given, once the commit holds.
        let mut tallies: Vec<Tally> = Vec::new();
        let mut sweeps = Vec::new();
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
                let mut step = Step {
                    token: &mut token,
                    changed: &mut changed,
                    records,
                    added: &mut added,
                    in_progress: &mut in_progress,
                    tallies: &mut tallies,
                };
                let reply = match work {
                    Work::One(op) => {
                        self.apply_one(writer, op.as_ref(), &mut step)?;
                        Ok(())
                    }
                    Work::Many(ops) => self.apply_many(writer, ops, &mut step)?,
                    Work::Sweep(sweep) => {
                        let (removed, removed_in_progress, more) =
                            writer.sweep(self.now(), sweep.limit, sweep.thorough)?;
                        swept += removed;
                        *step.in_progress -= removed_in_progress as i64;
                        *sweep.swept.lock() = (removed, more);
                        sweeps.push((removed, more));
                        Ok(())
                    }
                    Work::Flush => Ok(()),
                    Work::Merge => {
                        writer.merge(Some(journal::MERGE_CHUNK))?;
                        Ok(())
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
                for (removed, more) in sweeps {
                    observe::swept(removed, more);
                }
                tallies.iter().for_each(|tally| self.counters.count(*tally));
                self.counters.wrote(tallies.len());
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
                replies
            }
            Err(err) => {
                self.counters.commit_failed();
                drop(counting);
                observe::commit(works.len(), durable, false, records, 0, None);
                works.iter().map(|_| Err(err.clone())).collect()
            }
        }
    }

    /// Decides and writes one operation, which keeps its answer. `Err` only for storage
    /// failures, which abort the batch; refusals are answers.
    fn apply_one(
        &self,
        writer: &mut Writer<'_>,
        op: &dyn Queued,
        step: &mut Step<'_>,
    ) -> Result<()> {
        let stored_key = stored(op.key(), op.namespace());
        let loaded = writer.load(&stored_key)?;
        let held = loaded.is_some();
        let effect = match loaded {
            // A damaged record was never counted as in progress.
            Some(Err(err)) => op.damaged(&err.0),
            loaded => {
                let current = loaded.and_then(|loaded| loaded.ok());
                let ctx = Context {
                    key: op.key(),
                    now: self.now(),
                    next_token: step.token.saturating_add(1),
                    store_id: self.storage.store_id(),
                    full: self.full(step.records, *step.added),
                };
                let effect = op.apply(current.as_ref(), &ctx);
                if effect.issued_token {
                    *step.token = ctx.next_token;
                }
                *step.in_progress += in_progress_change(current.as_ref(), &effect.change);
                effect
            }
        };
        *step.added += held_change(held, &effect.change);
        step.tallies.push(effect.tally);
        if write_change(writer, &stored_key, effect.change) {
            step.changed.push(stored_key);
        }
        Ok(())
    }

    /// `Some(budget)` when `records + added` records fill the key budget.
    pub(super) fn full(&self, records: u64, added: i64) -> Option<u64> {
        let max_keys = self.config.max_keys?;
        let held = i128::from(records) + i128::from(added);
        (held >= i128::from(max_keys)).then_some(max_keys)
    }

    /// Decides every operation against an in-memory overlay first; writes only if none was
    /// refused, so the group is all or nothing. The inner `Err` is the refusal that cancelled
    /// the group.
    fn apply_many(
        &self,
        writer: &mut Writer<'_>,
        ops: &[Arc<dyn Queued>],
        step: &mut Step<'_>,
    ) -> Result<Result<()>> {
        let now = self.now();
        let mut next_token = *step.token;
        // Records the group adds, kept apart until the whole group is accepted.
        let mut added = 0i64;
        let mut in_progress = 0i64;
        // Per key touched: its record now, and whether any operation changed it.
        let mut overlay: HashMap<Vec<u8>, (Option<Record>, bool)> = HashMap::new();
        let mut order = Vec::new();
        let mut tallies = Vec::with_capacity(ops.len());
        for op in ops {
            let stored_key = stored(op.key(), op.namespace());
            if !overlay.contains_key(&stored_key) {
                let current = match writer.load(&stored_key)? {
                    None => None,
                    Some(Ok(record)) => Some(record),
                    // A group is refused at a damaged record, whatever its operations.
                    Some(Err(err)) => return Ok(Err(corrupt(op.key(), err.0))),
                };
                overlay.insert(stored_key.clone(), (current, false));
                order.push(stored_key.clone());
            }
            let Some((current, touched)) = overlay.get_mut(&stored_key) else {
                continue;
            };
            let ctx = Context {
                key: op.key(),
                now,
                next_token: next_token.saturating_add(1),
                store_id: self.storage.store_id(),
                full: self.full(step.records, step.added.saturating_add(added)),
            };
            let effect = op.apply(current.as_ref(), &ctx);
            if let Some(err) = effect.refused {
                return Ok(Err(err));
            }
            if effect.issued_token {
                next_token = ctx.next_token;
            }
            added += held_change(current.is_some(), &effect.change);
            in_progress += in_progress_change(current.as_ref(), &effect.change);
            tallies.push(effect.tally);
            match effect.change {
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
        step.tallies.extend(tallies);
        Ok(Ok(()))
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
    /// What the counters count for the answers given so far.
    tallies: &'a mut Vec<Tally>,
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
