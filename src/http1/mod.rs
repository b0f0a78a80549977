//! HTTP/1.1 pieces both directions share, all pure (no I/O) but `fill`: the chunked
//! transfer coding's decoder, the framing fields' parsers, header names kept without a
//! copy, request fields read where they are (`lines`), header maps kept for the next head, and the read into a connection's buffer.
//! The ingress's server (`server::h1`) reads requests with them, the proxy's client
//! (`proxy::wire`) reads guests' responses with them.
//!
//! Owns: the wire format's shared rules. Must not import anything of the service.

pub mod chunked;
pub mod fields;
pub mod fill;
pub mod lines;
pub mod maps;
pub mod names;

/// The most header (or trailer) lines a message may have (hyper's default).
pub const MAX_HEADERS: usize = 100;
