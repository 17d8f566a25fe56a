//! `ghostwriter bench`: measures the targets of the spine on real data, with every stage its own
//! process (as Kubernetes runs them), and writes JSON.
//!
//! Measured: ingest time, generator decode rate (single stream, greedy), per-stage latency of
//! real writes, the orchestrator's own overhead (its total minus the time spent waiting on
//! stages, summarizer and synthesizer counted once since they run in parallel), and the
//! resident memory of every stage process after ingest and writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::generator_client::GeneratorClient;
use ghostwriter_proto::v1::ghostwriter_client::GhostwriterClient;
use ghostwriter_proto::v1::{
    Document, GenerateRequest, GenerationParams, IngestRequest, WriteOptions, WriteRequest,
};
use serde_json::{Value, json};

use crate::loaders;
use crate::processes::Processes;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark; returns the JSON report.
pub async fn run(
    exe: &Path,
    model_dir: &Path,
    data: &Path,
    writes: usize,
    decode_runs: usize,
) -> anyhow::Result<Value> {
    let work = tempfile::tempdir()?;
    let started = Instant::now();
    let procs = Processes::start(exe, model_dir, &work.path().join("index")).await?;
    let ready_s = started.elapsed().as_secs_f64();
    let rss_idle = procs.rss_mb();
    let url = procs.urls["orchestrator"].clone();
    let mut client = GhostwriterClient::connect(url.clone())
        .await?
        .max_encoding_message_size(256 << 20);

    let path = data.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || loaders::load(&path)).await??;
    let t = Instant::now();
    for chunk in loaded.documents.chunks(1000) {
        client
            .ingest(IngestRequest {
                documents: chunk.to_vec(),
            })
            .await?;
    }
    let ingest_s = t.elapsed().as_secs_f64();

    // Decode rate: the generator alone, greedy, a fixed prompt, every token generated.
    let mut generator = GeneratorClient::connect(procs.urls["generator"].clone()).await?;
    let mut rates = Vec::new();
    for _ in 0..decode_runs {
        let r = generator
            .generate(GenerateRequest {
                input: Some(Input::Instruction(
                    "Write a long, detailed review of a guitar you love.".into(),
                )),
                params: Some(GenerationParams {
                    max_new_tokens: 128,
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        rates.push(json!({"tokens": r.generated_tokens, "tokens_per_second": r.tokens_per_second}));
    }

    // Writes for real users: their middle document, its real history.
    let mut by_user: BTreeMap<String, Vec<Document>> = BTreeMap::new();
    for d in loaded.documents {
        by_user.entry(d.user_id.clone()).or_default().push(d);
    }
    let mut per_stage: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut overheads = Vec::new();
    let mut totals = Vec::new();
    for docs in by_user
        .values()
        .filter(|d| d.len() >= 6)
        .step_by(37)
        .take(writes)
    {
        let target = &docs[docs.len() / 2];
        let request = WriteRequest {
            user_id: target.user_id.clone(),
            title: target.title.clone(),
            start: target.text.clone(),
            preset: "full".into(),
            timestamp: Some(target.timestamp),
            doc_id: target.doc_id.clone(),
            options: Some(WriteOptions {
                generation: Some(GenerationParams {
                    max_new_tokens: 64,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let t = Instant::now();
        let response = client.write(request).await?.into_inner();
        let client_ms = t.elapsed().as_secs_f64() * 1e3;
        let p = response.provenance.unwrap_or_default();
        for l in &p.latencies {
            per_stage.entry(l.stage.clone()).or_default().push(l.millis);
        }
        overheads.push(ghostwriter_orchestrator::overhead_millis(&p));
        totals.push(client_ms);
    }
    let rss_loaded = procs.rss_mb();
    let summarize = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        json!({"n": v.len(), "mean": v.iter().sum::<f64>() / v.len().max(1) as f64, "p50": percentile(&v, 0.5), "p99": percentile(&v, 0.99)})
    };
    Ok(json!({
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "topology": "one process per stage on loopback",
        "ready_seconds": ready_s,
        "ingest": {"documents": by_user.values().map(Vec::len).sum::<usize>(), "seconds": ingest_s},
        "decode": rates,
        "write_latency_ms": {
            "client_total": summarize(totals),
            "per_stage": per_stage.into_iter().map(|(k, v)| (k, summarize(v))).collect::<serde_json::Map<_, _>>(),
            "orchestrator_overhead": summarize(overheads),
        },
        "rss_mb": {"after_start": rss_idle, "after_ingest_and_writes": rss_loaded},
    }))
}

/// Default data file for the benchmark.
pub fn default_data() -> PathBuf {
    PathBuf::from("../shared/data/amazon-musical-instruments/docs.jsonl")
}

/// Times BLEU and ROUGE on `pairs` real pairs: each document's immediate context followed by the
/// author's previous document (a copy baseline), against the document.
pub fn metrics(data: &Path, pairs: usize) -> anyhow::Result<Value> {
    use crate::eval::{metrics, protocol};
    let loaded = loaders::load(data)?;
    let mut by_user: BTreeMap<String, Vec<Document>> = BTreeMap::new();
    for d in loaded.documents {
        by_user.entry(d.user_id.clone()).or_default().push(d);
    }
    let mut list: Vec<(String, String)> = Vec::new();
    for docs in by_user.values() {
        for w in docs.windows(2) {
            let target = protocol::full_text(&w[1].title, &w[1].text);
            let context: String = target.chars().take(protocol::CONTEXT_CHARS).collect();
            list.push((format!("{context} {}", w[0].text), target));
        }
    }
    anyhow::ensure!(!list.is_empty(), "no pairs in {}", data.display());
    let pairs: Vec<(String, String)> = list.iter().cycle().take(pairs).cloned().collect();
    let started = Instant::now();
    let rouge: Vec<metrics::Rouge> = pairs.iter().map(|(p, t)| metrics::rouge(t, p)).collect();
    let rouge_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let bleu = metrics::corpus_bleu(pairs.iter().map(|(p, t)| (p.as_str(), t.as_str())));
    let bleu_s = started.elapsed().as_secs_f64();
    let r1 = rouge.iter().map(|r| r.r1).sum::<f64>() / rouge.len() as f64 * 100.0;
    Ok(
        json!({"pairs": pairs.len(), "rouge_seconds": rouge_s, "bleu_seconds": bleu_s, "total_seconds": rouge_s + bleu_s, "bleu": bleu, "rouge1": r1}),
    )
}
