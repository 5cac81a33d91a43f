//! Whatever bytes a client sends, the broker neither panics nor stops serving others.
//! (Its own test binary, because it counts panics process-wide.)

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use meshgate_config::{FullQueuePolicy, MemoryBackboneConfig, Mqtt5Mode, Mqtt311Mode, MqttConfig};
use meshgate_core::{Adapter, Authorizer};
use meshgate_mqtt::codec::{self, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn connect_packet(version: Version, id: &str) -> BytesMut {
    let connect = rumqttd::protocol::Connect {
        keep_alive: 30,
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
    let mut out = BytesMut::new();
    codec::write(
        version,
        rumqttd::protocol::Packet::Connect(connect, props, None, None, None),
        &mut out,
    )
    .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_after_connect_never_take_the_broker_down() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let ctx = meshgate_backbone::testkit::TestKit::on(
        Authorizer::allow_all(),
        MemoryBackboneConfig {
            queue_capacity: 64,
            full_policy: FullQueuePolicy::Drop,
            block_timeout: Duration::from_secs(1),
        },
    )
    .with_instance("fuzz")
    .ctx;
    let config = MqttConfig {
        enabled: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        max_connections: 1000,
        max_packet_size: 64 * 1024,
        connect_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_secs(30),
        max_keep_alive: Duration::from_secs(3600),
        max_inflight: 8,
        max_queued: 100,
        max_subscriptions: 100,
        max_session_expiry: Duration::from_secs(5),
        max_offline_sessions: 100,
        max_retained_messages: 100_000,
        max_retained_bytes: 256 << 20,
        max_retained_send_bytes: 16 << 20,
        max_client_id_len: 256,
        v5_outbound: Mqtt5Mode::Binary,
        v311_outbound: Mqtt311Mode::Structured,
        plain_messages: meshgate_config::PlainMessages::AsPublished,
        sys_interval: std::time::Duration::ZERO,
        wrap_type: "t".into(),
        websocket_path: None,
        tls: None,
    };
    let adapter = meshgate_mqtt::MqttAdapter::bind(&config, &ctx)
        .await
        .unwrap();
    let addr = adapter.local_addr().unwrap();
    tokio::spawn(Box::new(adapter).run(ctx.clone()));

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..2000 {
        let version = if round % 2 == 0 {
            Version::V311
        } else {
            Version::V5
        };
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Half the rounds start with a valid CONNECT, the rest are garbage from the first byte.
        if round % 4 < 2 {
            s.write_all(&connect_packet(version, &format!("fuzz-{round}")))
                .await
                .unwrap();
        }
        // Garbage, sometimes shaped like a packet header of a random type.
        let len = (rng.next() % 300) as usize;
        let mut junk = rng.bytes(len);
        if let Some(first) = junk.first_mut()
            && round % 3 == 0
        {
            *first = (*first & 0xF0) | 0x02;
        }
        let _ = s.write_all(&junk).await;
        // End of our stream: the server must finish with what it has and close.
        let _ = s.shutdown().await;
        let mut sink = [0u8; 1024];
        // The server answers or closes; it must not hang past the connect timeout.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match s.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    // Still serving: a proper client connects and gets CONNACK 0.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_packet(Version::V311, "after"))
        .await
        .unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a client's bytes caused a panic"
    );
}
