//! Triggers end to end (issue 21): events posted to the gateway over HTTP, pushed by a trigger
//! to a real HTTP subscriber started by the test (`meshgate_tests::sink`), which answers from a
//! script: 2xx, 4xx, 429 with Retry-After, 5xx, a hang, a reply CloudEvent. Memory backbone
//! here; the JetStream and NATS tests are in `triggers_nats.rs`.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use meshgate_tests::sink::{Answer, Sink};
use meshgate_tests::triggers::{admin, trigger};
use meshgate_tests::{Deadline, bus_subscribe, next_delivery, start_gateway, test_config};
use serde_json::{Value, json};

async fn post(web: std::net::SocketAddr, topic: &str, id: &str, ty: &str) {
    let status = reqwest::Client::new()
        .post(format!("http://{web}/events/{topic}"))
        .header("content-type", "application/cloudevents+json")
        .body(format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/t","type":"{ty}","subject":"s-{id}","datacontenttype":"application/json","data":{{"n":1}}}}"#
        ))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 202);
}

/// The value of the first sample of `name` whose labels include every one of `labels`.
fn metric(gw: &meshgate::RunningGateway, name: &str, labels: &[&str]) -> f64 {
    let text = gw.registry.render();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_metric(gw: &meshgate::RunningGateway, name: &str, labels: &[&str], at_least: f64) {
    let d = Deadline::after(Duration::from_secs(10));
    while metric(gw, name, labels) < at_least {
        assert!(
            !d.passed(),
            "{name}{labels:?} stayed below {at_least}: {}",
            metric(gw, name, labels)
        );
        d.pause().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_pick_the_events_and_the_subscriber_sees_only_the_original_event() {
    let sink = Sink::start().await;
    let mut c = test_config();
    c.triggers = vec![
        // Binary mode (the default), exact + CESQL.
        trigger(json!({
            "name": "binary", "topic": "orders/#",
            "filters": [{"exact": {"type": "com.example.order"}}, {"cesql": "subject LIKE 's-b%'"}],
            "subscriber": {"uri": sink.url("/binary")}
        })),
        // Structured mode, legacy attribute filter, nested any/not.
        trigger(json!({
            "name": "structured",
            "filter": {"attributes": {"source": "/t"}},
            "filters": [{"any": [{"prefix": {"type": "com.x."}}, {"not": {"suffix": {"type": "order"}}}]}],
            "subscriber": {"uri": sink.url("/structured"), "contentMode": "structured"}
        })),
    ];
    let gw = start_gateway(c).await;
    let web = gw.web_addr.unwrap();
    post(web, "orders/eu", "b1", "com.example.order").await; // binary: yes; structured: no
    post(web, "orders/eu", "a2", "com.example.order").await; // subject s-a2: binary no
    post(web, "other/x", "b3", "com.example.order").await; // topic: binary no
    post(web, "other/x", "x4", "com.x.order").await; // structured: yes (prefix)
    post(web, "other/x", "y5", "com.y.thing").await; // structured: yes (not suffix)
    let posts = sink.wait_posts(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let posts_now = sink.posts();
    assert_eq!(posts_now.len(), 3, "exactly three deliveries: {posts:#?}");
    let binary: Vec<_> = posts_now
        .iter()
        .filter(|p| p.header("ce-id").is_some())
        .collect();
    assert_eq!(binary.len(), 1);
    let b = binary[0];
    assert_eq!(b.header("ce-id"), Some("b1"));
    assert_eq!(b.header("ce-type"), Some("com.example.order"));
    assert_eq!(b.header("ce-specversion"), Some("1.0"));
    assert_eq!(b.header("content-type"), Some("application/json"));
    assert_eq!(&b.body[..], br#"{"n":1}"#);
    // Nothing of meshgate's own on the wire: only the event's attributes.
    for (name, _) in &b.headers {
        let n = name.as_str();
        assert!(!n.contains("meshgate"), "{n}");
        if let Some(attr) = n.strip_prefix("ce-") {
            assert!(
                ["id", "source", "type", "specversion", "subject"].contains(&attr),
                "unexpected attribute {attr}"
            );
        }
    }
    let mut structured: Vec<String> = posts_now
        .iter()
        .filter(|p| p.header("ce-id").is_none())
        .map(|p| {
            assert_eq!(
                p.header("content-type"),
                Some("application/cloudevents+json; charset=utf-8")
            );
            let v: Value = serde_json::from_slice(&p.body).unwrap();
            assert!(!p.body.windows(8).any(|w| w == b"meshgate"), "{v}");
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    structured.sort();
    assert_eq!(structured, ["x4", "y5"]);
    assert_eq!(
        metric(
            &gw,
            "meshgate_trigger_events_total",
            &["trigger=\"binary\"", "outcome=\"filtered\""]
        ),
        1.0,
        "of the three events on orders/#, one fails the filter"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_the_dead_letter_sink_gets_the_error_extensions() {
    let sink = Sink::start().await;
    let dead = Sink::start().await;
    sink.script([
        Answer::status(500).body("boom 1"),
        Answer::status(503).body("boom 2"),
        Answer::status(502).body("boom 3"),
    ]);
    let mut c = test_config();
    c.triggers = vec![trigger(json!({
        "name": "t", "subscriber": {"uri": sink.url("/hook")},
        "delivery": {"retry": 2, "backoffPolicy": "linear", "backoffDelay": "PT0.2S",
                     "deadLetterSink": {"uri": dead.url("/dead")}}
    }))];
    let gw = start_gateway(c).await;
    post(gw.web_addr.unwrap(), "a/b", "e1", "com.t").await;
    let d = dead.wait_posts(1, Duration::from_secs(10)).await;
    let posts = sink.posts();
    assert_eq!(posts.len(), 3, "one attempt and two retries");
    // Linear: the k-th retry waits 0.2 s × k.
    let gap1 = posts[1].at - posts[0].at;
    let gap2 = posts[2].at - posts[1].at;
    assert!(
        gap1 >= Duration::from_millis(200) && gap1 < Duration::from_millis(1500),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(400) && gap2 < Duration::from_millis(1800),
        "{gap2:?}"
    );
    let dl = &d[0];
    assert_eq!(dl.header("ce-id"), Some("e1"));
    assert_eq!(
        dl.header("ce-knativeerrordest"),
        Some(sink.url("/hook").as_str())
    );
    assert_eq!(dl.header("ce-knativeerrorcode"), Some("502"));
    let data = base64::engine::general_purpose::STANDARD
        .decode(dl.header("ce-knativeerrordata").unwrap())
        .unwrap();
    assert_eq!(data, b"boom 3");
    assert_eq!(&dl.body[..], br#"{"n":1}"#);
    wait_metric(
        &gw,
        "meshgate_trigger_events_total",
        &["outcome=\"dead_lettered\""],
        1.0,
    )
    .await;
    assert_eq!(
        metric(&gw, "meshgate_trigger_retries_total", &["trigger=\"t\""]),
        2.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_not_retried_and_goes_to_a_dead_letter_topic() {
    let sink = Sink::start().await;
    sink.script([Answer::status(400).body("bad event")]);
    let mut c = test_config();
    c.triggers = vec![trigger(json!({
        "name": "t", "topic": "in/#", "subscriber": {"uri": sink.url("/")},
        "delivery": {"retry": 5, "backoffDelay": "PT0.05S", "deadLetterSink": {"topic": "dead/t"}}
    }))];
    let gw = start_gateway(c).await;
    let mut dead = bus_subscribe(&gw, "dead/#").await;
    post(gw.web_addr.unwrap(), "in/x", "e1", "com.t").await;
    let d = next_delivery(&mut dead, Duration::from_secs(10), "a dead letter").await;
    assert_eq!(d.topic().as_str(), "dead/t");
    let e = d.event();
    assert_eq!(e.id(), "e1");
    assert_eq!(
        e.extension("knativeerrorcode"),
        Some(&meshgate_core::ExtensionValue::Integer(400))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.posts().len(), 1, "a 400 is not retried");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_up_to_retry_after_max() {
    let sink = Sink::start().await;
    sink.script([
        Answer::status(429).header("retry-after", "1"),
        Answer::status(503).header("retry-after", "3600"),
        Answer::status(200),
    ]);
    let mut c = test_config();
    c.triggers = vec![trigger(json!({
        "name": "t", "subscriber": {"uri": sink.url("/")},
        "delivery": {"retry": 3, "backoffDelay": "PT0.01S", "retryAfterMax": "PT0.5S"}
    }))];
    let gw = start_gateway(c).await;
    post(gw.web_addr.unwrap(), "a", "e1", "com.t").await;
    let posts = sink.wait_posts(3, Duration::from_secs(10)).await;
    let gap1 = posts[1].at - posts[0].at;
    let gap2 = posts[2].at - posts[1].at;
    // Retry-After: 1 is longer than the backoff and than retryAfterMax: cut to 0.5 s; an hour
    // is cut to 0.5 s too.
    assert!(
        gap1 >= Duration::from_millis(500) && gap1 < Duration::from_millis(2500),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(500) && gap2 < Duration::from_millis(2500),
        "{gap2:?}"
    );
    wait_metric(
        &gw,
        "meshgate_trigger_events_total",
        &["outcome=\"delivered\""],
        1.0,
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_subscriber_times_out_and_a_closed_one_is_retried() {
    let sink = Sink::start().await;
    sink.script([
        Answer::status(200).hang(Duration::from_secs(5)),
        Answer::status(204),
    ]);
    let mut c = test_config();
    // The second trigger's subscriber is a port nobody listens on: connection refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    c.triggers = vec![
        trigger(json!({
            "name": "hang", "subscriber": {"uri": sink.url("/")},
            "delivery": {"retry": 1, "timeout": "PT0.3S", "backoffDelay": "PT0.01S"}
        })),
        trigger(json!({
            "name": "closed", "subscriber": {"uri": format!("http://{closed}/")},
            "delivery": {"retry": 2, "backoffDelay": "PT0.01S"}
        })),
    ];
    let gw = start_gateway(c).await;
    post(gw.web_addr.unwrap(), "a", "e1", "com.t").await;
    let posts = sink.wait_posts(2, Duration::from_secs(10)).await;
    let gap = posts[1].at - posts[0].at;
    assert!(
        gap >= Duration::from_millis(300) && gap < Duration::from_secs(3),
        "{gap:?}"
    );
    wait_metric(
        &gw,
        "meshgate_trigger_events_total",
        &["trigger=\"hang\"", "outcome=\"delivered\""],
        1.0,
    )
    .await;
    wait_metric(
        &gw,
        "meshgate_trigger_events_total",
        &["trigger=\"closed\"", "outcome=\"failed\""],
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &gw,
            "meshgate_trigger_retries_total",
            &["trigger=\"closed\""]
        ),
        2.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_cloudevent_is_published_to_the_reply_topic() {
    let sink = Sink::start().await;
    sink.script([
        Answer::status(200)
            .header("ce-specversion", "1.0")
            .header("ce-id", "r1")
            .header("ce-source", "/svc")
            .header("ce-type", "com.example.reply")
            .header("content-type", "text/plain")
            .body("pong"),
        // Not a CloudEvent: nothing is published.
        Answer::status(200)
            .header("content-type", "application/json")
            .body("{}"),
    ]);
    let mut c = test_config();
    c.triggers = vec![trigger(json!({
        "name": "t", "topic": "ping/#", "subscriber": {"uri": sink.url("/")},
        "reply": {"topic": "replies/t"}
    }))];
    let gw = start_gateway(c).await;
    let mut replies = bus_subscribe(&gw, "replies/#").await;
    post(gw.web_addr.unwrap(), "ping/1", "e1", "com.t").await;
    let r = next_delivery(&mut replies, Duration::from_secs(10), "a reply").await;
    assert_eq!(r.event().id(), "r1");
    assert_eq!(r.event().ty(), "com.example.reply");
    assert_eq!(r.event().data().unwrap().as_slice(), b"pong");
    assert_eq!(sink.posts()[0].header("prefer"), Some("reply"));
    post(gw.web_addr.unwrap(), "ping/1", "e2", "com.t").await;
    sink.wait_posts(2, Duration::from_secs(10)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), replies.next())
            .await
            .is_err(),
        "an answer that is not a CloudEvent publishes nothing"
    );
    assert_eq!(
        metric(
            &gw,
            "meshgate_trigger_replies_total",
            &["outcome=\"published\""]
        ),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_handshake_comes_before_the_first_delivery() {
    let sink = Sink::start().await;
    sink.script_options([
        Answer::status(403),
        Answer::status(200).header("webhook-allowed-origin", "meshgate"),
    ]);
    let mut c = test_config();
    c.triggers = vec![trigger(json!({
        "name": "t",
        "subscriber": {"uri": sink.url("/"), "webhookValidation": true,
                       "auth": {"bearer": "s3cret-token"}},
        "delivery": {"retry": 3, "backoffDelay": "PT0.05S"}
    }))];
    let gw = start_gateway(c).await;
    post(gw.web_addr.unwrap(), "a", "e1", "com.t").await;
    post(gw.web_addr.unwrap(), "a", "e2", "com.t").await;
    sink.wait_posts(2, Duration::from_secs(10)).await;
    let seen = sink.seen();
    let options: Vec<_> = seen.iter().filter(|s| s.method == "OPTIONS").collect();
    assert_eq!(
        options.len(),
        2,
        "refused once, allowed once, then never asked again"
    );
    assert_eq!(
        options[0].header("webhook-request-origin"),
        Some("meshgate")
    );
    assert_eq!(
        seen[0].method, "OPTIONS",
        "nothing is POSTed before the handshake"
    );
    assert_eq!(seen[1].method, "OPTIONS");
    for p in sink.posts() {
        assert_eq!(p.header("authorization"), Some("Bearer s3cret-token"));
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_subscriber_costs_at_most_max_pending_bytes() {
    // A subscriber that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    let accept = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            h.lock().await.push(s);
        }
    });
    let mut c = test_config();
    c.triggers = vec![trigger(json!({
        "name": "dead", "subscriber": {"uri": format!("http://{addr}/"), "maxConcurrency": 2},
        "delivery": {"retry": 0, "timeout": "PT30S", "maxPendingBytes": 8192}
    }))];
    c.gateway.shutdown_grace = Duration::from_secs(1);
    let gw = start_gateway(c).await;
    let web = gw.web_addr.unwrap();
    for i in 0..200 {
        post(web, "a", &format!("e{i}"), "com.t").await;
    }
    wait_metric(
        &gw,
        "meshgate_trigger_events_total",
        &["outcome=\"overflow\""],
        1.0,
    )
    .await;
    let pending = metric(&gw, "meshgate_trigger_pending_bytes", &["trigger=\"dead\""]);
    assert!(pending > 0.0 && pending <= 8192.0, "{pending}");
    let overflow = metric(
        &gw,
        "meshgate_trigger_events_total",
        &["outcome=\"overflow\""],
    );
    assert!(
        overflow >= 100.0,
        "most of 200 events overflow an 8 KiB queue: {overflow}"
    );
    assert_eq!(
        metric(&gw, "meshgate_trigger_in_flight", &["trigger=\"dead\""]),
        2.0
    );
    // Publishers never waited: the posts above all got their 202 (asserted in `post`); and a
    // failing subscriber does not make the gateway unready.
    let ready = reqwest::get(format!("http://{}/readyz", gw.admin_addr.unwrap()))
        .await
        .unwrap()
        .status();
    assert_eq!(ready, 200);
    let (_, _) = (held, accept);
    let report = gw.shutdown().await;
    assert!(
        !report.clean,
        "deliveries to a dead subscriber are abandoned at the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_creates_replaces_lists_and_deletes_triggers() {
    use reqwest::Method;
    let sink = Sink::start().await;
    let token = "0123456789abcdef-token";
    let mut c = test_config();
    c.admin.api_token = Some(token.into());
    c.triggers = vec![trigger(
        json!({"name": "fixed", "topic": "fixed/#", "subscriber": {"uri": sink.url("/fixed")}}),
    )];
    let gw = start_gateway(c).await;
    let web = gw.web_addr.unwrap();
    let doc = json!({"topic": "api/#", "subscriber": {"uri": sink.url("/api"), "auth": {"bearer": "hidden-secret"}},
                     "filters": [{"exact": {"type": "com.yes"}}]});
    // Credentials first.
    let (s, _) = admin(Method::PUT, &gw, "/triggers/t1", None, Some(doc.clone())).await;
    assert_eq!(s, 401);
    let (s, _) = admin(
        Method::PUT,
        &gw,
        "/triggers/t1",
        Some("wrong-token-wrong-token"),
        Some(doc.clone()),
    )
    .await;
    assert_eq!(s, 401);
    // A bad document: every problem with its path.
    let (s, body) = admin(
        Method::PUT,
        &gw,
        "/triggers/t1",
        Some(token),
        Some(json!({"subscriber": {"uri": "ftp://x"}, "delivery": {"timeout": "10s"}})),
    )
    .await;
    assert_eq!(s, 400);
    let paths: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["subscriber.uri", "delivery.timeout"], "{body}");
    let (s, _) = admin(
        Method::PUT,
        &gw,
        "/triggers/bad%20name",
        Some(token),
        Some(doc.clone()),
    )
    .await;
    assert_eq!(s, 400);
    // Created, effective at once.
    let (s, body) = admin(
        Method::PUT,
        &gw,
        "/triggers/t1",
        Some(token),
        Some(doc.clone()),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(
        body["trigger"]["subscriber"]["auth"]["bearer"],
        "<redacted>"
    );
    post(web, "api/1", "e1", "com.yes").await;
    post(web, "api/1", "e2", "com.no").await;
    sink.wait_posts(1, Duration::from_secs(10)).await;
    // The same document again changes nothing; a new one replaces it.
    let (s, _) = admin(
        Method::PUT,
        &gw,
        "/triggers/t1",
        Some(token),
        Some(doc.clone()),
    )
    .await;
    assert_eq!(s, 200);
    let mut doc2 = doc.clone();
    doc2["filters"] = json!([{"exact": {"type": "com.no"}}]);
    let (s, _) = admin(Method::PUT, &gw, "/triggers/t1", Some(token), Some(doc2)).await;
    assert_eq!(s, 200);
    // The old subscription is gone once the new one takes events: poll with fresh events.
    let d = Deadline::after(Duration::from_secs(10));
    let mut i = 0;
    loop {
        i += 1;
        post(web, "api/1", &format!("n{i}"), "com.no").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if sink
            .posts()
            .iter()
            .any(|p| p.header("ce-type") == Some("com.no"))
        {
            break;
        }
        assert!(!d.passed(), "the replaced trigger never delivered");
    }
    let (s, body) = admin(Method::GET, &gw, "/triggers", Some(token), None).await;
    assert_eq!(s, 200);
    let names: Vec<(&str, &str)> = body["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["source"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [("fixed", "config"), ("t1", "api")]);
    assert!(!body.to_string().contains("hidden-secret"));
    let (s, body) = admin(Method::GET, &gw, "/triggers/t1", Some(token), None).await;
    assert_eq!((s, body["trigger"]["topic"].as_str()), (200, Some("api/#")));
    // Config-file triggers are read-only here.
    let (s, _) = admin(Method::DELETE, &gw, "/triggers/fixed", Some(token), None).await;
    assert_eq!(s, 409);
    let (s, _) = admin(
        Method::PUT,
        &gw,
        "/triggers/fixed",
        Some(token),
        Some(doc.clone()),
    )
    .await;
    assert_eq!(s, 409);
    // Deleted: no more deliveries.
    let (s, _) = admin(Method::DELETE, &gw, "/triggers/t1", Some(token), None).await;
    assert_eq!(s, 204);
    let (s, _) = admin(Method::DELETE, &gw, "/triggers/t1", Some(token), None).await;
    assert_eq!(s, 404);
    let (s, _) = admin(Method::GET, &gw, "/triggers/t1", Some(token), None).await;
    assert_eq!(s, 404);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = sink.posts().len();
    post(web, "api/1", "late", "com.no").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.posts().len(),
        before,
        "a deleted trigger delivers nothing"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_is_off() {
    let gw = start_gateway(test_config()).await;
    let (s, body) = admin(
        reqwest::Method::GET,
        &gw,
        "/triggers",
        Some("anything-anything"),
        None,
    )
    .await;
    assert_eq!(s, 403);
    assert!(
        body["detail"].as_str().unwrap().contains("admin.api_token"),
        "{body}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn among_many_triggers_each_event_reaches_exactly_the_ones_that_match() {
    let sink = Sink::start().await;
    let mut c = test_config();
    let n = 2000;
    c.triggers = (0..n)
        .map(|i| {
            trigger(json!({
                "name": format!("t{i}"), "topic": "many/#",
                "filters": [{"exact": {"type": format!("com.t{i}")}}],
                "subscriber": {"uri": sink.url(&format!("/t{i}"))}
            }))
        })
        .chain([
            trigger(json!({"name": "prefix", "topic": "many/#",
                "filters": [{"prefix": {"type": "com.t1"}}], "subscriber": {"uri": sink.url("/prefix")}})),
            trigger(json!({"name": "unindexed", "topic": "many/#",
                "filters": [{"suffix": {"type": "99"}}], "subscriber": {"uri": sink.url("/suffix")}})),
            trigger(json!({"name": "elsewhere", "topic": "other/#",
                "filters": [{"exact": {"type": "com.t7"}}], "subscriber": {"uri": sink.url("/elsewhere")}})),
        ])
        .collect();
    let gw = start_gateway(c).await;
    let web = gw.web_addr.unwrap();
    for (id, ty) in [
        ("a", "com.t7"),
        ("b", "com.t1999"),
        ("c", "com.none"),
        ("d", "com.t12"),
    ] {
        post(web, "many/x", id, ty).await;
    }
    // com.t7 → t7; com.t1999 → t1999, prefix, unindexed; com.t12 → t12, prefix.
    let expected = [
        "/prefix b",
        "/prefix d",
        "/suffix b",
        "/t12 d",
        "/t1999 b",
        "/t7 a",
    ];
    sink.wait_posts(expected.len(), Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got: Vec<String> = sink
        .posts()
        .iter()
        .map(|p| format!("{} {}", p.path, p.header("ce-id").unwrap()))
        .collect();
    got.sort();
    assert_eq!(got, expected);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_subscriber_is_trusted_through_the_trigger_ca_file() {
    let dir = std::env::temp_dir().join(format!("meshgate-trigger-tls-{}", std::process::id()));
    let (ca, cert, key) = meshgate_tests::certs::private_ca(&dir);
    let sink = Sink::start().await;
    let port = meshgate_tests::certs::tls_front(&cert, &key, &sink.addr.to_string()).await;
    let mut c = test_config();
    c.triggers = vec![
        trigger(json!({
            "name": "trusted", "topic": "tls/a",
            "subscriber": {"uri": format!("https://127.0.0.1:{port}/a"), "caFile": ca.to_str().unwrap(),
                           "auth": {"basic": {"user": "u", "password": "p w"}}}
        })),
        // The system roots alone do not know the private CA: refused, not retried into success.
        trigger(json!({
            "name": "untrusted", "topic": "tls/b",
            "subscriber": {"uri": format!("https://127.0.0.1:{port}/b")},
            "delivery": {"retry": 1, "backoffDelay": "PT0.01S", "deadLetterSink": {"topic": "dead/tls"}}
        })),
    ];
    let gw = start_gateway(c).await;
    let mut dead = bus_subscribe(&gw, "dead/#").await;
    post(gw.web_addr.unwrap(), "tls/a", "e1", "com.t").await;
    post(gw.web_addr.unwrap(), "tls/b", "e2", "com.t").await;
    let posts = sink.wait_posts(1, Duration::from_secs(10)).await;
    assert_eq!(posts[0].path, "/a");
    assert_eq!(posts[0].header("authorization"), Some("Basic dTpwIHc="));
    let d = next_delivery(&mut dead, Duration::from_secs(10), "a dead letter").await;
    let Some(meshgate_core::ExtensionValue::String(data)) = d.event().extension("knativeerrordata")
    else {
        panic!("no knativeerrordata")
    };
    let why = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
    )
    .unwrap();
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    assert_eq!(
        d.event().extension("knativeerrorcode"),
        None,
        "no answer, no status"
    );
    assert_eq!(
        sink.posts().len(),
        1,
        "nothing reached the subscriber through the refused TLS"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_whose_body_is_late_is_delivered_once_and_a_202_reply_is_not_published() {
    let sink = Sink::start().await;
    sink.script([
        // The status in time, the body after the timeout: delivered, not retried.
        Answer::status(200)
            .header("ce-specversion", "1.0")
            .header("ce-id", "late")
            .header("ce-source", "/svc")
            .header("ce-type", "t")
            .body("x")
            .slow_body(Duration::from_secs(2)),
        // Knative: a 202 is never a reply.
        Answer::status(202)
            .header("ce-specversion", "1.0")
            .header("ce-id", "r202")
            .header("ce-source", "/svc")
            .header("ce-type", "t"),
    ]);
    let mut c = test_config();
    c.triggers = vec![trigger(json!({
        "name": "t", "subscriber": {"uri": sink.url("/")},
        "delivery": {"retry": 3, "timeout": "PT0.5S", "backoffDelay": "PT0.01S"},
        "reply": {"topic": "replies/t"}
    }))];
    let gw = start_gateway(c).await;
    let mut replies = bus_subscribe(&gw, "replies/#").await;
    post(gw.web_addr.unwrap(), "a", "e1", "com.t").await;
    post(gw.web_addr.unwrap(), "a", "e2", "com.t").await;
    wait_metric(
        &gw,
        "meshgate_trigger_events_total",
        &["outcome=\"delivered\""],
        2.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ids: Vec<_> = sink
        .posts()
        .iter()
        .map(|p| p.header("ce-id").unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "each once: {ids:?}");
    assert_eq!(
        metric(&gw, "meshgate_trigger_retries_total", &["trigger=\"t\""]),
        0.0
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), replies.next())
            .await
            .is_err(),
        "neither the late reply nor the 202's is published"
    );
    assert_eq!(
        metric(
            &gw,
            "meshgate_trigger_replies_total",
            &["outcome=\"refused\""]
        ),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_takes_another_trigger_dead_letters() {
    let sink = Sink::start().await;
    sink.script([Answer::status(400)]);
    let mut c = test_config();
    c.triggers = vec![
        trigger(json!({
            "name": "first", "topic": "in/#", "subscriber": {"uri": sink.url("/first")},
            "delivery": {"retry": 0, "deadLetterSink": {"topic": "dead/first"}}
        })),
        trigger(json!({
            "name": "handler", "topic": "dead/#", "subscriber": {"uri": sink.url("/handler")}
        })),
    ];
    let gw = start_gateway(c).await;
    post(gw.web_addr.unwrap(), "in/x", "e1", "com.t").await;
    let posts = sink.wait_posts(2, Duration::from_secs(10)).await;
    assert_eq!(posts[1].path, "/handler");
    assert_eq!(posts[1].header("ce-knativeerrorcode"), Some("400"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_trigger_mid_retry_sends_the_event_to_the_new_subscriber() {
    let old = Sink::start().await;
    let new = Sink::start().await;
    old.script((0..10).map(|_| Answer::status(503)));
    let token = "0123456789abcdef-token";
    let mut c = test_config();
    c.admin.api_token = Some(token.into());
    let gw = start_gateway(c).await;
    let doc = |uri: String| {
        json!({"subscriber": {"uri": uri},
               "delivery": {"retry": 10, "backoffPolicy": "linear", "backoffDelay": "PT30S"}})
    };
    let (s, _) = admin(
        reqwest::Method::PUT,
        &gw,
        "/triggers/t",
        Some(token),
        Some(doc(old.url("/"))),
    )
    .await;
    assert_eq!(s, 201);
    post(gw.web_addr.unwrap(), "a", "e1", "com.t").await;
    old.wait_posts(1, Duration::from_secs(10)).await;
    // Now waiting 30 s for its first retry: the new subscriber gets it at once instead.
    let (s, _) = admin(
        reqwest::Method::PUT,
        &gw,
        "/triggers/t",
        Some(token),
        Some(doc(new.url("/"))),
    )
    .await;
    assert_eq!(s, 200);
    let posts = new.wait_posts(1, Duration::from_secs(5)).await;
    assert_eq!(posts[0].header("ce-id"), Some("e1"));
    assert_eq!(
        old.posts().len(),
        1,
        "the old trigger made no more attempts"
    );
    assert!(gw.shutdown().await.clean);
}

/// Hostile admin API bodies: not JSON (400 naming it), over 64 KiB (413, read no further),
/// filters nested past the bound (400 naming where); the gateway goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_malformed_oversized_and_deep_documents() {
    let token = "0123456789abcdef-token";
    let mut c = test_config();
    c.admin.api_token = Some(token.into());
    let gw = start_gateway(c).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/triggers/t", gw.admin_addr.unwrap());
    let put = |body: String| {
        client
            .put(&url)
            .header("authorization", format!("Bearer {token}"))
            .body(body)
            .send()
    };
    let r = put("{\"subscriber\": ".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("not JSON"));
    let big = format!(
        r#"{{"subscriber": {{"uri": "http://127.0.0.1:9/"}}, "topic": "{}"}}"#,
        "a".repeat(70 * 1024)
    );
    assert_eq!(put(big).await.unwrap().status(), 413);
    let mut deep = json!({"exact": {"type": "x"}});
    for _ in 0..40 {
        deep = json!({"not": deep});
    }
    let doc = json!({"subscriber": {"uri": "http://127.0.0.1:9/"}, "filters": [deep]});
    let r = put(doc.to_string()).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["errors"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("filters[0]"),
        "{body}"
    );
    assert!(gw.triggers.list().is_empty());
    let (s, _) = admin(reqwest::Method::GET, &gw, "/triggers", Some(token), None).await;
    assert_eq!(s, 200, "still serving");
    gw.shutdown().await;
}
