//! What a claim asks for and what it gets back: [`ClaimOptions`], [`Claim`], [`Ticket`],
//! [`Outcome`].

use std::time::Duration;

use crate::key::Key;

/// Per-call settings for [`Store::claim_with`](crate::Store::claim_with).
///
/// Unset fields take the store's defaults.
///
/// ```
/// use std::time::Duration;
/// use dedupe_store::ClaimOptions;
///
/// let options = ClaimOptions::new()
///     .fingerprint(b"sha256-of-the-request-body")
///     .lease(Duration::from_secs(10))
///     .ttl(Duration::from_secs(24 * 3600));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimOptions {
    pub(crate) fingerprint: Option<Vec<u8>>,
    pub(crate) lease: Option<Duration>,
    pub(crate) ttl: Option<Duration>,
}

impl ClaimOptions {
    /// No fingerprint, the store's lease and TTL.
    pub fn new() -> ClaimOptions {
        ClaimOptions::default()
    }

    /// The request's fingerprint (a digest of its payload), at most
    /// [`MAX_FINGERPRINT_LEN`](crate::MAX_FINGERPRINT_LEN) bytes. A key belongs to the first
    /// fingerprint it was claimed with until it is released or expires; a claim with a
    /// different one gets [`Claim::Mismatch`]. Default: none, which matches any.
    #[must_use]
    pub fn fingerprint(mut self, fingerprint: impl AsRef<[u8]>) -> ClaimOptions {
        self.fingerprint = Some(fingerprint.as_ref().to_vec());
        self
    }

    /// How long the claim is owned before another claim may take it over. Default: the
    /// store's [`lease`](crate::StoreBuilder::lease).
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> ClaimOptions {
        self.lease = Some(lease);
        self
    }

    /// How long the key is remembered after the claim if it is never completed. Default: the
    /// store's [`ttl`](crate::StoreBuilder::ttl).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> ClaimOptions {
        self.ttl = Some(ttl);
        self
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a claim may not have been acquired"]
pub enum Claim {
    /// The caller now owns the key: do the work, then [`complete`](crate::Store::complete) or
    /// [`release`](crate::Store::release) with this ticket.
    Acquired(Ticket),
    /// Another owner holds a live lease on the key. Nothing changed.
    #[non_exhaustive]
    InProgress {
        /// When that lease ends (milliseconds since the epoch).
        lease_until: u64,
        /// How long until then by the store's clock; never negative.
        retry_after: Duration,
        /// The attempt number of the current owner.
        attempt: u32,
    },
    /// The key was completed before: replay this outcome instead of doing the work again.
    Completed(Outcome),
    /// The key belongs to a request with a different fingerprint. Nothing changed.
    #[non_exhaustive]
    Mismatch {
        /// Whether the key's record is completed (else it is in progress).
        completed: bool,
    },
}

impl Claim {
    /// The ticket, when the claim was acquired.
    pub fn ticket(self) -> Option<Ticket> {
        match self {
            Claim::Acquired(ticket) => Some(ticket),
            _ => None,
        }
    }

    /// True when the claim was acquired.
    pub fn is_acquired(&self) -> bool {
        matches!(self, Claim::Acquired(_))
    }
}

/// Proof of ownership of a claimed key.
///
/// Only the ticket whose fencing token is the key's current one may complete, release or
/// extend it; any other gets [`Error::LeaseLost`](crate::Error::LeaseLost). Pass the fencing
/// token to downstream systems so they can reject a stale owner's writes too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub(crate) key: Key,
    pub(crate) fencing_token: u64,
    pub(crate) attempt: u32,
    pub(crate) claimed_at: u64,
    pub(crate) lease_until: u64,
    pub(crate) takeover: bool,
    pub(crate) checkpoint: Option<Checkpoint>,
    pub(crate) store_id: u64,
}

impl Ticket {
    /// The claimed key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The fencing token: strictly greater than every token this store file issued before.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// 1 for a fresh claim; one more for each takeover of a claim whose lease ran out.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// When the claim was made (milliseconds since the epoch).
    pub fn claimed_at(&self) -> u64 {
        self.claimed_at
    }

    /// When the lease ends unless [extended](crate::Store::extend) (milliseconds since the
    /// epoch).
    pub fn lease_until(&self) -> u64 {
        self.lease_until
    }

    /// True when this claim took over from an owner whose lease ran out: that owner may have
    /// done part of the work, so check before repeating side effects.
    pub fn is_takeover(&self) -> bool {
        self.takeover
    }

    /// The last checkpoint the previous owner recorded, on a takeover.
    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoint.as_ref()
    }
}

/// A recovery point recorded inside an in-progress claim.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Checkpoint {
    /// The name of the step that was finished.
    pub step: String,
    /// The state the owner saved with it.
    pub state: Vec<u8>,
    /// When it was recorded (milliseconds since the epoch).
    pub recorded_at: u64,
}

/// A stored outcome, replayed to every retry of a completed key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcome {
    /// The response the owner stored.
    pub response: Vec<u8>,
    /// When it was completed (milliseconds since the epoch).
    pub completed_at: u64,
    /// When the key will be forgotten (milliseconds since the epoch).
    pub expires_at: u64,
    /// The attempt that completed it.
    pub attempt: u32,
    /// The fencing token of the claim that completed it.
    pub fencing_token: u64,
}
