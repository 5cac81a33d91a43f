//! RFC 9457 problem details, the body of every HTTP error reply meshgate sends (HTTP ingress,
//! refused WebSocket handshakes), so that clients parse one shape everywhere.

/// Media type of a problem body.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem body: `type` `about:blank`, the status, its reason phrase as `title`, and a
/// `detail` telling the client what was wrong and what to do.
pub fn body(status: u16, title: &str, detail: &str) -> String {
    serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    })
    .to_string()
}
