//! A thin layer over rumqttd's wire codec (`rumqttd::protocol`, read in rumqttd 0.20.0).
//!
//! What the codec does not give us, and how this layer works around it:
//! - `Publish::{qos, pkid, dup}` are `pub(crate)` with no accessors. Reading them: the public
//!   `Publish::serialize()` writes a header byte (`dup|qos|retain`) and the packet id first, so
//!   [`publish_meta`] reads them from there. Writing them: the public `Publish::deserialize()`
//!   reads that same layout, so [`publish`] builds a QoS 1/2 publish through it.
//! - The codec picks no protocol version: V4 and V5 are separate readers. [`connect_version`]
//!   reads the protocol level from the CONNECT bytes (level 4 → 3.1.1, 5 → 5) first.
//! - V4's CONNECT reader does not check the protocol level; [`connect_version`] does, so a
//!   3.1 client (`MQIsdp`, level 3) gets return code 1 (unacceptable protocol version).
//! - Passwords must be UTF-8 (the codec parses them as `String`); binary passwords are a
//!   malformed CONNECT here.
//! - V5's reader panics (`unreachable!`) on CONNACK and UNSUBACK packets; [`read`] refuses them
//!   first and turns any other codec panic into a malformed-packet error.
//! - V4's CONNACK writer panics on MQTT 5 reason codes; the session maps them first.
//! - V5's DISCONNECT writer is wrong without properties (length counted without the property
//!   length byte it writes) and with an empty property block (the reason code is dropped), so
//!   [`write`] gives such a DISCONNECT a reason string (and the session always sends one).
//! - `read_mut` consumes the frame before parsing it, so a malformed packet is gone from the
//!   buffer; we close the connection on any parse error anyway.
//! - Neither reader checks the fixed-header flags of packets other than PUBLISH, nor the
//!   reserved bit of CONNECT's flags (v4/v5 `read_mut`, `connect.rs` reads `connect_flags` and
//!   looks at bits 1–7 only); [`read`] refuses both first ([`fixed_header_ok`]).
//! - Both writers cast every two-byte length prefix with `as u16` (`v4/mod.rs:238` and
//!   `v5/mod.rs:281` `write_mqtt_bytes`, used for the topic, every string and binary property;
//!   `protocol/mod.rs:215` `Publish::serialize`): a field over 65,535 bytes gets a wrapped-around
//!   length and the packet is malformed. And `write_remaining_length` fails *after* the header
//!   byte (or topic and packet id) was appended. [`write`] checks every field first
//!   ([`check_packet`], [`publish_size`]) and never leaves a partial packet in the buffer.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Error, Packet, Protocol, Publish, QoS};

/// The MQTT version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectProbe {
    /// Not enough bytes yet.
    NeedMore,
    Version(Version),
    /// A CONNECT of a version we do not speak (the level byte), or not MQTT at all.
    Unsupported(u8),
    NotConnect,
}

/// Reads the protocol level of a CONNECT at the start of `buf` without consuming it.
pub fn connect_version(buf: &[u8]) -> ConnectProbe {
    let Some(&first) = buf.first() else {
        return ConnectProbe::NeedMore;
    };
    if first != 0x10 {
        return ConnectProbe::NotConnect;
    }
    let i = match FixedHeader::read(buf) {
        Ok(h) => h.len,
        Err(HeaderError::NeedMore) => return ConnectProbe::NeedMore,
        Err(HeaderError::Malformed) => return ConnectProbe::NotConnect,
    };
    // Protocol name (u16 length + bytes), then the level.
    let Some(name_len) = buf
        .get(i..i + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return ConnectProbe::NeedMore;
    };
    let Some(name) = buf.get(i + 2..i + 2 + name_len) else {
        return ConnectProbe::NeedMore;
    };
    let Some(&level) = buf.get(i + 2 + name_len) else {
        return ConnectProbe::NeedMore;
    };
    match (name, level) {
        (b"MQTT", 4) => ConnectProbe::Version(Version::V311),
        (b"MQTT", 5) => ConnectProbe::Version(Version::V5),
        (b"MQTT" | b"MQIsdp", l) => ConnectProbe::Unsupported(l),
        _ => ConnectProbe::NotConnect,
    }
}

/// Reads one packet from `buf`; `Ok(None)` when more bytes are needed.
pub fn read(
    version: Version,
    buf: &mut BytesMut,
    max_size: usize,
) -> Result<Option<Packet>, Error> {
    // rumqttd's V5 reader has `unreachable!()` for CONNACK and UNSUBACK (packet types 2 and
    // 11), which only a server sends; a client sending one must not reach it.
    let packet_type = buf.first().map(|b| b >> 4);
    if version == Version::V5 && matches!(packet_type, Some(2 | 11)) {
        return Err(Error::InvalidPacketType(packet_type.unwrap_or(0)));
    }
    fixed_header_ok(buf)?;
    // Any other panic in the codec becomes a malformed packet, which closes only this
    // connection.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match version {
        Version::V311 => V4.read_mut(buf, max_size),
        Version::V5 => V5.read_mut(buf, max_size),
    }))
    .unwrap_or(Err(Error::MalformedPacket));
    match result {
        Ok(p) => Ok(Some(p)),
        Err(Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// What rumqttd's readers do not check and the spec requires, on the bytes at the start of
/// `buf` (as far as they are there):
/// - the flags of the fixed header: 0b0010 for PUBREL, SUBSCRIBE and UNSUBSCRIBE, 0 for every
///   other packet but PUBLISH (3.1.1 §2.2.2 [MQTT-2.2.2-1/2], [MQTT-3.8.1-1], [MQTT-3.10.1-1];
///   5 §2.1.3: otherwise a Malformed Packet);
/// - the reserved bit of CONNECT's flags (3.1.1 [MQTT-3.1.2-3]: the server disconnects the
///   client; 5 §3.1.2.3: a Malformed Packet).
pub fn fixed_header_ok(buf: &[u8]) -> Result<(), Error> {
    let Some(&first) = buf.first() else {
        return Ok(());
    };
    let expected = match first >> 4 {
        // PUBLISH: DUP, QoS, RETAIN (QoS 3 is refused by the codec).
        3 => None,
        6 | 8 | 10 => Some(0b0010),
        // 0 and 15 (AUTH, which meshgate does not support) are refused by the codec.
        1 | 2 | 4 | 5 | 7 | 9 | 11..=14 => Some(0),
        _ => None,
    };
    if expected.is_some_and(|f| first & 0x0f != f) {
        return Err(Error::IncorrectPacketFormat);
    }
    if first >> 4 == 1 && connect_flags(buf).is_some_and(|f| f & 1 != 0) {
        return Err(Error::IncorrectPacketFormat);
    }
    Ok(())
}

/// The fixed header of the packet at the start of a buffer (MQTT 3.1.1 §2.2, 5 §2.1.1): the
/// one reader of its Remaining Length and of a PUBLISH's flag bits, for [`connect_version`],
/// [`read_publish_v311`], [`peek_publish_meta`] and the CONNECT flags check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// The first byte: packet type (high nibble) and flags (low nibble).
    pub first: u8,
    /// Remaining Length: the bytes of the packet after its fixed header.
    pub remaining: usize,
    /// Bytes of the fixed header itself: the first byte and the 1 to 4 of the Remaining Length.
    pub len: usize,
}

/// Why [`FixedHeader::read`] has no header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// The buffer ends inside the header.
    NeedMore,
    /// The Remaining Length runs past 4 bytes, i.e. over 268,435,455 ([`MAX_VARINT`]): a
    /// malformed packet (3.1.1 §2.2.3, 5 §1.5.5).
    Malformed,
}

impl FixedHeader {
    /// Reads the fixed header at the start of `buf` without consuming anything.
    pub fn read(buf: &[u8]) -> Result<FixedHeader, HeaderError> {
        let first = *buf.first().ok_or(HeaderError::NeedMore)?;
        // Remaining Length: a Variable Byte Integer, 1 to 4 bytes of 7 bits, least significant
        // first; the high bit says another byte follows.
        let mut remaining = 0usize;
        for n in 0..4 {
            let b = *buf.get(1 + n).ok_or(HeaderError::NeedMore)?;
            remaining |= usize::from(b & 0x7f) << (7 * n);
            if b & 0x80 == 0 {
                return Ok(FixedHeader {
                    first,
                    remaining,
                    len: 2 + n,
                });
            }
        }
        Err(HeaderError::Malformed)
    }

    /// The packet type (1 CONNECT … 15 AUTH).
    pub fn packet_type(self) -> u8 {
        self.first >> 4
    }

    /// A PUBLISH's QoS (flag bits 1–2); `None` for the malformed QoS 3.
    pub fn qos(self) -> Option<QoS> {
        qos((self.first >> 1) & 0b11)
    }

    /// A PUBLISH's DUP flag (bit 3).
    pub fn dup(self) -> bool {
        self.first & 0b1000 != 0
    }

    /// A PUBLISH's RETAIN flag (bit 0).
    pub fn retain(self) -> bool {
        self.first & 1 != 0
    }

    /// The whole packet's size: header and Remaining Length.
    pub fn packet_len(self) -> usize {
        self.len + self.remaining
    }
}

/// The QoS numbered `n` (a PUBLISH's flag bits, a subscription option, a stored number);
/// `None` for anything but 0, 1 and 2.
pub fn qos(n: u8) -> Option<QoS> {
    match n {
        0 => Some(QoS::AtMostOnce),
        1 => Some(QoS::AtLeastOnce),
        2 => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

/// The Connect Flags byte of a CONNECT at the start of `buf`, when it is there.
fn connect_flags(buf: &[u8]) -> Option<u8> {
    let i = FixedHeader::read(buf).ok()?.len;
    let name_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    // Protocol name, then the level byte, then the flags.
    buf.get(i + 2 + name_len + 1).copied()
}

/// Largest length of an MQTT UTF-8 string or binary data field: its two-byte length prefix
/// (3.1.1 §1.5.3, 5 §1.5.4 and §1.5.6).
pub const MAX_FIELD: usize = 65_535;

/// Largest Variable Byte Integer: remaining length, property length, subscription identifier
/// (5 §1.5.5, 3.1.1 §2.2.3).
pub const MAX_VARINT: usize = 268_435_455;

/// Why a packet cannot be written as it is: it is never truncated, it is not written at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrepresentable {
    /// A length-prefixed field (named) is longer than 65,535 bytes.
    FieldTooLong(&'static str),
    /// A Variable Byte Integer (named) would be over 268,435,455.
    TooLong(&'static str),
    /// A value the spec forbids (named), e.g. Subscription Identifier 0.
    Invalid(&'static str),
}

impl std::fmt::Display for Unrepresentable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unrepresentable::FieldTooLong(what) => {
                write!(f, "{what} is longer than {MAX_FIELD} bytes")
            }
            Unrepresentable::TooLong(what) => write!(f, "{what} is over {MAX_VARINT}"),
            Unrepresentable::Invalid(what) => write!(f, "{what} has a value MQTT forbids"),
        }
    }
}

/// Why [`write`] wrote nothing.
#[derive(Debug)]
pub enum WriteError {
    Unrepresentable(Unrepresentable),
    Codec(Error),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Unrepresentable(u) => write!(f, "packet not representable: {u}"),
            WriteError::Codec(e) => write!(f, "codec: {e}"),
        }
    }
}

impl std::error::Error for WriteError {}

fn field(len: usize, what: &'static str) -> Result<usize, Unrepresentable> {
    if len > MAX_FIELD {
        return Err(Unrepresentable::FieldTooLong(what));
    }
    Ok(2 + len)
}

fn opt_field(v: Option<&[u8]>, what: &'static str) -> Result<usize, Unrepresentable> {
    v.map_or(Ok(0), |v| field(v.len(), what).map(|n| 1 + n))
}

fn user_props(props: &[(String, String)]) -> Result<usize, Unrepresentable> {
    let mut n = 0usize;
    for (k, v) in props {
        n = n.saturating_add(
            1 + field(k.len(), "user property name")? + field(v.len(), "user property value")?,
        );
    }
    Ok(n)
}

/// Bytes of a Variable Byte Integer.
fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn varint(v: usize, what: &'static str) -> Result<usize, Unrepresentable> {
    if v > MAX_VARINT {
        return Err(Unrepresentable::TooLong(what));
    }
    Ok(varint_len(v))
}

/// Length of a PUBLISH property block (without its own length).
fn publish_props_len(p: &rumqttd::protocol::PublishProperties) -> Result<usize, Unrepresentable> {
    let mut n = 0usize;
    if let Some(f) = p.payload_format_indicator {
        if f > 1 {
            // 5 §3.3.2.3.2: 0 (bytes) or 1 (UTF-8).
            return Err(Unrepresentable::Invalid("payload format indicator"));
        }
        n += 2;
    }
    if p.message_expiry_interval.is_some() {
        n += 5;
    }
    if let Some(a) = p.topic_alias {
        if a == 0 {
            // 5 §3.3.2.3.4: a Topic Alias of 0 is a Protocol Error.
            return Err(Unrepresentable::Invalid("topic alias"));
        }
        n += 3;
    }
    n += opt_field(
        p.response_topic.as_deref().map(str::as_bytes),
        "response topic",
    )?;
    n += opt_field(p.correlation_data.as_deref(), "correlation data")?;
    n = n.saturating_add(user_props(&p.user_properties)?);
    for &id in &p.subscription_identifiers {
        if id == 0 {
            // 5 §3.3.4: 1 to 268,435,455.
            return Err(Unrepresentable::Invalid("subscription identifier"));
        }
        n = n.saturating_add(1 + varint(id, "subscription identifier")?);
    }
    n += opt_field(p.content_type.as_deref().map(str::as_bytes), "content type")?;
    Ok(n)
}

/// The size on the wire (fixed header included) of a PUBLISH with this topic, QoS,
/// properties (MQTT 5; ignored for 3.1.1) and payload length, exactly as [`write`] and
/// [`write_publish_v311`] encode it; `Err` when it cannot be encoded correctly at all.
pub fn publish_size(
    version: Version,
    topic_len: usize,
    qos: QoS,
    props: Option<&rumqttd::protocol::PublishProperties>,
    payload_len: usize,
) -> Result<usize, Unrepresentable> {
    let mut remaining = field(topic_len, "topic")?;
    if qos != QoS::AtMostOnce {
        remaining += 2;
    }
    if version == Version::V5 {
        let props_len = props.map_or(Ok(0), publish_props_len)?;
        remaining = remaining.saturating_add(varint(props_len, "property length")? + props_len);
    }
    remaining = remaining.saturating_add(payload_len);
    Ok(1 + varint(remaining, "remaining length")? + remaining)
}

/// Checks every length-prefixed field of `packet` (and a PUBLISH's sizes, see
/// [`publish_size`]) before it goes to rumqttd's writer, which would wrap their lengths around.
/// Remaining and property lengths of other packets are checked by the writer itself
/// (`write_remaining_length`), and [`write`] drops what it appended when that fails.
pub fn check_packet(version: Version, packet: &Packet) -> Result<(), Unrepresentable> {
    use rumqttd::protocol::Packet as P;
    let reason = |r: Option<&String>, u: &[(String, String)]| -> Result<(), Unrepresentable> {
        opt_field(r.map(|s| s.as_bytes()), "reason string")?;
        user_props(u)?;
        Ok(())
    };
    match packet {
        P::Publish(p, props) => {
            // QoS and packet id are private to rumqttd (reading them copies the packet, see
            // the module docs): sized as QoS 0 here. The writer refuses packet id 0 and a
            // remaining length 2 bytes over the limit itself, and `write` drops the rest.
            let qos = QoS::AtMostOnce;
            publish_size(version, p.topic.len(), qos, props.as_ref(), p.payload.len())?;
        }
        P::ConnAck(_, Some(p)) => {
            opt_field(
                p.assigned_client_identifier.as_deref().map(str::as_bytes),
                "client id",
            )?;
            opt_field(
                p.response_information.as_deref().map(str::as_bytes),
                "response info",
            )?;
            opt_field(
                p.server_reference.as_deref().map(str::as_bytes),
                "server reference",
            )?;
            opt_field(
                p.authentication_method.as_deref().map(str::as_bytes),
                "auth method",
            )?;
            opt_field(p.authentication_data.as_deref(), "auth data")?;
            reason(p.reason_string.as_ref(), &p.user_properties)?;
        }
        P::PubAck(_, Some(p)) => reason(p.reason_string.as_ref(), &p.user_properties)?,
        P::PubRec(_, Some(p)) => reason(p.reason_string.as_ref(), &p.user_properties)?,
        P::PubRel(_, Some(p)) => reason(p.reason_string.as_ref(), &p.user_properties)?,
        P::PubComp(_, Some(p)) => reason(p.reason_string.as_ref(), &p.user_properties)?,
        P::SubAck(_, Some(p)) => reason(p.reason_string.as_ref(), &p.user_properties)?,
        P::UnsubAck(_, Some(p)) => reason(p.reason_string.as_ref(), &p.user_properties)?,
        P::Disconnect(_, Some(p)) => {
            opt_field(
                p.server_reference.as_deref().map(str::as_bytes),
                "server reference",
            )?;
            reason(p.reason_string.as_ref(), &p.user_properties)?;
        }
        // What a client writes (tests use these to make packets).
        P::Connect(c, props, will, will_props, login) => {
            field(c.client_id.len(), "client id")?;
            if let Some(p) = props {
                user_props(&p.user_properties)?;
                opt_field(
                    p.authentication_method.as_deref().map(str::as_bytes),
                    "auth method",
                )?;
                opt_field(p.authentication_data.as_deref(), "auth data")?;
            }
            if let Some(w) = will {
                field(w.topic.len(), "will topic")?;
                field(w.message.len(), "will payload")?;
            }
            if let Some(p) = will_props {
                opt_field(p.content_type.as_deref().map(str::as_bytes), "content type")?;
                opt_field(
                    p.response_topic.as_deref().map(str::as_bytes),
                    "response topic",
                )?;
                opt_field(p.correlation_data.as_deref(), "correlation data")?;
                user_props(&p.user_properties)?;
            }
            if let Some(l) = login {
                field(l.username.len(), "user name")?;
                field(l.password.len(), "password")?;
            }
        }
        P::Subscribe(s, props) => {
            for f in &s.filters {
                field(f.path.len(), "topic filter")?;
            }
            if let Some(p) = props {
                user_props(&p.user_properties)?;
            }
        }
        P::Unsubscribe(u, props) => {
            for f in &u.filters {
                field(f.len(), "topic filter")?;
            }
            if let Some(p) = props {
                user_props(&p.user_properties)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// rumqttd's MQTT 5 DISCONNECT writer (`v5/disconnect.rs:9-25`, `:63-88`) is only right with a
/// non-empty property block (or for a plain Normal Disconnection): without properties it
/// counts a remaining length of 1 but writes the reason code *and* a property length byte (a
/// stray byte the client reads as the next packet), and with an empty block it computes
/// length 2 and writes `E0 00`, dropping the reason code. Such a DISCONNECT gets its reason
/// code's name as Reason String, which the writer gets right.
fn disconnect_with_properties(version: Version, packet: Packet) -> Packet {
    use rumqttd::protocol::{DisconnectProperties, DisconnectReasonCode};
    match packet {
        Packet::Disconnect(d, props)
            if version == Version::V5
                && d.reason_code != DisconnectReasonCode::NormalDisconnection
                && props.as_ref().is_none_or(|p| {
                    p.session_expiry_interval.is_none()
                        && p.reason_string.is_none()
                        && p.user_properties.is_empty()
                        && p.server_reference.is_none()
                }) =>
        {
            let props = DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(format!("{:?}", d.reason_code)),
                user_properties: Vec::new(),
                server_reference: None,
            };
            Packet::Disconnect(d, Some(props))
        }
        other => other,
    }
}

/// Appends `packet` to `out`, or nothing: a packet with a field rumqttd's writer would
/// truncate is refused ([`check_packet`]), and whatever the writer appended before failing
/// (or panicking: V4's CONNACK writer on MQTT 5 codes) is removed again, so `out` only ever
/// holds whole, well-formed packets.
pub fn write(version: Version, packet: Packet, out: &mut BytesMut) -> Result<usize, WriteError> {
    let packet = disconnect_with_properties(version, packet);
    check_packet(version, &packet).map_err(WriteError::Unrepresentable)?;
    let start = out.len();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match version {
        Version::V311 => V4.write(packet, out),
        Version::V5 => V5.write(packet, out),
    }))
    .unwrap_or(Err(Error::MalformedPacket));
    if result.is_err() {
        out.truncate(start);
    }
    result.map_err(WriteError::Codec)
}

/// Why a PUBLISH's topic name is not one (what the session answers: [`BadTopicName::reason_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadTopicName {
    /// Not UTF-8 (rumqttd reads the topic as bytes: `v5/publish.rs:35`, `v4/publish.rs`).
    NotUtf8,
    /// U+0000 [MQTT-1.5.4-2].
    Nul,
    /// `+` or `#` [MQTT-3.3.2-2].
    Wildcard,
    /// Zero length without a Topic Alias (MQTT 5 §3.3.2.1; 3.1.1 [MQTT-4.7.3-1]).
    Empty,
}

impl BadTopicName {
    /// MQTT 5: DISCONNECT 0x81 Malformed Packet for what is not a UTF-8 string at all
    /// [MQTT-1.5.4-1]/[MQTT-1.5.4-2], 0x82 Protocol Error for a string that breaks the topic
    /// name rules. (3.1.1 has no DISCONNECT from the server: the connection is closed.)
    pub fn reason_code(self) -> rumqttd::protocol::DisconnectReasonCode {
        use rumqttd::protocol::DisconnectReasonCode as R;
        match self {
            BadTopicName::NotUtf8 | BadTopicName::Nul => R::MalformedPacket,
            BadTopicName::Wildcard | BadTopicName::Empty => R::ProtocolError,
        }
    }
}

impl std::fmt::Display for BadTopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BadTopicName::NotUtf8 => "topic name is not UTF-8",
            BadTopicName::Nul => "topic name contains U+0000",
            BadTopicName::Wildcard => "topic name contains a wildcard (+ or #)",
            BadTopicName::Empty => "topic name is empty and has no topic alias",
        })
    }
}

/// The topic name of an inbound PUBLISH (as read, at most 65,535 bytes).
pub fn topic_name(raw: &[u8]) -> Result<meshgate_core::Topic, BadTopicName> {
    let s = std::str::from_utf8(raw).map_err(|_| BadTopicName::NotUtf8)?;
    meshgate_core::Topic::from_mqtt(s).map_err(|e| match e {
        meshgate_core::TopicError::Empty => BadTopicName::Empty,
        meshgate_core::TopicError::Nul(_) => BadTopicName::Nul,
        // TooLong cannot happen (a two-byte length); the rest are wildcards.
        _ => BadTopicName::Wildcard,
    })
}

/// An MQTT 5 CONNECT property value the spec calls a Protocol Error that rumqttd's reader
/// accepts (`v5/connect.rs:441-443` reads Receive Maximum as any u16): Receive Maximum 0
/// (§3.1.2.11.3) — which would otherwise park every QoS 1/2 delivery — and Maximum Packet
/// Size 0 (§3.1.2.11.4). The text goes in the CONNACK's reason string.
pub fn connect_properties_error(
    props: Option<&rumqttd::protocol::ConnectProperties>,
) -> Option<&'static str> {
    let p = props?;
    if p.receive_maximum == Some(0) {
        return Some(
            "Receive Maximum 0 is a protocol error (MQTT 5 3.1.2.11.3); send 1 to 65535 or leave it out",
        );
    }
    if p.max_packet_size == Some(0) {
        return Some(
            "Maximum Packet Size 0 is a protocol error (MQTT 5 3.1.2.11.4); leave it out for no limit",
        );
    }
    None
}

/// The keep-alive a connection is held to and the Server Keep Alive to announce, given what
/// the client asked for and `mqtt.max_keep_alive`; `None`: the CONNECT is refused.
/// - MQTT 5: 0 (no keep-alive) or more than the maximum → the maximum, announced in CONNACK
///   as Server Keep Alive (§3.2.2.3.14: the client must then use it);
/// - MQTT 3.1.1: more than the maximum → refused (CONNACK 0x02, as Mosquitto's
///   `max_keepalive` does): 3.1.1 cannot tell the client another keep-alive, and holding it
///   to a shorter one silently would disconnect a client that pings on its own schedule, as
///   the spec lets it; 0 stays 0 — silent subscribers are legitimate there and would lose
///   messages to a forced timeout; dead peers are found by TCP keep-alive, set on every MQTT
///   socket.
pub fn keep_alive(
    version: Version,
    requested: u16,
    max: std::time::Duration,
) -> Option<(u16, Option<u16>)> {
    let max = u16::try_from(max.as_secs().clamp(1, 65_535)).unwrap_or(u16::MAX);
    match version {
        Version::V5 if requested == 0 || requested > max => Some((max, Some(max))),
        Version::V5 => Some((requested, None)),
        Version::V311 if requested > max => None,
        Version::V311 => Some((requested, None)),
    }
}

/// An inbound PUBLISH, as the session needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPublish {
    pub topic: Bytes,
    pub payload: Bytes,
    pub retain: bool,
    pub meta: PublishMeta,
}

impl InPublish {
    /// From a PUBLISH rumqttd read.
    pub fn from_rumqttd(p: Publish, meta: PublishMeta) -> InPublish {
        InPublish {
            topic: p.topic,
            payload: p.payload,
            retain: p.retain,
            meta,
        }
    }
}

/// Takes the next packet off `buf` when it is a complete, well-formed MQTT 3.1.1 PUBLISH
/// within `max_size`, without rumqttd: its reader hands the whole `Packet` enum back by value
/// through our `catch_unwind`, which was ~5% of the QoS 0 benchmark profile. `None` for
/// anything else (another packet, too few bytes, anything doubtful): the caller falls back to
/// [`read`], which reads it or reports the error. Accepts exactly what rumqttd's V4 reader
/// accepts, with the same result (unit-tested against it on random input).
pub fn read_publish_v311(buf: &mut BytesMut, max_size: usize) -> Option<InPublish> {
    let header = FixedHeader::read(buf).ok()?;
    if header.packet_type() != 3 {
        return None;
    }
    let qos = header.qos()?;
    let (remaining, at) = (header.remaining, header.len);
    let total = header.packet_len();
    if remaining == 0 || remaining > max_size || buf.len() < total {
        return None;
    }
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    let topic_at = at + 2;
    let mut payload_at = topic_at + topic_len;
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        let id = u16::from_be_bytes([*buf.get(payload_at)?, *buf.get(payload_at + 1)?]);
        payload_at += 2;
        id
    };
    if payload_at > total || (qos != QoS::AtMostOnce && pkid == 0) {
        return None;
    }
    let packet = buf.split_to(total).freeze();
    Some(InPublish {
        topic: packet.slice(topic_at..topic_at + topic_len),
        payload: packet.slice(payload_at..),
        retain: header.retain(),
        meta: PublishMeta {
            qos,
            pkid,
            dup: header.dup(),
        },
    })
}

/// QoS, packet id and DUP flag of a received PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishMeta {
    pub qos: QoS,
    pub pkid: u16,
    pub dup: bool,
}

/// QoS, packet id and DUP of the PUBLISH frame at the start of `buf`, read from the raw bytes
/// (no copy), or `None` if `buf` does not start with a complete enough PUBLISH header.
pub fn peek_publish_meta(buf: &[u8]) -> Option<PublishMeta> {
    let header = FixedHeader::read(buf).ok()?;
    if header.packet_type() != 3 {
        return None;
    }
    let i = header.len;
    // QoS 3 is refused by the codec's reader; the meta is not used then.
    let qos = header.qos().unwrap_or(QoS::AtMostOnce);
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        let topic_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
        let at = i + 2 + topic_len;
        u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?])
    };
    Some(PublishMeta {
        qos,
        pkid,
        dup: header.dup(),
    })
}

/// Reads the fields the codec keeps private (see the module docs). Copies the packet; the
/// session uses [`peek_publish_meta`] on the raw bytes instead.
pub fn publish_meta(p: &Publish) -> PublishMeta {
    let bytes = p.serialize();
    // The flags sit in the first byte as in a PUBLISH's fixed header (no Remaining Length).
    let flags = FixedHeader {
        first: bytes.first().copied().unwrap_or(0),
        remaining: 0,
        len: 1,
    };
    let pkid = bytes
        .get(1..3)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    PublishMeta {
        qos: flags.qos().unwrap_or(QoS::AtMostOnce),
        pkid,
        dup: flags.dup(),
    }
}

/// Builds a PUBLISH with any QoS, packet id and flags (see the module docs). `Err` for a topic
/// over 65,535 bytes: the workaround goes through a two-byte length, and a longer topic would
/// silently spill into the payload (found by `fuzz_mqtt_encode`).
pub fn publish(
    topic: &str,
    payload: Bytes,
    qos: QoS,
    pkid: u16,
    retain: bool,
    dup: bool,
) -> Result<Publish, Unrepresentable> {
    let topic_len =
        u16::try_from(topic.len()).map_err(|_| Unrepresentable::FieldTooLong("topic"))?;
    let mut o = BytesMut::with_capacity(5 + topic.len() + payload.len());
    o.put_u8(0b0011_0000 | u8::from(retain) | ((qos as u8) << 1) | (u8::from(dup) << 3));
    o.put_u16(pkid);
    o.put_u16(topic_len);
    o.extend_from_slice(topic.as_bytes());
    o.extend_from_slice(&payload);
    Ok(Publish::deserialize(o.freeze()))
}

/// Writes an MQTT 3.1.1 PUBLISH straight into `out` (no intermediate packet: one copy of the
/// payload instead of two, on the hottest path). Byte-for-byte what rumqttd's V4 writer makes
/// (unit-tested below).
pub fn write_publish_v311(
    out: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    qos: QoS,
    pkid: u16,
    retain: bool,
    dup: bool,
) {
    let with_pkid = qos != QoS::AtMostOnce;
    let remaining = 2 + topic.len() + if with_pkid { 2 } else { 0 } + payload.len();
    out.reserve(5 + remaining);
    out.put_u8(0b0011_0000 | u8::from(retain) | ((qos as u8) << 1) | (u8::from(dup) << 3));
    let mut len = remaining;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
    // Topics longer than u16::MAX are rejected before this point (Topic::MAX_TOPIC_LEN).
    out.put_u16(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    out.extend_from_slice(topic.as_bytes());
    if with_pkid {
        out.put_u16(pkid);
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_publish_reader_agrees_with_rumqttd() {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::default();
        let packet = (
            0u8..16,
            proptest::collection::vec(any::<u8>(), 0..12),
            proptest::collection::vec(any::<u8>(), 0..40),
            any::<u16>(),
            0usize..80,
        );
        runner
            .run(&packet, |(flags, topic, payload, pkid, cut)| {
                // A PUBLISH, well-formed or not (any flags, pkid 0, cut short, trailing bytes).
                let mut body = (topic.len() as u16).to_be_bytes().to_vec();
                body.extend_from_slice(&topic);
                if flags & 0b0110 != 0 {
                    body.extend_from_slice(&pkid.to_be_bytes());
                }
                body.extend_from_slice(&payload);
                let mut raw = vec![0x30 | flags];
                let mut n = body.len();
                loop {
                    let b = (n % 128) as u8;
                    n /= 128;
                    raw.push(if n > 0 { b | 0x80 } else { b });
                    if n == 0 {
                        break;
                    }
                }
                raw.extend_from_slice(&body);
                raw.truncate(cut.max(1).min(raw.len()));
                raw.extend_from_slice(&[0xc0, 0]); // a PINGREQ after it
                for max in [8, 1 << 20] {
                    let mut fast_buf = BytesMut::from(&raw[..]);
                    let mut slow_buf = BytesMut::from(&raw[..]);
                    let fast = read_publish_v311(&mut fast_buf, max);
                    let slow = read(Version::V311, &mut slow_buf, max);
                    if let Some(f) = fast {
                        let Ok(Some(Packet::Publish(p, _))) = slow else {
                            panic!("fast read {f:?}, rumqttd {slow:?} for {raw:?}");
                        };
                        let meta = publish_meta(&p);
                        prop_assert_eq!(f, InPublish::from_rumqttd(p, meta));
                        prop_assert_eq!(&fast_buf[..], &slow_buf[..]);
                    } else {
                        // Untouched, for the fallback to read.
                        prop_assert_eq!(&fast_buf[..], &raw[..]);
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn direct_v311_publish_matches_the_codec() {
        let big = vec![7u8; 20_000];
        for (qos, pkid, retain, dup, payload) in [
            (QoS::AtMostOnce, 0, false, false, &b"x"[..]),
            (QoS::AtLeastOnce, 9, true, false, &b""[..]),
            (QoS::ExactlyOnce, 65535, false, true, &big[..]),
        ] {
            let p = publish(
                "a/b",
                Bytes::copy_from_slice(payload),
                qos,
                pkid,
                retain,
                dup,
            )
            .unwrap();
            let mut expected = BytesMut::new();
            write(Version::V311, Packet::Publish(p, None), &mut expected).unwrap();
            let mut direct = BytesMut::new();
            write_publish_v311(&mut direct, "a/b", payload, qos, pkid, retain, dup);
            assert_eq!(direct, expected);
        }
    }

    #[test]
    fn publish_fields_survive_the_workaround() {
        for (qos, pkid, retain, dup) in [
            (QoS::AtMostOnce, 0, false, false),
            (QoS::AtLeastOnce, 7, true, false),
            (QoS::ExactlyOnce, 65535, false, true),
        ] {
            let p = publish("a/b", Bytes::from_static(b"xyz"), qos, pkid, retain, dup).unwrap();
            assert_eq!(publish_meta(&p), PublishMeta { qos, pkid, dup });
            assert_eq!(p.retain, retain);
            assert_eq!(&p.topic[..], b"a/b");
            assert_eq!(&p.payload[..], b"xyz");
            // And the codec writes it as a real PUBLISH that it reads back identically.
            for v in [Version::V311, Version::V5] {
                let mut out = BytesMut::new();
                write(v, Packet::Publish(p.clone(), None), &mut out).unwrap();
                match read(v, &mut out, 1 << 20).unwrap() {
                    Some(Packet::Publish(back, _)) => {
                        assert_eq!(publish_meta(&back), PublishMeta { qos, pkid, dup });
                        assert_eq!(back.payload, p.payload);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn peeked_meta_matches_the_workaround() {
        for (qos, pkid, dup) in [
            (QoS::AtMostOnce, 0, false),
            (QoS::AtLeastOnce, 300, true),
            (QoS::ExactlyOnce, 7, false),
        ] {
            let p = publish(
                "a/b/c",
                Bytes::from_static(b"payload"),
                qos,
                pkid,
                false,
                dup,
            )
            .unwrap();
            let mut out = BytesMut::new();
            write(Version::V311, Packet::Publish(p.clone(), None), &mut out).unwrap();
            assert_eq!(peek_publish_meta(&out), Some(publish_meta(&p)));
        }
        assert_eq!(peek_publish_meta(&[0x32, 5, 0]), None);
    }

    #[test]
    fn fixed_header_flags_and_the_connect_reserved_bit() {
        // PUBREL, SUBSCRIBE, UNSUBSCRIBE: 0b0010; the others 0; PUBLISH any.
        for (first, ok) in [
            (0x62, true),
            (0x60, false),
            (0x82, true),
            (0x80, false),
            (0x8a, false),
            (0xa2, true),
            (0xa0, false),
            (0x40, true),
            (0x41, false),
            (0xc0, true),
            (0xc8, false),
            (0xe0, true),
            (0xe2, false),
            (0x3f, true),
        ] {
            assert_eq!(fixed_header_ok(&[first, 0]).is_ok(), ok, "{first:#x}");
        }
        let connect = |flags: u8| {
            [
                0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60, 0, 0,
            ]
        };
        assert!(fixed_header_ok(&connect(0x02)).is_ok());
        assert!(fixed_header_ok(&connect(0x03)).is_err());
        // Not there yet: decided when it is.
        assert!(fixed_header_ok(&connect(0x03)[..9]).is_ok());
        assert!(matches!(
            read(
                Version::V311,
                &mut BytesMut::from(&connect(0x03)[..]),
                1 << 10
            ),
            Err(Error::IncorrectPacketFormat)
        ));
    }

    #[test]
    fn topic_names_and_their_reason_codes() {
        use rumqttd::protocol::DisconnectReasonCode as R;
        assert_eq!(topic_name(b"a/b").unwrap().as_str(), "a/b");
        for (raw, why, code) in [
            (&b"a/\xff"[..], BadTopicName::NotUtf8, R::MalformedPacket),
            (b"a\0b", BadTopicName::Nul, R::MalformedPacket),
            (b"a/+", BadTopicName::Wildcard, R::ProtocolError),
            (b"#", BadTopicName::Wildcard, R::ProtocolError),
            (b"", BadTopicName::Empty, R::ProtocolError),
        ] {
            assert_eq!(topic_name(raw).unwrap_err(), why);
            assert_eq!(why.reason_code(), code);
        }
    }

    #[test]
    fn keep_alive_policy() {
        let max = std::time::Duration::from_secs(600);
        assert_eq!(keep_alive(Version::V5, 0, max), Some((600, Some(600))));
        assert_eq!(keep_alive(Version::V5, 601, max), Some((600, Some(600))));
        assert_eq!(keep_alive(Version::V5, 60, max), Some((60, None)));
        assert_eq!(keep_alive(Version::V311, 0, max), Some((0, None)));
        // 3.1.1 cannot be told another keep-alive: refused.
        assert_eq!(keep_alive(Version::V311, 900, max), None);
        assert_eq!(keep_alive(Version::V311, 601, max), None);
        assert_eq!(keep_alive(Version::V311, 600, max), Some((600, None)));
        assert_eq!(keep_alive(Version::V311, 30, max), Some((30, None)));
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let mut out = BytesMut::from(&b"before"[..]);
        // Packet id 0 at QoS 1: rumqttd's writer fails after writing the header and topic.
        let p = publish("t", Bytes::new(), QoS::AtLeastOnce, 0, false, false).unwrap();
        assert!(write(Version::V5, Packet::Publish(p, None), &mut out).is_err());
        assert_eq!(&out[..], b"before");
        // A user property over 65,535 bytes is refused before the writer.
        let p = publish("t", Bytes::new(), QoS::AtMostOnce, 0, false, false).unwrap();
        let props = rumqttd::protocol::PublishProperties {
            user_properties: vec![("k".into(), "v".repeat(MAX_FIELD + 1))],
            ..Default::default()
        };
        assert!(matches!(
            write(Version::V5, Packet::Publish(p, Some(props)), &mut out),
            Err(WriteError::Unrepresentable(Unrepresentable::FieldTooLong(
                "user property value"
            )))
        ));
        assert_eq!(&out[..], b"before");
    }

    #[test]
    fn every_v5_disconnect_is_well_formed() {
        use rumqttc::v5::mqttbytes::v5 as mq;
        use rumqttd::protocol::{Disconnect, DisconnectProperties, DisconnectReasonCode as R};
        let empty = DisconnectProperties {
            session_expiry_interval: None,
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        };
        for reason in [
            R::NormalDisconnection,
            R::MalformedPacket,
            R::ProtocolError,
            R::KeepAliveTimeout,
            R::SessionTakenOver,
            R::ServerShuttingDown,
        ] {
            for props in [None, Some(empty.clone())] {
                let mut out = BytesMut::new();
                let d = Disconnect {
                    reason_code: reason,
                };
                write(Version::V5, Packet::Disconnect(d, props.clone()), &mut out).unwrap();
                if reason == R::NormalDisconnection {
                    // Remaining length 0 (MQTT 5 §3.14.2.1), which rumqttc's reader refuses.
                    assert_eq!(&out[..], [0xe0, 0]);
                    continue;
                }
                let whole = out.len();
                match mq::Packet::read(&mut out, None) {
                    Ok(mq::Packet::Disconnect(back)) => {
                        assert_eq!(format!("{:?}", back.reason_code), format!("{reason:?}"));
                    }
                    other => panic!("{reason:?} {props:?}: {other:?}"),
                }
                assert!(
                    out.is_empty(),
                    "{reason:?} {props:?}: stray bytes of {whole}"
                );
            }
        }
    }

    #[test]
    fn fixed_header_reader() {
        let ok = |buf: &[u8], remaining: usize, len: usize| {
            assert_eq!(
                FixedHeader::read(buf),
                Ok(FixedHeader {
                    first: buf[0],
                    remaining,
                    len
                }),
                "{buf:x?}"
            );
        };
        ok(&[0xc0, 0], 0, 2);
        ok(&[0x30, 0x7f], 127, 2);
        ok(&[0x30, 0x80, 0x01], 128, 3);
        ok(&[0x30, 0xff, 0x7f], 16_383, 3);
        ok(&[0x30, 0x80, 0x80, 0x01], 16_384, 4);
        ok(&[0x30, 0xff, 0xff, 0x7f], 2_097_151, 4);
        ok(&[0x30, 0x80, 0x80, 0x80, 0x01], 2_097_152, 5);
        // The largest Remaining Length there is: 268,435,455, four bytes.
        ok(&[0x30, 0xff, 0xff, 0xff, 0x7f, 0xaa], MAX_VARINT, 5);
        // Cut anywhere inside the header: more bytes needed, whatever follows.
        for cut in [
            &[][..],
            &[0x30],
            &[0x30, 0x80],
            &[0x30, 0xff, 0xff],
            &[0x30, 0xff, 0xff, 0xff],
        ] {
            assert_eq!(
                FixedHeader::read(cut),
                Err(HeaderError::NeedMore),
                "{cut:x?}"
            );
        }
        // A fifth length byte (a value over 268,435,455) is malformed, not "need more".
        for bad in [
            &[0x30, 0xff, 0xff, 0xff, 0xff][..],
            &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
            &[0x30, 0x80, 0x80, 0x80, 0x80, 0x00],
        ] {
            assert_eq!(
                FixedHeader::read(bad),
                Err(HeaderError::Malformed),
                "{bad:x?}"
            );
        }
        let h = FixedHeader::read(&[0x3d, 5]).unwrap();
        assert_eq!(
            (
                h.packet_type(),
                h.qos(),
                h.dup(),
                h.retain(),
                h.packet_len()
            ),
            (3, Some(QoS::ExactlyOnce), true, true, 7)
        );
        assert_eq!(FixedHeader::read(&[0x36, 0]).unwrap().qos(), None);
        // The readers built on it: a malformed length is not a PUBLISH or a CONNECT.
        let five = [0x32, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 1, b't', 0, 1];
        assert_eq!(peek_publish_meta(&five), None);
        assert_eq!(
            read_publish_v311(&mut BytesMut::from(&five[..]), 1 << 30),
            None
        );
        assert_eq!(
            connect_version(&[0x10, 0x80, 0x80, 0x80, 0x80, 0x01]),
            ConnectProbe::NotConnect
        );
        assert_eq!(connect_version(&[0x10, 0x80, 0x80]), ConnectProbe::NeedMore);
    }

    #[test]
    fn connect_version_probe() {
        // CONNECT, remaining length 10+, "MQTT", level.
        let v4 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        assert_eq!(connect_version(&v4), ConnectProbe::Version(Version::V311));
        let mut v5 = v4;
        v5[8] = 5;
        assert_eq!(connect_version(&v5), ConnectProbe::Version(Version::V5));
        let v31 = [
            0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60,
        ];
        assert_eq!(connect_version(&v31), ConnectProbe::Unsupported(3));
        assert_eq!(connect_version(&v4[..5]), ConnectProbe::NeedMore);
        assert_eq!(connect_version(b"GET / HTTP/1.1"), ConnectProbe::NotConnect);
    }
}
