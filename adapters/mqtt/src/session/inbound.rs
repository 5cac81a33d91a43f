//! Messages from the client: inbound PUBLISH (topic aliases, authorization, the CloudEvent,
//! the backbone's answer and the PUBACK/PUBREC it decides), the QoS 2 inbound bookkeeping,
//! and the will.

use meshgate_core::metrics::{DropReason, ErrorKind};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use meshgate_core::{Authorized, AuthorizedEnvelope, BoxFuture, PublishError, Published};
use rumqttd::protocol::{
    DisconnectReasonCode, LastWill, LastWillProperties, Packet, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, PublishProperties, QoS,
};

use super::{End, Flow, Session};
use crate::Shared;
use crate::binding;
use crate::codec::{self, Version};

/// The MQTT 5 properties a broker forwards unaltered (response topic, correlation data,
/// payload format) and the message expiry, as an absolute deadline.
fn forwarded_properties(
    props: Option<&PublishProperties>,
    plain: bool,
    user_properties: Vec<(String, String)>,
) -> Option<Arc<meshgate_core::backbone::MqttProperties>> {
    let p = props?;
    let m = meshgate_core::backbone::MqttProperties {
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        payload_utf8: p.payload_format_indicator == Some(1),
        expires_at_ms: p
            .message_expiry_interval
            .map(|s| meshgate_core::backbone::now_ms().saturating_add(u64::from(s) * 1000)),
        // A CloudEvent's Content Type is its `datacontenttype` and its user properties are
        // its attributes, but for those whose names are not attribute names; a plain
        // message's travel as they were sent (see `binding::Decoded`).
        content_type: if plain { p.content_type.clone() } else { None },
        user_properties,
    };
    (!m.is_empty()).then(|| Arc::new(m))
}

/// An inbound PUBLISH on its way into the backbone: its QoS, packet id and the outcome.
pub(super) type InboundPublish =
    std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>;

/// The backbone's answer to an inbound PUBLISH: its QoS, packet id and the outcome.
pub(super) type Answer = (QoS, u16, Result<(), PublishError>);

/// The client's PUBLISHes between their arrival and their acknowledgement: those with the
/// backbone, and the QoS 2 handshakes (PUBREC sent, PUBREL not yet).
#[derive(Default)]
pub(super) struct Inbound {
    /// PUBLISHes handed to the backbone and not yet accepted, in arrival order, so that their
    /// PUBACK/PUBREC go out in that order (MQTT 3.1.1 §4.6) while several are pending — a
    /// JetStream PubAck takes a round trip. Boxed and created on first use (idle memory).
    at_backbone: Option<Box<FuturesOrdered<InboundPublish>>>,
    /// The QoS 2 handshakes, made at the first QoS 2 PUBLISH: two sets are 64 bytes of every
    /// idle connection's task, for what few clients use (issue 23).
    qos2: Option<Box<Qos2Handshakes>>,
}

/// Packet ids of the client's QoS 2 PUBLISHes between PUBLISH and PUBREL.
#[derive(Default)]
struct Qos2Handshakes {
    /// Received and acknowledged (PUBREC sent), waiting for PUBREL. Kept with the session.
    awaiting_pubrel: HashSet<u16, super::PacketIdHasher>,
    /// With the backbone (in `Inbound::at_backbone`), not yet acknowledged.
    at_backbone: HashSet<u16, super::PacketIdHasher>,
}

impl Inbound {
    /// Takes the QoS 2 handshakes a persistent session's previous connection left open.
    pub(super) fn resume(&mut self, old: &mut Inbound) {
        if let Some(q) = &mut old.qos2 {
            self.set_awaiting_pubrel(std::mem::take(&mut q.awaiting_pubrel));
        }
    }

    fn qos2_mut(&mut self) -> &mut Qos2Handshakes {
        self.qos2.get_or_insert_with(Default::default)
    }

    /// The QoS 2 packet ids acknowledged and waiting for PUBREL.
    pub(super) fn awaiting_pubrel(&self) -> impl Iterator<Item = u16> + '_ {
        self.qos2
            .iter()
            .flat_map(|q| q.awaiting_pubrel.iter().copied())
    }

    /// Replaces the QoS 2 packet ids waiting for PUBREL (a session restored or resumed).
    pub(super) fn set_awaiting_pubrel(&mut self, pkids: HashSet<u16, super::PacketIdHasher>) {
        if pkids.is_empty() {
            if let Some(q) = &mut self.qos2 {
                q.awaiting_pubrel.clear();
            }
        } else {
            self.qos2_mut().awaiting_pubrel = pkids;
        }
    }

    fn is_awaiting_pubrel(&self, pkid: u16) -> bool {
        self.qos2
            .as_ref()
            .is_some_and(|q| q.awaiting_pubrel.contains(&pkid))
    }

    fn awaiting_pubrel_count(&self) -> usize {
        self.qos2.as_ref().map_or(0, |q| q.awaiting_pubrel.len())
    }

    fn is_qos2_at_backbone(&self, pkid: u16) -> bool {
        self.qos2
            .as_ref()
            .is_some_and(|q| q.at_backbone.contains(&pkid))
    }

    /// Whether `max` PUBLISHes wait for the backbone.
    fn is_full(&self, max: usize) -> bool {
        self.at_backbone.as_ref().is_some_and(|f| f.len() >= max)
    }

    /// The next answer to a PUBLISH with the backbone, or never while there is none.
    pub(super) async fn next_answer(&mut self) -> Option<Answer> {
        use futures_util::StreamExt;
        match &mut self.at_backbone {
            Some(f) if !f.is_empty() => f.next().await,
            _ => std::future::pending().await,
        }
    }

    /// An answer that is in already, without waiting. Polling with a no-op waker is fine: the
    /// packet loop's next [`Inbound::next_answer`] registers its waker again.
    pub(super) fn ready_answer(&mut self) -> Option<Answer> {
        use futures_util::{FutureExt as _, StreamExt as _};
        self.at_backbone
            .as_mut()
            .and_then(|f| f.next().now_or_never())
            .flatten()
    }

    /// The PUBLISHes still with the backbone, for the connection's end.
    pub(super) fn take_at_backbone(&mut self) -> Option<Box<FuturesOrdered<InboundPublish>>> {
        self.at_backbone.take()
    }

    /// PUBREL: the QoS 2 handshake of `pkid` ends; false if there was none.
    fn release(&mut self, pkid: u16) -> bool {
        self.qos2
            .as_mut()
            .is_some_and(|q| q.awaiting_pubrel.remove(&pkid))
    }
}

/// The client's will (CONNECT), published when its connection ends other than by DISCONNECT.
pub(super) struct Will {
    /// Boxed: most clients have none, and an idle connection should stay small.
    /// With the grant `AdapterContext::authorize` gave its topic at CONNECT (a will on a topic
    /// the client may not publish to refuses the CONNECT).
    message: Option<Box<(LastWill, Option<LastWillProperties>, Authorized)>>,
    /// MQTT 5 Will Delay Interval: the will waits this long after the connection ends.
    pub(super) delay: Option<Duration>,
}

impl Will {
    pub(super) fn new(
        will: Option<(LastWill, Authorized)>,
        props: Option<LastWillProperties>,
    ) -> Self {
        let delay = props
            .as_ref()
            .and_then(|p| p.delay_interval)
            .filter(|d| *d > 0)
            .map(|d| Duration::from_secs(u64::from(d)));
        Will {
            message: will.map(|(w, authorized)| Box::new((w, props, authorized))),
            delay,
        }
    }

    /// The will is not to be sent (DISCONNECT, the client came back, the session moved).
    pub(super) fn cancel(&mut self) {
        self.message = None;
    }

    pub(super) fn is_set(&self) -> bool {
        self.message.is_some()
    }
}

impl Session {
    /// Acknowledges a QoS 1/2 publish with `reason` (MQTT 5) or plain success (3.1.1).
    pub(super) fn ack(&mut self, qos: QoS, pkid: u16, reason: PubAckReason) {
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
                    self.inbound.qos2_mut().awaiting_pubrel.insert(pkid);
                }
                self.write(Packet::PubRec(PubRec { pkid, reason }, None));
            }
        }
    }

    /// Refuses a publish: MQTT 5 answers with a reason code (QoS 0 is dropped and counted),
    /// MQTT 3.1.1 has no negative acknowledgement, so the connection is closed (3.1.1 §3.3.5).
    pub(super) fn refuse(
        &mut self,
        qos: QoS,
        pkid: u16,
        reason: PubAckReason,
        (kind, dropped): (ErrorKind, DropReason),
    ) -> Flow {
        self.shared.metrics.error(kind);
        self.refuse_counted(qos, pkid, reason, dropped)
    }

    /// [`Session::refuse`] for a refusal already counted as an error (by
    /// `AdapterContext::authorize`).
    fn refuse_counted(
        &mut self,
        qos: QoS,
        pkid: u16,
        reason: PubAckReason,
        dropped: DropReason,
    ) -> Flow {
        if self.version == Version::V311 {
            return Flow::End(End::Abnormal);
        }
        if qos == QoS::AtMostOnce {
            self.shared.metrics.dropped(dropped).inc();
        }
        self.ack(qos, pkid, reason);
        Flow::Continue
    }

    /// Everything about an inbound PUBLISH that needs no waiting: QoS 2 duplicates, topic
    /// (aliases), authorization, the CloudEvent, the envelope. `Err`: answered or refused here.
    pub(super) fn prepare_publish(
        &mut self,
        p: &codec::InPublish,
        props: Option<&PublishProperties>,
    ) -> Result<AuthorizedEnvelope, Flow> {
        self.reauthorize();
        let meta = p.meta;
        let (qos, pkid) = (meta.qos, meta.pkid);
        if qos == QoS::ExactlyOnce && self.inbound.is_qos2_at_backbone(pkid) {
            // Resent while the first copy is still with the backbone: its PUBREC will follow.
            return Err(Flow::Continue);
        }
        if qos == QoS::ExactlyOnce && self.inbound.is_awaiting_pubrel(pkid) {
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
            && self.inbound.awaiting_pubrel_count() >= usize::from(self.own_receive_max)
        {
            self.shared.metrics.error(ErrorKind::ReceiveMaximum);
            self.disconnect(DisconnectReasonCode::ReceiveMaximumExceeded);
            return Err(Flow::End(End::Abnormal));
        }
        // MQTT 5 topic aliases (§3.3.2.3.4): a topic with an alias sets it, an empty topic with
        // an alias uses it.
        let alias = props.and_then(|p| p.topic_alias);
        let aliased = match self.aliases.resolve(alias, p.topic.is_empty()) {
            Ok(aliased) => aliased,
            Err(reason) => {
                self.disconnect(reason);
                return Err(Flow::End(End::Abnormal));
            }
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
                    self.shared.metrics.error(ErrorKind::BadTopic);
                    self.disconnect(e.reason_code());
                    return Err(Flow::End(End::Abnormal));
                }
            },
        };
        if let (Some(a), false) = (alias, p.topic.is_empty()) {
            self.aliases.set(a, topic.clone());
        }
        // Authorized before the payload is decoded; the publish takes this proof.
        let authorized =
            match self
                .shared
                .ctx
                .authorize(&self.shared.metrics, &self.principal, topic)
            {
                Ok(a) => a,
                Err(_) => {
                    return Err(self.refuse_counted(
                        qos,
                        pkid,
                        PubAckReason::NotAuthorized,
                        DropReason::Forbidden,
                    ));
                }
            };
        let decoded = binding::decode_publish(binding::Inbound {
            version: self.version,
            topic: authorized.topic(),
            payload: p.payload.clone(),
            properties: props,
            wrapper: &self.wrapper,
        });
        let binding::Decoded {
            event,
            plain,
            user_properties,
        } = match decoded {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, client_id = self.client_id, "mqtt: invalid CloudEvent");
                if self.version == Version::V311 {
                    // 3.1.1 has no negative acknowledgement: the connection is closed (as
                    // README says), not acknowledged — the client must not think it was taken.
                    self.shared.metrics.dropped(DropReason::BadEvent).inc();
                }
                return Err(self.refuse(
                    qos,
                    pkid,
                    PubAckReason::PayloadFormatInvalid,
                    (ErrorKind::BadEvent, DropReason::BadEvent),
                ));
            }
        };
        let mut event = event;
        if plain {
            // A plain message's W3C context is in its user properties (a CloudEvent's is its
            // `traceparent` attribute already). The properties themselves are forwarded as
            // they were sent [MQTT-3.3.2-17].
            let property = |name: &str| {
                user_properties
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
            };
            meshgate_core::trace::adopt(
                &mut event,
                property(meshgate_core::trace::TRACEPARENT),
                property(meshgate_core::trace::TRACESTATE),
            );
        }
        let event = Arc::new(event);
        Ok(authorized
            .envelope(event, self.origin.clone())
            .with_qos(qos as u8)
            .with_retain(p.retain)
            .with_plain(plain)
            .with_mqtt_properties(forwarded_properties(props, plain, user_properties)))
    }

    /// Handles a PUBLISH on a backbone that settles publishes at once, without a future:
    /// `Err` is the rest of the publish when the backbone has to wait (a full subscriber
    /// queue under the `block` policy); pass its outcome to [`Session::published`].
    pub(super) fn publish_now<'s>(
        &mut self,
        shared: &'s Shared,
        p: &codec::InPublish,
        props: Option<&PublishProperties>,
    ) -> Result<Flow, BoxFuture<'s, Result<(), PublishError>>> {
        let envelope = match self.prepare_publish(p, props) {
            Ok(envelope) => envelope,
            Err(flow) => return Ok(flow),
        };
        match shared.ctx.try_publish_envelope(&shared.metrics, envelope) {
            Published::Done(r) => Ok(self.published(p.meta.qos, p.meta.pkid, r)),
            Published::Pending(f) => Err(f),
        }
    }

    pub(super) async fn handle_publish(
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
                .publish_envelope(&self.shared.metrics, envelope)
                .await;
            if let (Ok(()), Some(envelope)) = (&r, retained) {
                self.shared
                    .retained
                    .update(envelope.envelope(), p.payload.is_empty())
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
                .update(envelope.envelope(), p.payload.is_empty())
                .await;
        }
        let shared = self.shared.clone();
        let mut publish: InboundPublish = Box::pin(async move {
            let r = shared.ctx.publish_envelope(&shared.metrics, envelope).await;
            (qos, pkid, r)
        });
        if self
            .inbound
            .at_backbone
            .as_ref()
            .is_none_or(|f| f.is_empty())
        {
            // Usually accepted at once (memory backbone): answer without queueing. If not, the
            // queue below polls it again with a real waker.
            let waker = futures_util::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            if let std::task::Poll::Ready((qos, pkid, r)) = publish.as_mut().poll(&mut cx) {
                return self.published(qos, pkid, r);
            }
        }
        if qos == QoS::ExactlyOnce {
            self.inbound.qos2_mut().at_backbone.insert(pkid);
        }
        self.inbound
            .at_backbone
            .get_or_insert_with(Default::default)
            .push_back(publish);
        Flow::Continue
    }

    /// The backbone's answer to an inbound PUBLISH: acknowledge it, or refuse it.
    pub(super) fn published(&mut self, qos: QoS, pkid: u16, r: Result<(), PublishError>) -> Flow {
        if qos == QoS::ExactlyOnce
            && let Some(q) = &mut self.inbound.qos2
        {
            q.at_backbone.remove(&pkid);
        }
        match r {
            Ok(()) => {
                self.shared.in_by_qos[usize::from(qos as u8).min(2)].inc();
                self.acked_publish |= qos != QoS::AtMostOnce;
                self.ack(qos, pkid, PubAckReason::Success);
                Flow::Continue
            }
            Err(PublishError::Forbidden(_)) => self.refuse_counted(
                qos,
                pkid,
                PubAckReason::NotAuthorized,
                DropReason::Forbidden,
            ),
            Err(PublishError::Backbone(e)) => {
                tracing::debug!(error = %e, "mqtt: backbone refused");
                // Never acknowledge what the backbone did not take.
                let reason = match e {
                    meshgate_core::BackboneError::TopicTooLong(_) => PubAckReason::TopicNameInvalid,
                    _ => PubAckReason::QuotaExceeded,
                };
                self.refuse(
                    qos,
                    pkid,
                    reason,
                    (ErrorKind::Backbone, DropReason::Backbone),
                )
            }
        }
    }

    /// Whether as many PUBLISHes wait for the backbone as the client may send unacknowledged
    /// (our Receive Maximum): then no more packets are read until one is answered.
    pub(super) fn inbound_full(&self) -> bool {
        self.inbound.is_full(usize::from(self.own_receive_max))
    }

    /// PUBREL: the client releases a QoS 2 message; PUBCOMP ends the handshake.
    pub(super) fn on_pubrel(&mut self, pkid: u16) {
        let reason = if self.inbound.release(pkid) {
            PubCompReason::Success
        } else {
            PubCompReason::PacketIdentifierNotFound
        };
        self.write(Packet::PubComp(PubComp { pkid, reason }, None));
    }

    pub(super) async fn publish_will(&mut self) {
        let Some((will, props, authorized)) = self.will.message.take().map(|b| *b) else {
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
        let decoded = binding::decode_publish(binding::Inbound {
            version: self.version,
            topic: authorized.topic(),
            payload: will.message.clone(),
            properties: publish_props.as_ref(),
            wrapper: &self.wrapper,
        });
        let Ok(binding::Decoded {
            event,
            plain,
            user_properties,
        }) = decoded
        else {
            self.shared.metrics.dropped(DropReason::BadWill).inc();
            return;
        };
        let envelope = authorized
            .envelope(Arc::new(event), self.origin.clone())
            .with_qos(will.qos as u8)
            .with_retain(will.retain)
            .with_plain(plain)
            .with_mqtt_properties(forwarded_properties(
                publish_props.as_ref(),
                plain,
                user_properties,
            ));
        if will.retain {
            self.shared
                .retained
                .update(envelope.envelope(), will.message.is_empty())
                .await;
        }
        if let Err(e) = self
            .shared
            .ctx
            .publish_envelope(&self.shared.metrics, envelope)
            .await
        {
            tracing::debug!(error = %e, "mqtt: will not published");
        }
    }
}
