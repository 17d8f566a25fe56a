//! Important words.
//!
//! - `SynCtxInd`, exactly as the paper defines it: frequent unigrams of the user's past
//!   documents, minus stopwords, words seen once, and words whose IDF over the user's documents
//!   is below 1.5; sorted by frequency, then IDF; at most 20.
//! - `SynCtx`: words of the ranked entries that match a word of the immediate context —
//!   identical, or close in embedding space (all-MiniLM-L6-v2 cosine of the single words at or
//!   above a calibrated threshold, standing in for the paper's WordNet synonyms and GloVe
//!   distance) — minus stopwords and IDF < 1.5; sorted by how often picked, then IDF.

use std::collections::{HashMap, HashSet};

use crate::text;

/// The paper's IDF threshold.
pub const MIN_IDF: f32 = 1.5;
/// The paper's word limit.
pub const DEFAULT_MAX_WORDS: usize = 20;

/// A chosen word.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    /// The word.
    pub word: String,
    /// Occurrences across the documents.
    pub frequency: u32,
    /// ln(N / df) over the documents.
    pub idf: f32,
}

/// Important words of `documents` (the user's past documents, which are also the corpus of
/// the IDF: `idf = ln(N / df)`).
pub fn important_words(documents: &[&str], max_words: usize) -> Vec<Word> {
    let n = documents.len();
    if n == 0 {
        return Vec::new();
    }
    let mut frequency: HashMap<String, u32> = HashMap::new();
    let mut df: HashMap<String, u32> = HashMap::new();
    for d in documents {
        let mut seen = HashSet::new();
        for w in text::words(d) {
            if text::is_stopword(&w) {
                continue;
            }
            *frequency.entry(w.clone()).or_default() += 1;
            if seen.insert(w.clone()) {
                *df.entry(w).or_default() += 1;
            }
        }
    }
    let words: Vec<Word> = frequency
        .into_iter()
        .filter(|(_, f)| *f > 1)
        .map(|(word, f)| {
            let idf = (n as f32 / df[&word] as f32).ln();
            Word {
                word,
                frequency: f,
                idf,
            }
        })
        .filter(|w| w.idf >= MIN_IDF)
        .collect();
    ranked(words, max_words)
}

/// The paper's order: most frequent (or most often picked) first, then highest IDF; at most
/// `max_words`.
fn ranked(mut words: Vec<Word>, max_words: usize) -> Vec<Word> {
    words.sort_by(|a, b| {
        b.frequency
            .cmp(&a.frequency)
            .then(b.idf.total_cmp(&a.idf))
            .then(a.word.cmp(&b.word))
    });
    words.truncate(max_words);
    words
}

/// Document frequencies of the non-stopwords of `documents`.
fn document_frequencies(documents: &[&str]) -> HashMap<String, u32> {
    let mut df: HashMap<String, u32> = HashMap::new();
    for d in documents {
        let unique: HashSet<String> = text::words(d).filter(|w| !text::is_stopword(w)).collect();
        for w in unique {
            *df.entry(w).or_default() += 1;
        }
    }
    df
}

/// `SynCtx`. `similar(entry_words, query_words)` gives, for each entry word, whether it is close
/// to some query word (the embedding test; identical words always match).
pub fn context_words(
    query: &str,
    entries: &[&str],
    documents: &[&str],
    max_words: usize,
    similar: impl FnOnce(&[String], &[String]) -> anyhow::Result<Vec<bool>>,
) -> anyhow::Result<Vec<Word>> {
    let n = documents.len().max(1);
    let df = document_frequencies(documents);
    let idf = |w: &str| (n as f32 / df.get(w).copied().unwrap_or(1).max(1) as f32).ln();
    let query_words: Vec<String> = {
        let mut seen = HashSet::new();
        text::words(query)
            .filter(|w| !text::is_stopword(w) && seen.insert(w.clone()))
            .collect()
    };
    let occurrences: Vec<String> = entries
        .iter()
        .flat_map(|e| text::words(e))
        .filter(|w| !text::is_stopword(w) && idf(w) >= MIN_IDF)
        .collect();
    let distinct: Vec<String> = {
        let mut seen = HashSet::new();
        occurrences
            .iter()
            .filter(|w| seen.insert((*w).clone()))
            .cloned()
            .collect()
    };
    if distinct.is_empty() || query_words.is_empty() {
        return Ok(Vec::new());
    }
    let query_set: HashSet<&String> = query_words.iter().collect();
    let close = similar(&distinct, &query_words)?;
    let matched: HashSet<&String> = distinct
        .iter()
        .zip(close)
        .filter(|(w, c)| *c || query_set.contains(w))
        .map(|(w, _)| w)
        .collect();
    let mut picked: HashMap<&String, u32> = HashMap::new();
    for w in &occurrences {
        if matched.contains(w) {
            *picked.entry(w).or_default() += 1;
        }
    }
    let words: Vec<Word> = picked
        .into_iter()
        .map(|(w, f)| Word {
            word: w.clone(),
            frequency: f,
            idf: idf(w),
        })
        .collect();
    Ok(ranked(words, max_words))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_papers_filters_and_order() {
        let docs = [
            "capo capo capo keeps tune",
            "strings strings sound great",
            "great tone",
            "great great value",
            "nothing special here",
            "ok",
        ];
        let w = important_words(&docs, 20);
        let names: Vec<_> = w.iter().map(|w| w.word.as_str()).collect();
        // great: frequency 4 but in 3 of 6 documents, idf ln(2) < 1.5: dropped.
        // tune, tone: seen once: dropped. here/nothing: once. capo (3) before strings (2).
        assert_eq!(names, vec!["capo", "strings"]);
        assert!((w[0].idf - 6f32.ln()).abs() < 1e-6);
        assert_eq!(w[0].frequency, 3);
    }

    #[test]
    fn context_words_match_the_immediate_context() {
        let docs = [
            "my capo slips",
            "the capo buzzes",
            "strap is wide",
            "tuner reads fast",
            "amp hums",
            "picks grip",
            "cable is thick",
            "stand folds",
            "bag is padded",
            "pedal is loud",
        ];
        let entries = ["my capo slips and the capo buzzes", "strap is wide"];
        // No embedding matches: only identical words count ("capo" twice; "strap" is not in the query).
        let w = context_words("a new capo", &entries, &docs, 20, |d, _| {
            Ok(vec![false; d.len()])
        })
        .unwrap();
        assert_eq!(
            w.iter()
                .map(|w| (w.word.as_str(), w.frequency))
                .collect::<Vec<_>>(),
            vec![("capo", 2)]
        );
        // An embedding match adds "strap".
        let w = context_words("a new capo", &entries, &docs, 20, |d, _| {
            Ok(d.iter().map(|x| x == "strap").collect())
        })
        .unwrap();
        assert_eq!(
            w.iter().map(|w| w.word.as_str()).collect::<Vec<_>>(),
            vec!["capo", "strap"]
        );
    }

    #[test]
    fn caps_the_number_of_words() {
        let docs: Vec<String> = (0..30).map(|i| format!("word{i}x word{i}x")).collect();
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        assert_eq!(important_words(&refs, 20).len(), 20);
        assert!(important_words(&[], 20).is_empty());
    }
}
