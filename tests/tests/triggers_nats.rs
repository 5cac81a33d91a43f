//! Triggers on the NATS backbones against a real nats-server (one per test): on JetStream a
//! retry survives a gateway restart and nothing is lost; two instances with the same trigger
//! deliver each event once (JetStream and NATS core).

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::BTreeMap;
use std::time::Duration;

use meshgate_config::{BackboneKind, TriggerConfig};
use meshgate_tests::nats::NatsServer;
use meshgate_tests::sink::{Answer, Sink};
use meshgate_tests::{Deadline, bus_subscribe, next_delivery, start_gateway, test_config};
use serde_json::json;

fn trigger(sink: &Sink, retry: u32) -> TriggerConfig {
    meshgate_tests::triggers::trigger(json!({
        "name": "orders", "topic": "orders/#",
        "subscriber": {"uri": sink.url("/hook"), "maxConcurrency": 4},
        "delivery": {"retry": retry, "backoffPolicy": "linear", "backoffDelay": "PT0.3S"}
    }))
}

fn config(server: &NatsServer, kind: BackboneKind, instance: &str) -> meshgate_config::Config {
    let mut c = test_config();
    c.gateway.instance_id = Some(instance.into());
    c.gateway.shutdown_grace = Duration::from_secs(1);
    c.backbone.kind = kind;
    c.backbone.nats.urls = vec![server.url()];
    c
}

async fn post(web: std::net::SocketAddr, id: &str) {
    let status = reqwest::Client::new()
        .post(format!("http://{web}/events/orders/eu"))
        .header("content-type", "application/cloudevents+json")
        .body(format!(
            r#"{{"specversion":"1.0","id":"{id}","source":"/t","type":"com.t"}}"#
        ))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 202);
}

fn delivered(gw: &meshgate::RunningGateway) -> u64 {
    gw.registry
        .render()
        .lines()
        .find(|l| {
            l.starts_with("meshgate_trigger_events_total") && l.contains("outcome=\"delivered\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Ids of the POSTs the subscriber answered with 2xx, with how often each came.
fn accepted_ids(sink: &Sink, answered_ok_from: usize) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    for p in sink.posts().iter().skip(answered_ok_from) {
        *ids.entry(p.header("ce-id").unwrap().to_owned())
            .or_insert(0) += 1;
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_a_retry_survives_a_gateway_restart() {
    let server = NatsServer::start();
    let sink = Sink::start().await;
    // Failing until the first gateway is gone.
    sink.script((0..3).map(|_| Answer::status(503)));
    let mut c = config(&server, BackboneKind::JetStream, "a");
    c.triggers = vec![trigger(&sink, 100)];
    let gw = start_gateway(c.clone()).await;
    post(gw.web_addr.unwrap(), "e1").await;
    sink.wait_posts(2, Duration::from_secs(10)).await;
    // Mid-retry: the event is neither delivered nor dropped; the shutdown gives it back.
    gw.shutdown().await;
    let failed_attempts = sink.posts().len();
    assert!(failed_attempts <= 3, "{failed_attempts}");
    // Whatever failed answers remain are used up by the restarted gateway, then 200.
    let gw = start_gateway(c).await;
    let d = Deadline::after(Duration::from_secs(20));
    while delivered(&gw) < 1 {
        assert!(
            !d.passed(),
            "the event was not delivered after the restart: {:?}",
            sink.posts().len()
        );
        d.pause().await;
    }
    let posts = sink.posts();
    assert!(posts.iter().all(|p| p.header("ce-id") == Some("e1")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.posts().len(),
        4,
        "three refused attempts and one delivery, nothing after it"
    );
    gw.shutdown().await;
}

async fn two_instances_deliver_each_event_once(kind: BackboneKind) {
    let server = NatsServer::start();
    let sink = Sink::start().await;
    let mut a = config(&server, kind, "a");
    a.triggers = vec![trigger(&sink, 3)];
    let mut b = config(&server, kind, "b");
    b.triggers = a.triggers.clone();
    let ga = start_gateway(a).await;
    let gb = start_gateway(b).await;
    // Both members are subscribed before anything is published: on NATS core a queue group's
    // member that is not there yet gets nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = 40;
    for i in 0..n {
        let web = if i % 2 == 0 { ga.web_addr } else { gb.web_addr };
        post(web.unwrap(), &format!("e{i}")).await;
    }
    sink.wait_posts(n, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ids = accepted_ids(&sink, 0);
    assert_eq!(ids.len(), n, "every event once: {ids:?}");
    assert!(ids.values().all(|c| *c == 1), "a duplicate: {ids:?}");
    assert_eq!(delivered(&ga) + delivered(&gb), n as u64);
    ga.shutdown().await;
    gb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_two_instances_deliver_each_event_once() {
    two_instances_deliver_each_event_once(BackboneKind::JetStream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_core_two_instances_deliver_each_event_once() {
    two_instances_deliver_each_event_once(BackboneKind::Nats).await;
}

async fn admin(
    method: reqwest::Method,
    gw: &meshgate::RunningGateway,
    path: &str,
    body: Option<serde_json::Value>,
) -> u16 {
    meshgate_tests::triggers::admin(method, gw, path, Some(TOKEN), body)
        .await
        .0
}

const TOKEN: &str = "a-test-token-of-some-length";

/// Polls until `gw` runs (or no longer runs) the trigger `name`.
async fn wait_running(gw: &meshgate::RunningGateway, name: &str, running: bool) {
    let d = Deadline::after(Duration::from_secs(10));
    while gw.triggers.get(name).is_some() != running {
        assert!(!d.passed(), "trigger {name} running should be {running}");
        d.pause().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_api_triggers_are_shared_by_every_instance_and_kept() {
    let server = NatsServer::start();
    let sink = Sink::start().await;
    let mut a = config(&server, BackboneKind::JetStream, "a");
    a.admin.api_token = Some(TOKEN.into());
    let mut b = config(&server, BackboneKind::JetStream, "b");
    b.admin.api_token = Some(TOKEN.into());
    let ga = start_gateway(a.clone()).await;
    let gb = start_gateway(b).await;
    let doc = json!({"topic": "orders/#", "subscriber": {"uri": sink.url("/api")}});
    assert_eq!(
        admin(reqwest::Method::PUT, &ga, "/triggers/shared", Some(doc)).await,
        201
    );
    wait_running(&gb, "shared", true).await;
    for i in 0..10 {
        post(gb.web_addr.unwrap(), &format!("e{i}")).await;
    }
    sink.wait_posts(10, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = accepted_ids(&sink, 0);
    assert_eq!(ids.len(), 10);
    assert!(ids.values().all(|c| *c == 1), "{ids:?}");
    // A restarted instance runs the stored trigger again.
    ga.shutdown().await;
    let ga = start_gateway(a).await;
    wait_running(&ga, "shared", true).await;
    // Deleted through B: gone on A too.
    assert_eq!(
        admin(reqwest::Method::DELETE, &gb, "/triggers/shared", None).await,
        204
    );
    wait_running(&ga, "shared", false).await;
    assert!(gb.triggers.get("shared").is_none());
    ga.shutdown().await;
    gb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_a_dead_letter_is_not_taken_for_the_event_it_copies() {
    let server = NatsServer::start();
    let sink = Sink::start().await;
    sink.script([Answer::status(400)]);
    let mut c = config(&server, BackboneKind::JetStream, "a");
    c.triggers = vec![meshgate_tests::triggers::trigger(
        json!({"name": "t", "topic": "orders/#", "subscriber": {"uri": sink.url("/")},
               "delivery": {"retry": 0, "deadLetterSink": {"topic": "dead/t"}}}),
    )];
    let gw = start_gateway(c).await;
    let mut dead = bus_subscribe(&gw, "dead/#").await;
    // Within the stream's duplicate window of the original, with the same source and id.
    post(gw.web_addr.unwrap(), "e1").await;
    let d = next_delivery(
        &mut dead,
        Duration::from_secs(10),
        "stored and delivered dead letter",
    )
    .await;
    assert_eq!(d.event().id(), "e1");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_a_new_max_concurrency_reaches_the_trigger_consumer() {
    let server = NatsServer::start();
    let sink = Sink::start().await;
    let mut c = config(&server, BackboneKind::JetStream, "a");
    c.admin.api_token = Some(TOKEN.into());
    let gw = start_gateway(c).await;
    let doc = |n: u32| json!({"topic": "orders/#", "subscriber": {"uri": sink.url("/"), "maxConcurrency": n}});
    assert_eq!(
        admin(reqwest::Method::PUT, &gw, "/triggers/t_1", Some(doc(4))).await,
        201
    );
    assert_eq!(
        admin(reqwest::Method::PUT, &gw, "/triggers/t_1", Some(doc(9))).await,
        200
    );
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let mut stream = js.get_stream("MESHGATE").await.unwrap();
    let mut names = Vec::new();
    let mut list = stream.consumers();
    while let Some(info) = futures_util::StreamExt::next(&mut list).await {
        let info = info.unwrap();
        if info.name.starts_with("q_trigger:t-u1") {
            names.push((info.name.clone(), info.config.max_ack_pending));
        }
    }
    // `orders/#` is two subjects (`orders` and `orders.>`): a consumer each, both updated.
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|(_, n)| *n == 9), "{names:?}");
    let _ = stream.info().await;
    gw.shutdown().await;
}
