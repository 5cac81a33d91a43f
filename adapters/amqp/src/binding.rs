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

use std::sync::Arc;

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

/// `(prefix index, attribute name)` for a header that names a CloudEvents attribute.
fn attribute_header(key: &str) -> Option<(usize, String)> {
    PREFIXES.iter().enumerate().find_map(|(i, p)| {
        let head = key.get(..p.len())?;
        head.eq_ignore_ascii_case(p)
            .then(|| (i, key[p.len()..].to_ascii_lowercase()))
    })
}

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
        AMQPValue::Timestamp(secs) => Ok(Value::Str(rfc3339_from_unix(*secs, 0))),
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
            None | Some("json") => json::decode(&m.body),
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
                if strings.contains(&name) || typed.iter().any(|(n, _)| n == &name) {
                    return Err(EventError::Duplicate(name));
                }
                typed.push((name, t));
            }
        }
    }
    // Header names differing only in case or prefix collapse to one attribute name.
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
    Ok(event)
}

/// Why an event cannot be written as an AMQP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{what} `{value}` is longer than the 255 bytes an AMQP short string holds")]
    TooLong { what: &'static str, value: String },
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
}

/// Encodes an event. `json` gives the event's JSON format (shared by every subscriber of the
/// envelope); it is asked for only in structured mode. `origin` is this gateway's instance id.
pub fn encode(
    event: &Event,
    json: impl FnOnce() -> Arc<str>,
    mode: AmqpMode,
    persistent: bool,
    origin: &str,
) -> Result<Outbound, EncodeError> {
    let mut headers = FieldTable::default();
    headers.insert(
        short("header", ORIGIN_HEADER.to_owned())?,
        AMQPValue::LongString(LongString::from(origin)),
    );
    let mut properties =
        BasicProperties::default().with_delivery_mode(if persistent { 2 } else { 1 });
    let body = match mode {
        AmqpMode::Structured => {
            properties =
                properties.with_content_type(short("content type", json::CONTENT_TYPE.to_owned())?);
            Bytes::copy_from_slice(json().as_bytes())
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
                headers.insert(
                    short("attribute header", format!("{ATTRIBUTE_PREFIX}{name}"))?,
                    value,
                );
            }
            // As in HTTP binary mode (CE-BINDINGS E4): JSON data without a content type is
            // declared JSON, so a string keeps its quotes' meaning.
            let content_type = event.datacontenttype().map(str::to_owned).or_else(|| {
                matches!(event.data(), Some(Data::Json(_))).then(|| "application/json".to_owned())
            });
            if let Some(ct) = content_type {
                properties = properties.with_content_type(short("datacontenttype", ct)?);
            }
            event.data().map(Data::to_bytes).unwrap_or_default()
        }
    };
    Ok(Outbound {
        properties: properties.with_headers(headers),
        body,
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
