//! Reading from a connection into its buffer without zeroing it first: the one `unsafe`
//! both directions need (the ingress's request bodies, the proxy's guest answers).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

/// Reads into `buf`'s spare capacity — reserving `reserve` more first when it has none,
/// and reading at most `limit` bytes. Ready with the number read: 0 at the end of the
/// stream.
#[inline]
pub fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    reserve: usize,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() == buf.len() {
        // Reclaims the buffer's own allocation when every frame cut from it is gone.
        buf.reserve(reserve);
    }
    let spare = buf.spare_capacity_mut();
    let limit = spare.len().min(limit);
    let mut read = ReadBuf::uninit(&mut spare[..limit]);
    match Pin::new(io).poll_read(cx, &mut read) {
        Poll::Ready(Ok(())) => {
            let n = read.filled().len();
            // SAFETY: `poll_read` initialized the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fills_at_most_the_limit_and_reports_the_end() {
        let mut io: &[u8] = b"hello world";
        let mut buf = BytesMut::new();
        let n = std::future::poll_fn(|cx| poll_fill(&mut io, &mut buf, 4, 3, cx))
            .await
            .unwrap();
        assert_eq!((n, &buf[..]), (3, &b"hel"[..]), "at most the limit");
        let n = std::future::poll_fn(|cx| poll_fill(&mut io, &mut buf, 64, 5, cx))
            .await
            .unwrap();
        assert_eq!(&buf[..3 + n], &b"hello wo"[..3 + n], "appended");
        loop {
            let n = std::future::poll_fn(|cx| poll_fill(&mut io, &mut buf, 64, 64, cx))
                .await
                .unwrap();
            if n == 0 {
                break;
            }
        }
        assert_eq!(&buf[..], b"hello world", "everything, then 0 at the end");
    }
}
