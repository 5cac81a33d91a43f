//! Hostile peers of the backbone, against the real binary (issue 18; review F8, F15, F3).
//!
//! - A NATS program publishes, under the gateway's subject prefix, messages with a header name
//!   that is not a token (`abé: 1`, which panicked the fan-out task: F8), a `ce-` header with
//!   a multi-byte character at byte 3, a header value with a control byte, a payload that is
//!   not an event, and a large payload: each is dropped and counted, the process stays up, its
//!   RSS stays bounded, and a WebSocket subscriber of the same filter gets every valid event
//!   sent before, between and after them.
//! - Memory backbone with the default `full_policy` (F3): an MQTT subscriber that never reads,
//!   with several filters matching, cannot make a publisher wait; its drops are counted, and a
//!   WebSocket subscriber reading at the same time gets every event.
//!
//! Needs nats-server on 127.0.0.1:4222 (each test uses its own subject prefix) and
//! `cargo build --bin meshgate`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshgate_tests::{Process, Ws, metrics, next_event, spawn, wait_metric, ws_connect};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const NATS: &str = "127.0.0.1:4222";

/// A name no other test (or earlier run) uses.
fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{what}{}x{nanos}", std::process::id())
}

/// The value of counter `name` with all of `labels`, 0 when absent.
fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The resident set size of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn assert_alive(gw: &mut Process) {
    assert!(
        gw.child.try_wait().expect("waiting for meshgate").is_none(),
        "the gateway exited"
    );
}

/// A raw NATS connection (the protocol by hand: nothing between the test and the bytes).
struct RawNats {
    r: BufReader<tokio::io::ReadHalf<TcpStream>>,
    w: tokio::io::WriteHalf<TcpStream>,
}

impl RawNats {
    async fn connect(addr: &str) -> RawNats {
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("nats-server on {addr}: {e}"));
        let (r, w) = tokio::io::split(tcp);
        let mut nats = RawNats {
            r: BufReader::new(r),
            w,
        };
        let info = nats.line().await;
        assert!(info.starts_with("INFO "), "{info}");
        nats.send(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\nPING\r\n")
            .await;
        nats.pong().await;
        nats
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), self.r.read_line(&mut line))
            .await
            .expect("nats-server answers")
            .expect("read from nats-server");
        line.trim_end().to_owned()
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("write to nats-server");
    }

    /// Waits for the PONG to a PING (the server processed everything sent before).
    async fn pong(&mut self) {
        loop {
            let line = self.line().await;
            match line.as_str() {
                "PONG" => return,
                "+OK" | "PING" => continue,
                l if l.starts_with("INFO ") => continue,
                l => panic!("nats-server: {l}"),
            }
        }
    }

    /// `HPUB subject <headers> <payload>`, then a round trip.
    async fn hpub(&mut self, subject: &str, headers: &[u8], payload: &[u8]) {
        let mut m = format!(
            "HPUB {subject} {} {}\r\n",
            headers.len(),
            headers.len() + payload.len()
        )
        .into_bytes();
        m.extend_from_slice(headers);
        m.extend_from_slice(payload);
        m.extend_from_slice(b"\r\nPING\r\n");
        self.send(&m).await;
        self.pong().await;
    }
}

fn event(id: &str) -> String {
    format!(r#"{{"specversion":"1.0","id":"{id}","source":"/hostile","type":"t","data":"x"}}"#)
}

/// The ids of the next `n` events on `ws`.
async fn ids(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for _ in 0..n {
        let e = next_event(ws, Duration::from_secs(10))
            .await
            .unwrap_or_else(|code| panic!("the WebSocket closed ({code:?})"));
        v.push(e.id().to_owned());
    }
    v
}

/// Review F8 and F15 on NATS core (the shared server): messages no valid event could be
/// cost only themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_nats_messages_are_dropped_and_counted_and_subscribers_keep_receiving() {
    hostile_messages("nats", NATS, &[]).await;
}

/// The same on the JetStream backbone (its own nats-server with JetStream): the pull path
/// (decoded on the subscriber's task) refuses and counts them too (and terminates them, so
/// they are not redelivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_jetstream_messages_are_dropped_and_counted_and_subscribers_keep_receiving() {
    let server = meshgate_tests::nats::NatsServer::start();
    let url = server.url();
    let addr = url.trim_start_matches("nats://").to_owned();
    let stream = unique("HOSTILE");
    hostile_messages(
        "jetstream",
        &addr,
        &[("MESHGATE__BACKBONE__JETSTREAM__STREAM", stream.as_str())],
    )
    .await;
}

async fn hostile_messages(kind: &'static str, nats_addr: &str, extra: &[(&str, &str)]) {
    let prefix = unique("hostile");
    let url = format!("nats://{nats_addr}");
    let mut env = vec![
        ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
        ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
        ("MESHGATE__BACKBONE__KIND", kind),
        ("MESHGATE__BACKBONE__NATS__URLS", url.as_str()),
        ("MESHGATE__BACKBONE__NATS__SUBJECT_PREFIX", prefix.as_str()),
    ];
    env.extend_from_slice(extra);
    let mut gw = spawn(&[], &env);
    let (web, admin) = (gw.web.expect("web"), gw.admin.expect("admin"));
    let mut ws = ws_connect(web, &["a/#"]).await;
    let subscriptions = |n| format!("meshgate_backbone_subscriptions{{backbone=\"{kind}\"}} {n}");
    wait_metric(admin, &subscriptions(1)).await;
    let rss_before = rss(gw.pid());

    let mut nats = RawNats::connect(nats_addr).await;
    let subject = format!("{prefix}.a.b");
    let structured = b"Content-Type: application/cloudevents+json\r\n";
    let block = |line: &[u8]| {
        let mut b = b"NATS/1.0\r\n".to_vec();
        b.extend_from_slice(structured);
        b.extend_from_slice(line);
        b.extend_from_slice(b"\r\n\r\n");
        b
    };
    nats.hpub(&subject, &block(b"X-Fine: 1"), event("v1").as_bytes())
        .await;
    // F8: a header name with a multi-byte character across byte 3.
    nats.hpub(
        &subject,
        &block("abé: 1".as_bytes()),
        event("bad1").as_bytes(),
    )
    .await;
    nats.hpub(&subject, &block(b"X-Fine: 2"), event("v2").as_bytes())
        .await;
    // The binary-mode path: `ce` + é, and a value with a control byte.
    let binary = "NATS/1.0\r\nce-specversion: 1.0\r\nce-id: bad2\r\nce-source: /s\r\nce-type: t\r\nceé-x: 1\r\n\r\n";
    nats.hpub(&subject, binary.as_bytes(), b"data").await;
    nats.hpub(&subject, &block(b"X-Ctl: a\x01b"), event("bad3").as_bytes())
        .await;
    // Not an event; and a large one (under the server's max_payload) that is not one either.
    nats.hpub(&subject, &block(b"X-Fine: 3"), b"{not json")
        .await;
    let large = vec![b'['; 900 << 10];
    nats.hpub(&subject, &block(b"X-Fine: 4"), &large).await;
    nats.hpub(&subject, &block(b"X-Fine: 5"), event("v3").as_bytes())
        .await;

    assert_eq!(ids(&mut ws, 3).await, ["v1", "v2", "v3"]);
    let m = metrics(admin).await;
    let malformed = metric(
        &m,
        "meshgate_backbone_dropped_total",
        &[&format!("backbone=\"{kind}\""), "reason=\"malformed\""],
    );
    assert_eq!(malformed, 5, "the five bad messages are counted:\n{m}");
    assert_eq!(
        metric(&m, "meshgate_errors_total", &["kind=\"task_panicked\""]),
        0,
        "nothing panicked"
    );
    // A later event still goes through the same (live) fan-out.
    nats.hpub(&subject, &block(b"X-Fine: 6"), event("v4").as_bytes())
        .await;
    assert_eq!(ids(&mut ws, 1).await, ["v4"]);
    // And a new subscriber of the filter joins it and gets events too.
    let mut late = ws_connect(web, &["a/#"]).await;
    wait_metric(admin, &subscriptions(2)).await;
    nats.hpub(&subject, &block(b"X-Fine: 7"), event("v5").as_bytes())
        .await;
    assert_eq!(ids(&mut ws, 1).await, ["v5"]);
    assert_eq!(ids(&mut late, 1).await, ["v5"]);
    assert_alive(&mut gw);
    let rss_after = rss(gw.pid());
    assert!(
        rss_after < rss_before + (64 << 20),
        "RSS grew from {rss_before} to {rss_after} bytes"
    );
}

/// Connects an MQTT 3.1.1 client with a tiny receive buffer, subscribes to `filters` (QoS 0)
/// and returns the socket, which the test then never reads: a subscriber that stalls.
async fn stuck_mqtt_subscriber(mqtt: SocketAddr, client_id: &str, filters: &[&str]) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    // As small as the kernel allows: the gateway's writes block soon.
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut tcp = socket.connect(mqtt).await.expect("connect to MQTT");
    let mut connect = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
    connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    connect.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, connect.len() as u8];
    packet.extend_from_slice(&connect);
    let mut subscribe = vec![0x00, 0x01];
    for f in filters {
        subscribe.extend_from_slice(&(f.len() as u16).to_be_bytes());
        subscribe.extend_from_slice(f.as_bytes());
        subscribe.push(0);
    }
    packet.push(0x82);
    packet.push(subscribe.len() as u8);
    packet.extend_from_slice(&subscribe);
    tcp.write_all(&packet).await.expect("CONNECT + SUBSCRIBE");
    // CONNACK (4 bytes) and SUBACK (4 + one code per filter).
    let mut answer = vec![0u8; 4 + 4 + filters.len()];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut answer))
        .await
        .expect("CONNACK and SUBACK in time")
        .expect("CONNACK and SUBACK");
    assert_eq!(&answer[..4], &[0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    assert_eq!(answer[4], 0x90, "SUBACK");
    assert!(answer[8..].iter().all(|&c| c == 0), "granted QoS 0");
    tcp
}

/// Review F3 with the default policy (`block` with stall detection): a subscriber that never
/// reads (four full queues) costs publishers one `block_timeout` (1 s), then only itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_does_not_stall_publishers_by_default() {
    const EVENTS: usize = 3000;
    // Publishers at a pace a reading subscriber keeps up with on a busy machine.
    const PARALLEL: usize = 4;
    let mut gw = spawn(
        &[],
        &[
            ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__MQTT__ENABLED", "true"),
            ("MESHGATE__MQTT__LISTEN", "127.0.0.1:0"),
        ],
    );
    let (web, admin, mqtt) = (
        gw.web.expect("web"),
        gw.admin.expect("admin"),
        gw.mqtt.expect("mqtt"),
    );
    let filters = ["s/#", "s/+", "+/x", "#"];
    let _stuck = stuck_mqtt_subscriber(mqtt, &unique("stuck"), &filters).await;
    let mut ws = ws_connect(web, &["s/#"]).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"memory\"} 5",
    )
    .await;
    let rss_before = rss(gw.pid());

    // The well-behaved subscriber reads all the while; the publishers stay at most `AHEAD`
    // events ahead of it (a reader keeping up; on a loaded machine an unpaced test reader
    // could fall 1024 events behind and, under `drop`, rightly lose some).
    const AHEAD: usize = 256;
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = received.clone();
    let reader = tokio::spawn(async move {
        let mut seen = HashSet::new();
        while seen.len() < EVENTS {
            match next_event(&mut ws, Duration::from_secs(20)).await {
                Ok(e) => {
                    seen.insert(e.id().to_owned());
                    counted.store(seen.len(), std::sync::atomic::Ordering::Relaxed);
                }
                Err(code) => panic!("the WebSocket subscriber was closed ({code:?})"),
            }
        }
        seen
    });
    let data = "d".repeat(8 << 10);
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut publishers = Vec::new();
    for p in 0..PARALLEL {
        let (client, data) = (client.clone(), data.clone());
        let (sent, received) = (sent.clone(), received.clone());
        publishers.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let mut slow = Vec::new();
            let mut refused = 0;
            for i in (p..EVENTS).step_by(PARALLEL) {
                while sent.load(Relaxed).saturating_sub(received.load(Relaxed)) > AHEAD {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                sent.fetch_add(1, Relaxed);
                loop {
                    let t = Instant::now();
                    let status = client
                        .post(format!("http://{web}/events/s/x"))
                        .header("ce-specversion", "1.0")
                        .header("ce-id", format!("e{i}"))
                        .header("ce-source", "/f3")
                        .header("ce-type", "t")
                        .header("content-type", "text/plain")
                        .body(data.clone())
                        .send()
                        .await
                        .expect("the gateway answers")
                        .status();
                    if t.elapsed() > Duration::from_millis(500) {
                        slow.push(t.elapsed());
                    }
                    if status == 503 {
                        // The publish that found the stuck subscriber full for block_timeout:
                        // "retry later", and the retry does not wait for it any more.
                        refused += 1;
                        continue;
                    }
                    assert_eq!(status, 202, "event e{i}");
                    break;
                }
            }
            (slow, refused)
        }));
    }
    let (mut slow, mut refused) = (Vec::new(), 0);
    for p in publishers {
        let (s, r) = p.await.expect("a publisher");
        slow.extend(s);
        refused += r;
    }
    let took = started.elapsed();
    // One stall episode: the publishes in flight when the stuck subscriber's queues filled
    // (at most one per publisher) waited up to block_timeout; every other one went through
    // at once. Waiting for each full queue in turn (review F3) made every publish take
    // 4 × block_timeout.
    assert!(
        slow.len() <= PARALLEL && refused <= PARALLEL,
        "slow publishes {slow:?}, {refused} refused (all {EVENTS} took {took:?})"
    );
    assert!(
        slow.iter().all(|d| *d < Duration::from_secs(3)),
        "a publish waited {slow:?}"
    );
    let seen = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the WebSocket subscriber got every event in time")
        .expect("the reader");
    assert_eq!(seen.len(), EVENTS, "the reading subscriber got every event");
    let m = metrics(admin).await;
    let dropped = |reason: &str| {
        metric(
            &m,
            "meshgate_backbone_dropped_total",
            &["backbone=\"memory\"", &format!("reason=\"{reason}\"")],
        )
    };
    assert!(
        dropped("block_timeout") >= 1 && dropped("stalled") > 0,
        "the stuck subscriber's drops are counted:\n{m}"
    );
    assert_eq!(
        dropped("queue_full"),
        0,
        "no other subscriber lost anything"
    );
    assert_alive(&mut gw);
    let rss_after = rss(gw.pid());
    // Four queues of 1024 events of 8 KiB (shared, so one copy each) and socket buffers.
    assert!(
        rss_after < rss_before + (160 << 20),
        "RSS grew from {rss_before} to {rss_after} bytes"
    );
}

/// Review F3 under `full_policy = "block"`: with four full queues, one publish waits at most
/// `block_timeout` in all (it waited once per full queue, in turn), then is refused (503);
/// after that the stalled subscriber is skipped at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_block_one_publish_waits_at_most_block_timeout_in_all() {
    const BLOCK: Duration = Duration::from_millis(600);
    let mut gw = spawn(
        &[],
        &[
            ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__MQTT__ENABLED", "true"),
            ("MESHGATE__MQTT__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__BACKBONE__MEMORY__FULL_POLICY", "block"),
            ("MESHGATE__BACKBONE__MEMORY__BLOCK_TIMEOUT", "600ms"),
            ("MESHGATE__BACKBONE__MEMORY__QUEUE_CAPACITY", "256"),
        ],
    );
    let (web, admin, mqtt) = (
        gw.web.expect("web"),
        gw.admin.expect("admin"),
        gw.mqtt.expect("mqtt"),
    );
    let filters = ["s/#", "s/+", "+/x", "#"];
    let _stuck = stuck_mqtt_subscriber(mqtt, &unique("stuck"), &filters).await;
    wait_metric(
        admin,
        "meshgate_backbone_subscriptions{backbone=\"memory\"} 4",
    )
    .await;
    let client = reqwest::Client::new();
    let data = "d".repeat(8 << 10);
    let deadline = Instant::now() + Duration::from_secs(15);
    let post = || {
        client
            .post(format!("http://{web}/events/s/x"))
            .header("ce-specversion", "1.0")
            .header("ce-id", "b")
            .header("ce-source", "/f3")
            .header("ce-type", "t")
            .header("content-type", "text/plain")
            .body(data.clone())
            .send()
    };
    // Until the queues are full and a publish was refused after waiting for them.
    let waited = loop {
        assert!(Instant::now() < deadline, "the queues never filled");
        let t = Instant::now();
        let status = post().await.expect("the gateway answers").status();
        match status.as_u16() {
            202 => {}
            503 => break t.elapsed(),
            other => panic!("status {other}"),
        }
    };
    // Four full queues waited for in turn took 4 × 600 ms; one shared deadline takes 600 ms.
    // 2 × BLOCK leaves a loaded machine room and still tells them apart.
    assert!(
        waited < 2 * BLOCK,
        "a publish waited {waited:?} with block_timeout {BLOCK:?}"
    );
    // Each full queue that made a publish wait past block_timeout is marked stalled and no
    // longer waited for. The four queues drain (into the socket's kernel buffer) at different
    // moments, so each may cost one more such episode; after that, publishes go through at
    // once.
    let mut later_refused = 0;
    for i in 0..30 {
        let t = Instant::now();
        let status = post().await.expect("the gateway answers").status();
        let took = t.elapsed();
        if status == 503 {
            later_refused += 1;
            assert!(took < 2 * BLOCK, "a refused publish waited {took:?}");
            continue;
        }
        assert_eq!(status, 202);
        if i >= 20 {
            assert!(
                took < BLOCK,
                "publish {i} waited {took:?} for stalled subscribers"
            );
        }
    }
    assert!(
        later_refused <= 3,
        "{later_refused} more publishes waited for subscribers already marked stalled"
    );
    let m = metrics(admin).await;
    let dropped = |reason: &str| {
        metric(
            &m,
            "meshgate_backbone_dropped_total",
            &["backbone=\"memory\"", &format!("reason=\"{reason}\"")],
        )
    };
    assert!(
        dropped("block_timeout") >= 1 && dropped("stalled") >= 10,
        "the refused publish and the skipped copies are counted:\n{m}"
    );
    assert_alive(&mut gw);
}
