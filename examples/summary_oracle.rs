//! How much the SumCtx summary limits `syn-ctx`: each test example written with the `syn-ctx`
//! prompt, its summary either the summarizer's (`--summary served`, what `Write` serves) or the
//! paper's weak label built from the *true* document (`--summary weak`, the summary the
//! generator is fine-tuned on, which serving cannot have: an upper bound on a summarizer).
//!
//! Writes `results.jsonl` records of preset `syn-ctx` in `eval`'s format, so `eval --presets
//! immediate-context,syn-ctx --to http://127.0.0.1:9 --no-ingest --out DIR` scores them (after
//! adding another run's `immediate-context` records to the same file).
//!
//! Run: `cargo run --release --example summary_oracle -- --summary weak|served --out DIR
//! [--adapter PATH] [--limit N] [--concurrency N]`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use futures::StreamExt;
use ghostwriter::eval::protocol::{self, Split};
use ghostwriter::eval::{Record, select};
use ghostwriter::train::data::weak_summary;
use ghostwriter_orchestrator::OrchestratorService;
use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::generator_client::GeneratorClient;
use ghostwriter_proto::v1::{GenerationParams, WriteOptions, WriteRequest};

const PRESET: &str = "syn-ctx";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut summary, mut out, mut adapter) = (None, None, None);
    let (mut limit, mut concurrency) = (None, 4usize);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--summary" => summary = Some(value()?),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--adapter" => adapter = Some(PathBuf::from(value()?)),
            "--limit" => limit = Some(value()?.parse()?),
            "--concurrency" => concurrency = value()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "summary_oracle --summary weak|served --out DIR [--adapter PATH] [--limit N] \
                     [--concurrency N]: syn-ctx writes of the test split with the served summary \
                     or the weak label from the true document"
                );
                return Ok(());
            }
            _ => anyhow::bail!("unexpected argument {a}"),
        }
    }
    let summary = summary.context("--summary weak|served is required")?;
    anyhow::ensure!(
        matches!(summary.as_str(), "weak" | "served"),
        "--summary is weak or served"
    );
    let weak = summary == "weak";
    let out = out.context("--out DIR is required")?;
    std::fs::create_dir_all(&out)?;
    let model_dir = ghostwriter_common::models::default_dir();
    let dataset =
        protocol::build(ghostwriter::loaders::load(&ghostwriter::bench::default_data())?.documents);
    let examples = select(&dataset.examples, Split::Test, limit, 42);
    let embedder = ghostwriter_embed::Embedder::load(
        &model_dir.join(ghostwriter_embed::EMBEDDER_DIR),
        &Device::Cpu,
    )?;
    let summary_chars = ghostwriter::embedded::EmbeddedConfig::defaults()
        .summary
        .summary_chars as usize;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(ghostwriter::embedded::Embedded::with_pipeline(
        model_dir.clone(),
        adapter,
        &dataset.documents,
        async |embedded| {
            let orchestrator =
                OrchestratorService::new(embedded.orchestrator.clone(), &embedded.transport)?;
            let generator = GeneratorClient::new(ghostwriter_transport::client::channel(
                &embedded.orchestrator.generator_url,
                None,
            )?);
            let mut file = std::fs::File::create(out.join("results.jsonl"))?;
            let (orchestrator, embedder) = (&orchestrator, &embedder);
            let mut writes = futures::stream::iter(examples.iter())
                .map(|e| {
                    let mut generator = generator.clone();
                    async move {
                        let started = Instant::now();
                        let request = WriteRequest {
                            user_id: e.user_id.clone(),
                            title: e.title.clone(),
                            start: e.text.clone(),
                            preset: PRESET.to_string(),
                            timestamp: Some(e.timestamp),
                            doc_id: e.doc_id.clone(),
                            options: Some(WriteOptions {
                                generation: Some(GenerationParams {
                                    max_new_tokens: 128,
                                    seed: 42,
                                    ..Default::default()
                                }),
                                disable_summary: weak,
                                ..Default::default()
                            }),
                            consistency_token: Default::default(),
                            adapter: Default::default(),
                        };
                        let (mut generate, provenance) = orchestrator
                            .generator_input(request)
                            .await
                            .map_err(|s| anyhow::anyhow!("{}: {s}", e.doc_id))?;
                        if let Some(Input::Personalized(input)) = generate.input.as_mut()
                            && weak
                            && !input.past_passages.is_empty()
                        {
                            input.summary = weak_summary(
                                embedder,
                                &e.target(),
                                &input.past_passages,
                                summary_chars,
                            )?;
                        }
                        let g = generator.generate(generate).await?.into_inner();
                        anyhow::Ok(Record {
                            preset: PRESET.to_string(),
                            user_id: e.user_id.clone(),
                            doc_id: e.doc_id.clone(),
                            prediction: format!("{}{}", provenance.immediate_context, g.text),
                            target: e.target(),
                            latency_ms: started.elapsed().as_secs_f64() * 1e3,
                            generated_tokens: g.generated_tokens,
                            generated: g.text,
                            important_words: provenance.important_words.len() as u32,
                            passage_ids: provenance.doc_ids,
                            generator: g.model,
                        })
                    }
                })
                .buffer_unordered(concurrency.max(1));
            let mut done = 0;
            while let Some(record) = writes.next().await {
                writeln!(file, "{}", serde_json::to_string(&record?)?)?;
                done += 1;
                if done % 10 == 0 {
                    eprintln!("{done}/{} written", examples.len());
                }
            }
            Ok(())
        },
    ))
}
