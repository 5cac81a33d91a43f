//! The CloudEvents HTTP binding (CE-BINDINGS.md §3–4), without I/O.
//!
//! Mode detection on receive: `Content-Type: application/cloudevents-batch…` → batch (checked
//! first); `application/cloudevents…` → structured; otherwise any `ce-` header → binary;
//! otherwise not a CloudEvent (the adapter wraps the body).

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;
use meshgate_core::event::StringAttributes;
pub use meshgate_core::header::{decode_header_value, percent_encode_header};
use meshgate_core::validate;
use meshgate_core::{Data, Event, EventError, json, media};

/// What a request carried.
#[derive(Debug)]
pub enum Decoded {
    Binary(Event),
    Structured(Event),
    Batch(Vec<Event>),
    /// No CloudEvents content type and no `ce-` header: a plain body to wrap.
    NotCloudEvent,
}

/// Why a request is not a valid CloudEvent (or batch).
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("batch element {index}: {source}")]
    BatchElement { index: usize, source: EventError },
    #[error("the batch holds more than {max} events, the limit (http.max_batch_events)")]
    TooManyEvents { max: usize },
    #[error("header `{name}`: {reason}")]
    Header { name: String, reason: String },
    #[error(
        "event format `{0}` is not supported; send application/cloudevents+json, \
         application/cloudevents-batch+json or binary mode (ce- headers)"
    )]
    UnsupportedFormat(String),
}

impl BindingError {
    /// 415 for a format meshgate does not read, 413 for a batch over the limit, 400 for
    /// everything else.
    pub fn status(&self) -> StatusCode {
        match self {
            BindingError::UnsupportedFormat(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BindingError::TooManyEvents { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

fn header_error(name: &str, reason: impl Into<String>) -> BindingError {
    BindingError::Header {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

/// Decodes a request's headers and body; a batch may hold at most `max_batch_events` events.
pub fn decode(
    headers: &HeaderMap,
    body: Bytes,
    max_batch_events: usize,
) -> Result<Decoded, BindingError> {
    let content_type = match headers.get(CONTENT_TYPE) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| header_error("content-type", "is not ASCII"))?,
        ),
        None => None,
    };
    if let Some(ct) = content_type {
        let json_format = |ct: &str| {
            let format = media::cloudevents_format(ct);
            match format.as_deref() {
                None | Some("json") => Ok(()),
                Some(other) => Err(BindingError::UnsupportedFormat(other.to_owned())),
            }
        };
        if media::is_cloudevents_batch(ct) {
            json_format(ct)?;
            let events = json::decode_batch(&body, max_batch_events).map_err(|e| match e {
                json::BatchError::TooMany { max } => BindingError::TooManyEvents { max },
                json::BatchError::Invalid {
                    index: Some(index),
                    error,
                } => BindingError::BatchElement {
                    index,
                    source: error,
                },
                json::BatchError::Invalid { index: None, error } => BindingError::Event(error),
            })?;
            for (index, event) in events.iter().enumerate() {
                validate::client_event(event)
                    .map_err(|source| BindingError::BatchElement { index, source })?;
            }
            return Ok(Decoded::Batch(events));
        }
        if media::is_cloudevents(ct) {
            json_format(ct)?;
            // The body is authoritative; ce- headers are ignored in structured mode.
            let event = json::decode(&body)?;
            validate::client_event(&event)?;
            return Ok(Decoded::Structured(event));
        }
    }
    if !headers.keys().any(|k| k.as_str().starts_with("ce-")) {
        return Ok(Decoded::NotCloudEvent);
    }
    let mut attributes = StringAttributes::new();
    for (name, value) in headers {
        // Header names arrive lower-cased (http crate), so `CE-MyExt` is `ce-myext` here.
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        if attr == "datacontenttype" {
            return Err(header_error(
                name.as_str(),
                "must not be sent in binary mode: the data content type goes in Content-Type",
            ));
        }
        let value = decode_header_value(value.as_bytes())
            .map_err(|r| header_error(name.as_str(), r.to_string()))?;
        attributes.push(attr, value)?;
    }
    let mut event = attributes.build()?;
    event.set_datacontenttype(content_type.map(str::to_owned))?;
    if !body.is_empty() {
        event.set_data(Some(Data::Binary(body)));
    }
    validate::client_event(&event)?;
    Ok(Decoded::Binary(event))
}

/// An event as a binary-mode HTTP message (for webhook delivery): `ce-` headers, the data
/// content type in `Content-Type`, the data as the body.
pub fn encode_binary(event: &Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    for (name, value) in event.attributes() {
        if name == "datacontenttype" {
            continue;
        }
        let encoded = percent_encode_header(&value.to_string());
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(format!("ce-{name}")),
            HeaderValue::try_from(encoded),
        ) {
            headers.append(n, v);
        }
    }
    if let Some(v) = event
        .binary_content_type()
        .and_then(|ct| HeaderValue::try_from(ct).ok())
    {
        headers.insert(CONTENT_TYPE, v);
    }
    let body = event.data().map(Data::to_bytes).unwrap_or_default();
    (headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_core::ExtensionValue;

    const E0: &str = r#"{"specversion":"1.0","id":"A1","source":"/src","type":"com.example.t"}"#;

    fn binary(
        extra: &[(&str, &str)],
        content_type: Option<&str>,
        body: &'static [u8],
    ) -> Result<Decoded, BindingError> {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "A1"),
            ("ce-source", "/src"),
            ("ce-type", "com.example.t"),
        ] {
            h.append(
                HeaderName::try_from(k).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        for (k, v) in extra {
            h.append(
                HeaderName::try_from(*k).unwrap(),
                HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        if let Some(ct) = content_type {
            h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        decode(&h, Bytes::from_static(body), 1000)
    }

    fn event(d: Result<Decoded, BindingError>) -> Event {
        match d.unwrap() {
            Decoded::Binary(e) | Decoded::Structured(e) => e,
            other => panic!("expected one event, got {other:?}"),
        }
    }

    fn structured(ct: &str, body: &'static str) -> Result<Decoded, BindingError> {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        decode(&h, Bytes::from_static(body.as_bytes()), 1000)
    }

    #[test]
    fn i1_octet_stream_becomes_data_base64() {
        let e = event(binary(
            &[],
            Some("application/octet-stream"),
            &[0, 0xFF, 0x10],
        ));
        assert_eq!(e.datacontenttype(), Some("application/octet-stream"));
        assert!(json::encode_string(&e).contains(r#""data_base64":"AP8Q""#));
    }

    #[test]
    fn i2_text_plain() {
        let e = event(binary(&[], Some("text/plain"), b"hello"));
        assert_eq!(e.data().unwrap().to_bytes(), &b"hello"[..]);
    }

    #[test]
    fn i3_no_content_type_invents_none() {
        let e = event(binary(&[], None, &[0, 0xFF, 0x10]));
        let s = json::encode_string(&e);
        assert!(
            !s.contains("datacontenttype") && s.contains("data_base64"),
            "{s}"
        );
    }

    #[test]
    fn i4_i5_i6_i8_header_decoding() {
        let subject = |v: &str| {
            event(binary(&[("ce-subject", v)], None, b""))
                .subject()
                .unwrap()
                .to_owned()
        };
        assert_eq!(subject("Euro%20%E2%82%AC%20%F0%9F%98%80"), "Euro € 😀");
        assert_eq!(subject("\"a b\""), "a b");
        assert_eq!(subject("%c3%bc%41"), "üA");
        assert_eq!(subject("a+b"), "a+b");
        let e = event(binary(&[("ce-subject", "x")], None, b""));
        assert_eq!(e.source(), "/src");
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "A1"),
            ("ce-source", "https://ex.com/a?b=c&d=e#f"),
            ("ce-type", "t"),
        ] {
            h.append(
                HeaderName::try_from(k).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        assert_eq!(
            event(decode(&h, Bytes::new(), 1000)).source(),
            "https://ex.com/a?b=c&d=e#f"
        );
    }

    #[test]
    fn i7_invalid_utf8_and_controls_are_rejected() {
        for bad in ["%C0%A0", "%FF", "%0A", "%G1", "50%"] {
            let err = binary(&[("ce-subject", bad)], None, b"").unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad}");
            assert!(
                err.to_string().contains("subject"),
                "names the attribute: {err}"
            );
        }
    }

    #[test]
    fn i9_i10_extension_names() {
        let e = event(binary(&[("CE-MyExt", "v")], None, b""));
        assert_eq!(
            e.extension("myext"),
            Some(&ExtensionValue::String("v".into()))
        );
        for bad in ["ce-my_ext", "ce-data"] {
            let err = binary(&[(bad, "v")], None, b"").unwrap_err();
            assert!(err.to_string().contains(&bad[3..]), "{err}");
        }
    }

    #[test]
    fn i11_repeated_attribute_is_rejected() {
        let err = binary(&[("ce-id", "A2")], None, b"").unwrap_err();
        assert!(err.to_string().contains("`id`"), "{err}");
    }

    #[test]
    fn i12_ce_datacontenttype_is_rejected() {
        let err = binary(
            &[("ce-datacontenttype", "text/plain")],
            Some("text/plain"),
            b"x",
        )
        .unwrap_err();
        assert!(err.to_string().contains("Content-Type"), "{err}");
    }

    #[test]
    fn i13_i14_required_and_version() {
        let mut h = HeaderMap::new();
        h.insert("ce-specversion", HeaderValue::from_static("1.0"));
        h.insert("ce-id", HeaderValue::from_static("A1"));
        h.insert("ce-type", HeaderValue::from_static("t"));
        assert!(
            decode(&h, Bytes::new(), 1000)
                .unwrap_err()
                .to_string()
                .contains("source")
        );
        h.insert("ce-source", HeaderValue::from_static(""));
        assert!(decode(&h, Bytes::new(), 1000).is_err());
        h.insert("ce-source", HeaderValue::from_static("/s"));
        h.insert("ce-specversion", HeaderValue::from_static("0.3"));
        assert!(
            decode(&h, Bytes::new(), 1000)
                .unwrap_err()
                .to_string()
                .contains("0.3")
        );
    }

    #[test]
    fn i15_structured_case_insensitive() {
        let e = event(structured(
            "Application/CloudEvents+JSON; charset=utf-8",
            E0,
        ));
        assert_eq!(e.id(), "A1");
    }

    #[test]
    fn structured_ignores_ce_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/cloudevents+json"),
        );
        h.insert("ce-id", HeaderValue::from_static("OTHER"));
        assert_eq!(
            event(decode(&h, Bytes::from_static(E0.as_bytes()), 1000)).id(),
            "A1"
        );
    }

    #[test]
    fn unsupported_format_is_415() {
        assert_eq!(
            structured("application/cloudevents+avro", "x")
                .unwrap_err()
                .status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            structured("application/cloudevents-batch+protobuf", "x")
                .unwrap_err()
                .status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    #[test]
    fn i16_i17_batches() {
        assert!(
            matches!(structured("application/cloudevents-batch+json", "[]"), Ok(Decoded::Batch(v)) if v.is_empty())
        );
        let mixed = r#"[{"specversion":"1.0","id":"A1","source":"/s","type":"t"},{"specversion":"0.3","id":"A2","source":"/s","type":"t"}]"#;
        let err = structured("application/cloudevents-batch+json", mixed).unwrap_err();
        assert!(err.to_string().contains("mix"), "{err}");
        let bad = r#"[{"specversion":"1.0","id":"A1","source":"/s","type":"t"},{"specversion":"1.0","id":"","source":"/s","type":"t"}]"#;
        assert!(
            structured("application/cloudevents-batch+json", bad)
                .unwrap_err()
                .to_string()
                .starts_with("batch element 1")
        );
    }

    #[test]
    fn i18_to_i21_json_rules_apply_to_structured_mode() {
        let e = event(structured(
            "application/cloudevents+json",
            r#"{"specversion":"1.0","id":"A1","source":"/src","type":"t","comexampleothervalue":5,"flag":true,"subject":null}"#,
        ));
        assert_eq!(
            e.extension("comexampleothervalue"),
            Some(&ExtensionValue::Integer(5))
        );
        assert_eq!(e.subject(), None);
        for bad in [
            r#"{"specversion":"1.0","id":"A1","source":"/src","type":"t","n":5.0}"#,
            r#"{"specversion":"1.0","id":"A1","source":"/src","type":"t","data":1,"data_base64":"AA=="}"#,
        ] {
            assert_eq!(
                structured("application/cloudevents+json", bad)
                    .unwrap_err()
                    .status(),
                StatusCode::BAD_REQUEST
            );
        }
    }

    #[test]
    fn plain_body_is_not_a_cloudevent() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(matches!(
            decode(&h, Bytes::from_static(b"{}"), 1000),
            Ok(Decoded::NotCloudEvent)
        ));
    }

    fn e0() -> Event {
        Event::new("A1", "/src", "com.example.t").unwrap()
    }

    #[test]
    fn e1_e2_percent_encoding_on_send() {
        let mut e = e0();
        e.set_subject(Some("Euro € 😀".into())).unwrap();
        e.set_extension("ext", ExtensionValue::String("100%".into()))
            .unwrap();
        e.set_extension("q", ExtensionValue::String("say \"hi\"".into()))
            .unwrap();
        e.set_extension("url", ExtensionValue::String("a:/b?c#d&e+f=g".into()))
            .unwrap();
        let (h, _) = encode_binary(&e);
        assert_eq!(h["ce-subject"], "Euro%20%E2%82%AC%20%F0%9F%98%80");
        assert_eq!(h["ce-ext"], "100%25");
        assert_eq!(h["ce-q"], "say%20%22hi%22");
        assert_eq!(h["ce-url"], "a:/b?c#d&e+f=g");
        assert_eq!(h["ce-specversion"], "1.0");
    }

    #[test]
    fn e3_binary_without_content_type_sends_none() {
        let mut e = e0();
        e.set_data(Some(Data::Binary(Bytes::from_static(&[1, 2]))));
        let (h, body) = encode_binary(&e);
        assert!(h.get(CONTENT_TYPE).is_none());
        assert_eq!(&body[..], &[1, 2]);
    }

    #[test]
    fn e4_json_string_data_keeps_its_quotes() {
        let e = json::decode(br#"{"specversion":"1.0","id":"A1","source":"/src","type":"t","data":"I'm just a string"}"#).unwrap();
        let (h, body) = encode_binary(&e);
        assert_eq!(h[CONTENT_TYPE], "application/json");
        assert_eq!(&body[..], br#""I'm just a string""#);
        assert!(h.get("ce-datacontenttype").is_none());
    }

    #[test]
    fn round_trip_through_headers() {
        let mut e = e0();
        e.set_subject(Some("ü \"x\" 100%".into())).unwrap();
        e.set_datacontenttype(Some("text/plain".into())).unwrap();
        e.set_data(Some(Data::Binary(Bytes::from_static(b"hi"))));
        let (h, body) = encode_binary(&e);
        assert_eq!(event(decode(&h, body, 1000)), e);
    }
}
