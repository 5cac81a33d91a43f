//! A `nats-server -js` per test, on a free port with its own store directory, so a test can
//! kill and restart it (Debian package `nats-server`; scripts/test.sh installs it). Extra
//! command-line arguments ([`NatsServer::start_with`], e.g. `--user`/`--pass`, `--auth`) or a
//! configuration file ([`NatsServer::start_with_config`], e.g. `max_payload: 4096`) go with it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server; killed and its store removed on drop.
#[derive(Debug)]
pub struct NatsServer {
    pub port: u16,
    dir: PathBuf,
    /// Given on every (re)start after the address, port and JetStream options.
    extra_args: Vec<String>,
    child: Option<Child>,
    /// The HTTP monitoring port, if started with one.
    monitor: Option<u16>,
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn binary() -> &'static str {
    for path in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(path).exists() {
            return path;
        }
    }
    panic!(
        "nats-server not found: install it with `apt-get install -y nats-server` (scripts/test.sh does)"
    );
}

impl NatsServer {
    /// Starts a server with JetStream on a free port.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// Starts a server with JetStream on a free port and `args` besides, e.g.
    /// `["--user", "mg", "--pass", "secret"]` or `["--auth", "token"]` (see `nats-server --help`).
    pub fn start_with(args: &[&str]) -> NatsServer {
        let mut server = NatsServer::prepare();
        server.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
        server.first_start();
        server
    }

    /// The first start: when the server exits before listening because another process took
    /// one of its ports between [`free_port`] and its bind, again on new ports (up to 5 times).
    fn first_start(&mut self) {
        for attempt in 1..=5 {
            match self.try_restart() {
                Ok(()) => return,
                Err(e) if attempt == 5 => panic!("{e}"),
                Err(_) => {
                    self.port = free_port();
                    if let Some(old) = self.monitor {
                        let mut new = free_port();
                        while new == self.port {
                            new = free_port();
                        }
                        for a in &mut self.extra_args {
                            if *a == old.to_string() {
                                *a = new.to_string();
                            }
                        }
                        self.monitor = Some(new);
                    }
                }
            }
        }
    }

    /// Starts a server with JetStream on a free port and a configuration file holding `config`
    /// (nats-server's format, e.g. `max_payload: 4096`); the command line's address, port and
    /// store directory take precedence over the file's.
    pub fn start_with_config(config: &str) -> NatsServer {
        let mut server = NatsServer::prepare();
        let file = server.dir.join("nats-server.conf");
        std::fs::write(&file, config).expect("the nats-server configuration file is written");
        server.extra_args = vec!["-c".to_owned(), file.display().to_string()];
        server.first_start();
        server
    }

    /// A free port and an empty store directory; not started.
    fn prepare() -> NatsServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("meshgate-nats-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a store directory");
        NatsServer {
            port,
            dir,
            extra_args: Vec::new(),
            child: None,
            monitor: None,
        }
    }

    /// Starts a server with JetStream and its HTTP monitoring on free ports (for
    /// [`NatsServer::closed_by_server`]).
    pub fn start_monitored() -> NatsServer {
        let mut server = NatsServer::prepare();
        // Two calls of `free_port` can return the same port (it was given back in between).
        let mut monitor = free_port();
        while monitor == server.port {
            monitor = free_port();
        }
        server.extra_args = vec!["-m".to_owned(), monitor.to_string()];
        server.monitor = Some(monitor);
        server.first_start();
        server
    }

    /// A page of the server's monitoring endpoint (`path` with its query), as JSON. Needs
    /// [`NatsServer::start_monitored`].
    async fn monitor_json(&self, path: &str) -> serde_json::Value {
        let port = self
            .monitor
            .unwrap_or_else(|| panic!("{path} needs NatsServer::start_monitored"));
        reqwest::get(format!("http://127.0.0.1:{port}{path}"))
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("nats-server's {path} answers: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("{path} is JSON: {e}"))
    }

    /// Why the server closed each client connection it closed so far, besides those the
    /// client closed and the readiness probe's (`/connz?state=closed`), e.g. "Maximum Control Line Exceeded". Needs
    /// [`NatsServer::start_monitored`].
    pub async fn closed_by_server(&self) -> Vec<String> {
        let connz = self.monitor_json("/connz?state=closed").await;
        connz["connections"]
            .as_array()
            .map(|list| {
                list.iter()
                    // A connection that never sent a byte is `restart`'s readiness probe (it
                    // connects and drops: "Read Error"); it cannot have sent a bad line.
                    .filter(|c| c["in_bytes"].as_u64() != Some(0))
                    .map(|c| c["reason"].as_str().unwrap_or_default().to_owned())
                    .filter(|reason| reason != "Client Closed")
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The subscriptions the server holds on subjects starting with `prefix`, as (subject,
    /// queue group), sorted (`/subsz`). Needs [`NatsServer::start_monitored`].
    pub async fn subscriptions(&self, prefix: &str) -> Vec<(String, Option<String>)> {
        let subsz = self.monitor_json("/subsz?subs=1&limit=100000").await;
        let mut found: Vec<(String, Option<String>)> = subsz["subscriptions_list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let subject = s["subject"].as_str()?;
                subject
                    .starts_with(prefix)
                    .then(|| (subject.to_owned(), s["qgroup"].as_str().map(str::to_owned)))
            })
            .collect();
        found.sort();
        found
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (a name `kill -s` knows: `STOP`, `CONT`, …) to the server. `STOP` leaves its
    /// connections open while it reads nothing: what clients write waits in the socket buffers,
    /// and is lost if the server is then killed.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("nats-server is running").id();
        let status = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -s {signal} {pid}: {status}");
    }

    /// Starts it again on the same port and store (after [`NatsServer::kill`]).
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    /// [`NatsServer::restart`]; `Err` when the server exits before listening.
    fn try_restart(&mut self) -> Result<(), String> {
        self.kill();
        let child = Command::new(binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers_as_nats() {
            // A bad argument or configuration file makes it exit at once: say so now.
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "nats-server {:?} exited ({status}) before listening on {}",
                    self.extra_args, self.port
                ));
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Whether what listens on the port is a nats-server: it greets with `INFO`. Another
    /// process may have bound the port between [`free_port`] and the server's bind (a gateway
    /// listening on port 0 in a test running alongside gets ports from the same range): the
    /// server then exits, and a bare connect would take that listener for it (a CI run's
    /// gateway waited 5 s for NATS on an HTTP listener).
    fn answers_as_nats(&self) -> bool {
        use std::io::Read;
        let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
        let mut greeting = [0u8; 5];
        socket.read_exact(&mut greeting).is_ok() && &greeting == b"INFO "
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster of `nats-server -js` nodes on loopback, routed to each other, each with its own
/// store directory, client port and HTTP monitoring port (for [`NatsCluster::meta_leader`]
/// and [`NatsCluster::clients_of`]). Lame-duck mode: `lame_duck_duration` 30 s (the least
/// nats-server 2.9 takes), a grace period of 1 s.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits until JetStream has a meta leader. Again on new ports when a
    /// node exits before listening (a port taken between choosing it and the bind), up to 5 times.
    pub async fn start(n: usize) -> NatsCluster {
        for attempt in 1..=5 {
            match NatsCluster::try_start(n) {
                Ok(cluster) => {
                    cluster.wait_for_meta_leader(Duration::from_secs(30)).await;
                    return cluster;
                }
                Err(e) if attempt == 5 => panic!("{e}"),
                Err(_) => {}
            }
        }
        unreachable!()
    }

    fn try_start(n: usize) -> Result<NatsCluster, String> {
        let mut taken = std::collections::HashSet::new();
        let mut port = || loop {
            let p = free_port();
            if taken.insert(p) {
                return p;
            }
        };
        let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (port(), port(), port())).collect();
        let routes = ports
            .iter()
            .map(|(_, route, _)| format!("nats-route://127.0.0.1:{route}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, (client, route, monitor)) in ports.iter().enumerate() {
            let mut node = NatsServer::prepare();
            node.port = *client;
            node.monitor = Some(*monitor);
            let file = node.dir.join("nats-server.conf");
            let config = format!(
                "server_name: n{i}\nhttp: \"127.0.0.1:{monitor}\"\n\
                 lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"1s\"\n\
                 cluster {{\n  name: meshgate-test\n  listen: \"127.0.0.1:{route}\"\n  \
                 routes: [{routes}]\n}}\n"
            );
            std::fs::write(&file, config).map_err(|e| format!("{}: {e}", file.display()))?;
            node.extra_args = vec!["-c".to_owned(), file.display().to_string()];
            node.try_restart()?;
            nodes.push(node);
        }
        Ok(NatsCluster { nodes })
    }

    /// Every node's client URL, `nats://127.0.0.1:<port>`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// GET `path` (e.g. `/jsz`) from node `i`'s monitoring listener; `None` when it does not
    /// answer (killed).
    pub async fn monitor(&self, i: usize, path: &str) -> Option<serde_json::Value> {
        let port = self.nodes[i].monitor?;
        self.nodes[i].child.as_ref()?;
        let response = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// The index of the node that is the JetStream meta leader, as a running node reports it.
    pub async fn meta_leader(&self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            let Some(jsz) = self.monitor(i, "/jsz").await else {
                continue;
            };
            if let Some(leader) = jsz["meta_cluster"]["leader"].as_str()
                && let Some(n) = leader
                    .strip_prefix('n')
                    .and_then(|n| n.parse::<usize>().ok())
                && n < self.nodes.len()
                && self.nodes[n].child.is_some()
            {
                return Some(n);
            }
        }
        None
    }

    /// Waits until a running node names a running meta leader.
    pub async fn wait_for_meta_leader(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(leader) = self.meta_leader().await {
                return leader;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the NATS cluster has no JetStream meta leader after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many client connections named `name` node `i` has (0 when it does not answer).
    pub async fn clients_of(&self, i: usize, name: &str) -> usize {
        let Some(connz) = self.monitor(i, "/connz?limit=1024").await else {
            return 0;
        };
        connz["connections"].as_array().map_or(0, |list| {
            list.iter()
                .filter(|c| c["name"].as_str() == Some(name))
                .count()
        })
    }

    /// Puts node `i` into lame-duck mode (`nats-server --signal ldm=<pid>`): it tells its
    /// clients (`"ldm": true` in INFO), takes no new ones, and closes those left after the
    /// grace period, spread over `lame_duck_duration`, then exits.
    pub fn lame_duck(&self, i: usize) {
        let pid = self.nodes[i]
            .child
            .as_ref()
            .expect("the node is running")
            .id();
        let status = Command::new(binary())
            .args(["--signal", &format!("ldm={pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("nats-server --signal runs");
        assert!(status.success(), "nats-server --signal ldm={pid}: {status}");
    }
}
