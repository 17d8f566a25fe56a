//! Our BLEU and ROUGE agree with the reference implementations (`sacrebleu` corpus BLEU with
//! its defaults; `rouge-score` with stemming) within 0.01 points on real prediction/target pairs.
//! The test installs the reference packages with pip (cached under target/).

#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ghostwriter::eval::{metrics, protocol};
use ghostwriter::loaders;

const SCRIPT: &str = r#"
import json, sys
from sacrebleu.metrics import BLEU
from rouge_score import rouge_scorer
pairs = json.load(sys.stdin)
preds = [p for p, _ in pairs]
refs = [t for _, t in pairs]
bleu = BLEU().corpus_score(preds, [refs]).score
scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
rouge = []
for p, t in pairs:
    s = scorer.score(t, p)
    rouge.append([s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeL"].fmeasure])
json.dump({"bleu": bleu, "rouge": rouge}, sys.stdout)
"#;

fn reference_site() -> PathBuf {
    let site = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("metrics-reference");
    if !site.join("sacrebleu").is_dir() || !site.join("rouge_score").is_dir() {
        common::pip_install(&site, &["sacrebleu==2.6.0", "rouge-score==0.1.2"]);
    }
    site
}

/// Real pairs: a review's immediate context followed by the same author's previous review,
/// against the review (what the copy baseline predicts), plus some exact and empty cases.
fn pairs() -> Option<Vec<(String, String)>> {
    let path = common::amazon_docs()?;
    let loaded = loaders::load(&path).unwrap();
    let mut by_user: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for d in loaded.documents {
        by_user.entry(d.user_id.clone()).or_default().push(d);
    }
    let mut out = Vec::new();
    for docs in by_user.values().step_by(5) {
        for w in docs.windows(2).take(2) {
            let target = protocol::full_text(&w[1].title, &w[1].text);
            let context: String = target.chars().take(protocol::CONTEXT_CHARS).collect();
            out.push((format!("{context} {}", w[0].text), target));
        }
    }
    out.truncate(300);
    out.push(("identical text here.".into(), "identical text here.".into()));
    out.push(("".into(), "a target with no prediction".into()));
    Some(out)
}

#[test]
fn bleu_and_rouge_match_sacrebleu_and_rouge_score() {
    let _slot = crate::common::slot(module_path!());
    let Some(pairs) = pairs() else { return };
    assert!(pairs.len() >= 200);
    let site = reference_site();
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .env("PYTHONPATH", &site)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&pairs).unwrap().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "reference script failed");
    let reference: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    let ours_bleu = metrics::corpus_bleu(pairs.iter().map(|(p, t)| (p.as_str(), t.as_str())));
    let ref_bleu = reference["bleu"].as_f64().unwrap();
    assert!(
        (ours_bleu - ref_bleu).abs() < 0.01,
        "BLEU {ours_bleu} vs sacrebleu {ref_bleu}"
    );

    let mut sums = [[0.0f64; 3]; 2];
    for (i, (p, t)) in pairs.iter().enumerate() {
        let ours = metrics::rouge(t, p);
        let r = &reference["rouge"][i];
        let theirs = [
            r[0].as_f64().unwrap(),
            r[1].as_f64().unwrap(),
            r[2].as_f64().unwrap(),
        ];
        for (k, (a, b)) in [ours.r1, ours.r2, ours.rl].iter().zip(theirs).enumerate() {
            assert!(
                (100.0 * (a - b)).abs() < 0.01,
                "pair {i} ROUGE[{k}] {a} vs {b}:\n{p}\n---\n{t}"
            );
            sums[0][k] += a;
            sums[1][k] += b;
        }
    }
    let n = pairs.len() as f64;
    for (ours, theirs) in sums[0].iter().zip(&sums[1]) {
        assert!((100.0 * (ours - theirs) / n).abs() < 0.01);
    }
    eprintln!(
        "{} pairs: BLEU {ours_bleu:.4} (sacrebleu {ref_bleu:.4}); mean R-1 {:.4}",
        pairs.len(),
        100.0 * sums[0][0] / pairs.len() as f64
    );
}
