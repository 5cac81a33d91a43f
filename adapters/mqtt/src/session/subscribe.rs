//! SUBSCRIBE and UNSUBSCRIBE: topic filters become backbone subscriptions; retained messages
//! are sent per the retain-handling option.

use std::sync::Arc;

use meshgate_core::{Delivery, SubscribeOptions, TopicFilter};
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

impl Session {
    pub(super) async fn handle_subscribe(
        &mut self,
        pkid: u16,
        filters: Vec<Filter>,
        props: Option<SubscribeProperties>,
    ) {
        let id = props.and_then(|p| p.id);
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
                // Same filter again: replace the options, keep the backbone subscription.
                let s = &mut self.subscriptions[i];
                s.granted = granted;
                s.no_local = f.nolocal;
                s.retain_as_published = f.preserve_retain;
                s.id = id;
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
                self.streams
                    .get_or_insert_with(Default::default)
                    .push(delivery_stream(sub, key, cancel.clone()));
                self.subscriptions.push(Subscription {
                    key: f.path.clone(),
                    filter: filter.clone(),
                    shared: group.is_some(),
                    granted,
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    id,
                    cancel,
                });
                self.shared.subscriptions.inc();
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
        self.write(Packet::SubAck(
            SubAck {
                pkid,
                return_codes: codes,
            },
            None,
        ));
        for (filter, granted) in retained_for {
            for envelope in self.shared.retained.matching(&filter).await {
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
    }

    pub(super) fn handle_unsubscribe(&mut self, pkid: u16, filters: &[String]) {
        let mut reasons = Vec::with_capacity(filters.len());
        for f in filters {
            let before = self.subscriptions.len();
            // Dropping a subscription ends its stream (and its backbone subscription).
            self.subscriptions.retain(|s| s.key != *f);
            reasons.push(if self.subscriptions.len() < before {
                self.shared.subscriptions.dec();
                UnsubAckReason::Success
            } else {
                UnsubAckReason::NoSubscriptionExisted
            });
        }
        self.write(Packet::UnsubAck(UnsubAck { pkid, reasons }, None));
    }
}
