//! Synthesizer stage: the important words of a user's past writing (`SynCtxInd`) or of the
//! ranked entries that bear on the immediate context (`SynCtx`).

pub mod synth;
pub mod text;

use std::path::PathBuf;

use ghostwriter_common::MAX_MESSAGE_BYTES;
use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_common::status::Invalid;
use ghostwriter_embed::{CachedEmbedder, EmbedderArgs, LazyEmbedder};
use ghostwriter_proto::v1::synthesizer_server::{Synthesizer, SynthesizerServer};
use ghostwriter_proto::v1::{ImportantWord, SynthesisMode, SynthesizeRequest, SynthesizeResponse};
use ghostwriter_transport::{StageServer, Transport};
use tonic::{Request, Response, Status};

/// Most words a request may ask for.
const MAX_WORDS_LIMIT: u32 = 1_000;

/// Synthesizer settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Important words")]
pub struct SynthesizerConfig {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub synthesis: SynthesisOptions,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub embedder: EmbedderArgs,
}

/// How important words are chosen (shared by `serve synthesizer` and the embedded topology).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Important words")]
pub struct SynthesisOptions {
    /// Cosine similarity of two words' MiniLM embeddings at or above which an entry word
    /// matches a word of the immediate context (SynCtx). Calibrated in docs/results.md.
    #[arg(long, env = "GHOSTWRITER_WORD_SIMILARITY", default_value_t = DEFAULT_WORD_SIMILARITY)]
    pub word_similarity: f32,
}

/// Default SynCtx word-similarity threshold.
pub const DEFAULT_WORD_SIMILARITY: f32 = 0.6;

/// Whether each of `words` is within `threshold` cosine of some of `targets`.
pub fn close_words(
    embedder: &CachedEmbedder,
    words: &[String],
    targets: &[String],
    threshold: f32,
) -> anyhow::Result<Vec<bool>> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let t: Vec<&str> = targets.iter().map(String::as_str).collect();
    let we = embedder.embed(&w)?;
    let te = embedder.embed(&t)?;
    Ok(we
        .iter()
        .map(|a| {
            te.iter()
                .any(|b| ghostwriter_embed::cosine(a, b) >= threshold)
        })
        .collect())
}

/// Why a synthesis failed: a request that fails its check, or the embedding model.
pub use ghostwriter_embed::grpc::StageError as Error;

/// The gRPC adapter over [`synth`].
#[derive(Clone)]
pub struct SynthesizerService {
    embedder: LazyEmbedder,
    threshold: f32,
}

#[tonic::async_trait]
impl Synthesizer for SynthesizerService {
    async fn synthesize(
        &self,
        request: Request<SynthesizeRequest>,
    ) -> Result<Response<SynthesizeResponse>, Status> {
        Ok(Response::new(self.synthesize(request.into_inner()).await?))
    }
}

/// A synthesis request, checked (TGI's `Validation` in small): how many words, picked how.
pub struct Synthesis {
    /// Words wanted (the request's, or [`synth::DEFAULT_MAX_WORDS`]).
    pub max: usize,
    /// How they are picked.
    pub mode: SynthesisMode,
    /// The texts, the query and the background statistics.
    pub request: SynthesizeRequest,
}

impl TryFrom<SynthesizeRequest> for Synthesis {
    type Error = Invalid;

    fn try_from(r: SynthesizeRequest) -> Result<Self, Invalid> {
        if r.max_words > MAX_WORDS_LIMIT {
            let message = format!("max_words is limited to {MAX_WORDS_LIMIT}");
            return Err(Invalid::new("max_words", message));
        }
        let max = match r.max_words {
            0 => synth::DEFAULT_MAX_WORDS,
            n => n as usize,
        };
        let mode = SynthesisMode::try_from(r.mode)
            .map_err(|_| Invalid::new("mode", format!("unknown synthesis mode {}", r.mode)))?;
        Ok(Self {
            max,
            mode,
            request: r,
        })
    }
}

impl SynthesizerService {
    async fn synthesize(&self, r: SynthesizeRequest) -> Result<SynthesizeResponse, Error> {
        let Synthesis {
            max,
            mode,
            request: r,
        } = r.try_into()?;
        let threshold = self.threshold;
        let context = mode == SynthesisMode::Context;
        let words = self
            .embedder
            .run_if(context, move |embedder| {
                let docs: Vec<&str> = r.documents.iter().map(String::as_str).collect();
                let background = r.background.as_ref().map(|b| synth::Background {
                    documents: b.documents,
                    document_frequency: &b.document_frequency,
                });
                match embedder {
                    None => Ok(synth::important_words(&docs, max, background)),
                    Some(e) => {
                        let entries: Vec<&str> = r.entries.iter().map(String::as_str).collect();
                        synth::context_words(&r.query, &entries, &docs, max, background, |w, q| {
                            close_words(e, w, q, threshold)
                        })
                    }
                }
            })
            .await?;
        Ok(SynthesizeResponse {
            words: words
                .into_iter()
                .map(|w| ImportantWord {
                    word: w.word,
                    frequency: w.frequency,
                    idf: w.idf,
                })
                .collect(),
        })
    }
}

/// Serves the synthesizer on `listener` until `shutdown`; SERVING once the embedding model
/// (for SynCtx) is loaded.
pub async fn serve(
    config: SynthesizerConfig,
    model_dir: PathBuf,
    listener: impl Into<ghostwriter_transport::Listener>,
    shutdown: Shutdown,
    transport: &Transport,
) -> anyhow::Result<()> {
    let (server, routes) = StageServer::new("ghostwriter.v1.Synthesizer", transport).await;
    let cell = LazyEmbedder::default();
    let service = SynthesizerService {
        embedder: cell.clone(),
        threshold: config.synthesis.word_similarity,
    };
    let loader = cell.clone().load(config.embedder.clone(), model_dir);
    let routes = routes
        .add_service(SynthesizerServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES));
    server.serve_after(routes, listener, shutdown, loader).await
}
