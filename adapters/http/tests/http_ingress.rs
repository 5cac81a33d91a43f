//! The HTTP ingress adapter on a memory backbone, driven by reqwest: every reply code.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshgate_backbone::memory::MemoryBackbone;
use meshgate_backbone::testkit::TestKit;
use meshgate_config::{FullQueuePolicy, HttpConfig, MemoryBackboneConfig, WrapConfig};
use meshgate_core::{Authorizer, Backbone, Permissions, Subscription, TopicFilter, UserSpec};
use serde_json::Value;

fn http_config() -> HttpConfig {
    HttpConfig {
        enabled: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        events_path: "/events".into(),
        max_body_size: 128 * 1024,
        max_batch_events: 3,
        max_in_flight: 64,
        retry_after: Duration::from_secs(2),
        browser_page: false,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 10_000,
        max_header_size: 64 * 1024,
        allowed_origins: Vec::new(),
        body_read_timeout: Duration::from_secs(30),
        wrap: WrapConfig {
            source: "/meshgate/http".into(),
            event_type: "io.meshgate.http.message".into(),
        },
        tls: None,
    }
}

struct Harness {
    addr: SocketAddr,
    backbone: Arc<MemoryBackbone>,
    registry: meshgate_core::metrics::Registry,
}

async fn start_with(
    config: HttpConfig,
    authorizer: Authorizer,
    memory: MemoryBackboneConfig,
) -> Harness {
    let TestKit {
        ctx,
        backbone,
        registry,
    } = TestKit::on(authorizer, memory);
    let router = meshgate_http::router(
        std::sync::Arc::new(meshgate_core::live::Live::new(config)),
        &ctx,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Harness {
        addr,
        backbone,
        registry,
    }
}

fn memory() -> MemoryBackboneConfig {
    MemoryBackboneConfig {
        queue_capacity: 64,
        full_policy: FullQueuePolicy::Drop,
        block_timeout: Duration::from_secs(1),
    }
}

async fn start() -> Harness {
    start_with(http_config(), Authorizer::allow_all(), memory()).await
}

async fn subscribe(h: &Harness, filter: &str) -> Subscription {
    h.backbone
        .subscribe(TopicFilter::parse(filter).unwrap(), Default::default())
        .await
        .unwrap()
}

fn ce(builder: reqwest::RequestBuilder, id: &str) -> reqwest::RequestBuilder {
    builder
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/test")
        .header("ce-type", "com.example.t")
}

async fn problem(r: reqwest::Response, status: u16) -> String {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], status);
    v["detail"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn accepted_events_reach_the_backbone_on_the_path_topic() {
    let h = start().await;
    let mut sub = subscribe(&h, "a/#").await;
    let client = reqwest::Client::new();
    let r = ce(
        client.post(format!("http://{}/events/a/b%20c/%C3%BC", h.addr)),
        "A1",
    )
    .header("content-type", "text/plain")
    .body("hello")
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, serde_json::json!({"accepted": 1, "ids": ["A1"]}));
    let d = sub.next().await.unwrap();
    assert_eq!(d.event().id(), "A1");
    assert_eq!(d.topic().as_str(), "a/b c/ü", "levels percent-decoded");
}

#[tokio::test]
async fn topic_errors_are_400() {
    let h = start().await;
    let client = reqwest::Client::new();
    for path in [
        "/events",
        "/events/",
        "/events/a/%2B",
        "/events/%FF",
        "/events/a/b%2Fc",
    ] {
        let r = client
            .post(format!("http://{}{path}", h.addr))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    let r = client
        .get(format!("http://{}/events/a", h.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn bad_event_is_400_naming_the_attribute_and_nothing_is_published() {
    let h = start().await;
    let mut sub = subscribe(&h, "#").await;
    let client = reqwest::Client::new();
    let r = ce(client.post(format!("http://{}/events/t", h.addr)), "X")
        .header("ce-subject", "%C0%A0")
        .send()
        .await
        .unwrap();
    assert!(problem(r, 400).await.contains("ce-subject"));
    let r = client
        .post(format!("http://{}/events/t", h.addr))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"X","source":"/s","type":"t","count":2147483648}"#)
        .send()
        .await
        .unwrap();
    assert!(problem(r, 400).await.contains("`count`"));
    let r = client
        .post(format!("http://{}/events/t", h.addr))
        .header("content-type", "application/cloudevents+xml")
        .body("<x/>")
        .send()
        .await
        .unwrap();
    assert!(problem(r, 415).await.contains("xml"));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), sub.next())
            .await
            .is_err(),
        "nothing published"
    );
}

#[tokio::test]
async fn size_limits_413_and_the_64kib_minimum_passes() {
    let h = start().await;
    let mut sub = subscribe(&h, "#").await;
    let client = reqwest::Client::new();
    let r = ce(client.post(format!("http://{}/events/big", h.addr)), "B64")
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        sub.next().await.unwrap().event().data().unwrap().len(),
        64 * 1024
    );
    let r = ce(client.post(format!("http://{}/events/big", h.addr)), "B200")
        .body(vec![7u8; 200 * 1024])
        .send()
        .await
        .unwrap();
    assert!(problem(r, 413).await.contains("max_body_size"));
    // Chunked (no Content-Length) is cut off while streaming.
    let chunks =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![1u8; 16 * 1024])));
    let r = ce(client.post(format!("http://{}/events/big", h.addr)), "BS")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let one = r#"{"specversion":"1.0","id":"K","source":"/s","type":"t"}"#;
    let r = client
        .post(format!("http://{}/events/batch", h.addr))
        .header("content-type", "application/cloudevents-batch+json")
        .body(format!("[{one},{one},{one},{one}]"))
        .send()
        .await
        .unwrap();
    assert!(problem(r, 413).await.contains("max_batch_events"));
}

#[tokio::test]
async fn credentials_401_and_acl_403() {
    let authorizer = Authorizer::new(
        vec![UserSpec {
            name: "svc".into(),
            password: Some("pw-of-svc".into()),
            tokens: vec!["token-of-svc".into()],
            permissions: Permissions {
                publish: vec!["svc/{user}/#".into()],
                subscribe: vec![],
                ..Permissions::default()
            },
            certificate: false,
        }],
        None,
    )
    .unwrap();
    let h = start_with(http_config(), authorizer, memory()).await;
    let client = reqwest::Client::new();
    let url = |t: &str| format!("http://{}/events/{t}", h.addr);
    let r = client
        .post(url("svc/svc/x"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("Bearer")
    );
    problem(r, 401).await;
    let r = client
        .post(url("svc/svc/x"))
        .bearer_auth("wrong")
        .body("x")
        .send()
        .await
        .unwrap();
    problem(r, 401).await;
    let r = client
        .post(url("svc/svc/x"))
        .bearer_auth("token-of-svc")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = client
        .post(url("svc/svc/x"))
        .basic_auth("svc", Some("pw-of-svc"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = client
        .post(url("svc/other/x"))
        .bearer_auth("token-of-svc")
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(problem(r, 403).await.contains("svc/other/x"));
    // One authorization per publish: the refusal is counted once, and the accepted ones
    // were not checked again on their way to the backbone (nothing else counts forbidden).
    let text = h.registry.render();
    assert!(
        text.contains(r#"meshgate_errors_total{adapter="http",kind="forbidden"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"meshgate_events_received_total{adapter="http"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn in_flight_limit_gives_503_with_retry_after() {
    let mut config = http_config();
    config.max_in_flight = 1;
    let h = start_with(config, Authorizer::allow_all(), memory()).await;
    let client = reqwest::Client::new();
    // Hold the only slot with a body that takes a while to upload.
    let slow = {
        let client = client.clone();
        let url = format!("http://{}/events/slow", h.addr);
        tokio::spawn(async move {
            let chunks = futures_util::stream::iter(0..2).then(|_| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                Ok::<_, std::io::Error>("x")
            });
            client
                .post(url)
                .body(reqwest::Body::wrap_stream(chunks))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    use futures_util::StreamExt as _;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = client
        .post(format!("http://{}/events/fast", h.addr))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "2");
    assert!(problem(r, 503).await.contains("max_in_flight"));
    assert_eq!(slow.await.unwrap(), 202);
}

#[tokio::test]
async fn saturated_backbone_gives_503_with_retry_after() {
    let memory = MemoryBackboneConfig {
        queue_capacity: 1,
        full_policy: FullQueuePolicy::Block,
        block_timeout: Duration::from_millis(100),
    };
    let h = start_with(http_config(), Authorizer::allow_all(), memory).await;
    let _stuck = subscribe(&h, "#").await; // never read
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("http://{}/events/t", h.addr))
            .body("x")
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 202);
    let r = post().await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    assert!(problem(r, 503).await.contains("saturated"));
}

#[tokio::test]
async fn cross_origin_posts_are_refused_same_origin_and_non_browsers_accepted() {
    let mut config = http_config();
    config.allowed_origins = vec!["https://app.example".into()];
    let h = start_with(config, Authorizer::allow_all(), memory()).await;
    let mut sub = subscribe(&h, "o/#").await;
    let client = reqwest::Client::new();
    let post = |origin: Option<String>, body: &'static str| {
        let mut r = client
            .post(format!("http://{}/events/o/x", h.addr))
            .header("content-type", "text/plain")
            .body(body);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    // The attack: a page elsewhere posts a text/plain "simple request".
    let r = post(Some("https://evil.example".into()), "forged")
        .await
        .unwrap();
    let detail = problem(r, 403).await;
    assert!(detail.contains("http.allowed_origins"), "{detail}");
    for (origin, body) in [
        (None, "curl"),
        (Some(format!("http://{}", h.addr)), "same origin"),
        (Some("https://app.example".to_owned()), "listed"),
    ] {
        let r = post(origin, body).await.unwrap();
        assert_eq!(r.status(), 202, "{body}");
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            d.event().data().map(|d| d.to_bytes()),
            Some(bytes::Bytes::from(body)),
            "the forged post was not published"
        );
    }
}
