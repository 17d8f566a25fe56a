//! Server assembly shared by every stage: the standard gRPC health service (NOT_SERVING until
//! the stage says it is ready, NOT_SERVING again on shutdown), server reflection, the middleware
//! of [`crate::layers`] (tracing, metrics, load shedding, deadlines), TLS when on, keepalive,
//! a maximum connection age, and a graceful exit on shutdown: NOT_SERVING at once, still
//! accepting for the drain delay (callers move away), then a drain of what is in flight,
//! bounded in time. A server listens on TCP or, for callers in the same private directory, on
//! a Unix socket ([`Listener`]).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use ghostwriter_common::shutdown::Shutdown;

use crate::Transport;
use crate::layers::{DeadlineLayer, MetricsLayer, ShedLayer, TraceLayer};
use crate::metrics::Metrics;

/// Readiness of one stage as the health service reports it, under both the overall name `""`
/// and the stage's own gRPC service name.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
    metrics: Metrics,
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
        self.metrics
            .set_ready(self.service, status == ServingStatus::Serving);
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }
}

/// Where a server accepts connections: a TCP port, or a Unix socket (plain HTTP/2 even when
/// the process speaks TLS: only processes that can open the socket's directory reach it).
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix socket listener.
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Self::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Self::Unix(l)
    }
}

impl Listener {
    /// The TCP address it listens on (None for a Unix socket).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().ok(),
            Self::Unix(_) => None,
        }
    }

    /// Where it listens, for the log.
    fn describe(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| a.to_string()),
            Self::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(crate::client::unix_url))
                .unwrap_or_else(|| "unix".into()),
        }
    }
}

/// A stage server being assembled: health and reflection, to which the stage adds its service.
pub struct StageServer {
    health: Health,
    transport: Transport,
}

impl StageServer {
    /// Starts assembling a server for the gRPC service `service` (its full name, such as
    /// `ghostwriter.v1.Retriever`), which starts NOT_SERVING, with the process's `transport`
    /// (TLS, limits, metrics). Returns the server and the routes (health and reflection) to
    /// which the caller adds its own service before [`Self::serve`].
    pub async fn new(service: &'static str, transport: &Transport) -> (Self, Routes) {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let health = Health {
            reporter,
            service,
            metrics: transport.metrics.clone(),
        };
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
            Self {
                health,
                transport: transport.clone(),
            },
            Routes::new(health_service)
                .add_service(v1)
                .add_service(v1alpha),
        )
    }

    /// The health handle, to flip the stage to SERVING once its models or index are loaded.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves `routes` on `listener` until `shutdown` fires; then reports NOT_SERVING, keeps
    /// accepting for the transport's drain delay, stops accepting, and returns once the RPCs
    /// in flight are done or the drain timeout has passed.
    pub async fn serve(
        self,
        routes: Routes,
        listener: impl Into<Listener>,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let listener = listener.into();
        let health = self.health.clone();
        tracing::info!(service = health.service, addr = %listener.describe(), "listening");
        let transport = self.transport.clone();
        let service = health.service;
        let watch = shutdown.clone();
        let delay = transport.drain_delay;
        let stopping = async move {
            shutdown.wait().await;
            health.not_serving().await;
            if !delay.is_zero() {
                tracing::info!(
                    service,
                    ?delay,
                    "NOT_SERVING; still accepting for the drain delay"
                );
                tokio::time::sleep(delay).await;
            }
        };
        let keepalive = transport.keepalive;
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(keepalive.interval))
            .http2_keepalive_timeout(Some(keepalive.timeout));
        if let Some(age) = transport.max_connection_age {
            builder = builder
                .max_connection_age(age)
                .max_connection_age_grace(transport.max_connection_age_grace);
        }
        let server = builder
            .layer(TraceLayer { service })
            .layer(MetricsLayer {
                service,
                metrics: transport.metrics.rpc().clone(),
            })
            .layer(ShedLayer::new(
                transport.max_concurrency,
                transport.metrics.rpc().rejected.clone(),
            ))
            .layer(DeadlineLayer { service })
            .add_routes(routes);
        let serving = async {
            match (listener, &transport.tls) {
                (Listener::Tcp(listener), Some(tls)) => {
                    // The public API also takes callers without a client certificate (they
                    // present tokens); every stage API needs the mesh identity.
                    let public = service == PUBLIC_SERVICE;
                    server
                        .serve_with_incoming_shutdown(tls.incoming(listener, public)?, stopping)
                        .await?;
                }
                (Listener::Tcp(listener), None) => {
                    // No Nagle: small responses would otherwise wait for the caller's delayed
                    // ACK (40 ms a hop on Linux).
                    let incoming = TcpListenerStream::new(listener).map(|accepted| {
                        if let Ok(socket) = &accepted {
                            let _ = socket.set_nodelay(true);
                        }
                        accepted
                    });
                    server
                        .serve_with_incoming_shutdown(incoming, stopping)
                        .await?;
                }
                (Listener::Unix(listener), _) => {
                    server
                        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopping)
                        .await?;
                }
            }
            Ok::<(), anyhow::Error>(())
        };
        // The drain after the delay is bounded: past --drain-timeout-secs, what is still in
        // flight is cut off.
        let drain = transport.drain_timeout;
        tokio::select! {
            served = serving => served?,
            () = async { watch.wait().await; tokio::time::sleep(delay + drain).await } => {
                tracing::warn!(service, ?drain, "drain timed out; closing the RPCs still in flight");
            }
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
        listener: impl Into<Listener>,
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

/// Default bound of the drain on shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A signal that fires, after `shutdown`, shortly before the transport's drain ends (its drain
/// delay and drain timeout, less a margin of a tenth of the timeout, at most a second): a
/// server whose long calls would be cut there ends them itself, in a way its callers can
/// continue elsewhere (the generator hands its streams over).
pub fn handover(shutdown: &Shutdown, transport: &Transport) -> Shutdown {
    let (trigger, handle) = ghostwriter_common::shutdown::channel();
    let shutdown = shutdown.clone();
    let margin = (transport.drain_timeout / 10).min(Duration::from_secs(1));
    let after = transport.drain_delay + transport.drain_timeout.saturating_sub(margin);
    tokio::spawn(async move {
        shutdown.wait().await;
        tokio::time::sleep(after).await;
        trigger.trigger();
    });
    handle
}
