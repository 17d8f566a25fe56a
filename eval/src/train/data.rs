//! Fine-tuning examples, built by the real stages from training-split users only.
//!
//! - **Generation**: the exact generator input a write with the preset gets (retrieval,
//!   ranking and synthesis run in the embedded pipeline; the target's own timestamp and id keep
//!   its history strictly earlier), rendered by the generator's prompt code; the target is the
//!   rest of the document. Where the preset has a context-dependent summary (SumCtx), the
//!   summary is the paper's weak label built from the *true* document: for each of its
//!   snippets, the most similar not-yet-picked snippet of the ranked entries (MiniLM cosine),
//!   joined and cut to the summary budget. Serving uses the summarizer instead.
//! - **Author distinction**: a document start and another document of the same user (`true`)
//!   or of another training user (`false`), half and half.

use std::collections::BTreeMap;

use anyhow::Context;
use ghostwriter_embed::{Embedder, cosine};
use ghostwriter_generator::model::Prompter;
use ghostwriter_generator::prompt::{self, Parts};
use ghostwriter_orchestrator::{OrchestratorService, preset};
use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::{Document, SummaryMode, WriteOptions, WriteRequest};

use crate::Rng;
use crate::protocol::{Example, full_text};

/// What an example teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Task {
    /// Continue a document (with the named preset's input).
    Generation,
    /// Answer whether two passages share an author.
    Distinction,
}

/// One tokenized example.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainExample {
    /// Task.
    pub task: Task,
    /// Preset of a generation example.
    pub preset: String,
    /// Author (of the first passage).
    pub user_id: String,
    /// Prompt and answer token ids.
    pub ids: Vec<u32>,
    /// Tokens of the prompt (the loss covers the rest).
    pub prompt: usize,
}

impl TrainExample {
    /// Tokens the loss predicts: every token after the prompt (the first token is never
    /// predicted).
    pub fn answer_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.prompt.max(1))
    }
}

/// Limits on example length.
#[derive(Debug, Clone, Copy)]
pub struct Lengths {
    /// Answer tokens kept (a document's rest is cut there).
    pub max_target_tokens: usize,
    /// Examples longer than this in all are skipped.
    pub max_tokens: usize,
}

/// Builds one generation example for `preset` through `orchestrator`.
#[allow(clippy::too_many_arguments)]
pub async fn generation_example(
    orchestrator: &OrchestratorService,
    prompter: &Prompter,
    embedder: &Embedder,
    system: &str,
    example: &Example,
    preset_name: &str,
    summary_chars: usize,
    lengths: Lengths,
) -> anyhow::Result<Option<TrainExample>> {
    let preset =
        preset::find(preset_name).with_context(|| format!("unknown preset {preset_name}"))?;
    anyhow::ensure!(
        preset.generate,
        "preset {preset_name} does not generate: nothing to train"
    );
    anyhow::ensure!(
        preset.summary != Some(SummaryMode::Independent),
        "preset {preset_name} uses the LLM summary of SumCtxInd, which has no weak label"
    );
    let request = WriteRequest {
        user_id: example.user_id.clone(),
        title: example.title.clone(),
        start: example.text.clone(),
        preset: preset_name.to_string(),
        timestamp: Some(example.timestamp),
        doc_id: example.doc_id.clone(),
        options: Some(WriteOptions {
            disable_summary: true,
            ..Default::default()
        }),
    };
    let (generate, provenance) = orchestrator
        .generator_input(request)
        .await
        .map_err(|s| anyhow::anyhow!("preparing {}: {}", example.doc_id, s.message()))?;
    let Some(Input::Personalized(input)) = generate.input else {
        anyhow::bail!("the orchestrator did not build a personalized input");
    };
    let target = example.target();
    let Some(rest) = target.strip_prefix(provenance.immediate_context.as_str()) else {
        return Ok(None);
    };
    let mut summary = String::new();
    if preset.summary == Some(SummaryMode::Context) && !input.past_passages.is_empty() {
        summary = weak_summary(embedder, &target, &input.past_passages, summary_chars)?;
    }
    let parts = Parts {
        passage_start: input.passage_start.clone(),
        summary,
        important_words: input.important_words.clone(),
        past_passages: input.past_passages.clone(),
        omit_passage_start: input.omit_passage_start,
    };
    let ids = prompter.encode(&prompt::personalized(system, &parts))?;
    let mut answer = prompter.encode_plain(rest)?;
    // A document cut short is not taught to end there.
    let whole = answer.len() <= lengths.max_target_tokens;
    answer.truncate(lengths.max_target_tokens);
    Ok(finish(
        prompter,
        Task::Generation,
        preset_name,
        &example.user_id,
        ids,
        answer,
        whole,
        lengths,
    ))
}

/// The paper's weak SumCtx label.
pub fn weak_summary(
    embedder: &Embedder,
    target: &str,
    entries: &[String],
    max_chars: usize,
) -> anyhow::Result<String> {
    let truth = ghostwriter_common::text::snippets(target);
    let pool: Vec<String> = entries
        .iter()
        .flat_map(|e| ghostwriter_common::text::snippets(e))
        .collect();
    if truth.is_empty() || pool.is_empty() {
        return Ok(String::new());
    }
    let t: Vec<&str> = truth.iter().map(String::as_str).collect();
    let p: Vec<&str> = pool.iter().map(String::as_str).collect();
    let te = embedder.embed(&t)?;
    let pe = embedder.embed(&p)?;
    let mut picked = vec![false; pool.len()];
    let mut out = String::new();
    for e in &te {
        let best = pe
            .iter()
            .enumerate()
            .filter(|(i, _)| !picked[*i])
            .max_by(|a, b| cosine(e, a.1).total_cmp(&cosine(e, b.1)));
        let Some((i, _)) = best else { break };
        picked[i] = true;
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(pool[i].trim());
        if out.chars().count() >= max_chars {
            break;
        }
    }
    Ok(out.chars().take(max_chars).collect())
}

/// Author-distinction examples: for each of `starts` (a training example), one pair, `true`
/// for even indices (another earlier-or-later document of the same user) and `false` for odd
/// ones (a document of another user in `by_user`).
pub fn distinction_examples(
    prompter: &Prompter,
    system: &str,
    starts: &[&Example],
    by_user: &BTreeMap<String, Vec<Document>>,
    seed: u64,
    lengths: Lengths,
) -> anyhow::Result<Vec<TrainExample>> {
    let users: Vec<&String> = by_user.keys().collect();
    let mut rng = Rng::new(seed);
    let true_id = prompter.encode_plain("true")?;
    let false_id = prompter.encode_plain("false")?;
    let mut out = Vec::new();
    for (i, e) in starts.iter().enumerate() {
        let same = i % 2 == 0;
        let other = if same {
            let docs = &by_user[&e.user_id];
            let others: Vec<&Document> = docs.iter().filter(|d| d.doc_id != e.doc_id).collect();
            if others.is_empty() {
                continue;
            }
            others[rng.below(others.len())]
        } else {
            let mut pick = users[rng.below(users.len())];
            for _ in 0..8 {
                if *pick != e.user_id {
                    break;
                }
                pick = users[rng.below(users.len())];
            }
            if *pick == e.user_id {
                continue;
            }
            let docs = &by_user[pick];
            &docs[rng.below(docs.len())]
        };
        let second: String = full_text(&other.title, &other.text)
            .chars()
            .take(600)
            .collect();
        let ids = prompter.encode(&prompt::distinction(system, &e.context(), &second))?;
        let answer = if same {
            true_id.clone()
        } else {
            false_id.clone()
        };
        if let Some(x) = finish(
            prompter,
            Task::Distinction,
            "",
            &e.user_id,
            ids,
            answer,
            true,
            lengths,
        ) {
            out.push(x);
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    prompter: &Prompter,
    task: Task,
    preset: &str,
    user: &str,
    mut ids: Vec<u32>,
    answer: Vec<u32>,
    end: bool,
    lengths: Lengths,
) -> Option<TrainExample> {
    let prompt = ids.len();
    ids.extend(answer);
    if end {
        ids.extend(prompter.special_id("<|im_end|>"));
    }
    (ids.len() <= lengths.max_tokens && ids.len() > prompt).then(|| TrainExample {
        task,
        preset: preset.to_string(),
        user_id: user.to_string(),
        ids,
        prompt,
    })
}
