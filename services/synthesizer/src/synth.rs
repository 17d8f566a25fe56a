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

/// Document frequencies over a background corpus (the whole index), the source of the IDF.
///
/// The paper computes IDF over a corpus; over a user's own few documents (N ≤ 4 gives
/// ln(N/df) ≤ 1.39) the `IDF < 1.5` rule removes every word, and for larger N it removes the
/// user's recurring vocabulary — the very words that make a voice.
#[derive(Debug, Clone, Copy)]
pub struct Background<'a> {
    /// Documents in the corpus.
    pub documents: u64,
    /// Documents containing each word.
    pub document_frequency: &'a HashMap<String, u64>,
}

/// `ln(N / df)` over the background when given, else over `documents`' own frequencies.
fn idf_source<'a>(
    documents: &[&str],
    background: Option<Background<'a>>,
) -> impl Fn(&str) -> f32 + 'a {
    let own = match background {
        Some(_) => None,
        None => Some((documents.len().max(1), document_frequencies(documents))),
    };
    move |w: &str| match (&own, background) {
        (_, Some(b)) => {
            let df = b.document_frequency.get(w).copied().unwrap_or(1).max(1);
            (b.documents.max(df) as f32 / df as f32).ln()
        }
        (Some((n, df)), None) => (*n as f32 / df.get(w).copied().unwrap_or(1).max(1) as f32).ln(),
        (None, None) => 0.0,
    }
}

/// Important words of `documents` (the user's past documents); IDF over `background`, or over
/// the documents themselves without one.
pub fn important_words(
    documents: &[&str],
    max_words: usize,
    background: Option<Background<'_>>,
) -> Vec<Word> {
    let n = documents.len();
    if n == 0 {
        return Vec::new();
    }
    let idf = idf_source(documents, background);
    let mut frequency: HashMap<String, u32> = HashMap::new();
    for d in documents {
        for w in text::words(d) {
            if !text::is_stopword(&w) {
                *frequency.entry(w).or_default() += 1;
            }
        }
    }
    let words: Vec<Word> = frequency
        .into_iter()
        .filter(|(_, f)| *f > 1)
        .map(|(word, f)| {
            let idf = idf(&word);
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
    background: Option<Background<'_>>,
    similar: impl FnOnce(&[String], &[String]) -> anyhow::Result<Vec<bool>>,
) -> anyhow::Result<Vec<Word>> {
    let idf = idf_source(documents, background);
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
        let w = important_words(&docs, 20, None);
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
        let w = context_words("a new capo", &entries, &docs, 20, None, |d, _| {
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
        let w = context_words("a new capo", &entries, &docs, 20, None, |d, _| {
            Ok(d.iter().map(|x| x == "strap").collect())
        })
        .unwrap();
        assert_eq!(
            w.iter().map(|w| w.word.as_str()).collect::<Vec<_>>(),
            vec!["capo", "strap"]
        );
    }

    #[test]
    fn a_background_corpus_keeps_a_small_history_s_words() {
        let docs = [
            "capo capo strings guitar",
            "capo guitar guitar",
            "strings guitar",
        ];
        // Over the user's own 3 documents no word reaches IDF 1.5 (ln 3 = 1.10).
        assert!(important_words(&docs, 20, None).is_empty());
        let df: HashMap<String, u64> = [("capo", 20), ("strings", 40), ("guitar", 900)]
            .into_iter()
            .map(|(w, n)| (w.to_string(), n))
            .collect();
        let background = Background {
            documents: 1000,
            document_frequency: &df,
        };
        let w = important_words(&docs, 20, Some(background));
        // guitar: ln(1000/900) < 1.5, dropped; capo (3) before strings (2).
        assert_eq!(
            w.iter().map(|w| w.word.as_str()).collect::<Vec<_>>(),
            vec!["capo", "strings"]
        );
        assert!((w[0].idf - 50f32.ln()).abs() < 1e-6);
        let w = context_words(
            "my capo and guitar",
            &docs,
            &docs,
            20,
            Some(background),
            |d, _| Ok(vec![false; d.len()]),
        )
        .unwrap();
        assert_eq!(
            w.iter().map(|w| w.word.as_str()).collect::<Vec<_>>(),
            vec!["capo"]
        );
    }

    #[test]
    fn caps_the_number_of_words() {
        let docs: Vec<String> = (0..30).map(|i| format!("word{i}x word{i}x")).collect();
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        assert_eq!(important_words(&refs, 20, None).len(), 20);
        assert!(important_words(&[], 20, None).is_empty());
    }
}
