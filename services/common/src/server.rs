//! Server assembly shared by every stage: the standard gRPC health service (NOT_SERVING until
//! the stage says it is ready, NOT_SERVING again on shutdown), server reflection, and a
//! graceful drain on shutdown.

use std::net::SocketAddr;

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
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }
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
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ghostwriter_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the compiled-in descriptor sets are valid");
        (
            Self { health },
            Routes::new(health_service).add_service(reflection),
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
        Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                shutdown.wait().await;
                health.not_serving().await;
            })
            .await?;
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
