//! The values the command line takes: durations and sizes as humans write them, leases,
//! output limits, fingerprints, and keys as text or hex. Each parser's error is the message
//! clap shows before exiting 2.

use std::time::Duration;

use dedupe_store::{MAX_DURATION, MAX_FINGERPRINT_LEN, MAX_KEY_LEN, MAX_RESPONSE_BYTES_LIMIT};

use crate::heartbeat::MIN_LEASE;
use crate::outcome;

/// A duration as humans write it: `300ms`, `90s`, `10m`, `24h`, `30d`, `1h30m`; more than
/// zero and at most the store's 100-year limit.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|err| format!("{err} (write it like 90s, 10m, 24h or 30d)"))?;
    if duration.is_zero() {
        return Err("it must be longer than zero".to_string());
    }
    if duration > MAX_DURATION {
        return Err("it must be at most 100 years".to_string());
    }
    Ok(duration)
}

/// A size in bytes: a plain number, or one with a unit (`B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB`;
/// `K`, `M` and `G` alone are the binary units).
pub(crate) fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (write it like 65536, 64KiB or 1MiB)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "k" | "kib" => 1 << 10,
        "mb" => 1000 * 1000,
        "m" | "mib" => 1 << 20,
        "gb" => 1000 * 1000 * 1000,
        "g" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    number
        .checked_mul(multiplier)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| format!("{text:?} is too large"))
}

pub(crate) fn parse_lease(text: &str) -> Result<Duration, String> {
    let lease = parse_duration(text)?;
    if lease < MIN_LEASE {
        return Err(format!(
            "the lease must be at least {} (the heartbeat renews it every third of the lease, \
             and a shorter one could run out while dedupe is alive and CMD still runs)",
            humantime::format_duration(MIN_LEASE)
        ));
    }
    Ok(lease)
}

pub(crate) fn parse_max_output(text: &str) -> Result<usize, String> {
    let bytes = parse_size(text)?;
    let max = MAX_RESPONSE_BYTES_LIMIT - outcome::HEADER_LEN;
    if bytes > max {
        return Err(format!(
            "at most {max} bytes (256 MiB less the outcome header)"
        ));
    }
    Ok(bytes)
}

/// A key from the command line: its text, and its bytes (the text's, or with `--hex` the
/// bytes the text spells, once [`KeyArg::decode_hex`] ran).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyArg {
    text: String,
    bytes: Vec<u8>,
}

impl KeyArg {
    /// Reads the text as hex (for `--hex`).
    pub fn decode_hex(&mut self) -> Result<(), String> {
        self.bytes = decode_hex(&self.text)?;
        check_key_len(self.bytes.len())
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The command line that names the key to `dedupe`, after `dedupe` (`expire "k"`).
    pub fn expire_command(&self) -> String {
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => format!("dedupe expire {text:?}"),
            Err(_) => format!("dedupe --hex expire {}", encode_hex(&self.bytes)),
        }
    }
}

impl AsRef<[u8]> for KeyArg {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Text keys quoted (`"job/1"`), others as `0x` and their hex.
impl std::fmt::Display for KeyArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => write!(f, "{text:?}"),
            Err(_) => write!(f, "0x{}", encode_hex(&self.bytes)),
        }
    }
}

pub(crate) fn parse_key(text: &str) -> Result<KeyArg, String> {
    if text.is_empty() {
        return Err("a key must not be empty".to_string());
    }
    // A hex key is twice as long as its bytes; its own length is checked once decoded.
    if text.len() > 2 * MAX_KEY_LEN {
        check_key_len(text.len())?;
    }
    Ok(KeyArg {
        text: text.to_string(),
        bytes: text.as_bytes().to_vec(),
    })
}

/// Refuses a key longer than the store takes.
pub(crate) fn check_key_len(len: usize) -> Result<(), String> {
    if len == 0 {
        return Err("a key must not be empty".to_string());
    }
    if len > MAX_KEY_LEN {
        return Err(format!(
            "the key is {len} bytes long, over the limit of {MAX_KEY_LEN}"
        ));
    }
    Ok(())
}

/// The bytes that `text` spells in hex (either case, an even number of digits).
pub(crate) fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err(format!(
            "{text:?} is not hex: it has an odd number of digits"
        ));
    }
    let digit = |byte: u8| match byte {
        b'0'..=b'9' => Ok(byte - b'0'),
        b'a'..=b'f' => Ok(byte - b'a' + 10),
        b'A'..=b'F' => Ok(byte - b'A' + 10),
        _ => Err(format!(
            "{text:?} is not hex: {:?} is not a hex digit",
            char::from(byte)
        )),
    };
    digits
        .chunks(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// `bytes` in lowercase hex.
pub(crate) fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    text
}

pub(crate) fn parse_fingerprint(text: &str) -> Result<String, String> {
    if text.len() > MAX_FINGERPRINT_LEN {
        return Err(format!(
            "the fingerprint is {} bytes long, over the limit of {MAX_FINGERPRINT_LEN}; pass a digest such as $(sha256sum < input)",
            text.len()
        ));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_humans_write_them() -> Result<(), String> {
        assert_eq!(parse_duration("90s")?, Duration::from_secs(90));
        assert_eq!(parse_duration("10m")?, Duration::from_secs(600));
        assert_eq!(parse_duration("24h")?, Duration::from_secs(86_400));
        assert_eq!(parse_duration("30d")?, Duration::from_secs(30 * 86_400));
        assert_eq!(parse_duration("300ms")?, Duration::from_millis(300));
        for bad in ["", "0s", "5", "ten minutes", "200years", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
        Ok(())
    }

    #[test]
    fn hex_keys_decode_and_show() -> Result<(), String> {
        assert_eq!(decode_hex("6a6F62")?, b"job");
        assert_eq!(decode_hex("")?, b"");
        for bad in ["6", "6g", "zz", "6a 6f"] {
            assert!(decode_hex(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(encode_hex(&[0, 0xff, 0x10]), "00ff10");
        let mut key = parse_key("00ff")?;
        assert_eq!(key.to_string(), "\"00ff\"");
        key.decode_hex()?;
        assert_eq!(key.as_bytes(), [0, 0xff]);
        assert_eq!(key.to_string(), "0x00ff");
        assert_eq!(key.expire_command(), "dedupe --hex expire 00ff");
        let mut longest = parse_key(&"ab".repeat(MAX_KEY_LEN))?;
        longest.decode_hex()?;
        assert_eq!(longest.as_bytes().len(), MAX_KEY_LEN);
        assert!(parse_key(&"ab".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(
            parse_key(&"x".repeat(MAX_KEY_LEN + 1))
                .is_ok_and(|key| key.as_bytes().len() > MAX_KEY_LEN)
        );
        Ok(())
    }

    #[test]
    fn sizes_with_and_without_units() -> Result<(), String> {
        assert_eq!(parse_size("0")?, 0);
        assert_eq!(parse_size("1500")?, 1500);
        assert_eq!(parse_size("64KiB")?, 65_536);
        assert_eq!(parse_size("1MiB")?, 1 << 20);
        assert_eq!(parse_size("2MB")?, 2_000_000);
        assert_eq!(parse_size("1 GiB")?, 1 << 30);
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "12 parsecs",
            "-3",
            "99999999999999999999GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(parse_max_output("256MiB").is_err());
        assert!(parse_lease("999ms").is_err());
        assert_eq!(parse_lease("1s")?, MIN_LEASE);
        assert!(parse_max_output("255MiB").is_ok());
        Ok(())
    }
}
