//! The file format as serde sees it: every value as written, before validation. Conversions
//! (addresses, sizes, durations, enums) happen in `convert.rs`, so that a bad value becomes a
//! message naming its key instead of stopping the parse.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Gateway {
    pub instance_id: Option<String>,
    pub shutdown_grace: String,
    pub worker_threads: i64,
    pub max_connections_per_ip: i64,
    pub max_connections_per_user: i64,
}

#[derive(Debug, Deserialize)]
pub struct Log {
    pub level: String,
    pub format: String,
}

#[derive(Deserialize)]
pub struct Admin {
    pub enabled: bool,
    pub listen: String,
    pub max_connections: i64,
    pub api_token: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
pub struct Tracing {
    pub enabled: bool,
    pub endpoint: String,
    pub sample_ratio: f64,
    pub service_name: String,
    pub export_timeout: String,
    pub max_queued_spans: i64,
}

#[derive(Debug, Deserialize)]
pub struct Memory {
    pub queue_capacity: i64,
    pub full_policy: String,
    pub block_timeout: String,
}

#[derive(Debug, Deserialize)]
pub struct Backbone {
    pub kind: String,
    pub memory: Memory,
    pub nats: Nats,
    pub jetstream: JetStream,
}

#[derive(Debug, Deserialize)]
pub struct JetStream {
    pub stream: String,
    pub max_age: String,
    pub max_bytes: Size,
    pub replicas: i64,
    pub duplicate_window: String,
    pub ack_wait: String,
    pub backoff: Vec<String>,
    pub max_deliver: i64,
    pub dead_letter_subject: String,
    pub publish_connections: i64,
    pub publish_timeout: String,
    pub retained_max_bytes: Size,
    pub sessions_max_bytes: Size,
    pub kv_max_value_size: Size,
    pub subscriptions: String,
}

#[derive(Deserialize)]
pub struct Nats {
    pub urls: Vec<String>,
    pub subject_prefix: String,
    pub wire_mode: String,
    pub user: String,
    pub password: String,
    pub token: String,
    pub ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub credentials_file: String,
    pub nkey_seed_file: String,
    pub connect_timeout: String,
    pub subscription_capacity: i64,
    pub subscription_bytes: Size,
    pub max_control_line: Size,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

/// A size: bytes as an integer, or a string with a unit ("64KiB", "1 MB").
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
pub struct Wrap {
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
}

#[derive(Debug, Deserialize)]
pub struct Http {
    pub enabled: bool,
    pub listen: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub events_path: String,
    pub max_body_size: Size,
    pub max_batch_events: i64,
    pub max_in_flight: i64,
    pub retry_after: String,
    pub browser_page: bool,
    pub header_read_timeout: String,
    pub idle_timeout: String,
    pub max_connections: i64,
    pub max_header_size: Size,
    pub allowed_origins: Vec<String>,
    pub body_read_timeout: String,
    pub wrap: Wrap,
}

#[derive(Debug, Deserialize)]
pub struct WebSocket {
    pub enabled: bool,
    pub path: String,
    pub require_subprotocol: bool,
    pub max_message_size: Size,
    pub outbound_queue_bytes: Size,
    /// Retired (the queue is bounded in bytes since issue 19): kept only to name its
    /// replacement in the error.
    #[serde(default)]
    pub outbound_queue: Option<toml::Value>,
    pub slow_consumer: String,
    pub publish_topic: String,
    pub max_connections: i64,
    pub ping_interval: String,
    pub max_filters: i64,
    pub allowed_origins: Vec<String>,
}

#[derive(Deserialize)]
pub struct Jwt {
    pub enabled: bool,
    pub secret: String,
    pub public_key_file: String,
    pub jwks_file: String,
    pub issuer: String,
    pub audience: String,
    pub leeway: String,
    pub user_claim: String,
    pub publish_claim: String,
    pub subscribe_claim: String,
    pub mqtt_username: String,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub deny_publish: Vec<String>,
    #[serde(default)]
    pub deny_subscribe: Vec<String>,
    #[serde(default)]
    pub client_id_prefixes: Vec<String>,
}

/// Rules without an `enabled` switch (`[auth.certificates]`).
#[derive(Debug, Deserialize)]
pub struct Rules {
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub deny_publish: Vec<String>,
    #[serde(default)]
    pub deny_subscribe: Vec<String>,
    #[serde(default)]
    pub client_id_prefixes: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct Anonymous {
    pub enabled: bool,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub deny_publish: Vec<String>,
    #[serde(default)]
    pub deny_subscribe: Vec<String>,
    #[serde(default)]
    pub client_id_prefixes: Vec<String>,
}

#[derive(Deserialize)]
pub struct User {
    pub name: String,
    pub password: Option<String>,
    #[serde(default)]
    pub certificate: bool,
    #[serde(default)]
    pub tokens: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub deny_publish: Vec<String>,
    #[serde(default)]
    pub deny_subscribe: Vec<String>,
    #[serde(default)]
    pub client_id_prefixes: Vec<String>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
pub struct Mqtt {
    pub enabled: bool,
    pub listen: String,
    pub max_connections: i64,
    pub max_packet_size: Size,
    pub connect_timeout: String,
    pub write_timeout: String,
    pub max_keep_alive: String,
    pub max_inflight: i64,
    pub max_queued: i64,
    pub max_subscriptions: i64,
    pub max_session_expiry: String,
    pub max_offline_sessions: i64,
    pub max_retained_messages: i64,
    pub max_retained_bytes: Size,
    pub max_retained_send_bytes: Size,
    pub max_client_id_len: i64,
    pub v5_outbound: String,
    pub v311_outbound: String,
    pub plain_messages: String,
    pub sys_interval: String,
    pub wrap_type: String,
    pub websocket_path: String,
    pub tls_listen: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub tls_client_ca_file: String,
    pub tls_client_auth: String,
    pub tls_identity: String,
}

#[derive(Deserialize)]
pub struct Amqp {
    pub enabled: bool,
    pub url: String,
    pub vhost: String,
    pub user: String,
    pub password: String,
    pub ca_file: String,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub heartbeat: String,
    pub connect_timeout: String,
    pub reconnect_min: String,
    pub reconnect_max: String,
    pub max_body_size: Size,
    #[serde(default)]
    pub sources: Vec<toml::Value>,
    #[serde(default)]
    pub sinks: Vec<toml::Value>,
}

impl std::fmt::Debug for Amqp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
pub struct AmqpSource {
    pub name: String,
    #[serde(default)]
    pub queue: String,
    #[serde(default)]
    pub exchange: String,
    #[serde(default)]
    pub binding_keys: Vec<String>,
    #[serde(default)]
    pub topic_prefix: String,
    #[serde(default = "default_prefetch")]
    pub prefetch: i64,
    #[serde(default)]
    pub wrap_source: String,
    #[serde(default = "default_amqp_wrap_type")]
    pub wrap_type: String,
    #[serde(default)]
    pub user: String,
}

fn default_prefetch() -> i64 {
    256
}

fn default_amqp_wrap_type() -> String {
    "io.meshgate.amqp.message".to_owned()
}

#[derive(Debug, Deserialize)]
pub struct AmqpSink {
    pub name: String,
    pub filter: String,
    #[serde(default)]
    pub exchange: String,
    #[serde(default = "default_routing_key")]
    pub routing_key: String,
    #[serde(default = "default_sink_mode")]
    pub mode: String,
    #[serde(default = "default_true")]
    pub persistent: bool,
    #[serde(default = "default_true")]
    pub mandatory: bool,
    #[serde(default = "default_prefetch")]
    pub max_in_flight: i64,
}

fn default_routing_key() -> String {
    "{topic}".to_owned()
}

fn default_sink_mode() -> String {
    "binary".to_owned()
}

fn default_true() -> bool {
    true
}
