//! meshgate backbones. Adapters see only `Arc<dyn meshgate_core::Backbone>`; the gateway picks
//! the implementation from `backbone.kind`.

mod error;
pub mod jetstream;
pub mod memory;
pub mod nats;
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
    instance: &str,
    registry: &Registry,
) -> Result<Arc<dyn Backbone>, BackboneStartError> {
    Ok(match config.kind {
        BackboneKind::Memory => memory::MemoryBackbone::new(config.memory.clone(), registry),
        BackboneKind::Nats => {
            nats::NatsBackbone::connect(&config.nats, &config.memory, instance, registry).await?
        }
        BackboneKind::JetStream => {
            jetstream::JetStreamBackbone::connect(
                &config.nats,
                &config.jetstream,
                instance,
                registry,
            )
            .await?
        }
    })
}
