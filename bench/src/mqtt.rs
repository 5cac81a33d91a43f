//! MQTT → MQTT side by side: meshgate, Mosquitto and nats-server's MQTT listener, same load
//! generator (raw sockets by default, rumqttc with `--client rumqttc`), same machine, one run.
//!
//! For each broker: delivered messages/s for QoS 0 and QoS 1 with 1 and 4 publishers (256-byte
//! payloads, one subscriber on `bench/#`, loss counted), p50/p99 latency at a fixed 2,000 msg/s,
//! and RSS per idle connection with `--conns N` idle MQTT connections (3.1.1 CONNECTs, or MQTT 5
//! with `--v5`; nats-server's listener speaks 3.1.1 only, so its cell is then an error).
//!
//! Usage (release build; the brokers are started by this program on free loopback ports):
//! `cargo run --release -p meshgate-bench --bin mqtt -- [--seconds S] [--rounds R] [--conns N] [--only NAME] [--rss-only] [--v5] [--client raw|rumqttc] [--tracing-cost]`
//!
//! `--tracing-cost` adds meshgate with `[tracing]` on (every trace sampled) and, when
//! `MESHGATE_BENCH_BASELINE` names another meshgate binary (the build before a change), that
//! build, as rows of their own in the same run.
//! Needs `/usr/sbin/mosquitto` and `/usr/sbin/nats-server` (Debian packages `mosquitto`,
//! `nats-server`); a missing one is reported and skipped in the table.

use std::process::{Command, Stdio};
use std::time::Duration;

use meshgate_bench::{
    Broker, Generator, PAYLOAD, free_port, rss_kib, start_meshgate_with, start_mosquitto, temp_dir,
    wait_listening,
};
use rumqttc::QoS;

fn start_meshgate() -> anyhow::Result<Broker> {
    start_meshgate_with(&[])
}

/// `--tracing-cost`: meshgate with `[tracing]` on, every trace sampled, spans exported to a
/// port nobody listens on (what recording costs; export failures only drop spans).
fn start_meshgate_tracing() -> anyhow::Result<Broker> {
    let endpoint = format!("http://127.0.0.1:{}/v1/traces", free_port());
    start_meshgate_with(&[
        ("MESHGATE__TRACING__ENABLED", "true"),
        ("MESHGATE__TRACING__ENDPOINT", &endpoint),
    ])
}

/// `--tracing-cost` with `MESHGATE_BENCH_BASELINE=<binary>`: that build of meshgate (e.g. the
/// commit before tracing) beside this one, tracing off in both.
fn start_meshgate_baseline() -> anyhow::Result<Broker> {
    let bin = std::env::var("MESHGATE_BENCH_BASELINE")
        .map_err(|_| anyhow::anyhow!("MESHGATE_BENCH_BASELINE names no binary"))?;
    start_meshgate_with(&[(meshgate_bench::BENCH_BIN, &bin)])
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

/// Opens `n` idle MQTT connections (3.1.1, or 5 with `v5`) with raw CONNECT packets; RSS
/// growth per connection.
async fn rss_per_connection(broker: &Broker, n: usize, v5: bool) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let before = rss_kib(broker.child.id());
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", broker.port)).await?;
        let id = format!("idle-{i}");
        let connect = if v5 {
            meshgate_bench::raw::connect_packet_v5(&id, 240)
        } else {
            meshgate_bench::raw::connect_packet(&id, 240)
        };
        s.write_all(&connect).await?;
        // CONNACK: type, remaining length (one byte: an MQTT 5 CONNACK's properties stay
        // under 128 bytes here), flags, return/reason code, [properties].
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await?;
        anyhow::ensure!(
            head[0] == 0x20 && head[1] < 0x80 && head[1] >= 2,
            "connection {i}: not a CONNACK: {head:?}"
        );
        let mut body = vec![0u8; usize::from(head[1])];
        s.read_exact(&mut body).await?;
        anyhow::ensure!(body[1] == 0, "connection {i} refused: {body:?}");
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(broker.child.id());
    drop(conns);
    Ok((after.saturating_sub(before)) as f64 / n as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| meshgate_bench::arg_u64(&args, name, default);
    let seconds = arg("--seconds", 5);
    let conns = arg("--conns", 20_000) as usize;
    let rounds = arg("--rounds", 3).max(1) as usize;
    let only = meshgate_bench::arg_value(&args, "--only");
    let rss_only = args.iter().any(|a| a == "--rss-only");
    // The idle connections of the memory column connect with MQTT 5 instead of 3.1.1.
    let v5 = args.iter().any(|a| a == "--v5");
    let generator = Generator::from_args(&args)?;
    println!(
        "MQTT -> MQTT, {PAYLOAD}-byte payloads, one subscriber on bench/#, {seconds} s per cell, {}, all on this machine",
        generator.describe()
    );
    println!(
        "{rounds} round(s), brokers taking turns within each round; each cell is the median of the rounds\n"
    );
    type Start = fn() -> anyhow::Result<Broker>;
    let mut starters: Vec<(&str, Start)> = vec![("meshgate", start_meshgate as Start)];
    if args.iter().any(|a| a == "--tracing-cost") {
        if std::env::var_os("MESHGATE_BENCH_BASELINE").is_some() {
            starters.push(("meshgate baseline", start_meshgate_baseline));
        }
        starters.push(("meshgate tracing on", start_meshgate_tracing));
    }
    starters.push(("mosquitto", start_mosquitto));
    starters.push(("nats-server", start_nats));
    starters.retain(|(name, _)| only.is_none_or(|o| o == *name));
    let mut rows: Vec<Row> = starters.iter().map(|(name, _)| Row::new(name)).collect();
    if !rss_only {
        // All brokers run at once (an idle one costs no CPU), so that rounds can alternate.
        let mut brokers = Vec::new();
        for ((name, start), row) in starters.iter().zip(&mut rows) {
            match start() {
                Ok(b) => brokers.push(Some(b)),
                Err(e) => {
                    row.error = Some(format!("not run: {e}"));
                    brokers.push(None);
                    eprintln!("{name}: {e}");
                }
            }
        }
        let cells = [
            (QoS::AtMostOnce, 1),
            (QoS::AtMostOnce, 4),
            (QoS::AtLeastOnce, 1),
            (QoS::AtLeastOnce, 4),
        ];
        for _ in 0..rounds {
            for (c, (qos, pubs)) in cells.iter().enumerate() {
                for (broker, row) in brokers.iter().zip(&mut rows) {
                    let Some(broker) = broker else { continue };
                    match generator
                        .throughput(broker.port, broker.port, *qos, *pubs, seconds)
                        .await
                    {
                        Ok(t) => {
                            if *qos == QoS::AtLeastOnce {
                                row.loss += t.accepted.saturating_sub(t.delivered);
                            }
                            row.rates[c].push(t.rate);
                        }
                        Err(e) => eprintln!("{}: {e}", row.name),
                    }
                }
            }
            for (broker, row) in brokers.iter().zip(&mut rows) {
                let Some(broker) = broker else { continue };
                match generator
                    .latency(broker.port, broker.port, 2_000, seconds)
                    .await
                {
                    Ok((p50, p99)) => {
                        row.p50.push(p50 as f64);
                        row.p99.push(p99 as f64);
                    }
                    Err(e) => eprintln!("{}: latency run failed: {e}", row.name),
                }
            }
        }
    }
    for ((_, start), row) in starters.iter().zip(&mut rows) {
        // A fresh process for the memory figure, so that heap grown by the load above does
        // not hide the cost of connections.
        row.rss = match start() {
            Ok(fresh) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                rss_per_connection(&fresh, conns, v5)
                    .await
                    .map(|r| format!("{r:.1} KiB"))
            }
            Err(e) => Err(e),
        }
        .unwrap_or_else(|e| format!("error: {e}"));
    }
    println!(
        "| broker | QoS0 1 pub | QoS0 4 pub | QoS1 1 pub | QoS1 4 pub | QoS1 acked, not delivered | p50 @2k/s | p99 @2k/s | RSS/idle conn ({conns}{}) |",
        if v5 { ", MQTT 5" } else { "" }
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        if let Some(e) = &row.error {
            println!("| {} | {e} | | | | | | | {} |", row.name, row.rss);
            continue;
        }
        let cells: Vec<String> = row
            .rates
            .iter()
            .map(|r| {
                if r.is_empty() {
                    String::new()
                } else {
                    format!("{:.0}", median(r.clone()))
                }
            })
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} µs | {:.0} µs | {} |",
            row.name,
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            row.loss,
            median(row.p50.clone()),
            median(row.p99.clone()),
            row.rss
        );
    }
    // meshgate against the better of the others, cell by cell.
    if let Some((me, others)) = rows.split_first()
        && me.name == "meshgate"
        && !others.is_empty()
    {
        let best = |f: &dyn Fn(&Row) -> f64, higher: bool| {
            others.iter().filter(|r| r.error.is_none()).map(f).fold(
                if higher { 0.0 } else { f64::MAX },
                |a, b| {
                    if higher { a.max(b) } else { a.min(b) }
                },
            )
        };
        let mut line = String::from("\nmeshgate / better anchor:");
        for (c, label) in ["QoS0 1 pub", "QoS0 4 pub", "QoS1 1 pub", "QoS1 4 pub"]
            .iter()
            .enumerate()
        {
            let b = best(&|r: &Row| median(r.rates[c].clone()), true);
            line.push_str(&format!(
                " {label} {:.2}x;",
                median(me.rates[c].clone()) / b
            ));
        }
        let b99 = best(&|r: &Row| median(r.p99.clone()), false);
        line.push_str(&format!(
            " p99 {:.0} vs {b99:.0} µs",
            median(me.p99.clone())
        ));
        println!("{line}");
    }
    Ok(())
}

/// One broker's figures over the rounds.
struct Row {
    name: &'static str,
    error: Option<String>,
    rates: [Vec<f64>; 4],
    loss: u64,
    p50: Vec<f64>,
    p99: Vec<f64>,
    rss: String,
}

impl Row {
    fn new(name: &'static str) -> Row {
        Row {
            name,
            error: None,
            rates: Default::default(),
            loss: 0,
            p50: Vec::new(),
            p99: Vec::new(),
            rss: String::new(),
        }
    }
}
