//! MQTT → MQTT side by side: meshgate, Mosquitto and nats-server's MQTT listener, same load
//! generator (rumqttc), same machine, one run.
//!
//! For each broker: delivered messages/s for QoS 0 and QoS 1 with 1 and 4 publishers (256-byte
//! payloads, one subscriber on `bench/#`, loss counted), p50/p99 latency at a fixed 2,000 msg/s,
//! and RSS per idle connection with `--conns N` idle MQTT connections.
//!
//! Usage (release build; the brokers are started by this program on free loopback ports):
//! `cargo run --release -p meshgate-bench --bin mqtt -- [--seconds S] [--conns N] [--only NAME] [--rss-only]`
//! Needs `/usr/sbin/mosquitto` and `/usr/sbin/nats-server` (Debian packages `mosquitto`,
//! `nats-server`); a missing one is reported and skipped in the table.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const PAYLOAD: usize = 256;

struct Broker {
    port: u16,
    child: Child,
    _dir: Option<std::path::PathBuf>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self._dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("meshgate-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::create_dir_all(&d);
    d
}

fn wait_listening(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn start_meshgate() -> anyhow::Result<Broker> {
    let port = free_port();
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("meshgate");
    anyhow::ensure!(
        bin.exists(),
        "{} missing: cargo build --release --bin meshgate",
        bin.display()
    );
    let child = Command::new(bin)
        .arg("run")
        .env("MESHGATE__MQTT__ENABLED", "true")
        .env("MESHGATE__MQTT__LISTEN", format!("127.0.0.1:{port}"))
        .env("MESHGATE__MQTT__MAX_QUEUED", "100000")
        // Bare payloads to 3.1.1 subscribers, as the other brokers deliver them (the default,
        // structured CloudEvents JSON, adds ~200 bytes per message).
        .env("MESHGATE__MQTT__V311_OUTBOUND", "data")
        .env("MESHGATE__MQTT__MAX_CONNECTIONS", "100000")
        .env("MESHGATE__HTTP__LISTEN", "127.0.0.1:0")
        .env("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0")
        .env("MESHGATE__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    anyhow::ensure!(wait_listening(port), "meshgate did not listen");
    Ok(Broker {
        port,
        child,
        _dir: None,
    })
}

fn start_mosquitto() -> anyhow::Result<Broker> {
    let port = free_port();
    let dir = temp_dir("mosquitto");
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\npersistence false\n"
        ),
    )?;
    let child = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    anyhow::ensure!(wait_listening(port), "mosquitto did not listen");
    Ok(Broker {
        port,
        child,
        _dir: Some(dir),
    })
}

fn start_nats() -> anyhow::Result<Broker> {
    let port = free_port();
    let nats_port = free_port();
    let dir = temp_dir("nats");
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{nats_port}\nserver_name: bench\njetstream {{ store_dir: \"{}\" }}\nmqtt {{ listen: 127.0.0.1:{port} }}\n",
            dir.join("js").display()
        ),
    )?;
    let child = Command::new("/usr/sbin/nats-server")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    anyhow::ensure!(wait_listening(port), "nats-server did not listen on MQTT");
    Ok(Broker {
        port,
        child,
        _dir: Some(dir),
    })
}

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(100);
    o
}

/// A connected client; events are polled by a task that reports publishes to `on_publish`.
async fn connect(
    id: &str,
    port: u16,
    on_publish: impl Fn(&[u8]) + Send + 'static,
) -> anyhow::Result<(AsyncClient, tokio::task::JoinHandle<()>)> {
    connect_counting(id, port, on_publish, None).await
}

/// Like [`connect`], counting the PUBACKs the broker sends in `acked`.
async fn connect_counting(
    id: &str,
    port: u16,
    on_publish: impl Fn(&[u8]) + Send + 'static,
    acked: Option<Arc<AtomicU64>>,
) -> anyhow::Result<(AsyncClient, tokio::task::JoinHandle<()>)> {
    let (client, mut el) = AsyncClient::new(options(id, port), 1000);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&p.payload),
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    if let Some(a) = &acked {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), ready_rx).await??;
    Ok((client, task))
}

fn now_us(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

/// Payload: send time (µs, 8 bytes) then filler.
fn payload(origin: Instant) -> Vec<u8> {
    let mut p = now_us(origin).to_be_bytes().to_vec();
    p.resize(PAYLOAD, b'x');
    p
}

struct Throughput {
    rate: f64,
    /// QoS 1: publishes the broker acknowledged (PUBACK); QoS 0: publishes sent.
    accepted: u64,
    delivered: u64,
}

async fn throughput(
    port: u16,
    qos: QoS,
    publishers: usize,
    seconds: u64,
) -> anyhow::Result<Throughput> {
    let delivered = Arc::new(AtomicU64::new(0));
    let d = delivered.clone();
    let (sub, sub_task) = connect("bench-sub", port, move |_| {
        d.fetch_add(1, Ordering::Relaxed);
    })
    .await?;
    sub.subscribe("bench/#", qos).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let origin = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..publishers {
        let (client, task) =
            connect_counting(&format!("bench-pub-{i}"), port, |_| {}, Some(acked.clone())).await?;
        let (stop, sent) = (stop.clone(), sent.clone());
        tasks.push((
            task,
            tokio::spawn(async move {
                let topic = format!("bench/{i}");
                while !stop.load(Ordering::Relaxed) {
                    if client
                        .publish(&topic, qos, false, payload(origin))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                // Let the in-flight window drain before leaving.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = client.disconnect().await;
            }),
        ));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let publishing = started.elapsed().as_secs_f64();
    for (task, publisher) in tasks {
        let _ = publisher.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    // Let the tail arrive: wait until deliveries stop growing.
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now == last || now >= sent.load(Ordering::Relaxed) {
            break;
        }
        last = now;
    }
    let _ = sub.disconnect().await;
    sub_task.abort();
    let delivered = delivered.load(Ordering::Relaxed);
    let accepted = if qos == QoS::AtMostOnce {
        sent.load(Ordering::Relaxed)
    } else {
        acked.load(Ordering::Relaxed)
    };
    Ok(Throughput {
        rate: delivered as f64 / publishing,
        accepted,
        delivered,
    })
}

async fn latency(port: u16, rate: u64, seconds: u64) -> anyhow::Result<(u64, u64)> {
    let origin = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = samples.clone();
    let (sub, sub_task) = connect("lat-sub", port, move |p| {
        if p.len() >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&p[..8]);
            let sent = u64::from_be_bytes(b);
            if let Ok(mut v) = s.lock() {
                v.push(now_us(origin).saturating_sub(sent));
            }
        }
    })
    .await?;
    sub.subscribe("lat/#", QoS::AtLeastOnce).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (publ, pub_task) = connect("lat-pub", port, |_| {}).await?;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for _ in 0..rate * seconds {
        tick.tick().await;
        publ.publish("lat/x", QoS::AtLeastOnce, false, payload(origin))
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = publ.disconnect().await;
    let _ = sub.disconnect().await;
    pub_task.abort();
    sub_task.abort();
    let mut v = samples.lock().map(|v| v.clone()).unwrap_or_default();
    v.sort_unstable();
    let pct = |p: f64| {
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    Ok((pct(0.50), pct(0.99)))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Opens `n` idle MQTT 3.1.1 connections with raw CONNECT packets; RSS growth per connection.
async fn rss_per_connection(broker: &Broker, n: usize) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let before = rss_kib(broker.child.id());
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", broker.port)).await?;
        let id = format!("idle-{i}");
        let mut pkt = vec![
            0x10,
            (12 + id.len()) as u8,
            0,
            4,
            b'M',
            b'Q',
            b'T',
            b'T',
            4,
            2,
            0,
            240,
        ];
        pkt.extend_from_slice(&(id.len() as u16).to_be_bytes());
        pkt.extend_from_slice(id.as_bytes());
        s.write_all(&pkt).await?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await?;
        anyhow::ensure!(ack[3] == 0, "connection {i} refused: {ack:?}");
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(broker.child.id());
    drop(conns);
    Ok((after.saturating_sub(before)) as f64 / n as f64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seconds = arg("--seconds", 5);
    let conns = arg("--conns", 20_000) as usize;
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let rss_only = args.iter().any(|a| a == "--rss-only");
    println!(
        "MQTT -> MQTT, {PAYLOAD}-byte payloads, one subscriber on bench/#, {seconds} s per cell, rumqttc load generator, all on this machine\n"
    );
    println!(
        "| broker | QoS0 1 pub | QoS0 4 pub | QoS1 1 pub | QoS1 4 pub | QoS1 acked, not delivered | p50 @2k/s | p99 @2k/s | RSS/idle conn ({conns}) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    type Start = fn() -> anyhow::Result<Broker>;
    let starters: [(&str, Start); 3] = [
        ("meshgate", start_meshgate),
        ("mosquitto", start_mosquitto),
        ("nats-server", start_nats),
    ];
    for (name, start) in starters {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        if rss_only {
            let fresh = start()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let r = rss_per_connection(&fresh, conns).await?;
            println!("| {name} | | | | | | | | {r:.1} KiB |");
            continue;
        }
        let broker = match start() {
            Ok(b) => b,
            Err(e) => {
                println!("| {name} | not run: {e} | | | | | | | |");
                continue;
            }
        };
        let mut cells = Vec::new();
        let mut loss = 0;
        for (qos, pubs) in [
            (QoS::AtMostOnce, 1),
            (QoS::AtMostOnce, 4),
            (QoS::AtLeastOnce, 1),
            (QoS::AtLeastOnce, 4),
        ] {
            match throughput(broker.port, qos, pubs, seconds).await {
                Ok(t) => {
                    if qos == QoS::AtLeastOnce {
                        loss += t.accepted.saturating_sub(t.delivered);
                    }
                    cells.push(format!("{:.0}", t.rate));
                }
                Err(e) => cells.push(format!("error: {e}")),
            }
        }
        let (p50, p99) = match latency(broker.port, 2_000, seconds).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{name}: latency run failed: {e}");
                (0, 0)
            }
        };
        drop(broker);
        // A fresh process for the memory figure, so that heap grown by the load above does
        // not hide the cost of connections.
        let rss = match start() {
            Ok(fresh) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                rss_per_connection(&fresh, conns).await
            }
            Err(e) => Err(e),
        };
        let rss = match rss {
            Ok(r) => format!("{r:.1} KiB"),
            Err(e) => format!("error: {e}"),
        };
        println!(
            "| {name} | {} | {} | {} | {} | {loss} | {p50} µs | {p99} µs | {rss} |",
            cells[0], cells[1], cells[2], cells[3]
        );
    }
    Ok(())
}
