//! Fuzz targets of the MQTT codec layer (harness: `meshgate-fuzz`, see fuzz/src/lib.rs).
//!
//! - `fuzz_mqtt_encode`: arbitrary outbound PUBLISHes (both versions; MQTT 5 with every
//!   property, fields from empty to just over the 65,535-byte limit). What `codec::write`
//!   accepts is decoded back identically by rumqttd's reader *and* by rumqttc's `mqttbytes`
//!   (an independent decoder), and is exactly `codec::publish_size` bytes long. What it
//!   refuses leaves nothing in the buffer and is exactly what rumqttd's unchecked writer
//!   would get wrong (an error, or bytes that do not decode back to the packet) or what the
//!   spec forbids (subscription identifier 0, topic alias 0, payload format > 1, packet id 0).
//! - `fuzz_mqtt_encode_acks`: the other packets a server writes (PUBACK, PUBREC, PUBREL,
//!   PUBCOMP, SUBACK, UNSUBACK, DISCONNECT, CONNACK) with reason strings and user properties
//!   around the limit: written ones are read back by rumqttc with the same packet id, strings
//!   and no stray bytes; refused ones are exactly those with a field over 65,535 bytes.
//! - `fuzz_mqtt_decode`: random and mutated bytes through the readers the session uses
//!   (`codec::read` for both versions, the fast 3.1.1 PUBLISH reader, the CONNECT probe,
//!   `peek_publish_meta`): no panic escapes, and every call consumes a packet, asks for more
//!   bytes or refuses.
//!
//! Longer runs: `FUZZ_CASES=100000 cargo test --release -p meshgate-mqtt --test fuzz_mqtt`.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use bytes::{Bytes, BytesMut};
use meshgate_fuzz::proptest::prelude::*;
use meshgate_mqtt::codec::{self, Version};
use rumqttd::protocol::{Packet, Protocol, PublishProperties, QoS};

/// An outbound PUBLISH as the session could make it.
#[derive(Clone)]
struct Out {
    v5: bool,
    topic: String,
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
    props: Option<PublishProperties>,
    payload: Vec<u8>,
}

/// Long fields shown as their length and first bytes (a failing input is readable).
impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn short(s: &str) -> String {
            if s.len() > 40 {
                format!(
                    "{:?}…({} bytes)",
                    s.chars().take(8).collect::<String>(),
                    s.len()
                )
            } else {
                format!("{s:?}")
            }
        }
        let props = self.props.as_ref().map(|p| {
            format!(
                "pfi {:?} expiry {:?} alias {:?} response_topic {:?} correlation {:?} user {:?} ids {:?} content_type {:?}",
                p.payload_format_indicator,
                p.message_expiry_interval,
                p.topic_alias,
                p.response_topic.as_deref().map(short),
                p.correlation_data.as_ref().map(|c| c.len()),
                p.user_properties
                    .iter()
                    .map(|(k, v)| (short(k), short(v)))
                    .collect::<Vec<_>>(),
                p.subscription_identifiers,
                p.content_type.as_deref().map(short),
            )
        });
        write!(
            f,
            "Out {{ v5: {}, topic: {}, qos: {}, pkid: {}, retain: {}, dup: {}, props: {props:?}, payload: {} bytes }}",
            self.v5,
            short(&self.topic),
            self.qos,
            self.pkid,
            self.retain,
            self.dup,
            self.payload.len()
        )
    }
}

fn version(o: &Out) -> Version {
    if o.v5 { Version::V5 } else { Version::V311 }
}

fn qos(n: u8) -> QoS {
    match n {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    }
}

/// The packet, or `None` when even building it is refused (a topic over 65,535 bytes).
fn packet(o: &Out) -> Option<Packet> {
    let p = codec::publish(
        &o.topic,
        Bytes::from(o.payload.clone()),
        qos(o.qos),
        o.pkid,
        o.retain,
        o.dup,
    )
    .ok()?;
    Some(Packet::Publish(p, o.props.clone()))
}

/// A length: mostly small, sometimes at or just over the two-byte limit.
fn len() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 0usize..24,
        1 => Just(65_535usize),
        1 => Just(65_536usize),
        1 => 65_500usize..65_600,
    ]
}

/// A string of `n` bytes (ASCII, or two-byte characters plus one ASCII byte when odd).
fn text(n: usize, wide: bool) -> String {
    if wide {
        let mut s = "é".repeat(n / 2);
        if n % 2 == 1 {
            s.push('x');
        }
        s
    } else {
        "a".repeat(n)
    }
}

fn string() -> impl Strategy<Value = String> {
    (len(), any::<bool>()).prop_map(|(n, wide)| text(n, wide))
}

fn props() -> impl Strategy<Value = PublishProperties> {
    (
        proptest::option::of(0u8..3),
        proptest::option::of(any::<u32>()),
        proptest::option::of(prop_oneof![Just(0u16), 1u16..100]),
        proptest::option::of(string()),
        proptest::option::of(len().prop_map(|n| Bytes::from(vec![7u8; n]))),
        proptest::collection::vec((string(), string()), 0..3),
        proptest::collection::vec(
            prop_oneof![
                5 => 1usize..300_000,
                1 => Just(0usize),
                1 => Just(codec::MAX_VARINT),
                1 => Just(codec::MAX_VARINT + 1),
            ],
            0..3,
        ),
        proptest::option::of(string()),
    )
        .prop_map(
            |(pfi, expiry, alias, rt, cd, user, ids, ct)| PublishProperties {
                payload_format_indicator: pfi,
                message_expiry_interval: expiry,
                topic_alias: alias,
                response_topic: rt,
                correlation_data: cd,
                user_properties: user,
                subscription_identifiers: ids,
                content_type: ct,
            },
        )
}

fn outbound() -> impl Strategy<Value = Out> {
    (
        any::<bool>(),
        (len(), any::<bool>()).prop_map(|(n, wide)| text(n.max(1), wide)),
        0u8..3,
        prop_oneof![9 => 1u16.., 1 => Just(0u16)],
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(props()),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(v5, topic, qos, pkid, retain, dup, props, payload)| Out {
            v5,
            topic,
            qos,
            pkid,
            retain,
            dup,
            // 3.1.1 has no properties; its writer ignores them.
            props: props.filter(|_| v5),
            payload,
        })
}

/// Properties as a reader gives them back: an empty block reads as none.
fn normal(p: Option<PublishProperties>) -> Option<PublishProperties> {
    p.filter(|p| *p != PublishProperties::default())
}

/// What the spec forbids whatever the lengths (the codec refuses these too).
fn forbidden(o: &Out) -> bool {
    (o.qos != 0 && o.pkid == 0)
        || o.props.as_ref().is_some_and(|p| {
            p.payload_format_indicator.is_some_and(|f| f > 1)
                || p.topic_alias == Some(0)
                || p.subscription_identifiers.contains(&0)
        })
}

/// Decodes with rumqttd's reader (through `codec::read`) and checks it is `o`.
fn decodes_to(o: &Out, bytes: &[u8]) -> Result<(), String> {
    let mut buf = BytesMut::from(bytes);
    let read = codec::read(version(o), &mut buf, usize::MAX);
    let Ok(Some(Packet::Publish(p, props))) = read else {
        return Err(format!("rumqttd read {read:?}"));
    };
    if !buf.is_empty() {
        return Err(format!("{} bytes left after the packet", buf.len()));
    }
    let meta = codec::publish_meta(&p);
    let same = p.topic == o.topic.as_bytes()
        && p.payload == o.payload
        && p.retain == o.retain
        && meta
            == codec::PublishMeta {
                qos: qos(o.qos),
                pkid: if o.qos == 0 { 0 } else { o.pkid },
                dup: o.dup,
            }
        && normal(props.clone()) == normal(o.props.clone());
    if same {
        Ok(())
    } else {
        Err(format!("rumqttd read back {p:?} {props:?}"))
    }
}

/// Decodes with rumqttc's `mqttbytes` and checks it is `o`.
fn rumqttc_decodes_to(o: &Out, bytes: &[u8]) -> Result<(), String> {
    let mut buf = BytesMut::from(bytes);
    if o.v5 {
        use rumqttc::v5::mqttbytes::v5 as mq;
        let read = mq::Packet::read(&mut buf, None);
        let Ok(mq::Packet::Publish(p)) = read else {
            return Err(format!("rumqttc v5 read {read:?}"));
        };
        let theirs = p.properties.map(|p| PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            topic_alias: p.topic_alias,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: p.subscription_identifiers,
            content_type: p.content_type,
        });
        let same = p.topic == o.topic.as_bytes()
            && p.payload == o.payload
            && p.retain == o.retain
            && p.dup == o.dup
            && p.qos as u8 == o.qos
            && (o.qos == 0 || p.pkid == o.pkid)
            && normal(theirs) == normal(o.props.clone());
        if !same {
            return Err("rumqttc v5 read back a different PUBLISH".into());
        }
    } else {
        use rumqttc::mqttbytes::v4 as mq;
        let read = mq::Packet::read(&mut buf, usize::MAX);
        let Ok(mq::Packet::Publish(p)) = read else {
            return Err(format!("rumqttc v4 read {read:?}"));
        };
        let same = p.topic == o.topic
            && p.payload == o.payload
            && p.retain == o.retain
            && p.dup == o.dup
            && p.qos as u8 == o.qos
            && (o.qos == 0 || p.pkid == o.pkid);
        if !same {
            return Err("rumqttc v4 read back a different PUBLISH".into());
        }
    }
    Ok(())
}

fn check_encode(o: Out) -> Result<(), String> {
    let v = version(&o);
    let size = codec::publish_size(
        v,
        o.topic.len(),
        qos(o.qos),
        o.props.as_ref(),
        o.payload.len(),
    );
    let Some(built) = packet(&o) else {
        // Only a topic over the limit cannot be built; the size check says so too.
        return if o.topic.len() > codec::MAX_FIELD && size.is_err() {
            Ok(())
        } else {
            Err(format!(
                "codec::publish refused a {}-byte topic",
                o.topic.len()
            ))
        };
    };
    let mut out = BytesMut::from(&b"prev"[..]);
    let written = codec::write(v, built.clone(), &mut out);
    // rumqttd's writer alone, unchecked.
    let mut raw = BytesMut::new();
    let raw_ok = match v {
        Version::V311 => rumqttd::protocol::v4::V4.write(built, &mut raw),
        Version::V5 => rumqttd::protocol::v5::V5.write(built, &mut raw),
    }
    .is_ok();
    let raw_faithful = raw_ok && decodes_to(&o, &raw).is_ok() && !forbidden(&o);
    match written {
        Ok(n) => {
            let bytes = &out[4..];
            if n != bytes.len() || size != Ok(n) {
                return Err(format!(
                    "wrote {n} bytes ({} in the buffer), publish_size said {size:?}",
                    bytes.len()
                ));
            }
            decodes_to(&o, bytes)?;
            rumqttc_decodes_to(&o, bytes)?;
            if o.qos != 0 && o.pkid == 0 {
                return Err("packet id 0 written".into());
            }
            if o.props.is_some() && forbidden(&o) {
                return Err("a value the spec forbids was written".into());
            }
            if !o.v5 {
                // The session's direct 3.1.1 writer makes the same bytes.
                let mut direct = BytesMut::new();
                codec::write_publish_v311(
                    &mut direct,
                    &o.topic,
                    &o.payload,
                    qos(o.qos),
                    o.pkid,
                    o.retain,
                    o.dup,
                );
                if direct[..] != *bytes {
                    return Err("write_publish_v311 differs from the codec".into());
                }
            }
        }
        Err(e) => {
            if &out[..] != b"prev" {
                return Err(format!("refused ({e}) but left bytes in the buffer"));
            }
            if raw_faithful {
                return Err(format!(
                    "refused ({e}) a packet rumqttd writes correctly and the spec allows"
                ));
            }
        }
    }
    // The session's own prediction (it skips before writing) agrees with the writer, except
    // for packet id 0, which the session never uses.
    if o.pkid != 0 && size.is_ok() != out.len().gt(&4) {
        return Err(format!(
            "publish_size {size:?} but write {:?}",
            out.len() > 4
        ));
    }
    Ok(())
}

#[test]
fn fuzz_mqtt_encode() {
    meshgate_fuzz::run(
        "mqtt_encode",
        outbound(),
        |bytes| {
            // Corpus files are encoded PUBLISHes; the first byte of the file says the version.
            let (&v, rest) = bytes.split_first()?;
            let v5 = v == 5;
            let mut buf = BytesMut::from(rest);
            let read = codec::read(
                if v5 { Version::V5 } else { Version::V311 },
                &mut buf,
                usize::MAX,
            );
            let Ok(Some(Packet::Publish(p, props))) = read else {
                return None;
            };
            let meta = codec::publish_meta(&p);
            Some(Out {
                v5,
                topic: String::from_utf8(p.topic.to_vec()).ok()?,
                qos: meta.qos as u8,
                pkid: meta.pkid,
                retain: p.retain,
                dup: meta.dup,
                props,
                payload: p.payload.to_vec(),
            })
        },
        check_encode,
    );
}

/// Every packet type of both versions, well-formed, as seeds for mutation.
fn seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for dir in ["mqtt_decode", "mqtt_encode"] {
        for (_, b) in meshgate_fuzz::corpus(dir) {
            seeds.push(b);
        }
    }
    seeds.extend([
        // CONNECT 3.1.1, 5 (with properties, will and login).
        b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00".to_vec(),
        b"\x10\x1f\x00\x04MQTT\x05\xee\x00\x3c\x05\x21\x00\x0a\x27\x00\x00\x00\x02id\x00\x00\x01t\x00\x01m\x00\x01u\x00\x01p"
            .to_vec(),
        // PUBLISH QoS 0/1, MQTT 5 with properties.
        b"\x30\x06\x00\x03a/bhi".to_vec(),
        b"\x32\x08\x00\x03a/b\x00\x07hi".to_vec(),
        b"\x3b\x11\x00\x01t\x00\x09\x0a\x03\x00\x02ct\x26\x00\x01k\x00\x01vx".to_vec(),
        // PUBACK, PUBREC, PUBREL, PUBCOMP (3.1.1 and 5 with reason and properties).
        b"\x40\x02\x00\x01".to_vec(),
        b"\x50\x04\x00\x01\x10\x00".to_vec(),
        b"\x62\x02\x00\x01".to_vec(),
        b"\x70\x03\x00\x01\x92".to_vec(),
        // SUBSCRIBE (3.1.1; 5 with an identifier), UNSUBSCRIBE.
        b"\x82\x06\x00\x01\x00\x01#\x01".to_vec(),
        b"\x82\x09\x00\x01\x02\x0b\x05\x00\x01#\x2d".to_vec(),
        b"\xa2\x05\x00\x01\x00\x01#".to_vec(),
        // PINGREQ, DISCONNECT (5 with reason and property).
        b"\xc0\x00".to_vec(),
        b"\xe0\x00".to_vec(),
        b"\xe0\x05\x04\x03\x11\x00\x00".to_vec(),
    ]);
    seeds
}

fn check_decode(input: Vec<u8>) -> Result<(), String> {
    let max = 1 << 16;
    for v in [Version::V311, Version::V5] {
        let mut buf = BytesMut::from(&input[..]);
        // As the session reads: the fast path first (3.1.1), then the codec, until it needs
        // more bytes or refuses.
        for _ in 0..64 {
            let before = buf.len();
            let _ = codec::connect_version(&buf);
            let _ = codec::peek_publish_meta(&buf);
            if v == Version::V311 && codec::read_publish_v311(&mut buf, max).is_some() {
                if buf.len() >= before {
                    return Err("fast reader returned a packet without consuming it".into());
                }
                continue;
            }
            match codec::read(v, &mut buf, max) {
                Ok(Some(_)) if buf.len() >= before => {
                    return Err(format!("{v:?}: a packet read without consuming bytes"));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_mqtt_decode() {
    let seeds = seeds();
    let seed_refs: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
    meshgate_fuzz::run(
        "mqtt_decode",
        meshgate_fuzz::bytes("mqtt_decode", &seed_refs, 256),
        |b| Some(b.to_vec()),
        check_decode,
    );
}

/// The size limits no fuzz case can reach without allocating 256 MiB.
#[test]
fn remaining_length_limit_is_checked_without_writing() {
    let max = codec::MAX_VARINT;
    // Topic "t" (3 bytes), QoS 0, no properties (1 byte) → the payload may be max - 4.
    assert_eq!(
        codec::publish_size(Version::V5, 1, QoS::AtMostOnce, None, max - 4),
        Ok(1 + 4 + max)
    );
    assert!(codec::publish_size(Version::V5, 1, QoS::AtMostOnce, None, max - 3).is_err());
    assert!(codec::publish_size(Version::V5, 1, QoS::AtLeastOnce, None, max - 5).is_err());
    assert_eq!(
        codec::publish_size(Version::V311, 1, QoS::AtMostOnce, None, max - 3),
        Ok(1 + 4 + max)
    );
    assert!(codec::publish_size(Version::V311, 1, QoS::AtMostOnce, None, max - 2).is_err());
    // Property block: many user properties within the field limit, over the varint limit.
    let big = "x".repeat(60_000);
    let props = PublishProperties {
        user_properties: vec![(big.clone(), big); 2_300],
        ..Default::default()
    };
    assert!(codec::publish_size(Version::V5, 1, QoS::AtMostOnce, Some(&props), 0).is_err());
}

/// A packet only a server writes (MQTT 5), with a reason string and user properties of any
/// length around the limit.
#[derive(Clone)]
struct Ack {
    kind: u8,
    pkid: u16,
    reason: u8,
    reason_string: Option<String>,
    user: Vec<(String, String)>,
    with_props: bool,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ack {{ kind: {}, pkid: {}, reason: {}, reason_string: {:?} bytes, user: {:?}, with_props: {} }}",
            self.kind,
            self.pkid,
            self.reason,
            self.reason_string.as_ref().map(String::len),
            self.user
                .iter()
                .map(|(k, v)| (k.len(), v.len()))
                .collect::<Vec<_>>(),
            self.with_props
        )
    }
}

fn ack() -> impl Strategy<Value = Ack> {
    (
        0u8..8,
        1u16..,
        any::<u8>(),
        proptest::option::of(string()),
        proptest::collection::vec((string(), string()), 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(kind, pkid, reason, reason_string, user, with_props)| Ack {
                kind,
                pkid,
                reason,
                reason_string,
                user,
                with_props,
            },
        )
}

fn ack_packet(a: &Ack) -> Packet {
    use rumqttd::protocol::*;
    let (rs, up) = (a.reason_string.clone(), a.user.clone());
    let props = a.with_props || rs.is_some() || !up.is_empty();
    match a.kind {
        0 => Packet::PubAck(
            PubAck {
                pkid: a.pkid,
                reason: [
                    PubAckReason::Success,
                    PubAckReason::NoMatchingSubscribers,
                    PubAckReason::NotAuthorized,
                    PubAckReason::TopicNameInvalid,
                    PubAckReason::QuotaExceeded,
                    PubAckReason::PayloadFormatInvalid,
                ][usize::from(a.reason) % 6],
            },
            props.then_some(PubAckProperties {
                reason_string: rs,
                user_properties: up,
            }),
        ),
        1 => Packet::PubRec(
            PubRec {
                pkid: a.pkid,
                reason: [
                    PubRecReason::Success,
                    PubRecReason::NotAuthorized,
                    PubRecReason::ImplementationSpecificError,
                ][usize::from(a.reason) % 3],
            },
            props.then_some(PubRecProperties {
                reason_string: rs,
                user_properties: up,
            }),
        ),
        2 => Packet::PubRel(
            PubRel {
                pkid: a.pkid,
                reason: [
                    PubRelReason::Success,
                    PubRelReason::PacketIdentifierNotFound,
                ][usize::from(a.reason) % 2],
            },
            props.then_some(PubRelProperties {
                reason_string: rs,
                user_properties: up,
            }),
        ),
        3 => Packet::PubComp(
            PubComp {
                pkid: a.pkid,
                reason: [
                    PubCompReason::Success,
                    PubCompReason::PacketIdentifierNotFound,
                ][usize::from(a.reason) % 2],
            },
            props.then_some(PubCompProperties {
                reason_string: rs,
                user_properties: up,
            }),
        ),
        4 => Packet::SubAck(
            SubAck {
                pkid: a.pkid,
                return_codes: vec![
                    SubscribeReasonCode::Success(crate::qos(a.reason % 3)),
                    SubscribeReasonCode::QuotaExceeded,
                ],
            },
            props.then_some(SubAckProperties {
                reason_string: rs,
                user_properties: up,
            }),
        ),
        5 => Packet::UnsubAck(
            UnsubAck {
                pkid: a.pkid,
                reasons: vec![
                    UnsubAckReason::Success,
                    UnsubAckReason::NoSubscriptionExisted,
                ],
            },
            props.then_some(UnsubAckProperties {
                reason_string: rs,
                user_properties: up,
            }),
        ),
        6 => Packet::Disconnect(
            Disconnect {
                reason_code: [
                    DisconnectReasonCode::NormalDisconnection,
                    DisconnectReasonCode::MalformedPacket,
                    DisconnectReasonCode::ProtocolError,
                    DisconnectReasonCode::SessionTakenOver,
                ][usize::from(a.reason) % 4],
            },
            props.then_some(DisconnectProperties {
                session_expiry_interval: None,
                reason_string: rs,
                user_properties: up,
                server_reference: None,
            }),
        ),
        _ => Packet::ConnAck(
            ConnAck {
                session_present: a.reason % 2 == 1,
                code: [
                    ConnectReturnCode::Success,
                    ConnectReturnCode::NotAuthorized,
                    ConnectReturnCode::ProtocolError,
                ][usize::from(a.reason) % 3],
            },
            props.then_some(ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(100),
                max_qos: None,
                retain_available: Some(1),
                max_packet_size: Some(1 << 20),
                assigned_client_identifier: None,
                topic_alias_max: Some(16),
                reason_string: rs,
                user_properties: up,
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: Some(60),
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        ),
    }
}

fn check_ack(a: Ack) -> Result<(), String> {
    use rumqttc::v5::mqttbytes::v5 as mq;
    let too_long = a
        .reason_string
        .as_ref()
        .is_some_and(|s| s.len() > codec::MAX_FIELD)
        || a.user
            .iter()
            .any(|(k, v)| k.len() > codec::MAX_FIELD || v.len() > codec::MAX_FIELD);
    let mut out = BytesMut::from(&b"prev"[..]);
    let written = codec::write(Version::V5, ack_packet(&a), &mut out);
    match (written, too_long) {
        (Err(e), true) => {
            return if &out[..] == b"prev" {
                Ok(())
            } else {
                Err(format!("refused ({e}) but left bytes"))
            };
        }
        (Err(e), false) => return Err(format!("refused a representable packet: {e}")),
        (Ok(_), true) => return Err("wrote a field over 65,535 bytes".into()),
        (Ok(_), false) => {}
    }
    let mut bytes = out.split_off(4);
    let written = bytes.clone();
    // rumqttc reads every packet a server sends; the strings and the packet id must be back.
    let read = mq::Packet::read(&mut bytes, None);
    let props = |rs: Option<String>, up: Vec<(String, String)>| (rs, up);
    let (pkid, back) = match read {
        Ok(mq::Packet::PubAck(p)) if a.kind == 0 => (
            Some(p.pkid),
            p.properties
                .map(|p| props(p.reason_string, p.user_properties)),
        ),
        Ok(mq::Packet::PubRec(p)) if a.kind == 1 => (
            Some(p.pkid),
            p.properties
                .map(|p| props(p.reason_string, p.user_properties)),
        ),
        Ok(mq::Packet::PubRel(p)) if a.kind == 2 => (
            Some(p.pkid),
            p.properties
                .map(|p| props(p.reason_string, p.user_properties)),
        ),
        Ok(mq::Packet::PubComp(p)) if a.kind == 3 => (
            Some(p.pkid),
            p.properties
                .map(|p| props(p.reason_string, p.user_properties)),
        ),
        Ok(mq::Packet::SubAck(p)) if a.kind == 4 => (
            Some(p.pkid),
            p.properties
                .map(|p| props(p.reason_string, p.user_properties)),
        ),
        Ok(mq::Packet::UnsubAck(p)) if a.kind == 5 => (
            Some(p.pkid),
            p.properties
                .map(|p| props(p.reason_string, p.user_properties)),
        ),
        Ok(mq::Packet::Disconnect(p)) if a.kind == 6 => (
            None,
            p.properties
                .map(|p| props(p.reason_string, p.user_properties)),
        ),
        Ok(mq::Packet::ConnAck(p)) if a.kind == 7 => (
            None,
            p.properties
                .map(|p| props(p.reason_string, p.user_properties)),
        ),
        // A plain Normal Disconnection is `E0 00`, which rumqttc's reader refuses (see the
        // codec's unit test); nothing else to compare.
        Err(_) if a.kind == 6 && written[..] == [0xe0, 0] => return Ok(()),
        other => return Err(format!("rumqttc read {other:?}")),
    };
    if !bytes.is_empty() {
        return Err(format!("{} stray bytes after the packet", bytes.len()));
    }
    if pkid.is_some_and(|p| p != a.pkid) {
        return Err(format!("packet id {pkid:?}"));
    }
    let (rs, up) = back.unwrap_or_default();
    // A DISCONNECT without properties is given its reason's name as Reason String.
    let named_by_the_codec = a.kind == 6 && a.reason_string.is_none() && a.user.is_empty();
    if !named_by_the_codec && rs != a.reason_string {
        return Err("reason string differs".into());
    }
    if up != a.user {
        return Err("user properties differ".into());
    }
    Ok(())
}

#[test]
fn fuzz_mqtt_encode_acks() {
    meshgate_fuzz::run("mqtt_encode_acks", ack(), |_| None, check_ack);
}
