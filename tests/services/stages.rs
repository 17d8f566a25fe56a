//! Stage lifecycle: health reports SERVING only once models are loaded, a stopped stage gives
//! UNAVAILABLE naming it, and the generator's tokenizer matches the model's vocabulary.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use ghostwriter::proto::generator_client::GeneratorClient;
use ghostwriter::proto::{GenerateRequest, GenerationParams, PersonalizedInput, WriteRequest};
use ghostwriter_common::shutdown;
use ghostwriter_common::stage::StageKind;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_only_once_the_model_is_loaded() {
    let _slot = crate::common::slot(module_path!());
    let models = common::model_dir();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (trigger, stop) = shutdown::channel();
    let config = common::config(std::env::temp_dir()).generator;
    let server = tokio::spawn(async move {
        let transport = ghostwriter_transport::Transport::default();
        ghostwriter_generator::serve(config, models, listener, stop, &transport).await
    });
    let mut health = HealthClient::new(ghostwriter_transport::client::channel(&url, None).unwrap());
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let first = health
        .check(check("ghostwriter.v1.Generator"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.status(),
        ServingStatus::NotServing,
        "SERVING before the model loaded"
    );
    let mut generator = GeneratorClient::connect(url.clone()).await.unwrap();
    let request = GenerateRequest {
        input: Some(ghostwriter::proto::generate_request::Input::Personalized(
            PersonalizedInput {
                passage_start: "The strings".into(),
                ..Default::default()
            },
        )),
        params: Some(GenerationParams {
            max_new_tokens: 3,
            ..Default::default()
        }),
        ..Default::default()
    };
    let early = generator.generate(request.clone()).await;
    if let Err(status) = &early {
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    ghostwriter_transport::client::wait_until_serving(
        &url,
        "ghostwriter.v1.Generator",
        Duration::from_secs(60),
        None,
    )
    .await
    .unwrap();
    let r = generator.generate(request).await.unwrap().into_inner();
    // Three tokens, or fewer when the model ends its turn first.
    assert!(
        r.generated_tokens == 3
            || (r.generated_tokens < 3
                && r.finish_reason == ghostwriter::proto::FinishReason::Eos as i32),
        "{r:?}"
    );
    trigger.trigger();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_stage_gives_unavailable_naming_it() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let mut embedded = common::embedded(common::config(dir.path().join("index"))).await;
    let docs: Vec<_> = (0..3)
        .map(|i| ghostwriter::proto::Document {
            user_id: "u".into(),
            doc_id: format!("d{i}"),
            timestamp: i,
            title: String::new(),
            text: format!("review number {i} of a guitar tuner"),
        })
        .collect();
    common::ingest(&embedded.url(), &docs).await;
    let mut client = common::client(&embedded.url()).await;
    let request = common::short_write("u", "guitar tuner", "rank-doc-bm25", 2);
    client
        .write(request.clone())
        .await
        .expect("healthy pipeline");
    // The generator goes: the summarizer's LLM summary fails downstream. The orchestrator reports
    // it naming both stages, and does not hold it against the (healthy) summarizer: after more
    // failures than its breaker allows, the summarizer is still called.
    embedded.stop_stage(StageKind::Generator).await.unwrap();
    for _ in 0..5 {
        let mut r = tonic::Request::new(WriteRequest {
            preset: "sum-ctx-ind".into(),
            ..request.clone()
        });
        r.set_timeout(Duration::from_secs(30));
        let status = client.write(r).await.expect_err("generator is down");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status
                .message()
                .contains("summarizer stage: generator (for the summarizer)"),
            "{:?}",
            status.message()
        );
    }
    // Asked directly, the summarizer marks the failure as its generator's, across the wire, so
    // no caller counts it against the summarizer (or retries it on another summarizer).
    let mut summarizer = ghostwriter::proto::summarizer_client::SummarizerClient::connect(
        embedded.stage_url(StageKind::Summarizer),
    )
    .await
    .unwrap();
    let status = summarizer
        .summarize(ghostwriter::proto::SummarizeRequest {
            entries: vec![ghostwriter::proto::RankedEntry {
                doc_id: "d0".into(),
                text: "review number 0 of a guitar tuner".into(),
                ..Default::default()
            }],
            mode: ghostwriter::proto::SummaryMode::Independent as i32,
            ..Default::default()
        })
        .await
        .expect_err("generator is down");
    assert!(
        ghostwriter_transport::client::is_downstream(&status),
        "{status:?}"
    );
    assert!(!ghostwriter_transport::client::is_transport_failure(
        &status
    ));
    for stage in [StageKind::Ranker, StageKind::Retriever] {
        embedded.stop_stage(stage).await.unwrap();
        let started = Instant::now();
        let mut r = tonic::Request::new(request.clone());
        r.set_timeout(Duration::from_secs(30));
        let status = client.write(r).await.expect_err("stage is down");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains(stage.name()),
            "{:?} does not name {stage}",
            status.message()
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
    }
    embedded.shutdown().await;
}

#[test]
fn tokenizer_from_gguf_matches_the_vocabulary() {
    let _slot = crate::common::slot(module_path!());
    let path = common::model_dir().join(ghostwriter_common::models::GENERATOR_Q8_0);
    let (content, _) = ghostwriter_generator::gguf::read_content(&path).unwrap();
    let tokenizer = ghostwriter_generator::gguf::tokenizer(&content.metadata).unwrap();
    let tokens = |s: &str| tokenizer.encode(s, false).unwrap().get_tokens().to_vec();
    let ids = |s: &str| tokenizer.encode(s, false).unwrap().get_ids().to_vec();
    // Byte-level BPE: a space joins the next word ("Ġ").
    assert_eq!(tokens("Hello world"), vec!["Hello", "Ġworld"]);
    // Digits are split one by one (the `smollm` pre-tokenizer).
    assert_eq!(tokens("2024"), vec!["2", "0", "2", "4"]);
    // Control tokens are recognized whole.
    assert_eq!(ids("user").len(), 1);
    assert_eq!(ids("<|im_start|>user"), vec![1, ids("user")[0]]);
    assert_eq!(ids("<|im_end|>"), vec![2]);
    for s in [
        "Great strings, 5/5!\n\nWould buy again.",
        "naïve café — “quotes”",
        "  two  spaces",
    ] {
        assert_eq!(tokenizer.decode(&ids(s), false).unwrap(), s);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_as_its_own_process() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_ghostwriter"));
    let procs = ghostwriter::processes::Processes::start(
        exe,
        &common::model_dir(),
        &dir.path().join("index"),
    )
    .await
    .unwrap();
    let url = procs.urls["orchestrator"].clone();
    let docs: Vec<_> = (0..4)
        .map(|i| ghostwriter::proto::Document {
            user_id: "proc-user".into(),
            doc_id: format!("p{i}"),
            timestamp: 100 + i,
            title: format!("Review {i}"),
            text: format!("The metronome number {i} keeps steady time on stage."),
        })
        .collect();
    common::ingest(&url, &docs).await;
    let mut client = common::client(&url).await;
    let response = client
        .write(WriteRequest {
            timestamp: Some(102),
            doc_id: "p2".into(),
            ..common::short_write("proc-user", "This metronome", "full", 4)
        })
        .await
        .unwrap()
        .into_inner();
    let p = response.provenance.unwrap();
    let mut used = p.doc_ids.clone();
    used.sort();
    assert_eq!(used, vec!["p0", "p1"], "only documents before p2");
    assert_eq!(p.history_size, 2);
    let rss = procs.rss_mb();
    assert_eq!(rss.len(), 6, "one process per stage: {rss:?}");
}
