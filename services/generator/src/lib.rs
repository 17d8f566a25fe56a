//! Generator stage: the GPU-scalable LLM worker. A GGUF instruction model (SmolLM2-135M-Instruct
//! by default; llama or qwen2 architecture) served with continuous batching over a paged
//! key/value cache with prefix reuse: the native int8 CPU engine, or candle on CUDA. The
//! tokenizer is rebuilt from the GGUF metadata. Unary and server-streaming RPCs.

pub mod adapter;
pub mod backend;
pub mod beam;
pub mod cache;
pub mod engine;
pub mod gguf;
pub mod gpu;
pub mod metrics;
pub mod model;
pub mod native;
pub mod prompt;
pub mod sampler;
pub mod shipped;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_common::status::Invalid;
use ghostwriter_common::{MAX_MESSAGE_BYTES, deadline};
use ghostwriter_proto::v1::generate_request::Input as ProtoInput;
use ghostwriter_proto::v1::generator_server::{Generator, GeneratorServer};
use ghostwriter_proto::v1::{
    AdapterStatus, FinishReason, GenerateRequest, GenerateResponse, GenerateStreamResponse,
    GeneratorInfo, GeneratorInfoRequest, ListAdaptersRequest, ListAdaptersResponse,
    LoadAdapterRequest, UnloadAdapterRequest, UnloadAdapterResponse,
};
use ghostwriter_transport::{StageServer, Transport};
use tokio::sync::{OnceCell, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub use engine::{
    Chunk, Engine, EngineConfig, EngineError, Event, Finish, Input, Job, Params, Stats, StepStats,
};
pub use metrics::GeneratorMetrics;
pub use model::{LanguageModel, LoadOptions};

/// Why a generation request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field fails its check: INVALID_ARGUMENT.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The model is still loading: UNAVAILABLE.
    #[error("the generator is still loading its model")]
    Loading,
    /// The engine refused or failed the job.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Invalid(e) => e.into(),
            Error::Loading => Status::unavailable(message),
            Error::Engine(e) => match e {
                EngineError::InvalidArgument(_) => Status::invalid_argument(message),
                EngineError::Overloaded(_) => ghostwriter_common::status::overloaded(message),
                EngineError::DeadlineExceeded(_) => Status::deadline_exceeded(message),
                EngineError::Stopped => Status::unavailable(message),
                EngineError::Inference(_) => Status::internal(message),
                EngineError::NotFound(_) => Status::not_found(message),
                EngineError::FailedPrecondition(_) => Status::failed_precondition(message),
                EngineError::ResourceExhausted(_) => Status::resource_exhausted(message),
            },
        }
    }
}

/// Generator settings.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Generator")]
pub struct GeneratorConfig {
    /// GGUF model file (llama or qwen2 architecture). Default: SmolLM2-135M-Instruct Q8_0 under
    /// the model directory.
    #[arg(long, env = "GHOSTWRITER_GENERATOR_MODEL")]
    pub model: Option<PathBuf>,
    /// Device of the model: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, env = "GHOSTWRITER_GENERATOR_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Largest context window used, in tokens (the model's own is used when smaller).
    #[arg(long, env = "GHOSTWRITER_MAX_CONTEXT", default_value_t = 2048)]
    pub max_context: usize,
    /// Tokens generated when a request sets no max_new_tokens.
    #[arg(long = "max-new-tokens", env = "GHOSTWRITER_MAX_NEW_TOKENS", default_value_t = 128)]
    pub default_max_new_tokens: u32,
    /// Most tokens a request may ask for.
    #[arg(long, env = "GHOSTWRITER_MAX_NEW_TOKENS_LIMIT", default_value_t = 1024)]
    pub max_new_tokens_limit: u32,
    /// Repeat penalty on recently generated tokens (1 = none); applies to greedy decoding too.
    #[arg(long, env = "GHOSTWRITER_REPEAT_PENALTY", default_value_t = 1.1)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty covers.
    #[arg(long, env = "GHOSTWRITER_REPEAT_LAST_N", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Requests allowed to wait for admission to the running batch; beyond it
    /// RESOURCE_EXHAUSTED is returned at once.
    #[arg(long, env = "GHOSTWRITER_GENERATOR_QUEUE", default_value_t = 64)]
    pub queue_capacity: usize,
    /// System message of the chat template.
    #[arg(long = "system-prompt", env = "GHOSTWRITER_SYSTEM_PROMPT", default_value = prompt::DEFAULT_SYSTEM)]
    pub system: String,
    /// CPU compute threads of the native engine (0 = every core).
    #[arg(long, env = "GHOSTWRITER_GENERATOR_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Sequences decoded together at most (the running batch).
    #[arg(long, env = "GHOSTWRITER_MAX_RUNNING", default_value_t = 32)]
    pub max_running: usize,
    /// Tokens in one forward pass at most: one per decoding sequence plus chunks of the
    /// prompts being prefilled.
    #[arg(long, env = "GHOSTWRITER_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Memory for the key/value cache (running sequences and the prefix cache), MiB; at least
    /// one full context is always allocated.
    #[arg(long, env = "GHOSTWRITER_KV_CACHE_MB", default_value_t = 256)]
    pub kv_cache_mb: usize,
    /// Positions per key/value cache block (the prefix cache's unit of reuse).
    #[arg(long = "kv-block-size", env = "GHOSTWRITER_KV_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Reuse the keys and values of earlier prompts' common prefixes (`false` to turn off).
    #[arg(
        long,
        env = "GHOSTWRITER_PREFIX_CACHE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub prefix_cache: bool,
    /// LoRA adapter trained by `ghostwriter train` (safetensors), applied unmerged on top of
    /// the model (the CPU engine and the candle backend alike); its name and hash appear in every
    /// response's model field.
    #[arg(long, env = "GHOSTWRITER_ADAPTER")]
    pub adapter: Option<PathBuf>,
    /// Directory of named LoRA adapters (`NAME.safetensors`) that requests and LoadAdapter may
    /// name; one is loaded on first use, within --adapter-memory-mb.
    #[arg(long, env = "GHOSTWRITER_ADAPTER_DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// Memory for adapters loaded at run time, MiB: past it the least recently used adapter
    /// that is neither pinned nor running is evicted.
    #[arg(long, env = "GHOSTWRITER_ADAPTER_MEMORY_MB", default_value_t = 256)]
    pub adapter_memory_mb: usize,
    /// Serve the model alone. Without this flag or --adapter, `up`, `serve generator` and
    /// `demo` serve the shipped fine-tuned adapter (adapters/smollm2-135m-reviews.safetensors)
    /// when the model is the one it was trained on (SmolLM2-135M Q8_0); another model runs alone.
    #[arg(long, env = "GHOSTWRITER_ZERO_SHOT")]
    pub zero_shot: bool,
    /// Whether the shipped adapter is the default (set by the commands that serve, not a flag):
    /// libraries, benchmarks and `eval` load exactly what they are given.
    #[arg(skip)]
    pub shipped_by_default: bool,
}

impl GeneratorConfig {
    /// The engine settings these flags ask for.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            queue_capacity: self.queue_capacity.max(1),
            system: self.system.clone(),
            repeat_last_n: self.repeat_last_n,
            max_running: self.max_running.max(1),
            max_batch_tokens: self.max_batch_tokens,
            prefix_cache: self.prefix_cache,
            adapters: engine::AdapterSettings {
                dir: self
                    .adapter_dir
                    .clone()
                    .filter(|p| !p.as_os_str().is_empty()),
                memory_bytes: self.adapter_memory_mb << 20,
            },
        }
    }

    /// The model loading settings these flags ask for.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device.clone(),
            max_context: self.max_context,
            threads: self.threads,
            block_size: self.block_size.max(1),
            kv_cache_mb: self.kv_cache_mb,
            // An empty GHOSTWRITER_ADAPTER means none.
            adapter: self.adapter.clone().filter(|p| !p.as_os_str().is_empty()),
            model_sha256: None,
        }
    }
}

/// The gRPC adapter over the [`Engine`].
#[derive(Clone)]
pub struct GeneratorService {
    engine: Arc<OnceCell<Engine>>,
    config: Arc<GeneratorConfig>,
    metrics: Arc<GeneratorMetrics>,
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn finish_reason(f: Finish) -> FinishReason {
    match f {
        Finish::Eos => FinishReason::Eos,
        Finish::Length => FinishReason::Length,
        Finish::Stop => FinishReason::Stop,
    }
}

/// The author-distinction answer: P("true" | "true" or "false") from the two answers' scores
/// (log-probabilities or logits of the same position).
pub fn same_author_probability(true_score: f32, false_score: f32) -> f32 {
    1.0 / (1.0 + (false_score - true_score).exp())
}

fn response(stats: Stats, model: &str) -> GenerateResponse {
    // Scores are the log-probabilities of "true" and "false".
    let same_author_probability = match stats.scores.as_slice() {
        [t, f] => same_author_probability(*t, *f),
        _ => 0.0,
    };
    GenerateResponse {
        same_author_probability,
        text: stats.text,
        prompt_tokens: stats.prompt_tokens as u32,
        generated_tokens: stats.generated_tokens as u32,
        finish_reason: finish_reason(stats.finish) as i32,
        tokens_per_second: stats.tokens_per_second,
        model: model.to_string(),
        cached_prompt_tokens: stats.cached_tokens as u32,
        time_to_first_token: stats.time_to_first_token,
    }
}

/// A generation request whose input and sampling settings are checked: the domain twin of
/// [`GenerateRequest`] (TGI's `Validation` in small). The worker's own limits and defaults
/// apply after, in [`GeneratorService::parse`].
pub struct Generation {
    /// What to write.
    pub input: Input,
    /// The sampling settings (checked; zeros mean the worker's defaults).
    pub params: ghostwriter_proto::v1::GenerationParams,
    /// The rest of the request: resume ids, salt and adapter.
    pub request: GenerateRequest,
}

impl TryFrom<GenerateRequest> for Generation {
    type Error = Invalid;

    fn try_from(mut r: GenerateRequest) -> Result<Self, Invalid> {
        let input = match r.input.take() {
            Some(ProtoInput::Personalized(p)) => {
                if p.passage_start.trim().is_empty() {
                    return Err(Invalid::new(
                        "input.personalized.passage_start",
                        "passage_start is empty",
                    ));
                }
                Input::Personalized(prompt::Parts {
                    passage_start: p.passage_start,
                    summary: p.summary,
                    important_words: p.important_words,
                    past_passages: p.past_passages,
                    omit_passage_start: p.omit_passage_start,
                })
            }
            Some(ProtoInput::Instruction(i)) if !i.trim().is_empty() => Input::Instruction(i),
            Some(ProtoInput::Task(t)) if !t.instruction.trim().is_empty() => Input::Task {
                passages: t.passages,
                instruction: t.instruction,
            },
            Some(ProtoInput::Task(_)) => {
                return Err(Invalid::new(
                    "input.task.instruction",
                    "task.instruction is empty",
                ));
            }
            Some(ProtoInput::Distinction(d)) => {
                if d.first.trim().is_empty() || d.second.trim().is_empty() {
                    return Err(Invalid::new(
                        "input.distinction",
                        "distinction needs two non-empty passages",
                    ));
                }
                Input::Distinction {
                    first: d.first,
                    second: d.second,
                }
            }
            Some(ProtoInput::Instruction(_)) => {
                return Err(Invalid::new("input.instruction", "instruction is empty"));
            }
            None => {
                return Err(Invalid::new(
                    "input",
                    "input is missing: set personalized, task, instruction or distinction",
                ));
            }
        };
        let params = r.params.take().unwrap_or_default();
        ghostwriter_common::check_sampling(&params).map_err(|e| e.under("params"))?;
        Ok(Self {
            input,
            params,
            request: r,
        })
    }
}

impl GeneratorService {
    /// Every adapter registered (the directory is read off the async threads).
    async fn adapter_list(&self) -> Result<Vec<AdapterStatus>, Error> {
        let adapters = self.engine()?.adapters().clone();
        let list = tokio::task::spawn_blocking(move || adapters.list())
            .await
            .map_err(|e| EngineError::Inference(e.to_string()))?;
        Ok(list.into_iter().map(status).collect())
    }

    fn answer_tokens(&self) -> Result<[u32; 2], Error> {
        self.engine()?
            .prompter()
            .answer_ids()
            .map_err(|e| EngineError::Inference(e.to_string()).into())
    }

    fn engine(&self) -> Result<&Engine, Error> {
        self.engine.get().ok_or(Error::Loading)
    }

    /// The engine's input and parameters for a checked request ([`Generation`]): this worker's
    /// limit on new tokens, its defaults, and the answer tokens of a distinction.
    fn parse(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<(Input, Params, Option<Instant>), Error> {
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        let Generation {
            input,
            params: g,
            request: r,
        } = request.into_inner().try_into()?;
        let c = &self.config;
        if g.max_new_tokens > c.max_new_tokens_limit {
            return Err(Invalid::new(
                "params.max_new_tokens",
                format!(
                    "max_new_tokens {} exceeds the limit of {}",
                    g.max_new_tokens, c.max_new_tokens_limit
                ),
            )
            .into());
        }
        let params = Params {
            max_new_tokens: if g.max_new_tokens == 0 {
                c.default_max_new_tokens
            } else {
                g.max_new_tokens
            } as usize,
            temperature: g.temperature as f64,
            top_p: if g.top_p == 0.0 { 1.0 } else { g.top_p as f64 },
            seed: g.seed,
            stop: g.stop,
            repeat_penalty: c.repeat_penalty,
            ignore_eos: false,
            score: Vec::new(),
            num_beams: g.num_beams.max(1) as usize,
            length_penalty: g.length_penalty.unwrap_or(1.0),
            resume_token_ids: r.resume_token_ids,
            cache_salt: r.cache_salt,
            adapter: r.adapter,
            ..Params::default()
        };
        let params = match &input {
            Input::Distinction { .. } => Params {
                max_new_tokens: 1,
                score: self.answer_tokens()?.to_vec(),
                num_beams: 1,
                ..params
            },
            _ => params,
        };
        Ok((input, params, deadline))
    }
}

#[tonic::async_trait]
impl Generator for GeneratorService {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let (input, params, deadline) = self.parse(request)?;
        let engine = self.engine()?;
        let stats = engine
            .generate(input, params, deadline)
            .await
            .map_err(Error::from)?;
        self.metrics.record_finished(&stats);
        let model = engine.model_for(&stats.adapter);
        Ok(Response::new(response(stats, &model)))
    }

    async fn info(
        &self,
        _request: Request<GeneratorInfoRequest>,
    ) -> Result<Response<GeneratorInfo>, Status> {
        let engine = self.engine()?;
        Ok(Response::new(GeneratorInfo {
            model: engine.model_name(),
            backend: engine.backend.clone(),
            context_tokens: engine.context() as u32,
            adapter: engine.adapter.clone(),
            adapters: self.adapter_list().await?,
        }))
    }

    async fn load_adapter(
        &self,
        request: Request<LoadAdapterRequest>,
    ) -> Result<Response<AdapterStatus>, Status> {
        let r = request.into_inner();
        let adapters = self.engine()?.adapters().clone();
        let bytes = (!r.safetensors.is_empty()).then_some(r.safetensors);
        let info = tokio::task::spawn_blocking(move || adapters.load(&r.name, bytes, r.pin))
            .await
            .map_err(|e| Error::from(EngineError::Inference(e.to_string())))?
            .map_err(Error::from)?;
        Ok(Response::new(status(info)))
    }

    async fn unload_adapter(
        &self,
        request: Request<UnloadAdapterRequest>,
    ) -> Result<Response<UnloadAdapterResponse>, Status> {
        self.engine()?
            .adapters()
            .unload(&request.into_inner().name)
            .map_err(Error::from)?;
        Ok(Response::new(UnloadAdapterResponse {}))
    }

    async fn list_adapters(
        &self,
        _request: Request<ListAdaptersRequest>,
    ) -> Result<Response<ListAdaptersResponse>, Status> {
        Ok(Response::new(ListAdaptersResponse {
            adapters: self.adapter_list().await?,
        }))
    }

    type GenerateStreamStream = StreamOf<GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let (input, params, deadline) = self.parse(request)?;
        let engine = self.engine()?;
        let (events, rx) = mpsc::unbounded_channel();
        let adapter = engine
            .submit(Job {
                input,
                params,
                events,
                deadline,
            })
            .map_err(Error::from)?;
        let stream = event_stream(rx, engine.model_for(&adapter), self.metrics.clone());
        Ok(Response::new(Box::pin(stream)))
    }
}

fn status(a: engine::AdapterInfo) -> AdapterStatus {
    AdapterStatus {
        name: a.name,
        resident: a.resident,
        pinned: a.pinned,
        running: a.running as u32,
        bytes: a.bytes as u64,
        sha256: a.sha256,
        loads: a.loads,
        evictions: a.evictions,
    }
}

/// Turns engine events into stream messages; dropping the stream (the caller went away) drops
/// the receiver, which cancels decoding.
fn event_stream(
    mut rx: mpsc::UnboundedReceiver<Event>,
    model: String,
    metrics: Arc<GeneratorMetrics>,
) -> impl Stream<Item = Result<GenerateStreamResponse, Status>> {
    async_stream(
        move |tx: mpsc::Sender<Result<GenerateStreamResponse, Status>>| async move {
            let mut last_piece: Option<Instant> = None;
            while let Some(event) = rx.recv().await {
                let message = match event {
                    Event::Text(chunk) => {
                        let now = Instant::now();
                        if let Some(before) = last_piece.replace(now) {
                            metrics
                                .inter_token_latency
                                .observe(now.duration_since(before).as_secs_f64());
                        }
                        Ok(GenerateStreamResponse {
                            text: chunk.text,
                            summary: None,
                            token_ids: chunk.token_ids,
                        })
                    }
                    Event::Done(stats) => {
                        metrics.record_finished(&stats);
                        Ok(GenerateStreamResponse {
                            text: String::new(),
                            summary: Some(response(stats, &model)),
                            token_ids: Vec::new(),
                        })
                    }
                    Event::Failed(e) => Err(Error::from(e).into()),
                };
                let last = !matches!(message, Ok(GenerateStreamResponse { summary: None, .. }));
                if tx.send(message).await.is_err() || last {
                    return;
                }
            }
        },
    )
}

/// A stream fed by a task; the task ends when the stream is dropped.
fn async_stream<F, Fut, T>(f: F) -> impl Stream<Item = T>
where
    F: FnOnce(mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Loads the model synchronously (for benchmarks and tools), its metrics registered nowhere.
pub fn load_engine(
    config: &GeneratorConfig,
    model_dir: &std::path::Path,
) -> anyhow::Result<Engine> {
    load_engine_with(config, model_dir, Arc::default())
}

/// Loads the model synchronously; every engine step feeds `metrics`.
fn load_engine_with(
    config: &GeneratorConfig,
    model_dir: &std::path::Path,
    metrics: Arc<GeneratorMetrics>,
) -> anyhow::Result<Engine> {
    let path = config
        .model
        .clone()
        .unwrap_or_else(|| model_dir.join(ghostwriter_common::models::GENERATOR_Q8_0));
    let mut options = config.load_options();
    if options.adapter.is_none() && config.shipped_by_default && !config.zero_shot {
        // Hashed once: the choice and the adapter's check of its base both need it.
        let sha = ghostwriter_common::models::sha256_file(&path)?;
        options.adapter = shipped::for_model(&path, &sha)?;
        options.model_sha256 = Some(sha);
    }
    let model = LanguageModel::load(&path, &options)
        .map_err(|e| anyhow::anyhow!("loading the generator model {}: {e:#}", path.display()))?;
    let steps = metrics.clone();
    let engine = Engine::start_with_stats(model, config.engine_config(), move |s: &StepStats| {
        steps.record_step(s)
    });
    engine
        .adapters()
        .observe(move |e: &engine::AdapterEvent| metrics.record_adapter(e));
    tracing::info!(stage = "generator", model = %engine.model_name(), backend = %engine.backend, context = engine.context(), "model loaded");
    Ok(engine)
}

/// Serves the generator on `listener` until `shutdown`. The model loads in the background;
/// health turns SERVING once it is loaded.
pub async fn serve(
    config: GeneratorConfig,
    model_dir: PathBuf,
    listener: impl Into<ghostwriter_transport::Listener>,
    shutdown: Shutdown,
    transport: &Transport,
) -> anyhow::Result<()> {
    let (server, routes) = StageServer::new("ghostwriter.v1.Generator", transport).await;
    let metrics = Arc::new(GeneratorMetrics::new());
    metrics.register(&transport.metrics);
    let cell: Arc<OnceCell<Engine>> = Arc::default();
    let config = Arc::new(config);
    let service = GeneratorService {
        engine: cell.clone(),
        config: config.clone(),
        metrics: metrics.clone(),
    };
    let loader = async move {
        let engine =
            tokio::task::spawn_blocking(move || load_engine_with(&config, &model_dir, metrics))
                .await??;
        let _ = cell.set(engine);
        anyhow::Ok(())
    };
    let routes = routes
        .add_service(GeneratorServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES));
    server.serve_after(routes, listener, shutdown, loader).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use ghostwriter_proto::v1::{DistinctionInput, GenerationParams};

    #[test]
    fn a_generation_is_checked_before_the_engine_sees_it() {
        let with = |input: ProtoInput| GenerateRequest {
            input: Some(input),
            ..Default::default()
        };
        let field = |r: GenerateRequest| Generation::try_from(r).err().map(|e| e.field);
        assert_eq!(field(with(ProtoInput::Instruction("Say hi".into()))), None);
        assert_eq!(field(GenerateRequest::default()).as_deref(), Some("input"));
        let blank = ProtoInput::Instruction(" ".into());
        assert_eq!(field(with(blank)).as_deref(), Some("input.instruction"));
        let one_sided = ProtoInput::Distinction(DistinctionInput {
            first: "a review".into(),
            second: String::new(),
        });
        assert_eq!(field(with(one_sided)).as_deref(), Some("input.distinction"));
        let hot = GenerateRequest {
            params: Some(GenerationParams {
                top_p: 2.0,
                ..Default::default()
            }),
            ..with(ProtoInput::Instruction("Say hi".into()))
        };
        let f = field(hot).unwrap_or_default();
        assert!(f.starts_with("params."), "{f}");
    }
}
