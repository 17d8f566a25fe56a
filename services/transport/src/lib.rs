//! How Ghostwriter's processes talk: mutual TLS ([`tls`]), client channels and the errors that
//! name the stage that failed ([`client`]), server assembly with health, reflection and a
//! bounded drain ([`server`]), its middleware, one concern per tower layer ([`layers`]), and the
//! metrics endpoint ([`metrics`]).
//!
//! Nothing here is process-wide: a [`Transport`] value carries the TLS, limits and metrics of
//! whoever serves or calls with it, so two servers in one process (a test) can differ.

pub mod client;
pub mod layers;
pub mod metrics;
pub mod server;
pub mod tls;

use std::time::Duration;

pub use client::{Dialer, Keepalive, bearer, channel};
pub use metrics::Metrics;
pub use server::{Health, Listener, StageServer};
pub use tls::{Tls, TlsArgs};

/// What the servers and clients of a process share: TLS (when on), the servers' limits and
/// how they leave, keepalive, and where they record metrics and readiness.
#[derive(Clone, Debug)]
pub struct Transport {
    /// Mutual TLS for every server and client; None = plain HTTP/2.
    pub tls: Option<Tls>,
    /// RPCs each service runs at once; past it, RESOURCE_EXHAUSTED at once (0 = no limit).
    pub max_concurrency: usize,
    /// How long a stopping server keeps accepting calls after turning NOT_SERVING, so callers
    /// see it leave (readiness, DNS, etcd) and move away before it stops accepting.
    pub drain_delay: Duration,
    /// How long a stopping server then waits for the RPCs in flight.
    pub drain_timeout: Duration,
    /// Connections older than this are asked to go away (GOAWAY), so callers spread over
    /// replicas that started after them; None = never.
    pub max_connection_age: Option<Duration>,
    /// How long a connection asked to go away keeps its calls in flight before it is closed.
    pub max_connection_age_grace: Duration,
    /// HTTP/2 keepalive of servers and clients.
    pub keepalive: Keepalive,
    /// The process's metrics and readiness.
    pub metrics: Metrics,
}

impl Default for Transport {
    fn default() -> Self {
        Self {
            tls: None,
            max_concurrency: 0,
            drain_delay: Duration::ZERO,
            drain_timeout: server::DEFAULT_DRAIN_TIMEOUT,
            max_connection_age: None,
            max_connection_age_grace: server::DEFAULT_DRAIN_TIMEOUT,
            keepalive: Keepalive::default(),
            metrics: Metrics::new(),
        }
    }
}

impl Transport {
    /// A lazy channel to `url` over this transport's TLS and keepalive.
    pub fn channel(&self, url: &str) -> Result<tonic::transport::Channel, client::BadUrl> {
        self.dialer().channel(url)
    }

    /// How this process dials other stages.
    pub fn dialer(&self) -> Dialer {
        Dialer {
            tls: self.tls.clone(),
            keepalive: self.keepalive,
        }
    }
}
