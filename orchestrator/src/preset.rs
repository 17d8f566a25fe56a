//! Named presets: the paper's configurations as sets of stage switches.
//!
//! Rows build on one another as in the paper's tables: the ranking rows compare strategies;
//! the summary and synthesis rows add to the best document-level ranking the paper found on
//! Amazon reviews, `RankDocBySnpt`; `syn-ctx` (= `full`) is the paper's best configuration that
//! needs no fine-tuning, and the ablations remove one part of it.

use ghostwriter_proto::v1::{RankingStrategy, SummaryMode, SynthesisMode};

/// What a preset runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// Its name.
    pub name: &'static str,
    /// What it corresponds to in the paper.
    pub description: &'static str,
    /// Ranking strategy, or `None` for no personal context at all.
    pub ranking: Option<RankingStrategy>,
    /// Put the ranked entries in the prompt.
    pub ranked_entries: bool,
    /// Summary of the ranked entries.
    pub summary: Option<SummaryMode>,
    /// Important words.
    pub synthesis: Option<SynthesisMode>,
    /// Put the labelled passage start in the prompt.
    pub passage_start: bool,
    /// Generate with the LLM; without it the text is the top-ranked entry (`copy-best`).
    pub generate: bool,
}

use RankingStrategy::{Bm25, Dense, DocBySnippet, Recent, Snippet};

const NONE: Preset = Preset {
    name: "",
    description: "",
    ranking: None,
    ranked_entries: false,
    summary: None,
    synthesis: None,
    passage_start: true,
    generate: true,
};

const fn ranked(name: &'static str, description: &'static str, ranking: RankingStrategy) -> Preset {
    Preset {
        name,
        description,
        ranking: Some(ranking),
        ranked_entries: true,
        ..NONE
    }
}

const SUM_CTX: Preset = Preset {
    summary: Some(SummaryMode::Context),
    ..ranked("sum-ctx", "RankDocBySnpt + SumCtx", DocBySnippet)
};
const SYN_CTX: Preset = Preset {
    synthesis: Some(SynthesisMode::Context),
    ..SUM_CTX
};

/// Every preset, in the order of the paper's tables.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "immediate-context",
        description: "the immediate context only (no personal context)",
        ..NONE
    },
    ranked(
        "recent-doc",
        "RecentDoc: the user's most recent documents",
        Recent,
    ),
    ranked(
        "rank-doc-bm25",
        "RankDocBM25: documents ranked by BM25",
        Bm25,
    ),
    ranked(
        "rank-doc-dense",
        "RankDocDense: documents ranked by MiniLM similarity",
        Dense,
    ),
    ranked(
        "rank-snippet",
        "RankSnippet: snippets ranked by MiniLM similarity",
        Snippet,
    ),
    ranked(
        "rank-doc-by-snpt",
        "RankDocBySnpt: documents scored by their best snippet",
        DocBySnippet,
    ),
    Preset {
        summary: Some(SummaryMode::Independent),
        ..ranked(
            "sum-ctx-ind",
            "RankDocBySnpt + SumCtxInd (LLM summary)",
            DocBySnippet,
        )
    },
    SUM_CTX,
    Preset {
        name: "syn-ctx-ind",
        description: "RankDocBySnpt + SumCtx + SynCtxInd",
        synthesis: Some(SynthesisMode::Independent),
        ..SUM_CTX
    },
    Preset {
        name: "syn-ctx",
        description: "RankDocBySnpt + SumCtx + SynCtx (the paper's best without fine-tuning)",
        ..SYN_CTX
    },
    Preset {
        name: "full",
        description: "every stage: same as syn-ctx",
        ..SYN_CTX
    },
    Preset {
        name: "no-ranked-entries",
        description: "ablation: syn-ctx without the ranked entries in the prompt",
        ranked_entries: false,
        ..SYN_CTX
    },
    Preset {
        name: "doc-start-removed",
        description: "ablation: syn-ctx without the labelled passage start in the prompt",
        passage_start: false,
        ..SYN_CTX
    },
    Preset {
        name: "copy-best",
        description: "no LLM: the immediate context followed by the top-ranked past document",
        generate: false,
        ..ranked("copy-best", "", DocBySnippet)
    },
];

/// The preset used when a request names none.
pub const DEFAULT_PRESET: &str = "full";

/// Looks a preset up by name (empty = the default).
pub fn find(name: &str) -> Option<Preset> {
    let name = if name.is_empty() {
        DEFAULT_PRESET
    } else {
        name
    };
    PRESETS.iter().copied().find(|p| p.name == name)
}

/// Names of all presets, comma-separated (for messages and `--help`).
pub fn names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup() {
        assert_eq!(find("").unwrap().name, "full");
        assert!(find("rank-doc-dense").unwrap().ranking == Some(Dense));
        assert!(find("immediate-context").unwrap().ranking.is_none());
        assert!(find("nope").is_none());
        assert!(names().contains("sum-ctx-ind"));
        let names: std::collections::HashSet<_> = PRESETS.iter().map(|p| p.name).collect();
        assert_eq!(names.len(), PRESETS.len(), "preset names are unique");
        assert!(!find("copy-best").unwrap().generate);
        assert!(!find("no-ranked-entries").unwrap().ranked_entries);
        assert_eq!(
            find("syn-ctx").unwrap().synthesis,
            Some(SynthesisMode::Context)
        );
    }
}
