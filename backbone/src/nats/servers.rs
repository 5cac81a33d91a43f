//! The servers the client may connect to: the configured URLs (`backbone.nats.urls`, kept for
//! good) and the cluster's other servers as the servers announce them (`connect_urls` in their
//! `INFO`, at connect and whenever the cluster changes). One seed URL therefore finds the whole
//! cluster, and a node that goes away is left for one that is there.
//!
//! What a server announces is hostile input: an entry must parse as `host:port` and at most
//! [`MAX_DISCOVERED`] are kept.

use super::connector::parse_url;

/// Servers learnt from `connect_urls` kept at most (a NATS cluster has a handful of nodes;
/// a server announcing thousands must not grow the pool without bound).
pub(super) const MAX_DISCOVERED: usize = 64;

/// Longest announced URL taken (a `host:port`).
const MAX_URL_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Server {
    url: String,
    /// `(host, port)`, what two spellings of one server share.
    addr: (String, u16),
    /// Learnt from a server (dropped once the cluster stops announcing it), not configured.
    discovered: bool,
}

/// The configured and the discovered servers, in the order they are tried.
#[derive(Debug)]
pub(super) struct ServerPool {
    servers: Vec<Server>,
    /// Where [`ServerPool::next`] goes on from.
    cursor: usize,
}

impl ServerPool {
    /// The configured URLs (invalid ones are kept as they are: connecting to them says why),
    /// tried from a random one on, so that instances configured alike spread over the cluster.
    pub(super) fn new(configured: &[String]) -> ServerPool {
        let servers = configured
            .iter()
            .map(|url| Server {
                url: url.clone(),
                addr: parse_url(url)
                    .map(|(_, host, port)| (host, port))
                    .unwrap_or_else(|_| (url.clone(), 0)),
                discovered: false,
            })
            .collect::<Vec<_>>();
        let cursor = if servers.len() > 1 {
            fastrand::usize(..servers.len())
        } else {
            0
        };
        ServerPool { servers, cursor }
    }

    pub(super) fn len(&self) -> usize {
        self.servers.len()
    }

    /// The server to try next, other than `avoid` when there is another (the one just left:
    /// in lame-duck mode, or just lost).
    pub(super) fn next(&mut self, avoid: Option<&str>) -> Option<String> {
        let n = self.servers.len();
        for _ in 0..n {
            let server = &self.servers[self.cursor % n];
            self.cursor = (self.cursor + 1) % n;
            if n == 1 || avoid != Some(server.url.as_str()) {
                return Some(server.url.clone());
            }
        }
        None
    }

    /// Takes a server's `connect_urls` (`host:port` each, as nats-server announces its cluster's
    /// client listeners), learnt while connected to `current`: adds the new ones (with
    /// `current`'s scheme, so a TLS cluster stays TLS) and drops discovered ones no longer
    /// announced, but never `current` nor a configured one. Returns how many were added.
    pub(super) fn learn(&mut self, connect_urls: &[String], current: &str) -> usize {
        if connect_urls.is_empty() {
            // (A server that announces nothing: not in a cluster, or told not to.)
            return 0;
        }
        let tls = current.starts_with("tls://");
        let announced: Vec<(String, (String, u16))> = connect_urls
            .iter()
            .filter(|u| u.len() <= MAX_URL_LEN)
            .filter_map(|u| {
                let bare = u
                    .strip_prefix("nats://")
                    .or_else(|| u.strip_prefix("tls://"))
                    .unwrap_or(u);
                let (_, host, port) = parse_url(bare).ok()?;
                let url = format!("{}://{bare}", if tls { "tls" } else { "nats" });
                Some((url, (host, port)))
            })
            .collect();
        let current_addr = parse_url(current).ok().map(|(_, h, p)| (h, p));
        let before = self.servers.len();
        self.servers.retain(|s| {
            !s.discovered
                || s.url == current
                || Some(&s.addr) == current_addr.as_ref()
                || announced.iter().any(|(_, addr)| *addr == s.addr)
        });
        let kept = self.servers.len();
        let mut added = 0;
        for (url, addr) in announced {
            let discovered = self.servers.iter().filter(|s| s.discovered).count();
            if discovered >= MAX_DISCOVERED {
                break;
            }
            if self.servers.iter().all(|s| s.addr != addr) {
                self.servers.push(Server {
                    url,
                    addr,
                    discovered: true,
                });
                added += 1;
            }
        }
        if kept != before && !self.servers.is_empty() {
            self.cursor %= self.servers.len();
        }
        added
    }

    /// Every URL, configured first (for logs and tests).
    pub(super) fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.url.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn one_seed_learns_the_cluster_and_forgets_nodes_no_longer_announced() {
        let mut pool = ServerPool::new(&urls(&["nats://127.0.0.1:4222"]));
        let added = pool.learn(
            &urls(&["127.0.0.1:4222", "127.0.0.1:4223", "127.0.0.1:4224"]),
            "nats://127.0.0.1:4222",
        );
        assert_eq!(added, 2);
        assert_eq!(
            pool.urls(),
            urls(&[
                "nats://127.0.0.1:4222",
                "nats://127.0.0.1:4223",
                "nats://127.0.0.1:4224"
            ])
        );
        // 4224 went away (lame duck, or removed): forgotten; the seed never is.
        pool.learn(&urls(&["127.0.0.1:4223"]), "nats://127.0.0.1:4223");
        assert_eq!(
            pool.urls(),
            urls(&["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"])
        );
        // An empty list (a server outside any cluster) changes nothing.
        assert_eq!(pool.learn(&[], "nats://127.0.0.1:4223"), 0);
        assert_eq!(pool.len(), 2);
    }

    #[test]
    fn next_goes_round_and_avoids_the_server_just_left() {
        let mut pool = ServerPool::new(&urls(&["a:1", "b:2", "c:3"]));
        let mut seen: Vec<String> = (0..3).filter_map(|_| pool.next(None)).collect();
        seen.sort();
        assert_eq!(seen, urls(&["a:1", "b:2", "c:3"]));
        for _ in 0..10 {
            assert_ne!(pool.next(Some("b:2")).as_deref(), Some("b:2"));
        }
        // The only server is tried even when it is the one to avoid.
        let mut single = ServerPool::new(&urls(&["a:1"]));
        assert_eq!(single.next(Some("a:1")).as_deref(), Some("a:1"));
    }

    #[test]
    fn announced_garbage_is_skipped_and_the_pool_is_bounded() {
        let mut pool = ServerPool::new(&urls(&["tls://seed:4222"]));
        let mut announced = urls(&["", "no-port:x", "user@host:1", &"h".repeat(300)]);
        announced.extend((0..1000).map(|i| format!("10.0.{}.{}:4222", i / 256, i % 256)));
        pool.learn(&announced, "tls://seed:4222");
        assert_eq!(pool.len(), 1 + MAX_DISCOVERED);
        // Discovered servers keep the scheme of the one that announced them.
        assert!(
            pool.urls()[1..]
                .iter()
                .all(|u| u.starts_with("tls://10.0."))
        );
    }

    #[test]
    fn the_same_server_spelt_twice_is_one_entry() {
        let mut pool = ServerPool::new(&urls(&["nats://127.0.0.1:4222", "127.0.0.1:4223"]));
        pool.learn(
            &urls(&["127.0.0.1:4222", "nats://127.0.0.1:4223"]),
            "nats://127.0.0.1:4222",
        );
        assert_eq!(pool.len(), 2);
    }
}
