//! Other instances' events for this instance's plain subscribers: one NATS subscription per
//! distinct topic filter, decoded once and handed to every local subscriber with that filter.
//!
//! Why: with a NATS subscription per subscriber, 500 browsers on one topic meant the server
//! sending each event 500 times to the instance and the instance decoding it 500 times. A
//! forwarding task per filter also takes the decoding off the subscriber's own task, so a busy
//! subscriber's writes and the decoding run on different cores.
//!
//! A subscriber whose queue (`capacity`) is full loses the event (counted as slow consumer, as
//! NATS itself does when the forwarding subscription falls behind).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use meshgate_core::metrics::Counter;
use meshgate_core::{Delivery, TopicFilter};
use tokio::sync::mpsc;

/// The local subscribers of one filter and the task forwarding to them.
#[derive(Debug)]
struct Group {
    members: Mutex<Vec<(u64, mpsc::Sender<Delivery>)>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Group {
    fn members(&self) -> MutexGuard<'_, Vec<(u64, mpsc::Sender<Delivery>)>> {
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
}

impl Fanout {
    pub(crate) fn new(slow_consumer: Counter) -> Fanout {
        Fanout {
            inner: Arc::new(Inner::default()),
            slow_consumer,
        }
    }

    /// Joins the group of `filter`'s subscribers, subscribing on NATS first with `subscribe`
    /// when the filter has none yet; the stream has this subscriber's events, `capacity` of
    /// them queued at most.
    pub(crate) async fn join<F, E>(
        &self,
        filter: &TopicFilter,
        capacity: usize,
        subscribe: F,
    ) -> Result<MemberStream, E>
    where
        F: AsyncFnOnce() -> Result<BoxStream<'static, Delivery>, E>,
    {
        let (tx, rx) = mpsc::channel(capacity.max(1));
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
        let remote = subscribe().await?;
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
            self.slow_consumer.clone(),
        ));
        *group.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        groups.insert(filter.clone(), group.clone());
        Ok(member(&group, rx))
    }

    /// Number of NATS subscriptions shared this way (for tests).
    #[cfg(test)]
    fn groups(&self) -> usize {
        self.inner.groups().len()
    }
}

/// Hands each event of `remote` to every member of `group`; when `remote` ends (the client
/// drained), the members' streams end after what they have queued.
async fn forward(
    mut remote: BoxStream<'static, Delivery>,
    group: Arc<Group>,
    filter: TopicFilter,
    inner: std::sync::Weak<Inner>,
    slow_consumer: Counter,
) {
    while let Some(delivery) = remote.next().await {
        let members = group.members();
        for (_, tx) in members.iter() {
            if let Err(mpsc::error::TrySendError::Full(_)) =
                tx.try_send(Delivery::new(delivery.envelope.clone(), None))
            {
                slow_consumer.inc();
            }
        }
    }
    if let Some(inner) = inner.upgrade() {
        let mut groups = inner.groups();
        if groups.get(&filter).is_some_and(|g| Arc::ptr_eq(g, &group)) {
            groups.remove(&filter);
        }
    }
    group.members().clear();
}

/// One subscriber's events; leaves the group when dropped (the last one out ends the NATS
/// subscription).
#[derive(Debug)]
pub(crate) struct MemberStream {
    rx: mpsc::Receiver<Delivery>,
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

    /// A fake NATS subscription: its sender, and how many times one was made.
    fn source(
        made: &Arc<AtomicU64>,
    ) -> (
        mpsc::UnboundedSender<Delivery>,
        impl AsyncFnOnce() -> Result<BoxStream<'static, Delivery>, ()>,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let made = made.clone();
        let subscribe = async move || {
            made.fetch_add(1, Ordering::Relaxed);
            let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            Ok(stream.boxed())
        };
        (tx, subscribe)
    }

    #[tokio::test]
    async fn one_subscription_per_filter_each_member_gets_each_event_once() {
        let fanout = Fanout::new(Counter::default());
        let filter = TopicFilter::parse("a/#").unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let (events, subscribe) = source(&made);
        let mut first = fanout.join(&filter, 8, subscribe).await.unwrap();
        let (_unused, subscribe) = source(&made);
        let mut second = fanout.join(&filter, 8, subscribe).await.unwrap();
        assert_eq!(
            made.load(Ordering::Relaxed),
            1,
            "the second joined the first's"
        );
        assert_eq!(fanout.groups(), 1);
        events.send(delivery("e1")).unwrap();
        assert_eq!(first.next().await.unwrap().event().id(), "e1");
        assert_eq!(second.next().await.unwrap().event().id(), "e1");
        // The last member out ends the shared subscription; a new one makes a new one.
        drop(first);
        assert_eq!(fanout.groups(), 1);
        drop(second);
        assert_eq!(fanout.groups(), 0);
        let (_events, subscribe) = source(&made);
        let _third = fanout.join(&filter, 8, subscribe).await.unwrap();
        assert_eq!(made.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_full_member_loses_events_counted_others_do_not_wait() {
        let slow = Counter::default();
        let fanout = Fanout::new(slow.clone());
        let filter = TopicFilter::parse("a/b").unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let (events, subscribe) = source(&made);
        let mut small = fanout.join(&filter, 1, subscribe).await.unwrap();
        let (_unused, subscribe) = source(&made);
        let mut large = fanout.join(&filter, 8, subscribe).await.unwrap();
        for i in 0..3 {
            events.send(delivery(&format!("e{i}"))).unwrap();
        }
        for i in 0..3 {
            assert_eq!(large.next().await.unwrap().event().id(), format!("e{i}"));
        }
        assert_eq!(small.next().await.unwrap().event().id(), "e0");
        assert_eq!(slow.get(), 2);
    }

    #[tokio::test]
    async fn members_end_when_the_nats_subscription_ends() {
        let fanout = Fanout::new(Counter::default());
        let filter = TopicFilter::parse("a/b").unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let (events, subscribe) = source(&made);
        let mut member = fanout.join(&filter, 8, subscribe).await.unwrap();
        events.send(delivery("last")).unwrap();
        drop(events);
        assert_eq!(member.next().await.unwrap().event().id(), "last");
        assert!(member.next().await.is_none());
        assert_eq!(fanout.groups(), 0);
    }
}
