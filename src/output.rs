//! Rendering API responses for people (`write`) and for programs (`write --json`).

use ghostwriter_proto::v1::{FinishReason, Provenance, WriteResponse};
use serde_json::{Value, json};

/// The provenance as JSON.
pub fn provenance_json(p: &Provenance) -> Value {
    json!({
        "preset": p.preset,
        "immediate_context": p.immediate_context,
        "doc_ids": p.doc_ids,
        "summary": p.summary,
        "important_words": p.important_words,
        "no_history": p.no_history,
        "history_size": p.history_size,
        "latencies_ms": p.latencies.iter().map(|l| (l.stage.clone(), json!(l.millis))).collect::<serde_json::Map<_, _>>(),
        "total_ms": p.total_millis,
        "generator_resumptions": p.generator_resumptions,
    })
}

/// The whole response as JSON.
pub fn write_response_json(r: &WriteResponse) -> Value {
    let g = r.generation.clone().unwrap_or_default();
    json!({
        "text": r.text,
        "document": r.document,
        "provenance": r.provenance.as_ref().map(provenance_json),
        "generation": {
            "model": g.model,
            "prompt_tokens": g.prompt_tokens,
            "generated_tokens": g.generated_tokens,
            "cached_prompt_tokens": g.cached_prompt_tokens,
            "finish_reason": FinishReason::try_from(g.finish_reason).map(|f| f.as_str_name()).unwrap_or("UNKNOWN"),
            "tokens_per_second": g.tokens_per_second,
        },
    })
}

/// A short human summary of the provenance, one fact a line.
pub fn provenance_text(p: &Provenance) -> String {
    let mut out = format!("preset: {}\n", p.preset);
    if p.no_history {
        out.push_str("history: none (generated from the immediate context alone)\n");
    } else {
        out.push_str(&format!("history: {} earlier documents\n", p.history_size));
    }
    if !p.doc_ids.is_empty() {
        out.push_str(&format!("documents used: {}\n", p.doc_ids.join(", ")));
    }
    if !p.summary.is_empty() {
        out.push_str(&format!("summary: {}\n", p.summary));
    }
    if !p.important_words.is_empty() {
        out.push_str(&format!(
            "important words: {}\n",
            p.important_words.join(", ")
        ));
    }
    let stages: Vec<String> = p
        .latencies
        .iter()
        .map(|l| format!("{} {:.0} ms", l.stage, l.millis))
        .collect();
    out.push_str(&format!(
        "latency: {} (total {:.0} ms)\n",
        stages.join(", "),
        p.total_millis
    ));
    out
}
