//! Hostile and unlucky clients against the MQTT adapter (issue 18: F2, F3, F14, F18 and the
//! protocol errors of item 5). Malformed packets go over raw TCP sockets; a well-behaved
//! rumqttc subscriber connected at the same time must keep receiving.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod common;

use common::*;
use meshgate_core::metrics;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttd::protocol::{DisconnectReasonCode, Packet};

fn counter(h: &Harness, name: &'static str, labels: &[(&'static str, &str)]) -> u64 {
    h.ctx.registry.counter(name, labels).get()
}

fn dropped(h: &Harness, reason: &str) -> u64 {
    counter(
        h,
        metrics::EVENTS_DROPPED,
        &[("adapter", "mqtt"), ("reason", reason)],
    )
}

fn errors(h: &Harness, kind: &str) -> u64 {
    counter(h, metrics::ERRORS, &[("adapter", "mqtt"), ("kind", kind)])
}

async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A packet: first byte, remaining length, body.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// A CONNECT with raw connect flags and an MQTT 5 property block (`None`: 3.1.1).
fn connect_bytes(id: &str, flags: u8, keep_alive: u16, props: Option<&[u8]>) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(if props.is_some() { 5 } else { 4 });
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if let Some(p) = props {
        body.push(p.len() as u8);
        body.extend_from_slice(p);
    }
    body.extend_from_slice(&string(id.as_bytes()));
    frame(0x10, &body)
}

/// Reads one whole packet's bytes, or `None` when the server closed the connection first.
async fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    loop {
        if buf.len() >= 2 {
            let (mut len, mut i, mut shift) = (0usize, 1, 0);
            while let Some(&b) = buf.get(i) {
                len += usize::from(b & 0x7f) << shift;
                i += 1;
                shift += 7;
                if b & 0x80 == 0 {
                    if buf.len() >= i + len {
                        return Some(buf[..i + len].to_vec());
                    }
                    break;
                }
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("the server answers or closes within 5 s")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Asserts the server closes the connection (after at most a DISCONNECT with `reason`, MQTT 5).
async fn closed_with(s: &mut TcpStream, version: Version, reason: Option<DisconnectReasonCode>) {
    match (recv(s, version).await, reason) {
        (None, None) => {}
        (Some(Packet::Disconnect(d, _)), Some(r)) => {
            assert_eq!(d.reason_code, r);
            assert!(recv(s, version).await.is_none(), "closed after DISCONNECT");
        }
        (other, _) => panic!("expected {reason:?} and close, got {other:?}"),
    }
}

/// A raw MQTT 5 connection, CONNACK checked.
async fn raw5(h: &Harness, id: &str) -> TcpStream {
    raw_connect(h, Version::V5, id, 30).await
}

/// A rumqttc MQTT 5 subscriber on `ok/#` that must keep receiving through every attack.
struct Bystander {
    _client: rumqttc::v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, String>>,
    n: u32,
}

impl Bystander {
    async fn new(h: &Harness, id: &str) -> Bystander {
        let (client, mut rx) = client5(h, id, |_| {}).await;
        client.subscribe("ok/#", Q5::AtLeastOnce).await.unwrap();
        suback5(&mut rx).await;
        Bystander {
            _client: client,
            rx,
            n: 0,
        }
    }

    /// Publishes a plain payload on `ok/<n>` from a fresh 3.1.1 connection and waits for it.
    async fn still_receives(&mut self, h: &Harness) {
        self.n += 1;
        let topic = format!("ok/{}", self.n);
        publish_raw(h, &topic, format!("m{}", self.n).as_bytes()).await;
        let p = wait(&mut self.rx, "the bystander's delivery", publish5).await;
        assert_eq!(p.topic, topic.as_bytes());
    }
}

/// Publishes `payload` on `topic` (QoS 1, MQTT 3.1.1: a JSON CloudEvent stays one) from a
/// raw connection and waits for the PUBACK.
async fn publish_raw(h: &Harness, topic: &str, payload: &[u8]) {
    let mut s = raw_connect(h, Version::V311, &format!("p-{topic}"), 30).await;
    let mut out = BytesMut::new();
    codec::write_publish_v311(
        &mut out,
        topic,
        payload,
        rumqttd::protocol::QoS::AtLeastOnce,
        1,
        false,
        false,
    );
    s.write_all(&out).await.unwrap();
    match recv(&mut s, Version::V311).await {
        Some(Packet::PubAck(a, _)) => assert_eq!(a.pkid, 1),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

fn event_json(id: &str, ext: usize) -> Vec<u8> {
    serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "/hostile",
        "type": "t",
        "x": "a".repeat(ext),
        "data": "d",
    })
    .to_string()
    .into_bytes()
}

/// F2: an extension attribute of 65,600 bytes cannot be an MQTT 5 user property (two-byte
/// length). The binary-mode subscriber does not get it (not truncated, not malformed), it is
/// counted, the next event arrives, and its persistent session does not resend it on
/// reconnect; a 3.1.1 subscriber (structured JSON: no such field) receives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_unrepresentable_event_is_skipped_per_subscriber_and_never_resent() {
    let h = start().await;
    let persistent = |o: &mut rumqttc::v5::MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
        o.set_max_packet_size(Some(1 << 20));
    };
    let (victim, mut vrx, kill) = killable5(&h, "victim", persistent).await;
    victim.subscribe("f2/#", Q5::AtLeastOnce).await.unwrap();
    suback5(&mut vrx).await;
    let (v4, mut v4rx) = client4(&h, "v4-sub", |o| {
        o.set_max_packet_size(1 << 20, 1 << 20);
    })
    .await;
    v4.subscribe("f2/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    suback4(&mut v4rx).await;

    publish_raw(&h, "f2/big", &event_json("big", 65_600)).await;
    publish_raw(&h, "f2/next", &event_json("next", 10)).await;

    let p = wait(&mut vrx, "the next event", publish5).await;
    assert_eq!(
        p.topic,
        &b"f2/next"[..],
        "the big one was skipped, not mangled"
    );
    let props = p.properties.unwrap();
    assert!(
        props
            .user_properties
            .contains(&("id".into(), "next".into()))
    );
    assert_eq!(dropped(&h, "unrepresentable"), 1);
    let big = wait(&mut v4rx, "the big event (3.1.1)", publish4).await;
    assert_eq!(json::decode(&big.payload).unwrap().id(), "big");

    // The victim dies and comes back: nothing is resent, and it keeps receiving.
    kill.abort();
    eventually("the victim's session to be parked", || {
        h.ctx
            .registry
            .gauge(metrics::MQTT_SESSIONS_OFFLINE, &[("adapter", "mqtt")])
            .get()
            == 1
    })
    .await;
    let (_victim, mut vrx) = client5(&h, "victim", persistent).await;
    publish_raw(&h, "f2/after", &event_json("after", 10)).await;
    let p = wait(&mut vrx, "an event after reconnecting", publish5).await;
    assert_eq!(p.topic, &b"f2/after"[..], "no resend of the skipped event");
    assert!(!p.dup);
    assert_eq!(
        dropped(&h, "unrepresentable"),
        1,
        "skipped once, not per reconnect"
    );
}

/// MQTT 5 §3.1.2.11.4: a PUBLISH larger than the client's Maximum Packet Size is not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_event_over_the_clients_maximum_packet_size_is_skipped() {
    let h = start().await;
    let (c, mut rx) = client5(&h, "small", |o| {
        o.set_max_packet_size(Some(2_000));
    })
    .await;
    c.subscribe("mps/#", Q5::AtLeastOnce).await.unwrap();
    suback5(&mut rx).await;
    publish_raw(&h, "mps/big", &event_json("big", 3_000)).await;
    publish_raw(&h, "mps/small", &event_json("small", 10)).await;
    let p = wait(&mut rx, "the small event", publish5).await;
    assert_eq!(p.topic, &b"mps/small"[..]);
    assert_eq!(dropped(&h, "too_large_for_client"), 1);
}

/// MQTT 5 PUBLISH topic names that break the spec: DISCONNECT 0x81 (not UTF-8, U+0000) or
/// 0x82 (wildcard, empty without alias); MQTT 3.1.1 closes. Others keep receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publish_topic_names_are_protocol_errors() {
    let h = start().await;
    let mut ok = Bystander::new(&h, "bystander-topics").await;
    let cases: [(&[u8], u8, DisconnectReasonCode); 5] = [
        (b"a/\xff\xfe", 0, DisconnectReasonCode::MalformedPacket),
        (b"a/\x00b", 1, DisconnectReasonCode::MalformedPacket),
        (b"a/+", 1, DisconnectReasonCode::ProtocolError),
        (b"a/#", 0, DisconnectReasonCode::ProtocolError),
        (b"", 0, DisconnectReasonCode::ProtocolError),
    ];
    for (i, (topic, qos, reason)) in cases.into_iter().enumerate() {
        let mut s = raw5(&h, &format!("bad-topic-{i}")).await;
        let mut body = string(topic);
        if qos > 0 {
            body.extend_from_slice(&[0, 1]);
        }
        body.push(0); // no properties
        body.extend_from_slice(b"payload");
        s.write_all(&frame(0x30 | (qos << 1), &body)).await.unwrap();
        closed_with(&mut s, Version::V5, Some(reason)).await;
        ok.still_receives(&h).await;
    }
    // 3.1.1: the connection is closed (no negative acknowledgement exists).
    for (i, topic) in [&b"a/+"[..], b"a/\xff"].into_iter().enumerate() {
        let mut s = raw_connect(&h, Version::V311, &format!("bad-topic-v4-{i}"), 30).await;
        let mut body = string(topic);
        body.extend_from_slice(&[0, 1]);
        body.extend_from_slice(b"x");
        s.write_all(&frame(0x32, &body)).await.unwrap();
        closed_with(&mut s, Version::V311, None).await;
        ok.still_receives(&h).await;
    }
    assert_eq!(errors(&h, "bad_topic"), 7);
}

/// [MQTT-3.1.2-3]: the reserved bit of CONNECT's flags set → closed, no CONNACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_the_reserved_flag_is_closed() {
    let h = start().await;
    let mut ok = Bystander::new(&h, "bystander-connect").await;
    for props in [None, Some(&[][..])] {
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(&connect_bytes("reserved", 0x03, 30, props))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut s).await, None, "closed without CONNACK");
        ok.still_receives(&h).await;
    }
    // The same CONNECT without the bit is fine.
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&connect_bytes("reserved", 0x02, 30, None))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut s).await.unwrap(), [0x20, 2, 0, 0]);
}

/// [MQTT-3.8.1-1], [MQTT-3.10.1-1] (and every other fixed-header flag): SUBSCRIBE or
/// UNSUBSCRIBE without flags 0b0010 → MQTT 5 DISCONNECT 0x81, 3.1.1 closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_unsubscribe_with_wrong_flags_are_closed() {
    let h = start().await;
    let mut ok = Bystander::new(&h, "bystander-flags").await;
    let subscribe = |first: u8, v5: bool| {
        let mut body = vec![0, 1];
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(&string(b"x/#"));
        if first >> 4 == 8 {
            body.push(1);
        }
        frame(first, &body)
    };
    for first in [0x80, 0x83, 0xa0, 0xa6] {
        for version in [Version::V311, Version::V5] {
            let mut s = raw_connect(&h, version, &format!("flags-{first}-{version:?}"), 30).await;
            s.write_all(&subscribe(first, version == Version::V5))
                .await
                .unwrap();
            let reason = (version == Version::V5).then_some(DisconnectReasonCode::MalformedPacket);
            closed_with(&mut s, version, reason).await;
        }
        ok.still_receives(&h).await;
    }
    // Correct flags still work.
    let mut s = raw_connect(&h, Version::V311, "flags-ok", 30).await;
    s.write_all(&subscribe(0x82, false)).await.unwrap();
    assert!(matches!(
        recv(&mut s, Version::V311).await,
        Some(Packet::SubAck(..))
    ));
}

/// F3: MQTT 5 CONNECT with Receive Maximum 0 (or Maximum Packet Size 0) is a Protocol Error:
/// CONNACK 0x82, closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_0_is_refused_with_connack_0x82() {
    let h = start().await;
    let mut ok = Bystander::new(&h, "bystander-rm0").await;
    for props in [&[0x21u8, 0, 0][..], &[0x27, 0, 0, 0, 0]] {
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        s.write_all(&connect_bytes("rm0", 0x02, 30, Some(props)))
            .await
            .unwrap();
        let connack = read_frame(&mut s).await.expect("a CONNACK");
        assert_eq!(connack[0], 0x20);
        assert_eq!(connack[3], 0x82, "reason code Protocol Error: {connack:?}");
        assert_eq!(read_frame(&mut s).await, None, "then closed");
        ok.still_receives(&h).await;
    }
    assert_eq!(errors(&h, "protocol"), 2);
    // Receive Maximum 1 is fine.
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&connect_bytes("rm1", 0x02, 30, Some(&[0x21, 0, 1])))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut s).await.unwrap()[3], 0);
}

/// F14: an MQTT 3.1.1 payload that claims to be a CloudEvent (JSON with `specversion`) but is
/// not valid is refused by closing the connection (README), not PUBACKed and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_invalid_cloudevent_closes_the_connection() {
    let h = start().await;
    let mut ok = Bystander::new(&h, "bystander-ce").await;
    for qos in [0u8, 1] {
        let mut s = raw_connect(&h, Version::V311, &format!("bad-ce-{qos}"), 30).await;
        let mut out = BytesMut::new();
        codec::write_publish_v311(
            &mut out,
            "ok/bad",
            br#"{"specversion":"1.0","type":"t"}"#,
            if qos == 0 {
                rumqttd::protocol::QoS::AtMostOnce
            } else {
                rumqttd::protocol::QoS::AtLeastOnce
            },
            1,
            false,
            false,
        );
        s.write_all(&out).await.unwrap();
        closed_with(&mut s, Version::V311, None).await;
        ok.still_receives(&h).await;
    }
    assert_eq!(dropped(&h, "bad_event"), 2);
    assert_eq!(errors(&h, "bad_event"), 2);
}

/// F3: a client that stops reading cannot pin its session: the write times out after
/// `mqtt.write_timeout`, the connection is closed and counted; others keep receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_write_timeout() {
    let mut config = mqtt_config();
    config.write_timeout = Duration::from_millis(300);
    let h = start_with(config, Authorizer::allow_all()).await;
    let mut ok = Bystander::new(&h, "bystander-wt").await;
    // A small receive buffer, so the server's writes block sooner.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(h.addr).await.unwrap();
    stuck
        .write_all(&connect_bytes("stuck", 0x02, 0, None))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut stuck).await.unwrap(), [0x20, 2, 0, 0]);
    stuck
        .write_all(&frame(
            0x82,
            &[&[0, 1][..], &string(b"wt/#"), &[0]].concat(),
        ))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut stuck).await.unwrap()[0], 0x90);
    // Never read again. Publish QoS 0 until the server gives up on it.
    let mut publisher = raw_connect(&h, Version::V311, "wt-pub", 30).await;
    let payload = vec![b'x'; 60_000];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while errors(&h, "write_timeout") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no write timeout within 15 s"
        );
        let mut out = BytesMut::new();
        for _ in 0..20 {
            codec::write_publish_v311(
                &mut out,
                "wt/x",
                &payload,
                rumqttd::protocol::QoS::AtMostOnce,
                0,
                false,
                false,
            );
        }
        publisher.write_all(&out).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(errors(&h, "write_timeout"), 1);
    ok.still_receives(&h).await;
}

/// F18: MQTT 5 keep-alive 0 (or above `mqtt.max_keep_alive`) gets Server Keep Alive = the
/// maximum and is held to it; MQTT 3.1.1 keep-alive 0 stays allowed; 3.1.1 above the maximum
/// is refused with 0x02 (it cannot be told another keep-alive; holding it to a shorter one
/// would disconnect a client pinging on its own schedule), as Mosquitto's `max_keepalive`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_policy() {
    let mut config = mqtt_config();
    config.max_keep_alive = Duration::from_secs(1);
    let h = start_with(config, Authorizer::allow_all()).await;

    let mut v5 = TcpStream::connect(h.addr).await.unwrap();
    v5.write_all(&connect_bytes("ka-v5", 0x02, 0, Some(&[])))
        .await
        .unwrap();
    let mut connack = BytesMut::from(&read_frame(&mut v5).await.unwrap()[..]);
    match mq5::Packet::read(&mut connack, None).unwrap() {
        mq5::Packet::ConnAck(a) => {
            assert_eq!(a.properties.unwrap().server_keep_alive, Some(1));
        }
        other => panic!("{other:?}"),
    }
    let mut v4_zero = raw_connect(&h, Version::V311, "ka-v4-0", 0).await;
    // 3.1.1 above the maximum: CONNACK "identifier rejected", then closed.
    let mut v4_long = TcpStream::connect(h.addr).await.unwrap();
    v4_long
        .write_all(&connect_bytes("ka-v4-60", 0x02, 60, None))
        .await
        .unwrap();
    assert_eq!(read_frame(&mut v4_long).await.unwrap(), [0x20, 2, 0, 0x02]);
    assert_eq!(read_frame(&mut v4_long).await, None);
    assert_eq!(errors(&h, "keep_alive_too_long"), 1);
    // 3.1.1 at the maximum is held to it.
    let mut v4_max = raw_connect(&h, Version::V311, "ka-v4-1", 1).await;
    let started = tokio::time::Instant::now();
    // Held to 1 s (timeout at 1.5 s): DISCONNECT 0x8D for MQTT 5, closed for 3.1.1.
    closed_with(
        &mut v5,
        Version::V5,
        Some(DisconnectReasonCode::KeepAliveTimeout),
    )
    .await;
    closed_with(&mut v4_max, Version::V311, None).await;
    // Generous for a loaded machine; without the timeout these would wait forever.
    assert!(started.elapsed() < Duration::from_secs(10));
    // Keep-alive 0 on 3.1.1: still there after the others timed out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    v4_zero.write_all(&[0xc0, 0]).await.unwrap();
    assert!(matches!(
        recv(&mut v4_zero, Version::V311).await,
        Some(Packet::PingResp(_))
    ));
    assert_eq!(errors(&h, "keep_alive_timeout"), 2);
}

/// F18: accepted MQTT sockets have TCP keep-alive on (the kernel's keep-alive timer runs for
/// an idle connection: `tr` 2 in /proc/net/tcp).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_sockets_have_tcp_keepalive() {
    let h = start().await;
    let s = raw_connect(&h, Version::V311, "tcp-ka", 0).await;
    let server_port = format!("{:04X}", h.addr.port());
    let client_port = format!("{:04X}", s.local_addr().unwrap().port());
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let line = table
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 5
                && f[1].ends_with(&format!(":{server_port}"))
                && f[2].ends_with(&format!(":{client_port}"))
        })
        .unwrap_or_else(|| panic!("the server side of the connection in /proc/net/tcp"));
    let timer = line.split_whitespace().nth(5).unwrap();
    assert!(
        timer.starts_with("02:"),
        "keep-alive timer expected, got {timer}: {line}"
    );
}
