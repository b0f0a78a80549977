//! Binary mode: attributes in `ce-` headers, values percent-decoded (HTTP binding
//! §3.1.3.2), the body is the event's data.

use std::borrow::Cow;

use cloudevents::event::TryIntoTime;

use super::{EventError, REQUIRED};
use crate::http1::lines::{lowercase_is, ReadFields};

/// Binary mode: every `ce-` header must be a valid attribute name with a valid
/// percent-encoded UTF-8 value; the required ones present, non-empty and well-formed.
///
/// Borrows only: nothing is copied out of the headers (the id stays in `ce-id`). The
/// checks are the SDK builder's (required attributes present and non-empty, `time` as
/// RFC 3339) without building an owned event that would be thrown away.
pub(super) fn validate_binary(headers: &(impl ReadFields + ?Sized)) -> Result<(), EventError> {
    let mut attrs: [Option<Cow<'_, str>>; 4] = Default::default();
    let mut time = None;
    for (name, value) in headers.fields() {
        // Names in any case (an HTTP/1.1 head's are as the sender wrote them).
        let Some(attribute) = name
            .get(..3)
            .filter(|prefix| lowercase_is(prefix, b"ce-"))
            .map(|_| &name[3..])
        else {
            continue;
        };
        // A match on the length first, then one compare: the required names are
        // well-formed; only another name's characters are checked.
        let is = |wanted: &str| lowercase_is(attribute, wanted.as_bytes());
        let slot = match attribute.len() {
            11 if is("specversion") => Some(0),
            2 if is("id") => Some(1),
            6 if is("source") => Some(2),
            4 if is("type") => Some(3),
            _ => None,
        };
        debug_assert_eq!(slot, REQUIRED.iter().position(|r| is(r)));
        let header = || String::from_utf8_lossy(name).to_ascii_lowercase();
        if slot.is_none()
            && (attribute.is_empty() || attribute.len() > 20 || !attribute.iter().all(|b| b.is_ascii_alphanumeric()))
        {
            return Err(EventError::Header {
                header: header(),
                message: "attribute names are 1-20 characters of a-z and 0-9".into(),
            });
        }
        let decoded = percent_decode(value).map_err(|message| EventError::Header {
            header: header(),
            message,
        })?;
        if let Some(slot) = slot {
            if attrs[slot].is_some() {
                return Err(EventError::Header {
                    header: header(),
                    message: "appears more than once".into(),
                });
            }
            attrs[slot] = Some(decoded);
        } else if attribute.len() == 4 && is("time") {
            time = Some(decoded);
        }
    }
    let [specversion, id, source, ty] = attrs;
    let specversion = required(specversion, "specversion")?;
    if specversion != "1.0" {
        return Err(EventError::SpecVersion(specversion.into_owned()));
    }
    required(id, "id")?;
    required(source, "source")?;
    required(ty, "type")?;
    if let Some(time) = time {
        // The SDK's own parser, as its builder would use.
        (&*time).into_time().map_err(|e| EventError::Invalid {
            attribute: "time".into(),
            message: format!("not an RFC 3339 timestamp: {e}"),
        })?;
    }
    Ok(())
}

/// Decodes a binary-mode header value (HTTP binding §3.1.3.2): `%XX` escapes must be
/// complete hex pairs, and the decoded bytes valid UTF-8.
///
/// ```
/// use vm_activator::ingress::cloudevent::percent_decode;
/// assert_eq!(percent_decode(b"caf%C3%A9 %25").unwrap(), "café %");
/// assert!(percent_decode(b"100%").is_err());
/// ```
pub fn percent_decode(raw: &[u8]) -> Result<Cow<'_, str>, String> {
    // The usual value (an id, a source, a type) is ASCII with nothing to decode: text as
    // it is, without the general UTF-8 check.
    if raw.is_ascii() && !raw.contains(&b'%') {
        // SAFETY: every byte is ASCII, so `raw` is valid UTF-8.
        return Ok(Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(raw) }));
    }
    if !raw.contains(&b'%') {
        // Not ASCII, nothing to decode: text as it is if it is UTF-8.
        return std::str::from_utf8(raw)
            .map(Cow::Borrowed)
            .map_err(|_| "value is not valid UTF-8".to_string());
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or("incomplete percent-encoding at the end")?;
            let text = std::str::from_utf8(hex).map_err(|_| "bad percent-encoding")?;
            let byte = u8::from_str_radix(text, 16)
                .ok()
                .filter(|_| hex.iter().all(u8::is_ascii_hexdigit))
                .ok_or_else(|| format!("bad percent-encoding %{}", String::from_utf8_lossy(hex)))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| "value is not valid UTF-8 after percent-decoding".to_string())
}

/// A required attribute: present and non-empty.
fn required<'a>(value: Option<Cow<'a, str>>, attribute: &'static str) -> Result<Cow<'a, str>, EventError> {
    match value {
        None => Err(EventError::Missing {
            attribute,
            location: format!("header ce-{attribute}"),
        }),
        Some(v) if v.is_empty() => Err(EventError::Empty { attribute }),
        Some(v) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{binary, valid_binary, without, Headers};
    use super::super::validate;
    use super::*;
    use bytes::Bytes;

    #[test]
    fn binary_mode_table() {
        let cases: Vec<(&str, Headers, Option<&str>)> = vec![
            ("valid", valid_binary(), None),
            ("missing id", without("ce-id"), Some("id")),
            ("missing source", without("ce-source"), Some("source")),
            ("missing type", without("ce-type"), Some("type")),
            (
                "empty id",
                [without("ce-id"), vec![("ce-id", b"")]].concat(),
                Some("id"),
            ),
            (
                "spec 0.3",
                [without("ce-specversion"), vec![("ce-specversion", b"0.3")]].concat(),
                Some("specversion"),
            ),
            (
                "spec 2.0",
                [without("ce-specversion"), vec![("ce-specversion", b"2.0")]].concat(),
                Some("specversion"),
            ),
            (
                "bad escape",
                [valid_binary(), vec![("ce-subject", b"a%zzb")]].concat(),
                Some("subject"),
            ),
            (
                "cut escape",
                [valid_binary(), vec![("ce-subject", b"a%4")]].concat(),
                Some("subject"),
            ),
            (
                "bad utf8",
                [valid_binary(), vec![("ce-subject", b"%ff%fe")]].concat(),
                Some("subject"),
            ),
            (
                "bad time",
                [valid_binary(), vec![("ce-time", b"yesterday")]].concat(),
                Some("time"),
            ),
            (
                "bad name",
                [valid_binary(), vec![("ce-my_ext", b"x")]].concat(),
                Some("my_ext"),
            ),
            (
                "duplicate id",
                [valid_binary(), vec![("ce-id", b"e-2")]].concat(),
                Some("id"),
            ),
            (
                "encoded ok",
                [valid_binary(), vec![("ce-subject", b"caf%C3%A9%20au%20lait")]].concat(),
                None,
            ),
        ];
        for (name, headers, expected) in cases {
            let result = validate(&binary(&headers), Bytes::new());
            match expected {
                None => assert!(result.is_ok(), "{name}: {result:?}"),
                Some(attribute) => {
                    let err = result.expect_err(name);
                    assert_eq!(err.attribute(), Some(attribute), "{name}: {err}");
                }
            }
        }
    }

    #[test]
    fn percent_decoding_decodes_utf8() {
        assert_eq!(percent_decode(b"caf%C3%A9").unwrap(), "café");
        assert_eq!(percent_decode(b"100%25").unwrap(), "100%");
        assert!(percent_decode(b"%").is_err());
        assert!(percent_decode(b"%+1").is_err());
    }
}
