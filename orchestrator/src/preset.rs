//! Named presets: the paper's configurations as sets of stage switches.

use ghostwriter_proto::v1::RankingStrategy;

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
    /// Run `SumCtxInd`.
    pub summary: bool,
    /// Run `SynCtxInd`.
    pub synthesis: bool,
}

const fn preset(
    name: &'static str,
    description: &'static str,
    ranking: Option<RankingStrategy>,
    summary: bool,
    synthesis: bool,
) -> Preset {
    Preset {
        name,
        description,
        ranking,
        ranked_entries: ranking.is_some(),
        summary,
        synthesis,
    }
}

use RankingStrategy::{Bm25, Dense, Recent};

/// Every preset, in the order of the paper's table.
pub const PRESETS: &[Preset] = &[
    preset(
        "immediate-context",
        "the immediate context only (no personal context)",
        None,
        false,
        false,
    ),
    preset(
        "recent-doc",
        "RecentDoc: the user's most recent documents",
        Some(Recent),
        false,
        false,
    ),
    preset(
        "rank-doc-bm25",
        "RankDocBM25: documents ranked by BM25",
        Some(Bm25),
        false,
        false,
    ),
    preset(
        "rank-doc-dense",
        "RankDocDense: documents ranked by MiniLM similarity",
        Some(Dense),
        false,
        false,
    ),
    preset(
        "sum-ctx-ind",
        "RankDocBM25 + SumCtxInd summary",
        Some(Bm25),
        true,
        false,
    ),
    preset(
        "syn-ctx-ind",
        "RankDocBM25 + SynCtxInd important words",
        Some(Bm25),
        false,
        true,
    ),
    preset(
        "full",
        "RankDocBM25 + SumCtxInd + SynCtxInd",
        Some(Bm25),
        true,
        true,
    ),
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
    }
}
