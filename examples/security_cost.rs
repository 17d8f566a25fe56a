//! The cost of authentication plus mutual TLS per write: starts `ghostwriter up` (a
//! real process) twice on the same documents, first plaintext without tokens, then with every
//! hop over mutual TLS (a throwaway CA) and a token file, and times the same sequential writes
//! against each: preset `copy-best` (retrieval and ranking, no generation, so the hops dominate)
//! and `immediate-context` with 4 new tokens. Writes JSON with p50/p99 per configuration.
//!
//! Run: `cargo build && cargo run --example security_cost --
//!       --binary target/debug/ghostwriter --writes 300 --out security-cost.json`

use ghostwriter::eval::percentile;
use std::time::{Duration, Instant};

use ghostwriter::proto::ghostwriter_client::GhostwriterClient;
use ghostwriter::proto::{Document, IngestRequest, WriteRequest};
use ghostwriter_runtime::stage_process::StageProcess;

mod support;
use support::arg;

const TOKEN: &str = "bench-token-0123456789abcdef";

/// `body` as a request, with the token when the run is secured.
fn authed<T>(body: T, secured: bool) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    if secured {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {TOKEN}").parse().expect("token"),
        );
    }
    r
}

async fn run(
    binary: &str,
    secure: Option<&ghostwriter_transport::tls::TlsArgs>,
    dir: &std::path::Path,
    writes: usize,
) -> serde_json::Value {
    let mut cmd = std::process::Command::new(binary);
    cmd.args(["up", "--listen", "127.0.0.1:0"]);
    if let Some(tls) = secure {
        cmd.args(tls.to_args());
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, format!("{TOKEN} *\n")).expect("token file");
        cmd.arg("--auth-tokens").arg(tokens);
    }
    let index = if secure.is_some() {
        "index-secure"
    } else {
        "index-plain"
    };
    cmd.arg("--index-dir")
        .arg(dir.join(index))
        .env("RUST_LOG", "warn");
    let mut up = StageProcess::spawn("up", cmd).await.expect("start up");
    let tls = secure.map(|a| {
        ghostwriter_transport::Tls::from_args(a)
            .expect("TLS")
            .expect("TLS on")
    });
    let serving = up
        .wait_serving(tls.as_ref(), Duration::from_secs(120))
        .await;
    serving.unwrap_or_else(|e| panic!("up did not serve: {e:#}"));
    let url = up.url().to_string();
    let mut client = GhostwriterClient::new(
        ghostwriter_transport::client::channel(&url, tls.as_ref()).expect("channel"),
    );
    let secured = secure.is_some();
    let docs: Vec<Document> = (0..20)
        .map(|i| Document {
            user_id: "bench".into(),
            doc_id: format!("d{i}"),
            timestamp: i,
            title: String::new(),
            text: format!("Review {i}: this tuner holds pitch on stage and the strap stays put."),
        })
        .collect();
    client
        .ingest(authed(IngestRequest { documents: docs }, secured))
        .await
        .expect("ingest");
    let mut results = serde_json::Map::new();
    for (preset, tokens) in [("copy-best", 0), ("immediate-context", 4)] {
        let write = WriteRequest {
            timestamp: Some(1_000),
            ..ghostwriter::embedded::short_write("bench", "This tuner", preset, tokens)
        };
        for _ in 0..10 {
            client
                .write(authed(write.clone(), secured))
                .await
                .expect("warm-up");
        }
        let mut millis: Vec<f64> = Vec::with_capacity(writes);
        for _ in 0..writes {
            let t = Instant::now();
            client
                .write(authed(write.clone(), secured))
                .await
                .expect("write");
            millis.push(t.elapsed().as_secs_f64() * 1e3);
        }
        millis.sort_by(f64::total_cmp);
        results.insert(
            preset.into(),
            serde_json::json!({
                "writes": writes,
                "p50_ms": percentile(&millis, 0.5),
                "p99_ms": percentile(&millis, 0.99),
                "mean_ms": millis.iter().sum::<f64>() / millis.len() as f64,
            }),
        );
    }
    drop(up);
    serde_json::json!({
        "configuration": if secure.is_some() { "mTLS + token auth" } else { "plaintext, no auth" },
        "presets": results,
    })
}

#[tokio::main]
async fn main() {
    let binary = arg("--binary", "target/debug/ghostwriter");
    let writes: usize = arg("--writes", "300").parse().expect("--writes");
    let out = arg("--out", "security-cost.json");
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = run(&binary, None, dir.path(), writes).await;
    eprintln!("{plain}");
    let tls = ghostwriter::processes::throwaway_ca(&dir.path().join("tls")).expect("CA");
    let secure = run(&binary, Some(&tls), dir.path(), writes).await;
    eprintln!("{secure}");
    let report = serde_json::json!({ "runs": [plain, secure] });
    std::fs::write(&out, serde_json::to_string_pretty(&report).expect("json")).expect("write");
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}
