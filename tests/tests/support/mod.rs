//! Helpers shared by the end-to-end tests in this directory.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use meshgate_core::{Event, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A config on loopback port 0 (web and admin), memory backbone, anonymous allowed.
pub fn test_config() -> meshgate_config::Config {
    let mut c = meshgate_config::Config::default();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c
}

/// The `meshgate` binary next to this test executable (built by scripts/test.sh).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/meshgate
    let path = exe.parent().unwrap().parent().unwrap().join("meshgate");
    assert!(
        path.exists(),
        "{} not found: build it first with `cargo build --bin meshgate` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A running `meshgate` process; killed on drop.
pub struct Process {
    pub child: Child,
    pub web: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
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

    /// Sends a signal with the `kill` command (no unsafe code).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "meshgate did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn addr_in(line: &str, scheme: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(scheme)? + scheme.len()..];
    let end = rest.find('/').unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Spawns `meshgate run` with `args` and `env`, waits for its banner (stdout) and parses the
/// listener addresses from it.
pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
    let mut cmd = Command::new(binary());
    cmd.arg("run")
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut p = Process {
        child,
        web: None,
        admin: None,
        banner: Vec::new(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no complete banner from meshgate; got {:?}", p.banner));
        if line.starts_with("http ") || line.starts_with("websocket ") {
            p.web = p.web.or(addr_in(&line, "://"));
        }
        if line.starts_with("admin ") {
            p.admin = addr_in(&line, "://");
        }
        p.banner.push(line);
        if p.admin.is_some() {
            return p;
        }
    }
}

/// Connects a CloudEvents WebSocket client subscribed to `filters` and waits for the
/// gateway's `io.meshgate.subscribed` greeting.
pub async fn ws_connect(addr: SocketAddr, filters: &[&str]) -> Ws {
    let query: Vec<String> = filters
        .iter()
        .map(|f| format!("subscribe={}", f.replace('#', "%23")))
        .collect();
    let mut req = format!("ws://{addr}/ws?{}", query.join("&"))
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "cloudevents.json".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let greeting = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(greeting.ty(), "io.meshgate.subscribed");
    ws
}

/// The next event frame, or `Err(close code)` if the server closed, or panics on timeout.
pub async fn next_event(ws: &mut Ws, within: Duration) -> Result<Event, Option<u16>> {
    loop {
        match tokio::time::timeout(within, ws.next()).await {
            Err(_) => panic!("no websocket message within {within:?}"),
            Ok(None) => return Err(None),
            Ok(Some(Err(e))) => panic!("websocket error: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(json::decode(t.as_bytes()).unwrap()),
            Ok(Some(Ok(Message::Close(frame)))) => return Err(frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => continue,
        }
    }
}
