//! The in-memory backbone: one process, nothing to install.
//!
//! Each subscription owns a bounded queue (`queue_capacity` events). Publishing matches the
//! topic against every subscription's filter and enqueues one shared `Arc<Envelope>` per match
//! (no copy of the event). When a queue is full the configured policy applies:
//! - `block` (the default): the publisher waits for room, at most `block_timeout` in all (the
//!   full queues are waited for together, under one deadline), so a subscriber that is only
//!   slower than its publishers slows them down instead of losing events. A subscriber still
//!   full at the deadline loses the event (counted as `block_timeout`), `publish` returns
//!   `Saturated` (HTTP 503, MQTT "server busy"), and the subscriber is marked *stalled*: until
//!   its queue is half empty again, publishes do not wait for it — its copies are dropped at
//!   once (counted as `stalled`). A stuck subscriber therefore costs publishers one
//!   `block_timeout` per episode, then only itself (review F3: it used to cost every publish
//!   `block_timeout` per full queue, in turn);
//! - `drop`: the event is dropped for that subscriber at once and counted as `queue_full`.
//!   Publishers never wait, but nothing paces them either: under overload they take the CPU
//!   that subscribers need (the MQTT benchmark's QoS 0 row with four publishers delivered 1%
//!   of what it delivers under `block`).
//!
//! Queue groups: among the subscriptions with the same group name and filter, each event goes
//! to one member, chosen round-robin, skipping members whose queue is full.
//!
//! Delivery guarantee: at most once, within one process. Subscriptions are kept in a
//! [`TopicIndex`] (a trie of filter levels), so a publish costs what its topic's levels and its
//! matching subscriptions cost, not one filter comparison per subscription (issue 27: 10,000
//! idle device subscriptions made every publish scan them all). Publishers hold the index's
//! read lock only; subscribing and unsubscribing take the write lock.

use meshgate_core::metrics::DropReason;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};

use crate::queue::{self, TrySendError};
use futures_util::Stream;
use meshgate_config::{FullQueuePolicy, MemoryBackboneConfig};
use meshgate_core::metrics::{self, Counter, Gauge, Registry};
use meshgate_core::{
    Backbone, BackboneError, BackboneSubscription, BoxFuture, Delivery, Envelope, SubscribeOptions,
    Subscription, TopicFilter, TopicIndex, TryPublish,
};

#[derive(Debug)]
struct Sub {
    id: u64,
    group: Option<(String, TopicFilter)>,
    tx: queue::Sender<Delivery>,
    /// Set when a publish gave up waiting for this subscriber (`block`); cleared once its
    /// queue is half empty again. While set, publishes do not wait for it.
    stalled: Arc<AtomicBool>,
}

impl Sub {
    /// A copy of the event could be queued: a stalled subscriber whose queue has drained to
    /// half is waited for again.
    fn sent(&self) {
        if self.stalled.load(Ordering::Relaxed) && self.tx.len() * 2 <= self.tx.capacity() {
            self.stalled.store(false, Ordering::Relaxed);
        }
    }
}

/// A full queue a `block` publish waits for.
type Blocked = (queue::Sender<Delivery>, Arc<AtomicBool>);

#[derive(Debug, Default)]
struct State {
    subs: TopicIndex<Sub>,
    /// Round-robin cursor per (group, filter), with the number of members.
    cursors: HashMap<(String, TopicFilter), (Arc<AtomicUsize>, usize)>,
}

#[derive(Debug)]
struct Inner {
    config: MemoryBackboneConfig,
    state: RwLock<State>,
    next_id: AtomicU64,
    closed: AtomicBool,
    dropped_queue_full: Counter,
    dropped_block_timeout: Counter,
    dropped_stalled: Counter,
    subscriptions: Gauge,
    /// At most one warning per interval for events dropped after `block_timeout` (each is
    /// counted): one line per subscriber per event flooded the log with many stuck ones.
    warn_block: meshgate_core::throttle::LogThrottle,
}

impl Inner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // The state is only mutated by simple pushes/removals; a panic elsewhere cannot leave
        // it inconsistent, so a poisoned lock is still usable.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, id: u64, filter: &TopicFilter) {
        let mut state = self.write();
        if let Some(sub) = state.subs.remove(filter, |s| s.id == id) {
            self.subscriptions.dec();
            if let Some(key) = sub.group
                && let Some((_, members)) = state.cursors.get_mut(&key)
            {
                *members -= 1;
                if *members == 0 {
                    state.cursors.remove(&key);
                }
            }
        }
    }
}

/// The in-memory backbone.
#[derive(Debug)]
pub struct MemoryBackbone {
    inner: Arc<Inner>,
}

impl MemoryBackbone {
    /// [`Backbone::try_publish`] of an envelope already shared (the NATS backbone's writer
    /// holds it too).
    pub(crate) fn try_publish_shared(&self, envelope: Arc<Envelope>) -> TryPublish<'_> {
        if self.inner.closed.load(Ordering::Acquire) {
            return TryPublish::Done(Err(BackboneError::Closed));
        }
        let blocked = self.enqueue(&envelope);
        if blocked.is_empty() {
            return TryPublish::Done(Ok(()));
        }
        TryPublish::Pending(Box::pin(async move {
            // One deadline for all the full queues, waited for together: a publish waits at
            // most `block_timeout` in all, however many subscribers are full (waiting for
            // each in turn made it N × block_timeout: review F3).
            let deadline = tokio::time::Instant::now() + self.inner.config.block_timeout;
            let waits = blocked
                .iter()
                .map(|(tx, stalled)| self.wait_for_room(tx, stalled, &envelope, deadline));
            let saturated = futures_util::future::join_all(waits)
                .await
                .into_iter()
                .any(|delivered| !delivered);
            if saturated {
                return Err(BackboneError::Saturated(format!(
                    "a subscriber's queue stayed full for {:?}; the event was not delivered to it",
                    self.inner.config.block_timeout
                )));
            }
            Ok(())
        }))
    }

    pub fn new(config: MemoryBackboneConfig, registry: &Registry) -> Arc<Self> {
        Self::with_metrics_label(config, registry, "memory")
    }

    /// A memory backbone whose metrics say `backbone="<label>"` (the NATS backbone's local
    /// deliveries are `nats-local`).
    pub fn with_metrics_label(
        config: MemoryBackboneConfig,
        registry: &Registry,
        label: &'static str,
    ) -> Arc<Self> {
        let dropped = |reason| registry.backbone_dropped(label, reason);
        Arc::new(MemoryBackbone {
            inner: Arc::new(Inner {
                config,
                state: RwLock::new(State::default()),
                next_id: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                dropped_queue_full: dropped(DropReason::QueueFull),
                dropped_block_timeout: dropped(DropReason::BlockTimeout),
                dropped_stalled: dropped(DropReason::Stalled),
                subscriptions: registry
                    .gauge(metrics::BACKBONE_SUBSCRIPTIONS, &[("backbone", label)]),
                warn_block: meshgate_core::throttle::LogThrottle::new(
                    std::time::Duration::from_secs(10),
                ),
            }),
        })
    }

    /// Number of live subscriptions (for tests and admin).
    pub fn subscription_count(&self) -> usize {
        self.inner.read().subs.len()
    }

    /// [`Backbone::subscriptions`], each entry of kind `kind` (the NATS backbone's local part
    /// says `nats-local`): one per filter and group, over its subscribers' queues. A subscriber
    /// whose queue is full is `full`, one that publishes skip (`block`) `stalled`.
    pub(crate) fn subscriptions_as(&self, kind: &'static str) -> Vec<BackboneSubscription> {
        use meshgate_core::backbone::subscription_state::{FULL, OK, STALLED};
        let mut out: Vec<BackboneSubscription> = Vec::new();
        // The entries of the filter visited now (the index visits one filter's subscribers
        // one after another): from `current` on in `out`.
        let mut current = 0;
        let state = self.inner.read();
        state.subs.for_each(|filter, sub| {
            if out.get(current).is_none_or(|e| e.filter != filter) {
                current = out.len();
            }
            let group = sub.group.as_ref().map(|(g, _)| g.as_str());
            let at = match out[current..]
                .iter()
                .position(|e| e.group.as_deref() == group)
            {
                Some(i) => current + i,
                None => {
                    out.push(BackboneSubscription::new(
                        filter,
                        group.map(str::to_owned),
                        kind,
                    ));
                    out.len() - 1
                }
            };
            let health = if sub.stalled.load(Ordering::Relaxed) {
                STALLED
            } else if sub.tx.is_full() {
                FULL
            } else {
                OK
            };
            out[at].add_queue(sub.tx.len(), sub.tx.capacity(), health);
        });
        out
    }

    /// Queues the event for every matching subscriber without waiting. Subscribers whose queue
    /// is full get it under the full-queue policy: dropped and counted at once (`drop`), or
    /// returned, to be waited for (`block`).
    fn enqueue(&self, envelope: &Arc<Envelope>) -> Vec<Blocked> {
        let inner = &self.inner;
        let block = inner.config.full_policy == FullQueuePolicy::Block;
        let mut blocked = Vec::new();
        let mut full = |sub: &Sub| {
            if !block {
                inner.dropped_queue_full.inc();
                tracing::debug!(topic = %envelope.topic, "subscriber queue full, event dropped");
            } else if sub.stalled.load(Ordering::Relaxed) {
                inner.dropped_stalled.inc();
            } else {
                blocked.push((sub.tx.clone(), sub.stalled.clone()));
            }
        };
        let state = inner.read();
        // Queue groups seen so far (rarely any: no allocation unless there are).
        let mut groups: HashMap<&(String, TopicFilter), Vec<&Sub>> = HashMap::new();
        state
            .subs
            .for_each_match(&envelope.topic, |sub| match &sub.group {
                None => match sub.tx.try_send(Delivery::new(envelope.clone(), None)) {
                    Ok(()) if block => sub.sent(),
                    Ok(()) | Err(TrySendError::Closed(_)) => {}
                    Err(TrySendError::Full(_)) => full(sub),
                },
                Some(key) => groups.entry(key).or_default().push(sub),
            });
        for (key, members) in groups {
            let start = state
                .cursors
                .get(key)
                .map_or(0, |(c, _)| c.fetch_add(1, Ordering::Relaxed));
            // Prefer a member with room; if all are full, the policy applies to the chosen one.
            let n = members.len();
            let sent = (0..n).any(|i| {
                let member = members[(start + i) % n];
                let ok = member
                    .tx
                    .try_send(Delivery::new(envelope.clone(), None))
                    .is_ok();
                if ok && block {
                    member.sent();
                }
                ok
            });
            if !sent {
                full(members[start % n]);
            }
        }
        blocked
    }

    /// Waits (until `deadline`) for room in a full subscriber queue. `false`: timed out, the
    /// event was dropped for that subscriber.
    async fn wait_for_room(
        &self,
        tx: &queue::Sender<Delivery>,
        stalled: &AtomicBool,
        envelope: &Arc<Envelope>,
        deadline: tokio::time::Instant,
    ) -> bool {
        let delivery = Delivery::new(envelope.clone(), None);
        match tokio::time::timeout_at(deadline, tx.send(delivery)).await {
            // Sent, or the subscriber went away meanwhile.
            Ok(_) => true,
            Err(_) => {
                self.inner.dropped_block_timeout.inc();
                stalled.store(true, Ordering::Relaxed);
                if self.inner.warn_block.ready() {
                    tracing::warn!(
                        topic = %envelope.topic,
                        "subscriber queue full past block_timeout, event dropped for it and the subscriber skipped until its queue is half empty (counted in meshgate_backbone_dropped_total{{reason=\"block_timeout\"|\"stalled\"}}; at most one such line per 10 s)"
                    );
                }
                false
            }
        }
    }
}

/// The receiving end of one subscription; removes itself from the backbone when dropped.
struct MemoryStream {
    id: u64,
    filter: TopicFilter,
    rx: queue::Receiver<Delivery>,
    backbone: Weak<Inner>,
}

impl Stream for MemoryStream {
    type Item = Delivery;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for MemoryStream {
    fn drop(&mut self) {
        if let Some(inner) = self.backbone.upgrade() {
            inner.remove(self.id, &self.filter);
        }
    }
}

impl Backbone for MemoryBackbone {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn publish(&self, envelope: Envelope) -> BoxFuture<'_, Result<(), BackboneError>> {
        match self.try_publish(envelope) {
            TryPublish::Done(r) => Box::pin(std::future::ready(r)),
            TryPublish::Pending(f) => f,
        }
    }

    fn delivers_in_process(&self) -> bool {
        true
    }

    fn spans_instances(&self) -> bool {
        false
    }

    fn try_publish(&self, envelope: Envelope) -> TryPublish<'_> {
        self.try_publish_shared(Arc::new(envelope))
    }
    fn subscribe(
        &self,
        filter: TopicFilter,
        options: SubscribeOptions,
    ) -> BoxFuture<'_, Result<Subscription, BackboneError>> {
        Box::pin(async move {
            let inner = &self.inner;
            if inner.closed.load(Ordering::Acquire) {
                return Err(BackboneError::Closed);
            }
            let capacity = options
                .capacity
                .unwrap_or(inner.config.queue_capacity)
                .max(1);
            let (tx, rx) = queue::bounded(capacity);
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            let group = options.queue_group.map(|g| (g, filter.clone()));
            {
                let mut state = inner.write();
                if let Some(key) = &group {
                    state.cursors.entry(key.clone()).or_default().1 += 1;
                }
                state.subs.insert(
                    &filter,
                    Sub {
                        id,
                        group,
                        tx,
                        stalled: Arc::default(),
                    },
                );
            }
            inner.subscriptions.inc();
            let stream = MemoryStream {
                id,
                filter: filter.clone(),
                rx,
                backbone: Arc::downgrade(inner),
            };
            Ok(Subscription::new(filter, Box::pin(stream)))
        })
    }

    fn subscriptions(&self) -> Vec<BackboneSubscription> {
        self.subscriptions_as("queue")
    }

    fn is_ready(&self) -> bool {
        !self.inner.closed.load(Ordering::Acquire)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.inner.closed.store(true, Ordering::Release);
            // Dropping the senders lets every subscriber drain what is queued, then end.
            let mut state = self.inner.write();
            let n = state.subs.len();
            state.subs.clear();
            state.cursors.clear();
            for _ in 0..n {
                self.inner.subscriptions.dec();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_core::{Event, Origin, Topic};
    use std::time::Duration;

    fn config(capacity: usize, policy: FullQueuePolicy) -> MemoryBackboneConfig {
        MemoryBackboneConfig {
            queue_capacity: capacity,
            full_policy: policy,
            block_timeout: Duration::from_millis(50),
        }
    }

    fn envelope(topic: &str, id: &str) -> Envelope {
        Envelope::new(
            Topic::from_mqtt(topic).unwrap(),
            Arc::new(Event::new(id, "/test", "t").unwrap()),
            Origin {
                instance: Arc::from("test"),
                connection: 1,
            },
        )
    }

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[tokio::test]
    async fn filters_route_events() {
        let bb = MemoryBackbone::new(config(8, FullQueuePolicy::Drop), &Registry::new());
        let mut all = bb.subscribe(filter("#"), Default::default()).await.unwrap();
        let mut temp = bb
            .subscribe(filter("s/+/temp"), Default::default())
            .await
            .unwrap();
        bb.publish(envelope("s/1/temp", "a")).await.unwrap();
        bb.publish(envelope("s/1/hum", "b")).await.unwrap();
        assert_eq!(all.next().await.unwrap().event().id(), "a");
        assert_eq!(all.next().await.unwrap().event().id(), "b");
        assert_eq!(temp.next().await.unwrap().event().id(), "a");
        bb.close().await;
        assert!(temp.next().await.is_none());
        assert!(matches!(
            bb.publish(envelope("x", "c")).await,
            Err(BackboneError::Closed)
        ));
    }

    #[tokio::test]
    async fn drop_policy_counts_and_never_blocks() {
        let registry = Registry::new();
        let bb = MemoryBackbone::new(config(2, FullQueuePolicy::Drop), &registry);
        let mut sub = bb.subscribe(filter("a"), Default::default()).await.unwrap();
        for i in 0..5 {
            bb.publish(envelope("a", &i.to_string())).await.unwrap();
        }
        assert_eq!(bb.inner.dropped_queue_full.get(), 3);
        assert_eq!(sub.next().await.unwrap().event().id(), "0");
        assert_eq!(sub.next().await.unwrap().event().id(), "1");
        assert!(registry.render().contains("reason=\"queue_full\"} 3"));
    }

    #[tokio::test(start_paused = true)]
    async fn block_policy_waits_then_reports_saturation() {
        let bb = MemoryBackbone::new(config(1, FullQueuePolicy::Block), &Registry::new());
        let mut sub = bb.subscribe(filter("a"), Default::default()).await.unwrap();
        bb.publish(envelope("a", "1")).await.unwrap();
        // Queue full: a reader that frees room within the timeout unblocks the publisher.
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let first = sub.next().await.unwrap();
            (first.event().id().to_owned(), sub)
        });
        bb.publish(envelope("a", "2")).await.unwrap();
        let (first, mut sub) = reader.await.unwrap();
        assert_eq!(first, "1");
        // Nobody reads now: the publish fails after block_timeout and the drop is counted.
        let err = bb.publish(envelope("a", "3")).await.unwrap_err();
        assert!(matches!(err, BackboneError::Saturated(_)));
        assert_eq!(bb.inner.dropped_block_timeout.get(), 1);
        assert_eq!(sub.next().await.unwrap().event().id(), "2");
    }

    /// Review F3: with many full subscriptions that are never polled, one publish under
    /// `block` waits `block_timeout` in all (not once per full subscriber), and under `drop`
    /// not at all; every full subscriber's drop is counted.
    #[tokio::test(start_paused = true)]
    async fn one_publish_waits_at_most_block_timeout_whatever_the_number_of_full_queues() {
        const FULL: usize = 20;
        for policy in [FullQueuePolicy::Block, FullQueuePolicy::Drop] {
            let bb = MemoryBackbone::new(config(1, policy), &Registry::new());
            let mut never_polled = Vec::new();
            for _ in 0..FULL {
                never_polled.push(
                    bb.subscribe(filter("a/#"), Default::default())
                        .await
                        .unwrap(),
                );
            }
            bb.publish(envelope("a/b", "fills")).await.unwrap();
            let started = tokio::time::Instant::now();
            let result = bb.publish(envelope("a/b", "waits")).await;
            let waited = started.elapsed();
            match policy {
                FullQueuePolicy::Block => {
                    assert!(matches!(result, Err(BackboneError::Saturated(_))));
                    // block_timeout is 50 ms; in turn it was FULL × 50 ms.
                    assert!(waited <= Duration::from_millis(60), "{waited:?}");
                    assert_eq!(bb.inner.dropped_block_timeout.get(), FULL as u64);
                }
                FullQueuePolicy::Drop => {
                    result.unwrap();
                    assert_eq!(waited, Duration::ZERO);
                    assert_eq!(bb.inner.dropped_queue_full.get(), FULL as u64);
                }
            }
        }
    }

    /// `block`: a subscriber that made a publish wait past `block_timeout` is skipped at once
    /// (counted `stalled`) until its queue is half empty; then it is waited for again.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_subscriber_is_skipped_until_its_queue_is_half_empty() {
        let bb = MemoryBackbone::new(config(4, FullQueuePolicy::Block), &Registry::new());
        let mut slow = bb
            .subscribe(filter("a/#"), Default::default())
            .await
            .unwrap();
        let mut other = bb
            .subscribe(filter("a/#"), Default::default())
            .await
            .unwrap();
        for i in 0..4 {
            bb.publish(envelope("a/b", &i.to_string())).await.unwrap();
            other.next().await.unwrap();
        }
        // Full: the first publish waits block_timeout, is refused, marks the subscriber.
        let started = tokio::time::Instant::now();
        let r = bb.publish(envelope("a/b", "waits")).await;
        assert!(matches!(r, Err(BackboneError::Saturated(_))));
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        other.next().await.unwrap();
        // Stalled: later publishes do not wait, the other subscriber gets them.
        for i in 0..10 {
            let started = tokio::time::Instant::now();
            bb.publish(envelope("a/b", &format!("skip{i}")))
                .await
                .unwrap();
            assert_eq!(started.elapsed(), Duration::ZERO);
            assert!(other.next().await.is_some());
        }
        assert_eq!(bb.inner.dropped_block_timeout.get(), 1);
        assert_eq!(bb.inner.dropped_stalled.get(), 10);
        // Drained: the first copy that finds room clears the mark, so once the queue is full
        // again the subscriber is waited for again.
        for _ in 0..4 {
            slow.next().await.unwrap();
        }
        for i in 0..4 {
            bb.publish(envelope("a/b", &format!("q{i}"))).await.unwrap();
            other.next().await.unwrap();
        }
        let started = tokio::time::Instant::now();
        let r = bb.publish(envelope("a/b", "waits again")).await;
        assert!(matches!(r, Err(BackboneError::Saturated(_))));
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert_eq!(bb.inner.dropped_block_timeout.get(), 2);
    }

    #[tokio::test]
    async fn queue_groups_share_events() {
        let bb = MemoryBackbone::new(config(64, FullQueuePolicy::Drop), &Registry::new());
        let opts = SubscribeOptions {
            queue_group: Some("g".into()),
            capacity: None,
            durable: None,
            max_in_flight: None,
            ack_wait: None,
        };
        let mut a = bb.subscribe(filter("jobs/#"), opts.clone()).await.unwrap();
        let mut b = bb.subscribe(filter("jobs/#"), opts).await.unwrap();
        let mut plain = bb
            .subscribe(filter("jobs/#"), Default::default())
            .await
            .unwrap();
        for i in 0..10 {
            bb.publish(envelope("jobs/x", &i.to_string()))
                .await
                .unwrap();
        }
        bb.close().await;
        let (mut na, mut nb, mut np) = (0, 0, 0);
        while a.next().await.is_some() {
            na += 1;
        }
        while b.next().await.is_some() {
            nb += 1;
        }
        while plain.next().await.is_some() {
            np += 1;
        }
        assert_eq!((na + nb, np), (10, 10));
        assert_eq!((na, nb), (5, 5), "round-robin");
    }

    /// One entry per filter and group, over its subscribers' queues, with their fill and state.
    #[tokio::test(start_paused = true)]
    async fn subscriptions_are_listed_per_filter_and_group() {
        let bb = MemoryBackbone::new(config(2, FullQueuePolicy::Block), &Registry::new());
        let group = |g: &str| SubscribeOptions {
            queue_group: Some(g.to_owned()),
            ..Default::default()
        };
        let _a1 = bb
            .subscribe(filter("a/#"), Default::default())
            .await
            .unwrap();
        let _a2 = bb
            .subscribe(filter("a/#"), Default::default())
            .await
            .unwrap();
        let _g1 = bb.subscribe(filter("a/#"), group("g")).await.unwrap();
        let _g2 = bb.subscribe(filter("a/#"), group("g")).await.unwrap();
        let b = bb
            .subscribe(filter("b/+"), Default::default())
            .await
            .unwrap();
        bb.publish(envelope("a/x", "1")).await.unwrap();
        let mut listed = bb.subscriptions();
        listed.sort_by(|x, y| x.sort_key().cmp(&y.sort_key()));
        let brief: Vec<_> = listed
            .iter()
            .map(|s| {
                (
                    s.filter.as_str(),
                    s.group.as_deref(),
                    s.kind,
                    s.subscribers,
                    s.queued,
                    s.capacity,
                    s.state,
                )
            })
            .collect();
        assert_eq!(
            brief,
            [
                ("a/#", None, "queue", 2, Some(2), Some(4), "ok"),
                ("a/#", Some("g"), "queue", 2, Some(1), Some(4), "ok"),
                ("b/+", None, "queue", 1, Some(0), Some(2), "ok"),
            ]
        );
        // Full, then stalled (a publish gave up waiting for it).
        bb.publish(envelope("a/x", "2")).await.unwrap();
        let state_of = |f: &str, g: Option<&str>| {
            bb.subscriptions()
                .into_iter()
                .find(|s| s.filter == f && s.group.as_deref() == g)
                .map(|s| s.state)
        };
        assert_eq!(state_of("a/#", None), Some("full"));
        assert_eq!(state_of("a/#", Some("g")), Some("ok"), "one event each");
        assert!(bb.publish(envelope("a/x", "3")).await.is_err());
        assert_eq!(state_of("a/#", None), Some("stalled"));
        drop(b);
        assert_eq!(state_of("b/+", None), None, "gone with its subscriber");
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes() {
        let bb = MemoryBackbone::new(config(1, FullQueuePolicy::Block), &Registry::new());
        let sub = bb.subscribe(filter("a"), Default::default()).await.unwrap();
        assert_eq!(bb.subscription_count(), 1);
        drop(sub);
        assert_eq!(bb.subscription_count(), 0);
        // Nothing left to block on.
        for _ in 0..3 {
            bb.publish(envelope("a", "x")).await.unwrap();
        }
    }
}
