//! Fuzzes the proxy's own HTTP/1.1 response parser (`proxy::wire`): what a guest answers,
//! fed as a socket would deliver it. Never a panic; the same outcome whether the bytes
//! come all at once or in pieces of any size (the first input byte chooses the piece
//! size and whether the request was a HEAD); a final head is never 1xx, and what follows
//! it stays in the buffer untouched. Run: see docs/testing.md "Fuzzing".
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use vm_activator::proxy::wire::{self, Framing};

/// What the parser made of a byte stream: the head (status, headers, framing,
/// keep-alive) and the bytes left after it, or how it failed.
#[derive(Debug, PartialEq)]
enum Outcome {
    Head(u16, Vec<(String, Vec<u8>)>, Framing, bool, Vec<u8>),
    Error(String),
    Incomplete,
}

fn run(input: &[u8], piece: usize, head_request: bool) -> Outcome {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    loop {
        match wire::parse_response(&mut buf, head_request) {
            Ok(Some(head)) => {
                assert!(!head.status.is_informational(), "a final head is never 1xx");
                if let Framing::Length(len) = head.framing {
                    assert!(len > 0, "an empty body is framed Empty");
                }
                let headers = head
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect();
                // Everything not fed yet follows what was left in the buffer.
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&input[fed..]);
                return Outcome::Head(head.status.as_u16(), headers, head.framing, head.keep_alive, rest);
            }
            Ok(None) => {
                assert!(buf.len() < wire::MAX_HEAD, "an incomplete head stays under the bound");
                if fed >= input.len() {
                    return Outcome::Incomplete;
                }
                let end = (fed + piece).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Err(error) => return Outcome::Error(error.to_string()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let head_request = first & 0x80 != 0;
    let piece = usize::from(first & 0x7f).max(1);
    let whole = run(input, input.len().max(1), head_request);
    let pieces = run(input, piece, head_request);
    // A head complete in pieces is complete at once; an error found at once may be met
    // in pieces only when the bytes before it already fail (same message either way).
    assert_eq!(whole, pieces, "piece size {piece}");
});
