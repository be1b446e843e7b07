//! [`ResponseBody`]: the body of every response the layer returns: a buffered one (a first
//! response that was stored, a replay, a problem) or the inner service's own, streamed.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

pin_project! {
    /// The body of a response from [`IdempotencyService`](super::IdempotencyService): either
    /// bytes the layer holds (a stored or replayed response, a problem) or the inner service's
    /// body, streamed as it comes.
    ///
    /// Trailers of an inner body that the layer buffered are not kept.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<B> {
        Buffered { data: Option<Bytes> },
        Streaming { #[pin] body: B },
        // A body the layer started to buffer and gave up on (too large to store): the part it
        // read, then the rest. Boxed because it was polled behind a pin while being buffered.
        Resumed { prefix: Option<Bytes>, rest: Pin<Box<B>> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn buffered(data: Bytes) -> ResponseBody<B> {
        ResponseBody {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn streaming(body: B) -> ResponseBody<B> {
        ResponseBody {
            kind: Kind::Streaming { body },
        }
    }

    pub(crate) fn resumed(prefix: Bytes, rest: Pin<Box<B>>) -> ResponseBody<B> {
        ResponseBody {
            kind: Kind::Resumed {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Buffered { .. } => "Buffered",
            Kind::Streaming { .. } => "Streaming",
            Kind::Resumed { .. } => "Resumed",
        };
        f.debug_struct("ResponseBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProjection::Buffered { data } => Poll::Ready(data.take().map(Frame::data).map(Ok)),
            KindProjection::Streaming { body } => body.poll_frame(cx),
            KindProjection::Resumed { prefix, rest } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => rest.as_mut().poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data } => data.is_none(),
            Kind::Streaming { body } => body.is_end_stream(),
            Kind::Resumed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            Kind::Streaming { body } => body.size_hint(),
            Kind::Resumed { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |prefix| prefix.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(extra));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(extra));
                }
                hint
            }
        }
    }
}

/// An inner response body, read for storing.
pub(crate) enum Buffered<B> {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// The body passed the limit: what was read, and the rest, still to be sent.
    Overflow { prefix: Bytes, rest: Pin<Box<B>> },
    /// Reading the body failed.
    Failed(String),
}

/// Reads `body` to its end, holding at most `limit` bytes plus one frame.
pub(crate) async fn buffer_response<B>(body: B, limit: usize) -> Buffered<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = Box::pin(body);
    let mut read = BytesMut::new();
    while let Some(frame) = body.as_mut().frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: a stored response has none.
                Err(_) => continue,
            },
            Err(err) => return Buffered::Failed(err.into().to_string()),
        };
        read.extend_from_slice(&data);
        if read.len() > limit {
            return Buffered::Overflow {
                prefix: read.freeze(),
                rest: body,
            };
        }
    }
    Buffered::Complete(read.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;

    fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, std::io::Error> {
        Ok(tokio::runtime::Builder::new_current_thread()
            .build()?
            .block_on(future))
    }

    #[test]
    fn a_buffered_body_is_exact_and_ends() -> Result<(), Box<dyn std::error::Error>> {
        let body = ResponseBody::<Full<Bytes>>::buffered(Bytes::from_static(b"hello"));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let bytes = block_on(body.collect())??.to_bytes();
        assert_eq!(bytes, "hello");
        let empty = ResponseBody::<Full<Bytes>>::buffered(Bytes::new());
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
        Ok(())
    }

    #[test]
    fn a_resumed_body_sends_its_prefix_then_the_rest() -> Result<(), Box<dyn std::error::Error>> {
        let rest = Box::pin(Full::new(Bytes::from_static(b" world")));
        let body = ResponseBody::resumed(Bytes::from_static(b"hello"), rest);
        assert_eq!(body.size_hint().exact(), Some(11));
        let bytes: Bytes = block_on(body.collect())??.to_bytes();
        assert_eq!(bytes, "hello world");
        Ok(())
    }

    #[test]
    fn a_streaming_body_is_the_inner_one() -> Result<(), Box<dyn std::error::Error>> {
        let body = ResponseBody::streaming(Full::new(Bytes::from_static(b"inner")));
        let bytes: Bytes = block_on(body.collect())?
            .map_err(|never: Infallible| never)?
            .to_bytes();
        assert_eq!(bytes, "inner");
        Ok(())
    }
}
