//! SUBSCRIBE and UNSUBSCRIBE: topic filters become backbone subscriptions; retained messages
//! are sent per the retain-handling option.

use meshgate_core::metrics::{DropReason, ErrorKind};
use std::sync::Arc;

use meshgate_core::connections::SubscriptionInfo;
use meshgate_core::{Delivery, SubscribeGrant, SubscribeOptions, TopicFilter};
use rumqttd::protocol::{
    Filter, Packet, QoS, RetainForwardRule, SubAck, SubscribeProperties, SubscribeReasonCode,
    UnsubAck, UnsubAckReason,
};
use tokio_util::sync::CancellationToken;

use super::outbound::{Outgoing, delivery_stream};
use super::{MAX_GRANTED_QOS, Session, qos_min, to_qos};
use crate::codec::Version;

/// One subscription of a session.
pub(super) struct Subscription {
    /// The filter as the client wrote it (`$share/g/a/#` for a shared subscription).
    pub(super) key: String,
    pub(super) filter: TopicFilter,
    /// Shared subscription: a backbone queue group; delivered independently of the others.
    pub(super) shared: bool,
    pub(super) granted: QoS,
    pub(super) no_local: bool,
    pub(super) retain_as_published: bool,
    /// MQTT 5 Subscription Identifier, sent back with every matching PUBLISH.
    pub(super) id: Option<usize>,
    /// A deny rule of the principal covers part of the filter: each delivery is checked
    /// ([`meshgate_core::SubscribeGrant::Filtered`]).
    pub(super) filtered: bool,
    /// A config reload took the right to it away: its deliveries are dropped until the session
    /// removes it ([`Session::finish_revocations`]).
    pub(super) revoked: bool,
    /// Ends this subscription's stream in the session's stream set (unsubscribe).
    cancel: CancellationToken,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Splits `$share/<group>/<filter>` (MQTT 5 §4.8.2); `None` for an ordinary filter,
/// `Some(Err)` for a malformed shared one.
pub(super) fn shared_filter(path: &str) -> Option<Result<(&str, &str), ()>> {
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

/// A subscription's options (MQTT 5 §3.8.3.1), as kept with the session.
#[derive(Debug, Clone, Copy)]
pub(super) struct SubOptions {
    pub(super) granted: QoS,
    pub(super) no_local: bool,
    pub(super) retain_as_published: bool,
    pub(super) id: Option<usize>,
    /// Granted [`SubscribeGrant::Filtered`]: deliveries on topics the ACL denies are dropped.
    pub(super) filtered: bool,
}

impl Session {
    /// Shows the session's subscriptions in the admin API (after a resume or a revocation;
    /// single changes are made one by one).
    pub(super) fn list_subscriptions(&self) {
        self.live
            .set_subscriptions(self.subscriptions.iter().map(|s| SubscriptionInfo {
                filter: Arc::from(s.key.as_str()),
                qos: Some(s.granted as u8),
            }));
    }

    /// Subscribes to the backbone for filter `key` (as the client wrote it) and adds the
    /// subscription to the session; `durable` for a persistent session's ordinary
    /// subscriptions where the backbone keeps sessions ([`Session::durable`]).
    pub(super) async fn open(
        &mut self,
        key: &str,
        filter: TopicFilter,
        group: Option<&str>,
        o: SubOptions,
        durable: Option<meshgate_core::Durable>,
    ) -> Result<(), meshgate_core::BackboneError> {
        let options = SubscribeOptions {
            // Shared subscriptions are backbone queue groups, so the group's members share the
            // messages across connections (and, on NATS, instances).
            queue_group: group.map(|g| format!("mqtt-share:{g}")),
            capacity: None,
            durable,
            max_in_flight: None,
            ack_wait: None,
        };
        let sub = self
            .shared
            .ctx
            .backbone
            .subscribe(filter.clone(), options)
            .await?;
        let stream_key: Arc<str> = Arc::from(key);
        let cancel = CancellationToken::new();
        self.streams
            .get_or_insert_with(Default::default)
            .push(delivery_stream(sub, stream_key, cancel.clone()));
        self.live.add_subscription(SubscriptionInfo {
            filter: Arc::from(key),
            qos: Some(o.granted as u8),
        });
        self.subscriptions.push(Subscription {
            key: key.to_owned(),
            filter,
            shared: group.is_some(),
            granted: o.granted,
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            id: o.id,
            filtered: o.filtered,
            revoked: false,
            cancel,
        });
        self.shared.subscriptions.inc();
        Ok(())
    }

    /// SUBSCRIBE. A filter listed more than once in one packet is one subscription: its last
    /// listing's options win and its retained messages are sent once (MQTT 5 §3.8.4 reads the
    /// packet as a sequence of SUBSCRIBEs, which would send them once per listing — that is
    /// the amplification of review F1); every listing still gets its SUBACK code (§3.9.3).
    pub(super) async fn handle_subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<Filter>,
        props: Option<SubscribeProperties>,
    ) {
        let id = props.and_then(|p| p.id);
        // For each listing, the later listing of the same filter whose code it repeats.
        let repeats: Vec<Option<usize>> = {
            let mut last = std::collections::HashMap::with_capacity(filters.len().min(1024));
            for (i, f) in filters.iter().enumerate() {
                last.insert(f.path.as_str(), i);
            }
            filters
                .iter()
                .enumerate()
                .map(|(i, f)| last.get(f.path.as_str()).copied().filter(|&l| l != i))
                .collect()
        };
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained_for = Vec::new();
        let version = self.version;
        let failure = move |v5: SubscribeReasonCode| match version {
            Version::V5 => v5,
            Version::V311 => SubscribeReasonCode::Failure,
        };
        for (f, repeat) in filters.into_iter().zip(&repeats) {
            if repeat.is_some() {
                // Answered below with the code of its last listing.
                codes.push(SubscribeReasonCode::Unspecified);
                continue;
            }
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
            let filtered = match self
                .shared
                .ctx
                .authorizer
                .check_subscribe(&self.principal, &filter)
            {
                Ok(grant) => grant == SubscribeGrant::Filtered,
                Err(_) => {
                    self.shared.metrics.error(ErrorKind::Forbidden);
                    codes.push(failure(SubscribeReasonCode::NotAuthorized));
                    continue;
                }
            };
            let granted = qos_min(f.qos, MAX_GRANTED_QOS);
            let existed = self.subscriptions.iter().position(|s| s.key == f.path);
            if let Some(i) = existed {
                // Same filter again: replace the options, keep the backbone subscription.
                let s = &mut self.subscriptions[i];
                s.granted = granted;
                self.live.add_subscription(SubscriptionInfo {
                    filter: Arc::from(s.key.as_str()),
                    qos: Some(granted as u8),
                });
                s.no_local = f.nolocal;
                s.retain_as_published = f.preserve_retain;
                s.id = id;
                s.filtered = filtered;
            } else if self.subscriptions.len() >= self.shared.config.read().max_subscriptions {
                // Each is a backbone subscription (on JetStream a consumer on the server).
                self.shared.metrics.error(ErrorKind::SubscriptionLimit);
                codes.push(failure(SubscribeReasonCode::QuotaExceeded));
                continue;
            } else {
                let options = SubOptions {
                    granted,
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    id,
                    filtered,
                };
                let durable = group.is_none().then(|| self.durable(&f.path)).flatten();
                if let Err(e) = self
                    .open(&f.path, filter.clone(), group, options, durable)
                    .await
                {
                    tracing::debug!(error = %e, "mqtt: backbone subscribe failed");
                    codes.push(failure(match e {
                        meshgate_core::BackboneError::TopicTooLong(_) => {
                            SubscribeReasonCode::TopicFilterInvalid
                        }
                        _ => SubscribeReasonCode::ImplementationSpecific,
                    }));
                    continue;
                }
            }
            // Retained messages are not sent for shared subscriptions (MQTT 5 §4.8.2).
            if group.is_none() {
                let send_retained = match f.retain_forward_rule {
                    RetainForwardRule::OnEverySubscribe => true,
                    RetainForwardRule::OnNewSubscribe => existed.is_none(),
                    RetainForwardRule::Never => false,
                };
                if send_retained {
                    retained_for.push((filter, granted));
                }
            }
            codes.push(SubscribeReasonCode::Success(granted));
        }
        for (i, repeat) in repeats.iter().enumerate() {
            if let Some(last) = *repeat
                && let Some(&code) = codes.get(last)
            {
                codes[i] = code;
            }
        }
        self.save_stored().await;
        self.write(Packet::SubAck(
            SubAck {
                pkid,
                return_codes: codes,
            },
            None,
        ));
        self.send_retained(retained_for, id).await;
    }

    /// Sends the retained messages of newly subscribed filters, through the same bounds as
    /// every other delivery: no more than `mqtt.max_queued` messages waiting for the client
    /// (in `pending` and in this SUBSCRIBE's sends), and no more than
    /// `mqtt.max_retained_send_bytes` in the write buffer and `pending`. Retained messages
    /// past either bound are dropped and counted (`reason="retained_queue_full"`): without
    /// this, one SUBSCRIBE from a client that never reads made the gateway encode every
    /// matching retained message into memory (review F1).
    async fn send_retained(&mut self, retained_for: Vec<(TopicFilter, QoS)>, id: Option<usize>) {
        if retained_for.is_empty() {
            return;
        }
        let config = self.shared.config.get();
        let mut messages = config.max_queued.saturating_sub(self.window.pending.len());
        // What waits already counts; a queued envelope not yet encoded counts its topic only.
        let waiting = self.out.len()
            + self
                .window
                .pending
                .iter()
                .map(|o| retained_cost(&o.delivery.envelope, false))
                .sum::<usize>();
        let mut bytes = config.max_retained_send_bytes.saturating_sub(waiting);
        let mut dropped = 0u64;
        for (filter, granted) in retained_for {
            // Bounded in bytes too: the store reads no more than the budget (JetStream would
            // otherwise read up to `messages` values of up to `kv_max_value_size` each).
            let found = self
                .shared
                .retained
                .matching(&filter, messages, bytes)
                .await;
            dropped += found.beyond;
            for envelope in found.envelopes {
                if !self.may_receive(&envelope.topic) {
                    // Denied by the subscriber's ACL (a deny rule inside the filter).
                    continue;
                }
                let size = retained_cost(&envelope, true);
                if messages == 0 || size > bytes {
                    dropped += 1;
                    continue;
                }
                messages -= 1;
                bytes -= size;
                let qos = qos_min(to_qos(envelope.qos), granted);
                self.send(Outgoing {
                    delivery: Delivery::new(envelope, None),
                    qos,
                    // Messages sent because of a subscription carry RETAIN (MQTT 5 §3.3.1.3).
                    retain: true,
                    sub_ids: id.into_iter().collect(),
                });
            }
        }
        if dropped > 0 {
            self.shared
                .metrics
                .dropped(DropReason::RetainedQueueFull)
                .add(dropped);
            tracing::debug!(
                client_id = self.client_id,
                dropped,
                "mqtt: retained messages past the client's queue bound dropped"
            );
        }
    }
}

/// About what sending `envelope` holds in memory: its topic and its event's JSON (the size of
/// its packet, within the properties' overhead). `encode`: encode the JSON if it is not yet
/// (the memory store keeps it encoded; JetStream's have it as read).
fn retained_cost(envelope: &meshgate_core::Envelope, encode: bool) -> usize {
    let json = if encode {
        envelope.json().len()
    } else {
        envelope.json_if_encoded().map_or(0, |j| j.len())
    };
    64 + envelope.topic.as_str().len() + json
}

impl Session {
    pub(super) async fn handle_unsubscribe(&mut self, pkid: u16, filters: &[String]) {
        let mut reasons = Vec::with_capacity(filters.len());
        for f in filters {
            let Some(i) = self.subscriptions.iter().position(|s| s.key == *f) else {
                reasons.push(UnsubAckReason::NoSubscriptionExisted);
                continue;
            };
            // Dropping a subscription ends its stream (and its backbone subscription); a
            // durable one is also deleted from the backbone.
            let removed = self.subscriptions.remove(i);
            self.live.remove_subscription(&removed.key);
            self.shared.subscriptions.dec();
            self.forget_durable(&removed).await;
            reasons.push(UnsubAckReason::Success);
        }
        self.save_stored().await;
        self.write(Packet::UnsubAck(UnsubAck { pkid, reasons }, None));
    }
}
