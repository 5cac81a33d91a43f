//! The AMQP 0.9.1 bridge against the real RabbitMQ on 127.0.0.1:5672: AMQP → WebSocket with
//! attributes and extension types intact, poison messages dead-lettered, HTTP and MQTT → AMQP,
//! the loop guard, readiness, and every connection closed mid-stream with each event counted.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use meshgate_config::{AmqpMode, AmqpSinkConfig, AmqpSourceConfig, Config};
use meshgate_core::{Data, ExtensionValue};
use meshgate_tests::amqp::{Rabbit, Vhost, ce_headers, header, rabbitmqctl, unique};
use meshgate_tests::{Deadline, metrics, next_event, start_gateway, test_config, ws_connect};

/// The admin API's token where a test reads `/amqp/links`.
const ADMIN_TOKEN: &str = "amqp-bridge-test-admin-token-0123";

/// `GET /amqp/links` of the admin API.
async fn amqp_links(admin: SocketAddr) -> serde_json::Value {
    let (status, links) = meshgate_tests::admin_call(
        reqwest::Method::GET,
        admin,
        "/amqp/links",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{links}");
    links
}

fn amqp_config(vhost: &str) -> Config {
    let mut c = test_config();
    c.amqp.enabled = true;
    c.amqp.vhost = vhost.to_owned();
    c.amqp.reconnect_min = Duration::from_millis(100);
    c.amqp.reconnect_max = Duration::from_secs(1);
    c
}

fn source(name: &str, queue: &str, topic_prefix: Option<&str>) -> AmqpSourceConfig {
    AmqpSourceConfig {
        name: name.to_owned(),
        queue: queue.to_owned(),
        exchange: None,
        binding_keys: Vec::new(),
        topic_prefix: topic_prefix.map(str::to_owned),
        prefetch: 64,
        wrap_source: format!("/meshgate/amqp/{name}"),
        wrap_type: "io.meshgate.amqp.message".to_owned(),
        user: None,
    }
}

fn sink(
    name: &str,
    filter: &str,
    exchange: &str,
    routing_key: &str,
    mode: AmqpMode,
) -> AmqpSinkConfig {
    AmqpSinkConfig {
        name: name.to_owned(),
        filter: filter.to_owned(),
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        mode,
        persistent: true,
        mandatory: true,
        max_in_flight: 64,
    }
}

/// Waits until every source and sink is connected and set up.
async fn links_up(gw: &meshgate::RunningGateway) {
    let status = gw.amqp.clone().expect("the AMQP bridge is enabled");
    let d = Deadline::after(Duration::from_secs(20));
    while let Some(why) = status.not_ready() {
        assert!(
            !d.passed(),
            "AMQP links not up within {:?}: {why}",
            d.within()
        );
        d.pause().await;
    }
}

async fn readyz(admin: SocketAddr) -> (u16, String) {
    let r = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Polls `/readyz` (up to 10 s) until its body contains `needle`; returns status and body.
async fn readyz_once(admin: SocketAddr, needle: &str) -> (u16, String) {
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let (code, body) = readyz(admin).await;
        if body.contains(needle) {
            return (code, body);
        }
        assert!(
            !d.passed(),
            "/readyz never said `{needle}` within {:?}: {code} {body}",
            d.within()
        );
        d.pause().await;
    }
}

fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// The value of a metric line `name{labels} value`, 0 when absent.
fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_messages_reach_websocket_with_attributes_intact_and_poison_is_dead_lettered() {
    let rabbit = Rabbit::connect("/").await;
    let (ex, q, dlx, dlq) = (unique("ex"), unique("q"), unique("dlx"), unique("dlq"));
    rabbit.exchange(&ex).await;
    rabbit.exchange(&dlx).await;
    rabbit.queue(&dlq, None).await;
    rabbit.bind(&dlq, &dlx, "#").await;
    rabbit.queue(&q, Some(&dlx)).await;
    rabbit.bind(&q, &ex, "orders.#").await;

    let mut config = amqp_config("/");
    config.amqp.sources = vec![source("orders", &q, Some("legacy"))];
    config.admin.api_token = Some(ADMIN_TOKEN.to_owned());
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let links = amqp_links(gw.admin_addr.unwrap()).await;
    assert_eq!(links["items"][0]["name"], "orders");
    assert_eq!(links["items"][0]["state"], "up", "{links}");
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["legacy/#"]).await;

    // Binary mode, as sdk-java writes it: cloudEvents_ headers, native integer and boolean.
    let binary = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers(&[
            ("cloudEvents_specversion", text("1.0")),
            ("cloudEvents_id", text("A1")),
            ("cloudEvents_source", text("/src")),
            ("cloudEvents_type", text("com.example.t")),
            ("cloudEvents_time", text("2026-12-02T10:00:00.123+01:00")),
            ("cloudEvents_seq", AMQPValue::LongLongInt(3)),
            ("cloudEvents_flag", AMQPValue::Boolean(true)),
            ("cloudEvents_room", text("kitchen")),
        ]));
    rabbit
        .publish(&ex, "orders.eu", binary, br#"{"a":1}"#)
        .await;
    // A plain message from a legacy application: wrapped.
    let plain = BasicProperties::default().with_content_type("text/plain".into());
    rabbit
        .publish(&ex, "orders.us.7", plain.clone(), b"hello")
        .await;
    // Structured mode.
    let structured = BasicProperties::default()
        .with_content_type("application/cloudevents+json; charset=utf-8".into());
    rabbit
        .publish(
            &ex,
            "orders.eu",
            structured,
            br#"{"specversion":"1.0","id":"S1","source":"/src","type":"com.example.t","ext":5,"data":{"b":2}}"#,
        )
        .await;
    // Poison: no id; an integer outside 32 bits; mixed prefixes. Rejected, dead-lettered.
    let no_id = headers(&[
        ("cloudEvents_specversion", text("1.0")),
        ("cloudEvents_source", text("/src")),
        ("cloudEvents_type", text("t")),
    ]);
    let too_big = headers(&[
        ("cloudEvents_specversion", text("1.0")),
        ("cloudEvents_id", text("P2")),
        ("cloudEvents_source", text("/src")),
        ("cloudEvents_type", text("t")),
        ("cloudEvents_seq", AMQPValue::LongLongInt(1 << 40)),
    ]);
    let mixed = headers(&[
        ("cloudEvents_specversion", text("1.0")),
        ("cloudEvents:id", text("P3")),
        ("cloudEvents_source", text("/src")),
        ("cloudEvents_type", text("t")),
    ]);
    for h in [no_id, too_big, mixed] {
        rabbit
            .publish(
                &ex,
                "orders.bad",
                BasicProperties::default().with_headers(h),
                b"x",
            )
            .await;
    }
    // The source goes on after poison.
    rabbit.publish(&ex, "orders.after", plain, b"after").await;

    let within = Duration::from_secs(10);
    let a1 = next_event(&mut ws, within).await.unwrap();
    assert_eq!(a1.id(), "A1");
    assert_eq!(a1.source(), "/src");
    assert_eq!(
        a1.time(),
        Some("2026-12-02T10:00:00.123+01:00"),
        "time forwarded exactly"
    );
    assert_eq!(a1.extension("seq"), Some(&ExtensionValue::Integer(3)));
    assert_eq!(a1.extension("flag"), Some(&ExtensionValue::Boolean(true)));
    assert_eq!(
        a1.extension("room"),
        Some(&ExtensionValue::String("kitchen".into()))
    );
    assert_eq!(a1.datacontenttype(), Some("application/json"));
    assert_eq!(&a1.data().unwrap().to_bytes()[..], br#"{"a":1}"#);
    assert!(
        a1.subject().is_none(),
        "the binding adds no subject to a CloudEvent"
    );

    let hello = next_event(&mut ws, within).await.unwrap();
    assert_eq!(hello.source(), "/meshgate/amqp/orders");
    assert_eq!(hello.ty(), "io.meshgate.amqp.message");
    assert_eq!(
        hello.subject(),
        Some("orders.us.7"),
        "the routing key is the subject"
    );
    assert_eq!(hello.datacontenttype(), Some("text/plain"));
    assert_eq!(&hello.data().unwrap().to_bytes()[..], b"hello");
    assert!(hello.time().is_some());

    let s1 = next_event(&mut ws, within).await.unwrap();
    assert_eq!(s1.id(), "S1");
    assert_eq!(s1.extension("ext"), Some(&ExtensionValue::Integer(5)));
    assert!(matches!(s1.data(), Some(Data::Json(j)) if j.get() == r#"{"b":2}"#));

    let after = next_event(&mut ws, within).await.unwrap();
    assert_eq!(after.subject(), Some("orders.after"));

    let dead = rabbit.consume(&dlq, 3, within).await;
    assert_eq!(
        dead.len(),
        3,
        "the three poison messages were dead-lettered"
    );
    let dead_ids: HashSet<String> = dead
        .iter()
        .filter_map(|d| {
            match header(&d.properties, "cloudEvents_id")
                .or_else(|| header(&d.properties, "cloudEvents:id"))
            {
                Some(AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            }
        })
        .collect();
    assert_eq!(dead_ids, HashSet::from(["P2".to_owned(), "P3".to_owned()]));

    let m = metrics(gw.admin_addr.unwrap()).await;
    assert_eq!(
        metric(&m, "meshgate_events_received_total{adapter=\"amqp\"}"),
        4,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "meshgate_events_dropped_total{adapter=\"amqp\",reason=\"rejected\"}"
        ),
        3,
        "{m}"
    );
    assert_eq!(
        metric(&m, "meshgate_amqp_link_up{kind=\"source\",link=\"orders\"}"),
        1,
        "{m}"
    );
    assert_eq!(readyz(gw.admin_addr.unwrap()).await.0, 200);

    gw.shutdown().await;
    rabbit.delete_queue(&q).await;
    rabbit.delete_queue(&dlq).await;
    rabbit.delete_exchange(&ex).await;
    rabbit.delete_exchange(&dlx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_mqtt_events_reach_amqp_once_and_never_loop_back() {
    let rabbit = Rabbit::connect("/").await;
    let (ex, out, back) = (unique("ex"), unique("out"), unique("back"));
    rabbit.exchange(&ex).await;
    rabbit.queue(&out, None).await;
    rabbit.bind(&out, &ex, "out.#").await;
    // A queue bound to the sinks' exchange and consumed by a source: what the sinks publish
    // comes back to meshgate, which must not publish it into the mesh again.
    rabbit.queue(&back, None).await;
    rabbit.bind(&back, &ex, "out.#").await;

    let mut config = amqp_config("/");
    config.mqtt.enabled = true;
    config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    config.amqp.sinks = vec![
        sink("bin", "out/bin/#", &ex, "{topic}", AmqpMode::Binary),
        sink("json", "out/json/#", &ex, "{topic}", AmqpMode::Structured),
        sink(
            "lost",
            "out/unroutable/#",
            &ex,
            "nowhere.{type}",
            AmqpMode::Binary,
        ),
    ];
    config.amqp.sources = vec![source("back", &back, None)];
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let mut ws = ws_connect(web, &["#"]).await;

    let post = |topic: &'static str, body: &'static str| async move {
        reqwest::Client::new()
            .post(format!("http://{web}/events/{topic}"))
            .header("content-type", "application/cloudevents+json")
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        post(
            "out/bin/a",
            r#"{"specversion":"1.0","id":"B1","source":"/test","type":"t","seq":5,"flag":true,"time":"2026-12-02T10:00:00.5+01:00","datacontenttype":"text/plain","data":"hi"}"#
        )
        .await,
        202
    );
    assert_eq!(
        post(
            "out/json/b",
            r#"{"specversion":"1.0","id":"J1","source":"/test","type":"t","seq":6,"data":{"x":1}}"#
        )
        .await,
        202
    );
    let mqtt_port = gw.mqtt_addr.unwrap().port().to_string();
    let pub_status = std::process::Command::new("mosquitto_pub")
        .args([
            "-p", &mqtt_port, "-V", "mqttv311", "-i", "thermo-7", "-q", "1",
        ])
        .args(["-t", "out/bin/mqtt", "-m", "21.5"])
        .status()
        .expect("mosquitto_pub (package mosquitto-clients)");
    assert!(pub_status.success());
    assert_eq!(
        post(
            "out/unroutable/x",
            r#"{"specversion":"1.0","id":"U1","source":"/test","type":"t"}"#
        )
        .await,
        202
    );

    let got = rabbit.consume(&out, 3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);
    let by_key = |k: &str| {
        got.iter()
            .find(|d| d.routing_key.as_str() == k)
            .unwrap_or_else(|| panic!("no message with routing key {k}"))
    };
    let b1 = by_key("out.bin.a");
    let p = &b1.properties;
    assert_eq!(
        p.content_type().as_ref().map(|c| c.as_str()),
        Some("text/plain")
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(b1.data, b"hi");
    assert_eq!(header(p, "cloudEvents_id"), Some(&text("B1")));
    assert_eq!(header(p, "cloudEvents_specversion"), Some(&text("1.0")));
    assert_eq!(
        header(p, "cloudEvents_seq"),
        Some(&AMQPValue::LongLongInt(5))
    );
    assert_eq!(
        header(p, "cloudEvents_flag"),
        Some(&AMQPValue::Boolean(true))
    );
    assert_eq!(
        header(p, "cloudEvents_time"),
        Some(&text("2026-12-02T10:00:00.5+01:00"))
    );
    assert!(
        header(p, "cloudEvents_datacontenttype").is_none(),
        "it is content_type"
    );
    assert_eq!(header(p, "x-meshgate-origin"), Some(&text(&gw.instance)));

    let j1 = by_key("out.json.b");
    assert_eq!(
        j1.properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/cloudevents+json")
    );
    let e = meshgate_core::json::decode(&j1.data).unwrap();
    assert_eq!(
        (e.id(), e.extension("seq")),
        ("J1", Some(&ExtensionValue::Integer(6)))
    );

    let m1 = by_key("out.bin.mqtt");
    assert_eq!(m1.data, b"21.5");
    assert_eq!(
        header(&m1.properties, "cloudEvents_source"),
        Some(&text("/meshgate/mqtt/thermo-7"))
    );

    // Each event reached the WebSocket subscriber once: the three copies that came back
    // through `back` were skipped.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(
            next_event(&mut ws, Duration::from_secs(10))
                .await
                .unwrap()
                .id()
                .to_owned(),
        );
    }
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let m = metrics(admin).await;
        let looped = metric(
            &m,
            "meshgate_events_dropped_total{adapter=\"amqp\",reason=\"loop\"}",
        );
        let unroutable = metric(
            &m,
            "meshgate_events_dropped_total{adapter=\"amqp\",reason=\"unroutable\"}",
        );
        if looped == 3 && unroutable == 1 {
            assert_eq!(
                metric(&m, "meshgate_events_sent_total{adapter=\"amqp\"}"),
                3,
                "{m}"
            );
            assert_eq!(
                metric(&m, "meshgate_events_received_total{adapter=\"amqp\"}"),
                0,
                "{m}"
            );
            break;
        }
        assert!(
            !d.passed(),
            "loop guard / unroutable counts not reached:\n{m}"
        );
        d.pause().await;
    }
    let extra = tokio::time::timeout(
        Duration::from_millis(500),
        next_event(&mut ws, Duration::from_secs(1)),
    )
    .await;
    assert!(
        extra.is_err(),
        "no event came back into the mesh, saw {seen:?} then {extra:?}"
    );

    gw.shutdown().await;
    rabbit.delete_queue(&out).await;
    rabbit.delete_queue(&back).await;
    rabbit.delete_exchange(&ex).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_the_link_that_is_down() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = amqp_config("/");
    config.amqp.url = format!("amqp://127.0.0.1:{port}");
    config.amqp.sources = vec![source("nowhere", "q", None)];
    let gw = start_gateway(config).await;
    let admin = gw.admin_addr.unwrap();
    let (code, body) = readyz_once(admin, "cannot connect").await;
    assert_eq!(code, 503);
    assert!(body.contains("amqp source `nowhere`"), "{body}");
    assert!(body.contains(&format!("127.0.0.1:{port}")), "{body}");
    assert!(
        body.contains("`nowhere`: network:"),
        "an unreachable broker reads as a network failure: {body}"
    );
    gw.shutdown().await;

    // A wrong password reads as a login failure, not as a network one, on both kinds of link
    // (the sources' own consumer connection and the sinks' lapin connection).
    let mut config = amqp_config("/");
    config.amqp.password = "not-the-password".to_owned();
    config.amqp.sources = vec![source("badlogin", "q", None)];
    config.amqp.sinks = vec![sink("badsink", "#", "", "x", AmqpMode::Binary)];
    config.admin.api_token = Some(ADMIN_TOKEN.to_owned());
    let gw = start_gateway(config).await;
    let admin = gw.admin_addr.unwrap();
    let (code, body) = readyz_once(admin, "`badsink`: auth:").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("amqp source `badlogin`: auth:") && body.contains("check amqp.user"),
        "{body}"
    );
    // The admin API lists both links with their state and why they are down.
    let links = amqp_links(admin).await;
    let items = links["items"].as_array().unwrap();
    let names: Vec<(&str, &str, &str)> = items
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap(),
                l["name"].as_str().unwrap(),
                l["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [("source", "badlogin", "down"), ("sink", "badsink", "down")],
        "{links}"
    );
    assert!(
        items
            .iter()
            .all(|l| l["last_error"].as_str().unwrap().contains("auth")),
        "{links}"
    );
    gw.shutdown().await;

    // A queue that does not exist: the broker's refusal is what /readyz shows.
    let mut config = amqp_config("/");
    let missing = unique("missing");
    config.amqp.sources = vec![source("missing", &missing, None)];
    let gw = start_gateway(config).await;
    let admin = gw.admin_addr.unwrap();
    let (code, body) = readyz_once(admin, &missing).await;
    assert_eq!(code, 503);
    assert!(body.contains("`missing`: refused:"), "{body}");
    assert!(
        body.contains("NOT_FOUND") || body.contains("not found") || body.contains("NotFound"),
        "{body}"
    );
    gw.shutdown().await;
}

/// Publishes `cloudEvents_`-headed messages with ids `m-<i>` to `queue` (default exchange),
/// reconnecting when the connection is closed under it; returns once all `n` are confirmed.
async fn publish_all(vhost: String, queue: String, n: usize, pace: Duration) -> usize {
    let mut rabbit = Rabbit::connect(&vhost).await;
    let mut reconnects = 0;
    let mut i = 0;
    while i < n {
        let props = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_headers(ce_headers(&format!("m-{i}"), &[]));
        let confirmed = async {
            rabbit
                .channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    Default::default(),
                    b"x",
                    props,
                )
                .await?
                .await
        }
        .await;
        match confirmed {
            Ok(c) if c.is_ack() => {
                i += 1;
                tokio::time::sleep(pace).await;
            }
            _ => {
                // Closed under us: the message may or may not be stored; send it again.
                reconnects += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                rabbit = Rabbit::connect(&vhost).await;
            }
        }
    }
    reconnects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_every_connection_mid_stream_loses_nothing_acknowledged() {
    let vhost = Vhost::create();
    let rabbit = Rabbit::connect(&vhost.name).await;
    let (input, ex, out) = (unique("in"), unique("ex"), unique("out"));
    rabbit.queue(&input, None).await;
    rabbit.exchange(&ex).await;
    rabbit.queue(&out, None).await;
    rabbit.bind(&out, &ex, "flow.#").await;

    let mut config = amqp_config(&vhost.name);
    config.amqp.sources = vec![source("in", &input, Some("flow"))];
    config.amqp.sinks = vec![sink("out", "flow/#", &ex, "{topic}", AmqpMode::Binary)];
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let admin = gw.admin_addr.unwrap();
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["flow/#"]).await;

    const N: usize = 3000;
    let publisher = tokio::spawn(publish_all(
        vhost.name.clone(),
        input.clone(),
        N,
        Duration::from_micros(300),
    ));
    // Let the stream flow, then close every connection of the vhost: meshgate's source and
    // sink, and this test's own publisher and consumer.
    let d = Deadline::after(Duration::from_secs(20));
    while metric(
        &metrics(admin).await,
        "meshgate_events_sent_total{adapter=\"amqp\"}",
    ) < 500
    {
        assert!(!d.passed(), "the stream did not start");
        d.pause().await;
    }
    vhost.close_all_connections();
    let publisher_reconnects = publisher.await.unwrap();

    // Every confirmed message reached the WebSocket subscriber and, through the sink, the
    // output queue: at least once (a message acknowledged just before the close may come twice).
    let mut ws_ids = HashSet::new();
    let mut ws_total = 0;
    while ws_ids.len() < N {
        let e = next_event(&mut ws, Duration::from_secs(30)).await.unwrap();
        ws_total += 1;
        ws_ids.insert(e.id().to_owned());
    }
    let reader = Rabbit::connect(&vhost.name).await;
    let mut out_ids = HashSet::new();
    let mut out_total = 0;
    let d = Deadline::after(Duration::from_secs(30));
    while out_ids.len() < N {
        for m in reader.consume(&out, N, Duration::from_secs(2)).await {
            out_total += 1;
            if let Some(AMQPValue::LongString(id)) = header(&m.properties, "cloudEvents_id") {
                out_ids.insert(String::from_utf8_lossy(id.as_bytes()).into_owned());
            }
        }
        assert!(
            !d.passed(),
            "only {} of {N} reached the output queue",
            out_ids.len()
        );
    }
    let m = metrics(admin).await;
    println!(
        "published {N} (publisher reconnected {publisher_reconnects}x); websocket got {ws_total} ({} unique); output queue got {out_total} ({} unique)",
        ws_ids.len(),
        out_ids.len()
    );
    assert!(
        metric(
            &m,
            "meshgate_amqp_reconnects_total{kind=\"source\",link=\"in\"}"
        ) >= 1,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "meshgate_amqp_reconnects_total{kind=\"sink\",link=\"out\"}"
        ) >= 1,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "meshgate_events_dropped_total{adapter=\"amqp\",reason=\"unconfirmed\"}"
        ),
        0,
        "{m}"
    );
    links_up(&gw).await;
    gw.shutdown().await;
    drop(reader);
    drop(rabbit);
}

/// Over JetStream (publishes pipelined up to `prefetch`, each AMQP ack after its PubAck) with
/// two gateway instances sharing one sink: every message reaches the other instance's
/// WebSocket subscriber, and the sink's queue group publishes each event to RabbitMQ once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_jetstream_publish_each_event_to_amqp_once() {
    let nats = meshgate_tests::nats::NatsServer::start();
    let rabbit = Rabbit::connect("/").await;
    let (input, ex, out) = (unique("in"), unique("ex"), unique("out"));
    rabbit.queue(&input, None).await;
    rabbit.exchange(&ex).await;
    rabbit.queue(&out, None).await;
    rabbit.bind(&out, &ex, "js.#").await;

    let instance = |id: &str, with_source: bool| {
        let mut c = amqp_config("/");
        c.gateway.instance_id = Some(id.to_owned());
        c.backbone.kind = meshgate_config::BackboneKind::JetStream;
        c.backbone.nats.urls = vec![nats.url()];
        c.amqp.sinks = vec![sink("out", "js/#", &ex, "{topic}", AmqpMode::Binary)];
        if with_source {
            c.amqp.sources = vec![source("in", &input, Some("js"))];
        }
        c
    };
    let a = start_gateway(instance("amqp-js-a", true)).await;
    let b = start_gateway(instance("amqp-js-b", false)).await;
    links_up(&a).await;
    links_up(&b).await;
    let mut ws = ws_connect(b.web_addr.unwrap(), &["js/#"]).await;

    const N: usize = 500;
    let props = |i: usize| {
        BasicProperties::default().with_headers(ce_headers(
            &format!("js-{i}"),
            &[("cloudEvents_seq", AMQPValue::LongInt(i as i32))],
        ))
    };
    for i in 0..N {
        rabbit.publish("", &input, props(i), b"x").await;
    }
    let mut ws_ids = HashSet::new();
    while ws_ids.len() < N {
        let e = next_event(&mut ws, Duration::from_secs(20)).await.unwrap();
        assert_eq!(
            e.extension("seq"),
            Some(&ExtensionValue::Integer(e.id()[3..].parse().unwrap()))
        );
        ws_ids.insert(e.id().to_owned());
    }
    let got = rabbit.consume(&out, N + 50, Duration::from_secs(5)).await;
    let out_ids: HashSet<String> = got
        .iter()
        .filter_map(|m| match header(&m.properties, "cloudEvents_id") {
            Some(AMQPValue::LongString(s)) => {
                Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            _ => None,
        })
        .collect();
    assert_eq!(out_ids.len(), N, "every event reached the output queue");
    assert_eq!(
        got.len(),
        N,
        "and once: the sink's queue group spans both instances"
    );
    let published = |m: &str| metric(m, "meshgate_events_sent_total{adapter=\"amqp\"}");
    let (ma, mb) = (
        metrics(a.admin_addr.unwrap()).await,
        metrics(b.admin_addr.unwrap()).await,
    );
    assert_eq!(published(&ma) + published(&mb), N as u64, "{ma}\n{mb}");
    assert_eq!(
        metric(&ma, "meshgate_events_received_total{adapter=\"amqp\"}"),
        N as u64,
        "{ma}"
    );
    a.shutdown().await;
    b.shutdown().await;
    rabbit.delete_queue(&input).await;
    rabbit.delete_queue(&out).await;
    rabbit.delete_exchange(&ex).await;
}

/// JetStream killed while a source is consuming: what the backbone could not take stays in
/// RabbitMQ (nacked with requeue, never acknowledged) and arrives once NATS is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_a_source_loses_no_message() {
    let mut nats = meshgate_tests::nats::NatsServer::start();
    let rabbit = Rabbit::connect("/").await;
    let input = unique("in");
    rabbit.queue(&input, None).await;
    let mut c = amqp_config("/");
    c.gateway.instance_id = Some("amqp-js-restart".to_owned());
    c.backbone.kind = meshgate_config::BackboneKind::JetStream;
    c.backbone.nats.urls = vec![nats.url()];
    c.amqp.sources = vec![source("in", &input, Some("restart"))];
    let gw = start_gateway(c).await;
    links_up(&gw).await;
    let admin = gw.admin_addr.unwrap();
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["restart/#"]).await;

    const N: usize = 300;
    let props =
        |i: usize| BasicProperties::default().with_headers(ce_headers(&format!("r-{i}"), &[]));
    for i in 0..N {
        if i == 100 {
            nats.kill();
        }
        if i == 200 {
            nats.restart();
        }
        rabbit.publish("", &input, props(i), b"x").await;
    }
    let mut ids = HashSet::new();
    while ids.len() < N {
        let e = next_event(&mut ws, Duration::from_secs(30))
            .await
            .unwrap_or_else(|c| panic!("closed ({c:?}) with {} of {N} received", ids.len()));
        ids.insert(e.id().to_owned());
    }
    let m = metrics(admin).await;
    assert_eq!(
        metric(
            &m,
            "meshgate_events_dropped_total{adapter=\"amqp\",reason=\"rejected\"}"
        ),
        0,
        "nothing was rejected for a transient failure:\n{m}"
    );
    assert!(
        metric(
            &m,
            "meshgate_errors_total{adapter=\"amqp\",kind=\"backbone\"}"
        ) > 0,
        "the backbone refused publishes while NATS was down (so they were requeued):\n{m}"
    );
    gw.shutdown().await;
    rabbit.delete_queue(&input).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_and_credentials_kept_out_of_messages() {
    let dir = std::env::temp_dir().join(format!("meshgate-amqps-{}", std::process::id()));
    let (ca, cert, key) = meshgate_tests::certs::private_ca(&dir);
    // A TLS front for the RabbitMQ on 127.0.0.1:5672 (as a TLS-terminating proxy or RabbitMQ's
    // own `listeners.ssl` would be).
    let port = meshgate_tests::certs::tls_front(&cert, &key, "127.0.0.1:5672").await;
    let rabbit = Rabbit::connect("/").await;
    let q = unique("tls");
    rabbit.queue(&q, None).await;

    // amqps with the CA that signed the broker's certificate: events flow.
    let mut config = amqp_config("/");
    config.amqp.url = format!("amqps://127.0.0.1:{port}");
    config.amqp.ca_file = Some(ca.clone());
    config.amqp.sources = vec![source("tls", &q, Some("tls"))];
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["tls/#"]).await;
    rabbit
        .publish(
            "",
            &q,
            BasicProperties::default().with_content_type("text/plain".into()),
            b"over tls",
        )
        .await;
    let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(&e.data().unwrap().to_bytes()[..], b"over tls");
    gw.shutdown().await;

    // Without that CA (the system roots) the certificate is refused, and /readyz says so.
    let mut config = amqp_config("/");
    config.amqp.url = format!("amqps://127.0.0.1:{port}");
    config.amqp.sources = vec![source("untrusted", &q, None)];
    let gw = start_gateway(config).await;
    let admin = gw.admin_addr.unwrap();
    let (code, body) = readyz_once(admin, "cannot connect").await;
    assert_eq!(code, 503);
    assert!(body.to_lowercase().contains("certificate"), "{body}");
    gw.shutdown().await;

    // A wrong password: the refusal is reported, the password is not.
    let secret = "not-the-password-7f3a";
    let mut config = amqp_config("/");
    config.amqp.password = secret.to_owned();
    config.amqp.sources = vec![source("badpass", &q, None)];
    let debug = format!("{config:?}");
    assert!(!debug.contains(secret), "Debug output hides the password");
    let gw = start_gateway(config).await;
    let admin = gw.admin_addr.unwrap();
    let (code, body) = readyz_once(admin, "cannot connect").await;
    assert_eq!(code, 503);
    assert!(!body.contains(secret), "{body}");
    println!("wrong password reported as: {}", readyz(admin).await.1);
    assert!(!metrics(admin).await.contains(secret));
    gw.shutdown().await;
    rabbit.delete_queue(&q).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A graceful shutdown right after a burst: every event the gateway accepted (202) is still
/// published to RabbitMQ by the sink before it closes its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_publishes_everything_the_sink_was_given() {
    let rabbit = Rabbit::connect("/").await;
    let (ex, out) = (unique("ex"), unique("out"));
    rabbit.exchange(&ex).await;
    rabbit.queue(&out, None).await;
    rabbit.bind(&out, &ex, "sd.#").await;
    let mut config = amqp_config("/");
    config.amqp.sinks = vec![sink("sd", "sd/#", &ex, "{topic}", AmqpMode::Binary)];
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let web = gw.web_addr.unwrap();
    const N: usize = 400;
    let client = reqwest::Client::new();
    let mut accepted = 0;
    for chunk in (0..N).collect::<Vec<_>>().chunks(50) {
        let posts = chunk.iter().map(|i| {
            client
                .post(format!("http://{web}/events/sd/x"))
                .header("content-type", "application/cloudevents+json")
                .body(format!(
                    r#"{{"specversion":"1.0","id":"sd-{i}","source":"/t","type":"t"}}"#
                ))
                .send()
        });
        for r in futures_util::future::join_all(posts).await {
            assert_eq!(r.unwrap().status(), 202);
            accepted += 1;
        }
    }
    let report = gw.shutdown().await;
    assert!(report.clean, "shutdown within the grace period");
    let got = rabbit.consume(&out, N, Duration::from_secs(10)).await;
    assert_eq!(
        got.len(),
        accepted,
        "every accepted event was published before shutdown ended"
    );
    rabbit.delete_queue(&out).await;
    rabbit.delete_exchange(&ex).await;
}

/// The queue a source declared is deleted under it: the broker cancels the consumer, the
/// source reconnects, declares and binds the queue again, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_is_declared_and_bound_again() {
    let rabbit = Rabbit::connect("/").await;
    let ex = unique("ex");
    // Not auto-deleted: deleting the queue removes the exchange's last binding.
    rabbit.exchange_kept(&ex).await;
    let queue = unique("declared");
    let mut config = amqp_config("/");
    let mut s = source("decl", &queue, Some("decl"));
    s.exchange = Some(ex.clone());
    s.binding_keys = vec!["a.#".to_owned(), "b.*".to_owned()];
    config.amqp.sources = vec![s];
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let admin = gw.admin_addr.unwrap();
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["decl/#"]).await;
    let plain = BasicProperties::default().with_content_type("text/plain".into());
    rabbit.publish(&ex, "a.1", plain.clone(), b"one").await;
    rabbit.publish(&ex, "b.2", plain.clone(), b"two").await;
    rabbit.publish(&ex, "c.3", plain.clone(), b"unbound").await;
    for want in ["a.1", "b.2"] {
        let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
        assert_eq!(e.subject(), Some(want));
    }
    rabbit.delete_queue(&queue).await;
    let d = Deadline::after(Duration::from_secs(20));
    while metric(
        &metrics(admin).await,
        "meshgate_amqp_reconnects_total{kind=\"source\",link=\"decl\"}",
    ) < 1
    {
        assert!(
            !d.passed(),
            "the source did not notice its queue was deleted"
        );
        d.pause().await;
    }
    links_up(&gw).await;
    rabbit.publish(&ex, "a.after", plain, b"after").await;
    let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(e.subject(), Some("a.after"), "queue and bindings are back");
    gw.shutdown().await;
    rabbit.delete_queue(&queue).await;
    rabbit.delete_exchange(&ex).await;
}

/// The sources' own consumer connection negotiates the configured heartbeat with RabbitMQ
/// (its `timeout` column), keeps an idle connection alive with it — RabbitMQ closes a
/// connection after two missed intervals — and still delivers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_source_stays_connected_on_one_second_heartbeats() {
    let rabbit = Rabbit::connect("/").await;
    let q = unique("heartbeat");
    rabbit.queue(&q, None).await;
    let name = unique("hb");
    let mut config = amqp_config("/");
    config.amqp.heartbeat = Duration::from_secs(1);
    config.amqp.sources = vec![source(&name, &q, Some("hb"))];
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let admin = gw.admin_addr.unwrap();

    let listing = rabbitmqctl(&[
        "list_connections",
        "timeout",
        "client_properties",
        "--quiet",
        "--no-table-headers",
    ]);
    let line = listing
        .lines()
        .find(|l| l.contains(&format!("source {name}")))
        .unwrap_or_else(|| panic!("the source's connection is not listed: {listing}"));
    assert!(
        line.starts_with("1\t"),
        "heartbeat of 1 s negotiated: {line:?}"
    );

    // Five intervals without a message: only heartbeats keep the connection.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let text = metrics(admin).await;
    assert_eq!(
        metric(
            &text,
            &format!("meshgate_amqp_reconnects_total{{kind=\"source\",link=\"{name}\"}}")
        ),
        0,
        "the connection was never lost"
    );
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["hb/#"]).await;
    rabbit
        .publish(
            "",
            &q,
            BasicProperties::default().with_content_type("text/plain".into()),
            b"after a quiet while",
        )
        .await;
    let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(&e.data().unwrap().to_bytes()[..], b"after a quiet while");
    gw.shutdown().await;
    rabbit.delete_queue(&q).await;
}

/// Messages waiting before the source starts arrive with (or right after) `consume-ok`, often
/// in the same read; they are handled at once — without heartbeats (0), nothing else would
/// wake the source while RabbitMQ waits for acks of its full prefetch window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_waiting_before_the_source_starts_is_consumed() {
    let rabbit = Rabbit::connect("/").await;
    let q = unique("backlog");
    rabbit.queue(&q, None).await;
    let plain = BasicProperties::default().with_content_type("text/plain".into());
    for i in 0..5 {
        rabbit
            .publish("", &q, plain.clone(), format!("waiting {i}").as_bytes())
            .await;
    }
    let mut config = amqp_config("/");
    config.amqp.heartbeat = Duration::ZERO;
    let mut s = source("backlog", &q, Some("backlog"));
    s.prefetch = 5;
    config.amqp.sources = vec![s];
    let gw = start_gateway(config).await;
    let d = Deadline::after(Duration::from_secs(10));
    loop {
        let listing = rabbitmqctl(&[
            "list_queues",
            "name",
            "messages",
            "--quiet",
            "--no-table-headers",
        ]);
        let left = listing
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{q}\t")))
            .map(|n| n.trim().to_owned());
        if left.as_deref() == Some("0") {
            break;
        }
        if d.passed() {
            let text = metrics(gw.admin_addr.unwrap()).await;
            panic!("the backlog was not consumed and acknowledged: {left:?} left\n{text}");
        }
        d.pause().await;
    }
    let text = metrics(gw.admin_addr.unwrap()).await;
    assert!(
        text.lines().any(
            |l| l.starts_with("meshgate_events_received_total{adapter=\"amqp\"")
                && l.ends_with(" 5")
        ),
        "five events received:\n{text}"
    );
    gw.shutdown().await;
    rabbit.delete_queue(&q).await;
}

/// Review F20: a source with `user` publishes as that user: what its ACL refuses is rejected
/// to the dead-letter exchange and counted, what it allows is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_with_a_user_is_held_to_that_users_acl() {
    let rabbit = Rabbit::connect("/").await;
    let (q, dlx, dlq) = (unique("q"), unique("dlx"), unique("dlq"));
    rabbit.exchange(&dlx).await;
    rabbit.queue(&dlq, None).await;
    rabbit.bind(&dlq, &dlx, "#").await;
    rabbit.queue(&q, Some(&dlx)).await;

    let mut config = amqp_config("/");
    config.auth.users = vec![meshgate_tests::token_user(
        "legacy-app",
        vec!["legacy/allowed/#".into()],
        Vec::new(),
    )];
    let mut s = source("orders", &q, Some("legacy"));
    s.user = Some("legacy-app".into());
    config.amqp.sources = vec![s];
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let plain = BasicProperties::default().with_content_type("text/plain".into());
    // Through the default exchange the routing key is the queue's name: the topic is
    // legacy/<queue>, outside legacy/allowed/#: refused by the ACL.
    rabbit.publish("", &q, plain.clone(), b"first").await;
    let dead = rabbit.get(&dlq, Duration::from_secs(10)).await;
    assert!(dead.is_some(), "the refused message is dead-lettered");
    let m = metrics(gw.admin_addr.unwrap()).await;
    assert!(
        metric(
            &m,
            "meshgate_events_dropped_total{adapter=\"amqp\",reason=\"rejected\"}"
        ) >= 1,
        "{m}"
    );
    gw.shutdown().await;

    // The same source with a topic its user may publish to: delivered.
    let mut config = amqp_config("/");
    config.auth.users = vec![meshgate_tests::token_user(
        "legacy-app",
        vec![format!("legacy/allowed/{}", q.replace('.', "/"))],
        Vec::new(),
    )];
    let mut s = source("orders", &q, Some("legacy/allowed"));
    s.user = Some("legacy-app".into());
    config.amqp.sources = vec![s];
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let mut ws2 = ws_connect(gw.web_addr.unwrap(), &["legacy/#"]).await;
    rabbit.publish("", &q, plain, b"second").await;
    let e = next_event(&mut ws2, Duration::from_secs(10)).await.unwrap();
    assert_eq!(e.data().unwrap().as_slice(), b"second");
    gw.shutdown().await;
    rabbit.delete_queue(&q).await;
    rabbit.delete_queue(&dlq).await;
    rabbit.delete_exchange(&dlx).await;
}

/// amqps to a broker that requires client certificates (issue 22 item 3): a TLS front that
/// verifies them stands before RabbitMQ. With `amqp.tls_cert_file`/`tls_key_file` the source
/// (meshgate's own consumer connection) and the sink (lapin) both connect and carry messages;
/// without them the handshake fails and /readyz says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_client_certificate() {
    let dir = std::env::temp_dir().join(format!("meshgate-amqps-mtls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ca, cert, key) = meshgate_tests::certs::private_ca(&dir);
    let client = meshgate_tests::certs::client_cert(&dir, "meshgate", "client");
    let port = meshgate_tests::certs::tls_front_verifying(&cert, &key, &ca, "127.0.0.1:5672").await;
    let rabbit = Rabbit::connect("/").await;
    let (input, output) = (unique("mtls-in"), unique("mtls-out"));
    rabbit.queue(&input, None).await;
    rabbit.queue(&output, None).await;

    let mut config = amqp_config("/");
    config.amqp.url = format!("amqps://127.0.0.1:{port}");
    config.amqp.ca_file = Some(ca.clone());
    config.amqp.client_cert = Some(client.clone());
    config.amqp.sources = vec![source("mtls", &input, Some("mtls"))];
    config.amqp.sinks = vec![sink("mtls-out", "out/#", "", &output, AmqpMode::Binary)];
    let gw = start_gateway(config).await;
    links_up(&gw).await;
    let mut ws = ws_connect(gw.web_addr.unwrap(), &["mtls/#"]).await;
    rabbit
        .publish(
            "",
            &input,
            BasicProperties::default().with_content_type("text/plain".into()),
            b"with a client certificate",
        )
        .await;
    let e = next_event(&mut ws, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        &e.data().unwrap().to_bytes()[..],
        b"with a client certificate"
    );
    let status = reqwest::Client::new()
        .post(format!("http://{}/events/out/x", gw.web_addr.unwrap()))
        .header("content-type", "application/cloudevents+json")
        .body(r#"{"specversion":"1.0","id":"m1","source":"/t","type":"t","data":"to the sink"}"#)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 202);
    let got = rabbit.get(&output, Duration::from_secs(10)).await;
    assert!(got.is_some(), "the sink wrote over mutual TLS");
    gw.shutdown().await;

    // Without the client certificate the front refuses the handshake.
    let mut config = amqp_config("/");
    config.amqp.url = format!("amqps://127.0.0.1:{port}");
    config.amqp.ca_file = Some(ca.clone());
    config.amqp.sources = vec![source("mtls-none", &input, None)];
    let gw = start_gateway(config).await;
    let (code, _) = readyz_once(gw.admin_addr.unwrap(), "cannot connect").await;
    assert_eq!(code, 503);
    gw.shutdown().await;
    rabbit.delete_queue(&input).await;
    rabbit.delete_queue(&output).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload changes the bridge's links in place (issue 25 item 3): a source added starts
/// consuming, a sink whose exchange changed publishes to the new one, a removed sink stops,
/// and a sink left as it was keeps its connection (no reconnect counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_changes_and_removes_links_in_place() {
    let rabbit = Rabbit::connect("/").await;
    let (old_ex, new_ex, keep_ex) = (unique("old-ex"), unique("new-ex"), unique("keep-ex"));
    let (old_q, new_q, keep_q, in_q) = (
        unique("old-q"),
        unique("new-q"),
        unique("keep-q"),
        unique("in-q"),
    );
    for (ex, q) in [(&old_ex, &old_q), (&new_ex, &new_q), (&keep_ex, &keep_q)] {
        rabbit.exchange(ex).await;
        rabbit.queue(q, None).await;
        rabbit.bind(q, ex, "#").await;
    }
    rabbit.queue(&in_q, None).await;

    let mut config = amqp_config("/");
    config.admin.api_token = Some(ADMIN_TOKEN.to_owned());
    config.amqp.sinks = vec![
        sink("moving", "r/moving/#", &old_ex, "{topic}", AmqpMode::Binary),
        sink("gone", "r/gone/#", &old_ex, "{topic}", AmqpMode::Binary),
        sink("kept", "r/kept/#", &keep_ex, "{topic}", AmqpMode::Binary),
    ];
    let gw = start_gateway(config.clone()).await;
    links_up(&gw).await;
    let (web, admin) = (gw.web_addr.unwrap(), gw.admin_addr.unwrap());
    let kept_reconnects = |m: &str| {
        metric(
            m,
            r#"meshgate_amqp_reconnects_total{kind="sink",link="kept"}"#,
        )
    };
    let before = kept_reconnects(&metrics(admin).await);

    let mut next = config.clone();
    next.amqp.sinks = vec![
        sink("moving", "r/moving/#", &new_ex, "{topic}", AmqpMode::Binary),
        sink("kept", "r/kept/#", &keep_ex, "{topic}", AmqpMode::Binary),
    ];
    next.amqp.sources = vec![source("incoming", &in_q, Some("from-amqp"))];
    let done = gw.reloader().apply(next).await.unwrap();
    assert_eq!(done.changed, ["amqp"]);
    links_up(&gw).await;
    let links = amqp_links(admin).await;
    let names: Vec<(String, String)> = links["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap().to_owned(),
                l["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("source".to_owned(), "incoming".to_owned()),
            ("sink".to_owned(), "moving".to_owned()),
            ("sink".to_owned(), "kept".to_owned()),
        ],
        "{links}"
    );

    let post = |topic: &'static str, id: &'static str| async move {
        reqwest::Client::new()
            .post(format!("http://{web}/events/{topic}"))
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "/reload")
            .header("ce-type", "t")
            .body("x")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post("r/moving/1", "M1").await, 202);
    assert_eq!(post("r/gone/1", "G1").await, 202);
    assert_eq!(post("r/kept/1", "K1").await, 202);
    let within = Duration::from_secs(10);
    let moved = rabbit
        .get(&new_q, within)
        .await
        .expect("the changed sink publishes to its new exchange");
    assert_eq!(
        header(&moved.properties, "cloudEvents_id"),
        Some(&text("M1"))
    );
    let kept = rabbit
        .get(&keep_q, within)
        .await
        .expect("the kept sink goes on");
    assert_eq!(
        header(&kept.properties, "cloudEvents_id"),
        Some(&text("K1"))
    );
    assert!(
        rabbit
            .get(&old_q, Duration::from_millis(500))
            .await
            .is_none(),
        "nothing more to the old exchange: the removed sink and the old one stopped"
    );
    assert_eq!(
        kept_reconnects(&metrics(admin).await),
        before,
        "the unchanged sink was not restarted"
    );

    // The new source consumes into the mesh.
    let mut ws = ws_connect(web, &["from-amqp/#"]).await;
    rabbit
        .publish("", &in_q, BasicProperties::default(), b"hello")
        .await;
    let got = next_event(&mut ws, within).await.unwrap();
    assert_eq!(got.source(), "/meshgate/amqp/incoming");

    // Back to the first links; then a change of the connection settings is refused.
    let back = gw.reloader().apply(config.clone()).await.unwrap();
    assert_eq!(back.changed, ["amqp"]);
    assert_eq!(
        amqp_links(admin).await["items"].as_array().map(Vec::len),
        Some(3)
    );
    let mut moved_url = config;
    moved_url.amqp.url = "amqp://127.0.0.1:5673".to_owned();
    let refused = gw.reloader().apply(moved_url).await.unwrap_err();
    assert!(
        matches!(&refused, meshgate::reload::ReloadError::NeedsRestart(s) if s == &["amqp"]),
        "{refused}"
    );
}
