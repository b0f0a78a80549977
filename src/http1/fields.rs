//! Header field values HTTP/1.1 framing decisions read: a `Content-Length`'s digits, a
//! token in a comma-separated list, a `Transfer-Encoding`'s last coding, and whether the
//! connection persists after a message (`Persistence`, for requests and responses alike).
//!
//! Pure: no I/O.

use crate::http1::lines::text;

/// A non-empty run of ASCII digits as a number (no sign, no spaces), if it fits.
pub fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &str) -> bool {
    text(value).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`.
pub fn last_coding_is_chunked(value: &[u8]) -> bool {
    text(value)
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// Whether a connection stays open after a message (RFC 9112 §9.3), as both hyper's
/// server and client decide it: HTTP/1.1 keeps it unless a `Connection` line says
/// `close` — a later `keep-alive` cannot undo that —, HTTP/1.0 closes it unless one says
/// `keep-alive`; a framing that cannot be trusted closes it too.
#[derive(Clone, Copy, Debug)]
pub struct Persistence {
    keep: bool,
    closed: bool,
}

impl Persistence {
    /// The default of the message's version.
    pub fn new(http11: bool) -> Persistence {
        Persistence {
            keep: http11,
            closed: false,
        }
    }

    /// Reads one `Connection` line.
    pub fn connection(&mut self, value: &[u8]) {
        if self.closed || has_token(value, "close") {
            self.close();
        } else if !self.keep {
            self.keep = has_token(value, "keep-alive");
        }
    }

    /// The connection closes after this message, whatever else it says.
    pub fn close(&mut self) {
        self.closed = true;
        self.keep = false;
    }

    /// Whether the connection stays open.
    pub fn keeps(self) -> bool {
        self.keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_tokens_and_codings() {
        assert_eq!(digits(b"0"), Some(0));
        assert_eq!(digits(b"18446744073709551615"), Some(u64::MAX));
        for bad in [&b""[..], b"18446744073709551616", b"+1", b" 1", b"1 ", b"0x1"] {
            assert_eq!(digits(bad), None, "{bad:?}");
        }
        let value = |s: &'static str| s.as_bytes();
        assert!(has_token(value("keep-alive, Close"), "close"));
        assert!(!has_token(value("closed"), "close"));
        assert!(last_coding_is_chunked(value("gzip, Chunked ")));
        assert!(!last_coding_is_chunked(value("chunked, gzip")));
    }

    #[test]
    fn a_close_is_final_and_http10_needs_keep_alive() {
        let lines = |http11: bool, lines: &[&'static str]| {
            let mut p = Persistence::new(http11);
            lines.iter().for_each(|l| p.connection(l.as_bytes()));
            p.keeps()
        };
        assert!(lines(true, &[]));
        assert!(!lines(true, &["close", "keep-alive"]));
        assert!(!lines(false, &[]));
        assert!(lines(false, &["Keep-Alive"]));
        assert!(!lines(false, &["keep-alive", "close"]));
        let mut p = Persistence::new(true);
        p.close();
        p.connection(b"keep-alive");
        assert!(!p.keeps());
    }
}
