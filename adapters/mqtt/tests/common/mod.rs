//! Shared harness of the MQTT adapter tests: the adapter on a memory backbone, rumqttc
//! (3.1.1 and 5) clients whose events arrive on channels, and raw-packet helpers.

#![allow(dead_code, unused_imports)] // each test file uses a part

pub use std::net::SocketAddr;
pub use std::sync::Arc;
pub use std::time::Duration;

pub use bytes::{Bytes, BytesMut};
pub use meshgate_backbone::memory::MemoryBackbone;
pub use meshgate_config::{
    FullQueuePolicy, MemoryBackboneConfig, Mqtt5Mode, Mqtt311Mode, MqttConfig,
};
pub use meshgate_core::metrics::Registry;
pub use meshgate_core::{
    Adapter, AdapterContext, Authorizer, Backbone, ExtensionValue, Permissions, TopicFilter,
    UserSpec, json,
};
pub use meshgate_mqtt::codec::{self, Version};
pub use rumqttc::v5::mqttbytes::v5 as mq5;
pub use tokio::io::{AsyncReadExt, AsyncWriteExt};
pub use tokio::net::TcpStream;
pub use tokio::sync::mpsc;
pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

pub fn mqtt_config() -> MqttConfig {
    MqttConfig {
        enabled: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        max_connections: 100,
        max_packet_size: 1 << 20,
        connect_timeout: Duration::from_millis(500),
        write_timeout: Duration::from_secs(30),
        max_keep_alive: Duration::from_secs(3600),
        max_inflight: 16,
        max_queued: 1000,
        max_subscriptions: 100,
        max_session_expiry: Duration::from_secs(60),
        max_offline_sessions: 10,
        max_retained_messages: 100_000,
        max_retained_bytes: 256 << 20,
        max_retained_send_bytes: 16 << 20,
        max_client_id_len: 256,
        v5_outbound: Mqtt5Mode::Binary,
        v311_outbound: Mqtt311Mode::Structured,
        plain_messages: meshgate_config::PlainMessages::AsPublished,
        sys_interval: std::time::Duration::ZERO,
        wrap_type: "io.meshgate.mqtt.message".into(),
        websocket_path: Some("/mqtt".into()),
        tls: None,
    }
}

pub struct Harness {
    pub addr: SocketAddr,
    /// The web listener serving MQTT over WebSocket at /mqtt.
    pub ws_addr: SocketAddr,
    pub backbone: Arc<MemoryBackbone>,
    pub ctx: AdapterContext,
}

pub async fn start_with(config: MqttConfig, authorizer: Authorizer) -> Harness {
    let memory = MemoryBackboneConfig {
        queue_capacity: 1024,
        full_policy: FullQueuePolicy::Drop,
        block_timeout: Duration::from_secs(1),
    };
    start_on(config, authorizer, memory).await
}

/// [`start_with`] on a memory backbone configured by the test.
pub async fn start_on(
    config: MqttConfig,
    authorizer: Authorizer,
    memory: MemoryBackboneConfig,
) -> Harness {
    let meshgate_backbone::testkit::TestKit { ctx, backbone, .. } =
        meshgate_backbone::testkit::TestKit::on(authorizer, memory);
    let adapter = meshgate_mqtt::MqttAdapter::bind(&config, &ctx)
        .await
        .unwrap();
    let addr = adapter.local_addr().unwrap();
    let ws_router = adapter.websocket_router().unwrap();
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = web.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(web, ws_router).await });
    let run_ctx = ctx.clone();
    tokio::spawn(async move { Box::new(adapter).run(run_ctx).await });
    Harness {
        addr,
        ws_addr,
        backbone,
        ctx,
    }
}

pub async fn start() -> Harness {
    start_with(mqtt_config(), Authorizer::allow_all()).await
}

/// A rumqttc 3.1.1 client whose events arrive on a channel.
pub async fn client4(
    h: &Harness,
    id: &str,
    configure: impl FnOnce(&mut rumqttc::MqttOptions),
) -> (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<Result<rumqttc::Event, String>>,
) {
    let (client, rx, _) = killable4(h, id, configure).await;
    (client, rx)
}

/// Like `client4`, with a handle that kills the connection without DISCONNECT (the event
/// loop and its socket are dropped), as a device losing power would.
pub async fn killable4(
    h: &Harness,
    id: &str,
    configure: impl FnOnce(&mut rumqttc::MqttOptions),
) -> (
    rumqttc::AsyncClient,
    mpsc::UnboundedReceiver<Result<rumqttc::Event, String>>,
    tokio::task::AbortHandle,
) {
    let mut opts = rumqttc::MqttOptions::new(id, h.addr.ip().to_string(), h.addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    configure(&mut opts);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let e = el.poll().await.map_err(|e| e.to_string());
            let stop = e.is_err();
            if tx.send(e).is_err() || stop {
                break;
            }
        }
    });
    (client, rx, task.abort_handle())
}

/// A rumqttc 5 client whose events arrive on a channel.
pub async fn client5(
    h: &Harness,
    id: &str,
    configure: impl FnOnce(&mut rumqttc::v5::MqttOptions),
) -> (
    rumqttc::v5::AsyncClient,
    mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, String>>,
) {
    let (client, rx, _) = killable5(h, id, configure).await;
    (client, rx)
}

/// Like `client5`, with a handle that kills the connection without DISCONNECT (the event
/// loop and its socket are dropped), as a device losing power would.
pub async fn killable5(
    h: &Harness,
    id: &str,
    configure: impl FnOnce(&mut rumqttc::v5::MqttOptions),
) -> (
    rumqttc::v5::AsyncClient,
    mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, String>>,
    tokio::task::AbortHandle,
) {
    let mut opts = rumqttc::v5::MqttOptions::new(id, h.addr.ip().to_string(), h.addr.port());
    opts.set_keep_alive(Duration::from_secs(5));
    configure(&mut opts);
    let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let e = el.poll().await.map_err(|e| e.to_string());
            let stop = e.is_err();
            if tx.send(e).is_err() || stop {
                break;
            }
        }
    });
    (client, rx, task.abort_handle())
}

/// Waits for the first event `pick` accepts.
pub async fn wait<E, T>(
    rx: &mut mpsc::UnboundedReceiver<Result<E, String>>,
    what: &str,
    mut pick: impl FnMut(&Result<E, String>) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|| panic!("client ended while waiting for {what}"));
        if let Some(t) = pick(&e) {
            return t;
        }
    }
}

pub fn publish4(e: &Result<rumqttc::Event, String>) -> Option<rumqttc::Publish> {
    match e {
        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => Some(p.clone()),
        _ => None,
    }
}

pub fn publish5(e: &Result<rumqttc::v5::Event, String>) -> Option<mq5::Publish> {
    match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::Publish(p))) => Some(p.clone()),
        _ => None,
    }
}

pub async fn suback4(
    rx: &mut mpsc::UnboundedReceiver<Result<rumqttc::Event, String>>,
) -> Vec<rumqttc::SubscribeReasonCode> {
    wait(rx, "SUBACK", |e| match e {
        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(s))) => Some(s.return_codes.clone()),
        _ => None,
    })
    .await
}

pub async fn suback5(
    rx: &mut mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, String>>,
) -> Vec<mq5::SubscribeReasonCode> {
    wait(rx, "SUBACK", |e| match e {
        Ok(rumqttc::v5::Event::Incoming(mq5::Packet::SubAck(s))) => Some(s.return_codes.clone()),
        _ => None,
    })
    .await
}

pub async fn raw_connect(h: &Harness, version: Version, id: &str, keep_alive: u16) -> TcpStream {
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let connect = rumqttd::protocol::Connect {
        keep_alive,
        client_id: id.into(),
        clean_session: true,
    };
    let props = (version == Version::V5).then(|| rumqttd::protocol::ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: vec![],
        authentication_method: None,
        authentication_data: None,
    });
    send(
        &mut s,
        version,
        rumqttd::protocol::Packet::Connect(connect, props, None, None, None),
    )
    .await;
    match recv(&mut s, version).await {
        Some(rumqttd::protocol::Packet::ConnAck(a, _)) => {
            assert_eq!(a.code, rumqttd::protocol::ConnectReturnCode::Success)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    s
}

pub async fn send(s: &mut TcpStream, version: Version, p: rumqttd::protocol::Packet) {
    let mut out = BytesMut::new();
    codec::write(version, p, &mut out).unwrap();
    s.write_all(&out).await.unwrap();
}

/// The next packet, or `None` when the server closed the connection.
pub async fn recv(s: &mut TcpStream, version: Version) -> Option<rumqttd::protocol::Packet> {
    let mut buf = BytesMut::new();
    loop {
        // The server-side codec cannot read CONNACK in MQTT 5; its 3.1.1 reader takes the
        // flags and return code and ignores the properties, which is all these tests need.
        let v = if buf.first().is_some_and(|b| b >> 4 == 2) {
            Version::V311
        } else {
            version
        };
        if let Some(p) = codec::read(v, &mut buf, 1 << 20).unwrap() {
            return Some(p);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .expect("server answered")
            .ok()?;
        if n == 0 {
            return None;
        }
    }
}
