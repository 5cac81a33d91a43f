//! Distributed tracing (issue 25 item 1) against the real binary: two gateway instances on one
//! nats-server, an MQTT 5 publisher on the first, a WebSocket subscriber and a trigger on the
//! second, and an OTLP/HTTP receiver here (the tests' HTTP sink; the protobuf bodies decoded
//! with OpenTelemetry's own message types). One event must form one trace:
//! `mqtt receive` → `backbone publish` (instance a) → `websocket deliver`, `trigger deliver`
//! (instance b), and every egress must carry its own span's context. A CloudEvent another NATS
//! program publishes with a W3C `traceparent` header continues that program's trace.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::time::Duration;

use meshgate_core::ExtensionValue;
use meshgate_tests::nats::NatsServer;
use meshgate_tests::sink::Sink;
use meshgate_tests::{Deadline, Process, next_event, spawn, ws_connect};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::{AsyncClient, MqttOptions};

/// One exported span, as the test needs it.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    instance: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every span the collector received so far.
fn spans(collector: &Sink) -> Vec<Span> {
    let mut out = Vec::new();
    for post in collector.posts() {
        assert_eq!(post.path, "/v1/traces");
        assert_eq!(post.header("content-type"), Some("application/x-protobuf"));
        let request = ExportTraceServiceRequest::decode(post.body.as_ref())
            .unwrap_or_else(|e| panic!("not an OTLP ExportTraceServiceRequest: {e}"));
        for rs in request.resource_spans {
            let resource = rs.resource.unwrap_or_default();
            let attr = |key: &str| {
                resource
                    .attributes
                    .iter()
                    .find(|kv| kv.key == key)
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default()
            };
            assert_eq!(attr("service.name"), "meshgate-test");
            let instance = attr("service.instance.id");
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        instance: instance.clone(),
                    });
                }
            }
        }
    }
    out
}

/// The spans of trace `trace_id` once `n` of them arrived.
async fn trace(collector: &Sink, trace_id: &str, n: usize) -> Vec<Span> {
    let d = Deadline::after(Duration::from_secs(20));
    loop {
        let t: Vec<Span> = spans(collector)
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        if t.len() >= n {
            return t;
        }
        assert!(
            !d.passed(),
            "trace {trace_id}: {n} spans expected, got {t:#?}"
        );
        d.pause().await;
    }
}

fn one<'a>(t: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = t.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one `{name}` span expected in {t:#?}");
    found[0]
}

fn gateway(dir: &std::path::Path, instance: &str, nats: &str, otlp: &str, extra: &str) -> Process {
    let path = dir.join(format!("{instance}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[gateway]
instance_id = "{instance}"
[http]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[mqtt]
enabled = true
listen = "127.0.0.1:0"
[backbone]
kind = "nats"
[backbone.nats]
urls = ["{nats}"]
[tracing]
enabled = true
endpoint = "{otlp}"
service_name = "meshgate-test"
{extra}
"#
        ),
    )
    .unwrap();
    // Spans leave every 100 ms rather than every 5 s (the SDK reads the OTel variable).
    spawn(
        &["-c", path.to_str().unwrap()],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
}

/// `(trace id, span id)` of a `traceparent` value.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent:?}");
    (parts[1].to_owned(), parts[2].to_owned())
}

fn traceparent_of(event: &meshgate_core::Event) -> String {
    match event.extension("traceparent") {
        Some(ExtensionValue::String(s)) => s.clone(),
        other => panic!("the delivered event has no traceparent: {other:?} in {event:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_from_mqtt_to_websocket_and_a_trigger_on_another_instance_is_one_trace() {
    let nats = NatsServer::start();
    let collector = Sink::start().await;
    let hook = Sink::start().await;
    let dir = std::env::temp_dir().join(format!("meshgate-tracing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let otlp = collector.url("/v1/traces");
    let a = gateway(&dir, "gw-a", &nats.url(), &otlp, "");
    let b = gateway(
        &dir,
        "gw-b",
        &nats.url(),
        &otlp,
        &format!(
            "[[triggers]]\nname = \"hook\"\ntopic = \"dev/#\"\n[triggers.subscriber]\nuri = \"{}\"\n",
            hook.url("/hook")
        ),
    );
    let mut ws = ws_connect(b.web.unwrap(), &["dev/#"]).await;
    // Subscriptions on another instance take a moment to reach the bus.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut options = MqttOptions::new("tracer", "127.0.0.1", a.mqtt.unwrap().port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(options, 10);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });

    // An instrumented NATS program reading the bus.
    let reader = async_nats::connect(nats.url()).await.unwrap();
    let mut on_bus = reader.subscribe("meshgate.dev.>").await.unwrap();
    reader.flush().await.unwrap();

    // 1. A plain message without a context: a new trace starts at the MQTT ingress.
    client
        .publish("dev/1", QoS::AtLeastOnce, false, "hello")
        .await
        .unwrap();
    let got = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    let (trace_id, ws_span) = ids(&traceparent_of(&got));
    let t = trace(&collector, &trace_id, 4).await;
    let receive = one(&t, "mqtt receive");
    let publish = one(&t, "backbone publish");
    let deliver = one(&t, "websocket deliver");
    let trigger = one(&t, "trigger deliver");
    assert_eq!(receive.parent, "", "a new trace: {t:#?}");
    assert_eq!(publish.parent, receive.span_id, "{t:#?}");
    assert_eq!(deliver.parent, publish.span_id, "{t:#?}");
    assert_eq!(trigger.parent, publish.span_id, "{t:#?}");
    // On the bus the message carries the publish span's context in the W3C header too.
    use futures_util::StreamExt as _;
    let message = tokio::time::timeout(Duration::from_secs(10), on_bus.next())
        .await
        .unwrap()
        .unwrap();
    let header = message
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_owned())
        .expect("a traceparent header on the bus");
    assert_eq!(ids(&header), (trace_id.clone(), publish.span_id.clone()));
    assert_eq!(
        (receive.instance.as_str(), publish.instance.as_str()),
        ("gw-a", "gw-a")
    );
    assert_eq!(
        (deliver.instance.as_str(), trigger.instance.as_str()),
        ("gw-b", "gw-b")
    );
    // The WebSocket client got the delivery span's context, the webhook its own, in the
    // W3C header and in the event (binary mode: `ce-traceparent`).
    assert_eq!(ws_span, deliver.span_id);
    let posts = hook.wait_posts(1, Duration::from_secs(10)).await;
    let header = posts[0].header("traceparent").unwrap().to_owned();
    assert_eq!(ids(&header), (trace_id.clone(), trigger.span_id.clone()));
    assert_eq!(posts[0].header("ce-traceparent"), Some(header.as_str()));

    // 2. A context from the client (an MQTT 5 user property of a plain message): the ingress
    //    span is its child, in its trace.
    let parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let properties = PublishProperties {
        user_properties: vec![(
            "traceparent".to_owned(),
            format!("00-{parent_trace}-{parent_span}-01"),
        )],
        ..Default::default()
    };
    client
        .publish_with_properties("dev/2", QoS::AtLeastOnce, false, "again", properties)
        .await
        .unwrap();
    let got = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    let (trace_id, _) = ids(&traceparent_of(&got));
    assert_eq!(trace_id, parent_trace, "the client's trace goes on");
    let t = trace(&collector, parent_trace, 4).await;
    assert_eq!(one(&t, "mqtt receive").parent, parent_span, "{t:#?}");
    // 3. Another NATS program publishes a binary-mode CloudEvent with its span's context in
    //    the W3C header: the deliveries on b continue that trace, as children of its span.
    let other_trace = "0af7651916cd43dd8448eb211c80319c";
    let other_span = "b7ad6b7169203331";
    let program = async_nats::connect(nats.url()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "from-nats-1"),
        ("ce-source", "/other/program"),
        ("ce-type", "com.example.reading"),
        ("traceparent", &format!("00-{other_trace}-{other_span}-01")),
    ] {
        headers.insert(k, v);
    }
    program
        .publish_with_headers("meshgate.dev.3", headers, "21.5".into())
        .await
        .unwrap();
    program.flush().await.unwrap();
    let got = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.id(), "from-nats-1");
    let (trace_id, ws_span) = ids(&traceparent_of(&got));
    assert_eq!(trace_id, other_trace, "the NATS program's trace goes on");
    let t = trace(&collector, other_trace, 2).await;
    let deliver = one(&t, "websocket deliver");
    assert_eq!(deliver.parent, other_span, "{t:#?}");
    assert_eq!(deliver.span_id, ws_span);
    assert_eq!(one(&t, "trigger deliver").parent, other_span, "{t:#?}");
    // What was exported is counted.
    let m = meshgate_tests::metrics(a.admin.unwrap()).await;
    assert!(
        spans_counted(&m, "exported") >= 4,
        "meshgate_trace_spans_total on instance a: {m}"
    );
    assert_eq!(spans_counted(&m, "failed"), 0, "{m}");
    drop((a, b));
}

/// `meshgate_trace_spans_total{outcome}` in a `/metrics` text.
fn spans_counted(metrics: &str, outcome: &str) -> u64 {
    let prefix = format!("meshgate_trace_spans_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in {metrics}"))
}

/// A collector that cannot be reached costs spans, never events: the event is delivered, the
/// spans are counted as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_a_collector_cannot_take_are_counted_as_failed() {
    let closed = meshgate_tests::nats::free_port();
    let gw = spawn(
        &[],
        &[
            ("MESHGATE__HTTP__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__ADMIN__LISTEN", "127.0.0.1:0"),
            ("MESHGATE__TRACING__ENABLED", "true"),
            (
                "MESHGATE__TRACING__ENDPOINT",
                &format!("http://127.0.0.1:{closed}/v1/traces"),
            ),
            ("MESHGATE__TRACING__EXPORT_TIMEOUT", "1s"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let (web, admin) = (gw.web.unwrap(), gw.admin.unwrap());
    let mut ws = ws_connect(web, &["t/#"]).await;
    let status = reqwest::Client::new()
        .post(format!("http://{web}/events/t/1"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body("x")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 202);
    let got = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    let (trace_id, _) = ids(&traceparent_of(&got));
    assert_eq!(
        trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
        "the HTTP header's trace"
    );
    let d = Deadline::after(Duration::from_secs(20));
    loop {
        let m = meshgate_tests::metrics(admin).await;
        if spans_counted(&m, "failed") >= 3 {
            assert_eq!(spans_counted(&m, "exported"), 0, "{m}");
            break;
        }
        assert!(!d.passed(), "no failed spans counted: {m}");
        d.pause().await;
    }
}
