//! Retriever stage: a persistent tantivy index of every user's documents. `Ingest` stores
//! documents; `Retrieve` returns one user's documents written before the current one, scored
//! by BM25 against the immediate context.

pub mod index;

use std::path::PathBuf;
use std::sync::Arc;

use ghostwriter_common::server::StageServer;
use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_proto::v1::retriever_server::{Retriever, RetrieverServer};
use ghostwriter_proto::v1::{
    Document, IngestRequest, IngestResponse, RetrieveRequest, RetrieveResponse, RetrievedDocument,
    TermStatistics,
};
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

pub use index::{DocumentIndex, HistoryFilter, StoredDocument};

/// Errors of the retriever.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
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
            Error::InvalidArgument(m) => Status::invalid_argument(m),
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
    ghostwriter_common::ingest::check_batch(documents).map_err(Error::InvalidArgument)?;
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
}

impl RetrieverService {
    fn index(&self) -> Result<Arc<DocumentIndex>, Status> {
        self.index
            .get()
            .cloned()
            .ok_or_else(|| Error::NotReady.into())
    }
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
        let _budget = ghostwriter_common::ingest::reserve_batch(
            ghostwriter_common::ingest::Holder::Retriever,
            request.get_ref(),
        )?;
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
            .map_err(|e| Status::internal(e.to_string()))??;
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
            return Err(Status::invalid_argument("user_id is empty"));
        }
        let index = self.index()?;
        let filter = HistoryFilter {
            user_id: r.user_id,
            before: r.before_timestamp.unwrap_or_else(now_unix),
            current_doc_id: r.current_doc_id,
        };
        if r.limit > MAX_RETRIEVE_LIMIT {
            return Err(Status::invalid_argument(format!(
                "limit {} exceeds {MAX_RETRIEVE_LIMIT}",
                r.limit
            )));
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
        .map_err(|e| Status::internal(e.to_string()))??;
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
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let (server, routes) = StageServer::new("ghostwriter.v1.Retriever").await;
    let cell: Arc<OnceCell<Arc<DocumentIndex>>> = Arc::default();
    let service = RetrieverService {
        index: cell.clone(),
        default_limit: config.default_limit,
    };
    let dir = config.index_dir.clone();
    let writer_bytes = config.writer_mb * 1_000_000;
    let opened = tokio::task::spawn_blocking(move || DocumentIndex::open(&dir, writer_bytes));
    let loader = async move {
        match opened.await {
            Ok(Ok(index)) => {
                tracing::info!(stage = "retriever", docs = index.num_docs(), dir = %config.index_dir.display(), "index open");
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
    let routes =
        routes.add_service(RetrieverServer::new(service).max_decoding_message_size(256 << 20));
    server.serve_after(routes, listener, shutdown, loader).await
}
