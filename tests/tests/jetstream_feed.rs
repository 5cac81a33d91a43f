//! The JetStream backbone's instance feed (`backbone.jetstream.subscriptions =
//! "instance_feed"`, decision 0080) against a real nats-server: one consumer per gateway
//! instance whatever the number of subscriptions and persistent sessions, a slow subscription
//! that reads what it missed from the stream, a feed whose consumer is lost. The delivery,
//! session and fault tests of `jetstream_backbone.rs` also run in this mode (`…_on_the_instance_feed`).

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use meshgate_config::{BackboneKind, JetStreamSubscriptions};
use meshgate_core::{Envelope, Event, Origin, SubscribeOptions, Topic, TopicFilter};
use meshgate_tests::nats::NatsServer;
use meshgate_tests::{next_event, start_gateway, test_config, wait_metric, ws_connect};

fn feed_config(server: &NatsServer, instance: &str) -> meshgate_config::Config {
    let mut c = test_config();
    c.gateway.instance_id = Some(instance.into());
    c.backbone.kind = BackboneKind::JetStream;
    c.backbone.nats.urls = vec![server.url()];
    c.backbone.jetstream.subscriptions = JetStreamSubscriptions::InstanceFeed;
    c
}

fn envelope(topic: &str, id: &str) -> Envelope {
    Envelope::new(
        Topic::from_mqtt(topic).unwrap(),
        Arc::new(Event::new(id, "/test", "t").unwrap()),
        Origin {
            instance: Arc::from("test"),
            connection: 1,
        },
    )
}

/// The consumers of the gateway's stream.
async fn consumers(nats: &NatsServer) -> Vec<String> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("MESHGATE").await.unwrap();
    stream.consumer_names().map(|n| n.unwrap()).collect().await
}

async fn post(web: std::net::SocketAddr, topic: &str, body: &str) {
    let status = reqwest::Client::new()
        .post(format!("http://{web}/events/{topic}"))
        .header("content-type", "text/plain")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscription_reads_what_it_missed_from_the_stream_in_order() {
    let nats = NatsServer::start();
    let mut config = feed_config(&nats, "feed-slow");
    // A queue of four messages: the slow subscription overflows it at once.
    config.backbone.nats.subscription_capacity = 4;
    let registry = meshgate_core::metrics::Registry::default();
    let backbone = meshgate_backbone::build(&config.backbone, "feed-slow", &registry)
        .await
        .unwrap();
    let filter = TopicFilter::parse("slow/#").unwrap();
    let mut slow = backbone
        .subscribe(filter.clone(), SubscribeOptions::default())
        .await
        .unwrap();
    let mut fast = backbone
        .subscribe(filter, SubscribeOptions::default())
        .await
        .unwrap();
    const N: usize = 300;
    let expected: Vec<String> = (0..N).map(|i| format!("e{i:03}")).collect();
    let reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        while ids.len() < N {
            let d = tokio::time::timeout(Duration::from_secs(10), fast.next())
                .await
                .expect("the fast subscription stalled")
                .unwrap();
            ids.push(d.event().id().to_owned());
        }
        ids
    });
    for id in &expected {
        backbone.publish(envelope("slow/x", id)).await.unwrap();
    }
    assert_eq!(
        reader.await.unwrap(),
        expected,
        "the fast one: all, in order"
    );
    // Only now does the slow one read: all of it, in order, none twice.
    let mut ids = Vec::new();
    while ids.len() < N {
        let d = tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .unwrap_or_else(|_| panic!("the slow subscription got only {}", ids.len()))
            .unwrap();
        ids.push(d.event().id().to_owned());
    }
    assert_eq!(
        ids, expected,
        "the slow one: all, in order, from the stream"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), slow.next())
            .await
            .is_err(),
        "nothing more"
    );
    // Two subscriptions, one consumer: the instance's.
    assert_eq!(consumers(&nats).await.len(), 1);
    backbone.close().await;
    backbone.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_cost_the_server_no_consumer_and_find_their_messages() {
    const DEVICES: usize = 40;
    let nats = NatsServer::start();
    let with_mqtt = |instance: &str| {
        let mut c = feed_config(&nats, instance);
        c.mqtt.enabled = true;
        c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
        c
    };
    let a = start_gateway(with_mqtt("feed-fleet-a")).await;
    let b = start_gateway(with_mqtt("feed-fleet-b")).await;
    let options = |i: usize, port: u16| {
        let mut o = rumqttc::MqttOptions::new(format!("dev-{i}"), "127.0.0.1", port);
        o.set_clean_session(false);
        o
    };
    // Every device subscribes to its own command topic on A, then goes away.
    for i in 0..DEVICES {
        let (client, mut el) =
            rumqttc::AsyncClient::new(options(i, a.mqtt_addr.unwrap().port()), 10);
        meshgate_tests::mqtt311::subscribe(&client, &mut el, &format!("dev/{i}/cmd")).await;
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
    }
    // Browsers on B, too.
    let mut browsers = Vec::new();
    for _ in 0..5 {
        browsers.push(ws_connect(b.web_addr.unwrap(), &["dev/+/cmd"]).await);
    }
    wait_metric(
        b.admin_addr.unwrap(),
        "meshgate_backbone_subscriptions{backbone=\"jetstream\"} 5",
    )
    .await;
    let names = consumers(&nats).await;
    assert_eq!(names.len(), 2, "one per instance: {names:?}");
    // A command for each device while it is away.
    for i in 0..DEVICES {
        post(
            b.web_addr.unwrap(),
            &format!("dev/{i}/cmd"),
            &format!("cmd-{i}"),
        )
        .await;
    }
    for ws in &mut browsers {
        for _ in 0..DEVICES {
            next_event(ws, Duration::from_secs(10)).await.unwrap();
        }
    }
    // Each device comes back on B: session present, its own command once.
    for i in 0..DEVICES {
        let (_client, mut el) =
            rumqttc::AsyncClient::new(options(i, b.mqtt_addr.unwrap().port()), 10);
        let mut session_present = None;
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match el.poll().await.unwrap() {
                    rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)) => {
                        session_present = Some(c.session_present);
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                        break String::from_utf8(p.payload.to_vec()).unwrap();
                    }
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("device {i} got nothing"));
        assert_eq!(session_present, Some(true), "device {i}");
        assert!(got.contains(&format!("cmd-{i}")), "device {i}: {got}");
        // Nothing else for it.
        let more = tokio::time::timeout(Duration::from_millis(100), async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                    el.poll().await.unwrap()
                {
                    break p;
                }
            }
        })
        .await;
        assert!(more.is_err(), "device {i} got more: {more:?}");
    }
    assert_eq!(consumers(&nats).await.len(), 2);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_feed_consumer_is_made_again_and_nothing_is_skipped() {
    let nats = NatsServer::start();
    let gw = start_gateway(feed_config(&nats, "feed-gone")).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let mut ws = ws_connect(web, &["gone/#"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"jetstream\"} 1",
    )
    .await;
    for i in 0..3 {
        post(web, "gone/x", &format!("e{i}")).await;
    }
    for i in 0..3 {
        let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
        assert_eq!(e.data().unwrap().to_bytes(), format!("e{i}").as_bytes());
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("MESHGATE").await.unwrap();
    let names = consumers(&nats).await;
    assert_eq!(names.len(), 1, "{names:?}");
    stream.delete_consumer(&names[0]).await.unwrap();
    // Stored while the instance has no consumer.
    for i in 3..8 {
        post(web, "gone/x", &format!("e{i}")).await;
    }
    for i in 3..8 {
        let e = next_event(&mut ws, Duration::from_secs(15)).await.unwrap();
        assert_eq!(
            e.data().unwrap().to_bytes(),
            format!("e{i}").as_bytes(),
            "after the repair, in order, none skipped"
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), ws.next())
            .await
            .is_err(),
        "nothing twice"
    );
    assert_eq!(consumers(&nats).await.len(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_persistent_session_on_a_full_stream_gets_only_what_came_after_it() {
    let nats = NatsServer::start();
    let mut config = feed_config(&nats, "feed-old");
    config.mqtt.enabled = true;
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    // Events stored before this instance started.
    let earlier = start_gateway(config.clone()).await;
    for i in 0..50 {
        post(earlier.web_addr.unwrap(), "old/x", &format!("old-{i}")).await;
    }
    earlier.shutdown().await;
    let gw = start_gateway(config).await;
    let port = gw.mqtt_addr.unwrap().port();
    let options = || {
        let mut o = rumqttc::MqttOptions::new("dev-old", "127.0.0.1", port);
        o.set_clean_session(false);
        o
    };
    let (client, mut el) = rumqttc::AsyncClient::new(options(), 10);
    meshgate_tests::mqtt311::subscribe(&client, &mut el, "old/#").await;
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
    post(gw.web_addr.unwrap(), "old/x", "new").await;
    let (_client, mut el) = rumqttc::AsyncClient::new(options(), 10);
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = el.poll().await.unwrap()
            {
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
    })
    .await;
    assert_eq!(got.len(), 1, "only what came after it subscribed: {got:?}");
    assert!(got[0].contains("new"), "{got:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsubscribed_filter_subscribed_again_does_not_get_what_came_meanwhile() {
    use rumqttc::v5::mqttbytes::QoS;
    let nats = NatsServer::start();
    let mut config = feed_config(&nats, "feed-unsub");
    config.mqtt.enabled = true;
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    let gw = start_gateway(config).await;
    let (web, port) = (gw.web_addr.unwrap(), gw.mqtt_addr.unwrap().port());
    let mut o = rumqttc::v5::MqttOptions::new("dev-unsub", "127.0.0.1", port);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use rumqttc::v5::mqttbytes::v5::Packet;
        while let Ok(e) = el.poll().await {
            match e {
                rumqttc::v5::Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(Some(String::from_utf8(p.payload.to_vec()).unwrap()));
                }
                rumqttc::v5::Event::Incoming(Packet::SubAck(_) | Packet::UnsubAck(_)) => {
                    let _ = tx.send(None);
                }
                _ => {}
            }
        }
    });
    client.subscribe("un/#", QoS::AtLeastOnce).await.unwrap();
    acked(&mut rx).await;
    post(web, "un/x", "first").await;
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(first.unwrap().contains("first"));
    client.unsubscribe("un/#").await.unwrap();
    acked(&mut rx).await;
    for i in 0..3 {
        post(web, "un/x", &format!("meanwhile-{i}")).await;
    }
    // Let the ended subscription's stream go and its cursor writes settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.subscribe("un/#", QoS::AtLeastOnce).await.unwrap();
    acked(&mut rx).await;
    post(web, "un/x", "after").await;
    let next = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        next.contains("after"),
        "what was published while unsubscribed came back: {next}"
    );
    gw.shutdown().await;
}

/// Waits for the next SUBACK or UNSUBACK (`None` on the channel).
async fn acked(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Option<String>>) {
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, None, "expected an acknowledgement, got {got:?}");
}
