//! `ghostwriter bench-job`: the whole job against the Python peer (`../shared/tools/peer`), in
//! one run, on the same targets, GGUF and new-token count.
//!
//! Targets are the peer's: for each of the first `--n` users (sorted by id), their first
//! document with at least 2 earlier documents and more than 300 characters. Ghostwriter writes
//! each through the embedded pipeline over gRPC (preset `rank-doc-dense`, the target's
//! timestamp and doc id, greedy, `--new-tokens`), one at a time and then `--concurrency` at a
//! time, each mode on a freshly started pipeline (empty caches) warmed up with one write for a
//! user outside the targets; the peer runs its script once (it is sequential).

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use ghostwriter_proto::v1::ghostwriter_client::GhostwriterClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use ghostwriter_runtime::embedded::{Embedded, EmbeddedConfig};

/// Options of the whole-job benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchJobArgs {
    /// Documents (the peer's input: neutral JSONL).
    #[arg(long, default_value_os_t = crate::bench::default_data())]
    pub data: PathBuf,
    /// Targets.
    #[arg(long, default_value_t = 20)]
    pub n: usize,
    /// New tokens per write.
    #[arg(long = "new-tokens", default_value_t = 64)]
    pub max_new_tokens: u32,
    /// Preset of Ghostwriter's writes.
    #[arg(long, default_value = "rank-doc-dense")]
    pub preset: String,
    /// Writes in flight in the concurrent run.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Python interpreter with the peer's packages (rank_bm25, sentence-transformers,
    /// llama-cpp-python); the peer is skipped without it.
    #[arg(long)]
    pub peer_python: Option<PathBuf>,
    /// The peer script.
    #[arg(long, default_value_os_t = default_peer())]
    pub peer_script: PathBuf,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-job.json")]
    pub out: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub config: EmbeddedConfig,
}

fn default_peer() -> PathBuf {
    PathBuf::from("../shared/tools/peer/peer_pipeline.py")
}

/// The peer's targets: (user, index of the target among the user's documents).
fn targets(
    docs: &[ghostwriter_proto::v1::Document],
    n: usize,
) -> Vec<ghostwriter_proto::v1::Document> {
    let mut by: std::collections::BTreeMap<&str, Vec<&ghostwriter_proto::v1::Document>> =
        Default::default();
    for d in docs {
        by.entry(d.user_id.as_str()).or_default().push(d);
    }
    let mut out = Vec::new();
    for (_, mut list) in by {
        list.sort_by(|a, b| a.timestamp.cmp(&b.timestamp).then(a.doc_id.cmp(&b.doc_id)));
        for (i, d) in list.iter().enumerate() {
            let full = format!("{} {}", d.title, d.text);
            if i >= 2 && full.trim().chars().count() > 300 {
                out.push((*d).clone());
                break;
            }
        }
        if out.len() >= n {
            break;
        }
    }
    out
}

/// One write's outcome: latency (s), text, cached prompt tokens, per-stage milliseconds.
type WriteOutcome = (f64, String, u64, Vec<(String, f64)>);

async fn client(url: &str) -> anyhow::Result<GhostwriterClient<Channel>> {
    Ok(GhostwriterClient::connect(url.to_string())
        .await?
        .max_encoding_message_size(ghostwriter_common::MAX_MESSAGE_BYTES)
        .max_decoding_message_size(ghostwriter_common::MAX_MESSAGE_BYTES))
}

/// Starts a fresh embedded pipeline, ingests `docs`, warms it up on `warm`, and times the
/// writes of `targets`, `concurrency` at a time.
async fn measure(
    a: &BenchJobArgs,
    model_dir: &Path,
    docs: &[ghostwriter_proto::v1::Document],
    warm: &ghostwriter_proto::v1::Document,
    targets: &[ghostwriter_proto::v1::Document],
    concurrency: usize,
) -> anyhow::Result<(f64, Vec<f64>, Vec<String>, u64, Value)> {
    let dir = tempfile::tempdir()?;
    let mut config = a.config.clone();
    config.retriever.index_dir = dir.path().join("index");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let embedded = Embedded::start(
        config,
        model_dir.to_path_buf(),
        listener,
        ghostwriter_transport::Transport::default(),
    )
    .await?;
    let url = embedded.url();
    let mut c = client(&url).await?;
    for chunk in docs.chunks(2000) {
        c.ingest(ghostwriter_proto::v1::IngestRequest {
            documents: chunk.to_vec(),
        })
        .await?;
    }
    write_all(&url, std::slice::from_ref(warm), a, 1).await?;
    let r = write_all(&url, targets, a, concurrency).await;
    embedded.shutdown().await;
    r
}

async fn write_all(
    url: &str,
    targets: &[ghostwriter_proto::v1::Document],
    a: &BenchJobArgs,
    concurrency: usize,
) -> anyhow::Result<(f64, Vec<f64>, Vec<String>, u64, Value)> {
    let client = client(url).await?;
    let started = Instant::now();
    let results: Vec<anyhow::Result<WriteOutcome>> = futures::stream::iter(targets.iter().cloned())
        .map(|d| {
            let mut c = client.clone();
            let preset = a.preset.clone();
            let tokens = a.max_new_tokens;
            async move {
                let t = Instant::now();
                let r = c
                    .write(ghostwriter_runtime::embedded::write_of(
                        &d.user_id, &d, &preset, tokens,
                    ))
                    .await?
                    .into_inner();
                let cached = r.generation.map_or(0, |g| g.cached_prompt_tokens as u64);
                let stages: Vec<(String, f64)> = r
                    .provenance
                    .map(|p| {
                        p.latencies
                            .into_iter()
                            .map(|l| (l.stage, l.millis))
                            .collect()
                    })
                    .unwrap_or_default();
                anyhow::Ok((t.elapsed().as_secs_f64(), r.text, cached, stages))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let wall = started.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    let mut texts = Vec::new();
    let mut cached = 0;
    let mut stages: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for r in results {
        let (l, t, c, s) = r?;
        lat.push(l);
        texts.push(t);
        cached += c;
        for (stage, ms) in s {
            stages.entry(stage).or_default().push(ms);
        }
    }
    let stage_means: Value = stages
        .into_iter()
        .map(|(k, v)| (k, json!(v.iter().sum::<f64>() / v.len() as f64)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    Ok((targets.len() as f64 / wall, lat, texts, cached, stage_means))
}

/// Runs the benchmark.
pub async fn run(a: BenchJobArgs, model_dir: PathBuf) -> anyhow::Result<Value> {
    let data = a.data.clone();
    let docs =
        tokio::task::spawn_blocking(move || ghostwriter_runtime::loaders::load(&data)).await??;
    let mut targets = targets(&docs.documents, a.n + 1);
    anyhow::ensure!(targets.len() > 1, "no targets in {}", a.data.display());
    // The first user after the peer's targets warms each pipeline up (model pages, first
    // allocations) without caching anything a measured write uses.
    let warm = targets.pop().expect("more than one target");
    let (seq_rate, seq_lat, texts, seq_cached, seq_stages) =
        measure(&a, &model_dir, &docs.documents, &warm, &targets, 1).await?;
    eprintln!("ghostwriter sequential: {seq_rate:.2} writes/s");
    let (conc_rate, conc_lat, _, conc_cached, conc_stages) = measure(
        &a,
        &model_dir,
        &docs.documents,
        &warm,
        &targets,
        a.concurrency,
    )
    .await?;
    eprintln!(
        "ghostwriter {} in flight: {conc_rate:.2} writes/s",
        a.concurrency
    );
    let peer = match &a.peer_python {
        Some(python) => Some(peer(python, &a, &model_dir).await?),
        None => None,
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut report = json!({
        "targets": targets.len(),
        "preset": a.preset,
        "max_new_tokens": a.max_new_tokens,
        "ghostwriter": {
            "sequential_writes_per_s": seq_rate,
            "sequential_latency_mean_s": mean(&seq_lat),
            "sequential_cached_prompt_tokens": seq_cached,
            "sequential_stage_ms_mean": seq_stages,
            "concurrency": a.concurrency,
            "concurrent_writes_per_s": conc_rate,
            "concurrent_latency_mean_s": mean(&conc_lat),
            "concurrent_cached_prompt_tokens": conc_cached,
            "concurrent_stage_ms_mean": conc_stages,
            "sample_outputs": texts.iter().take(3).collect::<Vec<_>>(),
        },
    });
    if let Some(p) = peer {
        let peer_rate = p["requests_per_s"].as_f64().unwrap_or(0.0);
        eprintln!("peer sequential: {peer_rate:.2} writes/s");
        report["peer"] = p;
        report["ratios"] = json!({
            "sequential_vs_peer": seq_rate / peer_rate,
            "concurrent_vs_peer": conc_rate / peer_rate,
        });
    }
    Ok(report)
}

async fn peer(python: &Path, a: &BenchJobArgs, model_dir: &Path) -> anyhow::Result<Value> {
    let out = tokio::process::Command::new(python)
        .arg(&a.peer_script)
        .arg(&a.data)
        .arg(model_dir.join(ghostwriter_common::models::GENERATOR_Q8_0))
        .arg(model_dir.join("all-minilm-l6-v2"))
        .args(["--n", &a.n.to_string()])
        .args(["--max-tokens", &a.max_new_tokens.to_string()])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "the peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}
