//! Response bodies: a guest's, which gives its connection back to the pool once read to
//! the end, and one that holds a guard (the request's permit) until it is done.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::{Pool, Sender};
use crate::vm::Endpoint;

/// A guest's response body; its connection goes back to the pool once the body has been
/// read to the end (a body dropped half-read takes its connection with it).
pub struct PooledBody {
    pub(super) body: Incoming,
    pub(super) conn: Option<(Arc<Pool>, Endpoint, Sender)>,
}

impl PooledBody {
    fn check_in_if_done(&mut self) {
        if self.body.is_end_stream() {
            if let Some((pool, endpoint, sender)) = self.conn.take() {
                pool.checkin(endpoint, sender);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some((pool, endpoint, sender)) = self.conn.take() {
                    pool.checkin(endpoint, sender);
                }
            }
            Poll::Ready(Some(Ok(_))) => self.check_in_if_done(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body may never be polled.
        self.check_in_if_done();
    }
}

/// A response body that keeps `guard` alive until the body has been fully streamed
/// (or the client went away), so in-flight counting covers the whole exchange.
pub struct GuardedBody<B, G> {
    body: B,
    _guard: G,
}

impl<B, G> GuardedBody<B, G> {
    /// Wraps `body`, holding `guard` until it is dropped.
    pub fn new(body: B, guard: G) -> Self {
        Self { body, _guard: guard }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
