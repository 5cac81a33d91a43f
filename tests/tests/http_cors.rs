//! CORS on the HTTP ingress (issue 22 item 5): a page of an origin listed in
//! `http.allowed_origins` may POST CloudEvents across origins (preflight answered, the answer
//! readable); other origins get a 403 without CORS headers; clients without `Origin` (not
//! browsers) are unaffected. reqwest sends the headers a browser would.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use meshgate_tests::{start_gateway, test_config};

const APP: &str = "https://app.example";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_origins_get_cors_answers_others_are_refused() {
    let mut c = test_config();
    c.http.allowed_origins = vec![APP.to_owned()];
    let gw = start_gateway(c).await;
    let url = format!("http://{}/events/a/b", gw.web_addr.unwrap());
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "ce-id,ce-source,ce-type,ce-specversion,ce-room,content-type",
            )
            .send()
    };
    let r = preflight(APP).await.unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["access-control-allow-methods"], "POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "ce-id,ce-source,ce-type,ce-specversion,ce-room,content-type"
    );
    assert!(h["vary"].to_str().unwrap().contains("Origin"));
    let r = preflight("https://evil.example").await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let post = |origin: Option<&'static str>| {
        let mut req = client
            .post(&url)
            .header("ce-specversion", "1.0")
            .header("ce-id", "c1")
            .header("ce-source", "/page")
            .header("ce-type", "com.example.click")
            .body("x");
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    let r = post(Some(APP)).await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["access-control-allow-origin"], APP);
    let r = post(Some("https://evil.example")).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = post(None).await.unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    gw.shutdown().await;
}
