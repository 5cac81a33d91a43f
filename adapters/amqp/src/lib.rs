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
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;

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

/// The state of every source and sink, for `/readyz` and the admin API (the list a reload
/// left in force).
#[derive(Debug, Clone)]
pub struct AmqpStatus {
    links: Arc<RwLock<Arc<[Arc<Link>]>>>,
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
        self.links()
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
            .links()
            .iter()
            .filter(|l| !l.is_up())
            .map(|l| match l.last_error() {
                Some(e) => format!("amqp {} `{}`: {e}", l.kind, l.name),
                None => format!("amqp {} `{}`: connecting", l.kind, l.name),
            })
            .collect();
        (!down.is_empty()).then(|| down.join("; "))
    }

    /// The sources and sinks in force, sources first, each in configuration order.
    pub fn links(&self) -> Arc<[Arc<Link>]> {
        self.links
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, links: Arc<[Arc<Link>]>) {
        *self.links.write().unwrap_or_else(PoisonError::into_inner) = links;
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

/// How long a reload waits for a removed or changed link to settle what it holds (a source its
/// in-flight publishes, a sink its outstanding confirms) before it starts the rest anyway.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// One source or sink, made from its configuration and not necessarily running.
enum Prepared {
    Source(Arc<source::Source>),
    Sink(Arc<sink::Sink>),
}

impl Prepared {
    fn link(&self) -> &Arc<Link> {
        match self {
            Prepared::Source(s) => &s.link,
            Prepared::Sink(s) => &s.link,
        }
    }

    /// Whether it was made from `config` (same kind, same settings).
    fn made_from(&self, config: &LinkConfig) -> bool {
        match (self, config) {
            (Prepared::Source(s), LinkConfig::Source(c)) => &s.config == c,
            (Prepared::Sink(s), LinkConfig::Sink(c)) => &s.config == c,
            _ => false,
        }
    }

    /// Tells it to stop: a source settles what it has in flight and closes; a sink stops
    /// taking events, waits for its outstanding confirms and closes.
    fn halt(&self) {
        match self {
            Prepared::Source(s) => s.halt(),
            Prepared::Sink(s) => s.halt(),
        }
    }
}

/// A source's or sink's configuration, one of the list a reload compares.
#[derive(Debug, Clone, PartialEq)]
enum LinkConfig {
    Source(meshgate_config::AmqpSourceConfig),
    Sink(meshgate_config::AmqpSinkConfig),
}

impl LinkConfig {
    /// Every source, then every sink, in configuration order.
    fn all(config: &AmqpConfig) -> Vec<LinkConfig> {
        let sources = config.sources.iter().cloned().map(LinkConfig::Source);
        sources
            .chain(config.sinks.iter().cloned().map(LinkConfig::Sink))
            .collect()
    }

    fn key(&self) -> (&'static str, &str) {
        match self {
            LinkConfig::Source(c) => ("source", &c.name),
            LinkConfig::Sink(c) => ("sink", &c.name),
        }
    }
}

struct Running {
    link: Prepared,
    /// `None` until [`Adapter::run`] started it, and once shutdown took it.
    task: Option<JoinHandle<()>>,
}

struct LinksState {
    running: Vec<Running>,
    /// `run` started the links (a reload starts new ones at once; before, `run` does).
    started: bool,
    /// Shutdown began: nothing starts any more.
    closed: bool,
}

/// The sources and sinks of the bridge. A reload ([`AmqpLinks::reload`]) changes them in place:
/// new ones start, removed ones stop, changed ones are stopped and started again; the others
/// are not touched.
#[derive(Clone)]
pub struct AmqpLinks {
    inner: Arc<LinksInner>,
}

struct LinksInner {
    ctx: AdapterContext,
    connector: link::Connector,
    /// The connection settings (a reload that changes them needs a restart).
    config: Arc<AmqpConfig>,
    metrics: AdapterMetrics,
    ingress: AmqpIngress,
    status: AmqpStatus,
    state: tokio::sync::Mutex<LinksState>,
}

impl std::fmt::Debug for AmqpLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpLinks")
            .field("connector", &self.inner.connector)
            .finish_non_exhaustive()
    }
}

impl AmqpLinks {
    /// Makes a source or sink from `config` (its checks: wrap attributes, topic prefix, user,
    /// filter); nothing connects.
    fn prepare(&self, config: &LinkConfig) -> Result<Prepared, AmqpError> {
        let inner = &self.inner;
        Ok(match config {
            LinkConfig::Source(c) => {
                let link = Link::new(&inner.ctx.registry, "source", &c.name);
                Prepared::Source(Arc::new(source::Source::new(
                    c.clone(),
                    link,
                    &inner.ctx,
                    inner.metrics.clone(),
                    // Its own, so that a reload can stop it alone; fired with the others.
                    inner.ingress.stop.child_token(),
                )?))
            }
            LinkConfig::Sink(c) => {
                let link = Link::new(&inner.ctx.registry, "sink", &c.name);
                Prepared::Sink(Arc::new(sink::Sink::new(
                    c.clone(),
                    link,
                    &inner.ctx,
                    inner.metrics.clone(),
                )?))
            }
        })
    }

    /// Runs `link` under [`supervise`] (restarted after a panic) until it is halted.
    fn spawn(&self, link: &Prepared) -> JoinHandle<()> {
        let inner = &self.inner;
        let (ctx, connector, config) = (
            inner.ctx.clone(),
            inner.connector.clone(),
            inner.config.clone(),
        );
        match link {
            Prepared::Source(s) => {
                let s = s.clone();
                // Tracked, so that `AmqpIngress::stop` can wait for the sources alone.
                tokio::spawn(inner.ingress.sources.track_future(supervise(
                    s.link.clone(),
                    inner.metrics.clone(),
                    inner.config.reconnect_max,
                    s.stop_token(),
                    move || {
                        s.clone()
                            .run(ctx.clone(), connector.clone(), config.clone())
                    },
                )))
            }
            Prepared::Sink(s) => {
                let s = s.clone();
                tokio::spawn(supervise(
                    s.link.clone(),
                    inner.metrics.clone(),
                    inner.config.reconnect_max,
                    s.halt_token(),
                    move || {
                        s.clone()
                            .run(ctx.clone(), connector.clone(), config.clone())
                    },
                ))
            }
        }
    }

    /// Puts `next`'s sources and sinks in force: those added start, those removed stop, those
    /// whose settings changed are stopped and started again (a source hands back what it has
    /// not acknowledged, RabbitMQ requeues it; a sink's unconfirmed events come again on
    /// JetStream and are counted as dropped on the others); the rest keep running untouched.
    /// Every new link is made first: one that cannot be (a wrap attribute, a user that does
    /// not exist) refuses the reload before anything changes. Connection settings are not
    /// looked at (they need a restart). What changed, one line each.
    pub async fn reload(&self, next: &AmqpConfig) -> Result<Vec<String>, AmqpError> {
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        if state.closed {
            return Err(AmqpError::Config("the gateway is shutting down".to_owned()));
        }
        let wanted = LinkConfig::all(next);
        let mut made = Vec::new();
        for config in &wanted {
            let unchanged = state.running.iter().any(|r| r.link.made_from(config));
            if !unchanged {
                made.push((config.key(), self.prepare(config)?));
            }
        }
        let mut changes = Vec::new();
        let mut kept = Vec::new();
        for mut r in std::mem::take(&mut state.running) {
            if wanted.iter().any(|c| r.link.made_from(c)) {
                kept.push(r);
                continue;
            }
            let link = r.link.link().clone();
            r.link.halt();
            if let Some(task) = r.task.take()
                && tokio::time::timeout(STOP_WAIT, task).await.is_err()
            {
                tracing::warn!(kind = link.kind, link = %link.name, "an AMQP link did not stop within {STOP_WAIT:?}; it ends on its own");
            }
            link.set_stopped();
            let replaced = made
                .iter()
                .any(|((k, n), _)| *k == link.kind && *n == link.name);
            if !replaced {
                changes.push(format!("amqp {} `{}` removed", link.kind, link.name));
            }
        }
        let mut running = Vec::new();
        for config in &wanted {
            let key = config.key();
            if let Some(i) = kept.iter().position(|r| r.link.made_from(config)) {
                running.push(kept.swap_remove(i));
                continue;
            }
            let Some(i) = made.iter().position(|(k, _)| *k == key) else {
                continue;
            };
            let (_, link) = made.swap_remove(i);
            let existed = inner
                .status
                .links()
                .iter()
                .any(|l| l.kind == key.0 && l.name == key.1);
            changes.push(format!(
                "amqp {} `{}` {}",
                key.0,
                key.1,
                if existed { "changed" } else { "added" }
            ));
            let task = state.started.then(|| self.spawn(&link));
            running.push(Running { link, task });
        }
        inner
            .status
            .set(running.iter().map(|r| r.link.link().clone()).collect());
        state.running = running;
        Ok(changes)
    }
}

/// The configured sources and sinks, ready to run.
pub struct AmqpAdapter {
    links: AmqpLinks,
}

impl std::fmt::Debug for AmqpAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpAdapter")
            .field("links", &self.links)
            .finish()
    }
}

impl AmqpAdapter {
    /// Checks the configuration (CA file, wrap attributes) and prepares every link; nothing
    /// connects before [`Adapter::run`].
    pub fn new(config: &AmqpConfig, ctx: &AdapterContext) -> Result<AmqpAdapter, AdapterError> {
        let connector = link::Connector::new(config, ctx.instance.clone()).map_err(boxed)?;
        let ingress = AmqpIngress {
            // The sources stop with the gateway at the latest (normally earlier, through
            // `AmqpIngress::stop`).
            stop: ctx.shutdown.child_token(),
            sources: TaskTracker::new(),
        };
        let links = AmqpLinks {
            inner: Arc::new(LinksInner {
                ctx: ctx.clone(),
                connector,
                config: Arc::new(config.clone()),
                metrics: ctx.metrics(ADAPTER),
                ingress,
                status: AmqpStatus {
                    links: Arc::new(RwLock::new(Arc::from(Vec::new()))),
                },
                state: tokio::sync::Mutex::new(LinksState {
                    running: Vec::new(),
                    started: false,
                    closed: false,
                }),
            }),
        };
        let mut running = Vec::new();
        for c in LinkConfig::all(config) {
            running.push(Running {
                link: links.prepare(&c).map_err(boxed)?,
                task: None,
            });
        }
        links
            .inner
            .status
            .set(running.iter().map(|r| r.link.link().clone()).collect());
        links
            .inner
            .state
            .try_lock()
            .map_err(|e| boxed(AmqpError::Config(e.to_string())))?
            .running = running;
        Ok(AmqpAdapter { links })
    }

    pub fn status(&self) -> AmqpStatus {
        self.links.inner.status.clone()
    }

    /// The handle that stops the sources first at shutdown.
    pub fn ingress(&self) -> AmqpIngress {
        self.links.inner.ingress.clone()
    }

    /// The handle a configuration reload changes the sources and sinks through.
    pub fn links(&self) -> AmqpLinks {
        self.links.clone()
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
            let links = self.links;
            {
                let mut state = links.inner.state.lock().await;
                state.started = true;
                let tasks: Vec<JoinHandle<()>> =
                    state.running.iter().map(|r| links.spawn(&r.link)).collect();
                for (r, t) in state.running.iter_mut().zip(tasks) {
                    r.task = Some(t);
                }
            }
            ctx.shutdown.cancelled().await;
            let tasks: Vec<JoinHandle<()>> = {
                let mut state = links.inner.state.lock().await;
                state.closed = true;
                state
                    .running
                    .iter_mut()
                    .filter_map(|r| r.task.take())
                    .collect()
            };
            for t in tasks {
                let _ = t.await;
            }
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
