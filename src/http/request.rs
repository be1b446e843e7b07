//! What the layer takes from a request: the client's key (checked), the stored key it is
//! scoped to, the request body (bounded) and the request's fingerprint.
//!
//! The fingerprint is SHA-256: a collision would let one request replay another's response
//! under the same key, so the hash must resist clients who try to craft one, and SHA-256 is the
//! digest other systems (and the IETF `Idempotency-Key` draft's examples) already use, pure
//! Rust, hardware-accelerated where the CPU has SHA extensions. Bodies are capped at a few MiB,
//! so BLAKE3's extra speed would not show next to an fsync.

use ::http::{HeaderMap, HeaderName, Method, Uri};
use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use sha2::{Digest, Sha256};

use crate::key::Key;

/// The longest key accepted, in bytes: the bare value, or a quoted value's content without
/// its quotes and escapes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Scope and key parts longer than this are replaced by their digest in the stored key, so
/// that both parts always fit [`MAX_KEY_LEN`](crate::MAX_KEY_LEN).
const MAX_KEY_PART: usize = 200;

/// The stored key for a request: [`Key::scoped`] over `scope` and the client's key, so equal
/// client keys in different scopes never meet. The method and path are not part of it: a key
/// names one request, and the same key on another method or path is that request's key reused
/// for another, which the fingerprint tells apart (`422`).
///
/// A part longer than 200 bytes is replaced by `sha256:` and the lowercase hex SHA-256 of the
/// part, so the key always fits [`MAX_KEY_LEN`](crate::MAX_KEY_LEN). Use it to look a
/// request's key up in the store, or to [`expire`](crate::Store::expire) it.
///
/// ```
/// use dedupe_store::{Key, http::scoped_key};
///
/// let key = scoped_key(b"tenant-7", b"abc");
/// assert_eq!(key, Key::scoped(["tenant-7", "abc"]));
/// ```
pub fn scoped_key(scope: &[u8], idempotency_key: &[u8]) -> Key {
    Key::scoped([key_part(scope), key_part(idempotency_key)])
}

/// The scope of a request by its credentials, the layer's default
/// [scope](super::IdempotencyLayerBuilder::scope): `credentials:` and the lowercase hex SHA-256
/// of every `Authorization` and `Cookie` header value, in order and length-prefixed; or
/// `anonymous` when the request has neither header (every request without credentials shares
/// that one scope).
///
/// Two requests share a scope only if they carry the same credentials, byte for byte. A client
/// whose credentials change between a request and its retry (a refreshed token, a new cookie)
/// is in a new scope for the retry, and the handler runs again: services whose callers' headers
/// change that way should [scope](super::IdempotencyLayerBuilder::scope) by the principal an
/// authentication layer found instead.
///
/// ```
/// use dedupe_store::http::credentials_scope;
/// use http::{HeaderMap, HeaderValue, header};
///
/// let mut alice = HeaderMap::new();
/// alice.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer alice"));
/// let mut bob = HeaderMap::new();
/// bob.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer bob"));
/// assert_ne!(credentials_scope(&alice), credentials_scope(&bob));
/// assert_eq!(credentials_scope(&HeaderMap::new()), b"anonymous");
/// ```
pub fn credentials_scope(headers: &HeaderMap) -> Vec<u8> {
    use ::http::header::{AUTHORIZATION, COOKIE};
    let mut hasher = Sha256::new();
    hasher.update(b"dedupe-store http credentials v1");
    let mut any = false;
    for (name, tag) in [(AUTHORIZATION, 0u8), (COOKIE, 1u8)] {
        for value in headers.get_all(name) {
            any = true;
            hasher.update([tag]);
            hasher.update((value.len() as u64).to_le_bytes());
            hasher.update(value.as_bytes());
        }
    }
    if !any {
        return b"anonymous".to_vec();
    }
    let mut scope = b"credentials:".to_vec();
    scope.extend_from_slice(hex(&hasher.finalize()).as_bytes());
    scope
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn key_part(part: &[u8]) -> Vec<u8> {
    if part.len() <= MAX_KEY_PART {
        return part.to_vec();
    }
    let mut digest = b"sha256:".to_vec();
    digest.extend_from_slice(hex(&Sha256::digest(part)).as_bytes());
    digest
}

/// The client's key from the `name` header (`shown` as `name` in messages): `Ok(None)` when
/// there is none, `Err` with the reason when it is not a usable key.
///
/// Two forms name the same key:
///
/// - the IETF draft's, an RFC 8941 sf-string: `"` and printable ASCII (space to `~`), with `"`
///   and `\` escaped by a backslash, then `"` ending the value. The key is the string's content:
///   `"q-1"` is the key `q-1`, and `"a b"` the key `a b`.
/// - the bare form Stripe-style clients send, not starting with `"`: visible ASCII (`!` to `~`),
///   taken as it is.
///
/// Refused: a repeated header, an empty key, a key over 255 bytes, a byte outside those ranges,
/// a malformed sf-string (unterminated, a backslash before anything but `"` or `\`, anything
/// after the closing quote).
pub(crate) fn idempotency_key(
    headers: &HeaderMap,
    name: &HeaderName,
    shown: &str,
) -> Result<Option<Vec<u8>>, String> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("The request has more than one {shown} header."));
    }
    let raw = value.as_bytes().trim_ascii();
    let key = match raw.strip_prefix(b"\"") {
        Some(quoted) => sf_string(quoted).map_err(|reason| {
            format!("The {shown} header is not a valid structured-field string: {reason}.")
        })?,
        None => {
            if let Some(bad) = raw.iter().find(|byte| !(0x21..=0x7e).contains(*byte)) {
                return Err(format!(
                    "The {shown} header must be visible ASCII (0x21 to 0x7e), or a quoted \
                     string; it has byte 0x{bad:02x}."
                ));
            }
            raw.to_vec()
        }
    };
    if key.is_empty() {
        return Err(format!("The {shown} header is empty."));
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(format!(
            "The {shown} header's key is {} bytes long; the limit is {MAX_IDEMPOTENCY_KEY_LEN}.",
            key.len()
        ));
    }
    Ok(Some(key))
}

/// The content of an RFC 8941 sf-string whose opening quote is already consumed: printable
/// ASCII up to the closing quote, `\"` and `\\` unescaped, nothing after it.
fn sf_string(quoted: &[u8]) -> Result<Vec<u8>, String> {
    let mut content = Vec::with_capacity(quoted.len());
    let mut bytes = quoted.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => content.push(escaped),
                Some(other) => {
                    return Err(format!("a backslash escapes byte 0x{other:02x}"));
                }
                None => return Err("it ends in a backslash".to_string()),
            },
            b'"' => {
                return match bytes.as_slice() {
                    [] => Ok(content),
                    _ => Err("there is more after the closing quote".to_string()),
                };
            }
            0x20..=0x7e => content.push(byte),
            other => return Err(format!("it has byte 0x{other:02x}")),
        }
    }
    Err("it has no closing quote".to_string())
}

/// Why a request body could not be buffered.
pub(crate) enum BodyError {
    /// It is longer than the limit.
    TooLarge,
    /// Reading it failed (the client went away, a decoding layer failed).
    Unreadable(String),
}

/// The whole request body, or an error once it passes `limit` bytes: never more than `limit`
/// bytes are held. A `Content-Length` over the limit is refused before anything is read.
pub(crate) async fn buffer_request<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
) -> Result<Bytes, BodyError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<LengthLimitError>() => Err(BodyError::TooLarge),
        Err(err) => Err(BodyError::Unreadable(err.to_string())),
    }
}

/// The request's fingerprint: SHA-256 over the method, the path with its query, and the body,
/// each length-prefixed so that no two different requests hash the same input.
pub(crate) fn fingerprint(method: &Method, uri: &Uri, body: &[u8]) -> [u8; 32] {
    let target = uri.path_and_query().map_or("/", |target| target.as_str());
    let mut hasher = Sha256::new();
    hasher.update(b"dedupe-store http fingerprint v1");
    for field in [method.as_str().as_bytes(), target.as_bytes(), body] {
        hasher.update((field.len() as u64).to_le_bytes());
        hasher.update(field);
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_KEY_LEN;
    use ::http::HeaderValue;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                map.append("idempotency-key", value);
            }
        }
        map
    }

    fn check(values: &[&[u8]]) -> Result<Option<Vec<u8>>, String> {
        let name = HeaderName::from_static("idempotency-key");
        idempotency_key(&headers(values), &name, "Idempotency-Key")
    }

    #[test]
    fn bare_keys_are_visible_ascii_up_to_255_bytes() {
        assert_eq!(check(&[]), Ok(None));
        assert_eq!(check(&[b"abc-123"]), Ok(Some(b"abc-123".to_vec())));
        let longest = vec![b'k'; 255];
        assert_eq!(check(&[&longest]), Ok(Some(longest.clone())));
        assert!(check(&[&[b'k'; 256]]).is_err());
        assert!(check(&[b""]).is_err());
        assert!(check(&[b"a b"]).is_err());
        assert!(check(&[b"a\tb"]).is_err());
        assert!(check(&["caf\u{e9}".as_bytes()]).is_err());
        assert!(check(&[b"one", b"two"]).is_err());
        // Only a leading quote makes an sf-string; elsewhere it is a byte like any other.
        assert_eq!(check(&[br#"a"b\"#]), Ok(Some(br#"a"b\"#.to_vec())));
    }

    #[test]
    fn sf_string_keys_are_their_content() {
        let key = |value: &[u8]| check(&[value]);
        assert_eq!(key(br#""q-1""#), Ok(Some(b"q-1".to_vec())));
        assert_eq!(key(br#""q-1""#), key(b"q-1"), "both forms name one key");
        assert_eq!(key(br#""a b""#), Ok(Some(b"a b".to_vec())));
        assert_eq!(key(br#""a\"b""#), Ok(Some(br#"a"b"#.to_vec())));
        assert_eq!(key(br#""a\\b""#), Ok(Some(br"a\b".to_vec())));
        let longest = [b"\"".as_slice(), &[b'k'; 255], b"\""].concat();
        assert_eq!(key(&longest), Ok(Some(vec![b'k'; 255])));
        let too_long = [b"\"".as_slice(), &[b'k'; 256], b"\""].concat();
        assert!(key(&too_long).is_err());
        for bad in [
            br#""""#.as_slice(),
            br#"""#,
            br#""abc"#,
            br#""abc"x"#,
            br#""abc";p=1"#,
            br#""a\nb""#,
            br#""abc\"#,
            b"\"a\tb\"",
        ] {
            assert!(key(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn credentials_scope_by_authorization_and_cookie() {
        use ::http::header::{AUTHORIZATION, COOKIE};
        let with = |pairs: &[(HeaderName, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(name.clone(), HeaderValue::from_static(value));
            }
            credentials_scope(&map)
        };
        assert_eq!(with(&[]), b"anonymous");
        let alice = with(&[(AUTHORIZATION, "Bearer alice")]);
        assert!(alice.starts_with(b"credentials:"));
        assert_eq!(alice, with(&[(AUTHORIZATION, "Bearer alice")]));
        assert_ne!(alice, with(&[(AUTHORIZATION, "Bearer bob")]));
        let session = with(&[(COOKIE, "session=1")]);
        assert_ne!(session, b"anonymous");
        assert_ne!(session, with(&[(COOKIE, "session=2")]));
        assert_ne!(
            alice,
            with(&[(AUTHORIZATION, "Bearer alice"), (COOKIE, "a=1")])
        );
        // The same bytes under the other header name are other credentials.
        assert_ne!(
            with(&[(AUTHORIZATION, "session=1")]),
            with(&[(COOKIE, "session=1")])
        );
        // Unrelated headers do not count.
        assert_eq!(
            with(&[(HeaderName::from_static("x-tenant"), "acme")]),
            b"anonymous"
        );
    }

    #[test]
    fn scoped_keys_keep_parts_apart_and_always_fit() {
        let a = scoped_key(b"t1", b"k");
        assert_ne!(a, scoped_key(b"t2", b"k"));
        assert_ne!(a, scoped_key(b"t1", b"k2"));

        let key = scoped_key(&[b's'; 5000], &[b'k'; 255]);
        assert!(key.as_bytes().len() <= MAX_KEY_LEN);
        assert_ne!(key, scoped_key(&[b'r'; 5000], &[b'k'; 255]));
    }

    #[test]
    fn the_fingerprint_covers_method_target_and_body() -> Result<(), ::http::uri::InvalidUri> {
        let uri: Uri = "/charges?currency=eur".parse()?;
        let base = fingerprint(&Method::POST, &uri, b"amount=10");
        assert_eq!(base, fingerprint(&Method::POST, &uri, b"amount=10"));
        assert_ne!(base, fingerprint(&Method::PATCH, &uri, b"amount=10"));
        assert_ne!(
            base,
            fingerprint(&Method::POST, &"/charges".parse()?, b"amount=10")
        );
        assert_ne!(base, fingerprint(&Method::POST, &uri, b"amount=11"));
        // Length prefixes: moving bytes between target and body changes the fingerprint.
        assert_ne!(
            fingerprint(&Method::POST, &"/ab".parse()?, b"c"),
            fingerprint(&Method::POST, &"/a".parse()?, b"bc")
        );
        Ok(())
    }
}
