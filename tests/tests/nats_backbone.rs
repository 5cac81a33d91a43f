//! The NATS core backbone against a real nats-server (one per test): several gateway instances
//! on one bus, every event counted; the wire format seen by other NATS programs; a NATS restart.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use meshgate_config::{BackboneKind, NatsWireMode};
use support::nats::NatsServer;
use support::{
    Deadline, Ws, metrics, next_event, start_gateway, test_config, wait_metric, ws_connect,
};

fn nats_config(server: &NatsServer, instance: &str) -> meshgate_config::Config {
    let mut c = test_config();
    c.gateway.instance_id = Some(instance.into());
    c.backbone.kind = BackboneKind::Nats;
    c.backbone.nats.urls = vec![server.url()];
    c.backbone.nats.connect_timeout = Duration::from_secs(5);
    c
}

async fn post(web: SocketAddr, topic: &str, id: &str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .post(format!("http://{web}/events/{topic}"))
        .header("content-type", "application/cloudevents+json")
        .body(format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/test","type":"t","n":1}}"#
        ))
        .send()
        .await
        .unwrap()
        .status()
}

/// Reads events until `n` arrived, then checks for silence; returns the count per id.
async fn collect(ws: &mut Ws, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let e = next_event(ws, Duration::from_secs(10)).await.unwrap();
        *seen.entry(e.id().to_owned()).or_default() += 1;
    }
    // Nothing more: no duplicates arriving late.
    if let Ok(Some(Ok(extra))) = tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
        panic!("unexpected extra message: {extra:?}");
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_any_instance_reach_every_subscriber_exactly_once() {
    let nats = NatsServer::start();
    let a = start_gateway(nats_config(&nats, "gw-a")).await;
    let b = start_gateway(nats_config(&nats, "gw-b")).await;
    let mut on_a = ws_connect(a.web_addr.unwrap(), &["orders/#"]).await;
    let mut on_b = ws_connect(b.web_addr.unwrap(), &["orders/#"]).await;
    for gw in [&a, &b] {
        wait_metric(
            gw.admin_addr.unwrap(),
            "meshgate_backbone_subscriptions{backbone=\"nats\"} 1",
        )
        .await;
    }
    assert!(
        metrics(a.admin_addr.unwrap())
            .await
            .contains("meshgate_backbone_subscriptions{backbone=\"nats\"} 1")
    );
    const EACH: usize = 25;
    for i in 0..EACH {
        assert_eq!(
            post(a.web_addr.unwrap(), "orders/a", &format!("a{i}")).await,
            202
        );
        assert_eq!(
            post(b.web_addr.unwrap(), "orders/b", &format!("b{i}")).await,
            202
        );
    }
    for (name, ws) in [
        ("subscriber on A", &mut on_a),
        ("subscriber on B", &mut on_b),
    ] {
        let seen = collect(ws, 2 * EACH).await;
        assert_eq!(
            seen.len(),
            2 * EACH,
            "{name}: every event, from both instances"
        );
        assert!(
            seen.values().all(|&c| c == 1),
            "{name}: duplicates {seen:?}"
        );
    }
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_nats_programs_read_and_write_cloudevents_on_the_bus() {
    let nats = NatsServer::start();
    let mut config = nats_config(&nats, "gw-wire");
    config.backbone.nats.wire_mode = NatsWireMode::Binary;
    let gw = start_gateway(config).await;
    let admin = gw.admin_addr.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut tap = client.subscribe("meshgate.>").await.unwrap();
    client.flush().await.unwrap();
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["ext/#"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"nats\"} 1",
    )
    .await;

    // meshgate → NATS in binary mode: attributes as ce- headers, types as strings.
    assert_eq!(post(gw.web_addr.unwrap(), "ext/out.1", "o1").await, 202);
    let m = tokio::time::timeout(Duration::from_secs(5), tap.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.subject.as_str(), "meshgate.ext.out%2E1");
    let h = m.headers.clone().unwrap();
    assert_eq!(h.get("ce-id").unwrap().as_str(), "o1");
    assert_eq!(h.get("ce-n").unwrap().as_str(), "1");
    assert!(
        h.get("Meshgate-Origin")
            .unwrap()
            .as_str()
            .ends_with("@gw-wire")
    );
    // The WebSocket subscriber got it too (through NATS).
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "o1"
    );

    // NATS → meshgate: a structured event without headers (sdk-rust style), a binary one, and
    // garbage, which is skipped and counted.
    client
        .publish(
            "meshgate.ext.in",
            r#"{"specversion":"1.0","id":"s1","source":"/other","type":"t","count":3}"#.into(),
        )
        .await
        .unwrap();
    client
        .publish("meshgate.ext.in", "not an event".into())
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "b1"),
        ("ce-source", "/other"),
        ("ce-type", "t"),
        ("ce-subject", "caf%C3%A9"),
        ("Content-Type", "text/plain"),
    ] {
        headers.insert(k, v);
    }
    client
        .publish_with_headers("meshgate.ext.in", headers, "hello".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let s1 = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(s1.id(), "s1");
    assert_eq!(
        s1.extension("count"),
        Some(&meshgate_core::ExtensionValue::Integer(3)),
        "structured keeps the Integer type"
    );
    let b1 = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(b1.id(), "b1");
    assert_eq!(b1.subject(), Some("café"));
    assert_eq!(b1.datacontenttype(), Some("text/plain"));
    assert_eq!(b1.data().unwrap().to_bytes(), &b"hello"[..]);
    wait_metric(
        admin,
        "meshgate_backbone_dropped_total{backbone=\"nats\",reason=\"malformed\"} 1",
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_is_reported_refused_then_recovered() {
    let mut nats = NatsServer::start();
    let gw = start_gateway(nats_config(&nats, "gw-restart")).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let ready = || async move {
        reqwest::get(format!("http://{admin}/readyz"))
            .await
            .unwrap()
            .status()
    };
    assert_eq!(ready().await, 200);
    let mut ws = ws_connect(web, &["jobs/#"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"nats\"} 1",
    )
    .await;
    assert_eq!(post(web, "jobs/1", "before").await, 202);
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "before"
    );

    nats.kill();
    let d = Deadline::after(Duration::from_secs(10));
    while ready().await != 503 {
        assert!(!d.passed(), "/readyz still 200 with NATS down");
        d.pause().await;
    }
    // Not acknowledged while the event cannot be forwarded.
    let refused = post(web, "jobs/1", "during").await;
    assert_eq!(refused, 503);

    nats.restart();
    let d = Deadline::after(Duration::from_secs(20));
    while ready().await != 200 {
        assert!(!d.passed(), "/readyz not back to 200 after NATS came back");
        d.pause().await;
    }
    // The client re-subscribed: the old WebSocket subscription works again. Publish until one
    // arrives (the re-subscription reaches the server right after the reconnect).
    let d = Deadline::after(Duration::from_secs(10));
    let mut n = 0;
    loop {
        n += 1;
        assert_eq!(post(web, "jobs/1", &format!("after{n}")).await, 202);
        if let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            break;
        }
        assert!(!d.passed(), "no event after the NATS restart");
    }
    gw.shutdown().await;
}

fn with_mqtt(mut c: meshgate_config::Config) -> meshgate_config::Config {
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_shared_subscriptions_are_shared_across_instances() {
    let nats = NatsServer::start();
    let a = start_gateway(with_mqtt(nats_config(&nats, "gw-ma"))).await;
    let b = start_gateway(with_mqtt(nats_config(&nats, "gw-mb"))).await;
    let sub = |gw: &meshgate::RunningGateway| {
        support::mosquitto_command("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &gw.mqtt_addr.unwrap().port().to_string(),
            ])
            .args(["-V", "mqttv5", "-q", "1", "-t", "$share/workers/jobs/#"])
            .args(["-W", "4", "-F", "%t|%p"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // An ordinary subscriber on B sees everything, once.
    let watcher = support::mosquitto_command("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &b.mqtt_addr.unwrap().port().to_string(),
        ])
        .args([
            "-V", "mqttv311", "-q", "1", "-t", "jobs/#", "-W", "4", "-F", "%t",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (sub_a, sub_b) = (sub(&a), sub(&b));
    wait_metric(
        a.admin_addr.unwrap(),
        "meshgate_backbone_subscriptions{backbone=\"nats\"} 1",
    )
    .await;
    wait_metric(
        b.admin_addr.unwrap(),
        "meshgate_backbone_subscriptions{backbone=\"nats\"} 2",
    )
    .await;
    const N: usize = 30;
    let port = a.mqtt_addr.unwrap().port().to_string();
    for i in 0..N {
        let status = support::mosquitto_command("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1"])
            .args(["-t", &format!("jobs/{i}"), "-m", &format!("job-{i}")])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let lines = |c: std::process::Child| {
        String::from_utf8(c.wait_with_output().unwrap().stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (got_a, got_b, watched) = (lines(sub_a), lines(sub_b), lines(watcher));
    let mut all: Vec<_> = got_a.iter().chain(&got_b).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(
        got_a.len() + got_b.len(),
        N,
        "each job to exactly one member: A {got_a:?} B {got_b:?}"
    );
    assert_eq!(all.len(), N, "no job twice");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both instances' members got work: A {} B {}",
        got_a.len(),
        got_b.len()
    );
    assert_eq!(
        watched.len(),
        N,
        "the ordinary subscriber on B: {watched:?}"
    );
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_do_not_match_dollar_topics_over_nats() {
    let nats = NatsServer::start();
    let gw = start_gateway(nats_config(&nats, "gw-dollar")).await;
    let mut all = ws_connect(gw.web_addr.unwrap(), &["#"]).await;
    let mut sys = ws_connect(gw.web_addr.unwrap(), &["$SYS/#"]).await;
    wait_metric(
        gw.admin_addr.unwrap(),
        "meshgate_backbone_subscriptions{backbone=\"nats\"} 2",
    )
    .await;
    // Clients may not publish to `$` topics (the ACL `#` does not cover them either), so the
    // `$` event comes from another NATS program.
    assert_eq!(post(gw.web_addr.unwrap(), "$SYS/load", "x").await, 403);
    let client = async_nats::connect(nats.url()).await.unwrap();
    let subject = meshgate_core::Topic::from_mqtt("$SYS/load")
        .unwrap()
        .to_nats_subject("meshgate");
    client
        .publish(
            subject,
            r#"{"specversion":"1.0","id":"d1","source":"/broker","type":"t"}"#.into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    assert_eq!(post(gw.web_addr.unwrap(), "plain", "p1").await, 202);
    // `#` gets the plain topic only (MQTT 5 §4.7.2), `$SYS/#` the `$` one.
    assert_eq!(
        next_event(&mut all, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "p1"
    );
    assert_eq!(
        next_event(&mut sys, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "d1"
    );
    if let Ok(Some(Ok(extra))) = tokio::time::timeout(Duration::from_millis(300), all.next()).await
    {
        panic!("`#` received more: {extra:?}");
    }
    gw.shutdown().await;
}
