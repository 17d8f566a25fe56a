//! A [`Job`] checked and tokenized on the caller's thread into a [`Request`], the form in which
//! it reaches the engine thread.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::adapters::AdapterUse;
use super::api::{EngineError, Event, Input, Job, MAX_CACHE_SALT, Params};
use crate::model::Prompter;
use crate::prompt::{self, Parts};

/// A prompt's token ids.
#[derive(Debug, Clone)]
pub(super) struct Tokenized {
    /// The ids.
    pub ids: Vec<u32>,
    /// How many of them come before the first caller-supplied text (the template's system
    /// message and instruction): the part every caller may share in the prefix cache.
    pub shared_prefix: usize,
}

/// A validated, tokenized job.
pub(super) struct Request {
    /// The job's prompt.
    pub prompt: Tokenized,
    /// The prompt of [`Params::contrast`], if any.
    pub contrast: Option<Tokenized>,
    pub params: Params,
    pub events: UnboundedSender<Event>,
    pub deadline: Option<Instant>,
    pub enqueued: Instant,
    /// Its adapter, leased until the job ends.
    pub adapter: AdapterUse,
}

/// What [`Request::new`] checks a job against.
pub(super) struct Limits<'a> {
    pub prompter: &'a Prompter,
    pub system: &'a str,
    pub context: usize,
    pub max_running: usize,
}

fn invalid(message: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument(message.into())
}

impl Request {
    /// Checks the job's settings against each other and the engine, then renders and
    /// tokenizes its prompt(s).
    pub fn new(job: Job, limits: &Limits<'_>) -> Result<Self, EngineError> {
        let mut params = job.params;
        check(&mut params, limits)?;
        let prompt = fit_prompt(limits, &job.input, params.max_new_tokens)?;
        let contrast = match &params.contrast {
            Some(c) => Some(fit_prompt(limits, &c.against, params.max_new_tokens)?),
            None => None,
        };
        Ok(Self {
            prompt,
            contrast,
            params,
            events: job.events,
            deadline: job.deadline,
            enqueued: Instant::now(),
            adapter: AdapterUse::default(),
        })
    }
}

/// Refuses settings the engine cannot serve; a scored continuation sets the token budget.
fn check(p: &mut Params, limits: &Limits<'_>) -> Result<(), EngineError> {
    let vocab = limits.prompter.vocab_size();
    let in_vocab = |ids: &[u32], what: &str| match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(invalid(format!(
            "{what} holds token id {t}, outside the vocabulary of {vocab}"
        ))),
        None => Ok(()),
    };
    let scoring = !p.score.is_empty() || !p.score_continuation.is_empty();
    if p.num_beams > 1 {
        if p.num_beams > limits.max_running {
            return Err(invalid(format!(
                "num_beams {} exceeds the {} sequences the generator runs at once",
                p.num_beams, limits.max_running
            )));
        }
        if p.temperature > 0.0 || scoring || p.contrast.is_some() {
            return Err(invalid(
                "beam search needs temperature 0 and a generating input",
            ));
        }
    }
    if let Some(c) = &p.contrast {
        if p.temperature > 0.0 || scoring {
            return Err(invalid(
                "context-aware decoding needs temperature 0 and a generating input",
            ));
        }
        if !(c.plausibility > 0.0 && c.plausibility <= 1.0 && c.alpha.is_finite()) {
            return Err(invalid(
                "context-aware decoding needs a plausibility in (0, 1] and a finite alpha",
            ));
        }
        if limits.max_running < 2 {
            return Err(invalid(
                "context-aware decoding runs two sequences; the generator runs one at a time",
            ));
        }
    }
    if !p.score_continuation.is_empty() {
        if !p.score.is_empty() {
            return Err(invalid("score and score_continuation exclude each other"));
        }
        in_vocab(&p.score_continuation, "score_continuation")?;
        p.max_new_tokens = p.score_continuation.len();
    }
    if !p.resume_token_ids.is_empty() {
        if p.num_beams > 1 || p.contrast.is_some() || scoring {
            return Err(invalid(
                "resume_token_ids resume plain decoding only (a beam search restarts)",
            ));
        }
        if p.resume_token_ids.len() >= p.max_new_tokens {
            return Err(invalid(format!(
                "resume_token_ids hold {} tokens, max_new_tokens {}: nothing is left to generate",
                p.resume_token_ids.len(),
                p.max_new_tokens
            )));
        }
        in_vocab(&p.resume_token_ids, "resume_token_ids")?;
        if let Some(t) = p
            .resume_token_ids
            .iter()
            .find(|t| limits.prompter.stop_ids.contains(t))
        {
            return Err(invalid(format!(
                "resume_token_ids hold the end-of-turn token {t}: that generation had ended"
            )));
        }
    }
    if p.cache_salt.len() > MAX_CACHE_SALT {
        return Err(invalid(format!(
            "cache_salt is {} bytes; at most {MAX_CACHE_SALT}",
            p.cache_salt.len()
        )));
    }
    Ok(())
}

/// Renders and tokenizes the prompt and fits it to the context window: past passages are
/// dropped from the lowest-ranked up until prompt and completion fit.
pub(super) fn fit_prompt(
    limits: &Limits<'_>,
    input: &Input,
    max_new: usize,
) -> Result<Tokenized, EngineError> {
    let inference = |e: anyhow::Error| EngineError::Inference(e.to_string());
    let (system, context) = (limits.system, limits.context);
    let budget = context.saturating_sub(max_new);
    let too_long = |n: usize, what: &str| {
        invalid(format!(
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
        let (ids, shared_prefix) = limits.prompter.encode_split(&rendered).map_err(inference)?;
        if ids.is_empty() {
            return Err(invalid("the prompt is empty"));
        }
        if ids.len() <= budget {
            return Ok(Tokenized { ids, shared_prefix });
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
