//! The scheduler: the queue of waiting jobs, the running sequence groups, admission against the
//! cache, and each step's [`StepPlan`] (vLLM's `Scheduler.schedule` and `SchedulerOutput`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use super::api::{Admission, EngineConfig, EngineError, StepStats};
use super::group::{GroupState, SequenceGroup};
use super::output::{Caller, RequestId, Update};
use super::policy;
use super::request::Request;
use super::sequence::Sequence;
use crate::cache::{BlockTable, ChainStart, KvCache};
use crate::sampler::Sampler;

/// One sequence's share of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Scheduled {
    /// Index of its group among the running groups.
    pub group: usize,
    /// Index of the sequence in its group.
    pub seq: usize,
    /// Position of the first token fed.
    pub start: usize,
    /// Tokens fed.
    pub len: usize,
    /// Whether the last token's logits are wanted (the sequence is then fully computed).
    pub logits: bool,
}

/// What the next forward pass runs: one token of every decoding sequence, then chunks of the
/// prompts still being prefilled, within the batch's token budget.
#[derive(Debug, Default)]
pub(super) struct StepPlan {
    pub seqs: Vec<Scheduled>,
}

impl StepPlan {
    /// Tokens in the pass.
    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }
}

/// A sequence a job starts with, while its admission is decided.
struct Start {
    /// Its tokens (prompt, then resumed tokens).
    tokens: Vec<u32>,
    prompt_len: usize,
    chain: ChainStart,
    /// Cache blocks it needs at most.
    need: usize,
}

/// A job waiting for admission.
struct Waiting {
    id: RequestId,
    request: Request,
    caller: Caller,
}

/// The waiting queue and the running batch.
pub(super) struct Scheduler {
    config: EngineConfig,
    /// Context window in tokens.
    pub(super) context: usize,
    pub(super) cache: KvCache,
    waiting: VecDeque<Waiting>,
    /// Running groups, in admission order.
    pub(super) running: Vec<SequenceGroup>,
    /// Jobs submitted and not yet admitted or dropped (the engine handle counts them in).
    waiting_count: Arc<AtomicUsize>,
    next_id: RequestId,
}

impl Scheduler {
    pub fn new(
        cache: KvCache,
        config: EngineConfig,
        context: usize,
        waiting_count: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            config,
            context,
            cache,
            waiting: VecDeque::new(),
            running: Vec::new(),
            waiting_count,
            next_id: 0,
        }
    }

    /// Whether nothing waits or runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Sequences in the running batch.
    pub fn running_seqs(&self) -> usize {
        self.running.iter().map(|g| g.state.seqs.len()).sum()
    }

    /// Jobs waiting (those still on their way to the engine thread included).
    pub fn waiting(&self) -> usize {
        self.waiting_count.load(Ordering::SeqCst)
    }

    fn dequeued(&self) {
        self.waiting_count.fetch_sub(1, Ordering::SeqCst);
    }

    /// Queues a job that reached the engine thread.
    pub fn enqueue(&mut self, request: Request, out: &mut Vec<Update>) {
        let id = self.next_id;
        self.next_id += 1;
        let caller = Caller {
            events: request.events.clone(),
            stopped: Arc::new(AtomicBool::new(false)),
        };
        out.push(Update::Open {
            id,
            caller: caller.clone(),
            stop: request.params.stop.clone(),
            streams: request.params.num_beams <= 1,
            resumed: request.params.resume_token_ids.clone(),
            enqueued: request.enqueued,
        });
        self.waiting.push_back(Waiting {
            id,
            request,
            caller,
        });
    }

    /// Answers a job that reached the engine thread with `error` at once.
    pub fn refuse(&mut self, request: Request, error: EngineError, out: &mut Vec<Update>) {
        self.enqueue(request, out);
        if let Some(w) = self.waiting.pop_back() {
            out.push(Update::Failed { id: w.id, error });
            self.dequeued();
        }
    }

    /// Drops waiting and running jobs whose caller went away, whose answer is complete or
    /// whose deadline passed (dropping a group frees its blocks).
    pub fn sweep(&mut self, now: Instant, out: &mut Vec<Update>) {
        let expired = |d: Option<Instant>| d.is_some_and(|d| now >= d);
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in std::mem::take(&mut self.waiting) {
            if w.caller.gone() {
                out.push(Update::Forget { id: w.id });
                self.dequeued();
            } else if expired(w.request.deadline) {
                out.push(Update::Failed {
                    id: w.id,
                    error: EngineError::DeadlineExceeded(0),
                });
                self.dequeued();
            } else {
                kept.push_back(w);
            }
        }
        self.waiting = kept;
        self.running.retain(|g| {
            if g.caller.gone() {
                tracing::debug!("job cancelled by its caller or complete");
                out.push(Update::Forget { id: g.id });
                false
            } else if expired(g.deadline) {
                out.push(Update::Failed {
                    id: g.id,
                    error: EngineError::DeadlineExceeded(g.generated() as u32),
                });
                false
            } else {
                true
            }
        });
    }

    /// Fails every running job (the model failed).
    pub fn fail_all(&mut self, error: &EngineError, out: &mut Vec<Update>) {
        for g in self.running.drain(..) {
            out.push(Update::Failed {
                id: g.id,
                error: error.clone(),
            });
        }
    }

    /// Sequences and cache blocks that running groups may still claim by forking.
    fn reserved(&self) -> (usize, usize) {
        self.running
            .iter()
            .map(SequenceGroup::reserved)
            .fold((0, 0), |a, r| (a.0 + r.0, a.1 + r.1))
    }

    /// Admits waiting jobs in arrival order while fewer than `max_running` sequences run and
    /// the cache has room for their prompts and the most tokens they may generate; a job first
    /// takes the cached blocks of the longest prefix of its prompt computed before.
    pub fn admit(&mut self, out: &mut Vec<Update>, stats: &mut StepStats) {
        let bs = self.cache.block_size();
        loop {
            let Some(w) = self.waiting.front() else { return };
            let r = &w.request;
            let p = &r.params;
            // Running groups keep room for the sequences they may still fork.
            let (slots, reserved) = self.reserved();
            let width = if r.contrast.is_some() {
                2
            } else {
                p.num_beams.max(1)
            };
            if self.running_seqs() + slots + width > self.config.max_running {
                return;
            }
            let starts = self.starts(r);
            // Beams yet to fork need room for a whole sequence each.
            let later = (width - starts.len()) * starts[0].need;
            if starts.iter().map(|s| s.need).sum::<usize>() + later > self.cache.total() {
                let w = self.waiting.pop_front().expect("front exists");
                self.dequeued();
                out.push(Update::Failed {
                    id: w.id,
                    error: EngineError::InvalidArgument(
                        "the request needs more cache than the generator has".into(),
                    ),
                });
                continue;
            }
            // Reuse whole cached blocks, leaving at least one token of each prompt to compute.
            let hits: Vec<(BlockTable, u64)> = starts
                .iter()
                .map(|s| {
                    let n = s.tokens.len().saturating_sub(1);
                    self.cache.lookup(&s.tokens, n, &s.chain)
                })
                .collect();
            let fresh: Vec<usize> = starts
                .iter()
                .zip(&hits)
                .map(|(s, h)| s.need - h.0.len())
                .collect();
            // A beam search starts once its every beam could get its own blocks.
            if self.cache.available() < fresh.iter().sum::<usize>() + later + reserved {
                return; // the hits are released as they drop
            }
            let Some(fresh) = fresh
                .iter()
                .map(|&n| self.cache.allocate(n))
                .collect::<Option<Vec<BlockTable>>>()
            else {
                return;
            };
            let w = self.waiting.pop_front().expect("front exists");
            self.dequeued();
            let now = Instant::now();
            let cached: Vec<usize> = hits.iter().map(|h| h.0.len() * bs).collect();
            stats.admitted.push(Admission {
                queue_wait: now.duration_since(w.request.enqueued),
                prompt_tokens: starts.iter().map(|s| s.prompt_len).sum(),
                cached_tokens: cached.iter().sum(),
                beams: w.request.params.num_beams.max(1),
            });
            out.push(Update::Admitted {
                id: w.id,
                prompt_tokens: starts[0].prompt_len,
                cached_tokens: cached[0],
                at: now,
            });
            let p = &w.request.params;
            let seqs = starts
                .into_iter()
                .zip(hits)
                .zip(fresh)
                .map(|((start, (mut blocks, hash)), fresh)| {
                    let registered = blocks.len();
                    blocks.append(fresh);
                    let mut sampler = Sampler::new(
                        p.temperature,
                        p.top_p,
                        p.seed,
                        p.repeat_penalty,
                        self.config.repeat_last_n,
                    );
                    // Resumed tokens were drawn by the earlier run.
                    sampler.replay(start.tokens.len() - start.prompt_len);
                    let mut seq = Sequence::new(
                        start.tokens,
                        start.prompt_len,
                        blocks,
                        (registered, hash),
                        start.chain,
                        sampler,
                        bs,
                    );
                    seq.adapter = w.request.adapter.id;
                    seq
                })
                .collect();
            let seq_blocks = self.need(w.request.prompt.ids.len(), p.max_new_tokens);
            let Waiting {
                id,
                request,
                caller,
            } = w;
            self.running.push(SequenceGroup {
                id,
                policy: policy::for_params(&request.params),
                state: GroupState {
                    seqs,
                    params: request.params,
                },
                caller,
                deadline: request.deadline,
                enqueued: request.enqueued,
                first_token: None,
                seq_blocks,
                _adapter: request.adapter,
            });
        }
    }

    /// Cache blocks a sequence with a prompt of `prompt_len` tokens needs at most.
    fn need(&self, prompt_len: usize, max_new_tokens: usize) -> usize {
        (prompt_len + max_new_tokens)
            .min(self.context)
            .div_ceil(self.cache.block_size())
    }

    /// The sequences a job starts with: its prompt followed by the resumed tokens, and the
    /// prompt to contrast with, if any.
    fn starts(&self, r: &Request) -> Vec<Start> {
        let p = &r.params;
        let mut tokens = r.prompt.ids.clone();
        tokens.extend(&p.resume_token_ids);
        std::iter::once((tokens, &r.prompt))
            .chain(r.contrast.iter().map(|c| (c.ids.clone(), c)))
            .map(|(tokens, prompt)| Start {
                tokens,
                prompt_len: prompt.ids.len(),
                chain: ChainStart {
                    weights: r.adapter.weights,
                    ..ChainStart::new(&p.cache_salt, prompt.shared_prefix)
                },
                need: self.need(prompt.ids.len(), p.max_new_tokens),
            })
            .collect()
    }

    /// The next forward pass: decoding sequences first, then prompt chunks, within
    /// `max_batch_tokens`.
    pub fn schedule(&self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_batch_tokens;
        let seqs = || {
            self.running.iter().enumerate().flat_map(|(g, group)| {
                group
                    .state
                    .seqs
                    .iter()
                    .enumerate()
                    .map(move |(i, s)| (g, i, s))
            })
        };
        for (group, seq, s) in seqs() {
            if s.pending() == 1 {
                plan.seqs.push(Scheduled {
                    group,
                    seq,
                    start: s.computed,
                    len: 1,
                    logits: true,
                });
                budget -= 1;
            }
        }
        for (group, seq, s) in seqs() {
            let pending = s.pending();
            if pending > 1 && budget > 0 {
                let len = pending.min(budget);
                plan.seqs.push(Scheduled {
                    group,
                    seq,
                    start: s.computed,
                    len,
                    logits: len == pending,
                });
                budget -= len;
            }
        }
        plan
    }
}
