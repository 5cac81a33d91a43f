//! Triggers on the memory backbone: one backbone subscription (`#`) for all of them, and an
//! index of their filters by the event `type` they require ([`Filter::type_condition`]), so
//! that an event costs a hash lookup per trigger that may take it, not a filter evaluation per
//! trigger (10,000 triggers with `exact` type filters that do not match cost what one does).
//!
//! Only where the backbone is this process (memory): there is no other instance to share a
//! trigger's events with, so one subscription can serve every trigger. On NATS and JetStream
//! each trigger keeps its own queue group (each event to one instance per trigger), see
//! `runner.rs`. Triggers on `$` topics also keep their own subscription (`#` does not match
//! them).
//!
//! [`Filter::type_condition`]: meshgate_core::filter::Filter::type_condition

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use meshgate_core::filter::TypeCondition;
use meshgate_core::{Backbone, BackboneError, SubscribeOptions, TopicFilter};
use tokio_util::sync::CancellationToken;

use crate::runner::Trigger;

/// Triggers by the type their filter requires.
#[derive(Debug, Default)]
pub(crate) struct Index {
    exact: HashMap<String, Vec<Arc<Trigger>>>,
    prefix: HashMap<String, Vec<Arc<Trigger>>>,
    /// The longest key of `prefix`, in bytes: longer prefixes of a type are not looked up.
    longest_prefix: usize,
    /// Triggers without a type condition: each one's filter is evaluated.
    rest: Vec<Arc<Trigger>>,
}

impl Index {
    pub(crate) fn build<'a>(triggers: impl Iterator<Item = &'a Arc<Trigger>>) -> Index {
        let mut index = Index::default();
        for t in triggers {
            match t.config.filter.as_deref().and_then(|f| f.type_condition()) {
                Some(TypeCondition::Exact(ty)) => {
                    index
                        .exact
                        .entry(ty.to_owned())
                        .or_default()
                        .push(t.clone());
                }
                Some(TypeCondition::Prefix(p)) => {
                    index.longest_prefix = index.longest_prefix.max(p.len());
                    index
                        .prefix
                        .entry(p.to_owned())
                        .or_default()
                        .push(t.clone());
                }
                None => index.rest.push(t.clone()),
            }
        }
        index
    }

    /// Calls `f` with every trigger that may take an event of type `ty` (the filter of each
    /// still decides).
    pub(crate) fn candidates(&self, ty: &str, mut f: impl FnMut(&Arc<Trigger>)) {
        if let Some(list) = self.exact.get(ty) {
            list.iter().for_each(&mut f);
        }
        if !self.prefix.is_empty() {
            let end = ty.len().min(self.longest_prefix);
            for (i, _) in ty.char_indices().skip(1).chain([(ty.len(), ' ')]) {
                if i > end {
                    break;
                }
                if let Some(list) = self.prefix.get(&ty[..i]) {
                    list.iter().for_each(&mut f);
                }
            }
        }
        self.rest.iter().for_each(f);
    }
}

/// The memory backbone's shared subscription and the index it dispatches through.
#[derive(Debug, Default)]
pub(crate) struct Dispatcher {
    index: RwLock<Arc<Index>>,
    /// Set once the subscription is made (the first trigger starts it).
    started: Mutex<Option<CancellationToken>>,
}

impl Dispatcher {
    /// Whether a trigger on `topic` is served here on `backbone`.
    pub(crate) fn serves(backbone: &dyn Backbone, topic: &TopicFilter) -> bool {
        !backbone.spans_instances() && !topic.as_str().starts_with('$')
    }

    pub(crate) fn set_index(&self, index: Index) {
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(index);
    }

    fn index(&self) -> Arc<Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes the shared subscription if there is none yet; returns once it exists.
    pub(crate) async fn ensure_started(
        self: &Arc<Self>,
        backbone: &Arc<dyn Backbone>,
    ) -> Result<(), BackboneError> {
        if self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let filter = TopicFilter::parse("#").map_err(|e| BackboneError::Rejected(e.to_string()))?;
        let mut subscription = backbone
            .subscribe(filter, SubscribeOptions::default())
            .await?;
        let stop = CancellationToken::new();
        {
            let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
            if started.is_some() {
                // Another trigger started it meanwhile: this subscription is not needed.
                return Ok(());
            }
            *started = Some(stop.clone());
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    () = stop.cancelled() => return,
                    d = subscription.next() => d,
                };
                let Some(delivery) = delivery else { return };
                let envelope = &delivery.envelope;
                this.index().candidates(envelope.event.ty(), |t| {
                    if t.config.topic.matches(&envelope.topic) {
                        t.offer(envelope.clone());
                    }
                });
            }
        });
        Ok(())
    }

    pub(crate) fn stop(&self) {
        if let Some(stop) = self
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use meshgate_core::backbone::Origin;
    use meshgate_core::metrics::Registry;
    use serde_json::json;

    fn trigger(name: &str, filters: serde_json::Value) -> Arc<Trigger> {
        let registry = Registry::new();
        let backbone: Arc<dyn Backbone> = meshgate_backbone::memory::MemoryBackbone::new(
            meshgate_backbone::testkit::memory_config(),
            &registry,
        );
        let config = meshgate_config::parse_trigger(
            Some(name),
            &json!({"filters": filters, "subscriber": {"uri": "http://127.0.0.1:9/"}}),
        )
        .unwrap();
        let origin = Origin {
            instance: "i".into(),
            connection: 1,
        };
        Trigger::new(config, backbone, origin, &registry).unwrap()
    }

    fn picked(index: &Index, ty: &str) -> Vec<String> {
        let mut names = Vec::new();
        index.candidates(ty, |t| names.push(t.config.name.clone()));
        names.sort();
        names
    }

    #[test]
    fn the_index_picks_by_exact_type_by_prefix_and_always_the_rest() {
        let all = [
            trigger("exact", json!([{"exact": {"type": "com.a.created"}}])),
            trigger(
                "exact2",
                json!([{"exact": {"type": "com.a.created"}}, {"cesql": "true"}]),
            ),
            trigger("other", json!([{"exact": {"type": "com.b"}}])),
            trigger("prefix", json!([{"prefix": {"type": "com.a."}}])),
            trigger("short", json!([{"prefix": {"type": "c"}}])),
            trigger("rest", json!([{"exact": {"source": "/s"}}])),
            trigger("accent", json!([{"prefix": {"type": "é"}}])),
        ];
        let index = Index::build(all.iter());
        assert_eq!(
            picked(&index, "com.a.created"),
            ["exact", "exact2", "prefix", "rest", "short"]
        );
        assert_eq!(picked(&index, "com.a."), ["prefix", "rest", "short"]);
        assert_eq!(picked(&index, "com.a"), ["rest", "short"]);
        assert_eq!(picked(&index, "x"), ["rest"]);
        assert_eq!(picked(&index, ""), ["rest"]);
        assert_eq!(picked(&index, "éa"), ["accent", "rest"]);
    }
}
