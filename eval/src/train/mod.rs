//! `ghostwriter train`: LoRA fine-tuning of the generator on the pipeline's own prompts, with
//! the paper's author-distinction task mixed in (see [`data`] for the examples and [`model`]
//! for the differentiable forward pass).
//!
//! Only training-split users' documents become examples; validation users give the validation
//! loss; test users are never read here (the evaluation's protocol and split, `eval::protocol`).

pub mod data;
pub mod distinguish;
pub mod model;
pub mod style;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::Rng;
use crate::protocol::{self, Example, Split};
use data::{DistinctionPairs, Lengths, Task, TrainExample};
use model::TrainModel;

/// Settings of a fine-tuning run.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Documents (Amazon .json.gz or neutral JSONL); the evaluation's protocol picks the users.
    #[arg(long, default_value_os_t = crate::bench::default_data())]
    pub data: PathBuf,
    /// Base GGUF model (default: SmolLM2-135M-Instruct Q8_0 under the model directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output directory: adapter.safetensors, checkpoint/, examples.jsonl, loss.svg, train.json.
    #[arg(long, default_value = "train-out")]
    pub out: PathBuf,
    /// Generation examples: a seeded sample of the training users' targets (0 = all of them).
    #[arg(long, default_value_t = 240)]
    pub examples: usize,
    /// Presets whose prompts are trained, round robin over the examples.
    #[arg(long, value_delimiter = ',', default_value = "syn-ctx,immediate-context")]
    pub presets: Vec<String>,
    /// Author-distinction examples per generation example (the paper mixes 1:1; 0 trains
    /// generation only).
    #[arg(long, default_value_t = 1.0)]
    pub distinction_ratio: f64,
    /// How the second document of an author-distinction pair is chosen: `random` (any other
    /// document of the author, or of a random other user, as the paper frames it) or `matched`
    /// (the best retrieval match for the start among the author's earlier documents, or among
    /// the other user's: what the served `Distinguish` compares with).
    #[arg(long, value_enum, default_value_t = DistinctionPairs::Random)]
    pub distinction_pairs: DistinctionPairs,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (updates are scaled by alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Projections that get LoRA pairs (GGUF names).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down"
    )]
    pub targets: Vec<String>,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Linear warm-up, optimizer steps.
    #[arg(long, default_value_t = 5)]
    pub warmup_steps: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Examples whose gradients are summed into one optimizer step.
    #[arg(long, default_value_t = 8)]
    pub grad_accum: usize,
    /// How a step's loss averages its examples: `token` (every answer token weighs the same, as
    /// sequence-to-sequence trainers average a batch) or `example` (each example's mean loss
    /// weighs the same, so a two-token distinction answer weighs as much as a whole review).
    #[arg(long, value_enum, default_value_t = LossWeighting::Token)]
    pub loss_weighting: LossWeighting,
    /// Padded tokens per forward pass: a step's examples, longest first, share a pass while
    /// their count times the longest one's length fits (0 = one example per pass). The default
    /// packs the short examples without raising the peak memory above that of the longest
    /// example alone (attention memory grows as count × length²).
    #[arg(long, default_value_t = 1280)]
    pub batch_tokens: usize,
    /// Passes over the examples.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop at the first optimizer step that ends after this many minutes of training and write
    /// the adapter then (0 = no limit). The learning-rate schedule still spans every example, so
    /// a stopped run ends before its decay does; train.json says `stopped_early`.
    #[arg(long, default_value_t = 0.0)]
    pub max_minutes: f64,
    /// Stop after this many optimizer steps in all (0 = no limit); like --max-minutes the
    /// schedule still spans every example, but the stop does not depend on the machine's speed.
    #[arg(long, default_value_t = 0)]
    pub max_steps: usize,
    /// Answer tokens kept per generation example.
    #[arg(long, default_value_t = 96)]
    pub max_target_tokens: usize,
    /// Examples longer than this many tokens in all are skipped.
    #[arg(long, default_value_t = 1280)]
    pub max_tokens: usize,
    /// Validation generation examples (validation users), scored every --eval-every steps.
    #[arg(long, default_value_t = 12)]
    pub val_examples: usize,
    /// Optimizer steps between validation losses (0 = only at the end).
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Optimizer steps between checkpoints.
    #[arg(long, default_value_t = 5)]
    pub checkpoint_every: usize,
    /// Continue from the checkpoint in --out (same examples, optimizer state and position).
    #[arg(long)]
    pub resume: bool,
    /// Seed of the sampling, shuffling and LoRA initialization.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// How the examples of one optimizer step are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum LossWeighting {
    /// Mean over all answer tokens of the step.
    Token,
    /// Mean over examples of each example's mean token loss.
    Example,
}

impl LossWeighting {
    /// The weight of an example with `answer_tokens` tokens to predict.
    pub fn weight(self, answer_tokens: usize) -> f64 {
        match self {
            LossWeighting::Token => answer_tokens as f64,
            LossWeighting::Example => 1.0,
        }
    }
}

/// One point of the loss curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Optimizer step.
    pub step: usize,
    /// Mean training loss of the step's examples.
    pub train: f64,
    /// Validation loss, when measured at this step.
    pub validation: Option<f64>,
}

/// What a checkpoint resumes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: usize,
    /// Examples consumed (over epochs).
    position: usize,
    curve: Vec<Point>,
    seconds: f64,
    tokens: usize,
}

/// AdamW with its moments (kept in checkpoints).
pub struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Zero moments for `model`'s variables.
    pub fn new(model: &TrainModel, weight_decay: f64) -> candle_core::Result<Self> {
        let zeros = |t: &Tensor| t.zeros_like();
        let vars = model.vars();
        Ok(Self {
            m: vars
                .iter()
                .map(|v| zeros(v.as_tensor()))
                .collect::<Result<_, _>>()?,
            v: vars
                .iter()
                .map(|v| zeros(v.as_tensor()))
                .collect::<Result<_, _>>()?,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update (step `t`, 1-based) with the summed gradients `grads` of `count` examples
    /// (in [`TrainModel::vars`] order), clipped to norm 1; returns the gradient norm.
    pub fn step(
        &mut self,
        model: &TrainModel,
        grads: &[Tensor],
        weight: f64,
        lr: f64,
        t: usize,
    ) -> candle_core::Result<f64> {
        let scale = 1.0 / weight.max(1e-12);
        let mut norm2 = 0.0;
        for g in grads {
            norm2 += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = norm2.sqrt() * scale;
        let clip = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        let (b1t, b2t) = (
            1.0 - self.beta1.powi(t as i32),
            1.0 - self.beta2.powi(t as i32),
        );
        for (i, var) in model.vars().into_iter().enumerate() {
            let g = (&grads[i] * (scale * clip))?;
            self.m[i] = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let mhat = (&self.m[i] / b1t)?;
            let vhat = (&self.v[i] / b2t)?;
            let update = (mhat / (vhat.sqrt()? + self.eps)?)?;
            let w = var.as_tensor();
            let decayed = (w * (1.0 - lr * self.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(norm)
    }

    fn save(&self, path: &Path) -> candle_core::Result<()> {
        let mut map = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            map.insert(format!("m.{i}"), m.clone());
            map.insert(format!("v.{i}"), v.clone());
        }
        candle_core::safetensors::save(&map, path)
    }

    fn load(&mut self, path: &Path, device: &Device) -> candle_core::Result<()> {
        let map = candle_core::safetensors::load(path, device)?;
        for i in 0..self.m.len() {
            if let (Some(m), Some(v)) = (map.get(&format!("m.{i}")), map.get(&format!("v.{i}"))) {
                self.m[i] = m.clone();
                self.v[i] = v.clone();
            }
        }
        Ok(())
    }
}

/// Learning rate at optimizer step `t` (1-based): linear warm-up, then linear decay to 10%.
pub fn learning_rate(peak: f64, t: usize, warmup: usize, total: usize) -> f64 {
    if t <= warmup {
        return peak * t as f64 / warmup.max(1) as f64;
    }
    let rest = (total.saturating_sub(warmup)).max(1) as f64;
    let done = (t - warmup) as f64 / rest;
    peak * (1.0 - 0.9 * done.min(1.0))
}

fn sample(examples: &[Example], split: Split, n: usize, seed: u64) -> Vec<Example> {
    let mut chosen: Vec<Example> = examples
        .iter()
        .filter(|e| e.split == split)
        .cloned()
        .collect();
    Rng::new(seed).shuffle(&mut chosen);
    if n > 0 {
        chosen.truncate(n);
    }
    chosen
}

/// Whether the run reads its examples from `OUT/examples.jsonl` instead of building them.
fn resumes_from_cache(args: &TrainArgs) -> bool {
    args.resume && args.out.join("examples.jsonl").is_file()
}

/// The name clap gives `value` (`token`, `matched`, ...): the one spelling its flag accepts.
pub(crate) fn value_name(value: &impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// Builds (or, on resume, reads) the training and validation examples.
async fn build_examples(
    args: &TrainArgs,
    model_dir: &Path,
    base: &Path,
) -> anyhow::Result<(Vec<TrainExample>, Vec<TrainExample>)> {
    let cache = args.out.join("examples.jsonl");
    if resumes_from_cache(args) {
        let mut train = Vec::new();
        let mut val = Vec::new();
        for line in std::fs::read_to_string(&cache)?.lines() {
            let (is_val, e): (bool, TrainExample) = serde_json::from_str(line)?;
            if is_val { val.push(e) } else { train.push(e) }
        }
        eprintln!(
            "resuming with {} training and {} validation examples from {}",
            train.len(),
            val.len(),
            cache.display()
        );
        return Ok((train, val));
    }
    let data = args.data.clone();
    let loaded =
        tokio::task::spawn_blocking(move || ghostwriter_runtime::loaders::load(&data)).await??;
    let dataset = protocol::build(loaded.documents);
    let train_targets = sample(&dataset.examples, Split::Train, args.examples, args.seed);
    let val_targets = sample(
        &dataset.examples,
        Split::Validation,
        args.val_examples,
        args.seed,
    );
    anyhow::ensure!(
        !train_targets.is_empty(),
        "no training-split targets in {}",
        args.data.display()
    );
    let mut by_split: [BTreeMap<String, Vec<ghostwriter_proto::v1::Document>>; 2] =
        Default::default();
    for d in &dataset.documents {
        match protocol::split_of(&d.user_id) {
            Split::Train => by_split[0]
                .entry(d.user_id.clone())
                .or_default()
                .push(d.clone()),
            Split::Validation => by_split[1]
                .entry(d.user_id.clone())
                .or_default()
                .push(d.clone()),
            Split::Test => {}
        }
    }
    eprintln!(
        "{} training targets of {} training users; {} validation targets; presets {}",
        train_targets.len(),
        by_split[0].len(),
        val_targets.len(),
        args.presets.join(",")
    );
    let prompter = ghostwriter_generator::model::Prompter::load(base)?;
    let system = ghostwriter_generator::prompt::DEFAULT_SYSTEM;
    let embedder = {
        let dir = model_dir.join(ghostwriter_embed::EMBEDDER_DIR);
        tokio::task::spawn_blocking(move || ghostwriter_embed::Embedder::load(&dir, &Device::Cpu))
            .await??
    };
    // The real stages, over an index of every user's documents (retrieval only ever returns
    // the target user's earlier ones).
    let summary_chars = ghostwriter_runtime::embedded::EmbeddedConfig::defaults()
        .summary
        .summary_chars as usize;
    let lengths = Lengths {
        max_target_tokens: args.max_target_tokens,
        max_tokens: args.max_tokens,
    };
    let built = ghostwriter_runtime::embedded::Embedded::with_pipeline(
        model_dir.to_path_buf(),
        None,
        &dataset.documents,
        async |embedded| {
            let orchestrator = ghostwriter_orchestrator::OrchestratorService::new(
                embedded.orchestrator.clone(),
                &embedded.transport,
            )?;
            let mut retriever = match args.distinction_pairs {
                DistinctionPairs::Matched => Some(
                    ghostwriter_proto::v1::retriever_client::RetrieverClient::new(
                        ghostwriter_transport::client::channel(
                            &embedded.orchestrator.retriever_url,
                            None,
                        )?,
                    ),
                ),
                DistinctionPairs::Random => None,
            };
            let mut out = Vec::new();
            for (k, (targets, users)) in
                [(&train_targets, &by_split[0]), (&val_targets, &by_split[1])]
                    .into_iter()
                    .enumerate()
            {
                let bar = progress(
                    targets.len() as u64,
                    if k == 0 {
                        "training examples"
                    } else {
                        "validation examples"
                    },
                );
                let mut built = Vec::new();
                for (i, e) in targets.iter().enumerate() {
                    let preset = &args.presets[i % args.presets.len()];
                    if let Some(x) = data::generation_example(
                        &orchestrator,
                        &prompter,
                        &embedder,
                        system,
                        e,
                        preset,
                        summary_chars,
                        lengths,
                    )
                    .await?
                    {
                        built.push(x);
                    }
                    bar.inc(1);
                }
                bar.finish();
                let n = (built.len() as f64 * args.distinction_ratio).round() as usize;
                let mut starts: Vec<&Example> = targets.iter().collect();
                Rng::new(args.seed ^ 0xd15).shuffle(&mut starts);
                let starts: Vec<&Example> = starts.into_iter().cycle().take(n).collect();
                let partners = data::distinction_partners(
                    &starts,
                    users,
                    args.distinction_pairs,
                    retriever.as_mut(),
                    args.seed,
                )
                .await?;
                built.extend(data::distinction_examples(
                    &prompter, system, &starts, &partners, lengths,
                )?);
                Rng::new(args.seed ^ k as u64).shuffle(&mut built);
                out.push(built);
            }
            Ok(out)
        },
    )
    .await;
    let mut built = built?;
    let val = built.pop().unwrap_or_default();
    let train = built.pop().unwrap_or_default();
    std::fs::create_dir_all(&args.out)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(&cache)?);
    for (is_val, list) in [(false, &train), (true, &val)] {
        for e in list {
            writeln!(f, "{}", serde_json::to_string(&(is_val, e))?)?;
        }
    }
    f.flush()?;
    Ok((train, val))
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Mean loss over `examples` (no gradients), in batches of at most `batch_tokens` padded tokens.
fn mean_loss(
    model: &TrainModel,
    examples: &[TrainExample],
    weighting: LossWeighting,
    batch_tokens: usize,
) -> anyhow::Result<f64> {
    let (mut sum, mut weights) = (0.0, 0.0);
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    for batch in micro_batches(&lengths, batch_tokens) {
        let scored = scored(examples, &batch, weighting);
        sum += model.weighted_loss(&scored)?.to_scalar::<f32>()? as f64;
        weights += scored.iter().map(|s| s.weight).sum::<f64>();
    }
    Ok(sum / weights.max(1e-12))
}

/// The examples `batch` of `examples`, weighted as `weighting` says.
fn scored<'a>(
    examples: &'a [TrainExample],
    batch: &[usize],
    weighting: LossWeighting,
) -> Vec<model::Scored<'a>> {
    batch
        .iter()
        .map(|&i| {
            let e = &examples[i];
            model::Scored {
                ids: &e.ids,
                prompt: e.prompt,
                weight: weighting.weight(e.answer_tokens()),
            }
        })
        .collect()
}

/// Groups sequences (by index into `lengths`) into forward passes: longest first, a pass takes
/// the next sequence while its size times the pass's longest length stays within `budget`
/// tokens (a sequence longer than `budget` goes alone; 0 puts every sequence alone).
pub fn micro_batches(lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match batches.last_mut() {
            Some(batch) if (batch.len() + 1) * lengths[batch[0]] <= budget => batch.push(i),
            _ => batches.push(vec![i]),
        }
    }
    batches
}

/// Hash of the examples' token ids (the adapter's data provenance).
fn data_hash(examples: &[TrainExample]) -> String {
    let mut bytes = Vec::new();
    for e in examples {
        for id in &e.ids {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
        bytes.extend_from_slice(&(e.prompt as u32).to_le_bytes());
    }
    format!("{:016x}", protocol::fnv1a(&bytes))
}

/// Runs the fine-tuning and writes the adapter; returns its path.
pub async fn run(args: TrainArgs, model_dir: PathBuf) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(args.rank > 0, "--rank must be at least 1");
    anyhow::ensure!(args.grad_accum > 0, "--grad-accum must be at least 1");
    anyhow::ensure!(args.epochs > 0, "--epochs must be at least 1");
    anyhow::ensure!(!args.presets.is_empty(), "--presets names no preset");
    anyhow::ensure!(
        args.distinction_ratio >= 0.0 && args.distinction_ratio.is_finite(),
        "--distinction-ratio must be 0 or more"
    );
    anyhow::ensure!(
        args.max_minutes >= 0.0 && args.max_minutes.is_finite(),
        "--max-minutes must be 0 or more"
    );
    // Resuming from the example cache with an explicit --model needs no other model file (a GPU
    // worker can be given only the base GGUF and examples.jsonl).
    if !(resumes_from_cache(&args) && args.model.is_some()) {
        let dir = model_dir.clone();
        tokio::task::spawn_blocking(move || ghostwriter_runtime::models::ensure(&dir)).await??;
    }
    let base = args
        .model
        .clone()
        .unwrap_or_else(|| model_dir.join(ghostwriter_common::models::GENERATOR_Q8_0));
    std::fs::create_dir_all(&args.out)?;
    let (train, val) = build_examples(&args, &model_dir, &base).await?;
    anyhow::ensure!(!train.is_empty(), "no training example fits --max-tokens");
    let generation = train.iter().filter(|e| e.task == Task::Generation).count();
    eprintln!(
        "{} training examples ({} generation, {} author distinction), {} validation; {} tokens in all",
        train.len(),
        generation,
        train.len() - generation,
        val.len(),
        train.iter().map(|e| e.ids.len()).sum::<usize>()
    );
    let args2 = args.clone();
    tokio::task::spawn_blocking(move || fit(&args2, &base, &train, &val)).await?
}

/// A checkpoint continues only the run that wrote it: the settings that shape the optimization
/// must match (resuming with, say, another loss weighting would mix two runs in one adapter).
fn check_resumable(
    checkpoint: &BTreeMap<String, String>,
    run: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    const SETTINGS: [(&str, &str); 8] = [
        ("base_sha256", "--model"),
        ("data_hash", "the examples (examples.jsonl)"),
        ("loss_weighting", "--loss-weighting"),
        ("lr", "--lr"),
        ("targets", "--targets"),
        ("seed", "--seed"),
        ("distinction_ratio", "--distinction-ratio"),
        ("distinction_pairs", "--distinction-pairs"),
    ];
    for (key, what) in SETTINGS {
        if let (Some(had), Some(has)) = (checkpoint.get(key), run.get(key))
            && had != has
        {
            anyhow::bail!(
                "the checkpoint was trained with {what} = {had}, this run has {has}: resume with \
                 the same settings, or train into another --out"
            );
        }
    }
    Ok(())
}

fn fit(
    args: &TrainArgs,
    base: &Path,
    train: &[TrainExample],
    val: &[TrainExample],
) -> anyhow::Result<PathBuf> {
    let device = ghostwriter_embed::device::parse(&args.device)?;
    let targets: Vec<&str> = args.targets.iter().map(String::as_str).collect();
    let mut model = TrainModel::load(base, &device, args.rank, args.alpha, &targets, args.seed)?;
    let mut opt = AdamW::new(&model, args.weight_decay)?;
    let checkpoint = args.out.join("checkpoint");
    let mut state = State {
        step: 0,
        position: 0,
        curve: Vec::new(),
        seconds: 0.0,
        tokens: 0,
    };
    let total_examples = train.len() * args.epochs;
    let total_steps = total_examples.div_ceil(args.grad_accum);
    let base_sha = ghostwriter_common::models::sha256_file(base)?;
    let metadata = |state: &State| -> BTreeMap<String, String> {
        [
            (
                "base_model",
                base.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            ("base_sha256", base_sha.clone()),
            ("data_hash", data_hash(train)),
            ("data", args.data.display().to_string()),
            ("presets", args.presets.join(",")),
            ("distinction_ratio", args.distinction_ratio.to_string()),
            ("distinction_pairs", value_name(&args.distinction_pairs)),
            ("loss_weighting", value_name(&args.loss_weighting)),
            ("examples", train.len().to_string()),
            ("steps", state.step.to_string()),
            ("lr", args.lr.to_string()),
            ("targets", args.targets.join(",")),
            ("seed", args.seed.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    if args.resume && checkpoint.join("state.json").exists() {
        let adapter =
            ghostwriter_generator::adapter::Adapter::load(&checkpoint.join("adapter.safetensors"))?;
        check_resumable(&adapter.metadata, &metadata(&state))?;
        model.set_adapter(&adapter)?;
        opt.load(&checkpoint.join("optimizer.safetensors"), &device)?;
        state = serde_json::from_str(&std::fs::read_to_string(checkpoint.join("state.json"))?)?;
        eprintln!(
            "resuming at step {} (example {})",
            state.step, state.position
        );
    }
    let bar = progress(total_examples as u64, "fine-tuning");
    bar.set_position(state.position as u64);
    // Time already spent (on resume) counts toward the reported rate.
    let started = Instant::now()
        .checked_sub(std::time::Duration::from_secs_f64(state.seconds))
        .unwrap_or_else(Instant::now);
    let vars = model.vars();
    // --max-minutes / --max-steps: checked after each optimizer step (and once on resume).
    let limit_reached = |state: &State, elapsed: f64| {
        state.position < total_examples
            && ((args.max_minutes > 0.0 && elapsed >= args.max_minutes * 60.0)
                || (args.max_steps > 0 && state.step >= args.max_steps))
    };
    let mut stopped_early = limit_reached(&state, state.seconds);
    while state.position < total_examples && !stopped_early {
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0.0;
        let mut weight_sum = 0.0;
        // This step's examples, run in padded batches (the step's gradient is their sum, so
        // their order within it does not matter).
        let step: Vec<usize> = (state.position
            ..total_examples.min(state.position + args.grad_accum))
            .map(|p| p % train.len())
            .collect();
        let lengths: Vec<usize> = step.iter().map(|&i| train[i].ids.len()).collect();
        for batch in micro_batches(&lengths, args.batch_tokens) {
            let batch: Vec<usize> = batch.into_iter().map(|k| step[k]).collect();
            let scored = scored(train, &batch, args.loss_weighting);
            let loss = model.weighted_loss(&scored)?;
            let store = loss.backward()?;
            for (i, var) in vars.iter().enumerate() {
                if let Some(g) = store.get(var.as_tensor()) {
                    grads[i] = Some(match grads[i].take() {
                        None => g.clone(),
                        Some(acc) => (acc + g)?,
                    });
                }
            }
            loss_sum += loss.to_scalar::<f32>()? as f64;
            weight_sum += scored.iter().map(|s| s.weight).sum::<f64>();
            state.tokens += scored.iter().map(|s| s.ids.len()).sum::<usize>();
            bar.inc(batch.len() as u64);
        }
        state.position += step.len();
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<Result<_, _>>()?;
        state.step += 1;
        let lr = learning_rate(args.lr, state.step, args.warmup_steps, total_steps);
        opt.step(&model, &grads, weight_sum, lr, state.step)?;
        let train_loss = loss_sum / weight_sum;
        let elapsed = started.elapsed().as_secs_f64();
        bar.set_message(format!(
            "step {} loss {:.3} lr {:.1e} {:.0} tok/s",
            state.step,
            train_loss,
            lr,
            state.tokens as f64 / elapsed.max(1e-9)
        ));
        let stop = limit_reached(&state, elapsed);
        let last = state.position >= total_examples || stop;
        let validation = if !val.is_empty()
            && (last || (args.eval_every > 0 && state.step.is_multiple_of(args.eval_every)))
        {
            let v = mean_loss(&model, val, args.loss_weighting, args.batch_tokens)?;
            bar.println(format!("step {}: validation loss {v:.4}", state.step));
            Some(v)
        } else {
            None
        };
        state.curve.push(Point {
            step: state.step,
            train: train_loss,
            validation,
        });
        state.seconds = elapsed;
        if last || state.step.is_multiple_of(args.checkpoint_every.max(1)) {
            std::fs::create_dir_all(&checkpoint)?;
            model
                .adapter(metadata(&state))?
                .save(&checkpoint.join("adapter.safetensors"))?;
            opt.save(&checkpoint.join("optimizer.safetensors"))?;
            std::fs::write(
                checkpoint.join("state.json"),
                serde_json::to_string(&state)?,
            )?;
            std::fs::write(args.out.join("loss.svg"), loss_svg(&state.curve))?;
        }
        if stop {
            stopped_early = true;
            eprintln!(
                "stopped by --max-minutes/--max-steps after step {} of {total_steps} ({} of {total_examples} examples)",
                state.step, state.position
            );
            break;
        }
    }
    bar.finish();
    let path = args.out.join("adapter.safetensors");
    model.adapter(metadata(&state))?.save(&path)?;
    std::fs::write(args.out.join("loss.svg"), loss_svg(&state.curve))?;
    let report = serde_json::json!({
        "adapter": path,
        "steps": state.step,
        "total_steps": total_steps,
        "stopped_early": stopped_early,
        "examples": train.len(),
        "epochs": args.epochs,
        "tokens": state.tokens,
        "seconds": state.seconds,
        "tokens_per_s": state.tokens as f64 / state.seconds.max(1e-9),
        "first_train_loss": state.curve.first().map(|p| p.train),
        "last_train_loss": state.curve.last().map(|p| p.train),
        "validation": state.curve.iter().filter_map(|p| p.validation.map(|v| (p.step, v))).collect::<Vec<_>>(),
        "device": args.device,
        "metadata": metadata(&state),
    });
    std::fs::write(
        args.out.join("train.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!("{}", serde_json::to_string_pretty(&report)?);
    Ok(path)
}

/// The loss curve: training loss per step (line) and validation loss (dots).
pub fn loss_svg(curve: &[Point]) -> String {
    let (w, h, pad) = (640.0, 320.0, 40.0);
    let steps = curve.last().map_or(1, |p| p.step).max(1) as f64;
    let values = curve
        .iter()
        .flat_map(|p| std::iter::once(p.train).chain(p.validation));
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        (lo - 1.0, lo + 1.0)
    };
    let x = |s: usize| pad + (w - 2.0 * pad) * s as f64 / steps;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * (v - lo) / (hi - lo);
    let line: Vec<String> = curve
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.step), y(p.train)))
        .collect();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"20\">loss by optimizer step: training (line), validation (dots); {lo:.3} to {hi:.3}</text>\n<polyline fill=\"none\" stroke=\"#3366cc\" stroke-width=\"1.5\" points=\"{}\"/>\n",
        line.join(" ")
    );
    for p in curve {
        if let Some(v) = p.validation {
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#cc3333\"/>\n",
                x(p.step),
                y(v)
            ));
        }
    }
    out.push_str(&format!(
        "<text x=\"{pad}\" y=\"{}\">step 0</text><text x=\"{}\" y=\"{}\">step {steps}</text>\n</svg>\n",
        h - 10.0,
        w - pad - 50.0,
        h - 10.0
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_up_then_decay() {
        assert!((learning_rate(1.0, 1, 4, 20) - 0.25).abs() < 1e-12);
        assert!((learning_rate(1.0, 4, 4, 20) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, 20, 4, 20) - 0.1).abs() < 1e-12);
        let svg = loss_svg(&[
            Point {
                step: 1,
                train: 3.0,
                validation: None,
            },
            Point {
                step: 2,
                train: 2.5,
                validation: Some(2.7),
            },
        ]);
        assert!(svg.contains("<polyline") && svg.contains("<circle"));
    }

    #[test]
    fn token_weighting_counts_answer_tokens() {
        let example = |task, len: usize, prompt: usize| TrainExample {
            task,
            preset: String::new(),
            user_id: String::new(),
            ids: vec![0; len],
            prompt,
        };
        // A two-token distinction answer and a 96-token review: by token they weigh 2 to 96,
        // by example the same.
        let (short, long) = (
            example(Task::Distinction, 202, 200),
            example(Task::Generation, 396, 300),
        );
        assert_eq!((short.answer_tokens(), long.answer_tokens()), (2, 96));
        assert_eq!(LossWeighting::Token.weight(long.answer_tokens()), 96.0);
        assert_eq!(LossWeighting::Example.weight(long.answer_tokens()), 1.0);
        // With no prompt the first token is still not predicted.
        assert_eq!(example(Task::Generation, 5, 0).answer_tokens(), 4);
    }

    #[test]
    fn micro_batches_pack_short_examples_within_the_padded_budget() {
        // Longest first; a pass grows while count × its longest length fits.
        let lengths = [200, 1100, 250, 150, 900, 240];
        assert_eq!(
            micro_batches(&lengths, 1280),
            vec![vec![1], vec![4], vec![2, 5, 0, 3]]
        );
        // Every example is in exactly one pass.
        let mut all: Vec<usize> = micro_batches(&lengths, 600).concat();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
        // An example longer than the budget runs alone; 0 runs each alone.
        assert_eq!(micro_batches(&[2000, 10], 1280), vec![vec![0], vec![1]]);
        assert_eq!(micro_batches(&[10, 10], 0), vec![vec![0], vec![1]]);
        assert!(micro_batches(&[], 1280).is_empty());
    }
}
