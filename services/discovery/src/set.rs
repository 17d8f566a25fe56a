//! The live endpoints of a stage and how a call picks one: power of two choices on in-flight
//! requests; an endpoint that fails three times in a row is ejected for a few seconds, then
//! probed again by real traffic (a circuit breaker); UNAVAILABLE answers of idempotent calls are
//! retried on another endpoint within a retry budget.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ghostwriter_common::throttle::Throttle;
use ghostwriter_transport::client::{self, Dialer};
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::transport::Channel;

/// Consecutive failures that eject an endpoint.
const EJECT_AFTER: u32 = 3;
/// How long an ejected endpoint rests before traffic probes it again.
const EJECT_FOR: Duration = Duration::from_secs(5);
/// Attempts of an idempotent call (the first and up to two retries on other endpoints).
const ATTEMPTS: usize = 3;

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

impl EndpointInfo {
    /// What is known of an endpoint nobody registered (a static or resolved URL).
    pub fn bare(stage: &str, url: String) -> Self {
        Self {
            url,
            stage: stage.into(),
            version: String::new(),
            capacity: 0,
            shard: None,
        }
    }
}

impl Endpoint {
    fn new(info: EndpointInfo, dialer: &Dialer) -> Result<Self, client::BadUrl> {
        Ok(Self {
            channel: dialer.channel(&info.url)?,
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
            // Said once per ejection, not once per failure while it lasts.
            let was = self.ejected();
            if let Ok(mut e) = self.ejected_until.lock() {
                *e = Some(Instant::now() + EJECT_FOR);
            }
            if !was {
                tracing::warn!(url = %self.info.url, failures = n, "endpoint ejected");
            }
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
    /// How new endpoints' channels are dialed.
    dialer: Dialer,
    endpoints: Arc<RwLock<Vec<Arc<Endpoint>>>>,
    rng: Arc<AtomicUsize>,
    /// Asks the set's source to look again now (DNS: resolve the name at once).
    refresh: Arc<tokio::sync::Notify>,
}

impl EndpointSet {
    pub(crate) fn empty(stage: &str, dialer: impl Into<Dialer>) -> Self {
        Self {
            stage: stage.into(),
            dialer: dialer.into(),
            endpoints: Arc::default(),
            rng: Arc::new(AtomicUsize::new(0x9e37_79b9)),
            refresh: Arc::default(),
        }
    }

    /// A fixed set of URLs (no discovery), dialed with `dialer` (its TLS when given).
    pub fn fixed(stage: &str, urls: &[String], dialer: impl Into<Dialer>) -> anyhow::Result<Self> {
        let set = Self::empty(stage, dialer);
        let endpoints = urls
            .iter()
            .map(|u| Endpoint::new(EndpointInfo::bare(stage, u.clone()), &set.dialer).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        *set.endpoints
            .write()
            .map_err(|_| anyhow::anyhow!("endpoint set poisoned"))? = endpoints;
        Ok(set)
    }

    /// A fixed set of retriever URLs where the i-th entry serves shard i; an entry may name
    /// several replicas of its shard separated by `|` (`a0|a1,b0|b1`: shard 0 on a0 and a1).
    pub fn fixed_sharded(
        stage: &str,
        urls: &[String],
        dialer: impl Into<Dialer>,
    ) -> anyhow::Result<Self> {
        let set = Self::empty(stage, dialer);
        let mut sharded = Vec::new();
        for (i, entry) in urls.iter().enumerate() {
            for url in entry.split('|').map(str::trim).filter(|u| !u.is_empty()) {
                sharded.push(Arc::new(Endpoint::new(
                    EndpointInfo {
                        shard: Some(i as u32),
                        ..EndpointInfo::bare(stage, url.to_string())
                    },
                    &set.dialer,
                )?));
            }
        }
        *set.endpoints
            .write()
            .map_err(|_| anyhow::anyhow!("endpoint set poisoned"))? = sharded;
        Ok(set)
    }

    /// The stage's name.
    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// Asks the set's source to look again now, not only on its timer (a call could not
    /// connect: the endpoint may be gone, a new one may be there). DNS sets resolve at once
    /// (at most a few times a second); fixed and etcd-watched sets need nothing.
    pub fn refresh(&self) {
        self.refresh.notify_one();
    }

    /// Waits until [`Self::refresh`] is asked for.
    pub(crate) async fn refresh_asked(&self) {
        self.refresh.notified().await;
    }

    /// Every endpoint now.
    pub fn snapshot(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.read().map(|e| e.clone()).unwrap_or_default()
    }

    pub(crate) fn replace(&self, infos: Vec<EndpointInfo>) {
        let Ok(mut current) = self.endpoints.write() else { return };
        if current.len() == infos.len() && current.iter().zip(&infos).all(|(e, i)| e.info == *i) {
            return;
        }
        // Keep the state (channel, in-flight, breaker) of endpoints that stay.
        let next: Vec<Arc<Endpoint>> = infos
            .into_iter()
            .filter_map(|info| match current.iter().find(|e| e.info == info) {
                Some(e) => Some(e.clone()),
                None => Endpoint::new(info, &self.dialer).ok().map(Arc::new),
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

    /// The endpoints that pass `filter`, are not in `exclude` and are not ejected (the ejected
    /// ones when nothing else is left).
    fn candidates(
        &self,
        exclude: &[String],
        filter: impl Fn(&EndpointInfo) -> bool,
    ) -> Vec<Arc<Endpoint>> {
        let eligible: Vec<Arc<Endpoint>> = self
            .snapshot()
            .into_iter()
            .filter(|e| filter(&e.info) && !exclude.contains(&e.info.url))
            .collect();
        if eligible.iter().all(|e| e.ejected()) {
            return eligible;
        }
        eligible.into_iter().filter(|e| !e.ejected()).collect()
    }

    /// Power of two choices among the endpoints that pass `filter`, are not ejected and are not
    /// in `exclude`; ejected ones are used only when nothing else is left.
    pub fn pick_where(
        &self,
        exclude: &[String],
        filter: impl Fn(&EndpointInfo) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let pool = self.candidates(exclude, filter);
        match pool.len() {
            0 => None,
            1 => Some(pool[0].clone()),
            n => {
                let a = &pool[self.next_random() % n];
                let b = &pool[self.next_random() % n];
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

    /// The endpoint that owns `key` by rendezvous hashing among those [`Self::pick`] chooses
    /// from, so that what `key` names (a generator's adapter) stays on one replica instead of
    /// loading on every one; unless that endpoint carries [`AFFINITY_SPILL`] more calls than
    /// the least loaded one, or is excluded or ejected: then the next in rendezvous order
    /// that is not overloaded, else [`Self::pick`]'s choice.
    pub fn pick_affine(&self, key: &str, exclude: &[String]) -> Option<Arc<Endpoint>> {
        let mut pool = self.candidates(exclude, |_| true);
        let least = pool.iter().map(|e| e.in_flight()).min()?;
        pool.sort_by_key(|e| std::cmp::Reverse(weight(key, e.info.url.as_bytes())));
        pool.into_iter()
            .find(|e| e.in_flight() < least + AFFINITY_SPILL)
            .or_else(|| self.pick(exclude))
    }
}

/// Calls an endpoint may carry beyond the least loaded one before [`EndpointSet::pick_affine`]
/// passes it over.
pub const AFFINITY_SPILL: usize = 8;

/// Calls stages through their [`EndpointSet`]s, with retries bounded by a budget (Finagle's
/// retry budget): each call earns a fifth of a retry, and a floor of [`RETRY_FLOOR_PER_SEC`]
/// retries a second accrues with time, up to [`RETRY_RESERVE`] in reserve. A generator killed
/// under a few writes has all of them retried; a stage that is down costs at most a fifth more
/// calls plus the floor (no retry storms).
pub struct Balancer {
    budget: Mutex<Budget>,
    /// Failed calls' warnings, one per endpoint and interval.
    warnings: Throttle,
}

/// Retries earned per call made.
pub const RETRY_PER_CALL: f64 = 0.2;
/// Retries earned per second, whatever the traffic.
pub const RETRY_FLOOR_PER_SEC: f64 = 10.0;
/// Retries held at most.
pub const RETRY_RESERVE: f64 = 10.0;

struct Budget {
    tokens: f64,
    /// When the floor was last added.
    accrued: Instant,
}

impl Default for Balancer {
    fn default() -> Self {
        Self {
            budget: Mutex::new(Budget {
                tokens: RETRY_RESERVE,
                accrued: Instant::now(),
            }),
            warnings: Throttle::default(),
        }
    }
}

impl Balancer {
    /// Earns [`RETRY_PER_CALL`] (one call made).
    pub fn deposit(&self) {
        if let Ok(mut b) = self.budget.lock() {
            b.tokens = (b.tokens + RETRY_PER_CALL).min(RETRY_RESERVE);
        }
    }

    /// Records a transport failure of `endpoint` (a call never reached it or lost it): the
    /// breaker counts it, the set looks for its endpoints again, and a warning is logged, at
    /// most one per endpoint every few seconds with the count of those held back.
    pub fn failed(&self, set: &EndpointSet, endpoint: &Endpoint, status: &Status) {
        endpoint.failed();
        set.refresh();
        let url = &endpoint.info.url;
        if let Some(held) = self.warnings.allow(url) {
            tracing::warn!(stage = set.stage(), %url, error = %status.message(), repeated = held, "stage unavailable");
        }
    }

    /// Whether the retry budget allows one more attempt (and spends it).
    pub fn withdraw(&self) -> bool {
        let Ok(mut b) = self.budget.lock() else {
            return false;
        };
        let now = Instant::now();
        let floor = now.duration_since(b.accrued).as_secs_f64() * RETRY_FLOOR_PER_SEC;
        b.tokens = (b.tokens + floor).min(RETRY_RESERVE);
        b.accrued = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Calls `f` on the endpoint of `set` that `pick` chooses (given those tried already); an
    /// UNAVAILABLE answer of an `idempotent` call (or one that never reached the stage) is
    /// retried on another endpoint while the retry budget allows. Errors name the stage
    /// (`what`); a downstream stage's failure reported by the endpoint is not held against the
    /// endpoint.
    pub async fn call<T, F, Fut>(
        &self,
        set: &EndpointSet,
        what: &str,
        pick: impl Fn(&[String]) -> Option<Arc<Endpoint>>,
        idempotent: bool,
        f: F,
    ) -> Result<T, Status>
    where
        F: Fn(Arc<Endpoint>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.deposit();
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<Status> = None;
        for attempt in 0..ATTEMPTS {
            let Some(endpoint) = pick(&tried) else {
                break;
            };
            if attempt > 0 && !self.withdraw() {
                break;
            }
            let _in_flight = endpoint.start();
            match f(endpoint.clone()).await {
                Ok(v) => {
                    endpoint.succeeded();
                    return Ok(v);
                }
                Err(status) if client::is_transport_failure(&status) => {
                    self.failed(set, &endpoint, &status);
                    tried.push(endpoint.info.url.clone());
                    last = Some(status);
                    if !idempotent {
                        break;
                    }
                }
                Err(status) => return Err(client::stage_status(what, status)),
            }
        }
        Err(match last {
            Some(s) => client::stage_status(what, s),
            None => Status::unavailable(format!("{what} stage: no endpoint available")),
        })
    }
}

/// Rendezvous (highest random weight) hashing: the shard of `shards` that owns `key`.
pub fn shard_of(key: &str, shards: u32) -> u32 {
    (0..shards.max(1))
        .max_by_key(|s| weight(key, &s.to_le_bytes()))
        .unwrap_or(0)
}

/// The rendezvous weight of `key` on `node`: FNV-1a of both (stable across processes and
/// versions) through splitmix64's finalizer, so nodes differing in one byte get independent
/// weights.
fn weight(key: &str, node: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes().iter().chain(node) {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_budget_is_a_share_of_calls_plus_a_floor() {
        let b = Balancer::default();
        // The reserve, then nothing until calls or time earn more.
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        for _ in 0..10 {
            b.deposit();
        }
        // Ten calls earned two retries (and a few milliseconds of floor, less than one).
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 2);
        std::thread::sleep(Duration::from_millis(250));
        // A quarter of a second of floor: two retries, whatever the traffic.
        let floor = (0..20).filter(|_| b.withdraw()).count();
        assert!((2..=5).contains(&floor), "{floor}");
    }

    #[tokio::test]
    async fn a_sharded_list_may_name_several_replicas_per_shard() {
        let list = ["http://a0:1|http://a1:1".into(), "http://b0:1".into()];
        let set = EndpointSet::fixed_sharded("retriever", &list, None).unwrap();
        let shards: Vec<(String, Option<u32>)> = set
            .snapshot()
            .iter()
            .map(|e| (e.info.url.clone(), e.info.shard))
            .collect();
        assert_eq!(
            shards,
            [
                ("http://a0:1".to_string(), Some(0)),
                ("http://a1:1".to_string(), Some(0)),
                ("http://b0:1".to_string(), Some(1)),
            ]
        );
    }

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
        let list = ["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()];
        let set = EndpointSet::fixed("x", &list, None).unwrap();
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
