//! `ghostwriter eval-distinguish`: author distinction served (`Distinguish`) on pairs from
//! held-out users: each sampled target is judged once against its own author's earlier
//! documents (label: same author) and once against another user of the split (label: not),
//! scored by accuracy at 0.5 and ROC AUC.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ghostwriter_proto::v1::DistinguishRequest;
use ghostwriter_proto::v1::ghostwriter_client::GhostwriterClient;
use serde_json::{Value, json};

use crate::Rng;
use crate::protocol::{self, Split};

/// Settings of a distinction evaluation.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Orchestrator URL; without it the embedded pipeline is started for the run.
    #[arg(long, env = "GHOSTWRITER_URL")]
    pub to: Option<String>,
    /// Documents (Amazon .json.gz or neutral JSONL).
    #[arg(long, default_value_os_t = crate::bench::default_data())]
    pub data: PathBuf,
    /// Users whose targets are judged.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub split: Split,
    /// Targets judged (each gives one same-author and one other-author pair; 0 = all).
    #[arg(long, default_value_t = 60)]
    pub targets: usize,
    /// Adapter the embedded generator serves (the fine-tuned model); none = zero-shot.
    #[arg(long, env = "GHOSTWRITER_ADAPTER")]
    pub adapter: Option<PathBuf>,
    /// Requests in flight.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Earlier documents each judgement compares with.
    #[arg(long, default_value_t = 4)]
    pub max_documents: u32,
    /// Which of the author's documents a same-author judgement may compare with: `before` (those
    /// written before the target, as a write sees them) or `all` (every other one, so the
    /// author's pool is as whole as the other user's, whose whole history is searched).
    #[arg(long = "author-history", value_enum, default_value_t = AuthorHistory::Before)]
    pub author_history: AuthorHistory,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where to write the JSON report.
    #[arg(long, default_value = "eval-distinguish.json")]
    pub out: PathBuf,
}

/// One served judgement, as the report lists it.
#[derive(Debug, Clone, serde::Serialize)]
struct Judgement {
    /// The supposed author asked about.
    user_id: String,
    /// The text judged (a target of the split).
    doc_id: String,
    /// Its real author.
    author: String,
    /// Whether `user_id` is the author.
    same_author: bool,
    /// P(same author) as served.
    probability: f32,
    /// The documents of `user_id` it was compared with.
    compared: Vec<String>,
}

/// The author's documents a same-author judgement may compare with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthorHistory {
    /// Those written before the target.
    Before,
    /// Every one but the target.
    All,
}

/// ROC AUC of `scores` for `labels` (Mann–Whitney, ties counted half).
pub fn roc_auc(scores: &[(f64, bool)]) -> f64 {
    let pos: Vec<f64> = scores.iter().filter(|s| s.1).map(|s| s.0).collect();
    let neg: Vec<f64> = scores.iter().filter(|s| !s.1).map(|s| s.0).collect();
    if pos.is_empty() || neg.is_empty() {
        return 0.5;
    }
    let mut wins = 0.0;
    for p in &pos {
        for n in &neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()) as f64
}

/// The figures of judged pairs `(P(same author), same author)`: their count, accuracy at 0.5,
/// ROC AUC and the mean probability for each label.
pub fn scored(scores: &[(f64, bool)]) -> serde_json::Map<String, Value> {
    let correct = scores
        .iter()
        .filter(|(p, same)| (*p >= 0.5) == *same)
        .count();
    let mean = |same: bool| {
        let v: Vec<f64> = scores.iter().filter(|s| s.1 == same).map(|s| s.0).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    serde_json::Map::from_iter([
        ("pairs".to_string(), json!(scores.len())),
        (
            "accuracy".to_string(),
            json!(correct as f64 / scores.len().max(1) as f64),
        ),
        ("roc_auc".to_string(), json!(roc_auc(scores))),
        (
            "mean_probability_same_author".to_string(),
            json!(mean(true)),
        ),
        (
            "mean_probability_other_author".to_string(),
            json!(mean(false)),
        ),
    ])
}

/// Runs the evaluation and writes its report.
pub async fn evaluate(args: EvalArgs, model_dir: PathBuf) -> anyhow::Result<Value> {
    let data = args.data.clone();
    let loaded =
        tokio::task::spawn_blocking(move || ghostwriter_runtime::loaders::load(&data)).await??;
    let dataset = protocol::build(loaded.documents);
    let mut targets: Vec<_> = dataset
        .examples
        .iter()
        .filter(|e| e.split == args.split)
        .cloned()
        .collect();
    let mut rng = Rng::new(args.seed);
    rng.shuffle(&mut targets);
    if args.targets > 0 {
        targets.truncate(args.targets);
    }
    let users: Vec<String> = {
        let mut u: Vec<String> = dataset
            .examples
            .iter()
            .filter(|e| e.split == args.split)
            .map(|e| e.user_id.clone())
            .collect();
        u.sort();
        u.dedup();
        u
    };
    anyhow::ensure!(users.len() >= 2, "the split needs two users at least");
    let mut jobs = Vec::new();
    for e in &targets {
        jobs.push((e.user_id.clone(), e.clone(), true));
        let mut other = &users[rng.below(users.len())];
        while *other == e.user_id {
            other = &users[rng.below(users.len())];
        }
        jobs.push((other.clone(), e.clone(), false));
    }
    let run = |url: String| {
        let jobs = jobs.clone();
        let max_documents = args.max_documents;
        let author_history = args.author_history;
        async move {
            let client =
                GhostwriterClient::new(ghostwriter_transport::client::channel(&url, None)?);
            let results: Vec<anyhow::Result<Judgement>> = futures::stream::iter(jobs)
                .map(|(user, e, same)| {
                    let mut client = client.clone();
                    async move {
                        let mut request = tonic::Request::new(DistinguishRequest {
                            user_id: user.clone(),
                            text: e.target(),
                            // The author's history before the target (or all but the target);
                            // another user's whole.
                            timestamp: (same && author_history == AuthorHistory::Before)
                                .then_some(e.timestamp),
                            doc_id: if same {
                                e.doc_id.clone()
                            } else {
                                String::new()
                            },
                            max_documents,
                            consistency_token: Default::default(),
                        });
                        request.set_timeout(Duration::from_secs(300));
                        let r = client
                            .distinguish(request)
                            .await
                            .map_err(|s| anyhow::anyhow!("distinguish: {}", s.message()))?
                            .into_inner();
                        Ok(Judgement {
                            user_id: user,
                            doc_id: e.doc_id,
                            author: e.user_id,
                            same_author: same,
                            probability: r.probability,
                            compared: r.documents.into_iter().map(|d| d.doc_id).collect(),
                        })
                    }
                })
                .buffer_unordered(args.concurrency.max(1))
                .collect()
                .await;
            results.into_iter().collect::<anyhow::Result<Vec<_>>>()
        }
    };
    let started = Instant::now();
    let judgements = match &args.to {
        Some(url) => run(url.clone()).await?,
        None => {
            ghostwriter_runtime::embedded::Embedded::with_pipeline(
                model_dir,
                args.adapter.clone(),
                &dataset.documents,
                async |e| run(e.url()).await,
            )
            .await?
        }
    };
    let pairs: Vec<(f64, bool)> = judgements
        .iter()
        .map(|j| (f64::from(j.probability), j.same_author))
        .collect();
    let mut report = scored(&pairs);
    for (key, value) in [
        ("split", json!(format!("{:?}", args.split).to_lowercase())),
        ("adapter", json!(args.adapter)),
        ("max_documents", json!(args.max_documents)),
        (
            "author_history",
            json!(super::value_name(&args.author_history)),
        ),
        ("seconds", json!(started.elapsed().as_secs_f64())),
        ("judgements", json!(judgements)),
    ] {
        report.insert(key.to_string(), value);
    }
    let report = Value::Object(report);
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ordered_pairs() {
        assert_eq!(roc_auc(&[(0.9, true), (0.1, false)]), 1.0);
        assert_eq!(roc_auc(&[(0.1, true), (0.9, false)]), 0.0);
        assert_eq!(roc_auc(&[(0.5, true), (0.5, false)]), 0.5);
        let s = [(0.8, true), (0.4, true), (0.6, false), (0.2, false)];
        assert_eq!(roc_auc(&s), 0.75);
    }
}
