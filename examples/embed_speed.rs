//! Times the ranker's embeddings on the whole-job benchmark's 20 targets: for each, the query
//! (the target's first 150 characters) and the user's earlier documents, as `rank-doc-dense`
//! embeds them, with the int8 and the f32 forward pass in turn.
//! `cargo run --release --example embed_speed [DOCS.jsonl]`.

use std::collections::BTreeMap;
use std::time::Instant;

use ghostwriter_embed::{Embedder, Precision};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "../shared/data/amazon-musical-instruments/docs.jsonl".into());
    let mut by: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for line in std::fs::read_to_string(path)?.lines() {
        let d: serde_json::Value = serde_json::from_str(line)?;
        by.entry(d["user_id"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(d);
    }
    let full = |d: &serde_json::Value| {
        format!(
            "{} {}",
            d["title"].as_str().unwrap_or(""),
            d["text"].as_str().unwrap_or("")
        )
        .trim()
        .to_string()
    };
    let mut jobs: Vec<(String, Vec<String>)> = Vec::new();
    for docs in by.values_mut() {
        docs.sort_by_key(|d| {
            (
                d["timestamp"].as_i64(),
                d["doc_id"].as_str().map(String::from),
            )
        });
        if let Some(i) = (2..docs.len()).find(|&i| full(&docs[i]).chars().count() > 300) {
            let query: String = full(&docs[i]).chars().take(150).collect();
            jobs.push((query, docs[..i].iter().map(full).collect()));
        }
        if jobs.len() == 20 {
            break;
        }
    }
    let dir = ghostwriter_common::models::default_dir().join(ghostwriter_embed::EMBEDDER_DIR);
    let texts: usize = jobs.iter().map(|j| j.1.len() + 1).sum();
    for precision in [Precision::Int8, Precision::F32] {
        let embedder = Embedder::load_with(&dir, &candle_core::Device::Cpu, precision, 0)?;
        for round in 0..3 {
            let t = Instant::now();
            for (q, docs) in &jobs {
                embedder.embed(&[q.as_str()])?;
                let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
                embedder.embed(&refs)?;
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "{}, round {round}: {:.1} ms a write ({texts} texts in all)",
                embedder.describe(),
                s * 1e3 / jobs.len() as f64
            );
        }
    }
    Ok(())
}
