//! Beam search as a group policy: the group's beams step together; when every beam holds its
//! logits, [`Search`] picks the next beams. A beam continued by two candidates forks: the fork
//! shares the parent's full cache blocks and gets a copy of its last, partly filled one (copy
//! on write), so it decodes on at once, recomputing nothing. The answer, the best hypothesis,
//! is sent when the search ends.

use crate::beam::{Beam, Search, top_log_probs};
use crate::engine::api::{EngineError, Finish, Params};
use crate::engine::group::{Decision, GroupPolicy, GroupState, StepContext, mask};
use crate::engine::output::{Detokenizer, Ending};
use crate::engine::sequence::Sequence;

/// A beam search over the group's sequences.
pub(super) struct BeamSearch {
    search: Search,
}

impl BeamSearch {
    pub fn new(params: &Params) -> Self {
        Self {
            search: Search::new(params.num_beams, params.length_penalty),
        }
    }
}

/// A chosen continuation of one beam.
#[derive(Clone, Copy)]
struct Continuation {
    token: u32,
    log_prob: f32,
}

/// Appends `token` to beam `s`; returns why the beam ends, if it does.
fn push(
    s: &mut Sequence,
    token: u32,
    group: &GroupState,
    cx: &mut StepContext<'_>,
) -> Option<Finish> {
    s.tokens.push(token);
    cx.stats.sampled_tokens += 1;
    // A beam's text matters only to find its stop strings.
    if let Some(text) = &mut s.text {
        text.push(token, cx.prompter);
        if text.cut_at_stop(&group.params.stop) {
            return Some(Finish::Stop);
        }
    }
    group.at_limit(s, cx.context).then_some(Finish::Length)
}

impl GroupPolicy for BeamSearch {
    fn width(&self) -> usize {
        self.search.width()
    }

    fn forks(&self) -> bool {
        true
    }

    fn step(&mut self, group: &mut GroupState, cx: &mut StepContext<'_>) -> Decision {
        if !group.params.stop.is_empty() {
            for s in &mut group.seqs {
                s.text.get_or_insert_with(Detokenizer::default);
            }
        }
        let stop_ids = &cx.prompter.stop_ids;
        let mut rows = Vec::with_capacity(group.seqs.len());
        for s in &mut group.seqs {
            let mut row = s.logits.take().unwrap_or_default();
            s.sampler.penalize(&mut row, &s.tokens[s.prompt_len..]);
            if group.params.ignore_eos {
                mask(&mut row, stop_ids);
            }
            rows.push(row);
        }
        let beams: Vec<Beam<'_>> = group
            .seqs
            .iter()
            .zip(&rows)
            .map(|(s, row)| Beam {
                log_prob: s.log_prob,
                generated: s.generated(),
                next: top_log_probs(row, self.search.proposals()),
            })
            .collect();
        let chosen = self.search.select(&beams, |t| stop_ids.contains(&t));
        drop(beams);
        // Each beam's continuations: the first extends the beam, the others fork it.
        let mut children: Vec<Vec<Continuation>> = vec![Vec::new(); group.seqs.len()];
        for c in chosen {
            children[c.beam].push(Continuation {
                token: c.token,
                log_prob: c.log_prob,
            });
        }
        let mut forks = Vec::new();
        for (parent, kids) in group.seqs.iter().zip(&children) {
            for kid in kids.iter().skip(1) {
                let Some((mut child, copy)) = parent.fork(cx.cache) else {
                    tracing::warn!("no cache blocks for a beam; the search goes on with fewer");
                    continue;
                };
                cx.copies.extend(copy);
                child.log_prob = kid.log_prob;
                forks.push((child, kid.token));
            }
        }
        cx.stats.beam_forks += forks.len();
        let mut ended: Vec<(usize, Option<Finish>)> = Vec::new();
        let mut seqs = std::mem::take(&mut group.seqs);
        for (i, (s, kids)) in seqs.iter_mut().zip(&children).enumerate() {
            match kids.first() {
                Some(kid) => {
                    s.log_prob = kid.log_prob;
                    if let Some(f) = push(s, kid.token, group, cx) {
                        ended.push((i, Some(f)));
                    }
                }
                None => ended.push((i, None)),
            }
        }
        for (mut child, token) in forks {
            match push(&mut child, token, group, cx) {
                // The fork ends at once; dropping it frees its blocks.
                Some(f) => self
                    .search
                    .finish(child.generated().to_vec(), child.log_prob, f),
                None => seqs.push(child),
            }
        }
        for &(i, finish) in ended.iter().rev() {
            let s = seqs.remove(i);
            if let Some(f) = finish {
                self.search.finish(s.generated().to_vec(), s.log_prob, f);
            }
        }
        group.seqs = seqs;
        let best_live = group
            .seqs
            .iter()
            .map(|s| (s.log_prob, s.generated().len()))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if !self.search.done(best_live) {
            return Decision::default();
        }
        // The search is over: its live beams go, and the best hypothesis is the answer.
        group.seqs.clear();
        let search = std::mem::replace(&mut self.search, Search::new(1, 1.0));
        let end = match search.best() {
            Some(best) => Ok(Ending {
                finish: best.finish,
                answer: Some(best.tokens),
                log_prob: best.log_prob,
                scores: Vec::new(),
            }),
            None => Err(EngineError::Inference(
                "the beam search ended without a hypothesis".into(),
            )),
        };
        Decision {
            emit: None,
            end: Some(end),
        }
    }
}
