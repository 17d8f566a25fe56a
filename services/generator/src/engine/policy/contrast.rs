//! Context-aware decoding (Shi et al., 2023) as a group policy: the job's prompt and the
//! prompt to contrast with decode in lockstep, both extended by the same chosen token.

use crate::engine::api::{Contrast, Finish};
use crate::engine::group::{Decision, Emitted, GroupPolicy, GroupState, StepContext, mask};
use crate::engine::output::Ending;
use crate::sampler::{argmax, log_softmax};

/// Sequence 0 holds the job's prompt, sequence 1 the one to contrast with.
pub(super) struct ContextContrast {
    alpha: f32,
    ln_plausibility: f32,
}

impl ContextContrast {
    pub fn new(c: &Contrast) -> Self {
        Self {
            alpha: c.alpha,
            ln_plausibility: c.plausibility.ln(),
        }
    }
}

impl GroupPolicy for ContextContrast {
    fn width(&self) -> usize {
        2
    }

    fn step(&mut self, group: &mut GroupState, cx: &mut StepContext<'_>) -> Decision {
        let stop_ids = &cx.prompter.stop_ids;
        let mut rows = [Vec::new(), Vec::new()];
        for (s, row) in group.seqs.iter_mut().zip(&mut rows) {
            *row = s.logits.take().unwrap_or_default();
            s.sampler.penalize(row, &s.tokens[s.prompt_len..]);
            if group.params.ignore_eos {
                mask(row, stop_ids);
            }
        }
        let with = log_softmax(&rows[0]);
        let against = log_softmax(&rows[1]);
        let best = with.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let scored: Vec<f32> = with
            .iter()
            .zip(&against)
            .map(|(&w, &a)| {
                if w >= best + self.ln_plausibility {
                    w + self.alpha * (w - a)
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let next = argmax(&scored);
        let main = &mut group.seqs[0];
        main.log_prob += with[next as usize];
        let log_prob = main.log_prob;
        let ending = |finish| Ending {
            finish,
            answer: None,
            log_prob,
            scores: Vec::new(),
        };
        if stop_ids.contains(&next) {
            return Decision::end(ending(Finish::Eos));
        }
        for s in &mut group.seqs {
            s.tokens.push(next);
        }
        cx.stats.sampled_tokens += 1;
        let over = group.seqs.iter().any(|s| group.at_limit(s, cx.context));
        Decision {
            emit: Some(Emitted {
                token: next,
                log_prob,
            }),
            end: over.then(|| Ok(ending(Finish::Length))),
        }
    }
}
