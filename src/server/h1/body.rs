//! A request's body, read from its connection by whoever reads the body — the task that
//! serves the connection, which is also the one running the service — with no channel:
//! the body holds the connection's read side while the request is served and hands it
//! back (with any bytes of a pipelined next request) once the body is complete, or when
//! it is dropped unread (the connection then closes after the response).
//!
//! A held event's body is read before it is held, so while it waits the connection holds
//! no read buffer: a body that ends leaves an empty buffer behind, and an empty buffer
//! holds no memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::net::tcp::OwnedReadHalf;

use super::head::Framing;
use crate::http1::chunked::{ChunkError, Decoder, Step};

/// The most a body read asks the socket for at once.
const READ_CHUNK: usize = 64 * 1024;

/// The read side of a connection: its socket half and what was read but not used yet.
pub struct Reader {
    pub(super) io: OwnedReadHalf,
    pub(super) buf: BytesMut,
}

impl Reader {
    /// Reads more into the buffer, at most `want` bytes (and at least some room). Ready
    /// with the number read: 0 at the end of the stream.
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        crate::http1::fill::poll_fill(&mut self.io, &mut self.buf, want.clamp(1, READ_CHUNK), want.max(1), cx)
    }
}

/// Where a body hands the reader back, and whether the body was read to its end.
pub(super) type ReaderSlot = Arc<Mutex<Option<(Reader, bool)>>>;

enum State {
    Length(u64),
    Chunked(Decoder),
    Done,
}

/// Why a body could not be read (the ingress answers 400).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection ended before the body did.
    #[error("the connection closed before the body was complete")]
    Incomplete,
    /// Reading failed.
    #[error("reading the body failed: {0}")]
    Io(#[from] std::io::Error),
    /// A chunked body that does not decode.
    #[error(transparent)]
    Chunked(#[from] ChunkError),
}

/// A request body read from its connection (see the module header).
pub struct RequestBody {
    reader: Option<Reader>,
    state: State,
    slot: ReaderSlot,
}

impl RequestBody {
    /// The body of a request framed as `framing`, read through `reader`, which goes back
    /// to `slot`.
    pub(super) fn new(reader: Reader, framing: Framing, slot: ReaderSlot) -> RequestBody {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(len) => State::Length(len),
            Framing::Chunked => State::Chunked(Decoder::default()),
        };
        let mut body = RequestBody {
            reader: Some(reader),
            state,
            slot,
        };
        if matches!(body.state, State::Done) {
            body.give_back(true);
        }
        body
    }

    /// Hands the reader back; an empty buffer gives its memory back too.
    fn give_back(&mut self, complete: bool) {
        if let Some(mut reader) = self.reader.take() {
            if reader.buf.is_empty() {
                reader.buf = BytesMut::new();
            }
            *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((reader, complete));
        }
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.give_back(true);
    }

    fn fail(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state = State::Done;
        self.give_back(false);
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(reader) = this.reader.as_mut() else {
                return Poll::Ready(None);
            };
            let want = match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Length(remaining) => {
                    if !reader.buf.is_empty() {
                        let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(reader.buf.len());
                        let data = reader.buf.split_to(take).freeze();
                        *remaining -= take as u64;
                        if *remaining == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    // A fresh buffer of the size still to come: the data read is the
                    // body's own allocation, not a larger one it would keep alive.
                    usize::try_from(*remaining).unwrap_or(usize::MAX).min(READ_CHUNK)
                }
                State::Chunked(decoder) => match decoder.step(&mut reader.buf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => 4096,
                    Err(error) => return this.fail(error.into()),
                },
            };
            if reader.buf.is_empty() && reader.buf.capacity() < want {
                reader.buf = BytesMut::with_capacity(want);
            }
            match reader.poll_fill(cx, want) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => return this.fail(BodyError::Incomplete),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(remaining) => SizeHint::with_exact(remaining),
            State::Done => SizeHint::with_exact(0),
            State::Chunked(_) => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // Dropped before its end: the connection cannot tell where the next request
        // starts, and closes after the response.
        let complete = matches!(self.state, State::Done);
        self.give_back(complete);
    }
}
