//! Persistent sessions, outbound QoS 2, subscription identifiers, retain-as-published and
//! delayed wills, with rumqttc (3.1.1 and 5) as the clients.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod common;

use common::*;
use meshgate_core::metrics;
use rumqttc::v5::mqttbytes::QoS as Q5;

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

fn offline_sessions(h: &Harness) -> i64 {
    h.ctx
        .registry
        .gauge(metrics::MQTT_SESSIONS_OFFLINE, &[("adapter", "mqtt")])
        .get()
}

async fn connack4(rx: &mut mpsc::UnboundedReceiver<Result<rumqttc::Event, String>>) -> bool {
    wait(rx, "CONNACK", |e| match e {
        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => Some(a.session_present),
        _ => None,
    })
    .await
}

async fn connack5(
    rx: &mut mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, String>>,
) -> mq5::ConnAck {
    wait(rx, "CONNACK", |e| match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::ConnAck(a))) => Some(a.clone()),
        _ => None,
    })
    .await
}

/// Waits until `f` holds (state changes on the server side after a client call returns).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `n` messages `<prefix>0..n` on `topic` and waits for every PUBACK.
async fn publish_acked(h: &Harness, id: &str, topic: &str, prefix: &str, n: usize) {
    let (p, mut prx) = client4(h, id, |_| {}).await;
    for i in 0..n {
        p.publish(
            topic,
            rumqttc::QoS::AtLeastOnce,
            false,
            format!("{prefix}{i}"),
        )
        .await
        .unwrap();
    }
    for _ in 0..n {
        wait(&mut prx, "PUBACK", |e| match e {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => Some(()),
            _ => None,
        })
        .await;
    }
    p.disconnect().await.unwrap();
}

/// The payload a plain message was published with (MQTT subscribers get it as published).
fn data_of(p: &rumqttc::Publish) -> String {
    String::from_utf8(p.payload.to_vec()).unwrap()
}

#[tokio::test]
async fn v311_persistent_session_keeps_subscriptions_and_queues_qos1() {
    let h = start().await;
    let (c, mut rx) = client4(&h, "dev-persist", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(!connack4(&mut rx).await, "first connection: no session yet");
    c.subscribe("persist/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    suback4(&mut rx).await;
    c.disconnect().await.unwrap();
    eventually("the session to be parked", || offline_sessions(&h) == 1).await;

    // While the device is away: 5 QoS 1 messages (queued) and 2 QoS 0 (dropped, counted).
    publish_acked(&h, "pub-1", "persist/a", "m", 5).await;
    let (p0, _p0rx) = client4(&h, "pub-0", |_| {}).await;
    for _ in 0..2 {
        p0.publish("persist/a", rumqttc::QoS::AtMostOnce, false, "q0")
            .await
            .unwrap();
    }
    eventually("QoS 0 drops to be counted", || {
        dropped(&h, "offline_qos0") == 2
    })
    .await;

    let (_c, mut rx) = client4(&h, "dev-persist", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(connack4(&mut rx).await, "session present on return");
    for i in 0..5 {
        let p = wait(&mut rx, "queued message", publish4).await;
        assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
        assert_eq!(data_of(&p), format!("m{i}"), "in publish order");
    }
    // And the subscription itself survived: new messages arrive too.
    publish_acked(&h, "pub-2", "persist/b", "live", 1).await;
    let p = wait(&mut rx, "live message", publish4).await;
    assert_eq!(data_of(&p), "live0");
    assert_eq!(offline_sessions(&h), 0);
}

#[tokio::test]
async fn unacknowledged_messages_are_resent_with_dup_after_reconnect() {
    let h = start().await;
    let persistent = |o: &mut rumqttc::v5::MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(30));
        o.set_manual_acks(true);
    };
    let (c, mut rx, kill) = killable5(&h, "dev-dup", persistent).await;
    connack5(&mut rx).await;
    c.subscribe("dup/t", Q5::AtLeastOnce).await.unwrap();
    suback5(&mut rx).await;
    publish_acked(&h, "pub-dup", "dup/t", "x", 1).await;
    let first = wait(&mut rx, "first delivery", publish5).await;
    assert!(!first.dup);
    // The device dies before it acknowledges.
    kill.abort();
    eventually("the session to be parked", || offline_sessions(&h) == 1).await;

    let (c, mut rx) = client5(&h, "dev-dup", persistent).await;
    let ack = connack5(&mut rx).await;
    assert!(ack.session_present);
    let again = wait(&mut rx, "redelivery", publish5).await;
    assert!(again.dup, "a resent PUBLISH has DUP set");
    assert_eq!(again.pkid, first.pkid, "with the same packet id");
    assert_eq!(again.payload, first.payload);
    c.ack(&again).await.unwrap();
    eventually("the QoS 1 delivery to count", || {
        counter(
            &h,
            metrics::MQTT_OUT_BY_QOS,
            &[("adapter", "mqtt"), ("qos", "1")],
        ) == 1
    })
    .await;
}

#[tokio::test]
async fn qos2_is_delivered_exactly_once_to_subscribers() {
    let h = start().await;
    let (s5, mut rx5) = client5(&h, "sub-q2-v5", |_| {}).await;
    s5.subscribe("q2/#", Q5::ExactlyOnce).await.unwrap();
    assert_eq!(
        suback5(&mut rx5).await,
        vec![mq5::SubscribeReasonCode::Success(Q5::ExactlyOnce)]
    );
    let (s4, mut rx4) = client4(&h, "sub-q2-v4", |_| {}).await;
    s4.subscribe("q2/#", rumqttc::QoS::ExactlyOnce)
        .await
        .unwrap();
    suback4(&mut rx4).await;
    let (p, mut prx) = client5(&h, "pub-q2", |_| {}).await;
    p.publish("q2/x", Q5::ExactlyOnce, false, "once")
        .await
        .unwrap();
    wait(&mut prx, "PUBCOMP", |e| match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::PubComp(_))) => Some(()),
        _ => None,
    })
    .await;
    let got = wait(&mut rx5, "QoS 2 delivery (v5)", publish5).await;
    assert_eq!(got.qos, Q5::ExactlyOnce);
    assert_eq!(&got.payload[..], b"once");
    let got = wait(&mut rx4, "QoS 2 delivery (3.1.1)", publish4).await;
    assert_eq!(got.qos, rumqttc::QoS::ExactlyOnce);
    // Both clients complete the PUBREC/PUBREL/PUBCOMP exchange.
    eventually("two QoS 2 deliveries to complete", || {
        counter(
            &h,
            metrics::MQTT_OUT_BY_QOS,
            &[("adapter", "mqtt"), ("qos", "2")],
        ) == 2
    })
    .await;
    // Exactly once: nothing else arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(e) = rx5.try_recv() {
        assert!(publish5(&e).is_none(), "duplicate: {e:?}");
    }
    while let Ok(e) = rx4.try_recv() {
        assert!(publish4(&e).is_none(), "duplicate: {e:?}");
    }
}

#[tokio::test]
async fn subscription_identifiers_and_retain_as_published() {
    let h = start().await;
    let (c, mut rx) = client5(&h, "sub-ids", |_| {}).await;
    let mut wide = mq5::Filter::new("ids/#", Q5::AtLeastOnce);
    wide.preserve_retain = true;
    c.subscribe_many_with_properties(
        [wide],
        mq5::SubscribeProperties {
            id: Some(7),
            user_properties: vec![],
        },
    )
    .await
    .unwrap();
    suback5(&mut rx).await;
    c.subscribe_with_properties(
        "ids/exact",
        Q5::AtMostOnce,
        mq5::SubscribeProperties {
            id: Some(300),
            user_properties: vec![],
        },
    )
    .await
    .unwrap();
    suback5(&mut rx).await;
    // A subscriber without Retain As Published sees RETAIN cleared on live messages.
    let (plain, mut plain_rx) = client5(&h, "sub-plain", |_| {}).await;
    plain.subscribe("ids/#", Q5::AtLeastOnce).await.unwrap();
    suback5(&mut plain_rx).await;

    let (p, mut prx) = client5(&h, "pub-ids", |_| {}).await;
    p.publish("ids/exact", Q5::AtLeastOnce, true, "r")
        .await
        .unwrap();
    wait(&mut prx, "PUBACK", |e| match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::PubAck(_))) => Some(()),
        _ => None,
    })
    .await;
    let got = wait(&mut rx, "delivery", publish5).await;
    let mut ids = got.properties.unwrap().subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, vec![7, 300], "one PUBLISH naming both subscriptions");
    assert!(got.retain, "retain as published");
    assert_eq!(got.qos, Q5::AtLeastOnce, "best granted QoS");
    let plain_got = wait(&mut plain_rx, "plain delivery", publish5).await;
    assert!(!plain_got.retain);
    assert!(
        plain_got
            .properties
            .is_none_or(|p| p.subscription_identifiers.is_empty())
    );
}

/// A will with a delay, on a session that outlives its connection.
fn delayed_will(delay: u32) -> impl FnOnce(&mut rumqttc::v5::MqttOptions) {
    move |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(30));
        o.set_last_will(mq5::LastWill {
            topic: "wills/dev".into(),
            message: "gone".into(),
            qos: Q5::AtLeastOnce,
            retain: false,
            properties: Some(mq5::LastWillProperties {
                delay_interval: Some(delay),
                payload_format_indicator: None,
                message_expiry_interval: None,
                content_type: None,
                response_topic: None,
                correlation_data: None,
                user_properties: vec![],
            }),
        });
    }
}

#[tokio::test]
async fn will_delay_is_cancelled_by_a_quick_return_and_sent_otherwise() {
    let h = start().await;
    let (w, mut wrx) = client5(&h, "will-watcher", |_| {}).await;
    w.subscribe("wills/#", Q5::AtLeastOnce).await.unwrap();
    suback5(&mut wrx).await;

    // Lost and back within the 2 s delay: no will.
    let (_c, mut rx, kill) = killable5(&h, "dev-will", delayed_will(2)).await;
    connack5(&mut rx).await;
    kill.abort();
    eventually("the session to be parked", || offline_sessions(&h) == 1).await;
    let (c, mut rx, kill) = killable5(&h, "dev-will", delayed_will(1)).await;
    assert!(connack5(&mut rx).await.session_present);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        wrx.try_recv().ok().and_then(|e| publish5(&e)).is_none(),
        "no will after a quick return"
    );
    drop(c);

    // Lost for longer than the 1 s delay: the will arrives, not before.
    let lost = std::time::Instant::now();
    kill.abort();
    let will = wait(&mut wrx, "the will", publish5).await;
    let after = lost.elapsed();
    assert_eq!(&will.payload[..], b"gone");
    assert!(after >= Duration::from_millis(900), "sent after {after:?}");
}

#[tokio::test]
async fn clean_start_discards_and_expiry_ends_kept_sessions() {
    let h = start().await;
    let persistent = |expiry: u32| {
        move |o: &mut rumqttc::v5::MqttOptions| {
            o.set_clean_start(false);
            o.set_session_expiry_interval(Some(expiry));
        }
    };
    let (c, mut rx) = client5(&h, "dev-clean", persistent(30)).await;
    connack5(&mut rx).await;
    c.subscribe("clean/#", Q5::AtLeastOnce).await.unwrap();
    suback5(&mut rx).await;
    c.disconnect().await.unwrap();
    eventually("the session to be parked", || offline_sessions(&h) == 1).await;
    // Clean start: no session, and nothing of the old subscription arrives.
    let (_c, mut rx) = client5(&h, "dev-clean", |o| {
        o.set_clean_start(true);
    })
    .await;
    assert!(!connack5(&mut rx).await.session_present);
    eventually("the old session to end", || offline_sessions(&h) == 0).await;
    publish_acked(&h, "pub-clean", "clean/x", "m", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(e) = rx.try_recv() {
        assert!(publish5(&e).is_none(), "delivered after clean start: {e:?}");
    }

    // A session with a 1 s expiry is gone after 1 s.
    let (c, mut rx) = client5(&h, "dev-expire", persistent(1)).await;
    connack5(&mut rx).await;
    c.disconnect().await.unwrap();
    eventually("the session to be parked", || offline_sessions(&h) == 1).await;
    eventually("the session to expire", || offline_sessions(&h) == 0).await;
    let (_c, mut rx) = client5(&h, "dev-expire", persistent(1)).await;
    assert!(!connack5(&mut rx).await.session_present);
}

#[tokio::test]
async fn offline_queue_is_bounded_and_counts_what_it_drops() {
    let mut config = mqtt_config();
    config.max_queued = 3;
    let h = start_with(config, Authorizer::allow_all()).await;
    let (c, mut rx) = client4(&h, "dev-bounded", |o| {
        o.set_clean_session(false);
    })
    .await;
    connack4(&mut rx).await;
    c.subscribe("bounded/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    suback4(&mut rx).await;
    c.disconnect().await.unwrap();
    eventually("the session to be parked", || offline_sessions(&h) == 1).await;
    publish_acked(&h, "pub-bounded", "bounded/a", "m", 5).await;
    eventually("2 drops to be counted", || {
        dropped(&h, "session_queue_full") == 2
    })
    .await;
    let (_c, mut rx) = client4(&h, "dev-bounded", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(connack4(&mut rx).await);
    for i in 0..3 {
        let p = wait(&mut rx, "queued message", publish4).await;
        assert_eq!(data_of(&p), format!("m{i}"));
    }
}

#[tokio::test]
async fn takeover_hands_the_live_session_to_the_new_connection() {
    let h = start().await;
    let persistent = |o: &mut rumqttc::v5::MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(30));
    };
    let (c1, mut rx1) = client5(&h, "dev-move", persistent).await;
    connack5(&mut rx1).await;
    c1.subscribe("move/#", Q5::AtLeastOnce).await.unwrap();
    suback5(&mut rx1).await;
    // The same client id connects again while the first connection is up.
    let (_c2, mut rx2) = client5(&h, "dev-move", persistent).await;
    assert!(
        connack5(&mut rx2).await.session_present,
        "the subscription moved with the session"
    );
    // rumqttc reports the server's DISCONNECT (Session Taken Over) as the end of its loop.
    wait(&mut rx1, "the old connection to end", |e| match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::Disconnect(_))) | Err(_) => Some(()),
        _ => None,
    })
    .await;
    publish_acked(&h, "pub-move", "move/x", "m", 1).await;
    let p = wait(&mut rx2, "delivery to the new connection", publish5).await;
    assert_eq!(&p.payload[..], b"m0");
}

#[tokio::test]
async fn offline_session_limit_ends_extra_sessions_and_counts_them() {
    let mut config = mqtt_config();
    config.max_offline_sessions = 1;
    let h = start_with(config, Authorizer::allow_all()).await;
    for id in ["kept-1", "kept-2"] {
        let (c, mut rx) = client4(&h, id, |o| {
            o.set_clean_session(false);
        })
        .await;
        connack4(&mut rx).await;
        c.disconnect().await.unwrap();
        wait(&mut rx, "the connection to end", |e| {
            e.is_err().then_some(())
        })
        .await;
    }
    eventually("the second session to be refused", || {
        dropped(&h, "session_limit") == 1
    })
    .await;
    assert_eq!(offline_sessions(&h), 1);
    let (_c, mut rx) = client4(&h, "kept-1", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(connack4(&mut rx).await, "the first one was kept");
    let (_c, mut rx) = client4(&h, "kept-2", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(!connack4(&mut rx).await, "the second one was not");
}

#[tokio::test]
async fn v5_request_response_properties_are_forwarded_and_expiry_honoured() {
    let h = start().await;
    let (s, mut srx) = client5(&h, "responder", |_| {}).await;
    s.subscribe("rpc/#", Q5::AtLeastOnce).await.unwrap();
    suback5(&mut srx).await;
    let (p, mut prx) = client5(&h, "requester", |_| {}).await;
    let props = mq5::PublishProperties {
        response_topic: Some("rpc-replies/requester".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00req-1")),
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    p.publish_with_properties("rpc/sum", Q5::AtLeastOnce, false, "1+2", props)
        .await
        .unwrap();
    wait(&mut prx, "PUBACK", |e| match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::PubAck(_))) => Some(()),
        _ => None,
    })
    .await;
    let got = wait(&mut srx, "the request", publish5).await;
    let gp = got.properties.unwrap();
    assert_eq!(gp.response_topic.as_deref(), Some("rpc-replies/requester"));
    assert_eq!(gp.correlation_data.as_deref(), Some(&b"\x00req-1"[..]));
    assert_eq!(gp.payload_format_indicator, Some(1));
    let left = gp.message_expiry_interval.unwrap();
    assert!((1..=60).contains(&left), "remaining expiry {left}");

    // A message that expires while its persistent subscriber is away is not delivered.
    let persistent = |o: &mut rumqttc::v5::MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(30));
    };
    let (c, mut crx) = client5(&h, "sleeper", persistent).await;
    connack5(&mut crx).await;
    c.subscribe("news/#", Q5::AtLeastOnce).await.unwrap();
    suback5(&mut crx).await;
    c.disconnect().await.unwrap();
    eventually("the session to be parked", || offline_sessions(&h) == 1).await;
    for (topic, expiry) in [("news/short", 1), ("news/long", 600)] {
        let props = mq5::PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        p.publish_with_properties(topic, Q5::AtLeastOnce, false, topic, props)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_c, mut crx) = client5(&h, "sleeper", persistent).await;
    assert!(connack5(&mut crx).await.session_present);
    let got = wait(&mut crx, "the unexpired message", publish5).await;
    assert_eq!(&got.payload[..], b"news/long");
    eventually("the expired one to be counted", || {
        dropped(&h, "expired") == 1
    })
    .await;
}
