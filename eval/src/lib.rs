//! Offline work on Ghostwriter, kept out of the serving crates: the paper's evaluation
//! (`ghostwriter eval`, through the real services over gRPC), the benchmarks ([`bench`],
//! [`bench_generator`], [`bench_job`], [`bench_failover`]) and LoRA fine-tuning ([`train`]).
//!
//! Evaluation examples come from [`protocol`]; each (preset, example) is one `Write` to the
//! orchestrator with the example's timestamp and id (so only strictly earlier documents are
//! used). Results are appended to `results.jsonl` as they finish, so an interrupted run resumes
//! where it stopped. Metrics follow [`metrics`]; the report is a JSON summary, a Markdown table
//! and an SVG chart.

pub mod authorship;
pub mod bench;
pub mod bench_failover;
pub mod bench_generator;
pub mod bench_job;
pub mod bench_store;
pub mod metrics;
pub mod porter;
pub mod protocol;
pub mod report;
pub mod train;
pub mod voice;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use ghostwriter_proto::v1::ghostwriter_client::GhostwriterClient;
use ghostwriter_proto::v1::{GenerationParams, WriteOptions, WriteRequest};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use ghostwriter_runtime::loaders;
use protocol::{Example, Split};

/// One finished (preset, example).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Preset.
    pub preset: String,
    /// Author.
    pub user_id: String,
    /// Target document.
    pub doc_id: String,
    /// Immediate context followed by the generated text.
    pub prediction: String,
    /// The whole target (title and body).
    pub target: String,
    /// Wall-clock milliseconds of the write.
    pub latency_ms: f64,
    /// Tokens the generator produced.
    pub generated_tokens: u32,
    /// The generated text alone (what follows the immediate context).
    #[serde(default)]
    pub generated: String,
    /// Important words the synthesizer gave the prompt.
    #[serde(default)]
    pub important_words: u32,
    /// Ids of the ranked past documents behind the prompt's entries.
    #[serde(default)]
    pub passage_ids: Vec<String>,
    /// The generator's model, as it names itself (with its adapter and hash, if any).
    #[serde(default)]
    pub generator: String,
}

/// Settings of an evaluation run.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A running Ghostwriter to evaluate (its token an administrator's: the examples span
    /// users); without --to the embedded pipeline is started for the run.
    #[command(flatten)]
    pub remote: ghostwriter_runtime::remote::RemoteArgs,
    /// Documents (neutral JSONL or Amazon .json.gz).
    #[arg(
        long,
        env = "GHOSTWRITER_EVAL_DATA",
        default_value = "../shared/data/amazon-musical-instruments/docs.jsonl"
    )]
    pub data: PathBuf,
    /// Comma-separated presets (default: every preset).
    #[arg(long, env = "GHOSTWRITER_EVAL_PRESETS", value_delimiter = ',')]
    pub presets: Vec<String>,
    /// Users to evaluate.
    #[arg(long, env = "GHOSTWRITER_EVAL_SPLIT", value_enum, default_value_t = Split::Test)]
    pub split: Split,
    /// Examples to evaluate (a seeded sample of the split); all when unset.
    #[arg(long, env = "GHOSTWRITER_EVAL_LIMIT")]
    pub limit: Option<usize>,
    /// Writes in flight at once.
    #[arg(long, env = "GHOSTWRITER_EVAL_CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,
    /// Tokens generated per example.
    #[arg(long, env = "GHOSTWRITER_EVAL_MAX_NEW_TOKENS", default_value_t = 128)]
    pub max_new_tokens: u32,
    /// Beams of the generator's beam search (the paper decodes with 4); 1 = greedy.
    #[arg(long, env = "GHOSTWRITER_EVAL_NUM_BEAMS", default_value_t = 1)]
    pub num_beams: u32,
    /// Beam hypotheses are ranked by log-probability / length^this (used with --num-beams).
    #[arg(long, env = "GHOSTWRITER_EVAL_LENGTH_PENALTY", default_value_t = 1.0)]
    pub length_penalty: f32,
    /// Seed of the example sample, the bootstrap and sampling (decoding is greedy).
    #[arg(long, env = "GHOSTWRITER_EVAL_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Output directory (results.jsonl, summary.json, table.md, rouge1.svg).
    #[arg(long, env = "GHOSTWRITER_EVAL_OUT", default_value = "eval-results")]
    pub out: PathBuf,
    /// Bootstrap resamples for the confidence intervals.
    #[arg(long, env = "GHOSTWRITER_EVAL_BOOTSTRAP", default_value_t = 1000)]
    pub bootstrap: usize,
    /// Do not ingest the documents (they are already in the service at --to).
    #[arg(long, env = "GHOSTWRITER_EVAL_NO_INGEST")]
    pub no_ingest: bool,
    /// Deadline of one write, in seconds.
    #[arg(long, env = "GHOSTWRITER_EVAL_TIMEOUT", default_value_t = 600)]
    pub timeout: u64,
    /// LoRA adapter the embedded generator serves (a fine-tuned model from `train`).
    #[arg(long, env = "GHOSTWRITER_ADAPTER")]
    pub adapter: Option<PathBuf>,
}

/// The `p` quantile (0..=1) of `sorted` (ascending), by the nearest rank; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    sorted[i]
}

/// The workspace's one seeded generator (SplitMix64), for sampling and the bootstrap.
pub use ghostwriter_common::rng::Rng;

/// The examples of a run: the split's examples, a seeded sample of `limit` when set.
pub fn select(examples: &[Example], split: Split, limit: Option<usize>, seed: u64) -> Vec<Example> {
    let mut chosen: Vec<Example> = examples
        .iter()
        .filter(|e| e.split == split)
        .cloned()
        .collect();
    if let Some(n) = limit {
        Rng::new(seed).shuffle(&mut chosen);
        chosen.truncate(n);
        chosen.sort_by(|a, b| {
            (&a.user_id, a.timestamp, &a.doc_id).cmp(&(&b.user_id, b.timestamp, &b.doc_id))
        });
    }
    chosen
}

/// Records already in `path` (unreadable lines, such as one cut by a crash, are skipped).
pub fn read_records(path: &Path) -> anyhow::Result<Vec<Record>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let file = std::fs::File::open(path)?;
    Ok(std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect())
}

async fn write_one(
    client: &mut GhostwriterClient<tonic::transport::Channel>,
    preset: &str,
    example: &Example,
    args: &EvalArgs,
) -> anyhow::Result<Record> {
    let request = WriteRequest {
        user_id: example.user_id.clone(),
        title: example.title.clone(),
        start: example.text.clone(),
        preset: preset.to_string(),
        timestamp: Some(example.timestamp),
        doc_id: example.doc_id.clone(),
        options: Some(WriteOptions {
            generation: Some(GenerationParams {
                max_new_tokens: args.max_new_tokens,
                seed: args.seed,
                num_beams: args.num_beams,
                length_penalty: Some(args.length_penalty),
                ..Default::default()
            }),
            ..Default::default()
        }),
        consistency_token: Default::default(),
        adapter: String::new(),
    };
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(args.timeout));
    ghostwriter_transport::client::bearer(&mut request, args.remote.token.as_deref())?;
    let started = Instant::now();
    let response = client
        .write(request)
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "{preset} {}: {:?} {}",
                example.doc_id,
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    Ok(Record {
        preset: preset.to_string(),
        user_id: example.user_id.clone(),
        doc_id: example.doc_id.clone(),
        prediction: response.document,
        target: example.target(),
        latency_ms: started.elapsed().as_secs_f64() * 1e3,
        generated_tokens: response
            .generation
            .as_ref()
            .map_or(0, |g| g.generated_tokens),
        generator: response
            .generation
            .as_ref()
            .map(|g| g.model.clone())
            .unwrap_or_default(),
        generated: response.generation.map(|g| g.text).unwrap_or_default(),
        important_words: response
            .provenance
            .as_ref()
            .map_or(0, |p| p.important_words.len() as u32),
        passage_ids: response.provenance.map(|p| p.doc_ids).unwrap_or_default(),
    })
}

/// Runs every missing (preset, example) against `url`, appending to `results.jsonl`.
pub async fn run_against(
    url: &str,
    args: &EvalArgs,
    presets: &[String],
    examples: &[Example],
) -> anyhow::Result<()> {
    let results = args.out.join("results.jsonl");
    let done: HashSet<(String, String)> = read_records(&results)?
        .into_iter()
        .map(|r| (r.preset, r.doc_id))
        .collect();
    let jobs: Vec<(String, Example)> = presets
        .iter()
        .flat_map(|p| examples.iter().map(move |e| (p.clone(), e.clone())))
        .filter(|(p, e)| !done.contains(&(p.clone(), e.doc_id.clone())))
        .collect();
    let skipped = presets.len() * examples.len() - jobs.len();
    if skipped > 0 {
        eprintln!(
            "resuming: {skipped} results already in {}",
            results.display()
        );
    }
    if jobs.is_empty() {
        return Ok(());
    }
    let client = GhostwriterClient::new(
        ghostwriter_transport::client::channel(url, None)
            .with_context(|| format!("connecting to {url}"))?,
    )
    .max_decoding_message_size(ghostwriter_common::MAX_MESSAGE_BYTES);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&results)?;
    // A run killed mid-line leaves a partial last line: start on a fresh line.
    if std::fs::read(&results)?.last().is_some_and(|b| *b != b'\n') {
        writeln!(file)?;
    }
    let bar = ProgressBar::new(jobs.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} writes ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("evaluating");
    let mut stream = futures::stream::iter(jobs)
        .map(|(preset, example)| {
            let mut client = client.clone();
            async move { write_one(&mut client, &preset, &example, args).await }
        })
        .buffer_unordered(args.concurrency.max(1));
    let mut failures = 0usize;
    while let Some(result) = stream.next().await {
        match result {
            Ok(record) => {
                writeln!(file, "{}", serde_json::to_string(&record)?)?;
                file.flush()?;
            }
            Err(e) => {
                failures += 1;
                bar.println(format!("failed (will be retried on the next run): {e:#}"));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if failures > 0 {
        eprintln!("{failures} writes failed; rerun the same command to retry them");
    }
    Ok(())
}

/// Loads the data, applies the protocol, runs (embedded unless `--to`), and writes the report.
pub async fn run(args: EvalArgs, model_dir: PathBuf) -> anyhow::Result<report::Summary> {
    std::fs::create_dir_all(&args.out)?;
    let data = args.data.clone();
    let loaded = tokio::task::spawn_blocking(move || loaders::load(&data)).await??;
    let dataset = protocol::build(loaded.documents);
    let examples = select(&dataset.examples, args.split, args.limit, args.seed);
    let presets: Vec<String> = if args.presets.is_empty() {
        ghostwriter_orchestrator::PRESETS
            .iter()
            .map(|p| p.name.to_string())
            .collect()
    } else {
        args.presets.clone()
    };
    for p in &presets {
        anyhow::ensure!(
            ghostwriter_orchestrator::preset::find(p).is_some(),
            "unknown preset {p:?}"
        );
    }
    eprintln!(
        "{} documents after dedupe; {} examples in all; {} {:?} examples selected; presets: {}",
        dataset.documents.len(),
        dataset.examples.len(),
        examples.len(),
        args.split,
        presets.join(",")
    );
    let started = Instant::now();
    let model_dir_for_voice = model_dir.clone();
    match &args.remote.to {
        Some(url) => {
            if !args.no_ingest {
                ghostwriter_runtime::embedded::ingest(
                    url,
                    &dataset.documents,
                    args.remote.token.as_deref(),
                )
                .await?;
            }
            run_against(url, &args, &presets, &examples).await?;
        }
        None => {
            ghostwriter_runtime::embedded::Embedded::with_pipeline(
                model_dir,
                args.adapter.clone(),
                &dataset.documents,
                async |e| run_against(&e.url(), &args, &presets, &examples).await,
            )
            .await?;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let records = read_records(&args.out.join("results.jsonl"))?;
    let wanted: HashSet<&str> = examples.iter().map(|e| e.doc_id.as_str()).collect();
    let mut by_preset: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for r in records
        .into_iter()
        .filter(|r| wanted.contains(r.doc_id.as_str()))
    {
        by_preset.entry(r.preset.clone()).or_default().push(r);
    }
    let texts: HashMap<&str, String> = dataset
        .documents
        .iter()
        .map(|d| (d.doc_id.as_str(), protocol::full_text(&d.title, &d.text)))
        .collect();
    let mut summary = report::summarize(
        &presets,
        &by_preset,
        &texts,
        args.bootstrap,
        args.seed,
        wall,
        &args,
    );
    drop(texts);
    let voice = voice::score(
        dataset,
        args.split,
        &by_preset,
        report::BASELINE,
        &model_dir_for_voice,
        &authorship::default_embedding_cache(&args.data),
        args.bootstrap,
        args.seed,
    )?;
    report::attach_voice(&mut summary, voice);
    report::write_all(&args.out, &summary)?;
    Ok(summary)
}
