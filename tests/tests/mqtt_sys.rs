//! `$SYS` topics (issue 20 item 4): the broker statistics Mosquitto publishes, every
//! `mqtt.sys_interval`, retained, readable only with an ACL granting `$SYS/#`
//! ([MQTT-4.7.2-1]: `#` does not match `$` topics).

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::HashMap;
use std::time::Duration;

use meshgate_tests::mqtt5::connect_to as client;
use meshgate_tests::{Deadline, start_gateway, test_config};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop};

fn config(grant_sys: bool) -> meshgate_config::Config {
    let mut c = test_config();
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.sys_interval = Duration::from_millis(200);
    if grant_sys {
        c.auth.anonymous.acl.subscribe = vec!["#".into(), "$SYS/#".into()];
    }
    c
}

/// Subscribes and returns the SUBACK's first reason code, as its debug text.
async fn subscribe(c: &AsyncClient, el: &mut EventLoop, filter: &str) -> String {
    c.subscribe(filter, QoS::AtMostOnce).await.unwrap();
    let s = meshgate_tests::mqtt5::suback(el).await;
    format!("{:?}", s.return_codes[0])
}

/// Reads `$SYS` PUBLISHes until `done` says the figures seen so far suffice.
async fn read_sys(
    el: &mut EventLoop,
    done: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    let mut seen = HashMap::new();
    let d = Deadline::after(Duration::from_secs(10));
    while !done(&seen) {
        assert!(!d.passed(), "$SYS figures so far: {seen:?}");
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            tokio::time::timeout(Duration::from_millis(500), el.poll()).await
        {
            seen.insert(
                String::from_utf8_lossy(&p.topic).into_owned(),
                String::from_utf8_lossy(&p.payload).into_owned(),
            );
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_carry_the_broker_statistics() {
    let gw = start_gateway(config(true)).await;
    let port = gw.mqtt_addr.unwrap().port();
    let (c, mut el) = client(port, "sys-reader").await;
    assert_eq!(
        subscribe(&c, &mut el, "$SYS/broker/#").await,
        "Success(AtMostOnce)"
    );
    // The retained figures of the last interval come first (from before this client
    // connected); then each interval's.
    let first = read_sys(&mut el, |s| {
        s.len() >= 10
            && s.get("$SYS/broker/clients/connected").map(String::as_str) == Some("1")
            && s.get("$SYS/broker/subscriptions/count").map(String::as_str) == Some("1")
    })
    .await;
    assert!(
        first["$SYS/broker/version"].starts_with("meshgate "),
        "{first:?}"
    );
    assert!(
        first["$SYS/broker/uptime"].ends_with(" seconds"),
        "{first:?}"
    );
    assert_eq!(first["$SYS/broker/clients/connected"], "1", "{first:?}");
    assert_eq!(first["$SYS/broker/subscriptions/count"], "1", "{first:?}");
    for key in [
        "clients/disconnected",
        "messages/received",
        "messages/sent",
        "bytes/received",
        "bytes/sent",
        "retained messages/count",
    ] {
        let value = &first[&format!("$SYS/broker/{key}")];
        assert!(value.parse::<u64>().is_ok(), "{key}: {value:?}");
    }
    // Another client publishes three messages: `messages/received` follows.
    let (p, mut pel) = client(port, "sys-publisher").await;
    for i in 0..3 {
        p.publish("sensors/x", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    let before: u64 = first["$SYS/broker/messages/received"].parse().unwrap();
    let after = read_sys(&mut el, |s| {
        s.get("$SYS/broker/messages/received")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n >= before + 3)
    })
    .await;
    assert!(after.contains_key("$SYS/broker/messages/received"));
    let bytes_in = after
        .get("$SYS/broker/bytes/received")
        .or(first.get("$SYS/broker/bytes/received"))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(bytes_in.is_some_and(|n| n > 0), "{after:?}");
    // Retained: a client subscribing later gets the current figures at once.
    let (late, mut late_el) = client(port, "sys-late").await;
    assert_eq!(
        subscribe(&late, &mut late_el, "$SYS/broker/version").await,
        "Success(AtMostOnce)"
    );
    let got = read_sys(&mut late_el, |s| !s.is_empty()).await;
    assert!(got["$SYS/broker/version"].starts_with("meshgate "));
    gw.shutdown().await;
}

/// `#` neither matches nor grants `$SYS`: without an explicit grant the subscription is
/// refused, and a `#` subscriber never receives `$SYS` messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_need_an_explicit_grant() {
    let gw = start_gateway(config(false)).await;
    let port = gw.mqtt_addr.unwrap().port();
    let (c, mut el) = client(port, "sys-denied").await;
    assert_eq!(subscribe(&c, &mut el, "$SYS/#").await, "NotAuthorized");
    let (all, mut all_el) = client(port, "sys-all").await;
    assert_eq!(
        subscribe(&all, &mut all_el, "#").await,
        "Success(AtMostOnce)"
    );
    // Several $SYS intervals pass: nothing arrives on `#`.
    let quiet = tokio::time::timeout(Duration::from_millis(800), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = all_el.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "`#` received {quiet:?}");
    gw.shutdown().await;
}

/// On a backbone shared by instances (NATS), each instance's figures are under its own
/// `$SYS/broker/instance/<id>/`, not retained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_instance_has_its_own_sys_topics_on_a_shared_backbone() {
    let nats = meshgate_tests::nats::NatsServer::start();
    let mut c = config(true);
    c.gateway.instance_id = Some("sys-a".into());
    c.backbone.kind = meshgate_config::BackboneKind::Nats;
    c.backbone.nats.urls = vec![nats.url()];
    let gw = start_gateway(c).await;
    let port = gw.mqtt_addr.unwrap().port();
    let (c, mut el) = client(port, "sys-nats").await;
    assert_eq!(
        subscribe(&c, &mut el, "$SYS/#").await,
        "Success(AtMostOnce)"
    );
    let seen = read_sys(&mut el, |s| {
        s.contains_key("$SYS/broker/instance/sys-a/version")
    })
    .await;
    assert!(
        seen.keys()
            .all(|k| k.starts_with("$SYS/broker/instance/sys-a/")),
        "{seen:?}"
    );
    gw.shutdown().await;
}
