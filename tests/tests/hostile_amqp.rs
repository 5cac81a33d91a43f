//! Hostile AMQP input against the real `meshgate` binary and the real RabbitMQ on
//! 127.0.0.1:5672 (review F9):
//!
//! - a message whose `headers` nest arrays 20,000 deep (amq-protocol's table parser recurses
//!   once per level: before the pre-scan this aborted the whole process with a stack overflow,
//!   and again after every restart, since the message stayed unacknowledged);
//! - a body far over `amqp.max_body_size` (it used to be assembled up to 512 MiB);
//! - (F2) an event whose attribute headers need a content header frame over RabbitMQ's
//!   frame_max (RabbitMQ closed the sink's connection, and the sink sent it again forever);
//! - (F3) a sink that cannot reach RabbitMQ, under the memory backbone's `block` policy.
//!
//! Each test asserts: the process stays alive, the offending message is rejected without
//! requeue (dead-lettered, so no crash loop and no redelivery loop), the refusal is counted on
//! /metrics, RSS stays bounded, and a WebSocket subscriber connected the whole time receives
//! every good event.
//!
//! The nested message is written with raw AMQP frames: lapin (like amq-protocol) encodes and
//! decodes tables recursively, so the test process itself must never hold such a table as a
//! value. It is built here as bytes and only ever counted (queue.declare passive), never read.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use meshgate_tests::amqp::{HOST_PORT, Rabbit, ce_headers, unique};
use meshgate_tests::{Deadline, Process, metrics, next_event, spawn, ws_connect};

/// How deep the hostile header nests (the review's figure; 5 bytes a level, so ~100 kB: one
/// frame under RabbitMQ's default frame_max of 128 KiB).
const DEPTH: usize = 20_000;

/// A config file for the binary: memory backbone, web and admin listeners on free ports, one
/// AMQP source on `queue` with topic prefix `h`, and `extra` lines in `[amqp]`.
fn write_config(queue: &str, extra: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("hostile-amqp")));
    let text = format!(
        r#"
[http]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[amqp]
enabled = true
reconnect_min = "100ms"
reconnect_max = "1s"
{extra}
[[amqp.sources]]
name = "hostile"
queue = "{queue}"
topic_prefix = "h"
prefetch = 16
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn start(config: &std::path::Path) -> Process {
    spawn(&["--config", config.to_str().unwrap()], &[])
}

/// The process's resident set in bytes (VmRSS in /proc/<pid>/status).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Asserts the process has not exited (a stack overflow is SIGABRT).
fn alive(p: &mut Process) {
    if let Some(status) = p.child.try_wait().unwrap() {
        panic!("meshgate died: {status}");
    }
}

/// The value of a metric line `name{labels} value`, 0 when absent.
fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the source's link is up (meshgate_amqp_link_up 1).
async fn link_up(p: &mut Process) {
    let admin = p.admin.unwrap();
    let d = Deadline::after(Duration::from_secs(20));
    loop {
        alive(p);
        let m = metrics(admin).await;
        if metric(&m, r#"meshgate_amqp_link_up{kind="source",link="hostile"}"#) == 1 {
            return;
        }
        assert!(!d.passed(), "the AMQP source is not up within 20 s:\n{m}");
        d.pause().await;
    }
}

/// Waits until the metric reaches `at_least`; returns its value.
async fn wait_count(p: &mut Process, name_and_labels: &str, at_least: u64) -> u64 {
    let admin = p.admin.unwrap();
    let d = Deadline::after(Duration::from_secs(15));
    loop {
        alive(p);
        let m = metrics(admin).await;
        let v = metric(&m, name_and_labels);
        if v >= at_least {
            return v;
        }
        assert!(
            !d.passed(),
            "{name_and_labels} stayed at {v} (expected {at_least}):\n{m}"
        );
        d.pause().await;
    }
}

/// Messages ready in `queue` (queue.declare passive: counted, never read).
async fn ready(rabbit: &Rabbit, queue: &str) -> u32 {
    rabbit
        .channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

// ---------------------------------------------------------------------------------------------
// A raw AMQP 0.9.1 publisher: just enough protocol to publish one message whose content header
// is given as bytes.

fn short(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).unwrap());
    out.extend_from_slice(s.as_bytes());
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xCE);
    f
}

fn method(channel: u16, class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    frame(1, channel, &p)
}

/// Reads frames until a method `(class, id)` arrives on `channel`; returns its arguments.
fn expect(s: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        s.read_exact(&mut head).unwrap();
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        s.read_exact(&mut payload).unwrap();
        payload.pop();
        if head[0] == 1 && payload.len() >= 4 {
            let got = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            if got == (class, id) {
                return payload[4..].to_vec();
            }
            assert!(
                got != (10, 50) && got != (20, 40),
                "RabbitMQ closed the raw publisher: {:?}",
                String::from_utf8_lossy(&payload)
            );
        }
    }
}

/// Publishes one message to the default exchange (routing key = `queue`) with the content
/// header's property part (`flags` and the property list) given raw, waits for the confirm.
fn publish_raw(queue: &str, properties: &[u8], body: &[u8]) {
    let mut s = TcpStream::connect(HOST_PORT).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    expect(&mut s, 10, 10); // connection.start
    let mut start_ok = 0u32.to_be_bytes().to_vec(); // empty client-properties
    short(&mut start_ok, "PLAIN");
    let response = b"\x00guest\x00guest";
    start_ok.extend_from_slice(&u32::try_from(response.len()).unwrap().to_be_bytes());
    start_ok.extend_from_slice(response);
    short(&mut start_ok, "en_US");
    s.write_all(&method(0, 10, 11, &start_ok)).unwrap();
    let tune = expect(&mut s, 10, 30);
    let mut tune_ok = tune[..2].to_vec(); // channel-max as proposed
    tune_ok.extend_from_slice(&131_072u32.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&method(0, 10, 31, &tune_ok)).unwrap();
    let mut open = Vec::new();
    short(&mut open, "/");
    short(&mut open, "");
    open.push(0);
    s.write_all(&method(0, 10, 40, &open)).unwrap();
    expect(&mut s, 10, 41);
    s.write_all(&method(1, 20, 10, &[0])).unwrap();
    expect(&mut s, 20, 11);
    s.write_all(&method(1, 85, 10, &[0])).unwrap(); // confirm.select
    expect(&mut s, 85, 11);
    let mut publish = 0u16.to_be_bytes().to_vec();
    short(&mut publish, ""); // default exchange
    short(&mut publish, queue);
    publish.push(0);
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(properties);
    let mut out = method(1, 60, 40, &publish);
    out.extend(frame(2, 1, &header));
    if !body.is_empty() {
        out.extend(frame(3, 1, body));
    }
    s.write_all(&out).unwrap();
    expect(&mut s, 60, 80); // basic.ack: RabbitMQ has it
    let mut close = 200u16.to_be_bytes().to_vec();
    short(&mut close, "bye");
    close.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&method(0, 10, 50, &close)).unwrap();
    let _ = expect(&mut s, 10, 51);
}

/// Content properties with only `headers`, holding `x` = an array nested `depth` deep
/// (`[[[…[]…]]]`), written inside out without ever being a value.
fn nested_headers(depth: usize) -> Vec<u8> {
    let mut value = Vec::with_capacity(5 * depth);
    for level in 0..depth {
        value.push(b'A');
        let inner = 5 * (depth - 1 - level);
        value.extend_from_slice(&u32::try_from(inner).unwrap().to_be_bytes());
    }
    let mut table = Vec::new();
    short(&mut table, "x");
    table.extend(value);
    let mut p = (1u16 << 13).to_be_bytes().to_vec(); // flags: headers only
    p.extend_from_slice(&u32::try_from(table.len()).unwrap().to_be_bytes());
    p.extend(table);
    p
}

/// A good binary-mode CloudEvent with id `id`.
async fn publish_good(rabbit: &Rabbit, queue: &str, id: &str) {
    rabbit
        .publish(
            "",
            queue,
            BasicProperties::default().with_headers(ce_headers(id, &[])),
            id.as_bytes(),
        )
        .await;
}

/// Declares `queue` (with a dead-letter exchange and queue) and returns the dead-letter queue.
async fn queues(rabbit: &Rabbit, queue: &str) -> String {
    let (dlx, dlq) = (unique("dlx"), unique("dlq"));
    rabbit.exchange(&dlx).await;
    rabbit.queue(&dlq, None).await;
    rabbit.bind(&dlq, &dlx, "#").await;
    rabbit.queue(queue, Some(&dlx)).await;
    dlq
}

const BAD_MESSAGE: &str = r#"meshgate_events_dropped_total{adapter="amqp",reason="bad_message"}"#;
const TOO_LARGE: &str = r#"meshgate_events_dropped_total{adapter="amqp",reason="too_large"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_headers_are_dead_lettered_and_counted_and_the_process_lives_on() {
    let rabbit = Rabbit::connect("/").await;
    let q = unique("q");
    let dlq = queues(&rabbit, &q).await;
    let config = write_config(&q, "");
    // The hostile message waits in the queue before meshgate starts: what a restart after a
    // crash sees (before the fix: a crash loop until the queue was purged).
    publish_raw(&q, &nested_headers(DEPTH), b"deep");
    let mut gw = start(&config);
    link_up(&mut gw).await;
    let mut ws = ws_connect(gw.web.unwrap(), &["h/#"]).await;
    let rss_before = rss(gw.pid());

    // Good and hostile messages interleaved; every good one must arrive, in order.
    let mut expected = Vec::new();
    for i in 0..5 {
        let id = format!("good-{i}");
        publish_good(&rabbit, &q, &id).await;
        expected.push(id);
        publish_raw(&q, &nested_headers(DEPTH), b"deep");
    }
    publish_good(&rabbit, &q, "last").await;
    expected.push("last".to_owned());
    for id in &expected {
        let e = next_event(&mut ws, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("event {id} not delivered: {e:?}"));
        assert_eq!(e.id(), id);
    }
    alive(&mut gw);
    assert_eq!(wait_count(&mut gw, BAD_MESSAGE, 6).await, 6);
    // Rejected without requeue: dead-lettered, nothing left to redeliver.
    let d = Deadline::after(Duration::from_secs(10));
    while ready(&rabbit, &dlq).await < 6 {
        assert!(!d.passed(), "the hostile messages were not dead-lettered");
        d.pause().await;
    }
    assert_eq!(ready(&rabbit, &q).await, 0);
    let grown = rss(gw.pid()).saturating_sub(rss_before);
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");

    // A restart reads nothing hostile again (no crash loop) and delivers on.
    gw.signal("TERM");
    gw.wait_exit(Duration::from_secs(15));
    publish_raw(&q, &nested_headers(DEPTH), b"deep");
    let mut gw = start(&config);
    link_up(&mut gw).await;
    let mut ws = ws_connect(gw.web.unwrap(), &["h/#"]).await;
    wait_count(&mut gw, BAD_MESSAGE, 1).await;
    publish_good(&rabbit, &q, "after-restart").await;
    let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(e.id(), "after-restart");
    alive(&mut gw);
    assert_eq!(ready(&rabbit, &dlq).await, 7);
    rabbit.delete_queue(&q).await;
    rabbit.delete_queue(&dlq).await;
    let _ = std::fs::remove_file(config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_size_are_refused_unread_and_counted() {
    let rabbit = Rabbit::connect("/").await;
    let q = unique("q");
    let dlq = queues(&rabbit, &q).await;
    // The default amqp.max_body_size (1MiB).
    let config = write_config(&q, "");
    let mut gw = start(&config);
    link_up(&mut gw).await;
    let mut ws = ws_connect(gw.web.unwrap(), &["h/#"]).await;
    let rss_before = rss(gw.pid());

    // 3 × 48 MiB (before the fix each was assembled whole, up to 512 MiB), between good
    // messages; the largest good one is exactly at the limit.
    let huge = vec![b'x'; 48 << 20];
    let mut expected = Vec::new();
    for i in 0..3 {
        let id = format!("good-{i}");
        publish_good(&rabbit, &q, &id).await;
        expected.push(id);
        rabbit
            .publish(
                "",
                &q,
                BasicProperties::default().with_headers(ce_headers("huge", &[])),
                &huge,
            )
            .await;
    }
    drop(huge);
    let at_limit = vec![b'y'; 1 << 20];
    rabbit
        .publish(
            "",
            &q,
            BasicProperties::default().with_headers(ce_headers("at-limit", &[])),
            &at_limit,
        )
        .await;
    expected.push("at-limit".to_owned());
    for id in &expected {
        let e = next_event(&mut ws, Duration::from_secs(15))
            .await
            .unwrap_or_else(|e| panic!("event {id} not delivered: {e:?}"));
        assert_eq!(e.id(), id);
    }
    assert_eq!(wait_count(&mut gw, TOO_LARGE, 3).await, 3);
    let d = Deadline::after(Duration::from_secs(10));
    while ready(&rabbit, &dlq).await < 3 {
        assert!(!d.passed(), "the oversize messages were not dead-lettered");
        d.pause().await;
    }
    assert_eq!(ready(&rabbit, &q).await, 0);
    // Bounded by the read-ahead and frame buffers, not the body: under 32 MiB of growth for
    // 144 MiB refused (a single one assembled would be 48). Alone it grows by well under 24
    // MiB; once, in the whole suite on a loaded machine, by 24.004 MiB (stop 33): the margin
    // is the allocator's, the bound is that no body is assembled.
    let grown = rss(gw.pid()).saturating_sub(rss_before);
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
    alive(&mut gw);
    rabbit.delete_queue(&q).await;
    rabbit.delete_queue(&dlq).await;
    let _ = std::fs::remove_file(config);
}

/// Posts a structured CloudEvent with id `id` and, when `ext` is given, an extension `x` of
/// that many bytes.
async fn post_event(web: std::net::SocketAddr, topic: &str, id: &str, ext: Option<usize>) {
    let mut event = serde_json::json!({
        "specversion": "1.0", "id": id, "source": "/test", "type": "t", "data": id,
    });
    if let Some(n) = ext {
        event["x"] = serde_json::Value::String("a".repeat(n));
    }
    let r = reqwest::Client::new()
        .post(format!("http://{web}/events/{topic}"))
        .header("content-type", "application/cloudevents+json")
        .body(event.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        202,
        "{id}: {}",
        r.text().await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_headers_exceed_frame_max_is_skipped_by_the_sink_and_counted() {
    let rabbit = Rabbit::connect("/").await;
    let (ex, q) = (unique("ex"), unique("q"));
    rabbit.exchange(&ex).await;
    rabbit.queue(&q, None).await;
    rabbit.bind(&q, &ex, "#").await;
    // A source is needed by write_config; it consumes a queue of its own, idle here.
    let idle = unique("idle");
    rabbit.queue(&idle, None).await;
    let sink = format!("[[amqp.sinks]]\nname = \"out\"\nfilter = \"s/#\"\nexchange = \"{ex}\"\n");
    let path = write_config(&idle, "");
    let text = std::fs::read_to_string(&path).unwrap() + &sink;
    std::fs::write(&path, text).unwrap();
    let mut gw = start(&path);
    link_up(&mut gw).await;
    let sink_up = r#"meshgate_amqp_link_up{kind="sink",link="out"}"#;
    wait_count(&mut gw, sink_up, 1).await;
    let web = gw.web.unwrap();
    let mut ws = ws_connect(web, &["s/#"]).await;

    // Binary mode writes every attribute as a header: a 200 kB extension needs a content
    // header frame over RabbitMQ's 128 KiB frame_max, which RabbitMQ answers by closing the
    // connection (FRAME_ERROR) — and the sink used to publish it again on every reconnect.
    post_event(web, "s/a", "good-0", None).await;
    post_event(web, "s/a", "big", Some(200_000)).await;
    post_event(web, "s/a", "good-1", Some(1000)).await;
    for id in ["good-0", "big", "good-1"] {
        let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
        assert_eq!(e.id(), id, "the WebSocket subscriber gets every event");
    }
    let got = rabbit.consume(&q, 2, Duration::from_secs(10)).await;
    let ids: Vec<String> = got
        .iter()
        .map(
            |d| match meshgate_tests::amqp::header(&d.properties, "cloudEvents_id") {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert_eq!(ids, ["good-0", "good-1"]);
    let unencodable = r#"meshgate_events_dropped_total{adapter="amqp",reason="unencodable"}"#;
    assert_eq!(wait_count(&mut gw, unencodable, 1).await, 1);
    let m = metrics(gw.admin.unwrap()).await;
    assert_eq!(
        metric(
            &m,
            r#"meshgate_amqp_reconnects_total{kind="sink",link="out"}"#
        ),
        0,
        "the sink's connection stayed up:\n{m}"
    );
    alive(&mut gw);
    rabbit.delete_queue(&q).await;
    rabbit.delete_queue(&idle).await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_cannot_reach_rabbitmq_never_makes_publishers_wait() {
    // A port nobody listens on: every connection attempt is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The `block` policy with a small queue: before the fix the sink's unpolled subscription
    // filled after 16 events and every later publish waited block_timeout, then got 503.
    let path = std::env::temp_dir().join(format!("{}.toml", unique("hostile-amqp")));
    let text = format!(
        r#"
[http]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[backbone.memory]
queue_capacity = 16
full_policy = "block"
block_timeout = "5s"
[amqp]
enabled = true
url = "amqp://127.0.0.1:{port}"
reconnect_min = "100ms"
reconnect_max = "1s"
[[amqp.sinks]]
name = "down"
filter = "s/#"
exchange = "nowhere"
max_in_flight = 8
"#
    );
    std::fs::write(&path, text).unwrap();
    let mut gw = start(&path);
    let web = gw.web.unwrap();
    let mut ws = ws_connect(web, &["s/#"]).await;
    let started = std::time::Instant::now();
    let reader = tokio::spawn(async move {
        for i in 0..200 {
            let e = next_event(&mut ws, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("event {i} not delivered: {e:?}"));
            assert_eq!(e.id(), format!("e-{i}"));
        }
    });
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let t = std::time::Instant::now();
        post_event(web, "s/a", &format!("e-{i}"), None).await;
        slowest = slowest.max(t.elapsed());
    }
    let took = started.elapsed();
    // Before the fix every publish after the 16th waited block_timeout (5 s). One publish
    // is bounded, not the total of 200, which a loaded machine stretches.
    assert!(
        slowest < Duration::from_millis(2500),
        "a publish took {slowest:?} (all 200: {took:?})"
    );
    reader.await.unwrap();
    let unreachable = r#"meshgate_events_dropped_total{adapter="amqp",reason="unreachable"}"#;
    let dropped = wait_count(&mut gw, unreachable, 200 - 8 - 16).await;
    assert!(dropped <= 200 - 8, "{dropped}");
    let m = metrics(gw.admin.unwrap()).await;
    assert_eq!(
        metric(&m, r#"meshgate_amqp_link_up{kind="sink",link="down"}"#),
        0
    );
    alive(&mut gw);
    let _ = std::fs::remove_file(path);
}
