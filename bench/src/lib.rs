//! Shared parts of the benchmark programs: brokers as child processes on free loopback ports,
//! and the rumqttc load generator (throughput and latency).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub mod raw;

pub const PAYLOAD: usize = 256;

/// Which MQTT client drives a run: the same one for every broker in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// [`raw`]: pre-encoded packets on plain sockets, little CPU of its own (the default).
    Raw,
    /// rumqttc clients: what an application would use, but they take most of a core here.
    Rumqttc,
}

impl Generator {
    /// `--client raw|rumqttc` from the command line (default `raw`).
    pub fn from_args(args: &[String]) -> anyhow::Result<Generator> {
        match arg_value(args, "--client") {
            None | Some("raw") => Ok(Generator::Raw),
            Some("rumqttc") => Ok(Generator::Rumqttc),
            Some(other) => anyhow::bail!("--client {other}: expected raw or rumqttc"),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Generator::Raw => "raw-socket load generator (pre-encoded packets, batched writes)",
            Generator::Rumqttc => "rumqttc load generator",
        }
    }

    pub async fn throughput(
        self,
        pub_port: u16,
        sub_port: u16,
        qos: QoS,
        publishers: usize,
        seconds: u64,
    ) -> anyhow::Result<Throughput> {
        match self {
            Generator::Raw => {
                raw::throughput(pub_port, sub_port, qos as u8, publishers, seconds).await
            }
            Generator::Rumqttc => throughput(pub_port, sub_port, qos, publishers, seconds).await,
        }
    }

    pub async fn latency(
        self,
        pub_port: u16,
        sub_port: u16,
        rate: u64,
        seconds: u64,
    ) -> anyhow::Result<(u64, u64)> {
        match self {
            Generator::Raw => raw::latency(pub_port, sub_port, rate, seconds).await,
            Generator::Rumqttc => latency(pub_port, sub_port, rate, seconds).await,
        }
    }
}

#[derive(Debug)]
pub struct Broker {
    pub port: u16,
    pub child: Child,
    pub _dir: Option<std::path::PathBuf>,
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("meshgate-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::create_dir_all(&d);
    d
}

pub fn wait_listening(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The release `meshgate` binary next to this program, with its MQTT listener on a free port
/// and `extra` environment settings (e.g. the backbone).
pub fn start_meshgate_with(extra: &[(&str, &str)]) -> anyhow::Result<Broker> {
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
        // Within the 20,000 open files the benchmarks run under (`ulimit -n 20000`), with the
        // HTTP listener (unused here) capped low: meshgate warns when its caps exceed the limit.
        .env("MESHGATE__MQTT__MAX_CONNECTIONS", "19700")
        .env("MESHGATE__HTTP__MAX_CONNECTIONS", "100")
        .env("MESHGATE__HTTP__LISTEN", "127.0.0.1:0")
        .env("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0")
        .env("MESHGATE__LOG__LEVEL", "warn")
        .envs(extra.iter().copied())
        .envs(workers_env())
        .stdout(Stdio::null())
        .spawn()?;
    anyhow::ensure!(wait_listening(port), "meshgate did not listen");
    Ok(Broker {
        port,
        child,
        _dir: None,
    })
}

/// Mosquitto on a free loopback port: anonymous, no persistence, 100,000 queued messages per
/// client (its default of 1,000 drops QoS 1 messages of a slow subscriber within a second).
pub fn start_mosquitto() -> anyhow::Result<Broker> {
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

/// `MESHGATE__GATEWAY__WORKER_THREADS` for the meshgate child when the benchmark runs with
/// `BENCH_MESHGATE_WORKERS=<n>` (the load generator's own runtime is left alone).
pub fn workers_env() -> Vec<(String, String)> {
    std::env::var("BENCH_MESHGATE_WORKERS")
        .map(|n| vec![("MESHGATE__GATEWAY__WORKER_THREADS".to_owned(), n)])
        .unwrap_or_default()
}

/// A nats-server on a free loopback port with its own store directory (JetStream on).
pub fn start_nats_server(name: &str) -> anyhow::Result<Broker> {
    let port = free_port();
    let dir = temp_dir(name);
    let child = Command::new("/usr/sbin/nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("nats-server: {e} (apt-get install -y nats-server)"))?;
    anyhow::ensure!(wait_listening(port), "nats-server did not listen");
    Ok(Broker {
        port,
        child,
        _dir: Some(dir),
    })
}

pub fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(100);
    o
}

/// A connected client; events are polled by a task that reports publishes to `on_publish`.
pub async fn connect(
    id: &str,
    port: u16,
    on_publish: impl Fn(&[u8]) + Send + 'static,
) -> anyhow::Result<(AsyncClient, tokio::task::JoinHandle<()>)> {
    connect_counting(id, port, on_publish, None).await
}

/// Like [`connect`], counting the PUBACKs the broker sends in `acked`.
pub async fn connect_counting(
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

pub fn now_us(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

/// Payload: send time (µs, 8 bytes) then filler.
pub fn payload(origin: Instant) -> Vec<u8> {
    let mut p = now_us(origin).to_be_bytes().to_vec();
    p.resize(PAYLOAD, b'x');
    p
}

#[derive(Debug)]
pub struct Throughput {
    /// Delivered messages per second of publishing.
    pub rate: f64,
    /// Accepted (QoS 1: acknowledged) messages per second of publishing.
    pub accepted_rate: f64,
    /// QoS 1: publishes the broker acknowledged (PUBACK); QoS 0: publishes sent.
    pub accepted: u64,
    pub delivered: u64,
}

/// Waits until `delivered` reaches `sent` or stops growing (the tail of a run arriving).
pub async fn settle(delivered: &AtomicU64, sent: u64) {
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now == last || now >= sent {
            return;
        }
        last = now;
    }
}

/// p50 and p99 of latency samples (µs).
pub fn percentiles(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    let pct = |p: f64| {
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    (pct(0.50), pct(0.99))
}

impl Throughput {
    /// Rates over `seconds` of publishing.
    pub fn new(accepted: u64, delivered: u64, seconds: f64) -> Throughput {
        Throughput {
            rate: delivered as f64 / seconds,
            accepted_rate: accepted as f64 / seconds,
            accepted,
            delivered,
        }
    }
}

/// Delivered messages/s from `publishers` clients on `pub_port` to one subscriber on
/// `sub_port` (the same broker, or another gateway instance on the same bus).
pub async fn throughput(
    pub_port: u16,
    sub_port: u16,
    qos: QoS,
    publishers: usize,
    seconds: u64,
) -> anyhow::Result<Throughput> {
    let delivered = Arc::new(AtomicU64::new(0));
    let d = delivered.clone();
    let (sub, sub_task) = connect("bench-sub", sub_port, move |_| {
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
        let (client, task) = connect_counting(
            &format!("bench-pub-{i}"),
            pub_port,
            |_| {},
            Some(acked.clone()),
        )
        .await?;
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
    settle(&delivered, sent.load(Ordering::Relaxed)).await;
    let _ = sub.disconnect().await;
    sub_task.abort();
    let delivered = delivered.load(Ordering::Relaxed);
    let accepted = if qos == QoS::AtMostOnce {
        sent.load(Ordering::Relaxed)
    } else {
        acked.load(Ordering::Relaxed)
    };
    Ok(Throughput::new(accepted, delivered, publishing))
}

/// p50/p99 latency (µs) of QoS 1 publishes at a steady `rate`, publisher on `pub_port`,
/// subscriber on `sub_port`.
pub async fn latency(
    pub_port: u16,
    sub_port: u16,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(u64, u64)> {
    let origin = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = samples.clone();
    let (sub, sub_task) = connect("lat-sub", sub_port, move |p| {
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
    let (publ, pub_task) = connect("lat-pub", pub_port, |_| {}).await?;
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
    let v = samples.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(percentiles(v))
}

/// CPU time (user + system) a process has used so far.
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)` by position: state is field 3, utime 14, stime 15 (clock
    // ticks). By position, not by "what parses as a number": field 8 (tpgid) is -1 for a
    // daemon, and skipping it once made this read stime + cutime instead.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let field = |n: usize| -> u64 {
        rest.split(' ')
            .nth(n - 3)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((field(14) + field(15)) * 10)
}

/// The word after `name` on the command line (`--only MQTT`), if `name` is there.
pub fn arg_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The number after `name` on the command line (`--seconds 5`); `default` when `name` is
/// absent or not followed by a number.
pub fn arg_u64(args: &[String], name: &str, default: u64) -> u64 {
    arg_value(args, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The resident memory of process `pid`, in KiB (`VmRSS`; 0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}
