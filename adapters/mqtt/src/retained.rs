//! Retained messages: the last retained PUBLISH per topic, sent to new subscribers with the
//! RETAIN flag. Kept by the backbone when it shares them between instances (JetStream: a KV
//! bucket, bounded by `backbone.jetstream.retained_max_bytes`), otherwise in this gateway's
//! memory, bounded by `mqtt.max_retained_messages` topics and `mqtt.max_retained_bytes`
//! bytes: a retained message past either bound is delivered to current subscribers but not
//! retained, and counted (`meshgate_events_dropped_total{adapter="mqtt",reason="retained_limit"}`);
//! the topic's earlier retained message, if any, is removed rather than left as stale state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use meshgate_core::metrics::Counter;
use meshgate_core::{Backbone, Envelope, TopicFilter};

/// What [`Retained::matching`] found: at most the limit the caller gave, and how many more
/// matched beyond it (not read, not returned).
#[derive(Debug, Default)]
pub(crate) struct Matches {
    pub(crate) envelopes: Vec<Arc<Envelope>>,
    pub(crate) beyond: u64,
}

/// The in-memory store: the messages and their total size, under one lock.
#[derive(Default)]
struct Store {
    /// By topic (as `Arc<str>`, so it can be searched by a `&str` prefix).
    messages: BTreeMap<Arc<str>, (Arc<Envelope>, usize)>,
    bytes: usize,
}

pub(crate) struct Retained {
    store: Mutex<Store>,
    /// `mqtt.max_retained_messages` / `max_retained_bytes`, which a reload may move
    /// ([`Retained::set_limits`]); lowered, what is stored stays and new topics wait for room.
    max_messages: AtomicUsize,
    max_bytes: AtomicUsize,
    dropped: Counter,
    failed: Counter,
    /// The backbone, when it has a shared store.
    shared: Option<Arc<dyn Backbone>>,
}

impl std::fmt::Debug for Retained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retained")
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

/// What a retained message costs the memory store: its topic (the map key) and its event as
/// JSON (the encoding every subscriber's packet is made from; cached in the envelope), plus a
/// fixed overhead for the map entry and the event's allocations.
fn cost(envelope: &Envelope) -> usize {
    const ENTRY: usize = 256;
    let forwarded = envelope.mqtt.as_ref().map_or(0, |m| {
        m.content_type.as_ref().map_or(0, String::len)
            + m.user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    });
    ENTRY + envelope.topic.as_str().len() + envelope.json().len() + forwarded
}

/// The literal levels of `filter` before its first wildcard, without their trailing `/`
/// (`a/b/#` → `a/b`; `#` → ``): every topic it matches starts with this, so the sorted
/// store is searched from there instead of from the start. The `/` is left out because
/// `a/b/#` also matches the topic `a/b` itself (MQTT §4.7.1.2), which sorts before `a/b/`;
/// the extra candidates this lets in (`a/bc`) are rejected by `TopicFilter::matches`.
fn literal_prefix(filter: &TopicFilter) -> &str {
    let f = filter.as_str();
    match f.find(['+', '#']) {
        Some(i) => f[..i].strip_suffix('/').unwrap_or(&f[..i]),
        // No wildcard: the filter is one topic.
        None => f,
    }
}

impl Retained {
    pub(crate) fn new(
        backbone: &Arc<dyn Backbone>,
        max_messages: usize,
        max_bytes: usize,
        dropped: Counter,
        failed: Counter,
    ) -> Self {
        Retained {
            store: Mutex::new(Store::default()),
            max_messages: AtomicUsize::new(max_messages),
            max_bytes: AtomicUsize::new(max_bytes),
            dropped,
            failed,
            shared: backbone
                .retained_store()
                .is_some()
                .then(|| backbone.clone()),
        }
    }

    /// Moves the memory store's bounds (a reload).
    pub(crate) fn set_limits(&self, max_messages: usize, max_bytes: usize) {
        self.max_messages.store(max_messages, Ordering::Relaxed);
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    /// Stores `envelope` as the topic's retained message, or clears it (an empty payload).
    /// Past the store's bounds the message is not retained (counted), and the topic's earlier
    /// retained message is removed (it is no longer the last one); replacing a topic's message
    /// with one that fits is always possible.
    /// Retained messages held here; `None` when the backbone's shared store holds them.
    pub(crate) fn count(&self) -> Option<usize> {
        if self.shared.is_some() {
            return None;
        }
        Some(
            self.store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .messages
                .len(),
        )
    }

    pub(crate) async fn update(&self, envelope: &Envelope, clear: bool) {
        if let Some(store) = self.shared.as_ref().and_then(|b| b.retained_store()) {
            let r = if clear {
                store.clear(&envelope.topic).await
            } else {
                store.set(envelope).await
            };
            if let Err(meshgate_core::BackboneError::Rejected(why)) = &r {
                // The store's bounds (a full bucket): like the memory store's, not a failure.
                self.dropped.inc();
                tracing::debug!(topic = %envelope.topic.as_str(), "mqtt: retained message delivered, not retained: {why}");
            } else if let Err(e) = r {
                self.failed.inc();
                tracing::warn!(error = %e, topic = %envelope.topic.as_str(), "mqtt: retained message not stored");
            }
            return;
        }
        // Measured before the lock: encoding the JSON is the costly part.
        let size = if clear { 0 } else { cost(envelope) };
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        if clear {
            if let Some((_, old)) = store.messages.remove(envelope.topic.as_str()) {
                store.bytes -= old;
            }
            return;
        }
        let old = store.messages.get(envelope.topic.as_str()).map(|(_, n)| *n);
        let (is_new, replaced) = (old.is_none(), old.unwrap_or(0));
        if (is_new && store.messages.len() >= self.max_messages.load(Ordering::Relaxed))
            || store.bytes - replaced + size > self.max_bytes.load(Ordering::Relaxed)
        {
            // The topic's earlier message is no longer its last retained one: keeping it would
            // send new subscribers stale state ([MQTT-3.3.1-5] replaces it). It goes, and its
            // bytes are given back.
            if !is_new && let Some((_, old)) = store.messages.remove(envelope.topic.as_str()) {
                store.bytes -= old;
            }
            drop(store);
            self.dropped.inc();
            tracing::debug!(topic = %envelope.topic.as_str(), "mqtt: retained store full; message delivered, not retained (and the topic's earlier one removed)");
            return;
        }
        store.bytes = store.bytes - replaced + size;
        store.messages.insert(
            envelope.topic.shared_str(),
            (Arc::new(envelope.clone()), size),
        );
    }

    /// Removes `topic`'s retained message (admin API). `Ok(false)` when the memory store had
    /// none; the backbone's shared store does not tell, so `Ok(true)` there.
    pub(crate) async fn clear(
        &self,
        topic: &meshgate_core::Topic,
    ) -> Result<bool, meshgate_core::BackboneError> {
        if let Some(store) = self.shared.as_ref().and_then(|b| b.retained_store()) {
            store.clear(topic).await?;
            return Ok(true);
        }
        let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        match store.messages.remove(topic.as_str()) {
            Some((_, old)) => {
                store.bytes -= old;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Up to `limit` retained messages whose topic matches `filter`, together at most
    /// `max_bytes` (topic and event JSON each), and how many more match
    /// ([`meshgate_core::RetainedStore::matching`]).
    ///
    /// The memory store is searched from the filter's literal prefix only (a sorted map), and
    /// under its lock only cheap work is done (matching, cloning `Arc`s): the messages are
    /// sent after the lock is released. A filter starting with a wildcard still scans every
    /// topic — a topic index (issue 27, fleet scale) would make that proportional to the
    /// matches.
    pub(crate) async fn matching(
        &self,
        filter: &TopicFilter,
        limit: usize,
        max_bytes: usize,
    ) -> Matches {
        if let Some(store) = self.shared.as_ref().and_then(|b| b.retained_store()) {
            return match store.matching(filter, limit, max_bytes).await {
                Ok((v, beyond)) => Matches {
                    envelopes: v.into_iter().map(Arc::new).collect(),
                    beyond,
                },
                Err(e) => {
                    self.failed.inc();
                    tracing::warn!(error = %e, "mqtt: retained messages not read");
                    Matches::default()
                }
            };
        }
        let prefix = literal_prefix(filter);
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Matches::default();
        let mut bytes_left = max_bytes;
        let candidates = store
            .messages
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(t, _)| t.starts_with(prefix));
        for (envelope, _) in candidates.map(|(_, v)| v) {
            if !filter.matches(&envelope.topic) {
                continue;
            }
            // Encoded when it was stored: no work under the lock.
            let size = envelope.topic.as_str().len() + envelope.json().len();
            if out.envelopes.len() < limit && size <= bytes_left {
                bytes_left -= size;
                out.envelopes.push(envelope.clone());
            } else {
                // Nothing is read here (the map holds them): a smaller one later may still fit.
                out.beyond += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshgate_core::metrics::Registry;
    use meshgate_core::{Origin, Topic};

    fn store(max_messages: usize, max_bytes: usize) -> (Retained, Counter) {
        let registry = Registry::new();
        let backbone: Arc<dyn Backbone> = meshgate_backbone::memory::MemoryBackbone::new(
            meshgate_config::MemoryBackboneConfig {
                queue_capacity: 16,
                full_policy: meshgate_config::FullQueuePolicy::Drop,
                block_timeout: std::time::Duration::from_secs(1),
            },
            &registry,
        );
        let dropped = registry.counter("dropped", &[]);
        let failed = registry.counter("failed", &[]);
        (
            Retained::new(&backbone, max_messages, max_bytes, dropped.clone(), failed),
            dropped,
        )
    }

    fn envelope(topic: &str, size: usize) -> Envelope {
        let w = meshgate_core::wrap::Wrapper::new("/t", "t").unwrap();
        let event = w
            .wrap(bytes::Bytes::from(vec![b'a'; size]), None, None)
            .unwrap();
        let origin = Origin {
            instance: Arc::from("i"),
            connection: 1,
        };
        Envelope::new(Topic::from_mqtt(topic).unwrap(), Arc::new(event), origin)
    }

    #[tokio::test]
    async fn the_byte_count_follows_replacements_and_clears() {
        let one = cost(&envelope("t/1", 1000));
        // Room for three messages of this size.
        let (r, dropped) = store(100, 3 * one + one / 2);
        for t in ["t/1", "t/2", "t/3"] {
            r.update(&envelope(t, 1000), false).await;
        }
        r.update(&envelope("t/4", 1000), false).await;
        assert_eq!(dropped.get(), 1, "a fourth does not fit");
        // Replacing a kept topic's message with one of the same size fits.
        r.update(&envelope("t/1", 1000), false).await;
        assert_eq!(dropped.get(), 1);
        // Clearing gives the bytes back.
        r.update(&envelope("t/2", 0), true).await;
        r.update(&envelope("t/4", 1000), false).await;
        assert_eq!(dropped.get(), 1);
        let filter = TopicFilter::parse("t/#").unwrap();
        let all = r.matching(&filter, 10, usize::MAX).await;
        assert_eq!(all.envelopes.len(), 3);
        assert_eq!(r.store.lock().unwrap().bytes, 3 * one);
        // A limit returns that many and counts the rest.
        let two = r.matching(&filter, 2, usize::MAX).await;
        assert_eq!((two.envelopes.len(), two.beyond), (2, 1));
    }

    /// A retained message refused for a topic that has one removes the old one: a new
    /// subscriber must not get state that was replaced ([MQTT-3.3.1-5]).
    #[tokio::test]
    async fn a_refused_replacement_removes_the_stale_message() {
        let one = cost(&envelope("s/1", 1000));
        let (r, dropped) = store(2, 2 * one + one / 2);
        r.update(&envelope("s/1", 1000), false).await;
        r.update(&envelope("s/2", 1000), false).await;
        // Too big for the bytes left: refused, and s/1's old message goes with its bytes.
        r.update(&envelope("s/1", 3000), false).await;
        assert_eq!(dropped.get(), 1);
        let filter = TopicFilter::parse("s/#").unwrap();
        let left = r.matching(&filter, 10, usize::MAX).await;
        let topics: Vec<&str> = left.envelopes.iter().map(|e| e.topic.as_str()).collect();
        assert_eq!(topics, ["s/2"]);
        assert_eq!(r.store.lock().unwrap().bytes, one);
        // The bytes given back take a new topic.
        r.update(&envelope("s/3", 1000), false).await;
        assert_eq!(dropped.get(), 1);
        assert_eq!(r.matching(&filter, 10, usize::MAX).await.envelopes.len(), 2);
    }

    /// The byte budget of one SUBSCRIBE's retained messages: those that fit are returned, the
    /// others counted.
    #[tokio::test]
    async fn matching_is_bounded_in_bytes() {
        let (r, _) = store(100, usize::MAX);
        for i in 0..10 {
            r.update(&envelope(&format!("m/{i}"), 10_000), false).await;
        }
        r.update(&envelope("m/small", 10), false).await;
        let e = envelope("m/0", 10_000);
        let one = e.topic.as_str().len() + e.json().len();
        let filter = TopicFilter::parse("m/#").unwrap();
        let found = r.matching(&filter, 100, 3 * one + one / 2).await;
        // Three large ones, then the small one still fits.
        assert_eq!((found.envelopes.len(), found.beyond), (4, 7));
        assert_eq!(found.envelopes[3].topic.as_str(), "m/small");
    }

    #[tokio::test]
    async fn the_count_bound_refuses_new_topics_only() {
        let (r, dropped) = store(1, usize::MAX);
        r.update(&envelope("c/1", 10), false).await;
        r.update(&envelope("c/2", 10), false).await;
        r.update(&envelope("c/1", 20), false).await;
        assert_eq!(dropped.get(), 1);
    }

    #[test]
    fn literal_prefix_stops_at_the_first_wildcard() {
        let p = |f: &str| literal_prefix(&TopicFilter::parse(f).unwrap()).to_owned();
        assert_eq!(p("#"), "");
        assert_eq!(p("a/b/#"), "a/b");
        assert_eq!(p("a/+/c"), "a");
        assert_eq!(p("a/b"), "a/b");
        assert_eq!(p("+/b"), "");
        assert_eq!(p("/#"), "");
        assert_eq!(p("$SYS/#"), "$SYS");
    }

    /// The topics `filter` finds in a store holding `topics`, sorted.
    async fn found(topics: &[&str], filter: &str) -> Vec<String> {
        let (r, _) = store(100, usize::MAX);
        for t in topics {
            r.update(&envelope(t, 1), false).await;
        }
        let f = TopicFilter::parse(filter).unwrap();
        let mut v: Vec<String> = r
            .matching(&f, 100, usize::MAX)
            .await
            .envelopes
            .iter()
            .map(|e| e.topic.as_str().to_owned())
            .collect();
        v.sort();
        v
    }

    /// `a/#` matches the topic `a` itself (MQTT §4.7.1.2): the search from the filter's
    /// literal prefix must not start after it (`a` sorts before `a/`).
    #[tokio::test]
    async fn a_multi_level_wildcard_finds_its_parent_topic() {
        let topics = ["a", "a/b", "a/b/c", "ab", "a0", "b", "$SYS/x", "$SYS"];
        assert_eq!(found(&topics, "a/#").await, ["a", "a/b", "a/b/c"]);
        assert_eq!(found(&topics, "a/b/#").await, ["a/b", "a/b/c"]);
        // No wildcard: exactly the topic.
        assert_eq!(found(&topics, "a").await, ["a"]);
        assert_eq!(found(&topics, "a/b").await, ["a/b"]);
        // `#` alone matches every topic but those starting with `$` (MQTT §4.7.2).
        assert_eq!(
            found(&topics, "#").await,
            ["a", "a/b", "a/b/c", "a0", "ab", "b"]
        );
        // A `$` topic is found by a filter naming it.
        assert_eq!(found(&topics, "$SYS/#").await, ["$SYS", "$SYS/x"]);
        assert_eq!(found(&topics, "a/+").await, ["a/b"]);
        assert_eq!(found(&topics, "+").await, ["a", "a0", "ab", "b"]);
    }
}
