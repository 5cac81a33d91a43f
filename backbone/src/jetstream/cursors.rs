//! Where durable subscriptions of the instance feed stand (decision 0080): one key per durable
//! subscription in the KV bucket `<stream>_CURSORS`, its value the decimal stream sequence up
//! to which everything was acknowledged (the member's floor).
//!
//! The key is written when the subscription is made (so that a session that leaves at once
//! still finds what came while it was away), at most once a [`FLUSH_EVERY`] while the floor
//! moves, and when the subscription ends. [`Cursors::settled`] waits for the writes of ended
//! subscriptions: the session store calls it before it saves a session record, so that an
//! instance that takes the session over reads where the last holder stood, not a second
//! before. A cursor that is older than the truth only repeats messages (at least once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_nats::jetstream::kv;
use base64::Engine;
use sha2::Digest;

use super::member::Member;
use super::retained::B64;
use meshgate_core::BackboneError;

/// How often moving floors are written.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The longest [`Cursors::settled`] waits.
const SETTLE_WITHIN: Duration = Duration::from_secs(2);

fn failed(e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Unavailable(format!("subscription cursors (JetStream KV): {e}"))
}

/// The key of durable subscription `name`: 24 characters of base64url over its SHA-256 (names
/// hold a client id and a filter of any length; KV keys have a narrow alphabet).
pub(crate) fn cursor_key(name: &str) -> String {
    let digest = sha2::Sha256::digest(name.as_bytes());
    B64.encode(&digest[..18])
}

/// A live durable member and the floor last written for it.
#[derive(Debug)]
struct Entry {
    member: Weak<Member>,
    /// The member's id: only the member that owns the key ends it (a newer subscription with
    /// the same durable name may have taken the key over on this instance).
    id: u64,
    written: u64,
}

#[derive(Debug, Default)]
struct Tracked {
    members: HashMap<String, Entry>,
    /// Final writes of ended subscriptions not yet answered, by ticket number.
    ending: std::collections::BTreeSet<u64>,
    next_ticket: u64,
}

pub(crate) struct Cursors {
    kv: kv::Store,
    tracked: Mutex<Tracked>,
    ended: tokio::sync::Notify,
}

impl std::fmt::Debug for Cursors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cursors")
    }
}

impl Cursors {
    pub(crate) fn new(kv: kv::Store) -> Arc<Cursors> {
        let cursors = Arc::new(Cursors {
            kv,
            tracked: Mutex::new(Tracked::default()),
            ended: tokio::sync::Notify::new(),
        });
        tokio::spawn(flush(Arc::downgrade(&cursors)));
        cursors
    }

    fn tracked(&self) -> MutexGuard<'_, Tracked> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored floor of `key`, if any.
    pub(crate) async fn read(&self, key: &str) -> Result<Option<u64>, BackboneError> {
        let entry = self.kv.entry(key).await.map_err(failed)?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| std::str::from_utf8(&e.value).ok()?.trim().parse().ok()))
    }

    /// Writes `floor` for `key` and waits for the store to have it.
    pub(crate) async fn write(&self, key: &str, floor: u64) -> Result<(), BackboneError> {
        self.kv
            .put(key, floor.to_string().into())
            .await
            .map(|_| ())
            .map_err(failed)
    }

    /// Keeps `key` written while `member` lives (`written`: the floor stored now).
    pub(crate) fn track(&self, key: String, member: &Arc<Member>, written: u64) {
        self.tracked().members.insert(
            key,
            Entry {
                member: Arc::downgrade(member),
                id: member.id,
                written,
            },
        );
    }

    /// The subscription ended: writes its floor one last time (in the background;
    /// [`Cursors::settled`] waits for it). Nothing is written when the key is no longer this
    /// member's: deleted (an unsubscribe, a session that ended, whose stream is dropped after
    /// the delete) or taken over by a newer subscription with the same name.
    pub(crate) fn end(self: &Arc<Self>, key: String, member: &Member) {
        let floor = member.floor();
        let ticket = {
            let mut tracked = self.tracked();
            let owned = tracked.members.get(&key).is_some_and(|e| e.id == member.id);
            if !owned {
                return;
            }
            let written = tracked.members.remove(&key).map(|e| e.written);
            if written == Some(floor) {
                return;
            }
            let ticket = tracked.next_ticket;
            tracked.next_ticket += 1;
            tracked.ending.insert(ticket);
            ticket
        };
        let cursors = self.clone();
        tokio::spawn(async move {
            if let Err(e) = cursors.write(&key, floor).await {
                tracing::warn!(error = %e, "jetstream: the position of an ended durable subscription was not stored; the session may receive messages again");
            }
            cursors.tracked().ending.remove(&ticket);
            cursors.ended.notify_waiters();
        });
    }

    /// Waits (at most 2 s) until the last writes of subscriptions that ended before this call
    /// are stored (not those that end meanwhile: under steady churn there always are some).
    pub(crate) async fn settled(&self) {
        let before = self.tracked().next_ticket;
        let wait = async {
            loop {
                let notified = self.ended.notified();
                if self
                    .tracked()
                    .ending
                    .first()
                    .is_none_or(|&oldest| oldest >= before)
                {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(SETTLE_WITHIN, wait).await;
    }

    /// Forgets `key` (the durable subscription was deleted); its member, if still alive,
    /// writes nothing more.
    pub(crate) async fn delete(&self, key: &str) -> Result<(), BackboneError> {
        self.tracked().members.remove(key);
        self.kv.purge(key).await.map_err(failed)
    }
}

/// Writes the floors that moved, once a [`FLUSH_EVERY`], until the store is dropped.
async fn flush(cursors: Weak<Cursors>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cursors) = cursors.upgrade() else {
            return;
        };
        let moved: Vec<(String, u64)> = cursors
            .tracked()
            .members
            .iter()
            .filter_map(|(key, e)| {
                let floor = e.member.upgrade()?.floor();
                (floor != e.written).then(|| (key.clone(), floor))
            })
            .collect();
        for chunk in moved.chunks(256) {
            let writes = chunk.iter().map(|(key, floor)| {
                let cursors = cursors.clone();
                async move { (key, *floor, cursors.write(key, *floor).await) }
            });
            for (key, floor, result) in futures_util::future::join_all(writes).await {
                match result {
                    Ok(()) => {
                        if let Some(entry) = cursors.tracked().members.get_mut(key) {
                            entry.written = floor;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "jetstream: a cursor write failed; tried again next time")
                    }
                }
            }
        }
    }
}
