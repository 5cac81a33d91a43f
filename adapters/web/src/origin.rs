//! The `Origin` check of browser requests: HTTP ingress (`http.allowed_origins`) against
//! cross-site form posts, WebSocket upgrades (`websocket.allowed_origins`, also for MQTT over
//! WebSocket) against cross-site WebSocket hijacking: browsers let any page open a WebSocket to
//! any host and send the page's origin in `Origin`, so the server has to refuse origins it does
//! not serve.
//!
//! Same rule as e.g. the NATS server's websocket `same_origin`/`allowed_origins`: a request
//! without `Origin` is not from a browser (devices, CLI tools) and passes; a browser's must
//! name the request's own host (`Host`) or one of the configured origins (`*`: any).

use axum::http::{HeaderMap, header};
use meshgate_core::header::OriginRefused;

/// `Ok` when the request may proceed, else the reason for a 403; `key` is the config key of
/// `allowed` (named in the reason).
pub fn check(headers: &HeaderMap, allowed: &[String], key: &str) -> Result<(), OriginRefused> {
    meshgate_core::header::check_origin(
        headers.get(header::ORIGIN).map(|v| v.as_bytes()),
        headers.get(header::HOST).map(|v| v.as_bytes()),
        allowed,
        key,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "websocket.allowed_origins";

    fn headers(origin: Option<&str>, host: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().expect("origin value"));
        }
        if let Some(o) = host {
            h.insert(header::HOST, o.parse().expect("host value"));
        }
        h
    }

    #[test]
    fn same_origin_listed_origins_and_non_browsers_pass_others_are_refused() {
        let none: &[String] = &[];
        let host = Some("gw.example:8080");
        assert!(
            check(&headers(None, host), none, KEY).is_ok(),
            "no Origin: not a browser"
        );
        assert!(check(&headers(Some("http://gw.example:8080"), host), none, KEY).is_ok());
        assert!(check(&headers(Some("HTTPS://GW.example:8080/"), host), none, KEY).is_ok());
        assert!(
            check(
                &headers(Some("http://gw.example"), Some("gw.example:80")),
                none,
                KEY
            )
            .is_ok()
        );
        assert!(check(&headers(Some("https://evil.example"), host), none, KEY).is_err());
        assert!(check(&headers(Some("http://gw.example:9999"), host), none, KEY).is_err());
        assert!(check(&headers(Some("null"), host), none, KEY).is_err());
        assert!(check(&headers(Some("http://gw.example:8080"), None), none, KEY).is_err());
        let listed = ["https://app.example".to_owned()];
        assert!(check(&headers(Some("https://app.example"), host), &listed, KEY).is_ok());
        assert!(check(&headers(Some("https://APP.example/"), host), &listed, KEY).is_ok());
        assert!(check(&headers(Some("http://app.example"), host), &listed, KEY).is_err());
        let err = check(&headers(Some("https://evil.example"), host), &listed, KEY)
            .unwrap_err()
            .to_string();
        assert!(err.contains("websocket.allowed_origins"), "{err}");
        let any = ["*".to_owned()];
        assert!(check(&headers(Some("https://evil.example"), host), &any, KEY).is_ok());
    }
}
