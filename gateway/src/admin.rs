//! The admin listener: liveness, readiness and Prometheus metrics, kept off the public port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use meshgate_core::Backbone;
use meshgate_core::metrics::Registry;

/// What `/readyz` looks at.
#[derive(Debug)]
pub struct Readiness {
    pub backbone: Arc<dyn Backbone>,
    /// Set once every listener is bound; cleared when shutdown starts.
    pub serving: AtomicBool,
    /// The AMQP bridge's sources and sinks, when it is enabled: ready only while all are
    /// connected.
    #[cfg(feature = "amqp")]
    pub amqp: Option<meshgate_amqp::AmqpStatus>,
}

#[derive(Debug, Clone)]
struct AdminState {
    readiness: Arc<Readiness>,
    registry: Registry,
}

pub fn router(readiness: Arc<Readiness>, registry: Registry) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            readiness,
            registry,
        })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let backbone = &s.readiness.backbone;
    if !s.readiness.serving.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: listeners not serving (starting or shutting down)\n".to_owned(),
        );
    }
    if !backbone.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: backbone `{}` is not connected\n",
                backbone.name()
            ),
        );
    }
    #[cfg(feature = "amqp")]
    if let Some(why) = s.readiness.amqp.as_ref().and_then(|a| a.not_ready()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        );
    }
    (StatusCode::OK, "ready\n".to_owned())
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = s.registry.render();
            crate::process_metrics::render(&mut text);
            text
        },
    )
}
