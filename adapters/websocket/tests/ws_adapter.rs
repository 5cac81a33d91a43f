//! The WebSocket adapter on a memory backbone, driven by tokio-tungstenite (a real client).

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use meshgate_backbone::memory::MemoryBackbone;
use meshgate_backbone::testkit::TestKit;
use meshgate_config::{PublishTopic, SlowConsumerPolicy, WebSocketConfig};
use meshgate_core::metrics::Registry;
use meshgate_core::{
    AdapterContext, Authorizer, Backbone, Envelope, Event, ExtensionValue, Origin, Permissions,
    Topic, TopicFilter, UserSpec, json,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        enabled: true,
        path: "/ws".into(),
        require_subprotocol: true,
        max_message_size: 64 * 1024,
        outbound_queue_bytes: 64 * 1024,
        slow_consumer: SlowConsumerPolicy::Disconnect,
        publish_topic: PublishTopic::Subject,
        max_connections: 1000,
        ping_interval: Duration::from_secs(30),
        max_filters: 256,
        allowed_origins: Vec::new(),
    }
}

struct Harness {
    addr: SocketAddr,
    ctx: AdapterContext,
    backbone: Arc<MemoryBackbone>,
    registry: Registry,
}

async fn start_with(config: WebSocketConfig, authorizer: Authorizer) -> Harness {
    start_limited(
        config,
        authorizer,
        meshgate_core::ConnectionLimits::unlimited(),
    )
    .await
}

async fn start_limited(
    config: WebSocketConfig,
    authorizer: Authorizer,
    limits: Arc<meshgate_core::ConnectionLimits>,
) -> Harness {
    let TestKit {
        ctx,
        backbone,
        registry,
    } = TestKit::new(authorizer).with_limits(limits);
    let router = meshgate_websocket::router(
        std::sync::Arc::new(meshgate_core::live::Live::new(config)),
        &ctx,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    Harness {
        addr,
        ctx,
        backbone,
        registry,
    }
}

async fn start(config: WebSocketConfig) -> Harness {
    start_with(config, Authorizer::allow_all()).await
}

async fn connect_raw(
    addr: SocketAddr,
    query: &str,
    protocol: Option<&str>,
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut req = format!("ws://{addr}/ws{query}")
        .into_client_request()
        .unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await
}

/// Connects with `cloudevents.json` and waits for the `io.meshgate.subscribed` greeting.
async fn connect(addr: SocketAddr, query: &str) -> Ws {
    let (mut ws, resp) = connect_raw(addr, query, Some("cloudevents.json"))
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "cloudevents.json"
    );
    let greeting = next_event(&mut ws).await;
    assert_eq!(greeting.ty(), "io.meshgate.subscribed");
    ws
}

async fn next_message(ws: &mut Ws) -> Message {
    tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("no message within 5 s")
        .expect("stream ended")
        .expect("websocket error")
}

async fn next_event(ws: &mut Ws) -> Event {
    loop {
        match next_message(ws).await {
            Message::Text(t) => return json::decode(t.as_bytes()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn expect_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

fn event(id: &str) -> Event {
    let mut e = json::decode(
        format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/src","type":"com.example.t","subject":"s/1","time":"2026-11-22T10:00:00+01:00","count":7,"flag":true,"note":"x","datacontenttype":"application/json","data":{{"v":[1,2]}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    e.set_extension("seq", ExtensionValue::Integer(-5)).unwrap();
    e
}

async fn publish(h: &Harness, topic: &str, e: Event) {
    h.backbone
        .publish(Envelope::new(
            Topic::from_mqtt(topic).unwrap(),
            Arc::new(e),
            Origin {
                instance: Arc::from("test"),
                connection: 0,
            },
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn i28_e10_events_arrive_one_per_text_frame_with_every_attribute() {
    let h = start(ws_config()).await;
    let mut ws = connect(h.addr, "?subscribe=s/+").await;
    let sent = event("A1");
    publish(&h, "s/1", sent.clone()).await;
    publish(&h, "other/1", event("A2")).await;
    publish(&h, "s/2", event("A3")).await;
    let got = next_event(&mut ws).await;
    assert_eq!(
        got, sent,
        "every attribute, extension types and data intact"
    );
    assert_eq!(got.time(), Some("2026-11-22T10:00:00+01:00"));
    assert_eq!(next_event(&mut ws).await.id(), "A3");
}

#[tokio::test]
async fn i29_handshake_without_subprotocol_is_refused_with_400() {
    let h = start(ws_config()).await;
    for offered in [None, Some("chat.v1")] {
        match connect_raw(h.addr, "", offered).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 400);
                let body = String::from_utf8(resp.body().clone().unwrap_or_default()).unwrap();
                assert!(body.contains("cloudevents.json"), "{body}");
            }
            other => panic!("expected HTTP 400, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn compatibility_mode_accepts_clients_without_subprotocol() {
    let mut config = ws_config();
    config.require_subprotocol = false;
    let h = start(config).await;
    let (mut ws, resp) = connect_raw(h.addr, "?subscribe=a", None).await.unwrap();
    assert!(resp.headers().get("sec-websocket-protocol").is_none());
    assert_eq!(next_event(&mut ws).await.ty(), "io.meshgate.subscribed");
    publish(&h, "a", event("A1")).await;
    assert_eq!(next_event(&mut ws).await.id(), "A1");
}

#[tokio::test]
async fn binary_frame_closes_with_1003() {
    let h = start(ws_config()).await;
    let mut ws = connect(h.addr, "").await;
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, 1003);
    assert!(reason.contains("binary"), "{reason}");
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let h = start(ws_config()).await;
    let mut ws = connect(h.addr, "").await;
    let frame = Frame::from_payload(
        FrameHeader {
            opcode: OpCode::Data(OpData::Text),
            ..FrameHeader::default()
        },
        vec![0xC0, 0xA0, b'x'].into(),
    );
    ws.send(Message::Frame(frame)).await.unwrap();
    let (code, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1007);
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let h = start(ws_config()).await;
    let mut ws = connect(h.addr, "").await;
    ws.send(Message::Text("x".repeat(70 * 1024).into()))
        .await
        .unwrap();
    let (code, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn invalid_event_is_reported_and_the_socket_stays_open() {
    let h = start(ws_config()).await;
    let mut sub = h
        .backbone
        .subscribe(TopicFilter::parse("#").unwrap(), Default::default())
        .await
        .unwrap();
    let mut ws = connect(h.addr, "").await;
    ws.send(Message::Text(
        r#"{"specversion":"1.0","id":"B1","source":"/s","type":"t","subject":"a","n":5.0}"#.into(),
    ))
    .await
    .unwrap();
    let report = next_event(&mut ws).await;
    assert_eq!(report.ty(), "io.meshgate.error");
    let data = json::encode_string(&report);
    assert!(data.contains(r#""code":"invalid_event""#), "{data}");
    assert!(data.contains(r#""eventid":"B1""#), "{data}");
    assert!(data.contains("`n`"), "names the attribute: {data}");
    // No subject: reported, not published.
    ws.send(Message::Text(
        r#"{"specversion":"1.0","id":"B2","source":"/s","type":"t"}"#.into(),
    ))
    .await
    .unwrap();
    let report = json::encode_string(&next_event(&mut ws).await);
    assert!(report.contains(r#""code":"no_topic""#), "{report}");
    // Still open: a valid event is published, topic = subject.
    ws.send(Message::Text(json::encode_string(&event("B3")).into()))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.topic().as_str(), "s/1");
    assert_eq!(**d.event(), event("B3"));
}

#[tokio::test]
async fn subscribe_and_unsubscribe_while_connected_delivering_once() {
    let h = start(ws_config()).await;
    let mut ws = connect(h.addr, "").await;
    let control = |ty: &str, filters: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"c-{ty}","source":"/client","type":"{ty}","data":{{"filters":{filters}}}}}"#
        )
    };
    ws.send(Message::Text(
        control("io.meshgate.subscribe", r##"["a/#","a/b"]"##).into(),
    ))
    .await
    .unwrap();
    let ack = json::encode_string(&next_event(&mut ws).await);
    assert!(ack.contains(r##""filters":["a/#","a/b"]"##), "{ack}");
    publish(&h, "a/b", event("X1")).await;
    publish(&h, "a/c", event("X2")).await;
    // Overlapping filters: X1 once, then X2.
    assert_eq!(next_event(&mut ws).await.id(), "X1");
    assert_eq!(next_event(&mut ws).await.id(), "X2");
    ws.send(Message::Text(
        control("io.meshgate.unsubscribe", r##"["a/#"]"##).into(),
    ))
    .await
    .unwrap();
    let ack = json::encode_string(&next_event(&mut ws).await);
    assert!(ack.contains(r#""filters":["a/b"]"#), "{ack}");
    publish(&h, "a/c", event("X3")).await;
    publish(&h, "a/b", event("X4")).await;
    assert_eq!(next_event(&mut ws).await.id(), "X4");
}

#[tokio::test]
async fn slow_consumer_is_disconnected_without_holding_up_others() {
    let mut config = ws_config();
    config.outbound_queue_bytes = 64 * 16 * 1024;
    let h = start(config).await;
    let mut fast = connect(h.addr, "?subscribe=t").await;
    let (mut slow, _) = connect_raw(h.addr, "?subscribe=t", Some("cloudevents.json"))
        .await
        .unwrap();
    // Make sure the slow client is subscribed before publishing.
    assert_eq!(next_event(&mut slow).await.ty(), "io.meshgate.subscribed");
    let big = format!(r#""{}""#, "x".repeat(16 * 1024));
    let total = 2_000;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < total {
            next_event(&mut fast).await;
            n += 1;
        }
        n
    });
    for i in 0..total {
        let mut e = Event::new(format!("E{i}"), "/s", "t").unwrap();
        e.set_data(Some(meshgate_core::Data::Json(
            serde_json::value::RawValue::from_string(big.clone()).unwrap(),
        )));
        publish(&h, "t", e).await;
        // A realistic producer yields now and then (this test runs on one thread).
        if i % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .unwrap()
            .unwrap(),
        total
    );
    // The slow client (never read) was cut off with 1008 and a reason.
    let (code, reason) = expect_close(&mut slow).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("slow consumer"), "{reason}");
    assert!(h.registry.render().contains("slow_consumer_disconnected"));
}

#[tokio::test]
async fn drop_policy_drops_and_counts() {
    let mut config = ws_config();
    config.slow_consumer = SlowConsumerPolicy::Drop;
    config.outbound_queue_bytes = 64 * 1024;
    let h = start(config).await;
    let mut ws = connect(h.addr, "?subscribe=t").await;
    // 16 KiB events: the socket buffers fill, then the 4-slot queue, then events are dropped.
    let big = format!(r#""{}""#, "x".repeat(16 * 1024));
    for i in 0..2_000 {
        let mut e = Event::new(format!("E{i}"), "/s", "t").unwrap();
        e.set_data(Some(meshgate_core::Data::Json(
            serde_json::value::RawValue::from_string(big.clone()).unwrap(),
        )));
        publish(&h, "t", e).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = h.registry.render();
    let counter = |prefix: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let dropped =
        counter("meshgate_events_dropped_total{adapter=\"websocket\",reason=\"slow_consumer\"}")
            + counter("meshgate_backbone_dropped_total{backbone=\"memory\",reason=\"queue_full\"}");
    assert!(dropped > 0, "{metrics}");
    // The connection is still alive and reads what was not dropped.
    let mut received = 0u64;
    while let Ok(Some(Ok(Message::Text(_)))) =
        tokio::time::timeout(Duration::from_millis(500), ws.next()).await
    {
        received += 1;
    }
    assert_eq!(
        received + dropped,
        2_000,
        "every event delivered or counted"
    );
}

#[tokio::test]
async fn tokens_and_acls_are_enforced_at_the_handshake() {
    let authorizer = Authorizer::new(
        vec![UserSpec {
            name: "web".into(),
            password: None,
            tokens: vec!["tok".into()],
            permissions: Permissions {
                publish: vec!["web/{user}/#".into()],
                subscribe: vec!["public/#".into()],
                ..Permissions::default()
            },
            certificate: false,
        }],
        None,
    )
    .unwrap();
    let h = start_with(ws_config(), authorizer).await;
    let status = |r: Result<_, tungstenite::Error>| match r {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Ok(_) => 101,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        status(connect_raw(h.addr, "", Some("cloudevents.json")).await),
        401
    );
    assert_eq!(
        status(connect_raw(h.addr, "?access_token=bad", Some("cloudevents.json")).await),
        401
    );
    assert_eq!(
        status(
            connect_raw(
                h.addr,
                "?access_token=tok&subscribe=private/x",
                Some("cloudevents.json")
            )
            .await
        ),
        403
    );
    // Header token works too, and a forbidden publish is reported on the socket.
    let mut req = format!("ws://{}/ws?subscribe=public/%23", h.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    req.headers_mut()
        .insert("Authorization", "Bearer tok".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(next_event(&mut ws).await.ty(), "io.meshgate.subscribed");
    ws.send(Message::Text(json::encode_string(&event("F1")).into()))
        .await
        .unwrap();
    let report = json::encode_string(&next_event(&mut ws).await);
    assert!(report.contains(r#""code":"forbidden""#), "{report}");
}

#[tokio::test]
async fn shutdown_flushes_then_closes_with_1001() {
    let h = start(ws_config()).await;
    let mut ws = connect(h.addr, "?subscribe=t").await;
    for i in 0..10 {
        publish(&h, "t", event(&format!("S{i}"))).await;
    }
    // The gateway's order: the backbone closes (subscriptions drain), then connections close.
    h.backbone.close().await;
    h.ctx.shutdown.cancel();
    for i in 0..10 {
        assert_eq!(next_event(&mut ws).await.id(), format!("S{i}"));
    }
    let (code, _) = expect_close(&mut ws).await;
    assert_eq!(code, 1001);
    h.ctx.tracker.close();
    tokio::time::timeout(Duration::from_secs(5), h.ctx.tracker.wait())
        .await
        .expect("connection task ended");
}

#[tokio::test]
async fn connection_limit_gives_503() {
    let mut config = ws_config();
    config.max_connections = 2;
    let h = start(config).await;
    let _a = connect(h.addr, "").await;
    let _b = connect(h.addr, "").await;
    match connect_raw(h.addr, "", Some("cloudevents.json")).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected 503, got {other:?}"),
    }
    drop(_a);
    // The slot is freed once the server notices the disconnect.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if connect_raw(h.addr, "", Some("cloudevents.json"))
            .await
            .is_ok()
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_closed() {
    let mut config = ws_config();
    config.ping_interval = Duration::from_millis(100);
    let h = start(config).await;
    let (mut silent, _) = connect_raw(h.addr, "", Some("cloudevents.json"))
        .await
        .unwrap();
    // Never read (so never answer pings) for a while; then the server has given up on us.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (code, reason) = expect_close(&mut silent).await;
    assert_eq!(code, 1001);
    assert!(reason.contains("ping"), "{reason}");
    // A client that reads (and so answers pings) stays connected.
    let mut live = connect(h.addr, "").await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(50), live.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => panic!("live client closed: {f:?}"),
            Ok(None) => panic!("live client closed"),
            _ => {}
        }
    }
    assert!(h.registry.render().contains("kind=\"ping_timeout\"} 1"));
}

fn http_status(
    r: Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error>,
) -> u16 {
    match r {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Ok(_) => 101,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn max_filters_refuses_the_handshake_and_later_subscribes_counted() {
    let mut config = ws_config();
    config.max_filters = 2;
    let h = start(config).await;
    assert_eq!(
        http_status(
            connect_raw(
                h.addr,
                "?subscribe=a&subscribe=b&subscribe=c",
                Some("cloudevents.json")
            )
            .await
        ),
        400
    );
    let mut ws = connect(h.addr, "?subscribe=a&subscribe=b").await;
    ws.send(Message::Text(
        r##"{"specversion":"1.0","id":"c1","source":"/client","type":"io.meshgate.subscribe","data":{"filters":["c/#"]}}"##.into(),
    ))
    .await
    .unwrap();
    let report = json::encode_string(&next_event(&mut ws).await);
    assert!(report.contains("websocket.max_filters"), "{report}");
    let ack = json::encode_string(&next_event(&mut ws).await);
    assert!(ack.contains(r#""filters":["a","b"]"#), "{ack}");
    let text = h.registry.render();
    assert!(
        text.contains(r#"meshgate_errors_total{adapter="websocket",kind="too_many_filters"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn per_address_and_per_user_caps_give_503_and_free_on_close() {
    let authorizer = Authorizer::new(
        vec![UserSpec {
            name: "web".into(),
            password: None,
            tokens: vec!["tok-web-1".into()],
            permissions: Permissions {
                publish: vec!["#".into()],
                subscribe: vec!["#".into()],
                ..Permissions::default()
            },
            certificate: false,
        }],
        Some(Permissions {
            publish: vec!["#".into()],
            subscribe: vec!["#".into()],
            ..Permissions::default()
        }),
    )
    .unwrap();
    let h = start_limited(
        ws_config(),
        authorizer,
        meshgate_core::ConnectionLimits::new(3, 1),
    )
    .await;
    let user = connect(h.addr, "?access_token=tok-web-1").await;
    assert_eq!(
        http_status(connect_raw(h.addr, "?access_token=tok-web-1", Some("cloudevents.json")).await),
        503,
        "second connection of the same user"
    );
    let _a = connect(h.addr, "").await;
    let _b = connect(h.addr, "").await;
    assert_eq!(
        http_status(connect_raw(h.addr, "", Some("cloudevents.json")).await),
        503,
        "fourth connection from 127.0.0.1"
    );
    let text = h.registry.render();
    assert!(text.contains(r#"kind="connection_limit_ip"} 1"#), "{text}");
    assert!(
        text.contains(r#"kind="connection_limit_user"} 1"#),
        "{text}"
    );
    drop(user);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while connect_raw(h.addr, "?access_token=tok-web-1", Some("cloudevents.json"))
        .await
        .is_err()
    {
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn cross_origin_upgrade_is_refused_with_403() {
    let h = start(ws_config()).await;
    let mut req = format!("ws://{}/ws", h.addr).into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse().unwrap());
    assert_eq!(
        http_status(tokio_tungstenite::connect_async(req).await),
        403
    );
    let mut req = format!("ws://{}/ws", h.addr).into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    req.headers_mut()
        .insert("Origin", format!("http://{}", h.addr).parse().unwrap());
    assert_eq!(
        http_status(tokio_tungstenite::connect_async(req).await),
        101,
        "same origin"
    );
    let text = h.registry.render();
    assert!(
        text.contains(r#"meshgate_errors_total{adapter="websocket",kind="forbidden_origin"} 1"#),
        "{text}"
    );
}

/// tungstenite's read buffer is 256 bytes and the read-ahead below it reads 8 KiB at a time
/// (issue 27's idle memory, `read_ahead.rs`); a message of 40 KiB in one frame still arrives
/// whole.
#[tokio::test]
async fn messages_larger_than_the_read_buffer_arrive_whole() {
    let h = start(ws_config()).await;
    let mut sub = h
        .backbone
        .subscribe(TopicFilter::parse("#").unwrap(), Default::default())
        .await
        .unwrap();
    let mut ws = connect(h.addr, "").await;
    let mut big = event("L1");
    big.set_extension("pad", ExtensionValue::String("p".repeat(40 * 1024)))
        .unwrap();
    ws.send(Message::Text(json::encode_string(&big).into()))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(**d.event(), big);
}

/// Frames sent back to back in one write (sizes around tungstenite's 256-byte reads and the
/// 8 KiB read-ahead) are each read whole and in order, however they fall across reads.
#[tokio::test]
async fn frames_sent_back_to_back_are_read_whole_and_in_order() {
    let h = start(ws_config()).await;
    let mut sub = h
        .backbone
        .subscribe(TopicFilter::parse("#").unwrap(), Default::default())
        .await
        .unwrap();
    let mut ws = connect(h.addr, "").await;
    let sizes = [
        0usize,
        100,
        500,
        511,
        512,
        513,
        3000,
        8 * 1024,
        8 * 1024 + 7,
        20_000,
    ];
    let mut sent = Vec::new();
    for round in 0..5 {
        for (i, pad) in sizes.iter().enumerate() {
            let mut e = event(&format!("P{round}-{i}"));
            e.set_extension("pad", ExtensionValue::String("p".repeat(*pad)))
                .unwrap();
            ws.feed(Message::Text(json::encode_string(&e).into()))
                .await
                .unwrap();
            sent.push(e);
        }
    }
    ws.flush().await.unwrap();
    for e in &sent {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(**d.event(), *e);
    }
}

/// The value of the sample `name` (with its labels) on the harness's registry, 0 if absent.
fn sample(h: &Harness, name: &str) -> u64 {
    h.registry
        .render()
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn sized_event(id: String, bytes: usize) -> Event {
    let mut e = Event::new(id, "/s", "t").unwrap();
    e.set_data(Some(meshgate_core::Data::Json(
        serde_json::value::RawValue::from_string(format!(r#""{}""#, "x".repeat(bytes))).unwrap(),
    )));
    e
}

/// Issue 19 item 7: `events_sent_total` counts exactly what a client received, also when the
/// slow-consumer policy cut it off in the middle of a batch (the events handed to the socket
/// before the close frame reach the client with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_counts_what_a_cut_off_client_received() {
    let mut config = ws_config();
    config.outbound_queue_bytes = 1024 * 1024;
    let h = start(config).await;
    let mut ws = connect(h.addr, "?subscribe=t").await;
    let disconnected =
        "meshgate_errors_total{adapter=\"websocket\",kind=\"slow_consumer_disconnected\"}";
    let mut published = 0;
    while sample(&h, disconnected) == 0 {
        assert!(published < 20_000, "never disconnected");
        publish(&h, "t", sized_event(format!("C{published}"), 16 * 1024)).await;
        published += 1;
        // Paced so that the writer keeps up until the client's socket is full: it is then in
        // the middle of a batch when the queue overflows.
        if published % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The client reads now: everything handed to its socket, then the close frame.
    let mut received = 0u64;
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => received += 1,
            Ok(Some(Ok(Message::Close(Some(frame))))) => break u16::from(frame.code),
            Ok(Some(Ok(_))) => {}
            other => panic!("after {received} events: {other:?}"),
        }
    };
    assert_eq!(code, 1008);
    assert!(received > 0);
    // The writer counts once the close frame went out, which the client saw already.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        sample(&h, "meshgate_events_sent_total{adapter=\"websocket\"}"),
        received,
        "published {published}"
    );
}
