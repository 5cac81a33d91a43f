//! The public web listener: HTTP ingress, the WebSocket endpoint and the example browser page
//! share one port, each contributing its routes.

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use meshgate_config::Config;
use meshgate_core::AdapterContext;

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

pub fn router(config: &Config, ctx: &AdapterContext) -> Router {
    let mut router = Router::new();
    if config.http.enabled {
        router = router.merge(meshgate_http::router(&config.http, ctx));
    }
    if config.websocket.enabled {
        router = router.merge(meshgate_websocket::router(&config.websocket, ctx));
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
