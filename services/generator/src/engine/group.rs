//! Sequence groups: a job's sequences, which step together under one [`GroupPolicy`]
//! (mistral.rs's `SequenceGroup`). Plain decoding is a group of one; a beam search a group of
//! up to `num_beams` beams that fork and end; context-aware decoding a group of two prompts
//! decoded in lockstep. A policy is asked to choose only once every live sequence of its group
//! holds its next-token logits.

use std::time::Instant;

use super::api::{EngineError, Params, StepStats};
use super::output::{Caller, Ending, RequestId};
use super::sequence::{BlockCopy, Sequence};
use crate::cache::KvCache;
use crate::model::Prompter;

/// What a policy sees besides its group.
pub(super) struct StepContext<'a> {
    pub prompter: &'a Prompter,
    /// Context window in tokens.
    pub context: usize,
    pub cache: &'a KvCache,
    /// Block copies that forks need, made before the next forward pass.
    pub copies: &'a mut Vec<BlockCopy>,
    pub stats: &'a mut StepStats,
}

/// A token of the answer, streamed as it comes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Emitted {
    pub token: u32,
    /// Sum of the answer's log-probabilities with it.
    pub log_prob: f32,
}

/// What a policy decided in a step.
#[derive(Default)]
pub(super) struct Decision {
    /// A token appended to the answer.
    pub emit: Option<Emitted>,
    /// The job is over (`Ok`), or cannot go on (`Err`).
    pub end: Option<Result<Ending, EngineError>>,
}

impl Decision {
    /// The job ends as `ending`.
    pub fn end(ending: Ending) -> Self {
        Self {
            emit: None,
            end: Some(Ok(ending)),
        }
    }
}

/// How a group turns its sequences' logits into tokens.
pub(super) trait GroupPolicy {
    /// Sequences the group may run at once (room is kept for those not yet forked).
    fn width(&self) -> usize;

    /// Whether a step may fork sequences (and so take cache blocks).
    fn forks(&self) -> bool {
        false
    }

    /// Chooses what follows, now that every sequence of `group` holds its logits (taking
    /// them): appends tokens, forks or drops sequences, or ends the job.
    fn step(&mut self, group: &mut GroupState, cx: &mut StepContext<'_>) -> Decision;
}

/// A group's sequences and settings, which its policy works on.
pub(super) struct GroupState {
    /// Live sequences, in the order they were admitted or forked.
    pub seqs: Vec<Sequence>,
    pub params: Params,
}

impl GroupState {
    /// Whether `seq` reached the token limit or the context window.
    pub fn at_limit(&self, seq: &Sequence, context: usize) -> bool {
        seq.generated().len() >= self.params.max_new_tokens || seq.tokens.len() >= context
    }
}

/// A job's sequences on the engine thread; dropping it frees every block they hold.
pub(super) struct SequenceGroup {
    pub id: RequestId,
    pub state: GroupState,
    pub policy: Box<dyn GroupPolicy>,
    pub caller: Caller,
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
    pub first_token: Option<Instant>,
    /// Blocks one of its sequences needs at most (room kept for beams yet to fork).
    pub seq_blocks: usize,
    /// Its adapter's lease: the adapter stays installed while the group lives.
    pub _adapter: super::adapters::AdapterUse,
}

impl SequenceGroup {
    /// Whether every live sequence holds its logits.
    pub fn ready(&self) -> bool {
        !self.state.seqs.is_empty() && self.state.seqs.iter().all(|s| s.logits.is_some())
    }

    /// Sequences and blocks the group may still claim by forking.
    pub fn reserved(&self) -> (usize, usize) {
        let missing = self.policy.width().saturating_sub(self.state.seqs.len());
        (missing, missing * self.seq_blocks)
    }

    /// Tokens generated so far (the first sequence's).
    pub fn generated(&self) -> usize {
        self.state.seqs.first().map_or(0, |s| s.generated().len())
    }
}

/// Makes the end-of-turn tokens impossible.
pub(super) fn mask(logits: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}
