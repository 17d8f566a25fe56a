//! Ranker stage: orders a user's retrieved documents by the paper's strategies — `RankDocBM25`,
//! `RankDocDense` (all-MiniLM-L6-v2 in candle) and `RecentDoc` — and joins the best entries up
//! to the character budget.

pub mod embedder;
pub mod rank;

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ghostwriter_common::server::StageServer;
use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_proto::v1::ranker_server::{Ranker, RankerServer};
use ghostwriter_proto::v1::{RankRequest, RankResponse, RankedEntry, RankingStrategy};
use tokio::net::TcpListener;
use tokio::sync::OnceCell;
use tonic::{Request, Response, Status};

pub use embedder::Embedder;
pub use rank::{Candidate, DEFAULT_BUDGET_CHARS, Entry};

/// Ranker settings.
#[derive(Debug, Clone, clap::Args)]
pub struct RankerConfig {
    /// Directory of the embedding model (config.json, tokenizer.json, model.safetensors).
    /// Default: all-minilm-l6-v2 under the model directory.
    #[arg(long = "embedder-dir", env = "GHOSTWRITER_EMBEDDER_DIR")]
    pub embedder_dir: Option<PathBuf>,
    /// Device of the embedding model: cpu, cuda or cuda:N.
    #[arg(
        long = "embedder-device",
        env = "GHOSTWRITER_EMBEDDER_DEVICE",
        default_value = "cpu"
    )]
    pub embedder_device: String,
    /// Document embeddings kept in memory (1.5 KB each), so a user's history is embedded once.
    #[arg(
        long = "embedding-cache",
        env = "GHOSTWRITER_EMBEDDING_CACHE",
        default_value_t = 20_000
    )]
    pub cache_entries: usize,
}

/// Embeddings by text hash, evicted first in, first out.
struct EmbeddingCache {
    capacity: usize,
    map: HashMap<u64, Arc<[f32]>>,
    order: VecDeque<u64>,
}

impl EmbeddingCache {
    fn key(text: &str) -> u64 {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    }

    fn insert(&mut self, key: u64, value: Arc<[f32]>) {
        if self.capacity == 0 || self.map.contains_key(&key) {
            return;
        }
        while self.map.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map.insert(key, value);
        self.order.push_back(key);
    }
}

/// The dense ranking model with its cache.
pub struct DenseRanker {
    embedder: Embedder,
    cache: Mutex<EmbeddingCache>,
}

impl DenseRanker {
    /// Wraps a loaded embedder.
    pub fn new(embedder: Embedder, cache_entries: usize) -> Self {
        let cache = EmbeddingCache {
            capacity: cache_entries,
            map: HashMap::new(),
            order: VecDeque::new(),
        };
        Self {
            embedder,
            cache: Mutex::new(cache),
        }
    }

    /// Cosine similarity of each text to the query; texts seen before are not re-embedded.
    pub fn scores(&self, query: &str, texts: &[&str]) -> anyhow::Result<Vec<f32>> {
        let keys: Vec<u64> = texts.iter().map(|t| EmbeddingCache::key(t)).collect();
        let mut known: Vec<Option<Arc<[f32]>>> = {
            let cache = self
                .cache
                .lock()
                .map_err(|_| anyhow::anyhow!("embedding cache poisoned"))?;
            keys.iter().map(|k| cache.map.get(k).cloned()).collect()
        };
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| known[i].is_none()).collect();
        let mut inputs: Vec<&str> = vec![query];
        inputs.extend(missing.iter().map(|&i| texts[i]));
        let mut embedded = self.embedder.embed(&inputs)?.into_iter();
        let q = embedded.next().unwrap_or_default();
        {
            let mut cache = self
                .cache
                .lock()
                .map_err(|_| anyhow::anyhow!("embedding cache poisoned"))?;
            for (&i, e) in missing.iter().zip(embedded) {
                let e: Arc<[f32]> = e.into();
                cache.insert(keys[i], e.clone());
                known[i] = Some(e);
            }
        }
        Ok(known
            .iter()
            .map(|e| e.as_deref().map_or(0.0, |e| embedder::cosine(&q, e)))
            .collect())
    }
}

/// The gRPC adapter.
#[derive(Clone)]
pub struct RankerService {
    dense: Arc<OnceCell<Arc<DenseRanker>>>,
}

#[tonic::async_trait]
impl Ranker for RankerService {
    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        let r = request.into_inner();
        let strategy = RankingStrategy::try_from(r.strategy).map_err(|_| {
            Status::invalid_argument(format!("unknown ranking strategy {}", r.strategy))
        })?;
        let budget = if r.budget_chars == 0 {
            DEFAULT_BUDGET_CHARS
        } else {
            r.budget_chars as usize
        };
        let candidates: Vec<Candidate> = r
            .candidates
            .into_iter()
            .filter_map(|c| {
                let d = c.document?;
                let text = if d.title.is_empty() {
                    d.text
                } else {
                    format!("{}\n{}", d.title, d.text)
                };
                Some(Candidate {
                    doc_id: d.doc_id,
                    timestamp: d.timestamp,
                    text,
                    bm25: c.bm25_score,
                })
            })
            .collect();
        let scores = match strategy {
            RankingStrategy::Unspecified | RankingStrategy::Bm25 => rank::bm25_scores(&candidates),
            RankingStrategy::Recent => rank::recent_scores(&candidates),
            RankingStrategy::Dense => {
                if candidates.is_empty() {
                    Vec::new()
                } else {
                    let dense = self.dense.get().cloned().ok_or_else(|| {
                        Status::unavailable("the ranker is still loading its embedding model")
                    })?;
                    let query = r.query.clone();
                    let texts: Vec<String> = candidates.iter().map(|c| c.text.clone()).collect();
                    tokio::task::spawn_blocking(move || {
                        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                        dense.scores(&query, &refs)
                    })
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| Status::internal(format!("embedding failed: {e}")))?
                }
            }
        };
        let entries = rank::order_and_cut(&candidates, &scores, budget)
            .into_iter()
            .map(|e| RankedEntry {
                doc_id: e.doc_id,
                text: e.text,
                score: e.score,
                timestamp: e.timestamp,
            })
            .collect();
        Ok(Response::new(RankResponse { entries }))
    }
}

/// Serves the ranker on `listener` until `shutdown`. The embedding model loads in the
/// background; health turns SERVING once it is loaded.
pub async fn serve(
    config: RankerConfig,
    model_dir: PathBuf,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let (server, routes) = StageServer::new("ghostwriter.v1.Ranker").await;
    let cell: Arc<OnceCell<Arc<DenseRanker>>> = Arc::default();
    let dir = config
        .embedder_dir
        .clone()
        .unwrap_or_else(|| model_dir.join(ghostwriter_common::models::EMBEDDER_DIR));
    let device = ghostwriter_common::device::parse(&config.embedder_device)?;
    let cache_entries = config.cache_entries;
    let loading_cell = cell.clone();
    let loader = async move {
        let started = std::time::Instant::now();
        let shown = dir.display().to_string();
        let embedder = tokio::task::spawn_blocking(move || Embedder::load(&dir, &device))
            .await?
            .map_err(|e| anyhow::anyhow!("loading the embedding model from {shown}: {e}"))?;
        let _ = loading_cell.set(Arc::new(DenseRanker::new(embedder, cache_entries)));
        tracing::info!(
            stage = "ranker",
            millis = started.elapsed().as_millis() as u64,
            "embedding model loaded"
        );
        anyhow::Ok(())
    };
    let routes = routes.add_service(
        RankerServer::new(RankerService { dense: cell }).max_decoding_message_size(256 << 20),
    );
    server.serve_after(routes, listener, shutdown, loader).await
}
