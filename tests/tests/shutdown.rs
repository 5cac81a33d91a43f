//! SIGTERM with requests in flight: none lost, WebSockets closed with 1001, exit 0.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::BTreeSet;
use std::time::Duration;

use meshgate_tests::{next_event, spawn, ws_connect};

const IN_FLIGHT: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_settles_in_flight_requests_and_exits_zero() {
    let mut gw = spawn(
        &[],
        &[
            ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__GATEWAY__SHUTDOWN_GRACE", "10s"),
        ],
    );
    let addr = gw.web.expect("web listener in banner");
    let mut ws = ws_connect(addr, &["#"]).await;

    // Requests whose bodies are still uploading when SIGTERM arrives.
    let client = reqwest::Client::new();
    let mut requests = Vec::new();
    for i in 0..IN_FLIGHT {
        let client = client.clone();
        requests.push(tokio::spawn(async move {
            let chunks = futures_util::stream::iter(0..3).then(|n| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, std::io::Error>(format!("part{n};"))
            });
            let r = client
                .post(format!("http://{addr}/events/orders/{i}"))
                .header("ce-specversion", "1.0")
                .header("ce-id", format!("R{i}"))
                .header("ce-source", "/shutdown-test")
                .header("ce-type", "com.example.order")
                .header("content-type", "text/plain")
                .body(reqwest::Body::wrap_stream(chunks))
                .send()
                .await;
            (i, r.map(|r| r.status().as_u16()))
        }));
    }
    use futures_util::StreamExt as _;
    tokio::time::sleep(Duration::from_millis(400)).await;
    gw.signal("TERM");

    let mut accepted = BTreeSet::new();
    for r in requests {
        let (i, status) = r.await.unwrap();
        assert_eq!(
            status.as_ref().ok(),
            Some(&202),
            "in-flight request {i} must complete with 202, got {status:?}"
        );
        accepted.insert(format!("R{i}"));
    }
    // Every accepted event reaches the subscriber before its 1001 close.
    let mut received = BTreeSet::new();
    let code = loop {
        match next_event(&mut ws, Duration::from_secs(10)).await {
            Ok(e) => {
                received.insert(e.id().to_owned());
            }
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(1001), "websocket closed with going-away");
    assert_eq!(received, accepted, "no accepted event lost");
    // New connections are refused now.
    assert!(
        client
            .post(format!("http://{addr}/events/late"))
            .body("x")
            .send()
            .await
            .is_err()
    );
    let status = gw.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit status {status:?}");
}
