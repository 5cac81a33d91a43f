//! The typed, validated configuration every crate consumes. Produced only by [`crate::load`]
//! (or `Default`, which equals the embedded defaults), so its values are always valid.

use std::net::SocketAddr;
use std::time::Duration;

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub backbone: BackboneConfig,
    pub http: HttpConfig,
    pub websocket: WebSocketConfig,
    pub mqtt: MqttConfig,
    pub amqp: AmqpConfig,
    pub auth: AuthConfig,
    pub tracing: TracingConfig,
    /// `[[triggers]]`: filtered push delivery to HTTP subscribers (more come from the admin
    /// API at run time).
    pub triggers: Vec<crate::TriggerConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// Identifies this instance as the origin of the events it publishes. `None`: a fresh
    /// UUIDv7 at every start.
    pub instance_id: Option<String>,
    /// How long shutdown may take to settle in-flight work before the process exits anyway.
    pub shutdown_grace: Duration,
    /// Threads of the async runtime; `None`: one per CPU core.
    pub worker_threads: Option<usize>,
    /// Connections one source address may hold across MQTT, WebSocket and MQTT over WebSocket
    /// (0: no cap).
    pub max_connections_per_ip: usize,
    /// Connections one authenticated user may hold across those listeners (0: no cap;
    /// anonymous clients are bounded per address instead).
    pub max_connections_per_user: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// A `tracing` filter directive, e.g. `info` or `meshgate_http=debug,info`.
    pub level: String,
    pub format: LogFormat,
}

/// `[tracing]`: spans per hop, exported over OTLP (HTTP/protobuf); see docs/tracing.md.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// Off (the default): no span is recorded and no trace context is read or written.
    pub enabled: bool,
    /// Where spans are sent: the full OTLP/HTTP traces URL (`http://host:4318/v1/traces`).
    pub endpoint: String,
    /// The share of new traces recorded (0.0 to 1.0); a trace that arrives with a context
    /// follows its parent's sampled flag.
    pub sample_ratio: f64,
    /// The `service.name` of every span.
    pub service_name: String,
    /// How long one export request may take.
    pub export_timeout: Duration,
    /// Finished spans held for export; more are dropped (a slow or absent collector costs
    /// spans, never events).
    pub max_queued_spans: usize,
}

#[derive(Clone, PartialEq)]
pub struct AdminConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// HTTPS instead of HTTP.
    pub tls: Option<ServerTlsConfig>,
    /// Connections the admin listener holds at once; more are closed at accept.
    pub max_connections: usize,
    /// Bearer token the admin API (`/connections`, `/sessions`, `/retained`, `/amqp/links`,
    /// `/triggers`, `/reload`) requires; `None`: the API answers 403 (the
    /// health, readiness and metrics endpoints need none).
    pub api_token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackboneKind {
    Memory,
    Nats,
    JetStream,
}

/// What the in-memory backbone does when a subscriber's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullQueuePolicy {
    /// The publisher waits for room, up to `block_timeout`; then the publish fails (the client
    /// gets 503 / "server busy") and the event is dropped for that subscriber, counted.
    Block,
    /// The event is dropped for that subscriber and counted; the publisher does not wait.
    Drop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryBackboneConfig {
    /// Capacity of each subscriber's queue, in events.
    pub queue_capacity: usize,
    pub full_policy: FullQueuePolicy,
    pub block_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackboneConfig {
    pub kind: BackboneKind,
    pub memory: MemoryBackboneConfig,
    pub nats: NatsBackboneConfig,
    pub jetstream: JetStreamConfig,
}

/// The JetStream backbone: NATS connection settings from `backbone.nats`, plus the stream and
/// the delivery policy.
#[derive(Debug, Clone, PartialEq)]
pub struct JetStreamConfig {
    /// Stream holding the events (subjects `<subject_prefix>.>`), created or updated at start.
    pub stream: String,
    pub max_age: Duration,
    pub max_bytes: u64,
    pub replicas: usize,
    /// Publishes with the same `Nats-Msg-Id` (CloudEvent `source` + `id`) within this window are
    /// stored once.
    pub duplicate_window: Duration,
    /// A delivery not acknowledged within this time is delivered again.
    pub ack_wait: Duration,
    /// Waits before the 2nd, 3rd, … delivery (replace `ack_wait` when set).
    pub backoff: Vec<Duration>,
    /// Deliveries of one event to one subscription before it goes to the dead-letter subject.
    pub max_deliver: i64,
    /// Events delivered `max_deliver` times without acknowledgement are republished here
    /// (`None`: dropped and counted).
    pub dead_letter_subject: Option<String>,
    /// NATS connections publishing to the stream; one publisher's events always take the same.
    pub publish_connections: usize,
    /// Longest wait for the stream's PubAck: past it the publish is refused (the client
    /// retries; `Nats-Msg-Id` stores the retry once). A publish whose connection drops is
    /// refused at once.
    pub publish_timeout: Duration,
    /// Bytes the MQTT retained-message KV bucket (`<stream>_RETAINED`) may hold on the server;
    /// past it a retained message is not stored (counted).
    pub retained_max_bytes: u64,
    /// Bytes the MQTT session KV bucket (`<stream>_SESSIONS`) may hold on the server.
    pub sessions_max_bytes: u64,
    /// Largest value either KV bucket accepts (one retained event, one session record).
    pub kv_max_value_size: usize,
    /// How subscriptions read the stream (decision 0080).
    pub subscriptions: JetStreamSubscriptions,
}

/// How the JetStream backbone's subscriptions read the stream (decision 0080).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JetStreamSubscriptions {
    /// A durable pull consumer per subscription (and per subject of its filter).
    ConsumerEach,
    /// One consumer per gateway instance, matched locally; durable subscriptions keep a
    /// cursor in a KV bucket and read what they missed by direct get. Queue groups keep a
    /// consumer per group.
    InstanceFeed,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsWireMode {
    /// The JSON format with `Content-Type: application/cloudevents+json` (keeps Integer and
    /// Boolean extension types).
    Structured,
    /// Data as the payload, every attribute as a percent-encoded `ce-` header.
    Binary,
}

/// The NATS core backbone.
#[derive(Clone, PartialEq)]
pub struct NatsBackboneConfig {
    /// Server URLs (`nats://host:port`, `tls://host:port`), tried in turn.
    pub urls: Vec<String>,
    /// Subjects are `<subject_prefix>.<topic>`; "" for none.
    pub subject_prefix: String,
    pub wire_mode: NatsWireMode,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// TLS to NATS: a CA to trust besides the system's, and a client certificate (mTLS). Read
    /// at each connection, so a replaced file is used from the next reconnect on.
    pub tls: NatsTlsConfig,
    /// NKey authentication: a `.creds` file (user JWT + seed) or an NKey seed file.
    pub nkey: Option<NatsNkey>,
    /// How long start-up waits for the first connection before serving anyway (not ready).
    pub connect_timeout: Duration,
    /// Messages the NATS client buffers per subscription; beyond it they are dropped (slow
    /// consumer) and counted.
    pub subscription_capacity: usize,
    /// Bytes (headers and payload) buffered per subscription at most, besides
    /// `subscription_capacity` messages; beyond it messages are dropped (slow consumer).
    pub subscription_bytes: usize,
    /// The server's `max_control_line`: a publish or subscription whose protocol line would be
    /// longer (a long topic) is refused instead of sent, because the server would close the
    /// shared connection.
    pub max_control_line: usize,
}

/// How meshgate proves its NKey to NATS.
#[derive(Debug, Clone, PartialEq)]
pub enum NatsNkey {
    /// `backbone.nats.credentials_file`: a user JWT and its seed (as `nsc` writes them).
    CredentialsFile(std::path::PathBuf),
    /// `backbone.nats.nkey_seed_file`: an NKey seed alone.
    SeedFile(std::path::PathBuf),
}

impl NatsNkey {
    /// The file and its config key.
    pub fn file(&self) -> (&std::path::Path, &'static str) {
        match self {
            NatsNkey::CredentialsFile(p) => (p, "backbone.nats.credentials_file"),
            NatsNkey::SeedFile(p) => (p, "backbone.nats.nkey_seed_file"),
        }
    }
}

/// TLS files of the NATS connections (`backbone.nats.ca_file`, `tls_cert_file`, `tls_key_file`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NatsTlsConfig {
    pub ca_file: Option<std::path::PathBuf>,
    /// The client certificate chain and key, PEM; both or neither.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl std::fmt::Debug for NatsBackboneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials never reach logs.
        f.debug_struct("NatsBackboneConfig")
            .field("urls", &self.urls)
            .field("subject_prefix", &self.subject_prefix)
            .field("wire_mode", &self.wire_mode)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("nkey", &self.nkey)
            .field("connect_timeout", &self.connect_timeout)
            .field("subscription_capacity", &self.subscription_capacity)
            .field("subscription_bytes", &self.subscription_bytes)
            .field("max_control_line", &self.max_control_line)
            .finish()
    }
}

/// The CloudEvent attributes given to wrapped (non-CloudEvents) payloads.
#[derive(Debug, Clone, PartialEq)]
pub struct WrapConfig {
    /// `source` of wrapped events (a URI-reference).
    pub source: String,
    /// `type` of wrapped events.
    pub event_type: String,
}

/// The web listener (HTTP ingress, WebSocket, browser page) and HTTP ingress settings.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// HTTPS and WSS instead of HTTP and WS on the web listener.
    pub tls: Option<ServerTlsConfig>,
    /// Ingress route prefix: `POST {events_path}/{topic}`.
    pub events_path: String,
    /// Largest accepted request body in bytes (at least 64 KiB, the spec's minimum).
    pub max_body_size: usize,
    /// Largest number of events in one batch request.
    pub max_batch_events: usize,
    /// Ingress requests handled at once; beyond that the reply is 503 with Retry-After.
    pub max_in_flight: usize,
    /// Value of `Retry-After` on 429/503 replies.
    pub retry_after: Duration,
    /// Serve the example browser page at `GET /`.
    pub browser_page: bool,
    /// A request head must arrive within this time: from accept for a connection's first
    /// request, from the request's first byte on a keep-alive connection.
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections the web listener holds at once (HTTP, WebSocket, MQTT over WebSocket),
    /// counted at accept.
    pub max_connections: usize,
    /// Largest request head in bytes, request line included; 431 above it.
    pub max_header_size: usize,
    /// Origins allowed to POST events from a browser (`*`: any); empty: the request's own
    /// host only. Requests without `Origin` are allowed.
    pub allowed_origins: Vec<String>,
    /// Time for an ingress request's body to arrive completely; 408 after it.
    pub body_read_timeout: Duration,
    pub wrap: WrapConfig,
}

/// What happens to a WebSocket client whose outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// Close the connection with 1008 (policy violation) and reason "slow consumer".
    Disconnect,
    /// Drop the event for that client and count it.
    Drop,
}

/// Where a WebSocket client's published event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishTopic {
    /// The event's `subject` is the topic (events without one are refused).
    Subject,
    /// Always this topic.
    Fixed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct WebSocketConfig {
    pub enabled: bool,
    /// Route of the CloudEvents WebSocket endpoint on the web listener.
    pub path: String,
    /// `true`: a handshake without the `cloudevents.json` subprotocol gets 400. `false`: JSON
    /// is assumed (compatibility mode for clients that cannot set subprotocols).
    pub require_subprotocol: bool,
    /// Largest accepted message in bytes.
    pub max_message_size: usize,
    /// Bytes of events (their JSON text plus a fixed per-entry cost) queued for one connection
    /// before the slow-consumer policy applies; an event always fits into an empty queue.
    pub outbound_queue_bytes: usize,
    pub slow_consumer: SlowConsumerPolicy,
    pub publish_topic: PublishTopic,
    pub max_connections: usize,
    /// Interval of server pings that keep idle connections alive through proxies; a client
    /// silent (not even a pong) for two intervals is closed with 1001.
    pub ping_interval: Duration,
    /// Topic filters one connection may hold.
    pub max_filters: usize,
    /// Origins allowed to open a WebSocket on the web listener (`*`: any); empty: the
    /// request's own host only. Requests without `Origin` (not from a browser) are allowed.
    pub allowed_origins: Vec<String>,
}

/// Publish/subscribe permissions: MQTT-style topic filters; `{user}` is the principal's name,
/// `{clientid}` the MQTT client id (a rule with it matches nothing for clients without one).
/// A topic is allowed when an allow filter matches it and no deny filter does: a deny wins,
/// whatever the order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AclConfig {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    pub deny_publish: Vec<String>,
    pub deny_subscribe: Vec<String>,
    /// MQTT client ids must start with one of these (`{user}` allowed); empty: any.
    pub client_id_prefixes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AnonymousConfig {
    pub enabled: bool,
    pub acl: AclConfig,
}

#[derive(Clone, PartialEq)]
pub struct UserConfig {
    pub name: String,
    pub password: Option<String>,
    /// May log in with a client certificate naming it (MQTT over TLS).
    pub certificate: bool,
    pub tokens: Vec<String>,
    pub acl: AclConfig,
}

impl std::fmt::Debug for UserConfig {
    /// Never prints passwords or tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tokens", &self.tokens.len())
            .field("acl", &self.acl)
            .finish()
    }
}

/// JSON Web Tokens as credentials (`[auth.jwt]`).
#[derive(Clone, PartialEq)]
pub struct JwtConfig {
    pub enabled: bool,
    /// HMAC secret (HS256/384/512), at least 32 bytes.
    pub secret: Option<String>,
    /// A PEM public key (RSA, EC P-256/P-384, Ed25519).
    pub public_key_file: Option<std::path::PathBuf>,
    /// A JSON Web Key Set file, reloaded when it changes.
    pub jwks_file: Option<std::path::PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: std::time::Duration,
    pub user_claim: String,
    pub publish_claim: String,
    pub subscribe_claim: String,
    /// MQTT: the CONNECT user name must be the token's user (`mqtt_username = "claim"`).
    pub match_mqtt_username: bool,
    /// Rules of token users the config does not list as users.
    pub acl: AclConfig,
}

impl std::fmt::Debug for JwtConfig {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("enabled", &self.enabled)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("public_key_file", &self.public_key_file)
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("user_claim", &self.user_claim)
            .field("match_mqtt_username", &self.match_mqtt_username)
            .field("acl", &self.acl)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub anonymous: AnonymousConfig,
    pub users: Vec<UserConfig>,
    /// Start even when anonymous clients may publish or subscribe on a listener bound to a
    /// non-loopback address (otherwise that refuses to start).
    pub allow_anonymous_on_public: bool,
    /// Accept passwords written in plain text (development only; otherwise each
    /// `auth.users[].password` must be a hash from `meshgate passwd`).
    pub allow_plaintext_passwords: bool,
    /// Failed logins a source address or a user may have within `failed_login_window` before
    /// its logins are refused until the window ends; 0 turns the limit off.
    pub max_failed_logins: u32,
    pub failed_login_window: std::time::Duration,
    pub jwt: JwtConfig,
    /// Rules of clients whose verified certificate names a user the config does not list.
    pub certificates: AclConfig,
}

/// How events are written to MQTT 5 subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mqtt5Mode {
    /// Data as the payload, attributes as user properties, `datacontenttype` as Content Type.
    Binary,
    /// The JSON format as the payload, Content Type `application/cloudevents+json`.
    Structured,
}

/// How a message an MQTT client published as a plain payload (not a CloudEvent) reaches MQTT
/// subscribers. Other protocols always see it as the CloudEvent it was wrapped into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlainMessages {
    /// As a broker forwards it: the payload bytes, with Content Type, User Properties (all, in
    /// order), Payload Format Indicator, Response Topic, Correlation Data and Message Expiry
    /// unaltered (MQTT 5 §3.3.2.3); 3.1.1 subscribers get the payload bytes.
    #[default]
    AsPublished,
    /// As the CloudEvent it was wrapped into, in `v5_outbound` / `v311_outbound` mode.
    CloudEvents,
}

/// How events are written to MQTT 3.1.1 subscribers (which have no properties).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mqtt311Mode {
    /// The JSON format as the payload (the binding's only mode for 3.1.1).
    Structured,
    /// The bare data bytes, for legacy devices that cannot parse CloudEvents.
    Data,
}

/// The MQTT 3.1.1/5 broker listener.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// Largest packet accepted or sent, in bytes.
    pub max_packet_size: usize,
    /// A socket that sends no CONNECT within this time is closed.
    pub connect_timeout: Duration,
    /// Longest one write to a client's socket may block (a client that stops reading, a zero
    /// TCP window); then the connection is closed and counted (`kind="write_timeout"`).
    pub write_timeout: Duration,
    /// Longest MQTT keep-alive granted, whole seconds (1 to 65,535): MQTT 5 clients asking
    /// for 0 (none) or more are told this as Server Keep Alive; MQTT 3.1.1 clients asking
    /// for more are refused (keep-alive 0 stays allowed there, see
    /// docs/decisions/hardening/mqtt-encoding-and-protocol-errors.md).
    pub max_keep_alive: Duration,
    /// QoS 1/2 messages in flight per direction (the MQTT 5 Receive Maximum we announce).
    pub max_inflight: u16,
    /// Events queued for one client before further ones are dropped and counted.
    pub max_queued: usize,
    /// Subscriptions one client (session) may hold; each is a backbone subscription (a NATS
    /// subscription, a JetStream consumer), so one client cannot make the bus carry thousands.
    pub max_subscriptions: usize,
    /// Longest a disconnected persistent session is kept: MQTT 5 Session Expiry Intervals are
    /// capped to it, MQTT 3.1.1 sessions with clean-session 0 are kept this long.
    pub max_session_expiry: Duration,
    /// Disconnected persistent sessions kept at once; past it a session ends at disconnect
    /// (counted as dropped `session_limit`).
    pub max_offline_sessions: usize,
    /// Topics with a retained message in the in-memory store; past it a new topic's retained
    /// message is delivered but not retained (counted).
    pub max_retained_messages: usize,
    /// Bytes (topic + event JSON) the in-memory retained store may hold; likewise.
    pub max_retained_bytes: usize,
    /// Bytes of retained messages one SUBSCRIBE may queue for its client (with at most
    /// `max_queued` messages); the rest are dropped and counted.
    pub max_retained_send_bytes: usize,
    /// Longest client identifier accepted in CONNECT, in bytes.
    pub max_client_id_len: usize,
    pub v5_outbound: Mqtt5Mode,
    pub v311_outbound: Mqtt311Mode,
    /// How messages MQTT clients published as plain payloads reach MQTT subscribers.
    pub plain_messages: PlainMessages,
    /// How often the `$SYS/broker/...` statistics are published; zero: never.
    pub sys_interval: Duration,
    /// `type` of wrapped (non-CloudEvents) payloads.
    pub wrap_type: String,
    /// Route for MQTT over WebSocket (subprotocol `mqtt`) on the web listener; `None`: off.
    pub websocket_path: Option<String>,
    /// MQTT over TLS (conventionally port 8883); `None`: off.
    pub tls: Option<MqttTlsConfig>,
}

/// The MQTT over TLS listener: same sessions as the plain one.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttTlsConfig {
    pub listen: SocketAddr,
    /// PEM file with the server certificate chain (leaf first).
    pub cert_file: std::path::PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
    /// The CA that signs client certificates (mTLS).
    pub client_ca_file: Option<std::path::PathBuf>,
    pub client_auth: ClientAuthMode,
    /// A verified client certificate's user name: its subject CN, or its first SAN.
    pub identity: CertificateIdentity,
}

/// Whether TLS clients present certificates (`mqtt.tls_client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMode {
    None,
    Optional,
    Required,
}

/// Which name of a client certificate is the user (`mqtt.tls_identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateIdentity {
    CommonName,
    SubjectAltName,
}

/// HTTPS on a web or admin listener: the certificate chain and key, PEM files (reloaded when
/// they change).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTlsConfig {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
}

/// The AMQP 0.9.1 bridge (RabbitMQ): sources consume queues into the mesh, sinks publish mesh
/// events to exchanges. Each source and sink has its own connection, re-established after any
/// failure.
#[derive(Clone, PartialEq)]
pub struct AmqpConfig {
    pub enabled: bool,
    /// `amqp://host:port` or `amqps://host:port` (TLS); no credentials and no vhost in it.
    pub url: String,
    pub vhost: String,
    pub user: String,
    pub password: String,
    /// PEM file with CA certificates for the broker's certificate (amqps), trusted in addition
    /// to the system's root certificates; `None`: the system roots only.
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate chain and key (PEM) for brokers that verify clients (amqps).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Heartbeat interval proposed to the broker (0: none).
    pub heartbeat: Duration,
    /// How long one connection attempt (TCP, TLS, AMQP handshake) may take.
    pub connect_timeout: Duration,
    /// First wait before reconnecting after a failure; doubled after each failed attempt up
    /// to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Largest message body a source takes, checked against the size the content header
    /// announces before any of the body is read; larger messages are rejected (requeue=false)
    /// and counted (`reason="too_large"`).
    pub max_body_size: usize,
    pub sources: Vec<AmqpSourceConfig>,
    pub sinks: Vec<AmqpSinkConfig>,
}

impl std::fmt::Debug for AmqpConfig {
    /// Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("enabled", &self.enabled)
            .field("url", &self.url)
            .field("vhost", &self.vhost)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("max_body_size", &self.max_body_size)
            .field("sources", &self.sources)
            .field("sinks", &self.sinks)
            .finish()
    }
}

/// One queue consumed into the mesh.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpSourceConfig {
    /// Names the source in logs, metrics and the connection name.
    pub name: String,
    /// The queue to consume. With `exchange` set, meshgate declares it (durable) and binds it.
    pub queue: String,
    /// Exchange to bind `queue` to with `binding_keys`; `None`: the queue must exist.
    pub exchange: Option<String>,
    pub binding_keys: Vec<String>,
    /// Topic levels put before the routing key's (`legacy` + `orders.eu` → `legacy/orders/eu`).
    pub topic_prefix: Option<String>,
    /// Unacknowledged deliveries RabbitMQ sends ahead (basic.qos prefetch count).
    pub prefetch: u16,
    /// `source` of wrapped (non-CloudEvents) messages.
    pub wrap_source: String,
    /// `type` of wrapped messages.
    pub wrap_type: String,
    /// The `[[auth.users]]` user whose publish ACL the source's events are checked against
    /// (refused ones are rejected to the dead-letter exchange); `None`: the source may publish
    /// anywhere (it is the operator's).
    pub user: Option<String>,
}

/// How events are written to AMQP (CE-BINDINGS.md §6 policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmqpMode {
    /// Data as the body, `datacontenttype` as `content_type`, every other attribute as a
    /// `cloudEvents_<name>` header (Integer and Boolean keep their types).
    Binary,
    /// The JSON format as the body, `content_type: application/cloudevents+json`.
    Structured,
}

/// One topic filter published to an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpSinkConfig {
    pub name: String,
    /// Mesh events whose topic matches this filter are published.
    pub filter: String,
    /// Exchange to publish to ("" is the default exchange: the routing key names a queue).
    pub exchange: String,
    /// Routing key template: literal text with `{topic}` (the topic as a routing key,
    /// `a/b` → `a.b`) and `{type}` (the event type).
    pub routing_key: String,
    pub mode: AmqpMode,
    /// Delivery mode 2 (persistent) instead of 1.
    pub persistent: bool,
    /// Publish with the mandatory flag: messages no queue takes are returned, counted and logged.
    pub mandatory: bool,
    /// Publishes awaiting their confirm at once.
    pub max_in_flight: usize,
}
