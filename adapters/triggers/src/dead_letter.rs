//! After the last failed attempt: the event, with Knative's error extensions, to the trigger's
//! `deadLetterSink` (an HTTP URL, sent once, or a mesh topic, published on the backbone).
//!
//! Extensions, as Knative's dispatcher sets them: `knativeerrordest` (the subscriber's URL),
//! `knativeerrorcode` (the last answer's status, an Integer; absent when there was no answer)
//! and `knativeerrordata` (the last answer's body, at most 1024 bytes, or the connection
//! error's text, base64-encoded).

use std::sync::Arc;

use base64::Engine;
use meshgate_core::backbone::{Envelope, Origin};
use meshgate_core::{Backbone, Event, ExtensionValue, Topic};

use crate::sender::{self, Attempt, Failure, Request};

/// The event as it goes to the dead-letter sink.
pub fn annotate(event: &Event, subscriber: &str, failure: &Failure) -> Event {
    let mut e = event.clone();
    // Each value is valid for its type; a subscriber URL with characters an attribute cannot
    // hold is left out rather than failing the dead-letter write.
    let _ = e.set_extension(
        "knativeerrordest",
        ExtensionValue::String(subscriber.to_owned()),
    );
    if let Some(status) = failure.status {
        let _ = e.set_extension(
            "knativeerrorcode",
            ExtensionValue::Integer(i32::from(status)),
        );
    } else {
        e.remove_extension("knativeerrorcode");
    }
    if failure.data.is_empty() {
        e.remove_extension("knativeerrordata");
    } else {
        let data = &failure.data[..failure.data.len().min(sender::MAX_ERROR_DATA)];
        let _ = e.set_extension(
            "knativeerrordata",
            ExtensionValue::String(base64::engine::general_purpose::STANDARD.encode(data)),
        );
    }
    e
}

/// Where dead letters go, ready to send.
#[derive(Debug, Clone)]
pub enum Sink {
    Http(Request),
    Topic(Topic),
}

/// Writes `event` to the sink; `Err` says why it could not.
pub async fn write(
    sink: &Sink,
    client: &reqwest::Client,
    backbone: &Arc<dyn Backbone>,
    origin: &Origin,
    event: Event,
) -> Result<(), String> {
    match sink {
        Sink::Topic(topic) => backbone
            .publish(
                Envelope::new(topic.clone(), Arc::new(event), origin.clone())
                    .with_dedup_scope(format!("dead-letter {}", origin.instance)),
            )
            .await
            .map_err(|e| format!("dead-letter topic {}: {e}", topic.as_str())),
        Sink::Http(req) => {
            let envelope = Envelope::new(
                // The topic is not sent over HTTP; any valid one will do.
                Topic::from_mqtt("dead-letter").map_err(|e| e.to_string())?,
                Arc::new(event),
                origin.clone(),
            );
            match sender::send(client, req, &envelope).await {
                Attempt::Delivered { .. } => Ok(()),
                Attempt::Failed(f) => Err(format!(
                    "dead-letter sink {}: {}",
                    req.uri,
                    match f.status {
                        Some(s) => format!("answered {s}"),
                        None => String::from_utf8_lossy(&f.data).into_owned(),
                    }
                )),
            }
        }
    }
}
