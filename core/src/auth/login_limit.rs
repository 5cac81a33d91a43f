//! Failed-login limits, per source address and per user.
//!
//! Each key (an address, or a user name — configured or not, so that the answers do not tell
//! which names exist) counts its failed logins in a fixed window; once it has `max_failures` in
//! the current window, further logins from that address or as that name are refused without
//! checking the credentials until the window ends — the right password too, or a guessing loop
//! would learn it from the different answer. An attempt is counted when it *starts*
//! ([`LoginLimiter::begin`]), in the same locked step as the check, so guesses sent in parallel
//! cannot all pass the check before any is counted; a success takes its own count back from the
//! address (other failures from it stay counted) and clears the user's. IPv6 addresses count by
//! their /64 (one host usually holds the whole prefix). Each table holds at most [`MAX_KEYS`]
//! keys: when full, windows that ended are dropped first, then the oldest one.

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

    /// Counts an attempt for `key` unless it is locked; how long it stays locked otherwise.
    fn begin(&self, key: K, policy: LoginPolicy, now: Instant) -> Result<(), Duration> {
        let Ok(mut windows) = self.windows.lock() else {
            return Ok(());
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
        let elapsed = now.saturating_duration_since(w.started);
        if elapsed >= policy.window {
            *w = Window {
                started: now,
                failures: 0,
            };
        } else if w.failures >= policy.max_failures {
            return Err(policy.window - elapsed);
        }
        w.failures = w.failures.saturating_add(1);
        Ok(())
    }

    /// Takes back one attempt counted by [`Table::begin`].
    fn undo(&self, key: &K) {
        if let Ok(mut windows) = self.windows.lock()
            && let Some(w) = windows.get_mut(key)
        {
            w.failures = w.failures.saturating_sub(1);
        }
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

    /// Starts a login from `from` as `user`: counted as a failure until it succeeds
    /// ([`LoginLimiter::succeeded`]) or ends for another reason ([`LoginLimiter::undo`]); how
    /// long to wait instead, when the address or the name is locked.
    pub(super) fn begin(&self, from: Option<IpAddr>, user: Option<&str>) -> Result<(), Duration> {
        if !self.on() {
            return Ok(());
        }
        let now = Instant::now();
        let address = from.map(address_key);
        if let Some(ip) = address {
            self.addresses.begin(ip, self.policy, now)?;
        }
        if let Some(u) = user
            && let Err(wait) = self.users.begin(u.to_owned(), self.policy, now)
        {
            if let Some(ip) = address {
                self.addresses.undo(&ip);
            }
            return Err(wait);
        }
        Ok(())
    }

    /// The login [`LoginLimiter::begin`] counted succeeded: its own count is taken back from
    /// the address (the address's other failures stay), and the user's count is cleared.
    pub(super) fn succeeded(&self, from: Option<IpAddr>, user: Option<&str>) {
        if !self.on() {
            return;
        }
        if let Some(ip) = from {
            self.addresses.undo(&address_key(ip));
        }
        if let Some(u) = user {
            self.users.clear(&u.to_owned());
        }
    }

    /// The login ended without saying anything of its credentials (busy): not counted.
    pub(super) fn undo(&self, from: Option<IpAddr>, user: Option<&str>) {
        if !self.on() {
            return;
        }
        if let Some(ip) = from {
            self.addresses.undo(&address_key(ip));
        }
        if let Some(u) = user {
            self.users.undo(&u.to_owned());
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

    fn fail(l: &LoginLimiter, ip: Option<IpAddr>, user: Option<&str>) -> Result<(), Duration> {
        l.begin(ip, user)
    }

    #[test]
    fn locks_after_max_failures_until_the_window_ends() {
        let l = LoginLimiter::new(policy(3, 200));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..3 {
            assert!(fail(&l, Some(ip), None).is_ok());
        }
        let wait = fail(&l, Some(ip), None).expect_err("locked after 3");
        assert!(wait <= Duration::from_millis(200));
        assert!(fail(&l, Some("192.0.2.8".parse().unwrap()), None).is_ok());
        std::thread::sleep(Duration::from_millis(220));
        assert!(fail(&l, Some(ip), None).is_ok(), "a new window");
    }

    #[test]
    fn a_user_locks_from_any_address_and_success_clears_only_its_own() {
        let l = LoginLimiter::new(policy(2, 60_000));
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "192.0.2.3".parse().unwrap(),
        );
        fail(&l, Some(a), Some("dev")).unwrap();
        fail(&l, Some(b), Some("dev")).unwrap();
        assert!(fail(&l, Some(c), Some("dev")).is_err());
        assert!(fail(&l, Some(c), Some("other")).is_ok());
        // `other` logs in from c: c's own count comes back, dev stays locked.
        l.succeeded(Some(c), Some("other"));
        assert!(fail(&l, Some(c), Some("dev")).is_err());
        l.succeeded(None, Some("dev"));
        assert!(fail(&l, None, Some("dev")).is_ok());
    }

    #[test]
    fn a_success_does_not_reset_the_failures_of_its_address() {
        let l = LoginLimiter::new(policy(3, 60_000));
        let ip: IpAddr = "192.0.2.5".parse().unwrap();
        for victim in ["v1", "v2"] {
            fail(&l, Some(ip), Some(victim)).unwrap();
        }
        // The attacker's own valid login in between.
        fail(&l, Some(ip), Some("mine")).unwrap();
        l.succeeded(Some(ip), Some("mine"));
        fail(&l, Some(ip), Some("v3")).unwrap();
        assert!(
            fail(&l, Some(ip), Some("v4")).is_err(),
            "3 failures stay counted"
        );
    }

    #[test]
    fn parallel_attempts_are_counted_before_they_are_checked() {
        let l = LoginLimiter::new(policy(5, 60_000));
        let ip: IpAddr = "192.0.2.6".parse().unwrap();
        // Many attempts begun before any ended: only five get through.
        let passed = (0..100)
            .filter(|_| l.begin(Some(ip), Some("dev")).is_ok())
            .count();
        assert_eq!(passed, 5);
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_v4_as_v4() {
        let l = LoginLimiter::new(policy(2, 60_000));
        fail(&l, Some("2001:db8::1".parse().unwrap()), None).unwrap();
        fail(&l, Some("2001:db8::ffff:2".parse().unwrap()), None).unwrap();
        assert!(fail(&l, Some("2001:db8::9".parse().unwrap()), None).is_err());
        assert!(fail(&l, Some("2001:db8:0:1::9".parse().unwrap()), None).is_ok());
        fail(&l, Some("::ffff:192.0.2.9".parse().unwrap()), None).unwrap();
        fail(&l, Some("192.0.2.9".parse().unwrap()), None).unwrap();
        assert!(fail(&l, Some("192.0.2.9".parse().unwrap()), None).is_err());
    }

    #[test]
    fn the_tables_stay_bounded() {
        let l = LoginLimiter::new(policy(5, 60_000));
        for i in 0..(MAX_KEYS as u32 + 100) {
            let _ = fail(&l, Some(IpAddr::V4(i.into())), None);
        }
        assert_eq!(l.addresses.len(), MAX_KEYS);
    }

    #[test]
    fn zero_turns_it_off() {
        let l = LoginLimiter::new(policy(0, 60_000));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..100 {
            assert!(fail(&l, Some(ip), Some("u")).is_ok());
        }
    }
}
