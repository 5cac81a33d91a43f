//! meshgate-mqtt: IoT devices connect to meshgate as to any MQTT broker (3.1.1 and 5).
//!
//! The wire format is rumqttd's codec ([`codec`] works around what it keeps private); the
//! sessions are ours ([`session`]), so that every publish is authorized per topic and
//! acknowledged only after the backbone accepted it. MQTT payloads become CloudEvents per the
//! MQTT binding ([`binding`]).

pub mod admin;
pub mod binding;
pub mod codec;
mod keep_alive;
mod retained;
mod session;
mod sys;
mod tls;
pub mod websocket;

pub use tls::files as tls_files;

use meshgate_core::connections::{CloseReason, Connection};
use meshgate_core::metrics::{DropReason, ErrorKind};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use meshgate_config::MqttConfig;
use meshgate_core::live::Live;
use meshgate_core::metrics::{self, AdapterMetrics, Counter, Gauge};
use meshgate_core::{Adapter, AdapterContext, AdapterError, BoxFuture};
use tokio::net::TcpListener;

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
    /// The connected clients, by client id: each connection's registry entry, which says who
    /// holds it, tells it to go (takeover, shutdown) and tells when it has finished (its
    /// session parked or ended). One pointer per client (a map of client id to principal
    /// and tokens took ~180 bytes of every idle connection).
    clients: Mutex<HashSet<ClientEntry>>,
    /// The clock the clients' keep-alive is counted in ([`keep_alive::sweep`]).
    keep_alive: keep_alive::Clock,
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

/// A connected client in [`Shared::clients`], found by its client id.
struct ClientEntry(Arc<Connection>);

impl ClientEntry {
    fn client_id(&self) -> &str {
        // Registered with one (`session::connect::Registration`).
        self.0.client_id().unwrap_or_default()
    }
}

impl std::borrow::Borrow<str> for ClientEntry {
    fn borrow(&self) -> &str {
        self.client_id()
    }
}

impl std::hash::Hash for ClientEntry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes: `Borrow<str>` lookups must find it.
        self.client_id().hash(state);
    }
}

impl PartialEq for ClientEntry {
    fn eq(&self, other: &Self) -> bool {
        self.client_id() == other.client_id()
    }
}

impl Eq for ClientEntry {}

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
            clients: Mutex::new(HashSet::new()),
            keep_alive: keep_alive::Clock::default(),
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

    /// Registers `connection` (registered with its client id and principal) as the holder of
    /// its client id; an existing connection with the same id is told to go (session
    /// takeover) and returned, to wait for ([`Connection::finished`]). Registered after
    /// shutdown began, it is told to close at once (the shutdown walk may have passed).
    ///
    /// `Err(ClientIdTaken)` — nothing changed, nobody told to go — when the id is held by
    /// another principal: connected, or its session parked here. Checked under the clients'
    /// lock (the parked sessions' lock inside it), so two principals cannot both pass.
    fn register(
        &self,
        connection: &Arc<Connection>,
        principal: &meshgate_core::Principal,
    ) -> Result<Option<Arc<Connection>>, ClientIdTaken> {
        let client_id = connection.client_id().unwrap_or_default();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients
            .get(client_id)
            .is_some_and(|c| !c.0.is_held_by(principal))
            || !self.parked.held_by(client_id, principal)
        {
            return Err(ClientIdTaken);
        }
        let old = clients.replace(ClientEntry(connection.clone()));
        if self.ctx.shutdown.is_cancelled() {
            connection.close(CloseReason::Shutdown);
        }
        drop(clients);
        Ok(old.map(|old| {
            old.0.close(CloseReason::TakenOver);
            old.0
        }))
    }

    /// Whether `client_id` is connected here as `principal` (a CONNECT with it would take
    /// that connection over).
    fn connected_as(&self, client_id: &str, principal: &meshgate_core::Principal) -> bool {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .get(client_id)
            .is_some_and(|c| c.0.is_held_by(principal))
    }

    /// Whether a connection holds `client_id` here.
    fn is_connected(&self, client_id: &str) -> bool {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.contains(client_id)
    }

    /// Tells the connection of `client_id`, if there is one, to go (another instance takes
    /// the session over); it is returned, to wait for ([`Connection::finished`]).
    fn take_over(&self, client_id: &str) -> Option<Arc<Connection>> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let c = clients.get(client_id)?;
        c.0.close(CloseReason::TakenOver);
        Some(c.0.clone())
    }

    /// Removes `connection` from the clients, if it still holds its client id.
    fn unregister(&self, connection: &Connection) {
        let client_id = connection.client_id().unwrap_or_default();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients
            .get(client_id)
            .is_some_and(|c| c.0.id() == connection.id())
        {
            clients.remove(client_id);
        }
    }

    /// Tells every connected client to close (at shutdown: after delivering what it holds).
    fn close_all(&self, reason: CloseReason) {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for c in clients.iter() {
            c.0.close(reason);
        }
    }

    /// Tells the clients silent past their keep-alive at tick `now` to close.
    fn close_silent(&self, now: u32) {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for c in clients.iter() {
            if c.0.idle_past_limit(now) {
                c.0.close(CloseReason::KeepAlive);
            }
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
            // Keep-alive, and at shutdown the word to close: connections wait on their
            // registry entry, not on a timer and the shutdown token each.
            let sweep = tokio::spawn(keep_alive::sweep(shared.clone()));
            let sys = tokio::spawn(sys::publish_every_interval(shared.clone()));
            accept_loop(listener, shared, ctx, None).await;
            releases.abort();
            sys.abort();
            // The accept loop ended at shutdown: so does the sweep, telling everyone to close.
            let _ = sweep.await;
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
        // Both held for the connection's life.
        let held = (SocketSlot(shared.clone()), ip_permit);
        let shared = shared.clone();
        match &tls {
            None => {
                let peer = session::Peer::new(Some(peer), session::Transport::Tcp);
                ctx.tracker
                    .spawn(session::run(stream, shared, peer, None, held));
            }
            // A task of its own type: a TLS connection's state is large, and in a common
            // future it would make every plain connection's task as large.
            Some(acceptor) => {
                let acceptor = acceptor.acceptor();
                ctx.tracker
                    .spawn(run_tls(stream, shared, acceptor, peer, held));
            }
        }
    }
}

/// The TLS handshake (within the connect timeout, like CONNECT), then the session.
async fn run_tls(
    stream: tokio::net::TcpStream,
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    peer: std::net::SocketAddr,
    held: impl Send + 'static,
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
                    session::run(tls_stream, shared, peer, user, held).await
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
