//! Plain decoding: one sequence, each token greedy or sampled with the job's own seed.

use crate::engine::api::Finish;
use crate::engine::group::{Decision, Emitted, GroupPolicy, GroupState, StepContext, mask};
use crate::engine::output::Ending;
use crate::sampler::log_sum_exp;

/// One sequence, sampled token by token.
pub(super) struct Sample;

impl GroupPolicy for Sample {
    fn width(&self) -> usize {
        1
    }

    fn step(&mut self, group: &mut GroupState, cx: &mut StepContext<'_>) -> Decision {
        let ignore_eos = group.params.ignore_eos;
        let s = &mut group.seqs[0];
        let mut logits = s.logits.take().unwrap_or_default();
        if ignore_eos {
            mask(&mut logits, &cx.prompter.stop_ids);
        }
        let next = s.sampler.sample(&mut logits, &s.tokens[s.prompt_len..]);
        s.log_prob += logits[next as usize] - log_sum_exp(&logits);
        let log_prob = s.log_prob;
        if cx.prompter.stop_ids.contains(&next) {
            return Decision::end(Ending {
                finish: Finish::Eos,
                answer: None,
                log_prob,
                scores: Vec::new(),
            });
        }
        s.tokens.push(next);
        cx.stats.sampled_tokens += 1;
        let emit = Some(Emitted {
            token: next,
            log_prob,
        });
        let end = group.at_limit(&group.seqs[0], cx.context).then(|| {
            Ok(Ending {
                finish: Finish::Length,
                answer: None,
                log_prob,
                scores: Vec::new(),
            })
        });
        Decision { emit, end }
    }
}
