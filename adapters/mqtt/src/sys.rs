//! `$SYS` topics: the broker statistics Mosquitto publishes, every `mqtt.sys_interval`, as
//! retained plain messages (so a client subscribing to `$SYS/#` gets the current figures at
//! once, then each update).
//!
//! The topics are Mosquitto's (`mosquitto.conf(5)`, "$SYS topics"), under
//! `$SYS/broker/`: `version`, `uptime` (`<n> seconds`), `clients/connected`,
//! `clients/disconnected` (persistent sessions whose client is away), `messages/received`,
//! `messages/sent` (PUBLISH packets, all QoS), `bytes/received`, `bytes/sent`,
//! `subscriptions/count`, `retained messages/count` (the in-memory store only: a JetStream
//! bucket's count would cost a request per interval). With a backbone shared by several
//! instances (NATS, JetStream) each instance's figures are its own, so they go under
//! `$SYS/broker/instance/<instance id>/` instead, where they cannot overwrite each other, and
//! are not retained: instance ids change with every start unless configured, and the shared
//! retained store would keep every past instance's figures.
//!
//! Wildcards do not match `$` topics [MQTT-4.7.2-1] and ACL `#` does not grant them: a client
//! must be allowed `$SYS/#` explicitly.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshgate_core::{Origin, Principal, Topic};

use crate::Shared;

/// What is published, in the order it is published.
fn figures(shared: &Shared, uptime: Duration) -> Vec<(&'static str, String)> {
    let sum = |c: &[meshgate_core::metrics::Counter; 3]| c.iter().map(|c| c.get()).sum::<u64>();
    let mut out = vec![
        ("version", format!("meshgate {}", env!("CARGO_PKG_VERSION"))),
        ("uptime", format!("{} seconds", uptime.as_secs())),
        (
            "clients/connected",
            shared.metrics.connections.get().max(0).to_string(),
        ),
        ("clients/disconnected", shared.parked.len().to_string()),
        ("messages/received", sum(&shared.in_by_qos).to_string()),
        ("messages/sent", sum(&shared.out_by_qos).to_string()),
        ("bytes/received", shared.bytes_in.get().to_string()),
        ("bytes/sent", shared.bytes_out.get().to_string()),
        (
            "subscriptions/count",
            shared.subscriptions.get().max(0).to_string(),
        ),
    ];
    if let Some(n) = shared.retained.count() {
        out.push(("retained messages/count", n.to_string()));
    }
    out
}

/// `$SYS/broker/` on a backbone of one instance; `$SYS/broker/instance/<id>/` otherwise.
fn prefix(shared: &Shared) -> String {
    if !shared.ctx.backbone.spans_instances() {
        "$SYS/broker/".to_owned()
    } else {
        format!("$SYS/broker/instance/{}/", shared.ctx.instance)
    }
}

/// Publishes the figures every `mqtt.sys_interval` until shutdown (not at all when it is 0).
pub(crate) async fn publish_every_interval(shared: Arc<Shared>) {
    let interval = shared.config.read().sys_interval;
    if interval.is_zero() {
        return;
    }
    let started = tokio::time::Instant::now();
    let prefix = prefix(&shared);
    let retain = prefix == "$SYS/broker/";
    let principal = Principal::internal("$SYS");
    // Counted apart from the clients' publishes (`adapter="mqtt_sys"`), so that
    // `messages/received` stays what clients sent.
    let metrics = shared.ctx.metrics("mqtt_sys");
    let origin = Origin {
        instance: shared.ctx.instance.clone(),
        connection: 0,
    };
    let wrapper = match meshgate_core::wrap::Wrapper::new(
        format!("/meshgate/{}", shared.ctx.instance),
        "io.meshgate.mqtt.sys",
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "mqtt: $SYS topics not published");
            return;
        }
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.ctx.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for (name, value) in figures(&shared, started.elapsed()) {
            let Ok(topic) = Topic::from_mqtt(&format!("{prefix}{name}")) else {
                continue;
            };
            let Ok(authorized) = shared.ctx.authorize(&metrics, &principal, topic) else {
                continue;
            };
            let Ok(event) = wrapper.wrap_shared(
                Bytes::from(value),
                Some(authorized.topic().shared_str()),
                Some("text/plain"),
            ) else {
                continue;
            };
            let envelope = authorized
                .envelope(Arc::new(event), origin.clone())
                .with_qos(0)
                .with_retain(retain)
                .with_plain(true);
            if retain {
                shared.retained.update(envelope.envelope(), false).await;
            }
            // A full subscriber queue must not hold this task: figures are best effort.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                shared.ctx.publish_envelope(&metrics, envelope),
            )
            .await;
        }
    }
}
