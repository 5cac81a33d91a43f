//! Persistent sessions kept by the backbone ([`meshgate_core::SessionStore`], JetStream), so a
//! device can reconnect to any gateway instance and find its session.
//!
//! What lives where: the session record (principal, subscriptions with their options, QoS 2
//! packet ids still in a handshake, where the session is held and since when the client is
//! away) in the store; the messages queued for the session in the durable backbone
//! subscriptions its ordinary subscriptions become. One instance holds a session at a time —
//! the one its client is connected to, or the one it left, which keeps a parked placeholder for
//! the expiry and the delayed will. Another instance takes a session only after asking the
//! holder to let go ([`meshgate_core::SessionStore::release`]): the holder closes the
//! connection (session taken over), gives back the deliveries the client had not acknowledged
//! (so they are redelivered at once), saves the record and drops its placeholder.

use meshgate_core::backbone::now_ms;
use meshgate_core::metrics::ErrorKind;
use meshgate_core::{BackboneError, Durable, Principal, SessionStore, TopicFilter};

use super::connect::TAKEOVER_WAIT;
use super::subscribe::{SubOptions, Subscription, shared_filter};
use super::{Session, to_qos};
use crate::Shared;
use crate::admin::DeleteError;

/// A session as the store keeps it (JSON).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Record {
    principal: String,
    /// Whether `principal` is the anonymous principal (a configured user may be named
    /// `anonymous` too). Absent in records written before it existed: then the name decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    anonymous: Option<bool>,
    /// The instance holding the session.
    owner: String,
    /// When the client left (milliseconds since the Unix epoch); `None` while connected.
    left_at_ms: Option<u64>,
    expiry_secs: u64,
    subscriptions: Vec<StoredSubscription>,
    /// QoS 2 packet ids received from the client, PUBREL not yet.
    incoming_qos2: Vec<u16>,
    /// QoS 2 packet ids sent to the client and released (PUBREL sent), PUBCOMP not yet.
    released: Vec<u16>,
    next_pkid: u16,
    /// The origin of the session's publishes, kept wherever it moves so that no-local
    /// recognises what the client published through an earlier instance.
    origin: (String, u64),
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StoredSubscription {
    key: String,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    id: Option<usize>,
}

/// The durable subscription name of one of a session's filters, the same on every instance
/// (base64url: client ids and filters may hold characters a JetStream consumer name may not,
/// and names with `#` or `%` were accepted but never delivered to — seen in the test).
fn durable_name(client_id: &str, key: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let id = b64.encode(client_id);
    // The length makes the split unambiguous (`_` is in the base64url alphabet).
    format!("mqtt_{}_{id}_{}", id.len(), b64.encode(key))
}

/// The stored record and its revision; `Err` when the store cannot be read (then nothing may
/// be decided about the session). An unreadable record is removed.
async fn load(
    store: &dyn SessionStore,
    shared: &Shared,
    client_id: &str,
) -> Result<Option<(Record, u64)>, ()> {
    match store.load(client_id).await {
        Ok(Some((bytes, revision))) => match serde_json::from_slice(&bytes) {
            Ok(r) => Ok(Some((r, revision))),
            Err(e) => {
                tracing::warn!(client_id, error = %e, "mqtt: unreadable stored session; removed");
                let _ = store.remove(client_id, revision).await;
                Ok(None)
            }
        },
        Ok(None) => Ok(None),
        Err(e) => {
            shared.metrics.error(ErrorKind::SessionStore);
            tracing::warn!(client_id, error = %e, "mqtt: cannot read the stored session");
            Err(())
        }
    }
}

/// Deletes a stored session (its durable subscriptions, then its record) if the record is
/// still at `revision`.
async fn discard(store: &dyn SessionStore, client_id: &str, record: &Record, revision: u64) {
    for s in &record.subscriptions {
        if shared_filter(&s.key).is_some() {
            continue;
        }
        if let Ok(filter) = TopicFilter::parse(&s.key) {
            delete_durable(store, client_id, &s.key, &filter).await;
        }
    }
    let _ = store.remove(client_id, revision).await;
}

/// Deletes the durable subscription of one of a session's filters (gone already is fine).
async fn delete_durable(
    store: &dyn SessionStore,
    client_id: &str,
    key: &str,
    filter: &TopicFilter,
) {
    let _ = store
        .delete_durable(&durable_name(client_id, key), filter)
        .await;
}

impl Record {
    /// Whether the session belongs to `principal`.
    fn held_by(&self, principal: &Principal) -> bool {
        self.principal == principal.name()
            && self
                .anonymous
                .is_none_or(|anonymous| anonymous == principal.is_anonymous())
    }

    /// Whether the client left longer ago than the session's expiry (a session held by a
    /// connection, `left_at_ms` `None`, has not).
    fn expired(&self) -> bool {
        self.left_at_ms.is_some_and(|left| {
            now_ms() > left.saturating_add(self.expiry_secs.saturating_mul(1000))
        })
    }
}

/// Why CONNECT cannot have the stored session of its client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClaimError {
    /// The store cannot be read: nothing may be decided about the session.
    Unavailable,
    /// Another principal's session, not expired: neither taken over nor discarded.
    Taken,
}

/// What CONNECT found in the store: the session to resume, and the record's revision to
/// save over (0: none).
#[derive(Debug, Default)]
pub(super) struct Claim {
    pub(super) record: Option<Record>,
    pub(super) revision: u64,
}

/// At CONNECT: the stored session of `client_id`, taken from whichever instance held it, when
/// the client resumes it (`resume`: clean start 0) as the same principal and it has not
/// expired. Otherwise a stored session of the same principal is discarded (clean start ends
/// it, MQTT 5 §3.1.2.4); another principal's unexpired session is left alone
/// (`Err(Taken)`, checked before its holder is asked to let go of it).
pub(super) async fn claim(
    shared: &Shared,
    client_id: &str,
    principal: &Principal,
    resume: bool,
) -> Result<Claim, ClaimError> {
    let Some(store) = shared.ctx.backbone.session_store() else {
        return Ok(Claim::default());
    };
    let loaded = load(store, shared, client_id)
        .await
        .map_err(|()| ClaimError::Unavailable)?;
    let Some((mut record, mut revision)) = loaded else {
        return Ok(Claim::default());
    };
    if !record.held_by(principal) && !record.expired() {
        return Err(ClaimError::Taken);
    }
    if record.owner != *shared.ctx.instance {
        if let Err(e) = store.release(&record.owner, client_id, TAKEOVER_WAIT).await {
            tracing::warn!(client_id, error = %e, "mqtt: taking the session over without its holder");
        }
        // What the holder saved when it let go.
        match load(store, shared, client_id)
            .await
            .map_err(|()| ClaimError::Unavailable)?
        {
            Some(found) => (record, revision) = found,
            None => return Ok(Claim::default()),
        }
    }
    let expired = record.expired();
    if !record.held_by(principal) && !expired {
        // Another principal's client came back (or connected elsewhere) meanwhile.
        return Err(ClaimError::Taken);
    }
    if !resume || expired || !record.held_by(principal) {
        discard(store, client_id, &record, revision).await;
        return Ok(Claim::default());
    }
    Ok(Claim {
        record: Some(record),
        revision,
    })
}

/// The admin API deletes `client_id`'s session (its client not connected here): what a clean
/// start would do to it, wherever it is kept — a session parked here ends (a will still
/// waiting is published, as at expiry), a stored one (JetStream) loses its record, then its
/// durable subscriptions, after its holding instance let go of it. True when there was one.
///
/// The record goes first, on its revision: a client that claimed the session meanwhile (a new
/// revision) keeps it, durables and all. (One that connects in the moment between the record's
/// removal and the durables' starts clean, as after any delete, and may see durables it made
/// in that moment go.)
pub(crate) async fn delete(shared: &Shared, client_id: &str) -> Result<bool, DeleteError> {
    let mut found = false;
    if let Some(mut session) = shared.parked.take(client_id, true).await {
        found = true;
        Box::pin(session.publish_will()).await;
        // Dropped here: its backbone subscriptions end; the stored part is deleted below.
    }
    let Some(store) = shared.ctx.backbone.session_store() else {
        return Ok(found);
    };
    let Some((record, revision)) = load(store, shared, client_id)
        .await
        .map_err(|()| DeleteError::Unavailable)?
    else {
        return Ok(found);
    };
    if record.left_at_ms.is_none() && !record.expired() && record.owner != *shared.ctx.instance {
        return Err(DeleteError::Connected(client_id.to_owned(), record.owner));
    }
    let (record, revision) = if record.owner == *shared.ctx.instance {
        (record, revision)
    } else {
        // Its holder drops its placeholder (timers, will) first.
        if let Err(e) = store.release(&record.owner, client_id, TAKEOVER_WAIT).await {
            tracing::warn!(client_id, error = %e, "mqtt: deleting a session without its holder");
        }
        match load(store, shared, client_id)
            .await
            .map_err(|()| DeleteError::Unavailable)?
        {
            Some(found) => found,
            None => return Ok(true),
        }
    };
    if store.remove(client_id, revision).await.is_err() {
        // Claimed meanwhile (or the store failed): the session is someone's again.
        return Err(DeleteError::Claimed(client_id.to_owned()));
    }
    for s in &record.subscriptions {
        if shared_filter(&s.key).is_none()
            && let Ok(filter) = TopicFilter::parse(&s.key)
        {
            delete_durable(store, client_id, &s.key, &filter).await;
        }
    }
    Ok(true)
}

/// Lets go of a session held here, for another instance: its connection closes (session taken
/// over) and saves it; a parked placeholder is dropped without its will (the client is back).
pub(crate) async fn release_here(shared: &Shared, client_id: &str) {
    if let Some(connection) = shared.take_over(client_id)
        && tokio::time::timeout(TAKEOVER_WAIT, connection.finished())
            .await
            .is_err()
    {
        tracing::warn!(
            client_id,
            "mqtt: connection did not close in time for a release"
        );
    }
    if let Some(mut placeholder) = shared.parked.take(client_id, true).await {
        placeholder.will.cancel();
    }
}

/// Answers other instances' release requests until shutdown.
pub(crate) async fn serve_releases(shared: std::sync::Arc<Shared>) {
    let Some(store) = shared.ctx.backbone.session_store() else {
        return;
    };
    let mut requests = match store.release_requests().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "mqtt: cannot take session release requests; sessions held here cannot move to other instances");
            return;
        }
    };
    loop {
        let request = tokio::select! {
            _ = shared.ctx.shutdown.cancelled() => return,
            r = futures_util::StreamExt::next(&mut requests) => r,
        };
        let Some(request) = request else { return };
        let shared = shared.clone();
        shared.ctx.tracker.clone().spawn(async move {
            release_here(&shared, &request.client_id).await;
            // Dropping the request answers it.
            drop(request);
        });
    }
}

impl Session {
    fn store(&self) -> Option<&dyn SessionStore> {
        self.shared.ctx.backbone.session_store()
    }

    /// How filter `key` is subscribed for a persistent session where the backbone keeps
    /// sessions: durably, so what arrives while the client is away waits for it on any instance.
    pub(super) fn durable(&self, key: &str) -> Option<Durable> {
        (self.store().is_some() && !self.expiry().is_zero()).then(|| self.durable_forced(key))
    }

    fn durable_forced(&self, key: &str) -> Durable {
        Durable {
            name: durable_name(&self.client_id, key),
            // The longest a session may be away; the holder deletes it earlier when it expires.
            ttl: self.shared.config.read().max_session_expiry,
        }
    }

    /// Deletes an unsubscribed filter's durable subscription.
    pub(super) async fn forget_durable(&mut self, sub: &Subscription) {
        if let Some(store) = self.store()
            && self.store_revision != 0
            && !sub.shared
        {
            delete_durable(store, &self.client_id, &sub.key, &sub.filter).await;
        }
    }

    fn record(&self, left_at_ms: Option<u64>) -> Record {
        Record {
            principal: self.principal.name().to_owned(),
            anonymous: Some(self.principal.is_anonymous()),
            owner: self.shared.ctx.instance.to_string(),
            left_at_ms,
            expiry_secs: self.expiry().as_secs(),
            subscriptions: self
                .subscriptions
                .iter()
                .map(|s| StoredSubscription {
                    key: s.key.clone(),
                    qos: s.granted as u8,
                    no_local: s.no_local,
                    retain_as_published: s.retain_as_published,
                    id: s.id,
                })
                .collect(),
            incoming_qos2: self.inbound.awaiting_pubrel().collect(),
            released: self.window.released_pkids(),
            next_pkid: self.window.next_pkid,
            origin: (self.origin.instance.to_string(), self.origin.connection),
        }
    }

    async fn save(&mut self, left_at_ms: Option<u64>) -> Saved {
        let shared = self.shared.clone();
        let Some(store) = shared.ctx.backbone.session_store() else {
            return Saved::Yes;
        };
        // A clean session has nothing stored — unless it resumed a stored one (a v5 client
        // may resume with expiry 0): then the record says it is held here until it ends.
        if self.expiry().is_zero() && self.store_revision == 0 {
            return Saved::Yes;
        }
        let Ok(record) = serde_json::to_vec(&self.record(left_at_ms)) else {
            return Saved::Failed;
        };
        let expected = (self.store_revision != 0).then_some(self.store_revision);
        match store.save(&self.client_id, record, expected).await {
            Ok(Some(revision)) => {
                self.store_revision = revision;
                Saved::Yes
            }
            Ok(None) => {
                tracing::info!(
                    client_id = self.client_id,
                    "mqtt: the session was taken by another instance"
                );
                Saved::Conflict
            }
            Err(e) if !e.is_retryable() => Saved::Refused(e.to_string()),
            Err(e) => {
                shared.metrics.error(ErrorKind::SessionStore);
                tracing::warn!(client_id = self.client_id, error = %e, "mqtt: cannot save the session");
                Saved::Failed
            }
        }
    }

    /// Saves a connected persistent session (after CONNECT and every subscription change), so
    /// its subscriptions survive even this instance being killed. A session another instance
    /// took meanwhile (its holder did not answer in time) ends its connection here.
    pub(super) async fn save_stored(&mut self) -> Saved {
        let saved = self.save(None).await;
        if saved == Saved::Conflict {
            self.live
                .close(meshgate_core::connections::CloseReason::TakenOver);
        }
        saved
    }

    /// Takes what the stored session kept: its subscriptions (bound again to their durable
    /// subscriptions, with what waited there) and its unfinished QoS 2 handshakes.
    pub(super) async fn restore_stored(&mut self, record: Record) -> Result<(), BackboneError> {
        for s in record.subscriptions {
            let (group, text) = match shared_filter(&s.key) {
                None => (None, s.key.as_str()),
                Some(Ok((g, f))) => (Some(g), f),
                Some(Err(())) => continue,
            };
            let Ok(filter) = TopicFilter::parse(text) else {
                continue;
            };
            // Checked again: the ACL may have changed since the subscription was stored.
            let filtered = match self
                .shared
                .ctx
                .authorizer
                .check_subscribe(&self.principal, &filter)
            {
                Ok(grant) => grant == meshgate_core::SubscribeGrant::Filtered,
                Err(e) => {
                    tracing::info!(client_id = self.client_id, error = %e, "mqtt: a stored subscription is no longer allowed; not restored");
                    continue;
                }
            };
            let options = SubOptions {
                granted: to_qos(s.qos),
                no_local: s.no_local,
                retain_as_published: s.retain_as_published,
                id: s.id,
                filtered,
            };
            // Bound to the durable subscription even when this connection's session ends with
            // it (expiry 0): what waited there is delivered, and it is deleted at the end.
            let durable = group.is_none().then(|| self.durable_forced(&s.key));
            if let Err(e) = self.open(&s.key, filter, group, options, durable).await {
                // The caller refuses the CONNECT; the record and consumers stay for a retry.
                tracing::warn!(client_id = self.client_id, error = %e, filter = s.key, "mqtt: cannot restore a subscription");
                return Err(e);
            }
        }
        self.inbound
            .set_awaiting_pubrel(record.incoming_qos2.into_iter().collect());
        for pkid in record.released {
            self.window.restore_released(pkid);
        }
        self.window.next_pkid = record.next_pkid.max(1);
        // Only no-local compares origins, and (instance, connection) stays unique.
        self.origin = meshgate_core::Origin {
            instance: std::sync::Arc::from(record.origin.0),
            connection: record.origin.1,
        };
        Ok(())
    }

    /// The connection of a persistent session ends: the deliveries the client did not
    /// acknowledge go back to the backbone and the record says the client left, so the session
    /// can be resumed on any instance. False when another instance has taken the session.
    pub(super) async fn leave_stored(&mut self) -> bool {
        if self.store().is_none() {
            return true;
        }
        self.detach().await;
        self.save(Some(now_ms())).await != Saved::Conflict
    }

    /// The session is over (expired, or its last connection had expiry 0): its durable
    /// subscriptions and record are deleted — unless the record changed since this instance
    /// wrote it (another instance holds the session by now), or cannot be read.
    pub(super) async fn end_stored(&mut self) {
        let shared = self.shared.clone();
        let Some(store) = shared.ctx.backbone.session_store() else {
            return;
        };
        if self.store_revision == 0 {
            return;
        }
        if let Ok(Some((record, revision))) = load(store, &shared, &self.client_id).await
            && revision == self.store_revision
        {
            discard(store, &self.client_id, &record, revision).await;
        }
    }
}

/// How saving a session record went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Saved {
    Yes,
    /// Another instance wrote the record since this one did: the session is no longer ours.
    Conflict,
    Failed,
    /// The store cannot hold this session at all (its client id is too long for a key): why.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::durable_name;

    #[test]
    fn durable_names_hold_only_characters_jetstream_delivers_to() {
        // `#`, `%`, `/` in consumer names broke delivery or were refused (see the module doc).
        let name = durable_name("plant 7/dev#1", "$share/g/a/#");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{name}"
        );
        assert_ne!(durable_name("a_b", "c"), durable_name("a", "b_c"));
    }
}
