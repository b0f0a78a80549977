//! Response bodies: a guest's, read in the task that streams it back — from its
//! connection's buffer, decoding the framing its head announced — bounded in size and in
//! time, giving the connection back to the pool once the body is done; and one that
//! holds a guard (the request's permit) until it is done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::pool::{GuestConn, Pool};
use super::wire::Framing;
use crate::http1::chunked::{ChunkError, Decoder, Step};

/// Why a guest's response body was cut short. Its head has gone to the sender by then,
/// so the sender learns it from a response that ends early (the connection closes).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed while the body was read.
    #[error("the guest's response body failed: {0}")]
    Guest(#[from] std::io::Error),
    /// The guest closed the connection before the body's end.
    #[error("the guest closed the connection before its response body ended")]
    Incomplete,
    /// The chunked body is malformed.
    #[error("the guest's response body: {0}")]
    Chunked(#[from] ChunkError),
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

/// Where a body's reading is.
pub(super) enum Reading {
    /// This many bytes are still to come.
    Length(u64),
    /// A chunked body, decoded as it comes.
    Chunked(Decoder),
    /// Everything until the guest closes.
    UntilClose,
    /// The body is complete (or was cut off).
    Done,
}

impl Reading {
    /// How a body framed so starts.
    pub(super) fn new(framing: Framing) -> Reading {
        match framing {
            Framing::Empty => Reading::Done,
            Framing::Length(len) => Reading::Length(len),
            Framing::Chunked => Reading::Chunked(Decoder::default()),
            Framing::UntilClose => Reading::UntilClose,
        }
    }
}

/// A guest's response body. Polling it reads its connection (in the polling task: the
/// one serving the sender's request); once the body has been read to the end the
/// connection goes back to the pool (if the guest keeps it). A body dropped half-read
/// closes its connection. The body must end by the exchange's deadline and within the
/// size bound: a guest that trickles or answers without end is cut off there.
pub struct PooledBody {
    pub(super) conn: Option<Box<GuestConn>>,
    pub(super) reading: Reading,
    /// The guest keeps the connection after this response.
    pub(super) keep_alive: bool,
    pub(super) pool: Arc<Pool>,
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
    /// Counts `len` body bytes against the size bound.
    fn take(&mut self, len: usize) -> Result<(), BodyError> {
        self.left = self
            .left
            .checked_sub(len as u64)
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

/// What one look at the connection's buffer gave.
enum Next {
    Data(Bytes),
    End,
    NeedMore,
}

impl PooledBody {
    /// The body is complete: its connection is kept for the next request when the guest
    /// keeps it and sent nothing more.
    fn finish(&mut self) {
        self.reading = Reading::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.read.is_empty() {
                self.pool.checkin(conn.endpoint, conn);
            }
        }
    }

    /// Ends the body with `error`; its connection, mid-response, is closed.
    fn cut(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(conn) = self.conn.take() {
            tracing::warn!(endpoint = %conn.endpoint, %error, "guest response cut off");
        }
        self.reading = Reading::Done;
        Poll::Ready(Some(Err(error)))
    }

    /// The next piece of the body from what the connection has buffered.
    fn next(&mut self) -> Result<Next, BodyError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Next::End);
        };
        let buf = &mut conn.read;
        Ok(match &mut self.reading {
            Reading::Done => Next::End,
            Reading::Length(_) | Reading::UntilClose if buf.is_empty() => Next::NeedMore,
            Reading::Length(left) => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= take as u64;
                Next::Data(buf.split_to(take).freeze())
            }
            Reading::UntilClose => Next::Data(buf.split().freeze()),
            Reading::Chunked(decoder) => match decoder.step(buf)? {
                Step::Data(data) => Next::Data(data),
                Step::End => Next::End,
                Step::NeedMore => Next::NeedMore,
            },
        })
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            match this.next() {
                Err(error) => return this.cut(error),
                Ok(Next::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Next::Data(data)) => {
                    if let Err(error) = this.bounds.take(data.len()) {
                        return this.cut(error);
                    }
                    if matches!(this.reading, Reading::Length(0)) {
                        // Given back now, before the sender is answered: the next
                        // request may want it at once.
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Next::NeedMore) => {
                    let conn = this.conn.as_mut().expect("a body reading more has its connection");
                    match conn.poll_fill(cx) {
                        Poll::Ready(Ok(0)) if matches!(this.reading, Reading::UntilClose) => {
                            // The end of a body read until close; the connection is done.
                            this.conn = None;
                            this.reading = Reading::Done;
                            return Poll::Ready(None);
                        }
                        Poll::Ready(Ok(0)) => return this.cut(BodyError::Incomplete),
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(error)) => return this.cut(error.into()),
                        Poll::Pending if this.bounds.expired(cx) => {
                            return this.cut(BodyError::Timeout(this.bounds.timeout));
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.reading, Reading::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Done => SizeHint::with_exact(0),
            Reading::Length(left) => SizeHint::with_exact(left),
            Reading::Chunked(_) | Reading::UntilClose => SizeHint::default(),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body may never be polled.
        if matches!(self.reading, Reading::Done) {
            self.finish();
        }
    }
}

/// A response body that keeps `guard` alive until the body has been fully streamed
/// (or the client went away), so in-flight counting covers the whole exchange.
pub struct GuardedBody<B, G> {
    body: B,
    /// Released when the body has ended or failed: before its end is passed on, so a
    /// sender holding the whole response never finds its request still in flight.
    guard: Option<G>,
}

impl<B, G> GuardedBody<B, G> {
    /// Wraps `body`, holding `guard` until the body has ended or failed, or is dropped.
    pub fn new(body: B, guard: G) -> Self {
        Self {
            body,
            guard: Some(guard),
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
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
