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
//!   or of another training user (`false`), half and half; the other document is drawn at
//!   random, or (`--distinction-pairs matched`) is the one the served `Distinguish` compares
//!   with, the best retrieval match for the start.

use std::collections::BTreeMap;

use anyhow::Context;
use ghostwriter_embed::{Embedder, cosine};
use ghostwriter_generator::model::Prompter;
use ghostwriter_generator::prompt::{self, Parts};
use ghostwriter_orchestrator::{OrchestratorService, preset};
use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::retriever_client::RetrieverClient;
use ghostwriter_proto::v1::{Document, RetrieveRequest, SummaryMode, WriteOptions, WriteRequest};
use tonic::transport::Channel;

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
        consistency_token: Default::default(),
        adapter: String::new(),
    };
    let (generate, provenance) = orchestrator
        .generator_input(request)
        .await
        .map_err(|e| anyhow::anyhow!("preparing {}: {e}", example.doc_id))?;
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

/// How the second document of an author-distinction pair is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DistinctionPairs {
    /// Any other document of the same user, or any document of a random other user (the
    /// paper's framing). "Same topic" then predicts "same author" well.
    Random,
    /// The document the served `Distinguish` would compare with: the same user's best BM25 match
    /// for the start among their earlier documents, or the other user's best match among all
    /// of theirs. Both sides are on topic, so only the writing tells them apart.
    Matched,
}

/// The user an `i`-th pair compares with: the start's own for even `i`, else a random other
/// user of `users` (`None` when nine draws find none).
fn partner_user<'a>(
    rng: &mut Rng,
    users: &[&'a String],
    own: &'a String,
    i: usize,
) -> Option<&'a String> {
    if i.is_multiple_of(2) {
        return Some(own);
    }
    (0..9)
        .map(|_| users[rng.below(users.len())])
        .find(|u| *u != own)
}

/// The other document of each author-distinction pair: for the `i`-th of `starts` (a training
/// example), `(i, document, same author)`, the author's own for even `i` and another user's of
/// `by_user` for odd ones. `retriever` picks the documents for [`DistinctionPairs::Matched`];
/// random pairs draw them with `seed`. A start with no document to pair is left out.
pub async fn distinction_partners(
    starts: &[&Example],
    by_user: &BTreeMap<String, Vec<Document>>,
    pairs: DistinctionPairs,
    mut retriever: Option<&mut RetrieverClient<Channel>>,
    seed: u64,
) -> anyhow::Result<Vec<(usize, Document, bool)>> {
    let users: Vec<&String> = by_user.keys().collect();
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for (i, e) in starts.iter().enumerate() {
        let Some(own) = by_user.get_key_value(&e.user_id).map(|(k, _)| k) else {
            continue;
        };
        let Some(user) = partner_user(&mut rng, &users, own, i) else {
            continue;
        };
        let same = user == own;
        let other = match (pairs, retriever.as_deref_mut()) {
            (DistinctionPairs::Random, _) => {
                let docs: Vec<&Document> = by_user[user]
                    .iter()
                    .filter(|d| !same || d.doc_id != e.doc_id)
                    .collect();
                if docs.is_empty() {
                    continue;
                }
                docs[rng.below(docs.len())].clone()
            }
            (DistinctionPairs::Matched, Some(retriever)) => {
                // As `Distinguish` and `eval-distinguish` ask: the author's history before the
                // start; another user's whole.
                let found = retriever
                    .retrieve(RetrieveRequest {
                        user_id: user.clone(),
                        query: e.context(),
                        before_timestamp: same.then_some(e.timestamp),
                        current_doc_id: if same {
                            e.doc_id.clone()
                        } else {
                            String::new()
                        },
                        limit: 1,
                        term_statistics: false,
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("retrieving a distinction pair: {}", s.message()))?
                    .into_inner();
                match found.documents.into_iter().find_map(|c| c.document) {
                    Some(d) => d,
                    None => continue,
                }
            }
            (DistinctionPairs::Matched, None) => {
                anyhow::bail!("matched distinction pairs need the retriever")
            }
        };
        out.push((i, other, same));
    }
    Ok(out)
}

/// Author-distinction examples from [`distinction_partners`]: the start's first 150 characters
/// against the other document's first 600, answered `true` or `false`.
pub fn distinction_examples(
    prompter: &Prompter,
    system: &str,
    starts: &[&Example],
    partners: &[(usize, Document, bool)],
    lengths: Lengths,
) -> anyhow::Result<Vec<TrainExample>> {
    let true_id = prompter.encode_plain("true")?;
    let false_id = prompter.encode_plain("false")?;
    let mut out = Vec::new();
    for (i, other, same) in partners {
        let e = starts[*i];
        let second: String = full_text(&other.title, &other.text)
            .chars()
            .take(600)
            .collect();
        let ids = prompter.encode(&prompt::distinction(system, &e.context(), &second))?;
        let answer = if *same {
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
