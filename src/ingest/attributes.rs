//! OTLP attributes rendered as strings.
//!
//! Matching rules and labelling profiles only ever compare text, so every
//! `AnyValue` becomes one string here, close to what the Collector's debug
//! exporter prints: strings as they are, numbers and booleans in their usual
//! decimal form, bytes as base64, arrays and key-value lists as compact JSON.

use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use serde_json::{Map, Value as Json};

use crate::signals::Attributes;

/// Renders a list of OTLP key-values. A repeated key keeps its last value,
/// as the OTLP data model says a key appears at most once.
pub(crate) fn render(attributes: &[KeyValue]) -> Attributes {
    attributes
        .iter()
        .map(|attribute| {
            let value = attribute.value.as_ref().and_then(|any| any.value.as_ref());
            (attribute.key.clone(), render_value(value))
        })
        .collect()
}

/// Renders one value; an empty `AnyValue` becomes the empty string.
pub(crate) fn render_value(value: Option<&Value>) -> String {
    match value {
        // A string-table index means something only inside a profile; OTLP
        // says to treat it as absent anywhere else.
        None | Some(Value::StringValueStrindex(_)) => String::new(),
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::BoolValue(flag)) => flag.to_string(),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(Value::DoubleValue(number)) => number.to_string(),
        Some(Value::BytesValue(bytes)) => base64(bytes),
        Some(nested @ (Value::ArrayValue(_) | Value::KvlistValue(_))) => {
            to_json(Some(nested)).to_string()
        }
    }
}

fn to_json(value: Option<&Value>) -> Json {
    match value {
        None | Some(Value::StringValueStrindex(_)) => Json::Null,
        Some(Value::StringValue(text)) => Json::String(text.clone()),
        Some(Value::BoolValue(flag)) => Json::Bool(*flag),
        Some(Value::IntValue(number)) => Json::from(*number),
        // JSON has no NaN or infinities; OTLP/JSON spells them as strings.
        Some(Value::DoubleValue(number)) => serde_json::Number::from_f64(*number)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(otlp_json_float(*number).to_owned())),
        Some(Value::BytesValue(bytes)) => Json::String(base64(bytes)),
        Some(Value::ArrayValue(array)) => Json::Array(
            array
                .values
                .iter()
                .map(|element| to_json(element.value.as_ref()))
                .collect(),
        ),
        Some(Value::KvlistValue(list)) => {
            let mut object = Map::new();
            for entry in &list.values {
                let value = entry.value.as_ref().and_then(|any| any.value.as_ref());
                object.insert(entry.key.clone(), to_json(value));
            }
            // serde_json's map is ordered by key, so the same list always
            // renders the same text and so names the same series.
            Json::Object(object)
        }
    }
}

fn otlp_json_float(number: f64) -> &'static str {
    if number.is_nan() {
        "NaN"
    } else if number > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// Standard base64 with padding, as OTLP/JSON and the Collector render bytes.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b0 = group[0];
        let b1 = group.get(1).copied().unwrap_or(0);
        let b2 = group.get(2).copied().unwrap_or(0);
        let sextets = [
            b0 >> 2,
            (b0 & 0x03) << 4 | b1 >> 4,
            (b1 & 0x0f) << 2 | b2 >> 6,
            b2 & 0x3f,
        ];
        let kept = group.len() + 1;
        for (position, sextet) in sextets.iter().enumerate() {
            if position < kept {
                text.push(char::from(ALPHABET[usize::from(*sextet)]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, KeyValueList};

    fn any(value: Value) -> Option<AnyValue> {
        Some(AnyValue { value: Some(value) })
    }

    fn pair(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: any(value),
            ..Default::default()
        }
    }

    #[test]
    fn scalars_render_as_plain_text() {
        assert_eq!(
            render_value(Some(&Value::StringValue("feed".into()))),
            "feed"
        );
        assert_eq!(render_value(Some(&Value::IntValue(-42))), "-42");
        assert_eq!(render_value(Some(&Value::DoubleValue(0.25))), "0.25");
        assert_eq!(render_value(Some(&Value::DoubleValue(3.0))), "3");
        assert_eq!(render_value(Some(&Value::BoolValue(true))), "true");
        assert_eq!(render_value(None), "");
    }

    #[test]
    fn bytes_render_as_padded_base64() {
        let cases: [(&[u8], &str); 5] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"\xff\xfe\x00\x01", "//4AAQ=="),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                render_value(Some(&Value::BytesValue(bytes.to_vec()))),
                expected
            );
        }
    }

    #[test]
    fn arrays_and_lists_render_as_compact_json() {
        let array = Value::ArrayValue(ArrayValue {
            values: vec![
                AnyValue {
                    value: Some(Value::StringValue("a".into())),
                },
                AnyValue {
                    value: Some(Value::IntValue(1)),
                },
                AnyValue {
                    value: Some(Value::DoubleValue(f64::NAN)),
                },
                AnyValue { value: None },
            ],
        });
        assert_eq!(render_value(Some(&array)), r#"["a",1,"NaN",null]"#);

        let list = Value::KvlistValue(KeyValueList {
            values: vec![pair("ok", Value::BoolValue(false)), pair("nested", array)],
        });
        assert_eq!(
            render_value(Some(&list)),
            r#"{"nested":["a",1,"NaN",null],"ok":false}"#
        );
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let rendered = render(&[
            pair("db.system", Value::StringValue("first".into())),
            pair("db.system", Value::StringValue("feeddb".into())),
            KeyValue {
                key: "empty".into(),
                value: None,
                ..Default::default()
            },
        ]);
        assert_eq!(
            rendered.get("db.system").map(String::as_str),
            Some("feeddb")
        );
        assert_eq!(rendered.get("empty").map(String::as_str), Some(""));
        assert_eq!(rendered.len(), 2);
    }
}
