//! One HTTP/1.1 connection to a guest: its socket, the bytes read but not used yet, and
//! the buffer its request heads are written into — no task of its own, no channel.
//! Whoever holds it does its I/O, in that task: the request's task writes the request
//! and reads the response head (`exchange`), the response body reads the rest, and the
//! pool keeps it in between. What does not change per request stays with it: the `host`
//! line and the write buffer's capacity.
//!
//! It also draws the line the retries depend on: a request none of whose bytes was
//! written comes back as [`Exchange::NotSent`]; once one byte was written, a failure is
//! [`Exchange::Failed`] — the guest may have acted on it.
//!
//! The timer bounding the wait for a response head is the connection's too: made once,
//! moved to each exchange's deadline (a later deadline is one atomic store in tokio's
//! timer; a timer made and dropped per request was two updates of the timer wheel).
//!
//! Owns: the socket's reads and writes and that timer. Knows nothing of pools.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::wire::{self, ResponseHead};
use super::GuestRequest;
use crate::vm::Endpoint;

/// The most one read asks the socket for, and what the read buffer is given when it is
/// full — hyper's initial buffer size: an idle pooled connection keeps at most this.
const READ_CHUNK: usize = 8 * 1024;

/// How an exchange failed.
#[derive(Debug)]
pub(super) enum Exchange {
    /// No byte of the request was written: it may be sent again, elsewhere.
    NotSent(io::Error),
    /// The request was (perhaps partly) sent and no usable answer came.
    Failed(String),
}

/// One HTTP/1.1 connection to a guest.
pub(super) struct GuestConn {
    stream: TcpStream,
    /// Read from the socket, not used yet.
    pub(super) read: BytesMut,
    /// The request head being written; its capacity is kept for the next one.
    write: Vec<u8>,
    /// `host: <endpoint>\r\n`.
    host_line: Box<[u8]>,
    /// Where it goes (kept here, not in each response body: the body is part of every
    /// HTTP/2 stream's task, sized for its largest state).
    pub(super) endpoint: Endpoint,
    /// Bounds the wait for a response head; made at the first exchange.
    timer: Option<Pin<Box<Sleep>>>,
}

impl GuestConn {
    /// A connection over `stream` to `endpoint`.
    pub(super) fn new(stream: TcpStream, endpoint: Endpoint) -> GuestConn {
        GuestConn {
            stream,
            read: BytesMut::new(),
            write: Vec::new(),
            host_line: wire::host_line(endpoint),
            endpoint,
            timer: None,
        }
    }

    /// Whether an idle connection can take a request: nothing unread and not closed by
    /// the guest, as far as the socket's last readiness tells (no system call when it
    /// says nothing happened).
    pub(super) fn usable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// [`GuestConn::exchange`], given up at `deadline` (`None`: no head by then).
    pub(super) async fn exchange_by(
        &mut self,
        request: &GuestRequest,
        deadline: Instant,
    ) -> Option<Result<ResponseHead, Exchange>> {
        let mut timer = match self.timer.take() {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let exchanged = tokio::select! {
            biased;
            exchanged = self.exchange(request) => Some(exchanged),
            () = timer.as_mut() => None,
        };
        self.timer = Some(timer);
        exchanged
    }

    /// Sends `request` and reads the final response head.
    pub(super) async fn exchange(&mut self, request: &GuestRequest) -> Result<ResponseHead, Exchange> {
        let body = &request.body;
        wire::encode_request(
            &mut self.write,
            &request.method,
            &request.uri,
            &self.host_line,
            &request.headers,
            body.len(),
        );
        self.write_request(body).await?;
        let head_request = request.method == http::Method::HEAD;
        loop {
            match wire::parse_response(&mut self.read, head_request) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(error) => return Err(Exchange::Failed(error.to_string())),
            }
            match poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) if self.read.is_empty() => {
                    return Err(Exchange::Failed(
                        "the guest closed the connection without answering".into(),
                    ))
                }
                Ok(0) => return Err(Exchange::Failed("the guest closed the connection mid-answer".into())),
                Ok(_) => {}
                Err(error) => return Err(Exchange::Failed(describe(&error))),
            }
        }
    }

    /// Writes the head in `self.write` and then `body`, in as few system calls as the
    /// socket takes (one, for an event).
    async fn write_request(&mut self, body: &Bytes) -> Result<(), Exchange> {
        let total = self.write.len() + body.len();
        let mut written = 0;
        while written < total {
            let (head, body) = (&self.write[..], &body[..]);
            let result = poll_fn(|cx| {
                let slices = if written < head.len() {
                    [IoSlice::new(&head[written..]), IoSlice::new(body)]
                } else {
                    [IoSlice::new(&body[written - head.len()..]), IoSlice::new(&[])]
                };
                Pin::new(&mut self.stream).poll_write_vectored(cx, &slices)
            })
            .await;
            match result {
                Ok(0) if written == 0 => return Err(Exchange::NotSent(io::ErrorKind::WriteZero.into())),
                Ok(0) => {
                    return Err(Exchange::Failed(
                        "the guest connection took no more of the request".into(),
                    ))
                }
                Ok(n) => written += n,
                Err(error) if written == 0 => return Err(Exchange::NotSent(error)),
                Err(error) => return Err(Exchange::Failed(describe(&error))),
            }
        }
        Ok(())
    }

    /// Reads more into `self.read`. Ready with the number of bytes read: 0 at the end of
    /// the stream.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        crate::http1::fill::poll_fill(&mut self.stream, &mut self.read, READ_CHUNK, READ_CHUNK, cx)
    }
}

/// A socket error as the operator reads it.
pub(super) fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::ConnectionReset => "reset".into(),
        io::ErrorKind::BrokenPipe => "closed by the guest (broken pipe)".into(),
        _ => e.to_string(),
    }
}
