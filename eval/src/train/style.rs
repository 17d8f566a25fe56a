//! `ghostwriter train-style`: trains the style verifier (`ghostwriter-style`) on pairs of
//! training-split users only — random, retrieval-matched and profile pairs of
//! [`crate::authorship`], half same author and half not — and writes the model file the crate
//! ships (`services/style/model/verifier.json`), with its provenance.

use std::path::PathBuf;

use ghostwriter_style::features::{self, RATES, TextStats};
use ghostwriter_style::model::{Model, Provenance, idf_of};
use ghostwriter_style::{MIN_TEXT_WORDS, Verifier};
use serde_json::{Value, json};

use crate::authorship::{self, Corpus, Pair, Protocol};
use crate::protocol::Split;

/// Settings of a training run.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainStyleArgs {
    /// Documents (neutral JSONL or Amazon .json.gz); only training-split users' are learned from.
    #[arg(long, default_value_os_t = crate::bench::default_data())]
    pub data: PathBuf,
    /// The model file to write.
    #[arg(long, default_value = "services/style/model/verifier.json")]
    pub out: PathBuf,
    /// L2 penalty of the logistic regression (on standardized features).
    #[arg(long, default_value_t = 1.0)]
    pub l2: f64,
    /// Seed of the pair sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Cache of the documents' MiniLM embeddings (default: a file in the temporary directory
    /// named after --data).
    #[arg(long)]
    pub embedding_cache: Option<PathBuf>,
}

/// The training pairs: each protocol on the training split, and the `profile` pairs again with
/// both profiles cut to 2 documents, so short histories are seen too.
pub fn training_pairs(corpus: &Corpus, seed: u64) -> Vec<Pair> {
    let mut out = Vec::new();
    for p in Protocol::ALL {
        out.extend(authorship::pairs(corpus, Split::Train, p, seed));
    }
    let short: Vec<Pair> = out
        .iter()
        .filter(|p| p.kind == "profile")
        .map(|p| Pair {
            kind: "profile-2".into(),
            profile: p.profile.iter().take(2).copied().collect(),
            ..p.clone()
        })
        .collect();
    out.extend(short);
    out
}

/// Spread of each habit's rate across documents of at least [`MIN_TEXT_WORDS`] words.
fn rate_scale(stats: &[&TextStats]) -> Vec<f32> {
    let rates: Vec<[f64; RATES]> = stats
        .iter()
        .filter(|s| s.words >= MIN_TEXT_WORDS)
        .map(|s| s.own_rates())
        .collect();
    let n = rates.len().max(1) as f64;
    (0..RATES)
        .map(|i| {
            let mean = rates.iter().map(|r| r[i]).sum::<f64>() / n;
            let var = rates.iter().map(|r| (r[i] - mean).powi(2)).sum::<f64>() / n;
            var.sqrt().max(1e-6) as f32
        })
        .collect()
}

/// Trains, writes the model file, and returns a report (pairs, held-out AUC and calibration on
/// validation users).
pub fn run(args: TrainStyleArgs, model_dir: PathBuf) -> anyhow::Result<Value> {
    let mut corpus = Corpus::load(&args.data)?;
    let cache = args
        .embedding_cache
        .clone()
        .unwrap_or_else(|| authorship::default_embedding_cache(&args.data));
    corpus.embed(&model_dir, Some(&cache))?;
    let train_docs: Vec<usize> = (0..corpus.dataset.documents.len())
        .filter(|&i| {
            crate::protocol::split_of(&corpus.dataset.documents[i].user_id) == Split::Train
        })
        .collect();
    // Every order's buckets of a document count once towards its document frequency.
    let bucket_sets: Vec<Vec<(u32, f32)>> = train_docs
        .iter()
        .map(|&i| {
            let mut v: Vec<(u32, f32)> = corpus.stats[i].grams.iter().flatten().copied().collect();
            v.sort_unstable_by_key(|e| e.0);
            v.dedup_by_key(|e| e.0);
            v
        })
        .collect();
    let idf = idf_of(bucket_sets.iter().map(Vec::as_slice));
    let scale = rate_scale(
        &train_docs
            .iter()
            .map(|&i| &corpus.stats[i])
            .collect::<Vec<_>>(),
    );
    let pairs = training_pairs(&corpus, args.seed);
    anyhow::ensure!(
        !pairs.is_empty(),
        "no training pairs in {}",
        args.data.display()
    );
    let x: Vec<Vec<f64>> = crate::metrics::par_map(&pairs, |p| {
        let content = corpus.content_similarity(&corpus.embeddings[p.text], &p.profile);
        features::features(
            &corpus.stats[p.text],
            &corpus.profile(&p.profile),
            content,
            &idf,
            &scale,
        )
    });
    let y: Vec<bool> = pairs.iter().map(|p| p.same).collect();
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for p in &pairs {
        *kinds.entry(p.kind.clone()).or_default() += 1;
    }
    let users: std::collections::HashSet<&str> = pairs.iter().map(|p| p.author.as_str()).collect();
    let provenance = Provenance {
        command: format!(
            "ghostwriter train-style --data {} --l2 {} --seed {}",
            args.data.display(),
            args.l2,
            args.seed
        ),
        data: args.data.display().to_string(),
        users: users.len(),
        pairs: pairs.len(),
        pairs_by_kind: kinds.into_iter().collect(),
        seed: args.seed,
        l2: args.l2,
        train_log_loss: 0.0,
    };
    let model = Model::fit(&x, &y, args.l2, &idf, scale, provenance)?;
    let json = serde_json::to_string(&model)?;
    std::fs::write(&args.out, format!("{json}\n"))?;
    // Held out: validation users, every protocol.
    let verifier = Verifier::new(model.clone());
    let mut held_out = Vec::new();
    let mut all = Vec::new();
    for p in Protocol::ALL {
        let val = authorship::pairs(&corpus, Split::Validation, p, args.seed);
        let scores: Vec<(f64, bool)> = val
            .iter()
            .map(|q| (corpus.judge(&verifier, q).0, q.same))
            .collect();
        all.extend(scores.iter().copied());
        held_out.push(json!({
            "protocol": p.name(),
            "pairs": val.len(),
            "auc": authorship::auc(&scores),
            "expected_calibration_error": authorship::expected_calibration_error(&scores),
        }));
    }
    let weights: Vec<Value> = model
        .features
        .iter()
        .zip(&model.weights)
        .map(|(f, w)| json!({"feature": f, "weight": w}))
        .collect();
    Ok(json!({
        "model": args.out,
        "provenance": model.provenance,
        "validation": held_out,
        "validation_expected_calibration_error": authorship::expected_calibration_error(&all),
        "weights": weights,
    }))
}
