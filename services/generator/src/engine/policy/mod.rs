//! The group policies: how a job's sequences turn logits into tokens.

mod beam;
mod contrast;
mod sample;
mod score;

use super::api::Params;
use super::group::GroupPolicy;

/// The policy a job's settings ask for.
pub(super) fn for_params(params: &Params) -> Box<dyn GroupPolicy> {
    if !params.score.is_empty() || !params.score_continuation.is_empty() {
        Box::new(score::Score::default())
    } else if params.num_beams > 1 {
        Box::new(beam::BeamSearch::new(params))
    } else if let Some(c) = &params.contrast {
        Box::new(contrast::ContextContrast::new(c))
    } else {
        Box::new(sample::Sample)
    }
}
