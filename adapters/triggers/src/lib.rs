//! meshgate-triggers: events of the mesh pushed to HTTP services, filtered on their
//! CloudEvents attributes (Knative's dialects and CESQL), with Knative's delivery contract:
//! retries with linear or exponential backoff, `Retry-After`, a dead-letter sink with the
//! `knativeerror*` extensions, and replies published back into the mesh.
//!
//! [`Triggers`] holds the running set: from `[[triggers]]` at start, and from the admin API
//! (`PUT`/`DELETE /triggers/{name}`) while running; a change takes effect at once. Each trigger
//! is a backbone queue group named after it, so with several gateway instances on NATS or
//! JetStream each event goes to one of them. See `runner.rs` for how events wait and how they
//! are acknowledged.

mod dead_letter;
mod dispatch;
pub mod policy;
mod runner;
pub mod sender;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use meshgate_config::TriggerConfig;
use meshgate_core::Backbone;
use meshgate_core::backbone::Origin;
use meshgate_core::metrics::Registry;

use crate::dispatch::{Dispatcher, Index};
use crate::runner::Trigger;

/// The origin of what trigger `name` publishes (replies, dead letters to a topic): the same on
/// every instance, so that the trigger skips its own replies wherever they come back, and
/// other triggers (a dead-letter handler, a chain on a reply topic) take them.
fn origin_of(name: &str) -> Origin {
    // The same everywhere; spreads triggers over JetStream's publishers.
    let connection = meshgate_core::stable_hash::fnv1a(name.as_bytes());
    Origin {
        instance: Arc::from(format!("trigger:{name}")),
        connection,
    }
}

/// How long starting or replacing a trigger waits for its backbone subscription.
pub const SUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a trigger was not applied.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// The trigger's subscriber client cannot be set up (its CA file).
    #[error("trigger `{name}`: {source}")]
    Client {
        name: String,
        #[source]
        source: sender::ClientError,
    },
    /// The backbone's trigger store did not take the change.
    #[error("trigger `{name}` not stored: {source}; retry later")]
    Store {
        name: String,
        #[source]
        source: meshgate_core::BackboneError,
    },
    /// The backbone refused the trigger's subscription.
    #[error("trigger `{name}` cannot subscribe: {source}")]
    Subscribe {
        name: String,
        #[source]
        source: meshgate_core::BackboneError,
    },
    /// Defined in the config file: the file is its source of truth.
    #[error("trigger `{0}` is defined in the config file ([[triggers]]); change it there")]
    FromConfig(String),
}

/// What a [`Triggers::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Replaced,
    /// The same document was already running.
    Unchanged,
}

/// The running triggers of this instance.
#[derive(Debug, Clone)]
pub struct Triggers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backbone: Arc<dyn Backbone>,
    registry: Registry,
    running: Mutex<BTreeMap<String, Arc<Trigger>>>,
    /// The names of the config file's triggers (changed by a reload).
    from_config: Mutex<BTreeSet<String>>,
    /// Ends the watch of the backbone's trigger store.
    stop: tokio_util::sync::CancellationToken,
    /// The memory backbone's one subscription for every trigger (`dispatch.rs`).
    dispatcher: Arc<Dispatcher>,
    /// Replaced and deleted triggers whose deliveries may not have ended yet.
    retired: Mutex<Vec<Arc<Trigger>>>,
    /// One [`Triggers::apply`] at a time: a `put` and this instance's own store watch apply
    /// the same document at once; without it both start the trigger and the second replaces
    /// the first, whose already-pulled JetStream messages then wait out `ack_wait`.
    applying: tokio::sync::Mutex<()>,
}

impl Triggers {
    /// Starts the triggers of the config file, and returns once each is subscribed (or after
    /// [`SUBSCRIBE_WAIT`]).
    pub async fn start(
        backbone: Arc<dyn Backbone>,
        registry: Registry,
        configs: &[TriggerConfig],
    ) -> Result<Triggers, TriggerError> {
        let triggers = Triggers {
            inner: Arc::new(Inner {
                backbone,
                registry,
                running: Mutex::default(),
                from_config: Mutex::new(configs.iter().map(|c| c.name.clone()).collect()),
                stop: tokio_util::sync::CancellationToken::new(),
                dispatcher: Arc::default(),
                retired: Mutex::default(),
                applying: tokio::sync::Mutex::new(()),
            }),
        };
        for c in configs {
            triggers.apply_indexed(c.clone(), false).await?;
        }
        triggers.reindex();
        if triggers.inner.backbone.trigger_store().is_some() {
            tokio::spawn(triggers.clone().follow_store());
        }
        Ok(triggers)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Trigger>>> {
        self.inner.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuilds the dispatcher's index from the running triggers it serves.
    fn reindex(&self) {
        let backbone = self.inner.backbone.as_ref();
        let index = {
            let running = self.running();
            Index::build(
                running
                    .values()
                    .filter(|t| Dispatcher::serves(backbone, &t.config.topic)),
            )
        };
        self.inner.dispatcher.set_index(index);
    }

    /// Stops a trigger that was taken out of `running`.
    fn stop(&self, old: Arc<Trigger>) {
        old.reading.cancel();
        old.abandon.cancel();
        old.tasks.close();
        self.reindex();
        self.retire(old);
    }

    /// Keeps a stopped trigger until its deliveries have ended, for shutdown to wait for.
    fn retire(&self, old: Arc<Trigger>) {
        let mut retired = self.inner.retired.lock().unwrap_or_else(|e| e.into_inner());
        retired.retain(|t| !t.tasks.is_empty());
        retired.push(old);
    }

    /// Every running trigger, by name.
    pub fn list(&self) -> Vec<TriggerConfig> {
        self.running().values().map(|t| t.config.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<TriggerConfig> {
        self.running().get(name).map(|t| t.config.clone())
    }

    /// Whether `name` comes from the config file (the admin API may not change it).
    pub fn is_from_config(&self, name: &str) -> bool {
        self.file_names().contains(name)
    }

    fn file_names(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.inner
            .from_config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A reloaded config file's `[[triggers]]`: new ones start, changed ones are replaced (what
    /// the old one held goes to the new one, as with `put`), ones no longer in the file stop.
    /// A config trigger takes the place of an admin-API trigger of the same name. Every new
    /// or changed trigger's HTTP client is made first, so a bad `caFile` changes nothing.
    /// Returns the names started, replaced and stopped.
    pub async fn reload_config(
        &self,
        configs: &[TriggerConfig],
    ) -> Result<Vec<String>, TriggerError> {
        let changed: Vec<&TriggerConfig> = configs
            .iter()
            .filter(|c| self.get(&c.name).as_ref() != Some(*c) || !self.is_from_config(&c.name))
            .collect();
        for c in &changed {
            sender::client(c.subscriber.ca_file.as_deref()).map_err(|source| {
                TriggerError::Client {
                    name: c.name.clone(),
                    source,
                }
            })?;
        }
        let names: BTreeSet<String> = configs.iter().map(|c| c.name.clone()).collect();
        let gone: Vec<String> = self
            .file_names()
            .iter()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        *self.file_names() = names;
        let mut done = Vec::new();
        for name in gone {
            let old = self.running().remove(&name);
            if let Some(old) = old {
                self.stop(old);
                tracing::info!(trigger = %name, "trigger stopped: no longer in the config file");
            }
            done.push(name);
        }
        for c in changed {
            if self.apply(c.clone()).await? != Applied::Unchanged {
                tracing::info!(trigger = %c.name, "trigger started from the reloaded config file");
            }
            done.push(c.name.clone());
        }
        Ok(done)
    }

    /// Starts `config`, or replaces the running trigger of that name: the old one stops at
    /// once, and what it held (queued, or between attempts) goes to the new one.
    /// Returns once the new trigger is subscribed (or after [`SUBSCRIBE_WAIT`]). On a backbone
    /// with a trigger store (JetStream) it is stored first, and every instance runs it.
    pub async fn put(&self, config: TriggerConfig) -> Result<Applied, TriggerError> {
        if self.is_from_config(&config.name) {
            return Err(TriggerError::FromConfig(config.name));
        }
        // Judged before storing: the store's watcher may start it here before `apply` below.
        let applied = match self.get(&config.name) {
            None => Applied::Created,
            Some(old) if old == config => Applied::Unchanged,
            Some(_) => Applied::Replaced,
        };
        // What can fail here fails before the document is stored for every instance.
        sender::client(config.subscriber.ca_file.as_deref()).map_err(|source| {
            TriggerError::Client {
                name: config.name.clone(),
                source,
            }
        })?;
        if let Some(store) = self.inner.backbone.trigger_store() {
            store
                .put(&config.name, config.document.to_string().into_bytes())
                .await
                .map_err(|source| TriggerError::Store {
                    name: config.name.clone(),
                    source,
                })?;
        }
        self.apply(config).await?;
        Ok(applied)
    }

    /// Runs what the backbone's trigger store holds, and every change to it, until shutdown:
    /// how a trigger made through one instance's admin API runs on every instance.
    async fn follow_store(self) {
        let mut pause = meshgate_core::backoff::Backoff::new(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(5),
        );
        loop {
            let Some(store) = self.inner.backbone.trigger_store() else {
                return;
            };
            let watched = tokio::select! {
                () = self.inner.stop.cancelled() => return,
                w = store.watch() => w,
            };
            match watched {
                Ok(mut changes) => loop {
                    let change = tokio::select! {
                        () = self.inner.stop.cancelled() => return,
                        c = futures_util::StreamExt::next(&mut changes) => c,
                    };
                    let Some((name, document)) = change else {
                        break;
                    };
                    pause.reset();
                    self.stored_change(&name, document).await;
                },
                Err(e) => {
                    tracing::debug!(error = %e, "cannot watch the stored triggers; trying again")
                }
            }
            tokio::select! {
                () = self.inner.stop.cancelled() => return,
                () = tokio::time::sleep(pause.next_pause()) => {}
            }
        }
    }

    async fn stored_change(&self, name: &str, document: Option<Vec<u8>>) {
        if self.is_from_config(name) {
            tracing::warn!(trigger = %name, "a stored trigger has the name of a config-file trigger; the config file's is kept");
            return;
        }
        let Some(document) = document else {
            let old = self.running().remove(name);
            if let Some(old) = old {
                self.stop(old);
                tracing::info!(trigger = %name, "trigger deleted (stored by another instance)");
            }
            return;
        };
        let parsed = serde_json::from_slice(&document)
            .map_err(|e| vec![(String::new(), e.to_string())])
            .and_then(|doc| meshgate_config::parse_trigger(Some(name), &doc));
        match parsed {
            Ok(config) => {
                if let Err(e) = self.apply(config).await {
                    tracing::warn!(trigger = %name, error = %e, "stored trigger not started");
                }
            }
            Err(problems) => {
                tracing::warn!(trigger = %name, ?problems, "stored trigger is not valid; ignored");
            }
        }
    }

    async fn apply(&self, config: TriggerConfig) -> Result<Applied, TriggerError> {
        self.apply_indexed(config, true).await
    }

    /// [`Triggers::apply`]; `reindex`: false while the config file's triggers start (indexed
    /// once after the last: one rebuild per trigger made starting 10,000 quadratic).
    async fn apply_indexed(
        &self,
        config: TriggerConfig,
        reindex: bool,
    ) -> Result<Applied, TriggerError> {
        let _one_at_a_time = self.inner.applying.lock().await;
        let name = config.name.clone();
        if self
            .running()
            .get(&name)
            .is_some_and(|t| t.config == config)
        {
            return Ok(Applied::Unchanged);
        }
        let origin = origin_of(&name);
        let trigger = Trigger::new(
            config,
            self.inner.backbone.clone(),
            origin,
            &self.inner.registry,
        )
        .map_err(|source| TriggerError::Client {
            name: name.clone(),
            source,
        })?;
        let backbone = &self.inner.backbone;
        if Dispatcher::serves(backbone.as_ref(), &trigger.config.topic) {
            self.inner
                .dispatcher
                .ensure_started(backbone)
                .await
                .map_err(|source| TriggerError::Subscribe {
                    name: name.clone(),
                    source,
                })?;
        } else {
            tokio::spawn(trigger.clone().run());
            // Events published before the subscription exists would pass it by (a JetStream
            // consumer starts with new events): the caller hears back once it is there.
            let mut subscribed = trigger.subscribed.subscribe();
            if tokio::time::timeout(SUBSCRIBE_WAIT, subscribed.wait_for(|s| *s))
                .await
                .is_err()
            {
                tracing::warn!(trigger = %name, "trigger not subscribed yet; it keeps trying");
            }
        }
        let old = self.running().insert(name.clone(), trigger.clone());
        if reindex {
            self.reindex();
        }
        match old {
            Some(old) => {
                // The old one stops at once, also mid-retry (a fix of a broken URL or a revoked
                // credential must not wait for its retries); what it held goes to the new one.
                *old.successor.lock().unwrap_or_else(|e| e.into_inner()) = Some(trigger.clone());
                old.reading.cancel();
                old.abandon.cancel();
                old.tasks.close();
                self.retire(old);
                tracing::info!(trigger = %name, "trigger replaced");
                Ok(Applied::Replaced)
            }
            None => {
                tracing::info!(trigger = %name, "trigger started");
                Ok(Applied::Created)
            }
        }
    }

    /// Stops a trigger: no new events, and deliveries under way end (JetStream gives them back
    /// to be delivered again if a trigger of that name returns). `Ok(false)`: there is none.
    pub async fn delete(&self, name: &str) -> Result<bool, TriggerError> {
        if self.is_from_config(name) {
            return Err(TriggerError::FromConfig(name.to_owned()));
        }
        let store = self.inner.backbone.trigger_store();
        // Judged before the store's delete: its watcher may stop it here before we do below.
        let existed = self.running().contains_key(name);
        if store.is_none() && !existed {
            return Ok(false);
        }
        // Deleted from the store even when it does not run here (a stored trigger another
        // instance could start but this one could not, e.g. for its caFile).
        if let Some(store) = store {
            store
                .delete(name)
                .await
                .map_err(|source| TriggerError::Store {
                    name: name.to_owned(),
                    source,
                })?;
        }
        let old = self.running().remove(name);
        let Some(old) = old else {
            return Ok(existed);
        };
        self.stop(old);
        tracing::info!(trigger = %name, "trigger deleted");
        Ok(true)
    }

    /// Stops taking events; deliveries under way may finish until `deadline`, then they are
    /// abandoned (JetStream delivers them again, to this or another instance). Returns whether
    /// every delivery finished in time.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) -> bool {
        self.inner.stop.cancel();
        self.inner.dispatcher.stop();
        let mut all: Vec<Arc<Trigger>> = self.running().values().cloned().collect();
        all.extend(
            self.inner
                .retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..),
        );
        for t in &all {
            t.reading.cancel();
            t.tasks.close();
        }
        let mut clean = true;
        for t in &all {
            if tokio::time::timeout_at(deadline, t.tasks.wait())
                .await
                .is_err()
            {
                clean = false;
                t.abandon.cancel();
            }
        }
        if !clean {
            // Abandoning is quick (a nack each); give it a moment to be sent.
            for t in &all {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), t.tasks.wait()).await;
            }
        }
        clean
    }
}
