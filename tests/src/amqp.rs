//! RabbitMQ for the AMQP bridge tests: the broker on 127.0.0.1:5672 (guest/guest; the test
//! script starts `rabbitmq-server` where it is not running), unique names per test, a throwaway
//! virtual host for tests that close connections.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// The broker every AMQP test uses.
pub const HOST_PORT: &str = "127.0.0.1:5672";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or earlier run) uses: `mg-<what>-<pid>-<n>`.
pub fn unique(what: &str) -> String {
    format!(
        "mg-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A client connection and a channel with publisher confirms.
#[derive(Debug)]
pub struct Rabbit {
    pub connection: Connection,
    pub channel: Channel,
}

impl Rabbit {
    /// Connects to `vhost` as guest, or panics saying how to start RabbitMQ.
    pub async fn connect(vhost: &str) -> Rabbit {
        let vhost_enc = vhost.replace('%', "%25").replace('/', "%2f");
        let uri = format!("amqp://guest:guest@{HOST_PORT}/{vhost_enc}");
        let connection = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&uri, ConnectionProperties::default()),
        )
        .await
        .unwrap_or_else(|_| panic!("RabbitMQ on {HOST_PORT} did not answer within 10 s"))
        .unwrap_or_else(|e| {
            panic!(
                "cannot connect to RabbitMQ on {HOST_PORT} (vhost {vhost}): {e}; start it with `rabbitmq-server -detached` (scripts/test.sh does)"
            )
        });
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        Rabbit {
            connection,
            channel,
        }
    }

    /// Declares a topic exchange (auto-deleted once its last binding goes).
    pub async fn exchange(&self, name: &str) {
        self.channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("exchange.declare {name}: {e}"));
    }

    /// Declares a durable topic exchange: it stays until deleted, across broker restarts too
    /// (the test must delete it).
    pub async fn exchange_kept(&self, name: &str) {
        self.channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("exchange.declare {name}: {e}"));
    }

    /// Declares a queue that RabbitMQ removes by itself 2 minutes after its last use, so a
    /// failed test leaves nothing behind; `dead_letter` names an exchange for rejected messages.
    pub async fn queue(&self, name: &str, dead_letter: Option<&str>) {
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(120_000));
        if let Some(dlx) = dead_letter {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(dlx)),
            );
        }
        self.channel
            .queue_declare(name.into(), QueueDeclareOptions::default(), args)
            .await
            .unwrap_or_else(|e| panic!("queue.declare {name}: {e}"));
    }

    /// Declares a durable queue (it survives a broker restart; the test must delete it).
    pub async fn queue_durable(&self, name: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue.declare {name}: {e}"));
    }

    pub async fn bind(&self, queue: &str, exchange: &str, key: &str) {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue.bind {queue} {exchange} {key}: {e}"));
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap_or_else(|e| panic!("basic.publish to {exchange} {key}: {e}"))
            .await
            .unwrap_or_else(|e| panic!("confirm of a publish to {exchange} {key}: {e}"));
        assert!(
            confirm.is_ack(),
            "RabbitMQ confirmed the publish: {confirm:?}"
        );
    }

    /// Takes the next message of `queue` (acknowledging it), waiting up to `within`.
    pub async fn get(
        &self,
        queue: &str,
        within: Duration,
    ) -> Option<lapin::message::BasicGetMessage> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap_or_else(|e| panic!("basic.get {queue}: {e}"));
            if got.is_some() || tokio::time::Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Consumes `queue`, acknowledging each message, until `n` arrived or `within` passed.
    pub async fn consume(
        &self,
        queue: &str,
        n: usize,
        within: Duration,
    ) -> Vec<lapin::message::Delivery> {
        let channel = self.connection.create_channel().await.expect("a channel");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("basic.consume {queue}: {e}"));
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    d.acker.ack(BasicAckOptions::default()).await.expect("ack");
                    out.push(d);
                }
                Ok(Some(Err(e))) => panic!("consuming {queue}: {e}"),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = channel.close(200, "done".into()).await;
        out
    }

    pub async fn delete_queue(&self, name: &str) {
        let _ = self
            .channel
            .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
            .await;
    }

    pub async fn delete_exchange(&self, name: &str) {
        let _ = self
            .channel
            .exchange_delete(
                name.into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

/// Binary-mode headers of an event with id `id`, source `/load`, type `t` and specversion 1.0,
/// plus `extra` headers.
pub fn ce_headers(id: &str, extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in [
        ("cloudEvents_specversion", "1.0"),
        ("cloudEvents_id", id),
        ("cloudEvents_source", "/load"),
        ("cloudEvents_type", "t"),
    ] {
        t.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// A header value of a delivery, for assertions.
pub fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

/// Runs `rabbitmqctl`; returns what it printed, and panics with its output when it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (package rabbitmq-server): {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A virtual host of this test's own, with guest allowed everything; deleted (with all its
/// queues and exchanges) on drop. For tests that close every connection of a vhost.
#[derive(Debug)]
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    pub fn create() -> Vhost {
        let name = unique("vhost");
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost { name }
    }

    /// `rabbitmqctl close_all_connections` for this vhost only (other tests keep theirs).
    pub fn close_all_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "--vhost",
            &self.name,
            "--limit",
            "1000",
            "meshgate test: closing every connection",
        ]);
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}
