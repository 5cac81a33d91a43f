//! Failed-login limits, per source address and per user.
//!
//! Each key (an address, or a configured user's name) counts its failed logins in a fixed
//! window; once it has `max_failures` in the current window, further logins from that address
//! or as that user are refused without checking the credentials until the window ends — the
//! right password too, or a guessing loop would learn it from the different answer. A
//! successful login clears its address's and its user's count. IPv6 addresses count by their
//! /64 (one host usually holds the whole prefix). Each table holds at most [`MAX_KEYS`] keys:
//! when full, windows that ended are dropped first, then the oldest one.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many failed logins a source address or a user may have within `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginPolicy {
    /// 0 turns the limit off.
    pub max_failures: u32,
    pub window: Duration,
}

impl Default for LoginPolicy {
    /// 10 failures a minute: enough for a person mistyping, far too few to guess a password.
    fn default() -> Self {
        LoginPolicy {
            max_failures: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// Keys per table (addresses; users): the tables' memory bound.
pub const MAX_KEYS: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

#[derive(Debug)]
struct Table<K> {
    windows: Mutex<HashMap<K, Window>>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Self {
        Table {
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// How long `key` stays locked, if it is.
    fn locked(&self, key: &K, policy: LoginPolicy, now: Instant) -> Option<Duration> {
        let windows = self.windows.lock().ok()?;
        let w = windows.get(key)?;
        let elapsed = now.saturating_duration_since(w.started);
        (w.failures >= policy.max_failures && elapsed < policy.window)
            .then(|| policy.window - elapsed)
    }

    fn fail(&self, key: K, policy: LoginPolicy, now: Instant) {
        let Ok(mut windows) = self.windows.lock() else {
            return;
        };
        if windows.len() >= MAX_KEYS && !windows.contains_key(&key) {
            windows.retain(|_, w| now.saturating_duration_since(w.started) < policy.window);
            if windows.len() >= MAX_KEYS
                && let Some(oldest) = windows
                    .iter()
                    .min_by_key(|(_, w)| w.started)
                    .map(|(k, _)| k.clone())
            {
                windows.remove(&oldest);
            }
        }
        let w = windows.entry(key).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.saturating_duration_since(w.started) >= policy.window {
            *w = Window {
                started: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
    }

    fn clear(&self, key: &K) {
        if let Ok(mut windows) = self.windows.lock() {
            windows.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.windows.lock().map(|w| w.len()).unwrap_or(0)
    }
}

/// The two tables and the policy.
#[derive(Debug)]
pub(super) struct LoginLimiter {
    policy: LoginPolicy,
    addresses: Table<IpAddr>,
    users: Table<String>,
}

/// The key an address counts under: itself (IPv4), its /64 (IPv6).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

impl LoginLimiter {
    pub(super) fn new(policy: LoginPolicy) -> Self {
        LoginLimiter {
            policy,
            addresses: Table::new(),
            users: Table::new(),
        }
    }

    fn on(&self) -> bool {
        self.policy.max_failures > 0
    }

    /// How long a login from `from` as `user` must wait, when either is locked.
    pub(super) fn locked(&self, from: Option<IpAddr>, user: Option<&str>) -> Option<Duration> {
        if !self.on() {
            return None;
        }
        let now = Instant::now();
        let by_address =
            from.and_then(|ip| self.addresses.locked(&address_key(ip), self.policy, now));
        let by_user = user.and_then(|u| self.users.locked(&u.to_owned(), self.policy, now));
        by_address.max(by_user)
    }

    /// Counts a failed login; `user` only when it names a configured user (unknown names are
    /// limited by address only, so they cannot fill the user table).
    pub(super) fn failed(&self, from: Option<IpAddr>, user: Option<&str>) {
        if !self.on() {
            return;
        }
        let now = Instant::now();
        if let Some(ip) = from {
            self.addresses.fail(address_key(ip), self.policy, now);
        }
        if let Some(u) = user {
            self.users.fail(u.to_owned(), self.policy, now);
        }
    }

    pub(super) fn succeeded(&self, from: Option<IpAddr>, user: Option<&str>) {
        if !self.on() {
            return;
        }
        if let Some(ip) = from {
            self.addresses.clear(&address_key(ip));
        }
        if let Some(u) = user {
            self.users.clear(&u.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_failures: u32, window_ms: u64) -> LoginPolicy {
        LoginPolicy {
            max_failures,
            window: Duration::from_millis(window_ms),
        }
    }

    #[test]
    fn locks_after_max_failures_until_the_window_ends() {
        let l = LoginLimiter::new(policy(3, 200));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..2 {
            l.failed(Some(ip), None);
            assert_eq!(l.locked(Some(ip), None), None);
        }
        l.failed(Some(ip), None);
        let wait = l.locked(Some(ip), None).expect("locked after 3");
        assert!(wait <= Duration::from_millis(200));
        assert_eq!(l.locked(Some("192.0.2.8".parse().unwrap()), None), None);
        std::thread::sleep(Duration::from_millis(220));
        assert_eq!(l.locked(Some(ip), None), None, "a new window");
    }

    #[test]
    fn a_user_locks_from_any_address_and_success_clears() {
        let l = LoginLimiter::new(policy(2, 60_000));
        l.failed(Some("192.0.2.1".parse().unwrap()), Some("dev"));
        l.failed(Some("192.0.2.2".parse().unwrap()), Some("dev"));
        assert!(
            l.locked(Some("192.0.2.3".parse().unwrap()), Some("dev"))
                .is_some()
        );
        assert!(
            l.locked(Some("192.0.2.3".parse().unwrap()), Some("other"))
                .is_none()
        );
        l.succeeded(None, Some("dev"));
        assert!(l.locked(None, Some("dev")).is_none());
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_v4_as_v4() {
        let l = LoginLimiter::new(policy(2, 60_000));
        l.failed(Some("2001:db8::1".parse().unwrap()), None);
        l.failed(Some("2001:db8::ffff:2".parse().unwrap()), None);
        assert!(
            l.locked(Some("2001:db8::9".parse().unwrap()), None)
                .is_some()
        );
        assert!(
            l.locked(Some("2001:db8:0:1::9".parse().unwrap()), None)
                .is_none()
        );
        l.failed(Some("::ffff:192.0.2.9".parse().unwrap()), None);
        l.failed(Some("192.0.2.9".parse().unwrap()), None);
        assert!(l.locked(Some("192.0.2.9".parse().unwrap()), None).is_some());
    }

    #[test]
    fn the_tables_stay_bounded() {
        let l = LoginLimiter::new(policy(5, 60_000));
        for i in 0..(MAX_KEYS as u32 + 100) {
            l.failed(Some(IpAddr::V4(i.into())), None);
        }
        assert_eq!(l.addresses.len(), MAX_KEYS);
    }

    #[test]
    fn zero_turns_it_off() {
        let l = LoginLimiter::new(policy(0, 60_000));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..100 {
            l.failed(Some(ip), Some("u"));
        }
        assert_eq!(l.locked(Some(ip), Some("u")), None);
    }
}
