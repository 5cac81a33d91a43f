//! WebSocket rows next to MQTT → MQTT (issue 23): one `meshgate` child process (release
//! binary, memory backbone, default settings) with an MQTT listener and a web listener serves
//! the rows (a second one, with `slow_consumer = "drop"`, the drop rows; a fresh one each
//! memory row), the same load generator for every row, 256-byte payloads, one subscriber per
//! row, all rows in one run.
//!
//! Rows (`path`):
//! - **MQTT → MQTT**: raw QoS 0 publisher → raw QoS 0 subscriber on `bench/#`: the anchor.
//! - **MQTT → WebSocket**: the same raw QoS 0 publisher → one CloudEvents WebSocket subscriber
//!   (`/ws?subscribe=bench/%23`, subprotocol `cloudevents.json`). The MQTT 3.1.1 payload has
//!   no content type, so it arrives as `data_base64`; the send time is its first 8 bytes.
//! - **HTTP → WebSocket**: binary-mode CloudEvents POSTed to `/events/bench/p<i>` (reqwest,
//!   `content-type: text/plain`, the send time in a `ce-sentus` extension header) → one
//!   CloudEvents WebSocket subscriber.
//! - **… slow_consumer = drop**: the saturated runs again on a second meshgate process with
//!   `websocket.slow_consumer = "drop"` (the default, `disconnect`, closes a subscriber whose
//!   outbound queue, `websocket.outbound_queue_bytes` = 16 MiB, is full with 1008).
//!
//! Columns:
//! - **p50/p99 @2k/s**: publish-to-delivery latency of publishes paced at 2,000/s for S
//!   seconds (the first half second of deliveries is warm-up and not counted). The MQTT
//!   publisher writes each packet on its own; the HTTP one sends each POST from its own task
//!   on a shared keep-alive client, so a slow response does not hold back the next one.
//! - **saturated delivered/s, published/s, lost**: publishers as fast as they go for S seconds
//!   (MQTT: a raw publisher writing QoS 0 packets in batches of 200; HTTP: 8 closed-loop
//!   publishers, each on its own connection, each waiting for its 202). Published counts QoS 0
//!   packets written and 202-accepted POSTs; lost = published − delivered, once deliveries
//!   have stopped arriving. **subscriber** says whether the subscriber was still connected at
//!   the end or how the server closed it (after it closes, the rest of the publishes have no
//!   subscriber and count as lost). **CPU** is the meshgate process's and the load
//!   generator's (this process, subscriber included) CPU time over the saturated run, in % of
//!   one core (200 % is the whole 2-core machine).
//!
//!   Where nothing is lost, the gateway held the publishers back instead: the memory
//!   backbone's `full_policy = "block"` makes a publish wait while a subscriber's connection
//!   task is behind, and TCP then slows the publisher. The slow-consumer policy only applies
//!   when the subscriber's socket takes frames more slowly than meshgate produces them, so
//!   that its outbound queue (16 MiB) fills; this load generator's subscriber keeps up.
//! - **memory**: RSS growth of a fresh meshgate process per idle CloudEvents WebSocket
//!   connection (`--conns N` raw sockets that upgrade and then stay silent), with one
//!   subscription each (its own topic) and without; see also `ws-idle`.
//!
//! Every socket of the load generator has `TCP_NODELAY` set.
//!
//! Usage (release build; meshgate is started by this program on free loopback ports):
//! `cargo build --release -p meshgate -p meshgate-bench --bin ws &&
//! ./target/release/ws [--seconds S] [--rounds R] [--conns N] [--only SUBSTRING]
//! [--mqtt-publishers M] [--http-publishers H]`
//! (defaults: 5 s per cell, 1 round, 5,000 connections, 1 MQTT and 8 HTTP publishers in the
//! saturated runs; with several rounds each cell is the median; `--only` keeps the rows whose
//! path contains SUBSTRING, e.g. `HTTP`, `drop`, `memory`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use meshgate_bench::{
    Broker, PAYLOAD, free_port, now_us, percentiles, process_cpu, raw, rss_kib, settle,
    start_meshgate_with, wait_listening,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The steady publish rate of the latency columns.
const RATE: u64 = 2_000;
/// Raw MQTT publishers in a saturated run (`--mqtt-publishers`).
const MQTT_PUBLISHERS: usize = 1;
/// Closed-loop HTTP publishers in a saturated run (`--http-publishers`; each waits for its
/// 202: with 4 the machine was half idle, with 8 both cores are busy).
const HTTP_PUBLISHERS: usize = 8;
/// QoS 0 packets written per `write` by a saturating MQTT publisher.
const BATCH: usize = 200;

/// A meshgate child process: MQTT on `broker.port`, the web listener (HTTP ingress and the
/// CloudEvents WebSocket endpoint) on `web`.
struct Gateway {
    broker: Broker,
    web: u16,
}

impl Gateway {
    /// Starts meshgate with `websocket.slow_consumer = policy` and room for `connections`
    /// web connections (the connection caps stay within the 20,000 open files the
    /// benchmarks run under, or meshgate warns).
    fn start(policy: &str, connections: usize) -> anyhow::Result<Gateway> {
        let web = free_port();
        let listen = format!("127.0.0.1:{web}");
        let cap = (connections + 100).to_string();
        let broker = start_meshgate_with(&[
            ("MESHGATE__HTTP__LISTEN", listen.as_str()),
            ("MESHGATE__HTTP__MAX_CONNECTIONS", &cap),
            ("MESHGATE__WEBSOCKET__MAX_CONNECTIONS", &cap),
            ("MESHGATE__MQTT__MAX_CONNECTIONS", "100"),
            ("MESHGATE__WEBSOCKET__SLOW_CONSUMER", policy),
        ])?;
        anyhow::ensure!(
            wait_listening(web),
            "meshgate's web listener did not come up"
        );
        Ok(Gateway { broker, web })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ingress {
    Mqtt,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Egress {
    Mqtt,
    WebSocket,
}

/// One subscriber of a run: counts deliveries and, when asked, records latencies (µs).
struct Sink {
    delivered: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<u64>>>,
    /// How and when the subscription ended, if the server ended it.
    task: JoinHandle<Option<(String, Instant)>>,
}

impl Sink {
    /// Stops the subscriber; how and when the server had closed it, if it had.
    async fn finish(self) -> Option<(String, Instant)> {
        if self.task.is_finished() {
            return self.task.await.ok().flatten();
        }
        self.task.abort();
        None
    }

    fn latencies(&self) -> Vec<u64> {
        self.latencies.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Subscribes to `bench/#` through `egress`; with `record`, each delivery's latency is kept.
async fn subscribe(
    gw: &Gateway,
    egress: Egress,
    origin: Instant,
    record: bool,
) -> anyhow::Result<Sink> {
    let delivered = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let task = match egress {
        Egress::Mqtt => {
            // raw::connect sets TCP_NODELAY.
            let mut s = raw::connect(gw.broker.port, "bench-sub").await?;
            raw::subscribe(&mut s, "bench/#", 0).await?;
            let l = latencies.clone();
            let on_sent = move |sent: u64| {
                if record && let Ok(mut v) = l.lock() {
                    v.push(now_us(origin).saturating_sub(sent));
                }
            };
            let d = delivered.clone();
            tokio::spawn(async move {
                // It returns when the connection ends: the task is aborted before, unless the
                // server closed it.
                raw::subscriber(s, d, on_sent).await;
                Some(("connection ended".to_owned(), Instant::now()))
            })
        }
        Egress::WebSocket => {
            let mut req = format!("ws://127.0.0.1:{}/ws?subscribe=bench/%23", gw.web)
                .into_client_request()?;
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", "cloudevents.json".parse()?);
            // `true`: TCP_NODELAY.
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true).await?;
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.contains("io.meshgate.subscribed") => {}
                other => anyhow::bail!("no subscription greeting: {other:?}"),
            }
            let (d, l) = (delivered.clone(), latencies.clone());
            tokio::spawn(async move {
                let mut local = Vec::new();
                let end = loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) => {
                            d.fetch_add(1, Ordering::Relaxed);
                            if record && let Some(sent) = sent_us(t.as_str()) {
                                local.push(now_us(origin).saturating_sub(sent));
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            break Some(match frame {
                                Some(f) => format!("closed {} ({})", u16::from(f.code), f.reason),
                                None => "closed without a code".to_owned(),
                            });
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break Some(format!("error: {e}")),
                        None => break Some("connection ended".to_owned()),
                    }
                    // Latencies are handed over as they come: the task is aborted at the end.
                    if local.len() >= 64
                        && let Ok(mut v) = l.lock()
                    {
                        v.append(&mut local);
                    }
                };
                if let Ok(mut v) = l.lock() {
                    v.append(&mut local);
                }
                end.map(|what| (what, Instant::now()))
            })
        }
    };
    // The subscription is in place once the SUBACK/greeting came; a moment for the backbone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Sink {
        delivered,
        latencies,
        task,
    })
}

/// The send time (µs since the run's origin) in a CloudEvents JSON text: the `sentus`
/// extension (HTTP ingress), or the first 8 bytes of `data_base64` (MQTT ingress). Both are
/// found by a substring search, so that the subscriber is not the bottleneck.
fn sent_us(json: &str) -> Option<u64> {
    if let Some((_, rest)) = json.split_once("\"sentus\":\"") {
        return rest.split_once('"')?.0.parse().ok();
    }
    let (_, rest) = json.split_once("\"data_base64\":\"")?;
    // 12 Base64 characters are 9 bytes: the 8 of the send time and one of filler.
    let mut bits: u128 = 0;
    for c in rest.as_bytes().get(..12)? {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = bits << 6 | u128::from(v);
    }
    Some((bits >> 8) as u64)
}

/// A client for the HTTP publishers: keep-alive, `TCP_NODELAY`.
fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().tcp_nodelay(true).build()?)
}

/// POSTs one 256-byte binary-mode CloudEvent stamped with the current time; true on 202.
async fn post(client: &reqwest::Client, url: &str, id: String, origin: Instant) -> bool {
    static BODY: [u8; PAYLOAD] = [b'x'; PAYLOAD];
    let r = client
        .post(url)
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/bench")
        .header("ce-type", "com.example.bench")
        .header("ce-sentus", now_us(origin).to_string())
        .header("content-type", "text/plain")
        .body(&BODY[..])
        .send()
        .await;
    matches!(r, Ok(resp) if resp.status() == reqwest::StatusCode::ACCEPTED)
}

/// Publishes `RATE × seconds` events through `ingress`, paced at [`RATE`]/s; the number the
/// gateway accepted.
async fn publish_paced(
    gw: &Gateway,
    ingress: Ingress,
    origin: Instant,
    seconds: u64,
) -> anyhow::Result<u64> {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = RATE * seconds;
    match ingress {
        Ingress::Mqtt => {
            let s = raw::connect(gw.broker.port, "lat-pub").await?;
            let (mut rd, mut wr) = s.into_split();
            // Nothing comes back for QoS 0, but the socket is read so that it never fills.
            let reader = tokio::spawn(async move {
                let mut b = vec![0u8; 4096];
                while matches!(rd.read(&mut b).await, Ok(n) if n > 0) {}
            });
            let mut pkt = Vec::with_capacity(PAYLOAD + 16);
            for _ in 0..total {
                tick.tick().await;
                pkt.clear();
                raw::publish_packet("bench/x", 0, 0, now_us(origin), &mut pkt);
                wr.write_all(&pkt).await?;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = wr.write_all(&[0xe0, 0]).await; // DISCONNECT
            reader.abort();
            Ok(total)
        }
        Ingress::Http => {
            let client = http_client()?;
            let url = format!("http://127.0.0.1:{}/events/bench/x", gw.web);
            let mut posts = Vec::with_capacity(total as usize);
            for i in 0..total {
                tick.tick().await;
                let (client, url) = (client.clone(), url.clone());
                posts.push(tokio::spawn(async move {
                    post(&client, &url, i.to_string(), origin).await
                }));
            }
            let mut accepted = 0;
            for p in posts {
                accepted += u64::from(p.await.unwrap_or(false));
            }
            Ok(accepted)
        }
    }
}

/// Starts `publishers` publishing through `ingress` as fast as they go until `stop`; each
/// task returns the number the gateway accepted (QoS 0: written).
async fn publish_saturated(
    gw: &Gateway,
    ingress: Ingress,
    publishers: usize,
    origin: Instant,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<JoinHandle<u64>>> {
    let mut tasks = Vec::new();
    match ingress {
        Ingress::Mqtt => {
            for i in 0..publishers {
                let mut s = raw::connect(gw.broker.port, &format!("bench-pub-{i}")).await?;
                let (stop, topic) = (stop.clone(), format!("bench/{i}"));
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::with_capacity(BATCH * (PAYLOAD + 16));
                    let mut sent = 0;
                    while !stop.load(Ordering::Relaxed) {
                        out.clear();
                        let now = now_us(origin);
                        for _ in 0..BATCH {
                            raw::publish_packet(&topic, 0, 0, now, &mut out);
                        }
                        if s.write_all(&out).await.is_err() {
                            break;
                        }
                        sent += BATCH as u64;
                    }
                    let _ = s.write_all(&[0xe0, 0]).await; // DISCONNECT
                    sent
                }));
            }
        }
        Ingress::Http => {
            for p in 0..publishers {
                // A client each: its own connection.
                let client = http_client()?;
                let url = format!("http://127.0.0.1:{}/events/bench/p{p}", gw.web);
                let stop = stop.clone();
                tasks.push(tokio::spawn(async move {
                    let (mut i, mut accepted) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        accepted +=
                            u64::from(post(&client, &url, format!("{p}-{i}"), origin).await);
                        i += 1;
                    }
                    accepted
                }));
            }
        }
    }
    Ok(tasks)
}

/// p50/p99 (µs) at the steady rate, `ingress` → `egress` on `gw`.
async fn steady(
    gw: &Gateway,
    ingress: Ingress,
    egress: Egress,
    seconds: u64,
) -> anyhow::Result<(u64, u64)> {
    let origin = Instant::now();
    let sink = subscribe(gw, egress, origin, true).await?;
    let published = publish_paced(gw, ingress, origin, seconds).await?;
    settle(&sink.delivered, published).await;
    let delivered = sink.delivered.load(Ordering::Relaxed);
    let mut latencies = sink.latencies();
    if let Some((end, _)) = sink.finish().await {
        eprintln!("{ingress:?} -> {egress:?} at {RATE}/s: subscriber {end}");
    }
    if delivered < published {
        eprintln!(
            "{ingress:?} -> {egress:?} at {RATE}/s: {} of {published} not delivered",
            published - delivered
        );
    }
    anyhow::ensure!(
        latencies.len() as u64 > RATE / 2,
        "{ingress:?} -> {egress:?}: {} latency samples",
        latencies.len()
    );
    // Deliveries arrive in order: the first half second is warm-up.
    latencies.drain(..(RATE / 2) as usize);
    Ok(percentiles(latencies))
}

/// What a saturated run gave.
struct Saturated {
    published: u64,
    delivered: u64,
    secs: f64,
    /// CPU time of the meshgate process and of this one (the load generator) over the run,
    /// as a share of one core.
    meshgate_cpu: f64,
    generator_cpu: f64,
    /// How the server closed the subscriber, if it did.
    end: Option<String>,
}

/// `publishers` as fast as they go for `seconds`, `ingress` → `egress` on `gw`.
async fn saturated(
    gw: &Gateway,
    ingress: Ingress,
    egress: Egress,
    publishers: usize,
    seconds: u64,
) -> anyhow::Result<Saturated> {
    let origin = Instant::now();
    let sink = subscribe(gw, egress, origin, false).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (meshgate, generator) = (gw.broker.child.id(), std::process::id());
    let cpu0 = (process_cpu(meshgate), process_cpu(generator));
    let started = Instant::now();
    let tasks = publish_saturated(gw, ingress, publishers, origin, &stop).await?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let mut published = 0;
    for t in tasks {
        published += t.await?;
    }
    settle(&sink.delivered, published).await;
    // Over publishing and the tail of deliveries (the settling adds half a second of idle).
    let busy = started.elapsed().as_secs_f64() - 0.5;
    let meshgate_cpu = (process_cpu(meshgate) - cpu0.0).as_secs_f64() / busy;
    let generator_cpu = (process_cpu(generator) - cpu0.1).as_secs_f64() / busy;
    let delivered = sink.delivered.load(Ordering::Relaxed);
    let end = sink.finish().await.map(|(what, at)| {
        format!(
            "{what} after {:.2} s, {delivered} delivered",
            at.duration_since(started).as_secs_f64()
        )
    });
    Ok(Saturated {
        published,
        delivered,
        secs,
        meshgate_cpu,
        generator_cpu,
        end,
    })
}

/// Sends a WebSocket upgrade for `path` (subprotocol `cloudevents.json`) and reads the
/// response head; fails unless it is 101. Nothing is sent or read after it.
async fn upgrade(port: u16, path: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: cloudevents.json\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed during the upgrade");
        head.extend_from_slice(&buf[..n]);
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 101"),
        "upgrade refused: {}",
        String::from_utf8_lossy(&head)
    );
    Ok(s)
}

/// KiB of RSS per idle CloudEvents WebSocket connection on a fresh meshgate process, over
/// `n` connections: each subscribed to its own topic (`fleet/<i>`), or to nothing.
async fn rss_per_connection(subscribed: bool, n: usize) -> anyhow::Result<f64> {
    let gw = Gateway::start("disconnect", n + 1)?;
    let path = |i: usize| {
        if subscribed {
            format!("/ws?subscribe=fleet/{i}")
        } else {
            "/ws".to_owned()
        }
    };
    // One connection first: what is allocated once (buffers, tables) is not per connection.
    let _warm = upgrade(gw.web, &path(usize::MAX)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(gw.broker.child.id());
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(upgrade(gw.web, &path(i)).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(gw.broker.child.id());
    drop(conns);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

/// A row of the table: a path, and on which gateway (policy) it runs.
struct Row {
    path: &'static str,
    ingress: Ingress,
    egress: Egress,
    /// On the `slow_consumer = "drop"` gateway (saturated runs only).
    drop_policy: bool,
    p50: Vec<f64>,
    p99: Vec<f64>,
    delivered: Vec<f64>,
    published: Vec<f64>,
    lost: Vec<f64>,
    meshgate_cpu: Vec<f64>,
    generator_cpu: Vec<f64>,
    ends: Vec<String>,
}

impl Row {
    fn new(path: &'static str, ingress: Ingress, egress: Egress, drop_policy: bool) -> Row {
        Row {
            path,
            ingress,
            egress,
            drop_policy,
            p50: Vec::new(),
            p99: Vec::new(),
            delivered: Vec::new(),
            published: Vec::new(),
            lost: Vec::new(),
            meshgate_cpu: Vec::new(),
            generator_cpu: Vec::new(),
            ends: Vec::new(),
        }
    }
}

/// How the subscriber fared in each round: identical outcomes once, with their count.
fn ends(ends: &[String]) -> String {
    let mut distinct: Vec<(&str, usize)> = Vec::new();
    for e in ends {
        match distinct.iter_mut().find(|(d, _)| d == e) {
            Some((_, n)) => *n += 1,
            None => distinct.push((e, 1)),
        }
    }
    let rounds = ends.len();
    distinct
        .iter()
        .map(|(e, n)| {
            if rounds > 1 {
                format!("{e} ({n}/{rounds} rounds)")
            } else {
                (*e).to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The median of the rounds, or an empty cell.
fn median(v: &[f64], unit: &str) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2)
        .map(|m| format!("{m:.0}{unit}"))
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| meshgate_bench::arg_u64(&args, name, default);
    let seconds = arg("--seconds", 5).max(1);
    let rounds = arg("--rounds", 1).max(1) as usize;
    let conns = arg("--conns", 5_000) as usize;
    let mqtt_publishers = arg("--mqtt-publishers", MQTT_PUBLISHERS as u64).max(1) as usize;
    let http_publishers = arg("--http-publishers", HTTP_PUBLISHERS as u64).max(1) as usize;
    let only = meshgate_bench::arg_value(&args, "--only");
    let wanted = |path: &str| only.is_none_or(|o| path.contains(o));

    let mut rows: Vec<Row> = [
        Row::new("MQTT → MQTT", Ingress::Mqtt, Egress::Mqtt, false),
        Row::new("MQTT → WebSocket", Ingress::Mqtt, Egress::WebSocket, false),
        Row::new(
            "MQTT → WebSocket, slow_consumer = drop",
            Ingress::Mqtt,
            Egress::WebSocket,
            true,
        ),
        Row::new("HTTP → WebSocket", Ingress::Http, Egress::WebSocket, false),
        Row::new(
            "HTTP → WebSocket, slow_consumer = drop",
            Ingress::Http,
            Egress::WebSocket,
            true,
        ),
    ]
    .into_iter()
    .filter(|r| wanted(r.path))
    .collect();

    println!(
        "meshgate (memory backbone, child process) -> one subscriber, {PAYLOAD}-byte payloads, {seconds} s per cell, {rounds} round(s) (median), all on this machine"
    );
    println!(
        "saturated: {mqtt_publishers} raw MQTT QoS 0 publisher(s) / {http_publishers} closed-loop HTTP publishers; lost = published - delivered\n"
    );
    if !rows.is_empty() {
        // Both run all along (an idle one costs no CPU): the default policy and "drop".
        let gw = Gateway::start("disconnect", 100)?;
        let drop_gw = if rows.iter().any(|r| r.drop_policy) {
            Some(Gateway::start("drop", 100)?)
        } else {
            None
        };
        for _ in 0..rounds {
            for row in &mut rows {
                let on = match (&drop_gw, row.drop_policy) {
                    (Some(d), true) => d,
                    _ => &gw,
                };
                if !row.drop_policy {
                    match steady(on, row.ingress, row.egress, seconds).await {
                        Ok((p50, p99)) => {
                            row.p50.push(p50 as f64);
                            row.p99.push(p99 as f64);
                        }
                        Err(e) => eprintln!("{}: steady run failed: {e}", row.path),
                    }
                }
                let publishers = match row.ingress {
                    Ingress::Mqtt => mqtt_publishers,
                    Ingress::Http => http_publishers,
                };
                match saturated(on, row.ingress, row.egress, publishers, seconds).await {
                    Ok(s) => {
                        row.delivered.push(s.delivered as f64 / s.secs);
                        row.published.push(s.published as f64 / s.secs);
                        row.lost
                            .push(s.published.saturating_sub(s.delivered) as f64);
                        row.meshgate_cpu.push(s.meshgate_cpu * 100.0);
                        row.generator_cpu.push(s.generator_cpu * 100.0);
                        row.ends
                            .push(s.end.unwrap_or_else(|| "stayed connected".to_owned()));
                    }
                    Err(e) => eprintln!("{}: saturated run failed: {e}", row.path),
                }
            }
        }
    }

    let memory: Vec<(&str, bool)> = [
        ("memory: CloudEvents WebSocket, one subscription each", true),
        ("memory: CloudEvents WebSocket, no subscription", false),
    ]
    .into_iter()
    .filter(|(path, _)| wanted(path))
    .collect();
    let mut memory_rows = Vec::new();
    for (path, subscribed) in memory {
        let cell = match rss_per_connection(subscribed, conns).await {
            Ok(kib) => format!("{kib:.1} KiB"),
            Err(e) => format!("error: {e}"),
        };
        memory_rows.push((path, cell));
    }

    if !rows.is_empty() {
        println!(
            "| path | p50 @2k/s | p99 @2k/s | saturated delivered/s | published/s | lost | CPU meshgate / generator | subscriber at saturation |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---|");
        for row in &rows {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} / {} | {} |",
                row.path,
                median(&row.p50, " µs"),
                median(&row.p99, " µs"),
                median(&row.delivered, ""),
                median(&row.published, ""),
                median(&row.lost, ""),
                median(&row.meshgate_cpu, " %"),
                median(&row.generator_cpu, " %"),
                ends(&row.ends)
            );
        }
    }
    if !memory_rows.is_empty() {
        println!("\n| connection | RSS per idle connection ({conns}) |");
        println!("|---|---:|");
        for (path, cell) in memory_rows {
            println!("| {path} | {cell} |");
        }
    }
    Ok(())
}
