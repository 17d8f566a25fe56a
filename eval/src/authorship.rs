//! Authorship pairs and their scoring, shared by `eval-distinguish`, `train-style` and the voice
//! score of `eval`.
//!
//! A pair is a text (a target of the protocol) and a profile (documents of its supposed
//! author); its label says whether the profile's author wrote the text. The protocols, on the
//! users of one split, each target giving one same-author pair and one other-author pair:
//! - `random`: one earlier document of the author against one document of a random other user;
//! - `matched`: the author's earlier document that best matches the text (BM25) against the
//!   best BM25 match for the text among every document of the split's other users: both sides
//!   on topic, so topic says little;
//! - `profile`: the author's most recent earlier documents (up to 8, at least 4) against the
//!   profile of the other user owning the best BM25 match (that document and their most recent
//!   others, as many as the author's; users with at least 4 documents).
//!
//! Scores: ROC AUC with a bootstrap 95% interval that resamples authors (a target's two pairs
//! and every target of an author move together), the expected calibration error, and the char
//! 3-gram TF-IDF cosine baseline.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use ghostwriter_proto::v1::Document;
use ghostwriter_style::Verifier;
use ghostwriter_style::features::{Profile, TextStats};

use crate::Rng;
use crate::protocol::{self, Dataset, Split, full_text};

/// Profile documents at most (the served default).
pub const PROFILE_MAX: usize = 8;
/// Profile documents at least, in the `profile` protocol.
pub const PROFILE_MIN: usize = 4;

/// How a pair's profile and impostor are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// One document; the impostor's is a random other user's.
    Random,
    /// One document; both the author's and the impostor's are the best BM25 match for the text.
    Matched,
    /// Up to 8 documents (at least 4); the impostor owns the best BM25 match.
    Profile,
}

impl Protocol {
    /// Every protocol, headline second.
    pub const ALL: [Protocol; 3] = [Protocol::Random, Protocol::Matched, Protocol::Profile];

    /// Its name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Random => "random",
            Protocol::Matched => "matched",
            Protocol::Profile => "profile",
        }
    }
}

/// One pair: document indices into a [`Corpus`].
#[derive(Debug, Clone)]
pub struct Pair {
    /// Who built it.
    pub kind: String,
    /// The text's real author (the bootstrap's unit).
    pub author: String,
    /// The text.
    pub text: usize,
    /// The supposed author's documents.
    pub profile: Vec<usize>,
    /// Whether the profile's author wrote the text.
    pub same: bool,
}

/// The documents of a data file after the protocol's dedupe, measured once.
pub struct Corpus {
    /// The protocol's documents and targets.
    pub dataset: Dataset,
    /// Title and body of each document.
    pub texts: Vec<String>,
    /// Each user's document indices, oldest first (ties by doc id).
    pub by_user: BTreeMap<String, Vec<usize>>,
    /// Index of each document id.
    pub index: HashMap<String, usize>,
    /// Style counts of each document.
    pub stats: Vec<TextStats>,
    /// Unit MiniLM embedding of each document (empty until [`Corpus::embed`]).
    pub embeddings: Vec<Vec<f32>>,
}

impl Corpus {
    /// Loads `path` (any `docs.jsonl` or Amazon `.json.gz`) and applies the protocol.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let loaded = ghostwriter_runtime::loaders::load(path)?;
        Ok(Self::new(protocol::build(loaded.documents)))
    }

    /// Measures a dataset's documents.
    pub fn new(dataset: Dataset) -> Self {
        let texts: Vec<String> = dataset
            .documents
            .iter()
            .map(|d| full_text(&d.title, &d.text))
            .collect();
        let mut by_user: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut index = HashMap::new();
        for (i, d) in dataset.documents.iter().enumerate() {
            by_user.entry(d.user_id.clone()).or_default().push(i);
            index.insert(d.doc_id.clone(), i);
        }
        let docs = &dataset.documents;
        for v in by_user.values_mut() {
            v.sort_by(|&a, &b| {
                (docs[a].timestamp, &docs[a].doc_id).cmp(&(docs[b].timestamp, &docs[b].doc_id))
            });
        }
        let stats = crate::metrics::par_map(&texts, |t| TextStats::new(t));
        Self {
            dataset,
            texts,
            by_user,
            index,
            stats,
            embeddings: Vec::new(),
        }
    }

    /// Embeds every document with MiniLM, reading and writing `cache` (a file keyed by the
    /// texts' hashes) so a rerun on the same data skips the work.
    pub fn embed(&mut self, model_dir: &Path, cache: Option<&Path>) -> anyhow::Result<()> {
        self.embed_where(model_dir, cache, |_| true)
    }

    /// [`Corpus::embed`] for the documents `keep` selects only (the others get no embedding).
    pub fn embed_where(
        &mut self,
        model_dir: &Path,
        cache: Option<&Path>,
        keep: impl Fn(usize) -> bool,
    ) -> anyhow::Result<()> {
        let keys: Vec<u64> = self
            .texts
            .iter()
            .map(|t| protocol::fnv1a(t.as_bytes()))
            .collect();
        let mut known: HashMap<u64, Vec<f32>> = HashMap::new();
        if let Some(path) = cache.filter(|p| p.exists()) {
            let mut bytes = Vec::new();
            std::fs::File::open(path)?.read_to_end(&mut bytes)?;
            let dim = ghostwriter_embed::Embedder::DIM;
            for chunk in bytes.chunks_exact(8 + 4 * dim) {
                let key = u64::from_le_bytes(chunk[..8].try_into()?);
                let v: Vec<f32> = chunk[8..]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                known.insert(key, v);
            }
        }
        let missing: Vec<usize> = (0..self.texts.len())
            .filter(|&i| keep(i) && !known.contains_key(&keys[i]))
            .collect();
        if !missing.is_empty() {
            let embedder = ghostwriter_embed::Embedder::load(
                &model_dir.join(ghostwriter_embed::EMBEDDER_DIR),
                &candle_core::Device::Cpu,
            )?;
            eprintln!("embedding {} documents", missing.len());
            for chunk in missing.chunks(64) {
                let batch: Vec<&str> = chunk.iter().map(|&i| self.texts[i].as_str()).collect();
                for (&i, e) in chunk.iter().zip(embedder.embed(&batch)?) {
                    known.insert(keys[i], e);
                }
            }
            if let Some(path) = cache {
                let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
                for (k, v) in &known {
                    out.write_all(&k.to_le_bytes())?;
                    for x in v {
                        out.write_all(&x.to_le_bytes())?;
                    }
                }
                out.flush()?;
            }
        }
        self.embeddings = keys
            .iter()
            .map(|k| known.get(k).cloned().unwrap_or_default())
            .collect();
        Ok(())
    }

    /// BM25 over every document of `split`'s users with targets.
    pub fn bm25(&self, split: Split) -> Bm25 {
        let users: HashSet<String> = self.users(split).into_iter().collect();
        let docs = &self.dataset.documents;
        Bm25::new(
            &self.texts,
            (0..docs.len()).filter(|&i| users.contains(&docs[i].user_id)),
        )
    }

    /// The users of `split` with targets.
    pub fn users(&self, split: Split) -> Vec<String> {
        let mut u: Vec<String> = self
            .dataset
            .examples
            .iter()
            .filter(|e| e.split == split)
            .map(|e| e.user_id.clone())
            .collect();
        u.sort();
        u.dedup();
        u
    }

    /// MiniLM cosine of document `text` to the mean of the `profile` documents' embeddings.
    pub fn content_similarity(&self, text: &[f32], profile: &[usize]) -> f32 {
        content_similarity(text, profile.iter().map(|&i| self.embeddings[i].as_slice()))
    }

    /// The profile of documents `profile`.
    pub fn profile(&self, profile: &[usize]) -> Profile {
        let refs: Vec<&TextStats> = profile.iter().map(|&i| &self.stats[i]).collect();
        Profile::new(&refs)
    }

    /// The verifier's P(same author) for a pair (0.5 where it abstains: no information).
    pub fn judge(&self, verifier: &Verifier, pair: &Pair) -> (f64, bool) {
        let content = self.content_similarity(&self.embeddings[pair.text], &pair.profile);
        let j = verifier.judge_stats(
            &self.stats[pair.text],
            &self.profile(&pair.profile),
            content,
        );
        match j.probability() {
            Some(p) => (p, false),
            None => (0.5, true),
        }
    }

    /// The verifier's features of a pair.
    pub fn features(&self, verifier: &Verifier, pair: &Pair) -> Vec<f64> {
        let content = self.content_similarity(&self.embeddings[pair.text], &pair.profile);
        verifier.features(
            &self.stats[pair.text],
            &self.profile(&pair.profile),
            content,
        )
    }
}

pub use ghostwriter_style::content_similarity;

/// Okapi BM25 (k1 1.2, b 0.75, as tantivy) over a set of documents, in memory.
pub struct Bm25 {
    postings: HashMap<String, Vec<(usize, f32)>>,
    /// Length of each document in words (0 for those not indexed).
    lengths: Vec<f32>,
    average: f32,
    n: f32,
}

/// Lowercased alphanumeric words (the retriever's tokenizer splits the same way).
pub fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

impl Bm25 {
    /// Indexes documents `docs` of `texts`.
    pub fn new(texts: &[String], docs: impl Iterator<Item = usize>) -> Self {
        let mut postings: HashMap<String, Vec<(usize, f32)>> = HashMap::new();
        let mut lengths = vec![0.0; texts.len()];
        let mut n = 0usize;
        for d in docs {
            let t = terms(&texts[d]);
            lengths[d] = t.len() as f32;
            n += 1;
            let mut tf: HashMap<String, f32> = HashMap::new();
            for w in t {
                *tf.entry(w).or_default() += 1.0;
            }
            for (w, f) in tf {
                postings.entry(w).or_default().push((d, f));
            }
        }
        let average = lengths.iter().sum::<f32>() / (n.max(1) as f32);
        Self {
            postings,
            lengths,
            average: average.max(1.0),
            n: n as f32,
        }
    }

    /// Documents passing `allowed` ranked by BM25 for `query`, best first (ties: lower index).
    pub fn ranked(&self, query: &str, allowed: impl Fn(usize) -> bool) -> Vec<(usize, f32)> {
        let mut seen = HashSet::new();
        let mut score: Vec<f32> = vec![0.0; self.lengths.len()];
        let mut touched: Vec<usize> = Vec::new();
        for w in terms(query) {
            if !seen.insert(w.clone()) {
                continue;
            }
            let Some(list) = self.postings.get(&w) else {
                continue;
            };
            let df = list.len() as f32;
            let idf = (1.0 + (self.n - df + 0.5) / (df + 0.5)).ln();
            for &(d, tf) in list {
                let len = self.lengths[d];
                let s = idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len / self.average));
                if score[d] == 0.0 {
                    touched.push(d);
                }
                score[d] += s;
            }
        }
        let mut out: Vec<(usize, f32)> = touched
            .into_iter()
            .filter(|&d| allowed(d))
            .map(|d| (d, score[d]))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }
}

/// Builds the pairs of `protocol` on `split`: each target of the split gives one same-author and
/// one other-author pair (a target the protocol cannot pair is left out).
pub fn pairs(corpus: &Corpus, split: Split, protocol: Protocol, seed: u64) -> Vec<Pair> {
    let users = corpus.users(split);
    let docs = &corpus.dataset.documents;
    let bm25 = (protocol != Protocol::Random).then(|| corpus.bm25(split));
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for e in corpus.dataset.examples.iter().filter(|e| e.split == split) {
        let Some(&t) = corpus.index.get(&e.doc_id) else {
            continue;
        };
        let own = &corpus.by_user[&e.user_id];
        let at = own.iter().position(|&i| i == t).unwrap_or(0);
        let earlier = &own[..at];
        if earlier.is_empty() {
            continue;
        }
        let text = &corpus.texts[t];
        let (same, other): (Vec<usize>, Vec<usize>) = match protocol {
            Protocol::Random => {
                let mine = earlier[rng.below(earlier.len())];
                let mut who = &users[rng.below(users.len())];
                for _ in 0..9 {
                    if *who != e.user_id {
                        break;
                    }
                    who = &users[rng.below(users.len())];
                }
                if *who == e.user_id {
                    continue;
                }
                let theirs = &corpus.by_user[who];
                (vec![mine], vec![theirs[rng.below(theirs.len())]])
            }
            Protocol::Matched => {
                let Some(bm25) = &bm25 else { continue };
                let earlier_set: HashSet<usize> = earlier.iter().copied().collect();
                let mine = bm25
                    .ranked(text, |d| earlier_set.contains(&d))
                    .first()
                    .map_or(earlier[earlier.len() - 1], |b| b.0);
                let Some(&(theirs, _)) =
                    bm25.ranked(text, |d| docs[d].user_id != e.user_id).first()
                else {
                    continue;
                };
                (vec![mine], vec![theirs])
            }
            Protocol::Profile => {
                let Some(bm25) = &bm25 else { continue };
                if earlier.len() < PROFILE_MIN {
                    continue;
                }
                let Some(pair) = profiles(corpus, bm25, t, earlier, &HashSet::new()) else {
                    continue;
                };
                pair
            }
        };
        for (profile, is_same) in [(same, true), (other, false)] {
            out.push(Pair {
                kind: protocol.name().to_string(),
                author: e.user_id.clone(),
                text: t,
                profile,
                same: is_same,
            });
        }
    }
    out
}

/// The `profile` protocol's two profiles for document `t` whose author's earlier documents are
/// `earlier`, leaving out `excluded` ones: the author's most recent (up to 8), and the profile of
/// the other user owning the best BM25 match for the text among users with at least 4 documents
/// (that document and their most recent others, as many as the author's). `None` when either is
/// empty.
pub fn profiles(
    corpus: &Corpus,
    bm25: &Bm25,
    t: usize,
    earlier: &[usize],
    excluded: &HashSet<usize>,
) -> Option<(Vec<usize>, Vec<usize>)> {
    let docs = &corpus.dataset.documents;
    let author = &docs[t].user_id;
    let mine: Vec<usize> = earlier
        .iter()
        .rev()
        .filter(|d| !excluded.contains(d))
        .take(PROFILE_MAX)
        .copied()
        .collect();
    let &(matched, _) = bm25
        .ranked(&corpus.texts[t], |d| {
            docs[d].user_id != *author && corpus.by_user[&docs[d].user_id].len() >= PROFILE_MIN
        })
        .first()?;
    let theirs = &corpus.by_user[&docs[matched].user_id];
    // As many documents as the author's profile: its size says nothing of who wrote the text.
    let mut profile = vec![matched];
    profile.extend(
        theirs
            .iter()
            .rev()
            .filter(|&&d| d != matched)
            .take(mine.len().saturating_sub(1)),
    );
    (!mine.is_empty()).then_some((mine, profile))
}

/// ROC AUC of `(score, positive)` pairs (ties count half), by ranks: O(n log n).
pub fn auc(scores: &[(f64, bool)]) -> f64 {
    let mut s: Vec<(f64, bool)> = scores.to_vec();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut pos) = (0.0, 0usize);
    let mut i = 0;
    while i < s.len() {
        let mut j = i;
        while j < s.len() && s[j].0 == s[i].0 {
            j += 1;
        }
        // Ranks i+1..=j share their mean.
        let mean_rank = (i + 1 + j) as f64 / 2.0;
        for x in &s[i..j] {
            if x.1 {
                rank_sum += mean_rank;
                pos += 1;
            }
        }
        i = j;
    }
    let neg = s.len() - pos;
    if pos == 0 || neg == 0 {
        return 0.5;
    }
    (rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64
}

/// The AUC and its bootstrap 95% interval, resampling `groups` (each a list of indices into
/// `scores`, one per author) with replacement `resamples` times.
pub fn auc_ci(
    scores: &[(f64, bool)],
    groups: &[Vec<usize>],
    resamples: usize,
    seed: u64,
) -> (f64, f64, f64) {
    let point = auc(scores);
    if groups.is_empty() || resamples == 0 {
        return (point, point, point);
    }
    let mut rng = Rng::new(seed ^ 0xa0c);
    let mut aucs: Vec<f64> = (0..resamples)
        .map(|_| {
            let mut s = Vec::with_capacity(scores.len());
            for _ in 0..groups.len() {
                for &i in &groups[rng.below(groups.len())] {
                    s.push(scores[i]);
                }
            }
            auc(&s)
        })
        .collect();
    aucs.sort_by(f64::total_cmp);
    let at = |q: f64| aucs[((aucs.len() - 1) as f64 * q).round() as usize];
    (point, at(0.025), at(0.975))
}

/// Indices of `pairs` grouped by author, in a stable order.
pub fn groups_by_author<'a>(authors: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
    let mut g: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, a) in authors.enumerate() {
        g.entry(a).or_default().push(i);
    }
    g.into_values().collect()
}

/// Expected calibration error over 10 equal-width bins of P(same author).
pub fn expected_calibration_error(scores: &[(f64, bool)]) -> f64 {
    let mut bins = [(0.0f64, 0.0f64, 0usize); 10];
    for &(p, y) in scores {
        let b = ((p * 10.0) as usize).min(9);
        bins[b].0 += p;
        bins[b].1 += f64::from(u8::from(y));
        bins[b].2 += 1;
    }
    let n = scores.len().max(1) as f64;
    bins.iter()
        .filter(|b| b.2 > 0)
        .map(|(p, y, c)| (p / *c as f64 - y / *c as f64).abs() * *c as f64 / n)
        .sum()
}

/// The char 3-gram TF-IDF cosine baseline: exact 3-grams (hashed to 64 bits), IDF over every
/// document of the corpus, the profile's counts summed.
pub struct Baseline {
    grams: Vec<HashMap<u64, f32>>,
    idf: HashMap<u64, f32>,
}

impl Baseline {
    /// Counts every document's 3-grams.
    pub fn new(texts: &[String]) -> Self {
        let grams: Vec<HashMap<u64, f32>> = crate::metrics::par_map(texts, |t| {
            let chars: Vec<char> = t.chars().collect();
            let mut m: HashMap<u64, f32> = HashMap::new();
            for w in chars.windows(3) {
                let s: String = w.iter().collect();
                *m.entry(protocol::fnv1a(s.as_bytes())).or_default() += 1.0;
            }
            m
        });
        let mut df: HashMap<u64, f32> = HashMap::new();
        for g in &grams {
            for k in g.keys() {
                *df.entry(*k).or_default() += 1.0;
            }
        }
        let n = grams.len() as f32;
        let idf = df
            .into_iter()
            .map(|(k, f)| (k, ((n + 1.0) / (f + 1.0)).ln() + 1.0))
            .collect();
        Self { grams, idf }
    }

    /// Cosine of document `text`'s TF-IDF vector with the summed `profile`'s.
    pub fn score(&self, text: usize, profile: &[usize]) -> f64 {
        let mut p: HashMap<u64, f32> = HashMap::new();
        for &d in profile {
            for (k, v) in &self.grams[d] {
                *p.entry(*k).or_default() += v;
            }
        }
        let w = |k: &u64, v: f32| f64::from(v * self.idf.get(k).copied().unwrap_or(1.0));
        let (mut dot, mut tt) = (0.0, 0.0);
        for (k, v) in &self.grams[text] {
            let a = w(k, *v);
            tt += a * a;
            if let Some(b) = p.get(k) {
                dot += a * w(k, *b);
            }
        }
        let pp: f64 = p.iter().map(|(k, v)| w(k, *v).powi(2)).sum();
        if tt == 0.0 || pp == 0.0 {
            0.0
        } else {
            dot / (tt.sqrt() * pp.sqrt())
        }
    }
}

/// Where the embedding cache of a data file lives by default: the system's temporary directory.
pub fn default_embedding_cache(data: &Path) -> PathBuf {
    let name = data.to_string_lossy();
    std::env::temp_dir().join(format!(
        "ghostwriter-style-embeddings-{:016x}.bin",
        protocol::fnv1a(name.as_bytes())
    ))
}

/// Documents of `docs` by index (for reports).
pub fn doc_ids(docs: &[Document], idx: &[usize]) -> Vec<String> {
    idx.iter().map(|&i| docs[i].doc_id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_by_ranks_matches_counting_pairs() {
        assert_eq!(auc(&[(0.9, true), (0.1, false)]), 1.0);
        assert_eq!(auc(&[(0.1, true), (0.9, false)]), 0.0);
        assert_eq!(auc(&[(0.5, true), (0.5, false)]), 0.5);
        let s = [
            (0.8, true),
            (0.4, true),
            (0.6, false),
            (0.2, false),
            (0.4, false),
        ];
        // Pairs: (0.8 beats 3), (0.4 beats 0.2, ties 0.4, loses to 0.6) = 3 + 1.5 = 4.5 of 6.
        assert!((auc(&s) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn the_interval_brackets_the_point_and_calibration_error_is_zero_when_exact() {
        let scores: Vec<(f64, bool)> = (0..200)
            .map(|i| {
                (
                    ((i * 37) % 100) as f64 / 100.0,
                    (i * 37) % 100 > 40 || i % 7 == 0,
                )
            })
            .collect();
        let groups: Vec<Vec<usize>> = (0..50).map(|g| (g * 4..g * 4 + 4).collect()).collect();
        let (point, low, high) = auc_ci(&scores, &groups, 500, 1);
        assert!(
            low <= point && point <= high && low < high,
            "{low} {point} {high}"
        );
        let exact = [(0.05, false), (0.95, true), (0.05, false), (0.95, true)];
        assert!(expected_calibration_error(&exact) < 0.051);
    }

    #[test]
    fn bm25_prefers_the_document_on_topic() {
        let texts: Vec<String> = [
            "great guitar strap, long and comfy",
            "this cable hums and the plug is loose",
            "the strap holds my heavy bass guitar",
        ]
        .map(String::from)
        .to_vec();
        let bm = Bm25::new(&texts, 0..3);
        let r = bm.ranked("a strap for a bass", |d| d != 0);
        assert_eq!(r[0].0, 2);
        assert!(r.iter().all(|(d, _)| *d != 0));
    }
}
