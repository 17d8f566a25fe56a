//! Prometheus metrics of a process, served as text on `/metrics` on a port of its own, beside
//! `/healthz` and `/readyz`: the RPC metrics every server records (requests and latency per RPC
//! and status, requests in flight and rejected per service), the build (`ghostwriter_build_info`),
//! and whatever each stage registers
//! of its own (generator queue and tokens, index size, orchestrator overhead).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use ghostwriter_common::shutdown::Shutdown;

/// Latency buckets of RPCs and stages, seconds.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The RPC metrics every server of a process records.
#[derive(Clone)]
pub struct RpcMetrics {
    /// RPCs answered, by service, method and gRPC status code.
    pub requests: IntCounterVec,
    /// RPC latency, until the RPC ends (a stream's last message and trailers), by service and
    /// method.
    pub duration: HistogramVec,
    /// RPCs in flight, by service.
    pub in_flight: IntGaugeVec,
    /// RPCs refused with RESOURCE_EXHAUSTED because the service was at its concurrency limit.
    pub rejected: IntCounterVec,
}

impl RpcMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
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
                    "RPC latency, from the request to the end of the answer (a stream's trailers)",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
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
        })
    }
}

/// The metrics of a process, as a value: one registry, the RPC metrics, and whether each of its
/// servers is SERVING (for `/readyz`). Clones share them; every server of one process gets
/// clones of one value, and two processes' worth can live side by side in one (tests).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    rpc: RpcMetrics,
    ready: Mutex<BTreeMap<&'static str, bool>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A new registry holding the RPC metrics.
    pub fn new() -> Self {
        let registry = Registry::new();
        let rpc = RpcMetrics::new().expect("metric definitions are valid");
        let metrics = Self {
            inner: Arc::new(Inner {
                registry,
                rpc,
                ready: Mutex::default(),
            }),
        };
        let rpc = metrics.inner.rpc.clone();
        metrics.register(rpc.requests);
        metrics.register(rpc.duration);
        metrics.register(rpc.in_flight);
        metrics.register(rpc.rejected);
        let build = IntGaugeVec::new(
            Opts::new(
                "ghostwriter_build_info",
                "Always 1; the labels say which build this process runs",
            ),
            &["version"],
        )
        .expect("metric definitions are valid");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics.register(build);
        metrics
    }

    /// The RPC metrics.
    pub fn rpc(&self) -> &RpcMetrics {
        &self.inner.rpc
    }

    /// Registers a stage's own metric and returns it. A metric of that name already there (a
    /// second server of the same stage sharing this registry, in a test) is logged and left
    /// out of the exposition; the returned metric still counts.
    pub fn register<C: Collector + Clone + 'static>(&self, metric: C) -> C {
        if let Err(e) = self.inner.registry.register(Box::new(metric.clone())) {
            tracing::debug!(error = %e, "metric not registered");
        }
        metric
    }

    /// Records whether the server of `service` is SERVING.
    pub fn set_ready(&self, service: &'static str, serving: bool) {
        self.inner
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(service, serving);
    }

    /// Whether this process serves, and every server in it is SERVING: the plain-HTTP readiness
    /// the metrics endpoint answers on `/readyz` (for probes that cannot speak TLS gRPC).
    pub fn ready(&self) -> bool {
        let ready = self.inner.ready.lock().unwrap_or_else(|e| e.into_inner());
        !ready.is_empty() && ready.values().all(|serving| *serving)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `GET /metrics`, `/healthz` and `/readyz` over plain HTTP/1.1 (axum) on `listener`
/// until `shutdown`.
pub async fn serve(metrics: Metrics, listener: TcpListener, shutdown: Shutdown) {
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
            get({
                let metrics = metrics.clone();
                move || async move { text(StatusCode::OK, metrics.render()) }
            }),
        )
        .route(
            "/healthz",
            get(move || async move { text(StatusCode::OK, "ok\n".into()) }),
        )
        // SERVING, as the gRPC health service says: for probes that cannot speak TLS.
        .route(
            "/readyz",
            get(move || async move {
                if metrics.ready() {
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
