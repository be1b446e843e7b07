//! The limits on what callers may store, and the checks that enforce them before anything is
//! queued for a commit.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::key::MAX_KEY_LEN;

/// The longest request fingerprint accepted, in bytes. Fingerprints are compared byte for
/// byte, so pass a digest (SHA-256, BLAKE3) of a large request rather than the request itself.
pub const MAX_FINGERPRINT_LEN: usize = 1024;

/// The default cap on a stored response: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// The highest value [`StoreBuilder::max_response_bytes`](crate::StoreBuilder::max_response_bytes)
/// accepts: 256 MiB.
pub const MAX_RESPONSE_BYTES_LIMIT: usize = 256 * 1024 * 1024;

/// The most records [`StoreBuilder::sweep_batch_size`](crate::StoreBuilder::sweep_batch_size)
/// accepts for one sweep transaction: 65,536. A sweep batch holds the writer while it runs, so
/// batches stay small enough that claims never wait long behind one.
pub const MAX_SWEEP_BATCH_SIZE: usize = 64 * 1024;

/// The longest checkpoint step name accepted, in bytes.
pub const MAX_STEP_LEN: usize = 256;

/// The largest checkpoint state accepted, in bytes: 64 KiB. A checkpoint is a recovery point,
/// not a store of results; keep large data elsewhere and record its id.
pub const MAX_CHECKPOINT_STATE: usize = 64 * 1024;

/// The longest TTL, lease or interval accepted: 100 years.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A positive duration no longer than [`MAX_DURATION`], in whole milliseconds (rounded up, so
/// that one microsecond is one millisecond rather than zero).
pub(crate) fn duration_millis(what: &'static str, duration: Duration) -> Result<u64> {
    if duration.is_zero() {
        return Err(Error::InvalidDuration {
            what,
            reason: "it must be greater than zero",
        });
    }
    if duration > MAX_DURATION {
        return Err(Error::InvalidDuration {
            what,
            reason: "it is longer than the 100-year maximum",
        });
    }
    let millis = duration.as_nanos().div_ceil(1_000_000);
    u64::try_from(millis).map_err(|_| Error::InvalidDuration {
        what,
        reason: "it is longer than the 100-year maximum",
    })
}

/// [`duration_millis`] as a `Duration`: what a background thread should wait, so that an
/// interval under a millisecond does not keep it spinning.
pub(crate) fn interval(what: &'static str, duration: Duration) -> Result<Duration> {
    duration_millis(what, duration).map(Duration::from_millis)
}

/// Checks a caller's key against the limits: 1 to [`MAX_KEY_LEN`] bytes.
pub(crate) fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

pub(crate) fn check_fingerprint(fingerprint: &[u8]) -> Result<()> {
    if fingerprint.len() > MAX_FINGERPRINT_LEN {
        return Err(Error::FingerprintTooLarge {
            len: fingerprint.len(),
            max: MAX_FINGERPRINT_LEN,
        });
    }
    Ok(())
}

pub(crate) fn check_response(response: &[u8], max: usize) -> Result<()> {
    if response.len() > max {
        return Err(Error::ResponseTooLarge {
            len: response.len(),
            max,
        });
    }
    Ok(())
}

pub(crate) fn check_checkpoint(step: &str, state: &[u8]) -> Result<()> {
    if step.len() > MAX_STEP_LEN {
        return Err(Error::CheckpointTooLarge {
            len: step.len(),
            max: MAX_STEP_LEN,
        });
    }
    if state.len() > MAX_CHECKPOINT_STATE {
        return Err(Error::CheckpointTooLarge {
            len: state.len(),
            max: MAX_CHECKPOINT_STATE,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn validation_rejects_empty_and_long_keys() {
        assert!(matches!(check_key(b""), Err(Error::EmptyKey)));
        assert!(check_key(&[1u8; MAX_KEY_LEN]).is_ok());
        assert!(matches!(
            check_key(&[1u8; MAX_KEY_LEN + 1]),
            Err(Error::KeyTooLarge {
                len: 1025,
                max: 1024
            })
        ));
    }

    use super::*;

    #[test]
    fn durations_round_up_to_whole_milliseconds() {
        assert_eq!(
            duration_millis("ttl", Duration::from_micros(1)).ok(),
            Some(1)
        );
        assert_eq!(
            duration_millis("ttl", Duration::from_millis(1500)).ok(),
            Some(1500)
        );
        assert_eq!(
            duration_millis("ttl", MAX_DURATION).ok(),
            Some(3_153_600_000_000)
        );
    }

    #[test]
    fn zero_and_huge_durations_are_refused() {
        for bad in [
            Duration::ZERO,
            MAX_DURATION + Duration::from_secs(1),
            Duration::MAX,
        ] {
            assert!(matches!(
                duration_millis("lease", bad),
                Err(Error::InvalidDuration { what: "lease", .. })
            ));
        }
    }
}
