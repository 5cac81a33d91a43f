//! Hostile clients of the web listener (issue 18, review F5, F7, F10, F11), against the real
//! binary: each attack asserts the gateway's memory stays under a stated bound, the offender
//! is refused or cut off with the right answer, a well-behaved WebSocket subscriber and curl
//! publisher keep working meanwhile, and the refusal is counted on /metrics.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use meshgate_tests::{Deadline, Process, metrics, next_event, spawn, ws_connect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// `VmRSS` or `VmHWM` of `pid` in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn gateway(extra: &[(&str, &str)]) -> Process {
    let mut env = vec![
        ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
        ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
        ("MESHGATE__LOG__LEVEL", "warn"),
    ];
    env.extend_from_slice(extra);
    spawn(&[], &env)
}

/// One structured event POSTed with curl; the HTTP status.
fn curl_post(web: SocketAddr, topic: &str, id: &str) -> u16 {
    let body = format!(r#"{{"specversion":"1.0","id":"{id}","source":"/hostile","type":"t"}}"#);
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "-H",
            "content-type: application/cloudevents+json",
            "--data-binary",
            &body,
            &format!("http://{web}/events/{topic}"),
        ])
        .output()
        .expect("curl runs (apt-get install -y curl)");
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

/// A counter's value in the Prometheus text (0 when absent).
fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether the server closed `s` (EOF or reset) within `within`; bytes it sent are skipped.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Slowloris (F5): 2,000 sockets each send half a header line and then nothing. With
/// `http.header_read_timeout = 1s` every one is closed within ~1 s of its accept, the process
/// stays under 60 MB above its idle size, and a WebSocket subscriber receives every event curl
/// publishes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_sockets_are_cut_off_while_clients_keep_working() {
    const SOCKETS: usize = 2_000;
    let gw = gateway(&[("MESHGATE__HTTP__HEADER_READ_TIMEOUT", "1s")]);
    let (web, admin, pid) = (gw.web.unwrap(), gw.admin.unwrap(), gw.pid());
    let mut ws = ws_connect(web, &["loris/#"]).await;
    let idle_rss = status_kb(pid, "VmRSS:");

    let opened = Instant::now();
    let mut slow = Vec::with_capacity(SOCKETS);
    for _ in 0..SOCKETS {
        let mut s = TcpStream::connect(web).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            .await
            .unwrap();
        slow.push(s);
    }
    let open_took = opened.elapsed();

    // Meanwhile, curl publishes and the subscriber receives.
    let mut sent = BTreeSet::new();
    for i in 0..20 {
        let id = format!("L{i}");
        assert_eq!(
            curl_post(web, "loris/x", &id),
            202,
            "curl POST {id} during the attack"
        );
        sent.insert(id);
    }
    let mut received = BTreeSet::new();
    while received.len() < sent.len() {
        let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
        received.insert(e.id().to_owned());
    }
    assert_eq!(received, sent, "the subscriber got every event");
    let peak_rss = status_kb(pid, "VmRSS:");

    // Every slow socket is closed by the server: 1 s after its accept (+ slack for 2,000).
    let mut still_open = 0;
    let check_until = Duration::from_secs(3) + open_took;
    let started = Instant::now();
    for s in &mut slow {
        let left = check_until.saturating_sub(started.elapsed());
        if !closed_within(s, left.max(Duration::from_millis(10))).await {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open, 0,
        "{still_open} of {SOCKETS} slow sockets still open {check_until:?} after the first was opened"
    );
    eprintln!(
        "slowloris: {SOCKETS} sockets opened in {open_took:?}; RSS idle {idle_rss} kB, under attack {peak_rss} kB"
    );
    let m = metrics(admin).await;
    let timeouts = counter(
        &m,
        r#"meshgate_errors_total{adapter="http",kind="header_timeout"}"#,
    );
    assert!(
        timeouts >= SOCKETS as u64,
        "header timeouts counted: {timeouts}\n{m}"
    );
    assert!(
        peak_rss < idle_rss + 60 * 1024,
        "RSS {peak_rss} kB with {SOCKETS} slow sockets, idle {idle_rss} kB"
    );
    // The listener serves normally afterwards, with its sockets given back.
    assert_eq!(curl_post(web, "loris/y", "after"), 202);
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "after"
    );
    let open = counter(
        &metrics(admin).await,
        r#"meshgate_connections{adapter="http"}"#,
    );
    assert!(open <= 3, "open web sockets after the attack: {open}");
}

/// A keep-alive connection is closed after `http.idle_timeout` without a request, and a head
/// that starts late on a keep-alive connection still has `header_read_timeout` to complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_closed_when_idle() {
    let gw = gateway(&[
        ("MESHGATE__HTTP__HEADER_READ_TIMEOUT", "1s"),
        ("MESHGATE__HTTP__IDLE_TIMEOUT", "2500ms"),
    ]);
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    let request = b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n";
    // Idle past header_read_timeout but within idle_timeout: the second request is served.
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 404"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(request).await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 404"),
        "served after 1.5 s idle"
    );
    // Then nothing: closed at idle_timeout.
    let idle_from = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "idle connection closed"
    );
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(2300) && idle < Duration::from_millis(4000),
        "closed after {idle:?}, idle_timeout 2.5 s"
    );
    // Idle closes are not errors: no header timeout counted for them.
    let m = metrics(admin).await;
    assert_eq!(
        counter(
            &m,
            r#"meshgate_errors_total{adapter="http",kind="header_timeout"}"#
        ),
        0,
        "{m}"
    );
}

/// The connection cap (F5): with `http.max_connections = 20` and 20 silent sockets held, more
/// sockets get a 503 (or are closed) at once and are counted; once the 20 go, curl is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused_at_accept_and_counted() {
    let gw = gateway(&[
        ("MESHGATE__HTTP__MAX_CONNECTIONS", "20"),
        ("MESHGATE__HTTP__HEADER_READ_TIMEOUT", "30s"),
    ]);
    let (web, admin, pid) = (gw.web.unwrap(), gw.admin.unwrap(), gw.pid());
    // The well-behaved subscriber holds one of the 20 slots for its whole life.
    let mut ws = ws_connect(web, &["cap/#"]).await;
    let mut held = Vec::new();
    for _ in 0..19 {
        held.push(TcpStream::connect(web).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..10 {
        let mut s = TcpStream::connect(web).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(
            matches!(read, Ok(Ok(_)) | Ok(Err(_))),
            "extra socket {i} not closed at once"
        );
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 503"),
            "extra socket {i} got {text:?}"
        );
        if i == 0 {
            assert!(text.contains("http.max_connections"), "{text:?}");
        }
    }
    let m = metrics(admin).await;
    assert_eq!(
        counter(
            &m,
            r#"meshgate_errors_total{adapter="http",kind="connection_limit"}"#
        ),
        10,
        "{m}"
    );
    assert!(status_kb(pid, "VmRSS:") < 200 * 1024, "RSS bound");
    // The silent sockets go; the subscriber kept its slot and receives what curl publishes.
    drop(held);
    let d = Deadline::after(Duration::from_secs(5));
    let status = loop {
        let status = curl_post(web, "cap/x", "C1");
        if status == 202 || d.passed() {
            break status;
        }
        d.pause().await;
    };
    assert_eq!(status, 202, "served once the slots are free");
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "C1"
    );
}

/// F10: a 1 MiB batch of ~349,000 `{}` elements gets 413 naming `http.max_batch_events`, fast,
/// with 8 of them in flight at once, and the peak memory stays within 64 MB of idle (it was
/// ~140 MB per request when every element was decoded before the count was checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_batch_is_refused_before_it_is_expanded() {
    let gw = gateway(&[]);
    let (web, admin, pid) = (gw.web.unwrap(), gw.admin.unwrap(), gw.pid());
    let mut ws = ws_connect(web, &["batch/#"]).await;
    let idle_hwm = status_kb(pid, "VmHWM:");
    let mut body = String::with_capacity(1 << 20);
    body.push('[');
    while body.len() < (1 << 20) - 4 {
        body.push_str("{},");
    }
    body.pop();
    body.push(']');
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut requests = Vec::new();
    for _ in 0..8 {
        let (client, body) = (client.clone(), body.clone());
        requests.push(tokio::spawn(async move {
            let r = client
                .post(format!("http://{web}/events/batch/x"))
                .header("content-type", "application/cloudevents-batch+json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
    }
    for r in requests {
        let (status, text) = r.await.unwrap();
        assert_eq!(status, 413, "{text}");
        assert!(text.contains("http.max_batch_events"), "{text}");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "8 refusals took {took:?}");
    let hwm = status_kb(pid, "VmHWM:");
    eprintln!("huge batches: 8 refused in {took:?}; VmHWM {idle_hwm} kB -> {hwm} kB");
    assert!(
        hwm < idle_hwm + 64 * 1024,
        "peak RSS {hwm} kB after 8 huge batches, {idle_hwm} kB before"
    );
    let m = metrics(admin).await;
    assert_eq!(
        counter(
            &m,
            r#"meshgate_errors_total{adapter="http",kind="too_large"}"#
        ),
        8,
        "{m}"
    );
    // A batch at the limit is still accepted, and delivered.
    assert_eq!(curl_post(web, "batch/ok", "B1"), 202);
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "B1"
    );
}

/// The WebSocket handshake with extra headers; the HTTP status (101 when upgraded).
async fn ws_status(web: SocketAddr, headers: &[(&str, &str)]) -> (u16, Option<meshgate_tests::Ws>) {
    let mut req = format!("ws://{web}/ws").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    for (k, v) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => (101, Some(ws)),
        Err(tungstenite::Error::Http(resp)) => (resp.status().as_u16(), None),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// F7: with `gateway.max_connections_per_ip = 3`, a fourth WebSocket from 127.0.0.1 gets 503
/// (counted `connection_limit_ip`) while the first three keep receiving; F11: a page of another
/// origin gets 403 (counted `forbidden_origin`), the same origin and non-browsers are allowed;
/// a cross-origin `POST /events` gets 403 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_per_address_cap_and_cross_origin_refusal() {
    let gw = gateway(&[("MESHGATE__GATEWAY__MAX_CONNECTIONS_PER_IP", "3")]);
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    let mut ws = ws_connect(web, &["ip/#"]).await;
    let same_origin = format!("http://{web}");
    let (status, second) = ws_status(web, &[("Origin", &same_origin)]).await;
    assert_eq!(status, 101, "same origin is allowed");
    let (status, third) = ws_status(web, &[]).await;
    assert_eq!(status, 101, "no Origin (not a browser) is allowed");
    for _ in 0..5 {
        assert_eq!(
            ws_status(web, &[]).await.0,
            503,
            "fourth connection from one address"
        );
    }
    assert_eq!(
        ws_status(web, &[("Origin", "https://evil.example")])
            .await
            .0,
        403,
        "cross-origin upgrade"
    );
    // A page elsewhere cannot publish through the visitor's browser either (text/plain is a
    // "simple request": no CORS preflight).
    let forged = reqwest::Client::new()
        .post(format!("http://{web}/events/ip/x"))
        .header("origin", "https://evil.example")
        .header("content-type", "text/plain")
        .body("forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 403, "cross-origin POST");
    // The connected subscriber still gets everything (and not the forged post).
    for i in 0..10 {
        assert_eq!(curl_post(web, "ip/x", &format!("I{i}")), 202);
    }
    for i in 0..10 {
        let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
        assert_eq!(e.id(), format!("I{i}"));
    }
    let m = metrics(admin).await;
    assert_eq!(
        counter(
            &m,
            r#"meshgate_errors_total{adapter="websocket",kind="connection_limit_ip"}"#
        ),
        5,
        "{m}"
    );
    assert_eq!(
        counter(
            &m,
            r#"meshgate_errors_total{adapter="websocket",kind="forbidden_origin"}"#
        ),
        1,
        "{m}"
    );
    assert_eq!(
        counter(
            &m,
            r#"meshgate_errors_total{adapter="http",kind="forbidden_origin"}"#
        ),
        1,
        "{m}"
    );
    // A slot is given back when a connection closes.
    drop((second, third));
    let d = Deadline::after(Duration::from_secs(5));
    while ws_status(web, &[]).await.0 != 101 {
        assert!(!d.passed(), "per-address slot never given back");
        d.pause().await;
    }
}

/// F11 for MQTT over WebSocket, which shares the web listener: a page of another origin gets
/// 403 before the upgrade (counted under adapter="mqtt"); a client without Origin connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_mqtt_over_websocket_is_refused() {
    let gw = gateway(&[
        ("MESHGATE__MQTT__ENABLED", "true"),
        ("MESHGATE__MQTT__LISTEN", "127.0.0.1:0"),
    ]);
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    let upgrade = |origin: Option<&str>| {
        let mut req = format!("ws://{web}/mqtt").into_client_request().unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("Origin", o.parse().unwrap());
        }
        req
    };
    match tokio_tungstenite::connect_async(upgrade(Some("https://evil.example"))).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        other => panic!("expected 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    let (_mqtt_ws, resp) = tokio_tungstenite::connect_async(upgrade(None))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 101, "no Origin: not a browser");
    let m = metrics(admin).await;
    assert_eq!(
        counter(
            &m,
            r#"meshgate_errors_total{adapter="mqtt",kind="forbidden_origin"}"#
        ),
        1,
        "{m}"
    );
}

/// A request head over `http.max_header_size` (64 KiB) gets 431 and is counted; hyper's own
/// limit (~400 KiB per connection) no longer applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_gets_431() {
    let gw = gateway(&[]);
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    let mut s = TcpStream::connect(web).await.unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    // The server may stop reading (and close) before all of it is written.
    let _ = s.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or_default();
    assert!(text.starts_with("HTTP/1.1 431"), "{status_line:?}");
    let m = metrics(admin).await;
    assert_eq!(
        counter(
            &m,
            r#"meshgate_errors_total{adapter="http",kind="header_too_large"}"#
        ),
        1,
        "{m}"
    );
    // A head under the limit is served.
    let mut s = TcpStream::connect(web).await.unwrap();
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(32 * 1024)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// A body trickled byte by byte (the body half of slowloris) gets 408 at
/// `http.body_read_timeout`, counted `kind="timeout"`, while curl is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_at_the_body_read_timeout() {
    let gw = gateway(&[("MESHGATE__HTTP__BODY_READ_TIMEOUT", "1500ms")]);
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    let mut ws = ws_connect(web, &["body/#"]).await;
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(
        b"POST /events/body/x HTTP/1.1\r\nHost: x\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\n",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        for _ in 0..100 {
            if s.write_all(b"x").await.is_err() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                n = s.read(&mut buf) => match n {
                    Ok(n) if n > 0 => {
                        answer.extend_from_slice(&buf[..n]);
                        break;
                    }
                    _ => break,
                },
            }
        }
        (answer, started.elapsed())
    });
    assert_eq!(curl_post(web, "body/y", "T1"), 202, "served meanwhile");
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5))
            .await
            .unwrap()
            .id(),
        "T1"
    );
    let (answer, took) = trickle.await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(text.contains("http.body_read_timeout"), "{text:?}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "408 after {took:?}"
    );
    let m = metrics(admin).await;
    assert_eq!(
        counter(
            &m,
            r#"meshgate_errors_total{adapter="http",kind="timeout"}"#
        ),
        1,
        "{m}"
    );
}

/// Sends `request` on a fresh connection and reads the reply until the server closes.
async fn raw_reply(web: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(web).await.unwrap();
    // The server may answer (and close) before all of a large head is written.
    let _ = s.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Issue 19 item 7: every refusal of the web listener says why in an RFC 9457 body and is
/// counted — the router's 404 and 405, and the 400, 414 and 431 hyper answers on its own
/// (bodyless before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_web_refusal_has_a_problem_body_and_a_count() {
    // A head limit above hyper's request-target limit (65,534 bytes), so that 414 can happen.
    let gw = gateway(&[("MESHGATE__HTTP__MAX_HEADER_SIZE", "131072")]);
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    let long_target = format!("/events/{}", "a".repeat(70_000));
    let big_header = "b".repeat(140 * 1024);
    let cases: [(String, &str, &str, &str); 5] = [
        (
            "GET /nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned(),
            "404",
            "nothing is served at /nothing-here",
            "not_found",
        ),
        (
            "DELETE /events/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned(),
            "405",
            "DELETE is not allowed here",
            "method_not_allowed",
        ),
        (
            format!("POST {long_target} HTTP/1.1\r\nHost: x\r\n\r\n"),
            "414",
            "request target is over",
            "uri_too_long",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big_header}\r\n\r\n"),
            "431",
            "over 131072 bytes (http.max_header_size)",
            "header_too_large",
        ),
        (
            "GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n".to_owned(),
            "400",
            "not valid HTTP/1.1",
            "bad_request",
        ),
    ];
    for (request, status, detail, kind) in &cases {
        let reply = raw_reply(web, request.as_bytes()).await;
        let head_end = reply.find("\r\n\r\n").unwrap_or(reply.len());
        let (head, body) = reply.split_at(head_end);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{kind}: {:?}",
            head.lines().next()
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{kind}: {head}"
        );
        assert!(body.contains(detail), "{kind}: {body}");
        assert!(
            body.contains(&format!("\"status\":{status}")),
            "{kind}: {body}"
        );
    }
    let m = metrics(admin).await;
    for (_, _, _, kind) in &cases {
        let series = format!("meshgate_errors_total{{adapter=\"http\",kind=\"{kind}\"}}");
        assert_eq!(counter(&m, &series), 1, "{series}\n{m}");
    }
    // The 405 keeps axum's Allow header.
    let reply = raw_reply(
        web,
        b"GET /events/a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        reply.to_ascii_lowercase().contains("\r\nallow: post"),
        "{reply}"
    );
}

/// Issue 19 item 7: `meshgate_connections{adapter="http"}` counts the web listener's open
/// connections (it was reported to read 0 always).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_connection_gauge_counts_open_connections() {
    let gw = gateway(&[]);
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    let series = r#"meshgate_connections{adapter="http"}"#;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(web).await.unwrap();
        s.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 404"));
        open.push(s);
    }
    let m = metrics(admin).await;
    assert_eq!(counter(&m, series), 3, "{m}");
    drop(open);
    let d = Deadline::after(Duration::from_secs(5));
    loop {
        let m = metrics(admin).await;
        if counter(&m, series) == 0 && m.contains(series) {
            break;
        }
        assert!(!d.passed(), "the gauge did not go back to 0:\n{m}");
        d.pause().await;
    }
}
