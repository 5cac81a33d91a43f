//! meshgate-mqtt: IoT devices connect to meshgate as to any MQTT broker (3.1.1 and 5).
//!
//! The wire format is rumqttd's codec ([`codec`] works around what it keeps private); the
//! sessions are ours ([`session`]), so that every publish is authorized per topic and
//! acknowledged only after the backbone accepted it. MQTT payloads become CloudEvents per the
//! MQTT binding ([`binding`]).

pub mod admin;
pub mod binding;
pub mod codec;
mod retained;
mod session;
mod sys;
mod tls;
pub mod websocket;

pub use tls::files as tls_files;

use meshgate_core::metrics::{DropReason, ErrorKind};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use meshgate_config::MqttConfig;
use meshgate_core::live::Live;
use meshgate_core::metrics::{self, AdapterMetrics, Counter, Gauge};
use meshgate_core::{Adapter, AdapterContext, AdapterError, BoxFuture};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Adapter name in metrics and logs.
pub const ADAPTER: &str = "mqtt";

/// Sockets accepted beyond `mqtt.max_connections` only to answer CONNACK "server busy".
const BUSY_HEADROOM: usize = 64;

/// State shared by the connections of one listener.
pub(crate) struct Shared {
    /// The `[mqtt]` section in force: a reload ([`MqttAdapter::limits`]) may change its limits,
    /// read where each is checked (a connection's announced Receive Maximum and packet size
    /// stay as its CONNACK said); the rest needs a restart.
    config: Live<MqttConfig>,
    /// `mqtt.plain_messages`, `v5_outbound`, `v311_outbound` (restart-only), read per
    /// delivery: copied here so the hot path does not load the live section.
    modes: OutboundModes,
    ctx: AdapterContext,
    metrics: AdapterMetrics,
    /// Connected client ids → their connection id, takeover token, and the token cancelled when
    /// that connection has finished (its session parked or ended).
    clients: Mutex<HashMap<String, Client>>,
    /// Persistent sessions whose client is away.
    parked: session::parked::Parked,
    /// Subscriptions of all sessions, connected or parked.
    subscriptions: Gauge,
    /// Open sockets (counted at accept, so a flood of idle sockets counts too).
    sockets: AtomicUsize,
    retained: retained::Retained,
    /// The backbone acknowledges publishes remotely (JetStream, NATS core): pipeline inbound
    /// PUBLISHes.
    pipeline: bool,
    /// QoS 0 PUBLISHes are pipelined too (JetStream), not settled inline (memory, NATS core).
    pipeline_qos0: bool,
    /// The backbone hands events to this process's subscribers directly (memory): a publish
    /// can make another session runnable on this thread at once.
    in_process: bool,
    /// PUBLISHes accepted from clients, per QoS 0/1/2.
    in_by_qos: [Counter; 3],
    /// PUBLISHes delivered to clients (QoS 0 written, QoS 1 acknowledged, QoS 2 completed).
    out_by_qos: [Counter; 3],
    /// Bytes read from and written to clients' sockets (`$SYS/broker/bytes/*`), counted per
    /// read and per write batch.
    bytes_in: Counter,
    bytes_out: Counter,
    /// `mqtt.wrap_type`, shared by every connection's wrapper instead of copied into each.
    wrap_type: Arc<str>,
}

/// Puts a reloaded `[mqtt]` section in force (see [`MqttAdapter::limits`]).
#[derive(Clone)]
pub struct MqttLimits(Arc<Shared>);

impl std::fmt::Debug for MqttLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MqttLimits").finish_non_exhaustive()
    }
}

impl MqttLimits {
    /// From now on: new connections take `config`'s bounds; connected ones hold to the
    /// Receive Maximum and packet size their CONNACK announced and meet the other limits
    /// (`max_queued`, `max_subscriptions`, `max_session_expiry`, ...) at their next check;
    /// the retained store and the parked sessions keep what they hold over lowered bounds.
    /// Only the limits may differ from the running section (the reload checks that).
    pub fn set(&self, config: &MqttConfig) {
        let shared = &self.0;
        shared
            .retained
            .set_limits(config.max_retained_messages, config.max_retained_bytes);
        shared.parked.set_limit(config.max_offline_sessions);
        shared.config.set(config.clone());
    }
}

/// How deliveries are encoded (see [`Shared::modes`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutboundModes {
    pub(crate) plain: meshgate_config::PlainMessages,
    pub(crate) v5: meshgate_config::Mqtt5Mode,
    pub(crate) v311: meshgate_config::Mqtt311Mode,
}

struct Client {
    /// Who holds the client id: only the same principal may take it over.
    principal: meshgate_core::Principal,
    connection: u64,
    takeover: CancellationToken,
    finished: CancellationToken,
}

impl Shared {
    /// The state of one listener's connections (also what the session tests run on).
    fn new(config: &MqttConfig, ctx: &AdapterContext) -> Arc<Shared> {
        let metrics = ctx.metrics(ADAPTER);
        let by_qos = |name: &'static str, qos: &str| {
            ctx.registry
                .counter(name, &[("adapter", ADAPTER), ("qos", qos)])
        };
        Arc::new(Shared {
            in_by_qos: [0, 1, 2].map(|q| by_qos(metrics::MQTT_IN_BY_QOS, &q.to_string())),
            out_by_qos: [0, 1, 2].map(|q| by_qos(metrics::MQTT_OUT_BY_QOS, &q.to_string())),
            retained: retained::Retained::new(
                &ctx.backbone,
                config.max_retained_messages,
                config.max_retained_bytes,
                metrics.dropped(DropReason::RetainedLimit).clone(),
                ctx.registry
                    .error_counter(ADAPTER, ErrorKind::RetainedStore),
            ),
            pipeline: ctx.backbone.publish_round_trips(),
            pipeline_qos0: ctx.backbone.publish_round_trips() && ctx.backbone.qos0_round_trips(),
            in_process: ctx.backbone.delivers_in_process(),
            wrap_type: Arc::from(config.wrap_type.as_str()),
            modes: OutboundModes {
                plain: config.plain_messages,
                v5: config.v5_outbound,
                v311: config.v311_outbound,
            },
            config: Live::new(config.clone()),
            ctx: ctx.clone(),
            metrics,
            clients: Mutex::new(HashMap::new()),
            parked: session::parked::Parked::new(
                config.max_offline_sessions,
                ctx.registry
                    .gauge(metrics::MQTT_SESSIONS_OFFLINE, &[("adapter", ADAPTER)]),
            ),
            subscriptions: ctx
                .registry
                .gauge(metrics::MQTT_SUBSCRIPTIONS, &[("adapter", ADAPTER)]),
            sockets: AtomicUsize::new(0),
            bytes_in: ctx
                .registry
                .counter(metrics::MQTT_BYTES_RECEIVED, &[("adapter", ADAPTER)]),
            bytes_out: ctx
                .registry
                .counter(metrics::MQTT_BYTES_SENT, &[("adapter", ADAPTER)]),
        })
    }

    fn over_capacity(&self) -> bool {
        self.sockets.load(Ordering::Acquire) > self.config.read().max_connections
    }

    /// Past the limit and the few sockets kept to answer "server busy": new sockets are
    /// closed (TCP) or refused (WebSocket upgrades) at once.
    fn at_hard_cap(&self) -> bool {
        self.sockets.load(Ordering::Acquire)
            >= self
                .config
                .read()
                .max_connections
                .saturating_add(BUSY_HEADROOM)
    }

    /// Registers a client id for `principal`; an existing connection with the same id is told
    /// to go (session takeover) and its `finished` token is returned, to wait for.
    ///
    /// `Err(ClientIdTaken)` — nothing changed, nobody told to go — when the id is held by
    /// another principal: connected, or its session parked here. Checked under the clients'
    /// lock (the parked sessions' lock inside it), so two principals cannot both pass.
    fn register(
        &self,
        client_id: &str,
        principal: &meshgate_core::Principal,
        connection: u64,
        takeover: &CancellationToken,
        finished: &CancellationToken,
    ) -> Result<Option<CancellationToken>, ClientIdTaken> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients
            .get(client_id)
            .is_some_and(|c| c.principal != *principal)
            || !self.parked.held_by(client_id, principal)
        {
            return Err(ClientIdTaken);
        }
        let new = Client {
            principal: principal.clone(),
            connection,
            takeover: takeover.clone(),
            finished: finished.clone(),
        };
        let Some(old) = clients.insert(client_id.to_owned(), new) else {
            return Ok(None);
        };
        old.takeover.cancel();
        Ok(Some(old.finished))
    }

    /// Whether `client_id` is connected here as `principal` (a CONNECT with it would take
    /// that connection over).
    fn connected_as(&self, client_id: &str, principal: &meshgate_core::Principal) -> bool {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .get(client_id)
            .is_some_and(|c| c.principal == *principal)
    }

    /// Whether a connection holds `client_id` here.
    fn is_connected(&self, client_id: &str) -> bool {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.contains_key(client_id)
    }

    /// Tells the connection of `client_id`, if there is one, to go (another instance takes
    /// the session over); its `finished` token is returned, to wait for.
    fn take_over(&self, client_id: &str) -> Option<CancellationToken> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let c = clients.get(client_id)?;
        c.takeover.cancel();
        Some(c.finished.clone())
    }

    fn unregister(&self, client_id: &str, connection: u64) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients
            .get(client_id)
            .is_some_and(|c| c.connection == connection)
        {
            clients.remove(client_id);
        }
    }
}

/// A client id held by another principal (a connection or a kept session): it is not taken
/// over (MQTT 5 CONNACK 0x85, 3.1.1 0x02).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientIdTaken;

/// A bound MQTT listener (and TLS listener, when configured), ready to run as an [`Adapter`].
pub struct MqttAdapter {
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<(TcpListener, Arc<tls::ReloadingAcceptor>)>,
}

impl std::fmt::Debug for MqttAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAdapter")
            .field("listen", &self.local_addr())
            .finish()
    }
}

/// The MQTT listeners, bound and not yet serving: a gateway binds every listener before it
/// connects to its backbone, so an outgoing connection cannot take a port it is about to
/// listen on (an ephemeral port can equal a configured one).
pub struct MqttListeners {
    listener: TcpListener,
    tls: Option<(TcpListener, Arc<tls::ReloadingAcceptor>)>,
}

impl std::fmt::Debug for MqttListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttListeners")
            .field("listen", &self.listener.local_addr().ok())
            .finish()
    }
}

impl MqttListeners {
    /// Binds `mqtt.listen` and, when configured, `mqtt.tls_listen` (its certificate is read
    /// here too, so a bad one fails the start before anything connects anywhere).
    pub async fn bind(config: &MqttConfig) -> Result<MqttListeners, AdapterError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| AdapterError::Bind {
                    key: "mqtt.listen",
                    addr: config.listen,
                    source,
                })?;
        let tls = match &config.tls {
            None => None,
            Some(t) => {
                let acceptor =
                    Arc::new(tls::acceptor(t).map_err(|e| AdapterError::Other(e.into()))?);
                let listener =
                    TcpListener::bind(t.listen)
                        .await
                        .map_err(|source| AdapterError::Bind {
                            key: "mqtt.tls_listen",
                            addr: t.listen,
                            source,
                        })?;
                Some((listener, acceptor))
            }
        };
        Ok(MqttListeners { listener, tls })
    }

    /// The MQTT over TLS listener's acceptor, when configured: what a configuration reload
    /// gives new certificates to.
    pub fn tls_acceptor(&self) -> Option<Arc<meshgate_core::tls_server::ReloadingAcceptor>> {
        self.tls.as_ref().map(|(_, acceptor)| acceptor.clone())
    }
}

impl MqttAdapter {
    /// Binds `config.listen` (so the address is known before the gateway reports it).
    pub async fn bind(
        config: &MqttConfig,
        ctx: &AdapterContext,
    ) -> Result<MqttAdapter, AdapterError> {
        Ok(MqttAdapter::new(
            MqttListeners::bind(config).await?,
            config,
            ctx,
        ))
    }

    /// The adapter on listeners bound before (see [`MqttListeners`]).
    pub fn new(listeners: MqttListeners, config: &MqttConfig, ctx: &AdapterContext) -> MqttAdapter {
        MqttAdapter {
            shared: Shared::new(config, ctx),
            listener: listeners.listener,
            tls: listeners.tls,
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The MQTT over TLS listener's address, when configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The broker's sessions and retained messages, for the admin API.
    pub fn admin(&self) -> admin::MqttAdmin {
        admin::MqttAdmin::new(self.shared.clone())
    }

    /// The handle a configuration reload puts a new `[mqtt]` section in force with.
    pub fn limits(&self) -> MqttLimits {
        MqttLimits(self.shared.clone())
    }

    /// MQTT over WebSocket at `mqtt.websocket_path`, sharing this broker's sessions, for the
    /// gateway's web listener.
    pub fn websocket_router(&self) -> Option<axum::Router> {
        let path = self.shared.config.read().websocket_path.clone()?;
        Some(websocket::router(&path, self.shared.clone()))
    }
}

/// Counts a socket for as long as its task runs.
struct SocketSlot(Arc<Shared>);

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Adapter for MqttAdapter {
    fn name(&self) -> &'static str {
        ADAPTER
    }

    fn run(self: Box<Self>, ctx: AdapterContext) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            let MqttAdapter {
                shared,
                listener,
                tls,
            } = *self;
            let tls_loop = tls.map(|(listener, acceptor)| {
                tokio::spawn(accept_loop(
                    listener,
                    shared.clone(),
                    ctx.clone(),
                    Some(acceptor),
                ))
            });
            // Sessions kept by the backbone move between instances on request.
            let releases = tokio::spawn(session::stored::serve_releases(shared.clone()));
            let sys = tokio::spawn(sys::publish_every_interval(shared.clone()));
            accept_loop(listener, shared, ctx, None).await;
            releases.abort();
            sys.abort();
            if let Some(t) = tls_loop {
                let _ = t.await;
            }
            Ok(())
        })
    }
}

/// Accepts sockets until shutdown; each runs its session in its own task (after the TLS
/// handshake, for the TLS listener).
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    ctx: AdapterContext,
    tls: Option<Arc<tls::ReloadingAcceptor>>,
) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "mqtt: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Past the limit, a few more sockets are taken so they can be told "server busy" in
        // their CONNACK; beyond that they are closed at once, so a flood of sockets cannot
        // exhaust file descriptors.
        if shared.at_hard_cap() {
            shared.metrics.error(ErrorKind::TooManyConnections);
            drop(stream);
            continue;
        }
        // Per source address (`gateway.max_connections_per_ip`): refused before anything is
        // read, by closing — there is no CONNECT yet to answer.
        let ip_permit = match ctx.limits.acquire_ip(peer.ip()) {
            Ok(p) => p,
            Err(e) => {
                shared.metrics.error(e.metric_kind());
                tracing::debug!(%peer, "mqtt: {e}");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        session::set_tcp_keepalive(&stream);
        shared.sockets.fetch_add(1, Ordering::AcqRel);
        let slot = SocketSlot(shared.clone());
        let shared = shared.clone();
        let tls = tls.clone();
        ctx.tracker.spawn(async move {
            // Both held for the connection's life.
            let (_slot, _ip_permit) = (slot, ip_permit);
            match tls {
                None => {
                    let peer = session::Peer::new(Some(peer), session::Transport::Tcp);
                    session::run(stream, shared, peer, None).await
                }
                // Boxed: a TLS connection's state is large, and inline it would make every
                // plain connection's task as large (idle connection memory, issue 3).
                Some(acceptor) => {
                    let acceptor = acceptor.acceptor();
                    Box::pin(run_tls(stream, shared, acceptor, peer)).await
                }
            }
        });
    }
}

/// The TLS handshake (within the connect timeout, like CONNECT), then the session.
async fn run_tls(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    peer: std::net::SocketAddr,
) {
    let timeout = shared.config.read().connect_timeout;
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let kind = shared
                .config
                .read()
                .tls
                .as_ref()
                .map_or(meshgate_config::CertificateIdentity::CommonName, |t| {
                    t.identity
                });
            match tls::identity(&tls_stream, kind) {
                Ok(user) => {
                    let peer = session::Peer::new(Some(peer), session::Transport::Tls);
                    session::run(tls_stream, shared, peer, user).await
                }
                Err(()) => {
                    // Verified, but it names nobody: refused at the TLS layer (no CONNECT yet).
                    tracing::debug!(%peer, "mqtt: a client certificate without a user name");
                    shared.metrics.error(ErrorKind::Unauthorized);
                }
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "mqtt: TLS handshake failed");
            shared.metrics.error(ErrorKind::TlsHandshake);
        }
        Err(_) => shared.metrics.error(ErrorKind::TlsHandshakeTimeout),
    }
}
