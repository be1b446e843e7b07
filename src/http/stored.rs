//! The stored response: what the layer keeps in a completed key's response bytes, and reads
//! back to replay.
//!
//! The encoding is explicit and versioned, so that a later release can read what this one
//! wrote (and refuse, clearly, what it cannot) instead of depending on a serializer's layout:
//!
//! ```text
//! offset  size  field
//! 0       1     encoding version (1)
//! 1       2     status code, u16 little-endian
//! 3       4     header count n, u32 little-endian
//! 7       ...   n headers, each: name length u16 LE, name (lowercase ASCII),
//!                                value length u32 LE, value bytes
//! ...     rest  the body, to the end of the response bytes
//! ```
//!
//! Repeated headers are stored as repeated entries, in the order the response had them.

use ::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;

/// The first byte of every response this version stores.
pub(crate) const STORED_RESPONSE_VERSION: u8 = 1;

/// A response as stored under a completed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredResponse {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl StoredResponse {
    /// The response's status, the values of the `stored` headers that it has, and its body.
    pub(crate) fn capture(
        status: StatusCode,
        headers: &HeaderMap,
        stored: &[HeaderName],
        body: Bytes,
    ) -> StoredResponse {
        let mut kept = Vec::new();
        for name in stored {
            for value in headers.get_all(name) {
                kept.push((name.clone(), value.clone()));
            }
        }
        StoredResponse {
            status,
            headers: kept,
            body,
        }
    }

    /// The encoded length, without encoding.
    pub(crate) fn encoded_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| 2 + name.as_str().len() + 4 + value.len())
            .sum();
        1 + 2 + 4 + headers + self.body.len()
    }

    /// The bytes to store, or `None` when they would be longer than `limit` (or a length does
    /// not fit its field, which no real response reaches).
    pub(crate) fn encode(&self, limit: usize) -> Option<Vec<u8>> {
        if self.encoded_len() > limit {
            return None;
        }
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(STORED_RESPONSE_VERSION);
        out.extend_from_slice(&self.status.as_u16().to_le_bytes());
        out.extend_from_slice(&u32::try_from(self.headers.len()).ok()?.to_le_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(&u16::try_from(name.as_str().len()).ok()?.to_le_bytes());
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(&u32::try_from(value.len()).ok()?.to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(&self.body);
        Some(out)
    }

    /// Reads stored bytes back. Every length is checked against what is left, so damaged or
    /// foreign bytes give an error, never a panic or a wrong response.
    pub(crate) fn decode(bytes: &[u8]) -> Result<StoredResponse, String> {
        let mut reader = Reader { rest: bytes };
        let version = reader.take(1)?[0];
        if version != STORED_RESPONSE_VERSION {
            return Err(format!(
                "stored response encoding version {version}; this build reads version \
                 {STORED_RESPONSE_VERSION}"
            ));
        }
        let status = reader.u16()?;
        let status = StatusCode::from_u16(status)
            .map_err(|_| format!("stored status {status} is not a valid status code"))?;
        let count = reader.u32()?;
        let mut headers = Vec::new();
        for _ in 0..count {
            let name_len = usize::from(reader.u16()?);
            let name = HeaderName::from_bytes(reader.take(name_len)?)
                .map_err(|_| "a stored header name is not valid".to_string())?;
            let value_len = usize::try_from(reader.u32()?)
                .map_err(|_| "a stored header value is too long".to_string())?;
            let value = HeaderValue::from_bytes(reader.take(value_len)?)
                .map_err(|_| format!("the stored value of {name} is not a valid header value"))?;
            headers.push((name, value));
        }
        Ok(StoredResponse {
            status,
            headers,
            body: Bytes::copy_from_slice(reader.rest),
        })
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < len {
            return Err("the stored response is truncated".to_string());
        }
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let bytes = self.take(2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::http::header;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.append("x-trace", HeaderValue::from_static("not kept"));
        headers.append(header::LINK, HeaderValue::from_static("</a>"));
        headers.append(header::LINK, HeaderValue::from_static("</b>"));
        StoredResponse::capture(
            StatusCode::CREATED,
            &headers,
            &[header::CONTENT_TYPE, header::LINK, header::LOCATION],
            Bytes::from_static(b"{\"id\":1}"),
        )
    }

    #[test]
    fn a_response_round_trips_with_only_the_stored_headers() -> Result<(), String> {
        let response = sample();
        let names: Vec<_> = response.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "link", "link"]);
        let bytes = response.encode(usize::MAX).ok_or("fits")?;
        assert_eq!(bytes.len(), response.encoded_len());
        assert_eq!(bytes[0], STORED_RESPONSE_VERSION);
        assert_eq!(StoredResponse::decode(&bytes)?, response);
        Ok(())
    }

    #[test]
    fn the_layout_is_the_documented_one() -> Result<(), String> {
        let response = StoredResponse {
            status: StatusCode::ACCEPTED,
            headers: vec![(header::LOCATION, HeaderValue::from_static("/x"))],
            body: Bytes::from_static(b"ok"),
        };
        let bytes = response.encode(usize::MAX).ok_or("fits")?;
        let expected: &[u8] = &[
            1, 202, 0, 1, 0, 0, 0, 8, 0, b'l', b'o', b'c', b'a', b't', b'i', b'o', b'n', 2, 0, 0,
            0, b'/', b'x', b'o', b'k',
        ];
        assert_eq!(bytes, expected);
        Ok(())
    }

    #[test]
    fn a_response_over_the_limit_is_not_encoded() {
        let response = sample();
        assert!(response.encode(response.encoded_len() - 1).is_none());
        assert!(response.encode(response.encoded_len()).is_some());
    }

    #[test]
    fn every_truncation_and_a_foreign_version_are_errors() -> Result<(), String> {
        let bytes = sample().encode(usize::MAX).ok_or("fits")?;
        // Cutting inside the head or a header is an error; cutting the body only shortens it,
        // which the store's CRC guards against.
        let head_len = bytes.len() - sample().body.len();
        for cut in 0..head_len {
            assert!(
                StoredResponse::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut foreign = bytes.clone();
        foreign[0] = 2;
        let err = StoredResponse::decode(&foreign)
            .err()
            .ok_or("version 2 refused")?;
        assert!(err.contains("version 2"), "{err}");
        Ok(())
    }

    #[test]
    fn garbage_fields_are_errors() {
        // Status 42 is not a status code.
        assert!(StoredResponse::decode(&[1, 42, 0, 0, 0, 0, 0]).is_err());
        // A header count far beyond the bytes present.
        assert!(StoredResponse::decode(&[1, 200, 0, 255, 255, 255, 255]).is_err());
        // A header name with a space in it.
        assert!(StoredResponse::decode(&[1, 200, 0, 1, 0, 0, 0, 1, 0, b' ', 0, 0, 0, 0]).is_err());
        // A header value with a newline in it.
        assert!(
            StoredResponse::decode(&[1, 200, 0, 1, 0, 0, 0, 1, 0, b'a', 1, 0, 0, 0, b'\n'])
                .is_err()
        );
    }
}
