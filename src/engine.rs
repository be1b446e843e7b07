//! The seam between the store and where its records live: [`Engine`] is every engine the store
//! can run on, behind one set of calls.
//!
//! Above it, [`Store`](crate::Store) checks the caller's input and builds an operation
//! ([`rules::ops`](crate::rules::ops)); the rules decide every answer. Below it, an engine
//! loads a key's record, applies the rules' decisions atomically and durably (batching
//! concurrent callers into one commit), scans, sweeps due records, flushes and closes. An
//! engine decides nothing itself.
//!
//! An enum rather than a trait object: the store's calls are generic over the operation's
//! type ([`Rule`]), which a trait object cannot carry, and a match on one variant costs
//! nothing on the claim path.

use std::path::Path;
use std::time::Instant;

use crate::config::Config;
use crate::error::Result;
use crate::key::Key;
use crate::record::Record;
use crate::rules::{Namespace, Rule};
use crate::stats::Counters;

/// The engine a store runs on.
// One per store, held in an `Arc`: boxing the larger variant would only add an indirection
// to every call.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Engine {
    /// One redb file, or memory, in this process (`src/redb/`).
    Redb(crate::redb::Engine),
    /// Tables in a PostgreSQL database, shared by any number of processes (`src/postgres/`).
    #[cfg(feature = "postgres")]
    Postgres(crate::postgres::Engine),
}

/// Runs `$body` with `$engine` bound to whichever engine `$self` is.
macro_rules! each {
    ($self:expr, $engine:ident => $body:expr) => {
        match $self {
            Engine::Redb($engine) => $body,
            #[cfg(feature = "postgres")]
            Engine::Postgres($engine) => $body,
        }
    };
}

impl Engine {
    /// The store's settings.
    pub(crate) fn config(&self) -> &Config {
        each!(self, engine => &engine.config)
    }

    /// The counters since open.
    pub(crate) fn counters(&self) -> &Counters {
        each!(self, engine => &engine.counters)
    }

    /// Now, in milliseconds, by the clock that decides leases and expiry.
    pub(crate) fn now(&self) -> u64 {
        each!(self, engine => engine.now())
    }

    /// The store's random id; tickets carry it.
    pub(crate) fn store_id(&self) -> u64 {
        each!(self, engine => engine.store_id())
    }

    /// The file the store is on, if it is on one.
    pub(crate) fn path(&self) -> Option<&Path> {
        each!(self, engine => engine.path())
    }

    /// Answers `rule` on `key`: without a write when the answer changes nothing, else through
    /// the next commit.
    pub(crate) fn decide<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        each!(self, engine => engine.decide(key, rule))
    }

    /// Applies one operation through a commit.
    pub(crate) fn one<R: Rule>(&self, key: Key, rule: R) -> Result<R::Answer> {
        each!(self, engine => engine.one(key, rule))
    }

    /// Applies several operations atomically: all of them, or none and the first refusal.
    pub(crate) fn many<R: Rule>(&self, ops: Vec<(Key, R)>) -> Result<Vec<R::Answer>> {
        each!(self, engine => engine.many(ops))
    }

    /// The record of `key` in `namespace` if it is live now, by the engine's clock, read with
    /// the record; `Error::Corrupt` if it is damaged.
    pub(crate) fn get_live(&self, namespace: Namespace, key: &Key) -> Result<Option<Record>> {
        each!(self, engine => engine.get_live(namespace, key))
    }

    /// The idempotency records whose keys start with `prefix` and that are live now, in key
    /// order, at most `limit` of them.
    pub(crate) fn list(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Key, Record)>> {
        each!(self, engine => engine.list_live(prefix, limit))
    }

    /// How many records the store holds, and how many of them are due for the sweeper at
    /// `now`.
    pub(crate) fn counts(&self, now: u64) -> Result<(u64, u64)> {
        each!(self, engine => engine.counts(now))
    }

    /// Whether any record is live at `now`.
    pub(crate) fn any_live(&self, now: u64) -> Result<bool> {
        each!(self, engine => engine.any_live(now))
    }

    /// How many claims in progress the store holds, whatever their lease and expiry.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn in_progress_keys(&self) -> Result<u64> {
        each!(self, engine => engine.in_progress_keys())
    }

    /// Checks every record; answers how many there are and whether anything was repaired.
    pub(crate) fn verify(&self) -> Result<(u64, bool)> {
        each!(self, engine => engine.verify())
    }

    /// Gives free space back; answers whether anything was done.
    pub(crate) fn compact(&self) -> Result<bool> {
        each!(self, engine => engine.compact())
    }

    /// Removes up to `limit` due records in one commit (`thorough`: look at every record);
    /// answers how many it removed and whether more are due.
    pub(crate) fn sweep_batch(&self, limit: usize, thorough: bool) -> Result<(usize, bool)> {
        each!(self, engine => engine.sweep_batch(limit, thorough))
    }

    /// Makes the commits of the last interval durable if that is due (`Durability::Periodic`).
    pub(crate) fn flush_if_due(&self) -> Result<()> {
        each!(self, engine => engine.flush_if_due())
    }

    /// Makes commits durable that a sweep left without an fsync, if any.
    pub(crate) fn flush_if_dirty(&self) -> Result<()> {
        each!(self, engine => engine.flush_if_dirty())
    }

    /// Makes everything durable and releases the engine; later calls get `Error::Closed`.
    pub(crate) fn close(&self) -> Result<()> {
        each!(self, engine => engine.close())
    }

    /// A number that changes whenever `key` (or another key of its notification shard) does.
    pub(crate) fn generation(&self, key: &Key) -> u64 {
        each!(self, engine => engine.generation(key))
    }

    /// Waits until `key`'s generation is no longer `seen`, or `until`; answers whether it
    /// changed.
    pub(crate) fn wait_for_change(&self, key: &Key, seen: u64, until: Instant) -> bool {
        each!(self, engine => engine.wait_for_change(key, seen, until))
    }

    /// Says that a caller holding [`key_changed`](Self::key_changed)'s future, having looked
    /// at its key, is about to wait on it: an engine shared with other processes then
    /// watches for their changes too, and wakes the future once it does, for a last look.
    #[cfg(feature = "http")]
    pub(crate) fn will_wait(&self) {
        match self {
            Engine::Redb(_) => {}
            #[cfg(feature = "postgres")]
            Engine::Postgres(engine) => engine.will_wait(),
        }
    }

    /// A future that completes at the next change to `key` after this call.
    #[cfg(feature = "http")]
    pub(crate) fn key_changed(&self, key: &Key) -> tokio::sync::futures::Notified<'_> {
        each!(self, engine => engine.key_changed(key))
    }

    /// Every record with its namespace tag, and the last fencing token issued.
    #[cfg(feature = "testing")]
    pub(crate) fn every_record(&self) -> Result<(Vec<crate::record::TaggedRecord>, u64)> {
        each!(self, engine => engine.every_record())
    }
}
