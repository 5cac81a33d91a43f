//! The example browser page (served at `/`) in headless Chromium, driven over the Chrome
//! DevTools Protocol: an event POSTed over HTTP appears on the page, and the page's publish form
//! reaches another WebSocket client.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{next_event, test_config, ws_connect};
use tokio_tungstenite::tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium with its own profile directory; killed and cleaned up on drop.
struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Browser {
    fn launch(url: &str) -> Browser {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} not found: install Chromium with `apt-get install -y chromium` (scripts/test.sh does)"
        );
        // A profile of its own per browser: Chromium hands a URL to an already running instance
        // that uses the same profile, which would mix up two tests.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let profile =
            std::env::temp_dir().join(format!("meshgate-chromium-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let child = Command::new(CHROMIUM)
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
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Browser { child, profile }
    }

    /// The DevTools port Chromium chose, from `<profile>/DevToolsActivePort`.
    async fn devtools_port(&mut self) -> u16 {
        let file = self.profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                    return port;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Chromium exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "Chromium wrote no DevToolsActivePort in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A DevTools Protocol session with one page.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn attach(port: u16, url_prefix: &str) -> Page {
        let deadline = Instant::now() + Duration::from_secs(30);
        let target = loop {
            let list: Vec<Value> =
                match reqwest::get(format!("http://127.0.0.1:{port}/json/list")).await {
                    Ok(r) => r.json().await.unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
            let page = list.into_iter().find(|t| {
                t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url_prefix))
            });
            if let Some(p) = page {
                break p;
            }
            assert!(Instant::now() < deadline, "no page target for {url_prefix}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let ws_url = target["webSocketDebuggerUrl"].as_str().unwrap().to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
        Page { ws, next_id: 1 }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true, "awaitPromise": true},
        });
        self.ws
            .send(Message::Text(request.to_string().into()))
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("DevTools answered within 10 s")
                .expect("DevTools connection open")
                .unwrap();
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            if v["id"] == id {
                if let Some(e) = v["result"].get("exceptionDetails") {
                    panic!("page threw on `{expression}`: {e}");
                }
                return v["result"]["result"]["value"].clone();
            }
        }
    }

    /// Polls `expression` until `accept` likes its value; panics with the page's text otherwise.
    async fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        accept: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.eval(expression).await;
            if accept(&v) {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.eval("document.body.innerText").await;
                panic!("timed out waiting for {what}; last value {v}; page text:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_connected(&mut self) {
        self.wait_for(
            "the page to connect and subscribe",
            "(() => { const s = document.getElementById('status'); return s ? s.textContent + '|' + (document.body.dataset.subscribed || '') : 'loading'; })()",
            |v| v == "connected|true",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_posted_over_http_appears_on_the_page() {
    let gw = meshgate::start(test_config()).await.unwrap();
    let addr = gw.web_addr.unwrap();
    let url = format!("http://{addr}/");
    let mut browser = Browser::launch(&url);
    let port = browser.devtools_port().await;
    let mut page = Page::attach(port, &url).await;
    page.wait_connected().await;

    let r = reqwest::Client::new()
        .post(format!("http://{addr}/events/sensors/kitchen/temp"))
        .header("ce-specversion", "1.0")
        .header("ce-id", "PAGE-1")
        .header("ce-source", "/test/http")
        .header("ce-type", "com.example.temperature")
        .header("ce-room", "kitchen")
        .header("content-type", "application/json")
        .body(r#"{"celsius":21.5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let text = page
        .wait_for(
            "the event to appear on the page",
            "(() => { const li = document.querySelector('[data-event-id=\"PAGE-1\"]'); return li ? li.innerText : null; })()",
            |v| v.is_string(),
        )
        .await;
    let text = text.as_str().unwrap();
    for expected in [
        "com.example.temperature",
        "PAGE-1",
        "room=\"kitchen\"",
        "celsius",
        "21.5",
    ] {
        assert!(text.contains(expected), "page shows {expected:?}: {text}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_form_reaches_another_websocket_client() {
    let gw = meshgate::start(test_config()).await.unwrap();
    let addr = gw.web_addr.unwrap();
    let mut listener = ws_connect(addr, &["browser/out"]).await;
    let url = format!("http://{addr}/");
    let mut browser = Browser::launch(&url);
    let port = browser.devtools_port().await;
    let mut page = Page::attach(port, &url).await;
    page.wait_connected().await;

    page.eval(
        "document.getElementById('pub-topic').value = 'browser/out';\
         document.getElementById('pub-type').value = 'com.example.click';\
         document.getElementById('pub-data').value = '{\"button\": \"ok\"}';\
         document.getElementById('pub-send').click(); true",
    )
    .await;
    let event = next_event(&mut listener, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(event.subject(), Some("browser/out"));
    assert_eq!(event.ty(), "com.example.click");
    assert_eq!(event.source(), "/browser");
    assert_eq!(event.datacontenttype(), Some("application/json"));
    let data: Value = serde_json::from_slice(&event.data().unwrap().to_bytes()).unwrap();
    assert_eq!(data, json!({"button": "ok"}));
    // The page is subscribed to `#`, so it shows its own event too.
    let id = event.id().to_owned();
    page.wait_for(
        "the page to show its own event",
        &format!("!!document.querySelector('[data-event-id=\"{id}\"]')"),
        |v| v == true,
    )
    .await;
    gw.shutdown().await;
}
