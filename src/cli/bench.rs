//! The benchmarks: `bench`, `bench-metrics`, `bench-generator`, `bench-job`, `bench-ops`,
//! `bench-failover`. Each
//! writes its JSON report (to stdout, and to `--out` where it has one).

use std::path::PathBuf;

use super::{ensure_models, report};

/// Options of `bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Documents to ingest (JSONL or Amazon .json.gz).
    #[arg(long, env = "GHOSTWRITER_BENCH_DATA", default_value_os_t = ghostwriter::bench::default_data())]
    pub data: PathBuf,
    /// Writes to time.
    #[arg(long, env = "GHOSTWRITER_BENCH_WRITES", default_value_t = 10)]
    pub writes: usize,
    /// Decode-rate runs (128 tokens each).
    #[arg(long, env = "GHOSTWRITER_BENCH_DECODE_RUNS", default_value_t = 3)]
    pub decode_runs: usize,
    /// Where to write the JSON report (also printed).
    #[arg(long, env = "GHOSTWRITER_BENCH_OUT", default_value = "bench.json")]
    pub out: PathBuf,
}

/// Options of `bench-metrics`.
#[derive(clap::Args)]
pub struct MetricsArgs {
    /// Documents to draw pairs from.
    #[arg(long, env = "GHOSTWRITER_BENCH_DATA", default_value_os_t = ghostwriter::bench::default_data())]
    pub data: PathBuf,
    /// Pairs to score.
    #[arg(long, env = "GHOSTWRITER_BENCH_PAIRS", default_value_t = 10_000)]
    pub pairs: usize,
}

/// Options of `bench-ops`.
#[derive(clap::Args)]
pub struct OpsArgs {
    /// Writes for the overhead measurement.
    #[arg(long, env = "GHOSTWRITER_BENCH_WRITES", default_value_t = 200)]
    pub writes: usize,
}

/// `bench`: ingest, decode rate, per-stage latency and memory, one process per stage.
pub async fn stages(args: BenchArgs, model_dir: PathBuf) -> anyhow::Result<()> {
    ensure_models(&model_dir).await?;
    let exe = std::env::current_exe()?;
    let r = ghostwriter::bench::run(&exe, &model_dir, &args.data, args.writes, args.decode_runs)
        .await?;
    report(&r, Some(&args.out))
}

/// `bench-metrics`: the evaluation metrics' speed.
pub async fn metrics(args: MetricsArgs) -> anyhow::Result<()> {
    let r =
        tokio::task::spawn_blocking(move || ghostwriter::bench::metrics(&args.data, args.pairs))
            .await??;
    report(&r, None)
}

/// `bench-generator`: the engine alone, beside llama.cpp when asked.
pub async fn generator(
    args: ghostwriter::bench_generator::BenchGeneratorArgs,
    model_dir: PathBuf,
) -> anyhow::Result<()> {
    ensure_models(&model_dir).await?;
    let r = ghostwriter::bench_generator::run(&args, &model_dir).await?;
    report(&r, Some(&args.out))
}

/// `bench-job`: the whole job against the Python peer.
pub async fn job(
    args: ghostwriter::bench_job::BenchJobArgs,
    model_dir: PathBuf,
) -> anyhow::Result<()> {
    ensure_models(&model_dir).await?;
    let out = args.out.clone();
    let r = ghostwriter::bench_job::run(args, model_dir).await?;
    report(&r, Some(&out))
}

/// `bench-failover`: writes in flight when a generator dies.
pub async fn failover(
    args: ghostwriter::bench_failover::FailoverArgs,
    model_dir: PathBuf,
) -> anyhow::Result<()> {
    ensure_models(&model_dir).await?;
    let exe = std::env::current_exe()?;
    let r = ghostwriter::bench_failover::run(&exe, &model_dir, &args).await?;
    report(&r, Some(&args.out))
}

/// `bench-ops`: the operations targets with real processes.
pub async fn ops(args: OpsArgs, model_dir: PathBuf) -> anyhow::Result<()> {
    ensure_models(&model_dir).await?;
    let exe = std::env::current_exe()?;
    let r = ghostwriter::bench::ops(&exe, &model_dir, args.writes).await?;
    report(&r, None)
}
