//! The example browser page (examples/browser/index.html, served at `/`) in headless Chromium,
//! driven over the Chrome DevTools Protocol (see `meshgate_tests::chromium`): an event POSTed
//! over HTTP shows up on the page with its extensions and data (on configured, non-default
//! paths), the page reports the 1001 close at shutdown, and the page's publish form (and the
//! curl command it shows) reach another WebSocket client; gateway errors show up on the page.
//! Each test has its own gateway and its own browser.

use std::net::SocketAddr;
use std::time::Duration;

use meshgate_tests::chromium::{Browser, Page};
use meshgate_tests::{next_event, start_gateway, test_config, ws_connect};
use serde_json::{Value, json};

/// How long the page may take for anything it has to do.
const WAIT: Duration = Duration::from_secs(15);

/// Opens the gateway's page in a new headless Chromium and waits until it is connected and
/// the gateway confirmed its subscription (`io.meshgate.subscribed` with the default `#`).
async fn open_page(addr: SocketAddr) -> (Browser, Page) {
    let url = format!("http://{addr}/");
    let mut browser = Browser::launch(&url);
    let mut page = browser.page(&url).await;
    page.wait_for(
        "the page to connect and receive io.meshgate.subscribed",
        r#"(() => {
            const s = document.getElementById("status");
            const f = document.getElementById("subscriptions");
            if (!s || !f) return null;
            return { status: s.textContent, filters: f.dataset.filters ? JSON.parse(f.dataset.filters) : null };
        })()"#,
        WAIT,
        |v| *v == json!({"status": "connected", "filters": ["#"]}),
    )
    .await;
    (browser, page)
}

/// What the page shows for the event with this id, or `null` while it has not arrived.
fn entry_js(id: &str) -> String {
    format!(
        r#"(() => {{
            const li = document.querySelector(`#events > li[data-event-id="${{CSS.escape({id})}}"]`);
            if (!li) return null;
            const pairs = (sel) => Array.from(li.querySelectorAll(sel)).map((d) =>
                [d.querySelector("dt").textContent, d.querySelector("dd").textContent]);
            const data = li.querySelector("pre.data");
            return {{
                type: li.querySelector(".ev-type").textContent,
                subject: (li.querySelector(".ev-subject") || {{}}).textContent || null,
                attrs: Object.fromEntries(pairs("dl.attrs:not(.ext) > div")),
                extensions: Object.fromEntries(pairs("dl.ext > div")),
                data: data ? data.textContent : null,
                error: li.classList.contains("error"),
                text: li.innerText,
            }};
        }})()"#,
        id = json!(id)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_posted_over_http_appears_on_the_page() {
    // Paths other than the defaults: the page must use what the gateway filled in.
    let mut config = test_config();
    config.websocket.path = "/stream".into();
    config.http.events_path = "/ingest".into();
    let gw = start_gateway(config).await;
    let addr = gw.web_addr.expect("web listener");
    let (_browser, mut page) = open_page(addr).await;
    let endpoint = page
        .eval(r#"document.getElementById("endpoint").textContent"#)
        .await;
    assert_eq!(
        endpoint,
        format!("WebSocket ws://{addr}/stream?subscribe=%23")
    );

    let id = "http-to-page-1";
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/ingest/sensors/kitchen/temp"))
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/tests/browser")
        .header("ce-type", "com.example.temperature")
        .header("ce-subject", "sensors/kitchen/temp")
        .header("ce-time", "2026-11-22T10:00:00Z")
        .header("ce-room", "kitchen")
        .header("content-type", "application/json")
        .body(r#"{"celsius":21.5}"#)
        .send()
        .await
        .expect("POST reaches the gateway");
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 202, "{body}");
    let reply: Value = serde_json::from_str(&body).expect("a JSON reply");
    assert_eq!(reply, json!({"accepted": 1, "ids": [id]}));

    let shown = page
        .wait_for(
            "the POSTed event on the page",
            &entry_js(id),
            WAIT,
            Value::is_object,
        )
        .await;
    let context = format!("the page shows {shown:#}");
    assert_eq!(shown["type"], "com.example.temperature", "{context}");
    assert_eq!(shown["subject"], "sensors/kitchen/temp", "{context}");
    assert_eq!(shown["attrs"]["id"], id, "{context}");
    assert_eq!(shown["attrs"]["source"], "/tests/browser", "{context}");
    assert_eq!(shown["attrs"]["time"], "2026-11-22T10:00:00Z", "{context}");
    assert_eq!(
        shown["attrs"]["datacontenttype"], "application/json",
        "{context}"
    );
    assert_eq!(shown["extensions"], json!({"room": "kitchen"}), "{context}");
    assert_eq!(
        shown["data"], "{\n  \"celsius\": 21.5\n}",
        "data as pretty JSON; {context}"
    );
    assert_eq!(shown["error"], false, "{context}");
    let curl = page
        .eval(r#"document.getElementById("curl").textContent"#)
        .await;
    assert!(
        curl.as_str()
            .is_some_and(|c| c.starts_with(&format!("curl -i 'http://{addr}/ingest/demo/browser'"))),
        "the curl command uses the configured events path: {curl}"
    );

    // Shutdown closes the page's WebSocket with 1001, and the page says so.
    gw.shutdown().await;
    page.wait_for(
        "the page to report the closed connection",
        r#"document.getElementById("status").textContent"#,
        WAIT,
        |v| v == "closed (code 1001: server shutting down)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_form_reaches_another_websocket_client() {
    let gw = start_gateway(test_config()).await;
    let addr = gw.web_addr.expect("web listener");
    let mut listener = ws_connect(addr, &["browser/out"]).await;
    let (_browser, mut page) = open_page(addr).await;

    // Fills the form as a user would (typing fires `input`) and presses the button; returns
    // the id the page gave the event.
    async fn publish(page: &mut Page, topic: &str, ty: &str, data: &str) -> String {
        let js = format!(
            r#"(() => {{
                const set = (id, value) => {{
                    const el = document.getElementById(id);
                    el.value = value;
                    el.dispatchEvent(new Event("input", {{ bubbles: true }}));
                }};
                set("pub-topic", {topic});
                set("pub-type", {ty});
                set("pub-data", {data});
                const result = document.getElementById("pub-result");
                delete result.dataset.sentId;
                document.getElementById("pub-send").click();
                return result.dataset.sentId || result.textContent;
            }})()"#,
            topic = json!(topic),
            ty = json!(ty),
            data = json!(data),
        );
        let sent = page.eval(&js).await;
        let sent = sent.as_str().unwrap_or_default();
        if sent.len() != 36 {
            let context = page.context().await;
            panic!("the publish form sent nothing; it says {sent:?}\n{context}");
        }
        sent.to_owned()
    }

    // JSON data.
    let id = publish(
        &mut page,
        "browser/out",
        "com.example.click",
        r#"{"button": "ok"}"#,
    )
    .await;
    let event = next_event(&mut listener, WAIT)
        .await
        .expect("the listener gets the page's event");
    assert_eq!(event.id(), id);
    assert_eq!(event.subject(), Some("browser/out"));
    assert_eq!(event.ty(), "com.example.click");
    assert_eq!(event.source(), "/browser");
    assert_eq!(event.datacontenttype(), Some("application/json"));
    let data: Value =
        serde_json::from_slice(&event.data().expect("data").to_bytes()).expect("JSON data");
    assert_eq!(data, json!({"button": "ok"}));
    // The page is subscribed to `#`: it shows its own event too.
    let shown = page
        .wait_for(
            "the page to show its own event",
            &entry_js(&id),
            WAIT,
            Value::is_object,
        )
        .await;
    assert_eq!(shown["subject"], "browser/out", "{shown:#}");

    // Text that is not JSON goes out as text/plain.
    let id = publish(
        &mut page,
        "browser/out",
        "com.example.note",
        "plain words, not JSON",
    )
    .await;
    let event = next_event(&mut listener, WAIT)
        .await
        .expect("the listener gets the page's text event");
    assert_eq!(event.id(), id);
    assert_eq!(event.datacontenttype(), Some("text/plain"));
    assert_eq!(
        event.data().expect("data").to_bytes(),
        "plain words, not JSON".as_bytes()
    );

    // A topic with a wildcard is refused by the gateway; the page shows the error for that event.
    let bad = publish(&mut page, "browser/+", "com.example.click", "{}").await;
    let shown = page
        .wait_for(
            "the gateway's error on the page",
            &format!(
                r#"(() => {{
                    const li = document.querySelector(`#events > li.error[data-error-for="${{CSS.escape({bad})}}"]`);
                    return li ? li.innerText : null;
                }})()"#,
                bad = json!(bad)
            ),
            WAIT,
            Value::is_string,
        )
        .await;
    assert!(
        shown.as_str().is_some_and(|t| t.contains("no_topic")),
        "{shown}"
    );

    // The curl command the page shows for the form's current content works as printed.
    publish(
        &mut page,
        "browser/out",
        "com.example.curl",
        r#"{"via": "curl"}"#,
    )
    .await;
    let _own = next_event(&mut listener, WAIT).await.expect("form event");
    let command = page
        .eval(r#"document.getElementById("curl").textContent"#)
        .await;
    let command = command.as_str().expect("the curl command");
    assert!(
        command.contains(&format!("'http://{addr}/events/browser/out'")),
        "{command}"
    );
    let out = std::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .expect("sh runs (curl: apt-get install -y curl)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(" 202"),
        "`{command}` printed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let event = next_event(&mut listener, WAIT)
        .await
        .expect("the listener gets the curl event");
    assert_eq!(event.ty(), "com.example.curl");
    assert_eq!(event.source(), "/curl");
    assert_eq!(
        event.data().expect("data").to_bytes(),
        r#"{"via": "curl"}"#.as_bytes()
    );
    // A client that is not reading would hold shutdown up until its close handshake times out.
    drop(listener);
    gw.shutdown().await;
}
