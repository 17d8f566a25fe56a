//! Service discovery and client-side balancing.
//!
//! Each stage process registers itself in etcd under `PREFIX/STAGE/URL` with a lease that it
//! keeps alive; graceful shutdown revokes the lease, and after a crash the key vanishes when the
//! lease expires. Clients keep, per stage, a live [`EndpointSet`]: from a static list (the
//! embedded default, no etcd) or from an etcd watch. If etcd goes away, the set keeps its last
//! known endpoints (and says so in the log) until etcd answers again.
//!
//! Balancing is power of two choices on in-flight requests; an endpoint that fails three times in
//! a row is ejected for a few seconds, then probed again by real traffic (a circuit breaker).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Key prefix of registrations.
pub const DEFAULT_PREFIX: &str = "/ghostwriter/v1";
/// Lease time-to-live, seconds: a crashed process leaves its set within this.
pub const DEFAULT_TTL_SECS: i64 = 10;
/// Consecutive failures that eject an endpoint.
const EJECT_AFTER: u32 = 3;
/// How long an ejected endpoint rests before traffic probes it again.
const EJECT_FOR: Duration = Duration::from_secs(5);

/// What a process registers about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// gRPC URL clients use, e.g. `http://10.0.0.7:50051`.
    pub url: String,
    /// Stage name.
    pub stage: String,
    /// Software version.
    pub version: String,
    /// Requests it runs at once (its concurrency limit; 0 = unlimited).
    pub capacity: u32,
    /// Retriever shard it serves, if sharded.
    #[serde(default)]
    pub shard: Option<u32>,
}

/// Settings of etcd discovery, shared by every process.
#[derive(Debug, Clone, clap::Args)]
pub struct DiscoveryArgs {
    /// etcd endpoints (comma-separated); unset = no discovery (static endpoints).
    #[arg(long = "etcd", env = "GHOSTWRITER_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix of registrations in etcd.
    #[arg(long = "etcd-prefix", env = "GHOSTWRITER_ETCD_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Lease time-to-live of a registration, seconds.
    #[arg(long = "etcd-ttl", env = "GHOSTWRITER_ETCD_TTL", default_value_t = DEFAULT_TTL_SECS)]
    pub ttl_secs: i64,
}

impl Default for DiscoveryArgs {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            prefix: DEFAULT_PREFIX.into(),
            ttl_secs: DEFAULT_TTL_SECS,
        }
    }
}

fn key(prefix: &str, stage: &str, url: &str) -> String {
    format!("{}/{stage}/{url}", prefix.trim_end_matches('/'))
}

fn stage_prefix(prefix: &str, stage: &str) -> String {
    format!("{}/{stage}/", prefix.trim_end_matches('/'))
}

async fn connect(etcd: &[String]) -> Result<Client, etcd_client::Error> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    Client::connect(etcd, Some(options)).await
}

/// A live registration; [`Registration::deregister`] removes it.
pub struct Registration {
    task: JoinHandle<()>,
    lease: Arc<Mutex<Option<i64>>>,
    etcd: Vec<String>,
}

impl Registration {
    /// Registers `info` with a lease of `ttl` seconds and keeps it alive (re-registering if
    /// etcd loses it) until deregistered or the process dies.
    pub async fn register(
        etcd: &[String],
        prefix: &str,
        ttl: i64,
        info: EndpointInfo,
    ) -> anyhow::Result<Self> {
        let lease = Arc::new(Mutex::new(None));
        let key = key(prefix, &info.stage, &info.url);
        let value = serde_json::to_string(&info)?;
        // The first registration must succeed; later failures are retried in the background.
        let (client, id) = put_with_lease(etcd, &key, &value, ttl).await?;
        *lease.lock().map_err(|_| anyhow::anyhow!("lease lock"))? = Some(id);
        tracing::info!(stage = %info.stage, url = %info.url, key, "registered in etcd");
        let task = tokio::spawn(keep_alive(
            etcd.to_vec(),
            key,
            value,
            ttl,
            client,
            id,
            lease.clone(),
        ));
        Ok(Self {
            task,
            lease,
            etcd: etcd.to_vec(),
        })
    }

    /// Stops the keep-alive and revokes the lease, so the endpoint leaves every client's set now.
    pub async fn deregister(self) {
        self.task.abort();
        let id = self.lease.lock().ok().and_then(|l| *l);
        if let (Some(id), Ok(mut client)) = (id, connect(&self.etcd).await) {
            match client.lease_revoke(id).await {
                Ok(_) => tracing::info!("deregistered from etcd"),
                Err(e) => {
                    tracing::warn!(error = %e, "revoking the etcd lease failed; it expires by itself")
                }
            }
        }
    }
}

async fn put_with_lease(
    etcd: &[String],
    key: &str,
    value: &str,
    ttl: i64,
) -> Result<(Client, i64), etcd_client::Error> {
    let mut client = connect(etcd).await?;
    let id = client.lease_grant(ttl, None).await?.id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(id)))
        .await?;
    Ok((client, id))
}

async fn keep_alive(
    etcd: Vec<String>,
    key: String,
    value: String,
    ttl: i64,
    mut client: Client,
    mut id: i64,
    lease: Arc<Mutex<Option<i64>>>,
) {
    let period = Duration::from_millis((ttl.max(1) as u64 * 1000) / 3);
    loop {
        let alive = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(id).await?;
            loop {
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Ok::<(), etcd_client::Error>(()), // the lease is gone: register again
                }
                tokio::time::sleep(period).await;
            }
        };
        if let Err(e) = alive.await {
            tracing::warn!(error = %e, key, "etcd keep-alive failed; registering again");
        }
        loop {
            tokio::time::sleep(period).await;
            match put_with_lease(&etcd, &key, &value, ttl).await {
                Ok((c, new_id)) => {
                    client = c;
                    id = new_id;
                    if let Ok(mut l) = lease.lock() {
                        *l = Some(id);
                    }
                    tracing::info!(key, "registered in etcd again");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, key, "etcd unavailable; will retry registration")
                }
            }
        }
    }
}

/// One endpoint of a stage, with its balancing state.
pub struct Endpoint {
    /// What it registered.
    pub info: EndpointInfo,
    /// A lazily connected channel.
    pub channel: Channel,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl Endpoint {
    fn new(info: EndpointInfo) -> Result<Self, tonic::Status> {
        Ok(Self {
            channel: crate::client::channel(&info.url)?,
            info,
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
        })
    }

    /// Requests in flight to it from this process.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn ejected(&self) -> bool {
        self.ejected_until
            .lock()
            .ok()
            .and_then(|e| *e)
            .is_some_and(|t| Instant::now() < t)
    }

    /// Counts a call; the guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records a success (closes the breaker).
    pub fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// Records a transport failure; enough in a row eject the endpoint for a while.
    pub fn failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER {
            if let Ok(mut e) = self.ejected_until.lock() {
                *e = Some(Instant::now() + EJECT_FOR);
            }
            tracing::warn!(url = %self.info.url, failures = n, "endpoint ejected");
        }
    }
}

/// Marks a call in flight until dropped.
pub struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The live endpoints of one stage.
#[derive(Clone)]
pub struct EndpointSet {
    stage: String,
    endpoints: Arc<RwLock<Vec<Arc<Endpoint>>>>,
    rng: Arc<AtomicUsize>,
}

impl EndpointSet {
    fn empty(stage: &str) -> Self {
        Self {
            stage: stage.into(),
            endpoints: Arc::default(),
            rng: Arc::new(AtomicUsize::new(0x9e37_79b9)),
        }
    }

    /// A fixed set of URLs (no discovery).
    pub fn fixed(stage: &str, urls: &[String]) -> Result<Self, tonic::Status> {
        let set = Self::empty(stage);
        let endpoints = urls
            .iter()
            .map(|u| {
                let info = EndpointInfo {
                    url: u.clone(),
                    stage: stage.into(),
                    version: String::new(),
                    capacity: 0,
                    shard: None,
                };
                Endpoint::new(info).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        *set.endpoints
            .write()
            .map_err(|_| tonic::Status::internal("endpoint set poisoned"))? = endpoints;
        Ok(set)
    }

    /// A fixed set of retriever URLs where the i-th serves shard i.
    pub fn fixed_sharded(stage: &str, urls: &[String]) -> Result<Self, tonic::Status> {
        let set = Self::fixed(stage, urls)?;
        let sharded = set
            .snapshot()
            .iter()
            .enumerate()
            .map(|(i, e)| {
                Endpoint::new(EndpointInfo {
                    shard: Some(i as u32),
                    ..e.info.clone()
                })
                .map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        *set.endpoints
            .write()
            .map_err(|_| tonic::Status::internal("endpoint set poisoned"))? = sharded;
        Ok(set)
    }

    /// A set kept current from etcd: everything under `PREFIX/STAGE/`.
    pub fn watch(stage: &str, etcd: &[String], prefix: &str) -> Self {
        let set = Self::empty(stage);
        tokio::spawn(watch_loop(
            set.clone(),
            etcd.to_vec(),
            stage_prefix(prefix, stage),
        ));
        set
    }

    /// The stage's name.
    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// Every endpoint now.
    pub fn snapshot(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.read().map(|e| e.clone()).unwrap_or_default()
    }

    fn replace(&self, infos: Vec<EndpointInfo>) {
        let Ok(mut current) = self.endpoints.write() else {
            return;
        };
        // Keep the state (channel, in-flight, breaker) of endpoints that stay.
        let next: Vec<Arc<Endpoint>> = infos
            .into_iter()
            .filter_map(|info| match current.iter().find(|e| e.info == info) {
                Some(e) => Some(e.clone()),
                None => Endpoint::new(info).ok().map(Arc::new),
            })
            .collect();
        tracing::info!(stage = %self.stage, endpoints = ?next.iter().map(|e| e.info.url.as_str()).collect::<Vec<_>>(), "endpoint set changed");
        *current = next;
    }

    fn next_random(&self) -> usize {
        // xorshift over a shared counter: cheap, good enough to spread picks.
        let mut x = self.rng.fetch_add(0x9e37_79b9, Ordering::Relaxed) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }

    /// Power of two choices among the endpoints that pass `filter`, are not ejected and are not
    /// in `exclude`; ejected ones are used only when nothing else is left.
    pub fn pick_where(
        &self,
        exclude: &[String],
        filter: impl Fn(&EndpointInfo) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let all = self.snapshot();
        let eligible: Vec<&Arc<Endpoint>> = all
            .iter()
            .filter(|e| filter(&e.info) && !exclude.contains(&e.info.url))
            .collect();
        let healthy: Vec<&Arc<Endpoint>> =
            eligible.iter().copied().filter(|e| !e.ejected()).collect();
        let pool = if healthy.is_empty() {
            eligible
        } else {
            healthy
        };
        match pool.len() {
            0 => None,
            1 => Some(pool[0].clone()),
            n => {
                let a = pool[self.next_random() % n];
                let b = pool[self.next_random() % n];
                Some(if b.in_flight() < a.in_flight() {
                    b.clone()
                } else {
                    a.clone()
                })
            }
        }
    }

    /// [`Self::pick_where`] over every endpoint.
    pub fn pick(&self, exclude: &[String]) -> Option<Arc<Endpoint>> {
        self.pick_where(exclude, |_| true)
    }
}

async fn watch_loop(set: EndpointSet, etcd: Vec<String>, prefix: String) {
    let mut warned = false;
    loop {
        let result = async {
            let mut client = connect(&etcd).await?;
            let got = client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await?;
            let revision = got.header().map_or(0, |h| h.revision());
            let mut current: std::collections::BTreeMap<String, EndpointInfo> = got
                .kvs()
                .iter()
                .filter_map(|kv| {
                    Some((
                        kv.key_str().ok()?.to_string(),
                        serde_json::from_str(kv.value_str().ok()?).ok()?,
                    ))
                })
                .collect();
            set.replace(current.values().cloned().collect());
            let mut stream = client
                .watch(
                    prefix.as_str(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                )
                .await?;
            tracing::info!(prefix, "watching etcd");
            while let Some(response) = stream.message().await? {
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    match event.event_type() {
                        EventType::Put => {
                            if let Some(info) = kv
                                .value_str()
                                .ok()
                                .and_then(|v| serde_json::from_str(v).ok())
                            {
                                current.insert(key.to_string(), info);
                            }
                        }
                        EventType::Delete => {
                            current.remove(key);
                        }
                    }
                }
                set.replace(current.values().cloned().collect());
            }
            Ok::<(), etcd_client::Error>(())
        }
        .await;
        if let Err(e) = result {
            if !warned {
                tracing::warn!(error = %e, prefix, kept = set.snapshot().len(), "etcd unavailable; serving on the last known endpoints");
                warned = true;
            }
        } else {
            warned = false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Rendezvous (highest random weight) hashing: the shard of `shards` that owns `key`.
pub fn shard_of(key: &str, shards: u32) -> u32 {
    (0..shards.max(1))
        .max_by_key(|s| {
            // FNV-1a of key and shard: stable across processes and versions.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in key.as_bytes().iter().chain(&s.to_le_bytes()) {
                h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
            }
            // splitmix64's finalizer, so shards differing in one byte get independent weights.
            h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            h ^ (h >> 31)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_moves_few_users() {
        let users: Vec<String> = (0..3000).map(|i| format!("user{i}")).collect();
        let three: Vec<u32> = users.iter().map(|u| shard_of(u, 3)).collect();
        assert_eq!(
            three,
            users.iter().map(|u| shard_of(u, 3)).collect::<Vec<_>>()
        );
        for s in 0..3 {
            let n = three.iter().filter(|x| **x == s).count();
            assert!((800..1200).contains(&n), "shard {s}: {n}");
        }
        // Adding a shard moves only the users the new shard wins (about a quarter).
        let moved = users
            .iter()
            .zip(&three)
            .filter(|(u, s)| shard_of(u, 4) != **s)
            .count();
        assert!(
            users
                .iter()
                .zip(&three)
                .all(|(u, s)| shard_of(u, 4) == *s || shard_of(u, 4) == 3)
        );
        assert!((550..950).contains(&moved), "{moved}");
    }

    #[tokio::test]
    async fn power_of_two_choices_prefers_the_idle_endpoint() {
        let set = EndpointSet::fixed(
            "x",
            &["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
        )
        .unwrap();
        let busy = set.snapshot()[0].clone();
        let _guards: Vec<_> = (0..5).map(|_| busy.start()).collect();
        let picks = (0..200)
            .filter(|_| set.pick(&[]).unwrap().info.url.ends_with(":2"))
            .count();
        assert!(picks > 140, "{picks}");
        // Excluded and ejected endpoints are avoided.
        assert!(
            set.pick(&["http://127.0.0.1:2".into()])
                .unwrap()
                .info
                .url
                .ends_with(":1")
        );
        let idle = set.snapshot()[1].clone();
        for _ in 0..EJECT_AFTER {
            idle.failed();
        }
        assert!((0..50).all(|_| set.pick(&[]).unwrap().info.url.ends_with(":1")));
    }
}
