//! A held request's headers, packed: one buffer of `name:value\n` lines instead of a
//! header map or the head they came in. A map of a CloudEvent's six headers is 656 bytes
//! in one allocation (plus what its names and values keep alive: for HTTP/2, pieces of
//! the connection's decoder buffers), and an HTTP/1.1 head's fields keep the
//! connection's read buffer; packed, the same headers are the ~150 bytes they are. Only
//! held requests pack theirs — the warm path never does — and a held request unpacks
//! them when it is let in (as lines read in place: no map), before anything else reads
//! them.
//!
//! Owns: the packed form. Must not import anything of the activator.

use bytes::{BufMut, Bytes, BytesMut};

use crate::http1::lines::{Fields, Lines, ReadFields};
use crate::http1::maps;

/// Headers packed while their request is held.
pub(super) struct PackedHeaders {
    /// `name:value\n` for each header in order (a name has no ':', a value no '\n').
    lines: Bytes,
}

impl PackedHeaders {
    /// Packs the request's header fields, taking them (a map is kept for the next head
    /// this thread parses; lines give their bytes back, a part of the connection's read
    /// buffer).
    pub(super) fn pack(headers: &mut Fields) -> PackedHeaders {
        let headers = std::mem::take(headers);
        let len = headers.fields().map(|(name, value)| name.len() + value.len() + 2).sum();
        let mut lines = BytesMut::with_capacity(len);
        for (name, value) in headers.fields() {
            lines.put_slice(name);
            lines.put_u8(b':');
            lines.put_slice(value);
            lines.put_u8(b'\n');
        }
        if let Fields::Map(map) = headers {
            maps::give_back(map);
        }
        PackedHeaders { lines: lines.freeze() }
    }

    /// The first value of `name` (lowercase; matched ignoring case), if it is UTF-8.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.lines().find_map(|(n, value)| {
            n.eq_ignore_ascii_case(name.as_bytes())
                .then(|| std::str::from_utf8(value).ok())?
        })
    }

    /// The header fields again, read where they are packed (no map is built).
    pub(super) fn unpack(self) -> Fields {
        Fields::Lines(Lines::from_packed(self.lines))
    }

    fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .filter_map(|line| {
                let colon = line.iter().position(|&b| b == b':')?;
                Some((&line[..colon], &line[colon + 1..]))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderMap, HeaderValue};

    #[test]
    fn lines_pack_as_they_came_and_are_found_ignoring_case() {
        let head = Bytes::from_static(b"CE-Id: 7\r\nce-source: /s\r\n");
        let mut lines = Lines::new(head, 2);
        lines.push((0, 5), (7, 1));
        lines.push((10, 9), (21, 2));
        let packed = PackedHeaders::pack(&mut Fields::Lines(lines));
        assert_eq!(&packed.lines[..], b"CE-Id:7\nce-source:/s\n");
        assert_eq!(packed.get("ce-id"), Some("7"));
        let unpacked = packed.unpack();
        assert_eq!(unpacked.field("ce-id"), Some(&b"7"[..]));
        assert_eq!(unpacked.field("ce-source"), Some(&b"/s"[..]));
    }

    #[test]
    fn packs_and_unpacks_every_header_in_order() {
        let mut headers = HeaderMap::new();
        headers.insert("ce-id", HeaderValue::from_static("a:b:c"));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-many", HeaderValue::from_static("1"));
        headers.append("x-many", HeaderValue::from_static(""));
        headers.append("x-many", HeaderValue::from_bytes(b"\xe9t\xe9 \t x").unwrap());
        let original = headers.clone();
        let mut fields = Fields::Map(headers);
        let packed = PackedHeaders::pack(&mut fields);
        assert!(fields.is_empty(), "taken");
        assert_eq!(packed.get("ce-id"), Some("a:b:c"));
        assert_eq!(packed.get("x-many"), Some("1"));
        assert_eq!(packed.get("ce-source"), None);
        let mut unpacked = packed.unpack();
        assert_eq!(unpacked.len(), original.len());
        assert_eq!(*unpacked.map_mut(), original);
        let values: Vec<_> = unpacked.map_mut().get_all("x-many").iter().collect();
        assert_eq!(values, original.get_all("x-many").iter().collect::<Vec<_>>());
    }

    #[test]
    fn an_empty_map_packs_to_nothing() {
        let packed = PackedHeaders::pack(&mut Fields::default());
        assert_eq!(packed.lines.len(), 0);
        assert!(packed.unpack().is_empty());
    }
}
