//! The chunked transfer coding of a request body (RFC 9112 §7.1), decoded from the
//! connection's buffer as hyper's server decodes it: a chunk size is hex digits (at
//! least one; overflow refused), optionally followed by spaces or tabs, then extensions
//! after `;` (ignored, at most 16 KiB in all, never a bare LF), then CR LF; each chunk's
//! data ends with CR LF; the last chunk (size 0) may be followed by trailer lines (at
//! most 16 KiB and 100 lines, each a valid header, discarded) and ends with CR LF.
//!
//! Pure: no I/O. The data comes out as slices of the buffer, no copies. Fuzzed by
//! `tests/fuzz/fuzz_targets/h1.rs`.

use bytes::{Buf, Bytes, BytesMut};

use super::MAX_HEADERS;

/// Extension bytes allowed over a whole body (hyper's limit).
const EXTENSIONS_LIMIT: u64 = 16 * 1024;
/// Trailer bytes allowed (hyper's limit).
const TRAILER_LIMIT: usize = 16 * 1024;

/// Why a chunked body cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked body: {0}")]
pub struct ChunkError(&'static str);

/// What one step of decoding gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The buffer holds no more of the body: read more.
    NeedMore,
    /// The body is complete (its terminating CR LF consumed).
    End,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    /// After the last chunk's size line: a trailer line or the final CR.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
    End,
}

/// A chunked body's decoding state.
#[derive(Clone, Debug)]
pub struct Decoder {
    state: State,
    size: u64,
    extensions: u64,
    trailers: Vec<u8>,
    trailer_lines: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            state: State::Start,
            size: 0,
            extensions: 0,
            trailers: Vec::new(),
            trailer_lines: 0,
        }
    }
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

impl Decoder {
    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::End
    }

    /// Decodes from the front of `buf` (consuming what it reads) up to the next data,
    /// the end, or the end of the buffer.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, ChunkError> {
        use State::*;
        loop {
            if self.state == End {
                return Ok(Step::End);
            }
            if self.state == Body {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let take = usize::try_from(self.size).unwrap_or(usize::MAX).min(buf.len());
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = BodyCr;
                }
                return Ok(Step::Data(buf.split_to(take).freeze()));
            }
            let Some(&b) = buf.first() else {
                return Ok(Step::NeedMore);
            };
            buf.advance(1);
            self.state = match (self.state, b) {
                (Start, b) => {
                    self.size = hex(b).ok_or(ChunkError("missing chunk size digit"))?;
                    Size
                }
                (Size, b) if hex(b).is_some() => {
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(hex(b).expect("a hex digit")))
                        .ok_or(ChunkError("chunk size overflows"))?;
                    Size
                }
                (Size | SizeLws, b'\t' | b' ') => SizeLws,
                (Size | SizeLws, b';') => Extension,
                (Size | SizeLws | Extension, b'\r') => SizeLf,
                (Size, _) => return Err(ChunkError("invalid chunk size")),
                (SizeLws, _) => return Err(ChunkError("invalid chunk size whitespace")),
                (Extension, b'\n') => return Err(ChunkError("chunk extension contains a newline")),
                (Extension, _) => {
                    self.extensions += 1;
                    if self.extensions >= EXTENSIONS_LIMIT {
                        return Err(ChunkError("chunk extensions over limit"));
                    }
                    Extension
                }
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Body,
                (SizeLf, _) => return Err(ChunkError("invalid chunk size line end")),
                (BodyCr, b'\r') => BodyLf,
                (BodyCr, _) => return Err(ChunkError("chunk data not followed by CR LF")),
                (BodyLf, b'\n') => Start,
                (BodyLf, _) => return Err(ChunkError("chunk data not followed by CR LF")),
                (EndCr, b'\r') => EndLf,
                (EndCr, b) => {
                    self.trailer_byte(b)?;
                    Trailer
                }
                (Trailer, b'\r') => {
                    self.trailer_byte(b'\r')?;
                    TrailerLf
                }
                (Trailer, b) => {
                    self.trailer_byte(b)?;
                    Trailer
                }
                (TrailerLf, b'\n') => {
                    self.trailer_lines += 1;
                    if self.trailer_lines > MAX_HEADERS {
                        return Err(ChunkError("too many trailers"));
                    }
                    self.trailer_byte(b'\n')?;
                    EndCr
                }
                (TrailerLf, _) => return Err(ChunkError("trailer not ended by CR LF")),
                (EndLf, b'\n') => {
                    self.check_trailers()?;
                    End
                }
                (EndLf, _) => return Err(ChunkError("chunked body not ended by CR LF")),
                (Body | End, _) => unreachable!("handled above"),
            };
        }
    }

    fn trailer_byte(&mut self, b: u8) -> Result<(), ChunkError> {
        if self.trailers.len() >= TRAILER_LIMIT {
            return Err(ChunkError("trailers over limit"));
        }
        self.trailers.push(b);
        Ok(())
    }

    /// Trailers are discarded, but must be headers (as hyper requires).
    fn check_trailers(&mut self) -> Result<(), ChunkError> {
        if self.trailers.is_empty() {
            return Ok(());
        }
        let mut lines = std::mem::take(&mut self.trailers);
        lines.extend_from_slice(b"\r\n");
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(&lines, &mut headers) {
            Ok(httparse::Status::Complete((_, parsed))) => {
                if parsed
                    .iter()
                    .all(|h| http::HeaderName::from_bytes(h.name.as_bytes()).is_ok())
                {
                    Ok(())
                } else {
                    Err(ChunkError("invalid trailer name"))
                }
            }
            _ => Err(ChunkError("invalid trailers")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes all of `input`, fed in pieces of `piece` bytes: the body, or the error.
    fn decode(input: &[u8], piece: usize) -> Result<Vec<u8>, ChunkError> {
        let mut decoder = Decoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.step(&mut buf)? {
                Step::Data(data) => body.extend_from_slice(&data),
                Step::End => return Ok(body),
                Step::NeedMore if fed >= input.len() => return Err(ChunkError("truncated")),
                Step::NeedMore => {
                    let end = (fed + piece).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunks_are_joined_whatever_the_pieces() {
        let input = b"5\r\nhello\r\n1;ext=1;b\r\n \r\nA \r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n";
        for piece in [1, 2, 3, 7, 100] {
            assert_eq!(decode(input, piece).unwrap(), b"hello 0123456789", "pieces of {piece}");
        }
        assert_eq!(decode(b"0\r\n\r\n", 1).unwrap(), b"");
    }

    #[test]
    fn what_hyper_refuses_is_refused() {
        for bad in [
            &b"\r\n0\r\n\r\n"[..],
            b"g\r\nx\r\n0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"1;a\nb\r\nx\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\n\r\r",
            b"-1\r\nx\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(decode(bad, 3).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let mut long_ext = b"1;".to_vec();
        long_ext.extend(std::iter::repeat_n(b'a', EXTENSIONS_LIMIT as usize));
        long_ext.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        assert_eq!(
            decode(&long_ext, 4096).unwrap_err(),
            ChunkError("chunk extensions over limit")
        );
        let mut many = b"0\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("t{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(decode(&many, 4096).unwrap_err(), ChunkError("too many trailers"));
    }
}
