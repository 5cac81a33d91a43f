//! meshgate-http: services post CloudEvents over HTTP.
//!
//! `POST {http.events_path}/{topic}` accepts one event in binary mode (`ce-` headers) or
//! structured mode (`application/cloudevents+json`), a JSON batch
//! (`application/cloudevents-batch+json`), or any other body, which is wrapped into a new
//! CloudEvent. The reply is 202 `{"accepted": n, "ids": [...]}` once the backbone has accepted
//! every event; errors are `application/problem+json` with a detail naming the problem.

pub mod binding;
mod ingress;

pub use ingress::{ADAPTER, router};
