//! meshgate backbones. Adapters see only `Arc<dyn meshgate_core::Backbone>`; the gateway picks
//! the implementation from `backbone.kind`. The NATS core and JetStream backbones are behind the
//! `nats` feature (on by default), so a build without it carries no NATS client.

mod error;
#[cfg(feature = "nats")]
pub mod jetstream;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
pub mod queue;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use error::BackboneStartError;

use std::sync::Arc;

use meshgate_config::{BackboneConfig, BackboneKind};
use meshgate_core::Backbone;
use meshgate_core::metrics::Registry;

/// Builds the configured backbone. `instance` names this gateway to the bus (NATS client name).
pub async fn build(
    config: &BackboneConfig,
    #[cfg_attr(
        not(feature = "nats"),
        expect(unused_variables, reason = "names NATS clients")
    )]
    instance: &str,
    registry: &Registry,
) -> Result<Arc<dyn Backbone>, BackboneStartError> {
    Ok(match config.kind {
        BackboneKind::Memory => memory::MemoryBackbone::new(config.memory.clone(), registry),
        #[cfg(feature = "nats")]
        BackboneKind::Nats => {
            nats::NatsBackbone::connect(&config.nats, &config.memory, instance, registry).await?
        }
        #[cfg(feature = "nats")]
        BackboneKind::JetStream => {
            jetstream::JetStreamBackbone::connect(
                &config.nats,
                &config.jetstream,
                instance,
                registry,
            )
            .await?
        }
        #[cfg(not(feature = "nats"))]
        BackboneKind::Nats | BackboneKind::JetStream => {
            return Err(BackboneStartError::NotCompiled);
        }
    })
}
