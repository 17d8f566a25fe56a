//! The inference engine: one dedicated thread owns the model and runs jobs from a bounded
//! queue, so decoding never blocks the async runtime; a full queue is refused at once.
//! Each job streams its text back through a channel; a job whose receiver is gone (the caller
//! cancelled) or whose deadline passed stops decoding at the next token.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Instant;

use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokio::sync::mpsc::UnboundedSender;

use crate::model::LanguageModel;
use crate::prompt::{self, Parts};

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
    /// Answer a plain instruction.
    Instruction(String),
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
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Why it stopped.
    pub finish: Finish,
    /// Decode rate (prompt excluded).
    pub tokens_per_second: f64,
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

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    capacity: usize,
    /// Model id.
    pub model_name: String,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Jobs allowed to wait.
    pub queue_capacity: usize,
    /// System message of the chat template.
    pub system: String,
    /// Tokens of recent context the repeat penalty looks at.
    pub repeat_last_n: usize,
}

impl Engine {
    /// Starts the engine thread, which owns `model`.
    pub fn start(model: LanguageModel, config: EngineConfig) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
        let model_name = model.name.clone();
        let capacity = config.queue_capacity;
        std::thread::Builder::new()
            .name("generator-engine".into())
            .spawn(move || run(model, config, rx))
            .expect("spawning the engine thread");
        Self {
            tx,
            capacity,
            model_name,
        }
    }

    /// Queues a job, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        let queue = &ghostwriter_common::metrics::metrics().generator_queue_depth;
        queue.inc();
        self.tx.try_send(job).map_err(|e| {
            queue.dec();
            match e {
                TrySendError::Full(_) => EngineError::Overloaded(self.capacity),
                TrySendError::Disconnected(_) => EngineError::Stopped,
            }
        })
    }
}

fn run(mut model: LanguageModel, config: EngineConfig, rx: Receiver<Job>) {
    let m = ghostwriter_common::metrics::metrics();
    while let Ok(job) = rx.recv() {
        if job.events.is_closed() {
            m.generator_queue_depth.dec();
            continue;
        }
        let events = job.events.clone();
        let result = generate(&mut model, &config, job);
        m.generator_queue_depth.dec();
        match result {
            Ok(Some(stats)) => {
                m.generated_tokens.inc_by(stats.generated_tokens as u64);
                m.decode_tokens_per_second.observe(stats.tokens_per_second);
                let _ = events.send(Event::Done(stats));
            }
            Ok(None) => tracing::debug!("job cancelled by its caller"),
            Err(e) => {
                let _ = events.send(Event::Failed(e));
            }
        }
    }
}

/// Renders the prompt and fits it to the context window: past passages are dropped from the
/// lowest-ranked up until prompt and completion fit.
fn fit_prompt(
    model: &LanguageModel,
    config: &EngineConfig,
    input: &Input,
    max_new: usize,
) -> Result<Vec<u32>, EngineError> {
    let inference = |e: anyhow::Error| EngineError::Inference(e.to_string());
    let budget = model.context_length.saturating_sub(max_new);
    match input {
        Input::Instruction(text) => {
            let ids = model
                .encode(&prompt::instruction(&config.system, text).text)
                .map_err(inference)?;
            if ids.len() > budget {
                return Err(EngineError::InvalidArgument(format!(
                    "the instruction is {} tokens; with max_new_tokens {max_new} the context window of {} is exceeded",
                    ids.len(),
                    model.context_length
                )));
            }
            Ok(ids)
        }
        Input::Personalized(parts) => {
            let mut parts = parts.clone();
            loop {
                let ids = model
                    .encode(&prompt::personalized(&config.system, &parts).text)
                    .map_err(inference)?;
                if ids.len() <= budget {
                    return Ok(ids);
                }
                if parts.past_passages.pop().is_none() {
                    return Err(EngineError::InvalidArgument(format!(
                        "the prompt is {} tokens even without past passages; with max_new_tokens {max_new} the context window of {} is exceeded",
                        ids.len(),
                        model.context_length
                    )));
                }
            }
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

fn generate(
    model: &mut LanguageModel,
    config: &EngineConfig,
    job: Job,
) -> Result<Option<Stats>, EngineError> {
    let inference = |e: anyhow::Error| EngineError::Inference(e.to_string());
    let p = &job.params;
    let prompt_ids = fit_prompt(model, config, &job.input, p.max_new_tokens)?;
    let sampling = if p.temperature <= 0.0 {
        Sampling::ArgMax
    } else if p.top_p > 0.0 && p.top_p < 1.0 {
        Sampling::TopP {
            p: p.top_p,
            temperature: p.temperature,
        }
    } else {
        Sampling::All {
            temperature: p.temperature,
        }
    };
    let mut sampler = LogitsProcessor::from_sampling(p.seed, sampling);
    let mut logits = model.forward(&prompt_ids, 0).map_err(inference)?;
    let decode_start = Instant::now();
    let mut generated: Vec<u32> = Vec::new();
    let mut text = String::new();
    let mut sent = 0usize;
    let mut finish = Finish::Length;
    while generated.len() < p.max_new_tokens {
        if job.events.is_closed() {
            return Ok(None);
        }
        if job.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(EngineError::DeadlineExceeded(generated.len() as u32));
        }
        if p.repeat_penalty != 1.0 && !generated.is_empty() {
            let start = generated.len().saturating_sub(config.repeat_last_n);
            logits = candle_transformers::utils::apply_repeat_penalty(
                &logits,
                p.repeat_penalty,
                &generated[start..],
            )
            .map_err(|e| inference(e.into()))?;
        }
        let next = sampler.sample(&logits).map_err(|e| inference(e.into()))?;
        if model.stop_ids.contains(&next) {
            finish = Finish::Eos;
            break;
        }
        generated.push(next);
        let decoded = model.decode(&generated).map_err(inference)?;
        // A token that ends inside a multi-byte character decodes to U+FFFD: wait for the rest.
        if !decoded.ends_with('\u{FFFD}') {
            text = decoded;
        }
        if let Some(at) = find_stop(&text, &p.stop) {
            text.truncate(at);
            finish = Finish::Stop;
            break;
        }
        let safe = text.len() - held_back(&text, &p.stop);
        if safe > sent && text.is_char_boundary(safe) {
            let _ = job.events.send(Event::Text(text[sent..safe].to_string()));
            sent = safe;
        }
        if generated.len() < p.max_new_tokens {
            logits = model
                .forward(&[next], prompt_ids.len() + generated.len() - 1)
                .map_err(inference)?;
        }
    }
    if text.len() > sent {
        let _ = job.events.send(Event::Text(text[sent..].to_string()));
    }
    let secs = decode_start.elapsed().as_secs_f64();
    Ok(Some(Stats {
        prompt_tokens: prompt_ids.len(),
        generated_tokens: generated.len(),
        finish,
        tokens_per_second: if secs > 0.0 {
            generated.len() as f64 / secs
        } else {
            0.0
        },
        text,
    }))
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
