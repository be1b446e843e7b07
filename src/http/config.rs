//! The settings an [`IdempotencyService`](super::IdempotencyService) runs with, as the
//! [builder](super::IdempotencyLayerBuilder) validated them, and what they decide per request:
//! its scope, its route label, and whether its answer is kept.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::http::request::Parts;
use ::http::{HeaderName, Method, StatusCode};

use super::claim::InFlight;
use super::request::credentials_scope;
use crate::store::Store;

pub(crate) type ScopeFn = dyn Fn(&Parts) -> Vec<u8> + Send + Sync;
pub(crate) type RouteFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// Whose keys a request's key is among.
#[derive(Clone)]
pub(crate) enum Scope {
    /// The request's credentials: [`credentials_scope`] of its headers.
    Credentials,
    /// One scope for every request.
    Shared,
    /// A function of the request.
    Custom(Arc<ScopeFn>),
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Credentials => "Credentials",
            Scope::Shared => "Shared",
            Scope::Custom(_) => "Custom",
        })
    }
}

/// The settings an [`IdempotencyService`] runs with, validated.
pub(crate) struct Config {
    pub store: Store,
    pub methods: Vec<Method>,
    pub key_header: HeaderName,
    /// The key header's name as messages show it.
    pub key_header_title: String,
    pub replayed_header: HeaderName,
    pub require_key: bool,
    pub scope: Scope,
    pub stored_headers: Vec<HeaderName>,
    pub max_request_body: usize,
    pub max_response_body: usize,
    /// The store's own cap on a stored response, which the encoded response must fit.
    pub max_stored_response: usize,
    pub in_flight: InFlight,
    pub retry_after: Duration,
    pub store_server_errors: bool,
    pub ttl: Option<Duration>,
    pub lease: Option<Duration>,
    #[cfg_attr(not(any(feature = "tracing", feature = "metrics")), allow(dead_code))]
    pub route_label: Option<Arc<RouteFn>>,
}

impl Config {
    /// The route template that labels a request's metrics and span: what the
    /// [`route_label`](IdempotencyLayerBuilder::route_label) function gives, else empty.
    /// Never the raw path, whose ids would make a label per request.
    #[cfg_attr(not(any(feature = "tracing", feature = "metrics")), allow(dead_code))]
    pub(crate) fn route_of(&self, parts: &Parts) -> String {
        self.route_label
            .as_ref()
            .and_then(|label| label(parts))
            .unwrap_or_default()
    }

    pub(crate) fn applies_to(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// Whether a handler's response with `status` is stored and replayed; if not, the key is
    /// given back. A `404`, `405` or `429` says the request was never carried out (no such
    /// route, a method the route does not take, a rate limit), so its retry must run; a `5xx`
    /// says it failed, unless such answers are kept on purpose.
    pub(crate) fn keeps(&self, status: StatusCode) -> bool {
        if status.is_server_error() {
            return self.store_server_errors;
        }
        !matches!(
            status,
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::TOO_MANY_REQUESTS
        )
    }

    pub(crate) fn scope_of(&self, parts: &Parts) -> Vec<u8> {
        match &self.scope {
            Scope::Credentials => credentials_scope(&parts.headers),
            Scope::Shared => Vec::new(),
            Scope::Custom(scope) => scope(parts),
        }
    }
}
