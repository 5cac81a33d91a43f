//! TLS to NATS with a CA file and a client certificate (issue 22 item 3), against a real
//! nats-server that requires and verifies client certificates (`tls { verify: true }`), with
//! certificates made by openssl at test time: the NATS core backbone (meshgate's own client) and
//! JetStream (its own client and async-nats's management connection) connect and carry events;
//! without the client certificate the gateway stays not ready.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshgate_config::BackboneKind;
use meshgate_tests::certs::{client_cert, private_ca};
use meshgate_tests::nats::NatsServer;
use meshgate_tests::{start_gateway, test_config, ws_connect};

struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    client: (PathBuf, PathBuf),
}

/// One CA: the server's certificate (127.0.0.1) and a client certificate, both signed by it.
fn pki(name: &str) -> (Pki, NatsServer) {
    let dir = std::env::temp_dir().join(format!("meshgate-nats-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ca, cert, key) = private_ca(&dir);
    let client = client_cert(&dir, "meshgate", "client");
    let server = NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
        cert.display(),
        key.display(),
        ca.display()
    ));
    (Pki { dir, ca, client }, server)
}

fn config(
    server: &NatsServer,
    pki: &Pki,
    kind: BackboneKind,
    with_cert: bool,
) -> meshgate_config::Config {
    let mut c = test_config();
    c.backbone.kind = kind;
    c.backbone.nats.urls = vec![format!("tls://127.0.0.1:{}", server.port)];
    c.backbone.nats.connect_timeout = Duration::from_secs(3);
    c.backbone.nats.tls.ca_file = Some(pki.ca.clone());
    if with_cert {
        c.backbone.nats.tls.client = Some(pki.client.clone());
    }
    c
}

async fn ready(admin: SocketAddr) -> u16 {
    reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn carries_events(gw: &meshgate::RunningGateway) {
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    assert_eq!(ready(admin).await, 200, "connected over TLS, so ready");
    let mut ws = ws_connect(web, &["tls/#"]).await;
    let status = reqwest::Client::new()
        .post(format!("http://{web}/events/tls/x"))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"t1","source":"/test","type":"t"}"#)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 202);
    let e = meshgate_tests::next_event(&mut ws, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(e.id(), "t1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_core_over_mutual_tls() {
    let (pki, server) = pki("core");
    let gw = start_gateway(config(&server, &pki, BackboneKind::Nats, true)).await;
    carries_events(&gw).await;
    gw.shutdown().await;
    // Without the client certificate, nats-server refuses the handshake: not ready.
    let gw = start_gateway(config(&server, &pki, BackboneKind::Nats, false)).await;
    assert_eq!(ready(gw.admin_addr.unwrap()).await, 503);
    gw.shutdown().await;
    drop(server);
    std::fs::remove_dir_all(&pki.dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_over_mutual_tls() {
    let (pki, server) = pki("js");
    let mut c = config(&server, &pki, BackboneKind::JetStream, true);
    c.backbone.jetstream.stream = "MESHGATE_TLS".into();
    let gw = start_gateway(c).await;
    carries_events(&gw).await;
    gw.shutdown().await;
    drop(server);
    std::fs::remove_dir_all(&pki.dir).ok();
}

/// A nats-server that knows one user by its NKey, and that user's seed in a file.
fn nkey_server(name: &str) -> (PathBuf, NatsServer, PathBuf) {
    let dir = std::env::temp_dir().join(format!("meshgate-nkey-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let user = nkeys::KeyPair::new_user();
    let seed_file = dir.join("user.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed().unwrap())).unwrap();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}\n",
        user.public_key()
    ));
    (dir, server, seed_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_seed_files_authenticate_both_nats_clients() {
    let (dir, server, seed_file) = nkey_server("ok");
    for kind in [BackboneKind::Nats, BackboneKind::JetStream] {
        let mut c = test_config();
        c.backbone.kind = kind;
        c.backbone.nats.urls = vec![server.url()];
        c.backbone.nats.connect_timeout = Duration::from_secs(3);
        c.backbone.nats.nkey = Some(meshgate_config::NatsNkey::SeedFile(seed_file.clone()));
        c.backbone.jetstream.stream = "MESHGATE_NKEY".into();
        let gw = start_gateway(c).await;
        carries_events(&gw).await;
        gw.shutdown().await;
    }
    // Another user's seed: refused by the server, so not ready.
    let stranger = dir.join("stranger.nk");
    std::fs::write(&stranger, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let mut c = test_config();
    c.backbone.kind = BackboneKind::Nats;
    c.backbone.nats.urls = vec![server.url()];
    c.backbone.nats.connect_timeout = Duration::from_secs(2);
    c.backbone.nats.nkey = Some(meshgate_config::NatsNkey::SeedFile(stranger));
    let gw = start_gateway(c).await;
    assert_eq!(ready(gw.admin_addr.unwrap()).await, 503);
    gw.shutdown().await;
    // A file that is no seed: a start error naming the key.
    let bad = dir.join("bad.nk");
    std::fs::write(&bad, "not a seed").unwrap();
    let mut c = test_config();
    c.backbone.kind = BackboneKind::Nats;
    c.backbone.nats.urls = vec![server.url()];
    c.backbone.nats.nkey = Some(meshgate_config::NatsNkey::SeedFile(bad));
    let err = meshgate::start(c).await.expect_err("refused").to_string();
    assert!(err.contains("backbone.nats.nkey_seed_file"), "{err}");
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}
