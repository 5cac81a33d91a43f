//! The CloudEvents WebSocket binding (CE-BINDINGS.md §7), without I/O: subprotocol negotiation,
//! the query string, inbound frames, and the gateway's own control and report events.
//!
//! Every frame in both directions is one JSON-format CloudEvent. The client talks to the
//! gateway itself with events of the reserved types below (source `/meshgate/websocket`):
//!
//! | type | direction | data |
//! |---|---|---|
//! | `io.meshgate.subscribe` | client → gateway | `{"filters": ["a/+/c", "b/#"]}`, optionally `"match": [...]` |
//! | `io.meshgate.unsubscribe` | client → gateway | `{"filters": ["b/#"]}` |
//! | `io.meshgate.subscribed` | gateway → client | `{"filters": [...all current...]}` after every change and once at connect |
//! | `io.meshgate.error` | gateway → client | `{"code": "...", "message": "...", "eventid": "..."}` for a frame that was dropped |
//!
//! Events for the client are one text frame each holding the JSON format (E10: never an
//! array), encoded once per event by `Envelope::json`.
//!
//! `match` narrows the subscribe's topic filters to the events that pass a list of filters in
//! Knative Eventing's dialects (`exact`, `prefix`, `suffix`, `all`, `any`, `not`, `cesql`;
//! [`meshgate_core::filter`]), e.g. `{"filters": ["sensors/#"], "match": [{"prefix": {"type":
//! "com.example."}}, {"cesql": "temperature > 30"}]}`. Subscribing to a filter again replaces its
//! `match` (none: every event of the topic).

use bytes::Bytes;
use meshgate_core::metrics::ErrorKind;
use meshgate_core::{Data, Event, EventError, TopicFilter, json, wrap};
use percent_encoding::percent_decode_str;

/// The one subprotocol every implementation must support.
pub const SUBPROTOCOL: &str = "cloudevents.json";
pub const TYPE_SUBSCRIBE: &str = "io.meshgate.subscribe";
pub const TYPE_UNSUBSCRIBE: &str = "io.meshgate.unsubscribe";
pub const TYPE_SUBSCRIBED: &str = "io.meshgate.subscribed";
pub const TYPE_ERROR: &str = "io.meshgate.error";
/// `source` of the events the gateway itself sends on a WebSocket.
pub const CONTROL_SOURCE: &str = "/meshgate/websocket";

/// How a handshake was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// The client offered `cloudevents.json`; it is echoed.
    CloudEventsJson,
    /// No CloudEvents subprotocol offered, compatibility mode on: JSON assumed, none echoed.
    CompatJson,
}

/// Why a handshake is refused (HTTP 400 before the upgrade).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRefusal(pub String);

/// Chooses the subprotocol from the ones offered (each `Sec-WebSocket-Protocol` entry, split
/// at commas: `meshgate_web::offered_subprotocols`).
pub fn negotiate<'a>(
    offered: impl Iterator<Item = &'a str>,
    require_subprotocol: bool,
) -> Result<Negotiated, HandshakeRefusal> {
    let offered: Vec<&str> = offered.collect();
    if offered.iter().any(|p| p.eq_ignore_ascii_case(SUBPROTOCOL)) {
        return Ok(Negotiated::CloudEventsJson);
    }
    if !require_subprotocol {
        return Ok(Negotiated::CompatJson);
    }
    let detail = if offered.is_empty() {
        "no subprotocol offered".to_owned()
    } else {
        format!("offered {}", offered.join(", "))
    };
    Err(HandshakeRefusal(format!(
        "this endpoint speaks the CloudEvents WebSocket binding: offer the `{SUBPROTOCOL}` \
         subprotocol (Sec-WebSocket-Protocol); {detail}"
    )))
}

/// What the query string of the upgrade request asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConnectParams {
    /// Topic filters to subscribe at connect (`subscribe=`, repeatable).
    pub subscribe: Vec<String>,
    /// A bearer token for browsers, which cannot set headers on WebSocket requests.
    pub access_token: Option<String>,
}

/// A query parameter that is not text: the detail of the 400 refusing the upgrade.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query parameter `{key}` is not valid UTF-8 after percent-decoding")]
pub struct QueryError {
    /// The parameter's name as written in the query.
    pub key: String,
}

/// Parses the query string with RFC 3986 percent-decoding. Unlike HTML forms, `+` stays `+`,
/// because it is the MQTT single-level wildcard; write `#` as `%23`.
pub fn parse_query(query: Option<&str>) -> Result<ConnectParams, QueryError> {
    let mut params = ConnectParams::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| QueryError {
                key: key.to_owned(),
            })?
            .into_owned();
        match key {
            "subscribe" => params.subscribe.extend(
                value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            ),
            "access_token" => params.access_token = Some(value),
            _ => {}
        }
    }
    Ok(params)
}

/// A frame from the client.
#[derive(Debug)]
pub enum Inbound {
    Publish(Box<Event>),
    /// Topic filters, and the event filter (`match`) that applies to each of them.
    Subscribe(
        Vec<TopicFilter>,
        Option<std::sync::Arc<meshgate_core::filter::Filter>>,
    ),
    Unsubscribe(Vec<TopicFilter>),
}

/// The `code` of an `io.meshgate.error` event: what was wrong with the frame. Each is also the
/// `kind` it is counted as in `meshgate_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameCode {
    InvalidEvent,
    InvalidRequest,
    Forbidden,
    /// The backbone could not take it now; the same frame may go through later.
    Unavailable,
    NoTopic,
}

impl FrameCode {
    /// The metric kind, whose label text is the code on the wire.
    pub const fn kind(self) -> ErrorKind {
        match self {
            FrameCode::InvalidEvent => ErrorKind::InvalidEvent,
            FrameCode::InvalidRequest => ErrorKind::InvalidRequest,
            FrameCode::Forbidden => ErrorKind::Forbidden,
            FrameCode::Unavailable => ErrorKind::Unavailable,
            FrameCode::NoTopic => ErrorKind::NoTopic,
        }
    }

    /// The code as the error event carries it.
    pub const fn as_str(self) -> &'static str {
        self.kind().as_str()
    }
}

/// A frame that was dropped, reported back as an `io.meshgate.error` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: FrameCode,
    pub message: String,
    pub event_id: Option<String>,
}

impl FrameError {
    pub fn new(code: FrameCode, message: impl Into<String>, event_id: Option<&str>) -> Self {
        FrameError {
            code,
            message: message.into(),
            event_id: event_id.map(str::to_owned),
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FiltersData {
    filters: Vec<String>,
    /// Only on `io.meshgate.subscribe`: Knative-dialect event filters.
    #[serde(default, rename = "match")]
    matching: Option<serde_json::Value>,
}

type Control = (
    Vec<TopicFilter>,
    Option<std::sync::Arc<meshgate_core::filter::Filter>>,
);

fn control_filters(event: &Event) -> Result<Control, FrameError> {
    let bad = |msg: String| FrameError::new(FrameCode::InvalidRequest, msg, Some(event.id()));
    let bytes = match event.data() {
        Some(Data::Json(raw)) => Bytes::copy_from_slice(raw.get().as_bytes()),
        Some(Data::Binary(b)) => b.clone(),
        _ => {
            return Err(bad(format!(
                "{} needs JSON data {{\"filters\": [\"topic/filter\", ...]}}",
                event.ty()
            )));
        }
    };
    let data: FiltersData = serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "{} data must be {{\"filters\": [\"topic/filter\", ...]}}: {e}",
            event.ty()
        ))
    })?;
    let filters = data
        .filters
        .iter()
        .map(|f| TopicFilter::parse(f).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let matching = match data.matching {
        None => None,
        Some(_) if event.ty() != TYPE_SUBSCRIBE => {
            return Err(bad(format!("{} takes no `match`", event.ty())));
        }
        Some(json) => Some(std::sync::Arc::new(
            meshgate_core::filter::Filter::parse_list(&json, "match")
                .map_err(|e| bad(format!("{} data: {e}", event.ty())))?,
        )),
    };
    Ok((filters, matching))
}

/// Reads one text frame.
pub fn decode_frame(text: &str) -> Result<Inbound, FrameError> {
    let event = json::decode(text.as_bytes()).map_err(|e: EventError| {
        // Name the event if the frame got far enough to have an id.
        let id = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
        FrameError::new(FrameCode::InvalidEvent, e.to_string(), id.as_deref())
    })?;
    match event.ty() {
        TYPE_SUBSCRIBE => {
            let (filters, matching) = control_filters(&event)?;
            Ok(Inbound::Subscribe(filters, matching))
        }
        TYPE_UNSUBSCRIBE => Ok(Inbound::Unsubscribe(control_filters(&event)?.0)),
        _ => match meshgate_core::validate::client_event(&event) {
            Ok(()) => Ok(Inbound::Publish(Box::new(event))),
            Err(e) => Err(FrameError::new(
                FrameCode::InvalidEvent,
                e.to_string(),
                Some(event.id()),
            )),
        },
    }
}

fn control_event(ty: &str, data: serde_json::Value) -> String {
    let body = format!(
        r#"{{"specversion":"1.0","id":{},"source":"{CONTROL_SOURCE}","type":"{ty}","time":"{}","datacontenttype":"application/json","data":{}}}"#,
        serde_json::Value::String(wrap::new_id()),
        wrap::now_rfc3339(),
        data
    );
    debug_assert!(json::decode(body.as_bytes()).is_ok());
    body
}

/// The `io.meshgate.error` event reporting a dropped frame.
pub fn error_event(err: &FrameError) -> String {
    let mut data = serde_json::json!({ "code": err.code.as_str(), "message": err.message });
    if let Some(id) = &err.event_id {
        data["eventid"] = serde_json::Value::String(id.clone());
    }
    control_event(TYPE_ERROR, data)
}

/// The `io.meshgate.subscribed` event listing the connection's current filters.
pub fn subscribed_event(filters: &[TopicFilter]) -> String {
    let list: Vec<&str> = filters.iter().map(TopicFilter::as_str).collect();
    control_event(TYPE_SUBSCRIBED, serde_json::json!({ "filters": list }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i28_i29_negotiation() {
        assert_eq!(
            negotiate(["chat.v1", "cloudevents.json"].into_iter(), true),
            Ok(Negotiated::CloudEventsJson)
        );
        assert!(negotiate(["chat.v1"].into_iter(), true).is_err());
        assert!(negotiate(std::iter::empty(), true).is_err());
        assert_eq!(
            negotiate(std::iter::empty(), false),
            Ok(Negotiated::CompatJson)
        );
    }

    #[test]
    fn query_keeps_plus_as_wildcard() {
        let p = parse_query(Some(
            "subscribe=a/+/c&subscribe=b%2F%23,c&access_token=t%20k",
        ))
        .unwrap();
        assert_eq!(p.subscribe, vec!["a/+/c", "b/#", "c"]);
        assert_eq!(p.access_token.as_deref(), Some("t k"));
        assert!(parse_query(Some("subscribe=%FF")).is_err());
    }

    #[test]
    fn frames() {
        let e0 = r#"{"specversion":"1.0","id":"A1","source":"/src","type":"com.example.t"}"#;
        assert!(matches!(decode_frame(e0), Ok(Inbound::Publish(e)) if e.id() == "A1"));
        let sub = r#"{"specversion":"1.0","id":"s1","source":"/b","type":"io.meshgate.subscribe","data":{"filters":["a/#"]}}"#;
        assert!(
            matches!(decode_frame(sub), Ok(Inbound::Subscribe(f, None)) if f[0].as_str() == "a/#")
        );
        let bad_filter = sub.replace("a/#", "a/#/b");
        assert_eq!(
            decode_frame(&bad_filter).unwrap_err().code.as_str(),
            "invalid_request"
        );
        let err =
            decode_frame(r#"{"specversion":"0.3","id":"X","source":"/s","type":"t"}"#).unwrap_err();
        assert_eq!(err.code.as_str(), "invalid_event");
        assert_eq!(err.event_id.as_deref(), Some("X"));
        assert!(decode_frame("not json").is_err());
    }

    #[test]
    fn control_events_are_valid_cloudevents() {
        let e = json::decode(
            error_event(&FrameError::new(
                FrameCode::InvalidEvent,
                "bad \"x\"",
                Some("A1"),
            ))
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(e.ty(), TYPE_ERROR);
        let s = json::decode(subscribed_event(&[TopicFilter::parse("a/+").unwrap()]).as_bytes())
            .unwrap();
        assert_eq!(s.ty(), TYPE_SUBSCRIBED);
    }
}
