//! A request's header fields read where they are: an HTTP/1.1 head's fields are kept as
//! the head's bytes and where each field is in them ([`Lines`]), never put into a
//! `HeaderMap` — building one hashed and inserted every field of every request, and the
//! ingress only looks up a few of them and writes the rest out again to the guest.
//! HTTP/2 requests come from hyper as a map; [`Fields`] is either, and [`ReadFields`]
//! reads both (and a plain `HeaderMap`) the same way.
//!
//! Names in [`Lines`] are as the sender wrote them: every lookup ignores ASCII case, as
//! header names are compared (RFC 9110 §5.1). The span lists are kept per thread for
//! the next head, as `maps` keeps header maps.
//!
//! Long because: two types (the lines, and lines-or-map) with one reader over both, and
//! a third of it tests of the lookups' exactness that no header map checks any more.
//!
//! Pure: no I/O. Must not import anything of the service.

use std::cell::RefCell;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};

use crate::http1::{names, MAX_HEADERS};

/// Where a field is in its bytes: name at, name length, value at, value length.
type Span = [u32; 4];

/// How many span lists a thread keeps for its next heads.
const KEPT: usize = 8;

thread_local! {
    /// Span lists of heads that are done, emptied, for the next heads on this thread.
    static SPANS: RefCell<Vec<Vec<Span>>> = const { RefCell::new(Vec::new()) };
}

/// Header fields as bytes and the spans of each field in them, in the order they came.
#[derive(Debug)]
pub struct Lines {
    bytes: Bytes,
    spans: Vec<Span>,
}

impl Lines {
    /// Fields in `bytes`, none yet, with room for `capacity` (a kept list when this
    /// thread has one).
    pub fn new(bytes: Bytes, capacity: usize) -> Lines {
        let mut spans = SPANS
            .try_with(|kept| kept.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        spans.reserve(capacity);
        Lines { bytes, spans }
    }

    /// Adds the field whose name is `bytes[name.0..name.0 + name.1]` and whose value is
    /// `bytes[value.0..value.0 + value.1]`. The caller checked both: a name of token
    /// characters, a value of the characters a field value may have (what `httparse`
    /// lets through).
    pub fn push(&mut self, name: (usize, usize), value: (usize, usize)) {
        debug_assert!(name.0 + name.1 <= self.bytes.len() && value.0 + value.1 <= self.bytes.len());
        // Offsets within a head, which is far below 4 GiB (`u32`: half the list's size).
        let narrow = |n: usize| u32::try_from(n).expect("a head is smaller than 4 GiB");
        self.spans
            .push([narrow(name.0), narrow(name.1), narrow(value.0), narrow(value.1)]);
    }

    /// The fields of `bytes` written as `name:value\n` lines (see `ingress::packed`); a
    /// line without a colon is skipped.
    pub fn from_packed(bytes: Bytes) -> Lines {
        let count = bytes.iter().filter(|&&b| b == b'\n').count();
        let mut lines = Lines::new(bytes.clone(), count);
        let mut at = 0;
        for line in bytes.split(|&b| b == b'\n') {
            if let Some(colon) = line.iter().position(|&b| b == b':') {
                lines.push((at, colon), (at + colon + 1, line.len() - colon - 1));
            }
            at += line.len() + 1;
        }
        lines
    }

    /// The bytes the fields are in.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many fields.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The first value of the field named `name` (lowercase: letters, digits and `-`),
    /// whatever the case it came in.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let name = name.as_bytes();
        debug_assert!(name
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-'));
        // The length first (it rules out nearly every field), then the bytes.
        let span = self.spans.iter().find(|span| {
            span[1] as usize == name.len() && lowercase_is(&self.bytes[span[0] as usize..][..name.len()], name)
        })?;
        Some(self.field(span).1)
    }

    /// Every field, as (name, value), in the order they came.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().map(|span| self.field(span))
    }

    /// Keeps only the fields for which `keep(name, value)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], &[u8]) -> bool) {
        let bytes = &self.bytes;
        self.spans.retain(|span| {
            let (name, value) = field(bytes, span);
            keep(name, value)
        });
    }

    fn field(&self, span: &Span) -> (&[u8], &[u8]) {
        field(&self.bytes, span)
    }

    /// The fields as a header map (their values sharing these bytes), for a caller that
    /// must add to them (a traced request's `traceparent`).
    fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.len());
        for span in &self.spans {
            let [name_at, name_len, value_at, value_len] = span.map(|n| n as usize);
            let Ok(name) = names::header_name(&self.bytes[name_at..name_at + name_len]) else {
                continue;
            };
            let Ok(value) = HeaderValue::from_maybe_shared(self.bytes.slice(value_at..value_at + value_len)) else {
                continue;
            };
            map.append(name, value);
        }
        map
    }
}

impl Drop for Lines {
    /// Its span list is kept for the next head this thread parses (a bounded number of
    /// them, none larger than a head may need).
    fn drop(&mut self) {
        let mut spans = std::mem::take(&mut self.spans);
        if spans.capacity() == 0 || spans.capacity() > MAX_HEADERS {
            return;
        }
        spans.clear();
        let _ = SPANS.try_with(|kept| {
            let mut kept = kept.borrow_mut();
            if kept.len() < KEPT {
                kept.push(spans);
            }
        });
    }
}

/// Whether the token `name` (what `httparse` takes as a field name) in any case is
/// `lowercase` (letters, digits and `-`): with
/// the case bit set, a token's letters are lowercase, its digits and `-` unchanged, and
/// the only other bytes it changes (`^`, `_`) become ones no such name has.
pub fn lowercase_is(name: &[u8], lowercase: &[u8]) -> bool {
    name.len() == lowercase.len() && name.iter().zip(lowercase).all(|(&a, &b)| a | 0x20 == b)
}

fn field<'a>(bytes: &'a [u8], span: &Span) -> (&'a [u8], &'a [u8]) {
    let [name_at, name_len, value_at, value_len] = span.map(|n| n as usize);
    (
        &bytes[name_at..name_at + name_len],
        &bytes[value_at..value_at + value_len],
    )
}

/// A request's header fields: an HTTP/1.1 head's, where they are; or a map (HTTP/2, or
/// a request whose fields were added to).
#[derive(Debug)]
pub enum Fields {
    /// In a header map.
    Map(HeaderMap),
    /// Where the head carried them.
    Lines(Lines),
}

impl Default for Fields {
    /// No fields (an empty map: no allocation).
    fn default() -> Fields {
        Fields::Map(HeaderMap::new())
    }
}

impl From<HeaderMap> for Fields {
    fn from(map: HeaderMap) -> Fields {
        Fields::Map(map)
    }
}

impl Fields {
    /// How many fields (each value of a repeated name counted).
    pub fn len(&self) -> usize {
        match self {
            Fields::Map(map) => map.len(),
            Fields::Lines(lines) => lines.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The fields as a map to change, made from the lines the first time it is asked
    /// for (a traced request only: the warm path never asks).
    pub fn map_mut(&mut self) -> &mut HeaderMap {
        if let Fields::Lines(lines) = self {
            *self = Fields::Map(lines.to_map());
        }
        match self {
            Fields::Map(map) => map,
            Fields::Lines(_) => unreachable!("made a map just above"),
        }
    }
}

/// Reading a request's header fields, whichever way they are kept. Names are asked for
/// in lowercase and matched ignoring case.
pub trait ReadFields {
    /// The first value of the field named `name`.
    fn field(&self, name: &str) -> Option<&[u8]>;
    /// Every field, as (name, value): a map's names in lowercase, lines' as they came.
    fn fields(&self) -> Iter<'_>;
}

impl ReadFields for HeaderMap {
    fn field(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(HeaderValue::as_bytes)
    }

    fn fields(&self) -> Iter<'_> {
        Iter::Map(self.iter())
    }
}

impl ReadFields for Fields {
    fn field(&self, name: &str) -> Option<&[u8]> {
        match self {
            Fields::Map(map) => map.field(name),
            Fields::Lines(lines) => lines.get(name),
        }
    }

    fn fields(&self) -> Iter<'_> {
        match self {
            Fields::Map(map) => map.fields(),
            Fields::Lines(lines) => Iter::Lines(&lines.bytes, lines.spans.iter()),
        }
    }
}

/// The fields of a [`ReadFields`], as (name, value).
pub enum Iter<'a> {
    /// A map's.
    Map(http::header::Iter<'a, HeaderValue>),
    /// Lines': their bytes and spans.
    Lines(&'a [u8], std::slice::Iter<'a, Span>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Map(map) => map
                .next()
                .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
            Iter::Lines(bytes, spans) => spans.next().map(|span| field(bytes, span)),
        }
    }
}

/// A field value as text, if it is visible ASCII (with spaces and tabs) — exactly when
/// `HeaderValue::to_str` gives it as text.
pub fn text(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        // SAFETY: every byte is ASCII, so the bytes are valid UTF-8.
        .then(|| unsafe { std::str::from_utf8_unchecked(value) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Lines {
        let bytes = Bytes::from_static(b"CE-Id: 1\r\nContent-Type: a/b\r\nx-many: 1\r\nX-Many: 2\r\n");
        let mut lines = Lines::new(bytes, 4);
        lines.push((0, 5), (7, 1));
        lines.push((10, 12), (24, 3));
        lines.push((29, 6), (37, 1));
        lines.push((40, 6), (48, 1));
        lines
    }

    #[test]
    fn lines_are_read_ignoring_the_names_case_and_in_order() {
        let lines = head();
        assert_eq!(lines.get("ce-id"), Some(&b"1"[..]));
        assert_eq!(lines.get("content-type"), Some(&b"a/b"[..]));
        assert_eq!(lines.get("x-many"), Some(&b"1"[..]), "the first");
        assert_eq!(lines.get("ce-source"), None);
        let fields = Fields::Lines(lines);
        let all: Vec<_> = fields.fields().collect();
        assert_eq!(
            all,
            [
                (&b"CE-Id"[..], &b"1"[..]),
                (b"Content-Type", b"a/b"),
                (b"x-many", b"1"),
                (b"X-Many", b"2")
            ]
        );
        assert_eq!(fields.len(), 4);
    }

    #[test]
    fn a_token_in_any_case_is_a_lowercase_name_exactly_when_it_equals_it_ignoring_case() {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        let wanted: Vec<u8> = (b'a'..=b'z').chain(b'0'..=b'9').chain([b'-']).collect();
        for a in (0..=255u8).filter(|&b| token(b)) {
            for &b in &wanted {
                assert_eq!(
                    lowercase_is(&[a], &[b]),
                    [a].eq_ignore_ascii_case(&[b]),
                    "{a:#x} {b:#x}"
                );
            }
        }
        assert!(!lowercase_is(b"ce-id", b"ce-i"));
    }

    #[test]
    fn a_map_made_of_lines_has_every_field_and_values_in_order() {
        let mut fields = Fields::Lines(head());
        let map = fields.map_mut();
        assert_eq!(map["ce-id"], "1");
        assert_eq!(map["content-type"], "a/b");
        let many: Vec<_> = map.get_all("x-many").iter().collect();
        assert_eq!(many, ["1", "2"]);
        assert_eq!(fields.field("x-many"), Some(&b"1"[..]));
        assert!(matches!(fields, Fields::Map(_)));
    }

    #[test]
    fn retain_drops_fields_and_keeps_the_order_of_the_rest() {
        let mut lines = head();
        lines.retain(|name, _| !name.eq_ignore_ascii_case(b"content-type"));
        let names: Vec<_> = lines.iter().map(|(n, _)| n.to_vec()).collect();
        assert_eq!(names, [&b"CE-Id"[..], b"x-many", b"X-Many"]);
    }

    #[test]
    fn packed_lines_are_read_back() {
        let lines = Lines::from_packed(Bytes::from_static(b"ce-id:a:b\nX-Empty:\nno colon\ntraceparent:00-1\n"));
        let all: Vec<_> = lines.iter().collect();
        assert_eq!(
            all,
            [
                (&b"ce-id"[..], &b"a:b"[..]),
                (b"X-Empty", b""),
                (b"traceparent", b"00-1")
            ]
        );
        assert!(Lines::from_packed(Bytes::new()).is_empty());
    }

    #[test]
    fn a_map_reads_as_lines_do() {
        let mut map = HeaderMap::new();
        map.insert("ce-id", HeaderValue::from_static("1"));
        assert_eq!(map.field("ce-id"), Some(&b"1"[..]));
        assert_eq!(Fields::from(map).fields().count(), 1);
        assert!(Fields::default().is_empty());
    }

    #[test]
    fn text_is_exactly_what_header_value_gives_as_text() {
        for b in 0..=255u8 {
            let value = [b'a', b, b'z'];
            let ours = text(&value).is_some();
            let http = HeaderValue::from_bytes(&value).is_ok_and(|v| v.to_str().is_ok());
            if HeaderValue::from_bytes(&value).is_ok() {
                assert_eq!(ours, http, "byte {b:#x}");
            }
        }
    }

    #[test]
    fn span_lists_are_kept_per_thread_and_bounded() {
        SPANS.with(|kept| kept.borrow_mut().clear());
        drop(head());
        assert_eq!(SPANS.with(|kept| kept.borrow().len()), 1);
        let again = Lines::new(Bytes::new(), 1);
        assert!(again.is_empty(), "nothing of the last head is left");
        assert_eq!(SPANS.with(|kept| kept.borrow().len()), 0, "taken");
        for _ in 0..KEPT + 3 {
            drop(Lines {
                bytes: Bytes::new(),
                spans: Vec::with_capacity(4),
            });
        }
        assert_eq!(SPANS.with(|kept| kept.borrow().len()), KEPT);
    }
}
