//! Response bodies: a guest's, read in the task that streams it back — which drives
//! the guest connection as it reads and gives the connection back to the pool once the
//! body is done — and one that holds a guard (the request's permit) until it is done.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::{GuestConn, Pool};
use crate::vm::Endpoint;

/// A guest's response body. Polling it drives its connection (in the polling task: the
/// one serving the sender's request); once the body has been read to the end the
/// connection goes back to the pool. A body dropped half-read closes its connection.
pub struct PooledBody {
    pub(super) body: Incoming,
    pub(super) conn: Option<Box<GuestConn>>,
    pub(super) pool: Arc<Pool>,
    pub(super) endpoint: Endpoint,
}

impl PooledBody {
    /// The body is done: the connection, driven past the end of this exchange, is kept
    /// for the next request.
    fn check_in(&mut self, cx: &mut Context<'_>) {
        if let Some(mut conn) = self.conn.take() {
            if conn.drive(cx) {
                self.pool.checkin(self.endpoint, conn);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            // Nothing buffered: read from the guest here, then look again.
            if let Some(conn) = &mut this.conn {
                conn.drive(cx);
            }
            polled = Pin::new(&mut this.body).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => this.check_in(cx),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.check_in(cx),
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
        if self.body.is_end_stream() {
            self.check_in(&mut Context::from_waker(Waker::noop()));
        }
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
