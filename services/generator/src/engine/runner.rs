//! Runs a [`StepPlan`] on the backend: one batched forward pass over the planned sequences.

use super::group::SequenceGroup;
use super::scheduler::StepPlan;
use super::sequence::BlockCopy;
use crate::backend::{Backend, SeqStep};

/// The forward pass of `plan` over the running `groups`: the last-token logits of the planned
/// sequences that want them, in plan order.
pub(super) fn execute(
    backend: &mut dyn Backend,
    plan: &StepPlan,
    groups: &[SequenceGroup],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let steps: Vec<SeqStep<'_>> = plan
        .seqs
        .iter()
        .map(|s| {
            let seq = &groups[s.group].state.seqs[s.seq];
            SeqStep {
                tokens: &seq.tokens[s.start..s.start + s.len],
                start: s.start,
                blocks: seq.blocks.ids(),
                logits: s.logits,
                adapter: seq.adapter,
            }
        })
        .collect();
    backend.forward(&steps)
}

/// Makes the block copies that forks need.
pub(super) fn copy_blocks(backend: &mut dyn Backend, copies: &[BlockCopy]) -> anyhow::Result<()> {
    if copies.is_empty() {
        return Ok(());
    }
    let pairs: Vec<(u32, u32)> = copies.iter().map(|c| (c.src, c.dst)).collect();
    backend.copy_blocks(&pairs)
}
