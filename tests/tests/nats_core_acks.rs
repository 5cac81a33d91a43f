//! Issue 19 item 2 (review F13): over NATS core, an acknowledgement (HTTP 202, MQTT PUBACK,
//! AMQP basic.ack) goes out only once nats-server read the event. Publishers stream events
//! while nats-server stops reading mid-stream, so that written-but-unread bytes sit in the
//! socket buffers, then the connection is lost with them; a raw NATS subscriber counts what the
//! server delivered. Every acknowledged event must have been delivered; the counts (published,
//! acknowledged, delivered, duplicated, lost) are printed.
//!
//! Two ways to stop the server reading: a TCP proxy between gateway and nats-server that stops
//! forwarding, then drops the connection (the server and the subscriber stay up, so every
//! event the server read is delivered: exact, and the AMQP source's requeued messages arrive
//! afterwards); and nats-server itself SIGSTOPped, then SIGKILLed and restarted.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use meshgate_config::{AmqpSourceConfig, BackboneKind, NatsWireMode};
use meshgate_tests::amqp::{Rabbit, ce_headers, unique};
use meshgate_tests::nats::NatsServer;
use meshgate_tests::{Deadline, metrics, start_gateway, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Ids acknowledged to their publisher, and how many were published.
#[derive(Default)]
struct Tally {
    published: AtomicU64,
    acked: Mutex<Vec<String>>,
}

impl Tally {
    fn ack(&self, id: String) {
        self.acked.lock().unwrap().push(id);
    }
    fn acked(&self) -> Vec<String> {
        self.acked.lock().unwrap().clone()
    }
}

/// A TCP proxy in front of nats-server that can stop forwarding what its clients write
/// ([`Proxy::stall`]: the bytes wait in the socket buffers, as with a stopped server) and drop
/// every connection with what waits ([`Proxy::cut`]); new connections are forwarded again.
struct Proxy {
    port: u16,
    stalled: tokio::sync::watch::Sender<bool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, stalled_rx) = tokio::sync::watch::channel(false);
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let mut stalled = stalled_rx.clone();
                let mut cut = cut_rx.clone();
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let up = async {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            // Stalled: nothing more is read from the client.
                            while *stalled.borrow_and_update() {
                                if stalled.changed().await.is_err() {
                                    return;
                                }
                            }
                            match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if sw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if cw.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    // The cut first: `cut()` sends it before it lifts the stall, and the stalled
                    // bytes must not be forwarded once the stall is lifted.
                    tokio::select! {
                        biased;
                        _ = cut.changed() => {}
                        _ = up => {}
                        _ = down => {}
                    }
                    // Dropped with unread bytes: the kernel resets both connections.
                });
            }
        });
        Proxy { port, stalled, cut }
    }

    fn stall(&self) {
        self.stalled.send_replace(true);
    }

    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
        self.stalled.send_replace(false);
    }
}

/// HTTP publishers (`tasks` of them, one request at a time each) of `http-<n>` until `stop`.
async fn http_publishers(web: SocketAddr, tasks: usize, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let mut all = Vec::new();
    for _ in 0..tasks {
        let (client, tally, stop, next) =
            (client.clone(), tally.clone(), stop.clone(), next.clone());
        all.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = format!("http-{}", next.fetch_add(1, Ordering::Relaxed));
                tally.published.fetch_add(1, Ordering::Relaxed);
                let body =
                    format!(r#"{{"specversion":"1.0","id":"{id}","source":"/loss","type":"t"}}"#);
                let sent = client
                    .post(format!("http://{web}/events/loss/http"))
                    .header("content-type", "application/cloudevents+json")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 202 => tally.ack(id),
                    // Refused (503 while NATS is away): not acknowledged; pause a little.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    for t in all {
        t.await.unwrap();
    }
}

/// The length of an MQTT remaining-length field's value, written.
fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// One MQTT 3.1.1 client publishing `mqtt-<n>` (the payload) at QoS 1 with up to `window`
/// PUBACKs outstanding, until `stop` or the connection ends; records each PUBACKed id.
async fn mqtt_publisher(addr: SocketAddr, window: usize, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.set_nodelay(true);
    let id = b"loss-pub";
    let mut connect = vec![0x10];
    let mut body = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        60,
        0,
        id.len() as u8,
    ];
    body.extend_from_slice(id);
    remaining_length(body.len(), &mut connect);
    connect.extend_from_slice(&body);
    s.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK");
    let (mut r, mut w) = s.into_split();
    // Packet id → the event's number; PUBACKs come back by packet id.
    let inflight: Arc<Mutex<HashMap<u16, u64>>> = Arc::default();
    let room = Arc::new(tokio::sync::Semaphore::new(window));
    let reader = {
        let (inflight, room, tally) = (inflight.clone(), room.clone(), tally.clone());
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n =
                    match tokio::time::timeout(Duration::from_secs(60), r.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                buf.extend_from_slice(&chunk[..n]);
                // Only PUBACKs (4 bytes) come to a publisher that subscribed to nothing.
                while buf.len() >= 4 {
                    assert_eq!(buf[0], 0x40, "a PUBACK: {buf:?}");
                    let pkid = u16::from_be_bytes([buf[2], buf[3]]);
                    buf.drain(..4);
                    if let Some(n) = inflight.lock().unwrap().remove(&pkid) {
                        tally.ack(format!("mqtt-{n}"));
                        room.add_permits(1);
                    }
                }
            }
        })
    };
    let mut n = 0u64;
    let mut packet = Vec::new();
    while !stop.load(Ordering::Relaxed) && !reader.is_finished() {
        let Ok(Ok(permit)) = tokio::time::timeout(Duration::from_millis(200), room.acquire()).await
        else {
            continue;
        };
        permit.forget();
        let pkid = (n % 60_000) as u16 + 1;
        let payload = format!("mqtt-{n}");
        let topic = b"loss/mqtt";
        packet.clear();
        packet.push(0x32);
        remaining_length(2 + topic.len() + 2 + payload.len(), &mut packet);
        packet.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        packet.extend_from_slice(topic);
        packet.extend_from_slice(&pkid.to_be_bytes());
        packet.extend_from_slice(payload.as_bytes());
        inflight.lock().unwrap().insert(pkid, n);
        tally.published.fetch_add(1, Ordering::Relaxed);
        if w.write_all(&packet).await.is_err() {
            break;
        }
        n += 1;
    }
    // What is still outstanding is answered or the connection closed (3.1.1 has no refusal).
    let _ = tokio::time::timeout(Duration::from_secs(60), reader).await;
}

/// The id of a message meshgate published in binary mode: `ce-id` for HTTP and AMQP events,
/// the payload for MQTT ones (whose id meshgate makes up).
fn id_of(m: &async_nats::Message) -> String {
    let payload = String::from_utf8_lossy(&m.payload);
    if payload.starts_with("mqtt-") {
        return payload.into_owned();
    }
    m.headers
        .as_ref()
        .and_then(|h| h.get("ce-id"))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

/// Counts every message of the loss test the server delivers (the subscription survives a
/// server restart: async-nats subscribes again).
async fn subscriber(url: String) -> (Arc<Mutex<HashMap<String, u64>>>, async_nats::Client) {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .unwrap();
    let mut sub = client.subscribe("meshgate.loss.>").await.unwrap();
    client.flush().await.unwrap();
    let seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let counting = seen.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            *counting.lock().unwrap().entry(id_of(&m)).or_default() += 1;
        }
    });
    (seen, client)
}

/// Waits until `seen` has not grown for `quiet`.
async fn settle(seen: &Mutex<HashMap<String, u64>>, quiet: Duration) {
    let mut last = usize::MAX;
    loop {
        let now: usize = seen.lock().unwrap().len();
        if now == last {
            return;
        }
        last = now;
        tokio::time::sleep(quiet).await;
    }
}

/// Prints the counts of one publisher and returns its acknowledged-but-lost ids.
fn report(name: &str, tally: &Tally, seen: &HashMap<String, u64>, prefix: &str) -> Vec<String> {
    let acked = tally.acked();
    let delivered: Vec<(&String, &u64)> = seen
        .iter()
        .filter(|(id, _)| id.starts_with(prefix))
        .collect();
    let duplicated = delivered.iter().filter(|(_, c)| **c > 1).count();
    let lost: Vec<String> = acked
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .cloned()
        .collect();
    let acked_set: HashSet<&String> = acked.iter().collect();
    let unacked_delivered = delivered
        .iter()
        .filter(|(id, _)| !acked_set.contains(id))
        .count();
    println!(
        "{name}: published {}, acknowledged {}, delivered {} ({unacked_delivered} of them not acknowledged), duplicated {duplicated}, acknowledged but lost {}",
        tally.published.load(Ordering::Relaxed),
        acked.len(),
        delivered.len(),
        lost.len()
    );
    lost
}

fn nats_config(url: String) -> meshgate_config::Config {
    let mut c = test_config();
    c.gateway.instance_id = Some("loss".into());
    c.backbone.kind = BackboneKind::Nats;
    c.backbone.nats.urls = vec![url];
    c.backbone.nats.connect_timeout = Duration::from_secs(5);
    c.backbone.nats.wire_mode = NatsWireMode::Binary;
    c.mqtt.enabled = true;
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c
}

fn dropped_disconnected(m: &str) -> u64 {
    m.lines()
        .find_map(|l| {
            l.strip_prefix(
                "meshgate_backbone_dropped_total{backbone=\"nats\",reason=\"disconnected\"} ",
            )
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Streams HTTP and MQTT QoS 1 publishes for a while, runs `fault` (which stops the server
/// reading and then loses the connection), stops the publishers; returns their tallies.
async fn stream_through(
    gw: &meshgate::RunningGateway,
    fault: impl std::future::Future<Output = ()>,
) -> (Arc<Tally>, Arc<Tally>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (http, mqtt) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let http_task = tokio::spawn(http_publishers(
        gw.web_addr.unwrap(),
        8,
        http.clone(),
        stop.clone(),
    ));
    let mqtt_task = tokio::spawn(mqtt_publisher(
        gw.mqtt_addr.unwrap(),
        64,
        mqtt.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fault.await;
    stop.store(true, Ordering::Relaxed);
    http_task.await.unwrap();
    mqtt_task.await.unwrap();
    (http, mqtt)
}

/// nats-server stops reading the gateway's connection mid-stream (a proxy holds what the
/// gateway writes), then the connection drops with those bytes. The server and the subscriber
/// stay up, so what the server read is delivered: every acknowledged event must arrive. An AMQP
/// source's messages, acknowledged to RabbitMQ only once NATS confirmed them, all arrive too
/// (those refused are requeued and sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_the_connection_drops_with_unread_bytes() {
    let nats = NatsServer::start();
    let proxy = Proxy::start(nats.port).await;
    let (seen, _sub) = subscriber(nats.url()).await;
    let rabbit = Rabbit::connect("/").await;
    let input = unique("loss");
    rabbit.queue(&input, None).await;
    let mut config = nats_config(format!("nats://127.0.0.1:{}", proxy.port));
    config.amqp.enabled = true;
    config.amqp.reconnect_min = Duration::from_millis(100);
    config.amqp.reconnect_max = Duration::from_secs(1);
    config.amqp.sources = vec![AmqpSourceConfig {
        name: "loss".to_owned(),
        queue: input.clone(),
        exchange: None,
        binding_keys: Vec::new(),
        topic_prefix: Some("loss/amqp".to_owned()),
        prefetch: 64,
        wrap_source: "/meshgate/amqp/loss".to_owned(),
        wrap_type: "io.meshgate.amqp.message".to_owned(),
        user: None,
    }];
    let gw = start_gateway(config).await;
    let admin = gw.admin_addr.unwrap();
    // RabbitMQ gets messages for the source throughout (each confirmed by RabbitMQ).
    let amqp_stop = Arc::new(AtomicBool::new(false));
    let amqp_task = tokio::spawn({
        let (input, stop) = (input.clone(), amqp_stop.clone());
        async move {
            let rabbit = Rabbit::connect("/").await;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let props = lapin::BasicProperties::default()
                    .with_headers(ce_headers(&format!("amqp-{n}"), &[]));
                rabbit.publish("", &input, props, b"x").await;
                n += 1;
            }
            n
        }
    });
    let (http, mqtt) = stream_through(&gw, async {
        proxy.stall();
        // The gateway goes on writing into the socket buffers; nothing of that is read.
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.cut();
    })
    .await;
    amqp_stop.store(true, Ordering::Relaxed);
    let amqp: usize = amqp_task.await.unwrap();
    // Every AMQP message arrives in the end (requeued ones after the reconnect).
    let d = Deadline::after(Duration::from_secs(30));
    while (0..amqp).any(|i| !seen.lock().unwrap().contains_key(&format!("amqp-{i}"))) {
        if d.passed() {
            break;
        }
        d.pause().await;
    }
    settle(&seen, Duration::from_millis(500)).await;
    let seen = seen.lock().unwrap().clone();
    let m = metrics(admin).await;
    println!(
        "proxy stalled then cut: meshgate_backbone_dropped_total{{reason=\"disconnected\"}} {}",
        dropped_disconnected(&m)
    );
    let lost_http = report("HTTP", &http, &seen, "http-");
    let lost_mqtt = report("MQTT QoS 1", &mqtt, &seen, "mqtt-");
    let amqp_lost = (0..amqp)
        .filter(|i| !seen.contains_key(&format!("amqp-{i}")))
        .count();
    let amqp_dup = seen
        .iter()
        .filter(|(id, c)| id.starts_with("amqp-") && **c > 1)
        .count();
    println!(
        "AMQP source: published {amqp}, delivered {}, duplicated {amqp_dup}, lost {amqp_lost}",
        seen.keys().filter(|id| id.starts_with("amqp-")).count()
    );
    assert!(
        !http.acked().is_empty() && !mqtt.acked().is_empty(),
        "publishes were acknowledged before the fault"
    );
    assert!(
        dropped_disconnected(&m) > 0,
        "the fault caught events in flight (counted as discarded)"
    );
    assert!(
        lost_http.is_empty(),
        "HTTP: acknowledged but lost: {lost_http:?}"
    );
    assert!(
        lost_mqtt.is_empty(),
        "MQTT: acknowledged but lost: {lost_mqtt:?}"
    );
    assert_eq!(amqp_lost, 0, "AMQP: messages lost");
    gw.shutdown().await;
    rabbit.delete_queue(&input).await;
}

/// nats-server itself is stopped (SIGSTOP) mid-stream, so what the gateway writes waits in
/// the socket buffers, then killed (SIGKILL: those bytes are gone) and restarted. (In theory
/// nats-server could send a PONG before it flushed the messages read before the PING to the
/// subscriber, and be stopped in between: a loss inside the server, which NATS core allows;
/// not seen in runs so far. The proxy test above has no such window.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_when_a_stopped_nats_server_is_killed() {
    let mut nats = NatsServer::start();
    let (seen, sub) = subscriber(nats.url()).await;
    let gw = start_gateway(nats_config(nats.url())).await;
    let admin = gw.admin_addr.unwrap();
    let (http, mqtt) = stream_through(&gw, async {
        nats.signal("STOP");
        tokio::time::sleep(Duration::from_millis(500)).await;
        nats.kill();
    })
    .await;
    nats.restart();
    // The subscriber is back (async-nats subscribes again) before anything more is counted.
    let d = Deadline::after(Duration::from_secs(20));
    while sub.connection_state() != async_nats::connection::State::Connected {
        assert!(!d.passed(), "the subscriber did not reconnect");
        d.pause().await;
    }
    settle(&seen, Duration::from_millis(300)).await;
    let seen = seen.lock().unwrap().clone();
    let m = metrics(admin).await;
    println!(
        "nats-server stopped then killed: meshgate_backbone_dropped_total{{reason=\"disconnected\"}} {}",
        dropped_disconnected(&m)
    );
    let lost_http = report("HTTP", &http, &seen, "http-");
    let lost_mqtt = report("MQTT QoS 1", &mqtt, &seen, "mqtt-");
    assert!(
        !http.acked().is_empty() && !mqtt.acked().is_empty(),
        "publishes were acknowledged before the fault"
    );
    assert!(
        lost_http.is_empty(),
        "HTTP: acknowledged but lost: {lost_http:?}"
    );
    assert!(
        lost_mqtt.is_empty(),
        "MQTT: acknowledged but lost: {lost_mqtt:?}"
    );
    gw.shutdown().await;
}
