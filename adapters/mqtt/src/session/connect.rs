//! The CONNECT phase: the first packet of a connection, checked and answered with CONNACK —
//! protocol version, client id, keep-alive, authentication, the client id's registration
//! (and takeover of a previous connection), the session (new, resumed from [`super::parked`]
//! or from the backbone's session store, [`super::stored`]), then CONNACK.

use meshgate_core::metrics::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meshgate_core::{AuthError, Authorized, Credentials, Principal, Topic};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, LastWill,
    LastWillProperties, Login, Packet,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::aliases::TOPIC_ALIAS_MAX;
use super::inbound::Will;
use super::{End, Session, finish, stored};
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

/// Why no CONNECT packet could be read (logged at debug level).
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Codec(#[from] rumqttd::protocol::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
}

/// Reads until one packet is complete (or fails).
async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    version: Version,
    max: usize,
) -> Result<Packet, ReadError> {
    loop {
        if let Some(p) = codec::read(version, buf, max)? {
            return Ok(p);
        }
        let n = stream.read_buf(buf).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// A CONNECT as read, before any check.
struct Request {
    version: Version,
    connect: Connect,
    props: Option<ConnectProperties>,
    will: Option<LastWill>,
    will_props: Option<LastWillProperties>,
    login: Option<Login>,
}

/// Why a CONNECT is refused: the CONNACK's code and its reason string (MQTT 5; see
/// [`connack`] for 3.1.1).
struct Refusal {
    code: ConnectReturnCode,
    reason: String,
}

impl Refusal {
    fn new(code: ConnectReturnCode, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
        }
    }

    fn connack(self, version: Version) -> Packet {
        let props = ConnAckProperties {
            reason_string: Some(self.reason),
            ..Default::default()
        };
        connack(version, self.code, false, Some(props))
    }
}

/// Writes the CONNACK of a refused CONNECT; the connection then ends (`None`).
async fn refuse<S: AsyncWrite + Unpin, T>(
    stream: &mut S,
    version: Version,
    refusal: Refusal,
) -> Option<T> {
    let _ = write_now(stream, version, refusal.connack(version)).await;
    None
}

/// What the client asked for in CONNECT, as granted: what the session is built with.
pub(super) struct Terms {
    pub(super) version: Version,
    /// Largest packet the client accepts (MQTT 5 Maximum Packet Size).
    pub(super) max_packet: usize,
    /// The client's Receive Maximum, capped by `mqtt.max_inflight`.
    pub(super) receive_max: u16,
    /// The client's Topic Alias Maximum (0: no aliases to it).
    pub(super) alias_max: u16,
    /// Session Expiry Interval the client sent (MQTT 5), in seconds.
    pub(super) requested_expiry: u32,
    /// How long the session outlives its connection.
    pub(super) expiry: Duration,
    /// Our Receive Maximum (`mqtt.max_inflight`) and largest packet (`mqtt.max_packet_size`)
    /// as CONNACK announces them: the connection holds the client to these, whatever a reload
    /// sets for later connections.
    pub(super) own_receive_max: u16,
    pub(super) own_max_packet: u32,
}

impl Terms {
    fn of(shared: &Shared, request: &Request) -> Terms {
        let config = shared.config.read();
        let props = request.props.as_ref();
        let max_packet = props
            .and_then(|p| p.max_packet_size)
            .map_or(usize::MAX, |m| m as usize);
        let receive_max = props
            .and_then(|p| p.receive_maximum)
            .unwrap_or(65_535)
            .min(config.max_inflight);
        let alias_max = props.and_then(|p| p.topic_alias_max).unwrap_or(0);
        // Session lifetime: MQTT 5 Session Expiry Interval (absent = 0), MQTT 3.1.1 clean session
        // 0 = "until the server discards it"; both capped by `mqtt.max_session_expiry`.
        let requested_expiry = match request.version {
            Version::V5 => props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
            Version::V311 if request.connect.clean_session => 0,
            Version::V311 => u32::MAX,
        };
        let expiry =
            Duration::from_secs(u64::from(requested_expiry)).min(config.max_session_expiry);
        Terms {
            own_receive_max: config.max_inflight,
            own_max_packet: u32::try_from(config.max_packet_size).unwrap_or(u32::MAX),
            version: request.version,
            max_packet,
            receive_max,
            alias_max,
            requested_expiry,
            expiry,
        }
    }
}

/// Reads CONNECT and answers CONNACK. `None`: refused (already answered) or broken.
///
/// Each step refuses with the CONNACK that says why. What the earlier steps took (the user's
/// connection slot, the client id's registration, the session) is a local here, let go once
/// that CONNACK was written.
pub(super) async fn connect_phase<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    shared: &Arc<Shared>,
    peer: super::Peer,
    certificate_user: Option<String>,
) -> Option<(Session, u16, Registration)> {
    let request = read_connect(stream, buf, shared).await?;
    let version = request.version;
    let (keep_alive, server_keep_alive) = match check_connect(shared, &request) {
        Ok(k) => k,
        Err(r) => return refuse(stream, version, r).await,
    };
    let (client_id, assigned) = match client_id(&request) {
        Ok(id) => id,
        Err(r) => return refuse(stream, version, r).await,
    };
    if shared.over_capacity() {
        shared.metrics.error(ErrorKind::TooManyConnections);
        let r = Refusal::new(
            ConnectReturnCode::ServerBusy,
            "connection limit reached; retry later",
        );
        return refuse(stream, version, r).await;
    }
    let login = match certificate_user {
        // Mosquitto's `use_identity_as_username`: the CONNECT credentials are not used.
        Some(user) => shared
            .ctx
            .authorizer
            .certificate_login(&user)
            .map_err(|e| Refusal::new(ConnectReturnCode::NotAuthorized, e.to_string())),
        None => authenticate(shared, request.login.as_ref(), peer.ip()).await,
    };
    let principal = match login {
        Ok(p) => p,
        Err(r) => {
            shared.metrics.error(ErrorKind::Unauthorized);
            return refuse(stream, version, r).await;
        }
    };
    let (client_id, assigned) = own_client_id(shared, &principal, client_id, assigned);
    if !shared
        .ctx
        .authorizer
        .client_id_allowed(&principal, &client_id)
    {
        shared.metrics.error(ErrorKind::Unauthorized);
        let r = Refusal::new(
            ConnectReturnCode::ClientIdentifierNotValid,
            "this user's client ids must start with one of its client_id_prefixes",
        );
        return refuse(stream, version, r).await;
    }
    // Its rules with `{clientid}` bound to the client id (assigned or not), so that the will's
    // topic is checked with them too.
    let principal = shared.ctx.authorizer.for_client(&principal, &client_id);
    let user_permit = match user_slot(shared, &client_id, &principal) {
        Ok(p) => p,
        Err(r) => return refuse(stream, version, r).await,
    };
    let permit_after_takeover = user_permit.is_none();
    let will_grant = match check_will(shared, request.will.as_ref(), &principal) {
        Ok(grant) => grant,
        Err(r) => return refuse(stream, version, r).await,
    };
    let wrapper = match wrapper(shared, &client_id) {
        Ok(w) => w,
        Err(r) => return refuse(stream, version, r).await,
    };
    let mut registration = match register(
        shared,
        &client_id,
        &principal,
        user_permit,
        peer.listing(version),
    )
    .await
    {
        Ok(r) => r,
        Err(r) => return refuse(stream, version, r).await,
    };
    if permit_after_takeover
        && let Err(r) = user_slot_after_takeover(shared, &principal, &mut registration)
    {
        return refuse(stream, version, r).await;
    }
    let terms = Terms::of(shared, &request);
    let clean_start = request.connect.clean_session;
    let (mut resumed, claim) =
        match acquire_session(shared, &client_id, &principal, clean_start).await {
            Ok(found) => found,
            Err(r) => return refuse(stream, version, r).await,
        };
    let will = Will::new(request.will.zip(will_grant), request.will_props);
    let mut session = Session::new(
        shared,
        &registration,
        client_id,
        principal,
        wrapper,
        &terms,
        will,
    );
    let resumed_here = match resumed.as_mut() {
        Some(old) => {
            session.resume(old);
            true
        }
        None => false,
    };
    drop(resumed);
    let session_present = match restore_and_save(&mut session, claim).await {
        Ok(restored) => resumed_here || restored,
        Err(r) => return refuse(stream, version, r).await,
    };
    let ack = Accepted {
        session_present,
        assigned,
        server_keep_alive,
    };
    let session = accept(stream, session, &terms, ack).await?;
    Some((session, keep_alive, registration))
}

/// Reads the protocol version and the CONNECT packet. An unsupported version is refused here
/// (CONNACK 0x01); `None` for that, a broken or closed connection, or another packet.
async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Option<Request> {
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
                shared.metrics.error(ErrorKind::UnsupportedVersion);
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
                shared.metrics.error(ErrorKind::Malformed);
                return None;
            }
        }
    };
    let max = shared.config.read().max_packet_size;
    let packet = match read_packet(stream, buf, version, max).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "mqtt: bad CONNECT");
            shared.metrics.error(ErrorKind::Malformed);
            return None;
        }
    };
    let Packet::Connect(connect, props, will, will_props, login) = packet else {
        return None;
    };
    Some(Request {
        version,
        connect,
        props,
        will,
        will_props,
        login,
    })
}

/// The CONNECT's properties, client id length and keep-alive against the spec and the
/// configured limits: the keep-alive the connection is held to and the Server Keep Alive to
/// announce.
fn check_connect(shared: &Shared, request: &Request) -> Result<(u16, Option<u16>), Refusal> {
    if let Some(why) = codec::connect_properties_error(request.props.as_ref()) {
        // MQTT 5 §3.1.2.11.3/.4: Receive Maximum or Maximum Packet Size 0 is a Protocol Error.
        shared.metrics.error(ErrorKind::Protocol);
        return Err(Refusal::new(ConnectReturnCode::ProtocolError, why));
    }
    // Client identifier rules (3.1.1 §3.1.3.1, 5 §3.1.3.1). A server may refuse long ids; a
    // connection keeps several copies of its id (the clients map, the wrapper's source, the
    // session), so it is capped (`mqtt.max_client_id_len`).
    let max_id = shared.config.read().max_client_id_len;
    if request.connect.client_id.len() > max_id {
        shared.metrics.error(ErrorKind::ClientIdTooLong);
        return Err(Refusal::new(
            ConnectReturnCode::ClientIdentifierNotValid,
            format!("client id longer than {max_id} bytes (mqtt.max_client_id_len)"),
        ));
    }
    // `mqtt.max_keep_alive`: MQTT 5 is told the maximum in CONNACK; 3.1.1 cannot be told
    // another keep-alive, so a longer one is refused (see `codec::keep_alive`).
    let requested = request.connect.keep_alive;
    let max_keep_alive = shared.config.read().max_keep_alive;
    codec::keep_alive(request.version, requested, max_keep_alive).ok_or_else(|| {
        shared.metrics.error(ErrorKind::KeepAliveTooLong);
        Refusal::new(
            ConnectReturnCode::ClientIdentifierNotValid,
            format!(
                "keep-alive {requested} s is longer than this server allows ({} s, mqtt.max_keep_alive); \
                 connect with a shorter one",
                max_keep_alive.as_secs()
            ),
        )
    })
}

/// The client id, and the one the server assigned when the CONNECT's was empty (to announce).
fn client_id(request: &Request) -> Result<(String, Option<String>), Refusal> {
    if !request.connect.client_id.is_empty() {
        return Ok((request.connect.client_id.clone(), None));
    }
    if request.version == Version::V311 && !request.connect.clean_session {
        return Err(Refusal::new(
            ConnectReturnCode::ClientIdentifierNotValid,
            "empty client id needs clean session",
        ));
    }
    let id = format!("meshgate-{}", meshgate_core::wrap::new_id());
    Ok((id.clone(), Some(id)))
}

/// An assigned client id starts with the principal's first client-id prefix, when it has
/// one (so that it passes the prefix check).
fn own_client_id(
    shared: &Shared,
    principal: &Principal,
    client_id: String,
    assigned: Option<String>,
) -> (String, Option<String>) {
    match (assigned, shared.ctx.authorizer.client_id_prefix(principal)) {
        (Some(_), Some(prefix)) => {
            let id = format!("{prefix}{}", meshgate_core::wrap::new_id());
            (id.clone(), Some(id))
        }
        (assigned, _) => (client_id, assigned),
    }
}

/// Checks the credentials of CONNECT.
async fn authenticate(
    shared: &Shared,
    login: Option<&Login>,
    peer: Option<std::net::IpAddr>,
) -> Result<Principal, Refusal> {
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
    let authorizer = &shared.ctx.authorizer;
    authorizer
        .authenticate(credentials, peer)
        .await
        .map_err(|e| {
            let code = match e {
                AuthError::Invalid | AuthError::InvalidToken(_) => {
                    ConnectReturnCode::BadUserNamePassword
                }
                AuthError::RateLimited { .. } => ConnectReturnCode::ConnectionRateExceeded,
                AuthError::Busy => ConnectReturnCode::ServerBusy,
                _ => ConnectReturnCode::NotAuthorized,
            };
            Refusal::new(code, format!("authentication failed: {e}"))
        })
}

/// One of the user's connection slots (`gateway.max_connections_per_user`), held until the
/// session is parked or ended. MQTT 5: 0x97 quota exceeded; 3.1.1: 0x03 server unavailable
/// (see [`connack`]). A user at the cap may still take over its own client id's connection (a
/// client reconnecting before the server noticed its old connection die): that connection's
/// slot becomes this one's, so the slot is taken after the takeover (`Ok(None)`, then
/// [`user_slot_after_takeover`]).
fn user_slot(
    shared: &Shared,
    client_id: &str,
    principal: &Principal,
) -> Result<Option<meshgate_core::ConnectionPermit>, Refusal> {
    match shared.ctx.limits.acquire_user(principal) {
        Ok(p) => Ok(Some(p)),
        Err(_) if shared.connected_as(client_id, principal) => Ok(None),
        Err(e) => {
            shared.metrics.error(e.metric_kind());
            Err(Refusal::new(
                ConnectReturnCode::QuotaExceeded,
                e.to_string(),
            ))
        }
    }
}

/// The user's slot of a connection that took over its client id at the user's cap: the
/// previous connection gave its slot back when it finished (or another connection of the user
/// took it meanwhile: then the cap holds).
fn user_slot_after_takeover(
    shared: &Shared,
    principal: &Principal,
    registration: &mut Registration,
) -> Result<(), Refusal> {
    match shared.ctx.limits.acquire_user(principal) {
        Ok(p) => {
            registration.user_permit = p;
            Ok(())
        }
        Err(e) => {
            shared.metrics.error(e.metric_kind());
            Err(Refusal::new(
                ConnectReturnCode::QuotaExceeded,
                e.to_string(),
            ))
        }
    }
}

/// The will's topic must be one the client may publish to; the grant is kept with the will
/// and its publish takes it (no second check when the connection ends).
fn check_will(
    shared: &Shared,
    will: Option<&LastWill>,
    principal: &Principal,
) -> Result<Option<Authorized>, Refusal> {
    let Some(w) = will else {
        return Ok(None);
    };
    let refused = || Refusal::new(ConnectReturnCode::NotAuthorized, "will topic not allowed");
    let Some(topic) = std::str::from_utf8(&w.topic)
        .ok()
        .and_then(|t| Topic::from_mqtt(t).ok())
    else {
        shared.metrics.error(ErrorKind::Forbidden);
        return Err(refused());
    };
    shared
        .ctx
        .authorize(&shared.metrics, principal, topic)
        .map(Some)
        .map_err(|_| refused())
}

/// The wrapper of this client's plain payloads.
fn wrapper(shared: &Shared, client_id: &str) -> Result<meshgate_core::wrap::Wrapper, Refusal> {
    meshgate_core::wrap::Wrapper::new(binding::client_source(client_id), shared.wrap_type.clone())
        .map_err(|e| {
            // The source is percent-encoded and the type checked by config; report, not panic.
            tracing::warn!(error = %e, "mqtt: cannot build the wrapper for this client");
            Refusal::new(
                ConnectReturnCode::ClientIdentifierNotValid,
                "client id not usable",
            )
        })
}

/// A client id is bound to the principal holding it (connected, or its session kept here or
/// in the backbone): another principal is refused and nothing of the holder's is touched —
/// no takeover, no will, no discarded session (review F4).
fn client_id_taken(shared: &Shared, client_id: &str, principal: &Principal) -> Refusal {
    shared.metrics.error(ErrorKind::ClientIdTaken);
    tracing::info!(
        client_id,
        principal = principal.name(),
        "mqtt: client id held by another user; refused"
    );
    Refusal::new(
        ConnectReturnCode::ClientIdentifierNotValid,
        "client id in use by another user",
    )
}

/// Registers the client id for this connection; a previous connection with the same id is
/// taken over: it closes and, if its session is persistent, parks it — waited for, so the
/// session can be resumed.
async fn register(
    shared: &Arc<Shared>,
    client_id: &str,
    principal: &Principal,
    user_permit: Option<meshgate_core::ConnectionPermit>,
    listing: super::Listing,
) -> Result<Registration, Refusal> {
    let Ok((registration, previous)) =
        Registration::new(shared, client_id, principal, user_permit, listing)
    else {
        return Err(client_id_taken(shared, client_id, principal));
    };
    if let Some(previous) = &previous
        && tokio::time::timeout(TAKEOVER_WAIT, previous.finished())
            .await
            .is_err()
    {
        tracing::warn!(client_id, "mqtt: previous connection did not close in time");
    }
    Ok(registration)
}

/// The session kept for this client id, if it is to be resumed: parked here, or claimed from
/// the backbone's session store (the record to restore). A clean start discards a kept
/// session (its will, if delayed, is published now).
async fn acquire_session(
    shared: &Shared,
    client_id: &str,
    principal: &Principal,
    clean_start: bool,
) -> Result<(Option<Session>, stored::Claim), Refusal> {
    let mut resumed = shared.parked.take(client_id, !clean_start).await;
    let mut claim = stored::Claim::default();
    if shared.ctx.backbone.session_store().is_some() {
        // Sessions live in the backbone: what was parked here is only a placeholder (timers).
        if let Some(mut placeholder) = resumed.take() {
            placeholder.will.cancel();
        }
        match stored::claim(shared, client_id, principal, !clean_start).await {
            Ok(c) => claim = c,
            Err(stored::ClaimError::Taken) => {
                return Err(client_id_taken(shared, client_id, principal));
            }
            Err(stored::ClaimError::Unavailable) => {
                // Deciding without the store could hand one session to two instances.
                return Err(Refusal::new(
                    ConnectReturnCode::ServerUnavailable,
                    "session store unavailable; retry later",
                ));
            }
        }
    }
    if let Some(old) = &resumed
        && old.principal != *principal
    {
        // Not reached: `register` refused another principal's parked session.
        // Another principal may not inherit this session's subscriptions and messages.
        tracing::info!(
            client_id,
            "mqtt: kept session belongs to another user; starting clean"
        );
        resumed = None;
    }
    Ok((resumed, claim))
}

/// Restores what the session store kept (true: there was a session), then saves the session:
/// a persistent session is held here from now on, and the record says so to other instances.
async fn restore_and_save(session: &mut Session, claim: stored::Claim) -> Result<bool, Refusal> {
    session.store_revision = claim.revision;
    let restored = claim.record.is_some();
    if let Some(record) = claim.record
        && session.restore_stored(record).await.is_err()
    {
        return Err(Refusal::new(
            ConnectReturnCode::ServerUnavailable,
            "cannot restore the session's subscriptions; retry later",
        ));
    }
    match session.save_stored().await {
        stored::Saved::Yes => Ok(restored),
        // A client id the store cannot hold (too long for its keys).
        stored::Saved::Refused(reason) => Err(Refusal::new(
            ConnectReturnCode::ClientIdentifierNotValid,
            reason,
        )),
        stored::Saved::Conflict | stored::Saved::Failed => Err(Refusal::new(
            ConnectReturnCode::ServerUnavailable,
            "session store unavailable or session taken elsewhere; retry later",
        )),
    }
}

/// What the CONNACK of an accepted CONNECT says besides the [`Terms`].
struct Accepted {
    session_present: bool,
    /// The client id the server assigned (empty CONNECT client id).
    assigned: Option<String>,
    /// Server Keep Alive (MQTT 5), when the client's keep-alive is not the one granted.
    server_keep_alive: Option<u16>,
}

/// Answers CONNACK (success) and readies the session for the packet loop: a resumed session
/// first resends what the client had not acknowledged, then what was queued while it was away.
/// `None`: the CONNACK could not be written (the session ended).
async fn accept<S: AsyncWrite + Unpin>(
    stream: &mut S,
    mut session: Session,
    terms: &Terms,
    ack: Accepted,
) -> Option<Session> {
    let shared = session.shared.clone();
    let version = terms.version;
    let granted_expiry = u32::try_from(terms.expiry.as_secs()).unwrap_or(u32::MAX);
    let ack_props = ConnAckProperties {
        // MQTT 5 §3.2.2.3.2: a Session Expiry Interval other than the client's is announced.
        session_expiry_interval: (granted_expiry != terms.requested_expiry)
            .then_some(granted_expiry),
        receive_max: Some(terms.own_receive_max),
        max_packet_size: Some(terms.own_max_packet),
        assigned_client_identifier: ack.assigned,
        topic_alias_max: Some(TOPIC_ALIAS_MAX),
        retain_available: Some(1),
        max_qos: None,
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        shared_subscription_available: Some(1),
        server_keep_alive: ack.server_keep_alive,
        ..Default::default()
    };
    let packet = connack(
        version,
        ConnectReturnCode::Success,
        ack.session_present,
        Some(ack_props),
    );
    if write_now(stream, version, packet).await.is_err() {
        finish(session, End::Abnormal).await;
        return None;
    }
    shared.metrics.connections.inc();
    tracing::debug!(
        client_id = session.client_id,
        ?version,
        principal = session.principal.name(),
        session_present = ack.session_present,
        "mqtt connected"
    );
    session.resend_inflight();
    session.fill_window();
    Some(session)
}

/// How long a connection taking over a client id waits for the previous one to close.
pub(super) const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// A connection's claim on its client id; released (and announced to a connection waiting to
/// take over) when dropped, after the session was parked or ended. Holds the connection's
/// per-user slot as long.
pub(super) struct Registration {
    /// Empty (the default permit) only while a connection at its user's cap takes over its
    /// own client id. (Not an `Option`: that would take 8 bytes more of every idle
    /// connection's future.)
    user_permit: meshgate_core::ConnectionPermit,
    shared: Arc<Shared>,
    /// The connection in the admin API's registry: its id and client id, how it is told to
    /// close (another connection takes over this client id, an operator, shutdown) and how it
    /// tells a connection taking over that it has finished.
    pub(super) listed: meshgate_core::connections::Registered,
}

impl Registration {
    /// The registration, and the previous connection when this one takes over (to wait for;
    /// not kept: every idle connection's future holds a `Registration`).
    fn new(
        shared: &Arc<Shared>,
        client_id: &str,
        principal: &Principal,
        user_permit: Option<meshgate_core::ConnectionPermit>,
        listing: super::Listing,
    ) -> Result<(Self, Option<Arc<meshgate_core::connections::Connection>>), crate::ClientIdTaken>
    {
        let listed = shared
            .ctx
            .connections
            .register(meshgate_core::connections::NewConnection {
                id: shared.ctx.next_connection_id(),
                protocol: listing.protocol,
                version: listing.version,
                principal: principal.clone(),
                client_id: Some(client_id.to_owned()),
                peer: listing.peer,
            });
        // Refused: `listed` drops here, and leaves the registry.
        let previous = shared.register(listed.connection(), principal)?;
        let registration = Registration {
            user_permit: user_permit.unwrap_or_default(),
            shared: shared.clone(),
            listed,
        };
        Ok((registration, previous))
    }

    pub(super) fn connection(&self) -> u64 {
        self.listed.id()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.unregister(&self.listed);
        // The slot is given back before a connection taking over is woken, which may need
        // it.
        drop(std::mem::take(&mut self.user_permit));
        self.listed.finish();
    }
}
