//! The pieces of an HTTP reply or upgrade that every adapter on the web listener writes the
//! same way: an RFC 9457 problem body, the subprotocols a WebSocket client offered, and the
//! client's address. One place, so that HTTP ingress, the CloudEvents WebSocket endpoint and
//! MQTT over WebSocket answer in one shape.

pub mod origin;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// An RFC 9457 problem response: `status`, its reason phrase as the title, and `detail`
/// telling the client what was wrong and what to do.
pub fn problem(status: StatusCode, detail: &str) -> Response {
    let body = meshgate_core::problem::body(
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        detail,
    );
    (
        status,
        [(header::CONTENT_TYPE, meshgate_core::problem::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

/// The subprotocols a WebSocket upgrade request offers, in order: every
/// `Sec-WebSocket-Protocol` header, split at commas, trimmed, empty entries left out.
pub fn offered_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// The client's address, when the server put it in the request (`ConnectInfo<SocketAddr>`,
/// as meshgate's web listener does); without it the per-address connection cap cannot apply.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerAddr(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn subprotocols_are_split_trimmed_and_taken_from_every_header() {
        let mut h = HeaderMap::new();
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("a, cloudevents.json ,,"),
        );
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("mqtt"),
        );
        assert_eq!(
            offered_subprotocols(&h).collect::<Vec<_>>(),
            ["a", "cloudevents.json", "mqtt"]
        );
        assert_eq!(offered_subprotocols(&HeaderMap::new()).count(), 0);
    }

    #[test]
    fn a_problem_reply_is_rfc_9457_json() {
        let r = problem(StatusCode::SERVICE_UNAVAILABLE, "retry later");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            meshgate_core::problem::CONTENT_TYPE
        );
    }
}
