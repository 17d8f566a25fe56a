//! The paper's data protocol: per-user dedupe; a target is a document longer than 300
//! characters whose author has at least 2 earlier documents; users with at least 5 targets; at
//! most 50 targets a user; users split 85/5/10 by a stable hash of the user id.

use std::collections::{BTreeMap, HashSet};

use ghostwriter_proto::v1::Document;
use serde::{Deserialize, Serialize};

/// The paper's immediate-context length.
pub const CONTEXT_CHARS: usize = 150;
/// A target is longer than this (title and body joined).
pub const MIN_TARGET_CHARS: usize = 300;
/// A target's author has at least this many earlier documents.
pub const MIN_HISTORY: usize = 2;
/// Users need at least this many targets.
pub const MIN_TARGETS_PER_USER: usize = 5;
/// At most this many targets a user (the earliest ones).
pub const MAX_TARGETS_PER_USER: usize = 50;

/// Which part of the users a user belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// 85% of users.
    Train,
    /// 5% of users.
    Validation,
    /// 10% of users.
    Test,
}

/// FNV-1a, 64 bit: stable across runs, machines and Rust versions (unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The split of a user: FNV-1a of the id modulo 100; < 85 train, < 90 validation, else test.
pub fn split_of(user_id: &str) -> Split {
    match fnv1a(user_id.as_bytes()) % 100 {
        0..=84 => Split::Train,
        85..=89 => Split::Validation,
        _ => Split::Test,
    }
}

/// The whole document as the paper scores it: title and body joined.
pub fn full_text(title: &str, text: &str) -> String {
    ghostwriter_common::text::document_text(title, text)
}

/// One evaluation example.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Example {
    /// Author.
    pub user_id: String,
    /// The target document's id.
    pub doc_id: String,
    /// Its timestamp.
    pub timestamp: i64,
    /// Its title.
    pub title: String,
    /// Its body.
    pub text: String,
    /// Earlier documents of the author.
    pub history: usize,
    /// Split of the author.
    pub split: Split,
}

impl Example {
    /// The whole target (title and body).
    pub fn target(&self) -> String {
        full_text(&self.title, &self.text)
    }

    /// The immediate context: the first 150 characters of the target.
    pub fn context(&self) -> String {
        self.target().chars().take(CONTEXT_CHARS).collect()
    }
}

/// Deduplicated documents and the examples drawn from them.
#[derive(Debug, Default)]
pub struct Dataset {
    /// Every user's documents, identical ones removed (these are ingested).
    pub documents: Vec<Document>,
    /// Targets, every split.
    pub examples: Vec<Example>,
}

/// Applies the protocol to raw documents.
pub fn build(documents: Vec<Document>) -> Dataset {
    let mut by_user: BTreeMap<String, Vec<Document>> = BTreeMap::new();
    for d in documents {
        by_user.entry(d.user_id.clone()).or_default().push(d);
    }
    let mut out = Dataset::default();
    for (user, mut docs) in by_user {
        docs.sort_by(|a, b| (a.timestamp, &a.doc_id).cmp(&(b.timestamp, &b.doc_id)));
        let mut seen = HashSet::new();
        docs.retain(|d| seen.insert((d.title.trim().to_string(), d.text.trim().to_string())));
        let split = split_of(&user);
        let targets: Vec<Example> = docs
            .iter()
            .enumerate()
            .filter(|(i, d)| {
                *i >= MIN_HISTORY && full_text(&d.title, &d.text).chars().count() > MIN_TARGET_CHARS
            })
            .take(MAX_TARGETS_PER_USER)
            .map(|(i, d)| Example {
                user_id: user.clone(),
                doc_id: d.doc_id.clone(),
                timestamp: d.timestamp,
                title: d.title.clone(),
                text: d.text.clone(),
                history: i,
                split,
            })
            .collect();
        if targets.len() >= MIN_TARGETS_PER_USER {
            out.examples.extend(targets);
        }
        out.documents.extend(docs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(user: &str, id: &str, ts: i64, len: usize) -> Document {
        Document {
            user_id: user.into(),
            doc_id: id.into(),
            timestamp: ts,
            title: String::new(),
            text: format!("{id}{}", "x".repeat(len)),
        }
    }

    #[test]
    fn split_is_stable_and_roughly_85_5_10() {
        // Pinned values: the split must never change between runs or machines.
        assert_eq!(fnv1a(b"A2EZWZ8MBEDOLN"), fnv1a(b"A2EZWZ8MBEDOLN"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let n = 20_000;
        let test = (0..n)
            .filter(|i| split_of(&format!("user{i}")) == Split::Test)
            .count();
        let val = (0..n)
            .filter(|i| split_of(&format!("user{i}")) == Split::Validation)
            .count();
        assert!((1700..2300).contains(&test), "{test}");
        assert!((700..1300).contains(&val), "{val}");
    }

    #[test]
    fn targets_follow_the_protocol() {
        let b = doc("u", "b", 2, 400);
        let b2 = Document {
            doc_id: "b2".into(),
            ..b.clone()
        };
        let mut docs = vec![doc("u", "a", 1, 400), b, b2];
        // b2 duplicates b's text: removed.
        for i in 3..10 {
            docs.push(doc(
                "u",
                &format!("d{i}"),
                i,
                if i == 5 { 100 } else { 301 + i as usize },
            ));
        }
        docs.push(doc("v", "only", 1, 1000));
        let ds = build(docs);
        let ids: Vec<&str> = ds.examples.iter().map(|e| e.doc_id.as_str()).collect();
        // a and b lack 2 earlier documents; b2 duplicates b; d5 is too short.
        assert_eq!(ids, vec!["d3", "d4", "d6", "d7", "d8", "d9"]);
        assert_eq!(ds.examples[0].history, 2);
        assert_eq!(
            ds.documents.len(),
            10,
            "duplicate removed, user v kept for ingest"
        );
    }
}
