//! ACLs like a broker's (issue 20 item 3), against the gateway with real clients: rumqttc
//! (MQTT 5 and 3.1.1), Mosquitto's command-line clients, WebSocket and HTTP.
//!
//! - "everything except subscribing to `test/nosubscribe`" (the Paho interoperability suite's
//!   `test_subscribe_failure`): SUBACK 0x80 / 0x87 for that filter, publishing to it still
//!   allowed, and a wider subscription (`test/#`, `#`) granted without delivering it — live or
//!   retained — as Mosquitto does;
//! - a deny wins over any allow, whatever the order;
//! - `{user}` and `{clientid}` templates (a device publishes only under `devices/{clientid}/`);
//! - `#` grants no `$SYS/…`: it must be listed;
//! - WebSocket (403, error frame) and HTTP (403) honour the deny rules too.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::process::Stdio;
use std::time::Duration;

use futures_util::SinkExt;
use meshgate_tests::{next_event, start_gateway, test_config};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Anonymous clients may do everything except subscribe to `test/nosubscribe`; so may user
/// `tester`. `dev` publishes only under its client id and its name; `ordered` lists an allow
/// before and after the deny that wins; `sys` may see `$SYS/#` because it lists it.
const ACL: &str = r##"
[auth]
allow_plaintext_passwords = true

[auth.anonymous]
enabled = true
publish = ["#"]
subscribe = ["#"]
deny_subscribe = ["test/nosubscribe"]

[[auth.users]]
name = "tester"
password = "tester-pw"
publish = ["#"]
subscribe = ["#"]
deny_subscribe = ["test/nosubscribe"]

[[auth.users]]
name = "dev"
password = "dev-pw"
publish = ["devices/{clientid}/#", "users/{user}/#"]
subscribe = ["commands/{clientid}/#"]

[[auth.users]]
name = "ordered"
password = "ordered-pw"
publish = ["a/b/c", "a/#", "a/b/c"]
deny_publish = ["a/b/#"]
subscribe = ["#"]

[[auth.users]]
name = "web"
tokens = ["web-token-123"]
publish = ["#"]
deny_publish = ["secret/#"]
subscribe = ["#"]
deny_subscribe = ["test/nosubscribe"]

[[auth.users]]
name = "sys"
password = "sys-pw"
publish = ["#", "$SYS/#"]
subscribe = ["#", "$SYS/#"]

[[auth.users]]
name = "fleet"
password = "fleet-pw"
publish = ["#"]
subscribe = ["#"]
client_id_prefixes = ["{user}-", "legacy-"]
"##;

async fn gateway() -> meshgate::RunningGateway {
    let mut c = meshgate_config::load_str(ACL, "acl.toml", Vec::new()).unwrap();
    let t = test_config();
    c.http.listen = t.http.listen;
    c.admin.listen = t.admin.listen;
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    start_gateway(c).await
}

/// An MQTT 5 client, connected.
async fn v5(
    gw: &meshgate::RunningGateway,
    id: &str,
    login: Option<(&str, &str)>,
) -> (AsyncClient, EventLoop) {
    let addr = gw.mqtt_addr.unwrap();
    let mut o = MqttOptions::new(id, "127.0.0.1", addr.port());
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    let (client, mut el) = AsyncClient::new(o, 100);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .expect("CONNACK within 5 s")
            .unwrap()
        {
            Event::Incoming(Packet::ConnAck(_)) => return (client, el),
            _ => continue,
        }
    }
}

/// The next packet from the server of the kind `pick` takes.
async fn next<T>(el: &mut EventLoop, mut pick: impl FnMut(Packet) -> Option<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Event::Incoming(p) = el.poll().await.unwrap()
                && let Some(t) = pick(p)
            {
                return t;
            }
        }
    })
    .await
    .expect("the packet within 5 s")
}

async fn v5_subscribe(c: &AsyncClient, el: &mut EventLoop, filter: &str) -> SubscribeReasonCode {
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    next(el, |p| match p {
        Packet::SubAck(s) => Some(s.return_codes[0]),
        _ => None,
    })
    .await
}

async fn v5_publish(
    c: &AsyncClient,
    el: &mut EventLoop,
    topic: &str,
    retain: bool,
) -> PubAckReason {
    c.publish(topic, QoS::AtLeastOnce, retain, topic.as_bytes().to_vec())
        .await
        .unwrap();
    next(el, |p| match p {
        Packet::PubAck(a) => Some(a.reason),
        _ => None,
    })
    .await
}

/// The topic of the next PUBLISH the client receives.
async fn v5_next_topic(el: &mut EventLoop) -> String {
    next(el, |p| match p {
        Packet::Publish(p) => Some(String::from_utf8(p.topic.to_vec()).unwrap()),
        _ => None,
    })
    .await
}

/// An MQTT 3.1.1 client, connected.
async fn v311(
    gw: &meshgate::RunningGateway,
    id: &str,
    login: Option<(&str, &str)>,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let addr = gw.mqtt_addr.unwrap();
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", addr.port());
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    v311_next(&mut el, |p| match p {
        rumqttc::Packet::ConnAck(_) => Some(()),
        _ => None,
    })
    .await;
    (client, el)
}

async fn v311_next<T>(
    el: &mut rumqttc::EventLoop,
    mut pick: impl FnMut(rumqttc::Packet) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let rumqttc::Event::Incoming(p) = el.poll().await.unwrap()
                && let Some(t) = pick(p)
            {
                return t;
            }
        }
    })
    .await
    .expect("the packet within 5 s")
}

async fn v311_subscribe(
    c: &rumqttc::AsyncClient,
    el: &mut rumqttc::EventLoop,
    filter: &str,
) -> rumqttc::SubscribeReasonCode {
    c.subscribe(filter, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    v311_next(el, |p| match p {
        rumqttc::Packet::SubAck(s) => Some(s.return_codes[0]),
        _ => None,
    })
    .await
}

/// The Paho suite's `test_subscribe_failure`, for an anonymous client and for a user, with
/// rumqttc 3.1.1 (0x80) and MQTT 5 (0x87); publishing to the topic stays allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_except_subscribing_to_test_nosubscribe() {
    let gw = gateway().await;
    for login in [None, Some(("tester", "tester-pw"))] {
        let who = login.map_or("anonymous", |l| l.0);
        let (c3, mut el3) = v311(&gw, &format!("{who}-3"), login).await;
        assert_eq!(
            v311_subscribe(&c3, &mut el3, "test/nosubscribe").await,
            rumqttc::SubscribeReasonCode::Failure,
            "{who}: 3.1.1 SUBACK 0x80"
        );
        assert_eq!(
            v311_subscribe(&c3, &mut el3, "test/other").await,
            rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce),
            "{who}"
        );
        let (c5, mut el5) = v5(&gw, &format!("{who}-5"), login).await;
        assert_eq!(
            v5_subscribe(&c5, &mut el5, "test/nosubscribe").await,
            SubscribeReasonCode::NotAuthorized,
            "{who}: MQTT 5 SUBACK 0x87"
        );
        assert_eq!(
            v5_publish(&c5, &mut el5, "test/nosubscribe", false).await,
            PubAckReason::Success,
            "{who}: publishing to it is allowed"
        );
        // The connection goes on: what was granted still works.
        assert_eq!(
            v5_publish(&c5, &mut el5, "test/other", false).await,
            PubAckReason::Success
        );
        let got = v311_next(&mut el3, |p| match p {
            rumqttc::Packet::Publish(p) => Some(p.topic),
            _ => None,
        })
        .await;
        assert_eq!(got, "test/other", "{who}");
    }
    gw.shutdown().await;
}

/// A subscription wider than the denied topic (`test/#`, `+/+`, `#`) is granted, as Mosquitto
/// grants it, and messages on the denied topic — live or retained — are not delivered on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wider_subscriptions_do_not_deliver_the_denied_topic() {
    let gw = gateway().await;
    let (p, mut pel) = v5(&gw, "publisher", None).await;
    // Retained messages first, on the denied topic and beside it.
    for t in ["test/nosubscribe", "test/retained"] {
        assert_eq!(
            v5_publish(&p, &mut pel, t, true).await,
            PubAckReason::Success
        );
    }
    for (i, filter) in ["test/#", "+/+", "#"].into_iter().enumerate() {
        let (s, mut sel) = v5(&gw, &format!("wide-{i}"), Some(("tester", "tester-pw"))).await;
        assert_eq!(
            v5_subscribe(&s, &mut sel, filter).await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            "{filter} is granted"
        );
        assert_eq!(
            v5_next_topic(&mut sel).await,
            "test/retained",
            "{filter}: the denied retained message is not sent"
        );
        assert_eq!(
            v5_publish(&p, &mut pel, "test/nosubscribe", false).await,
            PubAckReason::Success
        );
        assert_eq!(
            v5_publish(&p, &mut pel, "test/after", false).await,
            PubAckReason::Success
        );
        assert_eq!(
            v5_next_topic(&mut sel).await,
            "test/after",
            "{filter}: the live message on the denied topic is not delivered"
        );
    }
    gw.shutdown().await;
}

/// Mosquitto's clients see the same refusals: `mosquitto_sub -d` prints the SUBACK codes (128
/// in 3.1.1, 135 in MQTT 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_is_refused_test_nosubscribe() {
    let gw = gateway().await;
    let port = gw.mqtt_addr.unwrap().port().to_string();
    for (version, code, login) in [
        ("mqttv311", "128", None),
        ("mqttv5", "135", None),
        ("mqttv5", "135", Some(("tester", "tester-pw"))),
    ] {
        let mut cmd = meshgate_tests::mosquitto_command("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-d"])
            .args(["-t", "test/nosubscribe", "-W", "3"]);
        if let Some((u, p)) = login {
            cmd.args(["-u", u, "-P", p]);
        }
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!("Subscribed (mid: 1): {code}")),
            "{version} {login:?}: {text}"
        );
    }
    gw.shutdown().await;
}

/// A deny wins over any allow, whatever the order: `ordered` lists `a/b/c` and `a/#` as allowed
/// before and after the deny of `a/b/#`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_wins_over_every_allow() {
    let gw = gateway().await;
    let (c, mut el) = v5(&gw, "ordered-1", Some(("ordered", "ordered-pw"))).await;
    for (topic, expected) in [
        ("a/b/c", PubAckReason::NotAuthorized),
        ("a/b", PubAckReason::NotAuthorized),
        ("a/b/d/e", PubAckReason::NotAuthorized),
        ("a/c", PubAckReason::Success),
        ("a", PubAckReason::Success),
        ("b", PubAckReason::NotAuthorized),
    ] {
        assert_eq!(
            v5_publish(&c, &mut el, topic, false).await,
            expected,
            "{topic}"
        );
    }
    // mosquitto_pub as the same user: refused at QoS 1 (-d prints the PUBACK reason).
    let out = meshgate_tests::mosquitto_command("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &gw.mqtt_addr.unwrap().port().to_string(),
        ])
        .args([
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-u",
            "ordered",
            "-P",
            "ordered-pw",
            "-d",
        ])
        .args(["-t", "a/b/c", "-m", "x"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("not authorised") || text.contains("135"),
        "{text}"
    );
    gw.shutdown().await;
}

/// `{clientid}` and `{user}`: device `d7` (user `dev`) publishes under `devices/d7/` and
/// `users/dev/`, nowhere else, and subscribes only under `commands/d7/`; its will is checked
/// with the same rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_and_user_templates() {
    let gw = gateway().await;
    let (c, mut el) = v5(&gw, "d7", Some(("dev", "dev-pw"))).await;
    for (topic, expected) in [
        ("devices/d7/temp", PubAckReason::Success),
        ("devices/d7", PubAckReason::Success),
        ("users/dev/x", PubAckReason::Success),
        ("devices/d8/temp", PubAckReason::NotAuthorized),
        ("devices/{clientid}/temp", PubAckReason::NotAuthorized),
        ("users/other/x", PubAckReason::NotAuthorized),
    ] {
        assert_eq!(
            v5_publish(&c, &mut el, topic, false).await,
            expected,
            "{topic}"
        );
    }
    assert_eq!(
        v5_subscribe(&c, &mut el, "commands/d7/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    assert_eq!(
        v5_subscribe(&c, &mut el, "commands/+/#").await,
        SubscribeReasonCode::NotAuthorized
    );
    // Another device of the same user: its own id only.
    let (c8, mut el8) = v5(&gw, "d8", Some(("dev", "dev-pw"))).await;
    assert_eq!(
        v5_publish(&c8, &mut el8, "devices/d7/temp", false).await,
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        v5_publish(&c8, &mut el8, "devices/d8/temp", false).await,
        PubAckReason::Success
    );
    // A client id that would widen the filter (`+`) binds nothing.
    let (cw, mut elw) = v5(&gw, "+", Some(("dev", "dev-pw"))).await;
    assert_eq!(
        v5_publish(&cw, &mut elw, "devices/d7/temp", false).await,
        PubAckReason::NotAuthorized
    );
    // A will outside `devices/{clientid}/` is refused at CONNECT (MQTT 5: 0x87).
    let addr = gw.mqtt_addr.unwrap();
    for (id, will_topic, accepted) in [
        ("d9", "devices/d9/status", true),
        ("d9", "devices/d7/status", false),
    ] {
        let mut o = MqttOptions::new(id, "127.0.0.1", addr.port());
        o.set_credentials("dev", "dev-pw");
        o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            will_topic,
            "offline",
            QoS::AtLeastOnce,
            false,
            None,
        ));
        let (_c, mut el) = AsyncClient::new(o, 10);
        let r = tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .unwrap();
        match r {
            Ok(Event::Incoming(Packet::ConnAck(_))) => assert!(accepted, "{will_topic}"),
            Err(e) => assert!(!accepted, "{will_topic}: {e}"),
            other => panic!("{other:?}"),
        }
    }
    gw.shutdown().await;
}

/// `#` grants nothing under `$SYS` [MQTT-4.7.2-1], for subscribing or publishing; `$SYS/#`
/// listed does.
/// Per-user client-id prefixes (issue 22 item 4): `fleet` may only use ids starting with
/// `fleet-` or `legacy-`; an id it leaves empty is assigned with its first prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_must_start_with_the_users_prefixes() {
    let gw = gateway().await;
    let port = gw.mqtt_addr.unwrap().port();
    let code = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_credentials("fleet", "fleet-pw");
        let (_c, mut el) = AsyncClient::new(o, 10);
        async move {
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            return (ack.code, ack.properties);
                        }
                        Ok(_) => continue,
                        Err(rumqttc::v5::ConnectionError::ConnectionRefused(c)) => {
                            return (c, None);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            })
            .await
            .expect("a CONNACK within 5 s")
        }
    };
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
    assert_eq!(code("fleet-7").await.0, ConnectReturnCode::Success);
    assert_eq!(code("legacy-7").await.0, ConnectReturnCode::Success);
    assert_eq!(
        code("other-7").await.0,
        ConnectReturnCode::ClientIdentifierNotValid
    );
    let (ok, props) = code("").await;
    assert_eq!(ok, ConnectReturnCode::Success);
    let assigned = props
        .and_then(|p| p.assigned_client_identifier)
        .expect("an assigned id");
    assert!(assigned.starts_with("fleet-"), "{assigned}");
    // 3.1.1 (mosquitto_pub): "identifier rejected".
    let out = meshgate_tests::mosquitto_command("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args([
            "-i", "other-8", "-u", "fleet", "-P", "fleet-pw", "-t", "x", "-m", "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("identifier rejected"), "{err}");
    // Users without prefixes use any id.
    let (_c, _el) = v5(&gw, "other-9", Some(("tester", "tester-pw"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_grants_no_dollar_topics() {
    let gw = gateway().await;
    let (c, mut el) = v5(&gw, "anon-sys", None).await;
    for filter in ["$SYS/#", "$SYS/broker/load", "$SYS/+"] {
        assert_eq!(
            v5_subscribe(&c, &mut el, filter).await,
            SubscribeReasonCode::NotAuthorized,
            "{filter}"
        );
    }
    assert_eq!(
        v5_publish(&c, &mut el, "$SYS/x", false).await,
        PubAckReason::NotAuthorized
    );
    let (s, mut sel) = v5(&gw, "sys-sys", Some(("sys", "sys-pw"))).await;
    assert_eq!(
        v5_subscribe(&s, &mut sel, "$SYS/#").await,
        SubscribeReasonCode::Success(QoS::AtLeastOnce)
    );
    assert_eq!(
        v5_publish(&s, &mut sel, "$SYS/x", false).await,
        PubAckReason::Success
    );
    assert_eq!(v5_next_topic(&mut sel).await, "$SYS/x");
    gw.shutdown().await;
}

/// WebSocket: a denied filter is refused with 403 at the upgrade and with an error frame when
/// subscribed later; a wider filter does not deliver the denied topic; a publish frame to a
/// denied topic gets an error frame. HTTP: a denied publish is 403. (User `web`, a token.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_http_honour_deny_rules() {
    let gw = gateway().await;
    let web = gw.web_addr.unwrap();
    let token = "web-token-123";
    let upgrade = |filter: &str| {
        reqwest::Client::new()
            .get(format!(
                "http://{web}/ws?access_token={token}&subscribe={}",
                filter.replace('#', "%23")
            ))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-protocol", meshgate_tests::SUBPROTOCOL)
            .send()
    };
    assert_eq!(upgrade("test/nosubscribe").await.unwrap().status(), 403);
    assert_eq!(upgrade("test/#").await.unwrap().status(), 101);

    let mut ws = ws_connect_as(web, token, "test/#").await;
    let control = |ty: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"c1","source":"/t","type":"{ty}","data":{{"filters":["test/nosubscribe"]}}}}"#
        )
    };
    ws.send(Message::text(control("io.meshgate.subscribe")))
        .await
        .unwrap();
    let refused = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(refused.ty(), "io.meshgate.error");
    assert!(
        format!("{:?}", refused.data()).contains("forbidden"),
        "{refused:?}"
    );
    let subscribed = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(subscribed.ty(), "io.meshgate.subscribed");
    assert!(!format!("{:?}", subscribed.data()).contains("nosubscribe"));
    // A publish frame to a denied topic.
    ws.send(Message::text(
        r#"{"specversion":"1.0","id":"p1","source":"/t","type":"t","subject":"secret/x"}"#,
    ))
    .await
    .unwrap();
    let refused = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(refused.ty(), "io.meshgate.error");
    assert!(
        format!("{:?}", refused.data()).contains("forbidden"),
        "{refused:?}"
    );

    let http = reqwest::Client::new();
    let post = |topic: &str| {
        http.post(format!("http://{web}/events/{topic}"))
            .bearer_auth(token)
            .header("content-type", "application/cloudevents+json")
            .body(format!(
                r#"{{"specversion":"1.0","id":"{topic}","source":"/t","type":"t"}}"#
            ))
            .send()
    };
    assert_eq!(post("secret/x").await.unwrap().status(), 403);
    for topic in ["test/nosubscribe", "test/after"] {
        assert_eq!(post(topic).await.unwrap().status(), 202, "{topic}");
    }
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.id(), "test/after", "the denied topic is skipped");
    gw.shutdown().await;
}

/// A CloudEvents WebSocket as the user of `token`, subscribed to `filter`, past its first
/// `io.meshgate.subscribed` event.
async fn ws_connect_as(web: std::net::SocketAddr, token: &str, filter: &str) -> meshgate_tests::Ws {
    let url = format!(
        "ws://{web}/ws?access_token={token}&subscribe={}",
        filter.replace('#', "%23")
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        meshgate_tests::SUBPROTOCOL.parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let first = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.ty(), "io.meshgate.subscribed");
    ws
}

/// `meshgate validate` names the key of each bad ACL entry: a malformed deny filter, a
/// misspelt template, a deny list that is not a list.
#[test]
fn acl_config_errors_name_the_key() {
    let dir = std::env::temp_dir().join(format!("meshgate-acl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad-acl.toml");
    std::fs::write(
        &bad,
        r##"
[auth.anonymous]
enabled = true
deny_subscribe = ["test/#/x"]

[[auth.users]]
name = "dev"
tokens = ["dev-token-0001"]
publish = ["devices/{client_id}/#"]
deny_publish = "devices/x"
"##,
    )
    .unwrap();
    let out = std::process::Command::new(meshgate_tests::binary())
        .args(["validate", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for (key, says) in [
        (
            "auth.anonymous.deny_subscribe[0]",
            "`#` must be the last level",
        ),
        ("auth.users[0]", "deny_publish"),
    ] {
        assert!(
            err.lines().any(|l| l.contains(key) && l.contains(says)),
            "{key}: {says}: {err}"
        );
    }
    // Once the list is a list, the template is checked too.
    std::fs::write(
        &bad,
        "[[auth.users]]\nname = \"dev\"\ntokens = [\"dev-token-0001\"]\npublish = [\"devices/{client_id}/#\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(meshgate_tests::binary())
        .args(["validate", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("auth.users[0].publish[0]") && err.contains("unknown template `{client_id}`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
