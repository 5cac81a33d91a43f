//! Start-up order (issue 19 item 5): every listener is bound before the gateway connects to
//! its backbone, so its own outgoing connection (an ephemeral port) cannot take a port it is
//! about to listen on ("Address already in use" on a configured port was seen).

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::net::SocketAddr;
use std::time::Duration;

use meshgate_config::BackboneKind;
use tokio::net::TcpListener;

/// A free loopback port (bound, then let go).
async fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn listeners_are_bound_before_the_backbone_connects() {
    // A "NATS server" that accepts and never says INFO: the JetStream backbone waits there
    // (up to connect_timeout) while the gateway starts.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (web, admin, mqtt) = (free_port().await, free_port().await, free_port().await);

    let mut config = meshgate_tests::test_config();
    config.http.listen = web;
    config.admin.listen = admin;
    config.mqtt.enabled = true;
    config.mqtt.listen = mqtt;
    config.backbone.kind = BackboneKind::JetStream;
    config.backbone.nats.urls = vec![format!("nats://{silent_addr}")];
    config.backbone.nats.connect_timeout = Duration::from_secs(3);
    let start = tokio::spawn(meshgate::start(config));

    // The backbone's connection attempt reaches the silent server: the gateway is now
    // connecting out, and every listener must already be held.
    let (held, _) = tokio::time::timeout(Duration::from_secs(10), silent.accept())
        .await
        .expect("the gateway never tried to connect to its backbone")
        .unwrap();
    assert!(
        !start.is_finished(),
        "the start ended before the backbone connected"
    );
    for (addr, key) in [
        (web, "http.listen"),
        (admin, "admin.listen"),
        (mqtt, "mqtt.listen"),
    ] {
        let taken = TcpListener::bind(addr).await;
        assert!(
            matches!(&taken, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse),
            "{key} ({addr}) is not bound while the gateway connects to its backbone: {taken:?}"
        );
    }
    drop(held);
    // Nothing answers: the start fails naming the backbone, and lets the ports go.
    let result = tokio::time::timeout(Duration::from_secs(30), start)
        .await
        .expect("the start did not give up on an unreachable backbone")
        .unwrap();
    let err = result.expect_err("started without a backbone");
    assert!(err.to_string().contains("backbone"), "{err}");
    TcpListener::bind(web)
        .await
        .expect("the web port is still held after a failed start");
}
