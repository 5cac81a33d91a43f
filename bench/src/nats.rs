//! meshgate over the NATS backbone, next to raw NATS in the same run (issue 4).
//!
//! Rows: raw NATS core (async-nats publisher → subscriber; also with the messages meshgate puts
//! on the bus, headers and CloudEvent JSON, to show what they cost any NATS client), raw
//! JetStream publish-with-ack (256 acknowledgements outstanding; also with meshgate's messages,
//! and with a pull consumer), meshgate MQTT → NATS → MQTT with the NATS backbone on one
//! instance and across two instances, meshgate MQTT QoS 1 → JetStream (PUBACKed/s with nobody
//! subscribed, 1 and 4 publishers) and → MQTT, meshgate MQTT QoS 1 and HTTP POST → NATS core
//! with nobody subscribed (acknowledged/s: what waiting for nats-server's PONG costs, decision
//! 0050), plus the memory backbone for reference.
//! Delivered messages/s, messages lost, p50/p99 latency at a steady 2,000 msg/s.
//!
//! Usage (release build; starts its own nats-server and meshgate processes on free ports):
//! `cargo build --release -p meshgate -p meshgate-bench && ./target/release/nats [--seconds S] [--wire structured|binary] [--client raw|rumqttc] [--only <row name part>]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use meshgate_bench::{
    Generator, JsMessages, PAYLOAD, RAW_CONSUMED_STREAM, RAW_STREAM, Throughput,
    meshgate_like_message, now_us, payload, percentiles, settle, start_meshgate_with,
    start_nats_server,
};
use rumqttc::QoS;

/// Raw NATS core: one publisher as fast as it can, one subscriber; (delivered/s, lost). With
/// `meshgate_messages`, each message is what meshgate publishes (headers and JSON) instead of
/// the bare 256-byte payload.
async fn raw_core(url: &str, seconds: u64, meshgate_messages: bool) -> anyhow::Result<(f64, u64)> {
    let sub_client = async_nats::connect(url).await?;
    let mut sub = sub_client.subscribe("rawbench.>").await?;
    sub_client.flush().await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let d = delivered.clone();
    let reader = tokio::spawn(async move {
        while sub.next().await.is_some() {
            d.fetch_add(1, Ordering::Relaxed);
        }
    });
    let client = async_nats::connect(url).await?;
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let publisher = tokio::spawn(async move {
        let mut sent = 0u64;
        let (headers, message) = meshgate_like_message();
        while !s.load(Ordering::Relaxed) {
            let published = if meshgate_messages {
                client
                    .publish_with_headers("rawbench.x", headers.clone(), message.clone().into())
                    .await
            } else {
                client.publish("rawbench.x", payload(origin).into()).await
            };
            if published.is_err() {
                break;
            }
            sent += 1;
        }
        let _ = client.flush().await;
        sent
    });
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let sent = publisher.await?;
    settle(&delivered, sent).await;
    reader.abort();
    let got = delivered.load(Ordering::Relaxed);
    Ok((got as f64 / elapsed, sent.saturating_sub(got)))
}

/// Raw JetStream on a fresh server: publish and wait for every PubAck, 256 outstanding;
/// acknowledged/s.
async fn raw_jetstream(url: &str, seconds: u64, kind: JsMessages) -> anyhow::Result<f64> {
    let js = fresh_jetstream(url).await?;
    meshgate_bench::raw_jetstream(&js, 1, seconds, kind).await
}

/// The stream of the meshgate JetStream rows.
const MESHGATE_STREAM: &str = "MGBENCH";

/// Deletes the streams earlier rows filled, so that every JetStream row starts on an empty
/// server: a stream's stored messages and its duplicate window's ids (millions after a row)
/// otherwise slow the rows after it, raw or meshgate's.
async fn fresh_jetstream(url: &str) -> anyhow::Result<async_nats::jetstream::Context> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    for stream in [RAW_STREAM, RAW_CONSUMED_STREAM, MESHGATE_STREAM] {
        let _ = js.delete_stream(stream).await;
    }
    Ok(js)
}

/// Raw JetStream end to end on a fresh server (see [`meshgate_bench::raw_jetstream_consumed`]);
/// (delivered/s, lost).
async fn raw_jetstream_consumed(
    url: &str,
    seconds: u64,
    kind: JsMessages,
) -> anyhow::Result<(f64, u64)> {
    let js = fresh_jetstream(url).await?;
    meshgate_bench::raw_jetstream_consumed(&js, url, 1, seconds, kind).await
}

/// Raw NATS core latency at a fixed rate; (p50, p99) in µs.
async fn raw_latency(url: &str, rate: u64, seconds: u64) -> anyhow::Result<(u64, u64)> {
    let origin = Instant::now();
    let sub_client = async_nats::connect(url).await?;
    let mut sub = sub_client.subscribe("rawlat.>").await?;
    sub_client.flush().await?;
    let reader = tokio::spawn(async move {
        let mut samples = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            if m.payload.len() >= 8 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&m.payload[..8]);
                samples.push(now_us(origin).saturating_sub(u64::from_be_bytes(b)));
            }
        }
        samples
    });
    let client = async_nats::connect(url).await?;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for _ in 0..rate * seconds {
        tick.tick().await;
        client.publish("rawlat.x", payload(origin).into()).await?;
        // Unbuffered, like an MQTT client writing each message.
        client.flush().await?;
    }
    Ok(percentiles(reader.await?))
}

/// MQTT QoS 0 publishes into meshgate, counted by a plain NATS subscriber on meshgate's
/// subjects; (delivered/s, lost).
async fn mqtt_to_raw_nats(port: u16, url: &str, seconds: u64) -> anyhow::Result<(f64, u64)> {
    let sub_client = async_nats::connect(url).await?;
    let mut sub = sub_client.subscribe("meshgate.bench.>").await?;
    sub_client.flush().await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let d = delivered.clone();
    let reader = tokio::spawn(async move {
        while sub.next().await.is_some() {
            d.fetch_add(1, Ordering::Relaxed);
        }
    });
    let origin = Instant::now();
    let (client, task) = meshgate_bench::connect("raw-pub", port, |_| {}).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let publisher = tokio::spawn(async move {
        let mut sent = 0u64;
        while !s.load(Ordering::Relaxed) {
            if client
                .publish("bench/x", QoS::AtMostOnce, false, payload(origin))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = client.disconnect().await;
        sent
    });
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let sent = publisher.await?;
    settle(&delivered, sent).await;
    reader.abort();
    task.abort();
    let got = delivered.load(Ordering::Relaxed);
    Ok((got as f64 / elapsed, sent.saturating_sub(got)))
}

/// A meshgate row: delivered/s, and lost = accepted but never delivered.
fn throughput_row(name: &str, t: &Throughput, lat: Option<(u64, u64)>) {
    row(
        name,
        t.rate,
        &t.accepted.saturating_sub(t.delivered).to_string(),
        lat,
    );
}

fn row(name: &str, rate: f64, lost: &str, lat: Option<(u64, u64)>) {
    let (p50, p99) = lat.map_or((String::new(), String::new()), |(a, b)| {
        (format!("{a} µs"), format!("{b} µs"))
    });
    println!("| {name} | {rate:.0} | {lost} | {p50} | {p99} |");
}

/// 256-byte binary-mode CloudEvents POSTed to `addr` by `concurrency` closed-loop clients (each
/// waits for its answer) for `seconds`; 202s per second.
async fn http_accepted_rate(addr: &str, concurrency: usize, seconds: u64) -> anyhow::Result<f64> {
    let port: u16 = addr.rsplit(':').next().unwrap_or_default().parse()?;
    anyhow::ensure!(
        meshgate_bench::wait_listening(port),
        "meshgate's HTTP listener on {addr}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let mut tasks = Vec::new();
    for p in 0..concurrency {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/events/bench/http{p}");
        let (stop, accepted, payload) = (stop.clone(), accepted.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .post(&url)
                    .header("ce-specversion", "1.0")
                    .header("ce-id", format!("{p}-{i}"))
                    .header("ce-source", "/bench")
                    .header("ce-type", "com.example.bench")
                    .header("content-type", "application/octet-stream")
                    .body(payload.clone())
                    .send()
                    .await;
                if matches!(r, Ok(ref resp) if resp.status() == 202) {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let counted = accepted.load(Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Ok(counted as f64 / elapsed)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds = meshgate_bench::arg_u64(&args, "--seconds", 5);
    let generator = Generator::from_args(&args)?;
    // `--only <text>`: run only the rows whose name contains it (for profiling one row).
    let only = meshgate_bench::arg_value(&args, "--only");
    let want = |name: &str| only.is_none_or(|o| name.contains(o));
    println!(
        "NATS backbone: {PAYLOAD}-byte messages, {seconds} s per row, one subscriber, all processes on this machine, MQTT rows by the {}\n",
        generator.describe()
    );
    if args.iter().any(|a| a == "--wire") {
        println!("(backbone.nats.wire_mode as given with --wire)\n");
    }
    println!("| path | delivered/s | lost | p50 @2k/s | p99 @2k/s |");
    println!("|---|---:|---:|---:|---:|");
    let nats = start_nats_server("nats-backbone")?;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let name = "raw NATS core, async-nats pub → sub";
    if want(name) {
        let (rate, lost) = raw_core(&url, seconds, false).await?;
        let lat = raw_latency(&url, 2_000, seconds).await.ok();
        row(name, rate, &lost.to_string(), lat);
    }
    let name = "raw NATS core, async-nats pub → sub, meshgate's messages (2 headers, ~520-byte CloudEvent JSON)";
    if want(name) {
        let (rate, lost) = raw_core(&url, seconds, true).await?;
        row(name, rate, &lost.to_string(), None);
    }
    let name = "raw JetStream publish + PubAck (256 outstanding; acked/s)";
    if want(name) {
        let js = raw_jetstream(&url, seconds, JsMessages::Bare).await?;
        row(name, js, "", None);
    }
    let name = "raw JetStream publish + PubAck, bare payload with Nats-Msg-Id (acked/s)";
    if want(name) {
        let js = raw_jetstream(&url, seconds, JsMessages::BareWithMsgId).await?;
        row(name, js, "", None);
    }
    let name = "raw JetStream publish + PubAck, meshgate's messages (2 headers + Nats-Msg-Id, ~520-byte CloudEvent JSON; acked/s)";
    if want(name) {
        let js = raw_jetstream(&url, seconds, JsMessages::Meshgate).await?;
        row(name, js, "", None);
    }
    let name = "raw JetStream publish + PubAck → pull consumer, one ack per message (delivered/s)";
    if want(name) {
        let (rate, lost) = raw_jetstream_consumed(&url, seconds, JsMessages::Bare).await?;
        row(name, rate, &lost.to_string(), None);
    }
    let name = "raw JetStream publish + PubAck → pull consumer, meshgate's messages (delivered/s)";
    if want(name) {
        let (rate, lost) = raw_jetstream_consumed(&url, seconds, JsMessages::Meshgate).await?;
        row(name, rate, &lost.to_string(), None);
    }
    let wire = meshgate_bench::arg_value(&args, "--wire").unwrap_or("structured");
    let nats_env = [
        ("MESHGATE__BACKBONE__KIND", "nats"),
        ("MESHGATE__BACKBONE__NATS__URLS", url.as_str()),
        ("MESHGATE__BACKBONE__NATS__WIRE_MODE", wire),
    ];
    for (name, qos, publishers) in [
        (
            "meshgate MQTT QoS 0 → NATS → MQTT, one instance",
            QoS::AtMostOnce,
            1,
        ),
        (
            "meshgate MQTT QoS 0 → NATS → MQTT, one instance, 4 publishers",
            QoS::AtMostOnce,
            4,
        ),
        (
            "meshgate MQTT QoS 1 → NATS → MQTT, one instance",
            QoS::AtLeastOnce,
            1,
        ),
    ] {
        if !want(name) {
            continue;
        }
        let gw = start_meshgate_with(&nats_env)?;
        let t = generator
            .throughput(gw.port, gw.port, qos, publishers, seconds)
            .await?;
        let lat = if qos == QoS::AtLeastOnce {
            generator
                .latency(gw.port, gw.port, 2_000, seconds)
                .await
                .ok()
        } else {
            None
        };
        throughput_row(name, &t, lat);
    }
    // What an acknowledgement costs over NATS core (decision 0050): acknowledged publishes
    // per second with nobody subscribed, the ingress alone.
    for publishers in [1, 4] {
        let name = format!(
            "meshgate MQTT QoS 1 → NATS, {publishers} publisher(s), nobody subscribed (PUBACKed/s)"
        );
        if !want(&name) {
            continue;
        }
        let gw = start_meshgate_with(&nats_env)?;
        let rate = meshgate_bench::raw::acknowledged_rate(gw.port, publishers, seconds).await?;
        row(&name, rate, "", None);
    }
    for concurrency in [1, 16] {
        let name = format!(
            "meshgate HTTP POST → NATS, {concurrency} request(s) at a time, nobody subscribed (202/s)"
        );
        if !want(&name) {
            continue;
        }
        let http_port = meshgate_bench::free_port().to_string();
        let listen = format!("127.0.0.1:{http_port}");
        let mut env = nats_env.to_vec();
        env.push(("MESHGATE__HTTP__LISTEN", listen.as_str()));
        let gw = start_meshgate_with(&env)?;
        let rate = http_accepted_rate(&listen, concurrency, seconds).await?;
        row(&name, rate, "", None);
        drop(gw);
    }
    let name = "meshgate MQTT QoS 0 → NATS → raw NATS subscriber (meshgate's ingress)";
    if want(name) {
        let gw = start_meshgate_with(&nats_env)?;
        let (rate, lost) = mqtt_to_raw_nats(gw.port, &url, seconds).await?;
        row(name, rate, &lost.to_string(), None);
    }
    for (name, publishers) in [
        (
            "meshgate MQTT QoS 0 → NATS → MQTT, publisher on A, subscriber on B",
            1,
        ),
        (
            "meshgate MQTT QoS 0 → NATS → MQTT, 4 publishers on A, subscriber on B",
            4,
        ),
    ] {
        if !want(name) {
            continue;
        }
        let a = start_meshgate_with(&nats_env)?;
        let b = start_meshgate_with(&nats_env)?;
        let t = generator
            .throughput(a.port, b.port, QoS::AtMostOnce, publishers, seconds)
            .await?;
        let lat = if publishers == 1 {
            generator.latency(a.port, b.port, 2_000, seconds).await.ok()
        } else {
            None
        };
        throughput_row(name, &t, lat);
        drop((a, b));
    }
    let name = "meshgate MQTT QoS 0 → NATS → MQTT, publisher on A, 20 subscribers of one topic on B (every copy counted)";
    if want(name) {
        let a = start_meshgate_with(&nats_env)?;
        let b = start_meshgate_with(&nats_env)?;
        let t = meshgate_bench::raw::fanout_throughput(a.port, b.port, 20, seconds).await?;
        throughput_row(name, &t, None);
        drop((a, b));
    }
    let js_env = [
        ("MESHGATE__BACKBONE__KIND", "jetstream"),
        ("MESHGATE__BACKBONE__NATS__URLS", url.as_str()),
        ("MESHGATE__BACKBONE__NATS__WIRE_MODE", wire),
        ("MESHGATE__BACKBONE__JETSTREAM__STREAM", MESHGATE_STREAM),
        ("MESHGATE__BACKBONE__NATS__SUBJECT_PREFIX", "mgjs"),
    ];
    for publishers in [1, 4] {
        let name = format!(
            "meshgate MQTT QoS 1 → JetStream, {publishers} publisher(s), nobody subscribed (PUBACKed/s)"
        );
        if !want(&name) {
            continue;
        }
        fresh_jetstream(&url).await?;
        let gw = start_meshgate_with(&js_env)?;
        let rate = meshgate_bench::raw::acknowledged_rate(gw.port, publishers, seconds).await?;
        row(&name, rate, "", None);
    }
    // Each way the subscriptions read the stream (decision 0080).
    for (mode, label) in [("consumer_each", ""), ("instance_feed", ", instance feed")] {
        let mut env = js_env.to_vec();
        env.push(("MESHGATE__BACKBONE__JETSTREAM__SUBSCRIPTIONS", mode));
        for publishers in [1, 4] {
            let name =
                format!("meshgate MQTT QoS 1 → JetStream → MQTT{label}, {publishers} publisher(s)");
            if !want(&name) {
                continue;
            }
            fresh_jetstream(&url).await?;
            let gw = start_meshgate_with(&env)?;
            let t = generator
                .throughput(gw.port, gw.port, QoS::AtLeastOnce, publishers, seconds)
                .await?;
            let lat = if publishers == 1 {
                generator
                    .latency(gw.port, gw.port, 2_000, seconds)
                    .await
                    .ok()
            } else {
                None
            };
            throughput_row(
                &format!("{name}; PUBACKed/s {:.0}", t.accepted_rate),
                &t,
                lat,
            );
        }
    }
    let name = "meshgate MQTT QoS 0 → memory backbone → MQTT (reference)";
    if want(name) {
        let mem = start_meshgate_with(&[])?;
        let t = generator
            .throughput(mem.port, mem.port, QoS::AtMostOnce, 1, seconds)
            .await?;
        let lat = generator
            .latency(mem.port, mem.port, 2_000, seconds)
            .await
            .ok();
        throughput_row(name, &t, lat);
    }
    println!(
        "\n(lost: published or acknowledged, never delivered; latency rows use QoS 1 publishes at 2,000 msg/s, raw NATS flushes each message)"
    );
    Ok(())
}
