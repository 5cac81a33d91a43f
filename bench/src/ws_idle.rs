//! Memory per idle WebSocket connection (issue 27): RSS growth of a `meshgate` process per
//! connection, for CloudEvents WebSocket subscribers (each on its own topic, as a fleet of
//! browsers would be; and without a subscription, to tell the connection from the
//! subscription) and for MQTT over WebSocket (each connected, subscribed to nothing).
//!
//! The clients are raw sockets that send the upgrade request (and, for MQTT, a CONNECT) and
//! then nothing: their own memory is not in the figure, and nothing is read or written after.
//!
//! Usage (release build): `cargo build --release -p meshgate -p meshgate-bench &&
//! ./target/release/ws-idle [--conns N]` (default 5,000; each connection is a file descriptor
//! in both processes).

use std::time::Duration;

use meshgate_bench::{free_port, rss_kib, start_meshgate_with, wait_listening};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a WebSocket upgrade for `path` and reads the response head; fails unless it is 101.
async fn upgrade(port: u16, path: &str, protocol: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(s.read(&mut byte).await? == 1, "closed during the upgrade");
        head.push(byte[0]);
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 101"),
        "upgrade refused: {}",
        String::from_utf8_lossy(&head)
    );
    Ok(s)
}

/// A masked binary WebSocket frame (clients must mask) holding an MQTT 3.1.1 CONNECT.
fn mqtt_connect_frame(id: &str) -> Vec<u8> {
    let connect = meshgate_bench::raw::connect_packet(id, 240);
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | connect.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(connect.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[derive(Clone, Copy)]
enum Kind {
    /// With one subscription (its own topic) each, or none.
    CloudEvents {
        subscribed: bool,
    },
    Mqtt,
}

/// Opens `n` connections of `kind`; KiB of RSS per connection, once they have settled.
async fn per_connection(kind: Kind, n: usize) -> anyhow::Result<f64> {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let gw = start_meshgate_with(&[
        ("MESHGATE__HTTP__LISTEN", &listen),
        ("MESHGATE__WEBSOCKET__MAX_CONNECTIONS", "100000"),
        ("MESHGATE__HTTP__MAX_CONNECTIONS", "100000"),
    ])?;
    anyhow::ensure!(
        wait_listening(port),
        "meshgate's web listener did not come up"
    );
    // One connection first: what is allocated once (buffers, tables) is not per connection.
    let _warm = open(kind, port, usize::MAX).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(gw.child.id());
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        conns.push(open(kind, port, i).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(gw.child.id());
    drop(conns);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

async fn open(kind: Kind, port: u16, i: usize) -> anyhow::Result<TcpStream> {
    match kind {
        Kind::CloudEvents { subscribed: true } => {
            upgrade(
                port,
                &format!("/ws?subscribe=fleet/{i}"),
                "cloudevents.json",
            )
            .await
        }
        Kind::CloudEvents { subscribed: false } => upgrade(port, "/ws", "cloudevents.json").await,
        Kind::Mqtt => {
            let mut s = upgrade(port, "/mqtt", "mqtt").await?;
            s.write_all(&mqtt_connect_frame(&format!("ws-idle-{i}")))
                .await?;
            // CONNACK in a binary frame: 2 bytes of frame header, 4 of packet.
            let mut ack = [0u8; 6];
            s.read_exact(&mut ack).await?;
            anyhow::ensure!(ack[5] == 0, "MQTT connection {i} refused: {ack:?}");
            Ok(s)
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let conns = meshgate_bench::arg_u64(&args, "--conns", 5_000) as usize;
    println!("| connection | RSS per idle connection ({conns}) |");
    println!("|---|---:|");
    for (name, kind) in [
        (
            "CloudEvents WebSocket, one subscription each",
            Kind::CloudEvents { subscribed: true },
        ),
        (
            "CloudEvents WebSocket, no subscription",
            Kind::CloudEvents { subscribed: false },
        ),
        ("MQTT over WebSocket, connected", Kind::Mqtt),
    ] {
        let kib = per_connection(kind, conns).await?;
        println!("| {name} | {kib:.1} KiB |");
    }
    Ok(())
}
