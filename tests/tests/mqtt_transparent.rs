//! MQTT to MQTT is transparent (issue 20 item 1): a message an MQTT client publishes as a plain
//! payload reaches MQTT subscribers as any broker forwards it — the payload bytes, Content Type
//! (any UTF-8 string [MQTT-3.3.2-20]), every User Property in order with duplicates
//! [MQTT-3.3.2-17] [MQTT-3.3.2-18], Payload Format Indicator, Response Topic, Correlation Data
//! and Message Expiry — on one instance (memory backbone) and across instances (NATS core,
//! JetStream), retained too; 3.1.1 subscribers get the payload bytes; WebSocket subscribers
//! see the CloudEvent it was wrapped into.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::time::Duration;

use bytes::Bytes;
use meshgate_config::BackboneKind;
use meshgate_tests::mqtt5::{connect_to as v5_client, suback};
use meshgate_tests::nats::NatsServer;
use meshgate_tests::{Deadline, next_event, start_gateway, test_config, ws_connect};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop};

const PAYLOAD: &[u8] = b"\x00\x01 plain bytes \xff";

fn user_properties() -> Vec<(String, String)> {
    [("a", "1"), ("b", "x=y"), ("a", "2"), ("", ""), ("é", "ü")]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn properties() -> PublishProperties {
    PublishProperties {
        content_type: Some("My name".to_owned()),
        user_properties: user_properties(),
        payload_format_indicator: Some(0),
        response_topic: Some("replies/1".to_owned()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        message_expiry_interval: Some(3600),
        ..Default::default()
    }
}

fn config(
    kind: BackboneKind,
    nats: Option<&NatsServer>,
    instance: &str,
) -> meshgate_config::Config {
    let mut c = test_config();
    c.gateway.instance_id = Some(instance.into());
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.backbone.kind = kind;
    if let Some(n) = nats {
        c.backbone.nats.urls = vec![n.url()];
        c.backbone.nats.connect_timeout = Duration::from_secs(5);
    }
    c
}

async fn v5_subscribe(port: u16, id: &str, filter: &str) -> (AsyncClient, EventLoop) {
    let (c, mut el) = v5_client(port, id).await;
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    suback(&mut el).await;
    (c, el)
}

async fn next_publish(el: &mut EventLoop) -> rumqttc::v5::mqttbytes::v5::Publish {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .expect("a PUBLISH within 10 s")
}

/// What an MQTT 5 subscriber must see of the message [`properties`] describes.
fn assert_as_published(p: &rumqttc::v5::mqttbytes::v5::Publish, what: &str) {
    assert_eq!(&p.payload[..], PAYLOAD, "{what}: payload");
    let props = p.properties.clone().unwrap_or_default();
    assert_eq!(props.content_type.as_deref(), Some("My name"), "{what}");
    assert_eq!(
        props.user_properties,
        user_properties(),
        "{what}: user properties"
    );
    assert_eq!(props.response_topic.as_deref(), Some("replies/1"), "{what}");
    assert_eq!(
        props.correlation_data.as_deref(),
        Some(&b"\x01\x02"[..]),
        "{what}"
    );
    let expiry = props.message_expiry_interval.unwrap_or(0);
    assert!((3590..=3600).contains(&expiry), "{what}: expiry {expiry}");
}

/// Publisher on `a`, subscribers (MQTT 5, MQTT 3.1.1, WebSocket) on `b`.
async fn check_transparency(
    a: &meshgate::RunningGateway,
    b: &meshgate::RunningGateway,
    what: &str,
) {
    let (pa, pb) = (a.mqtt_addr.unwrap().port(), b.mqtt_addr.unwrap().port());
    let (_s5, mut s5) = v5_subscribe(pb, &format!("{what}-sub5"), "dev/#").await;
    let (s3, mut s3el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new(format!("{what}-sub3"), "127.0.0.1", pb),
        10,
    );
    meshgate_tests::mqtt311::subscribe(&s3, &mut s3el, "dev/#").await;
    let mut ws = ws_connect(b.web_addr.unwrap(), &["dev/#"]).await;
    // Subscriptions on another instance take a moment to reach the bus.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (p, mut pel) = v5_client(pa, &format!("{what}-pub")).await;
    p.publish_with_properties(
        "dev/7/state",
        QoS::AtLeastOnce,
        false,
        PAYLOAD,
        properties(),
    )
    .await
    .unwrap();
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });

    assert_as_published(&next_publish(&mut s5).await, &format!("{what}: MQTT 5"));
    let got3 = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                s3el.poll().await.unwrap()
            {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        &got3.payload[..],
        PAYLOAD,
        "{what}: MQTT 3.1.1 gets the payload bytes"
    );
    let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        e.ty(),
        "io.meshgate.mqtt.message",
        "{what}: the CloudEvent view"
    );
    assert_eq!(e.subject(), Some("dev/7/state"), "{what}");
    assert_eq!(
        e.datacontenttype(),
        None,
        "{what}: `My name` is no media type"
    );
    assert_eq!(&e.data().unwrap().to_bytes()[..], PAYLOAD, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_messages_are_transparent_on_one_instance() {
    let gw = start_gateway(config(BackboneKind::Memory, None, "t-mem")).await;
    check_transparency(&gw, &gw, "memory").await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_messages_are_transparent_across_instances_on_nats() {
    let nats = NatsServer::start();
    let a = start_gateway(config(BackboneKind::Nats, Some(&nats), "t-nats-a")).await;
    let b = start_gateway(config(BackboneKind::Nats, Some(&nats), "t-nats-b")).await;
    check_transparency(&a, &b, "nats").await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_messages_are_transparent_across_instances_on_jetstream_retained_too() {
    let nats = NatsServer::start();
    let a = start_gateway(config(BackboneKind::JetStream, Some(&nats), "t-js-a")).await;
    let b = start_gateway(config(BackboneKind::JetStream, Some(&nats), "t-js-b")).await;
    check_transparency(&a, &b, "jetstream").await;
    // Retained: stored in the JetStream KV bucket by A, read by B for a later subscriber.
    let (p, mut pel) = v5_client(a.mqtt_addr.unwrap().port(), "t-js-retainer").await;
    p.publish_with_properties("keep/1", QoS::AtLeastOnce, true, PAYLOAD, properties())
        .await
        .unwrap();
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = pel.poll().await.unwrap() {
            break;
        }
        assert!(!d.passed(), "no PUBACK for the retained publish");
    }
    let (_late, mut late) = v5_subscribe(b.mqtt_addr.unwrap().port(), "t-js-late", "keep/#").await;
    let got = next_publish(&mut late).await;
    assert!(got.retain);
    assert_as_published(&got, "jetstream retained");
    a.shutdown().await;
    b.shutdown().await;
}

/// With `mqtt.plain_messages = "cloudevents"`, MQTT subscribers get the CloudEvent view (MQTT 5
/// binary mode: the attributes as user properties).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloudevent_view_on_mqtt_is_opt_in() {
    let mut c = config(BackboneKind::Memory, None, "t-view");
    c.mqtt.plain_messages = meshgate_config::PlainMessages::CloudEvents;
    let gw = start_gateway(c).await;
    let port = gw.mqtt_addr.unwrap().port();
    let (_s, mut sel) = v5_subscribe(port, "view-sub", "dev/#").await;
    let (p, mut pel) = v5_client(port, "view-pub").await;
    p.publish("dev/1", QoS::AtLeastOnce, false, PAYLOAD)
        .await
        .unwrap();
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    let got = next_publish(&mut sel).await;
    assert_eq!(&got.payload[..], PAYLOAD);
    let names: Vec<String> = got
        .properties
        .unwrap_or_default()
        .user_properties
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for attribute in ["specversion", "id", "source", "type", "subject"] {
        assert!(
            names.iter().any(|n| n == attribute),
            "{attribute} in {names:?}"
        );
    }
    gw.shutdown().await;
}

/// A raw MQTT 5 subscriber (CONNECT, SUBSCRIBE at QoS 0), to see packets byte for byte.
async fn raw_v5_subscriber(port: u16, id: &str, filter: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut connect = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 5, 0x02, 0x00, 60, 0x00];
    connect.extend_from_slice(&u16::try_from(id.len()).unwrap().to_be_bytes());
    connect.extend_from_slice(id.as_bytes());
    let mut packet = vec![0x10, u8::try_from(connect.len()).unwrap()];
    packet.extend_from_slice(&connect);
    let mut subscribe = vec![0x00, 0x01, 0x00];
    subscribe.extend_from_slice(&u16::try_from(filter.len()).unwrap().to_be_bytes());
    subscribe.extend_from_slice(filter.as_bytes());
    subscribe.push(0x00);
    packet.extend_from_slice(&[0x82, u8::try_from(subscribe.len()).unwrap()]);
    packet.extend_from_slice(&subscribe);
    s.write_all(&packet).await.unwrap();
    // CONNACK and SUBACK: read until both arrived (types 0x20, 0x90).
    let mut seen = 0;
    while seen < 2 {
        let (first, len) = read_header(&mut s).await;
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.unwrap();
        assert!(
            matches!(first & 0xF0, 0x20 | 0x90),
            "unexpected packet {first:#x}"
        );
        seen += 1;
    }
    s
}

/// A packet's first byte and Remaining Length.
async fn read_header(s: &mut tokio::net::TcpStream) -> (u8, usize) {
    use tokio::io::AsyncReadExt;
    let first = s.read_u8().await.unwrap();
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await.unwrap();
        len |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return (first, len);
        }
        shift += 7;
    }
}

/// The whole size of the next PUBLISH `s` receives.
async fn next_publish_size(s: &mut tokio::net::TcpStream) -> usize {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(10), async {
        let (first, len) = read_header(s).await;
        assert_eq!(first & 0xF0, 0x30, "a PUBLISH");
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.unwrap();
        1 + if len < 128 { 1 } else { 2 } + len
    })
    .await
    .expect("a PUBLISH within 10 s")
}

/// Issue 20's target: an MQTT 5 PUBLISH of a 32-byte payload without user properties reaches
/// an MQTT 5 subscriber at most 10 bytes larger than through Mosquitto (the one on
/// 127.0.0.1:1883). It was 237 bytes against Mosquitto's 47 when the CloudEvents attributes
/// were added as user properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_publish_is_no_larger_than_through_mosquitto() {
    let gw = start_gateway(config(BackboneKind::Memory, None, "t-size")).await;
    let topic = format!("size/{}", std::process::id());
    let mut sizes = Vec::new();
    for port in [gw.mqtt_addr.unwrap().port(), 1883] {
        let mut sub = raw_v5_subscriber(port, &format!("size-sub-{port}"), &topic).await;
        let (p, mut pel) = v5_client(port, &format!("size-pub-{port}")).await;
        p.publish(&topic, QoS::AtMostOnce, false, vec![b'x'; 32])
            .await
            .unwrap();
        tokio::spawn(async move { while pel.poll().await.is_ok() {} });
        sizes.push(next_publish_size(&mut sub).await);
    }
    let (meshgate, mosquitto) = (sizes[0], sizes[1]);
    eprintln!("PUBLISH of 32 bytes: meshgate {meshgate} bytes, Mosquitto {mosquitto}");
    assert!(
        meshgate <= mosquitto + 10,
        "PUBLISH of 32 bytes: meshgate {meshgate} bytes, Mosquitto {mosquitto}"
    );
    gw.shutdown().await;
}

/// Issue 20 item 2: a CloudEvent published over MQTT 5 in binary mode may carry user
/// properties that are not attribute names; they travel with the MQTT message (after the
/// attributes) and never become attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_attribute_user_properties_travel_with_a_cloudevent() {
    let gw = start_gateway(config(BackboneKind::Memory, None, "t-extra")).await;
    let port = gw.mqtt_addr.unwrap().port();
    let (_s, mut sel) = v5_subscribe(port, "extra-sub", "ce/#").await;
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["ce/#"]).await;
    let (p, mut pel) = v5_client(port, "extra-pub").await;
    let mut props = PublishProperties::default();
    for (k, v) in [
        ("specversion", "1.0"),
        ("id", "E1"),
        ("source", "/dev"),
        ("type", "com.example.t"),
        ("x-trace", "abc"),
        ("Origin", "lab"),
    ] {
        props.user_properties.push((k.to_owned(), v.to_owned()));
    }
    p.publish_with_properties("ce/1", QoS::AtLeastOnce, false, "data", props)
        .await
        .unwrap();
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    let got = next_publish(&mut sel).await;
    let user = got.properties.unwrap_or_default().user_properties;
    assert!(
        user.contains(&("id".to_owned(), "E1".to_owned())),
        "{user:?}"
    );
    let extra: Vec<_> = user
        .iter()
        .filter(|(k, _)| k == "x-trace" || k == "Origin")
        .collect();
    assert_eq!(extra.len(), 2, "{user:?}");
    let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(e.id(), "E1");
    assert_eq!(e.extension("x-trace"), None, "not an attribute");
    gw.shutdown().await;
}
