//! [`IdempotencyLayer`] and its builder: every setting of the middleware, with its default,
//! validated once in [`IdempotencyLayerBuilder::build`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::http::request::Parts;
use ::http::{HeaderName, Method};
use tower::Layer;

use crate::error::{Error, Result};
use crate::limits;
use crate::store::Store;

use super::claim::InFlight;
use super::config::{Config, RouteFn, Scope};
use super::problem::header_title;
use super::service::IdempotencyService;

/// The request header that carries the client's key, by default.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header that marks a replayed response, by default (its value is `true`).
pub const IDEMPOTENCY_REPLAYED: HeaderName = HeaderName::from_static("idempotency-replayed");

/// The default [`Retry-After`](IdempotencyLayerBuilder::retry_after) hint of a `409`: 1 second.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The default cap on a buffered request body: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1024 * 1024;

/// A tower [`Layer`] that makes unsafe HTTP requests idempotent with an `Idempotency-Key`
/// header, on a [`Store`]. See [the module docs](crate::http) for the behaviour.
///
/// Cheap to clone: clones share one configuration and one store.
///
/// ```
/// use dedupe_store::Store;
/// use dedupe_store::http::IdempotencyLayer;
///
/// let store = Store::in_memory()?;
/// let app: axum::Router = axum::Router::new()
///     .route("/charges", axum::routing::post(|| async { "charged" }))
///     .layer(IdempotencyLayer::new(store));
/// # Ok::<(), dedupe_store::Error>(())
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.config.store)
            .field("methods", &self.config.methods)
            .field("key_header", &self.config.key_header)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// The layer with every default (see [`IdempotencyLayerBuilder`]).
    pub fn new(store: Store) -> IdempotencyLayer {
        let max_stored_response = store.engine().config().max_response_bytes;
        // The defaults are valid by construction, so this skips `build`'s checks.
        IdempotencyLayer::builder(store).finish(max_stored_response, max_stored_response)
    }

    /// A builder for every setting, each with a documented default.
    pub fn builder(store: Store) -> IdempotencyLayerBuilder {
        IdempotencyLayerBuilder {
            store,
            methods: vec![Method::POST, Method::PATCH],
            key_header: IDEMPOTENCY_KEY,
            replayed_header: IDEMPOTENCY_REPLAYED,
            require_key: false,
            scope: Scope::Credentials,
            stored_headers: default_stored_headers(),
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            max_response_body: None,
            in_flight: InFlight::Reject,
            retry_after: DEFAULT_RETRY_AFTER,
            store_server_errors: false,
            ttl: None,
            lease: None,
            route_label: None,
        }
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> IdempotencyService<S> {
        IdempotencyService::new(inner, self.config.clone())
    }
}

fn default_stored_headers() -> Vec<HeaderName> {
    use ::http::header;
    vec![
        header::CONTENT_TYPE,
        header::CONTENT_ENCODING,
        header::CONTENT_LANGUAGE,
        header::LOCATION,
    ]
}

/// Builds an [`IdempotencyLayer`]. Every setter states its default; [`build`](Self::build)
/// checks them all.
///
/// ```
/// use std::time::Duration;
/// use dedupe_store::Store;
/// use dedupe_store::http::{IdempotencyLayer, InFlight};
///
/// let store = Store::in_memory()?;
/// let layer = IdempotencyLayer::builder(store)
///     .require_key(true)
///     // Scoped by the tenant a gateway in front of the service names (instead of the
///     // caller's credentials, the default); one tenant's keys never meet another's.
///     .scope(|request: &http::request::Parts| match request.headers.get("x-tenant") {
///         Some(tenant) => [b"tenant:", tenant.as_bytes()].concat(),
///         None => b"no-tenant".to_vec(),
///     })
///     .in_flight(InFlight::Wait(Duration::from_secs(5)))
///     .ttl(Duration::from_secs(24 * 3600))
///     .build()?;
/// # Ok::<(), dedupe_store::Error>(())
/// ```
#[must_use = "a builder does nothing until build()"]
pub struct IdempotencyLayerBuilder {
    store: Store,
    methods: Vec<Method>,
    key_header: HeaderName,
    replayed_header: HeaderName,
    require_key: bool,
    scope: Scope,
    stored_headers: Vec<HeaderName>,
    max_request_body: usize,
    max_response_body: Option<usize>,
    in_flight: InFlight,
    retry_after: Duration,
    store_server_errors: bool,
    ttl: Option<Duration>,
    lease: Option<Duration>,
    route_label: Option<Arc<RouteFn>>,
}

impl fmt::Debug for IdempotencyLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .field("methods", &self.methods)
            .field("key_header", &self.key_header)
            .field("replayed_header", &self.replayed_header)
            .field("require_key", &self.require_key)
            .field("scope", &self.scope)
            .field("stored_headers", &self.stored_headers)
            .field("max_request_body", &self.max_request_body)
            .field("max_response_body", &self.max_response_body)
            .field("in_flight", &self.in_flight)
            .field("retry_after", &self.retry_after)
            .field("store_server_errors", &self.store_server_errors)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayerBuilder {
    /// The methods the layer applies to; requests with other methods pass through untouched.
    /// Default: `POST` and `PATCH` (`PUT` and `DELETE` are idempotent by definition).
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// The request header that carries the client's key. Default: `Idempotency-Key`.
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.key_header = name;
        self
    }

    /// The response header set to `true` on a replayed response. Default:
    /// `Idempotency-Replayed`. Stripe's clients read `Idempotent-Replayed`:
    ///
    /// ```
    /// use dedupe_store::{Store, http::IdempotencyLayer};
    ///
    /// let layer = IdempotencyLayer::builder(Store::in_memory()?)
    ///     .replayed_header(http::HeaderName::from_static("idempotent-replayed"))
    ///     .build()?;
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    pub fn replayed_header(mut self, name: HeaderName) -> Self {
        self.replayed_header = name;
        self
    }

    /// Whether a request without the key header is refused with `400` (problem type
    /// `urn:dedupe-store:idempotency:missing-key`) instead of passing through. Default: false,
    /// it passes through.
    pub fn require_key(mut self, required: bool) -> Self {
        self.require_key = required;
        self
    }

    /// A function of the request (its head: method, URI, headers and the extensions an
    /// authentication layer put there) that names whose key it is: the user, account or
    /// tenant. The stored key is [`scoped_key`](super::scoped_key)`(scope, key)`, so a key in
    /// one scope never blocks, and never replays to, another. Requests that must
    /// not see each other's responses must get different scopes.
    ///
    /// Default: the request's credentials, [`credentials_scope`](super::credentials_scope) of
    /// its headers (a digest of its `Authorization` and `Cookie` headers, or `anonymous`
    /// without either). Replaces [`shared_scope`](Self::shared_scope).
    pub fn scope<F, S>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> S + Send + Sync + 'static,
        S: AsRef<[u8]>,
    {
        self.scope = Scope::Custom(Arc::new(move |parts: &Parts| {
            scope(parts).as_ref().to_vec()
        }));
        self
    }

    /// A function of the request that gives its route template (`/payments/{id}`, not
    /// `/payments/pay_1a2b`), for the `route` label of the layer's metrics and the field of its
    /// span (features `metrics` and `tracing`). The layer sits in front of the router and
    /// cannot see its routes; with axum, apply it with `Router::route_layer` and read
    /// `axum::extract::MatchedPath` from the request's extensions, as below. Return a
    /// template, never the raw path: each distinct label value is a time series of its own.
    /// Default: none, and the label is empty.
    ///
    /// ```
    /// use axum::extract::MatchedPath;
    /// use dedupe_store::{Store, http::IdempotencyLayer};
    ///
    /// let layer = IdempotencyLayer::builder(Store::in_memory()?)
    ///     .route_label(|request: &http::request::Parts| {
    ///         request.extensions.get::<MatchedPath>().map(|path| path.as_str().to_string())
    ///     })
    ///     .build()?;
    /// let app: axum::Router = axum::Router::new()
    ///     .route("/payments/{id}", axum::routing::post(|| async { "charged" }))
    ///     .route_layer(layer);
    /// # Ok::<(), dedupe_store::Error>(())
    /// ```
    pub fn route_label<F>(mut self, label: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.route_label = Some(Arc::new(label));
        self
    }

    /// Puts every request in one scope (the empty one), whoever sends it: every caller shares
    /// one set of keys, so a caller who sends the same key as another, with the same method,
    /// path, query and body, gets the other's stored response, and a key in use by one caller
    /// is `409` for all. Only for services whose callers all act for one principal (an
    /// internal API behind one gateway, say). Replaces [`scope`](Self::scope). Default: not
    /// shared; each request is scoped by its credentials.
    pub fn shared_scope(mut self) -> Self {
        self.scope = Scope::Shared;
        self
    }

    /// The response headers stored with the status and body and replayed to retries (every
    /// value of each, in order). Others are sent with the first response only. Default:
    /// `Content-Type`, `Content-Encoding`, `Content-Language` and `Location`.
    pub fn stored_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.stored_headers = names.into_iter().collect();
        self
    }

    /// The largest request body the layer buffers to fingerprint, in bytes. A larger one gets
    /// `413` (problem type `urn:dedupe-store:idempotency:request-too-large`) before the handler
    /// runs. Default: [`DEFAULT_MAX_REQUEST_BODY`] (1 MiB).
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// The largest response body the layer buffers to store, in bytes; at most the store's
    /// [`max_response_bytes`](crate::StoreBuilder::max_response_bytes), which the whole encoded
    /// response (status, stored headers, body) must also fit. A first response over it is still
    /// sent in full to its client, but cannot be replayed: retries get `500` (problem type
    /// `urn:dedupe-store:idempotency:response-not-replayable`) and the handler does not run
    /// again. Default: the store's `max_response_bytes` (1 MiB unless set).
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_response_body = Some(bytes);
        self
    }

    /// What a request gets while the first request with its key still runs. Default:
    /// [`InFlight::Reject`] (`409`).
    pub fn in_flight(mut self, in_flight: InFlight) -> Self {
        self.in_flight = in_flight;
        self
    }

    /// The `Retry-After` of a `409` for a key whose first request still runs: how long a client
    /// should wait before it tries again. The header is this, in whole seconds rounded up, but
    /// never more than the seconds (rounded up) left on the first request's lease, after which
    /// the retry may take over; never negative. Most requests finish well within their lease,
    /// so a short hint gets the client its answer soon after the first request completes.
    /// Default: [`DEFAULT_RETRY_AFTER`] (1 s).
    pub fn retry_after(mut self, hint: Duration) -> Self {
        self.retry_after = hint;
        self
    }

    /// Whether `5xx` responses are stored and replayed like any other (Stripe's choice).
    /// Default: false: a `5xx` response, like an error from the inner service, releases the
    /// key so the client may retry and run the handler again.
    ///
    /// `404`, `405` and `429` responses are never stored, whatever this says: they mean the
    /// request was not carried out, so they release the key too.
    pub fn store_server_errors(mut self, store: bool) -> Self {
        self.store_server_errors = store;
        self
    }

    /// How long a completed response is replayed (and a key is remembered). Default: the
    /// store's [`ttl`](crate::StoreBuilder::ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long the first request owns its key before a retry may take over, should it hang
    /// or its process die. Default: the store's [`lease`](crate::StoreBuilder::lease).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Checks the settings and builds the layer.
    ///
    /// # Errors
    /// [`Error::InvalidDuration`] for a zero or huge `ttl`, `lease`, `retry_after` or
    /// [`InFlight::Wait`];
    /// [`Error::InvalidConfig`] for an empty method list or a `max_response_body` over the
    /// store's `max_response_bytes`.
    pub fn build(self) -> Result<IdempotencyLayer> {
        if let Some(ttl) = self.ttl {
            limits::duration_millis("ttl", ttl)?;
        }
        if let Some(lease) = self.lease {
            limits::duration_millis("lease", lease)?;
        }
        limits::duration_millis("retry-after", self.retry_after)?;
        if let InFlight::Wait(wait) = self.in_flight {
            limits::duration_millis("in-flight wait", wait)?;
        }
        if self.methods.is_empty() {
            return Err(Error::InvalidConfig {
                reason: "the idempotency layer needs at least one method".to_string(),
            });
        }
        let max_stored_response = self.store.engine().config().max_response_bytes;
        let max_response_body = self.max_response_body.unwrap_or(max_stored_response);
        if max_response_body > max_stored_response {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "max_response_body is {max_response_body}, over the store's \
                     max_response_bytes of {max_stored_response}"
                ),
            });
        }
        Ok(self.finish(max_response_body, max_stored_response))
    }

    fn finish(self, max_response_body: usize, max_stored_response: usize) -> IdempotencyLayer {
        IdempotencyLayer {
            config: Arc::new(Config {
                store: self.store,
                methods: self.methods,
                key_header_title: header_title(&self.key_header),
                key_header: self.key_header,
                replayed_header: self.replayed_header,
                require_key: self.require_key,
                scope: self.scope,
                stored_headers: self.stored_headers,
                max_request_body: self.max_request_body,
                max_response_body,
                max_stored_response,
                in_flight: self.in_flight,
                retry_after: self.retry_after,
                store_server_errors: self.store_server_errors,
                ttl: self.ttl,
                lease: self.lease,
                route_label: self.route_label,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::http::StatusCode;

    #[test]
    fn build_refuses_bad_settings_with_typed_errors() -> Result<()> {
        let store = Store::builder().max_response_bytes(4096).in_memory()?;
        let builder = || IdempotencyLayer::builder(store.clone());
        assert!(matches!(
            builder().ttl(Duration::ZERO).build(),
            Err(Error::InvalidDuration { what: "ttl", .. })
        ));
        assert!(matches!(
            builder().lease(Duration::MAX).build(),
            Err(Error::InvalidDuration { what: "lease", .. })
        ));
        assert!(matches!(
            builder().in_flight(InFlight::Wait(Duration::ZERO)).build(),
            Err(Error::InvalidDuration { .. })
        ));
        assert!(matches!(
            builder().retry_after(Duration::ZERO).build(),
            Err(Error::InvalidDuration {
                what: "retry-after",
                ..
            })
        ));
        assert!(matches!(
            builder().methods([]).build(),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(matches!(
            builder().max_response_body(4097).build(),
            Err(Error::InvalidConfig { .. })
        ));
        let layer = builder().max_response_body(4096).build()?;
        assert_eq!(layer.config.max_response_body, 4096);
        Ok(())
    }

    #[test]
    fn answers_that_say_the_request_never_ran_are_not_kept()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let store = Store::in_memory()?;
        let layer = IdempotencyLayer::new(store.clone());
        for status in [200, 201, 204, 301, 400, 401, 403, 409, 410, 422] {
            assert!(
                layer.config.keeps(StatusCode::from_u16(status)?),
                "{status}"
            );
        }
        for status in [404, 405, 429, 500, 502, 503] {
            assert!(
                !layer.config.keeps(StatusCode::from_u16(status)?),
                "{status}"
            );
        }
        let layer = IdempotencyLayer::builder(store)
            .store_server_errors(true)
            .build()?;
        assert!(layer.config.keeps(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!layer.config.keeps(StatusCode::METHOD_NOT_ALLOWED));
        Ok(())
    }

    #[test]
    fn the_defaults_follow_the_store() -> Result<()> {
        let store = Store::builder().max_response_bytes(2048).in_memory()?;
        let layer = IdempotencyLayer::new(store);
        assert_eq!(layer.config.max_response_body, 2048);
        assert_eq!(layer.config.methods, [Method::POST, Method::PATCH]);
        assert_eq!(layer.config.key_header_title, "Idempotency-Key");
        assert_eq!(layer.config.in_flight, InFlight::Reject);
        assert_eq!(layer.config.retry_after, Duration::from_secs(1));
        assert!(matches!(layer.config.scope, Scope::Credentials));
        Ok(())
    }
}
