//! The `Origin` check of WebSocket upgrades (`websocket.allowed_origins`), against cross-site
//! WebSocket hijacking: browsers let any page open a WebSocket to any host and send the page's
//! origin in `Origin`, so the server has to refuse origins it does not serve.
//!
//! Same rule as e.g. the NATS server's websocket `same_origin`/`allowed_origins`: a request
//! without `Origin` is not from a browser (devices, CLI tools) and passes; a browser's must
//! name the request's own host (`Host`) or one of the configured origins (`*`: any).

use axum::http::{HeaderMap, header};

/// `host[:port]` with the scheme's default port removed, lower-case.
fn authority_without_default_port(scheme: &str, authority: &str) -> String {
    let a = authority.to_ascii_lowercase();
    let default = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => "",
    };
    match a.strip_suffix(default) {
        Some(stripped) if !default.is_empty() => stripped.to_owned(),
        _ => a,
    }
}

/// `Ok` when the upgrade may proceed, else the reason for a 403.
pub fn check(headers: &HeaderMap, allowed: &[String]) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    if allowed.iter().any(|a| a == "*") {
        return Ok(());
    }
    let refused = || {
        format!(
            "origin `{}` may not open a WebSocket here; add it to websocket.allowed_origins",
            String::from_utf8_lossy(origin.as_bytes())
        )
    };
    let origin = origin.to_str().map_err(|_| refused())?.trim();
    let lower = origin.trim_end_matches('/').to_ascii_lowercase();
    if allowed.contains(&lower) {
        return Ok(());
    }
    // Same origin: the page was served by this host (Origin `null` and the like never are).
    let Some((scheme, authority)) = lower.split_once("://") else {
        return Err(refused());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match host {
        Some(host)
            if authority_without_default_port(scheme, authority)
                == authority_without_default_port(scheme, host.trim()) =>
        {
            Ok(())
        }
        _ => Err(refused()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            check(&headers(None, host), none).is_ok(),
            "no Origin: not a browser"
        );
        assert!(check(&headers(Some("http://gw.example:8080"), host), none).is_ok());
        assert!(check(&headers(Some("HTTPS://GW.example:8080/"), host), none).is_ok());
        assert!(
            check(
                &headers(Some("http://gw.example"), Some("gw.example:80")),
                none
            )
            .is_ok()
        );
        assert!(check(&headers(Some("https://evil.example"), host), none).is_err());
        assert!(check(&headers(Some("http://gw.example:9999"), host), none).is_err());
        assert!(check(&headers(Some("null"), host), none).is_err());
        assert!(check(&headers(Some("http://gw.example:8080"), None), none).is_err());
        let listed = ["https://app.example".to_owned()];
        assert!(check(&headers(Some("https://app.example"), host), &listed).is_ok());
        assert!(check(&headers(Some("https://APP.example/"), host), &listed).is_ok());
        assert!(check(&headers(Some("http://app.example"), host), &listed).is_err());
        let err = check(&headers(Some("https://evil.example"), host), &listed).unwrap_err();
        assert!(err.contains("websocket.allowed_origins"), "{err}");
        let any = ["*".to_owned()];
        assert!(check(&headers(Some("https://evil.example"), host), &any).is_ok());
    }
}
