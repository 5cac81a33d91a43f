//! The CONNECT phase: the first packet of a connection, checked and answered with CONNACK —
//! protocol version, client id, keep-alive, authentication, the client id's registration
//! (and takeover of a previous connection), the session (new, resumed from [`super::parked`]
//! or from the backbone's session store, [`super::stored`]), then CONNACK.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meshgate_core::{Credentials, Principal, Topic};
use rumqttd::protocol::{ConnAck, ConnAckProperties, ConnectReturnCode, Login, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{End, OUT_TOPIC_ALIAS_MAX, Session, TOPIC_ALIAS_MAX, finish, stored};
use crate::Shared;
use crate::binding;
use crate::codec::{self, ConnectProbe, Version};

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

/// Reads CONNECT and answers CONNACK. `None`: refused (already answered) or broken.
pub(super) async fn connect_phase<S: AsyncRead + AsyncWrite + Unpin>(
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

/// How long a connection taking over a client id waits for the previous one to close.
pub(super) const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// A connection's claim on its client id; released (and announced to a connection waiting to
/// take over) when dropped, after the session was parked or ended. Holds the connection's
/// per-user slot as long.
pub(super) struct Registration {
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
