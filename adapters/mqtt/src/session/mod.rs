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
//! Submodules: [`outbound`] (routing, in-flight window, QoS 1/2 handshakes, retransmission),
//! [`subscribe`] (SUBSCRIBE/UNSUBSCRIBE), [`parked`] (persistent sessions while the client is
//! away).

mod outbound;
pub(crate) mod parked;
pub(crate) mod stored;
mod subscribe;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meshgate_core::{BoxFuture, Credentials, Origin, Principal, PublishError, Published, Topic};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill,
    LastWillProperties, Login, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason,
    PubRec, PubRecReason, PublishProperties, QoS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::binding::{self, Inbound};
use crate::codec::{self, ConnectProbe, Version};
use outbound::{DeliveryStreams, Inflight, Outgoing, next_queued};
use subscribe::Subscription;

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
    /// Largest packet the client accepts (MQTT 5 CONNECT property).
    client_max_packet: usize,
    /// How many QoS 1/2 messages we may have unacknowledged at the client.
    client_receive_max: usize,
    out: BytesMut,
    subscriptions: Vec<Subscription>,
    /// The subscriptions' delivery streams; created at the first subscription, so an idle
    /// connection has none.
    streams: Option<DeliveryStreams>,
    /// Deliveries waiting for a free slot in the in-flight window (or for the client to return).
    pending: VecDeque<Outgoing>,
    /// QoS 1/2 messages sent and not yet fully acknowledged.
    inflight: HashMap<u16, Inflight>,
    /// Deliveries to acknowledge to the backbone after the next socket write (QoS 0 sent,
    /// copies skipped); empty unless the backbone has acknowledgements (JetStream).
    settle: Vec<meshgate_core::Delivery>,
    next_seq: u64,
    next_pkid: u16,
    /// QoS 2 packet ids received (PUBREC sent), waiting for PUBREL.
    incoming_qos2: HashSet<u16>,
    /// PUBLISHes handed to the backbone and not yet accepted, in arrival order, so that their
    /// PUBACK/PUBREC go out in that order (MQTT 3.1.1 §4.6) while several are pending — a
    /// JetStream PubAck takes a round trip. Boxed and created on first use (idle memory).
    inbound: Option<Box<futures_util::stream::FuturesOrdered<InboundPublish>>>,
    /// Packet ids of the QoS 2 PUBLISHes in `inbound`.
    inbound_qos2: HashSet<u16>,
    /// Boxed: most clients have none, and an idle connection should stay small.
    will: Option<Box<(LastWill, Option<LastWillProperties>)>>,
    /// MQTT 5 Will Delay Interval: the will waits this long after the connection ends.
    will_delay: Option<Duration>,
    /// How long the session outlives its connection (zero: it ends with it).
    expiry: Duration,
    /// Session Expiry Interval the client sent in CONNECT (MQTT 5), in seconds.
    requested_expiry: u32,
    /// Topic aliases the client set (MQTT 5), allocated on first use. Boxed: `None` costs 8
    /// bytes instead of a map's 48 on every idle connection.
    #[allow(clippy::box_collection)]
    aliases: Option<Box<HashMap<u16, Topic>>>,
    /// Topic aliases this connection gave its client (MQTT 5 Topic Alias Maximum > 0), made
    /// on first use; they last as long as the connection, not the session.
    out_aliases: Option<Box<outbound::OutAliases>>,
    /// Topic Alias Maximum the client announced in CONNECT (0: no aliases to it).
    client_alias_max: u16,
    /// Fired when another connection takes over this client id.
    takeover: CancellationToken,
    /// Revision of the record in the backbone's session store (see [`stored`]) this session
    /// last read or wrote; 0: the session has nothing stored.
    store_revision: u64,
    /// A QoS 1/2 publish was accepted since the last write: its acknowledgement waits until
    /// the deliveries it caused on this instance went out (see [`run_session`]).
    acked_publish: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        let n = i64::try_from(self.subscriptions.len()).unwrap_or(i64::MAX);
        self.shared.subscriptions.add(-n);
    }
}

impl Session {
    /// Takes over what a persistent session kept from its previous connection.
    fn resume(&mut self, old: &mut Session) {
        self.subscriptions = std::mem::take(&mut old.subscriptions);
        self.streams = old.streams.take();
        self.pending = std::mem::take(&mut old.pending);
        self.inflight = std::mem::take(&mut old.inflight);
        self.next_seq = old.next_seq;
        self.next_pkid = old.next_pkid;
        self.incoming_qos2 = std::mem::take(&mut old.incoming_qos2);
        self.origin = old.origin.clone();
        // The old will is not sent: the client is back (MQTT 5 §3.1.3.2.2).
        old.will = None;
    }
}

fn to_qos(n: u8) -> QoS {
    match n {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    }
}

/// Topic Alias Maximum meshgate announces to MQTT 5 clients (aliases they may set).
const TOPIC_ALIAS_MAX: u16 = 16;

/// Most topic aliases meshgate gives one client (fewer if the client's Topic Alias Maximum is
/// lower): the map is per connection, and a client must not make it grow without bound.
const OUT_TOPIC_ALIAS_MAX: u16 = 64;

/// Most QoS meshgate grants to a subscription.
const MAX_GRANTED_QOS: QoS = QoS::ExactlyOnce;

async fn write_now<S: AsyncWrite + Unpin>(
    stream: &mut S,
    version: Version,
    packet: Packet,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    codec::write(version, packet, &mut buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    stream.write_all(&buf).await
}

fn connack(
    version: Version,
    code: ConnectReturnCode,
    session_present: bool,
    props: Option<ConnAckProperties>,
) -> Packet {
    // rumqttd's V4 writer panics on codes 3.1.1 does not have; map them first.
    let code = match version {
        Version::V5 => code,
        Version::V311 => match code {
            ConnectReturnCode::Success
            | ConnectReturnCode::RefusedProtocolVersion
            | ConnectReturnCode::ClientIdentifierNotValid
            | ConnectReturnCode::ServiceUnavailable
            | ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized => code,
            // A per-user connection cap is a temporary refusal: "server unavailable" (0x03)
            // makes 3.1.1 clients retry later, where "not authorized" would not.
            ConnectReturnCode::ServerBusy
            | ConnectReturnCode::ServerUnavailable
            | ConnectReturnCode::QuotaExceeded => ConnectReturnCode::ServiceUnavailable,
            _ => ConnectReturnCode::NotAuthorized,
        },
    };
    let props = if version == Version::V5 { props } else { None };
    Packet::ConnAck(
        ConnAck {
            session_present,
            code,
        },
        props,
    )
}

/// Reads until one packet is complete (or fails).
async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    version: Version,
    max: usize,
) -> Result<Packet, String> {
    loop {
        match codec::read(version, buf, max) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let n = stream.read_buf(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
    }
}

/// Handles a new connection (TCP, or a WebSocket bridged to a byte stream) until it ends.
pub(crate) async fn run<S>(mut stream: S, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // In a block, so that what the connect phase returned (a `Session` moved into
    // `run_session`) is not kept in this future beside it: rustc keeps a moved-from local's
    // space while its scope lasts, and this future is an idle connection's memory.
    let (session, registration) = {
        let mut buf = BytesMut::with_capacity(512);
        let timeout = shared.config.connect_timeout;
        let connect = tokio::time::timeout(
            timeout,
            Box::pin(connect_phase(&mut stream, &mut buf, &shared)),
        )
        .await;
        let Ok(Some((session, keep_alive, registration))) = connect else {
            if connect.is_err() {
                shared.metrics.error("connect_timeout");
            }
            return;
        };
        (run_session(stream, buf, session, keep_alive), registration)
    };
    session.await;
    // Released only now, after the session was parked or ended.
    drop(registration);
}

/// Reads CONNECT and answers CONNACK. `None`: refused (already answered) or broken.
async fn connect_phase<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    shared: &Arc<Shared>,
) -> Option<(Session, u16, Registration)> {
    let version = loop {
        match codec::connect_version(buf) {
            ConnectProbe::Version(v) => break v,
            ConnectProbe::NeedMore => {
                if stream.read_buf(buf).await.ok()? == 0 {
                    return None;
                }
            }
            ConnectProbe::Unsupported(level) => {
                tracing::debug!(level, "mqtt: unsupported protocol level");
                shared.metrics.error("unsupported_version");
                let code = ConnectReturnCode::RefusedProtocolVersion;
                let _ = write_now(
                    stream,
                    Version::V311,
                    connack(Version::V311, code, false, None),
                )
                .await;
                return None;
            }
            ConnectProbe::NotConnect => {
                shared.metrics.error("malformed");
                return None;
            }
        }
    };
    let max = shared.config.max_packet_size;
    let packet = match read_packet(stream, buf, version, max).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "mqtt: bad CONNECT");
            shared.metrics.error("malformed");
            return None;
        }
    };
    let Packet::Connect(connect, props, will, will_props, login) = packet else {
        return None;
    };
    let refuse = |code: ConnectReturnCode, reason: &str| {
        let props = ConnAckProperties {
            reason_string: Some(reason.to_owned()),
            ..Default::default()
        };
        connack(version, code, false, Some(props))
    };
    if let Some(why) = codec::connect_properties_error(props.as_ref()) {
        // MQTT 5 §3.1.2.11.3/.4: Receive Maximum or Maximum Packet Size 0 is a Protocol Error.
        shared.metrics.error("protocol");
        let p = refuse(ConnectReturnCode::ProtocolError, why);
        let _ = write_now(stream, version, p).await;
        return None;
    }
    // Client identifier rules (3.1.1 §3.1.3.1, 5 §3.1.3.1). A server may refuse long ids; a
    // connection keeps several copies of its id (the clients map, the wrapper's source, the
    // session), so it is capped (`mqtt.max_client_id_len`).
    if connect.client_id.len() > shared.config.max_client_id_len {
        shared.metrics.error("client_id_too_long");
        let p = refuse(
            ConnectReturnCode::ClientIdentifierNotValid,
            &format!(
                "client id longer than {} bytes (mqtt.max_client_id_len)",
                shared.config.max_client_id_len
            ),
        );
        let _ = write_now(stream, version, p).await;
        return None;
    }
    // `mqtt.max_keep_alive`: MQTT 5 is told the maximum in CONNACK; 3.1.1 cannot be told
    // another keep-alive, so a longer one is refused (see `codec::keep_alive`).
    let Some((keep_alive, server_keep_alive)) =
        codec::keep_alive(version, connect.keep_alive, shared.config.max_keep_alive)
    else {
        shared.metrics.error("keep_alive_too_long");
        let p = refuse(
            ConnectReturnCode::ClientIdentifierNotValid,
            &format!(
                "keep-alive {} s is longer than this server allows ({} s, mqtt.max_keep_alive); \
                 connect with a shorter one",
                connect.keep_alive,
                shared.config.max_keep_alive.as_secs()
            ),
        );
        let _ = write_now(stream, version, p).await;
        return None;
    };
    let mut assigned = None;
    let client_id = if connect.client_id.is_empty() {
        if version == Version::V311 && !connect.clean_session {
            let p = refuse(
                ConnectReturnCode::ClientIdentifierNotValid,
                "empty client id needs clean session",
            );
            let _ = write_now(stream, version, p).await;
            return None;
        }
        let id = format!("meshgate-{}", meshgate_core::wrap::new_id());
        assigned = Some(id.clone());
        id
    } else {
        connect.client_id.clone()
    };
    if shared.over_capacity() {
        shared.metrics.error("too_many_connections");
        let p = refuse(
            ConnectReturnCode::ServerBusy,
            "connection limit reached; retry later",
        );
        let _ = write_now(stream, version, p).await;
        return None;
    }
    let principal = match authenticate(shared, login.as_ref()) {
        Ok(p) => p,
        Err(code) => {
            shared.metrics.error("unauthorized");
            let _ = write_now(stream, version, refuse(code, "authentication failed")).await;
            return None;
        }
    };
    // Per user (`gateway.max_connections_per_user`), held until the session is parked or
    // ended. MQTT 5: 0x97 quota exceeded; 3.1.1: 0x03 server unavailable (see `connack`).
    // A user at the cap may still take over its own client id's connection (a client
    // reconnecting before the server noticed its old connection die): that connection's slot
    // becomes this one's, so the slot is taken after the takeover below.
    let user_permit = match shared.ctx.limits.acquire_user(&principal) {
        Ok(p) => Some(p),
        Err(_) if shared.connected_as(&client_id, &principal) => None,
        Err(e) => {
            shared.metrics.error(e.metric_kind());
            let p = refuse(ConnectReturnCode::QuotaExceeded, &e.to_string());
            let _ = write_now(stream, version, p).await;
            return None;
        }
    };
    let permit_after_takeover = user_permit.is_none();
    if let Some(w) = &will {
        let allowed = std::str::from_utf8(&w.topic)
            .ok()
            .and_then(|t| Topic::from_mqtt(t).ok())
            .is_some_and(|t| shared.ctx.authorizer.check_publish(&principal, &t).is_ok());
        if !allowed {
            shared.metrics.error("forbidden");
            let p = refuse(ConnectReturnCode::NotAuthorized, "will topic not allowed");
            let _ = write_now(stream, version, p).await;
            return None;
        }
    }
    let wrapper = match meshgate_core::wrap::Wrapper::new(
        binding::client_source(&client_id),
        shared.config.wrap_type.clone(),
    ) {
        Ok(w) => w,
        Err(e) => {
            // The source is percent-encoded and the type checked by config; report, not panic.
            tracing::warn!(error = %e, "mqtt: cannot build the wrapper for this client");
            let p = refuse(
                ConnectReturnCode::ClientIdentifierNotValid,
                "client id not usable",
            );
            let _ = write_now(stream, version, p).await;
            return None;
        }
    };
    let connection = shared.ctx.next_connection_id();
    // A client id is bound to the principal holding it (connected, or its session kept here or
    // in the backbone): another principal is refused and nothing of the holder's is touched —
    // no takeover, no will, no discarded session (review F4).
    let taken = || {
        shared.metrics.error("client_id_taken");
        tracing::info!(
            client_id,
            principal = principal.name(),
            "mqtt: client id held by another user; refused"
        );
        refuse(
            ConnectReturnCode::ClientIdentifierNotValid,
            "client id in use by another user",
        )
    };
    let Ok(mut registration) =
        Registration::new(shared, &client_id, &principal, connection, user_permit)
    else {
        let _ = write_now(stream, version, taken()).await;
        return None;
    };
    if let Some(previous) = &registration.previous {
        // Session takeover: the previous connection closes and, if its session is persistent,
        // parks it; wait for that so the session can be resumed below.
        if tokio::time::timeout(TAKEOVER_WAIT, previous.cancelled())
            .await
            .is_err()
        {
            tracing::warn!(client_id, "mqtt: previous connection did not close in time");
        }
    }
    if permit_after_takeover {
        // The previous connection gave its slot back when it finished (or another
        // connection of the user took it meanwhile: then the cap holds).
        match shared.ctx.limits.acquire_user(&principal) {
            Ok(p) => registration.user_permit = Some(p),
            Err(e) => {
                shared.metrics.error(e.metric_kind());
                let p = refuse(ConnectReturnCode::QuotaExceeded, &e.to_string());
                let _ = write_now(stream, version, p).await;
                return None;
            }
        }
    }
    let client_max_packet = props
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .map_or(usize::MAX, |m| m as usize);
    let client_receive_max = props
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .map_or(65_535, usize::from)
        .min(usize::from(shared.config.max_inflight));
    let client_alias_max = props
        .as_ref()
        .and_then(|p| p.topic_alias_max)
        .unwrap_or(0)
        .min(OUT_TOPIC_ALIAS_MAX);
    // Session lifetime: MQTT 5 Session Expiry Interval (absent = 0), MQTT 3.1.1 clean session
    // 0 = "until the server discards it"; both capped by `mqtt.max_session_expiry`.
    let requested_expiry = match version {
        Version::V5 => props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0),
        Version::V311 if connect.clean_session => 0,
        Version::V311 => u32::MAX,
    };
    let expiry =
        Duration::from_secs(u64::from(requested_expiry)).min(shared.config.max_session_expiry);
    // Clean start discards a kept session (its will, if delayed, is published now).
    let mut resumed = shared.parked.take(&client_id, !connect.clean_session).await;
    let mut claim = stored::Claim::default();
    if shared.ctx.backbone.session_store().is_some() {
        // Sessions live in the backbone: what was parked here is only a placeholder (timers).
        if let Some(mut placeholder) = resumed.take() {
            placeholder.will = None;
        }
        match stored::claim(shared, &client_id, &principal, !connect.clean_session).await {
            Ok(c) => claim = c,
            Err(stored::ClaimError::Taken) => {
                let _ = write_now(stream, version, taken()).await;
                return None;
            }
            Err(stored::ClaimError::Unavailable) => {
                // Deciding without the store could hand one session to two instances.
                let p = refuse(
                    ConnectReturnCode::ServerUnavailable,
                    "session store unavailable; retry later",
                );
                let _ = write_now(stream, version, p).await;
                return None;
            }
        }
    }
    if let Some(old) = &resumed
        && old.principal != principal
    {
        // Not reached: `register` refused another principal's parked session.
        // Another principal may not inherit this session's subscriptions and messages.
        tracing::info!(
            client_id,
            "mqtt: kept session belongs to another user; starting clean"
        );
        resumed = None;
    }
    let will_delay = will_props
        .as_ref()
        .and_then(|p| p.delay_interval)
        .filter(|d| *d > 0)
        .map(|d| Duration::from_secs(u64::from(d)));
    let mut session = Session {
        origin: shared.ctx.origin(connection),
        shared: shared.clone(),
        version,
        wrapper,
        client_id,
        principal,
        client_max_packet,
        client_receive_max,
        out: BytesMut::new(),
        subscriptions: Vec::new(),
        streams: None,
        pending: VecDeque::new(),
        inflight: HashMap::new(),
        settle: Vec::new(),
        next_seq: 0,
        next_pkid: 1,
        incoming_qos2: HashSet::new(),
        inbound: None,
        inbound_qos2: HashSet::new(),
        will: will.map(|w| Box::new((w, will_props))),
        will_delay,
        expiry,
        requested_expiry,
        aliases: None,
        out_aliases: None,
        client_alias_max,
        takeover: registration.takeover.clone(),
        store_revision: 0,
        acked_publish: false,
    };
    let mut session_present = match resumed.as_mut() {
        Some(old) => {
            session.resume(old);
            true
        }
        None => false,
    };
    drop(resumed);
    session.store_revision = claim.revision;
    if let Some(record) = claim.record {
        if session.restore_stored(record).await.is_err() {
            let p = refuse(
                ConnectReturnCode::ServerUnavailable,
                "cannot restore the session's subscriptions; retry later",
            );
            let _ = write_now(stream, version, p).await;
            return None;
        }
        session_present = true;
    }
    // A persistent session is held here from now on; the record says so to other instances.
    match session.save_stored().await {
        stored::Saved::Yes => {}
        stored::Saved::Refused(reason) => {
            // A client id the store cannot hold (too long for its keys).
            let p = refuse(ConnectReturnCode::ClientIdentifierNotValid, &reason);
            let _ = write_now(stream, version, p).await;
            return None;
        }
        stored::Saved::Conflict | stored::Saved::Failed => {
            let p = refuse(
                ConnectReturnCode::ServerUnavailable,
                "session store unavailable or session taken elsewhere; retry later",
            );
            let _ = write_now(stream, version, p).await;
            return None;
        }
    }
    let granted_expiry = u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX);
    let ack_props = ConnAckProperties {
        // MQTT 5 §3.2.2.3.2: a Session Expiry Interval other than the client's is announced.
        session_expiry_interval: (granted_expiry != requested_expiry).then_some(granted_expiry),
        receive_max: Some(shared.config.max_inflight),
        max_packet_size: u32::try_from(max).ok(),
        assigned_client_identifier: assigned,
        topic_alias_max: Some(TOPIC_ALIAS_MAX),
        retain_available: Some(1),
        max_qos: None,
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(1),
        server_keep_alive,
        ..Default::default()
    };
    let ack = connack(
        version,
        ConnectReturnCode::Success,
        session_present,
        Some(ack_props),
    );
    if write_now(stream, version, ack).await.is_err() {
        finish(session, End::Abnormal).await;
        return None;
    }
    shared.metrics.connections.inc();
    tracing::debug!(
        client_id = session.client_id,
        ?version,
        principal = session.principal.name(),
        session_present,
        "mqtt connected"
    );
    // A resumed session first resends what the client had not acknowledged, then what was
    // queued while it was away.
    session.resend_inflight();
    session.fill_window();
    Some((session, keep_alive, registration))
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

/// How long a connection taking over a client id waits for the previous one to close.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// A connection's claim on its client id; released (and announced to a connection waiting to
/// take over) when dropped, after the session was parked or ended. Holds the connection's
/// per-user slot as long.
pub(crate) struct Registration {
    /// `None` only while a connection at its user's cap takes over its own client id.
    user_permit: Option<meshgate_core::ConnectionPermit>,
    shared: Arc<Shared>,
    client_id: String,
    connection: u64,
    takeover: CancellationToken,
    finished: CancellationToken,
    /// The previous connection's `finished`, when this one takes over.
    previous: Option<CancellationToken>,
}

impl Registration {
    fn new(
        shared: &Arc<Shared>,
        client_id: &str,
        principal: &Principal,
        connection: u64,
        user_permit: Option<meshgate_core::ConnectionPermit>,
    ) -> Result<Self, crate::ClientIdTaken> {
        let takeover = CancellationToken::new();
        let finished = CancellationToken::new();
        let previous = shared.register(client_id, principal, connection, &takeover, &finished)?;
        Ok(Registration {
            user_permit,
            shared: shared.clone(),
            client_id: client_id.to_owned(),
            connection,
            takeover,
            finished,
            previous,
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.unregister(&self.client_id, self.connection);
        // The slot is given back before `finished` wakes a connection taking over, which
        // may need it.
        drop(self.user_permit.take());
        self.finished.cancel();
    }
}

/// Ends a connection's part of a session: a persistent session is parked (its will published
/// now, or by the parked session after the Will Delay Interval); otherwise the session ends
/// here and its will, if any, is published.
async fn finish(mut session: Session, end: End) {
    if end == End::Normal {
        session.will = None;
    }
    let shared = session.shared.clone();
    if !session.expiry.is_zero() {
        if session.will_delay.is_none() {
            Box::pin(session.publish_will()).await;
        }
        if !Box::pin(session.leave_stored()).await {
            // Another instance holds the session now: nothing is left here.
            session.will = None;
            return;
        }
        session.out = BytesMut::new();
        session.aliases = None;
        session.out_aliases = None;
        match shared.parked.park(session) {
            Ok(()) => return,
            Err(s) => {
                shared.metrics.dropped("session_limit").inc();
                session = *s;
            }
        }
    }
    Box::pin(session.end_stored()).await;
    Box::pin(session.publish_will()).await;
}

fn authenticate(shared: &Shared, login: Option<&Login>) -> Result<Principal, ConnectReturnCode> {
    let credentials = match login {
        None => Credentials::None,
        Some(l) if l.username.is_empty() && l.password.is_empty() => Credentials::None,
        // A token may be sent as the user name with no password (common for IoT platforms).
        Some(l) if l.password.is_empty() => Credentials::Token(&l.username),
        Some(l) => Credentials::Password {
            username: &l.username,
            password: l.password.as_bytes(),
        },
    };
    shared
        .ctx
        .authorizer
        .authenticate(credentials)
        .map_err(|e| match e {
            meshgate_core::AuthError::Invalid => ConnectReturnCode::BadUserNamePassword,
            _ => ConnectReturnCode::NotAuthorized,
        })
}

/// The MQTT 5 properties a broker forwards unaltered (response topic, correlation data,
/// payload format) and the message expiry, as an absolute deadline.
fn forwarded_properties(
    props: Option<&PublishProperties>,
) -> Option<Arc<meshgate_core::backbone::MqttProperties>> {
    let p = props?;
    let m = meshgate_core::backbone::MqttProperties {
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        payload_utf8: p.payload_format_indicator == Some(1),
        expires_at_ms: p
            .message_expiry_interval
            .map(|s| meshgate_core::backbone::now_ms().saturating_add(u64::from(s) * 1000)),
    };
    (!m.is_empty()).then(|| Arc::new(m))
}

/// An inbound PUBLISH on its way into the backbone: its QoS, packet id and the outcome.
type InboundPublish = std::pin::Pin<
    Box<dyn std::future::Future<Output = (QoS, u16, Result<(), PublishError>)> + Send>,
>;

/// The next answer to a pending inbound PUBLISH, or never while there is none.
async fn next_inbound(
    inbound: &mut Option<Box<futures_util::stream::FuturesOrdered<InboundPublish>>>,
) -> Option<(QoS, u16, Result<(), PublishError>)> {
    use futures_util::StreamExt;
    match inbound {
        Some(f) if !f.is_empty() => f.next().await,
        _ => std::future::pending().await,
    }
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
            self.shared.metrics.error("encode");
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
                let reason = if self.incoming_qos2.remove(&rel.pkid) {
                    PubCompReason::Success
                } else {
                    PubCompReason::PacketIdentifierNotFound
                };
                self.write(Packet::PubComp(
                    PubComp {
                        pkid: rel.pkid,
                        reason,
                    },
                    None,
                ));
                Flow::Continue
            }
            Packet::Subscribe(sub, props) => {
                if props.as_ref().is_some_and(|p| p.id == Some(0)) {
                    // MQTT 5 §3.8.2.1.2: a Subscription Identifier of 0 is a protocol error.
                    self.shared.metrics.error("protocol");
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
                        self.shared.metrics.error("protocol");
                        self.disconnect(DisconnectReasonCode::ProtocolError);
                        return Flow::End(End::Abnormal);
                    }
                    self.expiry = Duration::from_secs(u64::from(e))
                        .min(self.shared.config.max_session_expiry);
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
                self.shared.metrics.error("protocol");
                self.disconnect(DisconnectReasonCode::ProtocolError);
                Flow::End(End::Abnormal)
            }
        }
    }

    /// Acknowledges a QoS 1/2 publish with `reason` (MQTT 5) or plain success (3.1.1).
    fn ack(&mut self, qos: QoS, pkid: u16, reason: PubAckReason) {
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.write(Packet::PubAck(PubAck { pkid, reason }, None)),
            QoS::ExactlyOnce => {
                let reason = match reason {
                    PubAckReason::Success => PubRecReason::Success,
                    PubAckReason::NotAuthorized => PubRecReason::NotAuthorized,
                    PubAckReason::TopicNameInvalid => PubRecReason::TopicNameInvalid,
                    PubAckReason::QuotaExceeded => PubRecReason::QuotaExceeded,
                    PubAckReason::PayloadFormatInvalid => PubRecReason::PayloadFormatInvalid,
                    _ => PubRecReason::ImplementationSpecificError,
                };
                if reason == PubRecReason::Success {
                    self.incoming_qos2.insert(pkid);
                }
                self.write(Packet::PubRec(PubRec { pkid, reason }, None));
            }
        }
    }

    /// Refuses a publish: MQTT 5 answers with a reason code (QoS 0 is dropped and counted),
    /// MQTT 3.1.1 has no negative acknowledgement, so the connection is closed (3.1.1 §3.3.5).
    fn refuse(&mut self, qos: QoS, pkid: u16, reason: PubAckReason, kind: &'static str) -> Flow {
        self.shared.metrics.error(kind);
        if self.version == Version::V311 {
            return Flow::End(End::Abnormal);
        }
        if qos == QoS::AtMostOnce {
            self.shared.metrics.dropped(kind).inc();
        }
        self.ack(qos, pkid, reason);
        Flow::Continue
    }

    /// Everything about an inbound PUBLISH that needs no waiting: QoS 2 duplicates, topic
    /// (aliases), authorization, the CloudEvent, the envelope. `Err`: answered or refused here.
    fn prepare_publish(
        &mut self,
        p: &codec::InPublish,
        props: Option<&PublishProperties>,
    ) -> Result<meshgate_core::Envelope, Flow> {
        let meta = p.meta;
        let (qos, pkid) = (meta.qos, meta.pkid);
        if qos == QoS::ExactlyOnce && self.inbound_qos2.contains(&pkid) {
            // Resent while the first copy is still with the backbone: its PUBREC will follow.
            return Err(Flow::Continue);
        }
        if qos == QoS::ExactlyOnce && self.incoming_qos2.contains(&pkid) {
            // A resent QoS 2 publish before PUBREL: acknowledge again, publish once.
            self.write(Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            ));
            return Err(Flow::Continue);
        }
        if qos == QoS::ExactlyOnce
            && self.incoming_qos2.len() >= usize::from(self.shared.config.max_inflight)
        {
            self.shared.metrics.error("receive_maximum");
            self.disconnect(DisconnectReasonCode::ReceiveMaximumExceeded);
            return Err(Flow::End(End::Abnormal));
        }
        // MQTT 5 topic aliases (§3.3.2.3.4): a topic with an alias sets it, an empty topic with
        // an alias uses it.
        let alias = props.and_then(|p| p.topic_alias);
        let aliased = match alias {
            None => None,
            Some(a) if a == 0 || a > TOPIC_ALIAS_MAX => {
                self.disconnect(DisconnectReasonCode::TopicAliasInvalid);
                return Err(Flow::End(End::Abnormal));
            }
            Some(a) if p.topic.is_empty() => match self.aliases.as_ref().and_then(|m| m.get(&a)) {
                Some(t) => Some(t.clone()),
                None => {
                    // An alias that was never set is a protocol error.
                    self.disconnect(DisconnectReasonCode::ProtocolError);
                    return Err(Flow::End(End::Abnormal));
                }
            },
            Some(_) => None,
        };
        let topic = match aliased {
            Some(t) => t,
            None => match codec::topic_name(&p.topic) {
                Ok(t) => t,
                Err(e) => {
                    // A topic name that breaks the spec is a protocol violation, not a refusal:
                    // MQTT 5 DISCONNECT 0x81 (invalid UTF-8, U+0000) or 0x82 (wildcard, empty
                    // without an alias); 3.1.1 closes the connection.
                    tracing::debug!(error = %e, client_id = self.client_id, "mqtt: bad topic name");
                    self.shared.metrics.error("bad_topic");
                    self.disconnect(e.reason_code());
                    return Err(Flow::End(End::Abnormal));
                }
            },
        };
        if let (Some(a), false) = (alias, p.topic.is_empty()) {
            self.aliases
                .get_or_insert_with(Default::default)
                .insert(a, topic.clone());
        }
        if self
            .shared
            .ctx
            .authorizer
            .check_publish(&self.principal, &topic)
            .is_err()
        {
            return Err(self.refuse(qos, pkid, PubAckReason::NotAuthorized, "forbidden"));
        }
        let event = binding::decode(Inbound {
            version: self.version,
            topic: &topic,
            payload: p.payload.clone(),
            properties: props,
            wrapper: &self.wrapper,
        });
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, client_id = self.client_id, "mqtt: invalid CloudEvent");
                if self.version == Version::V311 {
                    // 3.1.1 has no negative acknowledgement: the connection is closed (as
                    // README says), not acknowledged — the client must not think it was taken.
                    self.shared.metrics.dropped("bad_event").inc();
                }
                return Err(self.refuse(
                    qos,
                    pkid,
                    PubAckReason::PayloadFormatInvalid,
                    "bad_event",
                ));
            }
        };
        let event = Arc::new(event);
        let mut envelope = meshgate_core::Envelope::new(topic.clone(), event, self.origin.clone())
            .with_qos(qos as u8)
            .with_retain(p.retain);
        envelope.mqtt = forwarded_properties(props);
        Ok(envelope)
    }

    /// Handles a PUBLISH on a backbone that settles publishes at once, without a future:
    /// `Err` is the rest of the publish when the backbone has to wait (a full subscriber
    /// queue under the `block` policy); pass its outcome to [`Session::published`].
    fn publish_now<'s>(
        &mut self,
        shared: &'s Shared,
        p: &codec::InPublish,
        props: Option<&PublishProperties>,
    ) -> Result<Flow, BoxFuture<'s, Result<(), PublishError>>> {
        let envelope = match self.prepare_publish(p, props) {
            Ok(envelope) => envelope,
            Err(flow) => return Ok(flow),
        };
        match shared
            .ctx
            .try_publish_envelope(&shared.metrics, &self.principal, envelope)
        {
            Published::Done(r) => Ok(self.published(p.meta.qos, p.meta.pkid, r)),
            Published::Pending(f) => Err(f),
        }
    }

    async fn handle_publish(
        &mut self,
        p: rumqttd::protocol::Publish,
        props: Option<PublishProperties>,
        meta: codec::PublishMeta,
    ) -> Flow {
        let (qos, pkid) = (meta.qos, meta.pkid);
        let p = codec::InPublish::from_rumqttd(p, meta);
        let envelope = match self.prepare_publish(&p, props.as_ref()) {
            Ok(envelope) => envelope,
            Err(flow) => return flow,
        };
        if !self.shared.pipeline {
            // The backbone answers at once (memory, NATS core): no queue, no allocation. A
            // retained message is stored once the backbone took the publish, so a refused
            // publish leaves the retained state as it was.
            let retained = p.retain.then(|| envelope.clone());
            let r = self
                .shared
                .ctx
                .publish_envelope(&self.shared.metrics, &self.principal, envelope)
                .await;
            if let (Ok(()), Some(envelope)) = (&r, retained) {
                self.shared
                    .retained
                    .update(&envelope, p.payload.is_empty())
                    .await;
            }
            return self.published(qos, pkid, r);
        }
        // Pipelined (JetStream): stored before the publish, in packet order, so that two
        // retained publishes of one client cannot reach the store in the other order; a
        // refused publish leaves its message retained (the client is told, and retries).
        if p.retain {
            self.shared
                .retained
                .update(&envelope, p.payload.is_empty())
                .await;
        }
        let shared = self.shared.clone();
        let principal = self.principal.clone();
        let mut publish: InboundPublish = Box::pin(async move {
            let r = shared
                .ctx
                .publish_envelope(&shared.metrics, &principal, envelope)
                .await;
            (qos, pkid, r)
        });
        if self.inbound.as_ref().is_none_or(|f| f.is_empty()) {
            // Usually accepted at once (memory backbone): answer without queueing. If not, the
            // queue below polls it again with a real waker.
            let waker = futures_util::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            if let std::task::Poll::Ready((qos, pkid, r)) = publish.as_mut().poll(&mut cx) {
                return self.published(qos, pkid, r);
            }
        }
        if qos == QoS::ExactlyOnce {
            self.inbound_qos2.insert(pkid);
        }
        self.inbound
            .get_or_insert_with(Default::default)
            .push_back(publish);
        Flow::Continue
    }

    /// The backbone's answer to an inbound PUBLISH: acknowledge it, or refuse it.
    fn published(&mut self, qos: QoS, pkid: u16, r: Result<(), PublishError>) -> Flow {
        if qos == QoS::ExactlyOnce {
            self.inbound_qos2.remove(&pkid);
        }
        match r {
            Ok(()) => {
                self.shared.in_by_qos[usize::from(qos as u8).min(2)].inc();
                self.acked_publish |= qos != QoS::AtMostOnce;
                self.ack(qos, pkid, PubAckReason::Success);
                Flow::Continue
            }
            Err(PublishError::Forbidden(_)) => {
                self.refuse(qos, pkid, PubAckReason::NotAuthorized, "forbidden")
            }
            Err(PublishError::Backbone(e)) => {
                tracing::debug!(error = %e, "mqtt: backbone refused");
                // Never acknowledge what the backbone did not take.
                let reason = match e {
                    meshgate_core::BackboneError::TopicTooLong(_) => PubAckReason::TopicNameInvalid,
                    _ => PubAckReason::QuotaExceeded,
                };
                self.refuse(qos, pkid, reason, "backbone")
            }
        }
    }

    /// Whether as many PUBLISHes wait for the backbone as the client may send unacknowledged
    /// (our Receive Maximum): then no more packets are read until one is answered.
    fn inbound_full(&self) -> bool {
        self.inbound
            .as_ref()
            .is_some_and(|f| f.len() >= usize::from(self.shared.config.max_inflight))
    }

    async fn publish_will(&mut self) {
        let Some((will, props)) = self.will.take().map(|b| *b) else {
            return;
        };
        let Some(topic) = std::str::from_utf8(&will.topic)
            .ok()
            .and_then(|t| Topic::from_mqtt(t).ok())
        else {
            return;
        };
        let publish_props = props.map(|p| PublishProperties {
            content_type: p.content_type,
            user_properties: p.user_properties,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            ..Default::default()
        });
        let event = binding::decode(Inbound {
            version: self.version,
            topic: &topic,
            payload: will.message.clone(),
            properties: publish_props.as_ref(),
            wrapper: &self.wrapper,
        });
        let Ok(event) = event else {
            self.shared.metrics.dropped("bad_will").inc();
            return;
        };
        let mut envelope =
            meshgate_core::Envelope::new(topic, Arc::new(event), self.origin.clone())
                .with_qos(will.qos as u8)
                .with_retain(will.retain);
        envelope.mqtt = forwarded_properties(publish_props.as_ref());
        if will.retain {
            self.shared
                .retained
                .update(&envelope, will.message.is_empty())
                .await;
        }
        if let Err(e) = self
            .shared
            .ctx
            .publish_envelope(&self.shared.metrics, &self.principal, envelope)
            .await
        {
            tracing::debug!(error = %e, "mqtt: will not published");
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
    // that settles it at once (memory, NATS core), not retained (flag bit 0; a retained one
    // goes the long way: the retained store waits).
    if session.version == Version::V311
        && !shared.pipeline
        && buf.first().is_some_and(|b| b & 1 == 0)
        && let Some(p) = codec::read_publish_v311(buf, max)
    {
        return publish_step(session, shared, p, None);
    }
    let meta = codec::peek_publish_meta(buf);
    match codec::read(session.version, buf, max) {
        Ok(Some(Packet::Publish(p, props))) if !shared.pipeline && !p.retain => {
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
            shared.metrics.error("malformed");
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

async fn run_session<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    stream: S,
    mut buf: BytesMut,
    mut session: Session,
    keep_alive: u16,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let shared = session.shared.clone();
    let max = shared.config.max_packet_size;
    let keep = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    let mut deadline = tokio::time::Instant::now() + keep.unwrap_or(Duration::from_secs(86_400));
    let takeover = session.takeover.clone();
    let pending_limit = shared.config.max_queued;
    let write_timeout = shared.config.write_timeout;
    let mut busy = false;
    let mut out_hint = 0;
    // Created once, not per loop turn: each new `cancelled()` future registers with (and on
    // drop leaves) the token's waiter list under a lock.
    let shutdown = shared.ctx.shutdown.cancelled();
    let taken_over = takeover.cancelled();
    // One keep-alive timer per connection, moved only when it fires early: a new `sleep_until`
    // per loop turn inserted into and removed from the timer wheel (under its lock) for every
    // batch of packets.
    let keep_alive_timer = tokio::time::sleep_until(deadline);
    tokio::pin!(shutdown, taken_over, keep_alive_timer);
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
        // Keep-alive counts from the last complete packet (one clock reading per batch).
        if let (true, Some(k)) = (got_packet, keep) {
            deadline = tokio::time::Instant::now() + k;
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
                let mut write = std::pin::pin!(wr.write_all(&session.out));
                match write.as_mut().now_or_never() {
                    Some(r) => Ok(r),
                    None => tokio::time::timeout(write_timeout, write).await,
                }
            };
            match written {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break End::Abnormal,
                Err(_) => {
                    shared.metrics.error("write_timeout");
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
        // Idle connections keep a small read buffer; busy ones read in larger chunks.
        if buf.is_empty() {
            buf = BytesMut::with_capacity(if busy { READ_CHUNK } else { 64 });
        }
        tokio::select! {
            biased;
            _ = &mut shutdown => {
                session.disconnect(DisconnectReasonCode::ServerShuttingDown);
                break End::Server;
            }
            _ = &mut taken_over => {
                session.disconnect(DisconnectReasonCode::SessionTakenOver);
                break End::Server;
            }
            Some((qos, pkid, r)) = next_inbound(&mut session.inbound) => {
                if let Flow::End(e) = session.published(qos, pkid, r) {
                    break e;
                }
                // The answers already in as well, so their PUBACKs go out in one write (a
                // JetStream PubAck per publish otherwise costs a write each). Polling with a
                // no-op waker is fine: the next turn's `next_inbound` registers ours again.
                use futures_util::{FutureExt as _, StreamExt as _};
                while let Some(Some((qos, pkid, r))) =
                    session.inbound.as_mut().and_then(|f| f.next().now_or_never())
                {
                    if let Flow::End(e) = session.published(qos, pkid, r) {
                        break 'conn e;
                    }
                }
            }
            r = rd.read_buf(&mut buf), if !session.inbound_full() => match r {
                Ok(0) | Err(_) => break End::Abnormal,
                Ok(n) => busy = n >= 64,
            },
            // While the in-flight window and `pending` are full, deliveries wait in the queue
            // (and behind it, in the backbone), until the client acknowledges.
            Some(q) = next_queued(&mut session.streams), if session.pending.len() < pending_limit => {
                if session.out.capacity() == 0 && out_hint > 1024 {
                    session.out.reserve(out_hint);
                }
                session.deliver(q);
                // Take what else is ready without waiting, so writes are batched.
                while session.pending.len() < pending_limit && session.out.len() < WRITE_BATCH {
                    let Some(q) = session.streams.as_mut().and_then(|s| s.try_next()) else {
                        break;
                    };
                    session.deliver(q);
                }
            }
            _ = &mut keep_alive_timer, if keep.is_some() => {
                if tokio::time::Instant::now() < deadline {
                    // Packets came since the timer was set: wait for the rest of the interval.
                    keep_alive_timer.as_mut().reset(deadline);
                    continue;
                }
                shared.metrics.error("keep_alive_timeout");
                session.disconnect(DisconnectReasonCode::KeepAliveTimeout);
                break End::Abnormal;
            }
        }
    };
    // Publishes the client sent before it left still reach the backbone (a QoS 0 publish
    // followed by DISCONNECT must not be lost).
    if let Some(mut inbound) = session.inbound.take() {
        use futures_util::StreamExt;
        let drain = async {
            while let Some((qos, pkid, r)) = inbound.next().await {
                let _ = session.published(qos, pkid, r);
            }
        };
        if tokio::time::timeout(INBOUND_DRAIN, drain).await.is_err() {
            shared.metrics.error("inbound_drain_timeout");
        }
    }
    if !session.out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&session.out)).await;
    }
    // Bounded too: a TLS close_notify is a write.
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    shared.metrics.connections.dec();
    tracing::debug!(client_id = session.client_id, ?end, "mqtt disconnected");
    // Boxed, like packet handling: only the last moments of a connection need it.
    Box::pin(finish(session, end)).await;
}
