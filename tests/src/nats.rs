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

    /// Why the server closed each client connection it closed so far, besides those the
    /// client closed and the readiness probe's (`/connz?state=closed`), e.g. "Maximum Control Line Exceeded". Needs
    /// [`NatsServer::start_monitored`].
    pub async fn closed_by_server(&self) -> Vec<String> {
        let port = self
            .monitor
            .expect("closed_by_server needs NatsServer::start_monitored");
        let connz: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{port}/connz?state=closed"))
                .await
                .and_then(reqwest::Response::error_for_status)
                .expect("nats-server's /connz answers")
                .json()
                .await
                .expect("/connz is JSON");
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
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
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
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
