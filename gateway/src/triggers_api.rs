//! The admin API of triggers, on the admin listener:
//! `GET /triggers`, and `GET` / `PUT` / `DELETE /triggers/{name}`, JSON documents as in
//! `[[triggers]]` (config/src/triggers.rs). Every request needs `Authorization: Bearer
//! <admin.api_token>`; without a configured token the API answers 403 saying how to turn it on.
//! Errors are `application/problem+json`; a refused document lists every problem with its path.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meshgate_triggers::{Applied, TriggerError, Triggers};
use serde_json::{Value as Json, json};

/// The largest trigger document the API reads.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
struct ApiState {
    triggers: Triggers,
    token: Option<String>,
}

pub fn router(triggers: Triggers, token: Option<String>) -> Router {
    Router::new()
        .route("/triggers", get(list))
        .route("/triggers/{name}", get(show).put(put).delete(delete))
        .layer(DefaultBodyLimit::max(MAX_DOCUMENT_BYTES))
        .with_state(ApiState { triggers, token })
}

pub(crate) fn problem(status: StatusCode, detail: &str, extra: Option<Json>) -> Response {
    let mut body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some(extra), Some(obj)) = (extra, body.as_object_mut()) {
        obj.insert("errors".into(), extra);
    }
    let mut r = (
        status,
        [(header::CONTENT_TYPE, meshgate_core::problem::CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"meshgate-admin\""),
        );
    }
    r
}

/// Checks the bearer token; `Some` is the refusal to send.
fn refusal(state: &ApiState, headers: &HeaderMap) -> Option<Response> {
    refusal_for(state.token.as_deref(), headers)
}

/// The refusal to send when `headers` lack `Authorization: Bearer <token>` (or no token is
/// configured); shared by the admin API's routes.
pub(crate) fn refusal_for(token: Option<&str>, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = token else {
        return Some(problem(
            StatusCode::FORBIDDEN,
            "the admin API is off: set admin.api_token (or MESHGATE__ADMIN__API_TOKEN) to a secret of 16 characters or more",
            None,
        ));
    };
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .unwrap_or("");
    (!same_secret(given, token)).then(|| {
        problem(
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <admin.api_token>",
            None,
        )
    })
}

/// Compares the SHA-256 digests in constant time: neither the token's content nor its length
/// shows in how long a refusal takes.
fn same_secret(given: &str, token: &str) -> bool {
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(given), sha2::Sha256::digest(token));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn shown(state: &ApiState, t: &meshgate_config::TriggerConfig) -> Json {
    let mut doc = t.redacted_document();
    if let Some(obj) = doc.as_object_mut() {
        obj.insert("name".into(), t.name.clone().into());
    }
    json!({
        "name": t.name,
        "source": if state.triggers.is_from_config(&t.name) { "config" } else { "api" },
        "trigger": doc,
    })
}

fn json_response(status: StatusCode, body: &Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn list(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    let all: Vec<Json> = s.triggers.list().iter().map(|t| shown(&s, t)).collect();
    json_response(StatusCode::OK, &json!({ "triggers": all }))
}

async fn show(State(s): State<ApiState>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    match s.triggers.get(&name) {
        Some(t) => json_response(StatusCode::OK, &shown(&s, &t)),
        None => problem(StatusCode::NOT_FOUND, &format!("no trigger `{name}`"), None),
    }
}

async fn put(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    if !meshgate_config::triggers::valid_name(&name) {
        return problem(
            StatusCode::BAD_REQUEST,
            &format!(
                "`{name}` is not a trigger name: 1 to {} letters, digits, `-` or `_`",
                meshgate_config::triggers::MAX_NAME_LEN
            ),
            None,
        );
    }
    if body.len() > MAX_DOCUMENT_BYTES {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("a trigger document is at most {MAX_DOCUMENT_BYTES} bytes"),
            None,
        );
    }
    let doc: Json = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                &format!("the body is not JSON: {e}"),
                None,
            );
        }
    };
    let config = match meshgate_config::parse_trigger(Some(&name), &doc) {
        Ok(c) => c,
        Err(problems) => {
            let list: Vec<Json> = problems
                .iter()
                .map(|(path, message)| json!({"path": path, "message": message}))
                .collect();
            let first = problems
                .first()
                .map(|(p, m)| format!("{p}: {m}"))
                .unwrap_or_default();
            return problem(
                StatusCode::BAD_REQUEST,
                &format!("invalid trigger: {first}"),
                Some(Json::Array(list)),
            );
        }
    };
    match s.triggers.put(config).await {
        Ok(applied) => {
            let status = match applied {
                Applied::Created => StatusCode::CREATED,
                Applied::Replaced | Applied::Unchanged => StatusCode::OK,
            };
            match s.triggers.get(&name) {
                Some(t) => json_response(status, &shown(&s, &t)),
                None => StatusCode::NO_CONTENT.into_response(),
            }
        }
        Err(e @ TriggerError::FromConfig(_)) => problem(StatusCode::CONFLICT, &e.to_string(), None),
        Err(e @ TriggerError::Store { .. }) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), None)
        }
        Err(e) => problem(StatusCode::BAD_REQUEST, &e.to_string(), None),
    }
}

async fn delete(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    match s.triggers.delete(&name).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => problem(StatusCode::NOT_FOUND, &format!("no trigger `{name}`"), None),
        Err(e @ TriggerError::FromConfig(_)) => problem(StatusCode::CONFLICT, &e.to_string(), None),
        Err(e) => problem(StatusCode::SERVICE_UNAVAILABLE, &e.to_string(), None),
    }
}
