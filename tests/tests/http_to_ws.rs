//! curl (a client no one here wrote) posts CloudEvents in every HTTP content mode; a WebSocket
//! subscriber receives them with every attribute intact, extension types included.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::process::Command;
use std::time::Duration;

use meshgate_core::{Data, ExtensionValue};
use meshgate_tests::{next_event, test_config, ws_connect};

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed (apt-get install -y curl)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_content_mode_arrives_intact() {
    let gw = meshgate::start(test_config()).await.unwrap();
    let addr = gw.web_addr.unwrap();
    let mut ws = ws_connect(addr, &["sensors/#"]).await;
    let url = |topic: &str| format!("http://{addr}/events/{topic}");

    // Binary mode: percent-encoded header, extensions arrive as strings (string-only binding).
    let (code, body) = curl(&[
        "-H",
        "ce-specversion: 1.0",
        "-H",
        "ce-id: B1",
        "-H",
        "ce-source: https://ex.com/a?b=c&d=e#f",
        "-H",
        "ce-type: com.example.reading",
        "-H",
        "ce-subject: Euro%20%E2%82%AC%20%F0%9F%98%80",
        "-H",
        "ce-time: 2026-11-22T10:00:00.5+01:00",
        "-H",
        "ce-count: 5",
        "-H",
        "content-type: application/json",
        "--data-binary",
        r#"{"t":21.5}"#,
        &url("sensors/1/temp"),
    ]);
    assert_eq!(code, 202, "{body}");
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.id(), "B1");
    assert_eq!(e.source(), "https://ex.com/a?b=c&d=e#f");
    assert_eq!(e.subject(), Some("Euro € 😀"));
    assert_eq!(e.time(), Some("2026-11-22T10:00:00.5+01:00"));
    assert_eq!(
        e.extension("count"),
        Some(&ExtensionValue::String("5".into()))
    );
    assert_eq!(e.datacontenttype(), Some("application/json"));
    assert_eq!(e.data().unwrap().to_bytes(), r#"{"t":21.5}"#.as_bytes());

    // Structured mode: Integer and Boolean extensions keep their JSON types.
    let structured = r#"{"specversion":"1.0","id":"S1","source":"/dev/9","type":"com.example.reading","comexampleothervalue":5,"flag":true,"dataschema":"https://ex.com/s.json","datacontenttype":"application/xml","data":"<t>21</t>"}"#;
    let (code, body) = curl(&[
        "-H",
        "content-type: Application/CloudEvents+JSON; charset=utf-8",
        "--data-binary",
        structured,
        &url("sensors/9"),
    ]);
    assert_eq!(code, 202, "{body}");
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.id(), "S1");
    assert_eq!(
        e.extension("comexampleothervalue"),
        Some(&ExtensionValue::Integer(5))
    );
    assert_eq!(e.extension("flag"), Some(&ExtensionValue::Boolean(true)));
    assert_eq!(e.dataschema(), Some("https://ex.com/s.json"));
    assert_eq!(e.data(), Some(&Data::Text("<t>21</t>".into())));

    // Batch mode: both events, in order.
    let batch = r#"[{"specversion":"1.0","id":"K1","source":"/b","type":"t","n":1},{"specversion":"1.0","id":"K2","source":"/b","type":"t","n":2}]"#;
    let (code, body) = curl(&[
        "-H",
        "content-type: application/cloudevents-batch+json",
        "--data-binary",
        batch,
        &url("sensors/batch"),
    ]);
    assert_eq!(code, 202, "{body}");
    for (id, n) in [("K1", 1), ("K2", 2)] {
        let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
        assert_eq!(e.id(), id);
        assert_eq!(e.extension("n"), Some(&ExtensionValue::Integer(n)));
    }

    // A plain body is wrapped: generated id, configured source/type, topic as subject.
    let (code, body) = curl(&[
        "-H",
        "content-type: text/plain",
        "--data-binary",
        "hello",
        &url("sensors/plain"),
    ]);
    assert_eq!(code, 202, "{body}");
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.subject(), Some("sensors/plain"));
    assert_eq!(e.source(), "/meshgate/http");
    assert_eq!(e.ty(), "io.meshgate.http.message");
    assert!(
        body.contains(e.id()),
        "the reply names the generated id: {body}"
    );
    assert_eq!(e.data().unwrap().to_bytes(), "hello".as_bytes());

    // Bad events get a clear reply and nothing is delivered.
    let (code, body) = curl(&[
        "-H",
        "ce-specversion: 1.0",
        "-H",
        "ce-id: X",
        "-H",
        "ce-source: /s",
        "-H",
        "ce-type: t",
        "-H",
        "ce-my_ext: v",
        "--data-binary",
        "x",
        &url("sensors/bad"),
    ]);
    assert_eq!(code, 400);
    assert!(body.contains("my_ext"), "{body}");
    let (code, _) = curl(&[
        "-H",
        "content-type: application/cloudevents+avro",
        "--data-binary",
        "x",
        &url("sensors/bad"),
    ]);
    assert_eq!(code, 415);
    // The next event through is the next good one.
    let (code, _) = curl(&["--data-binary", "after", &url("sensors/after")]);
    assert_eq!(code, 202);
    let e = next_event(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.subject(), Some("sensors/after"));
    gw.shutdown().await;
}

/// Issue 19 item 6: a WebSocket client that reads, but pauses for half a second while a burst
/// arrives, keeps its connection and receives every event. 5,000 events of 2 KiB (10 MB) in
/// five HTTP batches, as fast as the gateway takes them: far more than the 256 events the
/// outbound queue used to hold, within its byte budget (`websocket.outbound_queue_bytes`,
/// 16 MiB by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_pauses_survives_a_burst() {
    const BATCHES: usize = 5;
    const PER_BATCH: usize = 1_000;
    const EVENTS: usize = BATCHES * PER_BATCH;
    let mut config = test_config();
    config.http.max_body_size = 4 << 20;
    config.http.max_batch_events = PER_BATCH;
    let gw = meshgate::start(config).await.unwrap();
    let addr = gw.web_addr.unwrap();
    let mut ws = ws_connect(addr, &["burst/#"]).await;
    let reader = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(EVENTS);
        while ids.len() < EVENTS {
            // A browser's pause (garbage collection, a busy tab) while the burst arrives.
            if ids.len() == 100 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            match next_event(&mut ws, Duration::from_secs(30)).await {
                Ok(e) => ids.push(e.id().to_owned()),
                Err(code) => panic!("closed with {code:?} after {} events", ids.len()),
            }
        }
        ids
    });
    let data = format!("\"{}\"", "x".repeat(2048));
    let client = reqwest::Client::new();
    for b in 0..BATCHES {
        let events: Vec<String> = (0..PER_BATCH)
            .map(|i| {
                format!(
                    r#"{{"specversion":"1.0","id":"B{}","source":"/burst","type":"t","data":{data}}}"#,
                    b * PER_BATCH + i
                )
            })
            .collect();
        let r = client
            .post(format!("http://{addr}/events/burst/{b}"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(format!("[{}]", events.join(",")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    }
    let ids = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reader finished")
        .unwrap();
    let expected: Vec<String> = (0..EVENTS).map(|i| format!("B{i}")).collect();
    assert!(ids == expected, "every event, in order");
    let metrics = gw.registry.render();
    assert!(
        !metrics.contains("kind=\"slow_consumer_disconnected\"} 1"),
        "{metrics}"
    );
}
