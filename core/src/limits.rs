//! Connection caps shared by every listener: per source address and per authenticated user.
//!
//! Each listener also has its own total cap (`mqtt.max_connections`, `http.max_connections`,
//! `websocket.max_connections`); these caps keep one address or one account from taking all of
//! it. A connection holds a [`ConnectionPermit`] for each cap it counts against; dropping the
//! permit gives the slot back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// What tungstenite collects before writing (a flush writes at once anyway). Its default is
/// 128 KiB; this much is plenty to batch the frames of one flush, and is what a connection
/// keeps after a burst.
pub const WEBSOCKET_WRITE_BUFFER: usize = 16 << 10;

/// Why a connection was refused by [`ConnectionLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("too many connections from this address (gateway.max_connections_per_ip)")]
    PerIp,
    #[error("too many connections for this user (gateway.max_connections_per_user)")]
    PerUser,
}

impl LimitError {
    /// The `kind` label this refusal is counted under in `meshgate_errors_total`.
    pub fn metric_kind(self) -> crate::metrics::ErrorKind {
        match self {
            LimitError::PerIp => crate::metrics::ErrorKind::ConnectionLimitIp,
            LimitError::PerUser => crate::metrics::ErrorKind::ConnectionLimitUser,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    User(Arc<str>),
}

/// Per-address and per-user connection counts of one gateway process. A limit of 0 is no limit.
/// The caps change in place on a config reload ([`ConnectionLimits::set_caps`]).
#[derive(Debug, Default)]
pub struct ConnectionLimits {
    per_ip: AtomicUsize,
    per_user: AtomicUsize,
    counts: Mutex<HashMap<Key, usize>>,
}

/// One slot of a [`ConnectionLimits`] cap, given back on drop. A permit of a disabled cap holds
/// nothing, as does the default one (a place for a permit to come).
#[derive(Debug, Default)]
#[must_use = "the slot is given back when the permit is dropped"]
pub struct ConnectionPermit {
    /// Boxed: every connection keeps its permits for its whole life, most with the caps off
    /// (`None`, 8 bytes instead of 32 — idle connection memory).
    held: Option<Box<(Arc<ConnectionLimits>, Key)>>,
}

impl ConnectionLimits {
    /// Caps of `per_ip` connections per source address and `per_user` per authenticated user
    /// (0: no cap).
    pub fn new(per_ip: usize, per_user: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            per_ip: AtomicUsize::new(per_ip),
            per_user: AtomicUsize::new(per_user),
            counts: Mutex::default(),
        })
    }

    /// New caps (a config reload): connections from then on are counted against them. Those
    /// already over a lowered cap stay connected; new ones are refused until they are under it.
    /// A cap turned on counts only connections made from then on.
    pub fn set_caps(&self, per_ip: usize, per_user: usize) {
        self.per_ip.store(per_ip, Ordering::Relaxed);
        self.per_user.store(per_user, Ordering::Relaxed);
    }

    /// No caps (tests, embedded use).
    pub fn unlimited() -> Arc<ConnectionLimits> {
        ConnectionLimits::new(0, 0)
    }

    /// A slot for a connection from `ip` (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn acquire_ip(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, LimitError> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.acquire(
            Key::Ip(ip),
            self.per_ip.load(Ordering::Relaxed),
            LimitError::PerIp,
        )
    }

    /// A slot for a connection authenticated as `user`. Anonymous clients are not counted here
    /// (they share no account; the per-address cap bounds them).
    pub fn acquire_user(
        self: &Arc<Self>,
        principal: &crate::auth::Principal,
    ) -> Result<ConnectionPermit, LimitError> {
        if principal.is_anonymous() {
            return Ok(ConnectionPermit { held: None });
        }
        self.acquire(
            Key::User(Arc::from(principal.name())),
            self.per_user.load(Ordering::Relaxed),
            LimitError::PerUser,
        )
    }

    fn acquire(
        self: &Arc<Self>,
        key: Key,
        limit: usize,
        refused: LimitError,
    ) -> Result<ConnectionPermit, LimitError> {
        if limit == 0 {
            return Ok(ConnectionPermit { held: None });
        }
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= limit {
            return Err(refused);
        }
        *n += 1;
        Ok(ConnectionPermit {
            held: Some(Box::new((self.clone(), key))),
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let Some((limits, key)) = self.held.take().map(|b| *b) else {
            return;
        };
        let mut counts = limits.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn per_ip_cap_refuses_past_the_limit_and_frees_on_drop() {
        let limits = ConnectionLimits::new(2, 0);
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let a = limits.acquire_ip(ip).expect("first");
        let _b = limits.acquire_ip(ip).expect("second");
        assert_eq!(limits.acquire_ip(ip).err(), Some(LimitError::PerIp));
        // The mapped form of the same address counts against the same cap.
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        assert_eq!(limits.acquire_ip(mapped).err(), Some(LimitError::PerIp));
        // Another address is not affected.
        let _c = limits
            .acquire_ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))
            .expect("other");
        drop(a);
        let _d = limits.acquire_ip(ip).expect("slot given back");
    }

    #[test]
    fn zero_is_no_limit_and_anonymous_is_not_counted_per_user() {
        let limits = ConnectionLimits::new(0, 1);
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let held: Vec<_> = (0..100)
            .map(|_| limits.acquire_ip(ip).expect("no cap"))
            .collect();
        assert_eq!(held.len(), 100);
        let anon = crate::auth::Principal::anonymous_for_tests();
        let _a1 = limits.acquire_user(&anon).expect("anonymous");
        let _a2 = limits.acquire_user(&anon).expect("anonymous again");
        assert!(limits.counts.lock().expect("lock").is_empty());
    }

    #[test]
    fn caps_change_in_place() {
        let limits = ConnectionLimits::new(1, 0);
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let first = limits.acquire_ip(ip).expect("first");
        assert!(limits.acquire_ip(ip).is_err());
        limits.set_caps(2, 0);
        let second = limits.acquire_ip(ip).expect("under the raised cap");
        limits.set_caps(1, 0);
        assert!(limits.acquire_ip(ip).is_err(), "over the lowered cap");
        drop((first, second));
        let _third = limits.acquire_ip(ip).expect("under it again");
    }
}
