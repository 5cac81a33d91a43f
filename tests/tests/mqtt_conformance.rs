//! MQTT 5 conformance (issue 20 item 5), against the real binary with rumqttc: each test names
//! the normative statements of the MQTT 5.0 specification it checks. Transparency of
//! forwarded properties is in `mqtt_transparent.rs`, `$SYS` in `mqtt_sys.rs`, protocol errors
//! in `hostile_mqtt_packets.rs`.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::time::Duration;

use meshgate_tests::mqtt5::{connect, suback};
use meshgate_tests::{Process, spawn};
use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, LastWillProperties, Packet, Publish};
use rumqttc::v5::mqttbytes::{QoS, v5::RetainForwardRule};
use rumqttc::v5::{Event, EventLoop, MqttOptions};

fn gateway() -> Process {
    spawn(
        &[],
        &[
            ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__MQTT__ENABLED", "true"),
            ("MESHGATE__MQTT__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__LOG__LEVEL", "warn"),
        ],
    )
}

fn options(gw: &Process, id: &str) -> MqttOptions {
    let port = gw.mqtt.expect("the MQTT listener in the banner").port();
    MqttOptions::new(id, "127.0.0.1", port)
}

/// The PUBLISHes `el` receives within `within` (polling on: acknowledgements go out).
async fn publishes_within(el: &mut EventLoop, within: Duration) -> Vec<Publish> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(within, async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = el.poll().await {
                got.push(p);
            }
        }
    })
    .await;
    got
}

/// Polls a publisher's event loop in the background, so its PUBLISHes go out.
fn drive(mut el: EventLoop) {
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
}

/// [MQTT-3.8.3-3]: with No Local set, the server does not forward a client's own
/// publications to it; without it, it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_keeps_a_clients_own_messages_from_it() {
    let gw = gateway();
    let (c, mut el) = connect(options(&gw, "nolocal")).await;
    let mut own = Filter::new("nl/own", QoS::AtLeastOnce);
    own.nolocal = true;
    c.subscribe_many([own, Filter::new("nl/other", QoS::AtLeastOnce)])
        .await
        .unwrap();
    suback(&mut el).await;
    c.publish("nl/own", QoS::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    c.publish("nl/other", QoS::AtLeastOnce, false, "echo")
        .await
        .unwrap();
    let got = publishes_within(&mut el, Duration::from_millis(800)).await;
    let topics: Vec<_> = got.iter().map(|p| p.topic.clone()).collect();
    assert_eq!(
        topics,
        [&b"nl/other"[..]],
        "only the subscription without No Local echoes"
    );
    // Another client's No Local subscription gets what this one publishes (the Paho
    // interoperability suite's `test_subscribe_options`).
    let (other, mut other_el) = connect(options(&gw, "nolocal-other")).await;
    let mut theirs = Filter::new("nl/own", QoS::ExactlyOnce);
    theirs.nolocal = true;
    other.subscribe_many([theirs]).await.unwrap();
    suback(&mut other_el).await;
    c.publish("nl/own", QoS::AtLeastOnce, false, "for the other")
        .await
        .unwrap();
    let mine = publishes_within(&mut el, Duration::from_millis(300)).await;
    let theirs = publishes_within(&mut other_el, Duration::from_millis(800)).await;
    assert!(mine.is_empty(), "{mine:?}");
    assert_eq!(theirs.len(), 1, "the other client's No Local subscription");
}

/// [MQTT-3.3.1-12]: Retain As Published 0 — the RETAIN flag of a forwarded message is 0;
/// [MQTT-3.3.1-13]: Retain As Published 1 — it is the flag of the received PUBLISH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_as_published_decides_the_forwarded_retain_flag() {
    let gw = gateway();
    let (keep, mut keep_el) = connect(options(&gw, "rap-1")).await;
    let mut rap = Filter::new("rap/x", QoS::AtLeastOnce);
    rap.preserve_retain = true;
    keep.subscribe_many([rap]).await.unwrap();
    suback(&mut keep_el).await;
    let (clear, mut clear_el) = connect(options(&gw, "rap-0")).await;
    clear.subscribe("rap/x", QoS::AtLeastOnce).await.unwrap();
    suback(&mut clear_el).await;
    let (p, pel) = connect(options(&gw, "rap-pub")).await;
    drive(pel);
    p.publish("rap/x", QoS::AtLeastOnce, true, "r")
        .await
        .unwrap();
    let kept = publishes_within(&mut keep_el, Duration::from_millis(800)).await;
    let cleared = publishes_within(&mut clear_el, Duration::from_millis(300)).await;
    assert!(kept.len() == 1 && kept[0].retain, "{kept:?}");
    assert!(cleared.len() == 1 && !cleared[0].retain, "{cleared:?}");
}

/// Retain Handling: [MQTT-3.3.1-9] 0 sends the retained message on every subscribe;
/// [MQTT-3.3.1-10] 1 only when the subscription did not exist; [MQTT-3.3.1-11] 2 never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_zero_one_and_two() {
    let gw = gateway();
    let (p, pel) = connect(options(&gw, "rh-pub")).await;
    drive(pel);
    p.publish("rh/x", QoS::AtLeastOnce, true, "kept")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (rule, first, again) in [
        (RetainForwardRule::OnEverySubscribe, 1, 1),
        (RetainForwardRule::OnNewSubscribe, 1, 0),
        (RetainForwardRule::Never, 0, 0),
    ] {
        let name = format!("{rule:?}");
        let (c, mut el) = connect(options(&gw, &format!("rh-{name}"))).await;
        let mut f = Filter::new("rh/#", QoS::AtLeastOnce);
        f.retain_forward_rule = rule;
        c.subscribe_many([f.clone()]).await.unwrap();
        let got = publishes_within(&mut el, Duration::from_millis(500)).await;
        assert_eq!(got.len(), first, "{name} on a new subscription");
        c.subscribe_many([f]).await.unwrap();
        let got = publishes_within(&mut el, Duration::from_millis(500)).await;
        assert_eq!(got.len(), again, "{name} on a repeated subscription");
    }
}

/// [MQTT-3.3.4-9]: the server does not send more QoS 1 PUBLISHes awaiting acknowledgement
/// than the client's Receive Maximum; acknowledging lets the next ones through, and none is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_receive_maximum_bounds_what_is_in_flight() {
    let gw = gateway();
    let mut o = options(&gw, "rm-sub");
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let (c, mut el) = connect(o).await;
    c.subscribe("rm/x", QoS::AtLeastOnce).await.unwrap();
    suback(&mut el).await;
    let (p, pel) = connect(options(&gw, "rm-pub")).await;
    drive(pel);
    for i in 0..6 {
        p.publish("rm/x", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    let first = publishes_within(&mut el, Duration::from_millis(800)).await;
    assert_eq!(
        first.len(),
        2,
        "unacknowledged in flight: at most the Receive Maximum"
    );
    let mut received = first.clone();
    let mut pending = first;
    while received.len() < 6 {
        for p in pending.drain(..) {
            c.ack(&p).await.unwrap();
        }
        let next = publishes_within(&mut el, Duration::from_millis(500)).await;
        assert!(!next.is_empty() && next.len() <= 2, "{} more", next.len());
        received.extend(next.iter().cloned());
        pending = next;
    }
    let payloads: Vec<_> = received.iter().map(|p| p.payload.clone()).collect();
    let expected: Vec<_> = (0..6).map(|i| bytes::Bytes::from(format!("{i}"))).collect();
    assert_eq!(payloads, expected, "every message, in order");
}

/// [MQTT-3.1.3-9]: the Will Message is not published before its Will Delay Interval has
/// passed, and not at all if the client resumes its session in time (§3.1.3.2.2); published
/// after the delay when it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_waits_its_delay_and_is_cancelled_by_a_reconnect() {
    let gw = gateway();
    let (w, mut wel) = connect(options(&gw, "will-watcher")).await;
    w.subscribe("wills/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut wel).await;
    let will = |id: &str| {
        let mut o = options(&gw, id);
        // Reconnecting resumes the session: a clean start would end it, and a session's end
        // publishes the will at once (MQTT 5 §3.1.3.2.2).
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
        o.set_last_will(LastWill::new(
            format!("wills/{id}"),
            "gone",
            QoS::AtLeastOnce,
            false,
            Some(LastWillProperties {
                delay_interval: Some(2),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
            }),
        ));
        o
    };
    // Vanishes for good: the will comes after about 2 s, not before.
    let (_gone, gone_el) = connect(will("vanisher")).await;
    drop(gone_el);
    let early = publishes_within(&mut wel, Duration::from_millis(1200)).await;
    assert!(early.is_empty(), "published before the delay: {early:?}");
    let late = publishes_within(&mut wel, Duration::from_millis(2500)).await;
    assert_eq!(late.len(), 1, "published after the delay");
    assert_eq!(&late[0].topic[..], b"wills/vanisher");
    // Comes back within the delay: no will.
    let (_back, back_el) = connect(will("returner")).await;
    drop(back_el);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_again, again_el) = connect(will("returner")).await;
    let none = publishes_within(&mut wel, Duration::from_millis(2800)).await;
    assert!(
        none.is_empty(),
        "a will after the client came back: {none:?}"
    );
    drop(again_el);
}

/// [MQTT-3.2.2-17] / [MQTT-3.3.2-8]: a client that announces a Topic Alias Maximum may get
/// PUBLISHes that use an alias (the topic sent once); [MQTT-3.3.2-9] the server does not send
/// aliases to a client that announced none. rumqttc resolves the aliases it receives, so the
/// topic it reports is the full one either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_only_for_clients_that_take_them() {
    let gw = gateway();
    let mut o = options(&gw, "alias-yes");
    o.set_topic_alias_max(Some(10));
    let (yes, mut yes_el) = connect(o).await;
    yes.subscribe("alias/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut yes_el).await;
    let (no, mut no_el) = connect(options(&gw, "alias-no")).await;
    no.subscribe("alias/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut no_el).await;
    let (p, pel) = connect(options(&gw, "alias-pub")).await;
    drive(pel);
    for _ in 0..3 {
        p.publish("alias/a/long/topic", QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
    }
    let with = publishes_within(&mut yes_el, Duration::from_millis(800)).await;
    let without = publishes_within(&mut no_el, Duration::from_millis(300)).await;
    assert_eq!(with.len(), 3);
    let aliased: Vec<_> = with
        .iter()
        .map(|p| p.properties.as_ref().and_then(|x| x.topic_alias))
        .collect();
    assert!(aliased.iter().all(Option::is_some), "{aliased:?}");
    assert!(
        with[1..].iter().all(|p| p.topic.is_empty()),
        "the topic is sent once"
    );
    assert_eq!(without.len(), 3);
    assert!(
        without.iter().all(
            |p| p.properties.as_ref().and_then(|x| x.topic_alias).is_none()
                && &p.topic[..] == b"alias/a/long/topic"
        ),
        "{without:?}"
    );
}

/// [MQTT-3.1.2-24]: the server does not send a packet larger than the client's Maximum
/// Packet Size; the message is discarded for that client only [MQTT-3.1.2-25].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_over_the_clients_maximum_packet_size_are_not_sent() {
    let gw = gateway();
    let mut o = options(&gw, "small");
    o.set_max_packet_size(Some(200));
    let (small, mut small_el) = connect(o).await;
    small.subscribe("mps/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut small_el).await;
    let (big, mut big_el) = connect(options(&gw, "big")).await;
    big.subscribe("mps/#", QoS::AtLeastOnce).await.unwrap();
    suback(&mut big_el).await;
    let (p, pel) = connect(options(&gw, "mps-pub")).await;
    drive(pel);
    p.publish("mps/x", QoS::AtLeastOnce, false, vec![b'x'; 500])
        .await
        .unwrap();
    p.publish("mps/x", QoS::AtLeastOnce, false, "fits")
        .await
        .unwrap();
    let to_small = publishes_within(&mut small_el, Duration::from_millis(800)).await;
    let to_big = publishes_within(&mut big_el, Duration::from_millis(300)).await;
    assert_eq!(to_big.len(), 2);
    let sizes: Vec<_> = to_small.iter().map(|p| p.payload.len()).collect();
    assert_eq!(sizes, [4], "only the message that fits");
}
