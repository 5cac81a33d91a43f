//! Other instances' events for this instance's plain subscribers: one NATS subscription per
//! distinct topic filter, decoded once and handed to every local subscriber with that filter.
//!
//! Why: with a NATS subscription per subscriber, 500 browsers on one topic meant the server
//! sending each event 500 times to the instance and the instance decoding it 500 times. A
//! forwarding task per filter also takes the decoding off the subscriber's own task, so a busy
//! subscriber's writes and the decoding run on different cores.
//!
//! A subscriber whose queue (`capacity` events, or `max_bytes` of them) is full loses the
//! event (counted as slow consumer, as NATS itself does when the forwarding subscription falls
//! behind).
//!
//! A forwarding task that panics (a bug: decoding refuses bad messages with errors, and a panic
//! while decoding costs only that message, see `nats::decode_message`) is logged, counted
//! (`meshgate_errors_total{adapter="backbone",kind="task_panicked"}`) and restarted on a new
//! NATS subscription, with the same members: a group is never left in the map with no task.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::{FutureExt, Stream, StreamExt};
use meshgate_config::NatsWireMode;
use meshgate_core::backoff::Backoff;
use meshgate_core::metrics::Counter;
use meshgate_core::{BackboneSubscription, BoxFuture, Delivery, Envelope, TopicFilter};

use crate::nats::client::{ByteQueueRx, ByteQueueTx, byte_queue};

/// Longest wait between two attempts to subscribe again after a forwarding task's panic.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(5);

/// Makes the NATS subscription of a filter (again, after a panic): a stream of undecoded
/// messages `M`.
pub(crate) type Subscribe<M, E> =
    Arc<dyn Fn(TopicFilter) -> BoxFuture<'static, Result<BoxStream<'static, M>, E>> + Send + Sync>;

/// Turns a message of the subscription into the delivery for the members (`None`: skipped).
/// Called only when some member has room: under load, the messages every member would drop
/// are dropped before they are decoded (issue 18: decoding what was then thrown away took the
/// receiving instance's CPU from its subscribers' writes).
pub(crate) type Decode<M> = Arc<dyn Fn(M) -> Option<Delivery> + Send + Sync>;

/// The local subscribers of one filter and the task forwarding to them.
#[derive(Debug)]
struct Group {
    members: Mutex<Vec<(u64, ByteQueueTx<Delivery>)>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Group {
    fn members(&self) -> MutexGuard<'_, Vec<(u64, ByteQueueTx<Delivery>)>> {
        // Pushes and removals only: usable after a panic elsewhere.
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default)]
struct Inner {
    groups: Mutex<HashMap<TopicFilter, Arc<Group>>>,
    next_id: AtomicU64,
}

impl Inner {
    fn groups(&self) -> MutexGuard<'_, HashMap<TopicFilter, Arc<Group>>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes `group` from the map if it is still the one for `filter`, and stops its task.
    fn retire(
        groups: &mut HashMap<TopicFilter, Arc<Group>>,
        filter: &TopicFilter,
        group: &Arc<Group>,
    ) {
        if groups.get(filter).is_some_and(|g| Arc::ptr_eq(g, group)) {
            groups.remove(filter);
        }
        if let Some(task) = group.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// The shared NATS subscriptions of one backbone.
#[derive(Debug, Clone)]
pub(crate) struct Fanout {
    inner: Arc<Inner>,
    slow_consumer: Counter,
    panicked: Counter,
}

impl Fanout {
    pub(crate) fn new(slow_consumer: Counter, panicked: Counter) -> Fanout {
        Fanout {
            inner: Arc::new(Inner::default()),
            slow_consumer,
            panicked,
        }
    }

    /// Joins the group of `filter`'s subscribers, subscribing on NATS first with `subscribe`
    /// (whose messages `decode` reads) when the filter has none yet; the stream has this
    /// subscriber's events, `capacity` of them queued at most, and at most about `max_bytes`
    /// of them.
    pub(crate) async fn join<M, F, E>(
        &self,
        filter: &TopicFilter,
        (capacity, max_bytes): (usize, usize),
        subscribe: F,
        decode: Decode<M>,
    ) -> Result<MemberStream, E>
    where
        M: Send + 'static,
        F: Fn(TopicFilter) -> BoxFuture<'static, Result<BoxStream<'static, M>, E>>
            + Send
            + Sync
            + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let (tx, rx) = byte_queue(capacity, max_bytes);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let member = |group: &Arc<Group>, rx| MemberStream {
            rx,
            id,
            group: group.clone(),
            filter: filter.clone(),
            fanout: Arc::downgrade(&self.inner),
        };
        // Members join only under the map's lock and only groups in the map, which are live:
        // a group leaves the map (under the same lock) before it stops.
        if let Some(group) = self.inner.groups().get(filter) {
            group.members().push((id, tx));
            return Ok(member(group, rx));
        }
        // Outside the lock: subscribing waits for the server.
        let remote = subscribe(filter.clone()).await?;
        let mut groups = self.inner.groups();
        if let Some(group) = groups.get(filter) {
            // Another subscriber made the group meanwhile: `remote` is dropped (unsubscribed).
            group.members().push((id, tx));
            return Ok(member(group, rx));
        }
        let group = Arc::new(Group {
            members: Mutex::new(vec![(id, tx)]),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(forward(
            remote,
            group.clone(),
            filter.clone(),
            Arc::downgrade(&self.inner),
            (self.slow_consumer.clone(), self.panicked.clone()),
            (Arc::new(subscribe), decode),
        ));
        *group.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        groups.insert(filter.clone(), group.clone());
        Ok(member(&group, rx))
    }

    /// Each filter's shared NATS subscription (kind `nats`), over its members' queues: `full`
    /// when one of them is (that member loses events, counted as slow consumer).
    /// `prefix`: the subjects' (`backbone.nats.subject_prefix`), for the entries' names.
    pub(crate) fn list(&self, prefix: &str) -> Vec<BackboneSubscription> {
        use meshgate_core::backbone::subscription_state::{FULL, OK};
        let groups = self.inner.groups();
        groups
            .iter()
            .map(|(filter, group)| {
                let mut entry = BackboneSubscription::new(filter.as_str(), None, "nats");
                entry.names = filter.to_nats_subjects(prefix);
                for (_, tx) in group.members().iter() {
                    entry.add_queue(
                        tx.len(),
                        tx.capacity(),
                        if tx.is_full() { FULL } else { OK },
                    );
                }
                entry
            })
            .collect()
    }

    /// Number of NATS subscriptions shared this way (for tests).
    #[cfg(test)]
    fn groups(&self) -> usize {
        self.inner.groups().len()
    }
}

/// About the memory an event holds in a queue (its JSON, or data and attributes).
fn approx_size(envelope: &Envelope) -> usize {
    crate::nats::wire::size_bound(envelope, NatsWireMode::Structured)
}

/// Hands each event of `remote` to every member of `group`; when `remote` ends (the client
/// drained), the members' streams end after what they have queued. After a panic, subscribes
/// again (with a backoff) and goes on with the same members; the task is aborted when the last
/// member leaves.
async fn forward<M, E: std::fmt::Display>(
    mut remote: BoxStream<'static, M>,
    group: Arc<Group>,
    filter: TopicFilter,
    inner: std::sync::Weak<Inner>,
    (slow_consumer, panicked): (Counter, Counter),
    (subscribe, decode): (Subscribe<M, E>, Decode<M>),
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), MAX_RESTART_BACKOFF);
    loop {
        let passed =
            std::panic::AssertUnwindSafe(pass_on(&mut remote, &group, &*decode, &slow_consumer))
                .catch_unwind()
                .await;
        let Err(panic) = passed else {
            break;
        };
        panicked.inc();
        tracing::error!(
            filter = %filter,
            panic = crate::nats::connector::panic_message(&*panic),
            "nats: a fan-out task panicked; subscribing again (counted in meshgate_errors_total{{kind=\"task_panicked\"}})"
        );
        // The stream may be left half-way through a message: a new one. Events published
        // until it is made are lost for these members (at most once, as on a reconnect).
        drop(remote);
        remote = loop {
            tokio::time::sleep(backoff.next_pause()).await;
            match subscribe(filter.clone()).await {
                Ok(stream) => break stream,
                Err(e) => tracing::warn!(
                    filter = %filter,
                    error = %e,
                    "nats: cannot subscribe again after a fan-out task's panic; retrying"
                ),
            }
        };
    }
    if let Some(inner) = inner.upgrade() {
        let mut groups = inner.groups();
        if groups.get(&filter).is_some_and(|g| Arc::ptr_eq(g, &group)) {
            groups.remove(&filter);
        }
    }
    group.members().clear();
}

/// Forwards until `remote` ends.
async fn pass_on<M>(
    remote: &mut BoxStream<'static, M>,
    group: &Group,
    decode: &(dyn Fn(M) -> Option<Delivery> + Send + Sync),
    slow_consumer: &Counter,
) {
    while let Some(message) = remote.next().await {
        {
            // Every member full: each loses this message, as it would after decoding.
            let members = group.members();
            if members.iter().all(|(_, tx)| tx.is_full()) {
                slow_consumer.add(members.len() as u64);
                continue;
            }
        }
        let Some(delivery) = decode(message) else {
            continue;
        };
        let size = approx_size(&delivery.envelope);
        let members = group.members();
        for (_, tx) in members.iter() {
            if let Err(crate::queue::TrySendError::Full(_)) =
                tx.try_send(Delivery::new(delivery.envelope.clone(), None), size)
            {
                slow_consumer.inc();
            }
        }
    }
}

/// One subscriber's events; leaves the group when dropped (the last one out ends the NATS
/// subscription).
#[derive(Debug)]
pub(crate) struct MemberStream {
    rx: ByteQueueRx<Delivery>,
    id: u64,
    group: Arc<Group>,
    filter: TopicFilter,
    fanout: std::sync::Weak<Inner>,
}

impl Stream for MemberStream {
    type Item = Delivery;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for MemberStream {
    fn drop(&mut self) {
        let Some(inner) = self.fanout.upgrade() else {
            return;
        };
        let mut groups = inner.groups();
        let mut members = self.group.members();
        members.retain(|(id, _)| *id != self.id);
        if members.is_empty() {
            drop(members);
            Inner::retire(&mut groups, &self.filter, &self.group);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use meshgate_core::{Envelope, Event, Origin, Topic};
    use tokio::sync::mpsc;

    const BYTES: usize = 1 << 20;

    fn delivery(id: &str) -> Delivery {
        let envelope = Envelope::new(
            Topic::from_mqtt("a/b").unwrap(),
            Arc::new(Event::new(id, "/s", "t").unwrap()),
            Origin {
                instance: Arc::from("other"),
                connection: 1,
            },
        );
        Delivery::new(Arc::new(envelope), None)
    }

    type Factory = Box<
        dyn Fn(TopicFilter) -> BoxFuture<'static, Result<BoxStream<'static, Delivery>, String>>
            + Send
            + Sync,
    >;

    /// The fake subscriptions carry deliveries: nothing to decode.
    fn as_is() -> Decode<Delivery> {
        Arc::new(Some)
    }

    /// A fake NATS subscription: its sender, and how many times one was made. Each call of
    /// the factory makes a new one, whose sender is sent on `made_tx` (after the first).
    fn source(
        made: &Arc<AtomicU64>,
    ) -> (
        mpsc::UnboundedSender<Delivery>,
        mpsc::UnboundedReceiver<mpsc::UnboundedSender<Delivery>>,
        Factory,
    ) {
        let (first_tx, first_rx) = mpsc::unbounded_channel::<Delivery>();
        let first = Mutex::new(Some(first_rx));
        let (again_tx, again_rx) = mpsc::unbounded_channel();
        let made = made.clone();
        let subscribe = move |_filter: TopicFilter| {
            made.fetch_add(1, Ordering::Relaxed);
            let mut rx = first.lock().unwrap().take().unwrap_or_else(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = again_tx.send(tx);
                rx
            });
            let stream = futures_util::stream::poll_fn(move |cx| {
                let polled = rx.poll_recv(cx);
                if let Poll::Ready(Some(d)) = &polled
                    && d.event().id() == "panic"
                {
                    panic!("a bug while forwarding");
                }
                polled
            });
            Box::pin(async move { Ok(stream.boxed()) }) as BoxFuture<'static, _>
        };
        (first_tx, again_rx, Box::new(subscribe))
    }

    #[tokio::test]
    async fn one_subscription_per_filter_each_member_gets_each_event_once() {
        let fanout = Fanout::new(Counter::default(), Counter::default());
        let filter = TopicFilter::parse("a/#").unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let (events, _, subscribe) = source(&made);
        let mut first = fanout
            .join(&filter, (8, BYTES), subscribe, as_is())
            .await
            .unwrap();
        let (_unused, _, subscribe) = source(&made);
        let mut second = fanout
            .join(&filter, (8, BYTES), subscribe, as_is())
            .await
            .unwrap();
        assert_eq!(
            made.load(Ordering::Relaxed),
            1,
            "the second joined the first's"
        );
        assert_eq!(fanout.groups(), 1);
        let listed = fanout.list("p");
        assert_eq!(listed.len(), 1);
        let entry = &listed[0];
        assert_eq!(
            (entry.filter.as_str(), entry.kind, entry.subscribers),
            ("a/#", "nats", 2)
        );
        assert_eq!((entry.queued, entry.capacity), (Some(0), Some(16)));
        assert_eq!(
            (entry.state, entry.names.clone()),
            ("ok", vec!["p.a".to_owned(), "p.a.>".to_owned()])
        );
        events.send(delivery("e1")).unwrap();
        assert_eq!(first.next().await.unwrap().event().id(), "e1");
        assert_eq!(second.next().await.unwrap().event().id(), "e1");
        // The last member out ends the shared subscription; a new one makes a new one.
        drop(first);
        assert_eq!(fanout.groups(), 1);
        drop(second);
        assert_eq!(fanout.groups(), 0);
        assert!(fanout.list("p").is_empty());
        let (_events, _, subscribe) = source(&made);
        let _third = fanout
            .join(&filter, (8, BYTES), subscribe, as_is())
            .await
            .unwrap();
        assert_eq!(made.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_full_member_loses_events_counted_others_do_not_wait() {
        let slow = Counter::default();
        let fanout = Fanout::new(slow.clone(), Counter::default());
        let filter = TopicFilter::parse("a/b").unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let (events, _, subscribe) = source(&made);
        let mut small = fanout
            .join(&filter, (1, BYTES), subscribe, as_is())
            .await
            .unwrap();
        let (_unused, _, subscribe) = source(&made);
        let mut large = fanout
            .join(&filter, (8, BYTES), subscribe, as_is())
            .await
            .unwrap();
        for i in 0..3 {
            events.send(delivery(&format!("e{i}"))).unwrap();
        }
        for i in 0..3 {
            assert_eq!(large.next().await.unwrap().event().id(), format!("e{i}"));
        }
        // Listed full while the small one holds its one event.
        let listed = fanout.list("");
        assert_eq!((listed[0].queued, listed[0].state), (Some(1), "full"));
        assert_eq!(small.next().await.unwrap().event().id(), "e0");
        assert_eq!(fanout.list("")[0].state, "ok");
        assert_eq!(slow.get(), 2);
    }

    /// A message that every member would drop is not decoded (it is counted once per member,
    /// as a drop after decoding was).
    #[tokio::test]
    async fn a_message_for_full_members_only_is_dropped_before_decoding() {
        let slow = Counter::default();
        let fanout = Fanout::new(slow.clone(), Counter::default());
        let filter = TopicFilter::parse("a/b").unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let (events, _, subscribe) = source(&made);
        let decoded = Arc::new(AtomicU64::new(0));
        let counting: Decode<Delivery> = {
            let decoded = decoded.clone();
            Arc::new(move |d| {
                decoded.fetch_add(1, Ordering::Relaxed);
                Some(d)
            })
        };
        let mut one = fanout
            .join(&filter, (1, BYTES), subscribe, counting)
            .await
            .unwrap();
        let (_unused, _, subscribe) = source(&made);
        let mut two = fanout
            .join(&filter, (1, BYTES), subscribe, as_is())
            .await
            .unwrap();
        for i in 0..4 {
            events.send(delivery(&format!("e{i}"))).unwrap();
        }
        // The forwarder handles each message it is given in turn; wait until it took all four.
        tokio::time::timeout(Duration::from_secs(5), async {
            while slow.get() < 6 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(decoded.load(Ordering::Relaxed), 1, "only e0 found room");
        assert_eq!(slow.get(), 6, "e1..e3, for both members");
        assert_eq!(one.next().await.unwrap().event().id(), "e0");
        assert_eq!(two.next().await.unwrap().event().id(), "e0");
        events.send(delivery("e4")).unwrap();
        assert_eq!(one.next().await.unwrap().event().id(), "e4");
        assert_eq!(decoded.load(Ordering::Relaxed), 2);
    }

    /// Review F15: a member's queue is bounded in bytes too; the first event always fits.
    #[tokio::test]
    async fn a_member_queue_is_bounded_in_bytes() {
        let slow = Counter::default();
        let fanout = Fanout::new(slow.clone(), Counter::default());
        let filter = TopicFilter::parse("a/b").unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let (events, _, subscribe) = source(&made);
        let one = approx_size(&delivery("e0").envelope);
        // Room for two events' bytes, ten in count.
        let mut member = fanout
            .join(&filter, (10, 2 * one), subscribe, as_is())
            .await
            .unwrap();
        // A second member, with room, tells when the forwarder went through all five.
        let (_unused, _, subscribe) = source(&made);
        let mut probe = fanout
            .join(&filter, (10, BYTES), subscribe, as_is())
            .await
            .unwrap();
        for i in 0..5 {
            events.send(delivery(&format!("e{i}"))).unwrap();
        }
        for i in 0..5 {
            assert_eq!(probe.next().await.unwrap().event().id(), format!("e{i}"));
        }
        assert_eq!(member.next().await.unwrap().event().id(), "e0");
        assert_eq!(member.next().await.unwrap().event().id(), "e1");
        assert_eq!(slow.get(), 3, "e2..e4 over the byte budget");
        // Read: room again.
        events.send(delivery("e6")).unwrap();
        assert_eq!(member.next().await.unwrap().event().id(), "e6");
    }

    #[tokio::test]
    async fn members_end_when_the_nats_subscription_ends() {
        let fanout = Fanout::new(Counter::default(), Counter::default());
        let filter = TopicFilter::parse("a/b").unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let (events, _, subscribe) = source(&made);
        let mut member = fanout
            .join(&filter, (8, BYTES), subscribe, as_is())
            .await
            .unwrap();
        events.send(delivery("last")).unwrap();
        drop(events);
        assert_eq!(member.next().await.unwrap().event().id(), "last");
        assert!(member.next().await.is_none());
        assert_eq!(fanout.groups(), 0);
    }

    /// A forwarding task that panics is counted and restarted on a new subscription: its
    /// members keep receiving, and new subscribers join the same live group (review F8: the
    /// dead group stayed in the map, swallowing every later event for the filter).
    #[tokio::test(start_paused = true)]
    async fn a_panicking_forwarder_is_counted_and_restarted_with_its_members() {
        let panicked = Counter::default();
        let fanout = Fanout::new(Counter::default(), panicked.clone());
        let filter = TopicFilter::parse("a/b").unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let (events, mut again, subscribe) = source(&made);
        let mut member = fanout
            .join(&filter, (8, BYTES), subscribe, as_is())
            .await
            .unwrap();
        events.send(delivery("e1")).unwrap();
        events.send(delivery("panic")).unwrap();
        assert_eq!(member.next().await.unwrap().event().id(), "e1");
        // Subscribed again, after the backoff.
        let events = again.recv().await.unwrap();
        assert_eq!(panicked.get(), 1);
        assert_eq!(made.load(Ordering::Relaxed), 2);
        events.send(delivery("e2")).unwrap();
        assert_eq!(member.next().await.unwrap().event().id(), "e2");
        let (_unused, _, subscribe) = source(&made);
        let mut late = fanout
            .join(&filter, (8, BYTES), subscribe, as_is())
            .await
            .unwrap();
        assert_eq!(fanout.groups(), 1);
        events.send(delivery("e3")).unwrap();
        assert_eq!(member.next().await.unwrap().event().id(), "e3");
        assert_eq!(late.next().await.unwrap().event().id(), "e3");
    }
}
