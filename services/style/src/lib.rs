//! Authorship verification by writing style, with no LLM in the loop: did the author of a
//! profile (their earlier documents) write this text?
//!
//! A text is compared with the profile through [`features::features`]: character 2-, 3- and
//! 4-gram TF-IDF cosines, function-word frequencies, punctuation, casing, digit and emoji
//! habits, word and sentence lengths, and — as a separate feature, so the model learns how much
//! topic to trust — the content similarity the caller measured (MiniLM cosine between the text
//! and the profile's documents). A logistic regression ([`model::Model`]) turns them into
//! P(same author), calibrated at a 1:1 prior: it is trained on as many same-author pairs as
//! other-author pairs, from training-split users only, with impostors matched by retrieval as
//! well as random ones. The shipped model is built into the crate ([`Verifier::shipped`]);
//! `ghostwriter train-style` retrains it.

pub mod features;
pub mod model;

use features::{Profile, TextStats, feature_names};
pub use model::Model;

/// The shipped model (`ghostwriter train-style` writes it).
pub const SHIPPED_MODEL: &str = include_str!("../model/verifier.json");

/// Shortest text judged, in words.
pub const MIN_TEXT_WORDS: usize = 8;
/// Shortest profile judged, in words (all its documents together).
pub const MIN_PROFILE_WORDS: usize = 30;
/// The prior the probability is calibrated at: P(same author) before looking, 1:1.
pub const PRIOR_SAME_AUTHOR: f64 = 0.5;

/// Errors of the verifier.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file is unusable.
    #[error("style model: {0}")]
    Model(String),
}

/// One feature's part in a judgement.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// The feature's name.
    pub feature: String,
    /// Its value for this text and profile.
    pub value: f64,
    /// What it added to the log-odds of "same author" (relative to an average pair).
    pub contribution: f64,
}

/// Why the verifier declined to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abstention {
    /// The text has fewer than [`MIN_TEXT_WORDS`] words.
    TextTooShort,
    /// The profile has no document, or fewer than [`MIN_PROFILE_WORDS`] words in all.
    ProfileTooShort,
}

impl Abstention {
    /// A sentence a caller can show.
    pub fn reason(&self) -> String {
        match self {
            Self::TextTooShort => {
                format!("the text has fewer than {MIN_TEXT_WORDS} words: too short to judge")
            }
            Self::ProfileTooShort => format!(
                "the author's earlier documents have fewer than {MIN_PROFILE_WORDS} words in all: \
                 too little to judge"
            ),
        }
    }
}

/// A judgement.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    /// P(same author) at the 1:1 prior, with every feature's contribution (largest first).
    Judged {
        /// P(same author).
        probability: f64,
        /// Contributions, by absolute size.
        contributions: Vec<Contribution>,
    },
    /// Not judged.
    Abstained(Abstention),
}

impl Judgement {
    /// The probability, if judged.
    pub fn probability(&self) -> Option<f64> {
        match self {
            Self::Judged { probability, .. } => Some(*probability),
            Self::Abstained(_) => None,
        }
    }
}

/// Cosine of a unit text embedding to the mean of the profile documents' unit embeddings (0
/// without any): the content similarity the verifier takes as a feature.
pub fn content_similarity<'a>(text: &[f32], profile: impl Iterator<Item = &'a [f32]>) -> f32 {
    let mut mean = vec![0.0f32; text.len()];
    for e in profile {
        for (m, x) in mean.iter_mut().zip(e) {
            *m += x;
        }
    }
    let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        return 0.0;
    }
    mean.iter().zip(text).map(|(m, x)| m * x).sum::<f32>() / norm
}

/// The verifier: a trained model.
#[derive(Debug, Clone)]
pub struct Verifier {
    model: Model,
}

impl Verifier {
    /// The shipped model.
    pub fn shipped() -> Result<Self, Error> {
        Self::from_json(SHIPPED_MODEL)
    }

    /// A model from its file's text.
    pub fn from_json(json: &str) -> Result<Self, Error> {
        Ok(Self {
            model: Model::from_json(json)?,
        })
    }

    /// Wraps a model.
    pub fn new(model: Model) -> Self {
        Self { model }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The feature vector of a measured text against a profile.
    pub fn features(
        &self,
        text: &TextStats,
        profile: &Profile,
        content_similarity: f32,
    ) -> Vec<f64> {
        features::features(
            text,
            profile,
            content_similarity,
            self.model.idf(),
            &self.model.rate_scale,
        )
    }

    /// P(same author) from a feature vector (no abstention).
    pub fn probability(&self, features: &[f64]) -> f64 {
        model::sigmoid(self.model.logit(features).0)
    }

    /// Judges a measured text against a profile; `content_similarity` is the MiniLM cosine of
    /// the text to the profile's documents (their mean embedding).
    pub fn judge_stats(
        &self,
        text: &TextStats,
        profile: &Profile,
        content_similarity: f32,
    ) -> Judgement {
        if text.words < MIN_TEXT_WORDS {
            return Judgement::Abstained(Abstention::TextTooShort);
        }
        if profile.documents == 0 || profile.words < MIN_PROFILE_WORDS {
            return Judgement::Abstained(Abstention::ProfileTooShort);
        }
        let x = self.features(text, profile, content_similarity);
        let (logit, parts) = self.model.logit(&x);
        let mut contributions: Vec<Contribution> = feature_names()
            .into_iter()
            .zip(x)
            .zip(parts)
            .map(|((feature, value), contribution)| Contribution {
                feature,
                value,
                contribution,
            })
            .collect();
        contributions.sort_by(|a, b| b.contribution.abs().total_cmp(&a.contribution.abs()));
        Judgement::Judged {
            probability: model::sigmoid(logit),
            contributions,
        }
    }

    /// Judges `text` against the author's `profile` documents.
    pub fn judge(&self, text: &str, profile: &[&str], content_similarity: f32) -> Judgement {
        let stats: Vec<TextStats> = profile.iter().map(|d| TextStats::new(d)).collect();
        let refs: Vec<&TextStats> = stats.iter().collect();
        self.judge_stats(
            &TextStats::new(text),
            &Profile::new(&refs),
            content_similarity,
        )
    }
}
