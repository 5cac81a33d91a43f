//! meshgate on a NATS cluster, JetStream R1 against R3 (issue 26, "Benchmark").
//!
//! In one run, for each of a 1-node server with a stream of one replica (R1), a 3-node cluster
//! with R1 and the same cluster with R3 (each on a cluster of its own, started fresh):
//! - raw JetStream publish + PubAck on that cluster, from node 0: async-nats, meshgate's
//!   messages (2 headers and `Nats-Msg-Id`, ~520-byte CloudEvent JSON), 256 acknowledgements
//!   outstanding (acked/s), and publish → PubAck p50/p99 at a steady 2,000 msg/s; then the same
//!   publisher with a durable pull consumer on node 1 acknowledging each message (delivered/s:
//!   what the cluster does per message end to end, without meshgate);
//! - meshgate MQTT QoS 1 → JetStream → MQTT across two gateway instances: gateway A connected
//!   to node 0 only, gateway B to node 1 only (both to node 0 on one node), the publisher on A
//!   and a QoS 1 subscriber on B: delivered/s as fast as the publisher goes (100 QoS 1
//!   publishes unacknowledged), lost (acknowledged, never delivered), and p50/p99 latency at a
//!   steady 2,000 msg/s.
//!
//! `--subscriptions consumer_each|instance_feed` (a comma list runs each): how the gateways read
//! the stream; by default instance_feed on R1, consumer_each on R3 (instance_feed needed
//! replicas = 1 when this was written). A gateway that refuses to start is a row that says so.
//!
//! `--window N`: each MQTT publisher of the raw generator keeps N QoS 1 publishes
//! unacknowledged (100 by default, as rumqttc's, which `--client rumqttc` keeps) and the
//! gateways run with `mqtt.max_inflight = N`; `--window 256` gives the
//! meshgate row the raw rows' 256 outstanding.
//!
//! Usage (release build; starts its own nats-server and meshgate processes on free ports):
//! `cargo build --release -p meshgate -p meshgate-bench && ./target/release/cluster [--seconds S] [--publishers N] [--window N] [--client raw|rumqttc] [--subscriptions MODE[,MODE]] [--only <setup name part>]`

use std::time::{Duration, Instant};

use anyhow::Context;

use meshgate_bench::{
    Broker, Generator, JsMessages, NatsCluster, PAYLOAD, RAW_STREAM, Throughput, arg_u64,
    arg_value, process_cpu, publish_ack_latency, raw_jetstream, raw_jetstream_consumed,
    start_meshgate_logged,
};
use rumqttc::QoS;

/// Publishes per second of the latency rows.
const RATE: u64 = 2_000;

/// One column group of the table: a cluster and the stream's replicas.
struct Setup {
    name: &'static str,
    nodes: usize,
    replicas: usize,
}

const SETUPS: [Setup; 3] = [
    Setup {
        name: "1 node, R1",
        nodes: 1,
        replicas: 1,
    },
    Setup {
        name: "3 nodes, R1",
        nodes: 3,
        replicas: 1,
    },
    Setup {
        name: "3 nodes, R3",
        nodes: 3,
        replicas: 3,
    },
];

/// What the meshgate part of a row measured.
struct Measured {
    throughput: Throughput,
    latency: (u64, u64),
    /// Lines for the notes under the table: where the stream and the connections were, what
    /// the gateways logged.
    notes: Vec<String>,
}

/// The stream's leader (its server name), as the cluster reports it.
async fn stream_leader(js: &async_nats::jetstream::Context, stream: &str) -> String {
    match js.get_stream(stream).await {
        Ok(mut s) => match s.info().await {
            Ok(info) => info
                .cluster
                .as_ref()
                .and_then(|c| c.leader.clone())
                .unwrap_or_else(|| "n0".to_owned()),
            Err(e) => format!("? ({e})"),
        },
        Err(e) => format!("? ({e})"),
    }
}

/// The last few lines a gateway logged, for the notes.
fn logged(gateway: &str, broker: &Broker) -> Option<String> {
    let said = broker.stderr();
    let lines: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.get(lines.len().saturating_sub(3)..)?;
    (!last.is_empty()).then(|| {
        format!(
            "gateway {gateway} logged {} line(s), the last: {}",
            lines.len(),
            last.join(" / ")
        )
    })
}

/// `--window`'s value for `MESHGATE__MQTT__MAX_INFLIGHT`, when not the default.
static MQTT_WINDOW: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The meshgate part of a row: gateways A (node 0) and B (node 1, or 0 on one node) on a
/// stream of their own.
async fn meshgate_row(
    cluster: &NatsCluster,
    js: &async_nats::jetstream::Context,
    setup: &Setup,
    subscriptions: &str,
    generator: Generator,
    publishers: usize,
    seconds: u64,
) -> anyhow::Result<Measured> {
    let replicas = setup.replicas.to_string();
    let short = if subscriptions == "instance_feed" {
        "IF"
    } else {
        "CE"
    };
    let stream = format!("MG_{short}_N{}_R{}", setup.nodes, setup.replicas);
    let prefix = stream.to_lowercase().replace('_', "");
    let common = [
        ("MESHGATE__BACKBONE__KIND", "jetstream"),
        ("MESHGATE__BACKBONE__JETSTREAM__STREAM", stream.as_str()),
        ("MESHGATE__BACKBONE__NATS__SUBJECT_PREFIX", prefix.as_str()),
        ("MESHGATE__BACKBONE__JETSTREAM__REPLICAS", replicas.as_str()),
        (
            "MESHGATE__BACKBONE__JETSTREAM__SUBSCRIPTIONS",
            subscriptions,
        ),
    ];
    let (url_a, url_b) = (cluster.url(0), cluster.url(1 % setup.nodes));
    let mut common = common.to_vec();
    if let Some(window) = MQTT_WINDOW.get() {
        common.push(("MESHGATE__MQTT__MAX_INFLIGHT", window.as_str()));
    }
    let common = common;
    let mut env_a = common.to_vec();
    env_a.push(("MESHGATE__BACKBONE__NATS__URLS", url_a.as_str()));
    env_a.push(("MESHGATE__GATEWAY__INSTANCE_ID", "bench-a"));
    let mut env_b = common.to_vec();
    env_b.push(("MESHGATE__BACKBONE__NATS__URLS", url_b.as_str()));
    env_b.push(("MESHGATE__GATEWAY__INSTANCE_ID", "bench-b"));
    let a = start_meshgate_logged(&env_a, "cluster-gw-a").context("gateway A")?;
    let b = start_meshgate_logged(&env_b, "cluster-gw-b").context("gateway B")?;
    let measured = async {
        // CPU of every process of the row while it runs saturated (this machine has 2 cores).
        let pids: Vec<u32> = [a.child.id(), b.child.id()]
            .into_iter()
            .chain(cluster.nodes.iter().map(|n| n.child.id()))
            .collect();
        let cpu_before: Vec<Duration> = pids.iter().map(|&p| process_cpu(p)).collect();
        let started = Instant::now();
        let throughput = generator
            .throughput(a.port, b.port, QoS::AtLeastOnce, publishers, seconds)
            .await
            .context("throughput")?;
        let cpu = cpu_percent(&pids, cpu_before, started);
        let placed = format!(
            "stream {stream} led by {}; NATS connections per node (n0, n1, …): A {:?}, B {:?}; PUBACKed/s {:.0}; CPU while saturated: A {}, B {}, nodes {}",
            stream_leader(js, &stream).await,
            cluster.connections("meshgate bench-a").await,
            cluster.connections("meshgate bench-b").await,
            throughput.accepted_rate,
            cpu[0],
            cpu[1],
            cpu[2..].join(" ")
        );
        let latency = generator
            .latency(a.port, b.port, RATE, seconds)
            .await
            .context("latency")?;
        anyhow::Ok((throughput, latency, placed))
    }
    .await;
    let logs: Vec<String> = logged("A", &a).into_iter().chain(logged("B", &b)).collect();
    drop((a, b));
    let _ = js.delete_stream(&stream).await;
    match measured {
        Ok((throughput, latency, placed)) => Ok(Measured {
            throughput,
            latency,
            notes: std::iter::once(placed).chain(logs).collect(),
        }),
        Err(e) if logs.is_empty() => Err(e),
        Err(e) => Err(e.context(logs.join("; "))),
    }
}

/// The CPU each of `pids` used since `cpu_before` was read at `started`, in % of one core.
fn cpu_percent(pids: &[u32], cpu_before: Vec<Duration>, started: Instant) -> Vec<String> {
    let wall = started.elapsed().as_secs_f64();
    pids.iter()
        .zip(cpu_before)
        .map(|(&p, before)| {
            let used = process_cpu(p).saturating_sub(before).as_secs_f64();
            format!("{:.0}%", 100.0 * used / wall)
        })
        .collect()
}

/// `/proc/loadavg`'s first three figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn nats_server_version() -> String {
    std::process::Command::new("/usr/sbin/nats-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg_u64(&args, "--seconds", 5);
    let publishers = arg_u64(&args, "--publishers", 1).max(1) as usize;
    let generator = Generator::from_args(&args)?;
    // `--window N`: QoS 1 publishes unacknowledged per MQTT publisher, and meshgate's
    // `mqtt.max_inflight` (its window towards the subscriber) to match; 100 by default.
    let window = arg_u64(&args, "--window", 100).clamp(1, u64::from(u16::MAX));
    if window != 100 {
        meshgate_bench::raw::set_window(window as usize);
        let _ = MQTT_WINDOW.set(window.to_string());
    }
    let modes: Option<Vec<&str>> = arg_value(&args, "--subscriptions")
        .map(|m| m.split(',').map(str::trim).collect::<Vec<_>>());
    for m in modes.iter().flatten() {
        anyhow::ensure!(
            matches!(*m, "consumer_each" | "instance_feed"),
            "--subscriptions {m}: expected consumer_each or instance_feed"
        );
    }
    println!(
        "NATS cluster, JetStream R1 and R3 ({}): {PAYLOAD}-byte MQTT payloads, {seconds} s per measurement, {publishers} QoS 1 publisher(s) on gateway A (node 0), one QoS 1 subscriber on gateway B (node 1), MQTT by the {}; raw rows: async-nats on node 0, meshgate's messages, 256 PubAcks outstanding; MQTT window (publisher in flight, mqtt.max_inflight) {window}; latency at {RATE} msg/s; load average at start {}\n",
        nats_server_version(),
        generator.describe(),
        load_average()
    );
    println!(
        "| cluster | subscriptions | raw publish+ack/s | raw publish→ack p50 / p99 @2k/s | raw publish+ack → consumer on node 1, delivered/s | meshgate delivered/s | % of raw publish+ack | % of raw end to end | lost | p50 @2k/s | p99 @2k/s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // `--only <text>`: the setups whose name contains it (`--only R3`).
    let only = arg_value(&args, "--only");
    let mut notes = Vec::new();
    for setup in SETUPS
        .iter()
        .filter(|s| only.is_none_or(|o| s.name.contains(o)))
    {
        let cluster = NatsCluster::start(
            &format!("cluster-{}n-r{}", setup.nodes, setup.replicas),
            setup.nodes,
        )
        .await?;
        let js = async_nats::jetstream::new(async_nats::connect(cluster.url(0)).await?);
        let pids: Vec<u32> = std::iter::once(std::process::id())
            .chain(cluster.nodes.iter().map(|n| n.child.id()))
            .collect();
        let cpu_before: Vec<Duration> = pids.iter().map(|&p| process_cpu(p)).collect();
        let started = Instant::now();
        let raw = raw_jetstream(&js, setup.replicas, seconds, JsMessages::Meshgate).await?;
        let cpu = cpu_percent(&pids, cpu_before, started);
        let raw_leader = stream_leader(&js, RAW_STREAM).await;
        let (raw50, raw99) = publish_ack_latency(&js, RATE, seconds).await?;
        // The next rows start on a server without the raw row's messages.
        js.delete_stream(RAW_STREAM).await?;
        let (raw_e2e, raw_e2e_lost) = raw_jetstream_consumed(
            &js,
            &cluster.url(1 % setup.nodes),
            setup.replicas,
            seconds,
            JsMessages::Meshgate,
        )
        .await?;
        notes.push(format!(
            "{}: raw stream led by {raw_leader}; CPU while publishing: this program {}, nodes {}; raw end to end lost {raw_e2e_lost}",
            setup.name,
            cpu[0],
            cpu[1..].join(" ")
        ));
        let defaults = [if setup.replicas > 1 {
            "consumer_each"
        } else {
            "instance_feed"
        }];
        for &mode in modes.as_deref().unwrap_or(&defaults) {
            let raw_cells = format!("{raw:.0} | {raw50} / {raw99} µs | {raw_e2e:.0}");
            match meshgate_row(&cluster, &js, setup, mode, generator, publishers, seconds).await {
                Ok(m) => {
                    let t = &m.throughput;
                    println!(
                        "| {} | {mode} | {raw_cells} | {:.0} | {:.0}% | {:.0}% | {} | {} µs | {} µs |",
                        setup.name,
                        t.rate,
                        100.0 * t.rate / raw,
                        100.0 * t.rate / raw_e2e,
                        t.accepted.saturating_sub(t.delivered),
                        m.latency.0,
                        m.latency.1
                    );
                    notes.extend(
                        m.notes
                            .iter()
                            .map(|n| format!("{}, {mode}: {n}", setup.name)),
                    );
                }
                Err(e) => {
                    println!(
                        "| {} | {mode} | {raw_cells} | gateway failed | | | | | |",
                        setup.name
                    );
                    notes.push(format!("{}, {mode}: {e:#}", setup.name));
                }
            }
        }
        drop(cluster);
        // Let the killed nodes' ports and files go before the next cluster.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!();
    for n in notes {
        println!("- {n}");
    }
    println!(
        "\n(% of raw: meshgate's delivered/s over the raw row's rate on the same cluster; raw end to end: the raw publisher plus a durable pull consumer on node 1 acknowledging each message; lost: acknowledged (PUBACK), never delivered; CPU: % of one core, averaged over the whole measurement with its start and drain; load average at end {})",
        load_average()
    );
    Ok(())
}
