//! Ranker stage: orders a user's retrieved documents by the paper's strategies — `RankDocBM25`,
//! `RankDocDense`, `RankSnippet`, `RankDocBySnpt` (all-MiniLM-L6-v2 in candle) and `RecentDoc` —
//! and joins the best entries up to the character budget; and judges authorship by style
//! ([`authorship`], `VerifyAuthor`) with the same embedder and cache.

pub mod authorship;
pub mod rank;

use std::path::PathBuf;

use ghostwriter_common::MAX_MESSAGE_BYTES;
use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_common::status::Invalid;
use ghostwriter_proto::v1::ranker_server::{Ranker, RankerServer};
use ghostwriter_proto::v1::{
    RankRequest, RankResponse, RankedEntry, RankingStrategy, StyleFeature, VerifyAuthorRequest,
    VerifyAuthorResponse,
};
use ghostwriter_transport::{StageServer, Transport};
use tonic::{Request, Response, Status};

pub use ghostwriter_embed as embedder;
use ghostwriter_embed::LazyEmbedder;
pub use ghostwriter_embed::{CachedEmbedder as DenseRanker, Embedder};
pub use rank::{Candidate, DEFAULT_BUDGET_CHARS, Entry};

/// Ranker settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Embeddings")]
pub struct RankerConfig {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub embedder: ghostwriter_embed::EmbedderArgs,
}

/// Why a ranking failed: a request that fails its check, or the embedding model.
pub use ghostwriter_embed::grpc::StageError as Error;

/// The gRPC adapter.
#[derive(Clone)]
pub struct RankerService {
    dense: LazyEmbedder,
    verifier: std::sync::Arc<ghostwriter_style::Verifier>,
}

/// A ranking request, checked: a known strategy, the budget of the entries, the candidates
/// as the ranker's own ([`Candidate`]: title and text joined, snippets made where the retriever
/// sent none).
pub struct Ranking {
    /// How candidates are scored.
    pub strategy: RankingStrategy,
    /// Characters of the entries kept.
    pub budget: usize,
    /// The immediate context the dense strategies compare with.
    pub query: String,
    /// The retrieved documents.
    pub candidates: Vec<Candidate>,
}

impl TryFrom<RankRequest> for Ranking {
    type Error = Invalid;

    fn try_from(r: RankRequest) -> Result<Self, Invalid> {
        let strategy = RankingStrategy::try_from(r.strategy).map_err(|_| {
            Invalid::new(
                "strategy",
                format!("unknown ranking strategy {}", r.strategy),
            )
        })?;
        let budget = match r.budget_chars {
            0 => DEFAULT_BUDGET_CHARS,
            n => n as usize,
        };
        let candidates = r
            .candidates
            .into_iter()
            .filter_map(|c| {
                let d = c.document?;
                let text = ghostwriter_common::text::document_text(&d.title, &d.text);
                let snippets = if c.snippets.is_empty() {
                    ghostwriter_common::text::snippets(&text)
                } else {
                    c.snippets
                };
                Some(Candidate {
                    doc_id: d.doc_id,
                    timestamp: d.timestamp,
                    text,
                    bm25: c.bm25_score,
                    snippets,
                })
            })
            .collect();
        Ok(Self {
            strategy,
            budget,
            query: r.query,
            candidates,
        })
    }
}

impl RankerService {
    /// Cosine similarity of each text to the query (embeddings cached across requests).
    async fn dense_scores(&self, query: &str, texts: Vec<String>) -> Result<Vec<f32>, Error> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let query = query.to_string();
        Ok(self
            .dense
            .run(move |dense| {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                dense.scores(&query, &refs)
            })
            .await?)
    }

    async fn rank(&self, r: RankRequest) -> Result<RankResponse, Error> {
        let Ranking {
            strategy,
            budget,
            query,
            mut candidates,
        } = r.try_into()?;
        let scores = match strategy {
            RankingStrategy::Unspecified | RankingStrategy::Bm25 => rank::bm25_scores(&candidates),
            RankingStrategy::Recent => rank::recent_scores(&candidates),
            RankingStrategy::Dense => {
                let texts: Vec<String> = candidates.iter().map(|c| c.text.clone()).collect();
                self.dense_scores(&query, texts).await?
            }
            RankingStrategy::Snippet => {
                candidates = Candidate::snippet_units(&candidates);
                let texts: Vec<String> = candidates.iter().map(|c| c.text.clone()).collect();
                self.dense_scores(&query, texts).await?
            }
            RankingStrategy::DocBySnippet => {
                let units = Candidate::snippet_units(&candidates);
                let texts: Vec<String> = units.into_iter().map(|c| c.text).collect();
                let snippet_scores = self.dense_scores(&query, texts).await?;
                rank::best_snippet_scores(&candidates, &snippet_scores)
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
        Ok(RankResponse { entries })
    }
}

#[tonic::async_trait]
impl Ranker for RankerService {
    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        Ok(Response::new(
            RankerService::rank(self, request.into_inner()).await?,
        ))
    }

    async fn verify_author(
        &self,
        request: Request<VerifyAuthorRequest>,
    ) -> Result<Response<VerifyAuthorResponse>, Status> {
        Ok(Response::new(
            RankerService::verify_author(self, request.into_inner()).await?,
        ))
    }
}

impl RankerService {
    async fn verify_author(&self, r: VerifyAuthorRequest) -> Result<VerifyAuthorResponse, Error> {
        authorship::check(&r.text, r.profile.len())?;
        let verifier = self.verifier.clone();
        let profile: Vec<String> = r
            .profile
            .into_iter()
            .map(|d| ghostwriter_common::text::document_text(&d.title, &d.text))
            .collect();
        let judgement = self
            .dense
            .run(move |dense| authorship::verify(&verifier, dense, &r.text, &profile))
            .await?;
        let model = self.verifier.model().provenance.command.clone();
        let prior_same_author = ghostwriter_style::PRIOR_SAME_AUTHOR;
        Ok(match judgement {
            ghostwriter_style::Judgement::Judged {
                probability,
                contributions,
            } => VerifyAuthorResponse {
                probability: Some(probability),
                prior_same_author,
                features: contributions
                    .into_iter()
                    .map(|c| StyleFeature {
                        name: c.feature,
                        value: c.value,
                        contribution: c.contribution,
                    })
                    .collect(),
                abstention_reason: String::new(),
                model,
            },
            ghostwriter_style::Judgement::Abstained(a) => VerifyAuthorResponse {
                probability: None,
                prior_same_author,
                features: Vec::new(),
                abstention_reason: a.reason(),
                model,
            },
        })
    }
}

/// Serves the ranker on `listener` until `shutdown`. The embedding model loads in the
/// background; health turns SERVING once it is loaded.
pub async fn serve(
    config: RankerConfig,
    model_dir: PathBuf,
    listener: impl Into<ghostwriter_transport::Listener>,
    shutdown: Shutdown,
    transport: &Transport,
) -> anyhow::Result<()> {
    let (server, routes) = StageServer::new("ghostwriter.v1.Ranker", transport).await;
    let cell = LazyEmbedder::default();
    let loader = cell.clone().load(config.embedder, model_dir);
    let routes = routes.add_service(
        RankerServer::new(RankerService {
            dense: cell,
            verifier: std::sync::Arc::new(ghostwriter_style::Verifier::shipped()?),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
    );
    server.serve_after(routes, listener, shutdown, loader).await
}
