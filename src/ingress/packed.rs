//! A held request's headers, packed: one buffer of `name:value\n` lines instead of a
//! header map. A map of a CloudEvent's six headers is 656 bytes in one allocation (plus
//! what its names and values keep alive: for HTTP/2, pieces of the connection's decoder
//! buffers); packed, the same headers are the ~150 bytes they are. Only held requests
//! pack theirs — the warm path never does — and a held request unpacks them when it is
//! let in, before anything else reads them.
//!
//! Owns: the packed form. Must not import anything of the activator.

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::http1::maps;

/// Headers packed while their request is held.
pub(super) struct PackedHeaders {
    /// `name:value\n` for each header in order (a name has no ':', a value no '\n').
    lines: Bytes,
    /// How many.
    count: usize,
}

impl PackedHeaders {
    /// Packs `headers`, leaving an empty map in their place.
    pub(super) fn pack(headers: &mut HeaderMap) -> PackedHeaders {
        let headers = std::mem::take(headers);
        let len = headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 2)
            .sum();
        let mut lines = BytesMut::with_capacity(len);
        for (name, value) in &headers {
            lines.put_slice(name.as_str().as_bytes());
            lines.put_u8(b':');
            lines.put_slice(value.as_bytes());
            lines.put_u8(b'\n');
        }
        let count = headers.len();
        maps::give_back(headers);
        PackedHeaders {
            lines: lines.freeze(),
            count,
        }
    }

    /// The first value of `name` (lowercase), if it is text.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.lines()
            .find_map(|(n, value)| (n == name.as_bytes()).then(|| std::str::from_utf8(value).ok())?)
    }

    /// The headers as a map again, in their order. The values share the packed buffer.
    pub(super) fn unpack(self) -> HeaderMap {
        let mut map = maps::take(self.count);
        for (name, value) in self.lines() {
            // Both were a valid name and value when packed.
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(self.lines.slice_ref(value)),
            ) else {
                continue;
            };
            map.append(name, value);
        }
        map
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

    #[test]
    fn packs_and_unpacks_every_header_in_order() {
        let mut headers = HeaderMap::new();
        headers.insert("ce-id", HeaderValue::from_static("a:b:c"));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-many", HeaderValue::from_static("1"));
        headers.append("x-many", HeaderValue::from_static(""));
        headers.append("x-many", HeaderValue::from_bytes(b"\xe9t\xe9 \t x").unwrap());
        let original = headers.clone();
        let packed = PackedHeaders::pack(&mut headers);
        assert!(headers.is_empty(), "taken");
        assert_eq!(packed.get("ce-id"), Some("a:b:c"));
        assert_eq!(packed.get("x-many"), Some("1"));
        assert_eq!(packed.get("ce-source"), None);
        let unpacked = packed.unpack();
        assert_eq!(unpacked, original);
        let values: Vec<_> = unpacked.get_all("x-many").iter().collect();
        assert_eq!(values, original.get_all("x-many").iter().collect::<Vec<_>>());
    }

    #[test]
    fn an_empty_map_packs_to_nothing() {
        let packed = PackedHeaders::pack(&mut HeaderMap::new());
        assert_eq!(packed.lines.len(), 0);
        assert!(packed.unpack().is_empty());
    }
}
