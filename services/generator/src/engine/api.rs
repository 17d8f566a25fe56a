//! What callers of the engine see: a [`Job`] (an [`Input`] with its [`Params`]) goes in,
//! [`Event`]s come out, and every engine step reports its [`StepStats`].

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::prompt::Parts;

/// Errors of a job.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as asked.
    #[error("{0}")]
    InvalidArgument(String),
    /// The queue is full.
    #[error("the generator's queue is full ({0} waiting); retry later")]
    Overloaded(usize),
    /// The caller's deadline passed.
    #[error("deadline exceeded after {0} generated tokens")]
    DeadlineExceeded(u32),
    /// The engine thread is gone.
    #[error("the generator engine has stopped")]
    Stopped,
    /// The model failed.
    #[error("inference failed: {0}")]
    Inference(String),
    /// What was named (an adapter) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the engine's state (an adapter in use, or loaded with other
    /// weights).
    #[error("{0}")]
    FailedPrecondition(String),
    /// No room (the adapter memory).
    #[error("{0}")]
    ResourceExhausted(String),
}

/// What to condition on.
#[derive(Debug, Clone)]
pub enum Input {
    /// Continue a passage with the paper's labelled parts.
    Personalized(Parts),
    /// An instruction over past passages (the summarizer's).
    Task {
        /// Passages, first in the prompt.
        passages: Vec<String>,
        /// What to do with them.
        instruction: String,
    },
    /// Answer a plain instruction.
    Instruction(String),
    /// The paper's author distinction: are these two passages by the same author?
    Distinction {
        /// A document start.
        first: String,
        /// Another passage.
        second: String,
    },
}

/// Context-aware decoding (Shi et al., 2023): the job's prompt and a second prompt are decoded
/// in lockstep, and the next token is the one among those within `plausibility` of the
/// likeliest under the job's prompt that maximizes
/// `log p(t | prompt) + alpha * (log p(t | prompt) - log p(t | against))`: it favours what the
/// job's prompt makes likelier than the second one does. Greedy; both prompts see the repeat
/// penalty over the tokens chosen so far.
#[derive(Debug, Clone)]
pub struct Contrast {
    /// The prompt to contrast with (the same request without the context whose effect is
    /// amplified).
    pub against: Input,
    /// Weight of the contrast (0 = plain greedy decoding of the job's prompt).
    pub alpha: f32,
    /// Only tokens whose probability is at least this fraction of the likeliest one's are
    /// candidates, in (0, 1].
    pub plausibility: f32,
}

/// Decoding settings, defaults applied.
#[derive(Debug, Clone)]
pub struct Params {
    /// Tokens to generate at most ([`Params::resume_token_ids`] included).
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus threshold; >= 1 disables.
    pub top_p: f64,
    /// Sampling seed.
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Penalty on logits of recently generated tokens (1 = none).
    pub repeat_penalty: f32,
    /// Generate exactly `max_new_tokens` (end-of-turn tokens are not chosen); for benchmarks.
    pub ignore_eos: bool,
    /// Score instead of generating: the log-probabilities of these tokens as the first answer
    /// token are returned in [`Stats::scores`], and nothing is generated.
    pub score: Vec<u32>,
    /// Score instead of generating: these tokens are fed after the prompt one by one (teacher
    /// forcing) and the log-probability of each, given the prompt and the ones before it, is
    /// returned in [`Stats::scores`] (from the model's logits, no repeat penalty); nothing is
    /// generated.
    pub score_continuation: Vec<u32>,
    /// Beams of a beam search (1 = greedy or sampled decoding); needs temperature 0.
    pub num_beams: usize,
    /// Beam hypotheses are ranked by `log_prob / length^length_penalty`.
    pub length_penalty: f32,
    /// Context-aware decoding against a second prompt (see [`Contrast`]); needs temperature 0
    /// and one beam.
    pub contrast: Option<Contrast>,
    /// Tokens an earlier run of this same request already generated (a stream resumed on
    /// another generator): they follow the prompt and count as generated (the repeat-penalty
    /// window, the `max_new_tokens` budget, the seeded sampler, which is advanced by as many
    /// draws, and stop strings all see them), so decoding continues exactly where that run
    /// was. [`Event::Text`] and [`Stats`] then hold only what comes after them. Not with beam
    /// search, contrast or scoring.
    pub resume_token_ids: Vec<u32>,
    /// Opaque per-caller bytes that start the prefix cache's block-hash chain (empty = none):
    /// a request never reuses cached blocks that a request with another salt computed, except
    /// those wholly within the prompt's template prefix (the instruction, before the first
    /// caller-supplied token), which every caller shares. At most [`MAX_CACHE_SALT`] bytes.
    pub cache_salt: Vec<u8>,
    /// The adapter to run with, by name: empty for the engine's default (its start-up
    /// adapter, or the base model), [`BASE_NAME`](super::adapters::BASE_NAME) for the base
    /// model, else one registered or in the adapter directory (see [`super::Adapters`]).
    pub adapter: String,
}

/// Longest [`Params::cache_salt`] accepted, bytes.
pub const MAX_CACHE_SALT: usize = 256;

impl Default for Params {
    /// Greedy decoding of up to 128 tokens, no penalty, stop strings or scoring.
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            repeat_penalty: 1.0,
            ignore_eos: false,
            score: Vec::new(),
            score_continuation: Vec::new(),
            num_beams: 1,
            length_penalty: 1.0,
            contrast: None,
            resume_token_ids: Vec::new(),
            cache_salt: Vec::new(),
            adapter: String::new(),
        }
    }
}

/// Why decoding stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End-of-turn token.
    Eos,
    /// Token limit.
    Length,
    /// A stop string.
    Stop,
}

/// Statistics of a finished job.
#[derive(Debug, Clone)]
pub struct Stats {
    /// The whole generated text (after the resumed tokens' text, if any).
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens (and resumed tokens) whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// Generated tokens (the resumed ones not included).
    pub generated_tokens: usize,
    /// Their ids.
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish: Finish,
    /// Decode rate after the first token.
    pub tokens_per_second: f64,
    /// Submission to first token, seconds.
    pub time_to_first_token: f64,
    /// Log-probabilities of [`Params::score`]'s or [`Params::score_continuation`]'s tokens.
    pub scores: Vec<f32>,
    /// Sum of the generated tokens' log-probabilities (an end-of-turn token's included) after
    /// the repeat penalty, before any temperature.
    pub log_prob: f32,
    /// The adapter it ran with, `NAME@SHA` (empty: the base model); set by
    /// [`super::Engine::generate`] (a caller of [`super::Engine::submit`] gets it there).
    pub adapter: String,
}

/// New text of a job and the tokens it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// The text (what stop strings and incomplete characters no longer hold back).
    pub text: String,
    /// The ids of the tokens generated since the previous chunk: a caller that resumes the
    /// job elsewhere passes every id it received as [`Params::resume_token_ids`] and gets the
    /// text that follows what it received.
    pub token_ids: Vec<u32>,
}

/// Events a job sends back.
#[derive(Debug)]
pub enum Event {
    /// New text.
    Text(Chunk),
    /// The job finished.
    Done(Stats),
    /// The job failed.
    Failed(EngineError),
}

/// A unit of work.
pub struct Job {
    /// What to condition on.
    pub input: Input,
    /// Decoding settings.
    pub params: Params,
    /// Where events go; dropping the receiver cancels the job.
    pub events: UnboundedSender<Event>,
    /// The caller's deadline.
    pub deadline: Option<Instant>,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Jobs allowed to wait for admission.
    pub queue_capacity: usize,
    /// System message of the chat template.
    pub system: String,
    /// Tokens of recent context the repeat penalty looks at.
    pub repeat_last_n: usize,
    /// Sequences decoded together at most.
    pub max_running: usize,
    /// Tokens in one forward pass at most (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Reuse the cached keys and values of earlier prompts' prefixes.
    pub prefix_cache: bool,
    /// Run-time adapters: where they come from, how much memory they may take.
    pub adapters: super::adapters::AdapterSettings,
}

/// A job admitted to the running batch in a step.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Time it waited in the queue.
    pub queue_wait: Duration,
    /// Its prompt tokens (with a contrast prompt's).
    pub prompt_tokens: usize,
    /// Of them, those whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// Beams of its search (1: not a beam search).
    pub beams: usize,
}

/// What one iteration of the engine loop did, for metrics: the caller's
/// [`StatsSink`] receives one after every iteration, on the engine thread.
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Jobs waiting for admission after the step.
    pub waiting: usize,
    /// Sequences in the running batch after the step.
    pub running: usize,
    /// Share of the key/value cache's blocks held by running sequences after the step (blocks
    /// that only the prefix cache keeps are free to reuse, so they do not count), 0..=1.
    pub kv_cache_usage: f64,
    /// Tokens in the step's forward pass (0: there was none).
    pub batch_tokens: usize,
    /// Jobs admitted.
    pub admitted: Vec<Admission>,
    /// Times to the first token of the jobs that got theirs.
    pub first_tokens: Vec<Duration>,
    /// Tokens appended to sequences (every beam's included).
    pub sampled_tokens: usize,
    /// Beams forked.
    pub beam_forks: usize,
}

/// Receives the engine's [`StepStats`] (the generator service turns them into metrics).
pub trait StatsSink: Send + 'static {
    /// Called after every iteration of the engine loop; must be quick.
    fn record(&mut self, stats: &StepStats);
}

impl<F: FnMut(&StepStats) + Send + 'static> StatsSink for F {
    fn record(&mut self, stats: &StepStats) {
        self(stats)
    }
}
