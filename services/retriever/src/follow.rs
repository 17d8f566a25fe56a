//! A replica following the store: it applies the store's change log, in the store's order, to
//! its own index (keeping its shard's users), and records in each index commit the position it
//! has applied and the store it follows. A restart resumes from there; an index without that
//! record (a wiped volume), built against another database (a restore, a different store),
//! for another shard layout, or older than the log's retention is rebuilt from a consistent
//! snapshot plus the log after it.
//!
//! It wakes on the store's `NOTIFY`, and polls as the fallback (a lost notification, a
//! reconnecting listener). It is ready once it has applied the store's head as of its start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_store::{Change, Feed, Identity, Position, Store, Token};
use tokio::sync::{Notify, watch};

use crate::Error;
use crate::index::{DocumentIndex, IndexChange, StoredDocument};

/// Changes read per page (and snapshot documents per fetch).
const PAGE: usize = 5_000;

/// An index commit recording only a moved position waits this long (a restart replays the
/// changes since the last record, which is harmless).
const RECORD_EVERY: Duration = Duration::from_secs(10);

/// Which users a replica keeps: those whose shard (rendezvous hashing, as the orchestrator
/// routes them) is this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This replica's shard.
    pub shard: u32,
    /// How many there are.
    pub shards: u32,
}

impl Shard {
    /// Every user (one shard).
    pub const ALL: Shard = Shard {
        shard: 0,
        shards: 1,
    };

    /// Whether the replica keeps `user`'s documents.
    pub fn keeps(&self, user: &str) -> bool {
        self.shards <= 1 || ghostwriter_discovery::shard_of(user, self.shards) == self.shard
    }

    fn encode(&self) -> String {
        format!("{}/{}", self.shard, self.shards.max(1))
    }
}

/// What an index commit records beside the documents.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Checkpoint {
    identity: String,
    shard: String,
    position: Position,
}

const HEADER: &str = "ghostwriter-store 1";
const REBUILDING: &str = "ghostwriter-store 1\nrebuilding";

impl Checkpoint {
    fn encode(&self) -> String {
        format!(
            "{HEADER}\nidentity {}\nshard {}\nposition {}",
            self.identity,
            self.shard,
            self.position.encode()
        )
    }

    fn decode(payload: &str) -> Option<Self> {
        let mut lines = payload.lines();
        (lines.next()? == HEADER).then_some(())?;
        let identity = lines.next()?.strip_prefix("identity ")?.to_string();
        let shard = lines.next()?.strip_prefix("shard ")?.to_string();
        let position = Position::decode(lines.next()?.strip_prefix("position ")?)?;
        Some(Self {
            identity,
            shard,
            position,
        })
    }
}

/// The metrics of a replica's standing (`ghostwriter_retriever_store_lag_seconds`,
/// `ghostwriter_retriever_store_applied_xid`).
#[derive(Clone)]
pub struct StoreGauges {
    /// How far behind the store's head the index is, in seconds.
    pub lag: prometheus::Gauge,
    /// The watermark applied.
    pub applied: prometheus::IntGauge,
}

impl StoreGauges {
    /// The gauges, unregistered (tools that scrape nothing).
    pub fn unregistered() -> Self {
        Self {
            lag: prometheus::Gauge::new(
                "ghostwriter_retriever_store_lag_seconds",
                "How far the retriever's index is behind the store's head",
            )
            .expect("metric definitions are valid"),
            applied: prometheus::IntGauge::new(
                "ghostwriter_retriever_store_applied_xid",
                "Store watermark the retriever's index has applied (every transaction below it)",
            )
            .expect("metric definitions are valid"),
        }
    }

    /// The gauges, registered with a server's `metrics`.
    pub fn register(metrics: &ghostwriter_transport::Metrics) -> Self {
        let g = Self::unregistered();
        Self {
            lag: metrics.register(g.lag),
            applied: metrics.register(g.applied),
        }
    }
}

/// Where a replica stands.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The position applied (and searchable).
    pub position: Position,
    /// How far behind the store's head the index was at the last read.
    pub lag: Duration,
    /// Whether it has applied the store's head as of its start (and may serve).
    pub ready: bool,
    /// Whether it is rebuilding from a snapshot now.
    pub rebuilding: bool,
    /// The last error reaching the store, while it lasts.
    pub store_error: Option<String>,
    /// Rebuilds since the start.
    pub rebuilds: u64,
    /// When it last rebuilt, how long that took.
    pub last_rebuild: Option<Duration>,
}

/// A running follower; stops when dropped or at shutdown.
pub struct Follower {
    progress: watch::Receiver<Progress>,
    wake: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    identity: Identity,
}

impl Drop for Follower {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Follower {
    /// Starts following `store` into `index`, keeping `shard`'s users, polling every `poll` at
    /// the latest.
    pub fn start(
        index: Arc<DocumentIndex>,
        store: Arc<Store>,
        shard: Shard,
        poll: Duration,
        shutdown: Shutdown,
        gauges: StoreGauges,
    ) -> Self {
        let (tx, progress) = watch::channel(Progress::default());
        let wake = Arc::new(Notify::new());
        let identity = store.identity().clone();
        let listener = tokio::spawn(listen(store.clone(), wake.clone(), poll));
        let mut run = Run {
            index,
            store,
            shard,
            tx,
            position: None,
            start_head: None,
            last_caught_up: Instant::now(),
            last_record: Instant::now(),
            recorded: None,
            gauges,
        };
        let wake2 = wake.clone();
        let follower = tokio::spawn(async move {
            let stop = shutdown.wait();
            tokio::pin!(stop);
            loop {
                let idle = match run.once().await {
                    Ok(idle) => {
                        run.tx.send_modify(|p| p.store_error = None);
                        idle
                    }
                    Err(e) => {
                        tracing::warn!(stage = "retriever", error = %e, "following the store");
                        run.tx.send_modify(|p| {
                            p.store_error = Some(e.to_string());
                            p.rebuilding = false;
                        });
                        true
                    }
                };
                if idle {
                    tokio::select! {
                        () = &mut stop => return,
                        () = wake2.notified() => {}
                        () = tokio::time::sleep(poll) => {}
                    }
                } else {
                    tokio::select! {
                        biased;
                        () = &mut stop => return,
                        () = std::future::ready(()) => {}
                    }
                }
            }
        });
        Self {
            progress,
            wake,
            tasks: vec![listener, follower],
            identity,
        }
    }

    /// Where it stands, as it changes.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// The store it follows.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Waits until the write of `token` is applied, at most `within`; whether it is.
    pub async fn wait_for(&self, token: Token, within: Duration) -> bool {
        let mut rx = self.progress.clone();
        if rx.borrow().position.has(token) {
            return true;
        }
        self.wake.notify_one();
        matches!(
            tokio::time::timeout(within, rx.wait_for(|p| p.position.has(token))).await,
            Ok(Ok(_))
        )
    }

    /// Reads the log now (after a write through this replica), instead of at the notification.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits until it is ready (has applied the store's head as of its start).
    pub async fn ready(&self) {
        let mut rx = self.progress.clone();
        let _ = rx.wait_for(|p| p.ready).await;
    }
}

/// Turns notifications into wake-ups; reconnects after a lost connection (waking once, since a
/// commit may have gone unnoticed meanwhile).
async fn listen(store: Arc<Store>, wake: Arc<Notify>, poll: Duration) {
    loop {
        if let Ok(mut w) = store.listen().await {
            wake.notify_one();
            while w.next().await {
                wake.notify_one();
            }
        }
        tokio::time::sleep(poll).await;
    }
}

struct Run {
    index: Arc<DocumentIndex>,
    store: Arc<Store>,
    shard: Shard,
    tx: watch::Sender<Progress>,
    position: Option<Position>,
    start_head: Option<u64>,
    last_caught_up: Instant,
    last_record: Instant,
    recorded: Option<Position>,
    gauges: StoreGauges,
}

impl Run {
    fn checkpoint(&self, position: Position) -> String {
        Checkpoint {
            identity: self.store.identity().encode(),
            shard: self.shard.encode(),
            position,
        }
        .encode()
    }

    /// One page; `Ok(true)` when caught up (nothing more to read now).
    async fn once(&mut self) -> Result<bool, Error> {
        if self.start_head.is_none() {
            self.start_head = Some(self.store.head().await?);
        }
        let position = match self.position {
            Some(p) => p,
            None => self.resume_or_rebuild().await?,
        };
        let read_started = Instant::now();
        let page = match self.store.read(&position, PAGE).await? {
            Feed::Pruned { pruned_below } => {
                tracing::info!(
                    stage = "retriever",
                    pruned_below,
                    watermark = position.watermark,
                    "behind the change log's retention: rebuilding"
                );
                self.rebuild().await?;
                return Ok(false);
            }
            Feed::Page(page) => page,
        };
        let changes: Vec<IndexChange> = page
            .changes
            .into_iter()
            .filter(|c| self.shard.keeps(c.change.user_id()))
            .map(|c| match c.change {
                Change::Upsert(d) => IndexChange::Upsert(d.into()),
                Change::DeleteDocument { user_id, doc_id } => {
                    IndexChange::DeleteDocument { user_id, doc_id }
                }
                Change::DeleteUser { user_id } => IndexChange::DeleteUser { user_id },
            })
            .collect();
        let record = !changes.is_empty()
            || (self.recorded != Some(page.position) && self.last_record.elapsed() > RECORD_EVERY);
        let read_took = read_started.elapsed();
        let applied_started = Instant::now();
        let applied = changes.len();
        if record {
            let index = self.index.clone();
            let payload = self.checkpoint(page.position);
            tokio::task::spawn_blocking(move || index.apply(&changes, Some(&payload)))
                .await
                .map_err(|e| Error::Index(e.to_string()))??;
            self.recorded = Some(page.position);
            self.last_record = Instant::now();
        }
        tracing::debug!(
            stage = "retriever",
            applied,
            read_ms = read_took.as_secs_f64() * 1e3,
            apply_ms = applied_started.elapsed().as_secs_f64() * 1e3,
            "applied a page of the store's log"
        );
        self.position = Some(page.position);
        let lag = match page.lag {
            Some(lag) => {
                self.last_caught_up = Instant::now() - lag;
                lag
            }
            None => self.last_caught_up.elapsed(),
        };
        let ready = self
            .start_head
            .is_some_and(|h| page.position.watermark >= h);
        self.gauges.lag.set(lag.as_secs_f64());
        self.gauges
            .applied
            .set(page.position.watermark.min(i64::MAX as u64) as i64);
        self.tx.send_modify(|p| {
            p.position = page.position;
            p.lag = lag;
            if ready && !p.ready {
                tracing::info!(
                    stage = "retriever",
                    watermark = page.position.watermark,
                    "caught up with the store"
                );
            }
            p.ready |= ready;
        });
        Ok(page.caught_up)
    }

    /// The recorded position when the index follows this store for this shard, else a rebuild.
    async fn resume_or_rebuild(&mut self) -> Result<Position, Error> {
        let payload = self.index.payload()?;
        let checkpoint = payload.as_deref().and_then(Checkpoint::decode);
        let identity = self.store.identity().encode();
        let why = match &checkpoint {
            Some(c) if c.identity == identity && c.shard == self.shard.encode() => {
                tracing::info!(
                    stage = "retriever",
                    watermark = c.position.watermark,
                    "resuming from the index's recorded position"
                );
                self.position = Some(c.position);
                self.recorded = Some(c.position);
                return Ok(c.position);
            }
            Some(c) if c.identity != identity => format!(
                "the index follows another store ({}, this is {identity})",
                c.identity
            ),
            Some(c) => format!(
                "the index holds shard {} (this replica serves {})",
                c.shard,
                self.shard.encode()
            ),
            None if payload.as_deref() == Some(REBUILDING) => {
                "a rebuild was interrupted".to_string()
            }
            None => "the index records no store position (new or wiped)".to_string(),
        };
        tracing::info!(stage = "retriever", reason = %why, "rebuilding from the store");
        self.rebuild().await
    }

    /// Rebuilds the index from a snapshot; returns its position.
    async fn rebuild(&mut self) -> Result<Position, Error> {
        let started = Instant::now();
        self.tx.send_modify(|p| p.rebuilding = true);
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || index.clear(Some(REBUILDING)))
            .await
            .map_err(|e| Error::Index(e.to_string()))??;
        let mut snapshot = self.store.snapshot().await?;
        // Fetching the next page overlaps indexing the last one.
        let (pages_tx, mut pages_rx) = tokio::sync::mpsc::channel::<Vec<StoredDocument>>(2);
        let index = self.index.clone();
        let indexer = tokio::task::spawn_blocking(move || {
            while let Some(page) = pages_rx.blocking_recv() {
                index.add_uncommitted(&page)?;
            }
            Ok::<_, Error>(())
        });
        let mut kept = 0u64;
        let read = async {
            while let Some(page) = snapshot.next(PAGE).await? {
                let page: Vec<StoredDocument> = page
                    .into_iter()
                    .filter(|d| self.shard.keeps(&d.user_id))
                    .map(StoredDocument::from)
                    .collect();
                kept += page.len() as u64;
                if pages_tx.send(page).await.is_err() {
                    break;
                }
            }
            Ok::<_, Error>(())
        };
        let read = read.await;
        drop(pages_tx);
        let indexed = indexer.await.map_err(|e| Error::Index(e.to_string()))?;
        read?;
        indexed?;
        let position = snapshot.position;
        let index = self.index.clone();
        let payload = self.checkpoint(position);
        tokio::task::spawn_blocking(move || index.apply(&[], Some(&payload)))
            .await
            .map_err(|e| Error::Index(e.to_string()))??;
        let took = started.elapsed();
        tracing::info!(
            stage = "retriever",
            documents = kept,
            seconds = took.as_secs_f64(),
            watermark = position.watermark,
            "rebuilt from the store"
        );
        self.position = Some(position);
        self.recorded = Some(position);
        self.last_record = Instant::now();
        self.tx.send_modify(|p| {
            p.position = position;
            p.rebuilding = false;
            p.rebuilds += 1;
            p.last_rebuild = Some(took);
        });
        Ok(position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_other_payloads_do_not_parse() {
        let c = Checkpoint {
            identity: "7/abc".into(),
            shard: "1/3".into(),
            position: Position::at_watermark(99),
        };
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c));
        assert_eq!(Checkpoint::decode(REBUILDING), None);
        assert_eq!(Checkpoint::decode(""), None);
    }

    #[test]
    fn shards_split_users_as_the_orchestrator_routes_them() {
        let users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
        for u in &users {
            let owners = (0..3)
                .filter(|s| {
                    Shard {
                        shard: *s,
                        shards: 3,
                    }
                    .keeps(u)
                })
                .count();
            assert_eq!(owners, 1);
            assert!(Shard::ALL.keeps(u));
        }
    }
}
