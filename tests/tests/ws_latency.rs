//! Browsers get events without Nagle's delay (issue 23 item 1): an MQTT publisher at a steady
//! 2,000 events per second (~256-byte payloads), a CloudEvents WebSocket subscriber on the web
//! listener, and the p99 of publish-to-frame latency under 2 ms on loopback. Without
//! `TCP_NODELAY` on the web listener's sockets each frame waits for the previous one's ACK
//! (Nagle + delayed ACK): with `set_nodelay(false)` in gateway/src/serve.rs this test measured
//! p50 8.6 ms, p99 19.8 ms and failed; with it, p50 0.16 ms, p99 0.42 ms (debug build). Its own
//! test binary, so no other test shares the cores while it measures.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use meshgate_tests::{start_gateway, test_config};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const RATE: u64 = 2000;
const SECONDS: u64 = 3;
/// Pads each payload to about 256 bytes, the size of the measurements.
const PAD: &str = "................................................................................................................................................................................................................................";

/// Most measurements made before the test fails: a CI machine that is busy for a moment
/// (another process's burst) can push one run's p99 past 2 ms (seen once: 3.5 ms, with 0.46–0.61
/// ms in runs just before and after), while a missing `TCP_NODELAY` makes every run ~20 ms.
const ATTEMPTS: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribers_get_events_within_2_ms_p99_at_a_steady_rate() {
    let mut c = test_config();
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    let gw = start_gateway(c).await;
    let web = gw.web_addr.unwrap();
    let mqtt = gw.mqtt_addr.unwrap().port();
    let mut p99s = Vec::new();
    for attempt in 0..ATTEMPTS {
        let p99 = measure(web, mqtt, attempt).await;
        p99s.push(p99);
        if p99 < Duration::from_millis(2) {
            break;
        }
    }
    assert!(
        p99s.iter().any(|p| *p < Duration::from_millis(2)),
        "p99 {p99s:?} is 2 ms or more in every run (TCP_NODELAY missing on the web listener?)"
    );
    gw.shutdown().await;
}

/// One run: a new WebSocket subscriber and MQTT publisher, `RATE` events per second for
/// `SECONDS`; prints and returns the p99 of the steady state.
async fn measure(web: std::net::SocketAddr, mqtt: u16, attempt: u32) -> Duration {
    let mut req = format!("ws://{web}/ws?subscribe=lat%2F%23")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.next().await.unwrap().unwrap(); // io.meshgate.subscribed

    let mut o = MqttOptions::new(format!("lat-pub-{attempt}"), "127.0.0.1", mqtt);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 1024);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let origin = Instant::now();
    let total = RATE * SECONDS;
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
        for i in 0..total {
            tick.tick().await;
            // The send time travels in the payload (a plain payload: wrapped into the data).
            let sent = origin.elapsed().as_nanos() as u64;
            client
                .publish("lat/x", QoS::AtMostOnce, false, format!("{i} {sent} {PAD}"))
                .await
                .unwrap();
        }
        client
    });

    let mut latencies = Vec::with_capacity(total as usize);
    let deadline = Instant::now() + Duration::from_secs(SECONDS + 10);
    while (latencies.len() as u64) < total && Instant::now() < deadline {
        let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await
        else {
            continue;
        };
        let now = origin.elapsed().as_nanos() as u64;
        let event: serde_json::Value = serde_json::from_str(&t).unwrap();
        // Plain MQTT payloads arrive as octets (`data_base64`).
        let text = match (&event["data"], &event["data_base64"]) {
            (serde_json::Value::String(s), _) => s.clone(),
            (_, serde_json::Value::String(b)) => {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
                String::from_utf8(bytes).unwrap()
            }
            (other, _) => other.to_string(),
        };
        let sent: u64 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no send time in {event}"));
        latencies.push(now.saturating_sub(sent));
    }
    let client = publisher.await.unwrap();
    assert_eq!(latencies.len() as u64, total, "every event arrived");
    // The first events pay for connection warm-up; the steady state is what is measured.
    let mut steady = latencies[(RATE / 2) as usize..].to_vec();
    steady.sort_unstable();
    let p = |q: f64| Duration::from_nanos(steady[((steady.len() - 1) as f64 * q) as usize]);
    println!(
        "run {attempt}: MQTT -> WebSocket at {RATE}/s: p50 {:?}, p99 {:?}, max {:?}",
        p(0.5),
        p(0.99),
        p(1.0)
    );
    let _ = client.disconnect().await;
    p(0.99)
}
