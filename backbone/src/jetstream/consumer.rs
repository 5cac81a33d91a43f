//! JetStream consumers: their names (the same on every instance), and opening them again: a
//! persistent session's durable consumer resumed from its acknowledgement floor, and a consumer
//! that is gone repaired for the pull that reads it ([`super::pull`]).

use std::sync::Arc;

use async_nats::jetstream::context::{ConsumerInfoError, ConsumerInfoErrorKind};
use async_nats::jetstream::{consumer, stream};
use meshgate_core::BoxFuture;

use crate::nats::queue_name;

/// Why a consumer could not be looked up or created (async-nats' error, shown as it is).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsumerError {
    #[error(transparent)]
    Lookup(#[from] ConsumerInfoError),
    #[error(transparent)]
    Create(#[from] stream::ConsumerError),
}

/// Looks up the pull's consumer and creates it again if it is gone, starting at the given
/// stream sequence (`None`: as it was first created). `Ok(true)`: created again; `Ok(false)`:
/// it was there.
pub(crate) type Repair = std::sync::Arc<
    dyn Fn(Option<u64>) -> BoxFuture<'static, Result<bool, ConsumerError>> + Send + Sync,
>;

/// Consumer names: NATS tokens (no `.`, `*`, `>`, whitespace), bounded in length.
pub(super) fn consumer_name(parts: &[&str]) -> String {
    let joined = parts.join("_");
    let mut out: String = queue_name(&joined)
        .chars()
        .map(|c| if matches!(c, '.' | '*' | '>') { '_' } else { c })
        .collect();
    if out.len() > 200 {
        // Long filters: keep the start, make the rest a hash.
        // FNV-1a: the same on every instance and build (durable names must agree).
        let hash = meshgate_core::stable_hash::fnv1a(joined.as_bytes());
        let mut cut = 180;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(&format!("_{hash:016x}"));
    }
    out
}

/// The consumer of durable subscription `name` for one subject: the same on every instance,
/// so a session's consumers are found again wherever its client reconnects.
pub(crate) fn durable_consumer(name: &str, subject: &str) -> String {
    consumer_name(&["d", name, subject])
}

/// Opens a durable subscription's consumer: created (new events only) the first time; when it
/// exists, re-created from its acknowledgement floor. Re-created, not bound, because pull
/// requests of the instance that held the session before may still wait at the server (they
/// outlive the dropped stream until they expire) and would take the next events into a
/// subscription nobody reads (seen in the test: delivered, never redelivered). From the floor,
/// every event not acknowledged is delivered again at once (at least once: an event
/// acknowledged out of order past the floor comes again).
pub(super) async fn resume_durable(
    stream: &stream::Stream,
    name: &str,
    mut config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, ConsumerError> {
    let info = match stream.consumer_info(name).await {
        Ok(info) => info,
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
            return Ok(stream.get_or_create_consumer(name, config).await?);
        }
        // Not "new events only" for a session that had a consumer: the caller refuses instead.
        Err(e) => return Err(e.into()),
    };
    let _ = stream.delete_consumer(name).await;
    config.deliver_policy = consumer::DeliverPolicy::ByStartSequence {
        start_sequence: info.ack_floor.stream_sequence + 1,
    };
    Ok(stream.create_consumer(config).await?)
}

/// How a pull repairs its consumer when the server says it is gone (see [`super::pull`]):
/// nothing if it is there after all (JetStream was only not up yet), otherwise created again
/// with `config`, from the stream sequence the pull gives when it has one. Another instance
/// (a queue group's member) may create it first: then it is there, which is as good.
pub(super) fn repair_consumer(
    stream: stream::Stream,
    name: String,
    config: consumer::pull::Config,
) -> Repair {
    Arc::new(move |start| {
        let (stream, name, mut config) = (stream.clone(), name.clone(), config.clone());
        Box::pin(async move {
            match stream.consumer_info(&name).await {
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(start_sequence) = start {
                config.deliver_policy = consumer::DeliverPolicy::ByStartSequence { start_sequence };
            }
            match stream.create_consumer(config).await {
                Ok(_) => Ok(true),
                Err(e) => match stream.consumer_info(&name).await {
                    Ok(_) => Ok(false),
                    Err(_) => Err(e.into()),
                },
            }
        })
    })
}
