//! CloudEvents over AMQP 0.9.1 (CE-BINDINGS.md §6 policy), without I/O.
//!
//! There is no official 0.9.1 binding; meshgate treats 0.9.1 like the AMQP 1.0 binding, which
//! RabbitMQ's protocol conversion maps onto basic properties and `headers`:
//!
//! Inbound:
//! - `content_type: application/cloudevents+json` (any case, parameters allowed) → structured
//!   mode: the body is the JSON format;
//! - a `specversion` header under one of the prefixes `cloudEvents_`, `cloudEvents:` or `ce-`
//!   (compared case-insensitively) → binary mode: every header under that prefix is an
//!   attribute, `content_type` is `datacontenttype`, the body is the data. One message must not
//!   mix prefixes. Integers of any 0.9.1 width are Integer when they fit in 32 bits, booleans
//!   Boolean, timestamps RFC 3339 strings, byte arrays Base64; other types are refused;
//! - anything else is wrapped: new id, the source's configured `source` and `type`, the routing
//!   key as `subject`, `content_type` as `datacontenttype`.
//!
//! Outbound: binary (default: `cloudEvents_` headers, Integer as a 64-bit long and Boolean as a
//! boolean, `time` as a string, `datacontenttype` as `content_type`) or structured.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use meshgate_config::AmqpMode;
use meshgate_core::event::StringAttributes;
use meshgate_core::wrap::{Wrapper, rfc3339_from_unix};
use meshgate_core::{Data, Event, EventError, ExtensionValue, json, media};

/// Header meshgate's sinks add to every message they publish (the publishing instance's id).
/// A source skips messages that carry it, so an event never re-enters the mesh through a
/// queue bound to a sink's exchange. Not a CloudEvents attribute.
pub const ORIGIN_HEADER: &str = "x-meshgate-origin";

/// The prefix meshgate writes attribute headers with (the AMQP binding's preferred form).
pub const ATTRIBUTE_PREFIX: &str = "cloudEvents_";

/// The accepted attribute header prefixes, lower-cased.
const PREFIXES: [&str; 3] = ["cloudevents_", "cloudevents:", "ce-"];

/// What a delivery carried.
#[derive(Debug)]
pub struct Inbound<'a> {
    pub routing_key: &'a str,
    pub properties: &'a BasicProperties,
    pub body: Bytes,
    /// Wraps plain messages with the source's configured `source` and `type`.
    pub wrapper: &'a Wrapper,
}

/// Whether a meshgate sink published this message (it is already in the mesh).
pub fn from_mesh(properties: &BasicProperties) -> bool {
    properties
        .headers()
        .as_ref()
        .is_some_and(|h| h.contains_key(ORIGIN_HEADER))
}

/// A W3C Trace Context header (`traceparent`, `tracestate`: the names the AMQP form of Trace
/// Context uses) as text, when it is a string.
pub fn trace_header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    let (_, value) = properties
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == name)?;
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// `(prefix index, attribute name)` for a header that names a CloudEvents attribute.
fn attribute_header(key: &str) -> Option<(usize, String)> {
    PREFIXES.iter().enumerate().find_map(|(i, p)| {
        let head = key.get(..p.len())?;
        head.eq_ignore_ascii_case(p)
            .then(|| (i, key[p.len()..].to_ascii_lowercase()))
    })
}

/// 9999-12-31T23:59:59Z in seconds: RFC 3339 years have four digits, and `rfc3339_from_unix`
/// would silently drop a fifth.
const MAX_TIMESTAMP: u64 = 253_402_300_799;

/// An attribute value as it arrived: a canonical string, or a natively typed extension value.
enum Value {
    Str(String),
    Typed(ExtensionValue),
}

fn value(name: &str, v: &AMQPValue) -> Result<Value, EventError> {
    let int = |i: i64| {
        i32::try_from(i)
            .map(|i| Value::Typed(ExtensionValue::Integer(i)))
            .map_err(|_| EventError::InvalidValue {
                name: name.to_owned(),
                reason: format!("{i} is outside the 32-bit range of a CloudEvents Integer"),
            })
    };
    match v {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec())
            .map(Value::Str)
            .map_err(|_| EventError::InvalidValue {
                name: name.to_owned(),
                reason: "not valid UTF-8".to_owned(),
            }),
        AMQPValue::ShortString(s) => Ok(Value::Str(s.as_str().to_owned())),
        AMQPValue::Boolean(b) => Ok(Value::Typed(ExtensionValue::Boolean(*b))),
        AMQPValue::ShortShortInt(i) => int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => int(i64::from(*i)),
        AMQPValue::ShortInt(i) => int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => int(i64::from(*i)),
        AMQPValue::LongInt(i) => int(i64::from(*i)),
        AMQPValue::LongUInt(i) => int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => int(*i),
        AMQPValue::Timestamp(secs) if *secs <= MAX_TIMESTAMP => {
            Ok(Value::Str(rfc3339_from_unix(*secs, 0)))
        }
        AMQPValue::Timestamp(secs) => Err(EventError::InvalidValue {
            name: name.to_owned(),
            reason: format!(
                "timestamp {secs} is after 9999-12-31T23:59:59Z, the last time RFC 3339 can write (0.9.1 timestamps are seconds)"
            ),
        }),
        AMQPValue::ByteArray(b) => Ok(Value::Str(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            b.as_slice(),
        ))),
        other => Err(EventError::InvalidValue {
            name: name.to_owned(),
            reason: format!(
                "AMQP type {:?} has no CloudEvents equivalent; send a string, integer, boolean or timestamp",
                other.get_type()
            ),
        }),
    }
}

/// Turns a delivery into an event.
pub fn decode(m: Inbound<'_>) -> Result<Event, EventError> {
    let content_type = m
        .properties
        .content_type()
        .as_ref()
        .map(ShortString::as_str);
    if let Some(ct) = content_type.filter(|ct| media::is_cloudevents(ct)) {
        if media::is_cloudevents_batch(ct) {
            return Err(EventError::Format(
                "batch mode is not defined for AMQP; send one event per message".to_owned(),
            ));
        }
        return match media::cloudevents_format(ct).as_deref() {
            None | Some("json") => json::decode(&m.body).and_then(|e| {
                meshgate_core::validate::client_event(&e)?;
                Ok(e)
            }),
            Some(other) => Err(EventError::Format(format!(
                "event format `{other}` is not supported; use application/cloudevents+json"
            ))),
        };
    }
    let headers = m.properties.headers().as_ref();
    let attributes: Vec<(usize, String, &AMQPValue)> = headers
        .into_iter()
        .flat_map(|h| h.inner().iter())
        .filter_map(|(k, v)| attribute_header(k.as_str()).map(|(p, n)| (p, n, v)))
        .collect();
    if !attributes.iter().any(|(_, n, _)| n == "specversion") {
        return m.wrapper.wrap(
            m.body,
            Some(m.routing_key).filter(|k| !k.is_empty()),
            content_type,
        );
    }
    if let Some((first, _, _)) = attributes.first()
        && let Some((other, _, _)) = attributes.iter().find(|(p, _, _)| p != first)
    {
        return Err(EventError::Format(format!(
            "attribute headers mix the prefixes `{}` and `{}`; use one (cloudEvents_ preferred)",
            PREFIXES[*first], PREFIXES[*other]
        )));
    }
    let mut strings = StringAttributes::new();
    let mut typed = Vec::new();
    let mut dct_header = None;
    for (_, name, v) in attributes {
        match value(&name, v)? {
            Value::Str(s) if name == "datacontenttype" => {
                if dct_header.replace(s).is_some() {
                    return Err(EventError::Duplicate(name));
                }
            }
            Value::Str(s) => strings.push(&name, s)?,
            Value::Typed(t) if meshgate_core::event::CORE_ATTRIBUTES.contains(&name.as_str()) => {
                strings.push(&name, t.to_string())?;
            }
            Value::Typed(t) => {
                meshgate_core::validate::attribute_name(&name)?;
                if typed.iter().any(|(n, _)| n == &name) {
                    return Err(EventError::Duplicate(name));
                }
                typed.push((name, t));
            }
        }
    }
    // Header names differing only in case or prefix collapse to one attribute name: a typed
    // value must not repeat a string one, whichever came first.
    if let Some((name, _)) = typed.iter().find(|(n, _)| strings.contains(n)) {
        return Err(EventError::Duplicate(name.clone()));
    }
    let mut event = strings.build()?;
    for (name, t) in typed {
        event.set_extension(&name, t)?;
    }
    if let (Some(h), Some(ct)) = (&dct_header, content_type)
        && h != ct
    {
        return Err(EventError::Format(format!(
            "header datacontenttype `{h}` disagrees with content_type `{ct}`"
        )));
    }
    event.set_datacontenttype(content_type.map(str::to_owned).or(dct_header))?;
    if !m.body.is_empty() {
        event.set_data(Some(Data::Binary(m.body)));
    }
    meshgate_core::validate::client_event(&event)?;
    Ok(event)
}

/// Why an event cannot be written as an AMQP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{what} `{value}` is longer than the 255 bytes an AMQP short string holds")]
    TooLong { what: &'static str, value: String },
    /// AMQP 0.9.1 has no continuation for content headers: the properties (with every
    /// attribute header) must fit in one frame of the connection's `frame_max`, or RabbitMQ
    /// closes the connection (FRAME_ERROR) — and the sink, publishing the same event again on
    /// the next one, would never get past it.
    #[error(
        "its attributes need a {size}-byte content header frame; the connection's frame_max is {frame_max} (make extension attributes shorter, or use mode = \"structured\")"
    )]
    HeaderTooLarge { size: usize, frame_max: usize },
    /// A long string's length is a u32 on the wire.
    #[error("attribute `{0}` is longer than the 4 GiB an AMQP long string holds")]
    ValueTooLong(String),
}

/// Bytes of a content header frame around its properties: frame type, channel and size (7),
/// class id, weight and body size (12), the property flags (2), the frame end (1).
const HEADER_FRAME_OVERHEAD: usize = 7 + 12 + 2 + 1;

/// Wire size of one field table entry: the key (a short string), the type tag, the value.
fn entry_size(key: &ShortString, value: &AMQPValue) -> Result<usize, EncodeError> {
    let value = match value {
        AMQPValue::LongString(s) => {
            if u32::try_from(s.as_bytes().len()).is_err() {
                return Err(EncodeError::ValueTooLong(key.as_str().to_owned()));
            }
            4 + s.as_bytes().len()
        }
        AMQPValue::LongLongInt(_) => 8,
        AMQPValue::Boolean(_) => 1,
        // encode() writes no other type.
        other => {
            let bytes = amq_protocol::types::generation::gen_raw_value(other)(Vec::new().into())
                .map(|w| w.into_inner().0.len())
                .unwrap_or(usize::MAX / 2);
            return Ok(1 + key.as_str().len() + 1 + bytes);
        }
    };
    Ok(1 + key.as_str().len() + 1 + value)
}

fn short(what: &'static str, value: String) -> Result<ShortString, EncodeError> {
    if value.len() > 255 {
        let mut head: String = value.chars().take(40).collect();
        head.push('…');
        return Err(EncodeError::TooLong { what, value: head });
    }
    ShortString::try_new(value.clone()).map_err(|_| EncodeError::TooLong { what, value })
}

/// Properties and body of an outbound message.
#[derive(Debug)]
pub struct Outbound {
    pub properties: BasicProperties,
    pub body: Bytes,
    /// The size of the content header frame these properties make (checked against the
    /// connection's `frame_max` by [`Outbound::fits`]).
    pub header_frame_size: usize,
}

impl Outbound {
    /// Whether the content header fits in one frame of `frame_max` bytes (0: no limit).
    pub fn fits(&self, frame_max: u32) -> Result<(), EncodeError> {
        let max = usize::try_from(frame_max).unwrap_or(usize::MAX);
        if frame_max != 0 && self.header_frame_size > max {
            return Err(EncodeError::HeaderTooLarge {
                size: self.header_frame_size,
                frame_max: max,
            });
        }
        Ok(())
    }
}

/// Encodes an event. `json` gives the event's JSON format (shared by every subscriber of the
/// envelope); it is asked for only in structured mode. `origin` is this gateway's instance id.
pub fn encode(
    event: &Event,
    json: impl FnOnce() -> Bytes,
    mode: AmqpMode,
    persistent: bool,
    origin: &str,
) -> Result<Outbound, EncodeError> {
    let mut headers = FieldTable::default();
    // The frame's size, property by property: delivery mode (1) and the table's length (4).
    let mut size = HEADER_FRAME_OVERHEAD + 1 + 4;
    let mut insert = |headers: &mut FieldTable, key: ShortString, value: AMQPValue| {
        size = size.saturating_add(entry_size(&key, &value)?);
        headers.insert(key, value);
        Ok::<(), EncodeError>(())
    };
    insert(
        &mut headers,
        short("header", ORIGIN_HEADER.to_owned())?,
        AMQPValue::LongString(LongString::from(origin)),
    )?;
    // With tracing on, the delivery's context also in W3C's own AMQP form (the event's
    // `traceparent`, set by `trace::deliver`), for consumers that know Trace Context and not
    // CloudEvents.
    if meshgate_core::trace::enabled() {
        for name in [
            meshgate_core::trace::TRACEPARENT,
            meshgate_core::trace::TRACESTATE,
        ] {
            if let Some(ExtensionValue::String(v)) = event.extension(name) {
                insert(
                    &mut headers,
                    short("header", name.to_owned())?,
                    AMQPValue::LongString(LongString::from(v.as_str())),
                )?;
            }
        }
    }
    let mut properties =
        BasicProperties::default().with_delivery_mode(if persistent { 2 } else { 1 });
    let mut content_type_size = 0;
    let body = match mode {
        AmqpMode::Structured => {
            let ct = short("content type", json::CONTENT_TYPE.to_owned())?;
            content_type_size = 1 + ct.as_str().len();
            properties = properties.with_content_type(ct);
            json()
        }
        AmqpMode::Binary => {
            for (name, v) in event.attributes() {
                if name == "datacontenttype" {
                    continue;
                }
                let value = match v {
                    meshgate_core::event::AttributeRef::Ext(ExtensionValue::Integer(i)) => {
                        AMQPValue::LongLongInt(i64::from(*i))
                    }
                    meshgate_core::event::AttributeRef::Ext(ExtensionValue::Boolean(b)) => {
                        AMQPValue::Boolean(*b)
                    }
                    other => AMQPValue::LongString(LongString::from(other.to_string())),
                };
                insert(
                    &mut headers,
                    short("attribute header", format!("{ATTRIBUTE_PREFIX}{name}"))?,
                    value,
                )?;
            }
            if let Some(ct) = event.binary_content_type() {
                let ct = short("datacontenttype", ct.to_owned())?;
                content_type_size = 1 + ct.as_str().len();
                properties = properties.with_content_type(ct);
            }
            event.data().map(Data::to_bytes).unwrap_or_default()
        }
    };
    Ok(Outbound {
        properties: properties.with_headers(headers),
        body,
        header_frame_size: size.saturating_add(content_type_size),
    })
}

/// Fills a sink's routing key template: `{topic}` is the topic as a routing key (`a/b` →
/// `a.b`), `{type}` the event type.
pub fn routing_key(
    template: &str,
    topic: &meshgate_core::Topic,
    event: &Event,
) -> Result<ShortString, EncodeError> {
    let mut key = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        key.push_str(&rest[..open]);
        let after = &rest[open..];
        if let Some(r) = after.strip_prefix("{topic}") {
            key.push_str(&topic.to_amqp_routing_key());
            rest = r;
        } else if let Some(r) = after.strip_prefix("{type}") {
            key.push_str(event.ty());
            rest = r;
        } else {
            // The config allows only the two placeholders; anything else is literal.
            key.push('{');
            rest = &after[1..];
        }
    }
    key.push_str(rest);
    short("routing key", key)
}

#[cfg(test)]
mod tests {
    use super::*;

    use meshgate_core::Topic;

    /// The E0 event's required attributes, as `cloudEvents_` headers.
    const E0: [(&str, &str); 4] = [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_id", "A1"),
        ("cloudEvents_source", "/src"),
        ("cloudEvents_type", "com.example.t"),
    ];

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    fn table<K: AsRef<str>>(headers: &[(K, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert(ShortString::from(k.as_ref()), v.clone());
        }
        t
    }

    /// Basic properties with `headers` and, when given, a `content_type`.
    fn props<K: AsRef<str>>(
        content_type: Option<&str>,
        headers: &[(K, AMQPValue)],
    ) -> BasicProperties {
        let p = BasicProperties::default().with_headers(table(headers));
        match content_type {
            Some(ct) => p.with_content_type(ShortString::from(ct)),
            None => p,
        }
    }

    /// Basic properties with only a `content_type`.
    fn with_ct(content_type: &str) -> BasicProperties {
        BasicProperties::default().with_content_type(ShortString::from(content_type))
    }

    /// A client's CloudEvent may not take a type of meshgate's own, structured or binary; a
    /// plain message is still wrapped with one.
    #[test]
    fn reserved_types_are_refused_and_wrappings_keep_theirs() {
        let structured = with_ct("application/cloudevents+json");
        let body = br#"{"specversion":"1.0","id":"1","source":"/s","type":"io.meshgate.error"}"#;
        let e = decode_props(&structured, body).unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        let binary = props::<&str>(
            None,
            &[
                (
                    "cloudEvents_specversion",
                    AMQPValue::LongString("1.0".into()),
                ),
                ("cloudEvents_id", AMQPValue::LongString("1".into())),
                ("cloudEvents_source", AMQPValue::LongString("/s".into())),
                (
                    "cloudEvents_type",
                    AMQPValue::LongString("io.meshgate.x".into()),
                ),
            ],
        );
        let e = decode_props(&binary, b"x").unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        let plain = decode_props(&BasicProperties::default(), b"hello").unwrap();
        assert!(plain.ty().starts_with("io.meshgate."), "{}", plain.ty());
    }

    /// The E0 headers followed by `extra`.
    fn e0_with(extra: &[(&str, AMQPValue)]) -> Vec<(String, AMQPValue)> {
        E0.iter()
            .map(|(k, v)| (k.to_string(), s(v)))
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .collect()
    }

    fn wrapper() -> Wrapper {
        Wrapper::new("/meshgate/amqp/orders", "io.meshgate.amqp.message").unwrap()
    }

    fn decode_at(
        routing_key: &str,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<Event, EventError> {
        let w = wrapper();
        decode(Inbound {
            routing_key,
            properties,
            body: Bytes::copy_from_slice(body),
            wrapper: &w,
        })
    }

    fn decode_props(properties: &BasicProperties, body: &[u8]) -> Result<Event, EventError> {
        decode_at("orders.eu", properties, body)
    }

    /// Decodes the E0 headers plus one extension header `name` with `value`.
    fn decode_ext(name: &str, value: AMQPValue) -> Result<Event, EventError> {
        decode_props(&props(None, &e0_with(&[(name, value)])), b"")
    }

    fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
        p.headers().as_ref()?.inner().get(name)
    }

    fn e0() -> Event {
        Event::new("A1", "/src", "com.example.t").unwrap()
    }

    fn no_json() -> Bytes {
        panic!("binary mode must not ask for the JSON format")
    }

    #[test]
    fn i27_binary_headers_and_json_body() {
        let p = props(
            Some("application/json"),
            &e0_with(&[("cloudEvents_count", s("7"))]),
        );
        let e = decode_props(&p, br#"{"a":1}"#).unwrap();
        assert_eq!(e.id(), "A1");
        assert_eq!(e.source(), "/src");
        assert_eq!(e.ty(), "com.example.t");
        assert_eq!(e.datacontenttype(), Some("application/json"));
        assert_eq!(
            e.extension("count"),
            Some(&ExtensionValue::String("7".into()))
        );
        assert_eq!(
            e.data(),
            Some(&Data::Binary(Bytes::from_static(br#"{"a":1}"#)))
        );
    }

    #[test]
    fn every_prefix_is_accepted_in_any_case() {
        for prefix in ["cloudEvents_", "cloudEvents:", "ce-", "CLOUDEVENTS_", "Ce-"] {
            let headers: Vec<(String, AMQPValue)> = [
                ("specversion", "1.0"),
                ("id", "A1"),
                ("source", "/src"),
                ("type", "com.example.t"),
            ]
            .iter()
            .map(|(n, v)| (format!("{prefix}{n}"), s(v)))
            .collect();
            let e = decode_props(&props(None, &headers), b"")
                .unwrap_or_else(|err| panic!("prefix {prefix}: {err}"));
            assert_eq!((e.id(), e.ty()), ("A1", "com.example.t"), "{prefix}");
        }
        // Attribute names are lower-cased whatever the header's case.
        let p = props(
            None,
            &[
                ("CloudEvents_SpecVersion", s("1.0")),
                ("CloudEvents_ID", s("A1")),
                ("cloudevents_Source", s("/src")),
                ("CLOUDEVENTS_TYPE", s("com.example.t")),
                ("CloudEvents_Count", s("7")),
            ],
        );
        let e = decode_props(&p, b"").unwrap();
        assert_eq!(e.id(), "A1");
        assert_eq!(
            e.extension("count"),
            Some(&ExtensionValue::String("7".into()))
        );
    }

    #[test]
    fn mixed_prefixes_are_rejected() {
        // I26: `cloudEvents:id` next to `cloudEvents_type`.
        let p = props(
            None,
            &[
                ("cloudEvents_specversion", s("1.0")),
                ("cloudEvents:id", s("A1")),
                ("cloudEvents_source", s("/src")),
                ("cloudEvents_type", s("com.example.t")),
            ],
        );
        assert!(matches!(decode_props(&p, b""), Err(EventError::Format(_))));
        let p = props(
            None,
            &[
                ("ce-specversion", s("1.0")),
                ("ce-id", s("A1")),
                ("ce-source", s("/src")),
                ("ce-type", s("com.example.t")),
                ("cloudEvents_count", s("7")),
            ],
        );
        assert!(matches!(decode_props(&p, b""), Err(EventError::Format(_))));
    }

    #[test]
    fn case_variants_of_one_header_are_duplicates() {
        let p = props(None, &e0_with(&[("cloudEvents_ID", s("A2"))]));
        assert_eq!(
            decode_props(&p, b""),
            Err(EventError::Duplicate("id".into()))
        );
        let p = props(
            None,
            &e0_with(&[
                ("cloudEvents_seq", s("1")),
                ("cloudEvents_SEQ", AMQPValue::LongInt(1)),
            ]),
        );
        assert_eq!(
            decode_props(&p, b""),
            Err(EventError::Duplicate("seq".into()))
        );
    }

    #[test]
    fn integers_of_every_width_become_integer_extensions() {
        let cases = [
            (AMQPValue::ShortShortInt(-8), -8),
            (AMQPValue::ShortShortUInt(200), 200),
            (AMQPValue::ShortInt(-30_000), -30_000),
            (AMQPValue::ShortUInt(60_000), 60_000),
            (AMQPValue::LongInt(i32::MIN), i32::MIN),
            (AMQPValue::LongUInt(2_000_000_000), 2_000_000_000),
            (AMQPValue::LongLongInt(3), 3),
            (AMQPValue::LongLongInt(i64::from(i32::MAX)), i32::MAX),
        ];
        for (value, want) in cases {
            let e = decode_ext("cloudEvents_seq", value.clone())
                .unwrap_or_else(|err| panic!("{value:?}: {err}"));
            assert_eq!(
                e.extension("seq"),
                Some(&ExtensionValue::Integer(want)),
                "{value:?}"
            );
        }
    }

    #[test]
    fn integers_outside_32_bits_are_rejected() {
        for value in [
            AMQPValue::LongLongInt(2_147_483_648),
            AMQPValue::LongLongInt(-2_147_483_649),
            AMQPValue::LongUInt(u32::MAX),
        ] {
            assert!(
                matches!(
                    decode_ext("cloudEvents_seq", value.clone()),
                    Err(EventError::InvalidValue { name, .. }) if name == "seq"
                ),
                "{value:?}"
            );
        }
    }

    #[test]
    fn booleans_timestamps_and_byte_arrays() {
        let e = decode_ext("cloudEvents_flag", AMQPValue::Boolean(true)).unwrap();
        assert_eq!(e.extension("flag"), Some(&ExtensionValue::Boolean(true)));
        let e = decode_ext("cloudEvents_time", AMQPValue::Timestamp(0)).unwrap();
        assert_eq!(e.time(), Some("1970-01-01T00:00:00.000000Z"));
        let e = decode_ext("cloudEvents_time", AMQPValue::Timestamp(1_795_359_845)).unwrap();
        assert_eq!(e.time(), Some("2026-11-22T15:04:05.000000Z"));
        let e = decode_ext("cloudEvents_time", s("2026-11-22T15:04:05+01:00")).unwrap();
        assert_eq!(e.time(), Some("2026-11-22T15:04:05+01:00"), "kept as sent");
        assert!(decode_ext("cloudEvents_time", s("yesterday")).is_err());
        let e = decode_ext(
            "cloudEvents_blob",
            AMQPValue::ByteArray(vec![0u8, 1, 2].into()),
        )
        .unwrap();
        assert_eq!(
            e.extension("blob"),
            Some(&ExtensionValue::String("AAEC".into()))
        );
        // An integer header for a core attribute is its canonical string.
        let p = props(
            None,
            &[
                ("cloudEvents_specversion", s("1.0")),
                ("cloudEvents_id", AMQPValue::LongInt(5)),
                ("cloudEvents_source", s("/src")),
                ("cloudEvents_type", s("com.example.t")),
            ],
        );
        assert_eq!(decode_props(&p, b"").unwrap().id(), "5");
    }

    #[test]
    fn timestamps_past_year_9999_are_rejected() {
        // 10000-01-01T00:00:00Z has no RFC 3339 form (four-digit years); a producer that sends
        // milliseconds where 0.9.1 has seconds lands there too.
        for secs in [253_402_300_800, 1_795_359_845_000] {
            let got = decode_ext("cloudEvents_time", AMQPValue::Timestamp(secs));
            assert!(
                matches!(&got, Err(EventError::InvalidValue { name, .. }) if name == "time"),
                "{secs}: {:?}",
                got.map(|e| e.time().map(str::to_owned))
            );
        }
        let e = decode_ext("cloudEvents_time", AMQPValue::Timestamp(253_402_300_799)).unwrap();
        assert_eq!(e.time(), Some("9999-12-31T23:59:59.000000Z"));
    }

    #[test]
    fn types_without_a_cloudevents_equivalent_are_rejected() {
        for value in [
            AMQPValue::Float(1.5),
            AMQPValue::Double(1.5),
            AMQPValue::FieldTable(table(&[("a", s("b"))])),
            AMQPValue::FieldArray(vec![s("a")].into()),
            AMQPValue::Void,
        ] {
            assert!(
                matches!(
                    decode_ext("cloudEvents_x", value.clone()),
                    Err(EventError::InvalidValue { name, .. }) if name == "x"
                ),
                "{value:?}"
            );
        }
    }

    #[test]
    fn structured_mode_reads_the_body_as_json() {
        let body = br#"{"specversion":"1.0","id":"S1","source":"/src","type":"com.example.t","seq":3,"data":{"a":1}}"#;
        for ct in [
            "application/cloudevents+json",
            "Application/CloudEvents+JSON; charset=utf-8",
            "application/cloudevents",
        ] {
            // Headers do not matter in structured mode, not even attribute headers.
            let p = props(Some(ct), &e0_with(&[]));
            let e = decode_props(&p, body).unwrap_or_else(|err| panic!("{ct}: {err}"));
            assert_eq!(e, json::decode(body).unwrap(), "{ct}");
            assert_eq!(e.extension("seq"), Some(&ExtensionValue::Integer(3)));
        }
        let p = with_ct("application/cloudevents+json");
        assert!(decode_props(&p, b"{not json").is_err());
    }

    #[test]
    fn batches_and_other_formats_are_rejected() {
        let batch = br#"[{"specversion":"1.0","id":"S1","source":"/src","type":"t"}]"#;
        for ct in [
            "application/cloudevents-batch+json",
            "APPLICATION/CLOUDEVENTS-BATCH+JSON",
        ] {
            let p = with_ct(ct);
            assert!(
                matches!(decode_props(&p, batch), Err(EventError::Format(_))),
                "{ct}"
            );
        }
        let p = with_ct("application/cloudevents+avro");
        assert!(matches!(decode_props(&p, b"x"), Err(EventError::Format(_))));
    }

    #[test]
    fn plain_messages_are_wrapped() {
        // Attribute headers without specversion do not make a CloudEvent.
        let p = props(Some("text/plain"), &[("cloudEvents_id", s("A1"))]);
        let e = decode_at("orders.eu", &p, b"21.5").unwrap();
        assert_ne!(e.id(), "A1", "a new id");
        assert!(!e.id().is_empty());
        assert_eq!(e.source(), "/meshgate/amqp/orders");
        assert_eq!(e.ty(), "io.meshgate.amqp.message");
        assert_eq!(e.subject(), Some("orders.eu"));
        assert_eq!(e.datacontenttype(), Some("text/plain"));
        assert_eq!(e.data(), Some(&Data::Binary(Bytes::from_static(b"21.5"))));
        assert!(e.time().is_some());
        assert!(
            e.extensions().is_empty(),
            "headers do not become extensions"
        );

        let bare = BasicProperties::default();
        let e = decode_at("", &bare, b"x").unwrap();
        assert_eq!(e.subject(), None, "no routing key, no subject");
        assert_eq!(e.datacontenttype(), None, "never invented");
        let e = decode_at("k", &bare, b"").unwrap();
        assert_eq!(e.data(), None);
        let other = decode_at("k", &bare, b"").unwrap();
        assert_ne!(e.id(), other.id());
    }

    #[test]
    fn missing_attributes_and_other_versions_are_rejected() {
        for missing in ["id", "source", "type"] {
            let headers: Vec<(&str, AMQPValue)> = E0
                .iter()
                .filter(|(k, _)| !k.ends_with(missing))
                .map(|(k, v)| (*k, s(v)))
                .collect();
            let p = props(Some("application/json"), &headers);
            assert!(
                matches!(decode_props(&p, b"{}"), Err(EventError::Missing(m)) if m == missing),
                "{missing}"
            );
        }
        let p = props(
            None,
            &[
                ("cloudEvents_specversion", s("0.3")),
                ("cloudEvents_id", s("A1")),
                ("cloudEvents_source", s("/src")),
                ("cloudEvents_type", s("com.example.t")),
            ],
        );
        assert_eq!(
            decode_props(&p, b""),
            Err(EventError::UnsupportedSpecVersion("0.3".into()))
        );
    }

    #[test]
    fn datacontenttype_header_must_agree_with_content_type() {
        let dct = [("cloudEvents_datacontenttype", s("text/plain"))];
        let agree = props(Some("text/plain"), &e0_with(&dct));
        assert_eq!(
            decode_props(&agree, b"x").unwrap().datacontenttype(),
            Some("text/plain")
        );
        let disagree = props(Some("application/json"), &e0_with(&dct));
        assert!(matches!(
            decode_props(&disagree, b"x"),
            Err(EventError::Format(_))
        ));
        // Alone, the header gives the datacontenttype.
        let alone = props(None, &e0_with(&dct));
        assert_eq!(
            decode_props(&alone, b"x").unwrap().datacontenttype(),
            Some("text/plain")
        );
        let none = props(None, &e0_with(&[]));
        assert_eq!(decode_props(&none, b"x").unwrap().datacontenttype(), None);
    }

    #[test]
    fn binary_encoding_writes_headers_content_type_and_body() {
        let mut e = e0();
        e.set_datacontenttype(Some("application/xml".into()))
            .unwrap();
        e.set_subject(Some("orders/eu".into())).unwrap();
        e.set_time(Some("2026-11-22T15:04:05Z".into())).unwrap();
        e.set_extension("seq", ExtensionValue::Integer(3)).unwrap();
        e.set_extension("flag", ExtensionValue::Boolean(false))
            .unwrap();
        e.set_extension("count", ExtensionValue::String("7".into()))
            .unwrap();
        e.set_data(Some(Data::Text("<a/>".into())));
        let o = encode(&e, no_json, AmqpMode::Binary, true, "gw-1").unwrap();
        let p = &o.properties;
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some("application/xml")
        );
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(&o.body[..], b"<a/>");
        let names: Vec<&str> = p
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(ShortString::as_str)
            .collect();
        assert_eq!(
            names,
            [
                "cloudEvents_count",
                "cloudEvents_flag",
                "cloudEvents_id",
                "cloudEvents_seq",
                "cloudEvents_source",
                "cloudEvents_specversion",
                "cloudEvents_subject",
                "cloudEvents_time",
                "cloudEvents_type",
                ORIGIN_HEADER,
            ],
            "no datacontenttype header"
        );
        assert_eq!(header(p, "cloudEvents_specversion"), Some(&s("1.0")));
        assert_eq!(header(p, "cloudEvents_id"), Some(&s("A1")));
        assert_eq!(header(p, "cloudEvents_subject"), Some(&s("orders/eu")));
        assert_eq!(
            header(p, "cloudEvents_time"),
            Some(&s("2026-11-22T15:04:05Z")),
            "time as a string, exactly as it arrived"
        );
        assert_eq!(
            header(p, "cloudEvents_seq"),
            Some(&AMQPValue::LongLongInt(3))
        );
        assert_eq!(
            header(p, "cloudEvents_flag"),
            Some(&AMQPValue::Boolean(false))
        );
        assert_eq!(header(p, "cloudEvents_count"), Some(&s("7")));
        assert_eq!(header(p, ORIGIN_HEADER), Some(&s("gw-1")));
        assert!(from_mesh(p));

        let o = encode(&e, no_json, AmqpMode::Binary, false, "gw-1").unwrap();
        assert_eq!(o.properties.delivery_mode(), &Some(1));
    }

    #[test]
    fn binary_encoding_of_json_data_and_of_no_data() {
        let e = json::decode(
            br#"{"specversion":"1.0","id":"A1","source":"/src","type":"com.example.t","data":"hi"}"#,
        )
        .unwrap();
        let o = encode(&e, no_json, AmqpMode::Binary, true, "gw-1").unwrap();
        assert_eq!(
            o.properties
                .content_type()
                .as_ref()
                .map(ShortString::as_str),
            Some("application/json"),
            "JSON data without a content type is declared JSON"
        );
        assert_eq!(&o.body[..], br#""hi""#);
        let o = encode(&e0(), no_json, AmqpMode::Binary, true, "gw-1").unwrap();
        assert_eq!(o.properties.content_type(), &None);
        assert!(o.body.is_empty());
    }

    #[test]
    fn structured_encoding_carries_the_json_format() {
        let mut e = e0();
        e.set_extension("seq", ExtensionValue::Integer(3)).unwrap();
        e.set_data(Some(Data::Binary(Bytes::from_static(b"\x00\x01"))));
        let text = json::encode_string(&e);
        let o = encode(
            &e,
            || Bytes::from(text.clone()),
            AmqpMode::Structured,
            false,
            "gw-2",
        )
        .unwrap();
        let p = &o.properties;
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some(json::CONTENT_TYPE)
        );
        assert_eq!(&o.body[..], text.as_bytes());
        assert_eq!(p.delivery_mode(), &Some(1));
        assert_eq!(header(p, ORIGIN_HEADER), Some(&s("gw-2")));
        assert_eq!(header(p, "cloudEvents_id"), None, "no attribute headers");
        assert!(from_mesh(p));
        // And it reads back as the same event.
        assert_eq!(decode_props(p, &o.body).unwrap(), e);
    }

    #[test]
    fn from_mesh_needs_the_origin_header() {
        assert!(!from_mesh(&BasicProperties::default()));
        assert!(!from_mesh(&props(None, &e0_with(&[]))));
        assert!(from_mesh(&props(None, &[(ORIGIN_HEADER, s("other-gw"))])));
    }

    #[test]
    fn binary_round_trip_keeps_the_event() {
        let mut e = e0();
        e.set_datacontenttype(Some("application/json".into()))
            .unwrap();
        e.set_dataschema(Some("https://example.com/schema".into()))
            .unwrap();
        e.set_subject(Some("orders/eu".into())).unwrap();
        e.set_time(Some("2026-11-22T15:04:05.123+01:00".into()))
            .unwrap();
        e.set_extension("seq", ExtensionValue::Integer(-42))
            .unwrap();
        e.set_extension("big", ExtensionValue::Integer(i32::MAX))
            .unwrap();
        e.set_extension("flag", ExtensionValue::Boolean(true))
            .unwrap();
        e.set_extension("count", ExtensionValue::String("7".into()))
            .unwrap();
        e.set_data(Some(Data::Binary(Bytes::from_static(br#"{"a":1}"#))));
        let o = encode(&e, no_json, AmqpMode::Binary, true, "gw-1").unwrap();
        let back = decode_props(&o.properties, &o.body).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.extension("seq"), Some(&ExtensionValue::Integer(-42)));
        assert_eq!(back.extension("flag"), Some(&ExtensionValue::Boolean(true)));
        assert_eq!(
            back.extension("count"),
            Some(&ExtensionValue::String("7".into())),
            "a string that looks like a number stays a string"
        );
        // The minimal event too.
        let o = encode(&e0(), no_json, AmqpMode::Binary, false, "gw-1").unwrap();
        assert_eq!(decode_props(&o.properties, &o.body).unwrap(), e0());
    }

    #[test]
    fn encoding_refuses_over_long_header_names() {
        let mut e = e0();
        let name = "x".repeat(250);
        e.set_extension(&name, ExtensionValue::Boolean(true))
            .unwrap();
        assert!(matches!(
            encode(&e, no_json, AmqpMode::Binary, true, "gw-1"),
            Err(EncodeError::TooLong { .. })
        ));
        let mut e = e0();
        e.set_datacontenttype(Some(format!("text/{}", "x".repeat(260))))
            .unwrap();
        assert!(matches!(
            encode(&e, no_json, AmqpMode::Binary, true, "gw-1"),
            Err(EncodeError::TooLong { .. })
        ));
    }

    #[test]
    fn routing_keys_from_templates() {
        let topic = Topic::from_mqtt("a/b/c").unwrap();
        let e = e0();
        assert_eq!(
            routing_key("{topic}", &topic, &e).unwrap().as_str(),
            "a.b.c"
        );
        assert_eq!(
            routing_key("x.{type}.{topic}", &topic, &e)
                .unwrap()
                .as_str(),
            "x.com.example.t.a.b.c"
        );
        assert_eq!(routing_key("fixed", &topic, &e).unwrap().as_str(), "fixed");
        assert_eq!(
            routing_key("{topic}.{topic}", &topic, &e).unwrap().as_str(),
            "a.b.c.a.b.c"
        );
        assert_eq!(
            routing_key("{nope}.{topic}", &topic, &e).unwrap().as_str(),
            "{nope}.a.b.c",
            "unknown placeholders stay literal"
        );
    }

    #[test]
    fn over_long_routing_keys_are_errors() {
        let e = e0();
        let long_topic = Topic::from_levels(["a".repeat(200), "b".repeat(60)]).unwrap();
        assert!(matches!(
            routing_key("{topic}", &long_topic, &e),
            Err(EncodeError::TooLong {
                what: "routing key",
                ..
            })
        ));
        let topic = Topic::from_mqtt("a").unwrap();
        let template = format!("{}.{{topic}}", "x".repeat(254));
        assert!(matches!(
            routing_key(&template, &topic, &e),
            Err(EncodeError::TooLong { .. })
        ));
        // Exactly 255 bytes fit.
        let template = format!("{}.{{topic}}", "x".repeat(253));
        assert_eq!(
            routing_key(&template, &topic, &e).unwrap().as_str().len(),
            255
        );
        let long_type = Event::new("A1", "/src", "t".repeat(300)).unwrap();
        assert!(routing_key("{type}", &topic, &long_type).is_err());
    }

    /// An arbitrary valid event for the round trip: attributes of any length around the
    /// 255-byte short string limit, extensions of every type, binary data or none.
    fn arbitrary_event() -> impl meshgate_fuzz::proptest::strategy::Strategy<Value = Event> {
        use meshgate_fuzz::proptest::prelude::*;
        use meshgate_fuzz::proptest::{collection, option};
        let text = || "[ -~\u{a0}-\u{3ff}]{1,40}|[a-z]{200,300}";
        let ext_value = prop_oneof![
            any::<i32>().prop_map(ExtensionValue::Integer),
            any::<bool>().prop_map(ExtensionValue::Boolean),
            "[ -~é€]{0,30}|x{1000,1500}".prop_map(ExtensionValue::String),
        ];
        (
            (text(), text(), text()),
            option::of(text()),
            option::of("(text|application)/[a-z]{1,10}|[a-z]{250,260}"),
            option::of(Just("2026-11-22T15:04:05.123+01:00".to_owned())),
            collection::vec(("[a-z0-9]{1,12}|[a-z]{240,250}", ext_value), 0..6),
            option::of(collection::vec(any::<u8>(), 1..64)),
        )
            .prop_filter_map(
                "not a valid event",
                |((id, source, ty), subject, ct, time, exts, data)| {
                    let mut e = Event::new(id, source, ty).ok()?;
                    e.set_subject(subject).ok()?;
                    e.set_datacontenttype(ct).ok()?;
                    e.set_time(time).ok()?;
                    for (name, v) in exts {
                        e.set_extension(&name, v).ok()?;
                    }
                    e.set_data(data.map(|d| Data::Binary(Bytes::from(d))));
                    Some(e)
                },
            )
    }

    /// Fuzz target: the sink's binary-mode encoding, through the wire and back. For any valid
    /// event, `encode` either refuses it for a true reason (a short string over 255 bytes, a
    /// header frame over frame_max) or gives properties whose content header frame is exactly
    /// the size it announced, and which amq-protocol parses back into the same event.
    #[test]
    fn fuzz_amqp_sink_headers() {
        use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, gen_frame, parsing::parse_frame};
        // A small frame_max, so that the generated attributes reach it.
        const FRAME_MAX: u32 = 4096;
        meshgate_fuzz::run(
            "fuzz_amqp_sink_headers",
            arbitrary_event(),
            |b| json::decode(b).ok(),
            |e| {
                let o = match encode(&e, no_json, AmqpMode::Binary, true, "gw-1") {
                    Ok(o) => o,
                    Err(EncodeError::TooLong { what, .. }) => {
                        // True only if some name or the content type is over 255 bytes.
                        let long = e
                            .attributes()
                            .any(|(n, _)| n.len() + ATTRIBUTE_PREFIX.len() > 255)
                            || e.binary_content_type().is_some_and(|ct| ct.len() > 255);
                        return if long {
                            Ok(())
                        } else {
                            Err(format!("TooLong({what}) for {e:?}"))
                        };
                    }
                    Err(other) => return Err(format!("{other}")),
                };
                let frame = AMQPFrame::Header(
                    1,
                    AMQPContentHeader {
                        class_id: 60,
                        body_size: o.body.len() as u64,
                        properties: o.properties.clone(),
                    },
                );
                let bytes = gen_frame(&frame)(Vec::new().into())
                    .map_err(|e| format!("{e:?}"))?
                    .into_inner()
                    .0;
                if bytes.len() != o.header_frame_size {
                    return Err(format!(
                        "header frame is {} bytes, encode said {}",
                        bytes.len(),
                        o.header_frame_size
                    ));
                }
                if o.fits(FRAME_MAX).is_ok() != (bytes.len() <= FRAME_MAX as usize) {
                    return Err("fits() disagrees with the frame's size".to_owned());
                }
                let properties = match parse_frame(&bytes[..]) {
                    Ok(([], AMQPFrame::Header(1, h))) => h.properties,
                    other => return Err(format!("amq-protocol cannot read it back: {other:?}")),
                };
                let back = decode_props(&properties, &o.body).map_err(|err| format!("{err}"))?;
                if back != e {
                    return Err(format!("round trip changed the event: {e:?} -> {back:?}"));
                }
                Ok(())
            },
        );
    }
}
