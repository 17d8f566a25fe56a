//! The README's first command: `ghostwriter demo` writes a new review with the shipped
//! fine-tuned adapter, where the zero-shot model pastes the user's past reviews.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::process::Command;

/// The demo's stdout: the title, then the document (start and continuation).
fn demo(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ghostwriter"))
        .arg("--model-dir")
        .arg(common::model_dir())
        .arg("demo")
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

fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Share of the continuation's 8-grams found verbatim in the demo corpus (the user's past
/// reviews), and the continuation's length in words.
fn copy_rate(output: &str) -> (f64, usize) {
    const START: &str =
        "I have gone through three capos in two years, so I did not expect much from this one.";
    let continuation = output.split_once(START).map(|(_, rest)| rest).unwrap_or("");
    let corpus = include_str!("../demo/corpus.jsonl");
    let past: HashSet<Vec<String>> = corpus
        .lines()
        .flat_map(|l| {
            let d: serde_json::Value = serde_json::from_str(l).unwrap();
            let w = words(&format!("{} {}", d["title"], d["text"]));
            w.windows(8).map(<[String]>::to_vec).collect::<Vec<_>>()
        })
        .collect();
    let mine = words(continuation);
    // The start repeated is a copy too.
    let grams: Vec<Vec<String>> = mine.windows(8).map(<[String]>::to_vec).collect();
    let start: HashSet<Vec<String>> = words(START).windows(8).map(<[String]>::to_vec).collect();
    let copied = grams
        .iter()
        .filter(|g| past.contains(*g) || start.contains(*g))
        .count();
    (copied as f64 / grams.len().max(1) as f64, mine.len())
}

#[test]
fn the_demo_writes_a_new_review_not_a_paste() {
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
