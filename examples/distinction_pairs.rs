//! Author distinction on the distribution `train` learns it from: P(same author) for the
//! distinction examples of a `train` example cache (a document start against another document
//! of the same user or of a random other user, half and half), scored by the training forward
//! pass with and without an adapter; prints accuracy at 0.5 and ROC AUC as JSON.
//!
//! `eval-distinguish` measures the served `Distinguish`, which compares a text with the user's
//! best-matching earlier documents; this measures the task as trained, so the two together say
//! whether a model learned the question or only its training pairs' cues.
//!
//! Run: `cargo run --release --example distinction_pairs -- CACHE [ADAPTER] [--split
//! validation|train|all]` (CACHE: `OUT/examples.jsonl` of a `train` run; build validation pairs
//! with `train --examples 1 --val-examples 150 --out OUT`, stopped once the cache is written).

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use ghostwriter::train::data::{Task, TrainExample};
use ghostwriter::train::distinguish::roc_auc;
use ghostwriter::train::model::TrainModel;
use ghostwriter_generator::adapter::{Adapter, PROJECTIONS};
use ghostwriter_generator::model::Prompter;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut cache = None;
    let mut adapter = None;
    let mut split = "validation".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--split" => split = args.next().context("--split needs a value")?,
            "-h" | "--help" => {
                println!(
                    "distinction_pairs CACHE [ADAPTER] [--split validation|train|all]: accuracy \
                     and ROC AUC of P(same author) on a train example cache's distinction pairs"
                );
                return Ok(());
            }
            _ if cache.is_none() => cache = Some(PathBuf::from(a)),
            _ if adapter.is_none() => adapter = Some(PathBuf::from(a)),
            _ => anyhow::bail!("unexpected argument {a}"),
        }
    }
    let cache = cache.context("usage: distinction_pairs CACHE [ADAPTER] [--split S]")?;
    anyhow::ensure!(
        matches!(split.as_str(), "validation" | "train" | "all"),
        "--split is validation, train or all"
    );
    let base =
        ghostwriter_common::models::default_dir().join(ghostwriter_common::models::GENERATOR_Q8_0);
    let prompter = Prompter::load(&base)?;
    let true_id = prompter.encode_plain("true")?[0];
    let false_id = prompter.encode_plain("false")?[0];
    let mut pairs: Vec<TrainExample> = Vec::new();
    for line in std::fs::read_to_string(&cache)?.lines() {
        let (is_val, e): (bool, TrainExample) = serde_json::from_str(line)?;
        let wanted = match split.as_str() {
            "validation" => is_val,
            "train" => !is_val,
            _ => true,
        };
        if wanted && e.task == Task::Distinction {
            pairs.push(e);
        }
    }
    anyhow::ensure!(
        !pairs.is_empty(),
        "no {split} distinction pairs in {}",
        cache.display()
    );
    let mut model = TrainModel::load(&base, &Device::Cpu, 8, 16.0, &PROJECTIONS, 1)?;
    if let Some(path) = &adapter {
        model.set_adapter(&Adapter::load(path)?)?;
    }
    let mut scored = Vec::with_capacity(pairs.len());
    for e in &pairs {
        let same = e.ids[e.prompt] == true_id;
        let hidden = model.hidden(&e.ids[..e.prompt])?;
        let logits: Vec<f32> = model
            .logits(&hidden, &[(e.prompt - 1) as u32])?
            .flatten_all()?
            .to_vec1()?;
        let (t, f) = (logits[true_id as usize], logits[false_id as usize]);
        scored.push((1.0 / (1.0 + f64::from(f - t).exp()), same));
    }
    let correct = scored
        .iter()
        .filter(|(p, same)| (*p >= 0.5) == *same)
        .count();
    let mean = |label: bool| {
        let v: Vec<f64> = scored
            .iter()
            .filter(|s| s.1 == label)
            .map(|s| s.0)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let report = serde_json::json!({
        "cache": cache,
        "split": split,
        "adapter": adapter,
        "pairs": scored.len(),
        "same_author_pairs": scored.iter().filter(|s| s.1).count(),
        "accuracy": correct as f64 / scored.len() as f64,
        "roc_auc": roc_auc(&scored),
        "mean_probability_same_author": mean(true),
        "mean_probability_other_author": mean(false),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
