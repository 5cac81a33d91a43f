//! The MQTT adapter on a memory backbone, driven by rumqttc (3.1.1 and 5) and raw sockets.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod common;

use common::*;

const E0: &str = r#"{"specversion":"1.0","id":"A1","source":"/src","type":"com.example.t","count":7,"flag":true}"#;

#[tokio::test]
async fn v311_structured_round_trip_qos1() {
    let h = start().await;
    let (sub, mut sub_rx) = client4(&h, "sub", |_| {}).await;
    sub.subscribe("t/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        suback4(&mut sub_rx).await,
        vec![rumqttc::SubscribeReasonCode::Success(
            rumqttc::QoS::AtLeastOnce
        )]
    );
    let (publ, mut pub_rx) = client4(&h, "pub", |_| {}).await;
    publ.publish("t/1", rumqttc::QoS::AtLeastOnce, false, E0)
        .await
        .unwrap();
    wait(&mut pub_rx, "PUBACK", |e| {
        matches!(e, Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))).then_some(())
    })
    .await;
    let p = wait(&mut sub_rx, "PUBLISH", publish4).await;
    assert_eq!(p.topic, "t/1");
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    let e = json::decode(&p.payload).unwrap();
    assert_eq!(
        e,
        json::decode(E0.as_bytes()).unwrap(),
        "attributes and extension types intact"
    );
    // Counted per QoS once the subscriber acknowledged.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = h.ctx.registry.render();
        if m.contains("meshgate_mqtt_publish_in_total{adapter=\"mqtt\",qos=\"1\"} 1")
            && m.contains("meshgate_mqtt_publish_out_total{adapter=\"mqtt\",qos=\"1\"} 1")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn v5_binary_and_v311_structured_convert_both_ways() {
    let h = start().await;
    let (s4, mut s4_rx) = client4(&h, "s4", |_| {}).await;
    s4.subscribe("conv/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    suback4(&mut s4_rx).await;
    let (c5, mut c5_rx) = client5(&h, "c5", |_| {}).await;
    c5.subscribe("conv/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce)
        .await
        .unwrap();
    suback5(&mut c5_rx).await;

    // v5 binary in: user properties without prefix, Content Type.
    let props = mq5::PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![
            ("specversion".into(), "1.0".into()),
            ("id".into(), "B5".into()),
            ("source".into(), "/dev/5".into()),
            ("type".into(), "com.example.reading".into()),
            ("subject".into(), "Euro € 😀".into()),
            ("count".into(), "7".into()),
        ],
        ..Default::default()
    };
    c5.publish_with_properties(
        "conv/a",
        rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        false,
        r#"{"a":1}"#,
        props,
    )
    .await
    .unwrap();
    let p = wait(&mut s4_rx, "structured PUBLISH", publish4).await;
    let e = json::decode(&p.payload).unwrap();
    assert_eq!(e.id(), "B5");
    assert_eq!(e.subject(), Some("Euro € 😀"));
    assert_eq!(e.datacontenttype(), Some("application/json"));
    assert_eq!(
        e.extension("count"),
        Some(&ExtensionValue::String("7".into()))
    );
    assert!(
        String::from_utf8(p.payload.to_vec())
            .unwrap()
            .contains(r#""data":{"a":1}"#)
    );

    // v3.1.1 structured in → v5 binary out.
    s4.publish("conv/b", rumqttc::QoS::AtMostOnce, false, E0)
        .await
        .unwrap();
    let p = loop {
        let p = wait(&mut c5_rx, "binary PUBLISH", publish5).await;
        if &p.topic[..] == b"conv/b" {
            break p;
        }
    };
    let props = p.properties.unwrap();
    let get = |k: &str| {
        props
            .user_properties
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("id").as_deref(), Some("A1"));
    assert_eq!(get("count").as_deref(), Some("7"));
    assert_eq!(get("flag").as_deref(), Some("true"));
    assert_eq!(get("specversion").as_deref(), Some("1.0"));
    assert!(get("ce-id").is_none(), "no prefix");
}

#[tokio::test]
async fn qos2_is_published_exactly_once_even_when_resent() {
    let h = start().await;
    let mut sub = h
        .backbone
        .subscribe(TopicFilter::parse("q2/#").unwrap(), Default::default())
        .await
        .unwrap();
    let mut s = raw_connect(&h, Version::V311, "q2client", 30).await;
    let p = codec::publish(
        "q2/x",
        Bytes::from_static(b"once"),
        rumqttd::protocol::QoS::ExactlyOnce,
        9,
        false,
        false,
    )
    .unwrap();
    send(
        &mut s,
        Version::V311,
        rumqttd::protocol::Packet::Publish(p.clone(), None),
    )
    .await;
    assert!(
        matches!(recv(&mut s, Version::V311).await, Some(rumqttd::protocol::Packet::PubRec(r, _)) if r.pkid == 9)
    );
    // The client did not see the PUBREC and resends with DUP.
    let dup = codec::publish(
        "q2/x",
        Bytes::from_static(b"once"),
        rumqttd::protocol::QoS::ExactlyOnce,
        9,
        false,
        true,
    )
    .unwrap();
    send(
        &mut s,
        Version::V311,
        rumqttd::protocol::Packet::Publish(dup, None),
    )
    .await;
    assert!(
        matches!(recv(&mut s, Version::V311).await, Some(rumqttd::protocol::Packet::PubRec(r, _)) if r.pkid == 9)
    );
    send(
        &mut s,
        Version::V311,
        rumqttd::protocol::Packet::PubRel(
            rumqttd::protocol::PubRel {
                pkid: 9,
                reason: rumqttd::protocol::PubRelReason::Success,
            },
            None,
        ),
    )
    .await;
    assert!(
        matches!(recv(&mut s, Version::V311).await, Some(rumqttd::protocol::Packet::PubComp(c, _)) if c.pkid == 9)
    );
    let first = tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.event().data().unwrap().to_bytes(), &b"once"[..]);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sub.next())
            .await
            .is_err(),
        "published once"
    );
}

fn acl_authorizer() -> Authorizer {
    Authorizer::new(
        vec![UserSpec {
            name: "dev1".into(),
            password: Some("pw-dev1".into()),
            tokens: vec!["token-dev1".into()],
            permissions: Permissions {
                publish: vec!["devices/{user}/#".into()],
                subscribe: vec!["commands/{user}/#".into()],
                ..Permissions::default()
            },
            certificate: false,
        }],
        None,
    )
    .unwrap()
}

#[tokio::test]
async fn acl_refusals_v5_reason_codes_and_v311_close() {
    let h = start_with(mqtt_config(), acl_authorizer()).await;
    let (c5, mut rx5) = client5(&h, "dev1-v5", |o| {
        o.set_credentials("dev1", "pw-dev1");
    })
    .await;
    c5.publish(
        "devices/other/x",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        "x",
    )
    .await
    .unwrap();
    let reason = wait(&mut rx5, "PUBACK", |e| match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::PubAck(a))) => Some(a.reason),
        _ => None,
    })
    .await;
    assert_eq!(reason, mq5::PubAckReason::NotAuthorized);
    c5.subscribe("devices/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        suback5(&mut rx5).await,
        vec![mq5::SubscribeReasonCode::NotAuthorized]
    );
    c5.subscribe("commands/dev1/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(
        suback5(&mut rx5).await[0],
        mq5::SubscribeReasonCode::Success(_)
    ));

    // MQTT 3.1.1 has no negative PUBACK: the connection is closed.
    let (c4, mut rx4) = client4(&h, "dev1-v4", |o| {
        o.set_credentials("token-dev1", "");
    })
    .await;
    c4.publish("devices/other/x", rumqttc::QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    wait(&mut rx4, "disconnect", |e| e.is_err().then_some(())).await;
}

#[tokio::test]
async fn connack_codes_for_refusals() {
    let h = start_with(mqtt_config(), acl_authorizer()).await;
    let (_c, mut rx) = client4(&h, "bad", |o| {
        o.set_credentials("dev1", "wrong");
    })
    .await;
    let err = wait(&mut rx, "refusal", |e| e.as_ref().err().cloned()).await;
    assert!(err.contains("BadUserNamePassword"), "{err}");
    let (_c, mut rx) = client5(&h, "anon", |_| {}).await;
    let err = wait(&mut rx, "refusal", |e| e.as_ref().err().cloned()).await;
    assert!(err.contains("NotAuthorized"), "{err}");
    // MQTT 3.1 (MQIsdp, level 3): unacceptable protocol version.
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&[
        0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 0,
    ])
    .await
    .unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, [0x20, 2, 0, 1]);
}

#[tokio::test]
async fn silent_sockets_and_expired_keep_alive_are_closed() {
    let h = start().await;
    // Never sends CONNECT: closed after connect_timeout (500 ms).
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b))
        .await
        .expect("closed in time");
    assert!(matches!(r, Ok(0) | Err(_)));
    // keep_alive 1 s and silence: closed after 1.5 s; MQTT 5 says why.
    let mut s = raw_connect(&h, Version::V5, "sleepy", 1).await;
    let started = std::time::Instant::now();
    match recv(&mut s, Version::V5).await {
        Some(rumqttd::protocol::Packet::Disconnect(d, _)) => {
            assert_eq!(
                d.reason_code,
                rumqttd::protocol::DisconnectReasonCode::KeepAliveTimeout
            )
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test]
async fn packets_within_the_keep_alive_keep_a_connection_open() {
    let h = start().await;
    // keep_alive 1 s: a PINGREQ every 600 ms for 3.6 s (more than twice the 1.5 s limit, so
    // the keep-alive timer fires early and is moved on at least once), each answered.
    let mut s = raw_connect(&h, Version::V311, "lively", 1).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        s.write_all(&[0xc0, 0]).await.unwrap();
        match recv(&mut s, Version::V311).await {
            Some(rumqttd::protocol::Packet::PingResp(_)) => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
    // Then silence: closed after 1.5 s.
    let started = std::time::Instant::now();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b))
        .await
        .expect("closed in time");
    assert!(matches!(r, Ok(0) | Err(_)));
    assert!(started.elapsed() >= Duration::from_millis(1400));
}

#[tokio::test]
async fn topic_aliases_are_given_to_clients_that_take_them() {
    let h = start().await;
    // A Topic Alias Maximum of 2: the first two topics sent get aliases 1 and 2, and later
    // PUBLISHes on them carry only the alias (an empty topic: rumqttc's events show the packets
    // as they came); the third topic goes in full without one.
    let (sub, mut rx) = client5(&h, "aliased", |o| {
        o.set_topic_alias_max(Some(2));
    })
    .await;
    sub.subscribe("al/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    suback5(&mut rx).await;
    let (publ, mut prx) = client4(&h, "alias-pub", |_| {}).await;
    let sent = ["al/1", "al/1", "al/2", "al/3", "al/2", "al/1"];
    for t in sent {
        publ.publish(t, rumqttc::QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        wait(&mut prx, "PUBACK", |e| {
            matches!(e, Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))).then_some(())
        })
        .await;
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let (topic, alias) = wait(&mut rx, "PUBLISH", |e| match e {
            Ok(rumqttc::v5::Event::Incoming(mq5::Packet::Publish(p))) => Some((
                String::from_utf8(p.topic.to_vec()).unwrap(),
                p.properties.as_ref().and_then(|p| p.topic_alias),
            )),
            _ => None,
        })
        .await;
        got.push((topic, alias));
    }
    let expected: Vec<(String, Option<u16>)> = [
        ("al/1", Some(1)),
        ("", Some(1)),
        ("al/2", Some(2)),
        ("al/3", None),
        ("", Some(2)),
        ("", Some(1)),
    ]
    .into_iter()
    .map(|(t, a)| (t.to_owned(), a))
    .collect();
    assert_eq!(got, expected);
    // A client that announces no maximum gets full topics and no aliases.
    let (plain, mut prx5) = client5(&h, "unaliased", |_| {}).await;
    plain
        .subscribe("al/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce)
        .await
        .unwrap();
    suback5(&mut prx5).await;
    publ.publish("al/1", rumqttc::QoS::AtMostOnce, false, "y")
        .await
        .unwrap();
    let alias = wait(&mut prx5, "PUBLISH", |e| match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::Publish(p))) => {
            assert_eq!(&p.topic[..], b"al/1");
            Some(p.properties.as_ref().and_then(|p| p.topic_alias))
        }
        _ => None,
    })
    .await;
    assert_eq!(alias, None);
}

#[tokio::test]
async fn malformed_packet_closes_only_that_connection() {
    let h = start().await;
    let mut bad = raw_connect(&h, Version::V5, "bad", 30).await;
    bad.write_all(&[0x30, 0x02, 0xFF, 0xFF]).await.unwrap();
    match recv(&mut bad, Version::V5).await {
        Some(rumqttd::protocol::Packet::Disconnect(d, _)) => assert_eq!(
            d.reason_code,
            rumqttd::protocol::DisconnectReasonCode::MalformedPacket
        ),
        None => {}
        other => panic!("{other:?}"),
    }
    let (c, mut rx) = client4(&h, "good", |_| {}).await;
    c.subscribe("x", rumqttc::QoS::AtMostOnce).await.unwrap();
    suback4(&mut rx).await;
}

#[tokio::test]
async fn session_takeover_disconnects_the_old_connection() {
    let h = start().await;
    let mut first = raw_connect(&h, Version::V5, "same-id", 30).await;
    let _second = raw_connect(&h, Version::V5, "same-id", 30).await;
    match recv(&mut first, Version::V5).await {
        Some(rumqttd::protocol::Packet::Disconnect(d, _)) => assert_eq!(
            d.reason_code,
            rumqttd::protocol::DisconnectReasonCode::SessionTakenOver
        ),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn retained_messages_reach_later_subscribers() {
    let h = start().await;
    let (p, mut prx) = client4(&h, "retainer", |_| {}).await;
    p.publish("status/dev1", rumqttc::QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    wait(&mut prx, "PUBACK", |e| {
        matches!(e, Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))).then_some(())
    })
    .await;
    let (s, mut srx) = client4(&h, "late", |_| {}).await;
    s.subscribe("status/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = wait(&mut srx, "retained PUBLISH", publish4).await;
    assert!(got.retain);
    assert_eq!(got.topic, "status/dev1");
    // A plain message, retained as published (mqtt.plain_messages = "as_published").
    assert_eq!(&got.payload[..], b"online");
    // An empty retained payload clears it.
    p.publish("status/dev1", rumqttc::QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    wait(&mut prx, "PUBACK", |e| {
        matches!(e, Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))).then_some(())
    })
    .await;
    let (s2, mut s2rx) = client4(&h, "later", |_| {}).await;
    s2.subscribe("status/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    suback4(&mut s2rx).await;
    let r = tokio::time::timeout(
        Duration::from_millis(300),
        wait(&mut s2rx, "nothing", publish4),
    )
    .await;
    assert!(r.is_err(), "cleared retained message not sent");
    drop(s);
}

/// A retained publish the backbone refuses leaves the topic's retained message as it was
/// (review F14: the store used to be updated before the publish, even a refused one).
#[tokio::test]
async fn a_refused_retained_publish_does_not_replace_the_retained_message() {
    use meshgate_core::{Backbone, SubscribeOptions, TopicFilter};
    let memory = MemoryBackboneConfig {
        queue_capacity: 1,
        full_policy: FullQueuePolicy::Block,
        block_timeout: Duration::from_millis(100),
    };
    let h = start_on(mqtt_config(), Authorizer::allow_all(), memory).await;
    // A subscriber that never reads: its one-event queue is full after the first publish, so
    // the second is refused (Saturated) after block_timeout.
    let _stuck = h
        .backbone
        .subscribe(
            TopicFilter::parse("r/#").unwrap(),
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let (p, mut prx) = client4(&h, "retainer", |_| {}).await;
    p.publish("r/x", rumqttc::QoS::AtLeastOnce, true, "v1")
        .await
        .unwrap();
    wait(&mut prx, "PUBACK", |e| {
        matches!(e, Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))).then_some(())
    })
    .await;
    p.publish("r/x", rumqttc::QoS::AtLeastOnce, true, "v2")
        .await
        .unwrap();
    // MQTT 3.1.1 has no negative PUBACK: the refusal closes the connection.
    wait(&mut prx, "the connection closed", |e| {
        e.is_err().then_some(())
    })
    .await;
    let (s, mut srx) = client4(&h, "late", |_| {}).await;
    s.subscribe("r/#", rumqttc::QoS::AtLeastOnce).await.unwrap();
    let got = wait(&mut srx, "retained PUBLISH", publish4).await;
    assert_eq!(&got.payload[..], b"v1");
}

#[tokio::test]
async fn will_is_published_when_a_client_vanishes() {
    let h = start().await;
    let (w, mut wrx) = client4(&h, "watcher", |_| {}).await;
    w.subscribe("wills/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    suback4(&mut wrx).await;
    // A raw client with a will, dropped without DISCONNECT.
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let connect = rumqttd::protocol::Connect {
        keep_alive: 30,
        client_id: "mortal".into(),
        clean_session: true,
    };
    let will = rumqttd::protocol::LastWill {
        topic: Bytes::from_static(b"wills/mortal"),
        message: Bytes::from_static(b"gone"),
        qos: rumqttd::protocol::QoS::AtLeastOnce,
        retain: false,
    };
    send(
        &mut s,
        Version::V311,
        rumqttd::protocol::Packet::Connect(connect, None, Some(will), None, None),
    )
    .await;
    assert!(matches!(
        recv(&mut s, Version::V311).await,
        Some(rumqttd::protocol::Packet::ConnAck(..))
    ));
    drop(s);
    let got = wait(&mut wrx, "will", publish4).await;
    assert_eq!(got.topic, "wills/mortal");
    // A plain will, delivered as published.
    assert_eq!(&got.payload[..], b"gone");
}

#[tokio::test]
async fn shutdown_sends_v5_server_shutting_down() {
    let h = start().await;
    let mut s = raw_connect(&h, Version::V5, "bye", 30).await;
    h.ctx.shutdown.cancel();
    match recv(&mut s, Version::V5).await {
        Some(rumqttd::protocol::Packet::Disconnect(d, _)) => assert_eq!(
            d.reason_code,
            rumqttd::protocol::DisconnectReasonCode::ServerShuttingDown
        ),
        other => panic!("{other:?}"),
    }
}

/// The session reads the WebSocket as a byte stream (MQTT 5 §6.0: a frame may hold several
/// packets or part of one): a CONNECT split over two frames, two PINGREQs in one and a frame
/// of 100 KB are all answered; a WebSocket ping gets its pong; a text frame (not MQTT) ends the connection, which
/// the server closes with 1000.
#[tokio::test]
async fn mqtt_over_websocket_frames_are_a_byte_stream() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let h = start().await;
    let mut req = format!("ws://{}/mqtt", h.ws_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut connect = BytesMut::new();
    codec::write(
        Version::V311,
        rumqttd::protocol::Packet::Connect(
            rumqttd::protocol::Connect {
                keep_alive: 30,
                client_id: "split".into(),
                clean_session: true,
            },
            None,
            None,
            None,
            None,
        ),
        &mut connect,
    )
    .unwrap();
    let second = connect.split_off(5);
    ws.send(Message::Binary(connect.freeze())).await.unwrap();
    ws.send(Message::Binary(second.freeze())).await.unwrap();
    // Whatever comes in binary frames, as one byte stream; control frames as they are.
    let mut received = BytesMut::new();
    let mut next_packet = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| loop {
        if let Some(p) = codec::read(Version::V311, &mut received, 1 << 20).unwrap() {
            return Ok(p);
        }
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
        {
            Some(Ok(Message::Binary(b))) => received.extend_from_slice(&b),
            Some(Ok(other)) => return Err(other),
            other => panic!("{other:?}"),
        }
    };
    assert!(
        matches!(next_packet(&mut ws).await, Ok(rumqttd::protocol::Packet::ConnAck(a, _)) if a.code == rumqttd::protocol::ConnectReturnCode::Success)
    );
    ws.send(Message::Binary(vec![0xc0, 0, 0xc0, 0].into()))
        .await
        .unwrap();
    for _ in 0..2 {
        assert!(matches!(
            next_packet(&mut ws).await,
            Ok(rumqttd::protocol::Packet::PingResp(_))
        ));
    }
    // A frame far larger than the server's 1 KiB read buffer: a 100 KB QoS 1 PUBLISH.
    // (Encoded here: rumqttd's `Publish` keeps its packet id private.)
    let topic = b"ws/big";
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    body.extend_from_slice(&9u16.to_be_bytes());
    body.extend_from_slice(&[7u8; 100_000]);
    let mut publish = BytesMut::from(&[0x32u8][..]);
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        publish.extend_from_slice(&[if len > 0 { byte | 0x80 } else { byte }]);
        if len == 0 {
            break;
        }
    }
    publish.extend_from_slice(&body);
    ws.send(Message::Binary(publish.freeze())).await.unwrap();
    assert!(matches!(
        next_packet(&mut ws).await,
        Ok(rumqttd::protocol::Packet::PubAck(a, _)) if a.pkid == 9
    ));
    ws.send(Message::Ping(b"hi"[..].into())).await.unwrap();
    match next_packet(&mut ws).await {
        Err(Message::Pong(p)) => assert_eq!(&p[..], b"hi"),
        other => panic!("expected a pong, got {other:?}"),
    }
    ws.send(Message::Text("not mqtt".into())).await.unwrap();
    match next_packet(&mut ws).await {
        Err(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1000),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn mqtt_over_websocket_uses_the_same_sessions() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let h = start().await;
    // Without the `mqtt` subprotocol: refused.
    let req = format!("ws://{}/mqtt", h.ws_addr)
        .into_client_request()
        .unwrap();
    assert!(tokio_tungstenite::connect_async(req).await.is_err());

    let mut req = format!("ws://{}/mqtt", h.ws_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
    let (mut ws_tx, mut ws_rx) = ws.split();
    let frame = |p: rumqttd::protocol::Packet| {
        let mut out = BytesMut::new();
        codec::write(Version::V311, p, &mut out).unwrap();
        Message::Binary(out.freeze())
    };
    let mut next = async || -> rumqttd::protocol::Packet {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws_rx.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
            {
                Message::Binary(b) => {
                    let mut buf = BytesMut::from(&b[..]);
                    return codec::read(Version::V311, &mut buf, 1 << 20)
                        .unwrap()
                        .unwrap();
                }
                _ => continue,
            }
        }
    };
    let connect = rumqttd::protocol::Connect {
        keep_alive: 30,
        client_id: "browser".into(),
        clean_session: true,
    };
    ws_tx
        .send(frame(rumqttd::protocol::Packet::Connect(
            connect, None, None, None, None,
        )))
        .await
        .unwrap();
    assert!(
        matches!(next().await, rumqttd::protocol::Packet::ConnAck(a, _) if a.code == rumqttd::protocol::ConnectReturnCode::Success)
    );
    let sub = rumqttd::protocol::Subscribe {
        pkid: 1,
        filters: vec![rumqttd::protocol::Filter {
            path: "ws/#".into(),
            qos: rumqttd::protocol::QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
        }],
    };
    ws_tx
        .send(frame(rumqttd::protocol::Packet::Subscribe(sub, None)))
        .await
        .unwrap();
    assert!(matches!(
        next().await,
        rumqttd::protocol::Packet::SubAck(..)
    ));
    // A TCP client publishes; the WebSocket client receives.
    let (tcp, mut trx) = client4(&h, "tcp", |_| {}).await;
    tcp.publish("ws/hello", rumqttc::QoS::AtLeastOnce, false, E0)
        .await
        .unwrap();
    wait(&mut trx, "PUBACK", |e| {
        matches!(e, Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))).then_some(())
    })
    .await;
    match next().await {
        rumqttd::protocol::Packet::Publish(p, _) => {
            assert_eq!(&p.topic[..], b"ws/hello");
            assert_eq!(json::decode(&p.payload).unwrap().id(), "A1");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn shared_subscriptions_split_the_messages() {
    let h = start().await;
    let mut clients = Vec::new();
    for id in ["worker-a", "worker-b"] {
        let (c, mut rx) = client5(&h, id, |_| {}).await;
        c.subscribe(
            "$share/workers/jobs/#",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
        assert!(matches!(
            suback5(&mut rx).await[0],
            mq5::SubscribeReasonCode::Success(_)
        ));
        clients.push((c, rx));
    }
    let (p, mut prx) = client4(&h, "producer", |_| {}).await;
    for i in 0..10 {
        p.publish(format!("jobs/{i}"), rumqttc::QoS::AtLeastOnce, false, E0)
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 10 {
        wait(&mut prx, "PUBACK", |e| {
            matches!(e, Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))).then_some(())
        })
        .await;
        acked += 1;
    }
    let mut counts = Vec::new();
    for (_c, rx) in clients.iter_mut() {
        let mut n = 0;
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            if publish5(&e).is_some() {
                n += 1;
            }
        }
        counts.push(n);
    }
    assert_eq!(
        counts.iter().sum::<usize>(),
        10,
        "each job delivered once: {counts:?}"
    );
    assert!(
        counts.iter().all(|n| *n > 0),
        "both workers got work: {counts:?}"
    );
}

#[tokio::test]
async fn v5_topic_aliases_set_use_and_reject() {
    let h = start().await;
    let mut sub = h
        .backbone
        .subscribe(TopicFilter::parse("alias/#").unwrap(), Default::default())
        .await
        .unwrap();
    let mut s = raw_connect(&h, Version::V5, "aliaser", 30).await;
    let with_alias = |topic: &str, alias: u16, pkid: u16| {
        let p = codec::publish(
            topic,
            Bytes::from_static(b"x"),
            rumqttd::protocol::QoS::AtLeastOnce,
            pkid,
            false,
            false,
        )
        .unwrap();
        let props = rumqttd::protocol::PublishProperties {
            topic_alias: Some(alias),
            ..Default::default()
        };
        rumqttd::protocol::Packet::Publish(p, Some(props))
    };
    send(&mut s, Version::V5, with_alias("alias/x", 1, 1)).await;
    assert!(
        matches!(recv(&mut s, Version::V5).await, Some(rumqttd::protocol::Packet::PubAck(a, _)) if a.pkid == 1)
    );
    send(&mut s, Version::V5, with_alias("", 1, 2)).await;
    assert!(
        matches!(recv(&mut s, Version::V5).await, Some(rumqttd::protocol::Packet::PubAck(a, _)) if a.pkid == 2)
    );
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.topic().as_str(), "alias/x");
    }
    // Above the announced maximum (16): DISCONNECT 0x94.
    send(&mut s, Version::V5, with_alias("alias/y", 17, 3)).await;
    match recv(&mut s, Version::V5).await {
        Some(rumqttd::protocol::Packet::Disconnect(d, _)) => {
            assert_eq!(
                d.reason_code,
                rumqttd::protocol::DisconnectReasonCode::TopicAliasInvalid
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn v5_connack_caps_the_session_expiry() {
    let h = start().await;
    let (_c, mut rx) = client5(&h, "wants-a-long-session", |o| {
        o.set_clean_start(false);
        let mut props = mq5::ConnectProperties::new();
        props.session_expiry_interval = Some(3600);
        o.set_connect_properties(props);
    })
    .await;
    let ack = wait(&mut rx, "CONNACK", |e| match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::ConnAck(a))) => Some(a.clone()),
        _ => None,
    })
    .await;
    assert!(!ack.session_present);
    let props = ack.properties.unwrap();
    // mqtt.max_session_expiry is 60 s in these tests.
    assert_eq!(props.session_expiry_interval, Some(60));
    assert_eq!(props.topic_alias_max, Some(16));
    assert_eq!(props.shared_subscription_available, Some(1));
}

#[tokio::test]
async fn subscriptions_past_the_limit_are_refused_per_filter() {
    let mut config = mqtt_config();
    config.max_subscriptions = 3;
    let h = start_with(config, Authorizer::allow_all()).await;
    let (c5, mut rx5) = client5(&h, "many-filters", |_| {}).await;
    let filter = |f: &str| mq5::Filter::new(f, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
    // Four in one SUBSCRIBE: the fourth is over the limit.
    c5.subscribe_many(["a/#", "b/#", "c/#", "d/#"].map(filter))
        .await
        .unwrap();
    let codes = suback5(&mut rx5).await;
    assert!(
        codes[..3]
            .iter()
            .all(|c| matches!(c, mq5::SubscribeReasonCode::Success(_))),
        "{codes:?}"
    );
    assert_eq!(codes[3], mq5::SubscribeReasonCode::QuotaExceeded);
    // At the limit, a filter already held may still be subscribed again (new options).
    c5.subscribe("a/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce)
        .await
        .unwrap();
    assert!(matches!(
        suback5(&mut rx5).await[0],
        mq5::SubscribeReasonCode::Success(_)
    ));
    // One unsubscribed makes room for another.
    c5.unsubscribe("b/#").await.unwrap();
    c5.subscribe("d/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(
        suback5(&mut rx5).await[0],
        mq5::SubscribeReasonCode::Success(_)
    ));
    // The refused filter got nothing; the others work.
    let (p, _rx) = client5(&h, "publisher", |_| {}).await;
    for t in ["b/1", "d/1"] {
        p.publish(t, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, t)
            .await
            .unwrap();
    }
    let got = wait(&mut rx5, "a publish", publish5).await;
    assert_eq!(got.topic, "d/1");

    // MQTT 3.1.1: the refused filter's return code is 0x80.
    let (c4, mut rx4) = client4(&h, "many-filters-v4", |_| {}).await;
    c4.subscribe_many(
        ["a/#", "b/#", "c/#", "d/#"]
            .map(|f| rumqttc::SubscribeFilter::new(f.into(), rumqttc::QoS::AtLeastOnce)),
    )
    .await
    .unwrap();
    let codes = suback4(&mut rx4).await;
    assert_eq!(codes[3], rumqttc::SubscribeReasonCode::Failure, "{codes:?}");
}
