//! Author distinction on the pairs `train` learns it from: P(same author) for the distinction
//! examples of a `train` example cache (a document start against another document of the same
//! user or of another user, half and half; random or `--distinction-pairs matched`), scored with
//! and without an adapter; prints accuracy at 0.5 and ROC AUC as JSON.
//!
//! `eval-distinguish` measures the served `Distinguish`, which compares a text with the user's
//! best-matching earlier documents; this measures the task as trained, so the two together say
//! whether a model learned the question or only its training pairs' cues.
//!
//! Run: `cargo run --release --example distinction_pairs -- CACHE [ADAPTER] [--split
//! validation|train|all] [--engine training|served]` (CACHE: `OUT/examples.jsonl` of a `train`
//! run; build validation pairs with `train --examples 1 --val-examples 150 --out OUT`, stopped
//! once the cache is written). `--engine served` scores with the generator's serving engine
//! (int8 kernels, f16 KV cache, the adapter unmerged) instead of the f32 training forward.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use ghostwriter::eval::authorship::auc;
use ghostwriter::train::data::{Task, TrainExample};
use ghostwriter::train::model::TrainModel;
use ghostwriter_generator::adapter::{Adapter, PROJECTIONS};
use ghostwriter_generator::model::Prompter;
use ghostwriter_generator::native::NativeModel;
use ghostwriter_generator::{LoadOptions, same_author_probability};

/// The logits after a prompt's last token.
type Scorer = dyn FnMut(&[u32]) -> anyhow::Result<Vec<f32>>;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut cache = None;
    let mut adapter = None;
    let mut split = "validation".to_string();
    let mut engine = "training".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--split" => split = args.next().context("--split needs a value")?,
            "--engine" => engine = args.next().context("--engine needs a value")?,
            "-h" | "--help" => {
                println!(
                    "distinction_pairs CACHE [ADAPTER] [--split validation|train|all] [--engine \
                     training|served]: accuracy and ROC AUC of P(same author) on a train example \
                     cache's distinction pairs"
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
    anyhow::ensure!(
        matches!(engine.as_str(), "training" | "served"),
        "--engine is training or served"
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
    // The logits after each pair's prompt, from the chosen engine.
    let mut logits_of: Box<Scorer> = if engine == "served" {
        let options = LoadOptions {
            adapter: adapter.clone(),
            ..LoadOptions::cpu(2048, 64)
        };
        let mut model = NativeModel::load(&base, &options)?;
        Box::new(move |ids: &[u32]| model.logits_after(ids))
    } else {
        let mut model = TrainModel::load(&base, &Device::Cpu, 8, 16.0, &PROJECTIONS, 1)?;
        if let Some(path) = &adapter {
            model.set_adapter(&Adapter::load(path)?)?;
        }
        Box::new(move |ids: &[u32]| {
            let hidden = model.hidden(ids)?;
            Ok(model
                .logits(&hidden, &[(ids.len() - 1) as u32])?
                .flatten_all()?
                .to_vec1()?)
        })
    };
    let mut scores = Vec::with_capacity(pairs.len());
    for e in &pairs {
        let same = e.ids[e.prompt] == true_id;
        let logits = logits_of(&e.ids[..e.prompt])?;
        let (t, f) = (logits[true_id as usize], logits[false_id as usize]);
        scores.push((f64::from(same_author_probability(t, f)), same));
    }
    let correct = scores
        .iter()
        .filter(|(p, same)| (*p >= 0.5) == *same)
        .count();
    let mut report = serde_json::Map::from_iter([
        ("pairs".to_string(), serde_json::json!(scores.len())),
        (
            "accuracy".to_string(),
            serde_json::json!(correct as f64 / scores.len() as f64),
        ),
        ("roc_auc".to_string(), serde_json::json!(auc(&scores))),
    ]);
    for (key, value) in [
        ("cache", serde_json::json!(cache)),
        ("split", serde_json::json!(split)),
        ("engine", serde_json::json!(engine)),
        ("adapter", serde_json::json!(adapter)),
        (
            "same_author_pairs",
            serde_json::json!(scores.iter().filter(|s| s.1).count()),
        ),
    ] {
        report.insert(key.to_string(), value);
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
