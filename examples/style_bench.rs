//! The style verifier's cost per judgement on CPU, as `VerifyAuthor` pays it after embedding:
//! measuring the text and every profile document from their strings, summing the profile,
//! computing the features and the probability. Retrieval and embedding are excluded (the
//! content similarity is taken as given). Pairs are the `profile` protocol's (up to 8 documents)
//! on real data; writes JSON with the latency percentiles.
//!
//! Run: `cargo run --release --example style_bench -- [--data FILE] [--split test]
//! [--judgements 2000] [--out style-bench.json]`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use ghostwriter::eval::authorship::{self, Corpus, Protocol};
use ghostwriter::eval::protocol::Split;
use ghostwriter_style::Verifier;

fn main() -> anyhow::Result<()> {
    let mut data = PathBuf::from("../shared/data/amazon-musical-instruments/docs.jsonl");
    let mut split = Split::Test;
    let mut judgements = 2000usize;
    let mut out = PathBuf::from("style-bench.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--data" => data = PathBuf::from(value()?),
            "--split" => {
                split = match value()?.as_str() {
                    "test" => Split::Test,
                    "validation" => Split::Validation,
                    "train" => Split::Train,
                    other => anyhow::bail!("unknown split {other}"),
                }
            }
            "--judgements" => judgements = value()?.parse()?,
            "--out" => out = PathBuf::from(value()?),
            "-h" | "--help" => {
                println!(
                    "style_bench [--data FILE] [--split test|validation|train] [--judgements N] \
                     [--out FILE]: p50/p90/p99 milliseconds of one style judgement on CPU \
                     (retrieval and embedding excluded); writes JSON"
                );
                return Ok(());
            }
            _ => anyhow::bail!("unexpected argument {a}"),
        }
    }
    let verifier = Verifier::shipped()?;
    let corpus = Corpus::load(&data)?;
    let pairs = authorship::pairs(&corpus, split, Protocol::Profile, 42);
    anyhow::ensure!(!pairs.is_empty(), "no profile pairs in {}", data.display());
    let mut millis = Vec::with_capacity(judgements);
    let mut sink = 0.0;
    for i in 0..judgements {
        let pair = &pairs[i % pairs.len()];
        let profile: Vec<&str> = pair
            .profile
            .iter()
            .map(|&d| corpus.texts[d].as_str())
            .collect();
        let text = corpus.texts[pair.text].as_str();
        let started = Instant::now();
        let j = verifier.judge(text, &profile, 0.3);
        millis.push(started.elapsed().as_secs_f64() * 1e3);
        sink += j.probability().unwrap_or(0.5);
    }
    millis.sort_by(f64::total_cmp);
    let at = |q: f64| millis[((millis.len() - 1) as f64 * q).round() as usize];
    let report = serde_json::json!({
        "data": data,
        "split": format!("{split:?}").to_lowercase(),
        "judgements": judgements,
        "distinct_pairs": pairs.len().min(judgements),
        "mean_profile_documents": pairs.iter().map(|p| p.profile.len()).sum::<usize>() as f64 / pairs.len() as f64,
        "mean_text_chars": pairs.iter().map(|p| corpus.texts[p.text].chars().count()).sum::<usize>() as f64 / pairs.len() as f64,
        "p50_ms": at(0.5),
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
        "max_ms": millis[millis.len() - 1],
        "threads": 1,
        "checksum": sink,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
