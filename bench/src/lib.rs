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
/// In the `extra` environment of [`start_meshgate_with`]: the meshgate binary to run instead of
/// the one beside the benchmark (not passed on to meshgate).
pub const BENCH_BIN: &str = "MESHGATE_BENCH_BIN";

pub fn start_meshgate_with(extra: &[(&str, &str)]) -> anyhow::Result<Broker> {
    spawn_meshgate(extra, None)
}

/// [`start_meshgate_with`], with meshgate's standard error in a file of its own (`name` names
/// the directory), returning once its `/readyz` answers 200: its MQTT port accepts as soon as
/// it is bound, before the backbone is set up (seconds on a JetStream R3 stream, its KV buckets
/// and consumers). When meshgate exits before that (a configuration it refuses), the error
/// quotes what it said; [`Broker::stderr`] reads it after a run.
pub fn start_meshgate_logged(extra: &[(&str, &str)], name: &str) -> anyhow::Result<Broker> {
    let admin = free_port();
    let listen = format!("127.0.0.1:{admin}");
    let mut env = extra.to_vec();
    env.push(("MESHGATE__ADMIN__LISTEN", listen.as_str()));
    let mut gateway = spawn_meshgate(&env, Some(temp_dir(name)))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_ok(admin, "/readyz") {
        if let Ok(Some(status)) = gateway.child.try_wait() {
            anyhow::bail!(
                "meshgate exited ({status}) before it was ready: {}",
                gateway.stderr().trim()
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "meshgate not ready after 60 s: {}",
            gateway.stderr().trim()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(gateway)
}

/// Whether `GET <path>` on the loopback `port` answers 200.
fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut status = [0u8; 12];
    socket.write_all(request.as_bytes()).is_ok()
        && socket.read_exact(&mut status).is_ok()
        && status.ends_with(b" 200")
}

fn spawn_meshgate(
    extra: &[(&str, &str)],
    log_dir: Option<std::path::PathBuf>,
) -> anyhow::Result<Broker> {
    let port = free_port();
    let exe = std::env::current_exe()?;
    // Another build of meshgate side by side (e.g. the commit before a change, to show what the
    // change costs): `MESHGATE_BENCH_BIN` in `extra` names its binary.
    let bin = match extra.iter().find(|(k, _)| *k == BENCH_BIN) {
        Some((_, path)) => std::path::PathBuf::from(path),
        None => exe.with_file_name("meshgate"),
    };
    anyhow::ensure!(
        bin.exists(),
        "{} missing: cargo build --release --bin meshgate",
        bin.display()
    );
    let stderr = match &log_dir {
        Some(dir) => Stdio::from(std::fs::File::create(dir.join(STDERR_FILE))?),
        None => Stdio::inherit(),
    };
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
        .envs(extra.iter().copied().filter(|(k, _)| *k != BENCH_BIN))
        .envs(workers_env())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()?;
    let mut gateway = Broker {
        port,
        child,
        _dir: log_dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        // A configuration it refuses makes it exit at once: say so now, with its words.
        if let Ok(Some(status)) = gateway.child.try_wait() {
            let said = gateway.stderr();
            anyhow::bail!(
                "meshgate exited ({status}) before listening: {}",
                said.trim()
            );
        }
        anyhow::ensure!(Instant::now() < deadline, "meshgate did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(gateway)
}

/// Where [`start_meshgate_logged`] keeps meshgate's standard error.
const STDERR_FILE: &str = "stderr.log";

impl Broker {
    /// What a gateway from [`start_meshgate_logged`] wrote to its standard error so far (empty
    /// for other processes).
    pub fn stderr(&self) -> String {
        self._dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join(STDERR_FILE)).ok())
            .unwrap_or_default()
    }
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

/// A nats-server cluster on loopback for the benchmarks: `n` nodes routed to each other, each
/// with JetStream, its own store directory and an HTTP monitoring port; one node is a plain
/// server (no cluster block). Every node is killed when this is dropped.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<Broker>,
    /// Each node's monitoring port (`/jsz`, `/connz`).
    pub monitors: Vec<u16>,
}

impl NatsCluster {
    /// Starts `n` nodes (names `n0`, `n1`, …) and, with more than one, waits until a node names
    /// a JetStream meta leader. Again on new ports when a node exits before it greets (a port
    /// taken between choosing it and the bind), up to 5 times.
    pub async fn start(name: &str, n: usize) -> anyhow::Result<NatsCluster> {
        let mut attempt = 0;
        let cluster = loop {
            attempt += 1;
            match NatsCluster::try_start(name, n) {
                Ok(cluster) => break cluster,
                Err(e) if attempt == 5 => return Err(e),
                Err(_) => {}
            }
        };
        if n > 1 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while cluster.meta_leader().await.is_none() {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the NATS cluster has no JetStream meta leader after 30 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(cluster)
    }

    fn try_start(name: &str, n: usize) -> anyhow::Result<NatsCluster> {
        let mut taken = std::collections::HashSet::new();
        let mut port = || loop {
            let p = free_port();
            if taken.insert(p) {
                return p;
            }
        };
        let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (port(), port(), port())).collect();
        let routes = ports
            .iter()
            .map(|(_, route, _)| format!("nats-route://127.0.0.1:{route}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut cluster = NatsCluster {
            nodes: Vec::new(),
            monitors: Vec::new(),
        };
        for (i, &(client, route, monitor)) in ports.iter().enumerate() {
            let dir = temp_dir(&format!("{name}-n{i}"));
            let routing = if n > 1 {
                format!(
                    "cluster {{\n  name: meshgate-bench\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n}}\n"
                )
            } else {
                String::new()
            };
            let conf = dir.join("nats-server.conf");
            std::fs::write(
                &conf,
                format!("server_name: n{i}\nhttp: \"127.0.0.1:{monitor}\"\n{routing}"),
            )?;
            let child = Command::new("/usr/sbin/nats-server")
                .arg("-c")
                .arg(&conf)
                .args(["-a", "127.0.0.1", "-p", &client.to_string(), "-js", "-sd"])
                .arg(dir.join("store"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    anyhow::anyhow!("nats-server: {e} (apt-get install -y nats-server)")
                })?;
            let mut node = Broker {
                port: client,
                child,
                _dir: Some(dir),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !answers_as_nats(client) {
                if let Ok(Some(status)) = node.child.try_wait() {
                    anyhow::bail!("nats-server n{i} exited ({status}) before listening");
                }
                anyhow::ensure!(Instant::now() < deadline, "nats-server n{i} did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
            cluster.nodes.push(node);
            cluster.monitors.push(monitor);
        }
        Ok(cluster)
    }

    /// Node `i`'s client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// GET `path` (e.g. `/jsz`) from node `i`'s monitoring listener; `None` when it does not
    /// answer.
    pub async fn monitor(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let response = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}{path}", self.monitors[i]))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// The JetStream meta leader's server name, as the first node that answers names it.
    pub async fn meta_leader(&self) -> Option<String> {
        for i in 0..self.nodes.len() {
            if let Some(jsz) = self.monitor(i, "/jsz").await
                && let Some(leader) = jsz["meta_cluster"]["leader"].as_str()
            {
                return Some(leader.to_owned());
            }
        }
        None
    }

    /// How many client connections whose name starts with `prefix` each node has.
    pub async fn connections(&self, prefix: &str) -> Vec<usize> {
        let mut counts = Vec::new();
        for i in 0..self.nodes.len() {
            let connz = self.monitor(i, "/connz?limit=1024").await;
            counts.push(connz.map_or(0, |c| {
                c["connections"].as_array().map_or(0, |list| {
                    list.iter()
                        .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
                        .count()
                })
            }));
        }
        counts
    }
}

/// Whether what listens on `port` is a nats-server: it greets with `INFO` (a bare connect
/// would also take another program's listener that got the port first).
pub fn answers_as_nats(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    let mut greeting = [0u8; 5];
    socket.read_exact(&mut greeting).is_ok() && &greeting == b"INFO "
}

/// What meshgate puts on the bus for one 256-byte MQTT publish: the two headers and the
/// structured CloudEvent (the data as Base64), about 520 bytes.
pub fn meshgate_like_message() -> (async_nats::HeaderMap, Vec<u8>) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Meshgate-Origin", "17@meshgate-bench");
    headers.insert("Content-Type", "application/cloudevents+json");
    let json = format!(
        r#"{{"specversion":"1.0","id":"019ae0b0-5c3d-7a41-8f2e-6b1d2c3e4f50","source":"mqtt://meshgate/raw-pub","type":"io.meshgate.mqtt.publish","subject":"bench/x","time":"2026-12-02T19:00:00.123456Z","data_base64":"{}"}}"#,
        "A".repeat(PAYLOAD.div_ceil(3) * 4)
    );
    (headers, json.into_bytes())
}

/// What the raw JetStream rows publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsMessages {
    /// The bare 256-byte payload.
    Bare,
    /// The bare payload with a `Nats-Msg-Id` (unique per message): what deduplication alone
    /// costs the server.
    BareWithMsgId,
    /// What meshgate stores for a 256-byte MQTT publish: its headers, `Nats-Msg-Id`, the
    /// structured JSON.
    Meshgate,
}

/// The raw JetStream rows' stream: `RAWBENCH`, subjects `jsbench.>`, file storage and 1 GiB as
/// meshgate's stream, `replicas` copies.
pub const RAW_STREAM: &str = "RAWBENCH";

/// Raw JetStream: creates [`RAW_STREAM`] with `replicas` and publishes to it for `seconds`
/// with 256 PubAcks outstanding; acknowledged/s.
pub async fn raw_jetstream(
    js: &async_nats::jetstream::Context,
    replicas: usize,
    seconds: u64,
    kind: JsMessages,
) -> anyhow::Result<f64> {
    js.create_stream(raw_stream(RAW_STREAM, "jsbench.>", replicas))
        .await?;
    let (acked, elapsed) = publish_with_acks(js, "jsbench.x", seconds, kind).await?;
    Ok(acked as f64 / elapsed)
}

/// A raw row's stream: file storage and 1 GiB, as meshgate's, `replicas` copies.
fn raw_stream(
    name: &str,
    subjects: &str,
    replicas: usize,
) -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        max_bytes: 1 << 30,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// A deduplication id as meshgate's JetStream backbone makes them (22 characters of the digest
/// of source and id), unique per message `n` and per `kind` of row.
fn raw_msg_id(kind: JsMessages, n: u64) -> String {
    meshgate_backbone::jetstream::dedup_id(
        &format!("mqtt://meshgate/raw-pub/{kind:?}"),
        &n.to_string(),
    )
}

/// Publishes to `subject` for `seconds` with up to 256 PubAcks outstanding; returns how many
/// were acknowledged and the seconds the publishing took (the final acks not included).
pub async fn publish_with_acks(
    js: &async_nats::jetstream::Context,
    subject: &'static str,
    seconds: u64,
    kind: JsMessages,
) -> anyhow::Result<(u64, f64)> {
    let origin = Instant::now();
    let started = Instant::now();
    let mut outstanding = std::collections::VecDeque::new();
    let mut acked = 0u64;
    // Encoded once: the publisher's own work per message stays a header insert and a clone.
    let (headers, body) = meshgate_like_message();
    let body = bytes::Bytes::from(body);
    while started.elapsed() < Duration::from_secs(seconds) {
        if outstanding.len() >= 256
            && let Some(f) = outstanding.pop_front()
        {
            let _: async_nats::jetstream::publish::PublishAck = f.await?;
            acked += 1;
        }
        let sent = acked + outstanding.len() as u64;
        let ack = match kind {
            JsMessages::Meshgate => {
                let mut headers = headers.clone();
                headers.insert("Nats-Msg-Id", raw_msg_id(kind, sent).as_str());
                js.publish_with_headers(subject, headers, body.clone())
                    .await?
            }
            JsMessages::BareWithMsgId => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", raw_msg_id(kind, sent).as_str());
                js.publish_with_headers(subject, headers, payload(origin).into())
                    .await?
            }
            JsMessages::Bare => js.publish(subject, payload(origin).into()).await?,
        };
        outstanding.push_back(ack);
    }
    let elapsed = started.elapsed().as_secs_f64();
    for f in outstanding {
        f.await?;
        acked += 1;
    }
    Ok((acked, elapsed))
}

/// The stream of [`raw_jetstream_consumed`]: `RAWBENCHC`, subjects `jsbenchc.>`.
pub const RAW_CONSUMED_STREAM: &str = "RAWBENCHC";

/// Raw JetStream end to end: the publisher of [`raw_jetstream`] (on `js`) plus a durable pull
/// consumer (explicit acks, one per message, as meshgate's) on a connection of its own to
/// `consumer_url`, on [`RAW_CONSUMED_STREAM`] with `replicas`; delivered and acked per second,
/// and lost (acknowledged to the publisher, not delivered within 30 s). What nats-server does
/// per message when someone consumes, without meshgate.
pub async fn raw_jetstream_consumed(
    js: &async_nats::jetstream::Context,
    consumer_url: &str,
    replicas: usize,
    seconds: u64,
    kind: JsMessages,
) -> anyhow::Result<(f64, u64)> {
    use async_nats::jetstream::consumer;
    use futures_util::StreamExt;
    let s = js
        .create_stream(raw_stream(RAW_CONSUMED_STREAM, "jsbenchc.>", replicas))
        .await?;
    let cjs = async_nats::jetstream::new(async_nats::connect(consumer_url).await?);
    s.create_consumer(consumer::pull::Config {
        durable_name: Some("raw".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ..Default::default()
    })
    .await?;
    let c: consumer::PullConsumer = cjs
        .get_stream(RAW_CONSUMED_STREAM)
        .await?
        .get_consumer("raw")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut messages = c.messages().await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let d = delivered.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            let _ = m.ack().await;
            d.fetch_add(1, Ordering::Relaxed);
        }
    });
    let (acked, elapsed) = publish_with_acks(js, "jsbenchc.x", seconds, kind).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.load(Ordering::Relaxed) < acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.abort();
    let got = delivered.load(Ordering::Relaxed);
    let _ = js.delete_stream(RAW_CONSUMED_STREAM).await;
    Ok((got as f64 / elapsed, acked.saturating_sub(got)))
}

/// p50/p99 (µs) from publish to PubAck of meshgate's messages at a steady `rate` on
/// [`RAW_STREAM`] (made by [`raw_jetstream`]): what storing one event costs a publisher, with
/// nobody consuming.
pub async fn publish_ack_latency(
    js: &async_nats::jetstream::Context,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(u64, u64)> {
    let (headers, body) = meshgate_like_message();
    let body = bytes::Bytes::from(body);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut waiting = Vec::new();
    for n in 0..rate * seconds {
        tick.tick().await;
        let sent = Instant::now();
        let mut headers = headers.clone();
        // Ids of their own (the throughput row's are still in the duplicate window).
        headers.insert(
            "Nats-Msg-Id",
            raw_msg_id(JsMessages::Meshgate, u64::MAX - n).as_str(),
        );
        let ack = js
            .publish_with_headers("jsbench.lat", headers, body.clone())
            .await?;
        waiting.push(tokio::spawn(async move {
            ack.await.ok().map(|_| sent.elapsed().as_micros() as u64)
        }));
    }
    let mut samples = Vec::with_capacity(waiting.len());
    for w in waiting {
        samples.extend(w.await?);
    }
    anyhow::ensure!(!samples.is_empty(), "no PubAck came");
    Ok(percentiles(samples))
}
