//! The AMQP bridge next to RabbitMQ itself, in one run (issue 5).
//!
//! Rows, 256-byte messages, one publisher with publisher confirms (256 outstanding) for a fixed
//! time, then a drain:
//! - **direct**: RabbitMQ publish → queue → a lapin consumer with manual acks (prefetch 256);
//! - **meshgate → WebSocket**: the same publisher → queue → meshgate's AMQP source → memory
//!   backbone → a CloudEvents WebSocket subscriber;
//! - **meshgate → NATS**: the same, over the NATS backbone to a raw NATS subscriber.
//!
//! For each: messages confirmed and delivered per second, messages lost (confirmed but never
//! delivered), and CPU per message of RabbitMQ (`beam.smp`) and of the meshgate process, read
//! from /proc. Uses the RabbitMQ on 127.0.0.1:5672 (guest/guest) and its own nats-server.
//!
//! Usage: `cargo build --release -p meshgate -p meshgate-bench && ./target/release/amqp [--seconds S] [--rounds R]`
//! (`BENCH_MESHGATE_WORKERS=N` sets meshgate's `gateway.worker_threads`)

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use meshgate_bench::{Broker, PAYLOAD, free_port, process_cpu, temp_dir, wait_listening};

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const WINDOW: usize = 256;

/// (busy, total) jiffies of the whole machine, from the first line of /proc/stat.
fn machine() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    // idle and iowait are fields 4 and 5.
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn busy_since(start: (u64, u64)) -> f64 {
    let (b, t) = machine();
    (b - start.0) as f64 / (t - start.1).max(1) as f64 * 100.0
}

fn rabbitmq_pid() -> anyhow::Result<u32> {
    let out = Command::new("pgrep").args(["-o", "beam.smp"]).output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("RabbitMQ (beam.smp) is not running"))
}

async fn channel(conn: &Connection) -> anyhow::Result<lapin::Channel> {
    Ok(conn.create_channel().await?)
}

async fn declare(queue: &str) -> anyhow::Result<()> {
    let conn = Connection::connect(URI, ConnectionProperties::default()).await?;
    let ch = channel(&conn).await?;
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    conn.close(200, "ok".into()).await?;
    Ok(())
}

/// Publishes binary-mode CloudEvents for `seconds` with up to WINDOW confirms outstanding;
/// returns how many RabbitMQ confirmed.
async fn publish(queue: &str, seconds: u64) -> anyhow::Result<u64> {
    let conn = Connection::connect(URI, ConnectionProperties::default()).await?;
    let ch = channel(&conn).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = vec![b'x'; PAYLOAD];
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_source", "/bench"),
        ("cloudEvents_type", "bench"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut pending = FuturesUnordered::new();
    let (mut confirmed, mut n) = (0u64, 0u64);
    while Instant::now() < end {
        while pending.len() >= WINDOW {
            if let Some(Ok(c)) = pending.next().await
                && lapin::Confirmation::is_ack(&c)
            {
                confirmed += 1;
            }
        }
        let mut h = headers.clone();
        h.insert(
            "cloudEvents_id".into(),
            AMQPValue::LongString(format!("b-{n}").into()),
        );
        n += 1;
        let props = BasicProperties::default()
            .with_content_type("application/octet-stream".into())
            .with_headers(h);
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?;
        pending.push(confirm);
    }
    while let Some(c) = pending.next().await {
        if c.is_ok_and(|c| c.is_ack()) {
            confirmed += 1;
        }
    }
    conn.close(200, "ok".into()).await?;
    Ok(confirmed)
}

/// Waits until `delivered` stops growing (or reaches `expected`), up to 30 s.
async fn drain(delivered: &AtomicU64, expected: u64) {
    let mut last = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let now = delivered.load(Ordering::Relaxed);
        if now >= expected || now == last {
            return;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct Row {
    confirmed: u64,
    delivered: u64,
    seconds: f64,
    rabbit_cpu: Duration,
    meshgate_cpu: Option<Duration>,
    /// Share of both cores busy while publishing and draining.
    machine_busy: f64,
}

fn print_row(name: &str, r: &Row, direct: Option<&Row>) {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / r.delivered.max(1) as f64;
    let rabbit_us = per(r.rabbit_cpu);
    let (mg_us, added) = match (r.meshgate_cpu, direct) {
        (Some(m), Some(d)) => {
            let direct_us = d.rabbit_cpu.as_secs_f64() * 1e6 / d.delivered.max(1) as f64;
            (
                format!("{:.1}", per(m)),
                format!("{:.0}%", per(m) / direct_us * 100.0),
            )
        }
        _ => (String::new(), String::new()),
    };
    let rate = r.delivered as f64 / r.seconds;
    let of_direct = direct.map_or(String::new(), |d| {
        format!("{:.0}%", rate / (d.delivered as f64 / d.seconds) * 100.0)
    });
    println!(
        "| {name} | {:.0} | {rate:.0} | {of_direct} | {} | {rabbit_us:.1} | {mg_us} | {added} | {:.0}% |",
        r.confirmed as f64 / r.seconds,
        r.confirmed.saturating_sub(r.delivered),
        r.machine_busy,
    );
}

async fn direct(rabbit: u32, seconds: u64) -> anyhow::Result<Row> {
    let queue = format!("mg-bench-direct-{}", std::process::id());
    declare(&queue).await?;
    let conn = Connection::connect(URI, ConnectionProperties::default()).await?;
    let ch = channel(&conn).await?;
    ch.basic_qos(WINDOW as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let d = delivered.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(m)) = consumer.next().await {
            let _ = m.acker.ack(BasicAckOptions::default()).await;
            d.fetch_add(1, Ordering::Relaxed);
        }
    });
    let (cpu0, m0) = (process_cpu(rabbit), machine());
    let confirmed = publish(&queue, seconds).await?;
    drain(&delivered, confirmed).await;
    let row = Row {
        confirmed,
        delivered: delivered.load(Ordering::Relaxed),
        seconds: seconds as f64,
        rabbit_cpu: process_cpu(rabbit) - cpu0,
        meshgate_cpu: None,
        machine_busy: busy_since(m0),
    };
    task.abort();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "ok".into()).await;
    Ok(row)
}

/// The release meshgate binary with an AMQP source on `queue` and `backbone` settings.
fn start_meshgate(queue: &str, web_port: u16, backbone: &str) -> anyhow::Result<Broker> {
    let prefetch: u16 = std::env::var("BENCH_PREFETCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(WINDOW as u16);
    let dir = temp_dir("amqp");
    let file = dir.join("meshgate.toml");
    std::fs::write(
        &file,
        format!(
            "[http]\nlisten = \"127.0.0.1:{web_port}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"warn\"\n[websocket]\noutbound_queue_bytes = \"256MiB\"\n{backbone}\n[amqp]\nenabled = true\n[[amqp.sources]]\nname = \"bench\"\nqueue = \"{queue}\"\nprefetch = {prefetch}\n"
        ),
    )?;
    let bin = std::env::current_exe()?.with_file_name("meshgate");
    anyhow::ensure!(
        bin.exists(),
        "{} missing: cargo build --release --bin meshgate",
        bin.display()
    );
    let child = Command::new(bin)
        .args(["run", "-c"])
        .arg(&file)
        .envs(meshgate_bench::workers_env())
        .stdout(Stdio::null())
        .spawn()?;
    anyhow::ensure!(wait_listening(web_port), "meshgate did not listen");
    Ok(Broker {
        port: web_port,
        child,
        _dir: Some(dir),
    })
}

/// meshgate with its source on a fresh queue; `subscribe` starts the subscriber counting into
/// the given counter and returns once it is subscribed.
async fn through_meshgate<F, Fut>(
    rabbit: u32,
    seconds: u64,
    backbone: &str,
    subscribe: F,
) -> anyhow::Result<Row>
where
    F: FnOnce(u16, Arc<AtomicU64>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<tokio::task::JoinHandle<()>>>,
{
    let queue = format!("mg-bench-meshgate-{}-{}", std::process::id(), free_port());
    declare(&queue).await?;
    let web_port = free_port();
    let gw = start_meshgate(&queue, web_port, backbone)?;
    let delivered = Arc::new(AtomicU64::new(0));
    let task = subscribe(web_port, delivered.clone()).await?;
    // Let the source connect and start consuming.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, mg0, m0) = (process_cpu(rabbit), process_cpu(gw.child.id()), machine());
    let confirmed = publish(&queue, seconds).await?;
    drain(&delivered, confirmed).await;
    let row = Row {
        confirmed,
        delivered: delivered.load(Ordering::Relaxed),
        seconds: seconds as f64,
        rabbit_cpu: process_cpu(rabbit) - cpu0,
        meshgate_cpu: Some(process_cpu(gw.child.id()) - mg0),
        machine_busy: busy_since(m0),
    };
    task.abort();
    drop(gw);
    let conn = Connection::connect(URI, ConnectionProperties::default()).await?;
    let _ = channel(&conn)
        .await?
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    Ok(row)
}

async fn websocket_subscriber(
    port: u16,
    delivered: Arc<AtomicU64>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://127.0.0.1:{port}/ws?subscribe=%23").into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "cloudevents.json".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    // The gateway's subscription confirmation.
    let _ = ws.next().await;
    Ok(tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_text() {
                delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }))
}

/// The row whose delivered rate is the median of `rows` (an odd count gives a real run).
fn median(mut rows: Vec<Row>) -> Row {
    rows.sort_by(|a, b| {
        (a.delivered as f64 / a.seconds).total_cmp(&(b.delivered as f64 / b.seconds))
    });
    let mid = rows.len() / 2;
    rows.swap_remove(mid)
}

async fn nats_subscriber(
    url: String,
    delivered: Arc<AtomicU64>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let client = async_nats::connect(&url).await?;
    let mut sub = client.subscribe("meshgate.>").await?;
    client.flush().await?;
    Ok(tokio::spawn(async move {
        let _keep = client;
        while sub.next().await.is_some() {
            delivered.fetch_add(1, Ordering::Relaxed);
        }
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| meshgate_bench::arg_u64(&args, name, default);
    let (seconds, rounds) = (arg("--seconds", 5), arg("--rounds", 3).max(1));
    let rabbit = rabbitmq_pid()?;
    println!(
        "AMQP bridge: {PAYLOAD}-byte binary-mode CloudEvents, one publisher with confirms ({WINDOW} outstanding) for {seconds} s per run, RabbitMQ on 127.0.0.1:5672, all on this machine; {rounds} rounds of the three paths interleaved, the median run of each path shown\n"
    );
    let nats = meshgate_bench::start_nats_server("amqp-nats")?;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let backbone = format!("[backbone]\nkind = \"nats\"\n[backbone.nats]\nurls = [\"{url}\"]\n");
    let (mut directs, mut wss, mut natss) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let d = direct(rabbit, seconds).await?;
        let ws = through_meshgate(rabbit, seconds, "", websocket_subscriber).await?;
        let n = through_meshgate(rabbit, seconds, &backbone, |_, delivered| {
            nats_subscriber(url.clone(), delivered)
        })
        .await?;
        eprintln!(
            "round {round}: direct {:.0}/s, websocket {:.0}/s, nats {:.0}/s",
            d.delivered as f64 / d.seconds,
            ws.delivered as f64 / ws.seconds,
            n.delivered as f64 / n.seconds
        );
        directs.push(d);
        wss.push(ws);
        natss.push(n);
    }
    println!(
        "| path | confirmed/s | delivered/s | of direct | lost | RabbitMQ CPU µs/msg | meshgate CPU µs/msg | meshgate CPU / direct RabbitMQ CPU | machine busy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let d = median(directs);
    print_row("direct: publish → queue → consumer (manual acks)", &d, None);
    print_row(
        "AMQP → meshgate → memory backbone → WebSocket",
        &median(wss),
        Some(&d),
    );
    print_row(
        "AMQP → meshgate → NATS backbone → NATS subscriber",
        &median(natss),
        Some(&d),
    );
    Ok(())
}
