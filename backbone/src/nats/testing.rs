//! Test helpers for the client: its state without a connection, a connection served over an
//! in-memory pipe whose other end plays the server, and events to publish.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meshgate_core::Envelope;
use meshgate_core::metrics::Counter;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::client::{Client, EncodeLater, Frame, Options, Shared};
use super::connection::{Disconnect, Served, serve};
use super::wire::HeaderError;

/// A client's shared state as [`Client::connect`] makes it, without connecting.
pub(super) fn unconnected() -> Arc<Shared> {
    unconnected_with(None)
}

pub(super) fn unconnected_with(later: Option<Arc<dyn EncodeLater>>) -> Arc<Shared> {
    Arc::new(Shared::new(Options {
        urls: vec!["127.0.0.1:4222".into()],
        name: "test".into(),
        echo: false,
        user: None,
        password: None,
        token: None,
        connect_timeout: Duration::from_secs(1),
        subscription_capacity: 16,
        subscription_bytes: 1 << 20,
        slow_consumer: Counter::default(),
        too_large: Counter::default(),
        panicked: Counter::default(),
        disconnects: Counter::default(),
        discarded: Counter::default(),
        later,
        max_control_line: 4096,
        tls: meshgate_config::NatsTlsConfig::default(),
        nkey: None,
    }))
}

/// Runs [`serve`] on one end of an in-memory pipe (`capacity` bytes), once connected; the
/// other end is the server's.
pub(crate) async fn serving(
    capacity: usize,
) -> (
    Client,
    tokio::task::JoinHandle<Disconnect>,
    tokio::io::DuplexStream,
) {
    serving_with(capacity, None).await
}

pub(crate) async fn serving_with(
    capacity: usize,
    later: Option<Arc<dyn EncodeLater>>,
) -> (
    Client,
    tokio::task::JoinHandle<Disconnect>,
    tokio::io::DuplexStream,
) {
    let shared = unconnected_with(later);
    let (io, server) = tokio::io::duplex(capacity);
    let serving = tokio::spawn({
        let shared = shared.clone();
        async move {
            let served = serve(
                &shared,
                Box::new(io),
                BytesMut::new(),
                "nats://test",
                super::connection::Start::Fresh { lame_duck: false },
                std::future::pending(),
            );
            match served.await {
                Served::Ended(reason) => reason,
                Served::Moved(_) => unreachable!("no replacement is offered"),
            }
        }
    });
    let client = Client { shared };
    while !client.is_connected() {
        tokio::task::yield_now().await;
    }
    (client, serving, server)
}

/// Reads from the client until a whole line starting with `verb` came; returns that line.
pub(crate) async fn line_of(
    r: &mut (impl AsyncRead + Unpin),
    seen: &mut Vec<u8>,
    verb: &str,
) -> String {
    loop {
        if let Some(at) = memchr::memmem::find(seen, verb.as_bytes())
            && let Some(end) = memchr::memmem::find(&seen[at..], b"\r\n")
        {
            let line = String::from_utf8_lossy(&seen[at..at + end]).into_owned();
            seen.drain(..at + end + 2);
            return line;
        }
        let mut chunk = [0u8; 4096];
        let n = r.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the client closed");
        seen.extend_from_slice(&chunk[..n]);
    }
}

pub(crate) fn event(id: &str) -> Arc<Envelope> {
    let event = meshgate_core::Event::new(id, "/s", "t").unwrap();
    let origin = meshgate_core::Origin {
        instance: Arc::from("i"),
        connection: 1,
    };
    let topic = meshgate_core::Topic::from_mqtt("t").unwrap();
    Arc::new(Envelope::new(topic, Arc::new(event), origin))
}

/// Encodes an event as `PUB ev.<topic>` with its id as the payload; says it may be
/// `bound` bytes long. Refuses an event whose id starts with `bad` (as if a header could not
/// be written).
#[derive(Debug)]
pub(crate) struct IdOnly {
    pub(crate) bound: usize,
}

impl EncodeLater for IdOnly {
    fn encode(&self, envelope: &Envelope, frame: &mut Frame) -> Result<(), HeaderError> {
        if envelope.event.id().starts_with("bad") {
            return Err(HeaderError::ControlCharacter {
                name: "x".into(),
                value: "\n".into(),
            });
        }
        envelope.topic.push_nats_subject("ev", &mut frame.subject);
        frame
            .payload
            .extend_from_slice(envelope.event.id().as_bytes());
        Ok(())
    }
    fn size_bound(&self, _: &Envelope) -> usize {
        self.bound
    }
    fn subject_bound(&self, _: &Envelope) -> usize {
        0
    }
}
