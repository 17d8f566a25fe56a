//! Summarizer stage: summaries of the ranked entries.
//!
//! - `SumCtxInd`: a context-independent summary written by the instruction LLM. The LLM is the
//!   generator stage's (called over gRPC), so LLM weights live only on generator workers.
//! - `SumCtx`: what in the entries matters for the document being written. The paper learns it
//!   from weak labels (for each snippet of the true document, the most similar not-yet-picked
//!   snippet of the ranked entries). At serving time the true document is unknown, so the
//!   immediate context stands in for it: the entries' snippets most similar to the immediate
//!   context (all-MiniLM-L6-v2 cosine), most similar first, no repeats, within a character
//!   budget. The LLM variant (`SUMMARY_MODE_CONTEXT_LLM`) asks the LLM for the same thing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_common::stage::StageKind;
use ghostwriter_common::status::Invalid;
use ghostwriter_common::{BASE_ADAPTER, MAX_MESSAGE_BYTES, deadline};
use ghostwriter_discovery::{Balancer, DiscoveryArgs, EndpointSet};
use ghostwriter_embed::grpc::StageError;
use ghostwriter_embed::{CachedEmbedder, EmbedError, EmbedderArgs, LazyEmbedder};
use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::generator_client::GeneratorClient;
use ghostwriter_proto::v1::summarizer_server::{Summarizer, SummarizerServer};
use ghostwriter_proto::v1::{
    GenerateRequest, GenerationParams, RankedEntry, SummarizeRequest, SummarizeResponse,
    SummaryMode, TaskInput,
};
use ghostwriter_transport::{StageServer, Transport, client};
use tonic::{Request, Response, Status};

/// Summarizer settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Summarizer")]
pub struct SummarizerConfig {
    /// Generator endpoints that run the instruction LLM: URLs (comma-separated), or one
    /// dns:///HOST:PORT naming a headless Service; ignored with --etcd (the generators
    /// registered there are used), as in the orchestrator.
    #[arg(long, env = "GHOSTWRITER_GENERATOR_URL", default_value = "http://127.0.0.1:50055")]
    pub generator_url: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub summary: SummaryOptions,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub embedder: EmbedderArgs,
    /// Where to discover the generators (from `serve --etcd ...`/`--dns-*`).
    #[arg(skip)]
    pub discovery: DiscoveryArgs,
}

/// What summaries are like (shared by `serve summarizer` and the embedded topology).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Summaries")]
pub struct SummaryOptions {
    /// Summary length in tokens when the request sets none.
    #[arg(long, env = "GHOSTWRITER_SUMMARY_TOKENS", default_value_t = 96)]
    pub summary_tokens: u32,
    /// Beams of the LLM summary's beam search (the paper decodes its summaries with 4); 1 =
    /// greedy. At most the generators' --max-running.
    #[arg(
        long,
        env = "GHOSTWRITER_SUMMARY_NUM_BEAMS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=ghostwriter_common::MAX_BEAMS as i64)
    )]
    pub summary_num_beams: u32,
    /// Character budget of a context-dependent (SumCtx) summary when the request sets none.
    #[arg(long, env = "GHOSTWRITER_SUMMARY_CHARS", default_value_t = DEFAULT_SUMMARY_CHARS)]
    pub summary_chars: u32,
    /// The generators' adapter the LLM summary is written with: `base` (the base model, as the
    /// paper's summaries, so its rows stay reproducible), empty for the generators' default
    /// (the shipped adapter where it applies), or an adapter's name. A candle generator
    /// started with --adapter serves no base model: set it empty there.
    #[arg(
        long,
        env = "GHOSTWRITER_SUMMARY_ADAPTER",
        default_value = BASE_ADAPTER
    )]
    pub summary_adapter: String,
}

/// Default SumCtx budget: about two snippets, the length of a typical review's picks.
pub const DEFAULT_SUMMARY_CHARS: u32 = 600;

/// SumCtx: snippets of `entries` most similar to `query`, most similar first, each at most once,
/// until `budget` characters (a snippet that does not fit is skipped).
pub fn context_summary(
    embedder: &CachedEmbedder,
    query: &str,
    entries: &[RankedEntry],
    budget: usize,
) -> anyhow::Result<String> {
    let mut seen = std::collections::HashSet::new();
    let snippets: Vec<String> = entries
        .iter()
        .flat_map(|e| ghostwriter_common::text::snippets(&e.text))
        .filter(|s| seen.insert(s.clone()))
        .collect();
    let refs: Vec<&str> = snippets.iter().map(String::as_str).collect();
    let scores = embedder.scores(query, &refs)?;
    let mut order: Vec<usize> = (0..snippets.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut picked = Vec::new();
    let mut used = 0;
    for i in order {
        let n = snippets[i].chars().count();
        if used + n > budget {
            continue;
        }
        used += n + 1;
        picked.push(snippets[i].as_str());
    }
    Ok(picked.join(" "))
}

/// The instruction for the LLM variant of `SumCtx`.
pub fn context_instruction(query: &str) -> String {
    format!(
        "{}\n\nThe person is now writing a new text that starts: \"{query}\". Summarize only what in the passages matters for that new text.",
        INSTRUCTION
    )
}

/// Characters of entries given to the LLM (the paper's ranked-entry budget).
const MAX_INPUT_CHARS: usize = 2_500;
/// Longest summary a request may ask for.
const MAX_SUMMARY_TOKENS: u32 = 512;

/// The instruction for `SumCtxInd`.
pub const INSTRUCTION: &str = "Summarize the past passages above, all written by the same person, in two or \
     three sentences: what they write about, what they like or dislike, and how they write.";

/// The entries' texts within the character budget, in rank order; the generator renders them as
/// it renders a personalized prompt's past passages, as caller text (never markup).
pub fn passages(entries: &[RankedEntry]) -> Vec<String> {
    let mut out = Vec::new();
    let mut left = MAX_INPUT_CHARS;
    for e in entries {
        if left == 0 {
            break;
        }
        let text: String = e.text.chars().take(left).collect();
        left -= text.chars().count();
        out.push(text);
    }
    out
}

/// Why a summary failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request fails its check, or the embedding model (as in the ranker).
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The generator's answer, passing through with its code and details, marked as a
    /// downstream failure (not held against this summarizer by its callers).
    #[error("{}", .0.message())]
    Generator(tonic::Status),
}

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Self::Stage(e.into())
    }
}

impl From<EmbedError> for Error {
    fn from(e: EmbedError) -> Self {
        Self::Stage(e.into())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Stage(e) => e.into(),
            Error::Generator(status) => status,
        }
    }
}

/// The gRPC adapter.
#[derive(Clone)]
pub struct SummarizerService {
    generators: EndpointSet,
    balancer: Arc<Balancer>,
    default_tokens: u32,
    num_beams: u32,
    default_chars: u32,
    adapter: String,
    embedder: LazyEmbedder,
}

#[tonic::async_trait]
impl Summarizer for SummarizerService {
    async fn summarize(
        &self,
        request: Request<SummarizeRequest>,
    ) -> Result<Response<SummarizeResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        let summary = self.summarize(request.into_inner(), deadline).await?;
        Ok(Response::new(SummarizeResponse { summary }))
    }
}

/// A summary request, checked: its mode known, its length within the limit, the query there
/// when the mode needs it.
pub struct Summary {
    /// How the summary is made.
    pub mode: SummaryMode,
    /// The entries, the query, the lengths and the salt.
    pub request: SummarizeRequest,
}

impl TryFrom<SummarizeRequest> for Summary {
    type Error = Invalid;

    fn try_from(r: SummarizeRequest) -> Result<Self, Invalid> {
        if r.max_new_tokens > MAX_SUMMARY_TOKENS {
            let message = format!("max_new_tokens is limited to {MAX_SUMMARY_TOKENS}");
            return Err(Invalid::new("max_new_tokens", message));
        }
        let mode = SummaryMode::try_from(r.mode)
            .map_err(|_| Invalid::new("mode", format!("unknown summary mode {}", r.mode)))?;
        let needs_query = matches!(mode, SummaryMode::Context | SummaryMode::ContextLlm);
        if needs_query && r.query.trim().is_empty() {
            return Err(Invalid::new(
                "query",
                "a context-dependent summary needs the query (immediate context)",
            ));
        }
        Ok(Self { mode, request: r })
    }
}

impl SummarizerService {
    async fn summarize(
        &self,
        r: SummarizeRequest,
        deadline: Option<Instant>,
    ) -> Result<String, Error> {
        let Summary { mode, request: r } = r.try_into()?;
        if r.entries.iter().all(|e| e.text.trim().is_empty()) {
            return Ok(String::new());
        }
        if mode == SummaryMode::Context {
            let budget = if r.budget_chars == 0 {
                self.default_chars
            } else {
                r.budget_chars
            } as usize;
            let summary = self
                .embedder
                .run(move |embedder| context_summary(embedder, &r.query, &r.entries, budget))
                .await?;
            return Ok(summary);
        }
        let tokens = if r.max_new_tokens == 0 {
            self.default_tokens
        } else {
            r.max_new_tokens
        };
        let instruction = if mode == SummaryMode::ContextLlm {
            context_instruction(&r.query)
        } else {
            INSTRUCTION.to_string()
        };
        let generate = GenerateRequest {
            input: Some(Input::Task(TaskInput {
                passages: passages(&r.entries),
                instruction,
            })),
            params: Some(GenerationParams {
                max_new_tokens: tokens,
                num_beams: self.num_beams,
                ..Default::default()
            }),
            // The user's salt: this summary's prompt shares no cached block with another
            // user's.
            cache_salt: r.cache_salt.clone(),
            adapter: self.adapter.clone(),
            ..Default::default()
        };
        // Generation is idempotent: an unavailable generator is retried on another one.
        let what = "generator (for the summarizer)";
        let response = self
            .balancer
            .call(
                &self.generators,
                what,
                |tried| self.generators.pick(tried),
                true,
                |e| {
                    let request = deadline::request(generate.clone(), deadline);
                    async move {
                        let mut c = GeneratorClient::new(e.channel.clone());
                        Ok(c.generate(request?).await?.into_inner())
                    }
                },
            )
            .await
            .map_err(|s| Error::Generator(client::mark_downstream(what, s)))?;
        Ok(response.text.trim().to_string())
    }
}

/// Serves the summarizer on `listener` until `shutdown`; SERVING once the embedding model
/// (for SumCtx) is loaded.
pub async fn serve(
    config: SummarizerConfig,
    model_dir: PathBuf,
    listener: impl Into<ghostwriter_transport::Listener>,
    shutdown: Shutdown,
    transport: &Transport,
) -> anyhow::Result<()> {
    let (server, routes) = StageServer::new("ghostwriter.v1.Summarizer", transport).await;
    let generators = config.discovery.stage_set(
        StageKind::Generator,
        &config.generator_url,
        transport.dialer(),
    )?;
    let cell = LazyEmbedder::default();
    let service = SummarizerService {
        generators,
        balancer: Arc::default(),
        default_tokens: config.summary.summary_tokens,
        num_beams: config.summary.summary_num_beams,
        default_chars: config.summary.summary_chars,
        adapter: config.summary.summary_adapter.clone(),
        embedder: cell.clone(),
    };
    let loader = cell.clone().load(config.embedder.clone(), model_dir);
    let routes = routes
        .add_service(SummarizerServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES));
    server.serve_after(routes, listener, shutdown, loader).await
}
