//! A lean MQTT 3.1.1 load generator on plain sockets: packets are encoded once and written in
//! large batches, and the subscriber parses what it reads without a client library's event
//! loop. rumqttc, the other generator, spends most of a core of this 2-core machine at the
//! rates the brokers reach, so it measures the client as much as the broker; this one leaves
//! the CPU to the broker under test. Every broker gets the same generator.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{PAYLOAD, Throughput, now_us};

/// How many QoS 1 publishes a publisher keeps unacknowledged: as rumqttc's `set_inflight(100)`
/// unless a benchmark sets another ([`set_window`]).
static WINDOW: AtomicUsize = AtomicUsize::new(100);

/// Sets how many QoS 1 publishes each publisher keeps unacknowledged (`cluster --window`).
pub fn set_window(n: usize) {
    WINDOW.store(n.max(1), Ordering::Relaxed);
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One PUBLISH packet: QoS 0 or 1 (with `pkid`), payload = send time (µs) then filler.
pub fn publish_packet(topic: &str, qos: u8, pkid: u16, sent_us: u64, out: &mut Vec<u8>) {
    out.push(0x30 | (qos << 1));
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + PAYLOAD;
    remaining_length(len, out);
    string(topic, out);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(&sent_us.to_be_bytes());
    out.resize(out.len() + PAYLOAD - 8, b'x');
}

/// An MQTT 3.1.1 CONNECT with a clean session and `keep_alive` seconds.
pub fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    connect_packet_with(client_id, keep_alive, true)
}

/// An MQTT 3.1.1 CONNECT; `clean: false` asks for a persistent session.
pub fn connect_packet_with(client_id: &str, keep_alive: u16, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string("MQTT", &mut body);
    body.extend_from_slice(&[4, if clean { 2 } else { 0 }]); // level 4, flags
    body.extend_from_slice(&keep_alive.to_be_bytes());
    string(client_id, &mut body);
    let mut pkt = vec![0x10];
    remaining_length(body.len(), &mut pkt);
    pkt.extend_from_slice(&body);
    pkt
}

/// An MQTT 5 CONNECT with a clean start and no properties.
pub fn connect_packet_v5(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string("MQTT", &mut body);
    body.extend_from_slice(&[5, 2]); // level 5, clean start
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.push(0); // no properties
    string(client_id, &mut body);
    let mut pkt = vec![0x10];
    remaining_length(body.len(), &mut pkt);
    pkt.extend_from_slice(&body);
    pkt
}

/// Connects with a clean session and waits for a successful CONNACK.
pub async fn connect(port: u16, client_id: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    s.write_all(&connect_packet(client_id, 60)).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack)).await??;
    anyhow::ensure!(
        ack[0] == 0x20 && ack[3] == 0,
        "{client_id}: CONNACK {ack:?}"
    );
    Ok(s)
}

/// Subscribes to one filter and waits for the SUBACK.
pub async fn subscribe(s: &mut TcpStream, filter: &str, qos: u8) -> anyhow::Result<()> {
    let mut body = vec![0, 1];
    string(filter, &mut body);
    body.push(qos);
    let mut pkt = vec![0x82];
    remaining_length(body.len(), &mut pkt);
    pkt.extend_from_slice(&body);
    s.write_all(&pkt).await?;
    let mut ack = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack)).await??;
    anyhow::ensure!(ack[0] == 0x90 && ack[4] < 0x80, "SUBACK {ack:?}");
    Ok(())
}

/// Splits complete packets off the front of `buf`: `(first byte, body)` for each, in order.
/// Returns how many bytes were consumed.
fn packets(buf: &[u8], mut each: impl FnMut(u8, &[u8])) -> usize {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            return at;
        }
        let (mut len, mut mult, mut i) = (0usize, 1usize, 1);
        loop {
            let Some(&b) = rest.get(i) else { return at };
            len += usize::from(b & 0x7f) * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if rest.len() < i + len {
            return at;
        }
        each(rest[0], &rest[i..i + len]);
        at += i + len;
    }
}

/// The subscriber's side of a run: counts PUBLISHes, acknowledges QoS 1 ones, and hands
/// each payload's send time to `on_sent_us`.
pub async fn subscriber(
    mut s: TcpStream,
    delivered: Arc<AtomicU64>,
    mut on_sent_us: impl FnMut(u64) + Send,
) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut filled = 0;
    let mut acks = Vec::with_capacity(64 * 1024);
    loop {
        let n = match s.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        filled += n;
        let mut count = 0;
        let used = packets(&buf[..filled], |first, body| {
            if first >> 4 != 3 || body.len() < 2 {
                return;
            }
            count += 1;
            let qos = (first >> 1) & 3;
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let mut at = 2 + topic_len;
            if qos > 0 && body.len() >= at + 2 {
                acks.extend_from_slice(&[0x40, 2, body[at], body[at + 1]]);
                at += 2;
            }
            if let Some(t) = body.get(at..at + 8) {
                let mut b = [0u8; 8];
                b.copy_from_slice(t);
                on_sent_us(u64::from_be_bytes(b));
            }
        });
        buf.copy_within(used..filled, 0);
        filled -= used;
        delivered.fetch_add(count, Ordering::Relaxed);
        if !acks.is_empty() {
            if s.write_all(&acks).await.is_err() {
                return;
            }
            acks.clear();
        }
    }
}

/// Counts the PUBACKs among the `n` bytes just read into `inbuf` after `filled`, keeping an
/// unfinished packet for the next read.
fn take_pubacks(inbuf: &mut [u8], filled: &mut usize, n: usize) -> usize {
    *filled += n;
    let mut got = 0;
    let used = packets(&inbuf[..*filled], |first, _| {
        if first >> 4 == 4 {
            got += 1;
        }
    });
    inbuf.copy_within(used..*filled, 0);
    *filled -= used;
    got
}

/// Publishes as fast as the broker takes them until `stop`: QoS 0 in batches of whole
/// packets, QoS 1 with up to [`WINDOW`] unacknowledged. Returns (sent, acknowledged).
async fn publisher(
    mut s: TcpStream,
    topic: String,
    qos: u8,
    origin: Instant,
    stop: Arc<AtomicBool>,
) -> (u64, u64) {
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut pkid: u16 = 0;
    let mut inflight = 0usize;
    let window = WINDOW.load(Ordering::Relaxed);
    let mut inbuf = vec![0u8; 16 * 1024];
    let mut filled = 0;
    while !stop.load(Ordering::Relaxed) {
        out.clear();
        let now = now_us(origin);
        if qos == 0 {
            for _ in 0..200 {
                publish_packet(&topic, 0, 0, now, &mut out);
            }
            if s.write_all(&out).await.is_err() {
                break;
            }
            sent += 200;
            continue;
        }
        while inflight < window {
            pkid = pkid.checked_add(1).unwrap_or(1);
            publish_packet(&topic, 1, pkid, now, &mut out);
            inflight += 1;
            sent += 1;
        }
        if !out.is_empty() && s.write_all(&out).await.is_err() {
            break;
        }
        let n = match s.read(&mut inbuf[filled..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let got = take_pubacks(&mut inbuf, &mut filled, n);
        inflight -= got.min(inflight);
        acked += got as u64;
    }
    // Collect the acknowledgements still on their way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while qos > 0 && inflight > 0 {
        let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut inbuf[filled..])).await
        else {
            break;
        };
        if n == 0 {
            break;
        }
        let got = take_pubacks(&mut inbuf, &mut filled, n);
        inflight -= got.min(inflight);
        acked += got as u64;
    }
    let _ = s.write_all(&[0xe0, 0]).await; // DISCONNECT
    (sent, acked)
}

/// Starts `publishers` raw publishers on `port` (topics `bench/<i>`) until `stop`.
async fn start_publishers(
    port: u16,
    publishers: usize,
    qos: u8,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<(u64, u64)>>> {
    let origin = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..publishers {
        let s = connect(port, &format!("bench-pub-{i}")).await?;
        tasks.push(tokio::spawn(publisher(
            s,
            format!("bench/{i}"),
            qos,
            origin,
            stop.clone(),
        )));
    }
    Ok(tasks)
}

/// Delivered messages/s from `publishers` raw clients on `pub_port` to one raw subscriber on
/// `sub_port` (the same broker, or another gateway instance on the same bus).
pub async fn throughput(
    pub_port: u16,
    sub_port: u16,
    qos: u8,
    publishers: usize,
    seconds: u64,
) -> anyhow::Result<Throughput> {
    let delivered = Arc::new(AtomicU64::new(0));
    let mut sub = connect(sub_port, "bench-sub").await?;
    subscribe(&mut sub, "bench/#", qos).await?;
    let reader = tokio::spawn(subscriber(sub, delivered.clone(), |_| {}));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = start_publishers(pub_port, publishers, qos, &stop).await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let publishing = started.elapsed().as_secs_f64();
    let (mut sent, mut acked) = (0, 0);
    for t in tasks {
        let (s, a) = t.await?;
        sent += s;
        acked += a;
    }
    crate::settle(&delivered, sent).await;
    reader.abort();
    let delivered = delivered.load(Ordering::Relaxed);
    let accepted = if qos == 0 { sent } else { acked };
    Ok(Throughput::new(accepted, delivered, publishing))
}

/// QoS 1 publishes acknowledged per second by the broker on `port` with nobody subscribed:
/// the ingress alone, as a raw JetStream publish-with-ack measures JetStream's.
pub async fn acknowledged_rate(port: u16, publishers: usize, seconds: u64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = start_publishers(port, publishers, 1, &stop).await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let publishing = started.elapsed().as_secs_f64();
    let mut acked = 0;
    for t in tasks {
        acked += t.await?.1;
    }
    Ok(acked as f64 / publishing)
}

/// QoS 0 fan-out: one publisher on `pub_port`, `subscribers` subscribers of the same filter on
/// `sub_port`; `delivered` counts every copy (a rate of N × the publish rate is all delivered).
pub async fn fanout_throughput(
    pub_port: u16,
    sub_port: u16,
    subscribers: usize,
    seconds: u64,
) -> anyhow::Result<Throughput> {
    let delivered = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for i in 0..subscribers {
        let mut sub = connect(sub_port, &format!("fan-sub-{i}")).await?;
        subscribe(&mut sub, "fan/#", 0).await?;
        readers.push(tokio::spawn(subscriber(sub, delivered.clone(), |_| {})));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let origin = Instant::now();
    let s = connect(pub_port, "fan-pub").await?;
    let task = tokio::spawn(publisher(s, "fan/x".into(), 0, origin, stop.clone()));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let publishing = started.elapsed().as_secs_f64();
    let (sent, _) = task.await?;
    let copies = sent * subscribers as u64;
    crate::settle(&delivered, copies).await;
    for r in readers {
        r.abort();
    }
    Ok(Throughput::new(
        copies,
        delivered.load(Ordering::Relaxed),
        publishing,
    ))
}

/// p50/p99 latency (µs) of QoS 1 publishes at a steady `rate`, each written on its own, from
/// a raw publisher on `pub_port` to a raw subscriber on `sub_port`.
pub async fn latency(
    pub_port: u16,
    sub_port: u16,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(u64, u64)> {
    let origin = Instant::now();
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = samples.clone();
    let mut sub = connect(sub_port, "lat-sub").await?;
    subscribe(&mut sub, "lat/#", 1).await?;
    let reader = tokio::spawn(subscriber(sub, Arc::new(AtomicU64::new(0)), move |sent| {
        if let Ok(mut v) = s.lock() {
            v.push(now_us(origin).saturating_sub(sent));
        }
    }));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let publ = connect(pub_port, "lat-pub").await?;
    let (mut rd, mut wr) = publ.into_split();
    // PUBACKs are read (and dropped) so the socket never fills.
    let acks = tokio::spawn(async move {
        let mut b = vec![0u8; 4096];
        while matches!(rd.read(&mut b).await, Ok(n) if n > 0) {}
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pkt = Vec::with_capacity(PAYLOAD + 16);
    for i in 0..rate * seconds {
        tick.tick().await;
        pkt.clear();
        let pkid = (i % 65_535) as u16 + 1;
        publish_packet("lat/x", 1, pkid, now_us(origin), &mut pkt);
        wr.write_all(&pkt).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = wr.write_all(&[0xe0, 0]).await;
    reader.abort();
    acks.abort();
    let v = samples.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(crate::percentiles(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_split_whole() {
        let mut buf = Vec::new();
        publish_packet("a/b", 1, 7, 42, &mut buf);
        publish_packet("a/b", 0, 0, 43, &mut buf);
        let full = buf.len();
        buf.extend_from_slice(&[0x30, 0x80]); // an unfinished length
        let mut seen = Vec::new();
        let used = packets(&buf, |first, body| seen.push((first, body.len())));
        assert_eq!(used, full);
        assert_eq!(
            seen,
            vec![(0x32, 2 + 3 + 2 + PAYLOAD), (0x30, 2 + 3 + PAYLOAD)]
        );
    }
}
