//! Retriever stage: a persistent tantivy index of every user's documents. `Ingest` stores
//! documents; `Retrieve` returns one user's documents written before the current one, scored
//! by BM25 against the immediate context.

pub mod index;

use std::path::PathBuf;
use std::sync::Arc;

use ghostwriter_common::MAX_MESSAGE_BYTES;
use ghostwriter_common::ingest::IngestBudget;
use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_common::status::{Invalid, Overloaded};
use ghostwriter_proto::v1::retriever_server::{Retriever, RetrieverServer};
use ghostwriter_proto::v1::{
    Document, IngestRequest, IngestResponse, RetrieveRequest, RetrieveResponse, RetrievedDocument,
    TermStatistics,
};
use ghostwriter_transport::{StageServer, Transport};
use prometheus::IntGauge;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

pub use index::{DocumentIndex, HistoryFilter, StoredDocument};

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
        }
    }
}

/// Most documents one Retrieve may ask for (a caller-controlled count sizes an allocation).
pub const MAX_RETRIEVE_LIMIT: u32 = 10_000;

/// Retriever settings.
#[derive(Debug, Clone, clap::Args)]
pub struct RetrieverConfig {
    /// Directory of the persistent tantivy index (created when absent).
    #[arg(long = "index-dir", env = "GHOSTWRITER_INDEX_DIR", default_value_os_t = default_index_dir())]
    pub index_dir: PathBuf,
    /// Documents returned by Retrieve when the request sets no limit.
    #[arg(
        long = "retrieve-limit",
        env = "GHOSTWRITER_RETRIEVE_LIMIT",
        default_value_t = 200
    )]
    pub default_limit: u32,
    /// Memory of the index writer, in megabytes.
    #[arg(
        long = "index-writer-mb",
        env = "GHOSTWRITER_INDEX_WRITER_MB",
        default_value_t = 32
    )]
    pub writer_mb: usize,
    /// MiB of ingest batches the retriever holds at once (`serve --ingest-budget-mb`; 0 = the
    /// default).
    #[arg(skip)]
    pub ingest_budget_mb: usize,
}

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

/// The gRPC adapter over [`DocumentIndex`].
#[derive(Clone)]
pub struct RetrieverService {
    index: Arc<OnceCell<Arc<DocumentIndex>>>,
    default_limit: u32,
    ingest_budget: IngestBudget,
    /// Documents in the index, as last counted.
    documents: IntGauge,
}

impl RetrieverService {
    fn index(&self) -> Result<Arc<DocumentIndex>, Error> {
        self.index.get().cloned().ok_or(Error::NotReady)
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
        let total = tokio::task::spawn_blocking(move || index.ingest(&documents))
            .await
            .map_err(|e| Error::Index(e.to_string()))??;
        self.documents.set(total as i64);
        tracing::debug!(ingested = n, total, "ingest");
        Ok(Response::new(IngestResponse {
            ingested: n,
            total_documents: total,
        }))
    }

    async fn retrieve(
        &self,
        request: Request<RetrieveRequest>,
    ) -> Result<Response<RetrieveResponse>, Status> {
        let r = request.into_inner();
        if r.user_id.trim().is_empty() {
            return Err(Error::from(Invalid::new("user_id", "user_id is empty")).into());
        }
        let index = self.index()?;
        let filter = HistoryFilter {
            user_id: r.user_id,
            before: r.before_timestamp.unwrap_or_else(now_unix),
            current_doc_id: r.current_doc_id,
        };
        if r.limit > MAX_RETRIEVE_LIMIT {
            let message = format!("limit {} exceeds {MAX_RETRIEVE_LIMIT}", r.limit);
            return Err(Error::from(Invalid::new("limit", message)).into());
        }
        let limit = if r.limit == 0 {
            self.default_limit.min(MAX_RETRIEVE_LIMIT)
        } else {
            r.limit
        } as usize;
        let statistics = r.term_statistics;
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
/// health turns SERVING once it is open.
pub async fn serve(
    config: RetrieverConfig,
    listener: impl Into<ghostwriter_transport::Listener>,
    shutdown: Shutdown,
    transport: &Transport,
) -> anyhow::Result<()> {
    let (server, routes) = StageServer::new("ghostwriter.v1.Retriever", transport).await;
    let cell: Arc<OnceCell<Arc<DocumentIndex>>> = Arc::default();
    let documents = documents_gauge(&transport.metrics);
    let service = RetrieverService {
        index: cell.clone(),
        default_limit: config.default_limit,
        ingest_budget: IngestBudget::new(config.ingest_budget_mb),
        documents: documents.clone(),
    };
    let dir = config.index_dir.clone();
    let writer_bytes = config.writer_mb * 1_000_000;
    let opened = tokio::task::spawn_blocking(move || DocumentIndex::open(&dir, writer_bytes));
    let loader = async move {
        match opened.await {
            Ok(Ok(index)) => {
                let docs = index.num_docs();
                documents.set(docs as i64);
                tracing::info!(stage = "retriever", docs, dir = %config.index_dir.display(), "index open");
                let _ = cell.set(Arc::new(index));
                Ok(())
            }
            Ok(Err(e)) => Err(anyhow::anyhow!(
                "opening index {}: {e}",
                config.index_dir.display()
            )),
            Err(e) => Err(anyhow::anyhow!(e)),
        }
    };
    let routes = routes
        .add_service(RetrieverServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES));
    server.serve_after(routes, listener, shutdown, loader).await
}
