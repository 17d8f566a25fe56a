//! `SynCtxInd`, exactly as the paper defines it: frequent unigrams of the user's past documents,
//! minus stopwords, words seen once, and words whose IDF over the user's documents is below 1.5;
//! sorted by frequency, then IDF; at most 20.

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
    let mut words: Vec<Word> = frequency
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
    words.sort_by(|a, b| {
        b.frequency
            .cmp(&a.frequency)
            .then(b.idf.total_cmp(&a.idf))
            .then(a.word.cmp(&b.word))
    });
    words.truncate(max_words);
    words
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
    fn caps_the_number_of_words() {
        let docs: Vec<String> = (0..30).map(|i| format!("word{i}x word{i}x")).collect();
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        assert_eq!(important_words(&refs, 20).len(), 20);
        assert!(important_words(&[], 20).is_empty());
    }
}
