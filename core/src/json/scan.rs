//! The members of a JSON-format event of the usual shape, read without serde_json: an object
//! whose member names and string values hold no escape, every value a string except `data`
//! (read by serde_json alone). What meshgate writes on the NATS bus always has that shape
//! (`data_base64`, or `data` as JSON), and reading it was half of a receiving instance's CPU.
//!
//! Anything else — an escape, a number or boolean extension, an empty object, a syntax error —
//! gives `None` and the caller reads the text with serde_json, which also words the errors. So
//! for a text this accepts, the members are exactly those serde_json would give (the tests
//! compare both on generated and mutated events).

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::{Members, Raw};

/// The members of `text` (valid UTF-8, checked by the caller), or `None` for serde_json.
pub(super) fn members(text: &str) -> Option<Members<'_>> {
    let b = text.as_bytes();
    let mut at = skip_ws(b, 0);
    if b.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_ws(b, at + 1);
    let mut out = Vec::with_capacity(10);
    loop {
        let name_end = string_end(b, at)?;
        let name = &text[at + 1..name_end - 1];
        at = skip_ws(b, name_end);
        if b.get(at) != Some(&b':') {
            return None;
        }
        at = skip_ws(b, at + 1);
        let value_end = match b.get(at)? {
            b'"' => {
                let end = string_end(b, at)?;
                out.push((Cow::Borrowed(name), Raw::Scanned(&text[at..end])));
                end
            }
            _ if name == "data" => {
                let mut values =
                    serde_json::Deserializer::from_str(&text[at..]).into_iter::<&RawValue>();
                let raw = values.next()?.ok()?;
                let end = at + values.byte_offset();
                out.push((Cow::Borrowed(name), Raw::Checked(raw)));
                end
            }
            _ => return None,
        };
        at = skip_ws(b, value_end);
        match b.get(at)? {
            b',' => at = skip_ws(b, at + 1),
            b'}' => break,
            _ => return None,
        }
    }
    (skip_ws(b, at + 1) == b.len()).then_some(Members(out))
}

fn skip_ws(b: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(at) {
        at += 1;
    }
    at
}

/// One past the closing quote of the string starting at `at`, if it is one without escapes
/// or control characters (which JSON forbids unescaped).
fn string_end(b: &[u8], at: usize) -> Option<usize> {
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let body = &b[at + 1..];
    let len = memchr::memchr2(b'"', b'\\', body)?;
    // A fold without early exit: vectorized, where `any` goes byte by byte (it was a fifth of
    // the decoding).
    let controls = body[..len].iter().fold(false, |seen, &c| seen | (c < 0x20));
    if body[len] != b'"' || controls {
        return None;
    }
    Some(at + 1 + len + 1)
}

#[cfg(test)]
mod tests {
    use super::super::{decode_members, encode, syntax};
    use super::*;
    use crate::event::{Data, Event, ExtensionValue};

    fn by_serde(text: &str) -> Result<Members<'_>, serde_json::Error> {
        serde_json::from_str(text)
    }

    fn shown(m: &Members<'_>) -> Vec<(String, String)> {
        m.0.iter()
            .map(|(k, v)| (k.to_string(), v.get().to_owned()))
            .collect()
    }

    /// When the scan reads `text`, serde_json reads the same members, and decoding them gives
    /// the same event or the same error.
    fn agrees(text: &str) -> Result<bool, proptest::test_runner::TestCaseError> {
        let Some(scanned) = members(text) else {
            return Ok(false);
        };
        let parsed = by_serde(text);
        proptest::prop_assert!(parsed.is_ok(), "scan read what serde_json refuses: {text}");
        let parsed = parsed.unwrap_or(Members(Vec::new()));
        proptest::prop_assert_eq!(shown(&scanned), shown(&parsed), "{}", text);
        let (a, b) = (decode_members(scanned), decode_members(parsed));
        proptest::prop_assert_eq!(format!("{a:?}"), format!("{b:?}"), "{}", text);
        Ok(true)
    }

    #[test]
    fn the_usual_shapes_are_scanned_and_the_rest_left_to_serde() {
        let scanned = [
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"AAE="}"#,
            " {\n \"specversion\" : \"1.0\" ,\t\"id\":\"1\",\"source\":\"/s\",\"type\":\"t\",\"data\":{\"a\":[1,2]} } \r\n",
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":5,"x":"é€"}"#,
            r#"{"specversion":"1.0","id":"1","id":"2","source":"/s","type":"t"}"#,
            r#"{"":""}"#,
        ];
        for text in scanned {
            assert!(agrees(text).unwrap(), "not scanned: {text}");
        }
        let left = [
            r#"{"specversion":"1.0","id":"1\n","source":"/s","type":"t"}"#,
            "{\"specversion\":\"1.0\",\"id\":\"a\u{1}b\",\"source\":\"/s\",\"type\":\"t\"}",
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","n":5}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","b":true}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"a":1}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t"} x"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t",}"#,
            r#"{"specversion":"1.0" "id":"1"}"#,
            r#"{"data":1x}"#,
            "{}",
            "[]",
            "",
            r#"{"a":"b""#,
        ];
        for text in left {
            assert!(members(text).is_none(), "scanned: {text}");
        }
        // What serde_json says of those is what the caller reports.
        assert!(by_serde(r#"{"a":"b""#).map_err(syntax).is_err());
    }

    proptest::proptest! {
        /// Events as meshgate writes them are all scanned, and read as serde_json reads them.
        #[test]
        fn written_events_are_scanned_as_serde_json_reads_them(
            id in "[ -~é]{1,20}",
            subject in "[ -~é€]{0,30}",
            ext in "[ -~é€]{0,30}",
            text in "(?s).{0,40}",
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            kind in 0..4u8,
        ) {
            let mut e = Event::new(id, "/s", "t").unwrap();
            if !subject.is_empty() {
                e.set_subject(Some(subject)).unwrap();
            }
            match kind {
                0 => e.set_data(Some(Data::Binary(bytes.into()))),
                1 => {
                    e.set_datacontenttype(Some("text/plain".into())).unwrap();
                    e.set_data(Some(Data::Text(text)));
                }
                2 => e.set_data(Some(Data::Json(
                    RawValue::from_string(serde_json::json!({ "t": text, "n": [1, 2.5] }).to_string()).unwrap(),
                ))),
                _ => e.set_extension("ext", ExtensionValue::String(ext)).unwrap(),
            }
            let json = String::from_utf8(encode(&e)).unwrap();
            // Only an escape in a name or a string value sends it to serde_json (`data` as
            // JSON is serde_json's anyway).
            let outside_data = match json.rfind("\"data\":{") {
                Some(at) if kind == 2 => &json[..at],
                _ => json.as_str(),
            };
            let scanned = agrees(&json)?;
            proptest::prop_assert_eq!(scanned, !outside_data.contains('\\'), "{}", json);
        }

        /// Whatever a written event is mutated into: if the scan reads it, serde_json reads
        /// the same members and decoding agrees.
        #[test]
        fn mutated_events_never_disagree(
            cuts in proptest::collection::vec((0..200usize, proptest::sample::select(vec!["", "\"", "\\", ",", ":", "{", "}", " ", "1", "\u{1}", "é", "\"data\":"])), 1..4),
        ) {
            let mut json = r#"{"specversion":"1.0","id":"01a2","source":"/meshgate/mqtt/x","type":"io.meshgate.mqtt.message","subject":"a/b","data_base64":"AAECAw==","data":{"k":[1,"v"]}}"#.to_owned();
            for (at, insert) in cuts {
                let mut at = at.min(json.len());
                while !json.is_char_boundary(at) {
                    at -= 1;
                }
                if insert.is_empty() {
                    let mut end = (at + 1).min(json.len());
                    while !json.is_char_boundary(end) {
                        end += 1;
                    }
                    json.replace_range(at..end, "");
                } else {
                    json.insert_str(at, insert);
                }
            }
            agrees(&json)?;
        }
    }
}
