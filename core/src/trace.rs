//! Distributed tracing of events across hops (issue 25, decision 0095).
//!
//! The trace context travels as W3C Trace Context in each protocol's own form (the HTTP and AMQP
//! `traceparent` header, the MQTT 5 user property, the WebSocket event attribute) and, on the
//! event itself, as the CloudEvents distributed tracing extension (`traceparent`, `tracestate`).
//! With tracing on, every hop records a span and hands its own context on:
//!
//! - ingress: `<adapter> receive` (child of the transport's or the event's context, or a new
//!   trace), and its child `backbone publish`; the event leaves with the publish span's context;
//! - egress: `<adapter> deliver` per delivery (child of the event's context), and the copy
//!   delivered carries the delivery span's context.
//!
//! Off (the default) nothing here runs past one atomic load ([`enabled`]): no parsing, no
//! allocation, events pass with whatever `traceparent` they carry.
//!
//! The tracer is process-wide (like OpenTelemetry's global provider): the gateway installs it
//! once at start ([`install`]); the adapters only ask [`enabled`].

use std::sync::{Arc, OnceLock};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanContext, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, Span};

pub use opentelemetry::trace::SpanKind;

use crate::backbone::Envelope;
use crate::event::{Event, ExtensionValue};

/// The W3C header (and CloudEvents extension attribute) with the parent's context.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header (and CloudEvents extension attribute) with vendor trace state.
pub const TRACESTATE: &str = "tracestate";

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Turns tracing on for this process with `tracer` (the gateway, once, at start). False when a
/// tracer was installed already (the first one stays).
pub fn install(tracer: SdkTracer) -> bool {
    TRACER.set(tracer).is_ok()
}

/// Whether spans are recorded. One atomic load: the whole cost of tracing while it is off.
#[inline]
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// A `traceparent` / `tracestate` pair as the propagator reads it.
struct Carried<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for Carried<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.traceparent),
            TRACESTATE => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The trace context in `traceparent` (and `tracestate`), or `None` when it is not a valid W3C
/// `traceparent` (OpenTelemetry's W3C propagator decides; an invalid `tracestate` is dropped).
/// Any bytes from a client may arrive here: `fuzz/` has a target for it.
pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let cx = TraceContextPropagator::new().extract(&Carried {
        traceparent,
        tracestate,
    });
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The header values that carry `sc`: `traceparent`, and `tracestate` when it has entries.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Headers {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.traceparent = value,
            TRACESTATE if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// `sc` in its W3C header form.
pub fn headers(sc: &SpanContext) -> Headers {
    let mut h = Headers::default();
    let cx = Context::new().with_remote_span_context(sc.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut h);
    h
}

/// The event's own trace context (its distributed tracing extension), if valid.
pub fn of_event(event: &Event) -> Option<SpanContext> {
    let Some(ExtensionValue::String(tp)) = event.extension(TRACEPARENT) else {
        return None;
    };
    let ts = match event.extension(TRACESTATE) {
        Some(ExtensionValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    parse(tp, ts)
}

/// Sets the event's distributed tracing extension to `sc`.
fn set_on_event(event: &mut Event, sc: &SpanContext) {
    let h = headers(sc);
    // Both values are printable ASCII made by the propagator: valid CloudEvents strings.
    let _ = event.set_extension(TRACEPARENT, ExtensionValue::String(h.traceparent));
    match h.tracestate {
        Some(ts) => {
            let _ = event.set_extension(TRACESTATE, ExtensionValue::String(ts));
        }
        None => {
            event.remove_extension(TRACESTATE);
        }
    }
}

/// An ingress transport's own trace context (an HTTP or AMQP `traceparent` header, an MQTT
/// user property of a plain message) becomes the event's, so that the hop's span is its child.
/// Only while tracing is on, and only a valid one; the transport's wins over the event's.
/// Whether the event changed.
pub fn adopt(event: &mut Event, traceparent: Option<&str>, tracestate: Option<&str>) -> bool {
    if !enabled() {
        return false;
    }
    let Some(sc) = traceparent.and_then(|tp| parse(tp, tracestate)) else {
        return false;
    };
    if of_event(event).as_ref() == Some(&sc) {
        return false;
    }
    set_on_event(event, &sc);
    true
}

fn start(tracer: &SdkTracer, name: String, kind: SpanKind, parent: Option<SpanContext>) -> Span {
    let cx = match parent {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    };
    tracer
        .span_builder(name)
        .with_kind(kind)
        .start_with_context(tracer, &cx)
}

/// What the spans of a hop say about the event (OpenTelemetry's CloudEvents and messaging
/// conventions).
fn event_attributes(span: &mut Span, event: &Event, topic: &str) {
    span.set_attribute(KeyValue::new("cloudevents.event_id", event.id().to_owned()));
    span.set_attribute(KeyValue::new(
        "cloudevents.event_source",
        event.source().to_owned(),
    ));
    span.set_attribute(KeyValue::new(
        "cloudevents.event_type",
        event.ty().to_owned(),
    ));
    span.set_attribute(KeyValue::new(
        "messaging.destination.name",
        topic.to_owned(),
    ));
}

/// The spans of one ingress hop; they end when it is dropped (after the publish settled).
#[derive(Debug)]
pub struct Ingress {
    receive: Span,
    publish: Span,
}

impl Ingress {
    /// Marks the hop as failed (the backbone refused the event).
    pub fn failed(&mut self, why: &dyn std::fmt::Display) {
        let status = Status::error(why.to_string());
        self.publish.set_status(status.clone());
        self.receive.set_status(status);
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        // Child first, so that a viewer shows it inside its parent.
        self.publish.end();
        self.receive.end();
    }
}

/// Records an ingress hop of `envelope`'s event through `adapter` (see the module docs) and
/// gives the event the publish span's context. `None` while tracing is off. Boxed: the publish
/// future that holds it stays one pointer larger, not two spans larger, while tracing is off.
/// Inlined: while off, the call is the one load at the caller, not a call into this crate.
#[inline]
pub fn ingress(adapter: &'static str, envelope: &mut Envelope) -> Option<Box<Ingress>> {
    let tracer = TRACER.get()?;
    Some(ingress_spans(tracer, adapter, envelope))
}

#[inline(never)]
fn ingress_spans(
    tracer: &SdkTracer,
    adapter: &'static str,
    envelope: &mut Envelope,
) -> Box<Ingress> {
    let parent = of_event(&envelope.event);
    let mut receive = start(
        tracer,
        format!("{adapter} receive"),
        SpanKind::Server,
        parent,
    );
    event_attributes(&mut receive, &envelope.event, envelope.topic.as_str());
    let mut publish = start(
        tracer,
        "backbone publish".to_owned(),
        SpanKind::Producer,
        Some(receive.span_context().clone()),
    );
    publish.set_attribute(KeyValue::new(
        "messaging.destination.name",
        envelope.topic.as_str().to_owned(),
    ));
    let sc = publish.span_context().clone();
    // The event is usually this envelope's alone here (no copy); its JSON form, if one was
    // made, no longer matches.
    set_on_event(Arc::make_mut(&mut envelope.event), &sc);
    envelope.forget_json();
    Box::new(Ingress { receive, publish })
}

/// The span of one delivery; it ends when dropped.
#[derive(Debug)]
pub struct Egress {
    span: Span,
}

impl Egress {
    /// Marks the delivery as failed.
    pub fn failed(&mut self, why: &dyn std::fmt::Display) {
        self.span.set_status(Status::error(why.to_string()));
    }

    /// This delivery's context in W3C header form (for a transport header).
    pub fn headers(&self) -> Headers {
        headers(self.span.span_context())
    }

    /// Notes something about this delivery (e.g. the attempt number of a retry).
    pub fn set_attribute(&mut self, kv: KeyValue) {
        self.span.set_attribute(kv);
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.span.end();
    }
}

/// Records a delivery of `envelope` through `name` (`"websocket deliver"`, ...) as a child of
/// the event's context, and swaps `envelope` for a copy whose event carries the delivery
/// span's context (only this delivery's copy: other subscribers keep theirs). `None` while
/// tracing is off (inlined: then only the one load at the caller).
#[inline]
pub fn deliver(name: &'static str, kind: SpanKind, envelope: &mut Arc<Envelope>) -> Option<Egress> {
    if !enabled() {
        return None;
    }
    deliver_swap(name, kind, envelope)
}

#[inline(never)]
fn deliver_swap(
    name: &'static str,
    kind: SpanKind,
    envelope: &mut Arc<Envelope>,
) -> Option<Egress> {
    let (hop, copy) = deliver_copy(name, kind, envelope)?;
    *envelope = Arc::new(copy);
    Some(hop)
}

/// [`deliver`] for a caller that holds the envelope by reference: the span, and the copy of
/// `envelope` to send.
pub fn deliver_copy(
    name: &'static str,
    kind: SpanKind,
    envelope: &Envelope,
) -> Option<(Egress, Envelope)> {
    let tracer = TRACER.get()?;
    let mut span = start(tracer, name.to_owned(), kind, of_event(&envelope.event));
    event_attributes(&mut span, &envelope.event, envelope.topic.as_str());
    let mut event = Event::clone(&envelope.event);
    set_on_event(&mut event, span.span_context());
    Some((Egress { span }, envelope.with_event(Arc::new(event))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_writes_w3c_headers() {
        let sc = parse(TP, Some("rojo=00f067aa0ba902b7")).expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        let h = headers(&sc);
        assert_eq!(h.traceparent, TP);
        assert_eq!(h.tracestate.as_deref(), Some("rojo=00f067aa0ba902b7"));
    }

    #[test]
    fn refuses_what_is_not_a_traceparent() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // all-zero ids are invalid (W3C §3.2.2.3, §3.2.2.4)
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // upper case, version ff, extra parts in version 00
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
            "not a trace context at all",
        ] {
            assert!(parse(bad, None).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn event_context_round_trips() {
        let mut e = Event::new("1", "/s", "t").expect("event");
        assert!(of_event(&e).is_none());
        let sc = parse(TP, None).expect("valid");
        set_on_event(&mut e, &sc);
        assert_eq!(of_event(&e).map(|s| s.span_id()), Some(sc.span_id()));
        assert!(e.extension(TRACESTATE).is_none());
    }

    /// Any `traceparent`/`tracestate` a client sends: a context or `None`, never a panic; a
    /// context read is written back as a valid `traceparent` that reads as the same context.
    #[test]
    fn fuzz_trace_context() {
        let seeds: [&[u8]; 3] = [
            TP.as_bytes(),
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\ncongo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-future\nk=v",
        ];
        meshgate_fuzz::run(
            "trace_context",
            meshgate_fuzz::bytes("trace_context", &seeds, 256),
            |b| Some(b.to_vec()),
            |bytes| {
                let text = String::from_utf8_lossy(&bytes);
                let (tp, ts) = match text.split_once('\n') {
                    Some((tp, ts)) => (tp, Some(ts)),
                    None => (text.as_ref(), None),
                };
                let Some(sc) = parse(tp, ts) else {
                    return Ok(());
                };
                let h = headers(&sc);
                let again = parse(&h.traceparent, h.tracestate.as_deref()).ok_or_else(|| {
                    format!("{:?} written from {tp:?} does not parse", h.traceparent)
                })?;
                if again.trace_id() != sc.trace_id() || again.span_id() != sc.span_id() {
                    return Err(format!("{tp:?} -> {:?} changed the ids", h.traceparent));
                }
                Ok(())
            },
        );
    }

    #[test]
    fn off_by_default_adopts_nothing() {
        // No test in this crate installs a tracer.
        let mut e = Event::new("1", "/s", "t").expect("event");
        adopt(&mut e, Some(TP), None);
        assert!(e.extension(TRACEPARENT).is_none());
    }
}
