//! Registration in etcd, and endpoint sets kept current from it.
//!
//! Each stage process registers itself under `PREFIX/STAGE/URL` with a lease that it keeps
//! alive; graceful shutdown revokes the lease, and after a crash the key vanishes when the lease
//! expires. A watched set follows everything under `PREFIX/STAGE/`; if etcd goes away, the set
//! keeps its last known endpoints (and says so in the log) until etcd answers again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::etcd::{Change, Etcd, EtcdError, EtcdTarget};
use crate::set::{EndpointInfo, EndpointSet};

fn key(prefix: &str, stage: &str, url: &str) -> String {
    format!("{}/{stage}/{url}", prefix.trim_end_matches('/'))
}

fn stage_prefix(prefix: &str, stage: &str) -> String {
    format!("{}/{stage}/", prefix.trim_end_matches('/'))
}

/// A live registration; [`Registration::deregister`] removes it.
pub struct Registration {
    task: JoinHandle<()>,
    lease: Arc<Mutex<Option<i64>>>,
    etcd: EtcdTarget,
}

impl EndpointSet {
    /// A set kept current from etcd: everything under `PREFIX/STAGE/`, dialed with `dialer`.
    pub fn watch(
        stage: &str,
        etcd: &EtcdTarget,
        prefix: &str,
        dialer: impl Into<ghostwriter_transport::client::Dialer>,
    ) -> Self {
        let set = Self::empty(stage, dialer);
        tokio::spawn(watch_loop(
            set.clone(),
            etcd.clone(),
            stage_prefix(prefix, stage),
        ));
        set
    }
}

impl Registration {
    /// Registers `info` with a lease of `ttl` seconds and keeps it alive (re-registering if
    /// etcd loses it) until deregistered or the process dies. While etcd cannot be reached the
    /// first registration is retried every `ttl / 3` (a stage that starts before etcd, or while
    /// it restarts, joins once etcd is back), so this returns only once the endpoint is
    /// registered.
    pub async fn register(
        etcd: &EtcdTarget,
        prefix: &str,
        ttl: i64,
        info: EndpointInfo,
    ) -> anyhow::Result<Self> {
        let lease = Arc::new(Mutex::new(None));
        let key = key(prefix, &info.stage, &info.url);
        let value = serde_json::to_string(&info)?;
        let (client, id) = put_until_registered(etcd, &key, &value, ttl).await;
        *lease.lock().map_err(|_| anyhow::anyhow!("lease lock"))? = Some(id);
        tracing::info!(stage = %info.stage, url = %info.url, key, "registered in etcd");
        let task = tokio::spawn(keep_alive(
            etcd.clone(),
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
            etcd: etcd.clone(),
        })
    }

    /// Stops the keep-alive and revokes the lease, so the endpoint leaves every client's set now.
    pub async fn deregister(self) {
        self.task.abort();
        let id = self.lease.lock().ok().and_then(|l| *l);
        if let (Some(id), Ok(mut client)) = (id, Etcd::connect(&self.etcd).await) {
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
    etcd: &EtcdTarget,
    key: &str,
    value: &str,
    ttl: i64,
) -> Result<(Etcd, i64), EtcdError> {
    let mut client = Etcd::connect(etcd).await?;
    let id = client.lease_grant(ttl).await?;
    client.put(key, value, id).await?;
    Ok((client, id))
}

/// How often a lease of `ttl` seconds is renewed, and a failed registration retried.
fn renew_period(ttl: i64) -> Duration {
    Duration::from_millis((ttl.max(1) as u64 * 1000) / 3)
}

/// [`put_with_lease`], retried every [`renew_period`] until etcd takes it.
async fn put_until_registered(etcd: &EtcdTarget, key: &str, value: &str, ttl: i64) -> (Etcd, i64) {
    loop {
        match put_with_lease(etcd, key, value, ttl).await {
            Ok(registered) => return registered,
            Err(e) => {
                tracing::warn!(error = %e, key, "etcd unavailable; will retry registration");
                tokio::time::sleep(renew_period(ttl)).await;
            }
        }
    }
}

async fn keep_alive(
    etcd: EtcdTarget,
    key: String,
    value: String,
    ttl: i64,
    mut client: Etcd,
    mut id: i64,
    lease: Arc<Mutex<Option<i64>>>,
) {
    let period = renew_period(ttl);
    loop {
        let alive = async {
            let mut keeper = client.keep_alive(id).await?;
            loop {
                if keeper.renew().await? <= 0 {
                    return Ok::<(), EtcdError>(()); // the lease is gone: register again
                }
                tokio::time::sleep(period).await;
            }
        };
        if let Err(e) = alive.await {
            tracing::warn!(error = %e, key, "etcd keep-alive failed; registering again");
        }
        tokio::time::sleep(period).await;
        (client, id) = put_until_registered(&etcd, &key, &value, ttl).await;
        if let Ok(mut l) = lease.lock() {
            *l = Some(id);
        }
        tracing::info!(key, "registered in etcd again");
    }
}

async fn watch_loop(set: EndpointSet, etcd: EtcdTarget, prefix: String) {
    let mut warned = false;
    loop {
        let result: Result<std::convert::Infallible, EtcdError> = async {
            let mut client = Etcd::connect(&etcd).await?;
            let (revision, kvs) = client.get_prefix(&prefix, false).await?;
            warned = false;
            let mut current: BTreeMap<String, EndpointInfo> = kvs
                .into_iter()
                .filter_map(|kv| Some((kv.key, serde_json::from_str(&kv.value).ok()?)))
                .collect();
            set.replace(current.values().cloned().collect());
            let mut watch = client.watch_prefix(&prefix, revision + 1).await?;
            tracing::info!(prefix, "watching etcd");
            loop {
                for change in watch.next().await? {
                    match change {
                        Change::Put(kv) => {
                            if let Ok(info) = serde_json::from_str(&kv.value) {
                                current.insert(kv.key, info);
                            }
                        }
                        Change::Delete(key) => {
                            current.remove(&key);
                        }
                    }
                }
                set.replace(current.values().cloned().collect());
            }
        }
        .await;
        let Err(e) = result;
        if !warned {
            tracing::warn!(error = %e, prefix, kept = set.snapshot().len(), "etcd unavailable; serving on the last known endpoints");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
