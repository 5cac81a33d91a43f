//! WebSocket subscriptions narrowed by event filters in Knative's dialects (`match` of
//! `io.meshgate.subscribe`, issue 21 item 2), with a real WebSocket client and events posted
//! over HTTP: only the events that pass arrive, each once; a bad `match` is reported naming
//! where it is wrong.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::time::Duration;

use futures_util::SinkExt;
use meshgate_tests::{next_event, start_gateway, test_config, ws_connect};
use tokio_tungstenite::tungstenite::Message;

async fn post(web: std::net::SocketAddr, topic: &str, id: &str, ty: &str, subject: &str) {
    let status = reqwest::Client::new()
        .post(format!("http://{web}/events/{topic}"))
        .header("content-type", "application/cloudevents+json")
        .body(format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/t","type":"{ty}","subject":"{subject}"}}"#
        ))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 202);
}

fn subscribe(id: &str, data: &str) -> Message {
    Message::text(format!(
        r#"{{"specversion":"1.0","id":"{id}","source":"/t","type":"io.meshgate.subscribe","data":{data}}}"#
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_with_match_gets_only_the_events_that_pass() {
    let gw = start_gateway(test_config()).await;
    let web = gw.web_addr.unwrap();
    // (`ws_connect` reads the greeting, `io.meshgate.subscribed`.)
    let mut ws = ws_connect(web, &["none/x"]).await;
    // `s/#` only for com.a.* events about something hot; `t/#` everything; and `both/#`
    // twice over: a `match` of its own (any of two types) replaced by a second subscribe.
    ws.send(subscribe(
        "c1",
        r#"{"filters":["s/#"],"match":[{"prefix":{"type":"com.a."}},{"cesql":"subject LIKE '%hot'"}]}"#,
    ))
    .await
    .unwrap();
    ws.send(subscribe("c2", r#"{"filters":["t/#"]}"#))
        .await
        .unwrap();
    ws.send(subscribe(
        "c3",
        r#"{"filters":["both/#"],"match":[{"any":[{"exact":{"type":"x"}},{"exact":{"type":"y"}}]}]}"#,
    ))
    .await
    .unwrap();
    ws.send(subscribe(
        "c4",
        r#"{"filters":["both/#"],"match":[{"not":{"exact":{"type":"x"}}}]}"#,
    ))
    .await
    .unwrap();
    for _ in 0..4 {
        let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
        assert_eq!(e.ty(), "io.meshgate.subscribed", "{e:?}");
    }
    post(web, "s/1", "pass-1", "com.a.reading", "very hot").await;
    post(web, "s/1", "fail-type", "com.b.reading", "very hot").await;
    post(web, "s/1", "fail-subject", "com.a.reading", "cold").await;
    post(web, "t/1", "pass-2", "anything", "cold").await;
    post(web, "both/1", "fail-replaced", "x", "-").await;
    post(web, "both/1", "pass-3", "y", "-").await;
    post(web, "both/1", "pass-4", "z", "-").await;
    let mut got = Vec::new();
    while got.len() < 4 {
        let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
        got.push(e.id().to_owned());
    }
    assert_eq!(got, ["pass-1", "pass-2", "pass-3", "pass-4"]);
    // Nothing else: the events left out are not sent later.
    post(web, "t/1", "marker", "m", "-").await;
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.id(), "marker");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_match_is_refused_naming_where() {
    let gw = start_gateway(test_config()).await;
    let web = gw.web_addr.unwrap();
    let mut ws = ws_connect(web, &["none/x"]).await;
    for (data, expected) in [
        (
            r#"{"filters":["a/#"],"match":[{"exact":{"type":"a","source":"b"}}]}"#,
            "match[0].exact",
        ),
        (
            r#"{"filters":["a/#"],"match":[{"all":[{"cesql":"type ="}]}]}"#,
            "match[0].all[0].cesql",
        ),
        (
            r#"{"filters":["a/#"],"match":{"exact":{"type":"a"}}}"#,
            "match: a list",
        ),
    ] {
        ws.send(subscribe("bad", data)).await.unwrap();
        let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
        assert_eq!(e.ty(), "io.meshgate.error", "{data}");
        let text = String::from_utf8(e.data().unwrap().to_bytes().to_vec()).unwrap();
        assert!(text.contains("invalid_request"), "{data}: {text}");
        assert!(text.contains(expected), "{data}: {text}");
    }
    gw.shutdown().await;
}
