//! A gateway context on a memory backbone, for adapters' tests (feature `testkit`): the one
//! harness the HTTP, WebSocket and MQTT adapter tests start from, instead of each building its
//! own `AdapterContext`.

use std::sync::Arc;
use std::time::Duration;

use meshgate_config::{FullQueuePolicy, MemoryBackboneConfig};
use meshgate_core::metrics::Registry;
use meshgate_core::{AdapterContext, Authorizer, ConnectionLimits};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::memory::MemoryBackbone;

/// The memory backbone the tests use unless they need another: 1,024 events per subscriber,
/// drops (counted) when full.
pub fn memory_config() -> MemoryBackboneConfig {
    MemoryBackboneConfig {
        queue_capacity: 1024,
        full_policy: FullQueuePolicy::Drop,
        block_timeout: Duration::from_secs(1),
    }
}

/// An adapter's context on its own memory backbone and metrics registry.
#[derive(Debug, Clone)]
pub struct TestKit {
    pub ctx: AdapterContext,
    pub backbone: Arc<MemoryBackbone>,
    pub registry: Registry,
}

impl TestKit {
    /// A context with `authorizer`, no connection caps, on [`memory_config`].
    pub fn new(authorizer: Authorizer) -> TestKit {
        TestKit::on(authorizer, memory_config())
    }

    /// [`TestKit::new`] on a memory backbone configured by the test.
    pub fn on(authorizer: Authorizer, memory: MemoryBackboneConfig) -> TestKit {
        let registry = Registry::new();
        let backbone = MemoryBackbone::new(memory, &registry);
        let ctx = AdapterContext {
            instance: Arc::from("test"),
            backbone: backbone.clone(),
            authorizer: Arc::new(authorizer),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            registry: registry.clone(),
            limits: ConnectionLimits::unlimited(),
            connections: Default::default(),
        };
        TestKit {
            ctx,
            backbone,
            registry,
        }
    }

    /// The same context with per-address and per-user connection caps.
    pub fn with_limits(mut self, limits: Arc<ConnectionLimits>) -> TestKit {
        self.ctx.limits = limits;
        self
    }

    /// The same context with another instance id.
    pub fn with_instance(mut self, instance: &str) -> TestKit {
        self.ctx.instance = Arc::from(instance);
        self
    }
}
