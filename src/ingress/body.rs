//! Reading a request's body for the ingress: refused (413) as soon as it passes the
//! limit, (408) when it does not all come in time; one frame is the body as it came.
//!
//! Owns: the body's bounds. Must not import anything beyond the ingress's errors.

use std::future::Future;

use bytes::Bytes;

use super::response::IngressError;
use super::service;

/// Reads the body, refusing (413) as soon as it passes `limit` — from `Content-Length`
/// before reading anything, or while streaming a chunked body — and (408) when it has
/// not all come within `timeout`. The timer is made, boxed (the request's future, which
/// a held event keeps, does not grow by it), only when the body has to be waited for:
/// one that came with its head never registers one.
pub(super) async fn read_body<B>(
    headers: &http::HeaderMap,
    body: &mut B,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, IngressError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<service::BoxError>,
{
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(IngressError::BodyTooLarge { limit });
    }
    // Most bodies come as one frame: that frame is the body, not copied; more frames are
    // joined into one buffer.
    let mut body = std::pin::Pin::new(body);
    let (mut first, mut joined, mut total) = (None::<Bytes>, None::<bytes::BytesMut>, 0usize);
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let next = |cx: &mut std::task::Context<'_>, body: std::pin::Pin<&mut B>, timer: &mut Option<_>| {
        use std::task::Poll;
        if let Poll::Ready(frame) = body.poll_frame(cx) {
            return Poll::Ready(Ok(frame));
        }
        let timer: &mut std::pin::Pin<Box<tokio::time::Sleep>> =
            timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(IngressError::BodyTimeout(timeout))),
            Poll::Pending => Poll::Pending,
        }
    };
    while let Some(frame) = std::future::poll_fn(|cx| next(cx, body.as_mut(), &mut timer)).await? {
        let frame = frame.map_err(|e| IngressError::BodyRead(e.into().to_string()))?;
        let Ok(data) = frame.into_data() else {
            // Trailers carry nothing the event needs.
            continue;
        };
        total += data.len();
        if total > limit {
            return Err(IngressError::BodyTooLarge { limit });
        }
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(first), None) => {
                let mut buf = bytes::BytesMut::with_capacity(declared.map_or(total, |len| len as usize).max(total));
                buf.extend_from_slice(first);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&data),
        }
    }
    Ok(match (joined, first) {
        (Some(buf), _) => buf.freeze(),
        (None, first) => first.unwrap_or_default(),
    })
}
