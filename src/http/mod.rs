//! HTTP `Idempotency-Key` middleware: a tower [`Layer`](tower::Layer) that gives an axum or
//! hyper service safe retries (the Stripe pattern, and the IETF httpapi draft "The
//! Idempotency-Key HTTP Header Field"). Behind the cargo feature `http`.
//!
//! ```
//! use axum::{Router, routing::post};
//! use dedupe_store::Store;
//! use dedupe_store::http::IdempotencyLayer;
//!
//! # let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path().join("idempotency.redb"))?;
//! // Keys are scoped by the caller's credentials (`Authorization`, `Cookie`): no caller ever
//! // receives another's stored response.
//! let app: Router = Router::new()
//!     .route("/charges", post(|body: String| async move { format!("charged {body}") }))
//!     .layer(IdempotencyLayer::new(store));
//! // axum::serve(listener, app).await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What a request gets
//!
//! The layer applies to the [configured methods](IdempotencyLayerBuilder::methods) (`POST` and
//! `PATCH` by default); other requests pass through untouched. For those it applies to:
//!
//! | request | answer |
//! | --- | --- |
//! | no `Idempotency-Key` header | passed through; or `400 missing-key` when [required](IdempotencyLayerBuilder::require_key) |
//! | a key that is empty, over 255 bytes, neither [form of a key](#keys-and-scopes), or repeated | `400 invalid-key` |
//! | a body over [the limit](IdempotencyLayerBuilder::max_request_body) | `413 request-too-large`, before the handler runs |
//! | a new key | the handler runs once; its status, [stored headers](IdempotencyLayerBuilder::stored_headers) and body are stored, then sent |
//! | a new key whose handler answers `404`, `405` or `429` | the answer is sent, not stored, and the key is released: the request was not carried out |
//! | a key whose request completed | the stored status, headers and body, plus `Idempotency-Replayed: true` |
//! | a key whose first request still runs | `409 key-in-use` with a [`Retry-After`](IdempotencyLayerBuilder::retry_after) hint (1 s by default, never past the first request's lease); or, [when configured](InFlight::Wait), the first request's answer once it is stored |
//! | a key first used with another method, path, query or body | `422 key-reused`: a key names one request |
//! | a store that fails | `503 store-unavailable` |
//!
//! The layer's own answers are `application/problem+json` (RFC 9457) with a `type` of
//! `urn:dedupe-store:idempotency:` and the name in the table.
//!
//! Clients written for Stripe read `Idempotent-Replayed: true` on a replay rather than the
//! draft's `Idempotency-Replayed`: name it with
//! [`replayed_header`](IdempotencyLayerBuilder::replayed_header).
//!
//! # Keys and scopes
//!
//! A client's key is only ever compared with keys of the same *scope*, which names whose keys
//! they are. The stored key is [`scoped_key`]`(scope, key)`, so one scope's key never blocks,
//! and never replays to, another's. The scope is:
//!
//! - by default, the request's credentials: [`credentials_scope`], a SHA-256 digest of its
//!   `Authorization` and `Cookie` headers. Two callers share keys only if they send the same
//!   credentials, so one caller can never receive another's stored response. Requests with
//!   neither header share one `anonymous` scope.
//! - with [`scope`](IdempotencyLayerBuilder::scope), a function of the request: the user or
//!   tenant an authentication layer found, say. Use it when the credentials change between a
//!   request and its retry (a refreshed token, a rotating cookie), which the default would
//!   treat as a new caller, running the handler again.
//! - with [`shared_scope`](IdempotencyLayerBuilder::shared_scope), one scope for everyone:
//!   every caller shares one set of keys and may receive another caller's response. Only for
//!   services whose callers all act for one principal.
//!
//! The header's value is the key in one of two forms, which name the same key: the IETF
//! draft's structured-field string (RFC 8941: in double quotes, printable ASCII including the
//! space, with `\"` and `\\` escaped by a backslash), whose content is the key, so
//! `"order-1"` is the key `order-1`; or the bare form that Stripe-style clients send, visible
//! ASCII not starting with a quote, taken as it is. A key is 1 to
//! [255](MAX_IDEMPOTENCY_KEY_LEN) bytes, counted without the quotes and escapes.
//!
//! Within a scope, a key names one request, as in the IETF draft and at Stripe: the method and
//! path are not part of the stored key but of the request's fingerprint, SHA-256 over its
//! method, path and query, and body. The same key with another method, path, query or body is
//! `422`, never a second, separate request.
//!
//! # Failures
//!
//! - **The handler reports a failure** (the inner service returns an error, or a `5xx`
//!   response): the key is released, so the client may retry and run the handler again.
//!   [`store_server_errors`](IdempotencyLayerBuilder::store_server_errors) keeps `5xx`
//!   responses instead, as Stripe does.
//! - **The answer says the request was not carried out**: `404` (no such route), `405` (a method
//!   the route does not take), `429` (rate limited) release the key too, always, so that such
//!   an answer is never replayed to the retry that would succeed.
//! - **The request ends without an answer** (the client disconnects and the server drops the
//!   request, a timeout layer cancels it, the handler panics): the attempt is *abandoned*. Its
//!   lease is cut short at once, so the retry takes the key over as the next attempt with
//!   [`Ticket::is_takeover`](crate::Ticket::is_takeover) set, since the handler may have done
//!   part of its work. Nothing stays claimed beyond the lease in any case.
//! - **The response is too large to store**: its client still gets all of it; later retries get
//!   `500 response-not-replayable`, and the handler does not run again.
//! - **The process dies**: what was stored is replayed after the restart; a request that was
//!   running is taken over by its retry once its lease has passed.
//!
//! The handler finds the claim's [`Ticket`](crate::Ticket) in its request extensions
//! (`axum::Extension<Ticket>`): the attempt number, the takeover flag, the checkpoints of an
//! abandoned attempt, and the fencing token to pass to downstream systems.
//!
//! # The runtime
//!
//! Store calls wait for fsyncs, so the layer makes every one on tokio's blocking pool and
//! awaits it: the runtime's worker threads never block on the store. A request that
//! [waits](InFlight::Wait) for the first request with its key holds no thread while it waits:
//! it is a task woken by the store's notification that the key changed, so a retry storm of
//! duplicates leaves the blocking pool to every other request. The layer needs a tokio
//! runtime; [`InFlight::Wait`] needs its timer too.
//!
//! # The stored response
//!
//! A completed key's response bytes hold the status, the stored headers and the body in an
//! explicit, versioned encoding, described in `docs/FORMAT.md`; an empty response marks one
//! that was too large to keep.

mod body;
mod claim;
mod config;
mod layer;
mod problem;
mod request;
mod service;
mod stored;

pub use body::ResponseBody;
pub use claim::InFlight;
pub use layer::{
    DEFAULT_MAX_REQUEST_BODY, DEFAULT_RETRY_AFTER, IDEMPOTENCY_KEY, IDEMPOTENCY_REPLAYED,
    IdempotencyLayer, IdempotencyLayerBuilder,
};
pub use request::{MAX_IDEMPOTENCY_KEY_LEN, credentials_scope, scoped_key};
pub use service::{IdempotencyService, ResponseFuture};
