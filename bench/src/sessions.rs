//! Persistent MQTT sessions on the JetStream backbone, the fleet way: N devices with a
//! persistent session (MQTT 3.1.1, clean session 0) each subscribed at QoS 1 to its own
//! `dev/<i>/cmd`. Prints the connect+subscribe rate, nats-server's RSS and JetStream consumer
//! count per session, and after a graceful restart of the gateway how long until every device
//! is back with its session (CONNACK session present).
//!
//! `cargo build --release -p meshgate -p meshgate-bench && (ulimit -n 20000; ./target/release/sessions [--sessions N] [--parallel P] [--modes consumer_each,instance_feed])`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshgate_bench::raw::{connect_packet_with, subscribe};
use meshgate_bench::{Broker, rss_kib, start_meshgate_with, start_nats_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects `client_id` with a persistent session; returns the stream and the CONNACK's
/// session-present flag.
async fn connect_persistent(port: u16, client_id: &str) -> anyhow::Result<(TcpStream, bool)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(&connect_packet_with(client_id, 600, false))
        .await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut ack)).await??;
    anyhow::ensure!(
        ack[0] == 0x20 && ack[3] == 0,
        "{client_id}: CONNACK {ack:?}"
    );
    Ok((s, ack[2] & 1 == 1))
}

/// Runs `each(i)` for i in 0..n, `parallel` at a time; the results in order.
async fn for_all<T: Send + 'static, F, Fut>(n: usize, parallel: usize, each: F) -> Vec<T>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send,
{
    let each = Arc::new(each);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..parallel.max(1) {
        let (each, next) = (each.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                out.push((i, each(i).await));
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await.unwrap_or_default());
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, t)| t).collect()
}

/// JetStream consumers of the gateway's stream (`MESHGATE`).
async fn consumers(nats_port: u16) -> anyhow::Result<usize> {
    let client = async_nats::connect(format!("127.0.0.1:{nats_port}")).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("MESHGATE").await?;
    Ok(stream.info().await?.state.consumer_count)
}

/// One row: `n` sessions with `backbone.jetstream.subscriptions = mode`, on a nats-server of
/// their own.
async fn run(mode: &str, n: usize, parallel: usize) -> anyhow::Result<String> {
    let nats = start_nats_server(&format!("sessions-bench-{mode}"))?;
    let nats_url = format!("nats://127.0.0.1:{}", nats.port);
    let env = [
        ("MESHGATE__BACKBONE__KIND", "jetstream"),
        ("MESHGATE__BACKBONE__NATS__URLS", nats_url.as_str()),
        ("MESHGATE__BACKBONE__JETSTREAM__SUBSCRIPTIONS", mode),
    ];
    let start = || -> anyhow::Result<Broker> { start_meshgate_with(&env) };
    let nats_rss_before = rss_kib(nats.child.id());
    let gw = start()?;
    let port = gw.port;

    // Connect and subscribe every session.
    let started = Instant::now();
    let conns = for_all(n, parallel, move |i| async move {
        let (mut s, _) = connect_persistent(port, &format!("dev-{i}")).await?;
        subscribe(&mut s, &format!("dev/{i}/cmd"), 1).await?;
        anyhow::Ok(s)
    })
    .await;
    let connect_secs = started.elapsed().as_secs_f64();
    let failed = conns.iter().filter(|c| c.is_err()).count();
    if let Some(Err(e)) = conns.iter().find(|c| c.is_err()) {
        eprintln!("first failure: {e}");
    }
    // nats-server's heap settles slowly (Go returns freed memory to the system lazily): read
    // 2 s and 15 s after the last subscribe.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let nats_rss_2s = rss_kib(nats.child.id()).saturating_sub(nats_rss_before);
    tokio::time::sleep(Duration::from_secs(13)).await;
    let nats_rss = rss_kib(nats.child.id()).saturating_sub(nats_rss_before);
    let consumer_count = consumers(nats.port).await.unwrap_or(0);

    // Graceful restart of the gateway while the devices are connected.
    let pid = gw.child.id();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut gw = gw;
    let _ = gw.child.wait();
    drop(conns);
    let restarted = Instant::now();
    let gw = start()?;
    let port = gw.port;
    let ready_secs = restarted.elapsed().as_secs_f64();
    let back = for_all(n, parallel, move |i| async move {
        connect_persistent(port, &format!("dev-{i}"))
            .await
            .map(|(_, present)| present)
    })
    .await;
    let back_secs = restarted.elapsed().as_secs_f64();
    let resumed = back.iter().filter(|r| matches!(r, Ok(true))).count();
    drop(gw);
    Ok(format!(
        "| {mode} | {n} | {:.0} | {failed} | {:.1} KiB / {:.1} KiB | {consumer_count} | {ready_secs:.2} s | {back_secs:.2} s | {resumed} |",
        (n - failed) as f64 / connect_secs,
        nats_rss_2s as f64 / n as f64,
        nats_rss as f64 / n as f64,
    ))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| meshgate_bench::arg_value(&args, name);
    let n = value("--sessions")
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let parallel = value("--parallel")
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let modes = value("--modes").unwrap_or("consumer_each,instance_feed");
    println!(
        "JetStream backbone, {n} persistent MQTT 3.1.1 sessions (clean session 0), each subscribed at QoS 1 to dev/<i>/cmd, {parallel} at a time, all on this machine; backbone.jetstream.subscriptions = each mode in turn\n"
    );
    let mut rows = Vec::new();
    for mode in modes.split(',') {
        rows.push(run(mode, n, parallel).await?);
    }
    println!(
        "| subscriptions | sessions | connect+subscribe/s | failed | nats-server RSS per session (2 s / 15 s after) | JetStream consumers | gateway listening after restart | all back after restart | resumed (session present) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}
