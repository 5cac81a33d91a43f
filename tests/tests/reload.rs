//! Reloading the configuration without a restart (issue 25 item 3): the real binary started
//! with `-c`, the file rewritten, then `SIGHUP` or `POST /reload`. Users, tokens and ACLs
//! change in place (new logins use them; a connected client loses exactly the subscriptions
//! the new rules no longer grant); a change that needs a restart, or an invalid file, changes
//! nothing and says why.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use meshgate_tests::{Deadline, spawn};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const API_TOKEN: &str = "reload-test-admin-token-0123456789";

/// User `dev` logs in with `token` and may publish anywhere and subscribe to `subscribe`.
fn config(token: &str, subscribe: &str) -> String {
    format!(
        r##"
[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
api_token = "{API_TOKEN}"

[mqtt]
enabled = true
listen = "127.0.0.1:0"

[auth.anonymous]
enabled = false

[[auth.users]]
name = "dev"
tokens = ["{token}"]
publish = ["#"]
subscribe = {subscribe}
"##
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Connects with `token` as the user name (MQTT 5); the CONNACK's code.
async fn connect(port: u16, id: &str, token: &str) -> (AsyncClient, EventLoop, ConnectReturnCode) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(token, "");
    let (c, mut el) = AsyncClient::new(o, 100);
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => return (c, el, ack.code),
            Ok(_) => {}
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => return (c, el, code),
            Err(e) => panic!("MQTT connect: {e:?}"),
        }
    }
}

/// The next PUBLISH's topic within `within`, polling `el`.
async fn next_topic(el: &mut EventLoop, within: Duration) -> Option<String> {
    tokio::time::timeout(within, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                return String::from_utf8(p.topic.to_vec()).unwrap();
            }
        }
    })
    .await
    .ok()
}

/// A CloudEvents WebSocket client of `url` logged in with `token`, subscribed to `a/#` and
/// `b/#`.
async fn ws_with_token(url: &str, token: &str) -> meshgate_tests::Ws {
    let url = format!("{url}?subscribe=a/%23&subscribe=b/%23&access_token={token}");
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws
}

async fn post_reload(admin: std::net::SocketAddr, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().post(format!("http://{admin}/reload"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_users_and_narrows_a_connected_clients_subscriptions() {
    let dir = std::env::temp_dir().join(format!("meshgate-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meshgate.toml");
    write(
        &path,
        &config("token-one-aaaaaaaaaaaa", r#"["a/#", "b/#"]"#),
    );
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let port = gw.mqtt.unwrap().port();

    let (sub, mut sub_el, code) = connect(port, "reload-sub", "token-one-aaaaaaaaaaaa").await;
    assert_eq!(code, ConnectReturnCode::Success);
    for filter in ["a/#", "b/#"] {
        sub.subscribe(filter, QoS::AtMostOnce).await.unwrap();
        let suback = meshgate_tests::mqtt5::suback(&mut sub_el).await;
        assert_eq!(
            format!("{:?}", suback.return_codes[0]),
            "Success(AtMostOnce)"
        );
    }
    // A browser subscribed to both too (WebSocket, the token as `access_token`).
    let mut ws = ws_with_token(gw.ws_url.as_deref().unwrap(), "token-one-aaaaaaaaaaaa").await;
    let (publ, mut pub_el, code) = connect(port, "reload-pub", "token-one-aaaaaaaaaaaa").await;
    assert_eq!(code, ConnectReturnCode::Success);
    tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });
    publ.publish("b/1", QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    assert_eq!(
        next_topic(&mut sub_el, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("b/1")
    );

    // New token, and `b/#` no longer granted.
    write(&path, &config("token-two-bbbbbbbbbbbb", r#"["a/#"]"#));
    gw.signal("HUP");
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let (_, _, code) = connect(port, "reload-probe", "token-two-bbbbbbbbbbbb").await;
        if code == ConnectReturnCode::Success {
            break;
        }
        assert!(!d.passed(), "the new token is not accepted after SIGHUP");
        d.pause().await;
    }
    let (_, _, old) = connect(port, "reload-old", "token-one-aaaaaaaaaaaa").await;
    assert_eq!(old, ConnectReturnCode::BadUserNamePassword);

    // The connected subscriber keeps `a/#` and loses `b/#`: b/2 goes first, so had it been
    // delivered it would come before a/2.
    publ.publish("b/2", QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    publ.publish("a/2", QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    assert_eq!(
        next_topic(&mut sub_el, Duration::from_secs(5))
            .await
            .as_deref(),
        Some("a/2")
    );
    publ.publish("b/3", QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    assert_eq!(
        next_topic(&mut sub_el, Duration::from_millis(500)).await,
        None
    );
    // The WebSocket client is told (an error event naming the filter, then what it holds),
    // and gets a/4 but not b/4.
    publ.publish("b/4", QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    publ.publish("a/4", QoS::AtMostOnce, false, "x")
        .await
        .unwrap();
    let mut texts = Vec::new();
    let d = Deadline::after(Duration::from_secs(5));
    while !texts
        .iter()
        .any(|t: &String| t.contains("\"subject\":\"a/4\""))
    {
        assert!(!d.passed(), "no a/4 over WebSocket: {texts:?}");
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(200), ws.next()).await
        {
            texts.push(t.to_string());
        }
    }
    assert!(
        texts
            .iter()
            .any(|t| t.contains("forbidden") && t.contains("b/#")),
        "{texts:?}"
    );
    // (b/1 came before the reload.)
    for after in ["b/2", "b/3", "b/4"] {
        let subject = format!("\"subject\":\"{after}\"");
        assert!(!texts.iter().any(|t| t.contains(&subject)), "{texts:?}");
    }
    // Subscribing to it again is refused now.
    sub.subscribe("b/#", QoS::AtMostOnce).await.unwrap();
    let suback = meshgate_tests::mqtt5::suback(&mut sub_el).await;
    assert_eq!(format!("{:?}", suback.return_codes[0]), "NotAuthorized");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_refuses_restart_changes_and_invalid_files_and_keeps_running() {
    let dir = std::env::temp_dir().join(format!("meshgate-reload-post-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meshgate.toml");
    let v1 = config("token-one-aaaaaaaaaaaa", r#"["a/#"]"#);
    write(&path, &v1);
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let (admin, port) = (gw.admin.unwrap(), gw.mqtt.unwrap().port());

    // The admin token is required.
    assert_eq!(post_reload(admin, None).await.0, 401);
    // Nothing changed: 200, nothing put into force.
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"changed":[]}"#));
    // A listener address needs a restart: refused, naming the section, nothing changed.
    let moved = v1.replace(
        "[mqtt]\nenabled = true\nlisten = \"127.0.0.1:0\"",
        "[mqtt]\nenabled = true\nlisten = \"127.0.0.1:1\"",
    );
    assert_ne!(moved, v1);
    write(
        &path,
        &moved.replace("token-one-aaaaaaaaaaaa", "token-two-bbbbbbbbbbbb"),
    );
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("need a restart") && body.contains("mqtt"),
        "{body}"
    );
    // An invalid file: the same messages as `meshgate validate`, nothing changed.
    write(
        &path,
        &v1.replace("publish = [\"#\"]", "publish = [\"a/#/b\"]"),
    );
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("auth.users"), "{body}");
    // Still the first configuration.
    let (_, _, code) = connect(port, "still", "token-one-aaaaaaaaaaaa").await;
    assert_eq!(code, ConnectReturnCode::Success);
    // A valid [auth] change: put into force.
    write(
        &path,
        &v1.replace("token-one-aaaaaaaaaaaa", "token-two-bbbbbbbbbbbb"),
    );
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"changed":["auth"]}"#));
    let (_, _, code) = connect(port, "now", "token-two-bbbbbbbbbbbb").await;
    assert_eq!(code, ConnectReturnCode::Success);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `[[triggers]]` reload in place: a trigger added to the file starts delivering, a changed
/// one delivers what its new topic takes, a removed one stops; the admin API's own triggers
/// keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_change_in_place() {
    let sink = meshgate_tests::sink::Sink::start().await;
    let dir = std::env::temp_dir().join(format!("meshgate-reload-triggers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meshgate.toml");
    let base = r##"
[http]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
api_token = "API_TOKEN"
"##
    .replace("API_TOKEN", API_TOKEN);
    let trigger = |topic: &str| {
        format!(
            "\n[[triggers]]\nname = \"t\"\ntopic = \"{topic}\"\n[triggers.subscriber]\nuri = \"{}\"\n",
            sink.url("/hook")
        )
    };
    write(&path, &base);
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    // One trigger made through the admin API: not the file's, it stays.
    let api = reqwest::Client::new()
        .put(format!("http://{admin}/triggers/api"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({"topic": "x/#", "subscriber": {"uri": sink.url("/api")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status().as_u16(), 201);

    let paths_after = |n: usize| {
        sink.posts()
            .into_iter()
            .skip(n)
            .map(|s| s.path)
            .collect::<Vec<_>>()
    };
    let post = |topic: &'static str, id: &'static str| async move {
        let (status, body) = meshgate_tests::post_data(web, topic, id, "\"x\"").await;
        assert_eq!(status, 202, "{body}");
    };
    let wait_posts = |n: usize| {
        let sink = &sink;
        async move {
            let d = Deadline::after(Duration::from_secs(10));
            while sink.posts().len() < n {
                assert!(!d.passed(), "{} deliveries, not {n}", sink.posts().len());
                d.pause().await;
            }
        }
    };

    // Added: delivers a/ events.
    write(&path, &format!("{base}{}", trigger("a/#")));
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("triggers"), "{body}");
    post("a/1", "e1").await;
    wait_posts(1).await;
    assert_eq!(paths_after(0), ["/hook"]);

    // Changed: now b/ events, a/ ones no more.
    write(&path, &format!("{base}{}", trigger("b/#")));
    gw.signal("HUP");
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let (_, t) =
            meshgate_tests::admin_call(reqwest::Method::GET, admin, "/triggers/t", Some(API_TOKEN))
                .await;
        if t["trigger"]["topic"] == "b/#" {
            assert_eq!(t["source"], "config");
            break;
        }
        assert!(!d.passed(), "trigger t not changed after SIGHUP: {t}");
        d.pause().await;
    }
    post("a/2", "e2").await;
    post("b/1", "e3").await;
    post("x/1", "e4").await;
    wait_posts(3).await;
    let mut got = paths_after(1);
    got.sort();
    assert_eq!(got, ["/api", "/hook"], "a/2 not delivered any more");

    // Removed: nothing more from it; the API's trigger still runs.
    write(&path, &base);
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    post("b/2", "e5").await;
    post("x/2", "e6").await;
    wait_posts(4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(paths_after(3), ["/api"]);

    // A trigger the file cannot start (its caFile is missing): refused, nothing changed.
    write(
        &path,
        &format!(
            "{base}{}caFile = \"{}\"\n",
            trigger("c/#"),
            dir.join("no-such-ca.pem").display()
        ),
    );
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert!(status == 422, "{status} {body}");
    assert!(
        body.contains("no-such-ca.pem") || body.contains("caFile"),
        "{body}"
    );
    let (status, _) =
        meshgate_tests::admin_call(reqwest::Method::GET, admin, "/triggers/t", Some(API_TOKEN))
            .await;
    assert_eq!(status, 404, "the refused trigger does not run");
}

/// An anonymous MQTT 5 connection: `Ok` with the client and its event loop once accepted,
/// `Err` with why when the gateway refused it (a CONNACK code or the connection closed).
async fn connect_anonymous(port: u16, id: &str) -> Result<(AsyncClient, EventLoop), String> {
    let (c, mut el) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 10);
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return match ack.code {
                        ConnectReturnCode::Success => Ok(()),
                        code => Err(format!("CONNACK {code:?}")),
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no CONNACK within 10 s".to_owned()));
    answer.map(|()| (c, el))
}

/// `gateway.max_connections_per_ip` changes in place: a raised cap admits the connection it
/// refused, a lowered one refuses new connections and keeps those already in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_change_in_place() {
    let dir = std::env::temp_dir().join(format!("meshgate-reload-caps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meshgate.toml");
    let caps = |per_ip: usize| {
        format!(
            "[gateway]\nmax_connections_per_ip = {per_ip}\n[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{API_TOKEN}\"\n[mqtt]\nenabled = true\nlisten = \"127.0.0.1:0\"\n"
        )
    };
    write(&path, &caps(1));
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let (port, admin) = (gw.mqtt.unwrap().port(), gw.admin.unwrap());
    let _first = connect_anonymous(port, "cap-1").await.unwrap();
    let refused = connect_anonymous(port, "cap-2").await;
    assert!(refused.is_err(), "over the cap of 1");

    write(&path, &caps(2));
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("gateway.max_connections_per_ip"), "{body}");
    let _second = connect_anonymous(port, "cap-2")
        .await
        .unwrap_or_else(|e| panic!("admitted under the raised cap: {e}"));

    write(&path, &caps(1));
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let refused = connect_anonymous(port, "cap-3").await;
    assert!(refused.is_err(), "over the lowered cap");
    // The two admitted before stay connected.
    let page = meshgate_tests::admin_call(
        reqwest::Method::GET,
        admin,
        "/connections?protocol=mqtt",
        Some(API_TOKEN),
    )
    .await;
    assert_eq!(
        page.1["items"].as_array().map(Vec::len),
        Some(2),
        "{}",
        page.1
    );
}

/// The limits of `[http]`, `[websocket]` and `[mqtt]` change in place: a connected MQTT
/// client may hold the subscriptions a raised `max_subscriptions` allows, a new one is
/// announced the new Receive Maximum, a larger HTTP body and more WebSocket filters are taken;
/// anything else in those sections is still refused (409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_limits_change_in_place() {
    let dir = std::env::temp_dir().join(format!("meshgate-reload-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meshgate.toml");
    let limits = |n: usize| {
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\nmax_body_size = {}\n[websocket]\nmax_filters = {n}\n[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{API_TOKEN}\"\n[mqtt]\nenabled = true\nlisten = \"127.0.0.1:0\"\nmax_subscriptions = {n}\nmax_inflight = {}\n",
            n * 65_536,
            n * 10
        )
    };
    write(&path, &limits(1));
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let (port, admin, web) = (gw.mqtt.unwrap().port(), gw.admin.unwrap(), gw.web.unwrap());

    // Under the first limits: one subscription, a 64 KiB body, one WebSocket filter.
    let (held, mut held_el) = connect_anonymous(port, "held").await.unwrap();
    let granted = |held: AsyncClient, mut el: EventLoop, topic: &'static str| async move {
        held.subscribe(topic, QoS::AtMostOnce).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(Packet::SubAck(ack)) = el.poll().await.unwrap() {
                    return ack.return_codes[0];
                }
            }
        })
        .await
        .expect("SUBACK");
        (held, el, ack)
    };
    let (held, el, first) = granted(held, held_el, "a/1").await;
    held_el = el;
    assert!(matches!(
        first,
        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
    ));
    let (held, el, second) = granted(held, held_el, "a/2").await;
    held_el = el;
    assert!(
        !matches!(
            second,
            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
        ),
        "over mqtt.max_subscriptions = 1: {second:?}"
    );
    let post = |len: usize| async move {
        reqwest::Client::new()
            .post(format!("http://{web}/events/limits/body"))
            .header("content-type", "text/plain")
            .body("x".repeat(len))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post(100_000).await, 413, "over http.max_body_size = 64 KiB");
    let ws = |filters: usize| async move {
        let query: Vec<String> = (0..filters).map(|i| format!("subscribe=w/{i}")).collect();
        let mut request = format!("ws://{web}/ws?{}", query.join("&"))
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "cloudevents.json".parse().unwrap(),
        );
        match tokio_tungstenite::connect_async(request).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("WebSocket: {e}"),
        }
    };
    assert_eq!(ws(2).await, 400, "over websocket.max_filters = 1");

    // Raised: in force for the connected client, new connections and requests.
    write(&path, &limits(2));
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    for section in ["http limits", "websocket limits", "mqtt limits"] {
        assert!(body.contains(section), "{section} in {body}");
    }
    let (_held, _el, again) = granted(held, held_el, "a/2").await;
    assert!(
        matches!(
            again,
            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
        ),
        "the connected client may hold two now: {again:?}"
    );
    let mut o = MqttOptions::new("new", "127.0.0.1", port);
    o.set_clean_start(true);
    let (_new, mut new_el) = AsyncClient::new(o, 10);
    let receive_max = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(ack)) = new_el.poll().await.unwrap() {
                return ack.properties.and_then(|p| p.receive_max);
            }
        }
    })
    .await
    .expect("CONNACK");
    assert_eq!(
        receive_max,
        Some(20),
        "the raised mqtt.max_inflight announced"
    );
    assert_eq!(
        post(100_000).await,
        202,
        "under the raised http.max_body_size"
    );
    assert_eq!(ws(2).await, 101, "under the raised websocket.max_filters");

    // Anything but a limit in those sections still needs a restart.
    write(
        &path,
        &format!("{}wrap_type = \"com.example.other\"\n", limits(2)),
    );
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("mqtt"), "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}
