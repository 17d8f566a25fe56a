//! The memory bound under concurrent maximum-size ingests: starts `ghostwriter up` (a
//! real process) with each `--ingest-budget-mb` given, sends N concurrent batches of about
//! `--batch-mb` MB each at once, samples the process's resident memory, and writes JSON: the
//! baseline and peak RSS, and how each batch was answered.
//!
//! Run: `cargo build --example ingest_memory && cargo run --example ingest_memory --
//!       --binary target/debug/ghostwriter --budgets 256,100000 --out ingest-memory.json`

use std::time::{Duration, Instant};

use ghostwriter::proto::ghostwriter_client::GhostwriterClient;
use ghostwriter::proto::{Document, IngestRequest};
use ghostwriter_runtime::stage_process::StageProcess;

mod support;
use support::arg;

fn rss_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn batch(n: usize, mb: usize) -> IngestRequest {
    // Documents at the 100,000-character limit, as many as make `mb` MB.
    let per_doc = 95_000;
    let docs = (mb << 20) / per_doc;
    IngestRequest {
        documents: (0..docs)
            .map(|i| Document {
                user_id: format!("mem-{n}"),
                doc_id: format!("{n}-{i}"),
                timestamp: i as i64,
                title: String::new(),
                text: "word ".repeat(per_doc / 5),
            })
            .collect(),
    }
}

async fn run(binary: &str, budget: usize, batches: usize, mb: usize) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = std::process::Command::new(binary);
    cmd.args(["up", "--listen", "127.0.0.1:0"])
        .args(["--ingest-budget-mb", &budget.to_string()])
        .arg("--index-dir")
        .arg(dir.path().join("index"))
        .env("RUST_LOG", "warn");
    let mut up = StageProcess::spawn("up", cmd).await.expect("start up");
    up.wait_serving(None, Duration::from_secs(120))
        .await
        .expect("up serving");
    let (pid, url) = (up.pid(), up.url().to_string());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss_kib(pid, "VmRSS:");
    let requests: Vec<IngestRequest> = (0..batches).map(|n| batch(n, mb)).collect();
    let payload: usize = requests.iter().map(prost::Message::encoded_len).sum();
    let started = Instant::now();
    let calls = requests.into_iter().map(|r| {
        let url = url.clone();
        async move {
            let channel = ghostwriter_transport::client::channel(&url, None).expect("channel");
            let mut c = GhostwriterClient::new(channel)
                .max_encoding_message_size(512 << 20)
                .max_decoding_message_size(512 << 20);
            match c.ingest(r).await {
                Ok(r) => format!("OK ({} documents)", r.into_inner().ingested),
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            }
        }
    });
    let answers = futures::future::join_all(calls).await;
    let seconds = started.elapsed().as_secs_f64();
    let peak = rss_kib(pid, "VmHWM:");
    drop(up);
    serde_json::json!({
        "ingest_budget_mb": budget,
        "batches": batches,
        "payload_mb": payload as f64 / (1 << 20) as f64,
        "baseline_rss_mb": baseline as f64 / 1024.0,
        "peak_rss_mb": peak as f64 / 1024.0,
        "peak_over_baseline_mb": (peak.saturating_sub(baseline)) as f64 / 1024.0,
        "seconds": seconds,
        "answers": answers,
    })
}

#[tokio::main]
async fn main() {
    let binary = arg("--binary", "target/debug/ghostwriter");
    let batches: usize = arg("--batches", "4").parse().expect("--batches");
    let mb: usize = arg("--batch-mb", "95").parse().expect("--batch-mb");
    let out = arg("--out", "ingest-memory.json");
    let mut runs = Vec::new();
    for budget in arg("--budgets", "256,100000").split(',') {
        let budget: usize = budget.trim().parse().expect("--budgets");
        let r = run(&binary, budget, batches, mb).await;
        eprintln!("{r}");
        runs.push(r);
    }
    let report = serde_json::json!({ "runs": runs });
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("json")).expect("write");
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}
