//! The record envelope of the redb engine: `[version: u8][crc32: u32 LE][bincode payload]`,
//! where the CRC32 covers the record's stored key as well as the payload.
//!
//! `docs/FORMAT.md` describes the layout; this module is its only reader and writer.

use crate::record::Record;

/// The version byte written in front of every record, and the file's format version.
pub(crate) const RECORD_VERSION: u8 = 1;

const HEADER_LEN: usize = 5;

/// The largest payload a record may claim to hold. A decoder given corrupt bytes must not
/// allocate more than this, whatever a length prefix says.
const MAX_PAYLOAD: usize = 1 << 30;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_PAYLOAD>()
}

/// Why a stored record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub String);

/// The envelope's checksum: CRC32 of the stored key's length (u32 LE), the stored key and the
/// payload. Covering the key means a record that a damaged page shows under another key fails
/// its check instead of answering for that key.
fn checksum(stored_key: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(
        &u32::try_from(stored_key.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    hasher.update(stored_key);
    hasher.update(payload);
    hasher.finalize()
}

/// Writes the record stored under `stored_key` into its envelope.
pub(crate) fn encode(stored_key: &[u8], record: &Record) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[0] = RECORD_VERSION;
    // Encoding into a Vec cannot fail for these types: no maps with non-string keys, no
    // sequences without a length, and the sizes are checked against the limits before this.
    match bincode::serde::encode_into_std_write(record, &mut out, config()) {
        Ok(_) => {}
        Err(err) => unreachable_encoding(&err),
    }
    let crc = checksum(stored_key, &out[HEADER_LEN..]);
    out[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    out
}

#[cold]
fn unreachable_encoding(err: &bincode::error::EncodeError) -> ! {
    // Only reachable if a record exceeded MAX_PAYLOAD, which the input limits prevent.
    panic!("a record failed to encode: {err}")
}

/// Reads the record stored under `stored_key` out of its envelope, checking version and
/// checksum first.
pub(crate) fn decode(stored_key: &[u8], bytes: &[u8]) -> Result<Record, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError(format!(
            "{} bytes is shorter than the {HEADER_LEN}-byte envelope header",
            bytes.len()
        )));
    }
    let version = bytes[0];
    if version != RECORD_VERSION {
        return Err(DecodeError(format!(
            "unknown record version {version} (this build reads {RECORD_VERSION})"
        )));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[1..HEADER_LEN]);
    let stored = u32::from_le_bytes(crc);
    let payload = &bytes[HEADER_LEN..];
    let actual = checksum(stored_key, payload);
    if stored != actual {
        return Err(DecodeError(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        )));
    }
    let (record, used): (Record, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|err| DecodeError(format!("payload does not decode: {err}")))?;
    if used != payload.len() {
        return Err(DecodeError(format!(
            "{} trailing bytes after the payload",
            payload.len() - used
        )));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ByteString, RecordState};

    fn sample() -> Record {
        Record {
            fencing_token: 7,
            attempt: 2,
            fingerprint: Some(ByteString(b"fp".to_vec())),
            expires_at: 1_000,
            state: RecordState::Completed {
                completed_at: 900,
                response: ByteString(b"hello".to_vec()),
            },
        }
    }

    #[test]
    fn records_round_trip() {
        let record = sample();
        assert_eq!(decode(b"kkey", &encode(b"kkey", &record)), Ok(record));
    }

    #[test]
    fn every_single_byte_flip_is_caught() {
        let bytes = encode(b"kkey", &sample());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                assert!(
                    decode(b"kkey", &flipped).is_err(),
                    "flip of bit {bit} in byte {i}"
                );
            }
        }
    }

    #[test]
    fn truncations_and_extensions_are_caught() {
        let bytes = encode(b"kkey", &sample());
        for len in 0..bytes.len() {
            assert!(
                decode(b"kkey", &bytes[..len]).is_err(),
                "truncated to {len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(b"kkey", &longer).is_err());
    }

    #[test]
    fn a_record_under_another_key_is_caught() {
        let bytes = encode(b"kkey-20", &sample());
        assert!(decode(b"kkey-20", &bytes).is_ok());
        for other in [&b"kkey-21"[..], b"kkey-2", b"kkey-200", b"skey-20", b""] {
            assert!(decode(other, &bytes).is_err(), "decoded under {other:?}");
        }
    }

    #[test]
    fn a_huge_length_prefix_is_refused_without_allocating_it() {
        // A payload that claims a multi-gigabyte response, with a valid checksum.
        let mut payload = vec![7u8, 2, 0, 0xe8, 0x07, 1, 0x84, 0x03];
        payload.extend_from_slice(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        let mut bytes = vec![RECORD_VERSION];
        bytes.extend_from_slice(&checksum(b"k", &payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        assert!(decode(b"k", &bytes).is_err());
    }
}
