//! The evaluation harness end to end: real services, real data, results appended as they
//! finish, and an interrupted run resumed without recomputing finished examples.

#![allow(clippy::unwrap_used)]

mod common;

use ghostwriter::eval::{self, EvalArgs, protocol::Split};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_runs_and_resumes() {
    let Some(data) = common::amazon_docs() else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let args = EvalArgs {
        to: None,
        data,
        presets: vec!["immediate-context".into(), "copy-best".into()],
        split: Split::Test,
        limit: Some(3),
        concurrency: 2,
        max_new_tokens: 8,
        num_beams: 2,
        length_penalty: 1.0,
        seed: 7,
        out: out.path().to_path_buf(),
        bootstrap: 200,
        no_ingest: false,
        timeout: 300,
        adapter: None,
        token: None,
    };
    let summary = eval::run(args.clone(), common::model_dir()).await.unwrap();
    assert_eq!(summary.presets.len(), 2);
    assert!(summary.presets.iter().all(|p| p.examples == 3));
    let copy = summary
        .presets
        .iter()
        .find(|p| p.preset == "copy-best")
        .unwrap();
    assert!(copy.rouge1 > 0.0 && copy.rouge1_vs_baseline.is_some());
    // copy-best pastes the top-ranked past document: its 8-grams are all found there.
    assert!(copy.copy_rate > 0.9, "copy rate {}", copy.copy_rate);
    assert!(
        copy.empty_words_share.is_none(),
        "copy-best has no synthesis"
    );
    let results = out.path().join("results.jsonl");
    let first = eval::read_records(&results).unwrap();
    assert_eq!(first.len(), 6);
    for r in &first {
        assert!(
            r.target
                .starts_with(r.prediction.chars().take(20).collect::<String>().as_str()),
            "prediction starts with the immediate context"
        );
    }

    // Interrupt: keep four results and half of the fifth line.
    let text = std::fs::read_to_string(&results).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = format!(
        "{}\n{}",
        lines[..4].join("\n"),
        &lines[4][..lines[4].len() / 2]
    );
    std::fs::write(&results, cut).unwrap();
    let summary = eval::run(args, common::model_dir()).await.unwrap();
    assert!(summary.presets.iter().all(|p| p.examples == 3));
    let second = eval::read_records(&results).unwrap();
    assert_eq!(
        second.len(),
        6,
        "exactly the two missing results were recomputed"
    );
    for (a, b) in first[..4].iter().zip(&second[..4]) {
        assert_eq!(
            (&a.preset, &a.doc_id, a.latency_ms),
            (&b.preset, &b.doc_id, b.latency_ms),
            "finished results are kept as they were"
        );
    }
    let table = std::fs::read_to_string(out.path().join("table.md")).unwrap();
    assert!(table.contains("| copy-best |") && table.contains("| immediate-context |"));
    assert!(
        std::fs::read_to_string(out.path().join("rouge1.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(json["presets"][0]["examples"], 3);
}

/// `eval-distinguish` on real data: each target judged once against its author (only documents
/// written before it) and once against another user of the split, every judgement in the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinction_evaluation_judges_each_target_against_its_author_and_another_user() {
    let Some(data) = common::amazon_docs() else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let args = ghostwriter::train::distinguish::EvalArgs {
        to: None,
        data: data.clone(),
        split: Split::Validation,
        targets: 3,
        adapter: None,
        concurrency: 2,
        max_documents: 2,
        author_history: ghostwriter::train::distinguish::AuthorHistory::Before,
        seed: 7,
        out: out.path().join("report.json"),
    };
    let report = ghostwriter::train::distinguish::evaluate(args, common::model_dir())
        .await
        .unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    // The file holds the report (floats compared loosely: JSON does not round-trip f32s).
    assert_eq!(written["judgements"].as_array().unwrap().len(), 6);
    assert!(
        (written["roc_auc"].as_f64().unwrap() - report["roc_auc"].as_f64().unwrap()).abs() < 1e-9
    );
    assert_eq!(report["pairs"], 6);
    let judgements = report["judgements"].as_array().unwrap();
    assert_eq!(judgements.len(), 6);
    let docs: std::collections::HashMap<String, ghostwriter::proto::Document> =
        ghostwriter::loaders::load(&data)
            .unwrap()
            .documents
            .into_iter()
            .map(|d| (d.doc_id.clone(), d))
            .collect();
    let mut targets = std::collections::BTreeMap::new();
    for j in judgements {
        let (user, author) = (
            j["user_id"].as_str().unwrap(),
            j["author"].as_str().unwrap(),
        );
        let same = j["same_author"].as_bool().unwrap();
        assert_eq!(same, user == author, "{j}");
        assert!((0.0..=1.0).contains(&j["probability"].as_f64().unwrap()));
        let target = &docs[j["doc_id"].as_str().unwrap()];
        let compared = j["compared"].as_array().unwrap();
        assert!(!compared.is_empty() && compared.len() <= 2, "{j}");
        for c in compared {
            let d = &docs[c.as_str().unwrap()];
            // Only the judged user's documents, never the text itself; the author's only
            // from before it.
            assert_eq!(d.user_id, user);
            assert_ne!(d.doc_id, target.doc_id);
            if same {
                assert!(
                    (d.timestamp, &d.doc_id) < (target.timestamp, &target.doc_id),
                    "{j}"
                );
            }
        }
        *targets.entry(target.doc_id.clone()).or_insert(0) += 1;
    }
    assert!(targets.values().all(|n| *n == 2), "{targets:?}");
    let same = judgements
        .iter()
        .filter(|j| j["same_author"] == true)
        .count();
    assert_eq!(same, 3);
}
