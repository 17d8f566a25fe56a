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

use crate::percentile;
use ghostwriter_runtime::loaders;
use ghostwriter_runtime::processes::{Processes, free_port as port};

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
        .max_encoding_message_size(ghostwriter_common::MAX_MESSAGE_BYTES);

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
                ..Default::default()
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
            consistency_token: Default::default(),
            adapter: String::new(),
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
    use crate::{metrics, protocol};
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
    let rouge: Vec<metrics::Rouge> = metrics::par_map(&pairs, |(p, t)| metrics::rouge(t, p));
    let rouge_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let bleu = metrics::corpus_bleu(pairs.iter().map(|(p, t)| (p.as_str(), t.as_str())));
    let bleu_s = started.elapsed().as_secs_f64();
    let r1 = rouge.iter().map(|r| r.r1).sum::<f64>() / rouge.len() as f64 * 100.0;
    Ok(
        json!({"pairs": pairs.len(), "rouge_seconds": rouge_s, "bleu_seconds": bleu_s, "total_seconds": rouge_s + bleu_s, "bleu": bleu, "rouge1": r1}),
    )
}

fn spawn_stage(
    exe: &Path,
    model_dir: &Path,
    port: u16,
    serve_args: &[&str],
    stage: &str,
    stage_args: &[String],
) -> anyhow::Result<std::process::Child> {
    Ok(std::process::Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--model-dir")
        .arg(model_dir)
        .args(serve_args)
        .arg(stage)
        .args(stage_args)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .spawn()?)
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"n": v.len(), "p50": percentile(&v, 0.5), "p99": percentile(&v, 0.99), "max": v.last().copied().unwrap_or(0.0)})
}

/// Measures the distributed-operations targets with real processes on loopback: the
/// orchestrator's own overhead over five hops, the latency of a RESOURCE_EXHAUSTED refusal, and
/// what killing a generator costs in-flight unary writes.
pub async fn ops(exe: &Path, model_dir: &Path, writes: usize) -> anyhow::Result<Value> {
    use ghostwriter_proto::v1::{Document, IngestRequest};
    let work = tempfile::tempdir()?;
    let demo: Vec<Document> = (0..6)
        .map(|i| Document {
            user_id: "bench".into(),
            doc_id: format!("b{i}"),
            timestamp: i,
            title: format!("Review {i}"),
            text: format!(
                "The capo number {i} holds the strings down evenly and never buzzes on stage."
            ),
        })
        .collect();
    let write = |preset: &str, tokens: u32| {
        ghostwriter_runtime::embedded::short_write("bench", "This capo", preset, tokens)
    };

    // 1. Overhead over five hops (retriever, ranker, summarizer ∥ synthesizer, generator).
    let procs = Processes::start(exe, model_dir, &work.path().join("index")).await?;
    let mut client = GhostwriterClient::connect(procs.urls["orchestrator"].clone()).await?;
    client
        .ingest(IngestRequest {
            documents: demo.clone(),
        })
        .await?;
    let mut overhead = Vec::new();
    for _ in 0..writes {
        let p = client
            .write(write("syn-ctx-ind", 1))
            .await?
            .into_inner()
            .provenance
            .unwrap_or_default();
        overhead.push(ghostwriter_orchestrator::overhead_millis(&p));
    }
    drop(procs);

    // 2. Refusals: a generator limited to one request, busy with a long one.
    let gport = port()?;
    let mut limited = spawn_stage(
        exe,
        model_dir,
        gport,
        &["--max-concurrency", "1"],
        "generator",
        &[],
    )?;
    let gurl = format!("http://127.0.0.1:{gport}");
    wait_until(&gurl).await?;
    let mut busy = GeneratorClient::connect(gurl.clone()).await?;
    let long = tokio::spawn(async move {
        busy.generate(GenerateRequest {
            input: Some(Input::Instruction("Write a very long story.".into())),
            params: Some(GenerationParams {
                max_new_tokens: 512,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut probe = GeneratorClient::connect(gurl).await?;
    let mut refused = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let r = probe
            .generate(GenerateRequest {
                input: Some(Input::Instruction("Hi".into())),
                params: Some(GenerationParams {
                    max_new_tokens: 1,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        if matches!(&r, Err(s) if s.code() == tonic::Code::ResourceExhausted) {
            refused.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let _ = limited.kill();
    let _ = limited.wait();
    long.abort();

    // 3. Failover: two generators behind one orchestrator (static endpoints), one killed while
    // unary writes are in flight.
    let (a, b, r, o) = (port()?, port()?, port()?, port()?);
    let mut children = vec![
        spawn_stage(exe, model_dir, a, &[], "generator", &[])?,
        spawn_stage(exe, model_dir, b, &[], "generator", &[])?,
        spawn_stage(
            exe,
            model_dir,
            r,
            &[],
            "retriever",
            &[
                "--index-dir".into(),
                work.path().join("fo").display().to_string(),
            ],
        )?,
    ];
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    children.push(spawn_stage(
        exe,
        model_dir,
        o,
        &[],
        "orchestrator",
        &[
            "--generator-url".into(),
            format!("{},{}", url(a), url(b)),
            "--retriever-url".into(),
            url(r),
        ],
    )?);
    for p in [a, b, r, o] {
        wait_until(&url(p)).await?;
    }
    let mut client = GhostwriterClient::connect(url(o)).await?;
    client.ingest(IngestRequest { documents: demo }).await?;
    let mut normal = Vec::new();
    for _ in 0..6 {
        let t = Instant::now();
        client.write(write("immediate-context", 24)).await?;
        normal.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut load = Vec::new();
    for _ in 0..6 {
        let mut c = client.clone();
        let w = write("immediate-context", 24);
        load.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.write(w).await;
            (r.is_ok(), t.elapsed().as_secs_f64() * 1e3)
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let _ = children[0].kill();
    let mut during = Vec::new();
    let mut lost = 0;
    for l in load {
        let (ok, ms) = l.await?;
        if ok { during.push(ms) } else { lost += 1 }
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(json!({
        "orchestrator_overhead_ms_five_hops": summary(overhead),
        "resource_exhausted_ms": summary(refused),
        "failover": {
            "normal_write_ms": summary(normal),
            "writes_in_flight_when_a_generator_was_killed_ms": summary(during),
            "lost": lost,
            "note": "6 concurrent unary writes over two generators; one killed 150 ms in; the orchestrator retries on the other",
        },
    }))
}

/// Waits (at most two minutes) until the process at `url` reports SERVING.
pub(crate) async fn wait_until(url: &str) -> anyhow::Result<()> {
    ghostwriter_transport::client::serving(url, std::time::Duration::from_secs(120)).await
}
