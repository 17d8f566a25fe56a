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
//! Run: `cargo run --release --example context_contrast -- --out DIR [--adapter PATH]
//! [--alpha 0,0.5,1] [--plausibility 0.1] [--limit N]`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use ghostwriter::eval::protocol::{self, Split};
use ghostwriter::eval::{Record, select};
use ghostwriter_generator::backend::SeqStep;
use ghostwriter_generator::model::LanguageModel;
use ghostwriter_generator::prompt::{self, Parts};
use ghostwriter_generator::sampler::Sampler;
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

/// One decoding: a main prompt, and for contrast a second prompt with its weight.
struct Run {
    example: usize,
    variant: usize,
    main: Vec<u32>,
    contrast: Option<Vec<u32>>,
    alpha: f32,
    main_pos: usize,
    contrast_pos: usize,
    main_blocks: Vec<u32>,
    contrast_blocks: Vec<u32>,
    out: Vec<u32>,
    done: bool,
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let lse = max + sum.ln();
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
            "-h" | "--help" => {
                println!(
                    "context_contrast --out DIR [--adapter PATH] [--alpha 0,0.5,1] \
                     [--plausibility 0.1] [--limit N] [--chunk EXAMPLES]: syn-ctx writes of the \
                     test split with context-aware decoding against the immediate-context prompt"
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
    };
    let started = Instant::now();
    let inputs: Vec<Inputs> = runtime.block_on(ghostwriter::embedded::Embedded::with_pipeline(
        model_dir.clone(),
        adapter.clone(),
        &dataset.documents,
        async |embedded| {
            let orchestrator = OrchestratorService::new(embedded.orchestrator.clone())
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            let mut inputs = Vec::new();
            for (i, e) in examples.iter().enumerate() {
                let personalized = |g: ghostwriter_proto::v1::GenerateRequest| match g.input {
                    Some(Input::Personalized(p)) => Ok(p),
                    _ => Err(anyhow::anyhow!("{}: not a personalized input", e.doc_id)),
                };
                let (syn, provenance) =
                    orchestrator
                        .generator_input(request(e, "syn-ctx"))
                        .await
                        .map_err(|s| anyhow::anyhow!("{}: {}", e.doc_id, s.message()))?;
                let (imm, _) = orchestrator
                    .generator_input(request(e, "immediate-context"))
                    .await
                    .map_err(|s| anyhow::anyhow!("{}: {}", e.doc_id, s.message()))?;
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
    let path = model_dir.join(ghostwriter_common::models::GENERATOR_Q8_0);
    let mut model = LanguageModel::load(&path, &config.load_options())?;
    let bs = model.backend.block_size();
    let total_blocks = model.backend.cache_blocks();
    let sampler = Sampler::new(0.0, 1.0, 0, config.repeat_penalty, config.repeat_last_n);
    let stop = model.prompter.stop_ids.clone();
    let encode = |m: &LanguageModel, p: &PersonalizedInput| {
        m.prompter
            .encode(&prompt::personalized(&config.system, &parts(p)))
    };
    // variant 0: immediate-context; 1..: syn-ctx with each alpha.
    let mut texts: Vec<Vec<(String, u32)>> = vec![vec![]; inputs.len()];
    let ln_plaus = plausibility.ln();
    let decode_started = Instant::now();
    for (c, group) in inputs.chunks(chunk.max(1)).enumerate() {
        let mut runs = Vec::new();
        let mut next_block = 0u32;
        let mut take = |n: usize| {
            let blocks: Vec<u32> = (next_block..next_block + n.div_ceil(bs) as u32).collect();
            next_block += blocks.len() as u32;
            blocks
        };
        for inp in group {
            let syn = encode(&model, &inp.syn)?;
            let imm = encode(&model, &inp.imm)?;
            let mut variants = vec![(imm.clone(), None, 0.0)];
            for &a in &alphas {
                variants.push((syn.clone(), (a != 0.0).then(|| imm.clone()), a));
            }
            for (v, (main, contrast, alpha)) in variants.into_iter().enumerate() {
                let main_blocks = take(main.len() + MAX_NEW + 1);
                let contrast_blocks = contrast
                    .as_ref()
                    .map(|c| take(c.len() + MAX_NEW + 1))
                    .unwrap_or_default();
                runs.push(Run {
                    example: inp.example,
                    variant: v,
                    main,
                    contrast,
                    alpha,
                    main_pos: 0,
                    contrast_pos: 0,
                    main_blocks,
                    contrast_blocks,
                    out: Vec::new(),
                    done: false,
                });
            }
        }
        anyhow::ensure!(
            (next_block as usize) <= total_blocks,
            "chunk needs {next_block} cache blocks, the cache has {total_blocks}"
        );
        while runs.iter().any(|r| !r.done) {
            let mut steps = Vec::new();
            let mut owners = Vec::new();
            let last: Vec<Vec<u32>> = runs
                .iter()
                .map(|r| r.out.last().copied().into_iter().collect())
                .collect();
            for (i, r) in runs.iter().enumerate().filter(|(_, r)| !r.done) {
                let (tokens, start): (&[u32], usize) = if r.main_pos == 0 {
                    (&r.main, 0)
                } else {
                    (&last[i], r.main_pos)
                };
                steps.push(SeqStep {
                    tokens,
                    start,
                    blocks: &r.main_blocks,
                    logits: true,
                });
                owners.push((i, false));
                if let Some(c) = &r.contrast {
                    let (tokens, start): (&[u32], usize) = if r.contrast_pos == 0 {
                        (c, 0)
                    } else {
                        (&last[i], r.contrast_pos)
                    };
                    steps.push(SeqStep {
                        tokens,
                        start,
                        blocks: &r.contrast_blocks,
                        logits: true,
                    });
                    owners.push((i, true));
                }
            }
            let logits = model.backend.forward(&steps)?;
            let fed: Vec<usize> = steps.iter().map(|s| s.tokens.len()).collect();
            drop(steps);
            let mut main_logits: Vec<Option<Vec<f32>>> = vec![None; runs.len()];
            let mut contrast_logits: Vec<Option<Vec<f32>>> = vec![None; runs.len()];
            for (((i, is_contrast), l), n) in owners.into_iter().zip(logits).zip(fed) {
                if is_contrast {
                    runs[i].contrast_pos += n;
                    contrast_logits[i] = Some(l);
                } else {
                    runs[i].main_pos += n;
                    main_logits[i] = Some(l);
                }
            }
            for (i, r) in runs.iter_mut().enumerate().filter(|(_, r)| !r.done) {
                let mut main = main_logits[i].take().context("main logits")?;
                sampler.penalize(&mut main, &r.out);
                let token = match contrast_logits[i].take() {
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

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
