//! Fleet shape: many devices, each subscribed to its own topic, and one hot topic. Delivered
//! messages/s to one subscriber of the hot topic (QoS 0, `--pubs` raw publishers, 1 by
//! default) and the broker's
//! CPU µs per delivered message, with N other subscriptions on distinct topics that never
//! match (`cold/<i>`, 100 per connection, meshgate's default `mqtt.max_subscriptions`),
//! meshgate (memory backbone) next to Mosquitto in the same run.
//!
//! `cargo build --release -p meshgate -p meshgate-bench && (ulimit -n 20000; ./target/release/fleet [--seconds S] [--subs 0,10000,100000] [--rounds R] [--pubs P])`

use std::time::Duration;

use meshgate_bench::raw;
use meshgate_bench::{Broker, process_cpu, start_meshgate_with, start_mosquitto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Subscriptions per cold connection.
const PER_CONNECTION: usize = 100;

/// One SUBSCRIBE packet with `filters` (QoS 0 each), then its SUBACK.
async fn subscribe_all(s: &mut TcpStream, filters: &[String]) -> anyhow::Result<()> {
    let mut body = vec![0, 1];
    for f in filters {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
        body.push(0);
    }
    let mut pkt = vec![0x82];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        pkt.push(b);
        if len == 0 {
            break;
        }
    }
    pkt.extend_from_slice(&body);
    s.write_all(&pkt).await?;
    // SUBACK: fixed header (2 or 3 bytes), packet id, one code per filter.
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    anyhow::ensure!(head[0] == 0x90, "no SUBACK: {head:?}");
    let mut len = usize::from(head[1] & 0x7f);
    if head[1] & 0x80 != 0 {
        let mut more = [0u8; 1];
        s.read_exact(&mut more).await?;
        len += usize::from(more[0]) * 128;
    }
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest).await?;
    anyhow::ensure!(
        rest[2..].iter().all(|c| *c < 0x80),
        "a cold subscription was refused"
    );
    Ok(())
}

/// `n` subscriptions on `cold/<i>` over `n / PER_CONNECTION` connections, kept open.
async fn cold_subscriptions(port: u16, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut conns = Vec::new();
    for c in 0..n.div_ceil(PER_CONNECTION) {
        let mut s = raw::connect(port, &format!("cold-{c}")).await?;
        let filters: Vec<String> = (c * PER_CONNECTION..((c + 1) * PER_CONNECTION).min(n))
            .map(|i| format!("cold/{i}"))
            .collect();
        subscribe_all(&mut s, &filters).await?;
        conns.push(s);
    }
    Ok(conns)
}

/// Delivered msg/s and the broker's CPU µs per delivered message.
async fn measure(broker: &Broker, seconds: u64, pubs: usize) -> anyhow::Result<(f64, f64)> {
    let before = process_cpu(broker.child.id());
    let t = raw::throughput(broker.port, broker.port, 0, pubs, seconds).await?;
    let cpu_us = (process_cpu(broker.child.id()) - before).as_secs_f64() * 1e6;
    Ok((t.rate, cpu_us / t.delivered.max(1) as f64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| meshgate_bench::arg_value(&args, name);
    let seconds: u64 = value("--seconds").and_then(|v| v.parse().ok()).unwrap_or(5);
    let rounds: usize = value("--rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let pubs: usize = value("--pubs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let subs: Vec<usize> = value("--subs")
        .unwrap_or("0,10000,100000")
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    println!(
        "Fleet shape: QoS 0, {pubs} raw publisher(s) on bench/<i>, one subscriber on bench/#, N other subscriptions on cold/<i> ({PER_CONNECTION} per connection), {seconds} s per cell, {rounds} round(s) (median), all on this machine\n"
    );
    println!("| broker | N other subscriptions | delivered/s | CPU µs/msg | vs N = 0 |");
    println!("|---|---:|---:|---:|---:|");
    type Start = fn() -> anyhow::Result<Broker>;
    let brokers: [(&str, Start); 2] = [
        ("meshgate", || start_meshgate_with(&[])),
        ("mosquitto", start_mosquitto),
    ];
    let mut results: Vec<(&str, usize, f64)> = Vec::new();
    for n in &subs {
        for (name, start) in &brokers {
            let broker = start()?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let cold = cold_subscriptions(broker.port, *n).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut rates = Vec::new();
            let mut cpus = Vec::new();
            for _ in 0..rounds {
                let (rate, cpu) = measure(&broker, seconds, pubs).await?;
                rates.push(rate);
                cpus.push(cpu);
            }
            drop(cold);
            let (rate, cpu) = (median(rates), median(cpus));
            let base = results
                .iter()
                .find(|(b, m, _)| b == name && *m == 0)
                .map(|(_, _, r)| *r);
            let ratio = base.map_or("–".to_owned(), |b| format!("{:.0}%", rate / b * 100.0));
            println!("| {name} | {n} | {rate:.0} | {cpu:.2} | {ratio} |");
            results.push((name, *n, rate));
        }
    }
    for n in &subs {
        let get = |b: &str| {
            results
                .iter()
                .find(|(x, m, _)| *x == b && m == n)
                .map(|(_, _, r)| *r)
        };
        if let (Some(m), Some(q)) = (get("meshgate"), get("mosquitto")) {
            println!("\nN = {n}: meshgate / mosquitto = {:.2}x", m / q);
        }
    }
    Ok(())
}
