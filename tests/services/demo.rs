//! The README's first command: `ghostwriter demo` writes a new review with the shipped
//! fine-tuned adapter, where the zero-shot model pastes the user's past reviews.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::process::Command;

/// The demo's stdout: the title, then the document (start and continuation).
fn demo(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ghostwriter"))
        .arg("demo")
        .arg("--model-dir")
        .arg(common::model_dir())
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Share of the continuation's 8-grams found verbatim in the demo corpus (the user's past
/// reviews) or the start (repeating it is a copy too), as the evaluation measures copying, and
/// the continuation's length in words.
fn copy_rate(output: &str) -> (f64, usize) {
    const START: &str =
        "I have gone through three capos in two years, so I did not expect much from this one.";
    let continuation = output.split_once(START).map(|(_, rest)| rest).unwrap_or("");
    let past: Vec<String> = include_str!("../../demo/corpus.jsonl")
        .lines()
        .map(|l| {
            let d: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", d["title"], d["text"])
        })
        .collect();
    let mut sources: Vec<&str> = past.iter().map(String::as_str).collect();
    sources.push(START);
    let rate = ghostwriter::eval::report::copy_rate(continuation, &sources).unwrap_or(0.0);
    (rate, continuation.split_whitespace().count())
}

#[test]
fn the_demo_writes_a_new_review_not_a_paste() {
    let _slot = crate::common::slot(module_path!());
    let tuned = demo(&[]);
    let zero = demo(&["--zero-shot"]);
    let ((tuned_copy, tuned_words), (zero_copy, _)) = (copy_rate(&tuned), copy_rate(&zero));
    eprintln!(
        "fine-tuned: {tuned_copy:.2} of 8-grams copied, {tuned_words} words; zero-shot: {zero_copy:.2}"
    );
    assert!(
        tuned_words >= 20,
        "a continuation of {tuned_words} words:\n{tuned}"
    );
    assert!(
        tuned_copy < 0.1,
        "the fine-tuned demo pastes ({tuned_copy:.2}):\n{tuned}"
    );
    assert!(
        zero_copy > tuned_copy,
        "the zero-shot model copies no more than the fine-tuned one ({zero_copy:.2}):\n{zero}"
    );
}
