//! Beam search bookkeeping, free of the scheduler: which continuations survive a step, which
//! hypotheses are finished, and when a search is over.
//!
//! It follows the usual formulation (Hugging Face `generate`, `early_stopping=False`): each step
//! every live beam proposes its `2 × width` most likely next tokens; the candidates are ranked by
//! cumulative log-probability; an end-of-turn candidate among the first `width` ranks becomes a
//! finished hypothesis, and the best `width` other candidates become the next beams. Hypotheses
//! are compared by `log_prob / length^length_penalty`, `length` counting generated tokens. The
//! search ends when `width` hypotheses are finished and no live beam can still beat the worst
//! of them at its current length, or when no beam is left.

use crate::engine::Finish;

/// A finished hypothesis.
#[derive(Debug, Clone)]
pub struct Hypothesis {
    /// Generated tokens (an end-of-turn token is not included).
    pub tokens: Vec<u32>,
    /// Sum of the tokens' log-probabilities (the end-of-turn token's included).
    pub log_prob: f32,
    /// Why it ended.
    pub finish: Finish,
    score: f32,
}

/// A chosen continuation: beam `beam` (an index into the beams given to [`Search::select`])
/// extended by `token`, with the cumulative log-probability `log_prob`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Index of the parent beam.
    pub beam: usize,
    /// The next token.
    pub token: u32,
    /// Cumulative log-probability with the token.
    pub log_prob: f32,
}

/// One live beam as [`Search::select`] sees it.
pub struct Beam<'a> {
    /// Cumulative log-probability so far.
    pub log_prob: f32,
    /// Tokens generated so far.
    pub generated: &'a [u32],
    /// The most likely next tokens with their log-probabilities, best first.
    pub next: Vec<(u32, f32)>,
}

/// The state of one beam search.
#[derive(Debug)]
pub struct Search {
    width: usize,
    length_penalty: f32,
    hypotheses: Vec<Hypothesis>,
}

impl Search {
    /// A search keeping `width` beams, normalizing by `length^length_penalty`.
    pub fn new(width: usize, length_penalty: f32) -> Self {
        Self {
            width: width.max(1),
            length_penalty,
            hypotheses: Vec::new(),
        }
    }

    /// Beams kept.
    pub fn width(&self) -> usize {
        self.width
    }

    /// How many continuations each beam should propose.
    pub fn proposals(&self) -> usize {
        2 * self.width
    }

    fn score(&self, log_prob: f32, len: usize) -> f32 {
        log_prob / (len.max(1) as f32).powf(self.length_penalty)
    }

    /// Adds a finished hypothesis, keeping the best `width`.
    pub fn finish(&mut self, tokens: Vec<u32>, log_prob: f32, finish: Finish) {
        let len = tokens.len() + usize::from(finish == Finish::Eos);
        let score = self.score(log_prob, len);
        if self.hypotheses.len() >= self.width && score <= self.worst() {
            return;
        }
        self.hypotheses.push(Hypothesis {
            tokens,
            log_prob,
            finish,
            score,
        });
        // Best first; equal scores keep their arrival order.
        self.hypotheses.sort_by(|a, b| b.score.total_cmp(&a.score));
        self.hypotheses.truncate(self.width);
    }

    fn worst(&self) -> f32 {
        self.hypotheses
            .last()
            .map_or(f32::NEG_INFINITY, |h| h.score)
    }

    /// Ranks the beams' proposals: end-of-turn candidates among the first `width` ranks become
    /// hypotheses; returns the best `width` other candidates, best first.
    pub fn select(&mut self, beams: &[Beam<'_>], is_end: impl Fn(u32) -> bool) -> Vec<Candidate> {
        let mut all: Vec<Candidate> = beams
            .iter()
            .enumerate()
            .flat_map(|(b, beam)| {
                beam.next.iter().map(move |&(token, lp)| Candidate {
                    beam: b,
                    token,
                    log_prob: beam.log_prob + lp,
                })
            })
            .collect();
        all.sort_by(|a, b| {
            b.log_prob
                .total_cmp(&a.log_prob)
                .then(a.beam.cmp(&b.beam))
                .then(a.token.cmp(&b.token))
        });
        let mut next = Vec::with_capacity(self.width);
        for (rank, c) in all.into_iter().enumerate() {
            if next.len() == self.width {
                break;
            }
            if is_end(c.token) {
                if rank < self.width {
                    let tokens = beams[c.beam].generated.to_vec();
                    self.finish(tokens, c.log_prob, Finish::Eos);
                }
            } else {
                next.push(c);
            }
        }
        next
    }

    /// Whether the search is over, given the best live beam's cumulative log-probability and
    /// generated length (`None`: no beam is left).
    pub fn done(&self, best_live: Option<(f32, usize)>) -> bool {
        match best_live {
            None => true,
            Some((log_prob, len)) => {
                self.hypotheses.len() >= self.width && self.score(log_prob, len) <= self.worst()
            }
        }
    }

    /// The best hypothesis.
    pub fn best(mut self) -> Option<Hypothesis> {
        (!self.hypotheses.is_empty()).then(|| self.hypotheses.swap_remove(0))
    }
}

/// The `n` most likely tokens of `logits` with their log-probabilities, best first (lower ids
/// first on ties).
pub fn top_log_probs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let lse = crate::sampler::log_sum_exp(logits);
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let n = n.min(idx.len());
    if n < idx.len() {
        idx.select_nth_unstable_by(n, by);
        idx.truncate(n);
    }
    idx.sort_by(by);
    idx.into_iter()
        .map(|i| (i, logits[i as usize] - lse))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_log_probs_are_sorted_and_normalized() {
        let top = top_log_probs(&[0.0, 2.0, 1.0, 2.0], 3);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "best first, lower id first on ties");
        let z: f32 = [0.0f32, 2.0, 1.0, 2.0].iter().map(|v| v.exp()).sum();
        assert!((top[0].1 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top_log_probs(&[1.0, 0.0], 5).len(), 2);
    }

    #[test]
    fn select_keeps_the_best_continuations_across_beams_and_finishes_ends() {
        const END: u32 = 9;
        let mut s = Search::new(2, 1.0);
        let a = [1u32, 2];
        let b = [1u32, 3];
        let beams = [
            Beam {
                log_prob: -1.0,
                generated: &a,
                next: vec![(END, -0.1), (4, -0.5), (5, -3.0)],
            },
            Beam {
                log_prob: -1.2,
                generated: &b,
                next: vec![(6, -0.2), (7, -0.3), (END, -4.0)],
            },
        ];
        let next = s.select(&beams, |t| t == END);
        // Ranked: END from a (-1.1), 6 from b (-1.4), 4 from a (-1.5), 7 from b (-1.5), ...
        assert_eq!(
            next.iter().map(|c| (c.beam, c.token)).collect::<Vec<_>>(),
            [(1, 6), (0, 4)]
        );
        assert!((next[0].log_prob + 1.4).abs() < 1e-6);
        let h = &s.hypotheses;
        assert_eq!(h.len(), 1, "only the end candidate of rank 0 finishes");
        assert_eq!(h[0].tokens, a);
        assert_eq!(h[0].finish, Finish::Eos);
        // The hypothesis has 3 tokens counting the end: score -1.1 / 3.
        assert!((h[0].score + 1.1 / 3.0).abs() < 1e-6);
        assert!(!s.done(Some((-1.4, 3))), "one hypothesis of two");
        s.finish(vec![1, 2, 4, 4], -1.6, Finish::Length);
        assert!(
            !s.done(Some((-1.4, 4))),
            "-1.4 / 4 still beats the worst, -1.6 / 4"
        );
        assert!(s.done(Some((-1.4, 3))), "-1.4 / 3 does not");
        assert!(s.done(None));
        let best = s.best().expect("hypotheses");
        assert_eq!(best.tokens, a, "-1.1 / 3 beats -1.6 / 4");
        assert_eq!(best.finish, Finish::Eos);
    }
}
