//! The overlap of two connections while the client leaves a server in lame-duck mode: the new
//! connection subscribes before the old one is dropped, so no message published meanwhile
//! finds no subscriber (NATS core keeps nothing), and a message that both deliver is handed on
//! once.
//!
//! While *recording* (the new connection has subscribed, the old one still reads), each
//! message the old connection delivers is remembered by a hash of its sid, subject, reply
//! subject, headers and payload. While *filtering* (the new connection reads what it got
//! meanwhile), a message with a remembered hash is dropped, once. Filtering ends after
//! [`FILTER_FOR`], or when nothing remembered is left. Two distinct messages with the same sid
//! and the same bytes in that window would be taken for one: meshgate's events carry a unique
//! id, and JetStream deliveries a unique reply subject.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use super::proto::Msg;

/// How long the new connection's messages are compared with what the old one delivered.
pub(super) const FILTER_FOR: Duration = Duration::from_secs(2);

/// Messages remembered at most (past it, later ones are delivered twice rather than held).
const MAX_REMEMBERED: usize = 1 << 16;

const OFF: u8 = 0;
const RECORDING: u8 = 1;
const FILTERING: u8 = 2;

#[derive(Debug, Default)]
pub(super) struct Overlap {
    state: AtomicU8,
    inner: Mutex<Remembered>,
}

#[derive(Debug)]
struct Remembered {
    /// Hash → how many times the old connection delivered it.
    seen: HashMap<u64, u32>,
    hasher: std::collections::hash_map::RandomState,
    until: Instant,
}

impl Default for Remembered {
    fn default() -> Remembered {
        Remembered {
            seen: HashMap::new(),
            hasher: std::collections::hash_map::RandomState::new(),
            until: Instant::now(),
        }
    }
}

impl Overlap {
    fn inner(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The new connection subscribed: remember what the old one delivers from now on.
    pub(super) fn record(&self) {
        let mut inner = self.inner();
        inner.seen.clear();
        inner.hasher = std::collections::hash_map::RandomState::new();
        self.state.store(RECORDING, Ordering::Release);
    }

    /// The new connection reads now: drop what the old one delivered, for [`FILTER_FOR`].
    pub(super) fn filter(&self) {
        let mut inner = self.inner();
        inner.until = Instant::now() + FILTER_FOR;
        let state = if inner.seen.is_empty() {
            OFF
        } else {
            FILTERING
        };
        self.state.store(state, Ordering::Release);
    }

    /// No overlap (a connection made after a loss, not a move).
    pub(super) fn end(&self) {
        self.state.store(OFF, Ordering::Release);
        let mut inner = self.inner();
        inner.seen = HashMap::new();
    }

    /// Whether `msg` (for subscription `sid`) is to be handed on: false only for a copy the
    /// old connection already delivered. Costs one atomic load outside a move.
    pub(super) fn admit(&self, sid: u64, msg: &Msg) -> bool {
        match self.state.load(Ordering::Acquire) {
            OFF => true,
            RECORDING => {
                let mut inner = self.inner();
                if inner.seen.len() < MAX_REMEMBERED {
                    let h = hash(&inner.hasher, sid, msg);
                    *inner.seen.entry(h).or_default() += 1;
                }
                true
            }
            _ => {
                let mut inner = self.inner();
                if Instant::now() >= inner.until {
                    inner.seen = HashMap::new();
                    self.state.store(OFF, Ordering::Release);
                    return true;
                }
                let h = hash(&inner.hasher, sid, msg);
                let duplicate = match inner.seen.get_mut(&h) {
                    Some(n) => {
                        *n -= 1;
                        if *n == 0 {
                            inner.seen.remove(&h);
                        }
                        true
                    }
                    None => false,
                };
                if inner.seen.is_empty() {
                    inner.seen = HashMap::new();
                    self.state.store(OFF, Ordering::Release);
                }
                !duplicate
            }
        }
    }
}

fn hash(state: &impl BuildHasher, sid: u64, msg: &Msg) -> u64 {
    let mut h = state.build_hasher();
    sid.hash(&mut h);
    msg.subject.hash(&mut h);
    msg.reply.hash(&mut h);
    msg.headers.hash(&mut h);
    msg.payload.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(payload: &'static str) -> Msg {
        Msg {
            subject: Bytes::from_static(b"p.a"),
            reply: None,
            headers: None,
            payload: Bytes::from_static(payload.as_bytes()),
        }
    }

    #[test]
    fn a_message_both_connections_deliver_is_handed_on_once() {
        let o = Overlap::default();
        assert!(o.admit(1, &msg("before")), "no overlap: everything passes");
        o.record();
        // The old connection delivers x and y (twice: two distinct publishes of one body).
        for m in ["x", "y", "y"] {
            assert!(o.admit(1, &msg(m)));
        }
        o.filter();
        // The new one got y, y, x and z: only z is new; another sid is another subscription.
        assert!(!o.admit(1, &msg("y")));
        assert!(o.admit(2, &msg("x")));
        assert!(!o.admit(1, &msg("y")));
        assert!(o.admit(1, &msg("z")));
        assert!(!o.admit(1, &msg("x")));
        // Nothing remembered is left: filtering ended, a third y passes.
        assert!(o.admit(1, &msg("y")));
    }

    #[test]
    fn filtering_ends_after_its_window_and_a_lost_connection_ends_it() {
        let o = Overlap::default();
        o.record();
        assert!(o.admit(1, &msg("x")));
        o.filter();
        o.inner().until = Instant::now();
        assert!(o.admit(1, &msg("x")), "the window passed");
        o.record();
        assert!(o.admit(1, &msg("x")));
        o.end();
        assert!(o.admit(1, &msg("x")));
    }
}
