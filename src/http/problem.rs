//! The layer's own answers, as `application/problem+json` (RFC 9457) bodies with a `type` URI
//! per kind, so clients can tell them apart from the application's responses.

use std::time::Duration;

use ::http::{HeaderName, HeaderValue, Response, StatusCode, header};
use bytes::Bytes;

/// Why the layer answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    /// The key header is required and absent.
    MissingKey,
    /// The key header is empty, too long, in neither form of a key, or repeated.
    InvalidKey,
    /// The request body is over the layer's limit.
    RequestTooLarge,
    /// The request body could not be read.
    RequestUnreadable,
    /// The first request with this key is still running.
    KeyInUse,
    /// The key was used before with a different request.
    KeyReused,
    /// The first response was too large to store.
    ResponseNotReplayable,
    /// The handler's response body failed while it was being buffered.
    ResponseFailed,
    /// The stored response could not be read back.
    StoredResponseCorrupt,
    /// The store could not be reached (a storage error, a closed store).
    StoreUnavailable,
    /// The store holds its budget of keys and takes no new one until keys expire.
    KeyBudgetExhausted,
}

impl Problem {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Problem::MissingKey | Problem::InvalidKey | Problem::RequestUnreadable => {
                StatusCode::BAD_REQUEST
            }
            Problem::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::KeyInUse => StatusCode::CONFLICT,
            Problem::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::ResponseNotReplayable
            | Problem::ResponseFailed
            | Problem::StoredResponseCorrupt => StatusCode::INTERNAL_SERVER_ERROR,
            Problem::StoreUnavailable | Problem::KeyBudgetExhausted => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The problem's `type` URI.
    pub(crate) fn type_uri(self) -> &'static str {
        match self {
            Problem::MissingKey => "urn:dedupe-store:idempotency:missing-key",
            Problem::InvalidKey => "urn:dedupe-store:idempotency:invalid-key",
            Problem::RequestTooLarge => "urn:dedupe-store:idempotency:request-too-large",
            Problem::RequestUnreadable => "urn:dedupe-store:idempotency:request-unreadable",
            Problem::KeyInUse => "urn:dedupe-store:idempotency:key-in-use",
            Problem::KeyReused => "urn:dedupe-store:idempotency:key-reused",
            Problem::ResponseNotReplayable => {
                "urn:dedupe-store:idempotency:response-not-replayable"
            }
            Problem::ResponseFailed => "urn:dedupe-store:idempotency:response-failed",
            Problem::StoredResponseCorrupt => {
                "urn:dedupe-store:idempotency:stored-response-corrupt"
            }
            Problem::StoreUnavailable => "urn:dedupe-store:idempotency:store-unavailable",
            Problem::KeyBudgetExhausted => "urn:dedupe-store:idempotency:key-budget-exhausted",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Problem::MissingKey => "An Idempotency-Key header is required",
            Problem::InvalidKey => "The Idempotency-Key header is not valid",
            Problem::RequestTooLarge => "The request body is too large",
            Problem::RequestUnreadable => "The request body could not be read",
            Problem::KeyInUse => "A request with this idempotency key is still being processed",
            Problem::KeyReused => "This idempotency key was used with a different request",
            Problem::ResponseNotReplayable => "The original response cannot be replayed",
            Problem::ResponseFailed => "The response failed while it was being recorded",
            Problem::StoredResponseCorrupt => "The stored response could not be read",
            Problem::StoreUnavailable => "The idempotency store is unavailable",
            Problem::KeyBudgetExhausted => "The idempotency store takes no new keys for now",
        }
    }

    /// The problem response, with `detail` saying what exactly was wrong.
    pub(crate) fn response(self, detail: impl Into<String>) -> Response<Bytes> {
        let status = self.status();
        let body = serde_json::json!({
            "type": self.type_uri(),
            "title": self.title(),
            "status": status.as_u16(),
            "detail": detail.into(),
        });
        let mut response = Response::new(Bytes::from(body.to_string()));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }

    /// A `409` whose `Retry-After` is `hint`, but never past the first request's lease, which
    /// ends in `lease_left`: whole seconds, each rounded up, the smaller of the two. Never
    /// negative; `0` once the lease is over.
    pub(crate) fn key_in_use(lease_left: Duration, hint: Duration) -> Response<Bytes> {
        let seconds = whole_seconds(lease_left).min(whole_seconds(hint));
        let mut response = Problem::KeyInUse.response(format!(
            "The first request with this key is still running; retry in {seconds} s."
        ));
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        response
    }
}

impl Problem {
    /// A `503` for a new key refused at the store's key budget, with `hint` as its
    /// `Retry-After` (whole seconds, rounded up): room comes back as keys expire.
    pub(crate) fn key_budget_exhausted(detail: String, hint: Duration) -> Response<Bytes> {
        let mut response = Problem::KeyBudgetExhausted.response(detail);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(whole_seconds(hint)));
        response
    }
}

/// A duration in whole seconds, rounded up.
fn whole_seconds(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis().div_ceil(1000)).unwrap_or(u64::MAX)
}

/// A header name as people write it in prose (`Idempotency-Key`); `HeaderName` keeps only the
/// lowercase form.
pub(crate) fn header_title(name: &HeaderName) -> String {
    name.as_str()
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_json_with_its_type_and_status() -> Result<(), serde_json::Error> {
        let response = Problem::KeyReused.response("the body differs");
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body: serde_json::Value = serde_json::from_slice(response.body())?;
        assert_eq!(body["type"], "urn:dedupe-store:idempotency:key-reused");
        assert_eq!(body["status"], 422);
        assert_eq!(body["detail"], "the body differs");
        Ok(())
    }

    #[test]
    fn header_names_are_title_cased_for_people() {
        assert_eq!(
            header_title(&HeaderName::from_static("idempotency-key")),
            "Idempotency-Key"
        );
        assert_eq!(header_title(&HeaderName::from_static("x--a")), "X--A");
    }

    #[test]
    fn retry_after_is_the_hint_but_never_past_the_lease() {
        let second = Duration::from_secs(1);
        for (lease_left, hint, expected) in [
            (Duration::from_secs(29), second, "1"),
            (Duration::from_secs(29), Duration::from_millis(2500), "3"),
            (Duration::from_secs(29), Duration::from_secs(60), "29"),
            (Duration::from_millis(29_001), Duration::from_secs(60), "30"),
            (Duration::from_millis(1), Duration::from_secs(5), "1"),
            (Duration::ZERO, second, "0"),
        ] {
            let response = Problem::key_in_use(lease_left, hint);
            assert_eq!(response.status(), StatusCode::CONFLICT);
            assert_eq!(
                response.headers()[header::RETRY_AFTER],
                expected,
                "{lease_left:?} {hint:?}"
            );
        }
    }
}
