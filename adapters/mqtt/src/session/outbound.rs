//! Messages to the client: routing a backbone delivery to the session's subscriptions, the
//! in-flight window (QoS 1 and the full QoS 2 handshake), retransmission when a persistent
//! session resumes, and queueing while its client is away.

use meshgate_core::metrics::DropReason;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use meshgate_config::PlainMessages;
use meshgate_core::Delivery;
use rumqttd::protocol::{Packet, PubRecReason, PubRel, PubRelReason, QoS};
use tokio_util::sync::CancellationToken;

use super::aliases::OutAlias;
use super::{Session, qos_min, to_qos};
use crate::binding;
use crate::codec::{self, Version};

/// A delivery on its way to the client: the event and how it goes out.
pub(super) struct Outgoing {
    pub(super) delivery: Delivery,
    pub(super) qos: QoS,
    pub(super) retain: bool,
    /// MQTT 5 Subscription Identifiers of the subscriptions it matched.
    pub(super) sub_ids: Vec<usize>,
}

/// Why a delivery is not sent to a client (counted in `meshgate_events_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Skip {
    /// A field or length MQTT cannot carry (`reason="unrepresentable"`).
    Unrepresentable,
    /// Larger than the client's Maximum Packet Size (`reason="too_large_for_client"`).
    TooLarge,
}

/// A PUBLISH checked to fit its client, ready to write.
struct Prepared {
    payload: bytes::Bytes,
    properties: Option<rumqttd::protocol::PublishProperties>,
    /// False: the topic goes as an alias the client already has (empty topic name).
    full_topic: bool,
    /// An alias this PUBLISH gives the client for its topic.
    new_alias: Option<u16>,
}

/// The in-flight window to the client and what waits for it: QoS 1/2 messages sent and not
/// yet acknowledged (at most the client's Receive Maximum), the deliveries waiting for a slot,
/// and the packet ids and send order they take. What a persistent session keeps across its
/// connections, apart from the Receive Maximum, which is each connection's own.
pub(super) struct Window {
    /// How many QoS 1/2 messages we may have unacknowledged at the client (u16, as the
    /// Receive Maximum: an idle connection's memory).
    receive_max: u16,
    /// Deliveries waiting for a free slot in the in-flight window (or for the client to return).
    pub(super) pending: VecDeque<Outgoing>,
    /// QoS 1/2 messages sent and not yet fully acknowledged.
    inflight: HashMap<u16, Inflight, super::PacketIdHasher>,
    next_seq: u64,
    pub(super) next_pkid: u16,
}

impl Window {
    /// Nothing waits for a slot and nothing is unacknowledged at the client.
    pub(super) fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.inflight.is_empty()
    }

    /// Messages not fully delivered: waiting for a slot, or sent and unacknowledged.
    /// Messages sent and not yet acknowledged by the client.
    pub(super) fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    pub(super) fn undelivered(&self) -> usize {
        self.pending.len() + self.inflight.len()
    }

    /// An empty window of `receive_max` messages.
    pub(super) fn new(receive_max: u16) -> Self {
        Window {
            receive_max,
            pending: VecDeque::new(),
            inflight: HashMap::default(),
            next_seq: 0,
            next_pkid: 1,
        }
    }

    /// Takes over what the previous connection of a persistent session left: queued and
    /// in-flight messages, packet ids, send order.
    pub(super) fn resume(&mut self, old: &mut Window) {
        self.pending = std::mem::take(&mut old.pending);
        self.inflight = std::mem::take(&mut old.inflight);
        self.next_seq = old.next_seq;
        self.next_pkid = old.next_pkid;
    }

    /// Whether as many QoS 1/2 messages are in flight as the client accepts.
    fn is_full(&self) -> bool {
        self.inflight.len() >= usize::from(self.receive_max)
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

    /// Adds an in-flight entry, numbered in send order.
    fn track(&mut self, pkid: u16, stage: Stage) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight.insert(pkid, Inflight { seq, stage });
    }

    /// Packet ids in flight whose entries `keep` selects, in send order.
    fn in_send_order(&self, keep: impl Fn(&Inflight) -> bool) -> Vec<u16> {
        let mut ids: Vec<(u64, u16)> = self
            .inflight
            .iter()
            .filter(|(_, e)| keep(e))
            .map(|(p, e)| (e.seq, *p))
            .collect();
        ids.sort_unstable();
        ids.into_iter().map(|(_, p)| p).collect()
    }

    /// Packet ids of the QoS 2 messages released (PUBREL sent) and not yet completed, in send
    /// order: what a session moving to another instance must still finish.
    pub(super) fn released_pkids(&self) -> Vec<u16> {
        self.in_send_order(|e| matches!(e.stage, Stage::Released))
    }

    /// A QoS 2 message released on another instance: PUBREL is resent on reconnect.
    pub(super) fn restore_released(&mut self, pkid: u16) {
        self.track(pkid, Stage::Released);
    }
}

/// A QoS 1/2 message the client has not finished acknowledging.
struct Inflight {
    /// Send order, so a resumed session retransmits in the original order (MQTT 5 §4.6).
    seq: u64,
    stage: Stage,
}

enum Stage {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent(Outgoing),
    /// QoS 2: PUBREC received (the delivery is acknowledged), PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// A delivery, with the subscription (its key) that produced it.
pub(crate) struct Queued {
    pub(super) key: Arc<str>,
    pub(super) delivery: Delivery,
}

/// One subscription's deliveries, tagged with its key, ending when it is cancelled.
pub(super) type DeliveryStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Queued> + Send>>;

/// The session's subscriptions, polled in turn. While the client does not keep up, the packet
/// loop stops polling them, so each backbone subscription's queue fills and the backbone's
/// full-queue policy applies (`block`: publishers wait and are told "busy" past
/// `block_timeout`; `drop`: counted drops) — nothing is lost silently here.
///
/// A plain vector polled round-robin rather than `SelectAll`, which allocates a task node for
/// every item it yields (seen in a profile of the MQTT benchmark).
#[derive(Default)]
pub(super) struct DeliveryStreams {
    streams: Vec<DeliveryStream>,
    next: usize,
}

impl DeliveryStreams {
    pub(super) fn push(&mut self, s: DeliveryStream) {
        self.streams.push(s);
    }

    pub(super) fn is_empty(&self) -> bool {
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
    pub(super) fn try_next(&mut self) -> Option<Queued> {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match self.poll_next(&mut cx) {
            std::task::Poll::Ready(q) => q,
            std::task::Poll::Pending => None,
        }
    }
}

/// The next delivery, or never while there are no subscriptions.
pub(super) async fn next_queued(streams: &mut Option<DeliveryStreams>) -> Option<Queued> {
    match streams {
        Some(s) if !s.is_empty() => std::future::poll_fn(|cx| s.poll_next(cx)).await,
        _ => std::future::pending().await,
    }
}

pub(super) fn delivery_stream(
    sub: meshgate_core::Subscription,
    key: Arc<str>,
    cancel: CancellationToken,
) -> DeliveryStream {
    Box::pin(Tagged { sub, key, cancel })
}

/// A subscription's deliveries tagged with its key, ending once `cancel` fires.
struct Tagged {
    sub: meshgate_core::Subscription,
    key: Arc<str>,
    cancel: CancellationToken,
}

impl futures_util::Stream for Tagged {
    type Item = Queued;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Queued>> {
        // The token is checked, not awaited (`take_until` polled its future, and with it a
        // lock in the token's waiter list, on every delivery): only the session polling this
        // stream cancels it (unsubscribe), and a delivery arriving afterwards wakes that
        // session, which then ends the stream here.
        if self.cancel.is_cancelled() {
            return std::task::Poll::Ready(None);
        }
        let this = &mut *self;
        std::pin::Pin::new(&mut this.sub).poll_next(cx).map(|d| {
            d.map(|delivery| Queued {
                key: this.key.clone(),
                delivery,
            })
        })
    }
}

impl Session {
    /// How a delivery goes to this client, if at all: once per session even when several
    /// subscriptions match (at the best granted QoS, with all their identifiers), honouring
    /// no-local and retain-as-published. Shared subscriptions deliver independently.
    /// A delivery not sent (another subscription sends it, or it was unsubscribed meanwhile)
    /// is settled with the backbone after the next write.
    fn route(&mut self, q: Queued) -> Option<Outgoing> {
        self.reauthorize();
        let Some(source) = self
            .subscriptions
            .iter()
            .find(|s| *s.key == *q.key && !s.revoked)
        else {
            self.settle_later(q.delivery);
            return None;
        };
        let envelope = &q.delivery.envelope;
        if source.filtered && !self.may_receive(&envelope.topic) {
            // A deny rule inside the filter (`test/#` with `test/nosubscribe` denied): not
            // for this client, as Mosquitto checks read access per message. Every subscription
            // matching a denied topic is `filtered`, so the copies from the others stop here too.
            self.settle_later(q.delivery);
            return None;
        }
        let publish_qos = to_qos(envelope.qos);
        if source.shared {
            return Some(Outgoing {
                qos: qos_min(publish_qos, source.granted),
                retain: source.retain_as_published && envelope.retain,
                sub_ids: source.id.into_iter().collect(),
                delivery: q.delivery,
            });
        }
        let mut first = None;
        let mut best = QoS::AtMostOnce;
        let mut retain = false;
        let mut sub_ids = Vec::new();
        for s in self
            .subscriptions
            .iter()
            .filter(|s| !s.shared && !s.revoked)
        {
            if !s.filter.matches(&envelope.topic) || (s.no_local && envelope.origin == self.origin)
            {
                continue;
            }
            first.get_or_insert(s.key.as_str());
            if (s.granted as u8) > (best as u8) {
                best = s.granted;
            }
            retain |= s.retain_as_published && envelope.retain;
            sub_ids.extend(s.id);
        }
        // Only the first matching subscription's stream delivers; the others skip the copy.
        if first != Some(&*q.key) {
            self.settle_later(q.delivery);
            return None;
        }
        Some(Outgoing {
            qos: qos_min(publish_qos, best),
            retain,
            sub_ids,
            delivery: q.delivery,
        })
    }

    /// Whether the client may receive a message on `topic` (its ACL's subscribe rules).
    pub(super) fn may_receive(&self, topic: &meshgate_core::Topic) -> bool {
        self.shared
            .ctx
            .authorizer
            .may_receive(&self.principal, topic)
    }

    /// Keeps `delivery` to acknowledge to the backbone once the write buffer reached the socket
    /// (JetStream; nothing to do for backbones without acknowledgements).
    pub(super) fn settle_later(&mut self, delivery: Delivery) {
        if delivery.needs_ack() {
            self.settle.push(delivery);
        }
    }

    /// Acknowledges the deliveries kept by [`Session::settle_later`].
    pub(super) async fn settle(&mut self) {
        for d in std::mem::take(&mut self.settle) {
            let _ = d.ack().await;
        }
    }

    /// A delivery while the client is connected.
    pub(super) fn deliver(&mut self, q: Queued) {
        if let Some(o) = self.route(q) {
            self.send(o);
        }
    }

    /// A delivery while the client is away (persistent session): QoS 1/2 messages are queued
    /// up to `mqtt.max_queued`; QoS 0 messages and those beyond the limit are dropped and
    /// counted (MQTT 5 §4.1: the server may discard QoS 0 messages of a disconnected client).
    pub(super) fn queue_offline(&mut self, q: Queued) {
        let Some(o) = self.route(q) else { return };
        if o.qos == QoS::AtMostOnce {
            self.shared.metrics.dropped(DropReason::OfflineQos0).inc();
            self.settle_later(o.delivery);
        } else if self.window.pending.len() >= self.shared.config.read().max_queued {
            self.shared
                .metrics
                .dropped(DropReason::SessionQueueFull)
                .inc();
        } else {
            self.window.pending.push_back(o);
        }
    }

    /// Writes a delivery now, or queues it while the in-flight window is full. A delivery
    /// this client cannot be sent (see [`Session::prepare_delivery`]) is skipped before it
    /// takes a packet id or an in-flight slot, so it can never be resent on reconnect.
    pub(super) fn send(&mut self, mut o: Outgoing) {
        let expired = o.delivery.envelope.mqtt.as_ref().is_some_and(|m| {
            m.expires_at_ms
                .is_some_and(|t| t <= meshgate_core::backbone::now_ms())
        });
        if expired {
            // MQTT 5 §3.3.2.3.3: not delivered once its Message Expiry Interval has passed.
            self.shared.metrics.dropped(DropReason::Expired).inc();
            self.settle_later(o.delivery);
            return;
        }
        if o.qos != QoS::AtMostOnce && self.window.is_full() {
            // Bounded: the packet loop stops taking deliveries while `pending` is full.
            self.window.pending.push_back(o);
            return;
        }
        // Tracing on: this delivery's span; the event sent (and kept for a resend) carries its
        // context.
        let _hop = meshgate_core::trace::deliver(
            "mqtt deliver",
            meshgate_core::trace::SpanKind::Producer,
            &mut o.delivery.envelope,
        );
        let prepared = match self.prepare_delivery(&o) {
            Ok(p) => p,
            Err(skip) => {
                self.skipped(skip);
                self.settle_later(o.delivery);
                return;
            }
        };
        let pkid = if o.qos == QoS::AtMostOnce {
            0
        } else {
            self.window.alloc_pkid()
        };
        if !self.put_publish(&o, prepared, pkid, false) {
            self.skipped(Skip::Unrepresentable);
            self.settle_later(o.delivery);
            return;
        }
        if o.qos == QoS::AtMostOnce {
            self.shared.metrics.sent.inc();
            self.shared.out_by_qos[0].inc();
            self.settle_later(o.delivery);
        } else {
            self.window.track(pkid, Stage::Sent(o));
        }
    }

    /// Counts a delivery not sent to this client. The backbone is told it was delivered
    /// (MQTT 5 §3.1.2.11.4 [MQTT-3.1.2-25]: the server "behaves as if it had completed
    /// sending" a packet too large for the client), so JetStream does not redeliver it.
    fn skipped(&self, skip: Skip) {
        let reason = match skip {
            Skip::Unrepresentable => DropReason::Unrepresentable,
            Skip::TooLarge => DropReason::TooLargeForClient,
        };
        tracing::debug!(
            client_id = self.client_id,
            reason = reason.as_str(),
            "mqtt: delivery skipped"
        );
        self.shared.metrics.dropped(reason).inc();
    }

    /// Encodes a delivery's payload and properties for this client and checks that the
    /// PUBLISH can be written at all — every length-prefixed field within 65,535 bytes, the
    /// property block and remaining length within 268,435,455 (rumqttd's writer would wrap
    /// them around: see `codec`) — and that it fits the client's Maximum Packet Size (MQTT 5
    /// §3.1.2.11.4: the server must not send it). Never truncates: `Err` skips it.
    #[inline]
    fn prepare_delivery(&self, o: &Outgoing) -> Result<Prepared, Skip> {
        let envelope = &o.delivery.envelope;
        let modes = self.shared.modes;
        let as_published = envelope.plain && modes.plain == PlainMessages::AsPublished;
        let mut encoded = if as_published {
            binding::as_published(&envelope.event, envelope.mqtt.as_deref(), self.version)
        } else {
            binding::encode(
                &envelope.event,
                || envelope.json(),
                self.version,
                modes.v5,
                modes.v311,
            )
        };
        if self.version == Version::V5 && !o.sub_ids.is_empty() {
            encoded
                .properties
                .get_or_insert_with(Default::default)
                .subscription_identifiers = o.sub_ids.clone();
        }
        if let (Version::V5, Some(m)) = (self.version, &envelope.mqtt) {
            // Forwarded unaltered (MQTT 5 §3.3.2.3.4–3.3.2.3.6); the expiry as what remains.
            let p = encoded.properties.get_or_insert_with(Default::default);
            p.response_topic.clone_from(&m.response_topic);
            p.correlation_data.clone_from(&m.correlation_data);
            if m.payload_utf8 {
                p.payload_format_indicator = Some(1);
            }
            if let Some(t) = m.expires_at_ms {
                let left_ms = t.saturating_sub(meshgate_core::backbone::now_ms());
                p.message_expiry_interval =
                    Some(u32::try_from(left_ms.div_ceil(1000).max(1)).unwrap_or(u32::MAX));
            }
            // User properties that are not attributes travel with the message in the
            // CloudEvent modes too, after the attributes (`as_published` wrote them already).
            if !as_published {
                p.user_properties.extend(m.user_properties.iter().cloned());
            }
        }
        let OutAlias {
            alias,
            new: new_alias,
            full_topic,
        } = if self.version == Version::V5 {
            self.aliases.peek(&envelope.topic)
        } else {
            OutAlias::NONE
        };
        if let Some(a) = alias {
            encoded
                .properties
                .get_or_insert_with(Default::default)
                .topic_alias = Some(a);
        }
        let topic_len = if full_topic {
            envelope.topic.as_str().len()
        } else {
            0
        };
        let size = codec::publish_size(
            self.version,
            topic_len,
            o.qos,
            encoded.properties.as_ref(),
            encoded.payload.len(),
        )
        .map_err(|why| {
            tracing::debug!(client_id = self.client_id, %why, "mqtt: event not representable");
            Skip::Unrepresentable
        })?;
        if size > self.client_max_packet as usize {
            return Err(Skip::TooLarge);
        }
        Ok(Prepared {
            payload: encoded.payload,
            properties: encoded.properties,
            full_topic,
            new_alias: alias.filter(|_| new_alias),
        })
    }

    /// Writes a prepared PUBLISH into the write buffer (and gives its new topic alias);
    /// false if the codec still refused it (nothing was written).
    #[inline]
    fn put_publish(&mut self, o: &Outgoing, p: Prepared, pkid: u16, dup: bool) -> bool {
        let topic = &o.delivery.envelope.topic;
        if self.version == Version::V311 {
            codec::write_publish_v311(
                &mut self.out,
                topic.as_str(),
                &p.payload,
                o.qos,
                pkid,
                o.retain,
                dup,
            );
            return true;
        }
        let name = if p.full_topic { topic.as_str() } else { "" };
        let Ok(publish) = codec::publish(name, p.payload, o.qos, pkid, o.retain, dup) else {
            return false;
        };
        if let Err(e) = codec::write(
            self.version,
            Packet::Publish(publish, p.properties),
            &mut self.out,
        ) {
            tracing::warn!(error = %e, "mqtt: PUBLISH refused by the codec after the checks");
            return false;
        }
        if let Some(a) = p.new_alias {
            self.aliases.give(topic, a);
        }
        true
    }

    /// Moves queued deliveries into the in-flight window as it frees up.
    pub(super) fn fill_window(&mut self) {
        while !self.window.is_full() {
            let Some(o) = self.window.pending.pop_front() else {
                break;
            };
            self.send(o);
        }
    }

    /// PUBACK: a QoS 1 message is delivered.
    pub(super) async fn on_puback(&mut self, pkid: u16) {
        let is_qos1 = matches!(
            self.window.inflight.get(&pkid),
            Some(Inflight { stage: Stage::Sent(o), .. }) if o.qos == QoS::AtLeastOnce
        );
        if is_qos1
            && let Some(Inflight {
                stage: Stage::Sent(o),
                ..
            }) = self.window.inflight.remove(&pkid)
        {
            let _ = o.delivery.ack().await;
            self.shared.metrics.sent.inc();
            self.shared.out_by_qos[1].inc();
        }
        self.fill_window();
    }

    /// PUBREC: the client has a QoS 2 message; release it (PUBREL) and wait for PUBCOMP.
    pub(super) async fn on_pubrec(&mut self, pkid: u16, reason: PubRecReason) {
        let refused = !matches!(
            reason,
            PubRecReason::Success | PubRecReason::NoMatchingSubscribers
        );
        let Some(entry) = self.window.inflight.get_mut(&pkid) else {
            // MQTT 5 §4.3.3: unknown packet id.
            self.write_pubrel(pkid, PubRelReason::PacketIdentifierNotFound);
            return;
        };
        match &entry.stage {
            // A repeated PUBREC: release again.
            Stage::Released => self.write_pubrel(pkid, PubRelReason::Success),
            Stage::Sent(o) if o.qos != QoS::ExactlyOnce => {
                // PUBREC for a QoS 1 message: ignore (the client will PUBACK or resend).
                tracing::debug!(pkid, "mqtt: PUBREC for a QoS 1 message");
            }
            Stage::Sent(_) if refused => {
                // MQTT 5: a PUBREC reason code ≥ 0x80 ends the exchange; the message is gone.
                if self.window.inflight.remove(&pkid).is_some() {
                    self.shared
                        .metrics
                        .dropped(DropReason::RefusedByClient)
                        .inc();
                }
                self.fill_window();
            }
            Stage::Sent(_) => {
                let Stage::Sent(o) = std::mem::replace(&mut entry.stage, Stage::Released) else {
                    return;
                };
                // The client owns the message now: the backbone may forget it.
                let _ = o.delivery.ack().await;
                self.write_pubrel(pkid, PubRelReason::Success);
            }
        }
    }

    /// PUBCOMP: a QoS 2 message is delivered exactly once.
    pub(super) fn on_pubcomp(&mut self, pkid: u16) {
        if matches!(
            self.window.inflight.get(&pkid),
            Some(Inflight {
                stage: Stage::Released,
                ..
            })
        ) {
            self.window.inflight.remove(&pkid);
            self.shared.metrics.sent.inc();
            self.shared.out_by_qos[2].inc();
        }
        self.fill_window();
    }

    fn write_pubrel(&mut self, pkid: u16, reason: PubRelReason) {
        // 3.1.1 has no reason codes; its PUBREL is always "release".
        let reason = if self.version == Version::V311 {
            PubRelReason::Success
        } else {
            reason
        };
        self.write(Packet::PubRel(PubRel { pkid, reason }, None));
    }

    /// A resumed session resends, in their original order, the PUBLISHes not yet acknowledged
    /// (with DUP set) and the PUBRELs not yet completed (MQTT 3.1.1 §4.4, 5 §4.4).
    pub(super) fn resend_inflight(&mut self) {
        for pkid in self.window.in_send_order(|_| true) {
            let Some(entry) = self.window.inflight.remove(&pkid) else {
                continue;
            };
            if let Stage::Sent(o) = &entry.stage {
                // Checked again: the client may have reconnected with a smaller Maximum
                // Packet Size. Skipped ones leave the session for good (no poison message).
                let written = match self.prepare_delivery(o) {
                    Ok(p) => self.put_publish(o, p, pkid, true),
                    Err(skip) => {
                        self.skipped(skip);
                        false
                    }
                };
                if !written {
                    if let Stage::Sent(o) = entry.stage {
                        self.settle_later(o.delivery);
                    }
                    continue;
                }
            } else {
                self.write_pubrel(pkid, PubRelReason::Success);
            }
            self.window.inflight.insert(pkid, entry);
        }
    }
}

impl Session {
    /// Stops taking deliveries and gives back to the backbone what it delivered and the client
    /// did not acknowledge (queued, or PUBLISHed and not PUBACKed/PUBRECed), so that whoever
    /// resumes the session — on any instance — receives them again at once.
    pub(super) async fn detach(&mut self) {
        self.settle().await;
        self.streams = None;
        let mut back: Vec<Delivery> = self.window.pending.drain(..).map(|o| o.delivery).collect();
        // Released QoS 2 entries stay: their PUBREL is resent wherever the session resumes.
        let sent = self
            .window
            .inflight
            .extract_if(|_, e| matches!(e.stage, Stage::Sent(_)));
        back.extend(sent.filter_map(|(_, e)| match e.stage {
            Stage::Sent(o) => Some(o.delivery),
            Stage::Released => None,
        }));
        for d in back {
            let _ = d.nack(None).await;
        }
    }
}
