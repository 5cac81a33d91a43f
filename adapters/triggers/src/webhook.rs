//! The CloudEvents Web Hook abuse protection (`cloudevents/spec` http-webhook.md §4): before
//! the first delivery to a subscriber marked `webhookValidation`, an `OPTIONS` request with
//! `WebHook-Request-Origin`; the subscriber allows delivery by answering 2xx with
//! `WebHook-Allowed-Origin` equal to that origin or `*`. Only the synchronous handshake is
//! done (no `WebHook-Request-Callback`); `WebHook-Allowed-Rate` is logged, not enforced (the
//! trigger's `maxConcurrency` bounds the rate).

use std::time::Duration;

use reqwest::header::HeaderValue;

/// The origin meshgate announces.
pub const ORIGIN: &str = "meshgate";

/// Asks the subscriber at `uri` whether it accepts deliveries from [`ORIGIN`].
pub async fn handshake(
    client: &reqwest::Client,
    uri: &str,
    auth: Option<&HeaderValue>,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let mut req = client
        .request(reqwest::Method::OPTIONS, uri)
        .header("WebHook-Request-Origin", ORIGIN)
        .timeout(timeout);
    if let Some(a) = auth {
        req = req.header(reqwest::header::AUTHORIZATION, a.clone());
    }
    let response = req
        .send()
        .await
        .map_err(|e| format!("webhook validation request failed: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "webhook validation refused: OPTIONS answered {status}"
        ));
    }
    let allowed = response
        .headers()
        .get("WebHook-Allowed-Origin")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match allowed {
        Some(o) if o == ORIGIN || o == "*" => Ok(response
            .headers()
            .get("WebHook-Allowed-Rate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)),
        Some(other) => Err(format!(
            "webhook validation refused: WebHook-Allowed-Origin is `{other}`, not `{ORIGIN}`"
        )),
        None => Err("webhook validation refused: the answer has no WebHook-Allowed-Origin".into()),
    }
}
