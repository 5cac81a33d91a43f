//! Envelopes as NATS messages (CE-BINDINGS.md §8), both ways.
//!
//! Outbound: structured mode (the JSON format, `Content-Type: application/cloudevents+json`) by
//! default, or binary mode (every attribute, `datacontenttype` included, as a percent-encoded
//! `ce-` header; `Content-Type` too unless it starts with `application/cloudevents`).
//! Inbound, from meshgate or any other NATS program: a CloudEvents `Content-Type` → structured;
//! otherwise any `ce-` header → binary; otherwise the payload is tried as structured JSON.
//!
//! meshgate's own metadata travels in headers, never as CloudEvents attributes:
//! `Meshgate-Origin` (`<connection>@<instance>`, for no-local and loop-free delivery),
//! `Meshgate-Qos` (the MQTT publisher's QoS, when not 1), `Meshgate-Retain` (`1`).

use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use meshgate_config::NatsWireMode;
use meshgate_core::backbone::MqttProperties;
use meshgate_core::event::StringAttributes;
use meshgate_core::header::{decode_header_value, percent_encode_header};
use meshgate_core::{Data, Envelope, Event, Origin, Topic, json, media};

pub(crate) const ORIGIN: &str = "Meshgate-Origin";
pub(crate) const QOS: &str = "Meshgate-Qos";
pub(crate) const RETAIN: &str = "Meshgate-Retain";
const MQTT_RESPONSE_TOPIC: &str = "Meshgate-Mqtt-Response-Topic";
const MQTT_CORRELATION: &str = "Meshgate-Mqtt-Correlation-Data";
const MQTT_UTF8: &str = "Meshgate-Mqtt-Payload-Utf8";
const MQTT_EXPIRES: &str = "Meshgate-Mqtt-Expires-At-Ms";
const CONTENT_TYPE: &str = "Content-Type";

/// The message for `envelope`: headers and payload. `instance` is this gateway's instance id,
/// already percent-encoded (the usual origin; encoded once, not per message).
pub(crate) fn encode(
    envelope: &Envelope,
    mode: NatsWireMode,
    instance: (&str, &str),
) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    let origin = &envelope.origin;
    let (plain, encoded) = instance;
    let origin_value = if *origin.instance == *plain {
        format!("{}@{encoded}", origin.connection)
    } else {
        format!(
            "{}@{}",
            origin.connection,
            percent_encode_header(&origin.instance)
        )
    };
    headers.insert(ORIGIN, origin_value);
    if envelope.qos != 1 {
        headers.insert(QOS, envelope.qos.to_string());
    }
    if envelope.retain {
        headers.insert(RETAIN, "1");
    }
    if let Some(m) = &envelope.mqtt {
        if let Some(t) = &m.response_topic {
            headers.insert(MQTT_RESPONSE_TOPIC, percent_encode_header(t));
        }
        if let Some(c) = &m.correlation_data {
            use base64::Engine;
            headers.insert(
                MQTT_CORRELATION,
                base64::engine::general_purpose::STANDARD.encode(c),
            );
        }
        if m.payload_utf8 {
            headers.insert(MQTT_UTF8, "1");
        }
        if let Some(t) = m.expires_at_ms {
            headers.insert(MQTT_EXPIRES, t.to_string());
        }
    }
    let payload = match mode {
        NatsWireMode::Structured => {
            headers.insert(CONTENT_TYPE, json::CONTENT_TYPE);
            // The JSON is shared with other subscribers of the envelope: no copy.
            Bytes::from_owner(JsonBytes(envelope.json()))
        }
        NatsWireMode::Binary => {
            let event = &envelope.event;
            for (name, value) in event.attributes() {
                headers.insert(
                    format!("ce-{name}"),
                    percent_encode_header(&value.to_string()),
                );
            }
            let content_type = event.binary_content_type();
            if let Some(ct) = content_type {
                // (A header value with CR or LF would make the NATS client panic.)
                if !media::is_cloudevents(ct) && !ct.contains(['\r', '\n']) {
                    headers.insert(CONTENT_TYPE, ct);
                }
                if event.datacontenttype().is_none() {
                    headers.insert("ce-datacontenttype", percent_encode_header(ct));
                }
            }
            event.data().map(Data::to_bytes).unwrap_or_default()
        }
    };
    (headers, payload)
}

/// `Arc<str>` as bytes, for [`Bytes::from_owner`].
struct JsonBytes(Arc<str>);

impl AsRef<[u8]> for JsonBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// The envelope of a received message; a message that is not a CloudEvent is counted in
/// `malformed`, logged at debug level and skipped (`None`).
pub(crate) fn decode_or_count(
    prefix: &str,
    m: async_nats::Message,
    malformed: &meshgate_core::metrics::Counter,
) -> Option<Envelope> {
    match decode(prefix, m.subject.as_str(), m.headers.as_ref(), m.payload) {
        Ok(envelope) => Some(envelope),
        Err(reason) => {
            malformed.inc();
            tracing::debug!(subject = %m.subject, reason, "skipped a NATS message that is not a CloudEvent");
            None
        }
    }
}

/// The envelope a NATS message carries, or why it is not one.
pub(crate) fn decode(
    prefix: &str,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
) -> Result<Envelope, String> {
    let topic = Topic::from_nats_subject(prefix, subject)
        .map_err(|e| format!("subject `{subject}`: {e}"))?;
    let header = |name: &str| {
        headers.and_then(|h| {
            h.iter()
                .find(|(k, _)| AsRef::<str>::as_ref(k).eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.first())
                .map(|v| v.as_str())
        })
    };
    let content_type = header(CONTENT_TYPE);
    let event = match content_type {
        Some(ct) if media::is_cloudevents(ct) => {
            json::decode(&payload).map_err(|e| format!("structured event: {e}"))?
        }
        _ => {
            let binary = headers.is_some_and(|h| {
                h.iter().any(|(k, _)| {
                    AsRef::<str>::as_ref(k)
                        .to_ascii_lowercase()
                        .starts_with("ce-")
                })
            });
            if binary {
                decode_binary(headers, content_type, payload)?
            } else {
                json::decode(&payload)
                    .map_err(|e| format!("no CloudEvents headers and not a JSON event: {e}"))?
            }
        }
    };
    let origin = match header(ORIGIN).and_then(parse_origin) {
        Some(o) => o,
        // Published by another NATS program: no meshgate connection to compare with.
        None => Origin {
            instance: Arc::from(""),
            connection: 0,
        },
    };
    let qos = header(QOS).and_then(|q| q.parse::<u8>().ok()).unwrap_or(1);
    let retain = header(RETAIN) == Some("1");
    let mqtt = MqttProperties {
        response_topic: header(MQTT_RESPONSE_TOPIC)
            .and_then(|t| decode_header_value(t.as_bytes()).ok()),
        correlation_data: header(MQTT_CORRELATION).and_then(|c| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(c)
                .ok()
                .map(Bytes::from)
        }),
        payload_utf8: header(MQTT_UTF8) == Some("1"),
        expires_at_ms: header(MQTT_EXPIRES).and_then(|t| t.parse().ok()),
    };
    let mut envelope = Envelope::new(topic, Arc::new(event), origin)
        .with_qos(qos)
        .with_retain(retain);
    envelope.mqtt = (!mqtt.is_empty()).then(|| Arc::new(mqtt));
    Ok(envelope)
}

fn decode_binary(
    headers: Option<&HeaderMap>,
    content_type: Option<&str>,
    payload: Bytes,
) -> Result<Event, String> {
    let mut attributes = StringAttributes::new();
    for (name, values) in headers.into_iter().flat_map(|h| h.iter()) {
        let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
        let Some(attr) = lower.strip_prefix("ce-") else {
            continue;
        };
        for value in values {
            let value = decode_header_value(value.as_str().as_bytes())
                .map_err(|e| format!("header `{name}`: {e}"))?;
            attributes
                .push(attr, value)
                .map_err(|e| format!("header `{name}`: {e}"))?;
        }
    }
    let has_content_type = attributes.contains("datacontenttype");
    let mut event = attributes.build().map_err(|e| e.to_string())?;
    if !has_content_type {
        // §8 policy: without ce-datacontenttype, Content-Type is the data content type.
        event
            .set_datacontenttype(content_type.map(str::to_owned))
            .map_err(|e| e.to_string())?;
    }
    if !payload.is_empty() {
        event.set_data(Some(Data::Binary(payload)));
    }
    Ok(event)
}

fn parse_origin(v: &str) -> Option<Origin> {
    let (connection, instance) = v.split_once('@')?;
    Some(Origin {
        instance: Arc::from(decode_header_value(instance.as_bytes()).ok()?),
        connection: connection.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use meshgate_core::ExtensionValue;

    const E: &str = r#"{"specversion":"1.0","id":"N1","source":"/src","subject":"a b","type":"t.x","count":7,"flag":true,"time":"2026-01-01T00:00:00+00:00","datacontenttype":"application/json","data":{"a":1}}"#;

    fn envelope() -> Envelope {
        let origin = Origin {
            instance: Arc::from("gw a@b"),
            connection: 42,
        };
        Envelope::new(
            Topic::from_mqtt("plant/line.1").unwrap(),
            Arc::new(json::decode(E.as_bytes()).unwrap()),
            origin,
        )
        .with_qos(2)
        .with_retain(true)
        .with_mqtt(MqttProperties {
            response_topic: Some("replies/é 1".into()),
            correlation_data: Some(Bytes::from_static(&[0, 1, 0xFF])),
            payload_utf8: true,
            expires_at_ms: Some(1_800_000_000_000),
        })
    }

    fn round_trip(mode: NatsWireMode) -> Envelope {
        let e = envelope();
        let subject = e.topic.to_nats_subject("mg");
        assert_eq!(subject, "mg.plant.line%2E1");
        let (headers, payload) = encode(&e, mode, ("other", "other"));
        decode("mg", &subject, Some(&headers), payload).unwrap()
    }

    #[test]
    fn structured_round_trip_keeps_types_time_and_metadata() {
        let back = round_trip(NatsWireMode::Structured);
        assert_eq!(back.topic.as_str(), "plant/line.1");
        assert_eq!(
            back.event.extension("count"),
            Some(&ExtensionValue::Integer(7))
        );
        assert_eq!(
            back.event.extension("flag"),
            Some(&ExtensionValue::Boolean(true))
        );
        assert_eq!(
            json::encode_string(&back.event),
            json::encode_string(&envelope().event)
        );
        assert_eq!(&*back.origin.instance, "gw a@b");
        assert_eq!(back.origin.connection, 42);
        assert_eq!((back.qos, back.retain), (2, true));
        assert_eq!(
            back.mqtt,
            envelope().mqtt,
            "MQTT 5 properties survive the bus"
        );
    }

    #[test]
    fn binary_round_trip_has_every_attribute_as_a_header() {
        let e = envelope();
        let (headers, payload) = encode(&e, NatsWireMode::Binary, ("gw a@b", "gw%20a@b"));
        assert_eq!(headers.get(ORIGIN).unwrap().as_str(), "42@gw%20a@b");
        assert_eq!(headers.get("ce-subject").unwrap().as_str(), "a%20b");
        assert_eq!(
            headers.get("ce-datacontenttype").unwrap().as_str(),
            "application/json"
        );
        assert_eq!(&payload[..], br#"{"a":1}"#);
        let back = round_trip(NatsWireMode::Binary);
        assert_eq!(back.event.subject(), Some("a b"));
        // A string-only binding: extensions come back as strings (CE-BINDINGS §10).
        assert_eq!(
            back.event.extension("count"),
            Some(&ExtensionValue::String("7".into()))
        );
        assert_eq!(back.event.datacontenttype(), Some("application/json"));
        assert_eq!(back.event.data().unwrap().to_bytes(), &br#"{"a":1}"#[..]);
    }

    #[test]
    fn other_programs_events_are_read_in_every_mode() {
        // No headers at all (sdk-rust / sdk-go core NATS): the payload is the JSON format.
        let e = decode("mg", "mg.a", None, Bytes::from_static(E.as_bytes())).unwrap();
        assert_eq!(e.event.id(), "N1");
        assert_eq!(&*e.origin.instance, "");
        assert_eq!(e.qos, 1);
        // Binary mode with Content-Type and no ce-datacontenttype (sdk-go JetStream style).
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "B1"),
            ("ce-source", "/x"),
            ("ce-type", "t"),
            ("Content-Type", "text/plain"),
        ] {
            h.insert(k, v);
        }
        let e = decode("mg", "mg.a", Some(&h), Bytes::from_static(b"hi")).unwrap();
        assert_eq!(e.event.datacontenttype(), Some("text/plain"));
        assert_eq!(e.event.data().unwrap().to_bytes(), &b"hi"[..]);
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        for (subject, payload) in [
            ("mg.a", &b"not json"[..]),
            (
                "mg.a",
                br#"{"specversion":"0.3","id":"x","source":"/s","type":"t"}"#,
            ),
            ("other.a", E.as_bytes()),
        ] {
            let err = decode("mg", subject, None, Bytes::copy_from_slice(payload)).unwrap_err();
            assert!(!err.is_empty());
        }
        let mut h = HeaderMap::new();
        h.insert("ce-specversion", "1.0");
        h.insert("ce-id", "x");
        assert!(
            decode("mg", "mg.a", Some(&h), Bytes::new())
                .unwrap_err()
                .contains("source")
        );
    }
}
