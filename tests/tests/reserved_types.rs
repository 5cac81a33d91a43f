//! A client may not send a CloudEvent whose type is one of meshgate's own (`io.meshgate.*`,
//! issue 22 item 7): subscribers read those as the gateway's word (a browser's
//! `io.meshgate.error`, a device's `$SYS` event). Refused over HTTP (400 naming the reason, in
//! every mode) and WebSocket (an `io.meshgate.error` back); nothing reaches a subscriber; a
//! plain body is still wrapped with meshgate's own type.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::time::Duration;

use futures_util::SinkExt;
use meshgate_tests::{next_event, start_gateway, test_config, ws_connect};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_types_are_refused_over_http_and_websocket() {
    let gw = start_gateway(test_config()).await;
    let web = gw.web_addr.unwrap();
    let mut sub = ws_connect(web, &["r/#"]).await;
    let client = reqwest::Client::new();
    let url = format!("http://{web}/events/r/1");
    let structured = r#"{"specversion":"1.0","id":"s1","source":"/x","type":"io.meshgate.error"}"#;
    for (content_type, body, binary_type) in [
        ("application/cloudevents+json", structured.to_owned(), None),
        (
            "application/cloudevents-batch+json",
            format!(
                r#"[{{"specversion":"1.0","id":"ok","source":"/x","type":"com.ok"}},{structured}]"#
            ),
            None,
        ),
        ("text/plain", "x".to_owned(), Some("io.meshgate.subscribed")),
    ] {
        let mut req = client
            .post(&url)
            .header("content-type", content_type)
            .body(body);
        if let Some(ty) = binary_type {
            req = req
                .header("ce-specversion", "1.0")
                .header("ce-id", "b1")
                .header("ce-source", "/x")
                .header("ce-type", ty);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 400, "{content_type}");
        let text = r.text().await.unwrap();
        assert!(
            text.contains("reserved for meshgate"),
            "{content_type}: {text}"
        );
    }
    // Over WebSocket: reported back to the sender.
    let mut ws = ws_connect(web, &[]).await;
    ws.send(Message::text(
        r#"{"specversion":"1.0","id":"w1","source":"/x","type":"io.meshgate.error","subject":"r/1"}"#,
    ))
    .await
    .unwrap();
    let err = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(err.ty(), "io.meshgate.error");
    let data = String::from_utf8_lossy(err.data().unwrap().as_slice()).into_owned();
    assert!(data.contains("reserved") && data.contains("w1"), "{data}");
    // A plain body is wrapped (meshgate's own type) and delivered; nothing else was.
    let r = client
        .post(&url)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let e = next_event(&mut sub, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.ty(), "io.meshgate.http.message");
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            futures_util::StreamExt::next(&mut sub)
        )
        .await
        .is_err(),
        "no reserved event reached the subscriber"
    );
    gw.shutdown().await;
}
