//! The CloudEvents MQTT binding (CE-BINDINGS.md §5), without I/O.
//!
//! Inbound:
//! - MQTT 5 with Content Type `application/cloudevents…` → structured mode (JSON format only);
//! - MQTT 5 with a `specversion` user property → binary mode: every user property is an
//!   attribute (names unprefixed; a `datacontenttype` property must equal Content Type), the
//!   payload is the data;
//! - MQTT 3.1.1 payload that is a JSON object with a `specversion` member → structured mode;
//! - anything else is wrapped: new id, source naming the client, the configured type, the topic
//!   as subject, Content Type (MQTT 5) as `datacontenttype`.
//!
//! Outbound: MQTT 5 binary (default) or structured; MQTT 3.1.1 structured or the bare data.

use bytes::Bytes;
use meshgate_config::{Mqtt5Mode, Mqtt311Mode};
use meshgate_core::backbone::MqttProperties;
use meshgate_core::event::StringAttributes;
use meshgate_core::wrap::Wrapper;
use meshgate_core::{Data, Event, EventError, Topic, json, media};
use rumqttd::protocol::PublishProperties;

use crate::codec::Version;

/// The `source` of events wrapped from a client's payloads: `/meshgate/mqtt/<client id>`, the
/// client id percent-encoded where a URI-reference needs it.
pub fn client_source(client_id: &str) -> String {
    let mut s = String::from("/meshgate/mqtt/");
    for b in client_id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// What an inbound PUBLISH carried.
#[derive(Debug)]
pub struct Inbound<'a> {
    pub version: Version,
    pub topic: &'a Topic,
    pub payload: Bytes,
    pub properties: Option<&'a PublishProperties>,
    /// Wraps plain payloads: source [`client_source`] of the client id, the configured type;
    /// made once per connection.
    pub wrapper: &'a Wrapper,
}

fn looks_structured_json(payload: &[u8]) -> bool {
    let trimmed = payload.trim_ascii_start();
    trimmed.first() == Some(&b'{')
        && trimmed
            .windows(b"\"specversion\"".len())
            .any(|w| w == b"\"specversion\"")
}

/// Turns a PUBLISH into an event.
pub fn decode(m: Inbound<'_>) -> Result<Event, EventError> {
    decode_publish(m).map(|d| d.event)
}

/// A PUBLISH as an event, and whether it was a plain payload (wrapped) or a CloudEvent.
#[derive(Debug)]
pub struct Decoded {
    pub event: Event,
    /// A plain payload: the event is its wrapping, and MQTT subscribers may get the message
    /// as published (`mqtt.plain_messages`).
    pub plain: bool,
    /// The User Properties that travel with the message without being attributes: all of a
    /// plain message's; a binary-mode event's whose names are not attribute names.
    pub user_properties: Vec<(String, String)>,
}

/// [`decode`], telling a wrapped plain payload from a CloudEvent. A CloudEvent may not have a
/// type of meshgate's own ([`meshgate_core::validate::client_event`]); a wrapping has one.
pub fn decode_publish(m: Inbound<'_>) -> Result<Decoded, EventError> {
    let decoded = decode_any(m)?;
    if !decoded.plain {
        meshgate_core::validate::client_event(&decoded.event)?;
    }
    Ok(decoded)
}

fn decode_any(m: Inbound<'_>) -> Result<Decoded, EventError> {
    let content_type = m.properties.and_then(|p| p.content_type.as_deref());
    if let Some(ct) = content_type.filter(|ct| media::is_cloudevents(ct)) {
        return match media::cloudevents_format(ct).as_deref() {
            None | Some("json") => json::decode(&m.payload).map(Decoded::event),
            Some(other) => Err(EventError::Format(format!(
                "event format `{other}` is not supported; use application/cloudevents+json"
            ))),
        };
    }
    let user_properties = m.properties.map_or(&[][..], |p| &p.user_properties[..]);
    if user_properties.iter().any(|(k, _)| k == "specversion") {
        let mut attributes = StringAttributes::new();
        let mut dct_property = None;
        let mut others = Vec::new();
        for (name, value) in user_properties {
            // Not an attribute (`x-trace`, `Origin`, …): it travels with the MQTT message,
            // never as part of the event.
            if meshgate_core::validate::attribute_name(name).is_err() {
                others.push((name.clone(), value.clone()));
                continue;
            }
            if name == "datacontenttype" {
                // The spec's own example sends it; accept it when it agrees with Content Type.
                if dct_property.replace(value.clone()).is_some() {
                    return Err(EventError::Duplicate(name.clone()));
                }
                continue;
            }
            attributes.push(name, value.clone())?;
        }
        let mut event = attributes.build()?;
        if let Some(dct) = &dct_property
            && content_type.is_some_and(|ct| ct != dct)
        {
            return Err(EventError::Format(format!(
                "user property datacontenttype `{dct}` disagrees with Content Type `{}`",
                content_type.unwrap_or_default()
            )));
        }
        event.set_datacontenttype(content_type.map(str::to_owned).or(dct_property))?;
        if !m.payload.is_empty() {
            event.set_data(Some(Data::Binary(m.payload)));
        }
        return Ok(Decoded {
            event,
            plain: false,
            user_properties: others,
        });
    }
    if m.version == Version::V311 && looks_structured_json(&m.payload) {
        return json::decode(&m.payload).map(Decoded::event);
    }
    // MQTT's Content Type is any UTF-8 string [MQTT-3.3.2-20]; only a media type can be the
    // event's `datacontenttype`. The message is taken all the same, and MQTT subscribers get
    // its Content Type unaltered (`MqttProperties::content_type`). Checked before wrapping, so
    // the payload and topic are moved, not cloned for a second try (the publish hot path).
    let content_type = content_type
        .filter(|ct| meshgate_core::validate::media_type("datacontenttype", ct).is_ok());
    let event = m
        .wrapper
        .wrap_shared(m.payload, Some(m.topic.shared_str()), content_type)?;
    Ok(Decoded {
        event,
        plain: true,
        user_properties: user_properties.to_vec(),
    })
}

impl Decoded {
    fn event(event: Event) -> Decoded {
        Decoded {
            event,
            plain: false,
            user_properties: Vec::new(),
        }
    }
}

/// Payload and properties of an outbound PUBLISH.
#[derive(Debug)]
pub struct Outbound {
    pub payload: Bytes,
    pub properties: Option<PublishProperties>,
}

/// A plain MQTT message as its publisher sent it: the data as payload; MQTT 5 with the
/// publisher's Content Type and User Properties (the other forwarded properties are added by
/// the session, as for every delivery).
#[inline]
pub fn as_published(event: &Event, mqtt: Option<&MqttProperties>, version: Version) -> Outbound {
    let properties = match (version, mqtt) {
        (Version::V5, Some(m)) if m.content_type.is_some() || !m.user_properties.is_empty() => {
            Some(PublishProperties {
                content_type: m.content_type.clone(),
                user_properties: m.user_properties.clone(),
                ..Default::default()
            })
        }
        _ => None,
    };
    Outbound {
        payload: event.data().map(Data::to_bytes).unwrap_or_default(),
        properties,
    }
}

/// Encodes an event for a subscriber of `version`. `json` gives the event's JSON format (shared
/// by every subscriber of the envelope); it is only asked for in the structured modes.
#[inline]
pub fn encode(
    event: &Event,
    json: impl FnOnce() -> Bytes,
    version: Version,
    v5: Mqtt5Mode,
    v311: Mqtt311Mode,
) -> Outbound {
    match (version, v5, v311) {
        (Version::V5, Mqtt5Mode::Binary, _) => {
            let mut props = PublishProperties {
                content_type: event.binary_content_type().map(str::to_owned),
                ..Default::default()
            };
            props.user_properties = event
                .attributes()
                .filter(|(n, _)| *n != "datacontenttype")
                .map(|(n, v)| (n.to_owned(), v.to_string()))
                .collect();
            Outbound {
                payload: event.data().map(Data::to_bytes).unwrap_or_default(),
                properties: Some(props),
            }
        }
        (Version::V5, Mqtt5Mode::Structured, _) => Outbound {
            payload: json(),
            properties: Some(PublishProperties {
                content_type: Some(json::CONTENT_TYPE.to_owned()),
                ..Default::default()
            }),
        },
        (Version::V311, _, Mqtt311Mode::Structured) => Outbound {
            payload: json(),
            properties: None,
        },
        (Version::V311, _, Mqtt311Mode::Data) => Outbound {
            payload: event.data().map(Data::to_bytes).unwrap_or_default(),
            properties: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_core::ExtensionValue;

    const E0: &str = r#"{"specversion":"1.0","id":"A1","source":"/src","type":"com.example.t"}"#;

    static WRAPPER: std::sync::LazyLock<Wrapper> = std::sync::LazyLock::new(|| {
        Wrapper::new(client_source("dev 1"), "io.meshgate.mqtt.message").unwrap()
    });
    static T1: std::sync::LazyLock<Topic> =
        std::sync::LazyLock::new(|| Topic::from_mqtt("t/1").unwrap());

    fn inbound<'a>(
        version: Version,
        payload: &'static [u8],
        props: Option<&'a PublishProperties>,
    ) -> Inbound<'a> {
        Inbound {
            version,
            topic: &T1,
            payload: Bytes::from_static(payload),
            properties: props,
            wrapper: &WRAPPER,
        }
    }

    fn props(ct: Option<&str>, user: &[(&str, &str)]) -> PublishProperties {
        PublishProperties {
            content_type: ct.map(str::to_owned),
            user_properties: user
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    const E0_PROPS: [(&str, &str); 4] = [
        ("specversion", "1.0"),
        ("id", "A1"),
        ("source", "/src"),
        ("type", "com.example.t"),
    ];

    /// A client's CloudEvent may not take a type of meshgate's own, in any mode; a plain
    /// message is still wrapped with one.
    #[test]
    fn reserved_types_are_refused_from_clients_and_wrappings_keep_theirs() {
        let reserved =
            br#"{"specversion":"1.0","id":"A1","source":"/src","type":"io.meshgate.error"}"#;
        let p = props(Some("application/cloudevents+json"), &[]);
        let e = decode(inbound(Version::V5, reserved, Some(&p))).unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        let e = decode(inbound(Version::V311, reserved, None)).unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        let p = props(
            None,
            &[
                ("specversion", "1.0"),
                ("id", "A1"),
                ("source", "/src"),
                ("type", "io.meshgate.mqtt.sys"),
            ],
        );
        let e = decode(inbound(Version::V5, b"x", Some(&p))).unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        let plain = decode(inbound(Version::V5, b"21.5", None)).unwrap();
        assert_eq!(plain.ty(), "io.meshgate.mqtt.message");
    }

    #[test]
    fn i22_v311_structured() {
        let e = decode(inbound(Version::V311, E0.as_bytes(), None)).unwrap();
        assert_eq!(e.id(), "A1");
    }

    #[test]
    fn i23_v5_binary() {
        let mut user = E0_PROPS.to_vec();
        user.push(("count", "7"));
        let p = props(Some("application/json"), &user);
        let e = decode(inbound(Version::V5, br#"{"a":1}"#, Some(&p))).unwrap();
        assert_eq!(e.datacontenttype(), Some("application/json"));
        assert_eq!(
            e.extension("count"),
            Some(&ExtensionValue::String("7".into()))
        );
        assert_eq!(e.data().unwrap().to_bytes(), &br#"{"a":1}"#[..]);
    }

    /// Issue 20 item 2: a user property whose name is not an attribute name travels with the
    /// message and never becomes an attribute; it no longer makes the event invalid.
    #[test]
    fn non_attribute_user_properties_travel_beside_a_binary_event() {
        let mut user = E0_PROPS.to_vec();
        user.extend([("x-trace", "t1"), ("Origin", "lab"), ("x-trace", "t2")]);
        let p = props(None, &user);
        let d = decode_publish(inbound(Version::V5, b"x", Some(&p))).unwrap();
        assert!(!d.plain);
        assert_eq!(d.event.id(), "A1");
        assert_eq!(d.event.extension("x-trace"), None);
        assert_eq!(
            d.event.attributes().count(),
            4,
            "specversion, id, source, type only"
        );
        let names: Vec<&str> = d.user_properties.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["x-trace", "Origin", "x-trace"]);
    }

    /// Issue 20: MQTT's Content Type is any UTF-8 string [MQTT-3.3.2-20]: a plain message
    /// whose Content Type is no media type is taken (was refused with 0x99), keeping all of its
    /// user properties for MQTT subscribers.
    #[test]
    fn a_plain_message_with_any_content_type_is_taken() {
        for ct in ["My name", ""] {
            let p = props(Some(ct), &[("a", "1"), ("a", "2")]);
            let d = decode_publish(inbound(Version::V5, b"x", Some(&p))).unwrap();
            assert!(d.plain);
            assert_eq!(d.event.datacontenttype(), None, "{ct:?} is no media type");
            assert_eq!(d.user_properties.len(), 2);
        }
    }

    #[test]
    fn i24_prefixed_properties_are_not_a_cloudevent() {
        let user: Vec<(String, &str)> = E0_PROPS
            .iter()
            .map(|(k, v)| (format!("ce-{k}"), *v))
            .collect();
        let user: Vec<(&str, &str)> = user.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let p = props(None, &user);
        let e = decode(inbound(Version::V5, b"x", Some(&p))).unwrap();
        assert_eq!(e.ty(), "io.meshgate.mqtt.message", "wrapped, strict mode");
    }

    #[test]
    fn v5_structured_and_datacontenttype_property_rules() {
        let p = props(Some("application/cloudevents+json"), &[]);
        assert_eq!(
            decode(inbound(Version::V5, E0.as_bytes(), Some(&p)))
                .unwrap()
                .id(),
            "A1"
        );
        let mut user = E0_PROPS.to_vec();
        user.push(("datacontenttype", "text/plain"));
        let agree = props(Some("text/plain"), &user);
        assert!(decode(inbound(Version::V5, b"x", Some(&agree))).is_ok());
        let disagree = props(Some("application/json"), &user);
        assert!(decode(inbound(Version::V5, b"x", Some(&disagree))).is_err());
        let mut dup = E0_PROPS.to_vec();
        dup.push(("id", "A2"));
        assert!(decode(inbound(Version::V5, b"x", Some(&props(None, &dup)))).is_err());
    }

    #[test]
    fn plain_payloads_are_wrapped_with_the_client_as_source() {
        let p = props(Some("text/plain"), &[]);
        let e = decode(inbound(Version::V5, b"21.5", Some(&p))).unwrap();
        assert_eq!(e.source(), "/meshgate/mqtt/dev%201");
        assert_eq!(e.subject(), Some("t/1"));
        assert_eq!(e.datacontenttype(), Some("text/plain"));
        let e = decode(inbound(Version::V311, b"21.5", None)).unwrap();
        assert_eq!(e.datacontenttype(), None);
    }

    #[test]
    fn e5_e6_outbound() {
        let e = json::decode(
            br#"{"specversion":"1.0","id":"A1","source":"/src","type":"com.example.t","datacontenttype":"application/xml","data":"<a/>"}"#,
        )
        .unwrap();
        let j = json::encode_string(&e);
        let o = encode(
            &e,
            || Bytes::from(j.clone()),
            Version::V5,
            Mqtt5Mode::Binary,
            Mqtt311Mode::Structured,
        );
        let p = o.properties.unwrap();
        assert_eq!(p.content_type.as_deref(), Some("application/xml"));
        assert_eq!(&o.payload[..], b"<a/>");
        let names: Vec<&str> = p.user_properties.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["specversion", "id", "source", "type"]);
        let o = encode(
            &e,
            || Bytes::from(j.clone()),
            Version::V311,
            Mqtt5Mode::Binary,
            Mqtt311Mode::Structured,
        );
        assert_eq!(&o.payload[..], j.as_bytes());
        assert!(o.properties.is_none());
        let o = encode(
            &e,
            || Bytes::from(j.clone()),
            Version::V311,
            Mqtt5Mode::Binary,
            Mqtt311Mode::Data,
        );
        assert_eq!(&o.payload[..], b"<a/>");
    }

    #[test]
    fn binary_round_trip_v5() {
        let mut e = json::decode(E0.as_bytes()).unwrap();
        e.set_subject(Some("Euro € 😀".into())).unwrap();
        e.set_extension("n", ExtensionValue::Integer(3)).unwrap();
        e.set_datacontenttype(Some("text/plain".into())).unwrap();
        e.set_data(Some(Data::Binary(Bytes::from_static(b"hi"))));
        let j = json::encode_string(&e);
        let o = encode(
            &e,
            || Bytes::from(j.clone()),
            Version::V5,
            Mqtt5Mode::Binary,
            Mqtt311Mode::Structured,
        );
        let props = o.properties.unwrap();
        let back = decode(Inbound {
            version: Version::V5,
            topic: &Topic::from_mqtt("t").unwrap(),
            payload: o.payload,
            properties: Some(&props),
            wrapper: &WRAPPER,
        })
        .unwrap();
        assert_eq!(back.subject(), e.subject());
        // A string-only binding turns the Integer into its canonical string.
        assert_eq!(
            back.extension("n"),
            Some(&ExtensionValue::String("3".into()))
        );
    }
}
