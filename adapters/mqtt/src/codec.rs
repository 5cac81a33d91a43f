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
//! - V5's DISCONNECT writer miscounts an empty property block (length 0 counted as zero bytes,
//!   written as one), so the session always sends a reason string property.
//! - `read_mut` consumes the frame before parsing it, so a malformed packet is gone from the
//!   buffer; we close the connection on any parse error anyway.

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
    // Remaining length: 1 to 4 bytes, 7 bits each.
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return ConnectProbe::NeedMore;
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return ConnectProbe::NotConnect;
        }
    }
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

/// Appends `packet` to `out`.
pub fn write(version: Version, packet: Packet, out: &mut BytesMut) -> Result<usize, Error> {
    match version {
        Version::V311 => V4.write(packet, out),
        Version::V5 => V5.write(packet, out),
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
    let header = *buf.first()?;
    if header >> 4 != 3 {
        return None;
    }
    let qos = match (header >> 1) & 0b11 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return None,
    };
    let (mut remaining, mut at, mut shift) = (0usize, 1, 0);
    loop {
        let b = *buf.get(at)?;
        at += 1;
        remaining += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return None;
        }
    }
    let total = at + remaining;
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
        retain: header & 1 != 0,
        meta: PublishMeta {
            qos,
            pkid,
            dup: header & 0b1000 != 0,
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
    let header = *buf.first()?;
    if header >> 4 != 3 {
        return None;
    }
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    let qos = match (header >> 1) & 0b11 {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    };
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
        dup: header & 0b1000 != 0,
    })
}

/// Reads the fields the codec keeps private (see the module docs). Copies the packet; the
/// session uses [`peek_publish_meta`] on the raw bytes instead.
pub fn publish_meta(p: &Publish) -> PublishMeta {
    let bytes = p.serialize();
    let header = bytes.first().copied().unwrap_or(0);
    let pkid = bytes
        .get(1..3)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let qos = match (header >> 1) & 0b11 {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    };
    PublishMeta {
        qos,
        pkid,
        dup: header & 0b1000 != 0,
    }
}

/// Builds a PUBLISH with any QoS, packet id and flags (see the module docs).
pub fn publish(
    topic: &str,
    payload: Bytes,
    qos: QoS,
    pkid: u16,
    retain: bool,
    dup: bool,
) -> Publish {
    let mut o = BytesMut::with_capacity(5 + topic.len() + payload.len());
    o.put_u8(0b0011_0000 | u8::from(retain) | ((qos as u8) << 1) | (u8::from(dup) << 3));
    o.put_u16(pkid);
    // Topics longer than u16::MAX are rejected before this point (Topic::MAX_TOPIC_LEN).
    o.put_u16(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    o.extend_from_slice(topic.as_bytes());
    o.extend_from_slice(&payload);
    Publish::deserialize(o.freeze())
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
            );
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
            let p = publish("a/b", Bytes::from_static(b"xyz"), qos, pkid, retain, dup);
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
            );
            let mut out = BytesMut::new();
            write(Version::V311, Packet::Publish(p.clone(), None), &mut out).unwrap();
            assert_eq!(peek_publish_meta(&out), Some(publish_meta(&p)));
        }
        assert_eq!(peek_publish_meta(&[0x32, 5, 0]), None);
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
