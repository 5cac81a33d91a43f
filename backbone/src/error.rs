//! The error of starting a backbone.

/// The cause of a [`BackboneStartError`] that is one of this crate's own errors (boxed: those
/// types are not part of the crate's API).
type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why the backbone could not start ([`crate::build`]). Only the NATS backbones can fail to
/// start (the in-memory one always does); the variants say which step failed.
#[derive(Debug, thiserror::Error)]
pub enum BackboneStartError {
    /// A setting whose file cannot be used (the text names the key).
    #[error("{0}")]
    Config(String),
    /// A URL meshgate's own client cannot connect to.
    #[error("backbone.nats.urls: `{url}` is not a NATS server address: {source}")]
    Url {
        url: String,
        #[source]
        source: Cause,
    },
    /// A URL async-nats (the `jetstream` backbone's management client) cannot parse.
    #[error("backbone.nats.urls: `{url}` is not a NATS server address: {source}")]
    ServerAddr {
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// async-nats refused to start its client.
    #[cfg(feature = "nats")]
    #[error("cannot start the NATS client: {0}")]
    Connect(#[source] async_nats::ConnectError),
    /// The `jetstream` backbone sets up its stream at start, so it needs NATS then.
    #[error(
        "cannot start the NATS client: NATS at {urls:?} is not reachable; the JetStream \
         backbone sets up its stream at start"
    )]
    NotReachable { urls: Vec<String> },
    #[cfg(feature = "nats")]
    #[error(
        "cannot start the NATS client: backbone.jetstream.stream: cannot create or update \
         stream `{stream}`: {source}"
    )]
    Stream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error(
        "cannot start the NATS client: backbone.jetstream.stream: cannot set up the \
         retained-message bucket: {0}"
    )]
    RetainedBucket(#[source] Cause),
    #[error(
        "cannot start the NATS client: backbone.jetstream.stream: cannot set up the MQTT \
         session bucket: {0}"
    )]
    SessionBucket(#[source] Cause),
    /// The instance feed (`backbone.jetstream.subscriptions = "instance_feed"`) could not
    /// start: its consumer, or the direct get inbox.
    #[error("cannot start the NATS client: backbone.jetstream.subscriptions: {0}")]
    Feed(String),
    /// A JetStream publisher could not subscribe to its reply inbox.
    #[error("cannot start the NATS client: {0}")]
    Publisher(#[source] Cause),
    /// `backbone.kind` names a NATS backbone but this build left them out. The gateway checks
    /// for this before it builds the backbone (with the feature to rebuild with); this is the
    /// answer for other callers of [`crate::build`].
    #[cfg(not(feature = "nats"))]
    #[error(
        "backbone.kind names a NATS backbone but meshgate-backbone was built without the \
         \"nats\" feature"
    )]
    NotCompiled,
}
