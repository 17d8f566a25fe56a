//! Ranking strategies of the paper over a user's retrieved documents, and the joining of the
//! ranked entries under the character budget.

/// The paper's budget for the joined ranked entries, in characters.
pub const DEFAULT_BUDGET_CHARS: usize = 2_500;

/// A candidate past document.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Document id.
    pub doc_id: String,
    /// Unix seconds.
    pub timestamp: i64,
    /// Title and body joined.
    pub text: String,
    /// BM25 score from the retriever.
    pub bm25: f32,
    /// Snippets of the text (split at ingest).
    pub snippets: Vec<String>,
}

impl Candidate {
    /// One candidate per snippet, carrying its source document's id and time.
    pub fn snippet_units(candidates: &[Candidate]) -> Vec<Candidate> {
        candidates
            .iter()
            .flat_map(|c| {
                c.snippets.iter().map(|s| Candidate {
                    doc_id: c.doc_id.clone(),
                    timestamp: c.timestamp,
                    text: s.clone(),
                    bm25: 0.0,
                    snippets: Vec::new(),
                })
            })
            .collect()
    }
}

/// RankDocBySnpt scores: each document's best snippet score. `snippet_scores` are in the
/// order of [`Candidate::snippet_units`].
pub fn best_snippet_scores(candidates: &[Candidate], snippet_scores: &[f32]) -> Vec<f32> {
    let mut at = 0;
    candidates
        .iter()
        .map(|c| {
            let n = c.snippets.len();
            let best = snippet_scores[at..at + n]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            at += n;
            if n == 0 { f32::NEG_INFINITY } else { best }
        })
        .collect()
}

/// A ranked entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Source document.
    pub doc_id: String,
    /// Text, possibly cut at the budget.
    pub text: String,
    /// Strategy score.
    pub score: f32,
    /// Source timestamp.
    pub timestamp: i64,
}

/// Orders candidates by `scores` (descending; ties: most recent, then doc_id) and joins them
/// until `budget` characters: the entry that crosses the budget is cut (at a word boundary when
/// one is near), and ranking stops there.
pub fn order_and_cut(candidates: &[Candidate], scores: &[f32], budget: usize) -> Vec<Entry> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        scores[b]
            .total_cmp(&scores[a])
            .then(candidates[b].timestamp.cmp(&candidates[a].timestamp))
            .then(candidates[b].doc_id.cmp(&candidates[a].doc_id))
    });
    let mut left = budget;
    let mut entries = Vec::new();
    for i in order {
        if left == 0 {
            break;
        }
        let c = &candidates[i];
        let text = c.text.trim();
        if text.is_empty() {
            continue;
        }
        let n = text.chars().count();
        if n <= left {
            left -= n;
            entries.push(Entry {
                doc_id: c.doc_id.clone(),
                text: text.to_string(),
                score: scores[i],
                timestamp: c.timestamp,
            });
            continue;
        }
        let text = cut(text, left);
        if !text.is_empty() {
            entries.push(Entry {
                doc_id: c.doc_id.clone(),
                text,
                score: scores[i],
                timestamp: c.timestamp,
            });
        }
        break;
    }
    entries
}

/// The first `max_chars` characters of `text`, shortened to the last word boundary when that
/// keeps at least half of it.
fn cut(text: &str, max_chars: usize) -> String {
    let end = text
        .char_indices()
        .nth(max_chars)
        .map_or(text.len(), |(i, _)| i);
    let head = &text[..end];
    match head.rfind(char::is_whitespace) {
        Some(space) if space >= end / 2 => head[..space].trim_end().to_string(),
        _ => head.to_string(),
    }
}

/// RankDocBM25 scores: the retriever's BM25.
pub fn bm25_scores(candidates: &[Candidate]) -> Vec<f32> {
    candidates.iter().map(|c| c.bm25).collect()
}

/// RecentDoc scores: newer is higher.
pub fn recent_scores(candidates: &[Candidate]) -> Vec<f32> {
    candidates.iter().map(|c| c.timestamp as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, ts: i64, text: &str, bm25: f32) -> Candidate {
        Candidate {
            doc_id: id.into(),
            timestamp: ts,
            text: text.into(),
            bm25,
            snippets: vec![text.into()],
        }
    }

    #[test]
    fn orders_by_score_then_recency_and_respects_budget() {
        let cands = vec![
            c("a", 1, "alpha beta", 0.5),
            c("b", 2, "gamma", 0.0),
            c("c", 3, "delta", 0.0),
        ];
        let e = order_and_cut(&cands, &bm25_scores(&cands), 100);
        let ids: Vec<_> = e.iter().map(|e| e.doc_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "c", "b"]);
        let e = order_and_cut(&cands, &recent_scores(&cands), 100);
        assert_eq!(e[0].doc_id, "c");
    }

    #[test]
    fn documents_take_their_best_snippet() {
        let mut cands = vec![c("a", 1, "x", 0.0), c("b", 2, "y", 0.0)];
        cands[0].snippets = vec!["a1".into(), "a2".into()];
        let units = Candidate::snippet_units(&cands);
        assert_eq!(units.len(), 3);
        assert_eq!(units[1].doc_id, "a");
        assert_eq!(
            best_snippet_scores(&cands, &[0.1, 0.9, 0.5]),
            vec![0.9, 0.5]
        );
    }

    #[test]
    fn cuts_the_entry_that_crosses_the_budget() {
        let long = "word ".repeat(100);
        let cands = vec![
            c("a", 1, "x".repeat(20).as_str(), 2.0),
            c("b", 1, &long, 1.0),
            c("c", 1, "tail", 0.5),
        ];
        let e = order_and_cut(&cands, &bm25_scores(&cands), 50);
        let total: usize = e.iter().map(|e| e.text.chars().count()).sum();
        assert!(total <= 50, "{total}");
        assert_eq!(e.len(), 2, "ranking stops at the cut entry");
        assert!(e[1].text.ends_with("word"), "{:?}", e[1].text);
    }
}
