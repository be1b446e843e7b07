//! An embedded, durable idempotency and dedupe store on one [redb](https://docs.rs/redb) file.
//!
//! A retried request, a redelivered message or a re-run job does its side effect at most once
//! and gets the stored outcome back. The store remembers which keys were started and which
//! finished, atomically and across crashes, and forgets them when their TTL passes. No server,
//! no external database.
//!
//! # The main flow
//!
//! Claim the key, do the work once, store the outcome; every retry gets the outcome back.
//!
//! ```
//! use dedupe_store::{Claim, ClaimOptions, Store};
//!
//! # let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path().join("dedupe.redb"))?;
//! let request = ClaimOptions::new().fingerprint(b"POST /charges amount=4200");
//!
//! let handle = |store: &Store| -> Result<Vec<u8>, dedupe_store::Error> {
//!     match store.claim_with("tenant-7/charge/abc", &request)? {
//!         // First time: do the side effect, then store its outcome.
//!         Claim::Acquired(ticket) => {
//!             let response = b"201 charge ch_1".to_vec();
//!             store.complete(&ticket, &response)?;
//!             Ok(response)
//!         }
//!         // A retry after completion: the same answer, no second charge.
//!         Claim::Completed(outcome) => Ok(outcome.response),
//!         // The first attempt is still running: answer 409 with Retry-After.
//!         Claim::InProgress { retry_after, .. } => Ok(format!("409 retry in {retry_after:?}").into_bytes()),
//!         // Same key, different payload: answer 422.
//!         Claim::Mismatch { .. } => Ok(b"422".to_vec()),
//!     }
//! };
//!
//! assert_eq!(handle(&store)?, b"201 charge ch_1");
//! assert_eq!(handle(&store)?, b"201 charge ch_1"); // replayed, not re-run
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What the store guarantees
//!
//! - **One owner.** Of any number of concurrent claims of an absent key, exactly one gets
//!   [`Claim::Acquired`]. Every ticket carries a fencing token strictly greater than any the
//!   file issued before; only the current token may [`complete`](Store::complete),
//!   [`release`](Store::release) or [`extend`](Store::extend).
//! - **Crashed owners are replaced.** A claim whose lease ran out is taken over by the next
//!   claim ([`Ticket::is_takeover`]), with the next attempt number.
//! - **Nothing acknowledged is lost.** Under [`Durability::Immediate`] (the default) a claim
//!   that returned `Acquired` and a `complete` that returned `Ok` are fsynced; concurrent
//!   writers share fsyncs (group commit). A failed commit fails every call in its batch and the
//!   store reopens its file and goes on.
//! - **Keys are forgotten on time.** A record past its `expires_at` behaves as absent at once;
//!   a background sweeper removes it in short batches.
//! - **Bad input is an error, never a panic.** See [`Error`].
//!
//! # Message dedupe
//!
//! ```
//! use std::time::Duration;
//! use dedupe_store::Store;
//!
//! let store = Store::in_memory()?;
//! let batch = ["msg-1", "msg-2", "msg-1"];
//! let fresh = store.mark_seen_many(batch)?;
//! assert_eq!(fresh, vec![true, true, false]);
//! assert!(!store.mark_seen_with_ttl("msg-2", Duration::from_secs(600))?);
//! # Ok::<(), dedupe_store::Error>(())
//! ```
//!
//! # Testing your own handlers
//!
//! [`Store::in_memory`] and [`ManualClock`] give the real semantics, fast and deterministic:
//!
//! ```
//! use std::time::Duration;
//! use dedupe_store::{Claim, ManualClock, Store};
//!
//! let clock = ManualClock::new(0);
//! let store = Store::builder().clock(clock.clone()).ttl(Duration::from_secs(60)).in_memory()?;
//! assert!(store.mark_seen("k")?);
//! clock.advance(Duration::from_secs(60));
//! assert!(store.mark_seen("k")?, "forgotten after its TTL");
//! # Ok::<(), dedupe_store::Error>(())
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod batch;
mod blocking;
mod builder;
mod claim;
mod clock;
mod config;
mod engine;
mod entry;
mod error;
mod key;
mod limits;
mod notify;
mod observe;
#[cfg(feature = "postgres")]
mod postgres;
mod record;
mod redb;
mod rules;
mod sequence;
mod stats;
mod store;
mod sweeper;

#[cfg(feature = "http")]
pub mod http;

/// Test support for the reliability tests and fuzz targets; see `src/testing/mod.rs`.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;

pub use crate::redb::schema::FORMAT_VERSION;
pub use ::redb::StorageBackend;
pub use builder::StoreBuilder;
pub use claim::{Checkpoint, Claim, ClaimOptions, Outcome, Ticket};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Durability;
pub use entry::{Entry, EntryState};
pub use error::{DatabaseErrorKind, Error, Result, StorageError};
pub use key::{Key, MAX_KEY_LEN};
pub use limits::{
    DEFAULT_MAX_RESPONSE_BYTES, MAX_CHECKPOINT_STATE, MAX_DURATION, MAX_FINGERPRINT_LEN,
    MAX_RESPONSE_BYTES_LIMIT, MAX_STEP_LEN, MAX_SWEEP_BATCH_SIZE,
};
pub use sequence::{SeqCheck, SequenceOptions};
pub use stats::Stats;
pub use store::Store;
pub use store::maintenance::VerifyReport;

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
