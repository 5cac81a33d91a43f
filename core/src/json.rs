//! The CloudEvents JSON event format and JSON batch format (CE-BINDINGS.md §2), strict on read.
//!
//! Reading walks the top-level object once, keeping every member as raw JSON text, so that
//! duplicate members are detected (serde_json's `Map` would silently keep the last one) and
//! `data` is never parsed twice or re-rendered. The walk is [`scan`]'s for the usual shape (every
//! value a string without escapes, or `data`), serde_json's for everything else.

mod scan;

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::event::{Data, Event, EventError, ExtensionValue, SPEC_VERSION};
use crate::media;

/// Media type of one JSON-format event.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// Media type of a JSON batch.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// The members of a JSON object in order, values as raw JSON.
struct Members<'a>(Vec<(std::borrow::Cow<'a, str>, Raw<'a>)>);

/// A member's value as the JSON text it was read from.
#[derive(Debug, Clone, Copy)]
enum Raw<'a> {
    /// Read by serde_json.
    Checked(&'a RawValue),
    /// A string read by [`scan`]: its quotes and text, no escape, no control character.
    Scanned(&'a str),
}

impl<'a> Raw<'a> {
    fn get(self) -> &'a str {
        match self {
            Raw::Checked(raw) => raw.get(),
            Raw::Scanned(text) => text,
        }
    }

    fn to_boxed(self) -> Result<Box<RawValue>, EventError> {
        match self {
            Raw::Checked(raw) => Ok(raw.to_owned()),
            Raw::Scanned(text) => RawValue::from_string(text.to_owned()).map_err(syntax),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(8);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    out.push((key, Raw::Checked(value)));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The elements of a JSON array, as raw JSON.
struct Elements<'a>(Vec<&'a RawValue>);

/// Reads at most `max` elements of a JSON array: the next one stops the read (and sets
/// `too_many`), so that a body of a million tiny elements costs no more than `max` of them.
struct ElementsUpTo<'f> {
    max: usize,
    too_many: &'f std::cell::Cell<bool>,
}

/// The message of the error that stops a read at the limit (never shown: replaced by
/// [`BatchError::TooMany`]).
const TOO_MANY: &str = "too many batch elements";

impl<'de> serde::de::DeserializeSeed<'de> for ElementsUpTo<'_> {
    type Value = Elements<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct V<'f> {
            max: usize,
            too_many: &'f std::cell::Cell<bool>,
        }
        impl<'de> Visitor<'de> for V<'_> {
            type Value = Elements<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<&'de RawValue>()? {
                    if out.len() == self.max {
                        self.too_many.set(true);
                        return Err(serde::de::Error::custom(TOO_MANY));
                    }
                    out.push(v);
                }
                Ok(Elements(out))
            }
        }
        d.deserialize_seq(V {
            max: self.max,
            too_many: self.too_many,
        })
    }
}

/// Why a JSON batch was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// More than the allowed number of events; found while reading, before any is decoded.
    #[error("the batch holds more than {max} events")]
    TooMany { max: usize },
    /// The body is not a batch (`index: None`) or element `index` is not a valid event.
    #[error("{}", match .index { Some(i) => format!("batch element {i}: {}", .error), None => .error.to_string() })]
    Invalid {
        index: Option<usize>,
        error: EventError,
    },
}

fn syntax(e: serde_json::Error) -> EventError {
    EventError::Format(format!("body is not a valid JSON-format CloudEvent: {e}"))
}

/// A scalar attribute value as it appears in JSON.
enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
}

fn scalar(name: &str, raw: Raw<'_>) -> Result<Scalar, EventError> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'n') => Ok(Scalar::Null),
        Some(b't') => Ok(Scalar::Bool(true)),
        Some(b'f') => Ok(Scalar::Bool(false)),
        // A string without escapes is its text between the quotes: serde_json checked it
        // (control characters included) when it read the object, so no second parse.
        Some(b'"') if text.len() >= 2 && memchr::memchr(b'\\', text.as_bytes()).is_none() => {
            Ok(Scalar::Str(text[1..text.len() - 1].to_owned()))
        }
        Some(b'"') => serde_json::from_str::<String>(text)
            .map(Scalar::Str)
            .map_err(syntax),
        Some(b'{') | Some(b'[') => Err(EventError::invalid(
            name,
            "objects and arrays are not allowed as attribute values",
        )),
        _ => {
            // A number: an Integer has no fraction or exponent (`5.0` and `1e3` are invalid).
            if text.contains(['.', 'e', 'E']) {
                return Err(EventError::invalid(
                    name,
                    format!("{text} is not a valid Integer (no fraction or exponent allowed)"),
                ));
            }
            text.parse::<i64>()
                .map(Scalar::Int)
                .map_err(|_| EventError::invalid(name, format!("{text} is out of Integer range")))
        }
    }
}

fn string_value(name: &str, raw: Raw<'_>) -> Result<Option<String>, EventError> {
    match scalar(name, raw)? {
        Scalar::Null => Ok(None),
        Scalar::Str(s) => Ok(Some(s)),
        _ => Err(EventError::invalid(name, "must be a JSON string")),
    }
}

/// Parses one JSON-format event.
pub fn decode(body: &[u8]) -> Result<Event, EventError> {
    // UTF-8 checked once for the whole body: parsed as `str`, serde_json does not check each
    // member's raw text and each string again (it does from a byte slice).
    let text = std::str::from_utf8(body).map_err(|e| {
        EventError::Format(format!(
            "body is not a valid JSON-format CloudEvent: not UTF-8 after byte {}",
            e.valid_up_to()
        ))
    })?;
    let members = match scan::members(text) {
        Some(members) => members,
        None => serde_json::from_str(text).map_err(syntax)?,
    };
    decode_members(members)
}

fn decode_members(members: Members<'_>) -> Result<Event, EventError> {
    // Duplicate members (I7): a pairwise check for the usual dozen, a set beyond that.
    if members.0.len() <= 16 {
        for (i, (k, _)) in members.0.iter().enumerate() {
            if members.0[..i].iter().any(|(earlier, _)| earlier == k) {
                return Err(EventError::Duplicate(k.to_string()));
            }
        }
    } else {
        let mut seen = std::collections::BTreeSet::new();
        for (k, _) in &members.0 {
            if !seen.insert(k.as_ref()) {
                return Err(EventError::Duplicate(k.to_string()));
            }
        }
    }
    let get = |name: &str| -> Result<Option<String>, EventError> {
        match members.0.iter().find(|(k, _)| k == name) {
            Some((_, raw)) => string_value(name, *raw),
            None => Ok(None),
        }
    };
    let specversion = get("specversion")?.ok_or(EventError::Missing("specversion"))?;
    if specversion != SPEC_VERSION {
        return Err(EventError::UnsupportedSpecVersion(specversion));
    }
    let mut event = Event::new(
        get("id")?.ok_or(EventError::Missing("id"))?,
        get("source")?.ok_or(EventError::Missing("source"))?,
        get("type")?.ok_or(EventError::Missing("type"))?,
    )?;
    event.set_datacontenttype(get("datacontenttype")?)?;
    let mut data: Option<Raw<'_>> = None;
    let mut data_base64: Option<Raw<'_>> = None;
    for &(ref name, raw) in &members.0 {
        match name.as_ref() {
            "specversion" | "id" | "source" | "type" | "datacontenttype" => {}
            "dataschema" => event.set_dataschema(string_value(name, raw)?)?,
            "subject" => event.set_subject(string_value(name, raw)?)?,
            "time" => event.set_time(string_value(name, raw)?)?,
            "data" => data = Some(raw),
            "data_base64" => data_base64 = Some(raw),
            ext => {
                let value = match scalar(ext, raw)? {
                    Scalar::Null => continue,
                    Scalar::Bool(b) => ExtensionValue::Boolean(b),
                    Scalar::Str(s) => ExtensionValue::String(s),
                    Scalar::Int(i) => ExtensionValue::Integer(i32::try_from(i).map_err(|_| {
                        EventError::invalid(ext, format!("{i} is out of Integer (32-bit) range"))
                    })?),
                };
                event.set_extension(ext, value)?;
            }
        }
    }
    match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(EventError::Format(
                "`data` and `data_base64` must not both be present".into(),
            ));
        }
        (None, Some(raw)) => {
            let text = raw.get();
            // Base64 has no characters JSON escapes: decode between the quotes, no copy
            // (an escaped form, e.g. `\/`, takes the general path).
            let plain = text.len() >= 2
                && text.starts_with('"')
                && memchr::memchr(b'\\', text.as_bytes()).is_none();
            let decoded = if plain {
                Some(BASE64.decode(&text.as_bytes()[1..text.len() - 1]))
            } else {
                string_value("data_base64", raw)?.map(|s| BASE64.decode(s.as_bytes()))
            };
            if let Some(bytes) = decoded {
                let bytes = bytes
                    .map_err(|e| EventError::invalid("data_base64", format!("not Base64: {e}")))?;
                event.set_data(Some(Data::Binary(Bytes::from(bytes))));
            }
        }
        (Some(raw), None) => {
            let is_json = event.datacontenttype().is_none_or(media::is_json);
            if is_json {
                event.set_data(Some(Data::Json(raw.to_boxed()?)));
            } else {
                match scalar("data", raw) {
                    Ok(Scalar::Str(s)) => event.set_data(Some(Data::Text(s))),
                    Ok(Scalar::Null) => {}
                    _ => {
                        return Err(EventError::invalid(
                            "data",
                            "must be a JSON string when datacontenttype is not JSON",
                        ));
                    }
                }
            }
        }
        (None, None) => {}
    }
    Ok(event)
}

/// Parses a JSON batch of at most `max_events` events: an array of JSON-format events, all
/// with specversion 1.0. An error names the index of the failing element. A longer batch is
/// refused as soon as its element `max_events + 1` is reached, before any element is decoded
/// (a 1 MiB body of `{}` elements would otherwise cost ~140 MB of decoded members).
pub fn decode_batch(body: &[u8], max_events: usize) -> Result<Vec<Event>, BatchError> {
    let too_many = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let read = serde::de::DeserializeSeed::deserialize(
        ElementsUpTo {
            max: max_events,
            too_many: &too_many,
        },
        &mut de,
    )
    .and_then(|elements| de.end().map(|()| elements));
    let elements = match read {
        Ok(elements) => elements,
        Err(_) if too_many.get() => return Err(BatchError::TooMany { max: max_events }),
        Err(e) => {
            return Err(BatchError::Invalid {
                index: None,
                error: EventError::Format(format!(
                    "body is not a JSON batch (an array of events): {e}"
                )),
            });
        }
    };
    let invalid = |i: usize| {
        move |error| BatchError::Invalid {
            index: Some(i),
            error,
        }
    };
    let mut parsed = Vec::with_capacity(elements.0.len());
    for (i, raw) in elements.0.iter().enumerate() {
        let members: Members<'_> = serde_json::from_str(raw.get())
            .map_err(syntax)
            .map_err(invalid(i))?;
        parsed.push(members);
    }
    // All events of a batch MUST share one specversion; say so before anything else fails.
    let versions: std::collections::BTreeSet<String> = parsed
        .iter()
        .filter_map(|m| m.0.iter().find(|(k, _)| k == "specversion"))
        .filter_map(|(_, raw)| string_value("specversion", *raw).ok().flatten())
        .collect();
    if versions.len() > 1 {
        let list: Vec<_> = versions.into_iter().collect();
        return Err(BatchError::Invalid {
            index: None,
            error: EventError::Format(format!(
                "a batch must not mix specversions, found {}",
                list.join(", ")
            )),
        });
    }
    parsed
        .into_iter()
        .enumerate()
        .map(|(i, m)| decode_members(m).map_err(invalid(i)))
        .collect()
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Most strings need no escape: copied between quotes. The rest through serde_json (which
    // cannot fail on a &str).
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// How `data` is written in JSON, following the rules of CE-BINDINGS.md §2.
fn push_data(out: &mut Vec<u8>, event: &Event) {
    let Some(data) = event.data() else { return };
    match data {
        Data::Json(raw) => {
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(raw.get().as_bytes());
        }
        Data::Text(s) => {
            out.extend_from_slice(b",\"data\":");
            push_json_string(out, s);
        }
        Data::Binary(bytes) => {
            let ct = event.datacontenttype();
            // A binary-mode JSON body becomes a JSON value, as the SDKs do; text stays text.
            if ct.is_some_and(media::is_json) && serde_json::from_slice::<&RawValue>(bytes).is_ok()
            {
                out.extend_from_slice(b",\"data\":");
                out.extend_from_slice(bytes);
                return;
            }
            if ct.is_some_and(media::is_text)
                && let Ok(s) = std::str::from_utf8(bytes)
            {
                out.extend_from_slice(b",\"data\":");
                push_json_string(out, s);
                return;
            }
            out.extend_from_slice(b",\"data_base64\":\"");
            // Straight into the output: no intermediate String.
            let start = out.len();
            out.resize(start + base64_len(bytes.len()), 0);
            let written = BASE64.encode_slice(bytes, &mut out[start..]).unwrap_or(0);
            out.truncate(start + written);
            out.push(b'"');
        }
    }
}

/// Writes one event in the JSON format.
pub fn encode_into(out: &mut Vec<u8>, event: &Event) {
    out.extend_from_slice(b"{\"specversion\":\"1.0\"");
    for (name, value) in event.attributes().skip(1) {
        out.push(b',');
        push_json_string(out, name);
        out.push(b':');
        match value {
            crate::event::AttributeRef::Str(s) => push_json_string(out, s),
            crate::event::AttributeRef::Ext(ExtensionValue::String(s)) => push_json_string(out, s),
            crate::event::AttributeRef::Ext(ExtensionValue::Integer(i)) => {
                out.extend_from_slice(i.to_string().as_bytes())
            }
            crate::event::AttributeRef::Ext(ExtensionValue::Boolean(b)) => {
                out.extend_from_slice(if *b { b"true" } else { b"false" })
            }
        }
    }
    push_data(out, event);
    out.push(b'}');
}

/// At least the length of what [`encode_into`] writes for `event`, without encoding it: every
/// string counted as if each byte needed the longest escape (`\u00XX`).
pub fn encoded_len_bound(event: &Event) -> usize {
    let escaped = |s: &str| s.len() * 6 + 2;
    let mut n = 32;
    for (name, value) in event.attributes().skip(1) {
        n += escaped(name) + 2;
        n += match value {
            crate::event::AttributeRef::Str(s) => escaped(s),
            crate::event::AttributeRef::Ext(ExtensionValue::String(s)) => escaped(s),
            // i32::MIN has 11 characters.
            crate::event::AttributeRef::Ext(ExtensionValue::Integer(_)) => 11,
            crate::event::AttributeRef::Ext(ExtensionValue::Boolean(_)) => 5,
        };
    }
    n + match event.data() {
        None => 0,
        Some(Data::Json(raw)) => 16 + raw.get().len(),
        Some(Data::Text(s)) => 16 + escaped(s),
        Some(Data::Binary(b)) => {
            // Written as JSON or text when the content type says so (see `push_data`).
            let ct = event.datacontenttype();
            if ct.is_some_and(|ct| media::is_json(ct) || media::is_text(ct)) {
                16 + b.len() * 6 + 2
            } else {
                20 + base64_len(b.len())
            }
        }
    }
}

/// Length of the padded Base64 of `n` bytes.
fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// One event in the JSON format.
pub fn encode(event: &Event) -> Vec<u8> {
    // Room for the attributes and the data (binary data as Base64, the longest form that takes),
    // so usually one allocation; the buffer is kept as the envelope's JSON, so not more.
    let data = match event.data() {
        Some(Data::Binary(b)) => base64_len(b.len()),
        Some(d) => d.len(),
        None => 0,
    };
    let mut out = Vec::with_capacity(256 + data);
    encode_into(&mut out, event);
    out
}

/// One event in the JSON format, as a `String` (for WebSocket text frames).
pub fn encode_string(event: &Event) -> String {
    // The encoder writes only UTF-8: JSON strings via serde_json, raw JSON already validated as
    // UTF-8 text, Base64 ASCII.
    String::from_utf8(encode(event)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const E0: &str = r#"{"specversion":"1.0","id":"A1","source":"/src","type":"com.example.t"}"#;

    fn with(extra: &str) -> String {
        format!("{},{extra}}}", &E0[..E0.len() - 1])
    }

    proptest::proptest! {
        /// The copy-between-quotes path writes what serde_json writes, for any string.
        #[test]
        fn strings_are_written_as_serde_json_writes_them(s in "(?s).{0,40}") {
            let mut out = Vec::new();
            push_json_string(&mut out, &s);
            proptest::prop_assert_eq!(out, serde_json::to_vec(&s).unwrap());
        }

        /// The bound the NATS writer counts on is never under the encoding's length.
        #[test]
        fn the_length_bound_holds(
            subject in "[ -~é€]{1,40}",
            text in "(?s).{0,60}",
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
            ct in proptest::sample::select(vec!["", "text/plain", "application/json", "application/octet-stream"]),
            number in proptest::num::i32::ANY,
        ) {
            let mut e = Event::new("1", "/s", "t").unwrap();
            e.set_subject(Some(subject)).unwrap();
            e.set_extension("n", ExtensionValue::Integer(number)).unwrap();
            for data in [Data::Text(text), Data::Binary(Bytes::from(data))] {
                e.set_datacontenttype((!ct.is_empty()).then(|| ct.to_owned())).unwrap();
                e.set_data(Some(data));
                let len = encode(&e).len();
                proptest::prop_assert!(encoded_len_bound(&e) >= len, "{} < {}", encoded_len_bound(&e), len);
            }
        }

        /// Base64 written in place has the length and text of the engine's own encoding.
        #[test]
        fn data_base64_is_written_in_place(data in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            let mut e = Event::new("1", "/s", "t").unwrap();
            e.set_data(Some(Data::Binary(Bytes::from(data.clone()))));
            let json = encode_string(&e);
            let expected = format!(",\"data_base64\":\"{}\"}}", BASE64.encode(&data));
            proptest::prop_assert!(json.ends_with(&expected), "{}", json);
        }
    }

    #[test]
    fn data_base64_reads_the_same_with_and_without_escapes() {
        let plain = decode(with(r#""data_base64":"AAEC/w==""#).as_bytes()).unwrap();
        let escaped = decode(with(r#""data_base64":"AAEC\/w==""#).as_bytes()).unwrap();
        assert_eq!(plain.data().unwrap().to_bytes(), &[0u8, 1, 2, 0xFF][..]);
        assert_eq!(escaped.data().unwrap().to_bytes(), &[0u8, 1, 2, 0xFF][..]);
        assert!(
            decode(with(r#""data_base64":null"#).as_bytes())
                .unwrap()
                .data()
                .is_none()
        );
        for bad in [r#""data_base64":"A*==""#, r#""data_base64":5"#] {
            assert!(decode(with(bad).as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn forbidden_characters_are_refused_in_ascii_and_beyond() {
        // DEL, a C1 control and a noncharacter, each escaped in JSON.
        for bad in [r#"\u007f"#, r#"\u0085"#, r#"\ufdd0"#] {
            let body = with(&format!(r#""subject":"a{bad}b""#));
            assert!(decode(body.as_bytes()).is_err(), "{bad}");
        }
        assert!(decode(with(r#""subject":"tab\tfree? no""#).as_bytes()).is_err());
        assert!(decode(with(r#""subject":"ascii ~ and é ok""#).as_bytes()).is_ok());
    }

    #[test]
    fn strings_with_and_without_escapes_read_the_same() {
        let e = decode(with(r#""subject":"plain €","ext1":"a\u0041\"b\\""#).as_bytes()).unwrap();
        assert_eq!(e.subject(), Some("plain €"));
        assert_eq!(
            e.extension("ext1"),
            Some(&ExtensionValue::String("aA\"b\\".into()))
        );
        // A raw control character inside a string is not JSON, escaped or not elsewhere.
        assert!(decode(with("\"subject\":\"a\u{1}b\"").as_bytes()).is_err());
        // Duplicates are found with few members and with many.
        assert!(matches!(
            decode(with(r#""id":"again""#).as_bytes()),
            Err(EventError::Duplicate(_))
        ));
        let many: String = (0..20).map(|i| format!(r#""x{i}":"v","#)).collect();
        assert!(matches!(
            decode(with(&format!(r#"{many}"x3":"w""#)).as_bytes()),
            Err(EventError::Duplicate(_))
        ));
        assert!(decode(with(&format!(r#"{many}"y":"w""#)).as_bytes()).is_ok());
    }

    #[test]
    fn round_trip_keeps_types_and_time() {
        let body = with(
            r#""time":"2026-01-01T00:00:00+00:00","comexampleothervalue":5,"flag":true,"s":"x","data":{"b":1,"a":[1,2]}"#,
        );
        let e = decode(body.as_bytes()).unwrap();
        assert_eq!(e.time(), Some("2026-01-01T00:00:00+00:00"));
        assert_eq!(
            e.extension("comexampleothervalue"),
            Some(&ExtensionValue::Integer(5))
        );
        assert_eq!(e.extension("flag"), Some(&ExtensionValue::Boolean(true)));
        let again = decode(&encode(&e)).unwrap();
        assert_eq!(e, again);
        assert!(
            String::from_utf8(encode(&e))
                .unwrap()
                .contains(r#""data":{"b":1,"a":[1,2]}"#)
        );
    }

    #[test]
    fn i18_null_means_absent() {
        let e = decode(with(r#""comexampleothervalue":5,"flag":true,"subject":null"#).as_bytes())
            .unwrap();
        assert_eq!(e.subject(), None);
        let e = decode(with(r#""id2":null"#).as_bytes()).unwrap();
        assert!(e.extensions().is_empty());
        let body = r#"{"specversion":"1.0","id":null,"source":"/src","type":"t"}"#;
        assert_eq!(decode(body.as_bytes()), Err(EventError::Missing("id")));
    }

    #[test]
    fn i19_bad_integers_and_objects() {
        for extra in [
            r#""n":5.0"#,
            r#""n":2147483648"#,
            r#""x":{"a":1}"#,
            r#""n":1e3"#,
            r#""x":[1]"#,
        ] {
            assert!(decode(with(extra).as_bytes()).is_err(), "{extra}");
        }
        assert!(decode(with(r#""n":-2147483648"#).as_bytes()).is_ok());
    }

    #[test]
    fn i20_data_and_data_base64() {
        assert!(decode(with(r#""data":1,"data_base64":"AA==""#).as_bytes()).is_err());
    }

    #[test]
    fn i21_string_data_is_not_parsed_again() {
        let e = decode(
            with(r#""datacontenttype":"application/vnd.x+json","data":"{\"a\":1}""#).as_bytes(),
        )
        .unwrap();
        match e.data() {
            Some(Data::Json(raw)) => assert_eq!(raw.get(), r#""{\"a\":1}""#),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn i13_i14_required_and_version() {
        assert_eq!(
            decode(br#"{"specversion":"1.0","id":"A1","type":"t"}"#),
            Err(EventError::Missing("source"))
        );
        for v in ["0.3", "1.0.2", "2.0"] {
            let body = E0.replace("1.0", v);
            assert!(matches!(
                decode(body.as_bytes()),
                Err(EventError::UnsupportedSpecVersion(_))
            ));
        }
    }

    #[test]
    fn duplicates_are_rejected() {
        assert_eq!(
            decode(with(r#""id":"A2""#).as_bytes()),
            Err(EventError::Duplicate("id".into()))
        );
    }

    #[test]
    fn binary_data_encoding_rules() {
        let mut e = Event::new("A1", "/src", "t").unwrap();
        e.set_data(Some(Data::Binary(Bytes::from_static(&[0, 0xFF, 0x10]))));
        // I3: no content type -> only data_base64, no datacontenttype invented.
        let s = String::from_utf8(encode(&e)).unwrap();
        assert!(s.ends_with(r#","data_base64":"AP8Q"}"#), "{s}");
        assert!(!s.contains("datacontenttype"));
        e.set_datacontenttype(Some("text/plain".into())).unwrap();
        e.set_data(Some(Data::Binary(Bytes::from_static(b"hello"))));
        assert!(
            String::from_utf8(encode(&e))
                .unwrap()
                .contains(r#""data":"hello""#)
        );
        e.set_datacontenttype(Some("application/json".into()))
            .unwrap();
        e.set_data(Some(Data::Binary(Bytes::from_static(b"{\"a\":1}"))));
        assert!(
            String::from_utf8(encode(&e))
                .unwrap()
                .contains(r#""data":{"a":1}"#)
        );
    }

    #[test]
    fn batches() {
        assert!(decode_batch(b"[]", 10).unwrap().is_empty());
        let two = format!("[{E0},{}]", E0.replace("A1", "A2"));
        assert_eq!(decode_batch(two.as_bytes(), 10).unwrap().len(), 2);
        assert_eq!(
            decode_batch(two.as_bytes(), 2).unwrap().len(),
            2,
            "at the limit"
        );
        let mixed = format!("[{E0},{}]", E0.replace("1.0", "0.3"));
        let err = decode_batch(mixed.as_bytes(), 10).unwrap_err();
        assert!(
            matches!(err, BatchError::Invalid { index: None, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("mix"), "{err}");
        let bad = format!("[{E0},{{}}]");
        let err = decode_batch(bad.as_bytes(), 10).unwrap_err();
        assert!(err.to_string().starts_with("batch element 1"), "{err}");
        assert!(decode_batch(E0.as_bytes(), 10).is_err());
        assert!(decode_batch(b"[] x", 10).is_err(), "trailing characters");
    }

    #[test]
    fn deeply_nested_data_neither_overflows_the_stack_nor_is_refused_for_depth_alone() {
        // 1 MiB of nesting, in `data` (kept as raw text), in a batch and in an attribute.
        let depth = 500_000;
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let event =
            format!(r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{nested}}}"#);
        assert!(decode(event.as_bytes()).is_ok());
        let batch = format!("[{event}]");
        assert_eq!(decode_batch(batch.as_bytes(), 10).map(|v| v.len()), Ok(1));
        let attribute = event.replace(r#""data""#, r#""x""#);
        assert!(decode(attribute.as_bytes()).is_err());
        let unclosed = format!("[{}", "[".repeat(depth));
        assert!(decode_batch(unclosed.as_bytes(), 10).is_err());
    }

    #[test]
    fn f10_a_batch_past_the_limit_is_refused_before_its_elements_are_decoded() {
        // 349,000 `{}` in a 1 MiB body: refused at element 1001, which is all that is read.
        let body = format!("[{}]", vec!["{}"; 349_000].join(","));
        let started = std::time::Instant::now();
        assert_eq!(
            decode_batch(body.as_bytes(), 1000),
            Err(BatchError::TooMany { max: 1000 })
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Stopped at the limit: what follows element 1001 is never looked at.
        let cut = format!("[{}, {{\"unterminated", vec!["{}"; 1001].join(","));
        assert_eq!(
            decode_batch(cut.as_bytes(), 1000),
            Err(BatchError::TooMany { max: 1000 })
        );
    }
}
