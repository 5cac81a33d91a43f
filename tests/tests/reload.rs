//! Reloading the configuration without a restart (issue 25 item 3): the real binary started
//! with `-c`, the file rewritten, then `SIGHUP` or `POST /reload`. Users, tokens and ACLs
//! change in place (new logins use them; a connected client loses exactly the subscriptions
//! the new rules no longer grant); TLS certificates too (new connections get the new one,
//! connected clients stay); a change that needs a restart, or an invalid file or certificate,
//! changes nothing and says why.

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

/// A fresh directory for one test (`meshgate-reload-<name>-<pid>`) and its config file's path.
fn config_dir(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("meshgate-reload-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meshgate.toml");
    (dir, path)
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
    let (dir, path) = config_dir("users");
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
    let (dir, path) = config_dir("post");
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
        body.contains("need a restart, nothing changed: mqtt;"),
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
    let (dir, path) = config_dir("triggers");
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

/// The admin API's page of MQTT connections.
async fn mqtt_connections(admin: std::net::SocketAddr) -> serde_json::Value {
    meshgate_tests::admin_call(
        reqwest::Method::GET,
        admin,
        "/connections?protocol=mqtt",
        Some(API_TOKEN),
    )
    .await
    .1
}

/// `gateway.max_connections_per_ip` changes in place: a raised cap admits the connection it
/// refused, a lowered one refuses new connections and keeps those already in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_change_in_place() {
    let (dir, path) = config_dir("caps");
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
    let page = mqtt_connections(admin).await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2), "{page}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The limits of `[http]`, `[websocket]` and `[mqtt]` change in place: a connected MQTT
/// client may hold the subscriptions a raised `max_subscriptions` allows, a new one is
/// announced the new Receive Maximum, a larger HTTP body and more WebSocket filters are taken;
/// anything else in those sections is still refused (409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_limits_change_in_place() {
    let (dir, path) = config_dir("limits");
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
    assert!(
        body.contains("need a restart, nothing changed: mqtt;"),
        "{body}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first certificate of the PEM file `path` (DER).
fn leaf_der(path: &Path) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .as_ref()
        .to_vec()
}

/// A TLS client trusting every CA in `cas` (PEM files).
fn tls_client(cas: &[&Path]) -> tokio_rustls::TlsConnector {
    let pem: Vec<u8> = cas.iter().flat_map(|p| std::fs::read(p).unwrap()).collect();
    meshgate_core::tls::connector(Some(&pem)).unwrap()
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `addr` (as 127.0.0.1).
async fn tls_connect(addr: std::net::SocketAddr, client: &tokio_rustls::TlsConnector) -> Tls {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(Duration::from_secs(5), client.connect(name, tcp))
        .await
        .expect("a TLS handshake within 5 s")
        .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"))
}

/// The leaf certificate (DER) a TLS connection to `addr` is shown now.
async fn served_leaf(addr: std::net::SocketAddr, client: &tokio_rustls::TlsConnector) -> Vec<u8> {
    let tls = tls_connect(addr, client).await;
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

/// An MQTT packet: `header` and `body` (shorter than 128 bytes: one length byte).
fn mqtt_packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header, u8::try_from(body.len()).unwrap()];
    assert!(body.len() < 128);
    p.extend_from_slice(body);
    p
}

/// An MQTT string: its length (two bytes) and its bytes.
fn mqtt_str(s: &str) -> Vec<u8> {
    let mut v = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// The next MQTT packet read from `tls`, within 5 s: its first byte and its body.
async fn mqtt_read(tls: &mut Tls) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    tokio::time::timeout(Duration::from_secs(5), async {
        let header = tls.read_u8().await.unwrap();
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let b = tls.read_u8().await.unwrap();
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        tls.read_exact(&mut body).await.unwrap();
        (header, body)
    })
    .await
    .expect("an MQTT packet within 5 s")
}

async fn mqtt_write(tls: &mut Tls, packet: &[u8]) {
    use tokio::io::AsyncWriteExt;
    tls.write_all(packet).await.unwrap();
    tls.flush().await.unwrap();
}

/// MQTT 3.1.1 over TLS to `addr` as `id` (clean session, no credentials): accepted.
async fn mqtt_tls(
    addr: std::net::SocketAddr,
    client: &tokio_rustls::TlsConnector,
    id: &str,
) -> Tls {
    let mut tls = tls_connect(addr, client).await;
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend(mqtt_str(id));
    mqtt_write(&mut tls, &mqtt_packet(0x10, &body)).await;
    assert_eq!(mqtt_read(&mut tls).await, (0x20, vec![0, 0]), "CONNACK");
    tls
}

/// A CloudEvents WebSocket client over TLS subscribed to `t/#`, past its greeting.
async fn wss_subscriber(
    addr: std::net::SocketAddr,
    client: &tokio_rustls::TlsConnector,
) -> tokio_tungstenite::WebSocketStream<Tls> {
    let tls = tls_connect(addr, client).await;
    let mut request = format!("wss://{addr}/ws?subscribe=t%2F%23")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    let greeting = next_text(&mut ws).await;
    assert!(greeting.contains("io.meshgate.subscribed"), "{greeting}");
    ws
}

/// The next text frame of `ws`, within 5 s.
async fn next_text(ws: &mut tokio_tungstenite::WebSocketStream<Tls>) -> String {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("the connection is open")
            .unwrap();
        if let Message::Text(t) = frame {
            return t.to_string();
        }
    }
}

/// `meshgate_tls_certificate_expiry_timestamp_seconds{listener}` in a `/metrics` text.
fn expiry(metrics: &str, listener: &str) -> Option<i64> {
    let prefix =
        format!("meshgate_tls_certificate_expiry_timestamp_seconds{{listener=\"{listener}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap())
}

fn now_unix() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(now.as_secs()).unwrap()
}

/// Writes `from` over `to`, beside and renamed (as certbot's deploy hooks and `install` do).
fn copy_over(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// MQTT over TLS and the web listener's HTTPS/WSS serve certificate A; the files are
/// overwritten with B (another CA, valid 30 days instead of 1) and the configuration reloaded:
/// new connections get B, the clients connected before stay and get the next publish; a
/// reload with a broken key is refused naming the key and B stays; a file that names other
/// certificate files is put in force by SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_in_place_and_connected_clients_stay() {
    let dir = std::env::temp_dir().join(format!("meshgate-reload-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ca_a, cert_a, key_a) = meshgate_tests::certs::private_ca(&dir.join("a"));
    let (ca_b, cert_b, key_b) = meshgate_tests::certs::private_ca_valid_for(&dir.join("b"), 30);
    let (der_a, der_b) = (leaf_der(&cert_a), leaf_der(&cert_b));
    assert_ne!(der_a, der_b);
    // Which certificate a connection was shown.
    let name = |der: Vec<u8>| match der {
        d if d == der_a => "A",
        d if d == der_b => "B",
        _ => "another certificate",
    };
    // The files the gateway serves: A's for now.
    let served = dir.join("served");
    std::fs::create_dir_all(&served).unwrap();
    let (cert, key) = (served.join("cert.pem"), served.join("key.pem"));
    copy_over(&cert_a, &cert);
    copy_over(&key_a, &key);
    let config = |cert: &Path, key: &Path| {
        format!(
            r#"
[http]
listen = "127.0.0.1:0"
tls_cert_file = "{cert}"
tls_key_file = "{key}"

[admin]
listen = "127.0.0.1:0"
api_token = "{API_TOKEN}"

[mqtt]
enabled = true
listen = "127.0.0.1:0"
tls_listen = "127.0.0.1:0"
tls_cert_file = "{cert}"
tls_key_file = "{key}"
"#,
            cert = cert.display(),
            key = key.display()
        )
    };
    let path = dir.join("meshgate.toml");
    write(&path, &config(&cert, &key));
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    let mqtts = gw
        .banner
        .iter()
        .filter_map(|l| meshgate_tests::parse_banner_line(l))
        .find(|(label, _, _)| *label == "mqtt-tls")
        .and_then(|(_, _, addr)| addr)
        .unwrap_or_else(|| panic!("no mqtt-tls line in {:?}", gw.banner));
    // Trusting both CAs, so that the certificate shown is what the assertions tell apart.
    let both = tls_client(&[&ca_a, &ca_b]);
    assert_eq!(name(served_leaf(mqtts, &both).await), "A");
    assert_eq!(name(served_leaf(web, &both).await), "A");
    let m = meshgate_tests::metrics(admin).await;
    for listener in ["mqtt", "http"] {
        let expires = expiry(&m, listener).unwrap_or_else(|| panic!("{listener}: {m}"));
        assert!(
            (now_unix()..now_unix() + 2 * 86_400).contains(&expires),
            "A is valid for a day: {expires}"
        );
    }

    // Clients that stay connected across the reload: MQTT over TLS and WSS, both trusting A's
    // CA only, subscribed to t/#.
    let only_a = tls_client(&[&ca_a]);
    let mut old_mqtt = mqtt_tls(mqtts, &only_a, "old-sub").await;
    let mut body = vec![0, 1];
    body.extend(mqtt_str("t/#"));
    body.push(0);
    mqtt_write(&mut old_mqtt, &mqtt_packet(0x82, &body)).await;
    assert_eq!(
        mqtt_read(&mut old_mqtt).await,
        (0x90, vec![0, 1, 0]),
        "SUBACK"
    );
    let mut old_wss = wss_subscriber(web, &only_a).await;

    // B over the same files, then a reload (the file itself unchanged). No TLS connection
    // comes in between: the listeners' own look at their files (at an accepted connection)
    // does not get to it first.
    copy_over(&cert_b, &cert);
    copy_over(&key_b, &key);
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut changed: Vec<&str> = answer["changed"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    changed.sort_unstable();
    assert_eq!(changed, ["http.tls", "mqtt.tls"], "{body}");
    assert_eq!(name(served_leaf(mqtts, &both).await), "B", "MQTT serves B");
    assert_eq!(name(served_leaf(web, &both).await), "B", "HTTPS serves B");
    let m = meshgate_tests::metrics(admin).await;
    for listener in ["mqtt", "http"] {
        let expires = expiry(&m, listener).unwrap_or_else(|| panic!("{listener}: {m}"));
        assert!(
            expires > now_unix() + 20 * 86_400,
            "{listener}: B is valid for 30 days: {expires}"
        );
    }

    // The clients connected before still work: a publisher with B's CA only (a new
    // connection), and both subscribers get its message.
    let only_b = tls_client(&[&ca_b]);
    let mut publisher = mqtt_tls(mqtts, &only_b, "new-pub").await;
    let mut body = mqtt_str("t/1");
    body.extend_from_slice(b"after-reload");
    mqtt_write(&mut publisher, &mqtt_packet(0x30, &body)).await;
    let (header, body) = mqtt_read(&mut old_mqtt).await;
    assert_eq!(header & 0xf0, 0x30, "a PUBLISH on the old connection");
    assert!(body.starts_with(&mqtt_str("t/1")), "{body:?}");
    assert!(body.ends_with(b"after-reload"), "{body:?}");
    mqtt_write(&mut old_mqtt, &[0xc0, 0]).await;
    assert_eq!(mqtt_read(&mut old_mqtt).await, (0xd0, vec![]), "PINGRESP");
    let event = next_text(&mut old_wss).await;
    assert!(event.contains("\"subject\":\"t/1\""), "{event}");

    // A broken key: refused, naming the key of each listener, and B is still served.
    std::fs::write(&key, "not a key").unwrap();
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("mqtt.tls_key_file") && body.contains("http.tls_key_file"),
        "{body}"
    );
    assert_eq!(name(served_leaf(mqtts, &both).await), "B");
    assert_eq!(name(served_leaf(web, &both).await), "B");
    // (Also after the listeners' own look at the changed file, a second later.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(name(served_leaf(mqtts, &both).await), "B");
    assert_eq!(name(served_leaf(web, &both).await), "B");

    // Other paths in the file (A's own files): put in force by SIGHUP, no restart needed.
    write(&path, &config(&cert_a, &key_a));
    gw.signal("HUP");
    let d = Deadline::after(Duration::from_secs(10));
    while name(served_leaf(mqtts, &both).await) != "A" {
        assert!(!d.passed(), "MQTT does not serve A's files after SIGHUP");
        d.pause().await;
    }
    assert_eq!(
        name(served_leaf(web, &both).await),
        "A",
        "HTTPS serves A's files"
    );
    // The old connection is still there.
    mqtt_write(&mut old_mqtt, &[0xc0, 0]).await;
    assert_eq!(mqtt_read(&mut old_mqtt).await, (0xd0, vec![]), "PINGRESP");
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The admin listener's HTTPS, reloaded in process (`Reloader::apply`): new files are served
/// and named, the same ones again change nothing, a key that does not load is refused naming
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listeners_certificate_reloads_in_place() {
    let dir = std::env::temp_dir().join(format!("meshgate-reload-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ca_a, cert_a, key_a) = meshgate_tests::certs::private_ca(&dir.join("a"));
    let (ca_b, cert_b, key_b) = meshgate_tests::certs::private_ca(&dir.join("b"));
    let mut config = meshgate_tests::test_config();
    config.admin.tls = Some(meshgate_config::ServerTlsConfig {
        cert_file: cert_a.clone(),
        key_file: key_a,
    });
    let gw = meshgate_tests::start_gateway(config.clone()).await;
    let admin = gw.admin_addr.unwrap();
    let both = tls_client(&[&ca_a, &ca_b]);
    let (der_a, der_b) = (leaf_der(&cert_a), leaf_der(&cert_b));
    let name = |der: Vec<u8>| match der {
        d if d == der_a => "A",
        d if d == der_b => "B",
        _ => "another certificate",
    };
    assert_eq!(name(served_leaf(admin, &both).await), "A");

    let mut next = config.clone();
    next.admin.tls = Some(meshgate_config::ServerTlsConfig {
        cert_file: cert_b.clone(),
        key_file: key_b.clone(),
    });
    let reloader = gw.reloader();
    let done = reloader.apply(next.clone()).await.unwrap();
    assert_eq!(done.changed, ["admin.tls"]);
    assert_eq!(name(served_leaf(admin, &both).await), "B");
    assert!(
        gw.registry
            .render()
            .contains("meshgate_tls_certificate_expiry_timestamp_seconds{listener=\"admin\"}"),
        "{}",
        gw.registry.render()
    );
    // The same files again: nothing to put in force.
    let done = reloader.apply(next.clone()).await.unwrap();
    assert!(done.changed.is_empty(), "{:?}", done.changed);
    // A key that does not load.
    let broken = dir.join("broken.pem");
    std::fs::write(&broken, "not a key").unwrap();
    let mut bad = next.clone();
    bad.admin.tls = Some(meshgate_config::ServerTlsConfig {
        cert_file: cert_b.clone(),
        key_file: broken,
    });
    let err = reloader.apply(bad).await.unwrap_err().to_string();
    assert!(err.contains("admin.tls_key_file"), "{err}");
    assert_eq!(name(served_leaf(admin, &both).await), "B");
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Lowered connection caps of `[mqtt]` and `[http]` refuse newcomers and keep who is in; raised
/// again, they admit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowered_connection_caps_refuse_newcomers_and_keep_who_is_in() {
    let (dir, path) = config_dir("lowered");
    let caps = |n: usize| {
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\nmax_connections = {n}\n[admin]\nlisten = \"127.0.0.1:0\"\napi_token = \"{API_TOKEN}\"\n[mqtt]\nenabled = true\nlisten = \"127.0.0.1:0\"\nmax_connections = {n}\n"
        )
    };
    write(&path, &caps(3));
    let gw = spawn(&["-c", path.to_str().unwrap()], &[]);
    let (port, admin, web) = (gw.mqtt.unwrap().port(), gw.admin.unwrap(), gw.web.unwrap());
    let _a = connect_anonymous(port, "in-1").await.unwrap();
    let _b = connect_anonymous(port, "in-2").await.unwrap();
    // Two idle sockets on the web listener hold two of its slots.
    let held: Vec<tokio::net::TcpStream> = vec![
        tokio::net::TcpStream::connect(web).await.unwrap(),
        tokio::net::TcpStream::connect(web).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let web_answer = || async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(web).await.unwrap();
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
        String::from_utf8_lossy(&reply)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    };

    write(&path, &caps(1));
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let refused = connect_anonymous(port, "new-1").await;
    assert!(
        matches!(&refused, Err(e) if e.contains("ServerBusy")),
        "over the lowered mqtt.max_connections: {:?}",
        refused.as_ref().map(|_| ())
    );
    let line = web_answer().await;
    assert!(
        line.contains("503"),
        "over the lowered http.max_connections: {line:?}"
    );
    // Those already in stay.
    let page = mqtt_connections(admin).await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2), "{page}");

    write(&path, &caps(4));
    let (status, body) = post_reload(admin, Some(API_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let _c = connect_anonymous(port, "new-2")
        .await
        .unwrap_or_else(|e| panic!("admitted under the raised mqtt.max_connections: {e}"));
    let line = web_answer().await;
    assert!(
        line.contains("404") || line.contains("200"),
        "admitted on the web listener: {line:?}"
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}
