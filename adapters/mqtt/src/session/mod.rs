//! One MQTT connection: CONNECT/CONNACK, then the packet loop.
//!
//! One task per connection owns the socket and polls the session's backbone subscriptions
//! directly, as one stream set (no task per subscription: one wake-up per delivered message).
//! Deliveries beyond the client's in-flight window wait in `pending` (at most `mqtt.max_queued`);
//! past that the stream set is not polled, so backpressure reaches the backbone queue and its
//! full-queue policy decides (block the publishers, or drop and count).
//! Inbound PUBLISHes are acknowledged (PUBACK/PUBREC) only after the backbone accepted the
//! event: one at a time where the backbone answers at once (memory, NATS core); up to
//! `mqtt.max_inflight` at once, answered in arrival order, where it answers after a round trip
//! (JetStream's PubAck).
//!
//! This module: [`Session`] and its construction, packet dispatch ([`Session::handle`],
//! [`next_step`]), the connection loop ([`run_session`]) and its end ([`finish`]).
//! Submodules, one phase or concern each:
//! - [`connect`]: the CONNECT phase, in steps from reading CONNECT to CONNACK (client id,
//!   authentication, registration and takeover, resuming a kept session);
//! - [`inbound`]: the client's PUBLISHes (authorization, the backbone's answer, PUBACK/PUBREC),
//!   the QoS 2 inbound handshake and the will;
//! - [`outbound`]: routing deliveries, the in-flight window, QoS 1/2 handshakes to the client,
//!   retransmission;
//! - [`aliases`]: MQTT 5 topic aliases, both ways;
//! - [`subscribe`]: SUBSCRIBE/UNSUBSCRIBE and retained messages;
//! - [`parked`]: persistent sessions while the client is away;
//! - [`stored`]: persistent sessions kept by the backbone (JetStream), movable between
//!   instances.

mod aliases;
mod connect;
mod inbound;
mod outbound;
pub(crate) mod parked;
mod reauthorize;
pub(crate) mod stored;
mod subscribe;
#[cfg(test)]
mod tests;

use meshgate_core::metrics::{DropReason, ErrorKind};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meshgate_core::connections::CloseReason;
use meshgate_core::{Origin, Principal};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PingResp, PublishProperties, QoS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Shared;
use crate::codec::{self, Version};
use aliases::TopicAliases;
use connect::{Registration, connect_phase};
use inbound::{Inbound, Will};
use outbound::{DeliveryStreams, Window, next_queued};
use subscribe::Subscription;

/// The hasher of the session's maps keyed by packet id: SipHash with fixed keys, a zero-sized
/// builder instead of `RandomState`'s 16 bytes in each of three maps of every connection (idle
/// connection memory). The keys are u16 packet ids from the client, at most the in-flight
/// window of them per map, so there is no flood of colliding keys to fear.
type PacketIdHasher = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// Why a connection ended, for logs and for the will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT from the client: no will.
    Normal,
    /// Socket closed or failed, keep-alive expired, protocol error: the will is published.
    Abnormal,
    /// Closed by the gateway (shutdown, takeover): the will is published (MQTT 5 §3.1.2.5).
    Server,
}

/// One client's session: its connection state and, for persistent sessions, what outlives
/// the connection (subscriptions, queued and in-flight messages, packet ids), which is handed to
/// [`parked`] at disconnect and back at reconnect.
struct Session {
    shared: Arc<Shared>,
    version: Version,
    client_id: String,
    /// Wraps this client's plain payloads (source naming the client, configured type).
    wrapper: meshgate_core::wrap::Wrapper,
    principal: Principal,
    /// Origin of this session's publishes (kept across reconnects, for no-local).
    origin: Origin,
    /// Largest packet the client accepts (MQTT 5 CONNECT property; u32::MAX: no limit).
    client_max_packet: u32,
    /// Our Receive Maximum and largest packet, as this connection's CONNACK announced them
    /// ([`connect::Terms`]).
    own_receive_max: u16,
    own_max_packet: u32,
    out: BytesMut,
    subscriptions: Vec<Subscription>,
    /// The subscriptions' delivery streams; created at the first subscription, so an idle
    /// connection has none.
    streams: Option<DeliveryStreams>,
    /// Messages to the client: the in-flight window and the deliveries waiting for it.
    window: Window,
    /// Deliveries to acknowledge to the backbone after the next socket write (QoS 0 sent,
    /// copies skipped); empty unless the backbone has acknowledgements (JetStream).
    settle: Vec<meshgate_core::Delivery>,
    /// PUBLISHes from the client: with the backbone, or in a QoS 2 handshake.
    inbound: Inbound,
    will: Will,
    /// How long the session outlives its connection (zero: it ends with it), in milliseconds
    /// ([`Session::expiry`]; 8 bytes where a `Duration` takes 16 of an idle connection's).
    expiry_ms: u64,
    /// Session Expiry Interval the client sent in CONNECT (MQTT 5), in seconds.
    requested_expiry: u32,
    /// Topic aliases, both ways (MQTT 5); they last as long as the connection.
    aliases: TopicAliases,
    /// This connection in the admin API's registry: it is told there to close (another
    /// connection takes over this client id, an operator, shutdown, keep-alive expired).
    live: Arc<meshgate_core::connections::Connection>,
    /// Revision of the record in the backbone's session store (see [`stored`]) this session
    /// last read or wrote; 0: the session has nothing stored.
    store_revision: u64,
    /// A QoS 1/2 publish was accepted since the last write: its acknowledgement waits until
    /// the deliveries it caused on this instance went out (see [`run_session`]). Here, not in
    /// [`Inbound`]: it is the write batch's, and beside `version` it takes no padding.
    acked_publish: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        let n = i64::try_from(self.subscriptions.len()).unwrap_or(i64::MAX);
        self.shared.subscriptions.add(-n);
    }
}

/// `d` in whole milliseconds (saturating: `u64::MAX` ms is half a billion years).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Session {
    /// How long the session outlives its connection (zero: it ends with it).
    fn expiry(&self) -> Duration {
        Duration::from_millis(self.expiry_ms)
    }

    /// A new session for a client admitted by the CONNECT phase, holding `registration`.
    fn new(
        shared: &Arc<Shared>,
        registration: &Registration,
        client_id: String,
        principal: Principal,
        wrapper: meshgate_core::wrap::Wrapper,
        terms: &connect::Terms,
        will: Will,
    ) -> Session {
        Session {
            origin: shared.ctx.origin(registration.connection()),
            shared: shared.clone(),
            version: terms.version,
            wrapper,
            client_id,
            principal,
            client_max_packet: u32::try_from(terms.max_packet).unwrap_or(u32::MAX),
            own_receive_max: terms.own_receive_max,
            own_max_packet: terms.own_max_packet,
            out: BytesMut::new(),
            subscriptions: Vec::new(),
            streams: None,
            window: Window::new(terms.receive_max),
            settle: Vec::new(),
            inbound: Inbound::default(),
            will,
            expiry_ms: millis(terms.expiry),
            requested_expiry: terms.requested_expiry,
            aliases: TopicAliases::new(terms.alias_max),
            live: registration.listed.connection().clone(),
            store_revision: 0,
            acked_publish: false,
        }
    }

    /// Takes over what a persistent session kept from its previous connection.
    fn resume(&mut self, old: &mut Session) {
        self.subscriptions = std::mem::take(&mut old.subscriptions);
        self.list_subscriptions();
        self.streams = old.streams.take();
        self.window.resume(&mut old.window);
        self.inbound.resume(&mut old.inbound);
        self.origin = old.origin.clone();
        // The old will is not sent: the client is back (MQTT 5 §3.1.3.2.2).
        old.will.cancel();
    }
}

/// The QoS of a number kept with an envelope or a stored subscription (0 for anything else).
fn to_qos(n: u8) -> QoS {
    codec::qos(n).unwrap_or(QoS::AtMostOnce)
}

/// Most QoS meshgate grants to a subscription.
const MAX_GRANTED_QOS: QoS = QoS::ExactlyOnce;

/// Where a connection comes from, as its listener knows it. The address is kept as its parts:
/// a `SocketAddr` (32 bytes, for an IPv6 flow label and scope nobody reads here) would grow
/// every connection's future (see `an_idle_connections_future_stays_small`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    ip: Option<std::net::IpAddr>,
    port: u16,
    transport: Transport,
}

/// How the client reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Tcp,
    Tls,
    WebSocket,
}

impl Peer {
    pub(crate) fn new(addr: Option<std::net::SocketAddr>, transport: Transport) -> Peer {
        Peer {
            ip: addr.map(|a| a.ip()),
            port: addr.map_or(0, |a| a.port()),
            transport,
        }
    }

    fn ip(&self) -> Option<std::net::IpAddr> {
        self.ip
    }

    /// How the admin API lists the connection.
    fn listing(&self, version: Version) -> Listing {
        Listing {
            protocol: match self.transport {
                Transport::Tcp => "mqtt",
                Transport::Tls => "mqtts",
                Transport::WebSocket => "mqtt-ws",
            },
            version: match version {
                Version::V311 => "3.1.1",
                Version::V5 => "5",
            },
            peer: self.ip.map(|ip| std::net::SocketAddr::new(ip, self.port)),
        }
    }
}

/// What the admin API's registry shows of an MQTT connection besides its client id and user.
pub(super) struct Listing {
    protocol: &'static str,
    version: &'static str,
    peer: Option<std::net::SocketAddr>,
}

/// Handles a new connection (TCP, or a WebSocket bridged to a byte stream) from `peer` until
/// it ends: the future its task runs. `certificate_user`: the user a verified client
/// certificate names (MQTT over TLS with client certificates), which the connection is
/// instead of its CONNECT credentials. `held` is kept as long as the connection (its socket
/// slot and per-address permit).
///
/// Two phases, one after the other in the task: the connect phase, boxed (large: a CONNECT
/// being read, authentication, the session store; over within `mqtt.connect_timeout`), then
/// the packet loop, made from what the connect phase returned. `then` holds one phase or the
/// other, never both, and nothing of the first (its arguments included) stays beside the
/// packet loop: this future is an idle connection's task, its memory (decision 0020,
/// `an_idle_connections_task_stays_small`).
pub(crate) fn run<S, H>(
    stream: S,
    shared: Arc<Shared>,
    peer: Peer,
    certificate_user: Option<String>,
    held: H,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Send + 'static,
{
    use futures_util::FutureExt as _;
    Box::pin(connect(stream, shared, peer, certificate_user)).then(move |connected| {
        futures_util::future::OptionFuture::from(connected.map(|c| run_session(c, held)))
            .map(|_| ())
    })
}

/// What the connect phase hands the packet loop.
struct Connected<S> {
    stream: S,
    /// What the client sent after CONNECT, already read.
    buf: BytesMut,
    session: Session,
    /// The keep-alive granted, in seconds (0: none).
    keep_alive: u16,
    /// The client id's claim, released after the session was parked or ended.
    registration: Registration,
}

/// The connect phase, within `mqtt.connect_timeout`: `None` when the connection ended in it.
async fn connect<S>(
    mut stream: S,
    shared: Arc<Shared>,
    peer: Peer,
    certificate_user: Option<String>,
) -> Option<Connected<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut buf = BytesMut::with_capacity(512);
    let timeout = shared.config.read().connect_timeout;
    let connect = tokio::time::timeout(
        timeout,
        connect_phase(&mut stream, &mut buf, &shared, peer, certificate_user),
    )
    .await;
    let Ok(Some((session, keep_alive, registration))) = connect else {
        if connect.is_err() {
            shared.metrics.error(ErrorKind::ConnectTimeout);
        }
        return None;
    };
    Some(Connected {
        stream,
        buf,
        session,
        keep_alive,
        registration,
    })
}

/// TCP keep-alive of MQTT sockets: probes after this long idle, then every
/// [`TCP_KEEPALIVE_INTERVAL`], [`TCP_KEEPALIVE_RETRIES`] times. A peer that vanished (power
/// loss, NAT timeout) is then found within about 2 minutes even when its MQTT keep-alive is 0
/// (3.1.1) — otherwise such a half-open connection would hold its slot and session forever.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 6;

/// Turns on TCP keep-alive (SO_KEEPALIVE with the timers above) on an accepted socket; a
/// failure is logged, the connection is served anyway.
pub(crate) fn set_tcp_keepalive(stream: &tokio::net::TcpStream) {
    let params = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE_IDLE);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "freebsd"
    ))]
    let params = params
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "mqtt: cannot set TCP keep-alive");
    }
}

/// Deliveries are written in batches of up to this many bytes.
const WRITE_BATCH: usize = 64 * 1024;

/// A busy connection reads this much at a time (an idle one, 64 bytes). Payloads are slices
/// of the read buffer, so a queued message keeps its chunk alive: larger chunks would pin more
/// memory per message waiting for an offline session.
const READ_CHUNK: usize = 16 * 1024;

/// How long a closing connection waits for its pending inbound publishes.
const INBOUND_DRAIN: Duration = Duration::from_secs(5);

/// At shutdown, how long a connection keeps delivering what its subscriptions still hold (the
/// backbone is closed first, so they end once empty) and waiting for the client's
/// acknowledgements, before DISCONNECT 0x8B. Within the gateway's `shutdown_grace` (10 s by
/// default), as the WebSocket connections' drain is.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// Ends a connection's part of a session: a persistent session is parked (its will published
/// now, or by the parked session after the Will Delay Interval); otherwise the session ends
/// here and its will, if any, is published.
async fn finish(mut session: Session, end: End) {
    if end == End::Normal {
        session.will.cancel();
    }
    let shared = session.shared.clone();
    if !session.expiry().is_zero() {
        if session.will.delay.is_none() {
            Box::pin(session.publish_will()).await;
        }
        if !Box::pin(session.leave_stored()).await {
            // Another instance holds the session now: nothing is left here.
            session.will.cancel();
            return;
        }
        session.out = BytesMut::new();
        session.aliases.clear();
        match shared.parked.park(session) {
            Ok(()) => return,
            // Saved in the backbone's session store: it stays there (any instance resumes it,
            // and whoever finds it expired discards it) even though this instance cannot keep
            // a placeholder. Ending it would delete what the client will come back for: at
            // SIGTERM with more connected sessions than `mqtt.max_offline_sessions`, every one
            // past the limit was deleted (issue 27: 9,700 of 19,700 sessions lost at a restart).
            // Its delayed will is not published, as when its holder dies.
            Err(s) if s.store_revision != 0 => {
                tracing::debug!(
                    client_id = s.client_id,
                    "mqtt: offline session limit reached; the session stays in the session store only"
                );
                return;
            }
            Err(s) => {
                shared.metrics.dropped(DropReason::SessionLimit).inc();
                session = *s;
            }
        }
    }
    Box::pin(session.end_stored()).await;
    Box::pin(session.publish_will()).await;
}

enum Flow {
    Continue,
    End(End),
}

fn qos_min(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

impl Session {
    fn write(&mut self, packet: Packet) {
        if let Err(e) = codec::write(self.version, packet, &mut self.out) {
            // Nothing was written (see `codec::write`); counted, as it should never happen.
            tracing::warn!(error = %e, "mqtt: cannot encode packet");
            self.shared.metrics.error(ErrorKind::Encode);
        }
    }

    /// MQTT 5 DISCONNECT with a reason; 3.1.1 has none (the socket is just closed).
    fn disconnect(&mut self, reason: DisconnectReasonCode) {
        if self.version == Version::V5 {
            // rumqttd 0.20 counts an empty property block as zero bytes but writes one, so the
            // frame is malformed unless there is a property: always send a reason string.
            let properties = rumqttd::protocol::DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(format!("{reason:?}")),
                user_properties: Vec::new(),
                server_reference: None,
            };
            self.write(Packet::Disconnect(
                Disconnect {
                    reason_code: reason,
                },
                Some(properties),
            ));
        }
    }

    async fn handle(&mut self, packet: Packet, meta: Option<codec::PublishMeta>) -> Flow {
        self.reauthorize();
        if self.subscriptions.iter().any(|s| s.revoked) {
            // Boxed: rare, and its awaits would otherwise grow every connection's future.
            Box::pin(self.finish_revocations()).await;
        }
        match packet {
            Packet::Publish(p, props) => {
                let meta = meta.unwrap_or_else(|| codec::publish_meta(&p));
                self.handle_publish(p, props, meta).await
            }
            Packet::PubAck(ack, _) => {
                self.on_puback(ack.pkid).await;
                Flow::Continue
            }
            Packet::PubRec(rec, _) => {
                self.on_pubrec(rec.pkid, rec.reason).await;
                Flow::Continue
            }
            Packet::PubComp(comp, _) => {
                self.on_pubcomp(comp.pkid);
                Flow::Continue
            }
            Packet::PubRel(rel, _) => {
                self.on_pubrel(rel.pkid);
                Flow::Continue
            }
            Packet::Subscribe(sub, props) => {
                if props.as_ref().is_some_and(|p| p.id == Some(0)) {
                    // MQTT 5 §3.8.2.1.2: a Subscription Identifier of 0 is a protocol error.
                    self.shared.metrics.error(ErrorKind::Protocol);
                    self.disconnect(DisconnectReasonCode::ProtocolError);
                    return Flow::End(End::Abnormal);
                }
                self.handle_subscribe(sub.pkid, sub.filters, props).await;
                Flow::Continue
            }
            Packet::Unsubscribe(unsub, _) => {
                self.handle_unsubscribe(unsub.pkid, &unsub.filters).await;
                Flow::Continue
            }
            Packet::PingReq(_) => {
                self.write(Packet::PingResp(PingResp));
                Flow::Continue
            }
            Packet::Disconnect(d, props) => {
                if let Some(e) = props.and_then(|p| p.session_expiry_interval) {
                    if self.requested_expiry == 0 && e > 0 {
                        // MQTT 5 §3.14.2.2.2: a session that was to end with the connection
                        // cannot be made persistent at DISCONNECT.
                        self.shared.metrics.error(ErrorKind::Protocol);
                        self.disconnect(DisconnectReasonCode::ProtocolError);
                        return Flow::End(End::Abnormal);
                    }
                    self.expiry_ms = millis(
                        Duration::from_secs(u64::from(e))
                            .min(self.shared.config.read().max_session_expiry),
                    );
                }
                if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                    Flow::End(End::Abnormal)
                } else {
                    Flow::End(End::Normal)
                }
            }
            // A second CONNECT, or packets only a server sends.
            other => {
                // Only the packet's kind: a second CONNECT's `Debug` prints its password
                // (rumqttd's `Login` derives it).
                let kind = match other {
                    Packet::Connect(..) => "CONNECT",
                    _ => "a packet only a server sends",
                };
                tracing::debug!(packet = kind, "mqtt: unexpected packet");
                self.shared.metrics.error(ErrorKind::Protocol);
                self.disconnect(DisconnectReasonCode::ProtocolError);
                Flow::End(End::Abnormal)
            }
        }
    }
}

/// What the next buffered packet needs.
enum Step<'a> {
    /// No complete packet buffered.
    NeedMore,
    /// Handled.
    Done(Flow),
    /// The rest of its handling, which waits (boxed: see [`run_session`]).
    Wait(std::pin::Pin<Box<dyn std::future::Future<Output = Flow> + Send + 'a>>),
}

/// Reads and handles the next buffered packet as far as that needs no waiting.
fn next_step<'a>(
    session: &'a mut Session,
    shared: &'a Shared,
    buf: &mut BytesMut,
    max: usize,
) -> Step<'a> {
    // The common case first, without rumqttd's reader: an MQTT 3.1.1 PUBLISH to a backbone
    // that settles it at once (memory; NATS core at QoS 0), not retained (flag bit 0; a
    // retained one goes the long way: the retained store waits). A QoS 0 PUBLISH settled
    // inline while QoS 1/2 ones are pipelined may reach the backbone before them: MQTT orders
    // per topic and QoS only (3.1.1 §4.6).
    if session.version == Version::V311
        && buf
            .first()
            .is_some_and(|b| b & 1 == 0 && inline(shared, b & 0x06 == 0))
        && let Some(p) = codec::read_publish_v311(buf, max)
    {
        return publish_step(session, shared, p, None);
    }
    let meta = codec::peek_publish_meta(buf);
    match codec::read(session.version, buf, max) {
        Ok(Some(Packet::Publish(p, props)))
            if !p.retain
                && inline(
                    shared,
                    meta.as_ref().is_some_and(|m| m.qos == QoS::AtMostOnce),
                ) =>
        {
            let meta = meta.unwrap_or_else(|| codec::publish_meta(&p));
            publish_step(
                session,
                shared,
                codec::InPublish::from_rumqttd(p, meta),
                props.as_ref(),
            )
        }
        Ok(Some(packet)) => Step::Wait(Box::pin(session.handle(packet, meta))),
        Ok(None) => Step::NeedMore,
        Err(e) => {
            tracing::debug!(error = %e, client_id = session.client_id, "mqtt: malformed packet");
            shared.metrics.error(ErrorKind::Malformed);
            let reason = match e {
                rumqttd::protocol::Error::PayloadSizeLimitExceeded(_) => {
                    DisconnectReasonCode::PacketTooLarge
                }
                _ => DisconnectReasonCode::MalformedPacket,
            };
            session.disconnect(reason);
            Step::Done(Flow::End(End::Abnormal))
        }
    }
}

/// Whether a PUBLISH (`qos0`: at QoS 0) is settled inline ([`publish_step`]) rather than
/// pipelined.
fn inline(shared: &Shared, qos0: bool) -> bool {
    !shared.pipeline || (qos0 && !shared.pipeline_qos0)
}

/// A PUBLISH to a backbone that settles publishes at once ([`Session::publish_now`]).
fn publish_step<'a>(
    session: &'a mut Session,
    shared: &'a Shared,
    p: codec::InPublish,
    props: Option<&PublishProperties>,
) -> Step<'a> {
    match session.publish_now(shared, &p, props) {
        Ok(flow) => Step::Done(flow),
        Err(pending) => Step::Wait(Box::pin(async move {
            let r = pending.await;
            session.published(p.meta.qos, p.meta.pkid, r)
        })),
    }
}

/// The connection's packet loop, from CONNACK to its end; then the session is parked or ended
/// and the client id's claim released.
///
/// A plain function returning an `async move` block, not an `async fn`, and what it gets is
/// taken apart before the block: rustc keeps an async fn's arguments as upvars *and* moves
/// them into locals, so a 536-byte `Session` took its space twice in every idle connection's
/// future (1,744 bytes; 1,136 this way). One socket, no `tokio::io::split`: reads and writes
/// never run at once here (writes happen between polls of the `select!`), and split costs a
/// shared allocation and a lock per operation.
fn run_session<S, H>(
    connected: Connected<S>,
    held: H,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    H: Send + 'static,
{
    let Connected {
        mut stream,
        mut buf,
        mut session,
        keep_alive,
        registration,
    } = connected;
    async move {
        let shared = session.shared.clone();
        let max = session.own_max_packet as usize;
        // The keep-alive (1.5 times it without a complete packet closes the connection) is
        // counted by the listener's sweep (`crate::keep_alive`), from now.
        session.live.set_idle_limit(
            crate::keep_alive::limit(keep_alive),
            shared.keep_alive.now(),
        );
        // Told to close through the registry entry (takeover, an operator, shutdown): polled
        // in place each turn (its waker kept in the entry), no waiter of a token's list in
        // every idle connection's future.
        let live = session.live.clone();
        let mut busy = false;
        let mut out_hint = 0;
        // Set once shutdown began: the connection delivers what its subscriptions still hold until
        // they ended and the client acknowledged everything, or this deadline. Boxed and made only
        // then: a second timer in every idle connection's future would cost memory for an event
        // that happens once per process.
        let mut draining: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let end = 'conn: loop {
            // Handle every complete packet already buffered (while the backbone keeps up).
            let mut got_packet = false;
            loop {
                if session.inbound_full() {
                    break;
                }
                // No packet is held in this future across an await: `next_step` handles what it
                // can at once and boxes the rest (a `Packet` is 392 bytes, and this future is an
                // idle connection's memory).
                match next_step(&mut session, &shared, &mut buf, max) {
                    Step::NeedMore => break,
                    Step::Done(flow) => {
                        got_packet = true;
                        if let Flow::End(e) = flow {
                            break 'conn e;
                        }
                    }
                    Step::Wait(rest) => {
                        got_packet = true;
                        if let Flow::End(e) = rest.await {
                            break 'conn e;
                        }
                    }
                }
            }
            // Keep-alive counts from the last complete packet (one shared load per batch).
            if got_packet {
                live.touch(shared.keep_alive.now());
            }
            if !session.out.is_empty() {
                if std::mem::take(&mut session.acked_publish) && shared.in_process {
                    // Let the subscribers this batch of publishes woke (on the memory backbone,
                    // runnable on this thread next) write their deliveries before the PUBACKs go
                    // out, as Mosquitto does: a delivery should not wait behind the publisher's
                    // acknowledgement. Once per batch, not per message; not over NATS, where
                    // deliveries come back through the server anyway.
                    tokio::task::yield_now().await;
                }
                // Bounded: a client that stops reading (a zero TCP window) must not pin this task
                // and, through its full queues, the publishers (F3). The timer is only made when
                // the socket is not writable at once (the common case needs none: no clock read, no
                // timer handle per batch).
                let written = {
                    use futures_util::FutureExt as _;
                    let mut write = std::pin::pin!(stream.write_all(&session.out));
                    match write.as_mut().now_or_never() {
                        Some(r) => Ok(r),
                        None => {
                            // Read here (a reload may have changed it), not kept in the future.
                            let write_timeout = shared.config.read().write_timeout;
                            tokio::time::timeout(write_timeout, write).await
                        }
                    }
                };
                match written {
                    Ok(Ok(())) => shared.bytes_out.add(session.out.len() as u64),
                    Ok(Err(_)) => break End::Abnormal,
                    Err(_) => {
                        shared.metrics.error(ErrorKind::WriteTimeout);
                        tracing::debug!(client_id = session.client_id, "mqtt: write timed out");
                        session.out = BytesMut::new();
                        break End::Abnormal;
                    }
                }
                // Give the buffer back: an idle connection holds no write buffer. How much was
                // written is the size to start the next batch with, instead of growing the buffer
                // by doubling (a copy each time) from nothing for every batch.
                out_hint = session.out.len().min(WRITE_BATCH);
                session.out = BytesMut::new();
            } else if session.out.capacity() != 0 {
                // Reserved for deliveries that wrote nothing (window full, no-local, expired).
                session.out = BytesMut::new();
            }
            if !session.settle.is_empty() {
                session.settle().await;
            }
            if draining.is_some()
                && session.streams.as_ref().is_none_or(|s| s.is_empty())
                && session.window.is_idle()
            {
                // Everything the subscriptions held was delivered and acknowledged.
                session.disconnect(DisconnectReasonCode::ServerShuttingDown);
                break End::Server;
            }
            // Idle connections keep a small read buffer; busy ones read in larger chunks.
            if buf.is_empty() {
                buf = BytesMut::with_capacity(if busy { READ_CHUNK } else { 64 });
            }
            // What the admin API shows of this connection's load (two loads when unchanged).
            session
                .live
                .set_load(session.window.pending.len(), session.window.in_flight());
            tokio::select! {
                biased;
                reason = std::future::poll_fn(|cx| live.poll_closed(cx)), if draining.is_none() => {
                    match reason {
                        CloseReason::Shutdown => {
                            draining = Some(Box::pin(tokio::time::sleep(SHUTDOWN_DRAIN)));
                            continue;
                        }
                        CloseReason::Operator => {
                            tracing::info!(client_id = session.client_id, "mqtt: closed by an operator (admin API)");
                            session.disconnect(DisconnectReasonCode::AdministrativeAction);
                        }
                        CloseReason::TakenOver => {
                            session.disconnect(DisconnectReasonCode::SessionTakenOver);
                        }
                        CloseReason::KeepAlive => {
                            shared.metrics.error(ErrorKind::KeepAliveTimeout);
                            session.disconnect(DisconnectReasonCode::KeepAliveTimeout);
                            break End::Abnormal;
                        }
                    }
                    break End::Server;
                }
                () = async { if let Some(t) = draining.as_mut() { t.await } }, if draining.is_some() => {
                    // What is still not delivered is lost with this connection (kept in the stored
                    // session on JetStream, and redelivered there).
                    let undelivered = session.window.undelivered();
                    if undelivered > 0 {
                        shared.metrics.dropped(DropReason::Shutdown).add(undelivered as u64);
                    }
                    session.disconnect(DisconnectReasonCode::ServerShuttingDown);
                    break End::Server;
                }
                Some((qos, pkid, r)) = session.inbound.next_answer() => {
                    if let Flow::End(e) = session.published(qos, pkid, r) {
                        break e;
                    }
                    // The answers already in as well, so their PUBACKs go out in one write (a
                    // JetStream PubAck per publish otherwise costs a write each).
                    while let Some((qos, pkid, r)) = session.inbound.ready_answer() {
                        if let Flow::End(e) = session.published(qos, pkid, r) {
                            break 'conn e;
                        }
                    }
                }
                r = stream.read_buf(&mut buf), if !session.inbound_full() => match r {
                    Ok(0) | Err(_) => break End::Abnormal,
                    Ok(n) => {
                        busy = n >= 64;
                        shared.bytes_in.add(n as u64);
                    }
                },
                // While the in-flight window and `pending` are full, deliveries wait in the queue
                // (and behind it, in the backbone), until the client acknowledges.
                // `None`: the last subscription ended (the backbone closed at shutdown). Matched,
                // not filtered by the pattern: a `Some(q) =` pattern would leave this `select!`
                // waiting on the other branches, so a draining connection would sit until its
                // drain deadline instead of disconnecting now (the check at the loop's top).
                // `mqtt.max_queued` read at each turn: a reload reaches connected clients.
                q = next_queued(&mut session.streams), if session.window.pending.len() < shared.config.read().max_queued => {
                    let Some(q) = q else { continue };
                    if session.out.capacity() == 0 && out_hint > 1024 {
                        session.out.reserve(out_hint);
                    }
                    session.deliver(q);
                    let pending_limit = shared.config.read().max_queued;
                    // Take what else is ready without waiting, so writes are batched.
                    while session.window.pending.len() < pending_limit && session.out.len() < WRITE_BATCH {
                        let Some(q) = session.streams.as_mut().and_then(|s| s.try_next()) else {
                            break;
                        };
                        session.deliver(q);
                    }
                }
            }
        };
        // Publishes the client sent before it left still reach the backbone (a QoS 0 publish
        // followed by DISCONNECT must not be lost).
        if let Some(mut inbound) = session.inbound.take_at_backbone() {
            use futures_util::StreamExt;
            let drain = async {
                while let Some((qos, pkid, r)) = inbound.next().await {
                    let _ = session.published(qos, pkid, r);
                }
            };
            if tokio::time::timeout(INBOUND_DRAIN, drain).await.is_err() {
                shared.metrics.error(ErrorKind::InboundDrainTimeout);
            }
        }
        if !session.out.is_empty() {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), stream.write_all(&session.out)).await;
        }
        // Bounded too: a TLS close_notify is a write.
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        shared.metrics.connections.dec();
        tracing::debug!(client_id = session.client_id, ?end, "mqtt disconnected");
        // Boxed, like packet handling: only the last moments of a connection need it.
        Box::pin(finish(session, end)).await;
        // Released only now, after the session was parked or ended.
        drop(registration);
        drop(held);
    }
}
