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

pub use client::{bearer, channel};
pub use metrics::Metrics;
pub use server::{Health, StageServer};
pub use tls::{Tls, TlsArgs};

/// What the servers and clients of a process share: TLS (when on), the servers' limits, and
/// where they record metrics and readiness.
#[derive(Clone, Debug)]
pub struct Transport {
    /// Mutual TLS for every server and client; None = plain HTTP/2.
    pub tls: Option<Tls>,
    /// RPCs each service runs at once; past it, RESOURCE_EXHAUSTED at once (0 = no limit).
    pub max_concurrency: usize,
    /// How long a stopping server waits for the RPCs in flight.
    pub drain_timeout: Duration,
    /// The process's metrics and readiness.
    pub metrics: Metrics,
}

impl Default for Transport {
    fn default() -> Self {
        Self {
            tls: None,
            max_concurrency: 0,
            drain_timeout: server::DEFAULT_DRAIN_TIMEOUT,
            metrics: Metrics::new(),
        }
    }
}

impl Transport {
    /// A lazy channel to `url` over this transport's TLS.
    pub fn channel(&self, url: &str) -> Result<tonic::transport::Channel, client::BadUrl> {
        client::channel(url, self.tls.as_ref())
    }
}
