//! Keys: plain byte strings, and unambiguous composites of several parts.

use std::fmt;

/// The longest key the store accepts, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// A key: 1 to [`MAX_KEY_LEN`] bytes.
///
/// Every store method takes `impl AsRef<[u8]>`, so a `&str`, a `Vec<u8>` or a `&Key` all work.
/// Build composite keys with [`Key::scoped`] so that one tenant's keys can never collide with
/// another's.
///
/// Length is checked when the key is used, so building a key never fails.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(Vec<u8>);

impl Key {
    /// A key made of these bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Key {
        Key(bytes.into())
    }

    /// An unambiguous composite key from parts such as tenant, operation and client key.
    ///
    /// Each part is written as its decimal length, a colon, then its bytes (`"4:acme5:pay:x"`),
    /// so different part lists always give different keys: `["a:b", "c"]` never equals
    /// `["a", "b:c"]`. A scoped key of some parts is a byte prefix of every scoped key that
    /// starts with those parts, which makes prefix listings per tenant work.
    ///
    /// ```
    /// use dedupe_store::Key;
    ///
    /// let a = Key::scoped(["a:b", "c"]);
    /// let b = Key::scoped(["a", "b:c"]);
    /// assert_ne!(a, b);
    /// assert_eq!(a.parts().unwrap(), vec![&b"a:b"[..], &b"c"[..]]);
    /// assert!(Key::scoped(["acme", "pay", "k1"]).as_bytes().starts_with(Key::scoped(["acme"]).as_bytes()));
    /// ```
    pub fn scoped<I, P>(parts: I) -> Key
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let mut bytes = Vec::new();
        for part in parts {
            let part = part.as_ref();
            bytes.extend_from_slice(part.len().to_string().as_bytes());
            bytes.push(b':');
            bytes.extend_from_slice(part);
        }
        Key(bytes)
    }

    /// The parts of a key built by [`Key::scoped`], or `None` when the bytes are not in that
    /// form.
    pub fn parts(&self) -> Option<Vec<&[u8]>> {
        let mut parts = Vec::new();
        let mut rest = self.0.as_slice();
        while !rest.is_empty() {
            let colon = rest.iter().position(|&b| b == b':')?;
            let digits = &rest[..colon];
            let canonical = !digits.is_empty()
                && digits.iter().all(u8::is_ascii_digit)
                && (digits.len() == 1 || digits[0] != b'0');
            if !canonical {
                return None;
            }
            let len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
            let body = rest.get(colon + 1..)?;
            if body.len() < len {
                return None;
            }
            parts.push(&body[..len]);
            rest = &body[len..];
        }
        Some(parts)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key's bytes, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key(s.as_bytes().to_vec())
    }
}

impl From<String> for Key {
    fn from(s: String) -> Key {
        Key(s.into_bytes())
    }
}

impl From<&[u8]> for Key {
    fn from(bytes: &[u8]) -> Key {
        Key(bytes.to_vec())
    }
}

impl From<Vec<u8>> for Key {
    fn from(bytes: Vec<u8>) -> Key {
        Key(bytes)
    }
}

/// Shows the key as text when it is printable UTF-8, else as hex.
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) if !text.chars().any(char::is_control) => write!(f, "{text:?}"),
            _ => {
                f.write_str("0x")?;
                for byte in &self.0 {
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_keys_round_trip_their_parts() {
        let key = Key::scoped(["tenant", "", "a:b:c", "12345678901"]);
        let parts = key.parts().expect("scoped key parses");
        assert_eq!(
            parts,
            vec![&b"tenant"[..], &b""[..], &b"a:b:c"[..], &b"12345678901"[..]]
        );
    }

    #[test]
    fn plain_keys_are_not_mistaken_for_scoped_ones() {
        assert_eq!(Key::from("order-42").parts(), None);
        assert_eq!(Key::from("05:abcde").parts(), None);
        assert_eq!(Key::from("9:short").parts(), None);
    }

    #[test]
    fn display_escapes_binary_keys() {
        assert_eq!(Key::from("k1").to_string(), "\"k1\"");
        assert_eq!(Key::new(vec![0u8, 255]).to_string(), "0x00ff");
    }
}
