//! `[tracing]`: the OpenTelemetry SDK and its OTLP exporter (HTTP/protobuf) for the spans that
//! `meshgate_core::trace` records at every hop (decision 0095).
//!
//! What the crates do, read in their source (0.33): the SDK's `BatchSpanProcessor` keeps
//! finished spans in a bounded channel (`max_queue_size`; a full one drops the span and counts
//! it) and exports them from its own thread with `futures_executor::block_on`. The OTLP HTTP
//! exporter takes any `opentelemetry_http::HttpClient`; its own clients would add reqwest 0.13
//! or hyper's client beside the reqwest 0.12 the gateway has, so [`Client`] hands the request to
//! the gateway's tokio runtime and waits for the task there (a tokio `JoinHandle` may be awaited
//! from any executor). An endpoint given in code is used as it is (the full `/v1/traces` URL);
//! `OTEL_EXPORTER_OTLP_TRACES_HEADERS` and the `OTEL_BSP_*` batch variables still apply.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use meshgate_config::TracingConfig;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanExporter,
};

/// The largest collector answer read (an OTLP answer is a few bytes; a partial-success one a
/// message): more is an error, not memory.
const MAX_ANSWER: usize = 64 * 1024;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("tracing.endpoint: {0}")]
pub struct TracingStartError(String);

/// Starts exporting spans when `config.enabled` (once per process: a second gateway in the same
/// process shares the first one's exporter).
pub fn start(
    config: &TracingConfig,
    instance: &str,
    registry: &meshgate_core::metrics::Registry,
) -> Result<(), TracingStartError> {
    if !config.enabled || PROVIDER.get().is_some() {
        return Ok(());
    }
    // https:// collectors are verified against the system's root certificates (the reqwest
    // build here has no roots of its own), as trigger subscribers are.
    let tls = meshgate_core::tls::client_config(None)
        .map_err(|e| TracingStartError(format!("cannot set up TLS: {e}")))?;
    let client = Client {
        http: reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.export_timeout)
            .build()
            .map_err(|e| TracingStartError(format!("cannot make its HTTP client: {e}")))?,
        runtime: tokio::runtime::Handle::current(),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(config.endpoint.clone())
        .with_timeout(config.export_timeout)
        .build()
        .map_err(|e| TracingStartError(format!("{:?}: {e}", config.endpoint)))?;
    let exporter = Counted {
        inner: exporter,
        exported: registry.counter(
            meshgate_core::metrics::TRACE_SPANS,
            &[("outcome", "exported")],
        ),
        failed: registry.counter(
            meshgate_core::metrics::TRACE_SPANS,
            &[("outcome", "failed")],
        ),
    };
    let batch = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(config.max_queued_spans)
                .with_max_export_batch_size(config.max_queued_spans.min(512))
                .build(),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(
            Resource::builder_empty()
                .with_service_name(config.service_name.clone())
                .with_attribute(KeyValue::new("service.instance.id", instance.to_owned()))
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        )
        .build();
    let tracer = provider.tracer("meshgate");
    if PROVIDER.set(provider).is_ok() {
        meshgate_core::trace::install(tracer);
        tracing::info!(endpoint = %config.endpoint, sample_ratio = config.sample_ratio, "tracing on: spans exported over OTLP/HTTP");
    }
    Ok(())
}

/// Exports the spans still held (at most `timeout`), at exit. Blocking: call it off the
/// runtime's worker threads.
pub fn finish(timeout: Duration) {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.shutdown_with_timeout(timeout)
    {
        tracing::warn!("tracing: spans not exported at exit: {e}");
    }
}

/// The OTLP exporter, counting the spans of each batch by how the export went
/// (`meshgate_trace_spans_total{outcome}`): a collector that is down or refuses shows as
/// `failed` (after the exporter's own retries), not only as a log line.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    exported: meshgate_core::metrics::Counter,
    failed: meshgate_core::metrics::Counter,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        let n = batch.len() as u64;
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            match &result {
                Ok(()) => self.exported.add(n),
                Err(e) => {
                    self.failed.add(n);
                    tracing::debug!("tracing: {n} spans not exported: {e}");
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter's HTTP client: the gateway's reqwest, run on the gateway's runtime.
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl Client {
    async fn send(
        http: reqwest::Client,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, HttpError> {
        let mut answer = http.execute(reqwest::Request::try_from(request)?).await?;
        let mut response = Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            response = response.header(name, value);
        }
        let mut body = Vec::new();
        while let Some(chunk) = answer.chunk().await? {
            if body.len() + chunk.len() > MAX_ANSWER {
                return Err(
                    format!("the collector's answer is longer than {MAX_ANSWER} bytes").into(),
                );
            }
            body.extend_from_slice(&chunk);
        }
        Ok(response.body(Bytes::from(body))?)
    }
}

impl HttpClient for Client {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let task = self.runtime.spawn(Self::send(self.http.clone(), request));
        Box::pin(async move { task.await? })
    }
}
