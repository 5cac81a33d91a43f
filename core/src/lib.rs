//! meshgate-core: the model every meshgate crate shares.
//!
//! - [`event`]: the CloudEvents 1.0 event, always valid; [`json`]: its JSON format.
//! - [`topic`]: the protocol-neutral topic space and its mappings.
//! - [`backbone`]: the bus trait; [`adapter`]: what adapters receive.
//! - [`auth`]: principals and topic ACLs; [`metrics`]: Prometheus names and registry.

pub mod adapter;
pub mod auth;
pub mod backbone;
pub mod backoff;
pub mod connections;
pub mod event;
mod event_error;
pub mod file_watch;
pub mod filter;
pub mod header;
pub mod json;
pub mod limits;
pub mod live;
pub mod media;
pub mod metrics;
pub mod problem;
pub mod stable_hash;
pub mod throttle;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "tls")]
pub mod tls_server;
pub mod topic;
pub mod trace;
pub mod validate;
pub mod wrap;

pub use adapter::{
    Adapter, AdapterContext, AdapterError, Authorized, AuthorizedEnvelope, PublishError, Published,
};
pub use auth::{
    AuthConfigError, AuthError, AuthRules, Authorizer, Credentials, LoginPolicy, Permissions,
    Principal, SubscribeGrant, UserSpec,
};
pub use backbone::{
    Backbone, BackboneError, BackboneSubscription, BoxFuture, Delivery, Durable, Envelope, Origin,
    ReleaseRequest, RetainedStore, SessionStore, SharedDocuments, SubscribeOptions, Subscription,
    TryPublish,
};
pub use event::{Data, Event, EventError, ExtensionValue};
pub use limits::{ConnectionLimits, ConnectionPermit, LimitError};
pub use topic::{Topic, TopicError, TopicFilter, TopicIndex};
