//! A small Prometheus registry: counters, gauges and one latency histogram family, rendered in
//! the text exposition format. Metric names live here so that every crate uses the same ones.
//!
//! Handles are `Arc`ed atomics: components look them up once and update them lock-free on the
//! hot path. The values of the `kind` and `reason` labels are enums ([`ErrorKind`],
//! [`DropReason`], in labels.rs), so the label set is written down in one place.
//!
//! Why an own registry rather than `prometheus-client`: what meshgate needs is counters,
//! gauges and one histogram family with fixed buckets, rendered as text — about 300 lines here,
//! no dependency. prometheus-client's `Family` looks a label set up (a read lock and a hash)
//! per `get_or_create`, so holding handles is what makes either fast; its OpenMetrics
//! extras (exemplars, info/stateset types) are not used. The process collector is
//! gateway/src/process_metrics.rs. Revisit if exemplars or OpenMetrics negotiation are needed.

mod labels;
pub use labels::{DropReason, ErrorKind};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub const EVENTS_RECEIVED: &str = "meshgate_events_received_total";
pub const EVENTS_SENT: &str = "meshgate_events_sent_total";
pub const EVENTS_DROPPED: &str = "meshgate_events_dropped_total";
pub const CONNECTIONS: &str = "meshgate_connections";
pub const ERRORS: &str = "meshgate_errors_total";
pub const PUBLISH_LATENCY: &str = "meshgate_publish_latency_seconds";
pub const BACKBONE_DROPPED: &str = "meshgate_backbone_dropped_total";
pub const BACKBONE_SUBSCRIPTIONS: &str = "meshgate_backbone_subscriptions";
pub const BACKBONE_DISCONNECTS: &str = "meshgate_backbone_disconnects_total";
pub const MQTT_IN_BY_QOS: &str = "meshgate_mqtt_publish_in_total";
pub const MQTT_OUT_BY_QOS: &str = "meshgate_mqtt_publish_out_total";
pub const MQTT_SESSIONS_OFFLINE: &str = "meshgate_mqtt_sessions_offline";
pub const MQTT_SUBSCRIPTIONS: &str = "meshgate_mqtt_subscriptions";
pub const MQTT_BYTES_RECEIVED: &str = "meshgate_mqtt_bytes_received_total";
pub const MQTT_BYTES_SENT: &str = "meshgate_mqtt_bytes_sent_total";
pub const AMQP_LINK_UP: &str = "meshgate_amqp_link_up";
pub const AMQP_RECONNECTS: &str = "meshgate_amqp_reconnects_total";
pub const BUILD_INFO: &str = "meshgate_build_info";
pub const TRIGGER_EVENTS: &str = "meshgate_trigger_events_total";
pub const TRIGGER_RETRIES: &str = "meshgate_trigger_retries_total";
pub const TRIGGER_REPLIES: &str = "meshgate_trigger_replies_total";
pub const TRIGGER_IN_FLIGHT: &str = "meshgate_trigger_in_flight";
pub const TRIGGER_PENDING_BYTES: &str = "meshgate_trigger_pending_bytes";
pub const TRIGGER_LATENCY: &str = "meshgate_trigger_delivery_latency_seconds";
pub const AUTH_FAILURES: &str = "meshgate_auth_failures_total";
pub const TRACE_SPANS: &str = "meshgate_trace_spans_total";
pub const TLS_CERTIFICATE_EXPIRY: &str = "meshgate_tls_certificate_expiry_timestamp_seconds";

/// Every metric name above: what dashboards and alerts may use (the process collector's
/// `process_*` names are the Prometheus client conventions, see `gateway/src/process_metrics.rs`).
pub const NAMES: &[&str] = &[
    EVENTS_RECEIVED,
    EVENTS_SENT,
    EVENTS_DROPPED,
    CONNECTIONS,
    ERRORS,
    PUBLISH_LATENCY,
    BACKBONE_DROPPED,
    BACKBONE_SUBSCRIPTIONS,
    BACKBONE_DISCONNECTS,
    MQTT_IN_BY_QOS,
    MQTT_OUT_BY_QOS,
    MQTT_SESSIONS_OFFLINE,
    MQTT_SUBSCRIPTIONS,
    MQTT_BYTES_RECEIVED,
    MQTT_BYTES_SENT,
    AMQP_LINK_UP,
    AMQP_RECONNECTS,
    BUILD_INFO,
    TRIGGER_EVENTS,
    TRIGGER_RETRIES,
    TRIGGER_REPLIES,
    TRIGGER_IN_FLIGHT,
    TRIGGER_PENDING_BYTES,
    TRIGGER_LATENCY,
    AUTH_FAILURES,
    TRACE_SPANS,
    TLS_CERTIFICATE_EXPIRY,
];

fn help(name: &str) -> &'static str {
    match name {
        EVENTS_RECEIVED => {
            "Events accepted from clients and published to the backbone, per adapter."
        }
        EVENTS_SENT => "Events written to clients, per adapter.",
        EVENTS_DROPPED => "Events dropped on purpose (policy), per adapter and reason.",
        CONNECTIONS => "Open client connections, per adapter.",
        ERRORS => "Errors by adapter and kind (bad input, auth, backbone).",
        PUBLISH_LATENCY => "Time from a client's event arriving to the backbone accepting it.",
        BACKBONE_DROPPED => "Events the backbone dropped for a subscriber, per reason.",
        BACKBONE_SUBSCRIPTIONS => "Active backbone subscriptions.",
        BACKBONE_DISCONNECTS => "Times a connection of the backbone to NATS was lost.",
        MQTT_IN_BY_QOS => "MQTT PUBLISHes accepted from clients, per QoS.",
        MQTT_OUT_BY_QOS => "MQTT PUBLISHes delivered to clients, per QoS.",
        MQTT_SESSIONS_OFFLINE => "Persistent MQTT sessions kept while their client is away.",
        MQTT_SUBSCRIPTIONS => "MQTT subscriptions, of connected and offline sessions.",
        MQTT_BYTES_RECEIVED => "Bytes read from MQTT clients' sockets.",
        MQTT_BYTES_SENT => "Bytes written to MQTT clients' sockets.",
        AMQP_LINK_UP => "1 while an AMQP source or sink is connected and set up, else 0.",
        AMQP_RECONNECTS => "Times an AMQP source or sink lost its connection or channel.",
        TRACE_SPANS => {
            "Spans handed to the OTLP collector, per outcome (exported, or failed: refused, unreachable)."
        }
        TRIGGER_EVENTS => {
            "Events a trigger settled, per trigger and outcome (delivered, filtered, dead_lettered, failed, overflow, abandoned)."
        }
        TRIGGER_RETRIES => "Attempts a trigger made after the first one, per trigger.",
        TRIGGER_REPLIES => {
            "Replies of subscribers, per trigger and outcome (published, refused, publish_failed)."
        }
        TRIGGER_IN_FLIGHT => "Events a trigger is delivering or waiting to retry.",
        TRIGGER_PENDING_BYTES => {
            "Bytes of events queued for a trigger on backbones that do not keep them (memory, NATS core)."
        }
        TRIGGER_LATENCY => {
            "Time from a trigger taking an event to its subscriber's 2xx, retries included."
        }
        AUTH_FAILURES => {
            "Refused logins, per reason (invalid: wrong or unknown credentials; rate_limited: too many failures from the address or as the user; busy: too many waiting for a password hash)."
        }
        TLS_CERTIFICATE_EXPIRY => {
            "When the certificate a TLS listener serves expires (its notAfter, Unix seconds), per listener (http, admin, mqtt)."
        }
        BUILD_INFO => "Always 1; the labels say which meshgate runs (version, compiled features).",
        _ => "meshgate metric",
    }
}

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

type Labels = Vec<(&'static str, String)>;
type Key = (&'static str, Labels);

#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);
impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Gauge(Arc<AtomicI64>);
impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct HistogramInner {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

#[derive(Debug, Clone, Default)]
pub struct Histogram(Arc<HistogramInner>);
impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.0.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct Families {
    counters: BTreeMap<Key, Counter>,
    gauges: BTreeMap<Key, Gauge>,
    histograms: BTreeMap<Key, Histogram>,
}

/// All metrics of one gateway process.
#[derive(Debug, Clone, Default)]
pub struct Registry(Arc<Mutex<Families>>);

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn families(&self) -> std::sync::MutexGuard<'_, Families> {
        // A panic while holding this lock cannot leave the maps inconsistent; keep going.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counter(&self, name: &'static str, l: &[(&'static str, &str)]) -> Counter {
        self.families()
            .counters
            .entry((name, labels(l)))
            .or_default()
            .clone()
    }

    pub fn gauge(&self, name: &'static str, l: &[(&'static str, &str)]) -> Gauge {
        self.families()
            .gauges
            .entry((name, labels(l)))
            .or_default()
            .clone()
    }

    /// `meshgate_errors_total{adapter, kind}`.
    pub fn error_counter(&self, adapter: &'static str, kind: ErrorKind) -> Counter {
        self.counter(ERRORS, &[("adapter", adapter), ("kind", kind.as_str())])
    }

    /// `meshgate_events_dropped_total{adapter, reason}`.
    pub fn dropped_counter(&self, adapter: &'static str, reason: DropReason) -> Counter {
        self.counter(
            EVENTS_DROPPED,
            &[("adapter", adapter), ("reason", reason.as_str())],
        )
    }

    /// `meshgate_backbone_dropped_total{backbone, reason}`.
    pub fn backbone_dropped(&self, backbone: &'static str, reason: DropReason) -> Counter {
        self.counter(
            BACKBONE_DROPPED,
            &[("backbone", backbone), ("reason", reason.as_str())],
        )
    }

    pub fn histogram(&self, name: &'static str, l: &[(&'static str, &str)]) -> Histogram {
        self.families()
            .histograms
            .entry((name, labels(l)))
            .or_default()
            .clone()
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let f = self.families();
        let mut out = String::with_capacity(4096);
        let mut last = "";
        let mut header = |out: &mut String, name: &'static str, kind: &str| {
            if last != name {
                let _ = writeln!(out, "# HELP {name} {}", help(name));
                let _ = writeln!(out, "# TYPE {name} {kind}");
                last = name;
            }
        };
        for ((name, l), c) in &f.counters {
            header(&mut out, name, "counter");
            let _ = writeln!(out, "{name}{} {}", render_labels(l, None), c.get());
        }
        for ((name, l), g) in &f.gauges {
            header(&mut out, name, "gauge");
            let _ = writeln!(out, "{name}{} {}", render_labels(l, None), g.get());
        }
        for ((name, l), h) in &f.histograms {
            header(&mut out, name, "histogram");
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += h.0.buckets[i].load(Ordering::Relaxed);
                let le = bound.to_string();
                let _ = writeln!(
                    out,
                    "{name}_bucket{} {cumulative}",
                    render_labels(l, Some(&le))
                );
            }
            let count = h.count();
            let _ = writeln!(
                out,
                "{name}_bucket{} {count}",
                render_labels(l, Some("+Inf"))
            );
            let sum = h.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{name}_sum{} {sum}", render_labels(l, None));
            let _ = writeln!(out, "{name}_count{} {count}", render_labels(l, None));
        }
        out
    }
}

fn render_labels(l: &Labels, le: Option<&str>) -> String {
    if l.is_empty() && le.is_none() {
        return String::new();
    }
    let mut s = String::from("{");
    let mut first = true;
    for (k, v) in l
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(le.map(|v| ("le", v)))
    {
        if !first {
            s.push(',');
        }
        first = false;
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(s, "{k}=\"{v}\"");
    }
    s.push('}');
    s
}

/// The metrics one adapter updates, looked up once. The error and drop counters are
/// registered on first use (so `/metrics` shows only what happened) and then held: counting
/// one more takes no lock.
#[derive(Debug, Clone)]
pub struct AdapterMetrics {
    adapter: &'static str,
    registry: Registry,
    pub received: Counter,
    pub sent: Counter,
    pub connections: Gauge,
    pub publish_latency: Histogram,
    /// Indexed by `ErrorKind as usize`.
    errors: Arc<[OnceLock<Counter>]>,
    /// Indexed by `DropReason as usize`.
    drops: Arc<[OnceLock<Counter>]>,
}

impl AdapterMetrics {
    /// The adapter these metrics count for (`mqtt`, `http`, ...).
    pub fn adapter(&self) -> &'static str {
        self.adapter
    }

    pub fn new(registry: &Registry, adapter: &'static str) -> Self {
        let a = [("adapter", adapter)];
        AdapterMetrics {
            adapter,
            registry: registry.clone(),
            received: registry.counter(EVENTS_RECEIVED, &a),
            sent: registry.counter(EVENTS_SENT, &a),
            connections: registry.gauge(CONNECTIONS, &a),
            publish_latency: registry.histogram(PUBLISH_LATENCY, &a),
            errors: ErrorKind::ALL.iter().map(|_| OnceLock::new()).collect(),
            drops: DropReason::ALL.iter().map(|_| OnceLock::new()).collect(),
        }
    }

    /// The counter of events dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> &Counter {
        self.drops[reason as usize]
            .get_or_init(|| self.registry.dropped_counter(self.adapter, reason))
    }

    /// Counts one error of `kind`.
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize]
            .get_or_init(|| self.registry.error_counter(self.adapter, kind))
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_has_its_own_help_and_is_listed_once() {
        // This file's source: every `pub const X: &str = "meshgate_..."` must be in NAMES.
        let source = include_str!("metrics.rs");
        let declared = source
            .lines()
            .filter(|l| l.starts_with("pub const ") && l.contains(": &str = \"meshgate_"))
            .count();
        assert_eq!(declared, NAMES.len(), "a metric name is missing from NAMES");
        let mut seen = std::collections::HashSet::new();
        for name in NAMES {
            assert!(seen.insert(name), "{name} listed twice");
            assert_ne!(help(name), "meshgate metric", "{name} has no help text");
        }
    }

    #[test]
    fn renders_prometheus_text() {
        let r = Registry::new();
        let m = AdapterMetrics::new(&r, "http");
        m.received.add(3);
        m.error(ErrorKind::BadEvent);
        m.error(ErrorKind::BadEvent);
        m.dropped(DropReason::QueueFull).add(2);
        m.publish_latency.observe(Duration::from_micros(300));
        let text = r.render();
        assert!(text.contains("# TYPE meshgate_events_received_total counter"));
        assert!(text.contains("meshgate_events_received_total{adapter=\"http\"} 3"));
        assert!(text.contains("meshgate_errors_total{adapter=\"http\",kind=\"bad_event\"} 2"));
        assert!(
            text.contains(
                "meshgate_events_dropped_total{adapter=\"http\",reason=\"queue_full\"} 2"
            )
        );
        // Only what happened is shown.
        assert!(!text.contains("kind=\"unauthorized\""), "{text}");
        assert!(
            text.contains(
                "meshgate_publish_latency_seconds_bucket{adapter=\"http\",le=\"0.0005\"} 1"
            )
        );
        assert!(text.contains("meshgate_publish_latency_seconds_count{adapter=\"http\"} 1"));
    }
}
