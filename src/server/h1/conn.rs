//! One HTTP/1.1 connection, served in its own task from start to end: read a head,
//! call the service with a body that reads from the connection, write the response
//! (streaming its body — a guest's, whose connection this same task drives), and go on
//! while the connection may be kept alive.
//!
//! Buffers: none while the connection waits for a request; a head is read into a small
//! buffer that grows only as far as the head needs (up to the head limit); a body larger
//! than what came with its head gets an allocation of its own size; responses are
//! written from a small buffer that holds the head and, when they come at once, the first
//! body bytes; it stays with the connection for the next response while it is small
//! (≤ 1 KiB; a larger one is freed). A request's own bytes, and at most that 1 KiB on a
//! connection that has answered before, are what a held event keeps.
//!
//! Closing with request bytes unread (a body refused before its end — 413 — or a head
//! refused), the connection lingers, as nginx's `lingering_close` does: it ends its own
//! side, then reads and discards what the sender is still writing — at most
//! `LINGER_BYTES` and `LINGER_TIME`, and not past the drain — before it closes. Closed
//! at once, the unread bytes would make the kernel reset the connection, and a sender
//! still writing its body can see the reset before it reads the answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode};
use http_body::Body;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::body::{Reader, ReaderSlot, RequestBody};
use super::head::{self, Framing, Head, HeadError};
use super::write::{self, BodyFraming};
use crate::http1::lines::Fields;
use crate::http1::maps;

/// The first read of a head asks for this much; most CloudEvents heads fit.
const HEAD_START: usize = 1024;
/// Response bytes gathered before they are written.
const WRITE_BATCH: usize = 16 * 1024;
/// The most response buffer a connection keeps between requests (a held event on a
/// kept-alive connection holds it).
const KEEP_OUT: usize = 1024;
/// The longest a closing connection reads and discards what its sender still writes.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// The most a closing connection reads and discards (a body four times the default
/// `ingress.max_body_bytes`).
const LINGER_BYTES: usize = 4 * 1024 * 1024;
/// The most a lingering read takes from the socket at once.
const LINGER_READ: usize = 16 * 1024;

/// Limits of one connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest a head may take to arrive, counted from when the connection waits for
    /// it (an idle kept-alive connection included).
    pub header_read_timeout: Duration,
    /// The largest head (request line and headers) in bytes.
    pub max_head: usize,
}

/// Serves HTTP/1.1 requests on `stream` with `service` until the connection closes,
/// either side ends it, or `stop` turns true (the exchange in progress finishes first).
pub async fn serve<S, B>(stream: TcpStream, service: S, limits: Limits, stop: watch::Receiver<bool>)
where
    S: super::Handler<Body = B>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (read, mut write) = stream.into_split();
    let slot: ReaderSlot = Arc::new(Mutex::new(Some((
        Reader {
            io: read,
            buf: BytesMut::new(),
        },
        true,
    ))));
    // The response buffer, kept between requests up to `KEEP_OUT` bytes.
    let mut out = Vec::new();
    // Made once per connection, not once per request: a timer made and dropped is two
    // updates of the runtime's timer wheel (moving it later is one atomic store), and a
    // wait on `stop` made and dropped is two trips through the watch's waiter list.
    let mut head_timer = None;
    let mut stopping = stop.clone();
    let mut stopped = std::pin::pin!(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    loop {
        let Some((mut reader, true)) = take(&slot) else {
            // The last body was not read to its end: where the next request starts is
            // unknown.
            return;
        };
        let head = match read_head(&mut reader, limits, &mut head_timer, stopped.as_mut()).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(error) => {
                tracing::debug!(%error, "refused request head");
                if answer_error(&mut write, error.status()).await.is_ok() {
                    linger(reader, write, stop).await;
                }
                return;
            }
        };
        let wants_continue =
            head.expect_continue && head.version == http::Version::HTTP_11 && head.framing != Framing::Empty;
        if wants_continue && write.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
            return;
        }
        let Head {
            method,
            uri,
            version,
            headers,
            framing,
            keep_alive,
            ..
        } = head;
        let head_request = method == http::Method::HEAD;
        let body = RequestBody::new(reader, framing, slot.clone());
        let response = service.handle(method, uri, Fields::Lines(headers), body).await;
        let body_read = slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(_, complete)| *complete);
        let close = !keep_alive || !body_read || *stop.borrow() || asks_close(response.headers());
        let written = write_response(&mut write, &mut out, response, version, head_request, close).await;
        out.clear();
        if out.capacity() > KEEP_OUT {
            out = Vec::new();
        }
        match written {
            Ok(true) if !close => {}
            Ok(_) if !body_read => {
                if write.shutdown().await.is_ok() {
                    if let Some((reader, _)) = take(&slot) {
                        linger(reader, write, stop).await;
                    }
                }
                return;
            }
            _ => {
                let _ = write.shutdown().await;
                return;
            }
        }
    }
}

fn take(slot: &ReaderSlot) -> Option<(Reader, bool)> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

fn asks_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| crate::http1::fields::has_token(v.as_bytes(), "close"))
}

/// Reads the next request head within the header-read timeout (on the connection's
/// `timer`): `Ok(None)` when the connection ended (or `stopped` resolved) before a
/// request began.
async fn read_head(
    reader: &mut Reader,
    limits: Limits,
    timer: &mut Option<Pin<Box<Sleep>>>,
    mut stopped: Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<Head>, HeadError> {
    let deadline = Instant::now() + limits.header_read_timeout;
    let timer = match timer {
        Some(timer) => {
            timer.as_mut().reset(deadline);
            timer
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    loop {
        if !reader.buf.is_empty() {
            if let Some(head) = head::parse(&mut reader.buf, limits.max_head)? {
                return Ok(Some(head));
            }
        }
        let started = !reader.buf.is_empty();
        if reader.buf.capacity() == reader.buf.len() {
            // Grow only as the head needs: a small start, then doubling.
            let more = if reader.buf.capacity() == 0 {
                HEAD_START
            } else {
                reader.buf.len()
            };
            reader
                .buf
                .reserve(more.min(limits.max_head.saturating_sub(reader.buf.len()).max(1)));
        }
        let want = reader.buf.capacity() - reader.buf.len();
        let read = std::future::poll_fn(|cx| reader.poll_fill(cx, want));
        let n = tokio::select! {
            biased;
            read = read => match read {
                Ok(n) => n,
                Err(_) => return Ok(None),
            },
            () = timer.as_mut() => {
                tracing::debug!(started, "request head not read in time; closing");
                return Ok(None);
            }
            () = stopped.as_mut(), if !started => return Ok(None),
        };
        if n == 0 {
            return Ok(None);
        }
    }
}

/// Reads and discards what the sender still writes after this side has ended its own
/// (see the module header), until the sender ends, or `LINGER_BYTES` or `LINGER_TIME`
/// is reached, or the server stops.
async fn linger(mut reader: Reader, write: OwnedWriteHalf, mut stop: watch::Receiver<bool>) {
    let read_all = async {
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            reader.buf.clear();
            let want = LINGER_READ.min(LINGER_BYTES - discarded);
            match std::future::poll_fn(|cx| reader.poll_fill(cx, want)).await {
                Ok(0) | Err(_) => return,
                Ok(n) => discarded += n,
            }
        }
        tracing::debug!(discarded, "sender still writing after the lingering bound; closing");
    };
    tokio::select! {
        () = read_all => {}
        () = tokio::time::sleep(LINGER_TIME) => {
            tracing::debug!("sender still writing after the lingering time; closing");
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    drop(write);
}

/// The automatic answer to a head that cannot be served: its status, no body, close.
async fn answer_error(write: &mut OwnedWriteHalf, status: StatusCode) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(128);
    write::head(
        &mut out,
        http::Version::HTTP_11,
        status,
        &http::HeaderMap::new(),
        BodyFraming::Length(0),
        true,
    );
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Writes `response` (head, then its body framed as `write::framing` says). Returns
/// whether the whole response was written as framed (the connection may be reused).
async fn write_response<B>(
    write: &mut OwnedWriteHalf,
    out: &mut Vec<u8>,
    response: Response<B>,
    version: http::Version,
    head_request: bool,
    close: bool,
) -> std::io::Result<bool>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let (parts, body) = response.into_parts();
    let framing = write::framing(
        head_request,
        version,
        parts.status,
        &parts.headers,
        body.size_hint().exact(),
    );
    let close = close || framing == BodyFraming::UntilClose;
    out.reserve(256);
    write::head(out, version, parts.status, &parts.headers, framing, close);
    // Written: the map is kept for the next head this thread parses.
    maps::give_back(parts.headers);
    if framing == BodyFraming::None {
        // Dropped before the answer is written: what it holds (the request's place in
        // flight) is released before the sender can see the answer.
        drop(body);
        write.write_all(out).await?;
        return Ok(true);
    }
    let mut body = std::pin::pin!(body);
    let mut sent: u64 = 0;
    loop {
        // Gather what the body has ready now; write before waiting for more.
        let frame = match poll_now(body.as_mut()) {
            Some(frame) => frame,
            None => {
                if !out.is_empty() {
                    write.write_all(out).await?;
                    out.clear();
                }
                std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers are not sent over HTTP/1.1 here.
                    continue;
                };
                sent += data.len() as u64;
                if let BodyFraming::Length(len) = framing {
                    if sent > len {
                        tracing::debug!(len, "response body longer than its length; closing");
                        return Ok(false);
                    }
                }
                if data.is_empty() {
                    continue;
                }
                if framing == BodyFraming::Chunked {
                    write::chunk_head(out, data.len());
                }
                if out.len() + data.len() <= WRITE_BATCH {
                    out.extend_from_slice(&data);
                } else {
                    write.write_all(out).await?;
                    out.clear();
                    write.write_all(&data).await?;
                }
                if framing == BodyFraming::Chunked {
                    out.extend_from_slice(write::CHUNK_END);
                }
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "response body failed; closing");
                if !out.is_empty() {
                    let _ = write.write_all(out).await;
                }
                return Ok(false);
            }
            None => break,
        }
    }
    let complete = match framing {
        BodyFraming::Length(len) => sent == len,
        BodyFraming::Chunked => {
            out.extend_from_slice(write::LAST_CHUNK);
            true
        }
        _ => true,
    };
    if !out.is_empty() {
        write.write_all(out).await?;
    }
    Ok(complete)
}

/// A body's next frame: some data or trailers, an error, or the end (`None`).
type NextFrame<B> = Option<Result<http_body::Frame<<B as Body>::Data>, <B as Body>::Error>>;

/// The body's next frame if it is ready now (`None` if it is not).
fn poll_now<B: Body>(body: Pin<&mut B>) -> Option<NextFrame<B>> {
    let waker = std::task::Waker::noop();
    match body.poll_frame(&mut Context::from_waker(waker)) {
        Poll::Ready(frame) => Some(frame),
        Poll::Pending => None,
    }
}
