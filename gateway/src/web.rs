//! The public web listener: HTTP ingress, the WebSocket endpoint and the example browser page
//! share one port, each contributing its routes.

use meshgate_core::metrics::ErrorKind;
use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use meshgate_config::Config;
use meshgate_core::AdapterContext;
use meshgate_core::metrics::{Counter, Registry};

/// The example browser page (examples/browser/index.html), compiled in so the binary is
/// self-contained.
pub const BROWSER_PAGE: &str = include_str!("../../examples/browser/index.html");

/// Whether anything is served on the web listener at all.
pub fn enabled(config: &Config) -> bool {
    config.http.enabled
        || config.websocket.enabled
        || config.http.browser_page
        || (config.mqtt.enabled && config.mqtt.websocket_path.is_some())
}

/// The web listener's routes; `live` holds the `[http]` and `[websocket]` sections a reload
/// may change the limits of.
pub fn router(
    config: &Config,
    live: &crate::listener_limits::ListenerLimits,
    ctx: &AdapterContext,
) -> Router {
    let mut router = Router::new();
    if config.http.enabled {
        router = router.merge(meshgate_http::router(live.http.clone(), ctx));
    }
    #[cfg(feature = "websocket")]
    if config.websocket.enabled {
        router = router.merge(meshgate_websocket::router(live.websocket.clone(), ctx));
    }
    if config.http.browser_page {
        // The page reads its endpoints from these two meta values.
        let page = BROWSER_PAGE
            .replace("{{WS_PATH}}", &config.websocket.path)
            .replace("{{EVENTS_PATH}}", &config.http.events_path);
        router = router.route(
            "/",
            get(move || {
                let page = page.clone();
                async move { ([(header::CACHE_CONTROL, "no-store")], Html(page)).into_response() }
            }),
        );
    }
    router
}

/// MQTT over WebSocket's routes behind the same `Origin` check as the CloudEvents WebSocket
/// (`websocket.allowed_origins`): a page of another origin gets 403 before the upgrade,
/// counted as `meshgate_errors_total{adapter="mqtt",kind="forbidden_origin"}`.
pub fn origin_checked(router: Router, config: &Config, registry: &Registry) -> Router {
    let refused = registry.error_counter("mqtt", ErrorKind::ForbiddenOrigin);
    let state: Arc<(Vec<String>, Counter)> =
        Arc::new((config.websocket.allowed_origins.clone(), refused));
    router.layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let state = state.clone();
            async move {
                match meshgate_web::origin::check(
                    request.headers(),
                    &state.0,
                    "websocket.allowed_origins",
                ) {
                    Ok(()) => next.run(request).await,
                    Err(why) => {
                        state.1.inc();
                        meshgate_web::problem(StatusCode::FORBIDDEN, &why.to_string())
                    }
                }
            }
        },
    ))
}

/// The public listeners on which anonymous clients may publish or subscribe although they are
/// not bound to loopback: worth a warning at startup (anyone who can reach the address can use
/// the gateway; see `[auth.anonymous]`).
pub fn anonymous_exposure(config: &Config) -> Vec<String> {
    let anon = &config.auth.anonymous;
    if !anon.enabled || (anon.acl.publish.is_empty() && anon.acl.subscribe.is_empty()) {
        return Vec::new();
    }
    let mut exposed = Vec::new();
    if enabled(config) && !config.http.listen.ip().is_loopback() {
        exposed.push(format!("http.listen {}", config.http.listen));
    }
    if config.mqtt.enabled {
        if !config.mqtt.listen.ip().is_loopback() {
            exposed.push(format!("mqtt.listen {}", config.mqtt.listen));
        }
        if let Some(tls) = &config.mqtt.tls
            && !tls.listen.ip().is_loopback()
        {
            exposed.push(format!("mqtt.tls_listen {}", tls.listen));
        }
    }
    exposed
}

/// `Some((sockets the caps allow, limit))` when the listeners' connection caps, plus headroom
/// for the backbone, log and files, exceed the open-file limit: then the caps are not what
/// bounds the process, EMFILE is.
pub fn descriptors_short(config: &Config, limit: Option<u64>) -> Option<(u64, u64)> {
    let limit = limit?;
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    // Saturating: a cap may be configured as large as i64::MAX ("no cap").
    let mut caps = 0u64;
    if enabled(config) {
        caps = caps.saturating_add(as_u64(config.http.max_connections));
    }
    if config.admin.enabled {
        caps = caps.saturating_add(as_u64(config.admin.max_connections));
    }
    if config.mqtt.enabled {
        caps = caps.saturating_add(as_u64(config.mqtt.max_connections));
    }
    // Listeners, backbone and AMQP connections, the log, the runtime's own descriptors.
    const HEADROOM: u64 = 64;
    (caps.saturating_add(HEADROOM) > limit).then_some((caps, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_above_the_open_file_limit_are_reported() {
        let mut c = Config::default();
        assert_eq!(descriptors_short(&c, None), None, "limit unknown");
        assert_eq!(descriptors_short(&c, Some(1 << 20)), None);
        assert_eq!(descriptors_short(&c, Some(1024)), Some((10_064, 1024)));
        c.mqtt.enabled = true;
        assert_eq!(descriptors_short(&c, Some(20_000)), Some((20_064, 20_000)));
        c.http.max_connections = usize::MAX;
        c.mqtt.max_connections = usize::MAX;
        assert_eq!(
            descriptors_short(&c, Some(20_000)),
            Some((u64::MAX, 20_000))
        );
    }

    #[test]
    fn anonymous_access_on_a_public_address_is_reported() {
        let mut c = Config::default();
        assert!(anonymous_exposure(&c).is_empty(), "loopback defaults");
        c.http.listen = "0.0.0.0:8080".parse().expect("addr");
        assert_eq!(anonymous_exposure(&c), vec!["http.listen 0.0.0.0:8080"]);
        c.mqtt.enabled = true;
        c.mqtt.listen = "[::]:1883".parse().expect("addr");
        assert_eq!(anonymous_exposure(&c).len(), 2);
        c.auth.anonymous.acl.publish.clear();
        c.auth.anonymous.acl.subscribe.clear();
        assert!(
            anonymous_exposure(&c).is_empty(),
            "anonymous may do nothing"
        );
        c.auth.anonymous.acl.subscribe.push("#".into());
        c.auth.anonymous.enabled = false;
        assert!(anonymous_exposure(&c).is_empty(), "anonymous off");
    }
}
