//! meshgate-amqp: the AMQP 0.9.1 bridge. Legacy applications on RabbitMQ join the mesh:
//!
//! - a **source** consumes a queue (an existing one, or one meshgate declares and binds to an
//!   exchange) and publishes each message to the backbone as a CloudEvent, acknowledging it
//!   only after the backbone accepted it (`source.rs`);
//! - a **sink** subscribes to a topic filter on the backbone and publishes each event to an
//!   exchange with publisher confirms, acknowledging the backbone delivery only after
//!   RabbitMQ's confirm (`sink.rs`);
//! - the CloudEvents mapping is in `binding.rs`, connections and reconnects in `link.rs`; the
//!   sources' consumer connections are meshgate's own (`consumer.rs`), the sinks' are lapin's.
//!
//! The adapter runs without RabbitMQ: links that cannot connect keep retrying, and `/readyz`
//! reports them (see [`AmqpStatus::not_ready`]).

pub mod binding;
mod consumer;
mod error;
mod link;
pub mod scan;
mod sink;
mod source;

use meshgate_core::metrics::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use meshgate_config::AmqpConfig;
use meshgate_core::metrics::AdapterMetrics;
use meshgate_core::{Adapter, AdapterContext, AdapterError, BoxFuture};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A start-up error of this adapter, as the gateway's `AdapterError`.
fn boxed(e: AmqpError) -> AdapterError {
    AdapterError::Other(Box::new(e))
}

pub use error::AmqpError;
pub use link::Link;

/// The adapter name in metrics and logs.
pub const ADAPTER: &str = "amqp";

/// The state of every source and sink, for `/readyz`.
#[derive(Debug, Clone)]
pub struct AmqpStatus {
    links: Arc<[Arc<Link>]>,
}

/// A source or sink as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkInfo {
    /// `source` or `sink`.
    pub kind: &'static str,
    pub name: String,
    /// `up`, `connecting` (never up yet) or `down` (failed; `last_error` says why).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub reconnects: u64,
}

impl AmqpStatus {
    /// Every source and sink with its state, in configuration order, for the admin API.
    pub fn link_states(&self) -> Vec<LinkInfo> {
        self.links
            .iter()
            .map(|l| {
                let last_error = l.last_error();
                LinkInfo {
                    kind: l.kind,
                    name: l.name.clone(),
                    state: match (l.is_up(), &last_error) {
                        (true, _) => "up",
                        (false, None) => "connecting",
                        (false, Some(_)) => "down",
                    },
                    last_error,
                    reconnects: l.reconnects(),
                }
            })
            .collect()
    }

    /// `None` when every source and sink is connected and set up; otherwise which are not,
    /// and why.
    pub fn not_ready(&self) -> Option<String> {
        let down: Vec<String> = self
            .links
            .iter()
            .filter(|l| !l.is_up())
            .map(|l| match l.last_error() {
                Some(e) => format!("amqp {} `{}`: {e}", l.kind, l.name),
                None => format!("amqp {} `{}`: connecting", l.kind, l.name),
            })
            .collect();
        (!down.is_empty()).then(|| down.join("; "))
    }

    pub fn links(&self) -> &[Arc<Link>] {
        &self.links
    }
}

/// Stops the sources (the bridge's ingress) ahead of the rest of the gateway: at shutdown they
/// must settle their in-flight publishes while the backbone still takes them.
#[derive(Debug, Clone)]
pub struct AmqpIngress {
    stop: CancellationToken,
    sources: TaskTracker,
}

impl AmqpIngress {
    /// Stops consuming: each source settles what it has in flight (acknowledging what the
    /// backbone accepted), cancels its consumer and closes its connection. Returns once all
    /// have; RabbitMQ requeues whatever they had received but not acknowledged.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.sources.close();
        self.sources.wait().await;
    }
}

/// The configured sources and sinks, ready to run.
pub struct AmqpAdapter {
    config: Arc<AmqpConfig>,
    connector: link::Connector,
    sources: Vec<Arc<source::Source>>,
    sinks: Vec<Arc<sink::Sink>>,
    status: AmqpStatus,
    ingress: AmqpIngress,
}

impl std::fmt::Debug for AmqpAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpAdapter")
            .field("connector", &self.connector)
            .field("sources", &self.sources.len())
            .field("sinks", &self.sinks.len())
            .finish()
    }
}

impl AmqpAdapter {
    /// Checks the configuration (CA file, wrap attributes) and prepares every link; nothing
    /// connects before [`Adapter::run`].
    pub fn new(config: &AmqpConfig, ctx: &AdapterContext) -> Result<AmqpAdapter, AdapterError> {
        let connector = link::Connector::new(config, ctx.instance.clone()).map_err(boxed)?;
        let metrics = ctx.metrics(ADAPTER);
        let ingress = AmqpIngress {
            // The sources stop with the gateway at the latest (normally earlier, through
            // `AmqpIngress::stop`).
            stop: ctx.shutdown.child_token(),
            sources: TaskTracker::new(),
        };
        let mut links = Vec::new();
        let mut sources = Vec::new();
        for s in &config.sources {
            let l = Link::new(&ctx.registry, "source", &s.name);
            links.push(l.clone());
            sources.push(Arc::new(
                source::Source::new(s.clone(), l, ctx, metrics.clone(), ingress.stop.clone())
                    .map_err(boxed)?,
            ));
        }
        let mut sinks = Vec::new();
        for s in &config.sinks {
            let l = Link::new(&ctx.registry, "sink", &s.name);
            links.push(l.clone());
            sinks.push(Arc::new(
                sink::Sink::new(s.clone(), l, ctx, metrics.clone()).map_err(boxed)?,
            ));
        }
        Ok(AmqpAdapter {
            config: Arc::new(config.clone()),
            connector,
            sources,
            sinks,
            status: AmqpStatus {
                links: links.into(),
            },
            ingress,
        })
    }

    pub fn status(&self) -> AmqpStatus {
        self.status.clone()
    }

    /// The handle that stops the sources first at shutdown.
    pub fn ingress(&self) -> AmqpIngress {
        self.ingress.clone()
    }
}

impl Adapter for AmqpAdapter {
    fn name(&self) -> &'static str {
        ADAPTER
    }

    /// Runs every source and sink until `ctx.shutdown`; each settles what it has in flight
    /// and closes its connection.
    fn run(self: Box<Self>, ctx: AdapterContext) -> BoxFuture<'static, Result<(), AdapterError>> {
        Box::pin(async move {
            let metrics = ctx.metrics(ADAPTER);
            let mut tasks = tokio::task::JoinSet::new();
            for s in &self.sources {
                let (s, ctx2, connector, config) = (
                    s.clone(),
                    ctx.clone(),
                    self.connector.clone(),
                    self.config.clone(),
                );
                // Tracked, so that `AmqpIngress::stop` can wait for the sources alone.
                tasks.spawn(self.ingress.sources.track_future(supervise(
                    s.link.clone(),
                    metrics.clone(),
                    self.config.reconnect_max,
                    self.ingress.stop.clone(),
                    move || {
                        s.clone()
                            .run(ctx2.clone(), connector.clone(), config.clone())
                    },
                )));
            }
            for s in &self.sinks {
                let (s, ctx2, connector, config) = (
                    s.clone(),
                    ctx.clone(),
                    self.connector.clone(),
                    self.config.clone(),
                );
                tasks.spawn(supervise(
                    s.link.clone(),
                    metrics.clone(),
                    self.config.reconnect_max,
                    ctx.shutdown.clone(),
                    move || {
                        s.clone()
                            .run(ctx2.clone(), connector.clone(), config.clone())
                    },
                ));
            }
            while tasks.join_next().await.is_some() {}
            Ok(())
        })
    }
}

/// Runs one source's or sink's task, and runs it again if it panics: a link task that ends
/// unexpectedly is logged, counted (`meshgate_errors_total{adapter="amqp",kind="task_panic"}`),
/// marks its link down (so `/readyz` and `meshgate_amqp_link_up` say so) and is restarted after
/// `pause` — never silently gone. Each run is its own tokio task, so a panic ends only that
/// run. A normal return (shutdown) ends the supervision; so does `stop`.
///
/// A source restarted after a panic reconnects, and RabbitMQ redelivers what it had not
/// acknowledged; a sink subscribes again (what its old subscription held is redelivered on
/// JetStream, lost and counted as dropped by the backbone otherwise).
async fn supervise<F, Fut>(
    link: Arc<Link>,
    metrics: AdapterMetrics,
    pause: Duration,
    stop: CancellationToken,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let run = tokio::spawn(start());
        let error = match run.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => panic_message(e.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => return,
        };
        metrics.error(ErrorKind::TaskPanic);
        tracing::error!(kind = link.kind, link = %link.name, %error, retry_in = ?pause,
            "an AMQP link task panicked; the link is down and restarts");
        link.set_down(&AmqpError::Panicked(error));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// The text of a panic's payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}

#[cfg(test)]
mod supervise_tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use meshgate_core::metrics::Registry;

    use super::*;

    #[tokio::test]
    async fn a_panicking_link_task_is_counted_marked_down_and_restarted() {
        let registry = Registry::new();
        let link = Link::new(&registry, "sink", "s1");
        link.set_up();
        let metrics = AdapterMetrics::new(&registry, ADAPTER);
        let runs = Arc::new(AtomicU32::new(0));
        let seen_down = Arc::new(AtomicU32::new(0));
        let (r, l, d) = (runs.clone(), link.clone(), seen_down.clone());
        supervise(
            link.clone(),
            metrics,
            Duration::from_millis(1),
            CancellationToken::new(),
            move || {
                let (r, l, d) = (r.clone(), l.clone(), d.clone());
                async move {
                    if r.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("boom");
                    }
                    // The restarted run sees the link marked down with the reason.
                    if !l.is_up() && l.last_error().is_some_and(|e| e.contains("boom")) {
                        d.fetch_add(1, Ordering::SeqCst);
                    }
                }
            },
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "restarted after each panic");
        assert_eq!(seen_down.load(Ordering::SeqCst), 1);
        let text = registry.render();
        assert!(
            text.contains(r#"meshgate_errors_total{adapter="amqp",kind="task_panic"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meshgate_amqp_link_up{kind="sink",link="s1"} 0"#),
            "{text}"
        );
    }
}
