//! The processes of a deployment: the paper's five stages and the orchestrator, named once.

/// One kind of Ghostwriter process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StageKind {
    /// The tantivy index of users' documents.
    Retriever,
    /// Orders a user's retrieved documents.
    Ranker,
    /// Summaries of the ranked entries (through the generator's LLM, or extractive).
    Summarizer,
    /// Important words.
    Synthesizer,
    /// The LLM worker.
    Generator,
    /// The public API, fanning out to the stages.
    Orchestrator,
}

impl StageKind {
    /// Every process, in start order: each after the stages it calls (the summarizer calls the
    /// generator; the orchestrator calls them all).
    pub const ALL: [Self; 6] = [
        Self::Retriever,
        Self::Ranker,
        Self::Synthesizer,
        Self::Generator,
        Self::Summarizer,
        Self::Orchestrator,
    ];

    /// The stages (every process but the orchestrator), in start order.
    pub const STAGES: [Self; 5] = [
        Self::Retriever,
        Self::Ranker,
        Self::Synthesizer,
        Self::Generator,
        Self::Summarizer,
    ];

    /// The name in commands (`serve ranker`), URLs' flags (`--ranker-url`), metrics, logs and
    /// discovery keys.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Retriever => "retriever",
            Self::Ranker => "ranker",
            Self::Summarizer => "summarizer",
            Self::Synthesizer => "synthesizer",
            Self::Generator => "generator",
            Self::Orchestrator => "orchestrator",
        }
    }
}

impl std::fmt::Display for StageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_once_and_the_stages_are_all_but_the_orchestrator() {
        let mut all: Vec<&str> = StageKind::ALL.iter().map(|k| k.name()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 6);
        assert_eq!(
            StageKind::STAGES.to_vec(),
            StageKind::ALL[..5].to_vec(),
            "the stages start before the orchestrator"
        );
        let at = |k| StageKind::ALL.iter().position(|x| *x == k).unwrap();
        assert!(at(StageKind::Generator) < at(StageKind::Summarizer));
    }
}
