//! Server assembly shared by every stage: the standard gRPC health service (NOT_SERVING until
//! the stage says it is ready, NOT_SERVING again on shutdown), server reflection, per-RPC
//! metrics, a concurrency limit that answers RESOURCE_EXHAUSTED at once past it, and a graceful
//! drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::Semaphore;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::shutdown::Shutdown;

/// Readiness of one stage as the health service reports it, under both the overall name `""`
/// and the stage's own gRPC service name.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
}

impl Health {
    /// Sets the stage SERVING.
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Sets the stage NOT_SERVING.
    pub async fn not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        if let Ok(mut states) = STATES.lock() {
            states.insert(self.service, status == ServingStatus::Serving);
        }
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }
}

/// Whether each server of this process is SERVING (for `/readyz`).
static STATES: std::sync::Mutex<std::collections::BTreeMap<&'static str, bool>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Whether this process serves, and every server in it is SERVING: the plain-HTTP readiness
/// the metrics endpoint answers on `/readyz` (for probes that cannot speak TLS gRPC).
pub fn ready() -> bool {
    STATES
        .lock()
        .is_ok_and(|s| !s.is_empty() && s.values().all(|serving| *serving))
}

/// A stage server being assembled: health and reflection, to which the stage adds its service.
pub struct StageServer {
    health: Health,
}

impl StageServer {
    /// Starts assembling a server for the gRPC service `service` (its full name, such as
    /// `ghostwriter.v1.Retriever`), which starts NOT_SERVING. Returns the server and the routes
    /// (health and reflection) to which the caller adds its own service before [`Self::serve`].
    pub async fn new(service: &'static str) -> (Self, Routes) {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Health { reporter, service };
        health.not_serving().await;
        // Reflection in both versions: v1, and v1alpha, which many GUI clients still ask for.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(ghostwriter_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let v1 = reflection()
            .build_v1()
            .expect("the compiled-in descriptor sets are valid");
        let v1alpha = reflection()
            .build_v1alpha()
            .expect("the compiled-in descriptor sets are valid");
        (
            Self { health },
            Routes::new(health_service)
                .add_service(v1)
                .add_service(v1alpha),
        )
    }

    /// The health handle, to flip the stage to SERVING once its models or index are loaded.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves `routes` on `listener` until `shutdown` fires; then reports NOT_SERVING, stops
    /// accepting, and returns once in-flight requests are done.
    pub async fn serve(
        self,
        routes: Routes,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let health = self.health.clone();
        let addr: Option<SocketAddr> = listener.local_addr().ok();
        tracing::info!(service = health.service, addr = ?addr, "listening");
        let options = options();
        let guard = GuardLayer {
            service: health.service,
            limit: (options.max_concurrency > 0)
                .then(|| Arc::new(Semaphore::new(options.max_concurrency))),
        };
        let stopping = async move {
            shutdown.wait().await;
            health.not_serving().await;
        };
        let server = Server::builder().layer(guard).add_routes(routes);
        if crate::tls::enabled() {
            // The public API also takes callers without a client certificate (they present
            // tokens); every stage API needs the mesh identity.
            let public = self.health.service == PUBLIC_SERVICE;
            server
                .serve_with_incoming_shutdown(crate::tls::incoming(listener, public)?, stopping)
                .await?;
        } else {
            server
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopping)
                .await?;
        }
        tracing::info!(service = self.health.service, "stopped");
        Ok(())
    }

    /// Like [`Self::serve`], but runs `load` (opening indexes, loading models) alongside: the
    /// stage answers health checks at once, NOT_SERVING, and turns SERVING when `load`
    /// succeeds. A failed load stops the server with its error.
    pub async fn serve_after<F>(
        self,
        routes: Routes,
        listener: TcpListener,
        shutdown: Shutdown,
        load: F,
    ) -> anyhow::Result<()>
    where
        F: std::future::Future<Output = anyhow::Result<()>>,
    {
        let health = self.health.clone();
        let serving = self.serve(routes, listener, shutdown);
        tokio::pin!(serving);
        tokio::select! {
            loaded = load => {
                loaded?;
                health.serving().await;
                serving.await
            }
            served = &mut serving => served,
        }
    }
}

/// The public API's service name.
const PUBLIC_SERVICE: &str = "ghostwriter.v1.Ghostwriter";

/// Process-wide server settings, set once from the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerOptions {
    /// RPCs a service runs at once; past it, RESOURCE_EXHAUSTED at once (0 = no limit).
    pub max_concurrency: usize,
}

static OPTIONS: OnceLock<ServerOptions> = OnceLock::new();

/// Sets the process's server options (the first call wins).
pub fn configure(options: ServerOptions) {
    let _ = OPTIONS.set(options);
}

fn options() -> ServerOptions {
    OPTIONS.get().copied().unwrap_or_default()
}

/// Records metrics of every RPC and sheds load past the concurrency limit.
#[derive(Clone)]
struct GuardLayer {
    service: &'static str,
    limit: Option<Arc<Semaphore>>,
}

impl<S> tower_layer::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            service: self.service,
            limit: self.limit.clone(),
        }
    }
}

#[derive(Clone)]
struct Guard<S> {
    inner: S,
    service: &'static str,
    limit: Option<Arc<Semaphore>>,
}

type Body = tonic::body::Body;

/// What an RPC holds while it runs: its concurrency permit and its in-flight count. Held by the
/// response body, so a streaming RPC holds both until its stream ends (or the caller drops it),
/// not just until its headers go out.
struct Held {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    in_flight: prometheus::IntGauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// A response body that releases its RPC's [`Held`] resources when dropped.
struct HeldBody {
    inner: Body,
    _held: Held,
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S> tower_service::Service<http::Request<Body>> for Guard<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path().to_string();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((self.service, ""));
        let (service, method) = (service.to_string(), method.to_string());
        // Health checks and reflection are never shed: probes must see the truth under load.
        let limited = !service.starts_with("grpc.");
        let m = crate::metrics::metrics();
        let permit = match (&self.limit, limited) {
            (Some(limit), true) => match limit.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    m.rejected.with_label_values(&[&service]).inc();
                    m.requests
                        .with_label_values(&[&service, &method, "ResourceExhausted"])
                        .inc();
                    let status = crate::status::overloaded(format!(
                        "{service} is at its concurrency limit ({} requests); retry later",
                        options().max_concurrency
                    ));
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            },
            _ => None,
        };
        // The clone serves this call; the ready one stays for the next (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let in_flight = m.in_flight.with_label_values(&[&service]);
        in_flight.inc();
        let started = Instant::now();
        // tonic answers an expired `grpc-timeout` with CANCELLED; answer DEADLINE_EXCEEDED, as
        // gRPC specifies, by expiring a moment before tonic's own timer.
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::deadline::parse_grpc_timeout)
            .map(|d| d.saturating_sub((d / 10).min(std::time::Duration::from_millis(5))));
        let span = crate::telemetry::server_span(request.headers(), &service, &method);
        let call_span = span.clone();
        Box::pin(tracing::Instrument::instrument(
            async move {
                let call = tracing::Instrument::instrument(inner.call(request), call_span);
                let response = match deadline {
                    None => call.await,
                    Some(d) => match tokio::time::timeout(d, call).await {
                        Ok(r) => r,
                        Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                            "{service}: the caller's deadline passed"
                        ))
                        .into_http()),
                    },
                };
                let code = match &response {
                    Ok(r) => r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                    Err(_) => tonic::Code::Unknown,
                };
                m.requests
                    .with_label_values(&[&service, &method, &format!("{code:?}")])
                    .inc();
                m.duration
                    .with_label_values(&[&service, &method])
                    .observe(started.elapsed().as_secs_f64());
                let held = Held {
                    _permit: permit,
                    in_flight,
                };
                response.map(|r| r.map(|inner| Body::new(HeldBody { inner, _held: held })))
            },
            span,
        ))
    }
}
