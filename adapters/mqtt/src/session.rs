//! One MQTT connection: CONNECT/CONNACK, then the packet loop.
//!
//! One task per connection owns the socket and polls the connection's backbone subscriptions
//! directly, as one stream set (no task per subscription: one wake-up per delivered message).
//! Deliveries beyond the client's in-flight window wait in `pending` (at most `mqtt.max_queued`);
//! past that the stream set is not polled, so backpressure reaches the backbone queue and its
//! full-queue policy decides (block the publishers, or drop and count).
//! Inbound PUBLISHes are handled one at a time and acknowledged (PUBACK/PUBREC) only after
//! the backbone accepted the event.
//!
//! Implemented: MQTT 3.1.1 and 5, QoS 0/1/2 inbound (QoS 2 deduplicated by packet id until
//! PUBREL), QoS 0/1 outbound (subscriptions are granted at most QoS 1) with an in-flight window,
//! keep-alive (1.5×), connect timeout, session takeover, wills, retained messages, v5 no-local
//! and receive-maximum, shared subscriptions (`$share/group/filter`, as backbone queue groups),
//! inbound topic aliases.
//! Clean sessions only: state ends with the connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meshgate_core::{
    Credentials, Delivery, Origin, Principal, PublishError, SubscribeOptions, Topic, TopicFilter,
};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, Filter,
    LastWill, LastWillProperties, Login, Packet, PingResp, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, PublishProperties, QoS, SubAck, SubscribeReasonCode,
    UnsubAck, UnsubAckReason,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::binding::{self, Inbound};
use crate::codec::{self, ConnectProbe, Version};

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

/// A delivery waiting to be written: the event and the QoS it goes out with.
struct Outgoing {
    delivery: Delivery,
    qos: QoS,
    retain: bool,
}

struct Subscription {
    /// The filter as the client wrote it (`$share/g/a/#` for a shared subscription).
    key: String,
    filter: TopicFilter,
    /// Shared subscription: a backbone queue group; delivered independently of the others.
    shared: bool,
    granted: QoS,
    no_local: bool,
    /// Ends this subscription's stream in the connection's stream set (unsubscribe).
    cancel: CancellationToken,
}

/// The state of one connected client.
struct Session {
    shared: Arc<Shared>,
    version: Version,
    client_id: String,
    /// Wraps this client's plain payloads (source naming the client, configured type).
    wrapper: meshgate_core::wrap::Wrapper,
    principal: Principal,
    origin: Origin,
    /// Largest packet the client accepts (MQTT 5 CONNECT property).
    client_max_packet: usize,
    /// How many QoS 1/2 messages we may have unacknowledged at the client.
    client_receive_max: usize,
    out: BytesMut,
    subscriptions: Vec<Subscription>,
    /// Subscription streams created while handling a packet, for the packet loop to add to
    /// its stream set.
    new_streams: Vec<DeliveryStream>,
    /// Deliveries waiting for a free slot in the in-flight window.
    pending: VecDeque<Outgoing>,
    /// QoS 1 messages sent and not yet PUBACKed.
    inflight: HashMap<u16, Delivery>,
    next_pkid: u16,
    /// QoS 2 packet ids received (PUBREC sent), waiting for PUBREL.
    incoming_qos2: HashSet<u16>,
    will: Option<(LastWill, Option<LastWillProperties>)>,
    /// Topic aliases the client set (MQTT 5), allocated on first use.
    aliases: Option<HashMap<u16, Topic>>,
    /// Fired when another connection takes over this client id.
    takeover: CancellationToken,
    connection: u64,
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

/// Most QoS meshgate grants to a subscription (outbound QoS 2 is not implemented yet).
const MAX_GRANTED_QOS: QoS = QoS::AtLeastOnce;

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

fn connack(version: Version, code: ConnectReturnCode, props: Option<ConnAckProperties>) -> Packet {
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
            ConnectReturnCode::ServerBusy | ConnectReturnCode::ServerUnavailable => {
                ConnectReturnCode::ServiceUnavailable
            }
            _ => ConnectReturnCode::NotAuthorized,
        },
    };
    let props = if version == Version::V5 { props } else { None };
    Packet::ConnAck(
        ConnAck {
            session_present: false,
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
    let mut buf = BytesMut::with_capacity(512);
    let timeout = shared.config.connect_timeout;
    let connect = tokio::time::timeout(
        timeout,
        Box::pin(connect_phase(&mut stream, &mut buf, &shared)),
    )
    .await;
    let Ok(Some((session, keep_alive))) = connect else {
        if connect.is_err() {
            shared.metrics.error("connect_timeout");
        }
        return;
    };
    run_session(stream, buf, session, keep_alive).await;
}

/// Reads CONNECT and answers CONNACK. `None`: refused (already answered) or broken.
async fn connect_phase<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    shared: &Arc<Shared>,
) -> Option<(Session, u16)> {
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
                let _ = write_now(stream, Version::V311, connack(Version::V311, code, None)).await;
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
        connack(version, code, Some(props))
    };
    // Client identifier rules (3.1.1 §3.1.3.1, 5 §3.1.3.1).
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
    let takeover = shared.register(&client_id, connection);
    let client_max_packet = props
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .map_or(usize::MAX, |m| m as usize);
    let client_receive_max = props
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .map_or(65_535, usize::from)
        .min(usize::from(shared.config.max_inflight));
    // Sessions end with the connection (no persistence yet). MQTT 5 §3.2.2.3.2: when the server
    // uses another Session Expiry Interval than the client asked for, it says so.
    let requested_expiry = props.as_ref().and_then(|p| p.session_expiry_interval);
    let ack_props = ConnAckProperties {
        session_expiry_interval: requested_expiry.filter(|e| *e > 0).map(|_| 0),
        receive_max: Some(shared.config.max_inflight),
        max_packet_size: u32::try_from(max).ok(),
        assigned_client_identifier: assigned,
        topic_alias_max: Some(TOPIC_ALIAS_MAX),
        retain_available: Some(1),
        max_qos: None,
        wildcard_subscription_available: Some(1),
        subscription_identifiers_available: Some(0),
        shared_subscription_available: Some(1),
        ..Default::default()
    };
    if write_now(
        stream,
        version,
        connack(version, ConnectReturnCode::Success, Some(ack_props)),
    )
    .await
    .is_err()
    {
        shared.unregister(&client_id, connection);
        return None;
    }
    shared.metrics.connections.inc();
    tracing::debug!(
        client_id,
        ?version,
        principal = principal.name(),
        "mqtt connected"
    );
    let session = Session {
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
        new_streams: Vec::new(),
        pending: VecDeque::new(),
        inflight: HashMap::new(),
        next_pkid: 1,
        incoming_qos2: HashSet::new(),
        will: will.map(|w| (w, will_props)),
        aliases: None,
        takeover,
        connection,
    };
    Some((session, connect.keep_alive))
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

/// A delivery, with the subscription (its key) that produced it.
pub(crate) struct Queued {
    key: Arc<str>,
    delivery: Delivery,
}

/// One subscription's deliveries, tagged with its key, ending when it is cancelled.
type DeliveryStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Queued> + Send>>;

/// The connection's subscriptions, polled in turn. While the client does not keep up, the packet
/// loop stops polling them, so each backbone subscription's queue fills and the backbone's
/// full-queue policy applies (`block`: publishers wait and are told "busy" past
/// `block_timeout`; `drop`: counted drops) — nothing is lost silently here.
///
/// A plain vector polled round-robin rather than `SelectAll`, which allocates a task node for
/// every item it yields (seen in a profile of the MQTT benchmark).
#[derive(Default)]
struct DeliveryStreams {
    streams: Vec<DeliveryStream>,
    next: usize,
}

impl DeliveryStreams {
    fn push(&mut self, s: DeliveryStream) {
        self.streams.push(s);
    }

    fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// The next ready delivery, trying each subscription once starting after the last one that
    /// yielded; finished subscriptions are removed.
    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Queued>> {
        use std::task::Poll;
        let mut tried = 0;
        while tried < self.streams.len() {
            let i = self.next % self.streams.len();
            match self.streams[i].as_mut().poll_next(cx) {
                Poll::Ready(Some(q)) => {
                    self.next = i + 1;
                    return Poll::Ready(Some(q));
                }
                Poll::Ready(None) => {
                    drop(self.streams.swap_remove(i));
                }
                Poll::Pending => {
                    self.next = i + 1;
                    tried += 1;
                }
            }
        }
        if self.streams.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    /// A delivery that is ready now, without waiting.
    fn try_next(&mut self) -> Option<Queued> {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match self.poll_next(&mut cx) {
            std::task::Poll::Ready(q) => q,
            std::task::Poll::Pending => None,
        }
    }
}

fn delivery_stream(
    sub: meshgate_core::Subscription,
    key: Arc<str>,
    cancel: CancellationToken,
) -> DeliveryStream {
    use futures_util::StreamExt;
    Box::pin(
        sub.map(move |delivery| Queued {
            key: key.clone(),
            delivery,
        })
        .take_until(cancel.cancelled_owned()),
    )
}

/// Splits `$share/<group>/<filter>` (MQTT 5 §4.8.2); `None` for an ordinary filter,
/// `Some(Err)` for a malformed shared one.
fn shared_filter(path: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = path.strip_prefix("$share/")?;
    Some(match rest.split_once('/') {
        Some((group, filter))
            if !group.is_empty() && !group.contains(['+', '#']) && !filter.is_empty() =>
        {
            Ok((group, filter))
        }
        _ => Err(()),
    })
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
            tracing::debug!(error = %e, "mqtt: cannot encode packet");
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
                if let Some(d) = self.inflight.remove(&ack.pkid) {
                    let _ = d.ack().await;
                    self.shared.metrics.sent.inc();
                    self.shared.out_by_qos[1].inc();
                }
                self.fill_window();
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
            Packet::Subscribe(sub, _) => {
                self.handle_subscribe(sub.pkid, sub.filters).await;
                Flow::Continue
            }
            Packet::Unsubscribe(unsub, _) => {
                let mut reasons = Vec::with_capacity(unsub.filters.len());
                for f in &unsub.filters {
                    let before = self.subscriptions.len();
                    self.subscriptions.retain(|s| {
                        let keep = s.key != *f;
                        if !keep {
                            s.cancel.cancel();
                        }
                        keep
                    });
                    reasons.push(if self.subscriptions.len() < before {
                        UnsubAckReason::Success
                    } else {
                        UnsubAckReason::NoSubscriptionExisted
                    });
                }
                self.write(Packet::UnsubAck(
                    UnsubAck {
                        pkid: unsub.pkid,
                        reasons,
                    },
                    None,
                ));
                Flow::Continue
            }
            Packet::PingReq(_) => {
                self.write(Packet::PingResp(PingResp));
                Flow::Continue
            }
            Packet::Disconnect(d, _) => {
                if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                    Flow::End(End::Abnormal)
                } else {
                    Flow::End(End::Normal)
                }
            }
            // Outbound QoS 2 is not granted, so PUBREC/PUBCOMP from a client are out of order,
            // as is a second CONNECT.
            other => {
                tracing::debug!(packet = ?other, "mqtt: unexpected packet");
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

    async fn handle_publish(
        &mut self,
        p: rumqttd::protocol::Publish,
        props: Option<PublishProperties>,
        meta: codec::PublishMeta,
    ) -> Flow {
        let (qos, pkid) = (meta.qos, meta.pkid);
        if qos == QoS::ExactlyOnce && self.incoming_qos2.contains(&pkid) {
            // A resent QoS 2 publish before PUBREL: acknowledge again, publish once.
            self.write(Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            ));
            return Flow::Continue;
        }
        if qos == QoS::ExactlyOnce
            && self.incoming_qos2.len() >= usize::from(self.shared.config.max_inflight)
        {
            self.shared.metrics.error("receive_maximum");
            self.disconnect(DisconnectReasonCode::ReceiveMaximumExceeded);
            return Flow::End(End::Abnormal);
        }
        // MQTT 5 topic aliases (§3.3.2.3.4): a topic with an alias sets it, an empty topic with
        // an alias uses it.
        let alias = props.as_ref().and_then(|p| p.topic_alias);
        let aliased = match alias {
            None => None,
            Some(a) if a == 0 || a > TOPIC_ALIAS_MAX => {
                self.disconnect(DisconnectReasonCode::TopicAliasInvalid);
                return Flow::End(End::Abnormal);
            }
            Some(a) if p.topic.is_empty() => match self.aliases.as_ref().and_then(|m| m.get(&a)) {
                Some(t) => Some(t.clone()),
                None => {
                    // An alias that was never set is a protocol error.
                    self.disconnect(DisconnectReasonCode::ProtocolError);
                    return Flow::End(End::Abnormal);
                }
            },
            Some(_) => None,
        };
        let topic = match aliased
            .map(Ok)
            .or_else(|| std::str::from_utf8(&p.topic).ok().map(Topic::from_mqtt))
        {
            Some(Ok(t)) => t,
            _ => {
                if self.version == Version::V5 && qos == QoS::AtMostOnce {
                    self.disconnect(DisconnectReasonCode::TopicNameInvalid);
                    return Flow::End(End::Abnormal);
                }
                return self.refuse(qos, pkid, PubAckReason::TopicNameInvalid, "bad_topic");
            }
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
            return self.refuse(qos, pkid, PubAckReason::NotAuthorized, "forbidden");
        }
        let event = binding::decode(Inbound {
            version: self.version,
            topic: topic.as_str(),
            payload: p.payload.clone(),
            properties: props.as_ref(),
            wrapper: &self.wrapper,
        });
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, client_id = self.client_id, "mqtt: invalid CloudEvent");
                if self.version == Version::V311 {
                    // No way to say it in 3.1.1: acknowledge, drop, count.
                    self.shared.metrics.error("bad_event");
                    self.shared.metrics.dropped("bad_event").inc();
                    self.ack(qos, pkid, PubAckReason::Success);
                    return Flow::Continue;
                }
                return self.refuse(qos, pkid, PubAckReason::PayloadFormatInvalid, "bad_event");
            }
        };
        let event = Arc::new(event);
        let envelope = meshgate_core::Envelope::new(topic.clone(), event, self.origin.clone())
            .with_qos(qos as u8);
        if p.retain {
            self.shared.retained.update(&envelope, p.payload.is_empty());
        }
        match self
            .shared
            .ctx
            .publish_envelope(&self.shared.metrics, &self.principal, envelope)
            .await
        {
            Ok(()) => {
                self.shared.in_by_qos[usize::from(qos as u8).min(2)].inc();
                self.ack(qos, pkid, PubAckReason::Success);
                Flow::Continue
            }
            Err(PublishError::Forbidden(_)) => {
                self.refuse(qos, pkid, PubAckReason::NotAuthorized, "forbidden")
            }
            Err(PublishError::Backbone(e)) => {
                tracing::debug!(error = %e, "mqtt: backbone refused");
                // Never acknowledge what the backbone did not take.
                self.refuse(qos, pkid, PubAckReason::QuotaExceeded, "backbone")
            }
        }
    }

    async fn handle_subscribe(&mut self, pkid: u16, filters: Vec<Filter>) {
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained_for = Vec::new();
        let failure = |v5: SubscribeReasonCode| match self.version {
            Version::V5 => v5,
            Version::V311 => SubscribeReasonCode::Failure,
        };
        for f in filters {
            let (group, filter_text) = match shared_filter(&f.path) {
                None => (None, f.path.as_str()),
                Some(Ok((g, rest))) => (Some(g), rest),
                Some(Err(())) => {
                    codes.push(failure(SubscribeReasonCode::TopicFilterInvalid));
                    continue;
                }
            };
            if group.is_some() && f.nolocal {
                // MQTT 5 §3.8.3.1: No Local on a shared subscription is a protocol error.
                codes.push(failure(SubscribeReasonCode::TopicFilterInvalid));
                continue;
            }
            let Ok(filter) = TopicFilter::parse(filter_text) else {
                codes.push(failure(SubscribeReasonCode::TopicFilterInvalid));
                continue;
            };
            if self
                .shared
                .ctx
                .authorizer
                .check_subscribe(&self.principal, &filter)
                .is_err()
            {
                self.shared.metrics.error("forbidden");
                codes.push(failure(SubscribeReasonCode::NotAuthorized));
                continue;
            }
            let granted = qos_min(f.qos, MAX_GRANTED_QOS);
            let existed = self.subscriptions.iter().position(|s| s.key == f.path);
            if let Some(i) = existed {
                // Same filter again: replace options, keep the backbone subscription.
                self.subscriptions[i].granted = granted;
                self.subscriptions[i].no_local = f.nolocal;
            } else {
                let options = SubscribeOptions {
                    // Shared subscriptions are backbone queue groups, so the group's members
                    // share the messages across connections (and, on NATS, instances).
                    queue_group: group.map(|g| format!("mqtt-share:{g}")),
                    capacity: None,
                };
                let sub = match self
                    .shared
                    .ctx
                    .backbone
                    .subscribe(filter.clone(), options)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "mqtt: backbone subscribe failed");
                        codes.push(failure(SubscribeReasonCode::ImplementationSpecific));
                        continue;
                    }
                };
                let key: Arc<str> = Arc::from(f.path.as_str());
                let cancel = CancellationToken::new();
                self.new_streams
                    .push(delivery_stream(sub, key, cancel.clone()));
                self.subscriptions.push(Subscription {
                    key: f.path.clone(),
                    filter: filter.clone(),
                    shared: group.is_some(),
                    granted,
                    no_local: f.nolocal,
                    cancel,
                });
            }
            // Retained messages are not sent for shared subscriptions (MQTT 5 §4.8.2).
            if group.is_some() {
                codes.push(SubscribeReasonCode::Success(granted));
                continue;
            }
            let send_retained = match f.retain_forward_rule {
                rumqttd::protocol::RetainForwardRule::OnEverySubscribe => true,
                rumqttd::protocol::RetainForwardRule::OnNewSubscribe => existed.is_none(),
                rumqttd::protocol::RetainForwardRule::Never => false,
            };
            if send_retained {
                retained_for.push((filter, granted));
            }
            codes.push(SubscribeReasonCode::Success(granted));
        }
        self.write(Packet::SubAck(
            SubAck {
                pkid,
                return_codes: codes,
            },
            None,
        ));
        for (filter, granted) in retained_for {
            for envelope in self.shared.retained.matching(&filter) {
                let qos = qos_min(to_qos(envelope.qos), granted);
                self.send(Outgoing {
                    delivery: Delivery::new(envelope, None),
                    qos,
                    retain: true,
                });
            }
        }
    }

    /// A delivery from a subscription: deliver once per connection, at the best QoS of the matching
    /// subscriptions, honouring no-local.
    fn deliver(&mut self, q: Queued) {
        let Some(source) = self.subscriptions.iter().find(|s| *s.key == *q.key) else {
            // Unsubscribed meanwhile.
            return;
        };
        let publish_qos = to_qos(q.delivery.envelope.qos);
        if source.shared {
            let qos = qos_min(publish_qos, source.granted);
            self.send(Outgoing {
                delivery: q.delivery,
                qos,
                retain: false,
            });
            return;
        }
        let topic = q.delivery.topic();
        let mut first = None;
        let mut best = QoS::AtMostOnce;
        for s in self.subscriptions.iter().filter(|s| !s.shared) {
            if s.filter.matches(topic) {
                if s.no_local && q.delivery.envelope.origin == self.origin {
                    continue;
                }
                first.get_or_insert(s.key.as_str());
                best = if (s.granted as u8) > (best as u8) {
                    s.granted
                } else {
                    best
                };
            }
        }
        if first != Some(&*q.key) {
            return;
        }
        let qos = qos_min(publish_qos, best);
        self.send(Outgoing {
            delivery: q.delivery,
            qos,
            retain: false,
        });
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if self.next_pkid == u16::MAX {
                1
            } else {
                self.next_pkid + 1
            };
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }

    /// Writes a delivery now, or queues it while the in-flight window is full.
    fn send(&mut self, o: Outgoing) {
        if o.qos != QoS::AtMostOnce && self.inflight.len() >= self.client_receive_max {
            // Bounded: the packet loop stops taking deliveries while `pending` is full.
            self.pending.push_back(o);
            return;
        }
        let envelope = o.delivery.envelope.clone();
        let encoded = binding::encode(
            &envelope.event,
            || envelope.json(),
            self.version,
            self.shared.config.v5_outbound,
            self.shared.config.v311_outbound,
        );
        let topic = envelope.topic.as_str();
        let approx = 16
            + topic.len()
            + encoded.payload.len()
            + encoded.properties.as_ref().map_or(0, |p| {
                p.user_properties
                    .iter()
                    .map(|(k, v)| 5 + k.len() + v.len())
                    .sum::<usize>()
                    + p.content_type.as_ref().map_or(0, |c| 3 + c.len())
            });
        if approx > self.client_max_packet {
            self.shared.metrics.dropped("too_large_for_client").inc();
            return;
        }
        let pkid = if o.qos == QoS::AtMostOnce {
            0
        } else {
            self.alloc_pkid()
        };
        let publish = codec::publish(topic, encoded.payload, o.qos, pkid, o.retain, false);
        self.write(Packet::Publish(publish, encoded.properties));
        if o.qos == QoS::AtMostOnce {
            self.shared.metrics.sent.inc();
            self.shared.out_by_qos[0].inc();
        } else {
            self.inflight.insert(pkid, o.delivery);
        }
    }

    fn fill_window(&mut self) {
        while self.inflight.len() < self.client_receive_max {
            let Some(o) = self.pending.pop_front() else {
                break;
            };
            self.send(o);
        }
    }

    async fn publish_will(&mut self) {
        let Some((will, props)) = self.will.take() else {
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
            ..Default::default()
        });
        let event = binding::decode(Inbound {
            version: self.version,
            topic: topic.as_str(),
            payload: will.message.clone(),
            properties: publish_props.as_ref(),
            wrapper: &self.wrapper,
        });
        let Ok(event) = event else {
            self.shared.metrics.dropped("bad_will").inc();
            return;
        };
        let envelope = meshgate_core::Envelope::new(topic, Arc::new(event), self.origin.clone())
            .with_qos(will.qos as u8);
        if will.retain {
            self.shared
                .retained
                .update(&envelope, will.message.is_empty());
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

/// The next delivery, or never while the connection has no subscriptions.
async fn next_queued(streams: &mut Option<DeliveryStreams>) -> Option<Queued> {
    match streams {
        Some(s) if !s.is_empty() => std::future::poll_fn(|cx| s.poll_next(cx)).await,
        _ => std::future::pending().await,
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
    // Created at the first subscription: an idle connection has none, which keeps it small.
    let mut streams: Option<DeliveryStreams> = None;
    let mut busy = false;
    let end = 'conn: loop {
        // Handle every complete packet already buffered.
        loop {
            let meta = codec::peek_publish_meta(&buf);
            match codec::read(session.version, &mut buf, max) {
                Ok(Some(packet)) => {
                    if let Some(k) = keep {
                        deadline = tokio::time::Instant::now() + k;
                    }
                    // Boxed: handling a packet needs a large future, but only briefly; an idle
                    // connection should not carry its space (connection memory, issue 3).
                    if let Flow::End(e) = Box::pin(session.handle(packet, meta)).await {
                        break 'conn e;
                    }
                }
                Ok(None) => break,
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
                    break 'conn End::Abnormal;
                }
            }
        }
        if !session.out.is_empty() {
            if wr.write_all(&session.out).await.is_err() {
                break End::Abnormal;
            }
            // Give the buffer back: an idle connection holds no write buffer.
            session.out = BytesMut::new();
        }
        for stream in session.new_streams.drain(..) {
            streams
                .get_or_insert_with(DeliveryStreams::default)
                .push(stream);
        }
        // Idle connections keep a small read buffer; busy ones read in larger chunks.
        if buf.is_empty() {
            buf = BytesMut::with_capacity(if busy { 16 * 1024 } else { 64 });
        }
        tokio::select! {
            biased;
            _ = shared.ctx.shutdown.cancelled() => {
                session.disconnect(DisconnectReasonCode::ServerShuttingDown);
                break End::Server;
            }
            _ = takeover.cancelled() => {
                session.disconnect(DisconnectReasonCode::SessionTakenOver);
                break End::Server;
            }
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break End::Abnormal,
                Ok(n) => busy = n >= 64,
            },
            // While the in-flight window and `pending` are full, deliveries wait in the queue
            // (and behind it, in the backbone), until the client acknowledges.
            Some(q) = next_queued(&mut streams), if session.pending.len() < pending_limit => {
                session.deliver(q);
                // Take what else is ready without waiting, so writes are batched.
                if let Some(s) = streams.as_mut() {
                    while session.pending.len() < pending_limit && session.out.len() < 64 * 1024 {
                        let Some(q) = s.try_next() else { break };
                        session.deliver(q);
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline), if keep.is_some() => {
                shared.metrics.error("keep_alive_timeout");
                session.disconnect(DisconnectReasonCode::KeepAliveTimeout);
                break End::Abnormal;
            }
        }
    };
    if !session.out.is_empty() {
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&session.out)).await;
    }
    let _ = wr.shutdown().await;
    for s in session.subscriptions.drain(..) {
        s.cancel.cancel();
    }
    if end != End::Normal {
        Box::pin(session.publish_will()).await;
    }
    shared.unregister(&session.client_id, session.connection);
    shared.metrics.connections.dec();
    tracing::debug!(client_id = session.client_id, ?end, "mqtt disconnected");
}
