//! Structured mode (`application/cloudevents+json`: the whole event as one JSON
//! object) and batch mode (`application/cloudevents-batch+json`: an array of them,
//! validated as a whole).

use cloudevents::event::TryIntoTime;
use serde_json::{Map, Value};

use super::{EventError, REQUIRED};

fn parse_json(body: &[u8]) -> Result<Value, EventError> {
    serde_json::from_slice(body).map_err(|e| EventError::Json(e.to_string()))
}

pub(super) fn validate_structured(body: &[u8]) -> Result<Attributes, EventError> {
    match parse_json(body)? {
        Value::Object(map) => validate_object(map),
        _ => Err(EventError::Json("a structured-mode event must be a JSON object".into())),
    }
}

pub(super) fn validate_batch(body: &[u8]) -> Result<(usize, String), EventError> {
    let Value::Array(events) = parse_json(body)? else {
        return Err(EventError::Json("a batch must be a JSON array of events".into()));
    };
    let count = events.len();
    let mut first_id = String::new();
    for (index, event) in events.into_iter().enumerate() {
        let wrap = |error| EventError::Batch {
            index,
            error: Box::new(error),
        };
        let Value::Object(map) = event else {
            return Err(wrap(EventError::Json("not a JSON object".into())));
        };
        let id = validate_object(map).map_err(wrap)?.id;
        if index == 0 {
            first_id = id;
        }
    }
    Ok((count, first_id))
}

/// Structured mode: required attributes present, strings, non-empty; `specversion`
/// 1.0; not both `data` and `data_base64`; then the SDK checks the rest (formats of
/// `source`, `time`, `dataschema`, extension types).
fn validate_object(map: Map<String, Value>) -> Result<Attributes, EventError> {
    let mut values = [""; 4];
    for (slot, attribute) in REQUIRED.iter().enumerate() {
        match map.get(*attribute) {
            None => {
                return Err(EventError::Missing {
                    attribute,
                    location: format!("JSON member \"{attribute}\""),
                })
            }
            Some(Value::String(s)) if s.is_empty() => return Err(EventError::Empty { attribute }),
            Some(Value::String(s)) => values[slot] = s,
            Some(_) => {
                return Err(EventError::Invalid {
                    attribute: attribute.to_string(),
                    message: "must be a string".into(),
                })
            }
        }
    }
    if values[0] != "1.0" {
        return Err(EventError::SpecVersion(values[0].to_string()));
    }
    if map.contains_key("data") && map.contains_key("data_base64") {
        return Err(EventError::DataConflict);
    }
    if let Some(time) = map.get("time") {
        let valid = time.as_str().is_some_and(|t| t.into_time().is_ok());
        if !valid {
            return Err(EventError::Invalid {
                attribute: "time".into(),
                message: format!("{time} is not an RFC 3339 timestamp"),
            });
        }
    }
    let attributes = Attributes {
        id: values[1].to_string(),
        source: values[2].to_string(),
        kind: values[3].to_string(),
    };
    serde_json::from_value::<cloudevents::Event>(Value::Object(map)).map_err(|e| {
        let message = e.to_string();
        let attribute = [
            "time",
            "dataschema",
            "source",
            "data_base64",
            "datacontenttype",
            "subject",
        ]
        .into_iter()
        .find(|a| message.contains(a))
        .unwrap_or("event")
        .to_string();
        EventError::Invalid { attribute, message }
    })?;
    Ok(attributes)
}

/// The attributes of a structured event the activator uses past validation.
pub(super) struct Attributes {
    pub(super) id: String,
    pub(super) source: String,
    pub(super) kind: String,
}

#[cfg(test)]
mod tests {
    use super::super::tests::{binary, structured};
    use super::super::*;

    #[test]
    fn structured_mode_table() {
        let cases: Vec<(&str, &str, Option<&str>)> = vec![
            (
                "valid",
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"a":1}}"#,
                None,
            ),
            (
                "missing id",
                r#"{"specversion":"1.0","source":"/s","type":"t"}"#,
                Some("id"),
            ),
            (
                "empty type",
                r#"{"specversion":"1.0","id":"1","source":"/s","type":""}"#,
                Some("type"),
            ),
            (
                "number id",
                r#"{"specversion":"1.0","id":1,"source":"/s","type":"t"}"#,
                Some("id"),
            ),
            (
                "spec 0.3",
                r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
                Some("specversion"),
            ),
            (
                "both data",
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
                Some("data_base64"),
            ),
            (
                "bad time",
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"noon"}"#,
                Some("time"),
            ),
            ("bad json", r#"{"specversion":"1.0","#, None),
            ("array", r#"[]"#, None),
        ];
        for (name, json, attribute) in cases {
            let result = structured(json);
            if name == "valid" {
                assert_eq!(result.unwrap().id(), Some("1"));
                continue;
            }
            let err = result.expect_err(name);
            assert_eq!(err.attribute(), attribute, "{name}: {err}");
        }
    }

    #[test]
    fn batch_is_validated_as_a_whole() {
        let h = binary(&[("content-type", b"application/cloudevents-batch+json")]);
        let ok = r#"[{"specversion":"1.0","id":"a","source":"/s","type":"t"},{"specversion":"1.0","id":"b","source":"/s","type":"t"}]"#;
        let env = validate(&h, Bytes::from_static(ok.as_bytes())).unwrap();
        assert_eq!(env.mode, Mode::Batch(2));
        assert_eq!(env.id(), Some("a"));
        let bad = r#"[{"specversion":"1.0","id":"a","source":"/s","type":"t"},{"specversion":"1.0","source":"/s","type":"t"}]"#;
        let err = validate(&h, Bytes::from_static(bad.as_bytes())).unwrap_err();
        assert!(matches!(err, EventError::Batch { index: 1, .. }), "{err}");
        assert_eq!(err.attribute(), Some("id"));
    }
}
