//! The engine thread's loop (vLLM's `EngineCore.step`): take in new jobs, drop abandoned ones,
//! admit, schedule a [`StepPlan`](super::scheduler::StepPlan), run it, update from its logits,
//! report the step's statistics, and hand what callers should hear to the output processor.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use super::api::{EngineError, StatsSink, StepStats};
use super::output::Update;
use super::request::Request;
use super::runner;
use super::scheduler::Scheduler;
use crate::adapter::Adapter;
use crate::backend::{AdapterId, Backend};
use crate::model::Prompter;

/// What reaches the engine thread, in the order it was sent.
pub(super) enum Command {
    /// A job to queue.
    Job(Box<Request>),
    /// Install an adapter under an id before any job that names it.
    Install(AdapterId, Arc<Adapter>),
    /// Remove an adapter no job names any more.
    Remove(AdapterId),
}

/// Everything the engine thread owns.
pub(super) struct EngineCore {
    pub scheduler: Scheduler,
    pub backend: Box<dyn Backend>,
    pub prompter: Arc<Prompter>,
    pub inbox: Receiver<Command>,
    pub outputs: Sender<Vec<Update>>,
    pub sink: Box<dyn StatsSink>,
    /// Adapters whose install failed, and why: their jobs fail alone, not the whole batch.
    pub broken: std::collections::HashMap<AdapterId, String>,
}

impl EngineCore {
    /// Steps until every engine handle is gone and no job is left.
    pub fn run(mut self) {
        loop {
            let mut out = Vec::new();
            if self.scheduler.is_idle() {
                match self.inbox.recv() {
                    Ok(c) => self.take(c, &mut out),
                    Err(_) => return,
                }
            }
            while let Ok(c) = self.inbox.try_recv() {
                self.take(c, &mut out);
            }
            let mut stats = StepStats::default();
            self.scheduler.sweep(Instant::now(), &mut out);
            self.scheduler.admit(&mut out, &mut stats);
            if !self.scheduler.running.is_empty() {
                self.step(&mut out, &mut stats);
            }
            stats.waiting = self.scheduler.waiting();
            stats.running = self.scheduler.running_seqs();
            let cache = &self.scheduler.cache;
            stats.kv_cache_usage = 1.0 - cache.available() as f64 / cache.total().max(1) as f64;
            // The statistics are current before any caller hears that its job is done.
            self.sink.record(&stats);
            if !out.is_empty() && self.outputs.send(out).is_err() {
                tracing::error!("the output processor is gone");
                return;
            }
        }
    }

    fn take(&mut self, command: Command, out: &mut Vec<Update>) {
        match command {
            Command::Job(r) => match self.broken.get(&r.adapter.id) {
                Some(why) => {
                    let error =
                        EngineError::Inference(format!("the adapter is not installed: {why}"));
                    self.scheduler.refuse(*r, error, out);
                }
                None => self.scheduler.enqueue(*r, out),
            },
            Command::Install(id, adapter) => {
                if let Err(e) = self.backend.install_adapter(id, &adapter) {
                    tracing::error!(error = %e, id, "installing an adapter failed");
                    self.broken.insert(id, e.to_string());
                }
            }
            Command::Remove(id) => {
                self.broken.remove(&id);
                self.backend.remove_adapter(id);
            }
        }
    }

    /// One forward pass and what follows from it.
    fn step(&mut self, out: &mut Vec<Update>, stats: &mut StepStats) {
        let plan = self.scheduler.schedule();
        stats.batch_tokens = plan.tokens();
        let result = runner::execute(self.backend.as_mut(), &plan, &self.scheduler.running)
            .and_then(|logits| {
                self.scheduler
                    .update(&plan, logits, &self.prompter, out, stats)
            })
            .and_then(|copies| runner::copy_blocks(self.backend.as_mut(), &copies));
        if let Err(e) = result {
            tracing::error!(error = %e, "forward pass failed");
            self.scheduler
                .fail_all(&EngineError::Inference(e.to_string()), out);
        }
    }
}
