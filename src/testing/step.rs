//! The steps a scenario run is made of, and how their small numbers map to keys, durations
//! and responses: every byte value means something, so fuzz input is never wasted.

use std::time::Duration;

use super::disk::{Fate, IoCall, IoFailure};

/// The clock's reading when a run starts: 2023-11-14, far from either end of `u64`.
pub const START_MILLIS: u64 = 1_700_000_000_000;
/// The store's default lease in these runs.
pub const LEASE: Duration = Duration::from_secs(30);
/// The store's default TTL in these runs.
pub const TTL: Duration = Duration::from_secs(3600);
/// Steps past this many are ignored, so a fuzz input stays quick to run.
pub const MAX_STEPS: usize = 96;
/// The few keys a run works on, so that steps meet each other.
const KEYS: u8 = 6;

/// One thing a run does. Numbers are folded into small ranges, so every value is meaningful.
#[derive(Debug, Clone, PartialEq, Eq, arbitrary::Arbitrary)]
pub enum Step {
    /// `claim_with`: `fingerprint` 0 is none; `lease` and `ttl` 0 are the store's defaults.
    Claim {
        /// Which of the few keys.
        key: u8,
        /// Which of three fingerprints, or none.
        fingerprint: u8,
        /// Per-call lease in seconds (1 to 60), or the default.
        lease: u8,
        /// Per-call TTL (5 s to 10 min), or the default.
        ttl: u8,
    },
    /// `complete` (or `complete_with_ttl`) with one of the tickets acquired so far.
    Complete {
        /// Which ticket.
        ticket: u8,
        /// Which response; 250 and above are 5 KiB, spanning redb pages.
        response: u8,
        /// Per-call TTL, or the default.
        ttl: u8,
    },
    /// `release`.
    Release {
        /// Which ticket.
        ticket: u8,
    },
    /// `extend`.
    Extend {
        /// Which ticket.
        ticket: u8,
        /// Seconds (1 to 60).
        lease: u8,
    },
    /// `expire`.
    Expire {
        /// Which key.
        key: u8,
    },
    /// `mark_seen` (or `mark_seen_with_ttl`).
    MarkSeen {
        /// Which key.
        key: u8,
        /// Per-call TTL, or the default.
        ttl: u8,
    },
    /// `mark_seen_many` over three keys (repeats allowed).
    MarkSeenMany {
        /// Which keys.
        keys: [u8; 3],
    },
    /// `get`.
    Get {
        /// Which key.
        key: u8,
    },
    /// `sweep`.
    Sweep,
    /// The clock moves forward by up to 255 seconds.
    Tick {
        /// Seconds.
        secs: u8,
    },
    /// The clock jumps: a day forward, an hour back, or a minute back.
    Leap {
        /// Which jump.
        kind: u8,
    },
    /// `close`, then open the same disk again.
    Reopen,
    /// Fail an upcoming I/O call (honoured only when faults are on).
    Fail {
        /// Which kind of call.
        call: IoCall,
        /// The how-manieth such call from now (1 to 16).
        nth: u8,
        /// How many in a row (1 to 3).
        times: u8,
        /// EIO or ENOSPC.
        failure: IoFailure,
    },
    /// Cut the power now or at an upcoming sync (honoured only when faults are on).
    PowerCut {
        /// 0 now, else at the how-manieth sync from now (1 to 7).
        at_sync: u8,
        /// What happens to the unsynced writes.
        seed: u8,
    },
}

pub(super) fn key_of(key: u8) -> Vec<u8> {
    format!("key-{}", key % KEYS).into_bytes()
}

pub(super) fn fingerprint_of(fingerprint: u8) -> Option<Vec<u8>> {
    (fingerprint != 0).then(|| format!("fp-{}", fingerprint % 3).into_bytes())
}

pub(super) fn lease_of(lease: u8) -> Option<Duration> {
    (lease != 0).then(|| Duration::from_secs(u64::from(lease % 60) + 1))
}

pub(super) fn ttl_of(ttl: u8) -> Option<Duration> {
    (ttl != 0).then(|| Duration::from_secs((u64::from(ttl % 120) + 1) * 5))
}

pub(super) fn response_of(response: u8) -> Vec<u8> {
    if response >= 250 {
        vec![response; 5 * 1024]
    } else {
        format!("response-{response}").into_bytes()
    }
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn fate_of(seed: u8) -> Fate {
    match seed % 3 {
        0 => Fate::DropAll,
        1 => Fate::KeepAll,
        _ => Fate::Random(u64::from(seed)),
    }
}
