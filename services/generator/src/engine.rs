//! The inference engine: continuous batching over a paged key/value cache with prefix reuse.
//!
//! Callers render and tokenize their prompt on their own thread ([`Engine::submit`]) and queue
//! the job; past `queue_capacity` waiting jobs a submission is refused at once. One engine
//! thread owns the model. Each iteration it:
//! 1. drops waiting and running jobs whose caller went away or whose deadline passed (their
//!    cache blocks are freed at once);
//! 2. admits waiting jobs in arrival order while fewer than `max_running` run and the cache
//!    has room for the prompt and the most tokens the job may generate; a job first takes the
//!    cached blocks of the longest prefix of its prompt computed before (by any request);
//! 3. runs one forward pass holding one token of every decoding sequence plus chunks of the
//!    prompts still being prefilled, within `max_batch_tokens`;
//! 4. samples each sequence's next token with its own settings and seed, streams its text,
//!    and finishes it on an end-of-turn token, its token limit or a stop string.
//!
//! A job asking for beam search (`num_beams` > 1) runs as that many sequences of one
//! [`Search`]. When every beam of it has its logits, the search picks the next beams
//! ([`crate::beam`]); a beam continued by two candidates forks: the fork shares the parent's
//! full cache blocks and gets a copy of its last, partly filled one (copy on write), so it
//! decodes on at once, recomputing nothing.
//! Until a search ends, later jobs leave room for the beams it may still fork (sequences and
//! cache blocks). A beam-search job streams its text once, when the search ends.
//!
//! A sequence's logits do not depend on what else is in the batch or on what came from the
//! prefix cache (the backends compute each row independently), so greedy text is the same
//! alone, batched, chunked or cached.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::backend::SeqStep;
use crate::beam::{Beam, Search};
use crate::cache::BlockManager;
use crate::model::{LanguageModel, Prompter};
use crate::prompt::{self, Parts};
use crate::sampler::{Sampler, log_sum_exp};

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

/// Decoding settings, defaults applied.
#[derive(Debug, Clone)]
pub struct Params {
    /// Tokens to generate at most.
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
    /// Beams of a beam search (1 = greedy or sampled decoding); needs temperature 0.
    pub num_beams: usize,
    /// Beam hypotheses are ranked by `log_prob / length^length_penalty`.
    pub length_penalty: f32,
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
    /// The whole generated text.
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Their ids.
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish: Finish,
    /// Decode rate after the first token.
    pub tokens_per_second: f64,
    /// Submission to first token, seconds.
    pub time_to_first_token: f64,
    /// Log-probabilities of [`Params::score`]'s tokens.
    pub scores: Vec<f32>,
    /// Sum of the generated tokens' log-probabilities (an end-of-turn token's included) after
    /// the repeat penalty, before any temperature.
    pub log_prob: f32,
}

/// Events a job sends back.
#[derive(Debug)]
pub enum Event {
    /// New text.
    Text(String),
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

/// A tokenized job on its way to the engine thread.
struct Queued {
    prompt: Vec<u32>,
    params: Params,
    events: UnboundedSender<Event>,
    deadline: Option<Instant>,
    enqueued: Instant,
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
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: Sender<Queued>,
    waiting: Arc<AtomicUsize>,
    capacity: usize,
    prompter: Arc<Prompter>,
    system: Arc<str>,
    context: usize,
    max_running: usize,
    /// Model id.
    pub model_name: String,
    /// One line about the backend.
    pub backend: String,
}

impl Engine {
    /// Starts the engine thread, which owns `model`'s backend.
    pub fn start(model: LanguageModel, mut config: EngineConfig) -> Self {
        config.max_running = config.max_running.max(1);
        config.max_batch_tokens = config.max_batch_tokens.max(config.max_running + 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let prompter = Arc::new(model.prompter);
        let context = model.backend.context();
        let backend_line = model.backend.describe();
        let model_name = model.name.clone();
        let capacity = config.queue_capacity.max(1);
        let system: Arc<str> = config.system.clone().into();
        let max_running = config.max_running;
        let (w, p) = (waiting.clone(), prompter.clone());
        let backend = model.backend;
        std::thread::Builder::new()
            .name("generator-engine".into())
            .spawn(move || Scheduler::new(backend, p, config, w).run(rx))
            .expect("spawning the engine thread");
        Self {
            tx,
            waiting,
            capacity,
            prompter,
            system,
            context,
            max_running,
            model_name,
            backend: backend_line,
        }
    }

    /// Context window in tokens.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Tokenizes the job's prompt and queues it, or refuses it at once when the queue is full
    /// or the prompt cannot fit.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        let p = &job.params;
        if p.num_beams > 1 {
            if p.num_beams > self.max_running {
                return Err(EngineError::InvalidArgument(format!(
                    "num_beams {} exceeds the {} sequences the generator runs at once",
                    p.num_beams, self.max_running
                )));
            }
            if p.temperature > 0.0 || !p.score.is_empty() {
                return Err(EngineError::InvalidArgument(
                    "beam search needs temperature 0 and a generating input".into(),
                ));
            }
        }
        let prompt = fit_prompt(
            &self.prompter,
            &self.system,
            self.context,
            &job.input,
            job.params.max_new_tokens,
        )?;
        let m = crate::metrics::metrics();
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Overloaded(self.capacity));
        }
        m.generator_queue_depth.inc();
        self.tx
            .send(Queued {
                prompt,
                params: job.params,
                events: job.events,
                deadline: job.deadline,
                enqueued: Instant::now(),
            })
            .map_err(|_| {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                m.generator_queue_depth.dec();
                EngineError::Stopped
            })
    }

    /// Runs one job to its end, discarding the streamed text (for tools and tests; the gRPC
    /// adapter streams).
    pub async fn generate(
        &self,
        input: Input,
        params: Params,
        deadline: Option<Instant>,
    ) -> Result<Stats, EngineError> {
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.submit(Job {
            input,
            params,
            events,
            deadline,
        })?;
        while let Some(e) = rx.recv().await {
            match e {
                Event::Text(_) => {}
                Event::Done(s) => return Ok(s),
                Event::Failed(e) => return Err(e),
            }
        }
        Err(EngineError::Stopped)
    }

    /// The model's tokenizer and prompt rendering.
    pub fn prompter(&self) -> &Prompter {
        &self.prompter
    }

    /// Token ids of a prompt as the engine would run it (for tests and tools).
    pub fn tokenize(&self, input: &Input, max_new_tokens: usize) -> Result<Vec<u32>, EngineError> {
        fit_prompt(
            &self.prompter,
            &self.system,
            self.context,
            input,
            max_new_tokens,
        )
    }
}

/// Renders and tokenizes the prompt and fits it to the context window: past passages are
/// dropped from the lowest-ranked up until prompt and completion fit.
fn fit_prompt(
    prompter: &Prompter,
    system: &str,
    context: usize,
    input: &Input,
    max_new: usize,
) -> Result<Vec<u32>, EngineError> {
    let inference = |e: anyhow::Error| EngineError::Inference(e.to_string());
    let budget = context.saturating_sub(max_new);
    let too_long = |n: usize, what: &str| {
        EngineError::InvalidArgument(format!(
            "the {what} is {n} tokens; with max_new_tokens {max_new} the context window of {context} is exceeded"
        ))
    };
    let mut passages: Vec<String> = match input {
        Input::Personalized(p) => p.past_passages.clone(),
        Input::Task { passages, .. } => passages.clone(),
        Input::Instruction(_) | Input::Distinction { .. } => Vec::new(),
    };
    loop {
        let rendered = match input {
            Input::Personalized(parts) => prompt::personalized(
                system,
                &Parts {
                    past_passages: passages.clone(),
                    ..parts.clone()
                },
            ),
            Input::Task { instruction, .. } => prompt::task(system, &passages, instruction),
            Input::Instruction(text) => prompt::instruction(system, text),
            Input::Distinction { first, second } => prompt::distinction(system, first, second),
        };
        let ids = prompter.encode(&rendered).map_err(inference)?;
        if ids.is_empty() {
            return Err(EngineError::InvalidArgument("the prompt is empty".into()));
        }
        if ids.len() <= budget {
            return Ok(ids);
        }
        if passages.pop().is_none() {
            let what = if matches!(input, Input::Instruction(_)) {
                "instruction"
            } else {
                "prompt even without past passages"
            };
            return Err(too_long(ids.len(), what));
        }
    }
}

/// Where the earliest stop string starts in `text`.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Bytes at the end of `text` to hold back because they may begin a stop string.
pub fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            (1..s.len())
                .rev()
                .filter(move |&k| s.is_char_boundary(k))
                .map(move |k| &s[..k])
        })
        .filter(|prefix| text.ends_with(prefix))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// A running sequence.
struct Seq {
    events: UnboundedSender<Event>,
    params: Params,
    deadline: Option<Instant>,
    enqueued: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    cached: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Full blocks registered in the prefix cache, and the last one's hash.
    registered: usize,
    parent_hash: u64,
    sampler: Sampler,
    text: String,
    sent: usize,
    /// Incremental detokenization offsets into the generated tokens.
    prefix_offset: usize,
    read_offset: usize,
    scores: Vec<f32>,
    /// Sum of the generated tokens' log-probabilities.
    log_prob: f32,
    /// The beam search this sequence is a beam of, and its logits waiting for the others'.
    beam: Option<(u64, Option<Vec<f32>>)>,
}

impl Seq {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    fn search(&self) -> Option<u64> {
        self.beam.as_ref().map(|b| b.0)
    }

    /// A copy of this beam holding `blocks`: its full blocks shared and a copy of the last,
    /// partly filled one, so they hold the same keys and values.
    fn fork(&self, blocks: Vec<u32>) -> Seq {
        Seq {
            events: self.events.clone(),
            params: self.params.clone(),
            deadline: self.deadline,
            enqueued: self.enqueued,
            admitted: self.admitted,
            first_token: self.first_token,
            tokens: self.tokens.clone(),
            prompt_len: self.prompt_len,
            cached: self.cached,
            computed: self.computed,
            blocks,
            registered: self.registered,
            parent_hash: self.parent_hash,
            sampler: self.sampler.clone(),
            text: self.text.clone(),
            sent: self.sent,
            prefix_offset: self.prefix_offset,
            read_offset: self.read_offset,
            scores: Vec::new(),
            log_prob: self.log_prob,
            beam: self.search().map(|id| (id, None)),
        }
    }
}

struct Scheduler {
    backend: Box<dyn crate::backend::Backend>,
    prompter: Arc<Prompter>,
    config: EngineConfig,
    waiting_count: Arc<AtomicUsize>,
    blocks: BlockManager,
    waiting: VecDeque<Queued>,
    running: Vec<Seq>,
    /// Beam searches in progress, by id, with the cache blocks each of their beams may need.
    searches: HashMap<u64, (Search, usize)>,
    next_search: u64,
}

impl Scheduler {
    fn new(
        backend: Box<dyn crate::backend::Backend>,
        prompter: Arc<Prompter>,
        config: EngineConfig,
        waiting_count: Arc<AtomicUsize>,
    ) -> Self {
        let blocks = BlockManager::new(
            backend.cache_blocks(),
            backend.block_size(),
            config.prefix_cache,
        );
        Self {
            backend,
            prompter,
            config,
            waiting_count,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            searches: HashMap::new(),
            next_search: 0,
        }
    }

    fn dequeued(&self) {
        self.waiting_count.fetch_sub(1, Ordering::SeqCst);
        crate::metrics::metrics().generator_queue_depth.dec();
    }

    fn run(mut self, rx: Receiver<Queued>) {
        let m = crate::metrics::metrics();
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                match rx.recv() {
                    Ok(q) => self.waiting.push_back(q),
                    Err(_) => return,
                }
            }
            while let Ok(q) = rx.try_recv() {
                self.waiting.push_back(q);
            }
            self.drop_abandoned();
            self.admit();
            m.generator_running.set(self.running.len() as i64);
            if self.running.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                tracing::error!(error = %e, "forward pass failed");
                let err = EngineError::Inference(e.to_string());
                for seq in std::mem::take(&mut self.running) {
                    let _ = seq.events.send(Event::Failed(err.clone()));
                    self.blocks.release(&seq.blocks);
                }
                self.searches.clear();
            }
            m.generator_running.set(self.running.len() as i64);
        }
    }

    /// Drops waiting and running jobs whose caller went away or whose deadline passed.
    fn drop_abandoned(&mut self) {
        let now = Instant::now();
        let mut keep = VecDeque::with_capacity(self.waiting.len());
        while let Some(q) = self.waiting.pop_front() {
            if q.events.is_closed() {
                self.dequeued();
            } else if q.deadline.is_some_and(|d| now >= d) {
                let _ = q
                    .events
                    .send(Event::Failed(EngineError::DeadlineExceeded(0)));
                self.dequeued();
            } else {
                keep.push_back(q);
            }
        }
        self.waiting = keep;
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let closed = s.events.is_closed();
            let expired = s.deadline.is_some_and(|d| now >= d);
            if closed || expired {
                let s = self.running.remove(i);
                if expired && !closed {
                    let n = s.generated().len() as u32;
                    let _ = s
                        .events
                        .send(Event::Failed(EngineError::DeadlineExceeded(n)));
                } else {
                    tracing::debug!("job cancelled by its caller");
                }
                self.blocks.release(&s.blocks);
            } else {
                i += 1;
            }
        }
        let running = &self.running;
        self.searches
            .retain(|id, _| running.iter().any(|s| s.search() == Some(*id)));
    }

    /// Sequences and cache blocks that the running beam searches may still claim by forking
    /// (each search up to its width, each beam up to the blocks of a whole sequence).
    fn reserved(&self) -> (usize, usize) {
        let mut slots = 0;
        let mut blocks = 0;
        for (id, (search, need)) in &self.searches {
            let live = self
                .running
                .iter()
                .filter(|s| s.search() == Some(*id))
                .count();
            let missing = search.width().saturating_sub(live);
            slots += missing;
            blocks += missing * need;
        }
        (slots, blocks)
    }

    /// Admits waiting jobs in order while there is room.
    fn admit(&mut self) {
        let m = crate::metrics::metrics();
        let bs = self.blocks.block_size();
        loop {
            let Some(q) = self.waiting.front() else {
                return;
            };
            // Running beam searches keep room for the beams they may still fork.
            let (slots, reserved) = self.reserved();
            let beams = q.params.num_beams.max(1);
            if self.running.len() + slots + beams > self.config.max_running {
                return;
            }
            let total = (q.prompt.len() + q.params.max_new_tokens).min(self.backend.context());
            let need = total.div_ceil(bs);
            if need * beams > self.blocks.total() {
                let q = self.waiting.pop_front().expect("front exists");
                self.dequeued();
                let _ = q.events.send(Event::Failed(EngineError::InvalidArgument(
                    "the request needs more cache than the generator has".into(),
                )));
                continue;
            }
            // Reuse whole cached blocks, leaving at least one prompt token to compute.
            let (hit, parent) = self
                .blocks
                .lookup(&q.prompt, q.prompt.len().saturating_sub(1));
            // A beam search starts once its every beam could get its own blocks.
            let later = (beams - 1) * need;
            let fresh = if self.blocks.available() >= need - hit.len() + later + reserved {
                self.blocks.allocate(need - hit.len())
            } else {
                None
            };
            let Some(fresh) = fresh else {
                self.blocks.release(&hit);
                return;
            };
            let q = self.waiting.pop_front().expect("front exists");
            self.dequeued();
            let now = Instant::now();
            m.generator_queue_wait
                .observe(now.duration_since(q.enqueued).as_secs_f64());
            m.generator_prompt_tokens.inc_by(q.prompt.len() as u64);
            let cached = hit.len() * bs;
            m.generator_prefix_cache_hit_tokens.inc_by(cached as u64);
            let p = &q.params;
            let sampler = Sampler::new(
                p.temperature,
                p.top_p,
                p.seed,
                p.repeat_penalty,
                self.config.repeat_last_n,
            );
            let registered = hit.len();
            let mut blocks = hit;
            blocks.extend(fresh);
            let beam = (beams > 1).then(|| {
                let id = self.next_search;
                self.next_search += 1;
                let search = Search::new(beams, q.params.length_penalty);
                self.searches.insert(id, (search, need));
                m.generator_beam_searches.inc();
                (id, None)
            });
            self.running.push(Seq {
                prompt_len: q.prompt.len(),
                tokens: q.prompt,
                cached,
                computed: cached,
                blocks,
                registered,
                parent_hash: parent,
                sampler,
                text: String::new(),
                sent: 0,
                prefix_offset: 0,
                read_offset: 0,
                scores: Vec::new(),
                log_prob: 0.0,
                beam,
                events: q.events,
                params: q.params,
                deadline: q.deadline,
                enqueued: q.enqueued,
                admitted: now,
                first_token: None,
            });
        }
    }

    /// One forward pass and what follows from it.
    fn step(&mut self) -> anyhow::Result<()> {
        let m = crate::metrics::metrics();
        // (sequence, start, length, wants logits): decoding sequences first, then prompt chunks.
        let mut plan: Vec<(usize, usize, usize, bool)> = Vec::new();
        let mut budget = self.config.max_batch_tokens;
        for (i, s) in self.running.iter().enumerate() {
            if s.tokens.len() - s.computed == 1 {
                plan.push((i, s.computed, 1, true));
                budget -= 1;
            }
        }
        for (i, s) in self.running.iter().enumerate() {
            let pending = s.tokens.len() - s.computed;
            if pending > 1 && budget > 0 {
                let take = pending.min(budget);
                plan.push((i, s.computed, take, take == pending));
                budget -= take;
            }
        }
        let steps: Vec<SeqStep<'_>> = plan
            .iter()
            .map(|&(i, start, len, logits)| SeqStep {
                tokens: &self.running[i].tokens[start..start + len],
                start,
                blocks: &self.running[i].blocks,
                logits,
            })
            .collect();
        let batch_tokens: usize = plan.iter().map(|p| p.2).sum();
        let mut logits = self.backend.forward(&steps)?.into_iter();
        drop(steps);
        m.generator_batch_tokens.observe(batch_tokens as f64);
        let bs = self.blocks.block_size();
        let mut finished = Vec::new();
        let mut searches = Vec::new();
        for &(i, _, len, wants) in &plan {
            let s = &mut self.running[i];
            s.computed += len;
            while self.blocks.enabled() && (s.registered + 1) * bs <= s.computed {
                let r = s.registered;
                s.parent_hash = self.blocks.register(
                    s.blocks[r],
                    s.parent_hash,
                    &s.tokens[r * bs..(r + 1) * bs],
                );
                s.registered += 1;
            }
            if !wants {
                continue;
            }
            let Some(mut row) = logits.next() else {
                anyhow::bail!("the backend returned too few logits");
            };
            if let Some((id, waiting)) = &mut s.beam {
                first_token(s.enqueued, &mut s.first_token);
                searches.push(*id);
                *waiting = Some(row);
                continue;
            }
            if let Some(finish) = advance(s, &mut row, &self.prompter, self.backend.context()) {
                finished.push((i, finish));
            }
        }
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        let done: Vec<(Seq, Finish)> = finished
            .into_iter()
            .map(|(i, finish)| {
                let s = self.running.remove(i);
                self.blocks.release(&s.blocks);
                (s, finish)
            })
            .collect();
        // The gauge is current before any caller hears that its job is done.
        m.generator_running.set(self.running.len() as i64);
        for (s, finish) in done {
            finish_seq(s, finish);
        }
        searches.sort_unstable();
        searches.dedup();
        for id in searches {
            let ready = self
                .running
                .iter()
                .filter(|s| s.search() == Some(id))
                .all(|s| matches!(s.beam, Some((_, Some(_)))));
            if ready {
                self.beam_step(id)?;
            }
        }
        Ok(())
    }

    /// One step of beam search `id`, every beam of which has its logits: chooses the next
    /// beams, forks and drops beams accordingly, and ends the search when it is over.
    fn beam_step(&mut self, id: u64) -> anyhow::Result<()> {
        let Some((search, _)) = self.searches.get_mut(&id) else {
            return Ok(());
        };
        let context = self.backend.context();
        let prompter = &self.prompter;
        let idx: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].search() == Some(id))
            .collect();
        let mut beams = Vec::with_capacity(idx.len());
        for &i in &idx {
            let s = &mut self.running[i];
            let Some((_, Some(mut row))) = s.beam.take() else {
                unreachable!("every beam has its logits");
            };
            s.beam = Some((id, None));
            s.sampler.penalize(&mut row, &s.tokens[s.prompt_len..]);
            if s.params.ignore_eos {
                mask(&mut row, &prompter.stop_ids);
            }
            beams.push(row);
        }
        let beams: Vec<Beam<'_>> = idx
            .iter()
            .zip(beams)
            .map(|(&i, row)| Beam {
                log_prob: self.running[i].log_prob,
                generated: self.running[i].generated(),
                next: crate::beam::top_log_probs(&row, search.proposals()),
            })
            .collect();
        let chosen = search.select(&beams, |t| prompter.stop_ids.contains(&t));
        drop(beams);
        // Each beam's continuations: the first extends the beam, the others fork it.
        let mut children: Vec<Vec<(u32, f32)>> = vec![Vec::new(); idx.len()];
        for c in chosen {
            children[c.beam].push((c.token, c.log_prob));
        }
        let bs = self.blocks.block_size();
        let mut forks = Vec::new();
        let mut copies = Vec::new();
        for (p, kids) in children.iter().enumerate() {
            let parent = &self.running[idx[p]];
            for &(token, log_prob) in kids.iter().skip(1) {
                // Full blocks are shared; the partly filled last one is copied.
                let full = parent.computed / bs;
                let Some(fresh) = self.blocks.allocate(parent.blocks.len() - full) else {
                    tracing::warn!("no cache blocks for a beam; the search goes on with fewer");
                    continue;
                };
                if !parent.computed.is_multiple_of(bs) {
                    copies.push((parent.blocks[full], fresh[0]));
                }
                self.blocks.share(&parent.blocks[..full]);
                let mut blocks = parent.blocks[..full].to_vec();
                blocks.extend(fresh);
                let mut child = parent.fork(blocks);
                child.log_prob = log_prob;
                forks.push((child, token));
            }
        }
        self.backend.copy_blocks(&copies)?;
        crate::metrics::metrics()
            .generator_beam_forks
            .inc_by(forks.len() as u64);
        let mut ended: Vec<(usize, Option<Finish>)> = Vec::new();
        for (p, kids) in children.iter().enumerate() {
            let s = &mut self.running[idx[p]];
            match kids.first() {
                Some(&(token, log_prob)) => {
                    s.log_prob = log_prob;
                    if let Some(f) = push_token(s, token, prompter, context) {
                        ended.push((idx[p], Some(f)));
                    }
                }
                None => ended.push((idx[p], None)),
            }
        }
        for (mut child, token) in forks {
            match push_token(&mut child, token, prompter, context) {
                Some(f) => {
                    search.finish(child.generated().to_vec(), child.log_prob, f);
                    self.blocks.release(&child.blocks);
                }
                None => self.running.push(child),
            }
        }
        ended.sort_by_key(|e| std::cmp::Reverse(e.0));
        let mut carrier = None;
        for (i, finish) in ended {
            let s = self.running.remove(i);
            if let Some(f) = finish {
                search.finish(s.generated().to_vec(), s.log_prob, f);
            }
            self.blocks.release(&s.blocks);
            carrier = Some(s);
        }
        let best_live = self
            .running
            .iter()
            .filter(|s| s.search() == Some(id))
            .map(|s| (s.log_prob, s.generated().len()))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if !search.done(best_live) {
            return Ok(());
        }
        // The search is over: its live beams go, and the best hypothesis is the answer.
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].search() == Some(id) {
                let s = self.running.remove(i);
                self.blocks.release(&s.blocks);
                carrier = Some(s);
            } else {
                i += 1;
            }
        }
        let (search, _) = self.searches.remove(&id).expect("the search exists");
        let Some(mut s) = carrier else {
            return Ok(());
        };
        let Some(best) = search.best() else {
            let e = EngineError::Inference("the beam search ended without a hypothesis".into());
            let _ = s.events.send(Event::Failed(e));
            return Ok(());
        };
        s.tokens.truncate(s.prompt_len);
        s.tokens.extend(&best.tokens);
        s.text = prompter.decode(&best.tokens).unwrap_or_default();
        if let Some(at) = find_stop(&s.text, &s.params.stop) {
            s.text.truncate(at);
        }
        s.sent = 0;
        s.log_prob = best.log_prob;
        crate::metrics::metrics()
            .generator_running
            .set(self.running.len() as i64);
        finish_seq(s, best.finish);
        Ok(())
    }
}

/// Records when a sequence's first token came (and the metric of it).
fn first_token(enqueued: Instant, first: &mut Option<Instant>) {
    if first.is_none() {
        let now = Instant::now();
        *first = Some(now);
        crate::metrics::metrics()
            .generator_time_to_first_token
            .observe(now.duration_since(enqueued).as_secs_f64());
    }
}

/// Makes the end-of-turn tokens impossible.
fn mask(logits: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Samples the next token of `s` from `logits` and streams its text; returns why the sequence
/// ends, if it does.
fn advance(s: &mut Seq, logits: &mut [f32], prompter: &Prompter, context: usize) -> Option<Finish> {
    first_token(s.enqueued, &mut s.first_token);
    if !s.params.score.is_empty() {
        let lse = log_sum_exp(logits);
        s.scores = s
            .params
            .score
            .iter()
            .map(|&id| {
                logits
                    .get(id as usize)
                    .map_or(f32::NEG_INFINITY, |&l| l - lse)
            })
            .collect();
        return Some(Finish::Length);
    }
    if s.params.ignore_eos {
        mask(logits, &prompter.stop_ids);
    }
    let next = s.sampler.sample(logits, &s.tokens[s.prompt_len..]);
    s.log_prob += logits[next as usize] - log_sum_exp(logits);
    if prompter.stop_ids.contains(&next) {
        return Some(Finish::Eos);
    }
    push_token(s, next, prompter, context)
}

/// Appends a chosen token to `s`, detokenizes it and streams the new text (beams stream
/// nothing until their search ends); returns why the sequence ends, if it does.
fn push_token(s: &mut Seq, next: u32, prompter: &Prompter, context: usize) -> Option<Finish> {
    let m = crate::metrics::metrics();
    s.tokens.push(next);
    m.generated_tokens.inc();
    // Incremental detokenization: decode a short window, emit what it adds.
    let generated = &s.tokens[s.prompt_len..];
    let prefix_text = prompter
        .decode(&generated[s.prefix_offset..s.read_offset])
        .unwrap_or_default();
    let new_text = prompter
        .decode(&generated[s.prefix_offset..])
        .unwrap_or_default();
    if new_text.len() > prefix_text.len()
        && !new_text.ends_with('\u{FFFD}')
        && new_text.is_char_boundary(prefix_text.len())
    {
        s.text.push_str(&new_text[prefix_text.len()..]);
        s.prefix_offset = s.read_offset;
        s.read_offset = generated.len();
    }
    if let Some(at) = find_stop(&s.text, &s.params.stop) {
        s.text.truncate(at);
        return Some(Finish::Stop);
    }
    let safe = s.text.len() - held_back(&s.text, &s.params.stop);
    if s.beam.is_none() && safe > s.sent && s.text.is_char_boundary(safe) {
        let _ = s.events.send(Event::Text(s.text[s.sent..safe].to_string()));
        s.sent = safe;
    }
    if s.generated().len() >= s.params.max_new_tokens || s.tokens.len() >= context {
        return Some(Finish::Length);
    }
    None
}

fn finish_seq(s: Seq, finish: Finish) {
    let m = crate::metrics::metrics();
    if s.text.len() > s.sent {
        let _ = s.events.send(Event::Text(s.text[s.sent..].to_string()));
    }
    let generated = s.tokens.len() - s.prompt_len;
    let first = s.first_token.unwrap_or(s.admitted);
    let secs = first.elapsed().as_secs_f64();
    let tokens_per_second = if secs > 0.0 && generated > 1 {
        (generated - 1) as f64 / secs
    } else {
        0.0
    };
    if tokens_per_second > 0.0 {
        m.decode_tokens_per_second.observe(tokens_per_second);
    }
    let tokens = s.tokens[s.prompt_len..].to_vec();
    let _ = s.events.send(Event::Done(Stats {
        tokens,
        prompt_tokens: s.prompt_len,
        cached_tokens: s.cached,
        generated_tokens: generated,
        finish,
        tokens_per_second,
        time_to_first_token: first.duration_since(s.enqueued).as_secs_f64(),
        text: s.text,
        scores: s.scores,
        log_prob: s.log_prob,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_held_back() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc END x", &stops), Some(4));
        assert_eq!(find_stop("abc", &stops), None);
        assert_eq!(held_back("abc E", &stops), 1);
        assert_eq!(held_back("abc EN", &stops), 2);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
    }
}
