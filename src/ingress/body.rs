//! Reading a request's body for the ingress: refused (413) as soon as it passes the
//! limit, (408) when it does not all come in time; one frame is the body as it came.
//!
//! Owns: the body's bounds. Must not import anything beyond the ingress's errors.

use std::future::Future;

use bytes::Bytes;

use super::response::IngressError;
use super::service;

/// Reads the body, refusing (413) as soon as it passes `limit` — from the length it
/// declares (`Content-Length`) before reading anything, or while streaming a chunked body — and (408) when it has
/// not all come within `timeout`. The timer is made, boxed (the request's future, which
/// a held event keeps, does not grow by it), only when the body has to be waited for:
/// one that came with its head never registers one.
///
/// A plain fn returning a block, not an `async fn`: an async fn's future keeps its
/// arguments twice, and this future sets the size of the handler's (the largest of its
/// states), which a held event keeps.
#[allow(clippy::manual_async_fn)] // On purpose: see above.
pub(super) fn read_body<'a, B>(
    body: &'a mut B,
    limit: usize,
    timeout: std::time::Duration,
) -> impl Future<Output = Result<Bytes, IngressError>> + 'a
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<service::BoxError>,
{
    // The length the body declares (its `Content-Length`, which both the HTTP/1.1
    // server and hyper's HTTP/2 take as the body's exact size): no header is looked up.
    let declared = body.size_hint().exact();
    let too_large = declared.is_some_and(|len| len > limit as u64);
    // What a joined buffer is made for: the declared length (within the limit).
    let expected = declared.map_or(0, |len| len as usize);
    async move {
        if too_large {
            return Err(IngressError::BodyTooLarge { limit });
        }
        let mut body = std::pin::Pin::new(body);
        let mut read = Read::Nothing;
        let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        while let Some(frame) = std::future::poll_fn(|cx| next_frame(cx, body.as_mut(), &mut timer, timeout)).await? {
            let frame = frame.map_err(|e| IngressError::BodyRead(e.into().to_string()))?;
            let Ok(data) = frame.into_data() else {
                // Trailers carry nothing the event needs.
                continue;
            };
            if read.len() + data.len() > limit {
                return Err(IngressError::BodyTooLarge { limit });
            }
            read = match read {
                Read::Nothing => Read::One(data),
                // Most bodies come as one frame: that frame is the body, not copied;
                // more frames are joined into one buffer.
                Read::One(first) => {
                    let total = first.len() + data.len();
                    let mut buf = bytes::BytesMut::with_capacity(expected.max(total));
                    buf.extend_from_slice(&first);
                    buf.extend_from_slice(&data);
                    Read::Joined(buf)
                }
                Read::Joined(mut buf) => {
                    buf.extend_from_slice(&data);
                    Read::Joined(buf)
                }
            };
        }
        Ok(match read {
            Read::Nothing => Bytes::new(),
            Read::One(data) => data,
            Read::Joined(buf) => buf.freeze(),
        })
    }
}

/// What a body read has read so far.
enum Read {
    Nothing,
    One(Bytes),
    Joined(bytes::BytesMut),
}

impl Read {
    fn len(&self) -> usize {
        match self {
            Read::Nothing => 0,
            Read::One(data) => data.len(),
            Read::Joined(buf) => buf.len(),
        }
    }
}

/// A body's next frame (`None` at its end), or the error reading it.
type NextFrame<B> = Option<Result<http_body::Frame<Bytes>, <B as http_body::Body>::Error>>;

/// The body's next frame, or 408 once `timeout` has passed since the body was first
/// waited for (the timer made then).
fn next_frame<B>(
    cx: &mut std::task::Context<'_>,
    body: std::pin::Pin<&mut B>,
    timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    timeout: std::time::Duration,
) -> std::task::Poll<Result<NextFrame<B>, IngressError>>
where
    B: http_body::Body<Data = Bytes>,
{
    use std::task::Poll;
    if let Poll::Ready(frame) = body.poll_frame(cx) {
        return Poll::Ready(Ok(frame));
    }
    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(IngressError::BodyTimeout(timeout))),
        Poll::Pending => Poll::Pending,
    }
}
