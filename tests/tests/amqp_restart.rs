//! RabbitMQ itself restarted (`rabbitmqctl stop_app` / `start_app`) under a running bridge.
//! Its own test binary: cargo runs test binaries one after another, so no other test's
//! connections are cut.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::AMQPValue;
use meshgate_config::{AmqpMode, AmqpSinkConfig, AmqpSourceConfig};
use meshgate_tests::amqp::{Rabbit, ce_headers, header, rabbitmqctl, unique};
use meshgate_tests::{Deadline, next_event, start_gateway, test_config, ws_connect};

fn event(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(ce_headers(id, &[]))
}

async fn post(web: std::net::SocketAddr, id: &str) {
    let status = reqwest::Client::new()
        .post(format!("http://{web}/events/rs/out/x"))
        .header("content-type", "application/cloudevents+json")
        .body(format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/t","type":"t"}}"#
        ))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_restart_loses_no_acknowledged_message() {
    let rabbit = Rabbit::connect("/").await;
    let (ex, queue, out) = (unique("ex"), unique("rsq"), unique("rsout"));
    rabbit.exchange_kept(&ex).await;
    rabbit.queue_durable(&out).await;
    rabbit.bind(&out, &ex, "rs.out.#").await;

    let mut config = test_config();
    config.amqp.enabled = true;
    config.amqp.reconnect_min = Duration::from_millis(100);
    config.amqp.reconnect_max = Duration::from_secs(1);
    config.amqp.sources = vec![AmqpSourceConfig {
        name: "rs".to_owned(),
        queue: queue.clone(),
        exchange: Some(ex.clone()),
        binding_keys: vec!["rs.in.#".to_owned()],
        topic_prefix: None,
        prefetch: 64,
        wrap_source: "/meshgate/amqp/rs".to_owned(),
        wrap_type: "io.meshgate.amqp.message".to_owned(),
        user: None,
    }];
    config.amqp.sinks = vec![AmqpSinkConfig {
        name: "rsout".to_owned(),
        filter: "rs/out/#".to_owned(),
        exchange: ex.clone(),
        routing_key: "{topic}".to_owned(),
        mode: AmqpMode::Binary,
        persistent: true,
        mandatory: true,
        max_in_flight: 64,
    }];
    let gw = start_gateway(config).await;
    let status = gw.amqp.clone().unwrap();
    let up = |why: &str| {
        let status = status.clone();
        let why = why.to_owned();
        async move {
            let d = Deadline::after(Duration::from_secs(60));
            while let Some(down) = status.not_ready() {
                assert!(!d.passed(), "{why}: {down}");
                d.pause().await;
            }
        }
    };
    up("links up at start").await;
    let web = gw.web_addr.unwrap();
    let mut ws = ws_connect(web, &["rs/in/#"]).await;

    for i in 0..100 {
        rabbit
            .publish(&ex, "rs.in.x", event(&format!("in-{i}")), b"x")
            .await;
    }
    for i in 0..50 {
        post(web, &format!("out-{i}")).await;
    }
    drop(rabbit);

    rabbitmqctl(&["stop_app"]);
    let d = Deadline::after(Duration::from_secs(30));
    while status.not_ready().is_none() {
        assert!(!d.passed(), "the links never noticed RabbitMQ stopping");
        d.pause().await;
    }
    // Accepted while RabbitMQ is away: the sink keeps them for later.
    for i in 50..70 {
        post(web, &format!("out-{i}")).await;
    }
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    up("links back after the restart").await;

    let rabbit = Rabbit::connect("/").await;
    for i in 100..200 {
        rabbit
            .publish(&ex, "rs.in.x", event(&format!("in-{i}")), b"x")
            .await;
    }
    for i in 70..100 {
        post(web, &format!("out-{i}")).await;
    }
    let mut ids = HashSet::new();
    while ids.len() < 200 {
        let e = next_event(&mut ws, Duration::from_secs(30))
            .await
            .unwrap_or_else(|c| panic!("closed ({c:?}) after {} of 200", ids.len()));
        ids.insert(e.id().to_owned());
    }
    let mut out_ids = HashSet::new();
    let d = Deadline::after(Duration::from_secs(30));
    while out_ids.len() < 100 {
        for m in rabbit.consume(&out, 100, Duration::from_secs(2)).await {
            if let Some(AMQPValue::LongString(id)) = header(&m.properties, "cloudEvents_id") {
                out_ids.insert(String::from_utf8_lossy(id.as_bytes()).into_owned());
            }
        }
        assert!(!d.passed(), "{} of 100 sink events arrived", out_ids.len());
    }
    gw.shutdown().await;
    rabbit.delete_queue(&queue).await;
    rabbit.delete_queue(&out).await;
    rabbit.delete_exchange(&ex).await;
}
