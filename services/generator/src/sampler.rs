//! Per-request token choice: repeat penalty, then greedy, temperature or nucleus sampling with
//! the request's own seed (a request's draws never depend on other requests).

use ghostwriter_common::rng::Rng;

/// One request's sampling state.
#[derive(Clone)]
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    repeat_penalty: f32,
    repeat_last_n: usize,
    rng: Rng,
}

impl Sampler {
    /// `temperature` 0 is greedy; `top_p` ≥ 1 disables the nucleus.
    pub fn new(
        temperature: f64,
        top_p: f64,
        seed: u64,
        repeat_penalty: f32,
        repeat_last_n: usize,
    ) -> Self {
        Self {
            temperature,
            top_p,
            repeat_penalty,
            repeat_last_n,
            rng: Rng::new(seed ^ 0x9E37_79B9_7F4A_7C15),
        }
    }

    fn next_f64(&mut self) -> f64 {
        self.rng.unit()
    }

    /// Moves the sampler past `tokens` already chosen by an earlier run with the same seed: as
    /// many draws as that run made for them (none when greedy).
    pub fn replay(&mut self, tokens: usize) {
        if self.temperature > 0.0 {
            for _ in 0..tokens {
                self.next_f64();
            }
        }
    }

    /// Applies the repeat penalty to `logits` for the recent tokens of `generated`.
    pub fn penalize(&self, logits: &mut [f32], generated: &[u32]) {
        if self.repeat_penalty != 1.0 && !generated.is_empty() {
            let start = generated.len().saturating_sub(self.repeat_last_n);
            let mut seen: Vec<u32> = generated[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l >= 0.0 {
                        *l / self.repeat_penalty
                    } else {
                        *l * self.repeat_penalty
                    };
                }
            }
        }
    }

    /// Chooses the next token from `logits` (modified in place), given the tokens generated so
    /// far.
    pub fn sample(&mut self, logits: &mut [f32], generated: &[u32]) -> u32 {
        self.penalize(logits, generated);
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.temperature as f32;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        if self.top_p < 1.0 {
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p.1 / total;
                if cum >= self.top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let mass: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.next_f64() as f32 * mass;
        for &(i, p) in &probs {
            if r < p {
                return i;
            }
            r -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// ln Σ exp(logits), computed stably: a token's log-probability is its logit minus this.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    max + logits.iter().map(|&v| (v - max).exp()).sum::<f32>().ln()
}

/// Log-probabilities of every token: each logit minus [`log_sum_exp`].
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| l - lse).collect()
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_penalty_and_seeded_sampling() {
        let mut g = Sampler::new(0.0, 1.0, 0, 1.0, 64);
        assert_eq!(g.sample(&mut [0.1, 2.0, 1.0], &[]), 1);
        let mut p = Sampler::new(0.0, 1.0, 0, 4.0, 64);
        assert_eq!(
            p.sample(&mut [0.1, 2.0, 1.0], &[1]),
            2,
            "penalized token loses"
        );
        let draws = |seed| {
            let mut s = Sampler::new(1.0, 0.9, seed, 1.0, 64);
            (0..20)
                .map(|_| s.sample(&mut [1.0, 1.1, 0.9, 1.0], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7), "same seed, same draws");
        assert_ne!(draws(7), draws(8));
        // A resumed sampler continues the draws of the run it resumes.
        let mut resumed = Sampler::new(1.0, 0.9, 7, 1.0, 64);
        resumed.replay(5);
        let rest: Vec<u32> = (0..15)
            .map(|_| resumed.sample(&mut [1.0, 1.1, 0.9, 1.0], &[]))
            .collect();
        assert_eq!(rest, draws(7)[5..]);
        let mut greedy = Sampler::new(0.0, 1.0, 7, 1.0, 64);
        greedy.replay(5);
        assert_eq!(greedy.sample(&mut [0.1, 2.0, 1.0], &[]), 1);
    }
}
