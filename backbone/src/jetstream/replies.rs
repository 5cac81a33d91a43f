//! Requests whose replies come to one wildcard inbox of meshgate's own client
//! (`_INBOX.<unique>.*`), handled on the connection's reader task: the reply subject's last
//! token is the request's number, which finds the waiter. JetStream publishes
//! ([`super::publish`]) and direct gets ([`super::direct`]) are such requests.
//!
//! Replies come on the connection the request went out on: when it drops, none of the waiters
//! will get one, so each is answered then with the caller's "lost" value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::nats::client::{Client, ClientError, Msg, Unsubscribe};

type Waiters<T> = Mutex<HashMap<u64, oneshot::Sender<T>>>;

fn lock<T>(w: &Waiters<T>) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<T>>> {
    // Only inserts and removes happen under the lock.
    w.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Replies<T> {
    /// `_INBOX.<unique>.`; a request's reply subject is this and its number.
    inbox: String,
    next: AtomicU64,
    waiting: Arc<Waiters<T>>,
    _replies: Unsubscribe,
}

impl<T> std::fmt::Debug for Replies<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies")
            .field("inbox", &self.inbox)
            .finish()
    }
}

impl<T: Send + 'static> Replies<T> {
    /// Subscribes to a new inbox on `client`. `read` turns a reply into the waiter's answer
    /// (on the reader task); when the connection drops, every waiter gets `lost()`, and
    /// `on_lost` is told how many there were.
    pub(crate) fn start(
        client: &Client,
        read: impl Fn(Msg) -> T + Send + Sync + 'static,
        lost: impl Fn() -> T + Send + Sync + 'static,
        on_lost: impl Fn(usize) + Send + Sync + 'static,
    ) -> Result<Replies<T>, ClientError> {
        let inbox = format!("_INBOX.{}.", meshgate_core::wrap::new_id());
        let waiting: Arc<Waiters<T>> = Arc::new(Mutex::new(HashMap::new()));
        client.on_disconnect({
            let waiting = waiting.clone();
            move || {
                let gone: Vec<_> = lock(&waiting).drain().map(|(_, tx)| tx).collect();
                let n = gone.len();
                for tx in gone {
                    let _ = tx.send(lost());
                }
                on_lost(n);
            }
        });
        let (w, prefix_len) = (waiting.clone(), inbox.len());
        // On the reader task: the waiter wakes straight from there.
        let replies = client.subscribe_with(&format!("{inbox}*"), move |m| {
            let Some(id) = m
                .subject
                .get(prefix_len..)
                .and_then(|t| std::str::from_utf8(t).ok())
                .and_then(|t| t.parse::<u64>().ok())
            else {
                return;
            };
            // None: given up before, or not ours.
            if let Some(tx) = lock(&w).remove(&id) {
                let _ = tx.send(read(m));
            }
        })?;
        Ok(Replies {
            inbox,
            next: AtomicU64::new(1),
            waiting,
            _replies: replies,
        })
    }

    /// A new request: its reply subject and where its answer comes. Dropping the waiter
    /// forgets the request (an error, a timeout, a caller that gave up).
    pub(crate) fn waiter(&self) -> Waiter<'_, T> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut reply = String::with_capacity(self.inbox.len() + 20);
        reply.push_str(&self.inbox);
        reply.push_str(itoa::Buffer::new().format(id));
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(id, tx);
        Waiter {
            reply,
            answer: rx,
            id,
            waiting: &self.waiting,
        }
    }

    /// No request is waiting for its reply.
    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.waiting).is_empty()
    }
}

/// One request waiting for its reply.
pub(crate) struct Waiter<'a, T> {
    pub(crate) reply: String,
    pub(crate) answer: oneshot::Receiver<T>,
    id: u64,
    waiting: &'a Waiters<T>,
}

impl<T> Drop for Waiter<'_, T> {
    fn drop(&mut self) {
        lock(self.waiting).remove(&self.id);
    }
}
