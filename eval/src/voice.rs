//! The voice score of `eval`: can a preset's writing be attributed to its author? For each
//! record, the style verifier judges the generated continuation alone (not the given start)
//! against the true author's profile — their most recent documents before the target, leaving
//! out those the write put in its prompt (`provenance.doc_ids`), so copying them earns nothing —
//! and against a matched other user's profile (the owner of the best BM25 match for the target
//! among the split's other users, as in `eval-distinguish --protocols profile`). The ROC AUC of
//! the two, with a bootstrap 95% interval resampled by author. The true continuation, judged
//! the same way, is the ceiling.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use ghostwriter_style::Verifier;
use ghostwriter_style::features::TextStats;
use serde::Serialize;

use crate::Record;
use crate::authorship::{self, Corpus};
use crate::protocol::{Dataset, Split};

/// A voice score.
#[derive(Debug, Clone, Serialize)]
pub struct Voice {
    /// Records judged (each gives two pairs).
    pub examples: usize,
    /// ROC AUC of the author's profile against the matched impostor's.
    pub auc: f64,
    /// 2.5th percentile of the bootstrap by author.
    pub ci_low: f64,
    /// 97.5th percentile.
    pub ci_high: f64,
}

/// A difference of voice scores on the same examples, with its bootstrap interval.
#[derive(Debug, Clone, Serialize)]
pub struct VoiceDiff {
    /// Examples both have.
    pub examples: usize,
    /// AUC of the preset minus the baseline's.
    pub diff: f64,
    /// 2.5th percentile of the bootstrap by author.
    pub ci_low: f64,
    /// 97.5th percentile.
    pub ci_high: f64,
}

/// One record's two judgements: (author, P(same) against the author, against the impostor).
type Judged = (String, f64, f64);

/// Voice scores of every preset, the difference of each to `baseline`, and the ceiling.
pub struct VoiceReport {
    /// By preset.
    pub presets: BTreeMap<String, Voice>,
    /// Each preset against the baseline preset, on shared examples.
    pub vs_baseline: BTreeMap<String, VoiceDiff>,
    /// The true continuations.
    pub ceiling: Option<Voice>,
}

fn auc_of(judged: &[&Judged]) -> f64 {
    let s: Vec<(f64, bool)> = judged
        .iter()
        .flat_map(|j| [(j.1, true), (j.2, false)])
        .collect();
    authorship::auc(&s)
}

fn bootstrap(judged: &[&Judged], resamples: usize, seed: u64) -> Voice {
    let s: Vec<(f64, bool)> = judged
        .iter()
        .flat_map(|j| [(j.1, true), (j.2, false)])
        .collect();
    let groups = authorship::groups_by_author(judged.iter().flat_map(|j| [&*j.0, &*j.0]));
    let (auc, ci_low, ci_high) = authorship::auc_ci(&s, &groups, resamples, seed);
    Voice {
        examples: judged.len(),
        auc,
        ci_low,
        ci_high,
    }
}

/// Scores `records` (by preset) of `split`; `baseline` names the preset differences are taken to.
#[allow(clippy::too_many_arguments)]
pub fn score(
    dataset: Dataset,
    split: Split,
    records: &BTreeMap<String, Vec<Record>>,
    baseline: &str,
    model_dir: &Path,
    embedding_cache: &Path,
    resamples: usize,
    seed: u64,
) -> anyhow::Result<VoiceReport> {
    let verifier = Verifier::shipped()?;
    let mut corpus = Corpus::new(dataset);
    let users: HashSet<String> = corpus.users(split).into_iter().collect();
    let owners: Vec<bool> = corpus
        .dataset
        .documents
        .iter()
        .map(|d| users.contains(&d.user_id))
        .collect();
    corpus.embed_where(model_dir, Some(embedding_cache), |i| owners[i])?;
    let bm25 = corpus.bm25(split);
    let embedder = ghostwriter_embed::Embedder::load(
        &model_dir.join(ghostwriter_embed::EMBEDDER_DIR),
        &candle_core::Device::Cpu,
    )?;
    // The two profiles of each (target, excluded documents).
    let judge =
        |t: usize, text: &str, excluded: &[String], embedding: &[f32]| -> Option<(f64, f64)> {
            let author = &corpus.dataset.documents[t].user_id;
            let own = &corpus.by_user[author];
            let at = own.iter().position(|&i| i == t)?;
            let excluded: HashSet<usize> = excluded
                .iter()
                .filter_map(|id| corpus.index.get(id).copied())
                .collect();
            let (mine, theirs) = authorship::profiles(&corpus, &bm25, t, &own[..at], &excluded)?;
            let stats = TextStats::new(text);
            let p = |profile: &[usize]| {
                let content = corpus.content_similarity(embedding, profile);
                verifier
                    .judge_stats(&stats, &corpus.profile(profile), content)
                    .probability()
                    .unwrap_or(0.5)
            };
            Some((p(&mine), p(&theirs)))
        };
    let embed_all = |texts: &[&str]| -> anyhow::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(64) {
            out.extend(embedder.embed(chunk)?);
        }
        Ok(out)
    };
    let mut judged: BTreeMap<String, HashMap<String, Judged>> = BTreeMap::new();
    let mut truth: HashMap<String, (Judged, Vec<String>)> = HashMap::new();
    for (preset, rs) in records {
        let rs: Vec<&Record> = rs
            .iter()
            .filter(|r| corpus.index.contains_key(&r.doc_id))
            .collect();
        let texts: Vec<&str> = rs.iter().map(|r| r.generated.as_str()).collect();
        let embeddings = embed_all(&texts)?;
        for (r, e) in rs.iter().zip(&embeddings) {
            let t = corpus.index[&r.doc_id];
            if let Some((a, b)) = judge(t, &r.generated, &r.passage_ids, e) {
                judged
                    .entry(preset.clone())
                    .or_default()
                    .insert(r.doc_id.clone(), (r.user_id.clone(), a, b));
            }
            truth
                .entry(r.doc_id.clone())
                .or_insert_with(|| ((r.user_id.clone(), 0.0, 0.0), r.passage_ids.clone()));
        }
    }
    let mut presets = BTreeMap::new();
    for (preset, j) in &judged {
        let v: Vec<&Judged> = j.values().collect();
        presets.insert(preset.clone(), bootstrap(&v, resamples, seed));
    }
    let mut vs_baseline = BTreeMap::new();
    if let Some(base) = judged.get(baseline) {
        for (preset, j) in judged.iter().filter(|(p, _)| *p != baseline) {
            let shared: Vec<(&Judged, &Judged)> = j
                .iter()
                .filter_map(|(id, a)| base.get(id).map(|b| (a, b)))
                .collect();
            if shared.is_empty() {
                continue;
            }
            let groups = authorship::groups_by_author(shared.iter().map(|(a, _)| a.0.as_str()));
            let mut rng = crate::Rng::new(seed ^ 0x70ce);
            let diff_of = |idx: &[usize]| {
                let a: Vec<&Judged> = idx.iter().map(|&i| shared[i].0).collect();
                let b: Vec<&Judged> = idx.iter().map(|&i| shared[i].1).collect();
                auc_of(&a) - auc_of(&b)
            };
            let all: Vec<usize> = (0..shared.len()).collect();
            let mut diffs: Vec<f64> = (0..resamples.max(1))
                .map(|_| {
                    let mut idx = Vec::new();
                    for _ in 0..groups.len() {
                        idx.extend(&groups[rng.below(groups.len())]);
                    }
                    diff_of(&idx)
                })
                .collect();
            diffs.sort_by(f64::total_cmp);
            let at = |q: f64| diffs[((diffs.len() - 1) as f64 * q).round() as usize];
            vs_baseline.insert(
                preset.clone(),
                VoiceDiff {
                    examples: shared.len(),
                    diff: diff_of(&all),
                    ci_low: at(0.025),
                    ci_high: at(0.975),
                },
            );
        }
    }
    // The ceiling: the true continuation (the target after its immediate context), with the
    // first preset's excluded documents.
    let mut ceiling_judged: Vec<Judged> = Vec::new();
    let ids: Vec<&String> = truth.keys().collect();
    let rests: Vec<String> = ids
        .iter()
        .map(|id| {
            let e = &corpus.texts[corpus.index[*id]];
            e.chars().skip(crate::protocol::CONTEXT_CHARS).collect()
        })
        .collect();
    let refs: Vec<&str> = rests.iter().map(String::as_str).collect();
    let embeddings = embed_all(&refs)?;
    for ((id, rest), e) in ids.iter().zip(&rests).zip(&embeddings) {
        let (j, excluded) = &truth[*id];
        if let Some((a, b)) = judge(corpus.index[*id], rest, excluded, e) {
            ceiling_judged.push((j.0.clone(), a, b));
        }
    }
    let ceiling = (!ceiling_judged.is_empty())
        .then(|| bootstrap(&ceiling_judged.iter().collect::<Vec<_>>(), resamples, seed));
    Ok(VoiceReport {
        presets,
        vs_baseline,
        ceiling,
    })
}
