//! The NATS core backbone against a real nats-server (one per test): several gateway instances
//! on one bus, every event counted; the wire format seen by other NATS programs; a NATS restart;
//! credentials from the config; the server's max_payload; NATS and WebSocket subscribers of one
//! gateway getting each event once.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use meshgate_config::{BackboneKind, NatsWireMode};
use meshgate_tests::nats::NatsServer;
use meshgate_tests::{
    Deadline, Ws, metrics, next_event, post_data, start_gateway, test_config, wait_metric,
    ws_connect,
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
        meshgate_tests::mosquitto_command("mosquitto_sub")
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
    let watcher = meshgate_tests::mosquitto_command("mosquitto_sub")
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
        let status = meshgate_tests::mosquitto_command("mosquitto_pub")
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
    let mut config = nats_config(&nats, "gw-dollar");
    // ACL `#` does not grant `$` topics (review F16): the `$SYS/#` subscriber needs its own rule.
    config.auth.anonymous.acl.subscribe.push("$SYS/#".into());
    let gw = start_gateway(config).await;
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

/// `/readyz` on the admin listener.
async fn ready(admin: SocketAddr) -> reqwest::StatusCode {
    reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap()
        .status()
}

/// The `id` of a structured CloudEvent received by a plain NATS client.
fn nats_event_id(m: &async_nats::Message) -> String {
    let v: serde_json::Value = serde_json::from_slice(&m.payload)
        .unwrap_or_else(|e| panic!("not a structured CloudEvent ({e}): {m:?}"));
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {v}"))
        .to_owned()
}

/// The next message of a plain NATS subscription, within 5 s.
async fn next_nats(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a NATS message within 5 s")
        .expect("the NATS subscription is open")
}

/// How the gateway (`backbone.nats.*`) and a plain client authenticate to nats-server.
#[derive(Debug, Clone, Copy)]
enum Credentials<'a> {
    UserPassword(&'a str, &'a str),
    Token(&'a str),
}

impl Credentials<'_> {
    fn configure(self, mut c: meshgate_config::Config) -> meshgate_config::Config {
        match self {
            Credentials::UserPassword(user, password) => {
                c.backbone.nats.user = Some(user.into());
                c.backbone.nats.password = Some(password.into());
            }
            Credentials::Token(token) => c.backbone.nats.token = Some(token.into()),
        }
        c
    }

    async fn client(self, nats: &NatsServer) -> async_nats::Client {
        let options = match self {
            Credentials::UserPassword(user, password) => {
                async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
            }
            Credentials::Token(token) => async_nats::ConnectOptions::with_token(token.into()),
        };
        options.connect(nats.url()).await.unwrap()
    }
}

/// A gateway with `right` credentials is ready and its events reach a WebSocket subscriber and
/// a plain NATS subscriber; one with `wrong` credentials stays not ready and refuses publishes.
async fn check_credentials(nats: &NatsServer, right: Credentials<'_>, wrong: Credentials<'_>) {
    let mut bad_config = wrong.configure(nats_config(nats, "gw-wrong-credentials"));
    // Start-up waits this long for a first connection that never comes.
    bad_config.backbone.nats.connect_timeout = Duration::from_secs(1);
    let (good, bad) = tokio::join!(
        start_gateway(right.configure(nats_config(nats, "gw-credentials"))),
        start_gateway(bad_config),
    );
    let (web, admin) = (good.web_addr.unwrap(), good.admin_addr.unwrap());
    assert_eq!(ready(admin).await, 200, "{right:?}: connected, so ready");

    let client = right.client(nats).await;
    let mut tap = client.subscribe("meshgate.>").await.unwrap();
    client.flush().await.unwrap();
    let mut ws = ws_connect(web, &["secured/#"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"nats\"} 1",
    )
    .await;
    assert_eq!(post(web, "secured/a", "authenticated").await, 202);
    let m = next_nats(&mut tap).await;
    assert_eq!(m.subject.as_str(), "meshgate.secured.a");
    assert_eq!(nats_event_id(&m), "authenticated");
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "authenticated"
    );

    // Wrong credentials: the server refuses every attempt (the client retries every 50 ms,
    // 100 ms, 200 ms ... meanwhile); not ready, and a publish is refused rather than
    // acknowledged.
    let (bad_web, bad_admin) = (bad.web_addr.unwrap(), bad.admin_addr.unwrap());
    let d = Deadline::after(Duration::from_millis(1500));
    while !d.passed() {
        assert_eq!(
            ready(bad_admin).await,
            503,
            "{wrong:?}: the server refuses them, so not ready"
        );
        d.pause().await;
    }
    let (status, body) = post_data(bad_web, "secured/a", "refused", "x").await;
    assert_eq!(status, 503, "{wrong:?}: {body}");
    assert!(body.contains("not connected"), "{wrong:?}: {body}");
    assert_eq!(ready(bad_admin).await, 503);
    // The right one is unaffected, and nothing of the refused event went anywhere.
    assert_eq!(ready(admin).await, 200);
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), tap.next()).await {
        panic!("unexpected message on NATS: {m:?}");
    }
    // (A WebSocket left open makes the shutdown wait for its close handshake.)
    drop(ws);
    bad.shutdown().await;
    good.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_config_are_used_and_wrong_ones_leave_the_gateway_not_ready() {
    let nats = NatsServer::start_with(&["--user", "mg", "--pass", "s3cret"]);
    check_credentials(
        &nats,
        Credentials::UserPassword("mg", "s3cret"),
        Credentials::UserPassword("mg", "wrong"),
    )
    .await;
    drop(nats);

    let nats = NatsServer::start_with(&["--auth", "t0ken-of-the-bus"]);
    check_credentials(
        &nats,
        Credentials::Token("t0ken-of-the-bus"),
        Credentials::Token("not-the-token"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_servers_max_payload_is_refused_with_a_clear_error() {
    const MAX_PAYLOAD: usize = 4096;
    let nats = NatsServer::start_with_config(&format!("max_payload: {MAX_PAYLOAD}\n"));
    let gw = start_gateway(nats_config(&nats, "gw-max-payload")).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut tap = client.subscribe("meshgate.>").await.unwrap();
    client.flush().await.unwrap();
    let mut ws = ws_connect(web, &["big/#"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"nats\"} 1",
    )
    .await;

    // 8 KiB of data: refused by the gateway (BackboneError::Rejected → 422), not sent to a
    // server that would close the connection over it.
    let (status, body) = post_data(web, "big/1", "big", &"x".repeat(8 << 10)).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("max_payload") && body.contains(&MAX_PAYLOAD.to_string()),
        "the refusal names the limit: {body}"
    );

    // Still connected and serving; the refused event went nowhere, the next one everywhere.
    assert_eq!(ready(admin).await, 200);
    let (status, body) = post_data(web, "big/1", "small", "hello").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(nats_event_id(&next_nats(&mut tap).await), "small");
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "small"
    );

    // The limit is the server's, headers included: bisect the data length to the largest
    // accepted event. Every accepted one must have reached the server (which would have closed
    // the connection over a message past its limit instead), and the largest is exactly
    // max_payload bytes of headers and payload as the server counts them.
    let (mut accepted, mut refused) = (0usize, 8usize << 10);
    let mut largest = None;
    let mut n = 0;
    while refused - accepted > 1 {
        let len = (accepted + refused) / 2;
        n += 1;
        let id = format!("p{n:03}"); // the same length every time
        let (status, body) = post_data(web, "big/1", &id, &"y".repeat(len)).await;
        match status.as_u16() {
            202 => {
                accepted = len;
                let m = tokio::time::timeout(Duration::from_secs(5), tap.next())
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| {
                        panic!(
                            "the event of {len} data bytes was accepted (202) but never reached \
                             NATS: sent past the server's max_payload, which closes the connection?"
                        )
                    });
                assert_eq!(
                    nats_event_id(&m),
                    id,
                    "the accepted event of {len} data bytes reached NATS"
                );
                largest = Some(m.length - m.subject.len());
                assert_eq!(
                    next_event(&mut ws, Duration::from_secs(5))
                        .await
                        .unwrap()
                        .id(),
                    id
                );
            }
            422 => {
                refused = len;
                assert!(body.contains("max_payload"), "{body}");
            }
            other => panic!("{len} data bytes: {other} {body}"),
        }
    }
    assert_eq!(
        largest,
        Some(MAX_PAYLOAD),
        "the largest accepted message ({accepted} data bytes), headers and payload"
    );
    assert_eq!(ready(admin).await, 200);
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), tap.next()).await {
        panic!("unexpected message on NATS: {m:?}");
    }
    drop(ws);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_and_websocket_subscribers_of_one_gateway_each_get_every_event_once() {
    let nats = NatsServer::start();
    let gw = start_gateway(nats_config(&nats, "gw-once")).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    // The subjects the gateway subscribes to for `orders/#`; an event matches one of them.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let exact = client.subscribe("meshgate.orders").await.unwrap();
    let below = client.subscribe("meshgate.orders.>").await.unwrap();
    client.flush().await.unwrap();
    let mut tap = futures_util::stream::select(exact, below);
    let mut all = ws_connect(web, &["orders/#"]).await;
    let mut some = ws_connect(web, &["orders/x/+"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"nats\"} 2",
    )
    .await;

    const N: usize = 20;
    for i in 0..N {
        // Even ones on `orders` itself, odd ones below it.
        let topic = if i % 2 == 0 {
            "orders".to_owned()
        } else {
            format!("orders/x/{i}")
        };
        assert_eq!(post(web, &topic, &format!("g{i}")).await, 202);
    }
    // And from another NATS program: to the gateway's subscribers, once (and back to the
    // program itself, which has echo).
    const M: usize = 5;
    for i in 0..M {
        client
            .publish(
                format!("meshgate.orders.x.n{i}"),
                format!(r#"{{"specversion":"1.0","id":"n{i}","source":"/other","type":"t"}}"#)
                    .into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();

    let mut on_nats = HashMap::new();
    for _ in 0..N + M {
        let m = tokio::time::timeout(Duration::from_secs(5), tap.next())
            .await
            .expect("a NATS message within 5 s")
            .unwrap();
        *on_nats.entry(nats_event_id(&m)).or_insert(0usize) += 1;
    }
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), tap.next()).await {
        panic!("unexpected extra message on NATS: {m:?}");
    }
    assert_eq!(on_nats.len(), N + M, "every event on NATS: {on_nats:?}");
    assert!(
        on_nats.values().all(|&c| c == 1),
        "duplicates on NATS: {on_nats:?}"
    );

    let seen = collect(&mut all, N + M).await;
    assert_eq!(seen.len(), N + M, "`orders/#`: every event: {seen:?}");
    assert!(seen.values().all(|&c| c == 1), "`orders/#`: {seen:?}");
    let seen = collect(&mut some, N / 2 + M).await;
    assert_eq!(seen.len(), N / 2 + M, "`orders/x/+`: {seen:?}");
    assert!(
        seen.keys()
            .all(|id| id.starts_with('n') || id[1..].parse::<usize>().unwrap() % 2 == 1),
        "`orders/x/+`: only the events below `orders/x`: {seen:?}"
    );
    assert!(seen.values().all(|&c| c == 1), "`orders/x/+`: {seen:?}");
    drop((all, some));
    gw.shutdown().await;
}

/// The gateway's count of lost NATS connections, from /metrics.
async fn disconnects(admin: SocketAddr, backbone: &str) -> String {
    let needle = format!("meshgate_backbone_disconnects_total{{backbone=\"{backbone}\"}} ");
    metrics(admin)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {needle} in /metrics"))
}

/// An MQTT 5 client on `port`; its PUBACKs and SUBACKs come out of the channel.
fn mqtt5_client(
    port: u16,
    id: &str,
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Packet>,
) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    let mut opts = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_max_packet_size(Some(1 << 20));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = el.poll().await {
            if let rumqttc::v5::Event::Incoming(p @ (Packet::PubAck(_) | Packet::SubAck(_))) = e {
                let _ = tx.send(p);
            }
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_too_long_for_the_servers_protocol_line_is_refused_and_nobody_else_notices() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    // nats-server's default max_control_line (4096), and the gateway's.
    let nats = NatsServer::start_monitored();
    let gw = start_gateway(with_mqtt(nats_config(&nats, "gw-long-topic"))).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut tap = client.subscribe("meshgate.>").await.unwrap();
    client.flush().await.unwrap();
    let mut ws = ws_connect(web, &["ok/#", "long/#"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"nats\"} 2",
    )
    .await;
    // Subject `meshgate.long.xxx…`: 4,100 bytes of topic is over 4096 whatever else the line
    // holds; 3,900 leaves room for the verb, the sizes and a WebSocket/MQTT event's headers.
    let long = format!("long/{}", "x".repeat(4100));
    let fits = format!("long/{}", "y".repeat(3900));

    // HTTP: 422 naming the limit.
    let (status, body) = post_data(web, &long, "h-long", "hello").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("max_control_line"), "{body}");
    let (status, body) = post_data(web, &fits, "h-fits", "hello").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(nats_event_id(&next_nats(&mut tap).await), "h-fits");

    // MQTT 5: PUBACK "topic name invalid"; SUBACK "topic filter invalid".
    let (mqtt, mut acks) = mqtt5_client(gw.mqtt_addr.unwrap().port(), "long-topic");
    let mut next_ack = async || {
        tokio::time::timeout(Duration::from_secs(5), acks.recv())
            .await
            .expect("an acknowledgement within 5 s")
            .unwrap()
    };
    mqtt.publish(long.as_str(), QoS::AtLeastOnce, false, "m-long")
        .await
        .unwrap();
    match next_ack().await {
        Packet::PubAck(a) => assert_eq!(a.reason, PubAckReason::TopicNameInvalid),
        other => panic!("{other:?}"),
    }
    mqtt.publish(fits.as_str(), QoS::AtLeastOnce, false, "m-fits")
        .await
        .unwrap();
    match next_ack().await {
        Packet::PubAck(a) => assert_eq!(a.reason, PubAckReason::Success),
        other => panic!("{other:?}"),
    }
    assert!(next_nats(&mut tap).await.subject.len() > 3900);
    mqtt.subscribe(format!("{long}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    match next_ack().await {
        Packet::SubAck(a) => {
            assert_eq!(a.return_codes, [SubscribeReasonCode::TopicFilterInvalid]);
        }
        other => panic!("{other:?}"),
    }

    // WebSocket: an `io.meshgate.error` with `invalid_request`, the socket open.
    let event = serde_json::json!({
        "specversion": "1.0", "id": "w-long", "source": "/t", "type": "t", "subject": long,
    });
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        event.to_string(),
    ))
    .await
    .unwrap();
    // The WebSocket subscriber got the two events that fit (the MQTT one wrapped, its payload
    // as data), then the error.
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.id(), "h-fits");
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.data().unwrap().as_slice(), b"m-fits");
    let error = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(error.ty(), "io.meshgate.error");
    let data = String::from_utf8_lossy(error.data().unwrap().as_slice()).into_owned();
    assert!(
        data.contains("invalid_request") && data.contains("max_control_line"),
        "{data}"
    );

    // Nothing was sent that made the server close the connection all clients share: never
    // disconnected, ready, and the next event goes everywhere.
    assert_eq!(nats.closed_by_server().await, Vec::<String>::new());
    assert_eq!(disconnects(admin, "nats").await, "0");
    assert_eq!(ready(admin).await, 200);
    let (status, body) = post_data(web, "ok/1", "after", "hello").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(nats_event_id(&next_nats(&mut tap).await), "after");
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.id(), "after");
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), tap.next()).await {
        panic!("unexpected message on NATS: {m:?}");
    }
    drop(ws);
    gw.shutdown().await;
}
