//! The evaluation harness end to end: real services, real data, results appended as they
//! finish, and an interrupted run resumed without recomputing finished examples.

#![allow(clippy::unwrap_used)]

use crate::common;

use ghostwriter::eval::{self, EvalArgs, protocol::Split};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_runs_and_resumes() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = common::amazon_docs() else { return };
    let out = tempfile::tempdir().unwrap();
    let args = EvalArgs {
        remote: Default::default(),
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
    // Each row names its generator: the base model alone unless --adapter says otherwise.
    let written = summary
        .presets
        .iter()
        .find(|p| p.preset == "immediate-context")
        .unwrap();
    assert!(
        !written.generator.is_empty() && !written.generator.contains('+'),
        "{}",
        written.generator
    );
    // The voice score: the generated continuations and the true ones (the ceiling), each an AUC
    // with its interval.
    let ceiling = summary
        .voice_ceiling
        .as_ref()
        .expect("the ceiling's voice score");
    // At most the 3 examples (a text too short to judge is left out).
    assert!((1..=3).contains(&ceiling.examples), "{}", ceiling.examples);
    assert!(ceiling.ci_low <= ceiling.auc && ceiling.auc <= ceiling.ci_high);
    let voice = written
        .voice_auc
        .expect("a voice score for a generating preset");
    assert!((0.0..=1.0).contains(&voice), "{voice}");
    assert!(
        written.voice_auc_ci_low.unwrap() <= voice && voice <= written.voice_auc_ci_high.unwrap()
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

/// `eval-distinguish` on real data: every protocol pairs each validation target with its
/// author and with an impostor, and the shipped style verifier tells them apart better than
/// chance and than the char 3-gram baseline on the profile protocol; the report file holds the
/// protocols with their intervals and calibration error.
#[test]
fn distinction_evaluation_reports_every_protocol_with_intervals() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = common::amazon_docs() else { return };
    let out = tempfile::tempdir().unwrap();
    let args = ghostwriter::train::distinguish::EvalArgs {
        data,
        split: Split::Validation,
        protocols: Vec::new(),
        model: None,
        llm: false,
        adapter: None,
        llm_targets: 0,
        bootstrap: 200,
        seed: 7,
        embedding_cache: None,
        out: out.path().join("report.json"),
    };
    let report = ghostwriter::train::distinguish::evaluate(args, common::model_dir()).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    // The file holds the same report (floats compared as the file can hold them).
    assert_eq!(
        serde_json::to_string(&written["protocols"]).unwrap(),
        serde_json::to_string(
            &serde_json::from_str::<serde_json::Value>(
                &serde_json::to_string(&report["protocols"]).unwrap()
            )
            .unwrap()
        )
        .unwrap()
    );
    let protocols = report["protocols"].as_array().unwrap();
    let names: Vec<&str> = protocols
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["random", "matched", "profile"]);
    for p in protocols {
        let pairs = p["pairs"].as_u64().unwrap();
        assert!(pairs >= 40 && pairs % 2 == 0, "{p}");
        let (auc, low, high) = (
            p["auc"].as_f64().unwrap(),
            p["auc_ci_low"].as_f64().unwrap(),
            p["auc_ci_high"].as_f64().unwrap(),
        );
        assert!(low <= auc && auc <= high, "{p}");
        assert!(
            p["baseline_auc"].as_f64().is_some() && p["llm_auc"].is_null(),
            "{p}"
        );
        let ece = p["expected_calibration_error"].as_f64().unwrap();
        eprintln!(
            "{}: AUC {auc:.3} [{low:.3}, {high:.3}], ECE {ece:.3}",
            p["name"]
        );
        assert!(ece < 0.2, "{p}");
    }
    let profile = &protocols[2];
    assert!(profile["auc_ci_low"].as_f64().unwrap() > 0.5, "{profile}");
    assert!(
        profile["auc"].as_f64().unwrap() > profile["baseline_auc"].as_f64().unwrap(),
        "{profile}"
    );
}
