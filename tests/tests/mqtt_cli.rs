//! Mosquitto's command-line clients (real MQTT clients no one here wrote) against meshgate:
//! MQTT → WebSocket, HTTP → MQTT 5 and 3.1.1 subscribers, v5 binary ↔ 3.1.1 structured.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::process::{Command, Stdio};
use std::time::Duration;

use meshgate_core::{ExtensionValue, json};
use meshgate_tests::{next_event, test_config, wait_metric, ws_connect};

fn mqtt_config() -> meshgate_config::Config {
    let mut c = test_config();
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_reaches_a_websocket_client() {
    let gw = meshgate::start(mqtt_config()).await.unwrap();
    let mqtt = gw.mqtt_addr.unwrap();
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["plant/#"]).await;
    // MQTT 3.1.1, QoS 1, a plain payload: wrapped into a CloudEvent.
    let status = meshgate_tests::mosquitto_command("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.port().to_string(),
            "-V",
            "mqttv311",
            "-q",
            "1",
        ])
        .args(["-i", "press-7", "-t", "plant/press/7", "-m", "42.5"])
        .status()
        .unwrap();
    assert!(status.success());
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.subject(), Some("plant/press/7"));
    assert_eq!(e.source(), "/meshgate/mqtt/press-7");
    assert_eq!(e.ty(), "io.meshgate.mqtt.message");
    assert_eq!(e.data().unwrap().to_bytes(), &b"42.5"[..]);
    // MQTT 5 binary mode with user properties and Content Type: a CloudEvent as is.
    let status = meshgate_tests::mosquitto_command("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.port().to_string(),
            "-V",
            "mqttv5",
            "-q",
            "2",
        ])
        .args(["-t", "plant/line/1", "-m", r#"{"rpm":900}"#])
        .args(["-D", "publish", "content-type", "application/json"])
        .args(["-D", "publish", "user-property", "specversion", "1.0"])
        .args(["-D", "publish", "user-property", "id", "M5-1"])
        .args(["-D", "publish", "user-property", "source", "/plant/line/1"])
        .args(["-D", "publish", "user-property", "type", "com.example.rpm"])
        .args(["-D", "publish", "user-property", "shift", "night"])
        .status()
        .unwrap();
    assert!(status.success());
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.id(), "M5-1");
    assert_eq!(e.datacontenttype(), Some("application/json"));
    assert_eq!(
        e.extension("shift"),
        Some(&ExtensionValue::String("night".into()))
    );
    assert_eq!(e.data().unwrap().to_bytes(), &br#"{"rpm":900}"#[..]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_events_reach_mosquitto_sub_v5_binary_and_v311_structured() {
    let gw = meshgate::start(mqtt_config()).await.unwrap();
    let port = gw.mqtt_addr.unwrap().port().to_string();
    let spawn_sub = |version: &str, format: &str| {
        meshgate_tests::mosquitto_command("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1"])
            .args(["-t", "orders/#", "-C", "1", "-W", "10", "-F", format])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let sub5 = spawn_sub("mqttv5", "%t|%C|%P|%p");
    let sub3 = spawn_sub("mqttv311", "%t|%p");
    // Wait until both subscriptions exist on the backbone.
    wait_metric(
        gw.admin_addr.unwrap(),
        "meshgate_backbone_subscriptions{backbone=\"memory\"} 2",
    )
    .await;
    let r = reqwest::Client::new()
        .post(format!("http://{}/events/orders/42", gw.web_addr.unwrap()))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"O42","source":"/shop","type":"com.example.order","priority":2,"express":true,"datacontenttype":"application/json","data":{"sku":"X1"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let out5 = String::from_utf8(sub5.wait_with_output().unwrap().stdout).unwrap();
    let out3 = String::from_utf8(sub3.wait_with_output().unwrap().stdout).unwrap();
    // MQTT 5: binary mode, attributes as unprefixed user properties.
    let parts: Vec<&str> = out5.trim_end().splitn(4, '|').collect();
    assert_eq!(parts[0], "orders/42", "{out5}");
    assert_eq!(parts[1], "application/json", "{out5}");
    for prop in [
        "specversion:1.0",
        "id:O42",
        "source:/shop",
        "priority:2",
        "express:true",
    ] {
        assert!(parts[2].contains(prop), "user properties {prop}: {out5}");
    }
    assert_eq!(parts[3], r#"{"sku":"X1"}"#, "{out5}");
    // MQTT 3.1.1: structured JSON with the extension types intact.
    let (topic, payload) = out3.trim_end().split_once('|').unwrap();
    assert_eq!(topic, "orders/42");
    let e = json::decode(payload.as_bytes()).unwrap();
    assert_eq!(e.extension("priority"), Some(&ExtensionValue::Integer(2)));
    assert_eq!(e.extension("express"), Some(&ExtensionValue::Boolean(true)));
    gw.shutdown().await;
}

/// Runs mosquitto_pub against `port` with `args`, and checks that it succeeded.
fn mosquitto_pub(port: &str, args: &[&str]) {
    let status = meshgate_tests::mosquitto_command("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", port])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "mosquitto_pub {args:?}");
}

/// `mosquitto_sub -c` (3.1.1, clean session off) as client `keeper`, until `count` messages,
/// printed as `topic|qos|retain|payload` lines.
fn keeper_sub(port: &str, count: &str) -> std::process::Child {
    meshgate_tests::mosquitto_command("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", port, "-V", "mqttv311"])
        .args(["-c", "-i", "keeper", "-q", "2", "-t", "fleet/#"])
        .args(["-C", count, "-W", "10", "-F", "%t|%q|%r|%p"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A `topic|qos|retain|payload` line: plain messages reach MQTT subscribers as published.
fn published_data(line: &str) -> (String, String, String, Vec<u8>) {
    let mut parts = line.splitn(4, '|');
    let mut next = || parts.next().unwrap().to_owned();
    let (topic, qos, retain, payload) = (next(), next(), next(), next());
    (topic, qos, retain, payload.into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_persistent_session_gets_what_was_published_while_away() {
    let gw = meshgate::start(mqtt_config()).await.unwrap();
    let port = gw.mqtt_addr.unwrap().port().to_string();
    mosquitto_pub(
        &port,
        &["-r", "-q", "1", "-t", "fleet/status", "-m", "online"],
    );
    // First visit: the subscription is made and the retained message arrives; the client
    // leaves with a DISCONNECT, its session stays.
    let first = keeper_sub(&port, "1").wait_with_output().unwrap();
    let out = String::from_utf8(first.stdout).unwrap();
    let (topic, _, retain, data) = published_data(out.trim_end());
    assert_eq!((topic.as_str(), retain.as_str()), ("fleet/status", "1"));
    assert_eq!(data, b"online");
    // While it is away: QoS 2 and QoS 1 messages are kept for it.
    mosquitto_pub(
        &port,
        &["-q", "2", "-t", "fleet/truck/1", "-m", "exactly-once"],
    );
    mosquitto_pub(
        &port,
        &["-q", "1", "-t", "fleet/truck/2", "-m", "at-least-once"],
    );
    // Second visit: both queued messages, each once and at its QoS, then (because the client
    // subscribes again) the retained message.
    let second = keeper_sub(&port, "3").wait_with_output().unwrap();
    assert!(second.status.success(), "mosquitto_sub timed out");
    let out = String::from_utf8(second.stdout).unwrap();
    let mut lines: Vec<_> = out.lines().map(published_data).collect();
    assert_eq!(lines.len(), 3, "{out}");
    // libmosquitto hands a QoS 2 message to the program only at PUBREL, so the others may
    // print first: compare in topic order.
    lines.sort();
    let seen: Vec<_> = lines
        .iter()
        .map(|(t, q, r, d)| {
            (
                t.as_str(),
                q.as_str(),
                r.as_str(),
                String::from_utf8_lossy(d),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("fleet/status", "1", "1", "online".into()),
            ("fleet/truck/1", "2", "0", "exactly-once".into()),
            ("fleet/truck/2", "1", "0", "at-least-once".into()),
        ]
    );
    gw.shutdown().await;
}

/// A self-signed certificate for 127.0.0.1 made with the openssl command (cert, key paths).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=meshgate-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs (Debian package openssl)");
    assert!(status.success());
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_mosquitto_clients() {
    let dir = std::env::temp_dir().join(format!("meshgate-tls-{}", std::process::id()));
    let (cert, key) = self_signed(&dir);
    let mut config = mqtt_config();
    config.mqtt.tls = Some(meshgate_config::MqttTlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_file: cert.clone(),
        key_file: key,
        client_ca_file: None,
        client_auth: meshgate_config::ClientAuthMode::None,
        identity: meshgate_config::CertificateIdentity::CommonName,
    });
    let gw = meshgate::start(config).await.unwrap();
    let port = gw.mqtt_tls_addr.unwrap().port().to_string();
    let cafile = cert.to_str().unwrap();
    // A client speaking plain MQTT to the TLS port fails its handshake, and nothing else.
    let plain = meshgate_tests::mosquitto_command("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "secure/x",
            "-m",
            "clear",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!plain.success(), "plain MQTT must not work on the TLS port");
    let sub = meshgate_tests::mosquitto_command("mosquitto_sub")
        .args([
            "--cafile",
            cafile,
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            "mqttv5",
        ])
        .args([
            "-t", "secure/#", "-q", "1", "-C", "1", "-W", "10", "-F", "%t|%p",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_metric(
        gw.admin_addr.unwrap(),
        "meshgate_mqtt_subscriptions{adapter=\"mqtt\"} 1",
    )
    .await;
    let status = meshgate_tests::mosquitto_command("mosquitto_pub")
        .args([
            "--cafile",
            cafile,
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
        ])
        .args(["-t", "secure/door", "-m", "locked"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = sub.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim_end(),
        "secure/door|locked"
    );
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_key_that_is_not_a_key_is_a_start_error_naming_the_setting() {
    let dir = std::env::temp_dir().join(format!("meshgate-badtls-{}", std::process::id()));
    let (cert, _) = self_signed(&dir);
    let mut config = mqtt_config();
    config.mqtt.tls = Some(meshgate_config::MqttTlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_file: cert.clone(),
        key_file: cert,
        client_ca_file: None,
        client_auth: meshgate_config::ClientAuthMode::None,
        identity: meshgate_config::CertificateIdentity::CommonName,
    });
    let err = meshgate::start(config).await.err().unwrap().to_string();
    assert!(err.contains("mqtt.tls_key_file"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
