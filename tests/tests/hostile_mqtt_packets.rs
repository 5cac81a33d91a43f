//! Hostile MQTT packets and unrepresentable events against the real binary (issue 18: F2, F3,
//! item 5). Victims and bystanders are Mosquitto's own `mosquitto_sub`; attackers are raw TCP
//! sockets. Each test checks the offender's answer, that a well-behaved client connected at
//! the same time keeps receiving, the count on /metrics, and the gateway's RSS.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use meshgate_tests::{Process, metrics, mosquitto_command, spawn, wait_metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// RSS the gateway must stay under in these tests (it starts at ~20 MB in a debug build).
const RSS_LIMIT_KB: u64 = 150 * 1024;

fn gateway() -> Process {
    spawn(
        &[],
        &[
            ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__MQTT__ENABLED", "true"),
            ("MESHGATE__MQTT__LISTEN", "127.0.0.1:0"),
        ],
    )
}

fn rss_kb(p: &Process) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A `mosquitto_sub` whose output lines (`-v`: topic and payload) arrive on a channel;
/// killed on drop.
struct MosquittoSub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl MosquittoSub {
    fn start(mqtt: SocketAddr, args: &[&str]) -> MosquittoSub {
        let mut child = mosquitto_command("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &mqtt.port().to_string(), "-v"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        MosquittoSub { child, lines }
    }

    /// The next line; panics after 10 s.
    fn next_line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("mosquitto_sub printed no line for {what}: {e}"))
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for MosquittoSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(id: &str, ext: usize) -> String {
    serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "/hostile",
        "type": "t",
        "x": "a".repeat(ext),
        "data": id,
    })
    .to_string()
}

async fn post(web: SocketAddr, topic: &str, body: String) {
    let r = reqwest::Client::new()
        .post(format!("http://{web}/events/{topic}"))
        .header("content-type", "application/cloudevents+json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
}

/// Waits until `n` MQTT subscriptions exist, so a test publishes only once they do.
async fn subscriptions(admin: SocketAddr, n: usize) {
    wait_metric(
        admin,
        &format!("meshgate_mqtt_subscriptions{{adapter=\"mqtt\"}} {n}\n"),
    )
    .await;
}

/// F2: an extension attribute of 65,600 bytes, POSTed over HTTP, cannot be an MQTT 5 user
/// property (two-byte length). Before the fix the victim got a PUBLISH whose user property
/// announced 64 bytes and aborted as malformed — and, its QoS 1 session being persistent, got
/// it again on every reconnect. Now it is skipped for that subscriber and counted; the victim
/// stays connected and gets the next event; reconnecting resends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_unrepresentable_event_does_not_break_or_loop_a_persistent_subscriber() {
    let gw = gateway();
    let (mqtt, web, admin) = (gw.mqtt.unwrap(), gw.web.unwrap(), gw.admin.unwrap());
    let victim_args = [
        "-V", "5", "-q", "1", "-c", "-i", "victim", "-x", "3600", "-t", "f2/#",
    ];
    let mut victim = MosquittoSub::start(mqtt, &victim_args);
    // A well-behaved MQTT 3.1.1 subscriber (structured JSON: a long attribute is fine there).
    let bystander = MosquittoSub::start(mqtt, &["-V", "311", "-q", "1", "-t", "f2/#"]);
    subscriptions(admin, 2).await;

    post(web, "f2/big", event("big", 65_600)).await;
    post(web, "f2/next", event("next", 10)).await;

    let line = victim.next_line("the next event");
    assert!(line.starts_with("f2/next "), "{line}");
    assert!(victim.still_running(), "the victim is not broken");
    assert!(bystander.next_line("big").starts_with("f2/big "));
    assert!(bystander.next_line("next").starts_with("f2/next "));
    let m = metrics(admin).await;
    assert!(
        m.contains(
            "meshgate_events_dropped_total{adapter=\"mqtt\",reason=\"unrepresentable\"} 1\n"
        ),
        "{m}"
    );

    // The persistent session comes back: the skipped event is not resent, new ones arrive.
    drop(victim);
    wait_metric(
        admin,
        "meshgate_mqtt_sessions_offline{adapter=\"mqtt\"} 1\n",
    )
    .await;
    let mut victim = MosquittoSub::start(mqtt, &victim_args);
    wait_metric(
        admin,
        "meshgate_mqtt_sessions_offline{adapter=\"mqtt\"} 0\n",
    )
    .await;
    post(web, "f2/after", event("after", 10)).await;
    let line = victim.next_line("an event after reconnecting");
    assert!(line.starts_with("f2/after "), "no resend first: {line}");
    assert!(victim.still_running());
    assert!(bystander.next_line("after").starts_with("f2/after "));
    let m = metrics(admin).await;
    assert!(
        m.contains(
            "meshgate_events_dropped_total{adapter=\"mqtt\",reason=\"unrepresentable\"} 1\n"
        ),
        "skipped once, not per reconnect: {m}"
    );
    assert!(rss_kb(&gw) < RSS_LIMIT_KB, "RSS {} kB", rss_kb(&gw));
}

fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// CONNECT with raw flags; `props`: the MQTT 5 property block (`None`: MQTT 3.1.1).
fn connect(id: &str, flags: u8, props: Option<&[u8]>) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(if props.is_some() { 5 } else { 4 });
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    if let Some(p) = props {
        body.push(p.len() as u8);
        body.extend_from_slice(p);
    }
    body.extend_from_slice(&string(id.as_bytes()));
    frame(0x10, &body)
}

/// One whole packet's bytes, or `None` once the server closed the connection.
async fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    loop {
        if buf.len() >= 2 {
            let (mut len, mut i, mut shift) = (0usize, 1, 0);
            while let Some(&b) = buf.get(i) {
                len += usize::from(b & 0x7f) << shift;
                i += 1;
                shift += 7;
                if b & 0x80 == 0 {
                    if buf.len() >= i + len {
                        return Some(buf[..i + len].to_vec());
                    }
                    break;
                }
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("the gateway answers or closes within 5 s")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A raw connection after a successful CONNACK.
async fn attacker(mqtt: SocketAddr, id: &str, v5: bool) -> TcpStream {
    let mut s = TcpStream::connect(mqtt).await.unwrap();
    s.write_all(&connect(id, 0x02, v5.then_some(&[][..])))
        .await
        .unwrap();
    let ack = read_frame(&mut s).await.expect("CONNACK");
    assert_eq!((ack[0], ack[3]), (0x20, 0), "accepted: {ack:?}");
    s
}

/// The answer to a protocol violation: MQTT 5 DISCONNECT with `reason` then close, or (3.1.1,
/// `None`) just close.
async fn answered(s: &mut TcpStream, reason: Option<u8>) {
    if let Some(r) = reason {
        let d = read_frame(s).await.expect("a DISCONNECT");
        assert_eq!((d[0], d[2]), (0xe0, r), "DISCONNECT reason: {d:?}");
    }
    assert_eq!(read_frame(s).await, None, "then the connection is closed");
}

/// Item 5 and F3: each protocol violation gets the spec's answer, and a `mosquitto_sub -V 5`
/// connected meanwhile receives every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_get_the_specified_answer_while_others_keep_receiving() {
    let gw = gateway();
    let (mqtt, web, admin) = (gw.mqtt.unwrap(), gw.web.unwrap(), gw.admin.unwrap());
    let bystander = MosquittoSub::start(mqtt, &["-V", "5", "-q", "1", "-t", "ok/#"]);
    subscriptions(admin, 1).await;
    let mut n = 0;
    let mut check_bystander = async || {
        n += 1;
        post(web, &format!("ok/{n}"), event(&format!("e{n}"), 1)).await;
        let line = bystander.next_line("the bystander's event");
        assert!(line.starts_with(&format!("ok/{n} ")), "{line}");
    };

    // MQTT 5 PUBLISH, topic not UTF-8 → 0x81 [MQTT-1.5.4-1]; wildcard → 0x82 [MQTT-3.3.2-2].
    for (topic, reason) in [(&b"a/\xff"[..], 0x81), (b"a/+", 0x82), (b"a/#", 0x82)] {
        let mut s = attacker(mqtt, "bad-topic", true).await;
        let body = [&string(topic)[..], &[0, 7, 0], b"x"].concat();
        s.write_all(&frame(0x32, &body)).await.unwrap();
        answered(&mut s, Some(reason)).await;
        check_bystander().await;
    }
    // MQTT 3.1.1 PUBLISH with a wildcard: closed.
    let mut s = attacker(mqtt, "bad-topic-311", false).await;
    s.write_all(&frame(0x30, &[&string(b"a/#")[..], b"x"].concat()))
        .await
        .unwrap();
    answered(&mut s, None).await;
    check_bystander().await;

    // CONNECT with the reserved flag set: closed without CONNACK [MQTT-3.1.2-3].
    for props in [None, Some(&[][..])] {
        let mut s = TcpStream::connect(mqtt).await.unwrap();
        s.write_all(&connect("reserved", 0x03, props))
            .await
            .unwrap();
        answered(&mut s, None).await;
        check_bystander().await;
    }

    // SUBSCRIBE / UNSUBSCRIBE whose fixed-header flags are not 0b0010 [MQTT-3.8.1-1],
    // [MQTT-3.10.1-1]: MQTT 5 DISCONNECT 0x81 (malformed), 3.1.1 closed.
    for first in [0x80u8, 0xa0] {
        for v5 in [false, true] {
            let mut s = attacker(mqtt, "bad-flags", v5).await;
            let mut body = vec![0, 1];
            if v5 {
                body.push(0);
            }
            body.extend_from_slice(&string(b"ok/#"));
            if first == 0x80 {
                body.push(1);
            }
            s.write_all(&frame(first, &body)).await.unwrap();
            answered(&mut s, v5.then_some(0x81)).await;
        }
        check_bystander().await;
    }

    // F3: MQTT 5 CONNECT with Receive Maximum 0 → CONNACK 0x82 (Protocol Error), closed.
    let mut s = TcpStream::connect(mqtt).await.unwrap();
    s.write_all(&connect("rm0", 0x02, Some(&[0x21, 0, 0])))
        .await
        .unwrap();
    let ack = read_frame(&mut s).await.expect("a CONNACK");
    assert_eq!((ack[0], ack[3]), (0x20, 0x82), "{ack:?}");
    answered(&mut s, None).await;
    check_bystander().await;

    let m = metrics(admin).await;
    for needle in [
        "meshgate_errors_total{adapter=\"mqtt\",kind=\"bad_topic\"} 4\n",
        "meshgate_errors_total{adapter=\"mqtt\",kind=\"protocol\"} 1\n",
        // 2 reserved-flag CONNECTs + 4 bad-flag packets.
        "meshgate_errors_total{adapter=\"mqtt\",kind=\"malformed\"} 6\n",
    ] {
        assert!(m.contains(needle), "{needle} not in\n{m}");
    }
    assert!(rss_kb(&gw) < RSS_LIMIT_KB, "RSS {} kB", rss_kb(&gw));
}

/// F2 on JetStream: the skipped delivery is acknowledged ("as if sent", MQTT-3.1.2-25), so
/// JetStream does not redeliver it after `ack_wait` — it would otherwise come back (and be
/// skipped again) every second, up to `max_deliver` times, for every persistent subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f2_on_jetstream_the_skipped_delivery_is_acknowledged_not_redelivered() {
    let nats = meshgate_tests::nats::NatsServer::start();
    let url = nats.url();
    let gw = spawn(
        &[],
        &[
            ("MESHGATE__BACKBONE__KIND", "jetstream"),
            ("MESHGATE__BACKBONE__NATS__URLS", &url),
            ("MESHGATE__BACKBONE__JETSTREAM__ACK_WAIT", "1s"),
            ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__MQTT__ENABLED", "true"),
            ("MESHGATE__MQTT__LISTEN", "127.0.0.1:0"),
        ],
    );
    let (mqtt, web, admin) = (gw.mqtt.unwrap(), gw.web.unwrap(), gw.admin.unwrap());
    let mut victim = MosquittoSub::start(
        mqtt,
        &[
            "-V",
            "5",
            "-q",
            "1",
            "-c",
            "-i",
            "js-victim",
            "-x",
            "3600",
            "-t",
            "f2/#",
        ],
    );
    subscriptions(admin, 1).await;
    post(web, "f2/big", event("big", 65_600)).await;
    post(web, "f2/next", event("next", 10)).await;
    let line = victim.next_line("the next event");
    assert!(line.starts_with("f2/next "), "{line}");
    // Three ack_wait periods: a delivery left unacknowledged would have come back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(victim.still_running());
    let m = metrics(admin).await;
    assert!(
        m.contains(
            "meshgate_events_dropped_total{adapter=\"mqtt\",reason=\"unrepresentable\"} 1\n"
        ),
        "skipped once, not redelivered: {m}"
    );
    assert!(
        victim.lines.try_recv().is_err(),
        "nothing else was delivered"
    );
    assert!(rss_kb(&gw) < RSS_LIMIT_KB, "RSS {} kB", rss_kb(&gw));
}
