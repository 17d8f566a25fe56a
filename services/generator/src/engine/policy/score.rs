//! Scoring instead of generating: the log-probabilities of given first-answer tokens
//! ([`Params::score`]), or of a given continuation fed token by token
//! ([`Params::score_continuation`]), from the model's logits (no penalty, no mask).
//!
//! [`Params::score`]: crate::engine::Params::score
//! [`Params::score_continuation`]: crate::engine::Params::score_continuation

use crate::engine::api::Finish;
use crate::engine::group::{Decision, GroupPolicy, GroupState, StepContext};
use crate::engine::output::Ending;
use crate::sampler::log_sum_exp;

/// One sequence whose tokens are given; collects their log-probabilities.
#[derive(Default)]
pub(super) struct Score {
    scores: Vec<f32>,
}

impl GroupPolicy for Score {
    fn width(&self) -> usize {
        1
    }

    fn step(&mut self, group: &mut GroupState, _cx: &mut StepContext<'_>) -> Decision {
        let params = &group.params;
        let s = &mut group.seqs[0];
        let logits = s.logits.take().unwrap_or_default();
        let lse = log_sum_exp(&logits);
        let log_prob = |id: u32| {
            logits
                .get(id as usize)
                .map_or(f32::NEG_INFINITY, |&l| l - lse)
        };
        let done = |scores| {
            Decision::end(Ending {
                finish: Finish::Length,
                answer: None,
                log_prob: 0.0,
                scores,
            })
        };
        if !params.score.is_empty() {
            return done(params.score.iter().map(|&id| log_prob(id)).collect());
        }
        // Teacher forcing: score the next given token, then feed it.
        let given = &params.score_continuation;
        let k = s.tokens.len() - s.prompt_len;
        self.scores.push(log_prob(given[k]));
        if k + 1 == given.len() {
            return done(std::mem::take(&mut self.scores));
        }
        s.tokens.push(given[k]);
        Decision::default()
    }
}
