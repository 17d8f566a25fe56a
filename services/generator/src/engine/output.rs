//! The output processor: turns the engine's per-step token updates into what a caller sees
//! (incremental detokenization, stop strings, streamed text and the final [`Stats`]), on a
//! thread of its own, so the engine thread goes on to the next forward pass meanwhile (vLLM's
//! output processor).
//!
//! The engine decides end-of-turn and token limits; stop strings are found here. A job that
//! meets one is answered at once, and its `stopped` flag tells the engine to retire its
//! sequences, which happens at the start of the next step or the one after: the tokens it may
//! still generate meanwhile are dropped here, so the answer is the same as if the engine had
//! stopped at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::api::{Chunk, EngineError, Event, Finish, Stats};
use crate::model::Prompter;

/// Identifies a job inside the engine.
pub(super) type RequestId = u64;

/// How the engine reaches a job's caller.
#[derive(Clone)]
pub(super) struct Caller {
    /// Where events go (the output processor sends; the engine only asks whether the
    /// receiver is gone).
    pub events: UnboundedSender<Event>,
    /// Set once the answer is complete (a stop string): the engine retires the job.
    pub stopped: Arc<AtomicBool>,
}

impl Caller {
    /// Whether the job's sequences should go: the caller went away or its answer is complete.
    pub fn gone(&self) -> bool {
        self.events.is_closed() || self.stopped.load(Ordering::Acquire)
    }
}

/// What happened to one job in a step, in order.
pub(super) enum Update {
    /// The job reached the engine thread.
    Open {
        id: RequestId,
        caller: Caller,
        /// Its stop strings.
        stop: Vec<String>,
        /// Whether its text streams token by token (a beam search's comes at the end).
        streams: bool,
        /// Tokens an earlier run generated: replayed silently, as that run sent their text.
        resumed: Vec<u32>,
        enqueued: Instant,
    },
    /// The job joined the running batch.
    Admitted {
        id: RequestId,
        prompt_tokens: usize,
        cached_tokens: usize,
        at: Instant,
    },
    /// The job's first next-token logits came.
    FirstToken { id: RequestId, at: Instant },
    /// A token of the answer, with the sum of the answer's log-probabilities so far.
    Token {
        id: RequestId,
        token: u32,
        log_prob: f32,
    },
    /// The engine ended the job.
    Finished { id: RequestId, ending: Ending },
    /// The job failed.
    Failed { id: RequestId, error: EngineError },
    /// The caller went away: nothing more to send.
    Forget { id: RequestId },
}

/// How the engine ended a job.
#[derive(Debug, Clone)]
pub(super) struct Ending {
    pub finish: Finish,
    /// The whole answer, when it was not sent token by token (a beam search's best hypothesis).
    pub answer: Option<Vec<u32>>,
    /// Sum of the answer's log-probabilities (an end-of-turn token's included).
    pub log_prob: f32,
    /// Scores asked for.
    pub scores: Vec<f32>,
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

/// Incremental detokenization: each token decodes a short window of the newest tokens and
/// appends what that adds, once it adds whole characters.
#[derive(Clone, Default)]
pub(crate) struct Detokenizer {
    tokens: Vec<u32>,
    text: String,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// Appends `token` and its text.
    pub fn push(&mut self, token: u32, prompter: &Prompter) {
        self.tokens.push(token);
        let prefix_text = prompter
            .decode(&self.tokens[self.prefix_offset..self.read_offset])
            .unwrap_or_default();
        let new_text = prompter
            .decode(&self.tokens[self.prefix_offset..])
            .unwrap_or_default();
        if new_text.len() > prefix_text.len()
            && !new_text.ends_with('\u{FFFD}')
            && new_text.is_char_boundary(prefix_text.len())
        {
            self.text.push_str(&new_text[prefix_text.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
    }

    /// Cuts the text where the earliest of `stops` begins; whether one did.
    pub fn cut_at_stop(&mut self, stops: &[String]) -> bool {
        match find_stop(&self.text, stops) {
            Some(at) => {
                self.text.truncate(at);
                true
            }
            None => false,
        }
    }
}

/// One job's answer as it streams.
struct Answer {
    caller: Caller,
    stop: Vec<String>,
    streams: bool,
    detok: Detokenizer,
    /// Text bytes sent so far (by this run or, for resumed tokens, an earlier one).
    sent: usize,
    /// Resumed tokens and the text they stand for, which this run does not send again.
    resumed: usize,
    resumed_text: usize,
    /// Tokens generated since the last chunk.
    unsent: Vec<u32>,
    log_prob: f32,
    enqueued: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    cached_tokens: usize,
}

impl Answer {
    /// Adds a token; true when it completes a stop string (the text is cut there).
    fn push(&mut self, token: u32, prompter: &Prompter, send: bool) -> bool {
        self.detok.push(token, prompter);
        self.unsent.push(token);
        if self.detok.cut_at_stop(&self.stop) {
            return true;
        }
        let text = &self.detok.text;
        let safe = text.len() - held_back(text, &self.stop);
        if safe > self.sent && text.is_char_boundary(safe) {
            if send {
                let _ = self.caller.events.send(Event::Text(Chunk {
                    text: text[self.sent..safe].to_string(),
                    token_ids: std::mem::take(&mut self.unsent),
                }));
            } else {
                self.unsent.clear();
            }
            self.sent = safe;
        }
        false
    }

    /// Sends the rest of the text and the job's statistics.
    fn finish(mut self, finish: Finish, log_prob: f32, scores: Vec<f32>) {
        let text = &self.detok.text;
        if text.len() > self.sent {
            let _ = self.caller.events.send(Event::Text(Chunk {
                text: text[self.sent..].to_string(),
                token_ids: std::mem::take(&mut self.unsent),
            }));
        }
        let tokens = self.detok.tokens.split_off(self.resumed);
        let generated = tokens.len();
        let first = self.first_token.or(self.admitted).unwrap_or(self.enqueued);
        let secs = first.elapsed().as_secs_f64();
        let tokens_per_second = if secs > 0.0 && generated > 1 {
            (generated - 1) as f64 / secs
        } else {
            0.0
        };
        let _ = self.caller.events.send(Event::Done(Stats {
            text: self.detok.text.split_off(self.resumed_text),
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            generated_tokens: generated,
            tokens,
            finish,
            tokens_per_second,
            time_to_first_token: first.duration_since(self.enqueued).as_secs_f64(),
            scores,
            log_prob,
            adapter: String::new(),
        }));
    }
}

/// The output processor's state: the answers in progress.
struct Processor {
    prompter: Arc<Prompter>,
    answers: HashMap<RequestId, Answer>,
}

impl Processor {
    fn apply(&mut self, update: Update) {
        match update {
            Update::Open {
                id,
                caller,
                stop,
                streams,
                resumed,
                enqueued,
            } => {
                let mut answer = Answer {
                    caller,
                    stop,
                    streams,
                    detok: Detokenizer::default(),
                    sent: 0,
                    resumed: resumed.len(),
                    resumed_text: 0,
                    unsent: Vec::new(),
                    log_prob: 0.0,
                    enqueued,
                    admitted: None,
                    first_token: None,
                    prompt_tokens: 0,
                    cached_tokens: 0,
                };
                // The earlier run sent the text of these tokens up to where this one stands
                // after them: the same detokenization, token by token, reaches the same point.
                for &t in &resumed {
                    if answer.push(t, &self.prompter, false) {
                        answer.caller.stopped.store(true, Ordering::Release);
                        answer.resumed_text = answer.detok.text.len();
                        answer.sent = answer.resumed_text;
                        answer.finish(Finish::Stop, 0.0, Vec::new());
                        return;
                    }
                }
                answer.resumed_text = answer.sent;
                self.answers.insert(id, answer);
            }
            Update::Admitted {
                id,
                prompt_tokens,
                cached_tokens,
                at,
            } => {
                if let Some(a) = self.answers.get_mut(&id) {
                    a.prompt_tokens = prompt_tokens;
                    a.cached_tokens = cached_tokens;
                    a.admitted = Some(at);
                }
            }
            Update::FirstToken { id, at } => {
                if let Some(a) = self.answers.get_mut(&id) {
                    a.first_token = Some(at);
                }
            }
            Update::Token {
                id,
                token,
                log_prob,
            } => {
                let Some(a) = self.answers.get_mut(&id) else {
                    return; // answered already (a stop string): the engine is catching up
                };
                a.log_prob = log_prob;
                if a.push(token, &self.prompter, a.streams) {
                    a.caller.stopped.store(true, Ordering::Release);
                    if let Some(a) = self.answers.remove(&id) {
                        let log_prob = a.log_prob;
                        a.finish(Finish::Stop, log_prob, Vec::new());
                    }
                }
            }
            Update::Finished { id, ending } => {
                let Some(mut a) = self.answers.remove(&id) else { return };
                if let Some(answer) = ending.answer {
                    // Sent at once: the whole text, cut at a stop string.
                    let mut text = self.prompter.decode(&answer).unwrap_or_default();
                    if let Some(at) = find_stop(&text, &a.stop) {
                        text.truncate(at);
                    }
                    a.unsent = answer.clone();
                    a.detok = Detokenizer {
                        tokens: answer,
                        text,
                        ..Default::default()
                    };
                    a.sent = 0;
                }
                a.finish(ending.finish, ending.log_prob, ending.scores);
            }
            Update::Failed { id, error } => {
                if let Some(a) = self.answers.remove(&id) {
                    let _ = a.caller.events.send(Event::Failed(error));
                }
            }
            Update::Forget { id } => {
                self.answers.remove(&id);
            }
        }
    }
}

/// Starts the output processor thread; it ends when the engine drops the sender of `updates`.
pub(super) fn spawn(prompter: Arc<Prompter>, updates: Receiver<Vec<Update>>) {
    let mut processor = Processor {
        prompter,
        answers: HashMap::new(),
    };
    std::thread::Builder::new()
        .name("generator-output".into())
        .spawn(move || {
            while let Ok(step) = updates.recv() {
                for update in step {
                    processor.apply(update);
                }
            }
        })
        .expect("spawning the output thread");
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
