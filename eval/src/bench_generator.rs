//! `ghostwriter bench-generator`: the generator engine alone, in process, on CPU or CUDA, with
//! llama.cpp (llama-cpp-python) measured side by side in the same run on the same GGUF and
//! thread count. Writes JSON.
//!
//! Measured:
//! - prompt tokens/s: one request of `--prompt-tokens` tokens and one new token, repeated,
//!   prefix cache off (time to first token);
//! - single-stream decode tokens/s: one request generating `--new-tokens` tokens;
//! - for each stream count: that many requests submitted at once (distinct prompts of
//!   `--decode-prompt-tokens`), aggregate generated tokens/s over the wall time, first-token
//!   p50/p99;
//! - prefix-cache hit ratio: the presets of one write (same start and passages, with and without
//!   summary and important words);
//! - peak resident memory of the process.

use crate::percentile;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ghostwriter_generator::engine::{Engine, EngineError, Input, Params, Stats};
use ghostwriter_generator::prompt::Parts;
use ghostwriter_generator::{GeneratorConfig, LanguageModel};
use serde_json::{Value, json};

/// Options of the benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchGeneratorArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// GGUF model (default: SmolLM2-135M-Instruct Q8_0 under the model directory).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Compute threads on CPU (0 = every core); llama.cpp gets the same number.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Concurrent stream counts to measure, comma-separated.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub streams: Vec<usize>,
    /// Prompt length for the prompt-processing measurement, tokens.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Prompt length of each stream in the decode measurements, tokens.
    #[arg(long, default_value_t = 64)]
    pub decode_prompt_tokens: usize,
    /// Tokens each stream generates.
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Generate exactly --new-tokens (end-of-turn tokens are never chosen), so runs have equal
    /// length.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_eos: bool,
    /// Repetitions of each single-stream measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Beams of the beam-search measurement (0 or 1 = skip it).
    #[arg(long, default_value_t = 4)]
    pub beams: usize,
    /// Concurrent beam searches in that measurement (each against greedy on the same prompts).
    #[arg(long, default_value_t = 4)]
    pub beam_streams: usize,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 128)]
    pub max_running: usize,
    /// Tokens per forward pass at most.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Key/value cache, MiB.
    #[arg(long, default_value_t = 512)]
    pub kv_cache_mb: usize,
    /// Distinct LoRA adapters (seeded, of the shipped shape: rank 8, seven projections, every
    /// layer) for the many-adapters measurement at the largest stream count: stream i runs on
    /// adapter i mod N, against the same run with no adapter (0 = skip it).
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    /// Alternating runs of that measurement, each with and without adapters (medians).
    #[arg(long, default_value_t = 3)]
    pub adapter_runs: usize,
    /// Also measure llama.cpp through this Python interpreter (one with llama-cpp-python
    /// installed, e.g. /tmp/peer-venv/bin/python).
    #[arg(long)]
    pub compare_llama_cpp: Option<PathBuf>,
    /// Text to build prompts from (JSONL documents or Amazon .json.gz).
    #[arg(long, default_value_os_t = crate::bench::default_data())]
    pub data: PathBuf,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-generator.json")]
    pub out: PathBuf,
    /// Where the seeded adapters are written (set by the run: a temporary directory).
    #[arg(skip)]
    pub adapter_dir: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Peak resident memory of this process, MiB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs one job to the end.
async fn run_job(engine: &Engine, input: Input, params: Params) -> Result<Stats, EngineError> {
    engine.generate(input, params, None).await
}

fn params(new_tokens: usize, ignore_eos: bool) -> Params {
    Params {
        max_new_tokens: new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        stop: Vec::new(),
        repeat_penalty: 1.0,
        ignore_eos,
        score: Vec::new(),
        num_beams: 1,
        length_penalty: 1.0,
        ..Params::default()
    }
}

/// An instruction of about `tokens` tokens made of real documents starting at `offset`.
fn instruction_of(engine: &Engine, texts: &[String], offset: usize, tokens: usize) -> Input {
    let mut text = String::new();
    let mut i = offset;
    loop {
        let next = &texts[i % texts.len()];
        let candidate = format!("{text}{next}\n");
        let n = engine
            .tokenize(&Input::Instruction(candidate.clone()), 1)
            .map_or(usize::MAX, |t| t.len());
        if n > tokens {
            // Cut the last document by words to land just under the target.
            let mut words: Vec<&str> = next.split(' ').collect();
            while !words.is_empty() {
                let c = format!("{text}{}", words.join(" "));
                let n = engine
                    .tokenize(&Input::Instruction(c.clone()), 1)
                    .map_or(usize::MAX, |t| t.len());
                if n <= tokens {
                    return Input::Instruction(c);
                }
                let cut = (words.len() / 8).max(1);
                words.truncate(words.len() - cut);
            }
            return Input::Instruction(text);
        }
        text = candidate;
        i += 1;
    }
}

fn load_texts(data: &Path) -> anyhow::Result<Vec<String>> {
    let loaded = ghostwriter_runtime::loaders::load(data)?;
    Ok(loaded
        .documents
        .into_iter()
        .map(|d| d.text)
        .filter(|t| t.len() > 200)
        .take(4000)
        .collect())
}

fn start_engine(
    a: &BenchGeneratorArgs,
    model_dir: &Path,
    prefix_cache: bool,
) -> anyhow::Result<(Engine, f64)> {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        g: GeneratorConfig,
    }
    let mut config = Wrap::parse_from(["bench"]).g;
    config.device = a.device.clone();
    config.model = a.model.clone();
    config.threads = a.threads;
    config.max_running = a.max_running;
    config.max_batch_tokens = a.max_batch_tokens;
    config.kv_cache_mb = a.kv_cache_mb;
    config.prefix_cache = prefix_cache;
    config.queue_capacity = 4096;
    config.max_context = 4096;
    config.adapter_dir = a.adapter_dir.clone();
    config.adapter_memory_mb = 64 + a.adapters * 16;
    let t = Instant::now();
    let path = config
        .model
        .clone()
        .unwrap_or_else(|| model_dir.join(ghostwriter_common::models::GENERATOR_Q8_0));
    let model = LanguageModel::load(&path, &config.load_options())?;
    let engine = Engine::start(model, config.engine_config());
    Ok((engine, t.elapsed().as_secs_f64()))
}

/// Runs the benchmark.
pub async fn run(a: &BenchGeneratorArgs, model_dir: &Path) -> anyhow::Result<Value> {
    let adapter_dir = tempfile::tempdir()?;
    let a = &BenchGeneratorArgs {
        adapter_dir: Some(adapter_dir.path().to_path_buf()),
        ..a.clone()
    };
    let texts = {
        let d = a.data.clone();
        tokio::task::spawn_blocking(move || load_texts(&d)).await??
    };
    anyhow::ensure!(!texts.is_empty(), "no documents in {}", a.data.display());
    let (engine, load_s) = {
        let (a2, dir) = (a.clone(), model_dir.to_path_buf());
        tokio::task::spawn_blocking(move || start_engine(&a2, &dir, false)).await??
    };
    eprintln!(
        "bench-generator: {} ({})",
        engine.model_name(),
        engine.backend
    );
    // Warm-up.
    run_job(
        &engine,
        instruction_of(&engine, &texts, 0, 64),
        params(4, true),
    )
    .await?;

    // Prompt processing.
    let mut pp = Vec::new();
    let mut prompt_len = 0;
    for r in 0..a.runs.max(1) {
        let input = instruction_of(&engine, &texts, 100 + r * 37, a.prompt_tokens);
        let s = run_job(&engine, input, params(1, true)).await?;
        prompt_len = s.prompt_tokens;
        pp.push(s.prompt_tokens as f64 / s.time_to_first_token);
    }
    let prompt_tps = median(pp.clone());
    eprintln!("prompt: {prompt_len} tokens, {prompt_tps:.0} tokens/s");

    // Single-stream decode.
    let mut dec = Vec::new();
    for r in 0..a.runs.max(1) {
        let input = instruction_of(&engine, &texts, 500 + r * 41, a.decode_prompt_tokens);
        let s = run_job(&engine, input, params(a.new_tokens, a.ignore_eos)).await?;
        dec.push(s.tokens_per_second);
    }
    let single_decode = median(dec.clone());
    eprintln!("decode, 1 stream: {single_decode:.1} tokens/s");

    // Concurrent streams.
    let mut concurrency = Vec::new();
    for &n in &a.streams {
        let inputs: Vec<Input> = (0..n)
            .map(|i| instruction_of(&engine, &texts, 1000 + i * 13, a.decode_prompt_tokens))
            .collect();
        let started = Instant::now();
        let jobs = inputs
            .into_iter()
            .map(|input| run_job(&engine, input, params(a.new_tokens, a.ignore_eos)));
        let results = futures::future::join_all(jobs).await;
        let wall = started.elapsed().as_secs_f64();
        let stats: Vec<Stats> = results.into_iter().collect::<Result<_, _>>()?;
        let generated: usize = stats.iter().map(|s| s.generated_tokens).sum();
        let mut ttft: Vec<f64> = stats.iter().map(|s| s.time_to_first_token).collect();
        ttft.sort_by(f64::total_cmp);
        // Decode-phase aggregate: tokens after each stream's first, over the time from the
        // first stream's first token to the last stream's end.
        let last_first = ttft.last().copied().unwrap_or(0.0);
        let row = json!({
            "streams": n,
            "generated_tokens": generated,
            "wall_s": wall,
            "aggregate_tokens_per_s": generated as f64 / wall,
            "per_stream_decode_tokens_per_s_mean":
                stats.iter().map(|s| s.tokens_per_second).sum::<f64>() / n as f64,
            // Decode phase only: the streams' decode rates added up (they decode together).
            "aggregate_decode_tokens_per_s":
                stats.iter().map(|s| s.tokens_per_second).sum::<f64>(),
            "first_token_p50_ms": percentile(&ttft, 0.5) * 1e3,
            "first_token_p99_ms": percentile(&ttft, 0.99) * 1e3,
            "last_first_token_ms": last_first * 1e3,
        });
        eprintln!(
            "{n} streams: {:.1} tokens/s aggregate, first token p50 {:.0} ms",
            generated as f64 / wall,
            percentile(&ttft, 0.5) * 1e3
        );
        concurrency.push(row);
    }
    let beam_search = if a.beams > 1 {
        Some(beam_search(a, &engine, &texts).await?)
    } else {
        None
    };
    let adapters = if a.adapters > 0 {
        Some(many_adapters(a, &engine, &texts).await?)
    } else {
        None
    };
    drop(engine);

    // Prefix cache: the presets of one write (one evaluation example): the same start and
    // passages, with and without a summary and important words.
    let (cached_engine, _) = {
        let (a2, dir) = (a.clone(), model_dir.to_path_buf());
        tokio::task::spawn_blocking(move || start_engine(&a2, &dir, true)).await??
    };
    let passages: Vec<String> = texts[2000..2004.min(texts.len())].to_vec();
    let start = texts[2010].chars().take(150).collect::<String>();
    let words = vec![
        "strings".to_string(),
        "tone".to_string(),
        "price".to_string(),
    ];
    let summary = texts[2011].chars().take(300).collect::<String>();
    let mut prompt_tokens = 0;
    let mut cached_tokens = 0;
    let mut first_ms = Vec::new();
    let variants = [
        (String::new(), Vec::new()),
        (String::new(), words.clone()),
        (summary.clone(), Vec::new()),
        (summary, words),
    ];
    for (i, (summary, important_words)) in variants.into_iter().enumerate() {
        let input = Input::Personalized(Parts {
            passage_start: start.clone(),
            past_passages: passages.clone(),
            summary,
            important_words,
            ..Default::default()
        });
        let s = run_job(&cached_engine, input, params(8, false)).await?;
        if i > 0 {
            prompt_tokens += s.prompt_tokens;
            cached_tokens += s.cached_tokens;
        }
        first_ms.push(s.time_to_first_token * 1e3);
    }
    drop(cached_engine);

    let llama = match &a.compare_llama_cpp {
        Some(python) => Some(llama_cpp(a, model_dir, python, &texts, prompt_len).await?),
        None => None,
    };
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    let aggregate_8 = concurrency
        .iter()
        .find(|r| r["streams"] == 8)
        .and_then(|r| r["aggregate_decode_tokens_per_s"].as_f64());
    let mut report = json!({
        "device": a.device,
        "threads": threads,
        "model_load_s": load_s,
        "prompt_tokens": prompt_len,
        "prompt_tokens_per_s": prompt_tps,
        "prompt_tokens_per_s_runs": pp,
        "decode_prompt_tokens": a.decode_prompt_tokens,
        "new_tokens": a.new_tokens,
        "ignore_eos": a.ignore_eos,
        "single_stream_decode_tokens_per_s": single_decode,
        "single_stream_decode_runs": dec,
        "concurrency": concurrency,
        "prefix_cache": {
            "scenario": "4 presets of one write: same start and passages; without and with a summary and important words",
            "requests_after_the_first": 3,
            "prompt_tokens": prompt_tokens,
            "cached_tokens": cached_tokens,
            "hit_ratio": if prompt_tokens > 0 { cached_tokens as f64 / prompt_tokens as f64 } else { 0.0 },
            "first_token_ms": first_ms,
        },
        "peak_rss_mb": peak_rss_mb(),
    });
    if let Some(b) = beam_search {
        report["beam_search"] = b;
    }
    if let Some(m) = adapters {
        report["adapters"] = m;
    }
    if let Some(agg) = aggregate_8 {
        report["aggregate_decode_8_over_single"] = json!(agg / single_decode);
    }
    if let Some(l) = llama {
        let lpp = l["prompt_tokens_per_s"].as_f64().unwrap_or(0.0);
        let ldec = l["decode_tokens_per_s"].as_f64().unwrap_or(0.0);
        report["llama_cpp"] = l;
        report["ratios"] = json!({
            "prompt_vs_llama_cpp": prompt_tps / lpp,
            "decode_vs_llama_cpp": single_decode / ldec,
        });
    }
    Ok(report)
}

/// The many-adapters measurement: at the largest stream count, stream i on adapter i mod N,
/// alternating with the same streams on the base model (same prompts, end of text ignored);
/// then each of the first eight streams alone on its adapter (its tokens must equal the mixed
/// batch's), and the time to load a 10 MB adapter.
async fn many_adapters(
    a: &BenchGeneratorArgs,
    engine: &Engine,
    texts: &[String],
) -> anyhow::Result<Value> {
    use ghostwriter_generator::adapter::Adapter;
    let registry = engine.adapters().clone();
    let dir = a
        .adapter_dir
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no adapter directory"))?;
    let shape = registry
        .shape()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("{} takes no run-time adapters", engine.backend))?;
    let sha = registry.base_sha256()?;
    let names: Vec<String> = (0..a.adapters).map(|i| format!("bench{i:03}")).collect();
    let mut size = 0;
    for (i, name) in names.iter().enumerate() {
        let adapter = Adapter::seeded(&shape, 8, 0.08, 1000 + i as u64, &sha);
        size = adapter.weight_bytes();
        adapter.save(&dir.join(format!("{name}.safetensors")))?;
    }
    // The load of one adapter file (read, parse, checks, install), median of five.
    let mut load_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        registry.load(&names[0], None, false)?;
        load_ms.push(t.elapsed().as_secs_f64() * 1e3);
        registry.unload(&names[0])?;
    }
    let streams = a.streams.iter().copied().max().unwrap_or(8).max(1);
    let inputs: Vec<Input> = (0..streams)
        .map(|i| instruction_of(engine, texts, 1000 + i * 13, a.decode_prompt_tokens))
        .collect();
    let run = |adapters: bool| {
        let jobs = inputs.iter().enumerate().map(|(i, input)| {
            let p = Params {
                adapter: if adapters {
                    names[i % names.len()].clone()
                } else {
                    ghostwriter_generator::engine::BASE_NAME.to_string()
                },
                ..params(a.new_tokens, true)
            };
            run_job(engine, input.clone(), p)
        });
        futures::future::join_all(jobs)
    };
    let aggregate = |stats: &[Stats]| stats.iter().map(|s| s.tokens_per_second).sum::<f64>();
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let (mut mixed, mut base) = (Vec::new(), Vec::new());
    for r in 0..a.adapter_runs.max(1) {
        let b: Vec<Stats> = run(false).await.into_iter().collect::<Result<_, _>>()?;
        let m: Vec<Stats> = run(true).await.into_iter().collect::<Result<_, _>>()?;
        without.push(aggregate(&b));
        with.push(aggregate(&m));
        eprintln!(
            "adapters run {r}: {streams} streams, no adapter {:.1} tokens/s, {} adapters {:.1} tokens/s",
            without[r],
            names.len(),
            with[r]
        );
        (mixed, base) = (m, b);
    }
    let solo_checked = streams.min(8);
    let mut mixed_equals_solo = true;
    for (i, input) in inputs.iter().take(solo_checked).enumerate() {
        let p = Params {
            adapter: names[i % names.len()].clone(),
            ..params(a.new_tokens, true)
        };
        let alone = run_job(engine, input.clone(), p).await?;
        mixed_equals_solo &= alone.tokens == mixed[i].tokens;
    }
    let differing = mixed
        .iter()
        .zip(&base)
        .filter(|(m, b)| m.tokens != b.tokens)
        .count();
    let (w, wo) = (median(with.clone()), median(without.clone()));
    Ok(json!({
        "count": names.len(),
        "rank": 8,
        "adapter_bytes": size,
        "streams": streams,
        "runs": a.adapter_runs.max(1),
        "aggregate_decode_tokens_per_s": w,
        "no_adapter_aggregate_decode_tokens_per_s": wo,
        "ratio": w / wo,
        "aggregate_decode_runs": with,
        "no_adapter_aggregate_decode_runs": without,
        "mixed_equals_solo": mixed_equals_solo,
        "solo_streams_checked": solo_checked,
        "differs_from_base": differing * 2 >= streams,
        "streams_differing_from_base": differing,
        "load_ms": median(load_ms.clone()),
        "load_ms_runs": load_ms,
        "resident": registry.list().iter().filter(|x| x.resident).count(),
    }))
}

/// `--beam-streams` beam searches at once against greedy decoding of the same prompts: wall
/// time and output tokens per second (a search's output is its best hypothesis).
async fn beam_search(
    a: &BenchGeneratorArgs,
    engine: &Engine,
    texts: &[String],
) -> anyhow::Result<Value> {
    let n = a.beam_streams.max(1);
    let inputs: Vec<Input> = (0..n)
        .map(|i| instruction_of(engine, texts, 3000 + i * 17, a.decode_prompt_tokens))
        .collect();
    let mut rows = Vec::new();
    for beams in [1, a.beams] {
        let started = Instant::now();
        let jobs = inputs.iter().map(|input| {
            let p = Params {
                num_beams: beams,
                ..params(a.new_tokens, a.ignore_eos)
            };
            run_job(engine, input.clone(), p)
        });
        let stats: Vec<Stats> = futures::future::join_all(jobs)
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let wall = started.elapsed().as_secs_f64();
        let out: usize = stats.iter().map(|s| s.generated_tokens).sum();
        eprintln!(
            "{n} streams, {beams} beam(s): {wall:.2} s, {:.1} output tokens/s",
            out as f64 / wall
        );
        rows.push(json!({
            "beams": beams,
            "wall_s": wall,
            "output_tokens": out,
            "output_tokens_per_s": out as f64 / wall,
            "log_prob_mean": stats.iter().map(|s| f64::from(s.log_prob)).sum::<f64>() / n as f64,
        }));
    }
    let ratio =
        rows[1]["wall_s"].as_f64().unwrap_or(0.0) / rows[0]["wall_s"].as_f64().unwrap_or(1.0);
    Ok(json!({
        "streams": n,
        "prompt_tokens": a.decode_prompt_tokens,
        "new_tokens": a.new_tokens,
        "runs": rows,
        "beam_over_greedy_wall": ratio,
    }))
}

const LLAMA_SCRIPT: &str = r#"
import json, sys, time, statistics
from llama_cpp import Llama
a = json.loads(sys.stdin.read())
llm = Llama(model_path=a["model"], n_ctx=4096, n_threads=a["threads"], n_threads_batch=a["threads"],
            n_batch=512, n_ubatch=512, verbose=False)
texts = a["texts"]
def tokens_of(offset, n):
    out = []
    i = offset
    while len(out) < n:
        out += llm.tokenize((texts[i % len(texts)] + "\n").encode(), add_bos=False, special=False)
        i += 1
    return out[:n]
warm = tokens_of(0, 64)
llm.reset(); llm.eval(warm)
pp = []
for r in range(a["runs"]):
    toks = tokens_of(100 + r * 37, a["prompt_tokens"])
    llm.reset()
    t = time.perf_counter(); llm.eval(toks); pp.append(len(toks) / (time.perf_counter() - t))
dec = []
for r in range(a["runs"]):
    toks = tokens_of(500 + r * 41, a["decode_prompt_tokens"] + a["new_tokens"])
    p = a["decode_prompt_tokens"]
    llm.reset(); llm.eval(toks[:p])
    t = time.perf_counter()
    for tok in toks[p:]:
        llm.eval([tok])
    dec.append(a["new_tokens"] / (time.perf_counter() - t))
print(json.dumps({"prompt_tokens_per_s": statistics.median(pp), "prompt_runs": pp,
                  "decode_tokens_per_s": statistics.median(dec), "decode_runs": dec,
                  "threads": a["threads"], "method": "llama-cpp-python Llama.eval: prompt in one call (n_batch 512); decode one token per call"}))
"#;

async fn llama_cpp(
    a: &BenchGeneratorArgs,
    model_dir: &Path,
    python: &Path,
    texts: &[String],
    prompt_tokens: usize,
) -> anyhow::Result<Value> {
    let model = a
        .model
        .clone()
        .unwrap_or_else(|| model_dir.join(ghostwriter_common::models::GENERATOR_Q8_0));
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    };
    let args = json!({
        "model": model,
        "threads": threads,
        "texts": &texts[..texts.len().min(2000)],
        "runs": a.runs.max(1),
        "prompt_tokens": prompt_tokens,
        "decode_prompt_tokens": a.decode_prompt_tokens,
        "new_tokens": a.new_tokens,
    });
    let mut child = tokio::process::Command::new(python)
        .arg("-c")
        .arg(LLAMA_SCRIPT)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(args.to_string().as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "llama.cpp comparison failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    eprintln!(
        "llama.cpp: prompt {:.0} tokens/s, decode {:.1} tokens/s",
        v["prompt_tokens_per_s"].as_f64().unwrap_or(0.0),
        v["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
    );
    Ok(v)
}
