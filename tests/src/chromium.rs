//! Headless Chromium driven over the Chrome DevTools Protocol (CDP), with nothing but
//! `reqwest` and `tokio-tungstenite`:
//!
//! 1. [`Browser::launch`] starts `/usr/bin/chromium --headless --remote-debugging-port=0` with a
//!    fresh profile directory and the page URL, in a process group of its own;
//! 2. Chromium writes the port it chose to `<profile>/DevToolsActivePort`;
//! 3. `GET http://127.0.0.1:<port>/json/list` lists the targets; the page's entry has a
//!    `webSocketDebuggerUrl`;
//! 4. [`Page`] speaks CDP over that WebSocket: JSON requests `{id, method, params}`, answered
//!    by `{id, result}` or `{id, error}`, interleaved with notifications `{method, params}`
//!    (console messages and exceptions are kept for failure messages).
//!
//! Dropping the [`Browser`] kills Chromium's whole process group and removes the profile.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{Deadline, Ws};

pub const CHROMIUM: &str = "/usr/bin/chromium";
const INSTALL: &str = "install Chromium: apt-get install -y chromium";
/// How long Chromium may take to start and show the page.
const STARTUP: Duration = Duration::from_secs(30);
/// How long one DevTools command may take.
const COMMAND: Duration = Duration::from_secs(10);
/// Lines of Chromium's stderr and of the page's console kept for failure messages.
const KEEP_LINES: usize = 40;

/// A directory removed (with everything in it) on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory under the system temp dir.
    fn fresh(prefix: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Processes that are still exiting may write into it for a moment.
        for _ in 0..40 {
            match std::fs::remove_dir_all(&self.0) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(25));
                }
                _ => return,
            }
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

/// A headless Chromium with a profile of its own (so that it never hands the URL to another
/// running instance); killed, with its helper processes, and cleaned up on drop.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    stderr: Arc<Mutex<VecDeque<String>>>,
    // Dropped after `Drop::drop` killed the processes using it.
    profile: TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Renderer, GPU and utility processes share the browser's process group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts Chromium showing `url`. Fails (never skips) when Chromium is not installed.
    pub fn launch(url: &str) -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: {INSTALL}"
        );
        let profile = TempDir::fresh("meshgate-chromium");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM} ({e}): {INSTALL}"));
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let keep = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut lines) = keep.lock() {
                        if lines.len() == KEEP_LINES {
                            lines.pop_front();
                        }
                        lines.push_back(line);
                    }
                }
            });
        }
        Browser {
            child,
            stderr,
            profile,
        }
    }

    /// Whether Chromium exited, and what it last said on stderr.
    pub fn diagnostics(&mut self) -> String {
        let state = match self.child.try_wait() {
            Ok(Some(status)) => format!("Chromium exited: {status}"),
            Ok(None) => "Chromium is running".to_owned(),
            Err(e) => format!("Chromium state unknown: {e}"),
        };
        let lines = self
            .stderr
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n  "))
            .unwrap_or_default();
        format!("{state}; its stderr ends with:\n  {lines}")
    }

    /// The DevTools port Chromium chose, from `<profile>/DevToolsActivePort` (the port, then
    /// the browser target's path).
    pub async fn devtools_port(&mut self) -> u16 {
        let file = self.profile.0.join("DevToolsActivePort");
        let deadline = Deadline::after(STARTUP);
        loop {
            // Both lines present: the file is complete.
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(_)) = (lines.next(), lines.next())
                    && let Ok(port) = port.trim().parse()
                {
                    return port;
                }
            }
            if deadline.passed() || matches!(self.child.try_wait(), Ok(Some(_))) {
                panic!(
                    "Chromium wrote no {} within {:?}. {}",
                    file.display(),
                    deadline.within(),
                    self.diagnostics()
                );
            }
            deadline.pause().await;
        }
    }

    /// Attaches to the page target showing `url` (once Chromium lists it).
    pub async fn page(&mut self, url: &str) -> Page {
        let port = self.devtools_port().await;
        let list_url = format!("http://127.0.0.1:{port}/json/list");
        let deadline = Deadline::after(STARTUP);
        let target = loop {
            let last = match reqwest::get(&list_url).await {
                Ok(r) => match r.json::<Vec<Value>>().await {
                    Ok(targets) => {
                        let found = targets.iter().find(|t| {
                            t["type"] == "page" && t["url"].as_str().is_some_and(|u| u == url)
                        });
                        if let Some(t) = found {
                            break t.clone();
                        }
                        serde_json::to_string_pretty(&targets).unwrap_or_default()
                    }
                    Err(e) => format!("bad JSON: {e}"),
                },
                Err(e) => e.to_string(),
            };
            if deadline.passed() {
                panic!(
                    "Chromium shows no page target for {url} within {:?}; {list_url} said: {last}\n{}",
                    deadline.within(),
                    self.diagnostics()
                );
            }
            deadline.pause().await;
        };
        let ws_url = target["webSocketDebuggerUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("page target without webSocketDebuggerUrl: {target}"));
        Page::attach(ws_url).await
    }
}

/// A DevTools Protocol session with one page.
#[derive(Debug)]
pub struct Page {
    ws: Ws,
    next_id: u64,
    /// Console messages, exceptions and log entries of the page, latest last.
    console: VecDeque<String>,
}

impl Page {
    /// Connects to a page target's `webSocketDebuggerUrl` and starts collecting the page's
    /// console output and exceptions.
    pub async fn attach(ws_url: &str) -> Page {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to DevTools at {ws_url}: {e}"));
        let mut page = Page {
            ws,
            next_id: 1,
            console: VecDeque::new(),
        };
        for domain in ["Runtime.enable", "Log.enable"] {
            if let Err(e) = page.call(domain, json!({})).await {
                panic!("DevTools {domain} failed: {e}");
            }
        }
        page
    }

    fn note(&mut self, line: String) {
        if self.console.len() == KEEP_LINES {
            self.console.pop_front();
        }
        self.console.push_back(line);
    }

    /// Keeps what a notification says about the page's health.
    fn notification(&mut self, method: &str, params: &Value) {
        match method {
            "Runtime.consoleAPICalled" => {
                let args: Vec<String> = params["args"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|v| match &v["value"] {
                                Value::String(s) => s.clone(),
                                Value::Null => v["description"].as_str().unwrap_or("").to_owned(),
                                other => other.to_string(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let line = format!(
                    "console.{}: {}",
                    params["type"].as_str().unwrap_or("log"),
                    args.join(" ")
                );
                self.note(line);
            }
            "Runtime.exceptionThrown" => {
                let d = &params["exceptionDetails"];
                let text = d["exception"]["description"]
                    .as_str()
                    .or(d["text"].as_str())
                    .unwrap_or("?");
                self.note(format!("uncaught exception: {text}"));
            }
            "Log.entryAdded" => {
                let e = &params["entry"];
                let line = format!(
                    "{} {}: {}",
                    e["source"].as_str().unwrap_or("?"),
                    e["level"].as_str().unwrap_or("?"),
                    e["text"].as_str().unwrap_or("")
                );
                self.note(line);
            }
            "Inspector.detached" => self.note(format!("DevTools detached: {params}")),
            _ => {}
        }
    }

    /// Sends one CDP command and returns its `result`, or its `error` as text.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::Text(request.to_string().into()))
            .await
            .map_err(|e| format!("cannot send {method} to DevTools: {e}"))?;
        let deadline = Deadline::after(COMMAND);
        loop {
            let msg = match tokio::time::timeout(deadline.remaining(), self.ws.next()).await {
                Err(_) => {
                    return Err(format!(
                        "DevTools did not answer {method} within {COMMAND:?}"
                    ));
                }
                Ok(None) => return Err("the DevTools connection closed".to_owned()),
                Ok(Some(Err(e))) => return Err(format!("DevTools connection failed: {e}")),
                Ok(Some(Ok(msg))) => msg,
            };
            let Message::Text(text) = msg else { continue };
            let Ok(mut v) = serde_json::from_str::<Value>(text.as_str()) else {
                continue;
            };
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    return Err(format!("{method}: {e}"));
                }
                return Ok(v["result"].take());
            }
            if let Some(m) = v["method"].as_str().map(str::to_owned) {
                self.notification(&m, &v["params"]);
            }
        }
    }

    /// Evaluates a JavaScript expression in the page (awaiting it if it is a promise) and
    /// returns its value as JSON (`null` for `undefined`), or the exception it threw.
    pub async fn try_eval(&mut self, expression: &str) -> Result<Value, String> {
        let mut result = self
            .call(
                "Runtime.evaluate",
                json!({
                    "expression": expression,
                    "returnByValue": true,
                    "awaitPromise": true,
                    "userGesture": true,
                }),
            )
            .await?;
        if let Some(e) = result.get("exceptionDetails") {
            let text = e["exception"]["description"]
                .as_str()
                .or(e["text"].as_str())
                .unwrap_or("exception");
            return Err(format!("the page threw: {text}"));
        }
        Ok(result["result"]["value"].take())
    }

    /// [`Page::try_eval`], panicking (with the page's text) on an exception.
    pub async fn eval(&mut self, expression: &str) -> Value {
        match self.try_eval(expression).await {
            Ok(v) => v,
            Err(e) => {
                let context = self.context().await;
                panic!("evaluating `{expression}` failed: {e}\n{context}")
            }
        }
    }

    /// The page's visible text and its recent console output, for failure messages.
    pub async fn context(&mut self) -> String {
        let text = match self
            .try_eval("document.body ? document.body.innerText : ''")
            .await
        {
            Ok(Value::String(s)) => s,
            Ok(other) => other.to_string(),
            Err(e) => format!("(unavailable: {e})"),
        };
        let console: Vec<&str> = self.console.iter().map(String::as_str).collect();
        format!(
            "--- page text ---\n{text}\n--- page console ---\n{}\n---",
            console.join("\n")
        )
    }

    /// Evaluates `expression` until `accept` likes its value and returns that value; panics
    /// after `within` with the last value (or error), the page's text and console.
    pub async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        within: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Deadline::after(within);
        loop {
            let last = match self.try_eval(expression).await {
                Ok(v) if accept(&v) => return v,
                Ok(v) => v.to_string(),
                Err(e) => e,
            };
            if deadline.passed() {
                let context = self.context().await;
                panic!(
                    "timed out after {within:?} waiting for {what}; last value: {last}\n{context}"
                );
            }
            deadline.pause().await;
        }
    }
}
