//! Orchestrator: the public `Ghostwriter` service. Each write goes Retrieve → Rank →
//! (Summarize ∥ Synthesize) → Generate over gRPC, under the caller's deadline, and comes back
//! with its provenance: which documents were used, the summary, the important words, the preset
//! and each stage's latency.

pub mod auth;
mod distinguish;
mod error;
pub mod preset;
pub mod salt;
pub mod stages;
pub mod tokens;

use std::pin::Pin;
use std::time::{Duration, Instant};

use ghostwriter_common::ingest::{self, IngestBudget};
use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_common::stage::StageKind;
use ghostwriter_common::status::Invalid;
use ghostwriter_common::text::document_text;
use ghostwriter_common::{BASE_ADAPTER, MAX_DOCUMENT_CHARS, MAX_MESSAGE_BYTES, deadline};
use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::ghostwriter_server::{Ghostwriter, GhostwriterServer};
use ghostwriter_proto::v1::write_stream_response::Event;
use ghostwriter_proto::v1::{
    DeleteRequest, DeleteResponse, DistinguishRequest, DistinguishResponse, GenerateRequest,
    GenerateResponse, GeneratorsAdapters, InfoRequest, InfoResponse, IngestRequest, IngestResponse,
    ListAdaptersRequest, ListPresetsRequest, ListPresetsResponse, LoadAdapterRequest,
    LoadAdapterResponse, PersonalizedInput, PresetInfo, Provenance, RankRequest, RetrieveRequest,
    StageLatency, SummarizeRequest, SummaryMode, SynthesisMode, SynthesizeRequest,
    UnloadAdapterRequest, UnloadAdapterResponse, WriteRequest, WriteResponse, WriteStreamResponse,
};
use ghostwriter_transport::{Listener, StageServer, Transport};
use prometheus::{Histogram, HistogramOpts};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use auth::{Auth, AuthArgs};
pub use error::Error;
pub use preset::{PRESETS, Preset};

/// The paper's immediate-context length, in characters.
pub const DEFAULT_CONTEXT_CHARS: usize = 150;
/// Longest immediate context a request may ask for.
const MAX_CONTEXT_CHARS: u32 = 20_000;
/// Longest user or document id (the same limit as ingest's).
const MAX_USER_ID: usize = ingest::MAX_ID_BYTES;

/// Corpus of the synthesizer's IDF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdfCorpus {
    /// Every document in the retriever's index (its shard).
    Index,
    /// The user's own earlier documents (with a short history, `IDF < 1.5` drops every word).
    User,
}

/// How writes run (shared by `serve orchestrator` and the embedded topology).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Writes")]
pub struct WriteDefaults {
    /// Past documents fetched per write (the ranker orders them; the synthesizer's corpus).
    #[arg(long, env = "GHOSTWRITER_MAX_CANDIDATES", default_value_t = 200)]
    pub max_candidates: u32,
    /// Corpus of the synthesizer's IDF: the whole index (every user's documents, from the
    /// retriever) or, as before, the user's own earlier documents.
    #[arg(
        long,
        env = "GHOSTWRITER_IDF_CORPUS",
        value_enum,
        default_value_t = IdfCorpus::Index
    )]
    pub idf_corpus: IdfCorpus,
    /// Deadline of a write whose caller sets none, in seconds.
    #[arg(long = "request-timeout", env = "GHOSTWRITER_REQUEST_TIMEOUT", default_value_t = 300)]
    pub request_timeout_secs: u64,
}

/// Where the stages are, and request defaults.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Stages")]
pub struct OrchestratorConfig {
    /// Retriever endpoints (comma-separated; with --retriever-shards N, the i-th serves shard i,
    /// and `|` separates the replicas of one shard: `a0|a1,b0|b1`).
    #[arg(long, env = "GHOSTWRITER_RETRIEVER_URL", default_value = "http://127.0.0.1:50052")]
    pub retriever_url: String,
    /// Ranker endpoints (comma-separated).
    #[arg(long, env = "GHOSTWRITER_RANKER_URL", default_value = "http://127.0.0.1:50053")]
    pub ranker_url: String,
    /// Summarizer endpoints (comma-separated).
    #[arg(long, env = "GHOSTWRITER_SUMMARIZER_URL", default_value = "http://127.0.0.1:50054")]
    pub summarizer_url: String,
    /// Generator endpoints (comma-separated).
    #[arg(long, env = "GHOSTWRITER_GENERATOR_URL", default_value = "http://127.0.0.1:50055")]
    pub generator_url: String,
    /// Synthesizer endpoints (comma-separated).
    #[arg(long, env = "GHOSTWRITER_SYNTHESIZER_URL", default_value = "http://127.0.0.1:50056")]
    pub synthesizer_url: String,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub writes: WriteDefaults,
    /// Most new tokens a write may ask for: set it as the generators' --max-new-tokens-limit
    /// (the same variable), so a write over it is refused before any stage runs.
    #[arg(long, env = "GHOSTWRITER_MAX_NEW_TOKENS_LIMIT", default_value_t = 1024)]
    pub max_new_tokens_limit: u32,
    /// Retriever shards: a user's documents live on shard `rendezvous(user_id, N)`. Changing N
    /// moves users between shards (docs/operations.md, "Changing the shard count").
    #[arg(long, env = "GHOSTWRITER_RETRIEVER_SHARDS", default_value_t = 1)]
    pub retriever_shards: u32,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub auth: AuthArgs,
    /// Serve without authentication on a non-loopback address (anyone who can reach it may read
    /// and write any user's documents). Without it, authentication is off only on loopback.
    #[arg(long, env = "GHOSTWRITER_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Seconds a generator may send nothing, once its stream has started, before the stream is
    /// taken for hung and continued on another generator.
    #[arg(long, env = "GHOSTWRITER_GENERATOR_STALL_TIMEOUT_SECS", default_value_t = 15.0)]
    pub generator_stall_timeout_secs: f64,
    /// Seconds a stream whose generator failed keeps looking for another (one coming back, or
    /// a new one found by discovery) before it fails with UNAVAILABLE; never past the write's
    /// deadline.
    #[arg(long, env = "GHOSTWRITER_GENERATOR_FAILOVER_SECS", default_value_t = 30.0)]
    pub generator_failover_secs: f64,
    /// The generators' adapter the LLM path of Distinguish scores with: `base` (the base model,
    /// as the paper's author-distinction rows), empty for the generators' default, or an
    /// adapter's name.
    #[arg(
        long,
        env = "GHOSTWRITER_DISTINGUISH_ADAPTER",
        default_value = BASE_ADAPTER
    )]
    pub distinguish_adapter: String,
    /// File holding the key (at least 32 bytes) of the prefix cache's per-user salt, a keyed
    /// hash of the user id set on every generation, so no user's request reuses another user's
    /// cached blocks. Give every orchestrator replica the same file; unset = a random key per
    /// process (a user's writes then share cached blocks only through one replica).
    #[arg(long, env = "GHOSTWRITER_CACHE_SALT_KEY_FILE")]
    pub cache_salt_key_file: Option<std::path::PathBuf>,
    /// Where to discover the stages (from `serve --etcd ...`); empty = the static URLs above.
    #[arg(skip)]
    pub discovery: ghostwriter_discovery::DiscoveryArgs,
    /// MiB of ingest batches the public API holds at once (`serve --ingest-budget-mb`; 0 = the
    /// default).
    #[arg(skip)]
    pub ingest_budget_mb: usize,
}

/// The orchestrator's own metrics.
#[derive(Clone)]
struct OrchestratorMetrics {
    /// Time of a write not spent waiting on stages.
    overhead: Histogram,
}

impl OrchestratorMetrics {
    fn register(metrics: &ghostwriter_transport::Metrics) -> Self {
        let overhead = Histogram::with_opts(
            HistogramOpts::new(
                "ghostwriter_orchestrator_overhead_seconds",
                "Write time not spent waiting on stages",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05,
            ]),
        )
        .expect("metric definitions are valid");
        Self {
            overhead: metrics.register(overhead),
        }
    }
}

/// The public service.
#[derive(Clone)]
pub struct OrchestratorService {
    stages: std::sync::Arc<stages::Stages>,
    config: OrchestratorConfig,
    auth: Auth,
    salt: salt::CacheSalt,
    streams: stages::StreamSettings,
    tokens: std::sync::Arc<tokens::RecentTokens>,
    ingest_budget: IngestBudget,
    metrics: OrchestratorMetrics,
}

/// A write request, checked (TGI's `Validation` in small): its ids, its start, its preset and
/// its options. The caller's grant and this orchestrator's limits apply after, in `plan`.
struct Write {
    /// The request, its options taken out.
    request: WriteRequest,
    preset: Preset,
    options: ghostwriter_proto::v1::WriteOptions,
    /// Characters of title and start used as the immediate context.
    context_chars: usize,
}

impl TryFrom<WriteRequest> for Write {
    type Error = Invalid;

    fn try_from(mut r: WriteRequest) -> Result<Self, Invalid> {
        check_ids(&r.user_id, &r.doc_id)?;
        if r.title.trim().is_empty() && r.start.trim().is_empty() {
            return Err(Invalid::new(
                "start",
                "the document start is empty: set start (and optionally title)",
            ));
        }
        let chars = r.title.chars().count() + r.start.chars().count();
        if chars > MAX_DOCUMENT_CHARS {
            return Err(Invalid::new(
                "start",
                format!("title and start are {chars} characters; at most {MAX_DOCUMENT_CHARS}"),
            ));
        }
        let preset = preset::find(&r.preset).ok_or_else(|| {
            let known = preset::names();
            let named = ghostwriter_common::status::quote(&r.preset);
            Invalid::new(
                "preset",
                format!("unknown preset {named}; known presets: {known}"),
            )
        })?;
        let o = r.options.take().unwrap_or_default();
        if let Some(g) = &o.generation {
            ghostwriter_common::check_sampling(g).map_err(|e| e.under("options"))?;
            if g.stop.len() > 16 || g.stop.iter().any(|s| s.len() > 256) {
                return Err(Invalid::new(
                    "options.generation.stop",
                    "generation: at most 16 stop strings of at most 256 bytes",
                ));
            }
        }
        if o.context_chars > MAX_CONTEXT_CHARS {
            let message = format!("context_chars is limited to {MAX_CONTEXT_CHARS}");
            return Err(Invalid::new("options.context_chars", message));
        }
        if r.adapter.len() > 128 {
            return Err(Invalid::new(
                "adapter",
                "an adapter name has at most 128 bytes",
            ));
        }
        let context_chars = match o.context_chars {
            0 => DEFAULT_CONTEXT_CHARS,
            n => n as usize,
        };
        Ok(Self {
            request: r,
            preset,
            options: o,
            context_chars,
        })
    }
}

/// A validated write with everything resolved.
struct Plan {
    preset: Preset,
    user_id: String,
    context: String,
    timestamp: Option<i64>,
    doc_id: String,
    generation: ghostwriter_proto::v1::GenerationParams,
    ranked_entries: bool,
    summary: Option<SummaryMode>,
    synthesis: Option<SynthesisMode>,
    retrieval: bool,
    deadline: Option<Instant>,
    started: Instant,
    /// The consistency token retrieval waits for (empty: none).
    consistency_token: String,
    /// The generator adapter named (empty: the generators' default).
    adapter: String,
}

/// Share of the time left that the stages before generation may use; the rest is kept for
/// generation, so a slow retrieval or summary fails fast instead of starving the generator.
const CONTEXT_SHARE: f64 = 0.5;

impl Plan {
    /// The deadline of a stage before generation: the caller's deadline split so that at least
    /// half of the time left remains for the generator.
    fn context_deadline(&self) -> Option<Instant> {
        let deadline = self.deadline?;
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        Some(now + left.mul_f64(CONTEXT_SHARE))
    }
}

/// The immediate context: title and start joined, cut to `chars` characters.
pub fn immediate_context(title: &str, start: &str, chars: usize) -> String {
    let joined = match (title.trim().is_empty(), start.is_empty()) {
        (true, _) => start.to_string(),
        (false, true) => title.trim().to_string(),
        (false, false) => format!("{}\n{}", title.trim(), start),
    };
    joined.chars().take(chars).collect()
}

/// The user id is set, and neither id is longer than [`MAX_USER_ID`] bytes.
fn check_ids(user_id: &str, doc_id: &str) -> Result<(), Invalid> {
    ingest::check_id("user_id", user_id)?;
    // A write's doc_id may be blank (the document is not stored), but not too long.
    if doc_id.len() > MAX_USER_ID {
        return Err(Invalid::new(
            "doc_id",
            format!("doc_id is limited to {MAX_USER_ID} bytes"),
        ));
    }
    Ok(())
}

/// Records that `stage` took `took`.
fn timed_for(latencies: &mut Vec<StageLatency>, stage: StageKind, took: Duration) {
    latencies.push(StageLatency {
        stage: stage.name().into(),
        millis: took.as_secs_f64() * 1e3,
    });
}

/// Records that `stage` ran from `since` until now.
fn timed(latencies: &mut Vec<StageLatency>, stage: StageKind, since: Instant) {
    timed_for(latencies, stage, since.elapsed());
}

impl OrchestratorService {
    /// Clients of the stages in `config` over `transport` (connections are made lazily); a
    /// credential file that does not load is an error.
    pub fn new(config: OrchestratorConfig, transport: &Transport) -> anyhow::Result<Self> {
        let auth = config.auth.load()?;
        let stages = stages::Stages::new(&config, &transport.dialer())?;
        let seconds = |flag: &str, secs: f64| {
            Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| anyhow::anyhow!("{flag} must be a positive number of seconds"))
        };
        let streams = stages::StreamSettings {
            stall: seconds(
                "--generator-stall-timeout-secs",
                config.generator_stall_timeout_secs,
            )?,
            window: seconds("--generator-failover-secs", config.generator_failover_secs)?,
        };
        Ok(Self {
            salt: salt::CacheSalt::load(config.cache_salt_key_file.as_deref())?,
            streams,
            stages: std::sync::Arc::new(stages),
            ingest_budget: IngestBudget::new(config.ingest_budget_mb),
            metrics: OrchestratorMetrics::register(&transport.metrics),
            config,
            auth,
            tokens: Default::default(),
        })
    }

    /// The token a read of `user` waits for: the request's, or that of the user's latest write
    /// through this orchestrator, whichever is later (read your writes).
    pub(crate) fn read_token(&self, user: &str, requested: &str) -> Result<String, Invalid> {
        let requested = if requested.is_empty() {
            None
        } else {
            Some(requested.parse::<ghostwriter_common::consistency::Token>()?)
        };
        Ok(self
            .tokens
            .for_read(user, requested)
            .map(|t| t.to_string())
            .unwrap_or_default())
    }

    /// The caller's deadline, or `--request-timeout` from `started` when it sets none.
    fn deadline(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        started: Instant,
    ) -> Option<Instant> {
        deadline::from_metadata(metadata, started).or_else(|| {
            Some(started + Duration::from_secs(self.config.writes.request_timeout_secs))
        })
    }

    fn plan(&self, request: Request<WriteRequest>) -> Result<Plan, Error> {
        let started = Instant::now();
        let deadline = self.deadline(request.metadata(), started);
        let grant = self.auth.grant(request.metadata())?;
        let Write {
            request: r,
            preset,
            options: o,
            context_chars,
        } = request.into_inner().try_into()?;
        grant.allow(&r.user_id)?;
        // Generation settings are checked before any stage runs.
        let limit = self.config.max_new_tokens_limit;
        if o.generation
            .as_ref()
            .is_some_and(|g| g.max_new_tokens > limit)
        {
            return Err(Invalid::new(
                "options.generation.max_new_tokens",
                format!("generation: max_new_tokens is limited to {limit}"),
            )
            .into());
        }
        let context = immediate_context(&r.title, &r.start, context_chars);
        let retrieval = preset.ranking.is_some() && !o.disable_retrieval;
        let consistency_token = self.read_token(&r.user_id, &r.consistency_token)?;
        Ok(Plan {
            consistency_token,
            adapter: r.adapter,
            preset,
            user_id: r.user_id,
            context,
            timestamp: r.timestamp,
            doc_id: r.doc_id,
            generation: o.generation.unwrap_or_default(),
            ranked_entries: retrieval && preset.ranked_entries && !o.disable_ranked_entries,
            summary: preset.summary.filter(|_| retrieval && !o.disable_summary),
            synthesis: preset
                .synthesis
                .filter(|_| retrieval && !o.disable_synthesis),
            retrieval,
            deadline,
            started,
        })
    }

    /// What a write would hand the generator, from the real stages before generation (used to
    /// build fine-tuning examples from exactly the prompts that are served).
    pub async fn generator_input(
        &self,
        request: WriteRequest,
    ) -> Result<(GenerateRequest, Provenance), Error> {
        let plan = self.plan(Request::new(request))?;
        let prepared = self.prepare(&plan).await?;
        Ok((prepared.generate, prepared.provenance))
    }

    /// Runs every stage before generation.
    async fn prepare(&self, plan: &Plan) -> Result<Prepared, Error> {
        let s = &self.stages;
        let mut provenance = Provenance {
            preset: plan.preset.name.to_string(),
            immediate_context: plan.context.clone(),
            ..Default::default()
        };
        let mut input = PersonalizedInput {
            passage_start: plan.context.clone(),
            omit_passage_start: !plan.preset.passage_start,
            ..Default::default()
        };
        let mut best_entry = None;
        if plan.retrieval {
            let t = Instant::now();
            let retrieved = s
                .retrieve(
                    RetrieveRequest {
                        user_id: plan.user_id.clone(),
                        query: plan.context.clone(),
                        before_timestamp: plan.timestamp,
                        current_doc_id: plan.doc_id.clone(),
                        limit: self.config.writes.max_candidates,
                        term_statistics: plan.synthesis.is_some()
                            && self.config.writes.idf_corpus == IdfCorpus::Index,
                        consistency_token: plan.consistency_token.clone(),
                    },
                    plan.context_deadline(),
                )
                .await?;
            timed(&mut provenance.latencies, StageKind::Retriever, t);
            provenance.history_size = retrieved.total_history;
            let background = retrieved.background;
            let candidates = retrieved.documents;
            if !candidates.is_empty() {
                let corpus: Vec<String> = candidates
                    .iter()
                    .filter_map(|c| c.document.as_ref())
                    .map(|d| document_text(&d.title, &d.text))
                    .collect();
                let t = Instant::now();
                let entries = s
                    .rank(
                        RankRequest {
                            query: plan.context.clone(),
                            candidates,
                            strategy: plan.preset.ranking.unwrap_or_default() as i32,
                            budget_chars: 0,
                        },
                        plan.context_deadline(),
                    )
                    .await?
                    .entries;
                timed(&mut provenance.latencies, StageKind::Ranker, t);

                best_entry = entries.first().map(|e| e.text.clone());
                let summarize = async {
                    let Some(mode) = plan.summary else {
                        return Ok(None);
                    };
                    let t = Instant::now();
                    let request = SummarizeRequest {
                        entries: entries.clone(),
                        max_new_tokens: 0,
                        mode: mode as i32,
                        query: plan.context.clone(),
                        budget_chars: 0,
                        cache_salt: self.salt.of(&plan.user_id),
                    };
                    let summary = s.summarize(request, plan.context_deadline()).await?;
                    Ok::<_, Error>(Some((summary.summary, t.elapsed())))
                };
                let synthesize = async {
                    let Some(mode) = plan.synthesis else {
                        return Ok(None);
                    };
                    let t = Instant::now();
                    let request = SynthesizeRequest {
                        documents: corpus,
                        max_words: 0,
                        mode: mode as i32,
                        query: plan.context.clone(),
                        entries: entries.iter().map(|e| e.text.clone()).collect(),
                        background,
                    };
                    let words = s.synthesize(request, plan.context_deadline()).await?;
                    Ok::<_, Error>(Some((words.words, t.elapsed())))
                };
                let (summary, words) = tokio::try_join!(summarize, synthesize)?;
                if let Some((summary, took)) = summary {
                    timed_for(&mut provenance.latencies, StageKind::Summarizer, took);
                    input.summary = summary.clone();
                    provenance.summary = summary;
                }
                if let Some((words, took)) = words {
                    timed_for(&mut provenance.latencies, StageKind::Synthesizer, took);
                    input.important_words = words.into_iter().map(|w| w.word).collect();
                    provenance.important_words = input.important_words.clone();
                }
                if plan.ranked_entries || plan.summary.is_some() || !plan.preset.generate {
                    provenance.doc_ids = entries.iter().map(|e| e.doc_id.clone()).collect();
                }
                if plan.ranked_entries {
                    input.past_passages = entries.into_iter().map(|e| e.text).collect();
                }
            }
        }
        provenance.no_history = provenance.history_size == 0;
        let generate = GenerateRequest {
            input: Some(Input::Personalized(input)),
            params: Some(plan.generation.clone()),
            cache_salt: self.salt.of(&plan.user_id),
            adapter: plan.adapter.clone(),
            ..Default::default()
        };
        Ok(Prepared {
            generate,
            provenance,
            best_entry,
        })
    }

    fn finish(
        &self,
        plan: &Plan,
        mut provenance: Provenance,
        generation: GenerateResponse,
        generator_took: Option<Duration>,
    ) -> WriteResponse {
        if let Some(took) = generator_took {
            timed_for(&mut provenance.latencies, StageKind::Generator, took);
        }
        provenance.total_millis = plan.started.elapsed().as_secs_f64() * 1e3;
        // The generator names its model `BASE+NAME@SHA` when an adapter wrote the text.
        provenance.adapter = generation
            .model
            .split_once('+')
            .map(|(_, a)| a.to_string())
            .unwrap_or_default();
        self.metrics
            .overhead
            .observe(overhead_millis(&provenance) / 1e3);
        WriteResponse {
            text: generation.text.clone(),
            document: format!("{}{}", plan.context, generation.text),
            provenance: Some(provenance),
            generation: Some(generation),
        }
    }
}

/// Time of a write not spent waiting on stages: its total minus the stage latencies, the
/// summarizer and synthesizer (which run in parallel) counted once.
pub fn overhead_millis(p: &Provenance) -> f64 {
    let mut sequential = 0.0;
    let mut parallel: f64 = 0.0;
    let parallel_stages = [StageKind::Summarizer.name(), StageKind::Synthesizer.name()];
    for l in &p.latencies {
        if parallel_stages.contains(&l.stage.as_str()) {
            parallel = parallel.max(l.millis);
        } else {
            sequential += l.millis;
        }
    }
    (p.total_millis - sequential - parallel).max(0.0)
}

/// What the stages before generation produced.
struct Prepared {
    generate: GenerateRequest,
    provenance: Provenance,
    /// The top-ranked entry (for `copy-best`).
    best_entry: Option<String>,
}

/// The `copy-best` baseline's "generation": the top-ranked entry, after a space.
fn copy_best(best: Option<String>) -> GenerateResponse {
    GenerateResponse {
        text: best.map(|b| format!(" {b}")).unwrap_or_default(),
        model: "copy-best".into(),
        finish_reason: ghostwriter_proto::v1::FinishReason::Stop as i32,
        ..Default::default()
    }
}

fn preset_info(p: &Preset) -> PresetInfo {
    PresetInfo {
        name: p.name.into(),
        description: p.description.into(),
        ranking: p.ranking.map_or(0, |r| r as i32),
        ranked_entries: p.ranked_entries,
        summary: p.summary.map_or(0, |m| m as i32),
        synthesis: p.synthesis.map_or(0, |m| m as i32),
        passage_start: p.passage_start,
        generate: p.generate,
    }
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The public API's handlers as domain calls: each returns the orchestrator's [`Error`], which
/// the gRPC adapter below maps to a `Status` once.
impl OrchestratorService {
    async fn info(&self, request: Request<InfoRequest>) -> Result<InfoResponse, Error> {
        let metadata = request.metadata();
        let deadline = self.deadline(metadata, Instant::now());
        self.auth.grant(metadata)?;
        let generator = self.stages.generator_info(deadline).await?;
        Ok(InfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            generator: Some(generator),
            default_preset: preset::DEFAULT_PRESET.into(),
            presets: PRESETS.iter().map(|p| p.name.to_string()).collect(),
            authentication: self.auth.enabled(),
        })
    }

    async fn list_presets(
        &self,
        request: Request<ListPresetsRequest>,
    ) -> Result<ListPresetsResponse, Error> {
        self.auth.grant(request.metadata())?;
        Ok(ListPresetsResponse {
            presets: PRESETS.iter().map(preset_info).collect(),
            default_preset: preset::DEFAULT_PRESET.into(),
        })
    }

    /// An administrator's call: the deadline, once the caller is checked.
    fn admin(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Option<Instant>, Error> {
        self.auth.grant(metadata)?.admin()?;
        Ok(self.deadline(metadata, Instant::now()))
    }

    async fn load_adapter(
        &self,
        request: Request<LoadAdapterRequest>,
    ) -> Result<LoadAdapterResponse, Error> {
        let deadline = self.admin(request.metadata())?;
        let generators = self
            .stages
            .load_adapter(request.into_inner(), deadline)
            .await?;
        Ok(LoadAdapterResponse { generators })
    }

    async fn unload_adapter(
        &self,
        request: Request<UnloadAdapterRequest>,
    ) -> Result<UnloadAdapterResponse, Error> {
        let deadline = self.admin(request.metadata())?;
        self.stages
            .unload_adapter(request.into_inner(), deadline)
            .await?;
        Ok(UnloadAdapterResponse {})
    }

    async fn list_adapters(
        &self,
        request: Request<ListAdaptersRequest>,
    ) -> Result<GeneratorsAdapters, Error> {
        let deadline = self.admin(request.metadata())?;
        let generators = self.stages.list_adapters(deadline).await?;
        Ok(GeneratorsAdapters { generators })
    }

    /// The write of a preset that generates nothing: the best-ranked entry, copied.
    fn copied(&self, plan: &Plan, prepared: Prepared) -> WriteResponse {
        let copy = copy_best(prepared.best_entry);
        self.finish(plan, prepared.provenance, copy, None)
    }

    async fn write(&self, request: Request<WriteRequest>) -> Result<WriteResponse, Error> {
        let plan = self.plan(request)?;
        let prepared = self.prepare(&plan).await?;
        if !plan.preset.generate {
            return Ok(self.copied(&plan, prepared));
        }
        let t = Instant::now();
        let generation = self
            .stages
            .generate(prepared.generate, plan.deadline)
            .await?;
        let response = self.finish(&plan, prepared.provenance, generation, Some(t.elapsed()));
        tracing::info!(user = %plan.user_id, preset = plan.preset.name, millis = response.provenance.as_ref().map_or(0.0, |p| p.total_millis), "write");
        Ok(response)
    }

    async fn write_stream(
        &self,
        request: Request<WriteRequest>,
    ) -> Result<StreamOf<WriteStreamResponse>, Error> {
        let plan = self.plan(request)?;
        let prepared = self.prepare(&plan).await?;
        if !plan.preset.generate {
            let provenance = prepared.provenance.clone();
            let done = self.copied(&plan, prepared);
            let events = [
                Event::Provenance(provenance),
                Event::Text(done.text.clone()),
                Event::Done(done),
            ];
            let stream =
                tokio_stream::iter(events.map(|e| Ok(WriteStreamResponse { event: Some(e) })));
            return Ok(Box::pin(stream));
        }
        let Prepared {
            generate,
            provenance,
            ..
        } = prepared;
        let t = Instant::now();
        let mut upstream = self
            .stages
            .generate_stream(generate, plan.deadline, self.streams)
            .await?;
        let (tx, rx) = mpsc::channel::<Result<WriteStreamResponse, Status>>(32);
        let this = self.clone();
        tokio::spawn(async move {
            let event = |e: Event| Ok(WriteStreamResponse { event: Some(e) });
            if tx
                .send(event(Event::Provenance(provenance.clone())))
                .await
                .is_err()
            {
                return;
            }
            // Dropping `upstream` when the caller goes away cancels generation downstream.
            while let Some(piece) = upstream.next().await {
                let out = match piece {
                    Ok(stages::Piece::Done(generation, resumptions)) => {
                        let mut provenance = provenance.clone();
                        provenance.generator_resumptions = resumptions;
                        let done = this.finish(&plan, provenance, generation, Some(t.elapsed()));
                        let _ = tx.send(event(Event::Done(done))).await;
                        return;
                    }
                    Ok(stages::Piece::Text(text)) if text.is_empty() => continue,
                    Ok(stages::Piece::Text(text)) => event(Event::Text(text)),
                    Err(e) => Err(e.into()),
                };
                let failed = out.is_err();
                if tx.send(out).await.is_err() || failed {
                    return;
                }
            }
            let _ = tx.send(Err(Error::StreamCut.into())).await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn distinguish(
        &self,
        request: Request<DistinguishRequest>,
    ) -> Result<DistinguishResponse, Error> {
        distinguish::distinguish(self, request).await
    }

    async fn ingest(&self, request: Request<IngestRequest>) -> Result<IngestResponse, Error> {
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        let grant = self.auth.grant(request.metadata())?;
        // Held until every shard has the batch: bounds the memory of concurrent ingests.
        let _budget = self.ingest_budget.reserve_batch(request.get_ref())?;
        let documents = request.into_inner().documents;
        for d in &documents {
            grant.allow(&d.user_id)?;
        }
        // Checked whole before any shard sees it: a rejected batch writes nothing anywhere.
        ingest::check_batch(&documents)?;
        let users: std::collections::BTreeSet<String> =
            documents.iter().map(|d| d.user_id.clone()).collect();
        let response = self.stages.ingest(documents, deadline).await?;
        if let Ok(token) = response.consistency_token.parse() {
            self.tokens.record(users.iter().map(String::as_str), token);
        }
        Ok(response)
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<DeleteResponse, Error> {
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        let grant = self.auth.grant(request.metadata())?;
        let r = request.into_inner();
        check_ids(&r.user_id, &r.doc_id)?;
        grant.allow(&r.user_id)?;
        let user = r.user_id.clone();
        let response = self.stages.delete(r, deadline).await?;
        if let Ok(token) = response.consistency_token.parse() {
            self.tokens.record([user.as_str()], token);
        }
        Ok(response)
    }
}

/// The gRPC adapter: each RPC is the domain handler of the same name, whose [`Error`] becomes
/// a `Status` here, through its one `From`.
macro_rules! grpc_adapter {
    (streams { $($stream:ident = $stream_ty:ty;)* } $($name:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl Ghostwriter for OrchestratorService {
            $(type $stream = $stream_ty;)*
            $(
                async fn $name(&self, request: Request<$req>) -> Result<Response<$resp>, Status> {
                    Ok(Response::new(OrchestratorService::$name(self, request).await?))
                }
            )*
        }
    };
}

grpc_adapter! {
    streams { WriteStreamStream = StreamOf<WriteStreamResponse>; }
    info(InfoRequest) -> InfoResponse;
    list_presets(ListPresetsRequest) -> ListPresetsResponse;
    write(WriteRequest) -> WriteResponse;
    write_stream(WriteRequest) -> StreamOf<WriteStreamResponse>;
    distinguish(DistinguishRequest) -> DistinguishResponse;
    load_adapter(LoadAdapterRequest) -> LoadAdapterResponse;
    unload_adapter(UnloadAdapterRequest) -> UnloadAdapterResponse;
    list_adapters(ListAdaptersRequest) -> GeneratorsAdapters;
    ingest(IngestRequest) -> IngestResponse;
    delete(DeleteRequest) -> DeleteResponse;
}

/// Serves the public API on `listener` until `shutdown`, over `transport`. A credential file
/// that does not load stops it at once with the reason.
pub async fn serve(
    config: OrchestratorConfig,
    listener: impl Into<Listener>,
    shutdown: Shutdown,
    transport: &Transport,
) -> anyhow::Result<()> {
    let listener = listener.into();
    // A Unix socket is private to its directory, as loopback is to the machine.
    config.check(
        listener
            .tcp_addr()
            .map_or(std::net::IpAddr::from([127, 0, 0, 1]), |a| a.ip()),
    )?;
    let service = OrchestratorService::new(config, transport)?;
    let (server, routes) = StageServer::new("ghostwriter.v1.Ghostwriter", transport).await;
    let routes = routes.add_service(
        GhostwriterServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    server
        .serve_after(routes, listener, shutdown, async { Ok(()) })
        .await
}

impl OrchestratorConfig {
    /// Every flag's default (environment variables still override them), with each stage at
    /// `url(stage)`.
    pub fn at(url: impl Fn(StageKind) -> String) -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: OrchestratorConfig,
        }
        let mut c = <Wrapper as clap::Parser>::parse_from(["orchestrator"]).config;
        c.retriever_url = url(StageKind::Retriever);
        c.ranker_url = url(StageKind::Ranker);
        c.summarizer_url = url(StageKind::Summarizer);
        c.generator_url = url(StageKind::Generator);
        c.synthesizer_url = url(StageKind::Synthesizer);
        c
    }

    /// Whether the public API may serve on `ip` with these settings: without authentication
    /// only on loopback (or with --insecure-no-auth); credential files must load. Logs how it
    /// authenticates.
    pub fn check(&self, ip: std::net::IpAddr) -> anyhow::Result<()> {
        let config = self;
        match (
            config.auth.configured(),
            config.insecure_no_auth,
            ip.is_loopback(),
        ) {
            (true, _, _) => {
                // A credential file that does not load stops the process now, with the reason.
                config.auth.check()?;
                tracing::info!("authentication on")
            }
            (false, _, true) => tracing::warn!(
                "AUTHENTICATION IS OFF: any caller on this machine may read and write any user's \
             documents (loopback only; set --auth-tokens or a JWT key to turn it on)"
            ),
            (false, true, false) => tracing::warn!(
                "AUTHENTICATION IS OFF on a non-loopback address (--insecure-no-auth): anyone who \
             can reach it may read and write any user's documents"
            ),
            (false, false, false) => anyhow::bail!(
                "refusing to serve the public API on a non-loopback address without authentication: \
             set --auth-tokens FILE or a JWT key (--auth-jwt-secret-file, --auth-jwt-keys), or \
             --insecure-no-auth to accept the risk"
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_checked_whole_and_names_the_field_that_fails() {
        use ghostwriter_proto::v1::{GenerationParams, WriteOptions};
        let good = WriteRequest {
            user_id: "maya".into(),
            start: "These strings".into(),
            ..Default::default()
        };
        let checked = Write::try_from(good.clone()).unwrap();
        assert_eq!(checked.preset.name, preset::DEFAULT_PRESET);
        assert_eq!(checked.context_chars, DEFAULT_CONTEXT_CHARS);
        let field = |r: WriteRequest| Write::try_from(r).err().map(|e| e.field);
        let with = |f: fn(&mut WriteRequest)| {
            let mut r = good.clone();
            f(&mut r);
            field(r)
        };
        assert_eq!(with(|r| r.user_id.clear()).as_deref(), Some("user_id"));
        assert_eq!(with(|r| r.start = " ".into()).as_deref(), Some("start"));
        assert_eq!(
            with(|r| r.preset = "nope".into()).as_deref(),
            Some("preset")
        );
        assert_eq!(
            with(|r| r.adapter = "a".repeat(129)).as_deref(),
            Some("adapter")
        );
        let options = |o: WriteOptions| {
            let mut r = good.clone();
            r.options = Some(o);
            field(r)
        };
        let too_wide = WriteOptions {
            context_chars: MAX_CONTEXT_CHARS + 1,
            ..Default::default()
        };
        assert_eq!(options(too_wide).as_deref(), Some("options.context_chars"));
        let stops = WriteOptions {
            generation: Some(GenerationParams {
                stop: vec!["x".into(); 17],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(options(stops).as_deref(), Some("options.generation.stop"));
    }

    #[test]
    fn immediate_context_joins_title_and_cuts() {
        assert_eq!(
            immediate_context("Great", "strings last", 150),
            "Great\nstrings last"
        );
        assert_eq!(immediate_context("", "abcdef", 3), "abc");
        assert_eq!(immediate_context("T", "", 150), "T");
        assert_eq!(immediate_context("", "héllo", 2), "hé");
    }
}
