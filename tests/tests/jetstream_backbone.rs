//! The JetStream backbone against a real nats-server (one per test, file store): ingress
//! acknowledged after the stream stored the event and deduplicated by source + id, nothing
//! acknowledged lost across a NATS restart, redelivery then dead-lettering of unacknowledged
//! deliveries.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use meshgate_config::BackboneKind;
use meshgate_config::JetStreamSubscriptions as Mode;
use meshgate_tests::nats::NatsServer;
use meshgate_tests::{
    Deadline, next_event, post_data, start_gateway, test_config, wait_metric, ws_connect,
};

/// Two tests of one body: `$each` with a consumer per subscription, `$feed` on the instance
/// feed (decision 0080).
macro_rules! in_both_modes {
    ($each:ident, $feed:ident, $body:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $each() {
            $body(Mode::ConsumerEach).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $feed() {
            $body(Mode::InstanceFeed).await;
        }
    };
}

/// The default mode (`instance_feed`); tests of what only consumers do pin `consumer_each`.
fn js_config(server: &NatsServer, instance: &str) -> meshgate_config::Config {
    js_config_in(Mode::InstanceFeed, server, instance)
}

/// How the gateway's subscriptions read the stream (decision 0080): the tests of delivery,
/// sessions and faults run with each.
fn js_config_in(mode: Mode, server: &NatsServer, instance: &str) -> meshgate_config::Config {
    let mut c = test_config();
    c.gateway.instance_id = Some(instance.into());
    c.backbone.kind = BackboneKind::JetStream;
    c.backbone.nats.urls = vec![server.url()];
    c.backbone.jetstream.subscriptions = mode;
    c
}

/// The value of `backbone.jetstream.subscriptions` for `mode`.
fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::ConsumerEach => "consumer_each",
        Mode::InstanceFeed => "instance_feed",
    }
}

async fn post(web: SocketAddr, topic: &str, id: &str) -> Result<reqwest::StatusCode, String> {
    reqwest::Client::new()
        .post(format!("http://{web}/events/{topic}"))
        .header("content-type", "application/cloudevents+json")
        .body(format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/test","type":"t"}}"#
        ))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map(|r| r.status())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_is_stored_once_per_source_and_id() {
    let nats = NatsServer::start();
    let gw = start_gateway(js_config(&nats, "js-dedup")).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let mut ws = ws_connect(web, &["orders/#"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"jetstream\"} 1",
    )
    .await;
    // The same event twice (a client retrying after a lost 202), and another one.
    assert_eq!(post(web, "orders/1", "same").await.unwrap(), 202);
    assert_eq!(post(web, "orders/1", "same").await.unwrap(), 202);
    assert_eq!(post(web, "orders/2", "other").await.unwrap(), 202);
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "same"
    );
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "other"
    );
    wait_metric(
        admin,
        "meshgate_backbone_dropped_total{backbone=\"jetstream\",reason=\"duplicate\"} 1",
    )
    .await;
    // The stream holds two events.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream = js.get_stream("MESHGATE").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    // Their ids are the documented digest, base64url(SHA-256("<source> <id>\0<principal>\0
    // <topic>")[..16]) (scoped by the publishing principal and topic, review F12), here
    // computed with Python's hashlib:
    // base64.urlsafe_b64encode(hashlib.sha256(b"/test same\x00anonymous\x00orders/1")
    //     .digest()[:16]).rstrip(b"=")
    let first = stream.get_raw_message(1).await.unwrap();
    assert_eq!(
        first
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned()),
        Some("WSnJAB4ETXa03cEDFeyYcA".to_owned())
    );
    // So another NATS program that publishes the same CloudEvent with that id (the event's
    // id as the anonymous principal published it on orders/2) is deduplicated against
    // meshgate's copy.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/cloudevents+json");
    headers.insert("Nats-Msg-Id", "zhvTciqGXOFwRx59F5Ccdw"); // "/test other", anonymous, orders/2
    let ack = js
        .publish_with_headers(
            "meshgate.orders.2",
            headers,
            r#"{"specversion":"1.0","id":"other","source":"/test","type":"t"}"#.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(ack.duplicate, "{ack:?}");
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    gw.shutdown().await;
}

/// An operator deletes a subscription's consumer (or its `inactive_threshold` removed it
/// during a long outage): the gateway creates it again from after the last event the
/// subscriber got, so the events stored meanwhile still arrive, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_whose_consumer_was_deleted_goes_on_where_it_was() {
    let nats = NatsServer::start();
    let gw = start_gateway(js_config_in(Mode::ConsumerEach, &nats, "js-gone")).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let mut ws = ws_connect(web, &["gone/#"]).await;
    // A subscriber that has received nothing when its consumers go.
    let mut quiet = ws_connect(web, &["quiet/x"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"jetstream\"} 2",
    )
    .await;
    for i in 0..3 {
        assert_eq!(post(web, "gone/x", &format!("e{i}")).await.unwrap(), 202);
    }
    for i in 0..3 {
        let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
        assert_eq!(e.id(), format!("e{i}"));
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("MESHGATE").await.unwrap();
    let names: Vec<String> = stream.consumer_names().map(|n| n.unwrap()).collect().await;
    // `gone/#` is two consumers (`meshgate.gone` and `meshgate.gone.>`), `quiet/x` one.
    assert_eq!(names.len(), 3, "{names:?}");
    for name in &names {
        stream.delete_consumer(name).await.unwrap();
    }
    // Stored while the subscription has no consumer.
    for i in 3..8 {
        assert_eq!(post(web, "gone/x", &format!("e{i}")).await.unwrap(), 202);
    }
    assert_eq!(post(web, "quiet/x", "q").await.unwrap(), 202);
    for i in 3..8 {
        let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            e.id(),
            format!("e{i}"),
            "after the repair, in order, none skipped"
        );
    }
    let q = next_event(&mut quiet, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(q.id(), "q");
    for ws in [&mut ws, &mut quiet] {
        assert!(
            tokio::time::timeout(Duration::from_millis(500), ws.next())
                .await
                .is_err(),
            "nothing twice"
        );
    }
    gw.shutdown().await;
}

in_both_modes!(
    no_acknowledged_event_is_lost_across_a_nats_restart,
    no_acknowledged_event_is_lost_across_a_nats_restart_on_the_instance_feed,
    no_acknowledged_event_is_lost_across_a_nats_restart_in
);

async fn no_acknowledged_event_is_lost_across_a_nats_restart_in(mode: Mode) {
    let mut nats = NatsServer::start();
    let gw = start_gateway(js_config_in(mode, &nats, "js-restart")).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let mut ws = ws_connect(web, &["jobs/#"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"jetstream\"} 1",
    )
    .await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        if i == 20 {
            nats.kill();
        }
        if i == 40 {
            nats.restart();
            // Let the client reconnect before the last third.
            let d = Deadline::after(Duration::from_secs(20));
            while reqwest::get(format!("http://{admin}/readyz"))
                .await
                .unwrap()
                .status()
                != 200
            {
                assert!(!d.passed(), "not ready after the NATS restart");
                d.pause().await;
            }
        }
        let id = format!("job-{i}");
        match post(web, "jobs/x", &id).await {
            Ok(s) if s == 202 => accepted.push(id),
            Ok(s) => {
                assert_eq!(s, 503, "refusals say: retry later");
                refused += 1;
            }
            Err(e) => panic!("request failed: {e}"),
        }
    }
    assert!(
        refused > 0,
        "events sent while NATS was down must be refused"
    );
    assert!(accepted.len() >= 40, "accepted {}", accepted.len());
    // Every acknowledged event arrives (at least once).
    let mut seen: HashMap<String, usize> = HashMap::new();
    let d = Deadline::after(Duration::from_secs(30));
    while accepted.iter().any(|id| !seen.contains_key(id)) {
        assert!(
            !d.passed(),
            "missing: {:?}",
            accepted
                .iter()
                .filter(|id| !seen.contains_key(*id))
                .collect::<Vec<_>>()
        );
        let e = next_event(&mut ws, Duration::from_secs(30)).await.unwrap();
        *seen.entry(e.id().to_owned()).or_default() += 1;
    }
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    println!(
        "accepted {}, refused {refused}, delivered {} distinct, {duplicates} duplicates",
        accepted.len(),
        seen.len()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_deliveries_are_redelivered_then_dead_lettered() {
    let nats = NatsServer::start();
    // A consumer per subscription redelivers; the instance feed does not (decision 0080).
    let mut config = js_config_in(Mode::ConsumerEach, &nats, "js-dead");
    config.backbone.jetstream.ack_wait = Duration::from_millis(500);
    config.backbone.jetstream.max_deliver = 2;
    config.mqtt.enabled = true;
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    let gw = start_gateway(config).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let watcher = async_nats::connect(nats.url()).await.unwrap();
    let mut dead = watcher.subscribe("meshgate-dead-letter").await.unwrap();
    watcher.flush().await.unwrap();
    // An MQTT 5 device that receives at QoS 1 and never acknowledges.
    let mqtt = gw.mqtt_addr.unwrap();
    let mut opts = rumqttc::v5::MqttOptions::new("never-acks", "127.0.0.1", mqtt.port());
    opts.set_manual_acks(true);
    let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = el.poll().await {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) = e
            {
                let _ = tx.send(p);
            }
        }
    });
    client
        .subscribe("alerts/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"jetstream\"} 1",
    )
    .await;
    assert_eq!(post(web, "alerts/fire", "a1").await.unwrap(), 202);
    // Delivered, not acknowledged, delivered again (max_deliver 2) ...
    for attempt in 1..=2 {
        let p = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("delivery {attempt} missing"))
            .unwrap();
        assert_eq!(&p.topic[..], b"alerts/fire");
    }
    // ... then republished to the dead-letter subject, with where it came from.
    let m = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .expect("dead letter")
        .unwrap();
    let h = m.headers.unwrap();
    assert_eq!(h.get("Meshgate-Dead-Stream").unwrap().as_str(), "MESHGATE");
    assert_eq!(
        h.get("Meshgate-Dead-Subject").unwrap().as_str(),
        "meshgate.alerts.fire"
    );
    let e = meshgate_core::json::decode(&m.payload).unwrap();
    assert_eq!(e.id(), "a1");
    wait_metric(
        admin,
        "meshgate_backbone_dropped_total{backbone=\"jetstream\",reason=\"max_deliveries\"} 1",
    )
    .await;
    gw.shutdown().await;
}

in_both_modes!(
    events_acknowledged_by_an_instance_killed_with_sigkill_still_arrive,
    events_acknowledged_by_an_instance_killed_with_sigkill_still_arrive_on_the_instance_feed,
    events_acknowledged_by_an_instance_killed_with_sigkill_still_arrive_in
);

async fn events_acknowledged_by_an_instance_killed_with_sigkill_still_arrive_in(mode: Mode) {
    let nats = NatsServer::start();
    let url = nats.url();
    // Instance A: the real binary, killed with SIGKILL mid-stream.
    let mut a = meshgate_tests::spawn(
        &[],
        &[
            ("MESHGATE__BACKBONE__KIND", "jetstream"),
            ("MESHGATE__BACKBONE__NATS__URLS", &url),
            ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__GATEWAY__INSTANCE_ID", "js-doomed"),
            (
                "MESHGATE__BACKBONE__JETSTREAM__SUBSCRIPTIONS",
                mode_name(mode),
            ),
        ],
    );
    // Instance B, with the subscriber.
    let b = start_gateway(js_config_in(mode, &nats, "js-survivor")).await;
    let mut ws = ws_connect(b.web_addr.unwrap(), &["ledger/#"]).await;
    wait_metric(
        b.admin_addr.unwrap(),
        "meshgate_backbone_subscriptions{backbone=\"jetstream\"} 1",
    )
    .await;
    let web_a = a.web.unwrap();
    // A client keeps publishing to A; A is killed while requests are in flight.
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let acc = accepted.clone();
    let publisher = tokio::spawn(async move {
        for i in 0.. {
            let id = format!("entry-{i}");
            match post(web_a, "ledger/x", &id).await {
                Ok(s) if s == 202 => acc.lock().unwrap().push(id),
                Ok(_) => {}
                Err(_) => break, // A is gone
            }
        }
    });
    let d = Deadline::after(Duration::from_secs(10));
    while accepted.lock().unwrap().len() < 25 {
        assert!(!d.passed(), "A accepted too little");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.child.kill().unwrap(); // SIGKILL, mid-stream
    a.child.wait().unwrap();
    let _ = publisher.await;
    let accepted = accepted.lock().unwrap().clone();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < accepted.len() {
        let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
        seen.insert(e.id().to_owned());
    }
    assert!(accepted.iter().all(|id| seen.contains(id)));
    b.shutdown().await;
}

in_both_modes!(
    mqtt_qos1_over_jetstream_is_pipelined_and_acknowledged_in_order,
    mqtt_qos1_over_jetstream_is_pipelined_and_acknowledged_in_order_on_the_instance_feed,
    mqtt_qos1_over_jetstream_is_pipelined_and_acknowledged_in_order_in
);

async fn mqtt_qos1_over_jetstream_is_pipelined_and_acknowledged_in_order_in(mode: Mode) {
    let nats = NatsServer::start();
    let mut config = js_config_in(mode, &nats, "js-mqtt");
    config.mqtt.enabled = true;
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.v311_outbound = meshgate_config::Mqtt311Mode::Data;
    config.backbone.jetstream.publish_connections = 3;
    let gw = start_gateway(config).await;
    let port = gw.mqtt_addr.unwrap().port();
    let client = |id: &str| {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_inflight(100);
        rumqttc::AsyncClient::new(o, 500)
    };
    let (sub, mut sub_el) = client("js-sub");
    sub.subscribe("seq/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = sub_el.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = e {
                let _ = got_tx.send(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
    });
    wait_metric(
        gw.admin_addr.unwrap(),
        "meshgate_backbone_subscriptions{backbone=\"jetstream\"} 1",
    )
    .await;
    // Two publishing MQTT connections at once, over several JetStream publishing connections:
    // each one's events still stored, acknowledged and delivered in its order.
    const N: usize = 300;
    let publish = |name: &'static str| {
        let (publ, mut pub_el) = client(name);
        async move {
            let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel();
            let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Ok(e) = pub_el.poll().await {
                    match e {
                        rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => {
                            let _ = sent_tx.send(pkid);
                        }
                        rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a)) => {
                            let _ = acked_tx.send(a.pkid);
                        }
                        _ => {}
                    }
                }
            });
            for i in 0..N {
                publ.publish(
                    "seq/x",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!("{name} {i}"),
                )
                .await
                .unwrap();
            }
            let mut sent = Vec::new();
            let mut acked = Vec::new();
            while acked.len() < N {
                let a = tokio::time::timeout(Duration::from_secs(10), acked_rx.recv())
                    .await
                    .expect("PUBACKs")
                    .unwrap();
                acked.push(a);
            }
            while let Ok(p) = sent_rx.try_recv() {
                sent.push(p);
            }
            assert_eq!(
                acked,
                sent[..N],
                "{name}: PUBACKs in the order of the PUBLISHes"
            );
        }
    };
    tokio::join!(publish("a"), publish("b"));
    let mut next = std::collections::HashMap::from([("a", 0), ("b", 0)]);
    for _ in 0..2 * N {
        let m = tokio::time::timeout(Duration::from_secs(10), got_rx.recv())
            .await
            .expect("deliveries")
            .unwrap();
        let (name, i) = m.split_once(' ').unwrap();
        let expected = next.get_mut(name).unwrap();
        assert_eq!(
            i,
            expected.to_string(),
            "{name}: delivered in publish order"
        );
        *expected += 1;
    }
    assert_eq!(next, std::collections::HashMap::from([("a", N), ("b", N)]));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_shared_by_the_instances() {
    let nats = NatsServer::start();
    let a = start_gateway(with_mqtt(js_config(&nats, "js-ret-a"))).await;
    let b = start_gateway(with_mqtt(js_config(&nats, "js-ret-b"))).await;
    let port = |gw: &meshgate::RunningGateway| gw.mqtt_addr.unwrap().port().to_string();
    let mosquitto = meshgate_tests::mosquitto_command;
    // Retained on A (QoS 1: acknowledged once stored).
    let status = mosquitto("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port(&a), "-q", "1", "-r"])
        .args(["-t", "site/door", "-m", "locked"])
        .status()
        .unwrap();
    assert!(status.success());
    // A new subscriber on B gets it, flagged as retained.
    let out = mosquitto("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port(&b), "-t", "site/#"])
        .args(["-C", "1", "-W", "5", "-F", "%t|%r|%p"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "site/door|1|locked"
    );
    // Cleared on B (empty retained payload): a later subscriber on A gets nothing.
    let status = mosquitto("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port(&b), "-q", "1", "-r", "-n"])
        .args(["-t", "site/door"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = mosquitto("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port(&a), "-t", "site/#"])
        .args(["-C", "1", "-W", "2", "-F", "%t|%r|%p"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "",
        "cleared for everyone"
    );
    b.shutdown().await;
    a.shutdown().await;
}

/// The environment of a `meshgate` child on the JetStream backbone at `url` with MQTT on free
/// ports, as instance `instance`.
fn js_mqtt_env_in<'a>(mode: Mode, url: &'a str, instance: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (
            "MESHGATE__BACKBONE__JETSTREAM__SUBSCRIPTIONS",
            mode_name(mode),
        ),
        ("MESHGATE__BACKBONE__KIND", "jetstream"),
        ("MESHGATE__BACKBONE__NATS__URLS", url),
        ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
        ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
        ("MESHGATE__MQTT__ENABLED", "true"),
        ("MESHGATE__MQTT__LISTEN", "127.0.0.1:0"),
        ("MESHGATE__GATEWAY__INSTANCE_ID", instance),
    ]
}

fn with_mqtt(mut c: meshgate_config::Config) -> meshgate_config::Config {
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.v311_outbound = meshgate_config::Mqtt311Mode::Data;
    c
}

/// Runs a mosquitto command-line client against `gw` and returns its standard output.
fn mosquitto(cmd: &str, gw: &meshgate::RunningGateway, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let port = gw.mqtt_addr.unwrap().port().to_string();
    let mut child = meshgate_tests::mosquitto_command(cmd)
        .args(["-h", "127.0.0.1", "-p", &port])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Publishes each line of `lines` at QoS 1 to `topic` through `gw` (mosquitto_pub).
fn publish_lines(gw: &meshgate::RunningGateway, topic: &str, lines: &str) {
    mosquitto("mosquitto_pub", gw, &["-q", "1", "-t", topic, "-l"], lines);
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(str::to_owned).collect();
    v.sort();
    v
}

in_both_modes!(
    persistent_mqtt_sessions_move_between_instances,
    persistent_mqtt_sessions_move_between_instances_on_the_instance_feed,
    persistent_mqtt_sessions_move_between_instances_in
);

async fn persistent_mqtt_sessions_move_between_instances_in(mode: Mode) {
    let nats = NatsServer::start();
    let a = start_gateway(with_mqtt(js_config_in(mode, &nats, "js-sess-a"))).await;
    let b = start_gateway(with_mqtt(js_config_in(mode, &nats, "js-sess-b"))).await;
    let messages: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    let lines = messages.join("\n") + "\n";

    // 3.1.1, clean session 0: subscribe on A and leave; 20 QoS 1 messages arrive through B
    // while the device is away; it reconnects to B and gets each of them once.
    let persistent = ["-c", "-i", "dev-311", "-q", "1", "-t", "cmd/#"];
    mosquitto(
        "mosquitto_sub",
        &a,
        &[&persistent[..], &["-E"]].concat(),
        "",
    );
    publish_lines(&b, "cmd/x", &lines);
    let got = mosquitto(
        "mosquitto_sub",
        &b,
        &[&persistent[..], &["-C", "20", "-W", "15"]].concat(),
        "",
    );
    assert_eq!(sorted_lines(&got), messages, "queued on A, delivered on B");
    // Back on A: the session moved again, with nothing left over.
    publish_lines(&b, "cmd/y", "after\n");
    let got = mosquitto(
        "mosquitto_sub",
        &a,
        &[&persistent[..], &["-C", "2", "-W", "3"]].concat(),
        "",
    );
    assert_eq!(got.trim(), "after", "one message, no repeats");

    // MQTT 5 with a session expiry: the session's holder (A) is gone when the device comes
    // back on B — what waited in JetStream is still delivered.
    let v5 = [
        "-V", "5", "-c", "-x", "600", "-i", "dev-5", "-q", "1", "-t", "tel/#",
    ];
    mosquitto("mosquitto_sub", &a, &[&v5[..], &["-E"]].concat(), "");
    publish_lines(&b, "tel/t", &lines);
    let c = start_gateway(with_mqtt(js_config_in(mode, &nats, "js-sess-c"))).await;
    a.shutdown().await;
    let got = mosquitto(
        "mosquitto_sub",
        &c,
        &[&v5[..], &["-C", "20", "-W", "15"]].concat(),
        "",
    );
    assert_eq!(
        sorted_lines(&got),
        messages,
        "delivered after its holder left"
    );

    // A clean start on another instance ends a session kept on B.
    let kept = ["-c", "-i", "dev-clean", "-q", "1", "-t", "job/#"];
    mosquitto("mosquitto_sub", &b, &[&kept[..], &["-E"]].concat(), "");
    publish_lines(&b, "job/1", "old\n");
    let got = mosquitto(
        "mosquitto_sub",
        &c,
        &[
            "-i",
            "dev-clean",
            "-q",
            "1",
            "-t",
            "job/#",
            "-C",
            "1",
            "-W",
            "2",
        ],
        "",
    );
    assert_eq!(
        got.trim(),
        "",
        "a clean session does not get the kept messages"
    );
    let got = mosquitto(
        "mosquitto_sub",
        &b,
        &[&kept[..], &["-C", "1", "-W", "2"]].concat(),
        "",
    );
    assert_eq!(got.trim(), "", "the kept session is gone");
    c.shutdown().await;
    b.shutdown().await;
}

/// The payload of the next PUBLISH the client receives within 5 s.
async fn next_payload(el: &mut rumqttc::EventLoop) -> Option<String> {
    let publish = async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = el.poll().await.ok()? {
                return Some(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), publish)
        .await
        .ok()
        .flatten()
}

in_both_modes!(
    a_connected_session_is_taken_over_from_another_instance,
    a_connected_session_is_taken_over_from_another_instance_on_the_instance_feed,
    a_connected_session_is_taken_over_from_another_instance_in
);

async fn a_connected_session_is_taken_over_from_another_instance_in(mode: Mode) {
    let nats = NatsServer::start();
    let a = start_gateway(with_mqtt(js_config_in(mode, &nats, "js-take-a"))).await;
    let b = start_gateway(with_mqtt(js_config_in(mode, &nats, "js-take-b"))).await;
    let options = |gw: &meshgate::RunningGateway| {
        let mut o =
            rumqttc::MqttOptions::new("dev-take", "127.0.0.1", gw.mqtt_addr.unwrap().port());
        o.set_clean_session(false);
        o
    };
    // Connected on A, subscribed.
    let (client_a, mut el_a) = rumqttc::AsyncClient::new(options(&a), 10);
    meshgate_tests::mqtt311::subscribe(&client_a, &mut el_a, "alarm/#").await;
    publish_lines(&b, "alarm/0", "smoke\n");
    let got = next_payload(&mut el_a).await;
    assert_eq!(got.as_deref(), Some("smoke"), "delivered on A first");
    // The same client id connects to B: A's connection is closed, B resumes the session.
    let (_client_b, mut el_b) = rumqttc::AsyncClient::new(options(&b), 10);
    let connack = loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)) = el_b.poll().await.unwrap() {
            break c;
        }
    };
    assert!(connack.session_present, "resumed the session held on A");
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if el_a.poll().await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "A closed the taken-over connection");
    // A message published through A reaches the device on B, through the resumed subscription.
    publish_lines(&a, "alarm/1", "fire\n");
    let got = next_payload(&mut el_b).await;
    assert_eq!(got.as_deref(), Some("fire"), "delivered on B");
    b.shutdown().await;
    a.shutdown().await;
}

in_both_modes!(
    a_session_survives_its_instance_killed_with_sigkill,
    a_session_survives_its_instance_killed_with_sigkill_on_the_instance_feed,
    a_session_survives_its_instance_killed_with_sigkill_in
);

async fn a_session_survives_its_instance_killed_with_sigkill_in(mode: Mode) {
    let nats = NatsServer::start();
    let url = nats.url();
    let mut env = js_mqtt_env_in(mode, &url, "js-kill-a");
    env.push(("MESHGATE__MQTT__V311_OUTBOUND", "data"));
    let a = meshgate_tests::spawn(&[], &env);
    let b = start_gateway(with_mqtt(js_config_in(mode, &nats, "js-kill-b"))).await;
    let options = |port: u16| {
        let mut o = rumqttc::MqttOptions::new("dev-kill", "127.0.0.1", port);
        o.set_clean_session(false);
        o
    };
    let publish = |what: &str| {
        publish_lines(&b, "sensor/t", what);
    };
    // Connected to A and subscribed; one message proves the subscription works.
    let (client, mut el) = rumqttc::AsyncClient::new(options(a.mqtt.unwrap().port()), 10);
    client
        .subscribe("sensor/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        let mut published = false;
        loop {
            match el.poll().await.unwrap() {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) if !published => {
                    published = true;
                    publish("first\n");
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    break String::from_utf8(p.payload.to_vec()).unwrap();
                }
                _ => {}
            }
        }
    })
    .await
    .expect("delivered through A");
    assert_eq!(first, "first");
    // Ten more while the device does not read (so it acknowledges none), then A dies.
    let messages: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    publish(&(messages.join("\n") + "\n"));
    let mut a = a;
    a.child.kill().unwrap(); // SIGKILL: no record saved, no release answered
    a.child.wait().unwrap();
    drop((client, el));
    // The device reconnects to B: session present, and each of the ten arrives.
    let (_client, mut el) = rumqttc::AsyncClient::new(options(b.mqtt_addr.unwrap().port()), 10);
    let mut seen = std::collections::BTreeSet::new();
    let mut session_present = None;
    tokio::time::timeout(Duration::from_secs(20), async {
        while seen.len() < messages.len() {
            match el.poll().await.unwrap() {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)) => {
                    session_present = Some(c.session_present);
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let m = String::from_utf8(p.payload.to_vec()).unwrap();
                    if m != "first" {
                        seen.insert(m);
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {seen:?} arrived on B"));
    assert_eq!(session_present, Some(true));
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), messages);
    b.shutdown().await;
}

in_both_modes!(
    a_session_written_by_someone_else_is_no_longer_held_here,
    a_session_written_by_someone_else_is_no_longer_held_here_on_the_instance_feed,
    a_session_written_by_someone_else_is_no_longer_held_here_in
);

async fn a_session_written_by_someone_else_is_no_longer_held_here_in(mode: Mode) {
    let nats = NatsServer::start();
    let a = start_gateway(with_mqtt(js_config_in(mode, &nats, "js-cas-a"))).await;
    let mut o = rumqttc::MqttOptions::new("dev-cas", "127.0.0.1", a.mqtt_addr.unwrap().port());
    o.set_clean_session(false);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 10);
    meshgate_tests::mqtt311::subscribe(&client, &mut el, "x/#").await;
    // Another writer (an instance that took the session without A's answer) updates the record.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let kv = js.get_key_value("MESHGATE_SESSIONS").await.unwrap();
    // "dev-cas" in unpadded base64url.
    let key = "ZGV2LWNhcw";
    assert!(kv.get(key).await.unwrap().is_some(), "A saved the session");
    kv.put(key, "{}".into()).await.unwrap();
    // A's next save finds a newer revision: it lets the connection go instead of overwriting.
    client
        .subscribe("y/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while el.poll().await.is_ok() {}
    })
    .await;
    assert!(closed.is_ok(), "the connection was closed");
    assert_eq!(
        kv.get(key).await.unwrap().as_deref(),
        Some(&b"{}"[..]),
        "A did not overwrite the other writer's record"
    );
    a.shutdown().await;
}

/// Over the server's `max_payload`: refused for good (422 naming the limit), not sent and not
/// answered "retry later" (503) as a publish that could succeed later; the connection serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_servers_max_payload_is_refused_naming_the_limit() {
    const MAX_PAYLOAD: usize = 4096;
    let nats = NatsServer::start_with_config(&format!("max_payload: {MAX_PAYLOAD}\n"));
    let gw = start_gateway(js_config(&nats, "js-max-payload")).await;
    let web = gw.web_addr.unwrap();
    let (status, body) = post_data(web, "big", "big", &"x".repeat(8 << 10)).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("max_payload") && body.contains(&MAX_PAYLOAD.to_string()),
        "the refusal names the limit: {body}"
    );
    let (status, body) = post_data(web, "big", "small", "hello").await;
    assert_eq!(status, 202, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_too_long_for_the_servers_protocol_line_are_refused_not_sent() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason};
    let nats = NatsServer::start_monitored();
    // With a consumer per subscription, whose creating request names the filter (the instance
    // feed creates none: a long filter is granted there).
    let mut c = js_config_in(Mode::ConsumerEach, &nats, "gw-long-keys");
    // Client ids this long are refused by default (mqtt.max_client_id_len = 256); this test is
    // about the session store's key limit.
    c.mqtt.max_client_id_len = 4096;
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    let gw = start_gateway(c).await;
    let (port, admin) = (gw.mqtt_addr.unwrap().port(), gw.admin_addr.unwrap());
    let client = |id: &str, clean: bool| {
        let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        o.set_max_packet_size(Some(1 << 20));
        o.set_clean_start(clean);
        if !clean {
            o.set_session_expiry_interval(Some(3600));
        }
        rumqttc::v5::AsyncClient::new(o, 10)
    };

    // A persistent session whose client id makes a session-store key too long: CONNACK
    // "client identifier not valid". With a clean session nothing is stored: connected.
    let long_id = "c".repeat(3000);
    let (_c, mut el) = client(&long_id, false);
    match el.poll().await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::ClientIdentifierNotValid);
        }
        other => panic!("{other:?}"),
    }
    let (clean, mut el) = client(&long_id, true);
    match el.poll().await {
        Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(c))) => {
            assert_eq!(c.code, ConnectReturnCode::Success);
        }
        other => panic!("{other:?}"),
    }

    // A filter whose consumer-creating request (the filter is in its subject) would be too
    // long: SUBACK "topic filter invalid".
    clean
        .subscribe(format!("f/{}/#", "w".repeat(3800)), QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(s)))) => {
                assert_eq!(
                    s.return_codes,
                    [rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::TopicFilterInvalid]
                );
                break;
            }
            Ok(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    drop(clean);

    // A retained message whose topic fits a subject but not the retained-message key
    // (base64, 4/3 as long): delivered, not retained, counted.
    let (publisher, mut el) = client("long-retained", true);
    let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = el.poll().await {
            if let rumqttc::v5::Event::Incoming(Packet::PubAck(a)) = e {
                let _ = acks_tx.send(a.reason);
            }
        }
    });
    let long = format!("r/{}", "z".repeat(3000));
    for (topic, payload) in [(long.as_str(), "long"), ("r/short", "short")] {
        publisher
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reason, PubAckReason::Success, "{payload}");
    }
    wait_metric(
        admin,
        "meshgate_errors_total{adapter=\"mqtt\",kind=\"retained_store\"} 1",
    )
    .await;
    // The short one was retained (the KV connection is fine): a new subscriber gets it alone.
    let (sub, mut el) = client("retained-reader", true);
    sub.subscribe("r/#", QoS::AtLeastOnce).await.unwrap();
    let mut retained = Vec::new();
    let d = Deadline::after(Duration::from_secs(2));
    while let Ok(Ok(e)) = tokio::time::timeout(d.remaining(), el.poll()).await {
        if let rumqttc::v5::Event::Incoming(Packet::Publish(p)) = e {
            retained.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    assert_eq!(retained, ["short"]);

    // Nothing made the server close a connection.
    assert_eq!(nats.closed_by_server().await, Vec::<String>::new());
    gw.shutdown().await;
}

/// Connects an MQTT 5 client with `clean_start = false` and the given session expiry; returns
/// the CONNACK's session-present flag and the client, subscribed to `cmd/#`.
async fn v5_session(
    port: u16,
    client_id: &str,
    expiry_secs: u32,
) -> (bool, rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(expiry_secs));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    client
        .subscribe("cmd/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut present = None;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await.unwrap() {
                rumqttc::v5::Event::Incoming(Packet::ConnAck(c)) => {
                    present = Some(c.session_present);
                }
                rumqttc::v5::Event::Incoming(Packet::SubAck(_)) => break,
                _ => {}
            }
        }
    })
    .await
    .expect("CONNACK and SUBACK");
    (present.expect("a CONNACK"), client, el)
}

in_both_modes!(
    sessions_connected_at_shutdown_are_saved_with_their_departure,
    sessions_connected_at_shutdown_are_saved_with_their_departure_on_the_instance_feed,
    sessions_connected_at_shutdown_are_saved_with_their_departure_in
);

/// Issue 27 (SIGTERM saves sessions): sessions still connected when their instance gets
/// SIGTERM are saved with their departure, without a warning per session; the JetStream
/// management connection (the KV stores) used to be drained before the sessions ended, and
/// each session's last store access failed with "cannot save the session". Their expiry runs
/// from the shutdown: after it a session is not resumed, within it it is, at once.
async fn sessions_connected_at_shutdown_are_saved_with_their_departure_in(mode: Mode) {
    let nats = NatsServer::start();
    let url = nats.url();
    // One file per mode: both modes' tests run at once in this process.
    let log_path = std::env::temp_dir().join(format!(
        "meshgate-js-term-{}-{}.log",
        mode_name(mode),
        std::process::id()
    ));
    let mut a = meshgate_tests::spawn_logging_to(
        &[],
        &js_mqtt_env_in(mode, &url, "js-term-a"),
        std::fs::File::create(&log_path).unwrap(),
    );
    let port = a.mqtt.unwrap().port();
    let (present, short, short_el) = v5_session(port, "dev-term-short", 1).await;
    assert!(!present, "a new session");
    let (_, long, long_el) = v5_session(port, "dev-term-long", 600).await;
    // The clients stay connected through SIGTERM (as devices do when a gateway restarts).
    a.signal("TERM");
    assert!(a.wait_exit(Duration::from_secs(15)).success());
    drop((short, short_el, long, long_el));
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        !log.contains("cannot save the session"),
        "SIGTERM saves sessions without a warning per session:\n{log}"
    );
    // Both records say when their connection left (the expiry runs from then).
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let kv = js.get_key_value("MESHGATE_SESSIONS").await.unwrap();
    // The client ids in unpadded base64url.
    for key in ["ZGV2LXRlcm0tc2hvcnQ", "ZGV2LXRlcm0tbG9uZw"] {
        let record = kv.get(key).await.unwrap().expect("a stored session");
        let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
        assert!(
            record["left_at_ms"].is_u64(),
            "saved with its departure at SIGTERM: {record}"
        );
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b = start_gateway(with_mqtt(js_config_in(mode, &nats, "js-term-b"))).await;
    let port = b.mqtt_addr.unwrap().port();
    let started = std::time::Instant::now();
    let (present, ..) = v5_session(port, "dev-term-short", 1).await;
    assert!(!present, "expired 1 s after the shutdown: not resumed");
    let (present, ..) = v5_session(port, "dev-term-long", 600).await;
    assert!(present, "within its expiry: resumed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "released at shutdown: no takeover wait for a holder that is gone ({:?})",
        started.elapsed()
    );
    b.shutdown().await;
}

in_both_modes!(
    shutdown_ends_at_once_when_every_delivery_was_acknowledged,
    shutdown_ends_at_once_when_every_delivery_was_acknowledged_on_the_instance_feed,
    shutdown_ends_at_once_when_every_delivery_was_acknowledged_in
);

/// Issue 19 (shutdown drain): an MQTT subscriber that got and acknowledged every event lets
/// the shutdown end at once: its subscriptions end when the backbone closes, and the
/// connection, with nothing left to deliver, closes (DISCONNECT 0x8B) instead of waiting out
/// the 5 s drain (the connection's loop used to stop watching its subscriptions when the last
/// one ended, and waited for the drain's timer).
async fn shutdown_ends_at_once_when_every_delivery_was_acknowledged_in(mode: Mode) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    let nats = NatsServer::start();
    let gw = start_gateway(with_mqtt(js_config_in(mode, &nats, "js-drain"))).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let opts =
        rumqttc::v5::MqttOptions::new("drain-sub", "127.0.0.1", gw.mqtt_addr.unwrap().port());
    let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    client
        .subscribe("drain/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(Packet::Publish(_))) => {
                    let _ = tx.send(None);
                }
                Ok(_) => {}
                // rumqttc reports the server's DISCONNECT as an error (src/v5/state.rs:298).
                Err(e) => {
                    let _ = tx.send(Some(e.to_string()));
                    return;
                }
            }
        }
    });
    // Two subjects (`drain/#` is `p.drain` and `p.drain.>`), so two pull consumers.
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"jetstream\"} 1",
    )
    .await;
    for i in 0..20 {
        assert_eq!(
            post(web, &format!("drain/{i}"), &format!("d{i}"))
                .await
                .unwrap(),
            202
        );
    }
    for _ in 0..20 {
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("every event delivered")
            .unwrap();
        assert_eq!(got, None, "an event, not the end");
    }
    // (rumqttc acknowledges each PUBLISH as it reads it.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let report = gw.shutdown().await;
    let took = started.elapsed();
    assert!(report.clean, "a clean shutdown");
    assert!(
        took < Duration::from_secs(2),
        "nothing left to deliver: the shutdown ends at once, not after the 5 s drain ({took:?})"
    );
    let end = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
    let end = end.expect("the connection ended").unwrap().unwrap();
    assert!(
        end.contains("ServerShuttingDown"),
        "the client was told the server is shutting down: {end}"
    );
}

/// What a stored stream holds: how often each event id is stored (read message by message).
async fn stored_ids(nats: &NatsServer) -> HashMap<String, usize> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream = js.get_stream("MESHGATE").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut ids: HashMap<String, usize> = HashMap::new();
    for seq in 1..=last {
        // (A sequence may be missing: deleted, or skipped by the store.)
        if let Ok(m) = stream.get_raw_message(seq).await {
            let e = meshgate_core::json::decode(&m.payload).unwrap();
            *ids.entry(e.id().to_owned()).or_default() += 1;
        }
    }
    ids
}

/// Issue 19 item 3 ("every acknowledgement is a promise"): around a NATS restart, every
/// publish is answered — 202, or 503 and the client retries — and fast: those waiting for
/// their PubAck when the connection drops are refused then, not when
/// `backbone.jetstream.publish_timeout` runs out (before: every one of them waited the whole
/// 5 s). Counted: published (attempts), acknowledged, refused, stored, lost (acknowledged and
/// not stored: must be 0), duplicates (stored twice: 0, as retries carry the same id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_is_answered_within_the_bound_across_a_nats_restart() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut nats = NatsServer::start();
    let mut config = js_config(&nats, "js-answer");
    let timeout = Duration::from_secs(4);
    config.backbone.jetstream.publish_timeout = timeout;
    let gw = start_gateway(config).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::new();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (stop, http) = (stop.clone(), http.clone());
        tasks.push(tokio::spawn(async move {
            // (acknowledged ids, attempts, refusals, slowest answer)
            let (mut acked, mut attempts, mut refused) = (Vec::new(), 0u64, 0u64);
            let mut slowest = Duration::ZERO;
            for n in 0.. {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let id = format!("a{t}-{n}");
                // The same event again until it is acknowledged, as a client retries.
                loop {
                    attempts += 1;
                    let started = std::time::Instant::now();
                    let status = http
                        .post(format!("http://{web}/events/answer/{t}"))
                        .header("content-type", "application/cloudevents+json")
                        .body(format!(
                            r#"{{"specversion":"1.0","id":"{id}","source":"/test","type":"t"}}"#
                        ))
                        .timeout(Duration::from_secs(20))
                        .send()
                        .await
                        .expect("every publish is answered")
                        .status();
                    slowest = slowest.max(started.elapsed());
                    if status == 202 {
                        acked.push(id);
                        break;
                    }
                    assert_eq!(status, 503, "a refusal says: retry later");
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            (acked, attempts, refused, slowest)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| nats.kill());
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| nats.restart());
    let restarted = std::time::Instant::now();
    let d = Deadline::after(Duration::from_secs(20));
    while reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(!d.passed(), "not ready after the NATS restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready_after = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    let (mut acked, mut attempts, mut refused, mut slowest) = (Vec::new(), 0, 0, Duration::ZERO);
    for t in tasks {
        let (a, n, r, s) = t.await.unwrap();
        acked.extend(a);
        attempts += n;
        refused += r;
        slowest = slowest.max(s);
    }
    let stored = stored_ids(&nats).await;
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .collect();
    let duplicates: usize = stored.values().map(|c| c - 1).sum();
    println!(
        "published {attempts} (attempts), acknowledged {}, refused {refused}, stored {} \
         distinct, lost {}, duplicates {duplicates}; slowest answer {slowest:?}; ready {:?} \
         after the restart",
        acked.len(),
        stored.len(),
        lost.len(),
        ready_after
    );
    assert!(refused > 0, "publishes during the outage are refused");
    assert!(lost.is_empty(), "acknowledged and not stored: {lost:?}");
    assert_eq!(duplicates, 0, "retries carry the same id: stored once");
    assert!(
        slowest < Duration::from_millis(1500),
        "every publish answered at once when the connection dropped, not after the {timeout:?} \
         publish_timeout: slowest {slowest:?}"
    );
    gw.shutdown().await;
}

/// More connected persistent sessions than `mqtt.max_offline_sessions` at SIGTERM: each one
/// stays in the session store (those past the limit used to be deleted as the gateway stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_session_past_the_offline_limit() {
    const DEVICES: usize = 6;
    let nats = NatsServer::start();
    let mut config = with_mqtt(js_config(&nats, "js-many"));
    config.mqtt.max_offline_sessions = 2;
    let gw = start_gateway(config.clone()).await;
    let options = |i: usize, port: u16| {
        let mut o = rumqttc::MqttOptions::new(format!("many-{i}"), "127.0.0.1", port);
        o.set_clean_session(false);
        o
    };
    let mut connected = Vec::new();
    for i in 0..DEVICES {
        let (client, mut el) =
            rumqttc::AsyncClient::new(options(i, gw.mqtt_addr.unwrap().port()), 10);
        meshgate_tests::mqtt311::subscribe(&client, &mut el, &format!("many/{i}")).await;
        // Still connected when the gateway stops.
        connected.push(tokio::spawn(async move {
            let _client = client;
            while el.poll().await.is_ok() {}
        }));
    }
    gw.shutdown().await;
    let gw = start_gateway(config).await;
    for i in 0..DEVICES {
        let (_client, mut el) =
            rumqttc::AsyncClient::new(options(i, gw.mqtt_addr.unwrap().port()), 10);
        let present = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)) =
                    el.poll().await.unwrap()
                {
                    break c.session_present;
                }
            }
        })
        .await
        .unwrap();
        assert!(present, "session many-{i} was lost at the restart");
    }
    for c in connected {
        c.abort();
    }
    gw.shutdown().await;
}

/// Review F12: deduplication is per user and topic, so one user cannot suppress another's
/// event by publishing its `source` and `id` first (the other is stored and delivered), while
/// each user's own retry is still stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_suppress_another_users_event_by_its_id() {
    let nats = NatsServer::start();
    let mut c = js_config(&nats, "a");
    c.auth.anonymous.enabled = false;
    let user = |name: &str, topics: &str| {
        meshgate_tests::token_user(name, vec![topics.into()], vec![topics.into()])
    };
    c.auth.users = vec![user("alice", "a/#"), user("bob", "b/#")];
    let gw = start_gateway(c).await;
    let web = gw.web_addr.unwrap();
    let mut bobs = meshgate_tests::bus_subscribe(&gw, "b/#").await;
    let send = |who: &'static str, topic: &'static str| async move {
        reqwest::Client::new()
            .post(format!("http://{web}/events/{topic}"))
            .header("authorization", format!("Bearer {who}-token-0123456789"))
            .header("content-type", "application/cloudevents+json")
            .body(r#"{"specversion":"1.0","id":"42","source":"/sensor/B","type":"t"}"#)
            .send()
            .await
            .unwrap()
            .status()
    };
    // Alice first, on her own topic, with Bob's sensor's source and id.
    assert_eq!(send("alice", "a/x").await, 202);
    assert_eq!(send("bob", "b/x").await, 202);
    let d = meshgate_tests::next_delivery(&mut bobs, Duration::from_secs(10), "Bob's event").await;
    assert_eq!(d.event().id(), "42");
    // Bob's retry of the same event is still stored once.
    assert_eq!(send("bob", "b/x").await, 202);
    assert!(
        tokio::time::timeout(Duration::from_millis(700), bobs.next())
            .await
            .is_err(),
        "a user's retry is deduplicated"
    );
    gw.shutdown().await;
}
