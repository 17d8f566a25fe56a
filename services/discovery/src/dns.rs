//! Endpoint sets from DNS, for Kubernetes without etcd: a stage URL `dns:///HOST:PORT` (gRPC's
//! naming) names a headless Service, whose DNS name has one A/AAAA record per ready pod. The set
//! resolves it every `--dns-refresh-secs`, and at once when a call could not connect: a pod
//! that becomes ready joins, one that goes away leaves, and the endpoints that stay keep their connections and balancing state. If DNS
//! fails, the set keeps its last known endpoints (and says so once in the log); a name with no
//! records empties it.

use ghostwriter_transport::client::Dialer;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::set::{EndpointInfo, EndpointSet};

/// A `dns:///HOST:PORT` stage URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    /// The name to resolve.
    pub host: String,
    /// The port every resolved address serves on.
    pub port: u16,
}

impl DnsTarget {
    /// Parses `dns:///HOST:PORT` (or `dns://AUTHORITY/HOST:PORT`, whose authority is ignored:
    /// the nameserver comes from `--dns-server` or the system); `None` for other schemes.
    pub fn parse(url: &str) -> Option<anyhow::Result<Self>> {
        let rest = url.strip_prefix("dns:")?;
        let path = match rest.strip_prefix("//") {
            Some(after) => after.split_once('/').map_or(after, |(_, p)| p),
            None => rest,
        };
        let bad = |why: &str| {
            anyhow::anyhow!("bad DNS stage URL {url:?}: {why} (expected dns:///HOST:PORT)")
        };
        Some((|| {
            let (host, port) = path.rsplit_once(':').ok_or_else(|| bad("no port"))?;
            let port = port.parse::<u16>().map_err(|_| bad("bad port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(bad("no host"));
            }
            Ok(Self {
                host: host.to_string(),
                port,
            })
        })())
    }

    fn url(&self, ip: IpAddr) -> String {
        SocketAddr::new(ip, self.port).to_string()
    }
}

/// How names are resolved.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// A nameserver to ask instead of the system's (`/etc/resolv.conf`).
    pub server: Option<SocketAddr>,
    /// How often each name is resolved again.
    pub refresh: Duration,
}

fn resolver(settings: &DnsSettings) -> anyhow::Result<TokioResolver> {
    let mut builder = match settings.server {
        Some(server) => {
            let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                .into_iter()
                .map(|mut c| {
                    c.port = server.port();
                    c
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(
                    None,
                    Vec::new(),
                    vec![NameServerConfig::new(server.ip(), true, connections)],
                ),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| anyhow::anyhow!("reading the system's DNS configuration: {e}"))?,
    };
    let options = builder.options_mut();
    // Both families, and answers no older than one refresh (pods come and go).
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.positive_max_ttl = Some(settings.refresh);
    options.negative_max_ttl = Some(settings.refresh);
    builder
        .build()
        .map_err(|e| anyhow::anyhow!("building the DNS resolver: {e}"))
}

impl EndpointSet {
    /// A set kept current by resolving `target` every `settings.refresh`, and at once when a
    /// call could not connect ([`EndpointSet::refresh`]).
    pub fn dns(
        stage: &str,
        target: DnsTarget,
        settings: &DnsSettings,
        dialer: impl Into<Dialer>,
    ) -> anyhow::Result<Self> {
        let resolver = Arc::new(resolver(settings)?);
        let set = Self::empty(stage, dialer);
        tokio::spawn(resolve_loop(
            set.clone(),
            resolver,
            target,
            settings.refresh,
        ));
        Ok(set)
    }
}

async fn resolve_loop(
    set: EndpointSet,
    resolver: Arc<TokioResolver>,
    target: DnsTarget,
    every: Duration,
) {
    let mut warned = false;
    loop {
        match resolver.lookup_ip(target.host.as_str()).await {
            Ok(ips) => {
                let mut urls: Vec<String> = ips.iter().map(|ip| target.url(ip)).collect();
                urls.sort();
                urls.dedup();
                set.replace(
                    urls.into_iter()
                        .map(|u| EndpointInfo::bare(set.stage(), format!("http://{u}")))
                        .collect(),
                );
                warned = false;
            }
            Err(e) if e.is_no_records_found() => {
                if !set.snapshot().is_empty() {
                    tracing::warn!(stage = set.stage(), host = %target.host, "no DNS records: no endpoints");
                }
                set.replace(Vec::new());
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(stage = set.stage(), host = %target.host, error = %e, kept = set.snapshot().len(), "DNS lookup failed; serving on the last known endpoints");
                    warned = true;
                }
            }
        }
        // The next look: on the timer, or sooner when a call could not connect (the endpoint
        // may be gone), but never more often than every `MIN_RESOLVE` (a stage that is down
        // fails many calls).
        let looked = tokio::time::Instant::now();
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = set.refresh_asked() => {
                tokio::time::sleep_until(looked + MIN_RESOLVE.min(every)).await;
            }
        }
    }
}

/// The shortest time between two resolutions of a name.
const MIN_RESOLVE: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dns_urls() {
        let t = |u: &str| DnsTarget::parse(u).map(|r| r.map_err(|e| e.to_string()));
        let ok = |host: &str, port| {
            Some(Ok(DnsTarget {
                host: host.into(),
                port,
            }))
        };
        assert_eq!(
            t("dns:///gw-generator-headless.ns.svc.cluster.local:50051"),
            ok("gw-generator-headless.ns.svc.cluster.local", 50051)
        );
        assert_eq!(t("dns://8.8.8.8/gen:1"), ok("gen", 1));
        assert_eq!(t("dns:gen:7"), ok("gen", 7));
        assert_eq!(t("dns:///[::1]:7"), ok("::1", 7));
        assert_eq!(t("http://gen:7"), None);
        assert!(t("dns:///gen").is_some_and(|r| r.is_err_and(|e| e.contains("no port"))));
        assert!(t("dns:///gen:x").is_some_and(|r| r.is_err()));
        assert!(t("dns:///:7").is_some_and(|r| r.is_err()));
        let target = DnsTarget {
            host: "x".into(),
            port: 9,
        };
        assert_eq!(target.url("::1".parse().unwrap()), "[::1]:9");
        assert_eq!(target.url("10.0.0.7".parse().unwrap()), "10.0.0.7:9");
    }
}
