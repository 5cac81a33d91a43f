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
//! `Meshgate-Qos` (the MQTT publisher's QoS, when not 1), `Meshgate-Retain` (`1`), and the
//! MQTT 5 properties a broker forwards (`Meshgate-Mqtt-*`: response topic, correlation data,
//! payload format, expiry; for a plain MQTT message also its Content Type and every User
//! Property, in order).

use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use meshgate_config::NatsWireMode;
use meshgate_core::backbone::MqttProperties;
use meshgate_core::event::{AttributeRef, StringAttributes};
use meshgate_core::header::{HeaderValueError, decode_header_value, percent_encode_header};
use meshgate_core::{
    Data, Envelope, Event, EventError, ExtensionValue, Origin, Topic, TopicError, json, media,
};

pub(crate) const ORIGIN: &str = "Meshgate-Origin";
pub(crate) const QOS: &str = "Meshgate-Qos";
pub(crate) const RETAIN: &str = "Meshgate-Retain";
const MQTT_RESPONSE_TOPIC: &str = "Meshgate-Mqtt-Response-Topic";
const MQTT_CORRELATION: &str = "Meshgate-Mqtt-Correlation-Data";
const MQTT_UTF8: &str = "Meshgate-Mqtt-Payload-Utf8";
const MQTT_EXPIRES: &str = "Meshgate-Mqtt-Expires-At-Ms";
/// A plain MQTT message (`Envelope::plain`): `1`.
const MQTT_PLAIN: &str = "Meshgate-Mqtt-Plain";
/// A plain MQTT message's Content Type, percent-encoded.
const MQTT_CONTENT_TYPE: &str = "Meshgate-Mqtt-Content-Type";
/// One User Property of a plain MQTT message, `<name>=<value>`, each percent-encoded (`=` in
/// the name too); one line per property, in order.
const MQTT_USER_PROPERTY: &str = "Meshgate-Mqtt-User-Property";
const CONTENT_TYPE: &str = "Content-Type";

/// Why a header line cannot be written, or a received header block is not a valid one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("the header block does not start with NATS/1.0")]
    NoVersionLine,
    #[error("header line {line} has no `:`")]
    NoColon { line: usize },
    #[error("header name {name:?} is not a NATS header token (printable ASCII, no `:`)")]
    BadName { name: String },
    /// Outbound: a value with CR, LF or another control character (its start, for the log).
    #[error("the value of header `{name}` has a control character ({value:.40?}…)")]
    ControlCharacter { name: String, value: String },
    /// Inbound: a value that is not UTF-8 text without control characters.
    #[error("the value of header `{name}` is not UTF-8 text without control characters")]
    BadValue { name: String },
}

/// Why a NATS message is not an event.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("subject `{subject}`: {source}")]
    Subject {
        subject: String,
        #[source]
        source: TopicError,
    },
    #[error(transparent)]
    Headers(#[from] HeaderError),
    #[error("structured event: {0}")]
    Structured(#[source] EventError),
    #[error("no CloudEvents headers and not a JSON event: {0}")]
    NotAnEvent(#[source] EventError),
    /// A `ce-` header whose value is not percent-encoded text (the decoder's reason).
    #[error("header `{name}`: {source}")]
    HeaderValue {
        name: String,
        #[source]
        source: HeaderValueError,
    },
    #[error("header `{name}`: {source}")]
    Attribute {
        name: String,
        #[source]
        source: EventError,
    },
    /// The attributes of a binary-mode event do not make an event.
    #[error(transparent)]
    Binary(EventError),
}

/// Where [`encode`] writes headers: an async-nats `HeaderMap` (JetStream) or a raw NATS
/// header block ([`RawHeaders`], the core backbone's own client).
pub(crate) trait HeaderSink {
    /// Adds a header; `value` is the concatenation of `parts` (no CR or LF in any of them).
    fn put(&mut self, name: &'static str, parts: &[&str]);
    /// Adds a header with a name made at run time (binary mode's `ce-<attribute>`).
    fn put_owned(&mut self, name: String, value: &str);
}

impl HeaderSink for HeaderMap {
    // Appended, not inserted: a header may repeat (`Meshgate-Mqtt-User-Property`, in order).
    fn put(&mut self, name: &'static str, parts: &[&str]) {
        self.append(name, parts.concat());
    }
    fn put_owned(&mut self, name: String, value: &str) {
        self.insert(name, value);
    }
}

/// A NATS header block being written: `NATS/1.0\r\n`, `Name: value\r\n` lines, `\r\n`.
///
/// Every line is checked before it is written (review F2 for NATS): a name that is not a
/// token ([`is_header_name`]) or a value with CR, LF or another control character
/// ([`is_header_value`]) would break the block, or be read back as other headers. Such a line
/// is not written and the block is refused by [`RawHeaders::finish`]: the event is skipped
/// and counted by the caller, never sent malformed. (meshgate's own encoder writes only
/// constant names, `ce-` + an attribute name (`[a-z0-9]+`), and percent-encoded, Base64 or
/// numeric values, so this never fires today; it keeps a future change from writing a
/// malformed block.)
#[derive(Debug, Default)]
pub(crate) struct RawHeaders {
    buf: Vec<u8>,
    /// Why a line was refused (the first one).
    bad: Option<HeaderError>,
}

impl RawHeaders {
    pub(crate) fn new() -> Self {
        RawHeaders::reuse(Vec::with_capacity(128))
    }
    /// A block written into `buf` (cleared first), to keep its allocation.
    pub(crate) fn reuse(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.extend_from_slice(b"NATS/1.0\r\n");
        RawHeaders { buf, bad: None }
    }
    /// The finished block, or why a header could not be written (the event cannot be
    /// represented as a NATS message: skip it and count it).
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, HeaderError> {
        if let Some(bad) = self.bad {
            return Err(bad);
        }
        self.buf.extend_from_slice(b"\r\n");
        Ok(self.buf)
    }

    /// Appends `name: <parts>` if the line is valid; records why not otherwise. `name_checked`:
    /// the name is one of meshgate's constants (checked by a test, not per event).
    fn line(&mut self, name: &str, name_checked: bool, parts: &[&str]) {
        if self.bad.is_some() {
            return;
        }
        debug_assert!(!name_checked || is_header_name(name.as_bytes()), "{name}");
        if !name_checked && !is_header_name(name.as_bytes()) {
            self.bad = Some(HeaderError::BadName {
                name: name.to_owned(),
            });
            return;
        }
        if let Some(p) = parts.iter().find(|p| !is_header_value(p.as_bytes())) {
            self.bad = Some(HeaderError::ControlCharacter {
                name: name.to_owned(),
                value: p.chars().take(40).collect(),
            });
            return;
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b": ");
        for p in parts {
            self.buf.extend_from_slice(p.as_bytes());
        }
        self.buf.extend_from_slice(b"\r\n");
    }
}

impl HeaderSink for RawHeaders {
    fn put(&mut self, name: &'static str, parts: &[&str]) {
        self.line(name, true, parts);
    }
    fn put_owned(&mut self, name: String, value: &str) {
        self.line(&name, false, &[value]);
    }
}

/// A header name NATS (and HTTP) can carry: one or more printable ASCII characters, no `:`
/// (the same rule as async-nats's `HeaderName`, which panics on others).
pub(crate) fn is_header_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| b.is_ascii_graphic() && b != b':')
}

/// A header value that stays on its line: no CR, LF or other control character (tab
/// allowed), no DEL. Non-ASCII UTF-8 is allowed (NATS carries bytes; `decode` needs UTF-8).
pub(crate) fn is_header_value(value: &[u8]) -> bool {
    // No early exit: a loop the compiler vectorizes (this runs for every header written).
    value
        .iter()
        .fold(true, |ok, &b| ok & (b == b'\t' || (b >= b' ' && b != 0x7f)))
}

/// `name` starts with `ce-`, any case, and has more after it: a binary-mode attribute.
/// Byte comparisons: a name is any bytes a NATS program sent (`abé` has no char boundary at
/// byte 3, where slicing the `str` panicked: review F8).
fn is_ce_header(name: &str) -> bool {
    let name = name.as_bytes();
    name.len() > 3
        && name
            .get(..3)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"ce-"))
}

/// Writes `envelope`'s headers to `headers` and returns the payload. `instance` is this
/// gateway's instance id, and percent-encoded (the usual origin; encoded once, not per
/// message).
pub(crate) fn encode(
    envelope: &Envelope,
    mode: NatsWireMode,
    instance: (&str, &str),
    headers: &mut impl HeaderSink,
) -> Bytes {
    encode_headers(envelope, mode, instance, headers);
    match mode {
        // The JSON is shared with other subscribers of the envelope: no copy.
        NatsWireMode::Structured => envelope.json(),
        NatsWireMode::Binary => envelope
            .event
            .data()
            .map(Data::to_bytes)
            .unwrap_or_default(),
    }
}

/// Appends [`encode`]'s payload to `out` (the JSON encoded there, unless the envelope has it
/// already).
pub(crate) fn write_payload(envelope: &Envelope, mode: NatsWireMode, out: &mut Vec<u8>) {
    match mode {
        NatsWireMode::Structured => match envelope.json_if_encoded() {
            Some(json) => out.extend_from_slice(json),
            None => json::encode_into(out, &envelope.event),
        },
        NatsWireMode::Binary => {
            if let Some(data) = envelope.event.data() {
                out.extend_from_slice(data.as_slice());
            }
        }
    }
}

/// At least the length of [`encode`]'s header block and payload together.
pub(crate) fn size_bound(envelope: &Envelope, mode: NatsWireMode) -> usize {
    // Header values are percent-encoded (at most 3 bytes a byte); each line's name, `: `
    // and CRLF, and the fixed lines, are in the constant.
    let mut headers = 512 + envelope.origin.instance.len() * 3;
    if let Some(m) = &envelope.mqtt {
        headers += m.response_topic.as_ref().map_or(0, |t| t.len() * 3);
        headers += m
            .correlation_data
            .as_ref()
            .map_or(0, |c| c.len().div_ceil(3) * 4);
        headers += m.content_type.as_ref().map_or(0, |t| 32 + t.len() * 3);
        headers += m
            .user_properties
            .iter()
            .map(|(k, v)| 32 + (k.len() + v.len()) * 3)
            .sum::<usize>();
    }
    let event = &envelope.event;
    if meshgate_core::trace::enabled() {
        // The W3C lines: a 55-byte traceparent, a tracestate no longer than the event's.
        headers += 128
            + match event.extension(meshgate_core::trace::TRACESTATE) {
                Some(ExtensionValue::String(s)) => s.len(),
                _ => 0,
            };
    }
    match mode {
        // Kept JSON (another instance's, or encoded here already) is written as it is.
        NatsWireMode::Structured => match envelope.json_if_encoded() {
            Some(json) => headers + json.len(),
            None => headers + json::encoded_len_bound(event),
        },
        NatsWireMode::Binary => {
            for (name, value) in event.attributes() {
                headers += 8 + name.len();
                headers += match value {
                    AttributeRef::Ext(ExtensionValue::Integer(_)) => 20,
                    AttributeRef::Ext(ExtensionValue::Boolean(_)) => 5,
                    AttributeRef::Str(s) => s.len() * 3,
                    AttributeRef::Ext(ExtensionValue::String(s)) => s.len() * 3,
                };
            }
            let ct = event.binary_content_type().map_or(0, str::len);
            headers + ct * 4 + event.data().map_or(0, Data::len)
        }
    }
}

/// Writes `envelope`'s headers (those of [`encode`]) to `headers`.
pub(crate) fn encode_headers(
    envelope: &Envelope,
    mode: NatsWireMode,
    instance: (&str, &str),
    headers: &mut impl HeaderSink,
) {
    let origin = &envelope.origin;
    let (plain, encoded) = instance;
    let mut connection = itoa::Buffer::new();
    let connection = connection.format(origin.connection);
    if *origin.instance == *plain {
        headers.put(ORIGIN, &[connection, "@", encoded]);
    } else {
        let other = percent_encode_header(&origin.instance);
        headers.put(ORIGIN, &[connection, "@", &other]);
    }
    if envelope.qos != 1 {
        headers.put(QOS, &[&envelope.qos.to_string()]);
    }
    if envelope.retain {
        headers.put(RETAIN, &["1"]);
    }
    if envelope.plain {
        headers.put(MQTT_PLAIN, &["1"]);
    }
    if let Some(m) = &envelope.mqtt {
        if let Some(t) = &m.content_type {
            headers.put(MQTT_CONTENT_TYPE, &[&percent_encode_header(t)]);
        }
        for (name, value) in &m.user_properties {
            let name = percent_encode_header(name).replace('=', "%3D");
            headers.put(
                MQTT_USER_PROPERTY,
                &[&name, "=", &percent_encode_header(value)],
            );
        }
        if let Some(t) = &m.response_topic {
            headers.put(MQTT_RESPONSE_TOPIC, &[&percent_encode_header(t)]);
        }
        if let Some(c) = &m.correlation_data {
            use base64::Engine;
            let c = base64::engine::general_purpose::STANDARD.encode(c);
            headers.put(MQTT_CORRELATION, &[&c]);
        }
        if m.payload_utf8 {
            headers.put(MQTT_UTF8, &["1"]);
        }
        if let Some(t) = m.expires_at_ms {
            headers.put(MQTT_EXPIRES, &[&t.to_string()]);
        }
    }
    // While tracing is on, the event's context also in the W3C headers, for instrumented NATS
    // programs reading the bus (instances read it from the event).
    if meshgate_core::trace::enabled()
        && let Some(sc) = meshgate_core::trace::of_event(&envelope.event)
    {
        let w3c = meshgate_core::trace::headers(&sc);
        headers.put(meshgate_core::trace::TRACEPARENT, &[&w3c.traceparent]);
        if let Some(ts) = &w3c.tracestate {
            headers.put(meshgate_core::trace::TRACESTATE, &[ts]);
        }
    }
    match mode {
        NatsWireMode::Structured => headers.put(CONTENT_TYPE, &[json::CONTENT_TYPE]),
        NatsWireMode::Binary => {
            let event = &envelope.event;
            for (name, value) in event.attributes() {
                headers.put_owned(
                    format!("ce-{name}"),
                    &percent_encode_header(&value.to_string()),
                );
            }
            let content_type = event.binary_content_type();
            if let Some(ct) = content_type {
                // (A header value with CR or LF would break the header block.)
                if !media::is_cloudevents(ct) && !ct.contains(['\r', '\n']) {
                    headers.put(CONTENT_TYPE, &[ct]);
                }
                if event.datacontenttype().is_none() {
                    headers.put("ce-datacontenttype", &[&percent_encode_header(ct)]);
                }
            }
        }
    }
}

/// Where [`decode`] reads headers: an async-nats `HeaderMap` (JetStream) or a raw header
/// block (the core backbone's own client). Names are compared case-insensitively.
pub(crate) trait HeaderSource {
    /// Every (name, value), in order, borrowed for as long as the headers; or why the headers
    /// are not a valid NATS header block (a message with such headers is refused, not read in
    /// part: the caller drops what `f` saw).
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a str)) -> Result<(), HeaderError>;
}

impl HeaderSource for HeaderMap {
    // async-nats checked names and values when it parsed them.
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a str)) -> Result<(), HeaderError> {
        for (name, values) in self.iter() {
            for value in values {
                f(name.as_ref(), value.as_str());
            }
        }
        Ok(())
    }
}

/// A received header block, read in place: `NATS/1.0[ status]\r\n`, then `Name: value\r\n`
/// lines up to an empty line. Lines that are not UTF-8 or have no `:` are skipped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawHeaderBlock<'a>(pub &'a [u8]);

impl<'a> RawHeaderBlock<'a> {
    fn lines(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        let block = self.0;
        // Past the version line.
        let mut at = memchr::memchr(b'\n', block).map_or(block.len(), |i| i + 1);
        std::iter::from_fn(move || {
            loop {
                let rest = &block[at..];
                let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
                at += (end + 1).min(rest.len());
                let line = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
                if line.is_empty() {
                    return None;
                }
                let Some(colon) = memchr::memchr(b':', line) else {
                    continue;
                };
                let (Ok(k), Ok(v)) = (
                    std::str::from_utf8(&line[..colon]),
                    std::str::from_utf8(&line[colon + 1..]),
                ) else {
                    continue;
                };
                return Some((k.trim(), v.trim()));
            }
        })
    }
}

impl RawHeaderBlock<'_> {
    /// The first value of header `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.lines()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

impl HeaderSource for RawHeaderBlock<'_> {
    fn visit<'b>(&'b self, f: &mut dyn FnMut(&'b str, &'b str)) -> Result<(), HeaderError> {
        visit_block(self.0, f)
    }
}

/// Checks a received header block: the version line `NATS/1.0[ status]`, then `Name: value`
/// lines up to an empty line (or the block's end), each ending in LF (CRLF as sent).
/// Names must be [`is_header_name`] tokens and values UTF-8 and [`is_header_value`]; a line
/// without `:` is refused too. Only byte comparisons and `get`: any input gives a verdict.
#[cfg(test)]
pub(crate) fn check_block(block: &[u8]) -> Result<(), HeaderError> {
    visit_block(block, &mut |_, _| {})
}

/// [`check_block`] and the reading of the lines in one pass: `f` gets each (name, value) (the
/// value without the blanks around it) until the first bad line, whose reason is the error.
/// One pass because this runs for every message a subscription receives: checking first and
/// reading after walked and UTF-8-checked each block twice (issue 18's NATS benchmark rows).
fn visit_block<'a>(
    block: &'a [u8],
    f: &mut dyn FnMut(&'a str, &'a str),
) -> Result<(), HeaderError> {
    let Some(rest) = block.strip_prefix(b"NATS/1.0") else {
        return Err(HeaderError::NoVersionLine);
    };
    let Some(version_end) = memchr::memchr(b'\n', rest) else {
        return Ok(());
    };
    let mut lines = rest.get(version_end + 1..).unwrap_or_default();
    let mut n = 0;
    while !lines.is_empty() {
        n += 1;
        let end = memchr::memchr(b'\n', lines).unwrap_or(lines.len());
        let line = lines.get(..end).unwrap_or_default();
        lines = lines.get(end + 1..).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return Err(HeaderError::NoColon { line: n });
        };
        let (name, value) = (
            line.get(..colon).unwrap_or_default(),
            line.get(colon + 1..).unwrap_or_default(),
        );
        if !is_header_name(name) {
            return Err(HeaderError::BadName {
                name: String::from_utf8_lossy(name).into_owned(),
            });
        }
        let text = is_header_value(value)
            .then(|| std::str::from_utf8(value.trim_ascii()).ok())
            .flatten();
        let (Ok(name), Some(value)) = (std::str::from_utf8(name), text) else {
            return Err(HeaderError::BadValue {
                name: String::from_utf8_lossy(name).into_owned(),
            });
        };
        f(name, value);
    }
    Ok(())
}

/// The envelope of a received message; a message that is not a CloudEvent is counted in
/// `malformed`, logged at debug level and skipped (`None`).
pub(crate) fn decode_or_count(
    prefix: &str,
    subject: &str,
    headers: Option<&dyn HeaderSource>,
    payload: Bytes,
    malformed: &meshgate_core::metrics::Counter,
) -> Option<Envelope> {
    match decode(prefix, subject, headers, payload) {
        Ok(envelope) => Some(envelope),
        Err(reason) => {
            malformed.inc();
            tracing::debug!(
                subject,
                reason = %reason,
                "skipped a NATS message that is not a CloudEvent"
            );
            None
        }
    }
}

/// The envelope a NATS message carries, or why it is not one.
pub(crate) fn decode(
    prefix: &str,
    subject: &str,
    headers: Option<&dyn HeaderSource>,
    payload: Bytes,
) -> Result<Envelope, DecodeError> {
    let topic =
        Topic::from_nats_subject(prefix, subject).map_err(|source| DecodeError::Subject {
            subject: subject.to_owned(),
            source,
        })?;
    let m = Meta::read(headers)?;
    let origin = m.origin.and_then(parse_origin);
    // A structured event with meshgate's origin header (another instance's): its bytes, now
    // checked to be a valid event, are kept as its JSON format for the subscribers that want
    // that (WebSocket, MQTT structured) instead of encoding it again. Copied: a slice would
    // keep the client's whole read buffer alive while the event waits in queues. JSON without
    // that header (other programs') is encoded anew, as it may hold nulls or forms meshgate
    // does not write; a program that sets the header gets its valid JSON passed on as it is.
    let mut own_json = None;
    let event = match m.content_type {
        Some(ct) if media::is_cloudevents(ct) => {
            let event = json::decode(&payload).map_err(DecodeError::Structured)?;
            if origin.is_some() {
                own_json = Some(Bytes::copy_from_slice(&payload));
            }
            event
        }
        _ => match headers {
            Some(h) if m.binary => decode_binary(h, m.content_type, payload)?,
            _ => json::decode(&payload).map_err(DecodeError::NotAnEvent)?,
        },
    };
    // The message's own trace context (headers) becomes the event's, so that the deliveries'
    // spans continue the publisher's trace (only while tracing is on; the transport's wins
    // over the event's attribute, as at every ingress). Not an instance's (it wrote the headers
    // from the event).
    let mut event = event;
    if origin.is_none() && meshgate_core::trace::adopt(&mut event, m.traceparent, m.tracestate) {
        // The event changed: its JSON is written anew.
        own_json = None;
    }
    let origin = match origin {
        Some(o) => o,
        // Published by another NATS program: no meshgate connection to compare with.
        None => Origin {
            instance: Arc::from(""),
            connection: 0,
        },
    };
    let qos = m.qos.and_then(|q| q.parse::<u8>().ok()).unwrap_or(1);
    let retain = m.retain == Some("1");
    let mqtt = MqttProperties {
        response_topic: m
            .response_topic
            .and_then(|t| decode_header_value(t.as_bytes()).ok()),
        correlation_data: m.correlation.and_then(|c| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(c)
                .ok()
                .map(Bytes::from)
        }),
        payload_utf8: m.utf8 == Some("1"),
        expires_at_ms: m.expires.and_then(|t| t.parse().ok()),
        content_type: m
            .content_type_mqtt
            .and_then(|t| decode_header_value(t.as_bytes()).ok()),
        user_properties: m
            .user_properties
            .iter()
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                Some((
                    decode_header_value(k.as_bytes()).ok()?,
                    decode_header_value(v.as_bytes()).ok()?,
                ))
            })
            .collect(),
    };
    let mut envelope = Envelope::new(topic, Arc::new(event), origin)
        .with_qos(qos)
        .with_retain(retain)
        .with_plain(m.plain == Some("1"));
    envelope.mqtt = (!mqtt.is_empty()).then(|| Arc::new(mqtt));
    Ok(match own_json {
        Some(json) => envelope.with_json(json),
        None => envelope,
    })
}

/// The headers [`decode`] looks at, found in one pass (first value of each).
#[derive(Default)]
struct Meta<'a> {
    content_type: Option<&'a str>,
    origin: Option<&'a str>,
    qos: Option<&'a str>,
    retain: Option<&'a str>,
    response_topic: Option<&'a str>,
    correlation: Option<&'a str>,
    utf8: Option<&'a str>,
    expires: Option<&'a str>,
    plain: Option<&'a str>,
    content_type_mqtt: Option<&'a str>,
    /// Every `Meshgate-Mqtt-User-Property`, in order (allocated only when there is one).
    user_properties: Vec<&'a str>,
    /// Any `ce-` header.
    binary: bool,
    /// W3C Trace Context headers (`traceparent`, `tracestate`): what an instrumented NATS
    /// program publishing on the bus sends its span's context in.
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl<'a> Meta<'a> {
    fn read(headers: Option<&'a dyn HeaderSource>) -> Result<Meta<'a>, HeaderError> {
        let mut m = Meta::default();
        if let Some(h) = headers {
            h.visit(&mut |k, v| {
                let slot = if k.eq_ignore_ascii_case(CONTENT_TYPE) {
                    &mut m.content_type
                } else if k.eq_ignore_ascii_case(ORIGIN) {
                    &mut m.origin
                } else if k.eq_ignore_ascii_case(QOS) {
                    &mut m.qos
                } else if k.eq_ignore_ascii_case(RETAIN) {
                    &mut m.retain
                } else if k.eq_ignore_ascii_case(MQTT_RESPONSE_TOPIC) {
                    &mut m.response_topic
                } else if k.eq_ignore_ascii_case(MQTT_CORRELATION) {
                    &mut m.correlation
                } else if k.eq_ignore_ascii_case(MQTT_UTF8) {
                    &mut m.utf8
                } else if k.eq_ignore_ascii_case(MQTT_EXPIRES) {
                    &mut m.expires
                } else if k.eq_ignore_ascii_case(MQTT_PLAIN) {
                    &mut m.plain
                } else if k.eq_ignore_ascii_case(MQTT_CONTENT_TYPE) {
                    &mut m.content_type_mqtt
                } else if k.eq_ignore_ascii_case(MQTT_USER_PROPERTY) {
                    m.user_properties.push(v);
                    return;
                } else if k.eq_ignore_ascii_case(meshgate_core::trace::TRACEPARENT) {
                    &mut m.traceparent
                } else if k.eq_ignore_ascii_case(meshgate_core::trace::TRACESTATE) {
                    &mut m.tracestate
                } else {
                    m.binary |= is_ce_header(k);
                    return;
                };
                slot.get_or_insert(v);
            })?;
        }
        Ok(m)
    }
}

fn decode_binary(
    headers: &dyn HeaderSource,
    content_type: Option<&str>,
    payload: Bytes,
) -> Result<Event, DecodeError> {
    let mut attributes = StringAttributes::new();
    // The first bad header is the error; the ones after it are not looked at.
    let mut failed = None;
    headers.visit(&mut |name, value| {
        if failed.is_some() || !is_ce_header(name) {
            return;
        }
        // `is_ce_header`: the first three bytes are ASCII, so byte 3 is a char boundary;
        // `get` all the same, no slicing of input.
        let attr = name.get(3..).unwrap_or_default().to_ascii_lowercase();
        let pushed = match decode_header_value(value.as_bytes()) {
            Ok(value) => attributes
                .push(&attr, value)
                .map_err(|source| DecodeError::Attribute {
                    name: name.to_owned(),
                    source,
                }),
            Err(source) => Err(DecodeError::HeaderValue {
                name: name.to_owned(),
                source,
            }),
        };
        if let Err(e) = pushed {
            failed = Some(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    let has_content_type = attributes.contains("datacontenttype");
    let mut event = attributes.build().map_err(DecodeError::Binary)?;
    if !has_content_type {
        // §8 policy: without ce-datacontenttype, Content-Type is the data content type.
        event
            .set_datacontenttype(content_type.map(str::to_owned))
            .map_err(DecodeError::Binary)?;
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
            content_type: Some("My name".into()),
            user_properties: vec![
                ("k=1".into(), "v=1 é".into()),
                ("dup".into(), "first".into()),
                ("".into(), "".into()),
                ("dup".into(), "second".into()),
            ],
        })
        .with_plain(true)
    }

    /// What the core backbone's writer encodes ([`encode_headers`], [`write_payload`]) is
    /// what [`encode`] gives, and within [`size_bound`], in both modes.
    #[test]
    fn the_writers_encoding_is_encode_and_within_the_bound() {
        fn with_data(data: Data, content_type: Option<&str>) -> Envelope {
            let mut e = Event::new("b\"1\\", "/s", "t é").unwrap();
            e.set_data(Some(data));
            e.set_datacontenttype(content_type.map(str::to_owned))
                .unwrap();
            Envelope::new(
                Topic::from_mqtt("a/b").unwrap(),
                Arc::new(e),
                envelope().origin,
            )
        }
        fn binary() -> Envelope {
            let data = Data::Binary(Bytes::from(vec![0xC3; 300]));
            with_data(data, Some("application/octet-stream"))
        }
        fn text() -> Envelope {
            with_data(Data::Text("\u{1}\"quoted\"\\".repeat(20)), None)
        }
        // Each made anew for each encoding: `encode` keeps the JSON in the envelope, and
        // `write_payload` is to encode it itself.
        let envelopes: [fn() -> Envelope; 3] = [envelope, binary, text];
        for make in envelopes {
            for mode in [NatsWireMode::Structured, NatsWireMode::Binary] {
                let e = make();
                let mut headers = RawHeaders::reuse(b"left over".to_vec());
                encode_headers(&e, mode, ("gw", "gw"), &mut headers);
                let headers = headers.finish().unwrap();
                let mut payload = Vec::new();
                write_payload(&e, mode, &mut payload);
                assert!(e.json_if_encoded().is_none());
                let mut expected_headers = RawHeaders::new();
                let expected = encode(&e, mode, ("gw", "gw"), &mut expected_headers);
                assert_eq!(headers, expected_headers.finish().unwrap(), "{mode:?}");
                assert_eq!(payload, expected, "{mode:?}");
                let bound = size_bound(&e, mode);
                assert!(
                    bound >= headers.len() + payload.len(),
                    "{mode:?}: {bound} < {}",
                    headers.len() + payload.len()
                );
            }
        }
    }

    /// JSON kept from another instance is written as it came, and counted as long as it is,
    /// even when it is longer than meshgate's own encoding (whitespace).
    #[test]
    fn kept_json_is_written_as_it_came_and_within_the_bound() {
        let padded = format!("{{{}{}", " ".repeat(2000), &E[1..]);
        let mut h = HeaderMap::new();
        h.insert("Content-Type", json::CONTENT_TYPE);
        h.insert(ORIGIN, "3@other");
        let e = decode("mg", "mg.a", Some(&h), Bytes::from(padded.clone())).unwrap();
        let mut headers = RawHeaders::new();
        encode_headers(&e, NatsWireMode::Structured, ("gw", "gw"), &mut headers);
        let mut payload = Vec::new();
        write_payload(&e, NatsWireMode::Structured, &mut payload);
        assert_eq!(payload, padded.as_bytes());
        assert!(
            size_bound(&e, NatsWireMode::Structured)
                >= headers.finish().unwrap().len() + payload.len()
        );
    }

    /// Through a raw header block (the core backbone) and through a `HeaderMap` (JetStream):
    /// both give the same envelope, which is returned.
    fn round_trip(mode: NatsWireMode) -> Envelope {
        let e = envelope();
        let subject = e.topic.to_nats_subject("mg");
        assert_eq!(subject, "mg.plant.line%2E1");
        let mut raw = RawHeaders::new();
        let payload = encode(&e, mode, ("other", "other"), &mut raw);
        let block = raw.finish().unwrap();
        let back = decode("mg", &subject, Some(&RawHeaderBlock(&block)), payload).unwrap();
        let mut map = HeaderMap::new();
        let payload = encode(&e, mode, ("other", "other"), &mut map);
        let back_map = decode("mg", &subject, Some(&map), payload).unwrap();
        assert_eq!(
            json::encode_string(&back.event),
            json::encode_string(&back_map.event)
        );
        assert_eq!(
            (&back.origin, back.qos, back.retain, &back.mqtt, back.plain),
            (
                &back_map.origin,
                back_map.qos,
                back_map.retain,
                &back_map.mqtt,
                back_map.plain
            )
        );
        back
    }

    #[test]
    fn raw_header_blocks_are_read_case_insensitively_and_in_order() {
        let block = b"NATS/1.0 503\r\nContent-Type: text/plain\r\nce-ID:  x1 \r\nbad line\r\nce-id: x2\r\n\r\nignored: 1\r\n";
        let h = RawHeaderBlock(block);
        assert_eq!(h.get("content-type"), Some("text/plain"));
        assert_eq!(h.get("CE-id"), Some("x1"));
        assert_eq!(h.get("ignored"), None, "the block ends at the empty line");
        // `visit` (what decoding uses) is strict: it stops at the line without `:`.
        let mut seen = Vec::new();
        let refused = h.visit(&mut |k, v| seen.push(format!("{k}={v}")));
        assert_eq!(seen, ["Content-Type=text/plain", "ce-ID=x1"]);
        assert_eq!(refused.unwrap_err().to_string(), "header line 3 has no `:`");
        let good = RawHeaderBlock(b"NATS/1.0\r\nA: 1\r\nce-id:\tx2\r\n\r\nignored: 1\r\n");
        seen.clear();
        good.visit(&mut |k, v| seen.push(format!("{k}={v}")))
            .unwrap();
        assert_eq!(
            seen,
            ["A=1", "ce-id=x2"],
            "the block ends at the empty line"
        );
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
        assert!(back.plain, "a plain MQTT message stays one");
        // Another instance's JSON is kept, byte for byte, for structured subscribers.
        assert_eq!(back.json_if_encoded(), Some(&envelope().json()));
    }

    #[test]
    fn binary_round_trip_has_every_attribute_as_a_header() {
        let e = envelope();
        let mut raw = RawHeaders::new();
        let payload = encode(&e, NatsWireMode::Binary, ("gw a@b", "gw%20a@b"), &mut raw);
        let block = raw.finish().unwrap();
        let headers = RawHeaderBlock(&block);
        assert_eq!(headers.get(ORIGIN), Some("42@gw%20a@b"));
        assert_eq!(headers.get("ce-subject"), Some("a%20b"));
        assert_eq!(headers.get("ce-datacontenttype"), Some("application/json"));
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
        // Structured from another program: read, and encoded anew for subscribers.
        let mut h = HeaderMap::new();
        h.insert("Content-Type", json::CONTENT_TYPE);
        let e = decode("mg", "mg.a", Some(&h), Bytes::from_static(E.as_bytes())).unwrap();
        assert_eq!(e.event.id(), "N1");
        assert!(e.json_if_encoded().is_none());
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
        // The same as a raw block, names in other cases.
        let block = b"NATS/1.0\r\nCE-SpecVersion: 1.0\r\nce-id: B1\r\nce-source: /x\r\nCe-Type: t\r\ncontent-type: text/plain\r\n\r\n";
        let e = decode(
            "mg",
            "mg.a",
            Some(&RawHeaderBlock(block)),
            Bytes::from_static(b"hi"),
        )
        .unwrap();
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
            assert!(!err.to_string().is_empty());
        }
        let mut h = HeaderMap::new();
        h.insert("ce-specversion", "1.0");
        h.insert("ce-id", "x");
        assert!(
            decode("mg", "mg.a", Some(&h), Bytes::new())
                .unwrap_err()
                .to_string()
                .contains("source")
        );
    }

    const VALID_BINARY: &[u8] =
        b"NATS/1.0\r\nce-specversion: 1.0\r\nce-id: B1\r\nce-source: /x\r\nce-type: t\r\n";

    /// Review F8: a header name with a multi-byte character where `ce-` would end (`abé`,
    /// `ce\u{e9}…`), or any other name or value that is not a token / text, is refused as a
    /// whole message (counted by the caller as malformed), never a panic.
    #[test]
    fn bad_header_names_and_values_refuse_the_message_without_a_panic() {
        let with = |line: &[u8]| {
            let mut block = VALID_BINARY.to_vec();
            block.extend_from_slice(line);
            block.extend_from_slice(b"\r\n\r\n");
            block
        };
        let good = with(b"X-Other: 1");
        decode("mg", "mg.a", Some(&RawHeaderBlock(&good)), Bytes::new()).unwrap();
        for bad in [
            "abé: 1".as_bytes(),
            "cé: 1".as_bytes(),
            "ceé-x: 1".as_bytes(),
            "é: 1".as_bytes(),
            b"ab\xC3: 1",
            b": no name",
            b"no colon",
            b"a b: 1",
            b"x: a\x00b",
            b"x: a\rb",
            b"x: \xFF",
        ] {
            let block = with(bad);
            let err = decode("mg", "mg.a", Some(&RawHeaderBlock(&block)), Bytes::new())
                .expect_err(&String::from_utf8_lossy(bad))
                .to_string();
            assert!(err.contains("header"), "{err}");
            // The lenient reader used for status lines never panics on them either.
            let h = RawHeaderBlock(&block);
            let _ = h.get("ce-id");
            let _ = Meta::read(Some(&h));
            let _ = decode_binary(&h, None, Bytes::new());
        }
        let counter = meshgate_core::metrics::Counter::default();
        let block = with("abé: 1".as_bytes());
        assert!(
            decode_or_count(
                "mg",
                "mg.a",
                Some(&RawHeaderBlock(&block)),
                Bytes::new(),
                &counter
            )
            .is_none()
        );
        assert_eq!(counter.get(), 1);
        // Not a header block at all.
        assert!(check_block(b"HTTP/1.1\r\n\r\n").is_err());
    }

    /// Review F2 for NATS: a line meshgate would write that is not valid (a name that is not a
    /// token, a value with CR/LF) is not written, and the block is refused.
    #[test]
    fn a_header_line_that_would_break_the_block_is_refused_not_written() {
        for (name, value) in [
            ("ce-x", "a\r\nInjected: 1"),
            ("ce-x", "a\nb"),
            ("ce-x", "nul\0"),
            ("ce-é", "1"),
            ("a:b", "1"),
            ("a b", "1"),
            ("", "1"),
        ] {
            let mut h = RawHeaders::new();
            h.put("Meshgate-Qos", &["0"]);
            h.put_owned(name.to_owned(), value);
            h.put("Meshgate-Retain", &["1"]);
            assert!(h.finish().is_err(), "{name:?}: {value:?}");
        }
        let mut h = RawHeaders::new();
        h.put_owned("ce-x".into(), "tab\tand é");
        let block = h.finish().unwrap();
        check_block(&block).unwrap();
    }

    /// Fuzz target `nats_headers`, decoding: any header block is refused or read, never a
    /// panic; a block that passes the check has only token names and single-line values.
    #[test]
    fn fuzz_nats_headers() {
        let seeds: [&[u8]; 4] = [
            b"NATS/1.0\r\nce-specversion: 1.0\r\nce-id: B1\r\nce-source: /x\r\nce-type: t\r\nContent-Type: text/plain\r\n\r\n",
            b"NATS/1.0\r\nMeshgate-Origin: 42@gw%20a\r\nMeshgate-Qos: 2\r\nMeshgate-Retain: 1\r\nContent-Type: application/cloudevents+json\r\n\r\n",
            "NATS/1.0\r\nabé: 1\r\nce-é: 2\r\n\r\n".as_bytes(),
            b"NATS/1.0 503\r\n\r\n",
        ];
        meshgate_fuzz::run(
            "nats_headers",
            meshgate_fuzz::bytes("nats_headers", &seeds, 512),
            |b| Some(b.to_vec()),
            |block| {
                let h = RawHeaderBlock(&block);
                let checked = check_block(&block);
                let _ = h.get("ce-id");
                let _ = Meta::read(Some(&h));
                let _ = decode_binary(&h, None, Bytes::new());
                let decoded = decode("mg", "mg.a", Some(&h), Bytes::from_static(E.as_bytes()));
                if checked.is_err() && decoded.is_ok() {
                    return Err("a block that fails the check was decoded".into());
                }
                if checked.is_ok() {
                    let mut bad = None;
                    h.visit(&mut |k, v| {
                        if !is_header_name(k.as_bytes()) || !is_header_value(v.as_bytes()) {
                            bad = Some(format!("{k:?}: {v:?}"));
                        }
                    })
                    .map_err(|e| format!("a checked block failed its visit: {e}"))?;
                    if let Some(bad) = bad {
                        return Err(format!("checked block has {bad}"));
                    }
                }
                Ok(())
            },
        );
    }

    /// Fuzz target `nats_headers_round_trip`: for arbitrary valid events and MQTT metadata,
    /// in both modes, meshgate writes a valid block and reads back the same envelope.
    #[test]
    fn fuzz_nats_headers_round_trip() {
        use meshgate_fuzz::proptest;
        use meshgate_fuzz::proptest::prelude::*;
        // Mostly valid attribute text (no control characters), sometimes anything.
        let text = || prop_oneof![4 => "\\PC{0,24}", 1 => any::<String>()];
        let round_trips = std::sync::atomic::AtomicU32::new(0);
        let inputs = (
            (
                "\\PC{1,24}",
                prop_oneof!["/[a-z0-9/._-]{0,16}", "\\PC{1,24}"],
                "\\PC{1,24}",
                proptest::option::of(text()),
            ),
            proptest::collection::vec(("[a-z][a-z0-9]{0,7}", text()), 0..4),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            proptest::option::of(prop_oneof![
                Just("application/json".to_owned()),
                Just("text/plain; charset=utf-8".to_owned()),
                Just("application/cloudevents+json".to_owned()),
                "[a-z]{1,8}/[a-z0-9.+-]{1,12}",
                text()
            ]),
            (0u8..3, any::<bool>(), any::<bool>()),
            (
                proptest::option::of(text()),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
                proptest::option::of(any::<u64>()),
                text(),
            ),
        );
        meshgate_fuzz::run(
            "nats_headers_round_trip",
            inputs,
            |_| None,
            |(
                (id, source, ty, subject),
                extensions,
                data,
                content_type,
                (qos, retain, binary),
                (response_topic, correlation, expires, instance),
            )| {
                let Ok(mut event) = Event::new(&id, &source, &ty) else {
                    return Ok(());
                };
                if event.set_subject(subject).is_err()
                    || event.set_datacontenttype(content_type).is_err()
                {
                    return Ok(());
                }
                for (name, value) in extensions {
                    if [
                        "id",
                        "source",
                        "type",
                        "subject",
                        "time",
                        "specversion",
                        "datacontenttype",
                        "dataschema",
                        "data",
                    ]
                    .contains(&name.as_str())
                    {
                        continue;
                    }
                    if event
                        .set_extension(&name, ExtensionValue::String(value))
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                // Binary mode cannot tell empty data from none (an empty payload): the
                // binding's own limit, not a defect; empty data is left out.
                let data = data.filter(|d| !(binary && d.is_empty()));
                event.set_data(data.map(|d| Data::Binary(Bytes::from(d))));
                let origin = Origin {
                    instance: Arc::from(instance.as_str()),
                    connection: 7,
                };
                let envelope =
                    Envelope::new(Topic::from_mqtt("a/b").unwrap(), Arc::new(event), origin)
                        .with_qos(qos)
                        .with_retain(retain)
                        .with_plain(qos == 0)
                        .with_mqtt(MqttProperties {
                            // The same generated text as the response topic: any UTF-8, in
                            // both names and values, repeated.
                            content_type: response_topic.clone(),
                            user_properties: response_topic
                                .iter()
                                .flat_map(|t| [(t.clone(), t.clone()), ("=".into(), t.clone())])
                                .collect(),
                            response_topic,
                            correlation_data: correlation.map(Bytes::from),
                            payload_utf8: retain,
                            expires_at_ms: expires,
                        });
                let mode = if binary {
                    NatsWireMode::Binary
                } else {
                    NatsWireMode::Structured
                };
                let mut raw = RawHeaders::new();
                let payload = encode(&envelope, mode, ("gw", "gw"), &mut raw);
                let block = raw
                    .finish()
                    .map_err(|e| format!("valid event refused: {e}"))?;
                check_block(&block).map_err(|e| e.to_string())?;
                let back = decode("mg", "mg.a.b", Some(&RawHeaderBlock(&block)), payload)
                    .map_err(|e| e.to_string())?;
                let (a, b) = (
                    json::encode_string(&envelope.event),
                    json::encode_string(&back.event),
                );
                if a != b {
                    return Err(format!("{mode:?}: {a} != {b}"));
                }
                if (
                    back.qos,
                    back.retain,
                    &*back.origin.instance,
                    back.origin.connection,
                ) != (qos, retain, instance.as_str(), 7)
                {
                    return Err(format!(
                        "{mode:?}: metadata {:?}",
                        (back.qos, back.retain, &back.origin)
                    ));
                }
                if back.mqtt != envelope.mqtt || back.plain != envelope.plain {
                    return Err(format!("{mode:?}: {:?} != {:?}", back.mqtt, envelope.mqtt));
                }
                round_trips.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            },
        );
        // Most inputs are valid events: the property was checked, not skipped.
        let done = round_trips.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            done >= meshgate_fuzz::cases() / 4,
            "only {done} round trips"
        );
    }

    /// The names `put` writes unchecked (constants) are tokens.
    #[test]
    fn constant_header_names_are_tokens() {
        for name in [
            ORIGIN,
            QOS,
            RETAIN,
            MQTT_RESPONSE_TOPIC,
            MQTT_CORRELATION,
            MQTT_UTF8,
            MQTT_EXPIRES,
            CONTENT_TYPE,
            "ce-datacontenttype",
            "Nats-Msg-Id",
        ] {
            assert!(is_header_name(name.as_bytes()), "{name}");
        }
    }
}
