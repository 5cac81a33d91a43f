//! Retained messages: the last retained PUBLISH per topic, sent to new subscribers with the
//! RETAIN flag. Kept in memory by this gateway instance (the JetStream backbone will keep them
//! in a KV bucket, issue 4). Bounded: past [`MAX_RETAINED`] topics new ones are refused and
//! counted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use meshgate_core::metrics::Counter;
use meshgate_core::{Envelope, Topic, TopicFilter};

/// Most topics with a retained message.
pub const MAX_RETAINED: usize = 100_000;

#[derive(Debug)]
pub(crate) struct Retained {
    messages: Mutex<BTreeMap<Topic, Arc<Envelope>>>,
    dropped: Counter,
}

impl Retained {
    pub(crate) fn new(dropped: Counter) -> Self {
        Retained {
            messages: Mutex::new(BTreeMap::new()),
            dropped,
        }
    }

    /// Stores `envelope` as the topic's retained message, or clears it (an empty payload).
    pub(crate) fn update(&self, envelope: &Envelope, clear: bool) {
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
    pub(crate) fn matching(&self, filter: &TopicFilter) -> Vec<Arc<Envelope>> {
        let map = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .filter(|(t, _)| filter.matches(t))
            .map(|(_, e)| e.clone())
            .collect()
    }
}
