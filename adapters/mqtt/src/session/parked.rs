//! Persistent sessions while their client is away (MQTT 3.1.1 clean session 0, MQTT 5 Session
//! Expiry Interval > 0).
//!
//! A parked session is owned by one task that keeps its backbone subscriptions drained into
//! the session's queue (QoS 1/2, up to `mqtt.max_queued`, the rest counted as dropped), so an
//! absent client never blocks publishers. The task ends when the client comes back (the
//! session is handed to the new connection), when a clean start discards it, or when it
//! expires; a delayed will (MQTT 5 Will Delay Interval) is published by this task unless the
//! client returns first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use meshgate_core::metrics::Gauge;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Session;
use super::outbound::next_queued;

/// What the owner of a parked session is told to do.
enum Command {
    /// Hand the session to the reconnecting client.
    Resume(oneshot::Sender<Session>),
    /// End it (a clean start took the client id): its will is published now.
    End,
}

struct Entry {
    /// The session's principal: only it may resume or end the session (see
    /// [`Parked::held_by`]).
    principal: meshgate_core::Principal,
    generation: u64,
    control: oneshot::Sender<Command>,
    /// What the admin API shows.
    parked_at_ms: u64,
    expires_at_ms: Option<u64>,
    subscriptions: usize,
}

/// A parked session as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct ParkedInfo {
    pub(crate) client_id: String,
    pub(crate) user: String,
    /// Unix time in milliseconds when its client left.
    pub(crate) parked_at_ms: u64,
    /// Unix time in milliseconds when it ends unless its client comes back; `None`: never
    /// (MQTT 5 Session Expiry Interval 0xFFFFFFFF).
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) subscriptions: usize,
}

/// The disconnected persistent sessions of one listener, by client id.
pub(crate) struct Parked {
    sessions: Mutex<HashMap<String, Entry>>,
    generation: AtomicU64,
    /// `mqtt.max_offline_sessions`; a reload may move it ([`Parked::set_limit`]): lowered,
    /// the parked sessions stay and no more park until they are under it.
    limit: AtomicUsize,
    /// How many are parked (the `meshgate_mqtt_sessions_offline` gauge).
    gauge: Gauge,
}

impl Parked {
    pub(crate) fn new(limit: usize, gauge: Gauge) -> Self {
        Parked {
            sessions: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            limit: AtomicUsize::new(limit),
            gauge,
        }
    }

    /// Moves `mqtt.max_offline_sessions` (a reload).
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// How many sessions are parked.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `session` until its client returns or it expires. Gives it back when the limit of
    /// parked sessions is reached (the caller ends it).
    pub(super) fn park(&self, session: Session) -> Result<(), Box<Session>> {
        let (control, commands) = oneshot::channel();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        {
            let mut map = self.lock();
            if map.len() >= self.limit.load(Ordering::Relaxed)
                && !map.contains_key(&session.client_id)
            {
                return Err(Box::new(session));
            }
            // A session parked under the same id cannot exist (the connection that parks owns
            // the id), but if it did, dropping its control ends it.
            let now = meshgate_core::backbone::now_ms();
            let expiry =
                (session.expiry().as_secs() < u64::from(u32::MAX)).then_some(session.expiry_ms);
            map.insert(
                session.client_id.clone(),
                Entry {
                    principal: session.principal.clone(),
                    generation,
                    control,
                    parked_at_ms: now,
                    expires_at_ms: expiry.map(|e| now.saturating_add(e)),
                    subscriptions: session.subscriptions.len(),
                },
            );
        }
        self.gauge.inc();
        // The connection's registry entry is gone; its copy of the filters need not stay.
        session.live.set_subscriptions([]);
        let tracker = session.shared.ctx.tracker.clone();
        tracker.spawn(hold(session, commands, generation));
        Ok(())
    }

    /// Whether `principal` may take the client id `client_id` as far as parked sessions go:
    /// none is parked under it, or the one parked is `principal`'s. (Anonymous clients all
    /// share one principal, so they share client ids as before.)
    pub(crate) fn held_by(&self, client_id: &str, principal: &meshgate_core::Principal) -> bool {
        self.lock()
            .get(client_id)
            .is_none_or(|e| e.principal == *principal)
    }

    /// Up to `limit` parked sessions whose client id sorts after `after`, in client id order,
    /// and whether there are more.
    pub(crate) fn list(&self, after: &str, limit: usize) -> (Vec<ParkedInfo>, bool) {
        // Only the ids are taken under the lock (a scan, no sort): parking and resuming
        // (CONNECT) wait on it.
        let mut ids: Vec<String> = self
            .lock()
            .keys()
            .filter(|id| id.as_str() > after)
            .cloned()
            .collect();
        let more = ids.len() > limit;
        if more {
            ids.select_nth_unstable(limit);
            ids.truncate(limit);
        }
        ids.sort_unstable();
        let map = self.lock();
        let page = ids
            .into_iter()
            .filter_map(|id| {
                let e = map.get(&id)?;
                Some(ParkedInfo {
                    client_id: id,
                    user: e.principal.name().to_owned(),
                    parked_at_ms: e.parked_at_ms,
                    expires_at_ms: e.expires_at_ms,
                    subscriptions: e.subscriptions,
                })
            })
            .collect();
        (page, more)
    }

    /// The parked session of `client_id`, handed over (`resume`) or ended.
    pub(super) async fn take(&self, client_id: &str, resume: bool) -> Option<Session> {
        let entry = self.lock().remove(client_id)?;
        if !resume {
            let _ = entry.control.send(Command::End);
            return None;
        }
        let (tx, rx) = oneshot::channel();
        entry.control.send(Command::Resume(tx)).ok()?;
        // Err: the session expired at this very moment.
        rx.await.ok()
    }

    /// Removes the entry of a session that ended by itself (expired), unless a newer session
    /// took its place.
    fn forget(&self, client_id: &str, generation: u64) {
        let mut map = self.lock();
        if map
            .get(client_id)
            .is_some_and(|e| e.generation == generation)
        {
            map.remove(client_id);
        }
    }
}

/// Owns a parked session until it resumes, ends or expires.
async fn hold(mut session: Session, mut commands: oneshot::Receiver<Command>, generation: u64) {
    let shared = session.shared.clone();
    let expires = Instant::now() + session.expiry();
    let will_at = session.will.delay.map(|d| Instant::now() + d);
    loop {
        tokio::select! {
            biased;
            _ = shared.ctx.shutdown.cancelled() => break,
            command = &mut commands => {
                match command {
                    Ok(Command::Resume(to)) => {
                        shared.parked.gauge.dec();
                        // If the new connection is gone already, the session goes with it.
                        let _ = to.send(session);
                        return;
                    }
                    Ok(Command::End) | Err(_) => {
                        Box::pin(session.publish_will()).await;
                        break;
                    }
                }
            }
            _ = tokio::time::sleep_until(expires) => {
                // The session ends: a will still waiting for its delay goes now (MQTT 5 §3.1.3.2.2).
                Box::pin(session.end_stored()).await;
                Box::pin(session.publish_will()).await;
                shared.parked.forget(&session.client_id, generation);
                break;
            }
            _ = tokio::time::sleep_until(will_at.unwrap_or(expires)), if will_at.is_some() && session.will.is_set() => {
                Box::pin(session.publish_will()).await;
            }
            Some(q) = next_queued(&mut session.streams) => {
                session.queue_offline(q);
                session.settle().await;
            }
        }
    }
    shared.parked.gauge.dec();
    tracing::debug!(client_id = session.client_id, "mqtt: session ended");
}
