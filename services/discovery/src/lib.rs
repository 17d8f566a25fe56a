//! Where Ghostwriter's stages are, and how a call picks one.
//!
//! A client keeps, per stage, a live [`EndpointSet`], from one of three sources:
//! - a static list of URLs (the embedded default; no discovery);
//! - DNS: `dns:///HOST:PORT` names a Kubernetes headless Service, re-resolved every few seconds
//!   ([`dns`]; the chart's default);
//! - etcd: stages register themselves with a lease, clients watch the registrations
//!   ([`registry`], over the small client in [`etcd`]).
//!
//! Calls go through a [`Balancer`]: power of two choices on in-flight requests, a circuit
//! breaker per endpoint, retries of idempotent calls within a budget ([`set`]).

pub mod dns;
pub mod etcd;
pub mod registry;
pub mod set;

use std::time::Duration;

pub use dns::{DnsSettings, DnsTarget};
pub use etcd::EtcdTarget;
use ghostwriter_common::stage::StageKind;
use ghostwriter_transport::Tls;
use ghostwriter_transport::client::Dialer;
pub use registry::Registration;
pub use set::{Balancer, Endpoint, EndpointInfo, EndpointSet, InFlight, shard_of};

/// Key prefix of registrations.
pub const DEFAULT_PREFIX: &str = "/ghostwriter/v1";
/// Lease time-to-live, seconds: a crashed process leaves its set within this.
pub const DEFAULT_TTL_SECS: i64 = 10;
/// How often `dns:///` stage URLs are resolved again, seconds.
pub const DEFAULT_DNS_REFRESH_SECS: f64 = 5.0;

/// Settings of discovery, shared by every process.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Discovery")]
pub struct DiscoveryArgs {
    /// etcd endpoints (comma-separated); unset = no etcd (stage URLs are static or dns:///).
    /// An https:// endpoint is dialed over mutual TLS with this process's --tls-* identity.
    #[arg(long, env = "GHOSTWRITER_ETCD", value_delimiter = ',', global = true)]
    pub etcd: Vec<String>,
    /// Key prefix of registrations in etcd.
    #[arg(long = "etcd-prefix", env = "GHOSTWRITER_ETCD_PREFIX", default_value = DEFAULT_PREFIX, global = true)]
    pub prefix: String,
    /// Lease time-to-live of a registration, seconds.
    #[arg(long = "etcd-ttl", env = "GHOSTWRITER_ETCD_TTL", default_value_t = DEFAULT_TTL_SECS, global = true)]
    pub ttl_secs: i64,
    /// How often a dns:///HOST:PORT stage URL is resolved again, seconds.
    #[arg(long, env = "GHOSTWRITER_DNS_REFRESH_SECS", default_value_t = DEFAULT_DNS_REFRESH_SECS, global = true)]
    pub dns_refresh_secs: f64,
    /// Nameserver (IP:PORT) for dns:/// stage URLs; unset = the system's (/etc/resolv.conf).
    #[arg(long, env = "GHOSTWRITER_DNS_SERVER", global = true)]
    pub dns_server: Option<std::net::SocketAddr>,
}

impl Default for DiscoveryArgs {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            prefix: DEFAULT_PREFIX.into(),
            ttl_secs: DEFAULT_TTL_SECS,
            dns_refresh_secs: DEFAULT_DNS_REFRESH_SECS,
            dns_server: None,
        }
    }
}

/// The URLs of a comma-separated list.
pub fn urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect()
}

impl DiscoveryArgs {
    /// The endpoint set of `stage`: watched in etcd when `--etcd` is given; otherwise resolved
    /// from DNS when `list` is one `dns:///HOST:PORT`; otherwise the fixed URLs of `list`.
    /// Channels are dialed with `dialer` (over the process's mesh identity when it has TLS).
    pub fn stage_set(
        &self,
        stage: StageKind,
        list: &str,
        dialer: impl Into<Dialer>,
    ) -> anyhow::Result<EndpointSet> {
        let stage = stage.name();
        let dialer = dialer.into();
        if !self.etcd.is_empty() {
            return Ok(EndpointSet::watch(
                stage,
                &self.etcd_target(dialer.tls.as_ref()),
                &self.prefix,
                dialer,
            ));
        }
        let urls = urls(list);
        let mut targets = urls.iter().filter_map(|u| DnsTarget::parse(u));
        match (targets.next(), urls.len()) {
            (Some(target), 1) => EndpointSet::dns(stage, target?, &self.dns()?, dialer),
            (Some(_), _) => Err(anyhow::anyhow!(
                "{stage}: a dns:/// URL must be the stage's only URL (got {list:?})"
            )),
            (None, _) => EndpointSet::fixed(stage, &urls, dialer),
        }
    }

    /// The etcd these flags name, dialed over `tls` when an endpoint is https://.
    pub fn etcd_target(&self, tls: Option<&Tls>) -> EtcdTarget {
        EtcdTarget {
            endpoints: self.etcd.clone(),
            tls: tls.cloned(),
        }
    }

    fn dns(&self) -> anyhow::Result<DnsSettings> {
        anyhow::ensure!(
            self.dns_refresh_secs.is_finite() && self.dns_refresh_secs > 0.0,
            "--dns-refresh-secs must be a positive number of seconds"
        );
        Ok(DnsSettings {
            server: self.dns_server,
            refresh: Duration::from_secs_f64(self.dns_refresh_secs),
        })
    }
}
