//! HTTP → memory backbone → WebSocket: delivered events per second and end-to-end latency.
//!
//! Runs a gateway in-process on loopback (so the load generator shares the machine's cores with
//! it, as a sidecar would), `S` WebSocket subscribers on `bench/#` and `P` HTTP publishers
//! posting 256-byte binary-mode CloudEvents in a closed loop (each waits for its 202).
//!
//! Usage: `cargo run --release -p meshgate-bench --bin http-ws [SECONDS]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Run {
    publishers: usize,
    subscribers: usize,
}

struct Outcome {
    published: u64,
    delivered: u64,
    secs: f64,
    latencies_us: Vec<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn run_once(run: &Run, seconds: u64) -> anyhow::Result<Outcome> {
    let mut config = meshgate_config::Config::default();
    config.http.listen = "127.0.0.1:0".parse()?;
    config.admin.enabled = false;
    config.http.max_in_flight = 4096;
    // The subscribers share two cores with the gateway and the publishers; a deep queue keeps
    // a briefly starved subscriber from being cut off as a slow consumer (the default policy).
    config.websocket.outbound_queue_bytes = 256 << 20;
    let gateway = meshgate::start(config).await?;
    let addr = gateway
        .web_addr
        .ok_or_else(|| anyhow::anyhow!("no web listener"))?;
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));

    let mut subs = Vec::new();
    for _ in 0..run.subscribers {
        let mut req = format!("ws://{addr}/ws?subscribe=bench/%23").into_client_request()?;
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "cloudevents.json".parse()?);
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
        // Wait for the subscription greeting.
        ws.next().await;
        let delivered = delivered.clone();
        subs.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while let Some(msg) = ws.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("subscriber error: {e}");
                        break;
                    }
                };
                if let Message::Close(frame) = &msg
                    && frame.as_ref().is_some_and(|f| u16::from(f.code) != 1001)
                {
                    eprintln!("subscriber closed: {frame:?}");
                }
                if let Message::Text(t) = msg {
                    // Cheap extraction of the "sentus" extension, so the client is not the bottleneck.
                    let sent = t
                        .as_str()
                        .split_once("\"sentus\":\"")
                        .and_then(|(_, rest)| rest.split_once('"'))
                        .and_then(|(n, _)| n.parse::<u64>().ok());
                    if let Some(sent) = sent {
                        let now = origin.elapsed().as_micros() as u64;
                        lat.push(now.saturating_sub(sent));
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }

    let payload = "x".repeat(256);
    let published = Arc::new(AtomicU64::new(0));
    let mut pubs = Vec::new();
    for p in 0..run.publishers {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/events/bench/p{p}");
        let (stop, published, payload) = (stop.clone(), published.clone(), payload.clone());
        pubs.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sent = origin.elapsed().as_micros() as u64;
                let r = client
                    .post(&url)
                    .header("ce-specversion", "1.0")
                    .header("ce-id", format!("{p}-{i}"))
                    .header("ce-source", "/bench")
                    .header("ce-type", "com.example.bench")
                    .header("ce-sentus", sent.to_string())
                    .header("content-type", "text/plain")
                    .body(payload.clone())
                    .send()
                    .await;
                if matches!(r, Ok(ref resp) if resp.status() == 202) {
                    published.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for p in pubs {
        let _ = p.await;
    }
    let secs = started.elapsed().as_secs_f64();
    // Let in-flight deliveries arrive, then close the subscribers via shutdown.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.shutdown().await;
    let mut latencies_us = Vec::new();
    for s in subs {
        latencies_us.extend(s.await.unwrap_or_default());
    }
    latencies_us.sort_unstable();
    Ok(Outcome {
        published: published.load(Ordering::Relaxed),
        delivered: delivered.load(Ordering::Relaxed),
        secs,
        latencies_us,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    println!(
        "meshgate http-ws benchmark: HTTP POST (256 B, binary mode) -> memory backbone -> WebSocket"
    );
    println!("{seconds} s per row, closed-loop publishers, gateway in-process on loopback\n");
    println!(
        "| publishers | subscribers | published/s | delivered/s | lost | p50 µs | p99 µs | max µs |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (publishers, subscribers) in [(1, 1), (4, 1), (4, 16)] {
        let o = run_once(
            &Run {
                publishers,
                subscribers,
            },
            seconds,
        )
        .await?;
        let expected = o.published * subscribers as u64;
        println!(
            "| {publishers} | {subscribers} | {:.0} | {:.0} | {} | {} | {} | {} |",
            o.published as f64 / o.secs,
            o.delivered as f64 / o.secs,
            expected.saturating_sub(o.delivered),
            percentile(&o.latencies_us, 0.50),
            percentile(&o.latencies_us, 0.99),
            o.latencies_us.last().copied().unwrap_or(0),
        );
    }
    Ok(())
}
