//! `ghostwriter eval-distinguish`: author distinction on held-out users, by protocol
//! ([`crate::authorship`]: `random`, `matched` — the headline — and `profile`). Each protocol
//! reports the style verifier's ROC AUC with a bootstrap 95% interval resampled by author, its
//! expected calibration error at the 1:1 prior, the char 3-gram TF-IDF cosine baseline on the
//! same pairs, and, with `--llm`, the generator's author-distinction judgement (the text's
//! first 150 characters against each profile document's first 600, averaged).

use std::path::PathBuf;
use std::time::Instant;

use ghostwriter_generator::model::Prompter;
use ghostwriter_generator::native::NativeModel;
use ghostwriter_generator::{LoadOptions, prompt, same_author_probability};
use ghostwriter_style::Verifier;
use serde_json::{Value, json};

use crate::authorship::{self, Baseline, Corpus, Pair, Protocol};
use crate::protocol::{CONTEXT_CHARS, Split};

/// Settings of a distinction evaluation.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Documents: any `docs.jsonl` (neutral JSONL: user_id, doc_id, timestamp, title, text) or
    /// Amazon .json.gz; the protocol's targets and split apply.
    #[arg(long, default_value_os_t = crate::bench::default_data())]
    pub data: PathBuf,
    /// Users whose targets are judged.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    pub split: Split,
    /// Comma-separated protocols (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub protocols: Vec<Protocol>,
    /// A style model file to evaluate instead of the shipped one (from `train-style --out`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Also score every pair with the generator's LLM judgement (slow on CPU: see
    /// --llm-targets).
    #[arg(long)]
    pub llm: bool,
    /// Adapter the LLM judgement uses with --llm (the fine-tuned model); none = zero-shot.
    #[arg(long, env = "GHOSTWRITER_ADAPTER")]
    pub adapter: Option<PathBuf>,
    /// With --llm: targets per protocol the LLM judges (their pairs only; 0 = all). The
    /// verifier and the baseline are also reported on that subset.
    #[arg(long, default_value_t = 60)]
    pub llm_targets: usize,
    /// Bootstrap resamples of the intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of the impostor sampling and the bootstrap.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Cache of the documents' MiniLM embeddings (default: a file in the temporary directory
    /// named after --data).
    #[arg(long)]
    pub embedding_cache: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "eval-distinguish.json")]
    pub out: PathBuf,
}

/// The generator's author-distinction judgement, in process (the serving engine).
struct Llm {
    model: NativeModel,
    prompter: Prompter,
    answers: [u32; 2],
    name: String,
}

impl Llm {
    fn load(model_dir: &std::path::Path, adapter: Option<PathBuf>) -> anyhow::Result<Self> {
        let base = model_dir.join(ghostwriter_common::models::GENERATOR_Q8_0);
        let prompter = Prompter::load(&base)?;
        let answers = [
            prompter.encode_plain("true")?[0],
            prompter.encode_plain("false")?[0],
        ];
        let name = match &adapter {
            Some(a) => format!("{} + {}", base.display(), a.display()),
            None => format!("{} (zero-shot)", base.display()),
        };
        let model = NativeModel::load(
            &base,
            &LoadOptions {
                adapter,
                ..LoadOptions::cpu(2048, 64)
            },
        )?;
        Ok(Self {
            model,
            prompter,
            answers,
            name,
        })
    }

    /// Mean P(same author) of the text's start against each profile document's first 600.
    fn judge(&mut self, corpus: &Corpus, pair: &Pair) -> anyhow::Result<f64> {
        let first: String = corpus.texts[pair.text]
            .chars()
            .take(CONTEXT_CHARS)
            .collect();
        let mut sum = 0.0;
        for &d in &pair.profile {
            let second: String = corpus.texts[d].trim().chars().take(600).collect();
            let ids = self.prompter.encode(&prompt::distinction(
                prompt::DEFAULT_SYSTEM,
                &first,
                &second,
            ))?;
            let logits = self.model.logits_after(&ids)?;
            let [t, f] = self.answers;
            sum += f64::from(same_author_probability(
                logits[t as usize],
                logits[f as usize],
            ));
        }
        Ok(sum / pair.profile.len().max(1) as f64)
    }
}

/// AUC and interval of scores over pairs, resampled by author.
fn scored(pairs: &[Pair], scores: &[f64], resamples: usize, seed: u64) -> (f64, f64, f64) {
    let s: Vec<(f64, bool)> = scores
        .iter()
        .zip(pairs)
        .map(|(x, p)| (*x, p.same))
        .collect();
    let groups = authorship::groups_by_author(pairs.iter().map(|p| p.author.as_str()));
    authorship::auc_ci(&s, &groups, resamples, seed)
}

/// Runs the protocols and writes the report.
pub fn evaluate(args: EvalArgs, model_dir: PathBuf) -> anyhow::Result<Value> {
    let started = Instant::now();
    let verifier = match &args.model {
        Some(path) => Verifier::from_json(&std::fs::read_to_string(path)?)?,
        None => Verifier::shipped()?,
    };
    let mut corpus = Corpus::load(&args.data)?;
    let cache = args
        .embedding_cache
        .clone()
        .unwrap_or_else(|| authorship::default_embedding_cache(&args.data));
    // Every pair of a split is drawn from that split's users alone: embed only their documents.
    let split_docs: std::collections::HashSet<usize> = corpus
        .users(args.split)
        .iter()
        .flat_map(|u| corpus.by_user[u].iter().copied())
        .collect();
    corpus.embed_where(&model_dir, Some(&cache), |i| split_docs.contains(&i))?;
    let baseline = Baseline::new(&corpus.texts);
    let mut llm = if args.llm {
        Some(Llm::load(&model_dir, args.adapter.clone())?)
    } else {
        None
    };
    let protocols = if args.protocols.is_empty() {
        Protocol::ALL.to_vec()
    } else {
        args.protocols.clone()
    };
    let mut rows = Vec::new();
    for p in protocols {
        let pairs = authorship::pairs(&corpus, args.split, p, args.seed);
        anyhow::ensure!(
            !pairs.is_empty(),
            "no {} pairs on the {:?} split of {}",
            p.name(),
            args.split,
            args.data.display()
        );
        let judged: Vec<(f64, bool)> =
            crate::metrics::par_map(&pairs, |q| corpus.judge(&verifier, q));
        let scores: Vec<f64> = judged.iter().map(|j| j.0).collect();
        let base: Vec<f64> =
            crate::metrics::par_map(&pairs, |q| baseline.score(q.text, &q.profile));
        let (auc, low, high) = scored(&pairs, &scores, args.bootstrap, args.seed);
        let (b_auc, b_low, b_high) = scored(&pairs, &base, args.bootstrap, args.seed);
        let calibration: Vec<(f64, bool)> = scores
            .iter()
            .zip(&pairs)
            .map(|(s, q)| (*s, q.same))
            .collect();
        let mut row = json!({
            "name": p.name(),
            "pairs": pairs.len(),
            "authors": authorship::groups_by_author(pairs.iter().map(|q| q.author.as_str())).len(),
            "auc": auc,
            "auc_ci_low": low,
            "auc_ci_high": high,
            "baseline_auc": b_auc,
            "baseline_auc_ci_low": b_low,
            "baseline_auc_ci_high": b_high,
            "expected_calibration_error": authorship::expected_calibration_error(&calibration),
            "abstained": judged.iter().filter(|j| j.1).count(),
            "mean_profile_documents": pairs.iter().map(|q| q.profile.len()).sum::<usize>() as f64 / pairs.len() as f64,
            "llm_auc": Value::Null,
        });
        if let Some(llm) = llm.as_mut() {
            let n = if args.llm_targets == 0 {
                pairs.len()
            } else {
                (2 * args.llm_targets).min(pairs.len())
            };
            let subset = &pairs[..n];
            let mut llm_scores = Vec::with_capacity(n);
            for q in subset {
                llm_scores.push(llm.judge(&corpus, q)?);
            }
            let (l_auc, l_low, l_high) = scored(subset, &llm_scores, args.bootstrap, args.seed);
            let (v_auc, v_low, v_high) = scored(subset, &scores[..n], args.bootstrap, args.seed);
            let (s_auc, _, _) = scored(subset, &base[..n], args.bootstrap, args.seed);
            for (k, v) in [
                ("llm_auc", json!(l_auc)),
                ("llm_auc_ci_low", json!(l_low)),
                ("llm_auc_ci_high", json!(l_high)),
                ("llm_pairs", json!(n)),
                ("llm_subset_verifier_auc", json!([v_auc, v_low, v_high])),
                ("llm_subset_baseline_auc", json!(s_auc)),
            ] {
                row[k] = v;
            }
        }
        eprintln!("{}", serde_json::to_string(&row)?);
        rows.push(row);
    }
    let report = json!({
        "data": args.data,
        "split": super::value_name(&args.split),
        "model": args.model.as_ref().map_or("shipped".to_string(), |m| m.display().to_string()),
        "model_provenance": verifier.model().provenance,
        "llm": llm.as_ref().map(|l| l.name.clone()),
        "seed": args.seed,
        "bootstrap": args.bootstrap,
        "seconds": started.elapsed().as_secs_f64(),
        "protocols": rows,
    });
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}
