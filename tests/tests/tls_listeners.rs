//! TLS where a user expects it (issue 22 item 3), with certificates made by openssl at test
//! time: HTTPS and WSS on the web listener (curl, reqwest, tokio-tungstenite over rustls),
//! HTTPS on the admin listener, MQTT over TLS with client certificates (mosquitto_pub with
//! `--cafile/--cert/--key`): required, from another CA, naming a user that may or may not log in
//! by certificate; and certificates replaced on disk while clients stay connected.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use meshgate_tests::certs::{client_cert, private_ca};
use meshgate_tests::{mosquitto_command, start_gateway, test_config};
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("meshgate-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A TLS client trusting the CA in `ca` (and the system's roots): meshgate's own outbound
/// TLS client.
fn connector(ca: &Path) -> tokio_rustls::TlsConnector {
    meshgate_core::tls::connector(Some(&std::fs::read(ca).unwrap())).unwrap()
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// The next text frame as JSON, within 5 s.
async fn next_json(ws: &mut Wss) -> serde_json::Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("the connection is open")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// A WSS client subscribed to `test/#`, trusting `ca`; `Err` when the handshake fails.
async fn wss(addr: std::net::SocketAddr, ca: &Path) -> Result<Wss, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector(ca)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!("wss://{addr}/ws?subscribe=test%2F%23")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .map_err(|e| e.to_string())?;
    let greeting = next_json(&mut ws).await;
    assert_eq!(greeting["type"], "io.meshgate.subscribed");
    Ok(ws)
}

/// `curl --cacert ca https://addr/path [-d body]`: exit code and output.
fn curl(ca: &Path, url: &str, post: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg(url);
    if let Some(body) = post {
        cmd.args([
            "-H",
            "ce-specversion: 1.0",
            "-H",
            "ce-id: 1",
            "-H",
            "ce-source: /curl",
            "-H",
            "ce-type: t",
            "-H",
            "content-type: text/plain",
            "-d",
            body,
        ]);
    }
    let out = cmd.output().expect("curl runs (Debian package curl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Copies `from`'s certificate and key over the files the gateway serves (`to`), each written
/// beside and renamed, so the gateway never reads half a file.
fn replace(to: &(PathBuf, PathBuf), from: &(PathBuf, PathBuf)) {
    for (src, dst) in [(&from.0, &to.0), (&from.1, &to.1)] {
        let tmp = dst.with_extension("tmp");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_on_the_web_listener_with_certificates_replaced_while_connected() {
    let d1 = dir("web-ca1");
    let d2 = dir("web-ca2");
    let (ca1, cert1, key1) = private_ca(&d1);
    let (ca2, cert2, key2) = private_ca(&d2);
    // The files the gateway serves: CA 1's certificate for now.
    let served = dir("web-served");
    let files = (served.join("cert.pem"), served.join("key.pem"));
    replace(&files, &(cert1, key1));
    let mut c = test_config();
    c.http.tls = Some(meshgate_config::ServerTlsConfig {
        cert_file: files.0.clone(),
        key_file: files.1.clone(),
    });
    c.admin.tls = c.http.tls.clone();
    let gw = start_gateway(c).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());

    // HTTPS with curl, on both listeners; plain HTTP to the TLS port gets nothing.
    let (code, out) = curl(
        &ca1,
        &format!("https://127.0.0.1:{}/events/test/a", web.port()),
        Some("1"),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"accepted\":1"), "{out}");
    let (code, out) = curl(
        &ca1,
        &format!("https://127.0.0.1:{}/healthz", admin.port()),
        None,
    );
    assert_eq!(code, Some(0), "{out}");
    let (code, _) = curl(
        &ca1,
        &format!("http://127.0.0.1:{}/healthz", admin.port()),
        None,
    );
    assert_ne!(code, Some(0), "plain HTTP on a TLS listener");

    // WSS: a subscriber that stays connected across the certificate change.
    let mut old = wss(web, &ca1).await.unwrap();
    replace(&files, &(cert2, key2));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut new = loop {
        if let Ok(ws) = wss(web, &ca2).await {
            break ws;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        wss(web, &ca1).await.is_err(),
        "the old certificate is no longer served"
    );
    // Both subscribers get the next event: the old connection was not dropped.
    let (code, out) = curl(
        &ca2,
        &format!("https://127.0.0.1:{}/events/test/b", web.port()),
        Some("2"),
    );
    assert_eq!(code, Some(0), "{out}");
    for ws in [&mut old, &mut new] {
        let e = next_json(ws).await;
        assert_eq!(e["data"], "2", "{e}");
    }
    // A broken file keeps what is served.
    std::fs::write(&files.0, "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        wss(web, &ca2).await.is_ok(),
        "a broken file keeps the previous certificate"
    );
    let _ = old.close(None).await;
    let _ = new.close(None).await;
    gw.shutdown().await;
    for d in [d1, d2, served] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_file_is_a_start_error_naming_the_key() {
    let d = dir("bad");
    std::fs::write(d.join("x.pem"), "nothing here").unwrap();
    let mut c = test_config();
    c.admin.tls = Some(meshgate_config::ServerTlsConfig {
        cert_file: d.join("x.pem"),
        key_file: d.join("x.pem"),
    });
    let err = meshgate::start(c).await.expect_err("refused").to_string();
    assert!(err.contains("admin.tls_cert_file"), "{err}");
    std::fs::remove_dir_all(d).ok();
}

/// mosquitto_pub over TLS to `port` as client `id`, trusting `ca`, with a client certificate
/// when given: its exit code and output.
fn mosquitto_tls(
    port: u16,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    id: &str,
    topic: &str,
) -> (Option<i32>, String) {
    let mut cmd = mosquitto_command("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-i",
        id,
        "-t",
        topic,
        "-m",
        "1",
    ])
    .args(["-q", "1", "-V", "mqttv5", "--cafile"])
    .arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_client_certificates_name_the_user() {
    let server_dir = dir("mqtt-server");
    let (server_ca, cert, key) = private_ca(&server_dir);
    let clients = dir("mqtt-clients");
    let (client_ca, _, _) = private_ca(&clients);
    let device = client_cert(&clients, "sensor-7", "sensor-7");
    let admin = client_cert(&clients, "admin", "admin");
    let listed = client_cert(&clients, "gateway-svc", "gateway-svc");
    let rogue_dir = dir("mqtt-rogue");
    private_ca(&rogue_dir);
    let rogue = client_cert(&rogue_dir, "sensor-7", "rogue");

    let mut c = meshgate_config::load_str(
        r##"
[auth]
allow_plaintext_passwords = true
[auth.anonymous]
enabled = false
[auth.certificates]
publish = ["devices/{user}/#"]
[[auth.users]]
name = "admin"
password = "admin-pw"
publish = ["#"]
[[auth.users]]
name = "gateway-svc"
certificate = true
publish = ["svc/#"]
"##,
        "t",
        Vec::new(),
    )
    .unwrap();
    let t = test_config();
    c.http.listen = t.http.listen;
    c.admin.listen = t.admin.listen;
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.tls = Some(meshgate_config::MqttTlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_file: cert,
        key_file: key,
        client_ca_file: Some(client_ca.clone()),
        client_auth: meshgate_config::ClientAuthMode::Required,
        identity: meshgate_config::CertificateIdentity::CommonName,
    });
    let gw = start_gateway(c).await;
    let port = gw.mqtt_tls_addr.unwrap().port();
    let mut seen = meshgate_tests::bus_subscribe(&gw, "#").await;

    // An unlisted name gets [auth.certificates]' rules, with {user} = its CN.
    let (code, out) = mosquitto_tls(port, &server_ca, Some(&device), "d1", "devices/sensor-7/t");
    assert_eq!(code, Some(0), "{out}");
    let d = meshgate_tests::next_delivery(&mut seen, Duration::from_secs(5), "the publish").await;
    assert_eq!(d.envelope.topic.to_string(), "devices/sensor-7/t");
    // A listed user with `certificate = true` gets its own rules.
    let (code, out) = mosquitto_tls(port, &server_ca, Some(&listed), "s1", "svc/x");
    assert_eq!(code, Some(0), "{out}");
    // A listed user without it: refused, whatever the certificate.
    let (code, out) = mosquitto_tls(port, &server_ca, Some(&admin), "a1", "devices/x");
    assert_ne!(code, Some(0), "{out}");
    assert!(out.to_lowercase().contains("not authori"), "{out}");
    // No certificate, or one from another CA: the handshake fails.
    let (code, out) = mosquitto_tls(port, &server_ca, None, "n1", "devices/sensor-7/t");
    assert_ne!(code, Some(0), "without a certificate: {out}");
    let (code, out) = mosquitto_tls(port, &server_ca, Some(&rogue), "r1", "devices/sensor-7/t");
    assert_ne!(code, Some(0), "a certificate from another CA: {out}");
    let m = meshgate_tests::metrics(gw.admin_addr.unwrap()).await;
    assert!(
        m.lines().any(|l| l
            .starts_with("meshgate_errors_total{adapter=\"mqtt\",kind=\"tls_handshake\"}")
            && !l.ends_with(" 0")),
        "{m}"
    );
    // tls_identity = "san": the first alternative name (here the e-mail) is the user.
    let (scert, skey) = (server_dir.join("cert.pem"), server_dir.join("key.pem"));
    let mut c = test_config();
    c.auth.anonymous.enabled = false;
    c.auth.certificates.publish = vec!["devices/{user}/#".into()];
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.tls = Some(meshgate_config::MqttTlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_file: scert,
        key_file: skey,
        client_ca_file: Some(client_ca.clone()),
        client_auth: meshgate_config::ClientAuthMode::Optional,
        identity: meshgate_config::CertificateIdentity::SubjectAltName,
    });
    let gw2 = start_gateway(c).await;
    let port2 = gw2.mqtt_tls_addr.unwrap().port();
    let mut seen2 = meshgate_tests::bus_subscribe(&gw2, "#").await;
    let topic = "devices/sensor-7@devices.test/u";
    let (code, out) = mosquitto_tls(port2, &server_ca, Some(&device), "d3", topic);
    assert_eq!(code, Some(0), "{out}");
    let d =
        meshgate_tests::next_delivery(&mut seen2, Duration::from_secs(5), "the SAN user's publish")
            .await;
    assert_eq!(d.envelope.topic.to_string(), topic);
    // Optional: a client without a certificate completes the handshake; with anonymous access
    // off it is refused at CONNECT.
    let (code, out) = mosquitto_tls(port2, &server_ca, None, "n2", "devices/x/t");
    assert_ne!(code, Some(0), "{out}");
    gw2.shutdown().await;
    gw.shutdown().await;
    for d in [server_dir, clients, rogue_dir] {
        std::fs::remove_dir_all(d).ok();
    }
}
