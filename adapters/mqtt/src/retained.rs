//! Retained messages: the last retained PUBLISH per topic, sent to new subscribers with the
//! RETAIN flag. Kept by the backbone when it shares them between instances (JetStream: a KV
//! bucket), otherwise in this gateway's memory. The memory store is bounded: past
//! [`MAX_RETAINED`] topics new ones are refused and counted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use meshgate_core::metrics::Counter;
use meshgate_core::{Backbone, Envelope, TopicFilter};

/// Most topics with a retained message (memory store).
pub const MAX_RETAINED: usize = 100_000;

pub(crate) struct Retained {
    messages: Mutex<BTreeMap<meshgate_core::Topic, Arc<Envelope>>>,
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

impl Retained {
    pub(crate) fn new(backbone: &Arc<dyn Backbone>, dropped: Counter, failed: Counter) -> Self {
        Retained {
            messages: Mutex::new(BTreeMap::new()),
            dropped,
            failed,
            shared: backbone
                .retained_store()
                .is_some()
                .then(|| backbone.clone()),
        }
    }

    /// Stores `envelope` as the topic's retained message, or clears it (an empty payload).
    pub(crate) async fn update(&self, envelope: &Envelope, clear: bool) {
        if let Some(store) = self.shared.as_ref().and_then(|b| b.retained_store()) {
            let r = if clear {
                store.clear(&envelope.topic).await
            } else {
                store.set(envelope).await
            };
            if let Err(e) = r {
                self.failed.inc();
                tracing::warn!(error = %e, topic = %envelope.topic.as_str(), "mqtt: retained message not stored");
            }
            return;
        }
        let mut map = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        if clear {
            map.remove(&envelope.topic);
            return;
        }
        if map.len() >= MAX_RETAINED && !map.contains_key(&envelope.topic) {
            self.dropped.inc();
            return;
        }
        map.insert(envelope.topic.clone(), Arc::new(envelope.clone()));
    }

    /// The retained messages whose topic matches `filter`.
    pub(crate) async fn matching(&self, filter: &TopicFilter) -> Vec<Arc<Envelope>> {
        if let Some(store) = self.shared.as_ref().and_then(|b| b.retained_store()) {
            return match store.matching(filter).await {
                Ok(v) => v.into_iter().map(Arc::new).collect(),
                Err(e) => {
                    self.failed.inc();
                    tracing::warn!(error = %e, "mqtt: retained messages not read");
                    Vec::new()
                }
            };
        }
        let map = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter(|(t, _)| filter.matches(t))
            .map(|(_, e)| e.clone())
            .collect()
    }
}
