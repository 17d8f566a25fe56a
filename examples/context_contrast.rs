//! Whether the past reviews can be made to choose the words, not only lengthen the text:
//! context-aware (contrastive) decoding on the test split.
//!
//! The fine-tuned generator's validation loss is lower with the past reviews in the prompt
//! (3.48 nats per answer token against 3.65 without), yet greedy and beam decoding turn that
//! into longer outputs, not more right words. Context-aware decoding (Shi et al., 2023) scores
//! each next token by `log p(t | syn-ctx prompt) + alpha * (log p(t | syn-ctx prompt) -
//! log p(t | immediate-context prompt))` among the tokens within `--plausibility` of the
//! syn-ctx prompt's likeliest one: it favours what the past reviews make likelier.
//!
//! Every test example's `syn-ctx` and `immediate-context` generator inputs come from the real
//! stages (the embedded pipeline); decoding runs here on the generator's own backend and
//! prompts (greedy, the served repeat penalty, 128 new tokens). For each `--alpha` it writes
//! `DIR/alpha-A/results.jsonl` with the plain `immediate-context` records and that alpha's
//! `syn-ctx` records (alpha 0 is plain greedy `syn-ctx`), which `eval --presets
//! immediate-context,syn-ctx --to http://127.0.0.1:9 --no-ingest --out DIR/alpha-A` scores.
//!
//! With `--score` it decodes nothing: it feeds each example's true continuation (at most 128
//! tokens) after both prompts and writes `DIR/score.json`, the mean nats per token under each
//! and the paired gain from the past reviews (`--model` scores another GGUF, such as the GPU
//! tier's).
//!
//! Run: `cargo run --release --example context_contrast -- --out DIR [--adapter PATH]
//! [--model GGUF] [--alpha 0,0.5,1] [--plausibility 0.1] [--limit N] [--chunk N] [--score]`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use ghostwriter::eval::protocol::{self, Split};
use ghostwriter::eval::{Record, select};
use ghostwriter_generator::backend::SeqStep;
use ghostwriter_generator::model::LanguageModel;
use ghostwriter_generator::prompt::{self, Parts};
use ghostwriter_generator::sampler::{Sampler, argmax, log_sum_exp};
use ghostwriter_orchestrator::OrchestratorService;
use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::{GenerationParams, PersonalizedInput, WriteOptions, WriteRequest};

const MAX_NEW: usize = 128;

/// One example's two generator inputs.
struct Inputs {
    example: usize,
    immediate_context: String,
    syn: PersonalizedInput,
    imm: PersonalizedInput,
    important_words: u32,
    passage_ids: Vec<String>,
}

/// Hands out consecutive cache blocks to the sequences of one chunk.
struct Blocks {
    size: usize,
    total: usize,
    next: u32,
}

impl Blocks {
    fn new(model: &LanguageModel) -> Self {
        Self {
            size: model.backend.block_size(),
            total: model.backend.cache_blocks(),
            next: 0,
        }
    }

    /// Blocks for `positions` positions.
    fn take(&mut self, positions: usize) -> anyhow::Result<Vec<u32>> {
        let n = positions.div_ceil(self.size) as u32;
        let blocks: Vec<u32> = (self.next..self.next + n).collect();
        self.next += n;
        anyhow::ensure!(
            self.next as usize <= self.total,
            "a chunk needs more than the {} cache blocks; lower --chunk",
            self.total
        );
        Ok(blocks)
    }
}

/// One sequence on the backend: its prompt in the first step, then one token a step.
struct Stream {
    prompt: Vec<u32>,
    /// Positions computed.
    pos: usize,
    blocks: Vec<u32>,
}

impl Stream {
    /// `prompt`, with room for `more` tokens after it.
    fn new(prompt: Vec<u32>, more: usize, blocks: &mut Blocks) -> anyhow::Result<Self> {
        let blocks = blocks.take(prompt.len() + more + 1)?;
        Ok(Self {
            prompt,
            pos: 0,
            blocks,
        })
    }

    /// This step's share: the whole prompt first, afterwards `next`.
    fn step<'a>(&'a self, next: &'a [u32]) -> SeqStep<'a> {
        let (tokens, start) = if self.pos == 0 {
            (self.prompt.as_slice(), 0)
        } else {
            (next, self.pos)
        };
        SeqStep {
            tokens,
            start,
            blocks: &self.blocks,
            logits: true,
        }
    }
}

/// One decoding: a main prompt, and for contrast a second prompt with its weight.
struct Run {
    example: usize,
    variant: usize,
    main: Stream,
    contrast: Option<Stream>,
    alpha: f32,
    out: Vec<u32>,
    done: bool,
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| l - lse).collect()
}

fn parts(input: &PersonalizedInput) -> Parts {
    Parts {
        passage_start: input.passage_start.clone(),
        summary: input.summary.clone(),
        important_words: input.important_words.clone(),
        past_passages: input.past_passages.clone(),
        omit_passage_start: input.omit_passage_start,
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut out, mut adapter, mut limit) = (None, None, None);
    let mut alphas = vec![0.0f32, 0.5, 1.0];
    let mut plausibility = 0.1f32;
    let mut chunk = 2usize;
    let mut score = false;
    let mut model_path = None;
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--adapter" => adapter = Some(PathBuf::from(value()?)),
            "--limit" => limit = Some(value()?.parse()?),
            "--alpha" => {
                alphas = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<f32>())
                    .collect::<Result<_, _>>()?
            }
            "--plausibility" => plausibility = value()?.parse()?,
            "--chunk" => chunk = value()?.parse()?,
            "--score" => score = true,
            "--model" => model_path = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!(
                    "context_contrast --out DIR [--adapter PATH] [--model GGUF] [--alpha 0,0.5,1] \
                     [--plausibility 0.1] [--limit N] [--chunk EXAMPLES] [--score]: syn-ctx writes \
                     of the test split with context-aware decoding against the immediate-context \
                     prompt; with --score, the true continuation's log-likelihood under each \
                     prompt instead (DIR/score.json)"
                );
                return Ok(());
            }
            _ => anyhow::bail!("unexpected argument {a}"),
        }
    }
    let out = out.context("--out DIR is required")?;
    anyhow::ensure!(
        plausibility > 0.0 && plausibility <= 1.0,
        "--plausibility in (0, 1]"
    );
    let model_dir = ghostwriter_common::models::default_dir();
    let dataset =
        protocol::build(ghostwriter::loaders::load(&ghostwriter::bench::default_data())?.documents);
    let examples = select(&dataset.examples, Split::Test, limit, 42);
    let runtime = tokio::runtime::Runtime::new()?;
    let request = |e: &protocol::Example, preset: &str| WriteRequest {
        user_id: e.user_id.clone(),
        title: e.title.clone(),
        start: e.text.clone(),
        preset: preset.to_string(),
        timestamp: Some(e.timestamp),
        doc_id: e.doc_id.clone(),
        options: Some(WriteOptions {
            generation: Some(GenerationParams {
                max_new_tokens: MAX_NEW as u32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        consistency_token: Default::default(),
    };
    let started = Instant::now();
    let inputs: Vec<Inputs> = runtime.block_on(ghostwriter::embedded::Embedded::with_pipeline(
        model_dir.clone(),
        adapter.clone(),
        &dataset.documents,
        async |embedded| {
            let orchestrator =
                OrchestratorService::new(embedded.orchestrator.clone(), &embedded.transport)?;
            let mut inputs = Vec::new();
            for (i, e) in examples.iter().enumerate() {
                let personalized = |g: ghostwriter_proto::v1::GenerateRequest| match g.input {
                    Some(Input::Personalized(p)) => Ok(p),
                    _ => Err(anyhow::anyhow!("{}: not a personalized input", e.doc_id)),
                };
                let (syn, provenance) = orchestrator
                    .generator_input(request(e, "syn-ctx"))
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {s}", e.doc_id))?;
                let (imm, _) = orchestrator
                    .generator_input(request(e, "immediate-context"))
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {s}", e.doc_id))?;
                inputs.push(Inputs {
                    example: i,
                    immediate_context: provenance.immediate_context.clone(),
                    syn: personalized(syn)?,
                    imm: personalized(imm)?,
                    important_words: provenance.important_words.len() as u32,
                    passage_ids: provenance.doc_ids.clone(),
                });
            }
            Ok(inputs)
        },
    ))?;
    eprintln!(
        "{} inputs prepared in {:.0} s",
        inputs.len(),
        started.elapsed().as_secs_f64()
    );

    let mut config = ghostwriter::embedded::EmbeddedConfig::defaults().generator;
    config.adapter = adapter;
    config.kv_cache_mb = 2048;
    let path =
        model_path.unwrap_or_else(|| model_dir.join(ghostwriter_common::models::GENERATOR_Q8_0));
    let mut model = LanguageModel::load(&path, &config.load_options())?;
    let sampler = Sampler::new(0.0, 1.0, 0, config.repeat_penalty, config.repeat_last_n);
    let stop = model.prompter.stop_ids.clone();
    let encode = |m: &LanguageModel, p: &PersonalizedInput| {
        m.prompter
            .encode(&prompt::personalized(&config.system, &parts(p)))
    };
    if score {
        let mut prompts = Vec::new();
        for inp in &inputs {
            let e = &examples[inp.example];
            let rest = e
                .target()
                .strip_prefix(inp.immediate_context.as_str())
                .map(str::to_string)
                .unwrap_or_default();
            let mut rest = model.prompter.encode_plain(&rest)?;
            rest.truncate(MAX_NEW);
            prompts.push((encode(&model, &inp.syn)?, encode(&model, &inp.imm)?, rest));
        }
        let report = likelihoods(&mut model, &prompts, chunk)?;
        std::fs::create_dir_all(&out)?;
        std::fs::write(
            out.join("score.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    // variant 0: immediate-context; 1..: syn-ctx with each alpha.
    let mut texts: Vec<Vec<(String, u32)>> = vec![vec![]; inputs.len()];
    let ln_plaus = plausibility.ln();
    let decode_started = Instant::now();
    for (c, group) in inputs.chunks(chunk.max(1)).enumerate() {
        let mut runs = Vec::new();
        let mut blocks = Blocks::new(&model);
        for inp in group {
            let syn = encode(&model, &inp.syn)?;
            let imm = encode(&model, &inp.imm)?;
            let mut variants = vec![(imm.clone(), None, 0.0)];
            for &a in &alphas {
                variants.push((syn.clone(), (a != 0.0).then(|| imm.clone()), a));
            }
            for (v, (main, contrast, alpha)) in variants.into_iter().enumerate() {
                runs.push(Run {
                    example: inp.example,
                    variant: v,
                    main: Stream::new(main, MAX_NEW, &mut blocks)?,
                    contrast: contrast
                        .map(|c| Stream::new(c, MAX_NEW, &mut blocks))
                        .transpose()?,
                    alpha,
                    out: Vec::new(),
                    done: false,
                });
            }
        }
        while runs.iter().any(|r| !r.done) {
            let mut steps = Vec::new();
            let mut owners = Vec::new();
            let last: Vec<Vec<u32>> = runs
                .iter()
                .map(|r| r.out.last().copied().into_iter().collect())
                .collect();
            for (i, r) in runs.iter().enumerate().filter(|(_, r)| !r.done) {
                steps.push(r.main.step(&last[i]));
                owners.push((i, false));
                if let Some(c) = &r.contrast {
                    steps.push(c.step(&last[i]));
                    owners.push((i, true));
                }
            }
            let logits = model.backend.forward(&steps)?;
            let fed: Vec<usize> = steps.iter().map(|s| s.tokens.len()).collect();
            drop(steps);
            // Per run: the main stream's logits, and the contrast stream's.
            let mut rows: Vec<[Option<Vec<f32>>; 2]> = vec![[None, None]; runs.len()];
            for (((i, is_contrast), l), n) in owners.into_iter().zip(logits).zip(fed) {
                let r = &mut runs[i];
                let stream = match &mut r.contrast {
                    Some(c) if is_contrast => c,
                    _ => &mut r.main,
                };
                stream.pos += n;
                rows[i][usize::from(is_contrast)] = Some(l);
            }
            for (i, r) in runs.iter_mut().enumerate().filter(|(_, r)| !r.done) {
                let [main, contrast] = std::mem::take(&mut rows[i]);
                let mut main = main.context("main logits")?;
                sampler.penalize(&mut main, &r.out);
                let token = match contrast {
                    None => argmax(&main),
                    Some(mut con) => {
                        sampler.penalize(&mut con, &r.out);
                        let lm = log_softmax(&main);
                        let lc = log_softmax(&con);
                        let best = lm.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                        let scored: Vec<f32> = lm
                            .iter()
                            .zip(&lc)
                            .map(|(&m, &c)| {
                                if m >= best + ln_plaus {
                                    m + r.alpha * (m - c)
                                } else {
                                    f32::NEG_INFINITY
                                }
                            })
                            .collect();
                        argmax(&scored)
                    }
                };
                if stop.contains(&token) {
                    r.done = true;
                    continue;
                }
                r.out.push(token);
                if r.out.len() >= MAX_NEW {
                    r.done = true;
                }
            }
        }
        for r in &runs {
            let text = model.prompter.decode(&r.out)?;
            let slot = &mut texts[r.example];
            if slot.len() <= r.variant {
                slot.resize(r.variant + 1, (String::new(), 0));
            }
            slot[r.variant] = (text, r.out.len() as u32);
        }
        eprintln!(
            "{}/{} examples decoded ({:.0} s)",
            ((c + 1) * chunk).min(inputs.len()),
            inputs.len(),
            decode_started.elapsed().as_secs_f64()
        );
    }

    for (v, alpha) in alphas.iter().enumerate() {
        let dir = out.join(format!("alpha-{alpha}"));
        std::fs::create_dir_all(&dir)?;
        let mut file = std::fs::File::create(dir.join("results.jsonl"))?;
        for inp in &inputs {
            let e = &examples[inp.example];
            for (preset, variant) in [("immediate-context", 0), ("syn-ctx", v + 1)] {
                let (text, tokens) = &texts[inp.example][variant];
                let record = Record {
                    preset: preset.to_string(),
                    user_id: e.user_id.clone(),
                    doc_id: e.doc_id.clone(),
                    prediction: format!("{}{}", inp.immediate_context, text),
                    target: e.target(),
                    latency_ms: 0.0,
                    generated_tokens: *tokens,
                    generated: text.clone(),
                    important_words: if preset == "syn-ctx" {
                        inp.important_words
                    } else {
                        0
                    },
                    passage_ids: if preset == "syn-ctx" {
                        inp.passage_ids.clone()
                    } else {
                        Vec::new()
                    },
                };
                writeln!(file, "{}", serde_json::to_string(&record)?)?;
            }
        }
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Teacher-forced log-likelihood of each example's true continuation (`rest`) after its
/// `syn-ctx` prompt and after its `immediate-context` prompt: mean nats per token under each,
/// and the paired per-example difference with a normal 95% interval.
fn likelihoods(
    model: &mut LanguageModel,
    prompts: &[(Vec<u32>, Vec<u32>, Vec<u32>)],
    chunk: usize,
) -> anyhow::Result<serde_json::Value> {
    // Per example: (nats, tokens) under the syn-ctx and the immediate-context prompt.
    let mut totals = vec![[(0f64, 0usize); 2]; prompts.len()];
    let started = Instant::now();
    for (c, group) in prompts.chunks(chunk.max(1)).enumerate() {
        // (example, variant, stream, the continuation it is scored on)
        let mut seqs = Vec::new();
        let mut blocks = Blocks::new(model);
        for (i, (syn, imm, rest)) in group.iter().enumerate() {
            if rest.is_empty() {
                continue;
            }
            for (v, prompt) in [syn, imm].into_iter().enumerate() {
                let stream = Stream::new(prompt.clone(), rest.len(), &mut blocks)?;
                seqs.push((c * chunk + i, v, stream, rest));
            }
        }
        // A stream is done once every continuation token is scored (the last is never fed).
        let scored =
            |s: &Stream, rest: &[u32]| s.pos > 0 && s.pos - s.prompt.len() == rest.len() - 1;
        loop {
            let live: Vec<usize> = (0..seqs.len())
                .filter(|&k| !scored(&seqs[k].2, seqs[k].3))
                .collect();
            if live.is_empty() {
                break;
            }
            let steps: Vec<SeqStep<'_>> = live
                .iter()
                .map(|&k| {
                    let (_, _, stream, rest) = &seqs[k];
                    let fed = stream.pos.saturating_sub(stream.prompt.len());
                    stream.step(&rest[fed..=fed])
                })
                .collect();
            let logits = model.backend.forward(&steps)?;
            let fed: Vec<usize> = steps.iter().map(|s| s.tokens.len()).collect();
            drop(steps);
            for ((&k, row), n) in live.iter().zip(logits).zip(fed) {
                let (example, v, stream, rest) = &mut seqs[k];
                stream.pos += n;
                let next = rest[stream.pos - stream.prompt.len()];
                let t = &mut totals[*example][*v];
                t.0 -= log_softmax(&row)[next as usize] as f64;
                t.1 += 1;
            }
        }
        eprintln!(
            "{}/{} examples scored ({:.0} s)",
            ((c + 1) * chunk).min(prompts.len()),
            prompts.len(),
            started.elapsed().as_secs_f64()
        );
    }
    let scored: Vec<&[(f64, usize); 2]> = totals.iter().filter(|t| t[0].1 > 0).collect();
    let mean = |v: usize| {
        let (n, t) = scored
            .iter()
            .fold((0f64, 0usize), |a, x| (a.0 + x[v].0, a.1 + x[v].1));
        n / t.max(1) as f64
    };
    // Paired per example: immediate-context nats/token minus syn-ctx nats/token.
    let gains: Vec<f64> = scored
        .iter()
        .map(|x| x[1].0 / x[1].1 as f64 - x[0].0 / x[0].1 as f64)
        .collect();
    let n = gains.len().max(1) as f64;
    let g = gains.iter().sum::<f64>() / n;
    let sd = (gains.iter().map(|x| (x - g).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
    let half = 1.96 * sd / n.sqrt();
    Ok(serde_json::json!({
        "model": model.name,
        "examples": scored.len(),
        "tokens_per_example": scored.iter().map(|x| x[0].1).sum::<usize>() as f64 / n,
        "nats_per_token_syn_ctx": mean(0),
        "nats_per_token_immediate_context": mean(1),
        "gain_nats_per_token": g,
        "gain_ci95": [g - half, g + half],
        "seconds": started.elapsed().as_secs_f64(),
    }))
}
