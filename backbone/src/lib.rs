//! meshgate backbones. Adapters see only `Arc<dyn meshgate_core::Backbone>`; the gateway picks
//! the implementation from `backbone.kind`.

pub mod memory;

use std::sync::Arc;

use meshgate_config::{BackboneConfig, BackboneKind};
use meshgate_core::Backbone;
use meshgate_core::metrics::Registry;

/// Builds the configured backbone.
pub fn build(config: &BackboneConfig, registry: &Registry) -> Arc<dyn Backbone> {
    match config.kind {
        BackboneKind::Memory => memory::MemoryBackbone::new(config.memory.clone(), registry),
    }
}
