//! Logging and distributed tracing for every process.
//!
//! Logs go to stderr (`RUST_LOG` filters them) as text or JSON lines (`--log-format`); a line
//! logged while serving an RPC carries the RPC's trace id (`trace_id`), the same in every stage
//! the request crossed. Exporting traces is off by default: set `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_TRACES_EXPORTER=otlp`) and spans go over OTLP,
//! gRPC by default or HTTP with `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`, configured by the
//! standard `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_SDK_DISABLED`, ...). Every server opens one span per RPC whose parent is the W3C
//! `traceparent` of the request, and every outgoing call carries the current span's context, so
//! one request is one trace across stages.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// A status line for the person at the terminal (ready, listening on ...): printed to stderr as
/// is with text logs, whatever `RUST_LOG` says; an INFO event with JSON logs, so that every
/// line stays JSON.
pub fn status(line: &str) {
    match FORMAT.get() {
        Some(LogFormat::Json) => tracing::info!("{line}"),
        _ => eprintln!("{line}"),
    }
}

fn otlp_requested() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter = std::env::var("OTEL_TRACES_EXPORTER").unwrap_or_default();
    !disabled
        && exporter != "none"
        && (exporter == "otlp"
            || set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors), with the span fields (`trace_id`).
    Json,
}

impl LogFormat {
    /// The value of `--log-format` that selects it (for child processes).
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// The OTLP protocol asked for (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, then
/// `OTEL_EXPORTER_OTLP_PROTOCOL`): `grpc` (default) or `http/protobuf`.
fn otlp_http() -> Result<bool, String> {
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    match protocol.trim() {
        "" | "grpc" => Ok(false),
        "http/protobuf" => Ok(true),
        other => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported (grpc or http/protobuf)"
        )),
    }
}

/// The OTLP/HTTP exporter's client: hyper, driven on the process's tokio runtime (the batch
/// exporter calls it from a thread of its own, which has none).
#[derive(Debug)]
struct OnRuntime {
    client: std::sync::Arc<dyn opentelemetry_http::HttpClient>,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as opentelemetry_http::HttpError)?
    }
}

fn exporter() -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::WithHttpConfig as _;
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let built = if otlp_http()? {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "OTLP/HTTP needs a tokio runtime".to_string())?;
        let client = opentelemetry_http::hyper::HyperClient::with_default_connector(
            std::time::Duration::from_secs(10),
            None,
        );
        builder
            .with_http()
            .with_http_client(OnRuntime {
                client: std::sync::Arc::new(client),
                runtime,
            })
            .build()
    } else {
        builder.with_tonic().build()
    };
    built.map_err(|e| e.to_string())
}

/// Initializes text logging, and OTLP tracing when the `OTEL_*` variables ask for it. Safe to
/// call more than once (later calls do nothing).
pub fn init_logging() {
    init_logging_as(LogFormat::Text);
}

/// [`init_logging`] with lines in `format`.
pub fn init_logging_as(format: LogFormat) {
    // Spans always get trace ids (so log lines can name them); they are exported only when the
    // OTEL_* variables ask for it.
    let mut builder =
        SdkTracerProvider::builder().with_resource(opentelemetry_sdk::Resource::builder().build());
    if otlp_requested() {
        match exporter() {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => eprintln!("OTLP exporter not started: {e}"),
        }
    }
    init_with_provider(Some(builder.build()), format);
}

/// Initializes logging with `provider` receiving the spans (tests pass an in-memory one).
pub fn init_with_provider(provider: Option<SdkTracerProvider>, format: LogFormat) {
    let _ = FORMAT.set(format);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_target(false)
            // Colour codes only for a person at a terminal, never in a file or a collector.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    // INFO and above only: the models' own TRACE spans stay out of the traces.
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("ghostwriter"))
            .with_filter(LevelFilter::INFO)
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if let Some(p) = provider.filter(|_| installed) {
        opentelemetry::global::set_tracer_provider(p.clone());
        let _ = PROVIDER.set(p);
    }
}

/// Flushes and stops the span exporter (call before the process exits).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
        let _ = p.shutdown();
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the current span's context into an outgoing request's metadata (`traceparent`).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(metadata))
    });
}

/// A server span for one RPC, child of the caller's context from the request headers.
pub fn server_span(headers: &http::HeaderMap, service: &str, method: &str) -> tracing::Span {
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let span = tracing::info_span!(
        "rpc",
        otel.name = %format!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        trace_id = tracing::field::Empty,
    );
    let _ = span.set_parent(parent);
    // The trace id in every log line of the RPC (the caller's, or a new trace's).
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}
