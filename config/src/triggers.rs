//! Triggers (`[[triggers]]` in the config file, `PUT /triggers/{name}` on the admin listener):
//! one document format for both, checked by [`parse_trigger`], so that a trigger moves between
//! the file and the API unchanged. Field names inside `delivery` are Knative's `DeliverySpec`
//! (`retry`, `backoffPolicy`, `backoffDelay`, `timeout`, `retryAfterMax`, `deadLetterSink`);
//! meshgate's own fields follow the same camelCase.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meshgate_core::filter::Filter;
use meshgate_core::{Topic, TopicFilter};
use serde_json::{Map, Value as Json};

use crate::iso8601;

/// The longest a trigger's name may be (it names a backbone queue group, metrics and a KV key).
pub const MAX_NAME_LEN: usize = 64;

/// One trigger, checked: where its events come from, which pass, where they go and how.
#[derive(Clone)]
pub struct TriggerConfig {
    pub name: String,
    /// Mesh topics the trigger looks at (`#`: all).
    pub topic: TopicFilter,
    /// `filter.attributes` and `filters`, compiled; `None`: every event on `topic`.
    pub filter: Option<Arc<Filter>>,
    pub subscriber: SubscriberConfig,
    pub delivery: DeliveryConfig,
    /// Where a CloudEvent in a 2xx reply is published; `None`: replies are discarded.
    pub reply_topic: Option<Topic>,
    /// The document as given (the admin API's GET returns it, secrets redacted).
    pub document: Json,
}

impl PartialEq for TriggerConfig {
    /// Two triggers are the same when their documents are: everything else is made from it.
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.document == other.document
    }
}

impl std::fmt::Debug for TriggerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TriggerConfig")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .field("subscriber", &self.subscriber)
            .field("delivery", &self.delivery)
            .field("reply_topic", &self.reply_topic)
            .finish_non_exhaustive()
    }
}

impl TriggerConfig {
    /// The document with credentials replaced by `"<redacted>"`, for the admin API and logs.
    pub fn redacted_document(&self) -> Json {
        let mut doc = self.document.clone();
        if let Some(auth) = doc
            .get_mut("subscriber")
            .and_then(|s| s.get_mut("auth"))
            .and_then(Json::as_object_mut)
        {
            if auth.contains_key("bearer") {
                auth.insert("bearer".into(), "<redacted>".into());
            }
            if let Some(basic) = auth.get_mut("basic").and_then(Json::as_object_mut)
                && basic.contains_key("password")
            {
                basic.insert("password".into(), "<redacted>".into());
            }
        }
        doc
    }
}

/// How events are written to the subscriber (CloudEvents HTTP binding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentMode {
    /// `ce-` headers, the data as the body (Knative's default).
    Binary,
    /// `application/cloudevents+json`.
    Structured,
}

/// Credentials sent to the subscriber; never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Bearer(String),
    Basic { user: String, password: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Credentials::Basic { user, .. } => write!(f, "Basic({user}, <redacted>)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubscriberConfig {
    /// `http://` or `https://` URL events are POSTed to.
    pub uri: String,
    pub content_mode: ContentMode,
    /// PEM CA certificates trusted for an https subscriber, besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub auth: Option<Credentials>,
    /// The CloudEvents Webhook abuse-protection handshake (`OPTIONS` with
    /// `WebHook-Request-Origin`) before the first delivery.
    pub webhook_validation: bool,
    /// Events delivered (or waiting to retry) at once.
    pub max_concurrency: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackoffPolicy {
    /// The k-th retry waits `backoffDelay × k`.
    Linear,
    /// The k-th retry waits `backoffDelay × 2^k`.
    Exponential,
}

/// Where an event goes after its last failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterSink {
    Uri(String),
    Topic(Topic),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryConfig {
    /// Retries after the first attempt.
    pub retry: u32,
    pub backoff_policy: BackoffPolicy,
    pub backoff_delay: Duration,
    /// One attempt's limit, from sending the request to the end of the reply body.
    pub timeout: Duration,
    /// The longest a `Retry-After` (429, 503) is waited for; longer ones are cut to it.
    pub retry_after_max: Duration,
    pub dead_letter_sink: Option<DeadLetterSink>,
    /// Events held for this trigger on backbones that do not keep them (memory, NATS core):
    /// past it, new events are dropped and counted (`outcome="overflow"`).
    pub max_pending_bytes: usize,
}

/// Defaults of a trigger's optional fields.
pub mod defaults {
    use std::time::Duration;
    pub const RETRY: u32 = 3;
    pub const BACKOFF_DELAY: Duration = Duration::from_millis(200);
    pub const TIMEOUT: Duration = Duration::from_secs(30);
    pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
    pub const MAX_CONCURRENCY: usize = 16;
    pub const MAX_PENDING_BYTES: usize = 8 << 20;
    /// The most retries a trigger may ask for.
    pub const MAX_RETRY: u32 = 100;
    /// The longest any of a trigger's durations may be.
    pub const MAX_DURATION: Duration = Duration::from_secs(86_400);
    pub const MAX_CONCURRENCY_LIMIT: usize = 1024;
}

/// The problems found in one trigger document: `(path, message)`, the path relative to the
/// document (`delivery.backoffDelay`).
pub type Problems = Vec<(String, String)>;

/// Whether `name` may name a trigger: 1 to [`MAX_NAME_LEN`] of `[A-Za-z0-9_-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks one trigger document. `name`: the name given outside the document (the admin API's
/// path); the document's own `name` must then be absent or equal.
pub fn parse_trigger(name: Option<&str>, doc: &Json) -> Result<TriggerConfig, Problems> {
    let mut p = Problems::new();
    let Some(obj) = doc.as_object() else {
        return Err(vec![(String::new(), "a trigger is an object".into())]);
    };
    known(
        obj,
        "",
        &[
            "name",
            "topic",
            "filter",
            "filters",
            "subscriber",
            "delivery",
            "reply",
        ],
        &mut p,
    );
    let own_name = obj.get("name").map(|v| text(v, "name", &mut p));
    let name = match (name, own_name) {
        (Some(n), Some(Some(own))) if own != n => {
            p.push((
                "name".into(),
                format!("`{own}` differs from the name in the path, `{n}`"),
            ));
            n.to_owned()
        }
        (Some(n), _) => n.to_owned(),
        (None, Some(Some(own))) => own.to_owned(),
        (None, _) => {
            p.push(("name".into(), "required".into()));
            String::new()
        }
    };
    if !name.is_empty() && !valid_name(&name) {
        p.push((
            "name".into(),
            format!("`{name}`: 1 to {MAX_NAME_LEN} letters, digits, `-` or `_`"),
        ));
    }
    let topic = match obj.get("topic") {
        None => TopicFilter::parse("#").ok(),
        Some(v) => text(v, "topic", &mut p).and_then(|t| match TopicFilter::parse(t) {
            Ok(f) => Some(f),
            Err(e) => {
                p.push(("topic".into(), format!("`{t}`: {e}")));
                None
            }
        }),
    };
    let filter = filters(obj, &mut p);
    let subscriber = obj
        .get("subscriber")
        .map(|s| subscriber(s, &mut p))
        .unwrap_or_else(|| {
            p.push((
                "subscriber".into(),
                "required: {\"uri\": \"http://…\"}".into(),
            ));
            None
        });
    let delivery = match obj.get("delivery") {
        None => Some(delivery(&Json::Object(Map::new()), &mut p)),
        Some(d) => Some(delivery(d, &mut p)),
    };
    let reply_topic = obj.get("reply").and_then(|r| reply(r, &mut p));
    if !p.is_empty() {
        return Err(p);
    }
    match (topic, subscriber, delivery) {
        (Some(topic), Some(subscriber), Some(Some(delivery))) => Ok(TriggerConfig {
            name,
            topic,
            filter,
            subscriber,
            delivery,
            reply_topic,
            document: doc.clone(),
        }),
        _ => Err(vec![(String::new(), "invalid trigger".into())]),
    }
}

fn known(obj: &Map<String, Json>, at: &str, keys: &[&str], p: &mut Problems) {
    for key in obj.keys() {
        if !keys.contains(&key.as_str()) {
            p.push((
                join(at, key),
                format!("unknown key; known: {}", keys.join(", ")),
            ));
        }
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

fn text<'a>(v: &'a Json, path: &str, p: &mut Problems) -> Option<&'a str> {
    match v.as_str() {
        Some(s) => Some(s),
        None => {
            p.push((path.into(), "a string".into()));
            None
        }
    }
}

fn object<'a>(v: &'a Json, path: &str, p: &mut Problems) -> Option<&'a Map<String, Json>> {
    match v.as_object() {
        Some(o) => Some(o),
        None => {
            p.push((path.into(), "an object".into()));
            None
        }
    }
}

fn filters(obj: &Map<String, Json>, p: &mut Problems) -> Option<Arc<Filter>> {
    let mut parts = Vec::new();
    if let Some(legacy) = obj.get("filter")
        && let Some(legacy) = object(legacy, "filter", p)
    {
        known(legacy, "filter", &["attributes"], p);
        if let Some(attributes) = legacy.get("attributes") {
            match Filter::attributes(attributes, "filter.attributes") {
                Ok(f) => parts.push(f),
                Err(e) => p.push((e.path, e.reason)),
            }
        }
    }
    if let Some(list) = obj.get("filters") {
        match Filter::parse_list(list, "filters") {
            Ok(f) => parts.push(f),
            Err(e) => p.push((e.path, e.reason)),
        }
    }
    match parts.len() {
        0 => None,
        1 => parts.pop().map(Arc::new),
        _ => Some(Arc::new(Filter::All(parts))),
    }
}

fn url(v: &Json, path: &str, p: &mut Problems) -> Option<String> {
    let u = text(v, path, p)?;
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') && !u.contains(char::is_whitespace) => {
            Some(u.to_owned())
        }
        _ => {
            p.push((
                path.into(),
                format!("`{u}` is not an http:// or https:// URL"),
            ));
            None
        }
    }
}

fn subscriber(v: &Json, p: &mut Problems) -> Option<SubscriberConfig> {
    let at = "subscriber";
    let o = object(v, at, p)?;
    known(
        o,
        at,
        &[
            "uri",
            "contentMode",
            "caFile",
            "auth",
            "webhookValidation",
            "maxConcurrency",
        ],
        p,
    );
    let uri = match o.get("uri") {
        Some(u) => url(u, "subscriber.uri", p),
        None => {
            p.push(("subscriber.uri".into(), "required".into()));
            None
        }
    };
    let content_mode = match o.get("contentMode").map(|m| (m, m.as_str())) {
        None => ContentMode::Binary,
        Some((_, Some("binary"))) => ContentMode::Binary,
        Some((_, Some("structured"))) => ContentMode::Structured,
        Some((m, _)) => {
            p.push((
                "subscriber.contentMode".into(),
                format!("{m}: \"binary\" or \"structured\""),
            ));
            ContentMode::Binary
        }
    };
    let ca_file = o
        .get("caFile")
        .and_then(|f| text(f, "subscriber.caFile", p))
        .map(PathBuf::from);
    let auth = o.get("auth").and_then(|a| credentials(a, p));
    let webhook_validation = match o.get("webhookValidation") {
        None => false,
        Some(Json::Bool(b)) => *b,
        Some(_) => {
            p.push((
                "subscriber.webhookValidation".into(),
                "true or false".into(),
            ));
            false
        }
    };
    let max_concurrency = match o.get("maxConcurrency") {
        None => defaults::MAX_CONCURRENCY,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=defaults::MAX_CONCURRENCY_LIMIT as u64).contains(&n) => {
                usize::try_from(n).unwrap_or(1)
            }
            _ => {
                p.push((
                    "subscriber.maxConcurrency".into(),
                    format!(
                        "{v}: a whole number from 1 to {}",
                        defaults::MAX_CONCURRENCY_LIMIT
                    ),
                ));
                1
            }
        },
    };
    Some(SubscriberConfig {
        uri: uri?,
        content_mode,
        ca_file,
        auth,
        webhook_validation,
        max_concurrency,
    })
}

fn credentials(v: &Json, p: &mut Problems) -> Option<Credentials> {
    let at = "subscriber.auth";
    let o = object(v, at, p)?;
    known(o, at, &["bearer", "basic"], p);
    match (o.get("bearer"), o.get("basic")) {
        (Some(b), None) => text(b, "subscriber.auth.bearer", p)
            .filter(|t| !t.is_empty() && !t.contains(['\r', '\n']))
            .map(|t| Credentials::Bearer(t.to_owned()))
            .or_else(|| {
                p.push((
                    "subscriber.auth.bearer".into(),
                    "a non-empty token on one line".into(),
                ));
                None
            }),
        (None, Some(b)) => {
            let b = object(b, "subscriber.auth.basic", p)?;
            known(b, "subscriber.auth.basic", &["user", "password"], p);
            let user = b
                .get("user")
                .and_then(|u| text(u, "subscriber.auth.basic.user", p))
                .filter(|u| !u.contains(':'));
            let password = b
                .get("password")
                .and_then(|u| text(u, "subscriber.auth.basic.password", p));
            match (user, password) {
                (Some(user), Some(password)) => Some(Credentials::Basic {
                    user: user.to_owned(),
                    password: password.to_owned(),
                }),
                _ => {
                    p.push((
                        "subscriber.auth.basic".into(),
                        "needs `user` (without `:`) and `password`".into(),
                    ));
                    None
                }
            }
        }
        _ => {
            p.push((at.into(), "exactly one of `bearer` or `basic`".into()));
            None
        }
    }
}

fn duration(o: &Map<String, Json>, key: &str, default: Duration, p: &mut Problems) -> Duration {
    let path = format!("delivery.{key}");
    let Some(v) = o.get(key) else {
        return default;
    };
    let Some(t) = text(v, &path, p) else {
        return default;
    };
    match iso8601::parse(t) {
        Ok(d) if d > defaults::MAX_DURATION => {
            p.push((path, format!("`{t}` is longer than the maximum of P1D")));
            default
        }
        Ok(d) => d,
        Err(e) => {
            p.push((path, e));
            default
        }
    }
}

fn delivery(v: &Json, p: &mut Problems) -> Option<DeliveryConfig> {
    let at = "delivery";
    let o = object(v, at, p)?;
    known(
        o,
        at,
        &[
            "retry",
            "backoffPolicy",
            "backoffDelay",
            "timeout",
            "retryAfterMax",
            "deadLetterSink",
            "maxPendingBytes",
        ],
        p,
    );
    let retry = match o.get("retry") {
        None => defaults::RETRY,
        Some(v) => match v.as_u64() {
            Some(n) if n <= u64::from(defaults::MAX_RETRY) => u32::try_from(n).unwrap_or(0),
            _ => {
                p.push((
                    "delivery.retry".into(),
                    format!("{v}: a whole number from 0 to {}", defaults::MAX_RETRY),
                ));
                0
            }
        },
    };
    let backoff_policy = match o.get("backoffPolicy").map(|v| (v, v.as_str())) {
        None | Some((_, Some("exponential"))) => BackoffPolicy::Exponential,
        Some((_, Some("linear"))) => BackoffPolicy::Linear,
        Some((v, _)) => {
            p.push((
                "delivery.backoffPolicy".into(),
                format!("{v}: \"linear\" or \"exponential\""),
            ));
            BackoffPolicy::Exponential
        }
    };
    let backoff_delay = duration(o, "backoffDelay", defaults::BACKOFF_DELAY, p);
    let timeout = duration(o, "timeout", defaults::TIMEOUT, p);
    if timeout.is_zero() {
        p.push(("delivery.timeout".into(), "must be longer than zero".into()));
    }
    let retry_after_max = duration(o, "retryAfterMax", defaults::RETRY_AFTER_MAX, p);
    let dead_letter_sink = o.get("deadLetterSink").and_then(|d| dead_letter(d, p));
    let max_pending_bytes = match o.get("maxPendingBytes") {
        None => defaults::MAX_PENDING_BYTES,
        Some(v) => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n >= 1024 => n,
            _ => {
                p.push((
                    "delivery.maxPendingBytes".into(),
                    format!("{v}: a number of bytes, at least 1024"),
                ));
                defaults::MAX_PENDING_BYTES
            }
        },
    };
    Some(DeliveryConfig {
        retry,
        backoff_policy,
        backoff_delay,
        timeout,
        retry_after_max,
        dead_letter_sink,
        max_pending_bytes,
    })
}

fn dead_letter(v: &Json, p: &mut Problems) -> Option<DeadLetterSink> {
    let at = "delivery.deadLetterSink";
    let o = object(v, at, p)?;
    known(o, at, &["uri", "topic"], p);
    match (o.get("uri"), o.get("topic")) {
        (Some(u), None) => url(u, "delivery.deadLetterSink.uri", p).map(DeadLetterSink::Uri),
        (None, Some(t)) => {
            mesh_topic(t, "delivery.deadLetterSink.topic", p).map(DeadLetterSink::Topic)
        }
        _ => {
            p.push((at.into(), "exactly one of `uri` or `topic`".into()));
            None
        }
    }
}

fn mesh_topic(v: &Json, path: &str, p: &mut Problems) -> Option<Topic> {
    let t = text(v, path, p)?;
    match Topic::from_mqtt(t) {
        Ok(t) => Some(t),
        Err(e) => {
            p.push((path.into(), format!("`{t}`: {e}")));
            None
        }
    }
}

fn reply(v: &Json, p: &mut Problems) -> Option<Topic> {
    let o = object(v, "reply", p)?;
    known(o, "reply", &["topic"], p);
    match o.get("topic") {
        Some(t) => mesh_topic(t, "reply.topic", p),
        None => {
            p.push(("reply.topic".into(), "required".into()));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(doc: Json) -> Vec<String> {
        parse_trigger(Some("t"), &doc)
            .expect_err("refused")
            .into_iter()
            .map(|(path, m)| format!("{path}: {m}"))
            .collect()
    }

    #[test]
    fn a_minimal_trigger_takes_the_defaults() {
        let t = parse_trigger(
            None,
            &json!({"name": "orders", "subscriber": {"uri": "http://127.0.0.1:9/x"}}),
        )
        .unwrap();
        assert_eq!(t.name, "orders");
        assert_eq!(t.topic.as_str(), "#");
        assert!(t.filter.is_none());
        assert_eq!(t.subscriber.content_mode, ContentMode::Binary);
        assert_eq!(t.subscriber.max_concurrency, defaults::MAX_CONCURRENCY);
        assert_eq!(t.delivery.retry, defaults::RETRY);
        assert_eq!(t.delivery.backoff_policy, BackoffPolicy::Exponential);
        assert_eq!(t.delivery.backoff_delay, defaults::BACKOFF_DELAY);
        assert_eq!(t.delivery.timeout, defaults::TIMEOUT);
        assert_eq!(t.delivery.dead_letter_sink, None);
        assert_eq!(t.reply_topic, None);
    }

    #[test]
    fn every_field() {
        let t = parse_trigger(
            Some("all"),
            &json!({
                "topic": "orders/+/created",
                "filter": {"attributes": {"type": "com.example.order"}},
                "filters": [{"prefix": {"source": "/shop"}}, {"cesql": "subject LIKE 'eu-%'"}],
                "subscriber": {
                    "uri": "https://svc.example/hook", "contentMode": "structured",
                    "caFile": "/etc/ca.pem", "auth": {"basic": {"user": "u", "password": "secret"}},
                    "webhookValidation": true, "maxConcurrency": 4
                },
                "delivery": {
                    "retry": 5, "backoffPolicy": "linear", "backoffDelay": "PT1S",
                    "timeout": "PT2S", "retryAfterMax": "PT30S",
                    "deadLetterSink": {"topic": "dead/orders"}, "maxPendingBytes": 65536
                },
                "reply": {"topic": "replies/orders"}
            }),
        )
        .unwrap();
        assert_eq!(t.topic.as_str(), "orders/+/created");
        assert!(matches!(t.filter.as_deref(), Some(Filter::All(v)) if v.len() == 2));
        assert_eq!(t.subscriber.content_mode, ContentMode::Structured);
        assert_eq!(
            t.subscriber.auth,
            Some(Credentials::Basic {
                user: "u".into(),
                password: "secret".into()
            })
        );
        assert!(t.subscriber.webhook_validation);
        assert_eq!(t.subscriber.max_concurrency, 4);
        assert_eq!(t.delivery.retry, 5);
        assert_eq!(t.delivery.backoff_policy, BackoffPolicy::Linear);
        assert_eq!(t.delivery.backoff_delay, Duration::from_secs(1));
        assert_eq!(t.delivery.timeout, Duration::from_secs(2));
        assert_eq!(t.delivery.retry_after_max, Duration::from_secs(30));
        assert_eq!(
            t.delivery.dead_letter_sink,
            Some(DeadLetterSink::Topic(
                Topic::from_mqtt("dead/orders").unwrap()
            ))
        );
        assert_eq!(t.delivery.max_pending_bytes, 65536);
        assert_eq!(t.reply_topic.as_ref().unwrap().as_str(), "replies/orders");
        let shown = t.redacted_document().to_string();
        assert!(
            !shown.contains("secret") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!format!("{:?}", t.subscriber).contains("secret"));
    }

    #[test]
    fn every_problem_is_named_by_its_path() {
        let got = problems(json!({
            "name": "other",
            "topic": "a/#/b",
            "filters": [{"exact": {"type": ""}}],
            "subscriber": {"uri": "ftp://x", "contentMode": "xml", "maxConcurrency": 0, "extra": 1,
                           "auth": {"bearer": "a", "basic": {}}},
            "delivery": {"retry": -1, "backoffPolicy": "random", "backoffDelay": "200ms",
                         "timeout": "PT0S", "deadLetterSink": {"uri": "x", "topic": "y"}},
            "reply": {"topic": "a/+"},
            "bogus": true
        }));
        for expected in [
            "name: `other` differs",
            "topic: `a/#/b`",
            "filters[0].exact",
            "subscriber.uri: `ftp://x`",
            "subscriber.contentMode",
            "subscriber.maxConcurrency",
            "subscriber.extra: unknown key",
            "subscriber.auth: exactly one",
            "delivery.retry: -1",
            "delivery.backoffPolicy",
            "delivery.backoffDelay: `200ms` is not an ISO 8601 duration",
            "delivery.timeout: must be longer than zero",
            "delivery.deadLetterSink: exactly one",
            "reply.topic: `a/+`",
            "bogus: unknown key",
        ] {
            assert!(
                got.iter().any(|g| g.starts_with(expected)),
                "missing {expected:?} in {got:#?}"
            );
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("orders-eu_1"));
        for bad in ["", "a b", "a/b", "a.b", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(!valid_name(bad), "{bad}");
        }
        let got = parse_trigger(None, &json!({"subscriber": {"uri": "http://h/"}})).unwrap_err();
        assert_eq!(got[0].0, "name");
    }

    /// Trigger documents come from the admin API: any bytes are refused with problems or made
    /// into a trigger, never a panic; a made trigger's document is redacted without one.
    #[test]
    fn fuzz_trigger_document() {
        let seeds: [&[u8]; 3] = [
            br#"{"topic":"a/#","filters":[{"exact":{"type":"t"}}],"subscriber":{"uri":"http://h/x","auth":{"basic":{"user":"u","password":"p"}}},"delivery":{"retry":2,"backoffDelay":"PT0.5S","deadLetterSink":{"topic":"d"}},"reply":{"topic":"r"}}"#,
            br#"{"subscriber":{"uri":"https://h","auth":{"bearer":"t"},"maxConcurrency":3},"delivery":{"timeout":"P1DT1H1M1.5S","backoffPolicy":"linear"}}"#,
            br#"{"filter":{"attributes":{"type":"x"}},"subscriber":{"uri":"http://h"},"delivery":{"retryAfterMax":"PT1M","maxPendingBytes":4096}}"#,
        ];
        meshgate_fuzz::run(
            "trigger_document",
            meshgate_fuzz::bytes("trigger_document", &seeds, 512),
            |b| Some(b.to_vec()),
            |bytes| {
                let Ok(doc) = serde_json::from_slice::<Json>(&bytes) else {
                    return Ok(());
                };
                if let Ok(t) = parse_trigger(Some("f"), &doc) {
                    let _ = t.redacted_document();
                }
                if let Ok(text) = std::str::from_utf8(&bytes) {
                    let _ = crate::iso8601::parse(text);
                }
                Ok(())
            },
        );
    }
}
