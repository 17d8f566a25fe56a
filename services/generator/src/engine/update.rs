//! After a forward pass: each sequence's new positions are recorded (and its full blocks
//! registered in the prefix cache), its logits handed to its group, and every group whose
//! sequences all hold logits asks its policy what follows; finished groups retire, which frees
//! their blocks (vLLM's `Scheduler.update_from_output`).

use std::time::Instant;

use super::api::StepStats;
use super::group::{SequenceGroup, StepContext};
use super::output::Update;
use super::scheduler::{Scheduler, StepPlan};
use super::sequence::BlockCopy;
use crate::model::Prompter;

impl Scheduler {
    /// Applies a forward pass's `logits` (one row per planned sequence that wanted them, in
    /// plan order): returns the block copies forks need before the next pass; what callers
    /// should hear goes to `out`.
    pub fn update(
        &mut self,
        plan: &StepPlan,
        logits: Vec<Vec<f32>>,
        prompter: &Prompter,
        out: &mut Vec<Update>,
        stats: &mut StepStats,
    ) -> anyhow::Result<Vec<BlockCopy>> {
        let mut logits = logits.into_iter();
        let mut touched = Vec::new();
        for s in &plan.seqs {
            let seq = &mut self.running[s.group].state.seqs[s.seq];
            seq.advance(s.len, &self.cache);
            if s.logits {
                let Some(row) = logits.next() else {
                    anyhow::bail!("the backend returned too few logits");
                };
                seq.logits = Some(row);
                touched.push(s.group);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        // Groups that cannot fork first, so that blocks freed by jobs ending this step are
        // there for the forks of the others.
        touched.sort_by_key(|&g| self.running[g].policy.forks());
        let mut copies = Vec::new();
        let mut finished = Vec::new();
        let now = Instant::now();
        for g in touched {
            let group = &mut self.running[g];
            if !group.ready() {
                continue; // its other sequences' logits are still to come
            }
            if group.first_token.is_none() {
                group.first_token = Some(now);
                stats.first_tokens.push(now.duration_since(group.enqueued));
                out.push(Update::FirstToken {
                    id: group.id,
                    at: now,
                });
            }
            let mut cx = StepContext {
                prompter,
                context: self.context,
                cache: &self.cache,
                copies: &mut copies,
                stats,
            };
            let SequenceGroup { state, policy, .. } = group;
            let decision = policy.step(state, &mut cx);
            if let Some(e) = decision.emit {
                out.push(Update::Token {
                    id: group.id,
                    token: e.token,
                    log_prob: e.log_prob,
                });
            }
            let Some(end) = decision.end else {
                continue;
            };
            out.push(match end {
                Ok(ending) => Update::Finished {
                    id: group.id,
                    ending,
                },
                Err(error) => Update::Failed {
                    id: group.id,
                    error,
                },
            });
            // Retiring drops the group's sequences, which frees their blocks at once (for the
            // forks of groups stepped after it).
            group.state.seqs.clear();
            finished.push(g);
        }
        finished.sort_unstable();
        for g in finished.into_iter().rev() {
            self.running.remove(g);
        }
        Ok(copies)
    }
}
