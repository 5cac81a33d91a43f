//! The live client connections of this process (MQTT over TCP, TLS and WebSocket, CloudEvents
//! WebSocket), for the admin API: who is connected, what each holds, and a way to close one.
//!
//! Each connection registers once it is admitted (MQTT CONNECT accepted, WebSocket upgraded)
//! and is removed when its [`Registered`] guard drops. The entry holds what does not change
//! (protocol, user, client id, address, when) and a few figures the connection refreshes itself
//! where it already has them at hand: its subscriptions when they change, its queued and
//! in-flight counts once per turn of its loop (two relaxed stores). Nothing here is on a
//! delivery's path.
//!
//! Sharded by connection id (ids are handed out in sequence, so consecutive connections land on
//! different shards): registering and leaving lock one shard for a map insert or remove. A
//! listing walks the shards one at a time, each `BTreeMap` from the page's cursor on, taking
//! at most `limit` matches per shard (with a filter, the entries it skips are scanned too) and
//! holding no lock across shards.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use serde::Serialize;
use tokio::sync::Notify;

use crate::auth::Principal;

const SHARDS: usize = 16;

/// Longest page of a listing.
pub const MAX_PAGE: usize = 1000;

/// One shard of the registry: connections by id.
type Shard = Mutex<BTreeMap<u64, Arc<Connection>>>;

/// The shard that holds connection `id`.
fn shard_of(shards: &[Shard; SHARDS], id: u64) -> &Shard {
    &shards[(id % SHARDS as u64) as usize]
}

/// The connection registry, shared by every listener of the process.
#[derive(Clone)]
pub struct Connections {
    shards: Arc<[Shard; SHARDS]>,
    /// Off when nothing can read it (the admin API is off): connections that need an entry
    /// only to be listed (WebSocket) make none ([`Connections::register_if_on`]).
    on: bool,
}

impl Default for Connections {
    fn default() -> Self {
        Connections::new(true)
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("count", &self.count())
            .finish()
    }
}

/// What a connection is, given when it registers.
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub id: u64,
    /// `mqtt`, `mqtt-ws` or `websocket`.
    pub protocol: &'static str,
    /// `3.1.1` or `5` for MQTT; the subprotocol for WebSocket.
    pub version: &'static str,
    pub principal: Principal,
    /// MQTT client id.
    pub client_id: Option<String>,
    /// The client's address, when the listener knows it.
    pub peer: Option<SocketAddr>,
}

/// One live connection, and how its task is told to close and announces that it ended: one
/// allocation per connection for all of it (an MQTT connection had two cancellation tokens,
/// 224 bytes, beside it: idle connection memory, issue 23).
#[derive(Debug)]
pub struct Connection {
    id: u64,
    protocol: &'static str,
    version: &'static str,
    /// The principal's name and kind (not the principal: its rules would stay alive here
    /// after a reload replaced them).
    user: Arc<str>,
    anonymous: bool,
    internal: bool,
    /// Why the connection was told to close: a [`CloseReason`], 0 while it was not.
    close: AtomicU8,
    /// Set when the connection's task has ended ([`Connection::finish`]).
    finished: AtomicBool,
    /// An idle timeout its listener sweeps (MQTT keep-alive), in that listener's clock ticks:
    /// how many may pass without activity (0: none) and the tick of the last activity. Two
    /// words here instead of a timer in every idle connection's task.
    idle_limit: AtomicU32,
    last_active: AtomicU32,
    client_id: Option<Box<str>>,
    peer: Option<SocketAddr>,
    /// Unix time of the registration, in milliseconds.
    connected_at_ms: u64,
    /// Messages waiting for the client (MQTT: beyond the in-flight window; WebSocket: in the
    /// outbound queue).
    queued: AtomicU32,
    /// MQTT: QoS 1/2 messages sent and not yet acknowledged by the client. WebSocket: events
    /// handed to the socket and not yet flushed.
    in_flight: AtomicU32,
    subscriptions: Mutex<Subscriptions>,
    /// The connection's task, registered as it polls [`Connection::poll_closed`]: woken by
    /// [`Connection::close`].
    waker: AtomicWaker,
    /// Wakes whoever waits for the connection to end ([`Connection::finished`]).
    finish: Notify,
}

/// Why a connection was told to close ([`Connection::close`]; the first reason given stays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// An operator, through the admin API (MQTT 5: DISCONNECT 0x98; WebSocket: close 1008).
    Operator = 1,
    /// Another connection took its client id over, here or on another instance (MQTT 5:
    /// DISCONNECT 0x8E).
    TakenOver = 2,
    /// The gateway is shutting down: deliver what is held, then close.
    Shutdown = 3,
    /// Nothing came from the client within its keep-alive (MQTT 5: DISCONNECT 0x8D).
    KeepAlive = 4,
}

impl CloseReason {
    fn from_u8(n: u8) -> Option<CloseReason> {
        match n {
            1 => Some(CloseReason::Operator),
            2 => Some(CloseReason::TakenOver),
            3 => Some(CloseReason::Shutdown),
            4 => Some(CloseReason::KeepAlive),
            _ => None,
        }
    }
}

/// A connection's subscriptions; most hold none or one, kept without a `Vec` (idle connection
/// memory).
#[derive(Debug, Default)]
enum Subscriptions {
    #[default]
    None,
    One(SubscriptionInfo),
    Many(Vec<SubscriptionInfo>),
}

impl Subscriptions {
    fn as_slice(&self) -> &[SubscriptionInfo] {
        match self {
            Subscriptions::None => &[],
            Subscriptions::One(s) => std::slice::from_ref(s),
            Subscriptions::Many(v) => v,
        }
    }

    fn set(&mut self, mut list: Vec<SubscriptionInfo>) {
        *self = match list.len() {
            0 => Subscriptions::None,
            1 => Subscriptions::One(list.remove(0)),
            _ => {
                list.shrink_to_fit();
                Subscriptions::Many(list)
            }
        };
    }
}

/// A subscription as the admin API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// The filter as the client wrote it (MQTT `$share/<group>/…` included); shared with the
    /// connection's own copy where it has one (`TopicFilter`).
    #[serde(serialize_with = "text")]
    pub filter: Arc<str>,
    /// MQTT: the granted QoS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
}

impl Connection {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// Tells the connection to close, for `reason`, unless it was told already (the first
    /// reason stays); its task is woken. True: this call told it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let told = self
            .close
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if told {
            self.waker.wake();
        }
        told
    }

    /// Why the connection was told to close, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.close.load(Ordering::Acquire))
    }

    /// Ready with the reason once the connection was told to close; polled by its task (whose
    /// waker [`Connection::close`] wakes).
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        if let Some(reason) = self.close_reason() {
            return Poll::Ready(reason);
        }
        self.waker.register(cx.waker());
        // Told between the first look and the registration: that wake may have gone to the
        // previous waker.
        match self.close_reason() {
            Some(reason) => Poll::Ready(reason),
            None => Poll::Pending,
        }
    }

    /// An operator asked this connection to close ([`Connections::close`]).
    pub fn closed_by_operator(&self) -> bool {
        self.close_reason() == Some(CloseReason::Operator)
    }

    /// Whether `principal` is who holds this connection (the same user, or both anonymous:
    /// [`Principal`]'s equality).
    pub fn is_held_by(&self, principal: &Principal) -> bool {
        *self.user == *principal.name()
            && self.anonymous == principal.is_anonymous()
            && self.internal == principal.is_internal()
    }

    /// From tick `now` of its listener's clock on, the connection may stay silent for `limit`
    /// ticks (0: for ever) before [`Connection::idle_past_limit`] says so.
    pub fn set_idle_limit(&self, limit: u32, now: u32) {
        self.last_active.store(now, Ordering::Relaxed);
        self.idle_limit.store(limit, Ordering::Relaxed);
    }

    /// Activity at tick `now`: the idle count starts again. A load and, once per tick, a
    /// store (the connection's own line; the sweep reads it once per tick).
    pub fn touch(&self, now: u32) {
        if self.last_active.load(Ordering::Relaxed) != now {
            self.last_active.store(now, Ordering::Relaxed);
        }
    }

    /// Whether, at tick `now`, more than its limit of whole ticks has passed since the tick of
    /// its last activity (that activity may have come at the end of its tick: one tick more
    /// than the limit is waited, so nobody is cut before the limit).
    pub fn idle_past_limit(&self, now: u32) -> bool {
        let limit = self.idle_limit.load(Ordering::Relaxed);
        limit != 0 && now.wrapping_sub(self.last_active.load(Ordering::Relaxed)) > limit
    }

    /// The connection's task has ended: whoever waits in [`Connection::finished`] goes on.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Release);
        self.finish.notify_waiters();
    }

    /// Waits until the connection's task has ended ([`Connection::finish`]).
    pub async fn finished(&self) {
        let notified = self.finish.notified();
        let mut notified = std::pin::pin!(notified);
        // Enabled before the flag is read: a `finish` in between still wakes this waiter.
        notified.as_mut().enable();
        if self.finished.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    /// Refreshes the queued and in-flight figures (see the fields' meaning per protocol).
    pub fn set_load(&self, queued: usize, in_flight: usize) {
        let queued = u32::try_from(queued).unwrap_or(u32::MAX);
        let in_flight = u32::try_from(in_flight).unwrap_or(u32::MAX);
        // Read-before-write keeps the cache line shared while nothing changed.
        if self.queued.load(Ordering::Relaxed) != queued {
            self.queued.store(queued, Ordering::Relaxed);
        }
        if self.in_flight.load(Ordering::Relaxed) != in_flight {
            self.in_flight.store(in_flight, Ordering::Relaxed);
        }
    }

    /// Replaces the list of subscriptions (after a subscribe, an unsubscribe, a revocation).
    pub fn set_subscriptions(&self, subscriptions: impl IntoIterator<Item = SubscriptionInfo>) {
        let list: Vec<SubscriptionInfo> = subscriptions.into_iter().collect();
        lock(&self.subscriptions).set(list);
    }

    /// Adds a subscription (or replaces the one with the same filter).
    pub fn add_subscription(&self, subscription: SubscriptionInfo) {
        let mut subs = lock(&self.subscriptions);
        let mut list = subs.as_slice().to_vec();
        match list.iter_mut().find(|s| s.filter == subscription.filter) {
            Some(s) => *s = subscription,
            None => list.push(subscription),
        }
        subs.set(list);
    }

    /// Removes the subscription with this filter.
    pub fn remove_subscription(&self, filter: &str) {
        let mut subs = lock(&self.subscriptions);
        let mut list = subs.as_slice().to_vec();
        list.retain(|s| &*s.filter != filter);
        subs.set(list);
    }

    fn info(&self, with_subscriptions: bool) -> ConnectionInfo {
        let subscriptions = lock(&self.subscriptions);
        let subscriptions = subscriptions.as_slice();
        ConnectionInfo {
            id: self.id,
            protocol: self.protocol,
            version: self.version,
            user: self.user.to_string(),
            anonymous: self.anonymous,
            client_id: self.client_id.as_deref().map(str::to_owned),
            address: self.peer.map(|p| p.to_string()),
            connected_at_ms: self.connected_at_ms,
            subscription_count: subscriptions.len(),
            queued: self.queued.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            subscriptions: with_subscriptions.then(|| subscriptions.to_vec()),
        }
    }
}

/// A connection as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    pub id: u64,
    pub protocol: &'static str,
    pub version: &'static str,
    pub user: String,
    pub anonymous: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub connected_at_ms: u64,
    pub subscription_count: usize,
    pub queued: u32,
    pub in_flight: u32,
    /// Only when one connection is asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriptions: Option<Vec<SubscriptionInfo>>,
}

/// Which connections a listing wants, and from where.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub protocol: Option<String>,
    pub user: Option<String>,
    pub client_id: Option<String>,
    /// Only ids above this (the previous page's `next`).
    pub after: u64,
    /// At most this many (capped at [`MAX_PAGE`]).
    pub limit: usize,
}

impl Query {
    fn wants(&self, c: &Connection) -> bool {
        self.protocol.as_deref().is_none_or(|p| p == c.protocol)
            && self.user.as_deref().is_none_or(|u| u == &*c.user)
            && self
                .client_id
                .as_deref()
                .is_none_or(|id| Some(id) == c.client_id.as_deref())
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The cursor of the next page (`?after=`), when there may be more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

fn text<S: serde::Serializer>(s: &Arc<str>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(s)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks panics half-way through a change.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Connections {
    /// A registry; `on`: whether connections are listed (the admin API is on).
    pub fn new(on: bool) -> Connections {
        Connections {
            shards: Arc::default(),
            on,
        }
    }

    /// [`Connections::register`] when the registry is on; `None` otherwise.
    pub fn register_if_on(&self, new: NewConnection) -> Option<Registered> {
        self.on.then(|| self.register(new))
    }

    fn shard(&self, id: u64) -> &Shard {
        shard_of(&self.shards, id)
    }

    /// Registers a connection, listed (when the registry is on) until the returned guard
    /// drops; its task polls [`Connection::poll_closed`] to learn when to close.
    pub fn register(&self, new: NewConnection) -> Registered {
        let connection = Arc::new(Connection {
            id: new.id,
            protocol: new.protocol,
            version: new.version,
            user: new.principal.shared_name(),
            anonymous: new.principal.is_anonymous(),
            internal: new.principal.is_internal(),
            close: AtomicU8::new(0),
            finished: AtomicBool::new(false),
            idle_limit: AtomicU32::new(0),
            last_active: AtomicU32::new(0),
            client_id: new.client_id.map(String::into_boxed_str),
            peer: new.peer,
            connected_at_ms: crate::backbone::now_ms(),
            queued: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            subscriptions: Mutex::new(Subscriptions::None),
            waker: AtomicWaker::new(),
            finish: Notify::new(),
        });
        if self.on {
            lock(self.shard(new.id)).insert(new.id, connection.clone());
        }
        Registered {
            shards: self.on.then(|| self.shards.clone()),
            connection,
        }
    }

    /// Connections listed now.
    pub fn count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// One page of connections in id order (oldest first), filtered by `query`.
    pub fn list(&self, query: &Query) -> Page<ConnectionInfo> {
        let limit = query.limit.clamp(1, MAX_PAGE);
        let mut found: Vec<Arc<Connection>> = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            found.extend(
                shard
                    .range(query.after.saturating_add(1)..)
                    .map(|(_, c)| c)
                    .filter(|c| query.wants(c))
                    .take(limit)
                    .cloned(),
            );
        }
        found.sort_unstable_by_key(|c| c.id);
        let more = found.len() > limit;
        found.truncate(limit);
        let next = (more || found.len() == limit)
            .then(|| found.last().map(|c| c.id.to_string()))
            .flatten();
        Page {
            items: found.iter().map(|c| c.info(false)).collect(),
            next,
        }
    }

    /// One connection, with its subscriptions.
    pub fn get(&self, id: u64) -> Option<ConnectionInfo> {
        let c = lock(self.shard(id)).get(&id).cloned()?;
        Some(c.info(true))
    }

    /// Tells connection `id` to close (MQTT 5: DISCONNECT 0x98 "administrative action";
    /// WebSocket: close 1008). False when no such connection is listed.
    pub fn close(&self, id: u64) -> bool {
        let Some(c) = lock(self.shard(id)).get(&id).cloned() else {
            return false;
        };
        c.close(CloseReason::Operator);
        true
    }
}

/// A connection's place in the registry; dropping it removes the connection.
#[derive(Debug)]
pub struct Registered {
    /// The registry's shards, when it is on (to leave them on drop). Not the `Connections`:
    /// 8 bytes of every idle MQTT connection's future less.
    shards: Option<Arc<[Shard; SHARDS]>>,
    connection: Arc<Connection>,
}

impl Registered {
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }
}

impl std::ops::Deref for Registered {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.connection
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(shards) = &self.shards {
            let id = self.connection.id;
            lock(shard_of(shards, id)).remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn new(id: u64, protocol: &'static str, client_id: &str) -> NewConnection {
        NewConnection {
            id,
            protocol,
            version: "5",
            principal: Principal::anonymous_for_tests(),
            client_id: Some(client_id.to_owned()),
            peer: Some("127.0.0.1:4000".parse().unwrap()),
        }
    }

    #[test]
    fn connections_are_listed_in_pages_filtered_and_leave_when_dropped() {
        let registry = Connections::default();
        let held: Vec<Registered> = (1..=40)
            .map(|i| {
                let protocol = if i % 2 == 0 { "mqtt" } else { "websocket" };
                registry.register(new(i, protocol, &format!("c{i}")))
            })
            .collect();
        assert_eq!(registry.count(), 40);
        let mut query = Query {
            protocol: Some("mqtt".into()),
            limit: 7,
            ..Query::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = registry.list(&query);
            seen.extend(page.items.iter().map(|c| c.id));
            match page.next {
                Some(next) => query.after = next.parse().unwrap(),
                None => break,
            }
        }
        assert_eq!(seen, (1..=20).map(|i| i * 2).collect::<Vec<_>>());
        let one = registry.list(&Query {
            client_id: Some("c7".into()),
            limit: 10,
            ..Query::default()
        });
        assert_eq!(one.items.len(), 1);
        assert_eq!(one.items[0].address.as_deref(), Some("127.0.0.1:4000"));
        assert!(one.next.is_none());
        drop(held);
        assert_eq!(registry.count(), 0);
        assert!(registry.get(7).is_none());
    }

    #[tokio::test]
    async fn an_operator_close_wakes_the_connection_and_says_so() {
        let registry = Connections::default();
        let held = registry.register(new(3, "mqtt", "x"));
        held.set_subscriptions([SubscriptionInfo {
            filter: Arc::from("a/#"),
            qos: Some(1),
        }]);
        held.set_load(2, 5);
        let info = registry.get(3).unwrap();
        assert_eq!(info.subscription_count, 1);
        assert_eq!((info.queued, info.in_flight), (2, 5));
        assert_eq!(info.subscriptions.unwrap()[0].filter.as_ref(), "a/#");
        assert!(!held.closed_by_operator());
        let connection = held.connection().clone();
        let waiting =
            tokio::spawn(
                async move { std::future::poll_fn(|cx| connection.poll_closed(cx)).await },
            );
        tokio::task::yield_now().await;
        assert!(registry.close(3));
        assert_eq!(waiting.await.unwrap(), CloseReason::Operator);
        assert!(held.closed_by_operator());
        assert!(!registry.close(4));
    }

    #[test]
    fn the_first_close_reason_stays() {
        let registry = Connections::new(false);
        let held = registry.register(new(5, "mqtt", "y"));
        assert_eq!(held.close_reason(), None);
        assert!(held.close(CloseReason::Shutdown));
        assert!(!held.close(CloseReason::TakenOver));
        assert_eq!(held.close_reason(), Some(CloseReason::Shutdown));
        assert!(!held.closed_by_operator());
        // Off: not listed, still closable.
        assert_eq!(registry.count(), 0);
        assert!(!registry.close(5));
    }

    #[tokio::test]
    async fn finished_returns_once_the_connection_has_ended_even_when_asked_late() {
        let registry = Connections::new(false);
        let held = registry.register(new(6, "mqtt", "z"));
        let connection = held.connection().clone();
        let waiter = tokio::spawn(async move { connection.finished().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        held.finish();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        // After the end: at once.
        held.finished().await;
    }

    #[test]
    fn idle_past_limit_counts_whole_ticks_from_the_last_activity() {
        let registry = Connections::new(false);
        let held = registry.register(new(8, "mqtt", "v"));
        assert!(!held.idle_past_limit(1_000), "no limit: never idle");
        held.set_idle_limit(3, 10);
        assert!(!held.idle_past_limit(13));
        assert!(held.idle_past_limit(14));
        held.touch(12);
        assert!(!held.idle_past_limit(15));
        assert!(held.idle_past_limit(16));
        // The clock wraps after 2^32 ticks.
        held.touch(u32::MAX);
        assert!(!held.idle_past_limit(2));
        assert!(held.idle_past_limit(3));
    }

    #[test]
    fn a_connection_is_held_by_the_principal_it_was_registered_for() {
        let registry = Connections::new(false);
        let held = registry.register(new(7, "mqtt", "w"));
        assert!(held.is_held_by(&Principal::anonymous_for_tests()));
        assert!(!held.is_held_by(&Principal::internal("bridge")));
    }
}
