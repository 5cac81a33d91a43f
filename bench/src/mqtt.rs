//! MQTT → MQTT side by side: meshgate, Mosquitto and nats-server's MQTT listener, same load
//! generator (raw sockets by default, rumqttc with `--client rumqttc`), same machine, one run.
//!
//! For each broker: delivered messages/s for QoS 0 and QoS 1 with 1 and 4 publishers (256-byte
//! payloads, one subscriber on `bench/#`, loss counted), p50/p99 latency at a fixed 2,000 msg/s,
//! and RSS per idle connection with `--conns N` idle MQTT connections.
//!
//! Usage (release build; the brokers are started by this program on free loopback ports):
//! `cargo run --release -p meshgate-bench --bin mqtt -- [--seconds S] [--conns N] [--only NAME] [--rss-only] [--client raw|rumqttc]`
//! Needs `/usr/sbin/mosquitto` and `/usr/sbin/nats-server` (Debian packages `mosquitto`,
//! `nats-server`); a missing one is reported and skipped in the table.

use std::process::{Command, Stdio};
use std::time::Duration;

use meshgate_bench::{
    Broker, Generator, PAYLOAD, free_port, start_meshgate_with, temp_dir, wait_listening,
};
use rumqttc::QoS;

fn start_meshgate() -> anyhow::Result<Broker> {
    start_meshgate_with(&[])
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
    let generator = Generator::from_args(&args)?;
    println!(
        "MQTT -> MQTT, {PAYLOAD}-byte payloads, one subscriber on bench/#, {seconds} s per cell, {}, all on this machine\n",
        generator.describe()
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
            match generator
                .throughput(broker.port, broker.port, qos, pubs, seconds)
                .await
            {
                Ok(t) => {
                    if qos == QoS::AtLeastOnce {
                        loss += t.accepted.saturating_sub(t.delivered);
                    }
                    cells.push(format!("{:.0}", t.rate));
                }
                Err(e) => cells.push(format!("error: {e}")),
            }
        }
        let (p50, p99) = match generator
            .latency(broker.port, broker.port, 2_000, seconds)
            .await
        {
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
