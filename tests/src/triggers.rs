//! Helpers of the trigger tests: a trigger from its JSON document, and the admin API.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use meshgate_config::TriggerConfig;
use serde_json::Value;

/// A trigger from its document (as in `[[triggers]]` or a `PUT /triggers/{name}` body).
pub fn trigger(doc: Value) -> TriggerConfig {
    meshgate_config::parse_trigger(None, &doc).unwrap_or_else(|e| panic!("trigger: {e:?}"))
}

/// One admin API request, with `Authorization: Bearer <token>` when given: the status and
/// the JSON answer (`Null` when it is not JSON).
pub async fn admin(
    method: reqwest::Method,
    gw: &meshgate::RunningGateway,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req =
        reqwest::Client::new().request(method, format!("http://{}{path}", gw.admin_addr.unwrap()));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
