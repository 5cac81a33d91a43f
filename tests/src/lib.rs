//! Helpers shared by meshgate's end-to-end tests (`tests/*.rs` in this crate):
//!
//! - an in-process gateway on loopback port 0 ([`test_config`], [`start_gateway`]);
//! - the real `meshgate` binary as a child process, with the addresses from its stdout banner
//!   ([`spawn`], [`Process`], [`parse_banner_line`]);
//! - CloudEvents WebSocket clients ([`ws_connect`], [`next_event`]);
//! - deadline polling ([`Deadline`]);
//! - headless Chromium driven over the DevTools protocol ([`chromium`]).
//!
//! Failing here means failing the test, so these helpers panic with a message that says what
//! was expected and what was seen instead.

pub mod amqp;
pub mod certs;
pub mod chromium;
pub mod mqtt311;
pub mod mqtt5;
pub mod nats;
pub mod sink;
pub mod triggers;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use meshgate_core::{Event, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket (also the DevTools connection to Chromium).
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The WebSocket subprotocol of the CloudEvents JSON binding.
pub const SUBPROTOCOL: &str = "cloudevents.json";

/// The embedded defaults with the web and admin listeners on loopback port 0, so that tests
/// can run in parallel: memory backbone, anonymous clients allowed.
pub fn test_config() -> meshgate_config::Config {
    let mut c = meshgate_config::Config::default();
    c.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c
}

/// A Mosquitto command-line client (`mosquitto_pub`, `mosquitto_sub`), failing with how to
/// install it when it is missing.
pub fn mosquitto_command(cmd: &str) -> std::process::Command {
    let path = format!("/usr/bin/{cmd}");
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} not found: install it with `apt-get install -y mosquitto-clients` (scripts/test.sh does)"
    );
    std::process::Command::new(path)
}

/// Starts a gateway in this process; its bound addresses are in `web_addr` / `admin_addr`.
pub async fn start_gateway(config: meshgate_config::Config) -> meshgate::RunningGateway {
    meshgate::start(config)
        .await
        .unwrap_or_else(|e| panic!("the gateway did not start: {e}"))
}

/// A point in time by which something must have happened; for polling loops without fixed
/// sleeps: `while !ready() { assert!(!d.passed(), "..."); d.pause().await }`.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    end: tokio::time::Instant,
    within: Duration,
}

impl Deadline {
    /// How often [`Deadline::pause`] lets a polling loop look again.
    pub const POLL: Duration = Duration::from_millis(50);

    pub fn after(within: Duration) -> Deadline {
        Deadline {
            end: tokio::time::Instant::now() + within,
            within,
        }
    }

    pub fn passed(&self) -> bool {
        tokio::time::Instant::now() >= self.end
    }

    /// The duration this deadline was set for (for messages).
    pub fn within(&self) -> Duration {
        self.within
    }

    pub fn remaining(&self) -> Duration {
        self.end
            .saturating_duration_since(tokio::time::Instant::now())
    }

    /// Sleeps one polling interval (less if the deadline is closer).
    pub async fn pause(&self) {
        tokio::time::sleep(Self::POLL.min(self.remaining())).await;
    }
}

/// The `meshgate` binary of this build: `target/<profile>/meshgate`, next to the `deps/`
/// directory holding the test executable. `cargo test` does not build other packages'
/// binaries, so scripts/test.sh runs `cargo build --bin meshgate` first. `MESHGATE_BIN`
/// overrides the path.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MESHGATE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/meshgate
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in target/<profile>/deps", exe.display()));
    let path = profile_dir.join(format!("meshgate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} not found: build it first with `cargo build --bin meshgate` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// One line of the banner `meshgate run` prints on stdout, e.g.
/// `websocket  ws://127.0.0.1:8080/ws`: its label (`websocket`), its first URL and the socket
/// address in that URL.
pub fn parse_banner_line(line: &str) -> Option<(&str, &str, Option<SocketAddr>)> {
    let mut words = line.split_whitespace();
    let label = words.next()?;
    let url = words.find(|w| w.contains("://"))?;
    let rest = &url[url.find("://")? + 3..];
    let addr = rest[..rest.find('/').unwrap_or(rest.len())].parse().ok();
    Some((label, url, addr))
}

/// A running `meshgate` process with the addresses from its banner; killed on drop.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    /// The web listener (HTTP ingress, WebSocket, browser page).
    pub web: Option<SocketAddr>,
    /// The WebSocket endpoint, e.g. `ws://127.0.0.1:41234/ws`.
    pub ws_url: Option<String>,
    pub mqtt: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The banner lines as printed.
    pub banner: Vec<String>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `INT`, ...) with the `kill` command (no unsafe code).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("the `kill` command runs");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }

    /// Waits for the process to exit; panics after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for meshgate") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "meshgate did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn take_banner_line(&mut self, line: String) {
        if let Some((label, url, addr)) = parse_banner_line(&line) {
            match label {
                "http" | "browser" => self.web = self.web.or(addr),
                "websocket" => {
                    self.web = self.web.or(addr);
                    self.ws_url = Some(url.to_owned());
                }
                "mqtt" => self.mqtt = addr,
                "admin" => self.admin = addr,
                _ => {}
            }
        }
        self.banner.push(line);
    }
}

/// Spawns `meshgate run` with `args` and `env` (stderr, the log, is inherited), waits for its
/// banner on stdout and parses the listener addresses from it. The banner ends with the
/// `admin` line, so the admin listener must be enabled.
pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
    spawn_logging_to(args, env, Stdio::inherit())
}

/// [`spawn`] with the log (stderr) going to `log`, e.g. a file the test reads afterwards.
pub fn spawn_logging_to(args: &[&str], env: &[(&str, &str)], log: impl Into<Stdio>) -> Process {
    let mut cmd = Command::new(binary());
    cmd.arg("run")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary().display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keeps reading after the banner so that the child never blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut p = Process {
        child,
        web: None,
        ws_url: None,
        mqtt: None,
        admin: None,
        banner: Vec::new(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while p.admin.is_none() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => p.take_banner_line(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!(
                    "no complete banner from meshgate in 20 s; got {:?}",
                    p.banner
                )
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = p.child.wait().map(|s| s.to_string()).unwrap_or_default();
                panic!(
                    "meshgate exited ({status}) before printing its banner; got {:?}",
                    p.banner
                )
            }
        }
    }
    p
}

/// Connects a CloudEvents WebSocket client (subprotocol `cloudevents.json`) subscribed to
/// `filters` and waits for the gateway's `io.meshgate.subscribed` greeting.
pub async fn ws_connect(addr: SocketAddr, filters: &[&str]) -> Ws {
    let query: Vec<String> = filters
        .iter()
        .map(|f| format!("subscribe={}", f.replace('%', "%25").replace('#', "%23")))
        .collect();
    let url = format!("ws://{addr}/ws?{}", query.join("&"));
    let mut req = url
        .as_str()
        .into_client_request()
        .unwrap_or_else(|e| panic!("bad WebSocket URL {url}: {e}"));
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        SUBPROTOCOL.parse().expect("a valid header value"),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("WebSocket handshake with {url} failed: {e}"));
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some(SUBPROTOCOL),
        "the gateway echoes the subprotocol"
    );
    let greeting = next_event(&mut ws, Duration::from_secs(10))
        .await
        .unwrap_or_else(|code| panic!("{url} closed ({code:?}) before its greeting"));
    assert_eq!(
        greeting.ty(),
        "io.meshgate.subscribed",
        "first frame on {url}"
    );
    ws
}

/// The next event frame; `Err(close code)` if the server closed (`None`: without a close
/// frame). Panics on a timeout, a socket error or a frame that is not a CloudEvent.
pub async fn next_event(ws: &mut Ws, within: Duration) -> Result<Event, Option<u16>> {
    let deadline = Deadline::after(within);
    loop {
        match tokio::time::timeout(deadline.remaining(), ws.next()).await {
            Err(_) => panic!("no WebSocket message within {within:?}"),
            Ok(None) => return Err(None),
            Ok(Some(Err(e))) => panic!("WebSocket error: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => {
                return Ok(json::decode(t.as_bytes()).unwrap_or_else(|e| {
                    panic!(
                        "frame is not a JSON-format CloudEvent ({e}): {}",
                        t.as_str()
                    )
                }));
            }
            Ok(Some(Ok(Message::Close(frame)))) => return Err(frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// A request to the admin API (`Authorization: Bearer <token>` when given): the status and
/// the JSON body (`Null` when there is none or it is not JSON).
pub async fn admin_call(
    method: reqwest::Method,
    admin: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new().request(method, format!("http://{admin}{path}"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("admin API {path}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// Posts a structured CloudEvent whose `data` is the JSON string `data`; the status and body.
pub async fn post_data(
    web: SocketAddr,
    topic: &str,
    id: &str,
    data: &str,
) -> (reqwest::StatusCode, String) {
    let event = serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": "/test",
        "type": "t",
        "data": data,
    });
    let response = reqwest::Client::new()
        .post(format!("http://{web}/events/{topic}"))
        .header("content-type", "application/cloudevents+json")
        .body(event.to_string())
        .send()
        .await
        .expect("the gateway answers the POST");
    let status = response.status();
    (
        status,
        response.text().await.expect("the answer's body is read"),
    )
}

/// The gateway's Prometheus text from its admin listener.
pub async fn metrics(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap_or_else(|e| panic!("GET /metrics on {admin}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("reading /metrics on {admin}: {e}"))
}

/// Waits (up to 10 s) until the gateway's /metrics contains `needle`, e.g. a subscription
/// count, so a test publishes only once its subscribers exist.
pub async fn wait_metric(admin: SocketAddr, needle: &str) {
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let m = metrics(admin).await;
        if m.contains(needle) {
            return;
        }
        assert!(
            !d.passed(),
            "`{needle}` not in /metrics within {:?}:\n{m}",
            d.within()
        );
        d.pause().await;
    }
}

/// A `[[auth.users]]` user who logs in with the token `<name>-token-0123456789`, may publish
/// on `publish` and subscribe to `subscribe`.
pub fn token_user(
    name: &str,
    publish: Vec<String>,
    subscribe: Vec<String>,
) -> meshgate_config::UserConfig {
    meshgate_config::UserConfig {
        name: name.into(),
        password: None,
        certificate: false,
        tokens: vec![format!("{name}-token-0123456789")],
        acl: meshgate_config::AclConfig {
            publish,
            subscribe,
            ..meshgate_config::AclConfig::default()
        },
    }
}

/// A subscription straight on `gw`'s backbone: what the gateway itself publishes (a
/// trigger's replies and dead letters) or stores, without a protocol client in between.
pub async fn bus_subscribe(
    gw: &meshgate::RunningGateway,
    filter: &str,
) -> meshgate_core::Subscription {
    gw.backbone()
        .subscribe(
            meshgate_core::TopicFilter::parse(filter)
                .unwrap_or_else(|e| panic!("filter {filter}: {e}")),
            meshgate_core::SubscribeOptions::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("subscribing to {filter}: {e}"))
}

/// The next delivery of `sub` within `within`; panics naming `what` otherwise.
pub async fn next_delivery(
    sub: &mut meshgate_core::Subscription,
    within: Duration,
    what: &str,
) -> meshgate_core::Delivery {
    tokio::time::timeout(within, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
        .unwrap_or_else(|| panic!("the subscription ended before {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_lines() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        assert_eq!(
            parse_banner_line("websocket  ws://127.0.0.1:8080/ws"),
            Some(("websocket", "ws://127.0.0.1:8080/ws", Some(addr)))
        );
        assert_eq!(
            parse_banner_line("http       POST http://127.0.0.1:8080/events/{topic}"),
            Some(("http", "http://127.0.0.1:8080/events/{topic}", Some(addr)))
        );
        assert_eq!(
            parse_banner_line("mqtt       mqtt://127.0.0.1:8080").map(|l| l.2),
            Some(Some(addr))
        );
        assert_eq!(
            parse_banner_line("admin      http://[::1]:9090/healthz /readyz /metrics")
                .and_then(|l| l.2),
            "[::1]:9090".parse().ok()
        );
        assert_eq!(
            parse_banner_line("meshgate 0.1.0 instance x backbone memory"),
            None
        );
    }
}
