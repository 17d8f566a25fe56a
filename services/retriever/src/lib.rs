//! Retriever stage: a persistent tantivy index of every user's documents. `Ingest` stores
//! documents; `Retrieve` returns one user's documents written before the current one, scored
//! by BM25 against the immediate context; `Delete` removes one document or a user's all.
//!
//! Without a store the local index is the system of record. With one (`--store`), Postgres is:
//! `Ingest` and `Delete` commit there and answer with a consistency token, and the index is a
//! replica that follows the store's change log ([`follow`]).

pub mod follow;
pub mod index;

use std::path::PathBuf;
use std::sync::Arc;

use ghostwriter_common::MAX_MESSAGE_BYTES;
use ghostwriter_common::ingest::IngestBudget;
use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_common::status::{Invalid, Overloaded};
use ghostwriter_proto::v1::retriever_server::{Retriever, RetrieverServer};
use ghostwriter_proto::v1::{
    DeleteRequest, DeleteResponse, Document, IngestRequest, IngestResponse, ReplicaRequest,
    ReplicaResponse, RetrieveRequest, RetrieveResponse, RetrievedDocument, TermStatistics,
};
use ghostwriter_store::{Store, StoreArgs, Token};
use ghostwriter_transport::{StageServer, Transport};
use prometheus::IntGauge;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

pub use follow::{Follower, Progress, Shard};
pub use index::{DocumentIndex, HistoryFilter, IndexChange, StoredDocument};

/// Errors of the retriever.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field fails its check.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The ingest budget is in use, or a batch is larger than it.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    /// The index is still opening.
    #[error("the retriever is still opening its index")]
    NotReady,
    /// The index failed.
    #[error("index error: {0}")]
    Index(String),
    /// The store failed (or is unreachable: nothing was stored).
    #[error(transparent)]
    Store(#[from] ghostwriter_store::Error),
    /// This replica has not applied the write of a consistency token within the deadline.
    #[error("this replica has not applied the write of consistency token {0} yet")]
    Behind(Token),
}

impl From<tantivy::TantivyError> for Error {
    fn from(e: tantivy::TantivyError) -> Self {
        Error::Index(e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(e) => e.into(),
            Error::Overloaded(e) => e.into(),
            Error::NotReady => Status::unavailable(e.to_string()),
            Error::Index(m) => Status::internal(m),
            Error::Store(e) => {
                use ghostwriter_store::Error as S;
                match e {
                    S::InvalidArgument(m) => Status::invalid_argument(m),
                    S::Unavailable(_) => Status::unavailable(e.to_string()),
                    S::Timeout(_) => Status::deadline_exceeded(e.to_string()),
                    S::Config(_) | S::SchemaTooNew { .. } => {
                        Status::failed_precondition(e.to_string())
                    }
                    S::Internal(_) => Status::internal(e.to_string()),
                }
            }
            // Another replica may have it: the caller's balancer retries there.
            e @ Error::Behind(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// Most documents one Retrieve may ask for (a caller-controlled count sizes an allocation).
pub const MAX_RETRIEVE_LIMIT: u32 = 10_000;

/// Retriever settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Retriever")]
pub struct RetrieverConfig {
    /// Directory of the persistent tantivy index (created when absent).
    #[arg(long, env = "GHOSTWRITER_INDEX_DIR", default_value_os_t = default_index_dir())]
    pub index_dir: PathBuf,
    /// Documents returned by Retrieve when the request sets no limit.
    #[arg(long = "retrieve-limit", env = "GHOSTWRITER_RETRIEVE_LIMIT", default_value_t = 200)]
    pub default_limit: u32,
    /// Memory of the index writer, in megabytes.
    #[arg(long = "index-writer-mb", env = "GHOSTWRITER_INDEX_WRITER_MB", default_value_t = 32)]
    pub writer_mb: usize,
    /// The system of record this retriever follows (unset: its index is the store).
    #[command(flatten)]
    pub store: StoreArgs,
    /// With a store: seconds behind the store's head past which the replica reports
    /// NOT_SERVING, until it catches up again. An unreachable store does not count as lag (no
    /// write can commit meanwhile): the replica keeps serving what it has.
    #[arg(long = "max-lag", env = "GHOSTWRITER_MAX_LAG", default_value_t = 5.0)]
    pub max_lag_secs: f64,
    /// With a store: how many shards split the users (the orchestrator's --retriever-shards);
    /// this replica keeps the users of its --shard.
    #[arg(
        long = "retriever-shards",
        env = "GHOSTWRITER_RETRIEVER_SHARDS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=4096)
    )]
    pub shards: u32,
    /// This replica's shard (the process's --shard).
    #[arg(skip)]
    pub shard: Option<u32>,
    /// MiB of ingest batches the retriever holds at once (`serve --ingest-budget-mb`; 0 = the
    /// default).
    #[arg(skip)]
    pub ingest_budget_mb: usize,
}

impl RetrieverConfig {
    /// Which users this replica keeps.
    pub fn shard(&self) -> Result<Shard, String> {
        let shards = self.shards.max(1);
        let shard = self.shard.unwrap_or(0);
        if shard >= shards {
            return Err(format!(
                "--shard {shard} is not below --retriever-shards {shards}"
            ));
        }
        Ok(Shard { shard, shards })
    }
}

/// Longest a Retrieve waits for its consistency token's write when its deadline allows more.
pub const MAX_TOKEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `~/.local/share/ghostwriter/index`.
pub fn default_index_dir() -> PathBuf {
    dirs_data().join("ghostwriter").join("index")
}

fn dirs_data() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("share")))
        .unwrap_or_else(std::env::temp_dir)
}

pub use ghostwriter_common::ingest::MAX_BATCH;

/// Validates a batch whole ([`ghostwriter_common::ingest::check_batch`]); the first bad
/// document rejects it, naming the document.
pub fn validate_documents(documents: &[Document]) -> Result<Vec<StoredDocument>, Error> {
    ghostwriter_common::ingest::check_batch(documents)?;
    Ok(documents
        .iter()
        .map(|d| StoredDocument {
            user_id: d.user_id.clone(),
            doc_id: d.doc_id.clone(),
            timestamp: d.timestamp,
            title: d.title.clone(),
            text: d.text.clone(),
        })
        .collect())
}

/// The store and the follower of a retriever with `--store`.
pub struct Replica {
    /// The store.
    pub store: Arc<Store>,
    /// The follower keeping the index equal to it.
    pub follower: Follower,
}

/// The gRPC adapter over [`DocumentIndex`] (and, with a store, over [`Store`]).
#[derive(Clone)]
pub struct RetrieverService {
    index: Arc<OnceCell<Arc<DocumentIndex>>>,
    replica: Arc<OnceCell<Replica>>,
    follows_store: bool,
    default_limit: u32,
    ingest_budget: IngestBudget,
    /// Documents in the index, as last counted.
    documents: IntGauge,
}

impl RetrieverService {
    fn index(&self) -> Result<Arc<DocumentIndex>, Error> {
        self.index.get().cloned().ok_or(Error::NotReady)
    }

    /// With a store: the store and follower (UNAVAILABLE until the store is open).
    fn replica(&self) -> Result<Option<&Replica>, Status> {
        if !self.follows_store {
            return Ok(None);
        }
        self.replica
            .get()
            .map(Some)
            .ok_or_else(|| Error::NotReady.into())
    }
}

fn token(s: &str) -> Result<Option<Token>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    Ok(Some(s.parse::<Token>()?))
}

/// A retrieval request, checked: a user named, a limit within [`MAX_RETRIEVE_LIMIT`], a
/// consistency token that parses.
pub struct Retrieval {
    /// Whose documents, from before when, never the one being written.
    pub filter: HistoryFilter,
    /// The BM25 query.
    pub query: String,
    /// Documents wanted (`None`: the retriever's `--retrieve-limit`).
    pub limit: Option<usize>,
    /// Whether the response carries the term statistics of the whole index.
    pub term_statistics: bool,
    /// The write the answer must include (with a store).
    pub token: Option<Token>,
}

impl TryFrom<RetrieveRequest> for Retrieval {
    type Error = Error;

    fn try_from(r: RetrieveRequest) -> Result<Self, Error> {
        if r.user_id.trim().is_empty() {
            return Err(Invalid::new("user_id", "user_id is empty").into());
        }
        if r.limit > MAX_RETRIEVE_LIMIT {
            let message = format!("limit {} exceeds {MAX_RETRIEVE_LIMIT}", r.limit);
            return Err(Invalid::new("limit", message).into());
        }
        Ok(Self {
            token: token(&r.consistency_token)?,
            filter: HistoryFilter {
                user_id: r.user_id,
                before: r.before_timestamp.unwrap_or_else(now_unix),
                current_doc_id: r.current_doc_id,
            },
            query: r.query,
            limit: (r.limit > 0).then_some(r.limit as usize),
            term_statistics: r.term_statistics,
        })
    }
}

/// The gauge of the documents in the index.
fn documents_gauge(metrics: &ghostwriter_transport::Metrics) -> IntGauge {
    let gauge = IntGauge::new(
        "ghostwriter_index_documents",
        "Documents in the retriever's index",
    )
    .expect("metric definitions are valid");
    metrics.register(gauge)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

#[tonic::async_trait]
impl Retriever for RetrieverService {
    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        // Held until the batch is indexed: bounds the memory of concurrent ingests.
        let _budget = self
            .ingest_budget
            .reserve_batch(request.get_ref())
            .map_err(Error::from)?;
        let documents = validate_documents(&request.get_ref().documents)?;
        let index = self.index()?;
        // A batch may name one (user, doc_id) twice; the last one is stored.
        let n = documents
            .iter()
            .map(|d| (d.user_id.as_str(), d.doc_id.as_str()))
            .collect::<std::collections::HashSet<_>>()
            .len() as u32;
        if let Some(replica) = self.replica()? {
            if let Some((i, _)) = documents.iter().enumerate().find(|(_, d)| {
                [&d.user_id, &d.doc_id, &d.title, &d.text]
                    .iter()
                    .any(|t| t.contains('\0'))
            }) {
                let message = format!("document {i}: a NUL character cannot be stored");
                return Err(Error::from(Invalid::new("documents", message)).into());
            }
            // The store is the system of record: answered once the batch has committed there;
            // every replica (this one too) applies it from the change log.
            let documents: Vec<ghostwriter_store::Document> =
                documents.into_iter().map(Into::into).collect();
            let written = replica
                .store
                .ingest(&documents)
                .await
                .map_err(Error::from)?;
            replica.follower.wake();
            return Ok(Response::new(IngestResponse {
                ingested: n,
                total_documents: index.num_docs(),
                consistency_token: written.token.to_string(),
            }));
        }
        let total = tokio::task::spawn_blocking(move || index.ingest(&documents))
            .await
            .map_err(|e| Error::Index(e.to_string()))??;
        self.documents.set(total as i64);
        tracing::debug!(ingested = n, total, "ingest");
        Ok(Response::new(IngestResponse {
            ingested: n,
            total_documents: total,
            consistency_token: String::new(),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = request.into_inner();
        ghostwriter_common::ingest::check_id("user_id", &r.user_id).map_err(Error::from)?;
        if !r.doc_id.is_empty() {
            ghostwriter_common::ingest::check_id("doc_id", &r.doc_id).map_err(Error::from)?;
        }
        let index = self.index()?;
        let doc_id = (!r.doc_id.is_empty()).then_some(r.doc_id);
        if let Some(replica) = self.replica()? {
            let written = replica
                .store
                .delete(&r.user_id, doc_id.as_deref())
                .await
                .map_err(Error::from)?;
            replica.follower.wake();
            tracing::info!(
                deleted = written.documents,
                whole_user = doc_id.is_none(),
                "delete"
            );
            return Ok(Response::new(DeleteResponse {
                deleted: written.documents,
                consistency_token: written.token.to_string(),
            }));
        }
        let deleted =
            tokio::task::spawn_blocking(move || index.delete(&r.user_id, doc_id.as_deref()))
                .await
                .map_err(|e| Error::Index(e.to_string()))??;
        tracing::info!(deleted, "delete");
        Ok(Response::new(DeleteResponse {
            deleted,
            consistency_token: String::new(),
        }))
    }

    async fn replica(
        &self,
        _: Request<ReplicaRequest>,
    ) -> Result<Response<ReplicaResponse>, Status> {
        let documents = self.index.get().map_or(0, |i| i.num_docs());
        let Some(replica) = self.replica.get() else {
            return Ok(Response::new(ReplicaResponse {
                follows_store: self.follows_store,
                documents,
                ..Default::default()
            }));
        };
        let p = replica.follower.progress().borrow().clone();
        Ok(Response::new(ReplicaResponse {
            follows_store: true,
            applied_watermark: p.position.watermark,
            lag_seconds: p.lag.as_secs_f64(),
            caught_up: p.ready,
            rebuilding: p.rebuilding,
            rebuilds: p.rebuilds,
            last_rebuild_seconds: p.last_rebuild.map_or(0.0, |d| d.as_secs_f64()),
            store_identity: replica.follower.identity().encode(),
            documents,
            store_error: p.store_error.unwrap_or_default(),
        }))
    }

    async fn retrieve(
        &self,
        request: Request<RetrieveRequest>,
    ) -> Result<Response<RetrieveResponse>, Status> {
        let deadline = ghostwriter_common::deadline::from_metadata(
            request.metadata(),
            std::time::Instant::now(),
        );
        let r: Retrieval = request.into_inner().try_into()?;
        let index = self.index()?;
        if let (Some(token), Some(replica)) = (r.token, self.replica()?) {
            // Read your writes: wait for the write (within the deadline), else let the caller
            // try a replica that has it.
            let within = deadline
                .map(|d| d.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or(MAX_TOKEN_WAIT)
                .min(MAX_TOKEN_WAIT);
            if !replica.follower.wait_for(token, within).await {
                return Err(Error::Behind(token).into());
            }
        }
        let limit = r
            .limit
            .unwrap_or(self.default_limit.min(MAX_RETRIEVE_LIMIT) as usize);
        let (filter, statistics) = (r.filter, r.term_statistics);
        let (retrieved, background) = tokio::task::spawn_blocking(move || {
            let retrieved = index.retrieve(&filter, &r.query, limit)?;
            let background = if statistics {
                let texts: Vec<String> = retrieved
                    .hits
                    .iter()
                    .map(|h| h.document.content())
                    .collect();
                Some(index.term_statistics(&texts)?)
            } else {
                None
            };
            Ok::<_, Error>((retrieved, background))
        })
        .await
        .map_err(|e| Error::Index(e.to_string()))??;
        Ok(Response::new(RetrieveResponse {
            background: background.map(|b| TermStatistics {
                documents: b.documents,
                document_frequency: b.document_frequency,
            }),
            total_history: retrieved.total_history as u32,
            documents: retrieved
                .hits
                .into_iter()
                .map(|h| RetrievedDocument {
                    bm25_score: h.score,
                    snippets: h.snippets,
                    document: Some(Document {
                        user_id: h.document.user_id,
                        doc_id: h.document.doc_id,
                        timestamp: h.document.timestamp,
                        title: h.document.title,
                        text: h.document.text,
                    }),
                })
                .collect(),
        }))
    }
}

/// Serves the retriever on `listener` until `shutdown`. The index opens in the background;
/// health turns SERVING once it is open and, with a store, once the index has applied the
/// store's head as of the start (the first `listening` line comes before: it only says where
/// the server is bound). With a store, health goes back to NOT_SERVING while the index is more
/// than `--max-lag` behind or rebuilding.
pub async fn serve(
    config: RetrieverConfig,
    listener: impl Into<ghostwriter_transport::Listener>,
    shutdown: Shutdown,
    transport: &Transport,
) -> anyhow::Result<()> {
    // Without a store the shard only names the process in etcd: the orchestrator routes.
    let shard = if config.store.url.is_some() {
        config.shard().map_err(|e| anyhow::anyhow!(e))?
    } else {
        Shard::ALL
    };
    let max_lag = std::time::Duration::try_from_secs_f64(config.max_lag_secs)
        .map_err(|_| anyhow::anyhow!("--max-lag must be a non-negative number of seconds"))?;
    let (server, routes) = StageServer::new("ghostwriter.v1.Retriever", transport).await;
    let health = server.health();
    let cell: Arc<OnceCell<Arc<DocumentIndex>>> = Arc::default();
    let opened_index = cell.clone();
    let replica_cell: Arc<OnceCell<Replica>> = Arc::default();
    let documents = documents_gauge(&transport.metrics);
    let gauges = follow::StoreGauges::register(&transport.metrics);
    let service = RetrieverService {
        index: cell.clone(),
        replica: replica_cell.clone(),
        follows_store: config.store.url.is_some(),
        default_limit: config.default_limit,
        ingest_budget: IngestBudget::new(config.ingest_budget_mb),
        documents: documents.clone(),
    };
    let dir = config.index_dir.clone();
    let writer_bytes = config.writer_mb * 1_000_000;
    let opened = tokio::task::spawn_blocking(move || DocumentIndex::open(&dir, writer_bytes));
    let stop = shutdown.clone();
    let loader = async move {
        let index = match opened.await {
            Ok(Ok(index)) => {
                let docs = index.num_docs();
                documents.set(docs as i64);
                tracing::info!(stage = "retriever", docs, dir = %config.index_dir.display(), "index open");
                let index = Arc::new(index);
                let _ = cell.set(index.clone());
                index
            }
            Ok(Err(e)) => {
                return Err(anyhow::anyhow!(
                    "opening index {}: {e}",
                    config.index_dir.display()
                ));
            }
            Err(e) => return Err(anyhow::anyhow!(e)),
        };
        if config.store.url.is_none() {
            return Ok(());
        }
        let store = Arc::new(open_store(&config.store).await?);
        let follower = Follower::start(
            index,
            store.clone(),
            shard,
            config.store.poll_interval(),
            stop.clone(),
            gauges,
        );
        let progress = follower.progress();
        let _ = replica_cell.set(Replica {
            store: store.clone(),
            follower,
        });
        if let Some(r) = replica_cell.get() {
            r.follower.ready().await;
        }
        tokio::spawn(watch_lag(progress, health, max_lag, stop.clone()));
        tokio::spawn(prune(store, config.store.retention(), stop));
        Ok(())
    };
    let routes = routes
        .add_service(RetrieverServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES));
    let served = server.serve_after(routes, listener, shutdown, loader).await;
    release(opened_index).await;
    served
}

/// Waits, a bounded time, until nothing holds the index any more (a follower's or a call's
/// blocking task may still run after the server stopped), so that this process has let go of
/// its writer lock when `serve` returns. (A child forked in that moment may still hold a copy
/// of the lock for a while; the next open waits for it: `DocumentIndex::writer`.)
async fn release(cell: Arc<OnceCell<Arc<DocumentIndex>>>) {
    let Some(index) = cell.get().cloned() else { return };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    // Free when only this cell holds the index, besides the clone here.
    while Arc::strong_count(&cell) > 1 || Arc::strong_count(&index) > 2 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                stage = "retriever",
                "the index is still in use 30s after shutdown"
            );
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Opens the store, trying again while Postgres is unreachable (a replica may start before
/// it); a wrong configuration or a newer schema fails at once.
async fn open_store(args: &StoreArgs) -> anyhow::Result<Store> {
    let mut logged = false;
    loop {
        match Store::open(args).await {
            Ok(store) => return Ok(store),
            Err(e) if e.is_unavailable() => {
                if !logged {
                    tracing::warn!(stage = "retriever", error = %e, "waiting for the store");
                    logged = true;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// SERVING while the index is ready, not rebuilding, and within `max_lag` of the store's head.
async fn watch_lag(
    mut progress: tokio::sync::watch::Receiver<Progress>,
    health: ghostwriter_transport::Health,
    max_lag: std::time::Duration,
    stop: Shutdown,
) {
    let stop = stop.wait();
    tokio::pin!(stop);
    let mut serving = true;
    loop {
        let p = progress.borrow_and_update().clone();
        let ok = p.ready && !p.rebuilding && p.lag <= max_lag;
        if ok != serving {
            serving = ok;
            if ok {
                tracing::info!(
                    stage = "retriever",
                    lag = p.lag.as_secs_f64(),
                    "caught up again: SERVING"
                );
                health.serving().await;
            } else {
                tracing::warn!(
                    stage = "retriever",
                    lag = p.lag.as_secs_f64(),
                    rebuilding = p.rebuilding,
                    "behind the store: NOT_SERVING"
                );
                health.not_serving().await;
            }
        }
        tokio::select! {
            () = &mut stop => return,
            changed = progress.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// Removes the change log's changes older than the retention, now and then (one replica at a
/// time does it).
async fn prune(store: Arc<Store>, retention: std::time::Duration, stop: Shutdown) {
    let every = (retention / 10).clamp(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(600),
    );
    let stop = stop.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(every) => {}
        }
        match store.prune(retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(stage = "retriever", removed = n, "change log pruned"),
            Err(e) => tracing::warn!(stage = "retriever", error = %e, "pruning the change log"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retrieval_is_checked_before_the_index_is_asked() {
        let good = RetrieveRequest {
            user_id: "maya".into(),
            query: "strings".into(),
            ..Default::default()
        };
        let checked = Retrieval::try_from(good.clone()).unwrap();
        assert_eq!((checked.limit, checked.token), (None, None));
        assert_eq!(checked.filter.user_id, "maya");
        let code = |f: fn(&mut RetrieveRequest)| {
            let mut r = good.clone();
            f(&mut r);
            Retrieval::try_from(r).err().map(|e| Status::from(e).code())
        };
        assert_eq!(code(|r| r.limit = 7), None);
        assert_eq!(
            code(|r| r.user_id = " ".into()),
            Some(tonic::Code::InvalidArgument)
        );
        let over = |r: &mut RetrieveRequest| r.limit = MAX_RETRIEVE_LIMIT + 1;
        assert_eq!(code(over), Some(tonic::Code::InvalidArgument));
        let token = |r: &mut RetrieveRequest| r.consistency_token = "not a token".into();
        assert_eq!(code(token), Some(tonic::Code::InvalidArgument));
    }
}
