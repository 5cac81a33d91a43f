//! The admin API of live state (issue 25 item 2), on the real binary with real clients:
//! rumqttc (MQTT 5), mosquitto_sub (MQTT 3.1.1), a CloudEvents WebSocket client, and
//! `meshgate ctl`. Connections are listed, filtered, paged, inspected and closed (MQTT 5
//! DISCONNECT 0x98, WebSocket close 1008); persistent sessions and retained messages are
//! listed and deleted; the backbone's subscriptions are listed (memory, and NATS against a
//! real nats-server's own view); refusals say why.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use meshgate_tests::{Deadline, binary, spawn};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::Value as Json;

const TOKEN: &str = "admin-api-test-token-0123456789";

fn config() -> String {
    format!(
        r#"
[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
api_token = "{TOKEN}"

[mqtt]
enabled = true
listen = "127.0.0.1:0"
"#
    )
}

/// [`config`] written to a file of its own (`meshgate-<test>-<pid>/meshgate.toml`).
fn config_file(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("meshgate-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meshgate.toml");
    std::fs::write(&path, config()).unwrap();
    path
}

async fn call(method: reqwest::Method, admin: SocketAddr, path: &str) -> (u16, Json) {
    meshgate_tests::admin_call(method, admin, path, Some(TOKEN)).await
}

async fn get(admin: SocketAddr, path: &str) -> Json {
    let (status, body) = call(reqwest::Method::GET, admin, path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// The listed connection with this client id, waiting for it to appear.
async fn listed(admin: SocketAddr, client_id: &str) -> Json {
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let page = get(admin, &format!("/connections?client_id={client_id}")).await;
        if let Some(c) = page["items"].as_array().and_then(|a| a.first()) {
            return c.clone();
        }
        assert!(!d.passed(), "{client_id} is not listed: {page}");
        d.pause().await;
    }
}

/// An MQTT 5 client `id` (session kept for an hour unless `clean`), CONNACK received.
async fn mqtt5(port: u16, id: &str, clean: bool) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_start(clean);
    if !clean {
        o.set_session_expiry_interval(Some(3600));
    }
    meshgate_tests::mqtt5::connect(o).await
}

/// `meshgate ctl` with the token from the config file (its `admin.listen` has port 0, so the
/// address is given).
fn ctl(config: &std::path::Path, admin: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("ctl")
        .arg("-c")
        .arg(config)
        .arg("--admin")
        .arg(format!("http://{admin}"))
        .args(args)
        .env_remove("MESHGATE_ADMIN_URL")
        .env_remove("MESHGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_listed_inspected_and_closed() {
    let path = config_file("admin-api");
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let (admin, port, web) = (gw.admin.unwrap(), gw.mqtt.unwrap().port(), gw.web.unwrap());

    // Without the token, or with another one: refused, saying how (a path that does not
    // decode too: the token is checked first).
    for token in [None, Some("not-the-token-at-all-000")] {
        for path in ["/connections", "/connections/%FF"] {
            let (status, body) =
                meshgate_tests::admin_call(reqwest::Method::GET, admin, path, token).await;
            assert_eq!(status, 401, "{path}: {body}");
            assert!(body["detail"].as_str().unwrap().contains("admin.api_token"));
        }
    }

    // An MQTT 5 client with two subscriptions.
    let (c5, mut el5) = mqtt5(port, "admin-v5", true).await;
    c5.subscribe("a/#", QoS::AtLeastOnce).await.unwrap();
    meshgate_tests::mqtt5::suback(&mut el5).await;
    c5.subscribe("b/+", QoS::AtMostOnce).await.unwrap();
    meshgate_tests::mqtt5::suback(&mut el5).await;
    // An MQTT 3.1.1 client (mosquitto_sub) and a browser-like WebSocket client.
    let mut sub311 = meshgate_tests::mosquitto_command("mosquitto_sub")
        .args([
            "-p",
            &port.to_string(),
            "-i",
            "admin-v311",
            "-V",
            "mqttv311",
        ])
        .args(["-t", "c/#", "-q", "1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut ws = meshgate_tests::ws_connect(web, &["d/#"]).await;

    let v5 = listed(admin, "admin-v5").await;
    assert_eq!(v5["protocol"], "mqtt");
    assert_eq!(v5["version"], "5");
    assert_eq!(v5["user"], "anonymous");
    assert_eq!(v5["subscription_count"], 2);
    assert!(
        v5["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{v5}"
    );
    let v311 = listed(admin, "admin-v311").await;
    assert_eq!(v311["version"], "3.1.1");
    // One connection in detail: its subscriptions with their granted QoS.
    let id5 = v5["id"].as_u64().unwrap();
    let detail = get(admin, &format!("/connections/{id5}")).await;
    let subs = detail["subscriptions"].as_array().unwrap();
    assert_eq!(
        subs,
        &[
            serde_json::json!({"filter": "a/#", "qos": 1}),
            serde_json::json!({"filter": "b/+", "qos": 0}),
        ]
    );
    // Filtered by protocol: the WebSocket client alone, with its filter.
    let page = get(admin, "/connections?protocol=websocket").await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{page}");
    let ws_id = items[0]["id"].as_u64().unwrap();
    let ws_detail = get(admin, &format!("/connections/{ws_id}")).await;
    assert_eq!(ws_detail["version"], "cloudevents.json");
    assert_eq!(ws_detail["subscriptions"][0]["filter"], "d/#");
    // Paged: one per page, the cursor leads through all three, in id order.
    let mut ids = Vec::new();
    let mut next_page = "/connections?limit=1".to_owned();
    loop {
        let page = get(admin, &next_page).await;
        ids.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_u64().unwrap()),
        );
        match page["next"].as_str() {
            Some(next) => next_page = format!("/connections?limit=1&after={next}"),
            None => break,
        }
    }
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // Bad requests say what is wrong.
    for (path, status, says) in [
        ("/connections/abc", 400, "not a connection id"),
        ("/connections/%FF", 400, "bad path"),
        ("/connections/999999", 404, "no connection 999999"),
        ("/connections?limit=0", 400, "1 to 1000"),
        ("/connections?limit=5000", 400, "1 to 1000"),
        ("/connections?after=x", 400, "bad query string"),
        ("/retained?filter=a/%23/b", 400, "filter"),
    ] {
        let (got, body) = call(reqwest::Method::GET, admin, path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(says),
            "{path}: {body}"
        );
    }

    // `meshgate ctl` finds the token in the config file; the address too, unless it is port 0.
    let out = Command::new(binary())
        .args(["ctl", "-c", path.to_str().unwrap(), "connections"])
        .env_remove("MESHGATE_ADMIN_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("port 0") && err.contains("--admin"), "{err}");
    let (code, out, err) = ctl(&path, admin, &["connections"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID"), "{out}");
    assert!(
        out.contains("admin-v5") && out.contains("admin-v311") && out.contains("websocket"),
        "{out}"
    );
    let (code, out, _) = ctl(&path, admin, &["--json", "connection", &id5.to_string()]);
    assert_eq!(code, 0);
    let shown: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["client_id"], "admin-v5");
    let (code, _, err) = ctl(
        &path,
        admin,
        &["--token", "wrong-token-000000000000", "connections"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");

    // Closing: the MQTT 5 client gets DISCONNECT 0x98 (administrative action) ...
    let (status, _) = call(
        reqwest::Method::DELETE,
        admin,
        &format!("/connections/{id5}"),
    )
    .await;
    assert_eq!(status, 202);
    let reason = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el5.poll().await {
                // rumqttc reports the server's DISCONNECT as an error carrying its reason.
                Ok(Event::Incoming(Packet::Disconnect(d))) => return Some(d.reason_code),
                Ok(_) => {}
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                )) => return Some(reason_code),
                Err(_) => return None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(reason, Some(DisconnectReasonCode::AdministrativeAction));
    // ... the WebSocket client a close frame 1008, through `meshgate ctl` ...
    let (code, out, err) = ctl(&path, admin, &["disconnect", &ws_id.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("closing"), "{out}");
    let closed = loop {
        match meshgate_tests::next_event(&mut ws, Duration::from_secs(10)).await {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(closed, Some(1008));
    // ... the MQTT 3.1.1 connection is closed (3.1.1 has no DISCONNECT from the server;
    // mosquitto_sub connects again, as a new connection).
    let id311 = v311["id"].as_u64().unwrap();
    let (status, _) = call(
        reqwest::Method::DELETE,
        admin,
        &format!("/connections/{id311}"),
    )
    .await;
    assert_eq!(status, 202);
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let (status, _) = call(
            reqwest::Method::GET,
            admin,
            &format!("/connections/{id311}"),
        )
        .await;
        if status == 404 {
            break;
        }
        assert!(!d.passed(), "connection {id311} still listed after closing");
        d.pause().await;
    }
    let _ = sub311.kill();
    let _ = sub311.wait();
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let page = get(admin, "/connections").await;
        if page["items"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(!d.passed(), "still listed after the clients left: {page}");
        d.pause().await;
    }
    let (status, _) = call(
        reqwest::Method::DELETE,
        admin,
        &format!("/connections/{id5}"),
    )
    .await;
    assert_eq!(status, 404, "closed connections are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_retained_messages_are_listed_and_deleted() {
    let path = config_file("admin-state");
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let (admin, port) = (gw.admin.unwrap(), gw.mqtt.unwrap().port());

    // A persistent session, connected: listed as a connection, not deletable.
    let (c, mut el) = mqtt5(port, "admin-keep", false).await;
    c.subscribe("k/#", QoS::AtLeastOnce).await.unwrap();
    meshgate_tests::mqtt5::suback(&mut el).await;
    let (status, body) = call(reqwest::Method::DELETE, admin, "/sessions/admin-keep").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("connected"),
        "{body}"
    );
    // Its client leaves: the session is parked and listed.
    c.disconnect().await.unwrap();
    while el.poll().await.is_ok() {}
    let d = Deadline::after(Duration::from_secs(10));
    let session = loop {
        let page = get(admin, "/sessions").await;
        if let Some(s) = page["items"].as_array().unwrap().first() {
            break s.clone();
        }
        assert!(!d.passed(), "no parked session: {page}");
        d.pause().await;
    };
    assert_eq!(session["client_id"], "admin-keep");
    assert_eq!(session["subscriptions"], 1);
    let ttl =
        session["expires_at_ms"].as_u64().unwrap() - session["parked_at_ms"].as_u64().unwrap();
    assert_eq!(ttl, 3_600_000);
    let (code, out, err) = ctl(&path, admin, &["sessions"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("admin-keep"), "{out}");
    // Deleted (through ctl): gone from the list, and the client starts without it.
    let (code, _, err) = ctl(&path, admin, &["delete-session", "admin-keep"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        get(admin, "/sessions").await["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let (status, _) = call(reqwest::Method::DELETE, admin, "/sessions/admin-keep").await;
    assert_eq!(status, 404);
    let mut o = MqttOptions::new("admin-keep", "127.0.0.1", port);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(3600));
    let (_c, mut el) = AsyncClient::new(o, 10);
    let present = loop {
        if let Event::Incoming(Packet::ConnAck(ack)) = el.poll().await.unwrap() {
            break ack.session_present;
        }
    };
    assert!(!present, "the deleted session was resumed");

    // Retained messages: listed by filter, deleted one by one (a topic with levels).
    for topic in ["r/1", "r/deep/2", "s/3"] {
        let status = meshgate_tests::mosquitto_command("mosquitto_pub")
            .args([
                "-p",
                &port.to_string(),
                "-t",
                topic,
                "-m",
                topic,
                "-r",
                "-q",
                "1",
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let page = get(admin, "/retained?filter=r/%23").await;
    let topics: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, ["r/1", "r/deep/2"]);
    assert_eq!(page["items"][0]["event"]["subject"], "r/1");
    let page = get(admin, "/retained?limit=1").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["more"], 2);
    let (status, _) = call(reqwest::Method::DELETE, admin, "/retained/r/deep/2").await;
    assert_eq!(status, 204);
    let (code, out, err) = ctl(&path, admin, &["delete-retained", "s/3"]);
    assert_eq!(code, 0, "{err}: {out}");
    let (status, body) = call(reqwest::Method::DELETE, admin, "/retained/s/3").await;
    assert_eq!(status, 404, "{body}");
    let (code, out, _) = ctl(&path, admin, &["retained"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("r/1\t"), "{out}");
    // A topic with a `..` level: ctl sends it as a query parameter, so URL normalisation
    // cannot turn it into another topic.
    let status = meshgate_tests::mosquitto_command("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            "u/..",
            "-m",
            "dots",
            "-r",
            "-q",
            "1",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let (code, _, err) = ctl(&path, admin, &["delete-retained", "u/.."]);
    assert_eq!(code, 0, "{err}");
    let page = get(admin, "/retained?filter=u/%23").await;
    assert!(page["items"].as_array().unwrap().is_empty(), "{page}");
    // A new subscriber gets only what is left.
    let (s, mut sel) = mqtt5(port, "admin-late", true).await;
    s.subscribe("#", QoS::AtMostOnce).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = sel.poll().await {
                got.push(String::from_utf8(p.topic.to_vec()).unwrap());
            }
        }
    })
    .await;
    assert_eq!(got, ["r/1"]);
    // The AMQP bridge is off here: said so.
    let (status, body) = call(reqwest::Method::GET, admin, "/amqp/links").await;
    assert_eq!(status, 404);
    assert!(
        body["detail"].as_str().unwrap().contains("amqp.enabled"),
        "{body}"
    );
}

/// A backbone subscription as (group, kind, subscribers, queued, state).
type Listed = (Option<String>, String, u64, Option<u64>, String);

/// The backbone's subscriptions on `filter`, sorted.
fn on_filter(page: &Json, filter: &str) -> Vec<Listed> {
    let mut found: Vec<_> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["filter"] == filter)
        .map(|s| {
            (
                s["group"].as_str().map(str::to_owned),
                s["kind"].as_str().unwrap().to_owned(),
                s["subscribers"].as_u64().unwrap(),
                s["queued"].as_u64(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    found.sort();
    found
}

/// Polls `GET /backbone/subscriptions` until `done` holds for the page (or fails naming it).
async fn backbone_until(admin: SocketAddr, what: &str, done: impl Fn(&Json) -> bool) -> Json {
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let page = get(admin, "/backbone/subscriptions?limit=1000").await;
        if done(&page) {
            return page;
        }
        assert!(!d.passed(), "{what}: {page}");
        d.pause().await;
    }
}

fn owned(
    group: Option<&str>,
    kind: &str,
    subscribers: u64,
    queued: Option<u64>,
    state: &str,
) -> Listed {
    (
        group.map(str::to_owned),
        kind.to_owned(),
        subscribers,
        queued,
        state.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backbone_subscriptions_are_listed_with_their_groups() {
    let path = config_file("admin-backbone");
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let (admin, port, web) = (gw.admin.unwrap(), gw.mqtt.unwrap().port(), gw.web.unwrap());

    // Refused without the token, as every admin route.
    let (status, body) =
        meshgate_tests::admin_call(reqwest::Method::GET, admin, "/backbone/subscriptions", None)
            .await;
    assert_eq!(status, 401, "{body}");

    // An MQTT 5 client: a plain subscription and a shared one; two WebSocket clients on one
    // filter.
    let (c, mut el) = mqtt5(port, "admin-bb", true).await;
    c.subscribe("bb/+/t", QoS::AtLeastOnce).await.unwrap();
    meshgate_tests::mqtt5::suback(&mut el).await;
    c.subscribe("$share/g/bb/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    meshgate_tests::mqtt5::suback(&mut el).await;
    let poll = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let ws1 = meshgate_tests::ws_connect(web, &["bw/#"]).await;
    let ws2 = meshgate_tests::ws_connect(web, &["bw/#"]).await;

    let page = backbone_until(admin, "all four subscriptions listed", |p| {
        on_filter(p, "bw/#").first().map(|s| s.2) == Some(2) && !on_filter(p, "bb/#").is_empty()
    })
    .await;
    assert_eq!(page["backbone"], "memory");
    assert_eq!(
        on_filter(&page, "bw/#"),
        [owned(None, "queue", 2, Some(0), "ok")]
    );
    assert_eq!(
        on_filter(&page, "bb/+/t"),
        [owned(None, "queue", 1, Some(0), "ok")]
    );
    assert_eq!(
        on_filter(&page, "bb/#"),
        [owned(Some("mqtt-share:g"), "queue", 1, Some(0), "ok")]
    );
    let ws_entry = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["filter"] == "bw/#")
        .unwrap();
    // Two queues, each of the WebSocket adapter's capacity; nothing named on a server.
    let capacity = ws_entry["capacity"].as_u64().unwrap();
    assert!(capacity >= 2 && capacity.is_multiple_of(2), "{ws_entry}");
    assert_eq!(ws_entry["names"], serde_json::json!([]));
    // Sorted by filter (then group, then kind).
    let all: Vec<(String, Option<String>, String)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["filter"].as_str().unwrap().to_owned(),
                s["group"].as_str().map(str::to_owned),
                s["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted);
    assert_eq!(page["more"], 0);
    assert!(page.get("next").is_none(), "{page}");

    // Paged one by one: the cursors lead through the same list.
    let mut paged = Vec::new();
    let mut next_page = "/backbone/subscriptions?limit=1".to_owned();
    loop {
        let page = get(admin, &next_page).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 1, "{page}");
        paged.extend(items.iter().map(|s| {
            (
                s["filter"].as_str().unwrap().to_owned(),
                s["group"].as_str().map(str::to_owned),
                s["kind"].as_str().unwrap().to_owned(),
            )
        }));
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(
                    page["more"].as_u64().unwrap() as usize,
                    all.len() - paged.len()
                );
                next_page = format!("/backbone/subscriptions?limit=1&after={next}");
            }
            None => break,
        }
    }
    assert_eq!(paged, all);
    for (query, says) in [
        ("after=nope", "not a cursor"),
        ("limit=0", "1 to 1000"),
        ("limit=x", "bad query string"),
    ] {
        let (status, body) = call(
            reqwest::Method::GET,
            admin,
            &format!("/backbone/subscriptions?{query}"),
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(says),
            "{query}: {body}"
        );
    }

    // `meshgate ctl backbone-subscriptions`: a table, or the items as JSON.
    let (code, out, err) = ctl(&path, admin, &["backbone-subscriptions"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("FILTER"), "{out}");
    let shared = out
        .lines()
        .find(|l| l.starts_with("bb/# "))
        .unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<&str> = shared.split_whitespace().collect();
    assert_eq!(
        cells[..5],
        ["bb/#", "mqtt-share:g", "queue", "1", "0"],
        "{out}"
    );
    let (code, out, err) = ctl(
        &path,
        admin,
        &["--json", "backbone-subscriptions", "--limit", "1", "--all"],
    );
    assert_eq!(code, 0, "{err}");
    let items: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(items.as_array().unwrap().len(), all.len(), "{out}");

    // Gone with their subscribers: an unsubscribe, a closed WebSocket.
    c.unsubscribe("bb/+/t").await.unwrap();
    drop(ws1);
    let page = backbone_until(admin, "bb/+/t and one bw/# subscriber gone", |p| {
        on_filter(p, "bb/+/t").is_empty() && on_filter(p, "bw/#").first().map(|s| s.2) == Some(1)
    })
    .await;
    assert_eq!(
        on_filter(&page, "bb/#"),
        [owned(Some("mqtt-share:g"), "queue", 1, Some(0), "ok")]
    );
    c.disconnect().await.unwrap();
    drop(ws2);
    let _ = poll.await;
    backbone_until(admin, "nothing left of the clients", |p| {
        on_filter(p, "bw/#").is_empty() && on_filter(p, "bb/#").is_empty()
    })
    .await;
}

/// On NATS: a plain subscription is one NATS subscription per filter shared by the local
/// subscribers (`nats`) and their in-process queues (`nats-local`); a shared one a NATS queue
/// subscription. The names listed are the subjects nats-server holds, and they go when the
/// clients unsubscribe and leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_backbone_subscriptions_follow_the_servers() {
    let nats = meshgate_tests::nats::NatsServer::start_monitored();
    let url = nats.url();
    let path = config_file("admin-backbone-nats");
    let gw = spawn(
        &["-c", path.to_str().unwrap()],
        &[
            ("MESHGATE__BACKBONE__KIND", "nats"),
            ("MESHGATE__BACKBONE__NATS__URLS", &url),
        ],
    );
    let (admin, port) = (gw.admin.unwrap(), gw.mqtt.unwrap().port());

    let (a, mut ael) = mqtt5(port, "admin-nats-a", true).await;
    a.subscribe("nb/#", QoS::AtLeastOnce).await.unwrap();
    meshgate_tests::mqtt5::suback(&mut ael).await;
    a.subscribe("$share/g/ns/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    meshgate_tests::mqtt5::suback(&mut ael).await;
    let (b, mut bel) = mqtt5(port, "admin-nats-b", true).await;
    b.subscribe("nb/#", QoS::AtMostOnce).await.unwrap();
    meshgate_tests::mqtt5::suback(&mut bel).await;
    let apoll = tokio::spawn(async move { while ael.poll().await.is_ok() {} });
    let bpoll = tokio::spawn(async move { while bel.poll().await.is_ok() {} });

    let page = backbone_until(admin, "nb/# with both subscribers", |p| {
        on_filter(p, "nb/#")
            .iter()
            .any(|s| s.1 == "nats" && s.2 == 2)
    })
    .await;
    assert_eq!(page["backbone"], "nats");
    assert_eq!(
        on_filter(&page, "nb/#"),
        [
            owned(None, "nats", 2, Some(0), "ok"),
            owned(None, "nats-local", 2, Some(0), "ok"),
        ]
    );
    assert_eq!(
        on_filter(&page, "ns/+"),
        [owned(Some("mqtt-share:g"), "nats", 1, None, "ok")]
    );
    let names = |page: &Json, filter: &str, kind: &str| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["filter"] == filter && s["kind"] == kind)
            .map(|s| {
                s["names"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        names(&page, "nb/#", "nats"),
        ["meshgate.nb", "meshgate.nb.>"]
    );
    assert_eq!(names(&page, "ns/+", "nats"), ["meshgate.ns.*"]);
    // What the server holds: one subscription per subject for both clients of nb/#, the queue
    // group's (its name as the MQTT adapter gives it).
    assert_eq!(
        nats.subscriptions("meshgate.n").await,
        [
            ("meshgate.nb".to_owned(), None),
            ("meshgate.nb.>".to_owned(), None),
            ("meshgate.ns.*".to_owned(), Some("mqtt-share:g".to_owned())),
        ]
    );

    // One client of nb/# unsubscribes: the NATS subscription stays for the other.
    b.unsubscribe("nb/#").await.unwrap();
    let page = backbone_until(admin, "one subscriber of nb/# left", |p| {
        on_filter(p, "nb/#").iter().all(|s| s.2 == 1)
    })
    .await;
    assert_eq!(on_filter(&page, "nb/#").len(), 2, "{page}");
    assert_eq!(nats.subscriptions("meshgate.nb").await.len(), 2);
    // The last one leaves: the NATS subscriptions go, listed and on the server.
    a.disconnect().await.unwrap();
    let _ = apoll.await;
    backbone_until(admin, "nothing left on nb/# and ns/+", |p| {
        on_filter(p, "nb/#").is_empty() && on_filter(p, "ns/+").is_empty()
    })
    .await;
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let held = nats.subscriptions("meshgate.n").await;
        if held.is_empty() {
            break;
        }
        assert!(!d.passed(), "nats-server still holds {held:?}");
        d.pause().await;
    }
    b.disconnect().await.unwrap();
    let _ = bpoll.await;
}

/// On JetStream: each subscription pulls consumers of its own (`consumer_each`, named after
/// its subjects) or is a member of the instance's feed (`instance_feed`); a queue group pulls
/// the group's shared consumer either way. They go when the client leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_backbone_subscriptions_are_consumers_or_feed_members() {
    for mode in ["consumer_each", "instance_feed"] {
        let nats = meshgate_tests::nats::NatsServer::start();
        let url = nats.url();
        let path = config_file(&format!("admin-backbone-js-{mode}"));
        let gw = spawn(
            &["-c", path.to_str().unwrap()],
            &[
                ("MESHGATE__BACKBONE__KIND", "jetstream"),
                ("MESHGATE__BACKBONE__NATS__URLS", &url),
                ("MESHGATE__BACKBONE__JETSTREAM__SUBSCRIPTIONS", mode),
            ],
        );
        let (admin, port) = (gw.admin.unwrap(), gw.mqtt.unwrap().port());
        let (c, mut el) = mqtt5(port, &format!("admin-js-{mode}"), true).await;
        c.subscribe("jb/#", QoS::AtLeastOnce).await.unwrap();
        meshgate_tests::mqtt5::suback(&mut el).await;
        c.subscribe("$share/g/jq/+", QoS::AtLeastOnce)
            .await
            .unwrap();
        meshgate_tests::mqtt5::suback(&mut el).await;
        let poll = tokio::spawn(async move { while el.poll().await.is_ok() {} });

        let page = backbone_until(admin, mode, |p| {
            !on_filter(p, "jb/#").is_empty() && !on_filter(p, "jq/+").is_empty()
        })
        .await;
        assert_eq!(page["backbone"], "jetstream", "{mode}");
        let item = |filter: &str| {
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["filter"] == filter)
                .unwrap()
                .clone()
        };
        let names = |item: &Json| -> Vec<String> {
            item["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .collect()
        };
        let plain = item("jb/#");
        match mode {
            "consumer_each" => {
                assert_eq!(
                    on_filter(&page, "jb/#"),
                    [owned(None, "consumer", 1, None, "ok")]
                );
                // One consumer per subject: `meshgate.jb` and `meshgate.jb.>`.
                let names = names(&plain);
                assert_eq!(names.len(), 2, "{plain}");
                assert!(names[0].starts_with("s_") && names[0].ends_with("_meshgate_jb"));
                assert!(names[1].ends_with("_meshgate_jb__"), "{plain}");
            }
            _ => {
                assert_eq!(
                    on_filter(&page, "jb/#"),
                    [owned(None, "feed", 1, Some(0), "ok")]
                );
                let names = names(&plain);
                assert_eq!(names.len(), 1, "{plain}");
                assert!(names[0].starts_with("live_"), "{plain}");
            }
        }
        assert_eq!(
            on_filter(&page, "jq/+"),
            [owned(Some("mqtt-share:g"), "consumer", 1, None, "ok")]
        );
        assert_eq!(
            names(&item("jq/+")),
            ["q_mqtt-share:g_meshgate_jq__"],
            "{mode}"
        );

        c.disconnect().await.unwrap();
        let _ = poll.await;
        backbone_until(admin, "the client's subscriptions gone", |p| {
            on_filter(p, "jb/#").is_empty() && on_filter(p, "jq/+").is_empty()
        })
        .await;
    }
}
