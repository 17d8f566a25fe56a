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
//! stages (the embedded pipeline); decoding runs on the generator's engine with its prompts
//! (greedy, the served repeat penalty, 128 new tokens), context-aware decoding as the engine's
//! contrast policy ([`Params::contrast`]). For each `--alpha` it writes
//! `DIR/alpha-A/results.jsonl` with the plain `immediate-context` records and that alpha's
//! `syn-ctx` records (alpha 0 is plain greedy `syn-ctx`), which `eval --presets
//! immediate-context,syn-ctx --to http://127.0.0.1:9 --no-ingest --out DIR/alpha-A` scores.
//!
//! With `--score` it decodes nothing: it feeds each example's true continuation (at most 128
//! tokens) after both prompts ([`Params::score_continuation`]) and writes `DIR/score.json`, the
//! mean nats per token under each and the paired gain from the past reviews (`--model` scores
//! another GGUF, such as the GPU tier's).
//!
//! Run: `cargo run --release --example context_contrast -- --out DIR [--adapter PATH]
//! [--model GGUF] [--alpha 0,0.5,1] [--plausibility 0.1] [--limit N] [--chunk N] [--score]`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use ghostwriter::eval::protocol::{self, Split};
use ghostwriter::eval::{Record, select};
use ghostwriter_generator::engine::{Contrast, Engine, Input as EngineInput, Params};
use ghostwriter_generator::model::LanguageModel;
use ghostwriter_generator::prompt::Parts;
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
        adapter: Default::default(),
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
    let model = LanguageModel::load(&path, &config.load_options())?;
    let engine = Engine::start(model, config.engine_config());
    let input = |p: &PersonalizedInput| EngineInput::Personalized(parts(p));
    let greedy = Params {
        max_new_tokens: MAX_NEW,
        repeat_penalty: config.repeat_penalty,
        ..Params::default()
    };
    if score {
        let mut jobs = Vec::new();
        for inp in &inputs {
            let e = &examples[inp.example];
            let rest = e
                .target()
                .strip_prefix(inp.immediate_context.as_str())
                .map(str::to_string)
                .unwrap_or_default();
            let mut rest = engine.prompter().encode_plain(&rest)?;
            rest.truncate(MAX_NEW);
            jobs.push((input(&inp.syn), input(&inp.imm), rest));
        }
        let report = runtime.block_on(likelihoods(&engine, jobs, chunk))?;
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
    let decode_started = Instant::now();
    for (c, group) in inputs.chunks(chunk.max(1)).enumerate() {
        let mut jobs = Vec::new();
        for inp in group {
            jobs.push((inp.example, 0, input(&inp.imm), greedy.clone()));
            for (v, &alpha) in alphas.iter().enumerate() {
                // Alpha 0 is plain greedy decoding of the syn-ctx prompt.
                let contrast = (alpha != 0.0).then(|| Contrast {
                    against: input(&inp.imm),
                    alpha,
                    plausibility,
                });
                let params = Params {
                    contrast,
                    ..greedy.clone()
                };
                jobs.push((inp.example, v + 1, input(&inp.syn), params));
            }
        }
        let runs = jobs.into_iter().map(|(example, variant, input, params)| {
            let engine = &engine;
            async move {
                let stats = engine.generate(input, params, None).await?;
                anyhow::Ok((example, variant, stats.tokens))
            }
        });
        for run in runtime.block_on(futures::future::join_all(runs)) {
            let (example, variant, tokens) = run?;
            let text = engine.prompter().decode(&tokens)?;
            let slot = &mut texts[example];
            if slot.len() <= variant {
                slot.resize(variant + 1, (String::new(), 0));
            }
            slot[variant] = (text, tokens.len() as u32);
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
                    generator: engine.model_name(),
                };
                writeln!(file, "{}", serde_json::to_string(&record)?)?;
            }
        }
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Teacher-forced log-likelihood of each example's true continuation after its `syn-ctx`
/// prompt and after its `immediate-context` prompt (`(syn, imm, continuation)`): mean nats per
/// token under each, and the paired per-example difference with a normal 95% interval.
async fn likelihoods(
    engine: &Engine,
    jobs: Vec<(EngineInput, EngineInput, Vec<u32>)>,
    chunk: usize,
) -> anyhow::Result<serde_json::Value> {
    // Per example: (nats, tokens) under the syn-ctx and the immediate-context prompt.
    let mut totals = vec![[(0f64, 0usize); 2]; jobs.len()];
    let started = Instant::now();
    let n_jobs = jobs.len();
    let chunk = chunk.max(1);
    let mut jobs = jobs.into_iter().enumerate().peekable();
    let mut c = 0;
    while jobs.peek().is_some() {
        let mut runs = Vec::new();
        for (example, (syn, imm, rest)) in jobs.by_ref().take(chunk) {
            if rest.is_empty() {
                continue;
            }
            for (v, prompt) in [syn, imm].into_iter().enumerate() {
                let params = Params {
                    score_continuation: rest.clone(),
                    ..Params::default()
                };
                runs.push(async move {
                    let stats = engine.generate(prompt, params, None).await?;
                    anyhow::Ok((example, v, stats.scores))
                });
            }
        }
        for run in futures::future::join_all(runs).await {
            let (example, v, scores) = run?;
            let t = &mut totals[example][v];
            for lp in scores {
                t.0 -= lp as f64;
                t.1 += 1;
            }
        }
        c += 1;
        eprintln!(
            "{}/{} examples scored ({:.0} s)",
            (c * chunk).min(n_jobs),
            n_jobs,
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
        "model": engine.model_name(),
        "examples": scored.len(),
        "tokens_per_example": scored.iter().map(|x| x[0].1).sum::<usize>() as f64 / n,
        "nats_per_token_syn_ctx": mean(0),
        "nats_per_token_immediate_context": mean(1),
        "gain_nats_per_token": g,
        "gain_ci95": [g - half, g + half],
        "seconds": started.elapsed().as_secs_f64(),
    }))
}
