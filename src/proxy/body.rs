//! Response bodies: a guest's, read in the task that streams it back — which drives
//! the guest connection as it reads and gives the connection back to the pool once the
//! body is done — bounded in size and in time; and one that holds a guard (the request's
//! permit) until it is done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::pool::{GuestConn, Pool};
use crate::vm::Endpoint;

/// Why a guest's response body was cut short. Its head has gone to the sender by then,
/// so the sender learns it from a response that ends early (the connection closes).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed while the body was read.
    #[error("the guest's response body failed: {0}")]
    Guest(#[from] hyper::Error),
    /// The body grew past `proxy.max_response_body_bytes`.
    #[error("the guest's response body is larger than proxy.max_response_body_bytes ({limit} bytes)")]
    TooLarge {
        /// The bound.
        limit: u64,
    },
    /// The body did not end within the exchange's `request_timeout`.
    #[error("the guest's response body did not end within the request timeout ({0:?})")]
    Timeout(Duration),
}

/// A guest's response body. Polling it drives its connection (in the polling task: the
/// one serving the sender's request); once the body has been read to the end the
/// connection goes back to the pool. A body dropped half-read closes its connection.
/// The body must end by the exchange's deadline and within the size bound: a guest that
/// trickles or answers without end is cut off there.
pub struct PooledBody {
    pub(super) body: Incoming,
    pub(super) conn: Option<Box<GuestConn>>,
    pub(super) pool: Arc<Pool>,
    pub(super) endpoint: Endpoint,
    pub(super) bounds: Bounds,
}

/// How much of a guest's body may come, and by when.
pub(super) struct Bounds {
    /// Bytes that may still come.
    pub(super) left: u64,
    /// The bound it started from (for the error).
    pub(super) limit: u64,
    /// When the exchange's time is up.
    pub(super) deadline: Instant,
    /// The exchange's whole time (for the error).
    pub(super) timeout: Duration,
    /// Made the first time the body has to wait for the guest: a body that came with its
    /// head (the usual answer to an event) never registers a timer.
    pub(super) timer: Option<Pin<Box<Sleep>>>,
}

impl Bounds {
    /// Counts a frame's bytes against the size bound.
    fn take(&mut self, frame: &Frame<Bytes>) -> Result<(), BodyError> {
        let len = frame.data_ref().map_or(0, |data| data.len() as u64);
        self.left = self
            .left
            .checked_sub(len)
            .ok_or(BodyError::TooLarge { limit: self.limit })?;
        Ok(())
    }

    /// Whether the exchange's time is up (registering the waker for when it will be).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().poll(cx).is_ready()
    }
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
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            // Nothing buffered: read from the guest here, then look again.
            if let Some(conn) = &mut this.conn {
                conn.drive(cx);
            }
            polled = Pin::new(&mut this.body).poll_frame(cx);
        }
        match polled {
            Poll::Pending => {
                if !this.bounds.expired(cx) {
                    return Poll::Pending;
                }
                this.cut(BodyError::Timeout(this.bounds.timeout))
            }
            Poll::Ready(None) => {
                this.check_in(cx);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Err(error) = this.bounds.take(&frame) {
                    return this.cut(error);
                }
                if this.body.is_end_stream() {
                    this.check_in(cx);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl PooledBody {
    /// Ends the body with `error`; its connection, mid-response, is closed.
    fn cut(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        tracing::warn!(endpoint = %self.endpoint, %error, "guest response cut off");
        self.conn = None;
        Poll::Ready(Some(Err(error)))
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
