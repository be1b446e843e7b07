//! [`IdempotencyService`]: the middleware itself, and [`ResponseFuture`], the future of one
//! request through it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::{HeaderValue, Request, Response};
use bytes::Bytes;
use http_body::Body;
use tower::Service;

use crate::claim::{Claim, ClaimOptions};

use super::body::{Buffered, ResponseBody, buffer_response};
use super::claim::{self as claiming, ClaimGuard, StoreFailure};
use super::config::Config;
use super::problem::Problem;
use super::request::{self, BodyError};
use super::stored::StoredResponse;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The service an [`IdempotencyLayer`](super::IdempotencyLayer) wraps around an inner one.
///
/// The inner service gets the request as it came, its body rebuilt from the buffered bytes
/// (hence `ReqBody: From<Bytes>`, which axum's `Body` and `http_body_util::Full` are), and, when
/// the layer claimed a key for it, the claim's [`Ticket`](crate::Ticket) in the request
/// extensions (`axum::Extension<Ticket>`): its attempt number, whether it took over from an
/// abandoned attempt, and the fencing token to hand to downstream systems.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> IdempotencyService<S> {
        IdempotencyService { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .field("store", &self.config.store)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !self.config.applies_to(request.method()) {
            let response = self.inner.call(request);
            return ResponseFuture::new(
                async move { Ok(response.await?.map(ResponseBody::streaming)) },
            );
        }
        // The inner service is called later, after the store answered; take the instance that
        // poll_ready made ready and leave a clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(observed(self.config.clone(), inner, request))
    }
}

type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

/// The future of one request through the layer.
pub struct ResponseFuture<B, E> {
    future: Pin<Box<dyn Future<Output = Answer<B, E>> + Send>>,
}

impl<B, E> ResponseFuture<B, E> {
    fn new(
        future: impl Future<Output = Result<Response<ResponseBody<B>>, E>> + Send + 'static,
    ) -> ResponseFuture<B, E> {
        ResponseFuture {
            future: Box::pin(future),
        }
    }
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.future.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

fn answer<B>(response: Response<Bytes>) -> Response<ResponseBody<B>> {
    response.map(ResponseBody::buffered)
}

fn store_problem<B>(failure: &StoreFailure, config: &Config) -> Response<ResponseBody<B>> {
    answer(match failure {
        StoreFailure::Error(crate::Error::Corrupt { .. }) => {
            Problem::StoredResponseCorrupt.response(failure.to_string())
        }
        StoreFailure::Error(crate::Error::KeyBudgetExhausted { .. }) => {
            Problem::key_budget_exhausted(failure.to_string(), config.retry_after)
        }
        _ => Problem::StoreUnavailable.response(failure.to_string()),
    })
}

/// [`idempotent`], with its span and metrics (features `tracing` and `metrics`).
async fn observed<S, ReqBody, ResBody>(
    config: Arc<Config>,
    inner: S,
    request: Request<ReqBody>,
) -> Result<Response<ResponseBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body + From<Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    #[cfg(any(feature = "tracing", feature = "metrics"))]
    {
        let (parts, body) = request.into_parts();
        let route = config.route_of(&parts);
        let request = Request::from_parts(parts, body);
        let watch = crate::observe::HttpRequest::start(route);
        let future = idempotent(config, inner, request);
        #[cfg(feature = "tracing")]
        let future = tracing::Instrument::instrument(future, watch.span());
        let answered = future.await;
        match &answered {
            Ok((response, outcome)) => watch.finish(outcome, response.status().as_u16()),
            Err(_) => watch.finish("handler_error", 500),
        }
        answered.map(|(response, _)| response)
    }
    #[cfg(not(any(feature = "tracing", feature = "metrics")))]
    {
        idempotent(config, inner, request)
            .await
            .map(|(response, _)| response)
    }
}

/// A request the layer applies to, from its key header to its stored answer; with the answer,
/// what happened, as the `outcome` label of the layer's metrics says it.
async fn idempotent<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<(Response<ResponseBody<ResBody>>, &'static str), S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body + From<Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    let (mut parts, body) = request.into_parts();
    let client_key = match request::idempotency_key(
        &parts.headers,
        &config.key_header,
        &config.key_header_title,
    ) {
        Ok(Some(key)) => key,
        Ok(None) if config.require_key => {
            let response = answer(Problem::MissingKey.response(format!(
                "{} requests need an {} header.",
                parts.method, config.key_header_title
            )));
            return Ok((response, "missing_key"));
        }
        Ok(None) => {
            let response = inner.call(Request::from_parts(parts, body)).await?;
            return Ok((response.map(ResponseBody::streaming), "no_key"));
        }
        Err(reason) => return Ok((answer(Problem::InvalidKey.response(reason)), "invalid_key")),
    };

    let body = match request::buffer_request(&parts.headers, body, config.max_request_body).await {
        Ok(body) => body,
        Err(BodyError::TooLarge) => {
            let response = answer(Problem::RequestTooLarge.response(format!(
                "Requests with an {} header may have a body of at most {} bytes.",
                config.key_header_title, config.max_request_body
            )));
            return Ok((response, "request_too_large"));
        }
        Err(BodyError::Unreadable(reason)) => {
            let response = answer(Problem::RequestUnreadable.response(reason));
            return Ok((response, "request_unreadable"));
        }
    };

    let key = request::scoped_key(&config.scope_of(&parts), &client_key);
    let mut options =
        ClaimOptions::new().fingerprint(request::fingerprint(&parts.method, &parts.uri, &body));
    if let Some(lease) = config.lease {
        options = options.lease(lease);
    }
    if let Some(ttl) = config.ttl {
        options = options.ttl(ttl);
    }

    let ticket = match claiming::claim(&config.store, key, options, config.in_flight).await {
        Ok(Claim::Acquired(ticket)) => ticket,
        Ok(Claim::Completed(outcome)) => {
            return Ok((replay(&config, &outcome.response), "replayed"));
        }
        Ok(Claim::InProgress { retry_after, .. }) => {
            let response = answer(Problem::key_in_use(retry_after, config.retry_after));
            return Ok((response, "in_progress"));
        }
        Ok(Claim::Mismatch { .. }) => {
            let response = answer(Problem::KeyReused.response(format!(
                "The {} header was first used with a different request (method, path, query \
                 or body); use a new key for a new request.",
                config.key_header_title
            )));
            return Ok((response, "mismatch"));
        }
        Err(failure) => {
            let outcome = match &failure {
                StoreFailure::Error(crate::Error::KeyBudgetExhausted { .. }) => {
                    "key_budget_exhausted"
                }
                _ => "store_error",
            };
            return Ok((store_problem(&failure, &config), outcome));
        }
    };

    // From here until the answer is stored, a drop of this future abandons the attempt.
    let guard = ClaimGuard::new(config.store.clone(), ticket);
    if let Some(ticket) = guard.ticket() {
        parts.extensions.insert(ticket.clone());
    }
    let response = match inner
        .call(Request::from_parts(parts, ReqBody::from(body)))
        .await
    {
        Ok(response) => response,
        Err(err) => {
            guard.release().await;
            return Err(err);
        }
    };
    if !config.keeps(response.status()) {
        guard.release().await;
        return Ok((response.map(ResponseBody::streaming), "released"));
    }

    let (parts, body) = response.into_parts();
    match buffer_response(body, config.max_response_body).await {
        Buffered::Complete(body) => {
            let stored = StoredResponse::capture(
                parts.status,
                &parts.headers,
                &config.stored_headers,
                body.clone(),
            );
            // An encoding over the store's limit (large stored headers) is kept as "not
            // replayable", like a body over the layer's limit.
            let encoded = stored
                .encode(config.max_stored_response)
                .unwrap_or_default();
            guard.complete(encoded, config.ttl).await;
            let response = Response::from_parts(parts, ResponseBody::buffered(body));
            Ok((response, "executed"))
        }
        Buffered::Overflow { prefix, rest } => {
            // The handler ran: the key must not run it again, so it is completed with the
            // empty marker that replays as "not replayable", and this client gets the whole
            // response, streamed.
            guard.complete(Vec::new(), config.ttl).await;
            let response = Response::from_parts(parts, ResponseBody::resumed(prefix, rest));
            Ok((response, "executed"))
        }
        Buffered::Failed(reason) => {
            // The handler ran and may have done its work, so this is not a failure it reported:
            // the attempt is abandoned, as if dropped, and the retry takes over.
            drop(guard);
            let response = answer(
                Problem::ResponseFailed.response(format!("The response body failed: {reason}")),
            );
            Ok((response, "response_failed"))
        }
    }
}

/// The stored answer of a completed key, marked as a replay.
fn replay<B>(config: &Config, stored: &[u8]) -> Response<ResponseBody<B>> {
    if stored.is_empty() {
        return answer(Problem::ResponseNotReplayable.response(
            "The request with this key was processed, but its response was larger than the \
             server keeps, so it cannot be replayed.",
        ));
    }
    match StoredResponse::decode(stored) {
        Ok(stored) => {
            let mut response = Response::new(ResponseBody::buffered(stored.body));
            *response.status_mut() = stored.status;
            let headers = response.headers_mut();
            for (name, value) in stored.headers {
                headers.append(name, value);
            }
            headers.insert(
                config.replayed_header.clone(),
                HeaderValue::from_static("true"),
            );
            response
        }
        Err(reason) => answer(Problem::StoredResponseCorrupt.response(reason)),
    }
}
