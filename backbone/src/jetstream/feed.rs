//! The instance feed (decision 0080): one pull consumer per gateway instance over the whole
//! stream, matched locally against this instance's subscriptions, instead of a consumer per
//! subscription.
//!
//! The consumer (`live_<instance>`) has `AckPolicy::None` and memory storage, starts with new
//! messages, is pulled on the own client ([`super::pull`]) and repaired from one past the last
//! sequence it delivered if the server loses it. Each message's subject gives its topic; the
//! [`TopicIndex`] gives the members it matches; the message is decoded once, and only when a
//! member takes it ([`Member::offer`]). A gap in the consumer sequence (messages the server
//! sent to a pull request that is gone, such as one from before a reconnect) makes every member
//! read the stream from its own position ([`Member::lost`]): nothing is skipped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use meshgate_core::metrics::Counter;
use meshgate_core::{BackboneSubscription, Topic, TopicFilter, TopicIndex};

use super::consumer::{consumer_name, repair_consumer};
use super::member::{Member, Offer};
use super::pull::{Limits, Pull, PullState, sequences};
use crate::nats::client::Client;

/// How often the feed checks whether its connection was replaced.
const RECONNECT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long the server keeps the feed's consumer once nobody pulls (a gateway that died).
const FEED_INACTIVE: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug, Default)]
struct Members {
    index: RwLock<TopicIndex<Arc<Member>>>,
    all: Mutex<HashMap<u64, Arc<Member>>>,
}

impl Members {
    fn all(&self) -> MutexGuard<'_, HashMap<u64, Arc<Member>>> {
        self.all.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
pub(crate) struct Feed {
    members: Members,
    /// The highest stream sequence the feed has seen (at start: the stream's last).
    position: AtomicU64,
    next_id: AtomicU64,
    /// The feed's consumer, for the log and the listing.
    consumer: String,
    /// What the feed's pull last learnt about that consumer.
    pull: PullState,
}

impl Feed {
    /// Creates the instance's consumer and starts pulling it on `client`.
    pub(crate) async fn start(
        stream: &stream::Stream,
        client: &Client,
        stream_name: &str,
        prefix: &str,
        instance: &str,
        malformed: Counter,
    ) -> Result<Arc<Feed>, String> {
        let name = consumer_name(&["live", instance]);
        let filter_subject = if prefix.is_empty() {
            ">".to_owned()
        } else {
            format!("{prefix}.>")
        };
        let config = jetstream::consumer::pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            ack_policy: jetstream::consumer::AckPolicy::None,
            filter_subject,
            inactive_threshold: FEED_INACTIVE,
            memory_storage: true,
            ..Default::default()
        };
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| format!("the instance feed's consumer {name}: {e}"))?;
        let info = consumer.cached_info();
        // Where new messages begin: what the consumer says it delivered up to, and never
        // below the stream's last sequence as read just before (a durable subscription made now
        // stores this as its cursor, so it must not be too low).
        let position = info
            .delivered
            .stream_sequence
            .max(stream.cached_info().state.last_sequence);
        let limits = Limits::of(info.config.max_batch, info.config.max_expires);
        let pull = Pull::start(client, stream_name, &name, limits)
            .map_err(|e| format!("the instance feed's pull: {e}"))?
            .with_repair(
                repair_consumer(stream.clone(), name.clone(), config),
                position,
            );
        let feed = Arc::new(Feed {
            members: Members::default(),
            position: AtomicU64::new(position),
            next_id: AtomicU64::new(1),
            consumer: name,
            pull: pull.state(),
        });
        let delivered = info.delivered.consumer_sequence;
        tokio::spawn(feed.clone().run(
            pull,
            client.clone(),
            delivered,
            prefix.to_owned(),
            malformed,
        ));
        Ok(feed)
    }

    /// The highest stream sequence seen: a new subscription starts after it.
    pub(crate) fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }

    pub(crate) fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn join(&self, member: Arc<Member>) {
        self.members.all().insert(member.id, member.clone());
        let filter = member.filter.clone();
        self.members
            .index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(&filter, member);
    }

    pub(crate) fn leave(&self, member: &Member) {
        self.members.all().remove(&member.id);
        self.members
            .index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&member.filter, |m| m.id == member.id);
    }

    /// The members by filter (kind `feed`), over their queues: `behind` while one reads the
    /// stream itself, `full` while one's queue is full (it goes behind at the next message);
    /// and what the feed's pull knows of its consumer (`refused`, `repairing`).
    pub(crate) fn list(&self) -> Vec<BackboneSubscription> {
        use meshgate_core::backbone::subscription_state::{BEHIND, FULL, OK};
        let mut by_filter: HashMap<TopicFilter, BackboneSubscription> = HashMap::new();
        for member in self.members.all().values() {
            let (queued, capacity, behind) = member.snapshot();
            let state = if behind {
                BEHIND
            } else if queued >= capacity {
                FULL
            } else {
                OK
            };
            by_filter
                .entry(member.filter.clone())
                .or_insert_with(|| {
                    let mut entry = BackboneSubscription::new(member.filter.as_str(), None, "feed");
                    entry.names = vec![self.consumer.clone()];
                    entry
                })
                .add_queue(queued, capacity, state);
        }
        let consumer = self.pull.get();
        by_filter
            .into_values()
            .map(|mut entry| {
                entry.worsen(consumer);
                entry
            })
            .collect()
    }

    /// Hands each message to the members it matches; ends them when the pull ends (the
    /// backbone closed).
    async fn run(
        self: Arc<Self>,
        mut pull: Pull,
        client: Client,
        delivered: u64,
        prefix: String,
        malformed: Counter,
    ) {
        // Where the consumer stood when it was opened: a gap before the first message counts.
        let mut last_consumer_seq = delivered;
        let mut matched: Vec<Arc<Member>> = Vec::new();
        let mut connection = client.connections();
        let mut tick = tokio::time::interval(RECONNECT_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let m = tokio::select! {
                m = pull.next() => m,
                _ = tick.tick() => {
                    // After a reconnect, what the server sent to the old pull request is gone,
                    // and on a quiet stream no later message would show the gap: every member
                    // reads the stream from its own position now.
                    let now = client.connections();
                    if now != connection {
                        connection = now;
                        for member in self.members.all().values() {
                            member.lost();
                        }
                    }
                    continue;
                }
            };
            let Some(m) = m else {
                break;
            };
            let Some((seq, consumer_seq)) = m.reply.as_deref().and_then(sequences) else {
                continue;
            };
            if consumer_seq != last_consumer_seq + 1 {
                // Lost on the way, or a consumer created again: every member reads the stream.
                tracing::debug!(
                    consumer = %self.consumer,
                    last_consumer_seq,
                    consumer_seq,
                    "jetstream: the instance feed skipped; subscriptions read what they missed"
                );
                for member in self.members.all().values() {
                    member.lost();
                }
            }
            last_consumer_seq = consumer_seq;
            self.position.fetch_max(seq, Ordering::AcqRel);
            let Some(topic) = std::str::from_utf8(&m.subject)
                .ok()
                .and_then(|s| Topic::from_nats_subject(&prefix, s).ok())
            else {
                malformed.inc();
                continue;
            };
            matched.clear();
            self.members
                .index
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .for_each_match(&topic, |member| matched.push(member.clone()));
            if matched.is_empty() {
                continue;
            }
            let size =
                m.subject.len() + m.headers.as_ref().map_or(0, |h| h.len()) + m.payload.len();
            matched.retain(|member| member.offer(seq, size) == Offer::Wanted);
            if matched.is_empty() {
                continue;
            }
            let Some(envelope) = crate::nats::decode_message(&prefix, m, &malformed) else {
                continue;
            };
            let envelope = Arc::new(envelope);
            for member in matched.drain(..) {
                member.push(seq, &envelope, size);
            }
        }
        for member in self.members.all().values() {
            member.end();
        }
    }
}
