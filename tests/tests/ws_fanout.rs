//! 500 idle WebSocket connections and one slow reader do not stop delivery to the others.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::time::Duration;

use futures_util::StreamExt;
use meshgate_tests::{next_event, test_config, ws_connect};

const IDLE: usize = 500;
const EVENTS: usize = 400;
const EVENT_BYTES: usize = 32 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_a_slow_reader_do_not_hold_up_delivery() {
    let mut config = test_config();
    config.websocket.outbound_queue_bytes = 64 * EVENT_BYTES;
    config.websocket.max_connections = 2 * IDLE;
    let gw = meshgate::start(config).await.unwrap();
    let addr = gw.web_addr.unwrap();

    // 500 connections that never read, subscribed elsewhere.
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(ws_connect(addr, &["idle/#"]).await);
    }
    // One reader on the hot topic that never reads: its socket and queue fill up.
    let mut slow = ws_connect(addr, &["hot/#"]).await;
    // Three readers that keep up.
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut ws = ws_connect(addr, &["hot/#"]).await;
        readers.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(EVENTS);
            while ids.len() < EVENTS {
                match next_event(&mut ws, Duration::from_secs(20)).await {
                    Ok(e) => ids.push(e.id().to_owned()),
                    Err(code) => panic!(
                        "active reader closed with {code:?} after {} events",
                        ids.len()
                    ),
                }
            }
            ids
        }));
    }

    let client = reqwest::Client::new();
    let body = format!("\"{}\"", "x".repeat(EVENT_BYTES));
    let started = std::time::Instant::now();
    for i in 0..EVENTS {
        let r = client
            .post(format!("http://{addr}/events/hot/{i}"))
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("H{i}"))
            .header("ce-source", "/fanout")
            .header("ce-type", "com.example.hot")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    }
    for reader in readers {
        let ids = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("active reader finished")
            .unwrap();
        let expected: Vec<String> = (0..EVENTS).map(|i| format!("H{i}")).collect();
        assert_eq!(ids, expected, "every event, in order");
    }
    println!(
        "{EVENTS} events of {EVENT_BYTES} B to 3 readers past {IDLE} idle sockets and a slow one: {:?}",
        started.elapsed()
    );

    // The slow reader was disconnected with 1008 once its queue was full.
    let mut code = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(20), slow.next()).await {
        if let Ok(tokio_tungstenite::tungstenite::Message::Close(frame)) = msg {
            code = frame.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(
        code,
        Some(1008),
        "slow consumer closed with policy violation"
    );

    // The idle connections are all still alive and get an event published to them.
    let r = client
        .post(format!("http://{addr}/events/idle/all"))
        .body("wake up")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for (i, ws) in idle.iter_mut().enumerate() {
        let e = next_event(ws, Duration::from_secs(10))
            .await
            .unwrap_or_else(|c| panic!("idle connection {i} closed: {c:?}"));
        assert_eq!(e.subject(), Some("idle/all"));
    }
    gw.shutdown().await;
}
