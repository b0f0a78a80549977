//! The ingress as the tower `Service` the listener drives: one handler for every path
//! (no router — `Target::parse` reads the path, which it must check anyway), the
//! ingress-wide concurrency limit, and the response body type that streams a guest's
//! answer without boxing it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::{deliver, refuse_method, IngressState};
use crate::http1::lines::Fields;
use crate::lifecycle::Permit;
use crate::proxy::{GuardedBody, PooledBody};
use crate::telemetry;

/// Errors of a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `POST /{namespace}/{vm}[/{rest}]`: the ingress, at most `max_concurrent_requests`
/// requests at once (more wait for a slot). Cheap to clone.
#[derive(Clone)]
pub struct Ingress {
    state: IngressState,
    slots: Arc<Semaphore>,
}

impl Ingress {
    /// The ingress over `state`, admitting at most `max_concurrent` requests at once.
    pub fn new(state: IngressState, max_concurrent: usize) -> Ingress {
        Ingress {
            state,
            slots: Arc::new(Semaphore::new(max_concurrent)),
        }
    }
}

impl<B> tower::Service<Request<B>> for Ingress
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<IngressBody>;
    type Error = Infallible;
    type Future = Boxed;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Boxed {
        self.boxed(request)
    }
}

/// Hyper's own service trait, for its HTTP/2 server: through tower's, hyper's adapter
/// keeps the request inline in each stream's task even after the call (264 bytes more
/// per held HTTP/2 event).
impl<B> hyper::service::Service<Request<B>> for Ingress
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<IngressBody>;
    type Error = Infallible;
    type Future = Boxed;

    fn call(&self, request: Request<B>) -> Boxed {
        self.boxed(request)
    }
}

/// The future of the `Service` impls: the request's, boxed.
pub type Boxed = Pin<Box<dyn Future<Output = Result<Response<IngressBody>, Infallible>> + Send>>;

impl Ingress {
    fn boxed<B>(&self, request: Request<B>) -> Boxed
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        use futures_util::FutureExt;
        // `map`, not an `async` block around it: a block awaiting the exchange would keep
        // it twice (as its capture and as its awaited local). Instrumented only when
        // traced: a span, even an empty one, is 40 bytes more per held HTTP/2 event.
        let (parts, body) = request.into_parts();
        let headers = Fields::Map(parts.headers);
        let span = telemetry::enabled().then(|| telemetry::event::span(&headers));
        let exchange = self.exchange(parts.method, parts.uri, headers, body);
        match span {
            Some(span) => Box::pin(exchange.instrument(span).map(Ok)),
            None => Box::pin(exchange.map(Ok)),
        }
    }

    /// Answers a request given as its parts — method, target, header fields, body: the future
    /// the `Service` impls box, unboxed for a caller that holds it inline (the HTTP/1.1
    /// connection's task: one allocation less per request), and taking the parts apart
    /// as that caller has them (a `Request` built only to be taken apart again is
    /// moved, field by field, twice).
    pub fn answer<B>(
        &self,
        method: http::Method,
        uri: http::Uri,
        headers: Fields,
        body: B,
    ) -> impl Future<Output = Response<IngressBody>> + Send + use<B>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        use futures_util::future::Either;
        // Traced: the whole request runs in its span. With traces off there is no span,
        // and no `Instrumented` either: it would enter and leave an empty span at every
        // poll and at its drop.
        if telemetry::enabled() {
            let span = telemetry::event::span(&headers);
            Either::Left(self.exchange(method, uri, headers, body).instrument(span))
        } else {
            Either::Right(self.exchange(method, uri, headers, body))
        }
    }

    /// The exchange of one request. Of the head it keeps what `deliver` reads: the path
    /// and query (40 bytes of the URI's 88) and the headers, not the method, version and
    /// extensions (88 bytes fewer per held event); `deliver` borrows them from the block
    /// (see `deliver`).
    fn exchange<B>(
        &self,
        method: http::Method,
        uri: http::Uri,
        mut headers: Fields,
        mut body: B,
    ) -> impl Future<Output = Response<IngressBody>> + Send + use<B>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        use futures_util::future::Either;
        if method != http::Method::POST {
            return Either::Left(std::future::ready(refuse_method(&self.state, &method, &uri)));
        }
        let path = uri.into_parts().path_and_query;
        let (state, slots) = (self.state.clone(), self.slots.clone());
        Either::Right(async move {
            let _slot = slots.acquire_owned().await.expect("never closed");
            deliver(&state, path.as_ref(), &mut headers, &mut body).await
        })
    }
}

/// A response of the ingress: the guest's answer streaming back (holding the request's
/// permit until it is done), or one the activator made.
pub enum IngressBody {
    /// The guest's body.
    Guest(GuardedBody<PooledBody, Permit>),
    /// An answer of the activator's own (errors).
    Own(axum::body::Body),
}

impl Body for IngressBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            IngressBody::Guest(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            IngressBody::Own(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            IngressBody::Guest(body) => body.is_end_stream(),
            IngressBody::Own(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            IngressBody::Guest(body) => body.size_hint(),
            IngressBody::Own(body) => body.size_hint(),
        }
    }
}
