//! The inference engine: continuous batching over a paged key/value cache with prefix reuse.
//!
//! Callers render and tokenize their prompt on their own thread ([`Engine::submit`]) and queue
//! the job; past `queue_capacity` waiting jobs a submission is refused at once. One engine
//! thread owns the model ([`engine_core`]). Each iteration it:
//! 1. drops waiting and running jobs whose caller went away or whose deadline passed (their
//!    cache blocks are freed as their sequences drop);
//! 2. admits waiting jobs in arrival order while fewer than `max_running` sequences run and the
//!    cache has room for the prompt and the most tokens the job may generate; a job first takes
//!    the cached blocks of the longest prefix of its prompt computed before ([`scheduler`]);
//! 3. plans and runs one forward pass holding one token of every decoding sequence plus chunks
//!    of the prompts still being prefilled, within `max_batch_tokens` ([`runner`]);
//! 4. hands each sequence's logits to its group, whose policy chooses the next tokens
//!    ([`update`], [`group`], [`policy`]): plain decoding samples with the job's own settings
//!    and seed; a beam search (`num_beams` > 1) picks, forks and ends beams ([`crate::beam`]);
//!    context-aware decoding ([`Contrast`]) steps two prompts in lockstep; scoring collects
//!    log-probabilities instead;
//! 5. reports the step's [`StepStats`] to the caller's [`StatsSink`] and sends the new tokens
//!    to the output processor ([`output`]), a thread of its own that detokenizes, finds stop
//!    strings, streams text and sends each job's [`Stats`].
//!
//! Until a beam search ends, later jobs leave room for the beams it may still fork (sequences
//! and cache blocks). A beam-search job streams its text once, when the search ends.
//!
//! A sequence's logits do not depend on what else is in the batch or on what came from the
//! prefix cache (the backends compute each row independently), so greedy text is the same
//! alone, batched, chunked, cached or resumed ([`Params::resume_token_ids`]).

mod adapters;
mod api;
mod engine_core;
mod group;
mod output;
mod policy;
mod request;
mod runner;
mod scheduler;
mod sequence;
mod update;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::Instant;

pub use adapters::{AdapterEvent, AdapterInfo, AdapterSettings, AdapterUse, Adapters, BASE_NAME};
pub use api::{
    Admission, Chunk, Contrast, EngineConfig, EngineError, Event, Finish, Input, Job,
    MAX_CACHE_SALT, Params, Stats, StatsSink, StepStats,
};
pub use output::{find_stop, held_back};

use crate::cache::KvCache;
use crate::model::{LanguageModel, Prompter};
use engine_core::Command;
use request::{Limits, Request};

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: Sender<Command>,
    waiting: Arc<AtomicUsize>,
    capacity: usize,
    prompter: Arc<Prompter>,
    system: Arc<str>,
    context: usize,
    max_running: usize,
    /// The base model's id.
    pub base_name: String,
    adapters: Adapters,
    /// The start-up adapter, which jobs naming none run with (file stem and the start of its
    /// sha256); empty for none.
    pub adapter: String,
    /// One line about the backend.
    pub backend: String,
}

impl Engine {
    /// Starts the engine thread, which owns `model`'s backend; its step statistics are
    /// dropped.
    pub fn start(model: LanguageModel, config: EngineConfig) -> Self {
        Self::start_with_stats(model, config, |_: &StepStats| {})
    }

    /// Starts the engine thread, which owns `model`'s backend and reports every step's
    /// statistics to `sink`.
    pub fn start_with_stats(
        model: LanguageModel,
        mut config: EngineConfig,
        sink: impl StatsSink,
    ) -> Self {
        config.max_running = config.max_running.max(1);
        config.max_batch_tokens = config.max_batch_tokens.max(config.max_running + 1);
        let (tx, inbox) = std::sync::mpsc::channel();
        let (outputs, updates) = std::sync::mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let prompter = Arc::new(model.prompter);
        let context = model.backend.context();
        let backend_line = model.backend.describe();
        let base_name = model.base_name.clone();
        let adapter = model.adapter.clone();
        let adapters = Adapters::new(
            config.adapters.clone(),
            model.backend.adapter_shape(),
            model.path.clone(),
            model.sha256.clone(),
            &adapter,
            tx.clone(),
        );
        let capacity = config.queue_capacity.max(1);
        let system: Arc<str> = config.system.clone().into();
        let max_running = config.max_running;
        output::spawn(prompter.clone(), updates);
        let (w, p) = (waiting.clone(), prompter.clone());
        let backend = model.backend;
        let sink: Box<dyn StatsSink> = Box::new(sink);
        std::thread::Builder::new()
            .name("generator-engine".into())
            .spawn(move || {
                // The cache lives on this thread: its block tables free themselves on drop.
                let cache = KvCache::new(
                    backend.cache_blocks(),
                    backend.block_size(),
                    config.prefix_cache,
                );
                let scheduler = scheduler::Scheduler::new(cache, config, context, w);
                engine_core::EngineCore {
                    scheduler,
                    backend,
                    prompter: p,
                    inbox,
                    outputs,
                    sink,
                    broken: Default::default(),
                }
                .run()
            })
            .expect("spawning the engine thread");
        Self {
            tx,
            waiting,
            capacity,
            prompter,
            system,
            context,
            max_running,
            base_name,
            adapters,
            adapter,
            backend: backend_line,
        }
    }

    /// The engine's adapters: load, unload, list.
    pub fn adapters(&self) -> &Adapters {
        &self.adapters
    }

    /// The model id of a job naming no adapter (with the start-up adapter's `NAME@SHA`, if
    /// any).
    pub fn model_name(&self) -> String {
        self.model_for(&self.adapter)
    }

    /// The model id of a response produced with `adapter` (`NAME@SHA`, empty for none).
    pub fn model_for(&self, adapter: &str) -> String {
        match adapter {
            "" => self.base_name.clone(),
            a => format!("{}+{a}", self.base_name),
        }
    }

    /// Context window in tokens.
    pub fn context(&self) -> usize {
        self.context
    }

    fn limits(&self) -> Limits<'_> {
        Limits {
            prompter: &self.prompter,
            system: &self.system,
            context: self.context,
            max_running: self.max_running,
        }
    }

    /// Checks and tokenizes the job, makes its adapter resident, and queues it, or refuses it
    /// at once when the queue is full, its settings cannot be served, its adapter is unknown
    /// or its prompt cannot fit. Returns the adapter it runs with (`NAME@SHA`, empty for none).
    pub fn submit(&self, job: Job) -> Result<String, EngineError> {
        let mut request = Request::new(job, &self.limits())?;
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Overloaded(self.capacity));
        }
        request.adapter = match self.adapters.resolve(&request.params.adapter) {
            Ok(a) => a,
            Err(e) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        };
        let name = request.adapter.name.clone();
        self.tx.send(Command::Job(Box::new(request))).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            EngineError::Stopped
        })?;
        Ok(name)
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
        let adapter = self.submit(Job {
            input,
            params,
            events,
            deadline,
        })?;
        while let Some(e) = rx.recv().await {
            match e {
                Event::Text(_) => {}
                Event::Done(s) => return Ok(Stats { adapter, ..s }),
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
        Ok(request::fit_prompt(&self.limits(), input, max_new_tokens)?.ids)
    }
}
