//! Prometheus metrics of every process, served as text on `/metrics` on a port of its own:
//! requests and latency per RPC and status, requests in flight and rejected per service, and the
//! stage-specific gauges (generator queue and tokens, index size, orchestrator overhead).

use std::net::SocketAddr;
use std::sync::LazyLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    /// RPCs answered, by service, method and gRPC status code.
    pub requests: IntCounterVec,
    /// RPC latency (until the response headers), by service and method.
    pub duration: HistogramVec,
    /// RPCs in flight, by service.
    pub in_flight: IntGaugeVec,
    /// RPCs refused with RESOURCE_EXHAUSTED because the service was at its concurrency limit.
    pub rejected: IntCounterVec,
    /// Generator: jobs waiting for admission to the running batch.
    pub generator_queue_depth: IntGauge,
    /// Generator: sequences in the running batch.
    pub generator_running: IntGauge,
    /// Generator: submission to admission.
    pub generator_queue_wait: Histogram,
    /// Generator: submission to first generated token.
    pub generator_time_to_first_token: Histogram,
    /// Generator: tokens per forward pass (decode tokens plus prefill chunks).
    pub generator_batch_tokens: Histogram,
    /// Generator: prompt tokens admitted.
    pub generator_prompt_tokens: IntCounter,
    /// Generator: prompt tokens whose keys and values came from the prefix cache.
    pub generator_prefix_cache_hit_tokens: IntCounter,
    /// Generator: tokens generated.
    pub generated_tokens: IntCounter,
    /// Generator: beam searches admitted.
    pub generator_beam_searches: IntCounter,
    /// Generator: beams forked by beam searches.
    pub generator_beam_forks: IntCounter,
    /// Generator: decode rate of finished jobs, tokens per second.
    pub decode_tokens_per_second: Histogram,
    /// Retriever: documents in the index.
    pub index_documents: IntGauge,
    /// Retriever following a store: how far behind the store's head its index is, in seconds.
    pub store_lag: Gauge,
    /// Retriever following a store: the watermark it has applied (every transaction below it).
    pub store_applied: IntGauge,
    /// Orchestrator: time of a write not spent waiting on stages.
    pub orchestrator_overhead: Histogram,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let latency = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ];
    let m = Metrics {
        requests: IntCounterVec::new(
            Opts::new(
                "ghostwriter_rpc_requests_total",
                "RPCs answered, by service, method and gRPC status",
            ),
            &["service", "method", "code"],
        )?,
        duration: HistogramVec::new(
            HistogramOpts::new(
                "ghostwriter_rpc_duration_seconds",
                "RPC latency until the response headers",
            )
            .buckets(latency.clone()),
            &["service", "method"],
        )?,
        in_flight: IntGaugeVec::new(
            Opts::new("ghostwriter_rpc_in_flight", "RPCs in flight"),
            &["service"],
        )?,
        rejected: IntCounterVec::new(
            Opts::new(
                "ghostwriter_rpc_rejected_total",
                "RPCs refused at the concurrency limit",
            ),
            &["service"],
        )?,
        generator_queue_depth: IntGauge::new(
            "ghostwriter_generator_queue_depth",
            "Generation jobs waiting for admission to the running batch",
        )?,
        generator_running: IntGauge::new(
            "ghostwriter_generator_running",
            "Sequences in the generator's running batch",
        )?,
        generator_queue_wait: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_queue_wait_seconds",
                "Time from submission to admission into the running batch",
            )
            .buckets(latency.clone()),
        )?,
        generator_time_to_first_token: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_time_to_first_token_seconds",
                "Time from submission to the first generated token",
            )
            .buckets(latency.clone()),
        )?,
        generator_batch_tokens: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_batch_tokens",
                "Tokens per forward pass (decode tokens plus prefill chunks)",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
            ]),
        )?,
        generator_prompt_tokens: IntCounter::new(
            "ghostwriter_generator_prompt_tokens_total",
            "Prompt tokens admitted",
        )?,
        generator_prefix_cache_hit_tokens: IntCounter::new(
            "ghostwriter_generator_prefix_cache_hit_tokens_total",
            "Prompt tokens whose keys and values came from the prefix cache",
        )?,
        generated_tokens: IntCounter::new(
            "ghostwriter_generated_tokens_total",
            "Tokens generated",
        )?,
        generator_beam_searches: IntCounter::new(
            "ghostwriter_generator_beam_searches_total",
            "Beam searches admitted",
        )?,
        generator_beam_forks: IntCounter::new(
            "ghostwriter_generator_beam_forks_total",
            "Beams forked (each shares its parent's full cache blocks and copies its last one)",
        )?,
        decode_tokens_per_second: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_generator_decode_tokens_per_second",
                "Decode rate of finished jobs",
            )
            .buckets(vec![
                5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 120.0, 200.0, 400.0, 800.0,
            ]),
        )?,
        index_documents: IntGauge::new(
            "ghostwriter_index_documents",
            "Documents in the retriever's index",
        )?,
        store_lag: Gauge::new(
            "ghostwriter_retriever_store_lag_seconds",
            "How far the retriever's index is behind the store's head",
        )?,
        store_applied: IntGauge::new(
            "ghostwriter_retriever_store_applied_xid",
            "Store watermark the retriever's index has applied (every transaction below it)",
        )?,
        orchestrator_overhead: Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_orchestrator_overhead_seconds",
                "Write time not spent waiting on stages",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05,
            ]),
        )?,
        registry,
    };
    m.registry.register(Box::new(m.requests.clone()))?;
    m.registry.register(Box::new(m.duration.clone()))?;
    m.registry.register(Box::new(m.in_flight.clone()))?;
    m.registry.register(Box::new(m.rejected.clone()))?;
    m.registry
        .register(Box::new(m.generator_queue_depth.clone()))?;
    m.registry.register(Box::new(m.generated_tokens.clone()))?;
    m.registry
        .register(Box::new(m.generator_beam_searches.clone()))?;
    m.registry
        .register(Box::new(m.generator_beam_forks.clone()))?;
    m.registry.register(Box::new(m.generator_running.clone()))?;
    m.registry
        .register(Box::new(m.generator_queue_wait.clone()))?;
    m.registry
        .register(Box::new(m.generator_time_to_first_token.clone()))?;
    m.registry
        .register(Box::new(m.generator_batch_tokens.clone()))?;
    m.registry
        .register(Box::new(m.generator_prompt_tokens.clone()))?;
    m.registry
        .register(Box::new(m.generator_prefix_cache_hit_tokens.clone()))?;
    m.registry
        .register(Box::new(m.decode_tokens_per_second.clone()))?;
    m.registry.register(Box::new(m.index_documents.clone()))?;
    m.registry.register(Box::new(m.store_lag.clone()))?;
    m.registry.register(Box::new(m.store_applied.clone()))?;
    m.registry
        .register(Box::new(m.orchestrator_overhead.clone()))?;
    Ok(m)
}

static METRICS: LazyLock<Metrics> =
    LazyLock::new(|| build().expect("metric definitions are valid"));

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&METRICS.registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Serves `GET /metrics`, `/healthz` and `/readyz` over plain HTTP/1.1 (axum) on `listener`
/// until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: Shutdown) {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?addr, "metrics on /metrics");
    let text = |status: StatusCode, body: String| {
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            body,
        )
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || async move { text(StatusCode::OK, render()) }),
        )
        .route(
            "/healthz",
            get(move || async move { text(StatusCode::OK, "ok\n".into()) }),
        )
        // SERVING, as the gRPC health service says: for probes that cannot speak TLS.
        .route(
            "/readyz",
            get(move || async move {
                if crate::server::ready() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
                }
            }),
        )
        .fallback(move || async move {
            text(
                StatusCode::NOT_FOUND,
                "not found; metrics are on /metrics\n".into(),
            )
        });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
    {
        tracing::warn!(error = %e, "the metrics endpoint stopped");
    }
}
