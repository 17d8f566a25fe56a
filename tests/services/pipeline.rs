//! End to end on real data: every stage its own gRPC server on 127.0.0.1:0, the orchestrator
//! wired to them, the Amazon reviews ingested, writes for real users.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::HashMap;

use ghostwriter::loaders;
use ghostwriter::proto::write_stream_response::Event;
use ghostwriter::proto::{
    DistinguishMethod, Document, GenerationParams, IngestRequest, WriteOptions, WriteRequest,
};
use tokio_stream::StreamExt;

struct Data {
    url: String,
    retriever: String,
    stages: std::collections::BTreeMap<ghostwriter_common::stage::StageKind, String>,
    by_user: HashMap<String, Vec<Document>>,
}

fn data() -> Option<Data> {
    let path = common::amazon_docs()?;
    let loaded = loaders::load(&path).expect("load docs.jsonl");
    let mut by_user: HashMap<String, Vec<Document>> = HashMap::new();
    for d in &loaded.documents {
        by_user
            .entry(d.user_id.clone())
            .or_default()
            .push(d.clone());
    }
    let documents = loaded.documents;
    let shared =
        common::shared(move |url| Box::pin(async move { common::ingest(&url, &documents).await }));
    Some(Data {
        url: shared.url.clone(),
        retriever: shared.stage_urls[&ghostwriter_common::stage::StageKind::Retriever].clone(),
        stages: shared.stage_urls.clone(),
        by_user,
    })
}

fn earlier(a: &Document, b: &Document) -> bool {
    (a.timestamp, a.doc_id.as_str()) < (b.timestamp, b.doc_id.as_str())
}

use ghostwriter::embedded::write_of as write_request;

/// Users with at least `n` documents, in a stable order.
fn users(data: &Data, n: usize) -> Vec<String> {
    let mut u: Vec<String> = data
        .by_user
        .iter()
        .filter(|(_, d)| d.len() >= n)
        .map(|(k, _)| k.clone())
        .collect();
    u.sort();
    u
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provenance_comes_only_from_the_users_earlier_documents() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = data() else { return };
    let mut client = common::client(&data.url).await;
    let picked = users(&data, 8);
    for (i, user) in picked.iter().step_by(97).take(4).enumerate() {
        let docs = &data.by_user[user];
        let target = &docs[docs.len() / 2];
        let expected_history: Vec<&Document> = docs.iter().filter(|d| earlier(d, target)).collect();
        let preset = ["rank-doc-bm25", "recent-doc", "rank-doc-dense", "full"][i % 4];
        let response = client
            .write(write_request(user, target, preset, 12))
            .await
            .expect("write")
            .into_inner();
        let p = response.provenance.expect("provenance");
        assert_eq!(p.preset, preset);
        assert_eq!(
            p.history_size as usize,
            expected_history.len(),
            "user {user}"
        );
        assert!(!p.no_history);
        assert!(!p.doc_ids.is_empty(), "{preset} used no documents");
        for id in &p.doc_ids {
            let d = expected_history
                .iter()
                .find(|d| &d.doc_id == id)
                .unwrap_or_else(|| panic!("{id} is not an earlier document of {user}"));
            assert!(earlier(d, target));
        }
        let g = response.generation.as_ref().expect("generation statistics");
        assert!(
            !response.text.is_empty()
                || g.finish_reason == ghostwriter::proto::FinishReason::Eos as i32,
            "nothing generated and no end-of-turn"
        );
        assert!(g.prompt_tokens > 0);
        assert!(response.document.starts_with(&p.immediate_context));
        assert!(p.immediate_context.chars().count() <= 150);
        let stages: Vec<&str> = p.latencies.iter().map(|l| l.stage.as_str()).collect();
        assert!(
            stages.contains(&"retriever")
                && stages.contains(&"ranker")
                && stages.contains(&"generator")
        );
        if preset == "full" {
            assert!(!p.summary.is_empty(), "full preset gave no summary");
            assert!(stages.contains(&"summarizer") && stages.contains(&"synthesizer"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_and_unary_give_the_same_greedy_text() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = data() else { return };
    let mut client = common::client(&data.url).await;
    let user = &users(&data, 6)[3];
    let docs = &data.by_user[user];
    let request = write_request(user, &docs[docs.len() - 1], "rank-doc-bm25", 24);
    let unary = client
        .write(request.clone())
        .await
        .expect("write")
        .into_inner();
    let mut stream = client
        .write_stream(request)
        .await
        .expect("stream")
        .into_inner();
    let (mut pieces, mut first, mut done) = (String::new(), None, None);
    while let Some(m) = stream.next().await {
        match m.expect("stream message").event.expect("event") {
            Event::Provenance(p) => first = Some(p),
            Event::Text(t) => pieces.push_str(&t),
            Event::Done(d) => done = Some(d),
        }
    }
    let done = done.expect("final message");
    assert_eq!(pieces, unary.text);
    assert_eq!(done.text, unary.text);
    assert_eq!(
        first.expect("provenance first").doc_ids,
        unary.provenance.unwrap().doc_ids
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_syntax_characters_neither_fail_nor_leak() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = data() else { return };
    let mut client = common::client(&data.url).await;
    let user = &users(&data, 10)[0];
    let other = &users(&data, 10)[1];
    let own: Vec<&str> = data.by_user[user]
        .iter()
        .map(|d| d.doc_id.as_str())
        .collect();
    for start in [
        "\"unbalanced quote guitar",
        "title: strings: user_id:",
        "(((guitar",
        "* wildcard* guit*",
        "AND OR NOT AND",
        &format!("user_id:{other} OR user_id:*"),
        "+-&&||!(){}[]^\"~*?:\\/",
    ] {
        let request = common::short_write(user, start, "rank-doc-bm25", 4);
        let p = client
            .write(request)
            .await
            .unwrap_or_else(|s| panic!("{start:?}: {s}"))
            .into_inner()
            .provenance
            .unwrap();
        assert!(!p.doc_ids.is_empty());
        for id in &p.doc_ids {
            assert!(own.contains(&id.as_str()), "{start:?} leaked {id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_and_nothing_half_written() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = data() else { return };
    // A huge limit straight at the retriever is refused, not allocated (it used to abort the
    // process), and the retriever still answers afterwards.
    let mut retriever =
        ghostwriter::proto::retriever_client::RetrieverClient::connect(data.retriever.clone())
            .await
            .unwrap();
    let huge_limit = ghostwriter::proto::RetrieveRequest {
        user_id: "A2EZWZ8MBEDOLN".into(),
        query: "strings".into(),
        limit: u32::MAX,
        ..Default::default()
    };
    let status = retriever.retrieve(huge_limit.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("limit"), "{status:?}");
    retriever
        .retrieve(ghostwriter::proto::RetrieveRequest {
            limit: 5,
            ..huge_limit
        })
        .await
        .expect("the retriever survives");
    let mut client = common::client(&data.url).await;
    let ok = |user: &str, start: &str, preset: &str| WriteRequest {
        user_id: user.into(),
        start: start.into(),
        preset: preset.into(),
        ..Default::default()
    };
    let huge = "x".repeat(ghostwriter_common::MAX_DOCUMENT_CHARS + 1);
    for (request, needle) in [
        (ok("", "hello", "full"), "user_id"),
        (ok("   ", "hello", "full"), "user_id"),
        (ok("u", "", "full"), "start"),
        (ok("u", "hello", "no-such-preset"), "preset"),
        (ok("u", &huge, "full"), "characters"),
        (ok("u", "hello", &"p".repeat(16_000)), "(cut)"),
        (
            WriteRequest {
                doc_id: "d".repeat(20_000),
                ..ok("u", "hello", "full")
            },
            "doc_id",
        ),
        (
            WriteRequest {
                options: Some(WriteOptions {
                    generation: Some(GenerationParams {
                        temperature: 99.0,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..ok("u", "hello", "full")
            },
            "temperature",
        ),
    ] {
        let status = client.write(request.clone()).await.expect_err("must fail");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        // google.rpc.BadRequest names the field, for clients that do not parse messages.
        let field = {
            use tonic_types::StatusExt;
            let details = status
                .get_details_bad_request()
                .expect("a BadRequest detail");
            details.field_violations[0].field.clone()
        };
        if needle != "characters" && needle != "(cut)" {
            assert!(field.ends_with(needle), "{field} for {needle}");
        }
        assert!(
            status.message().len() < 600,
            "the error echoes the input: {status:?}"
        );
        assert!(
            status.message().contains(needle),
            "{:?} lacks {needle}",
            status.message()
        );
        let status = client.write_stream(request).await.expect_err("must fail");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
    // One bad document rejects the whole batch: the good one is not stored either.
    let good = Document {
        user_id: "batch-user".into(),
        doc_id: "good-1".into(),
        timestamp: 1,
        title: "t".into(),
        text: "tuning pegs".into(),
    };
    let bad = Document {
        doc_id: String::new(),
        ..good.clone()
    };
    let status = client
        .ingest(IngestRequest {
            documents: vec![good.clone(), bad],
        })
        .await
        .expect_err("must fail");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("doc_id"), "{}", status.message());
    let mut request = ok("batch-user", "tuning pegs", "rank-doc-bm25");
    request.options = Some(WriteOptions {
        generation: Some(GenerationParams {
            max_new_tokens: 2,
            ..Default::default()
        }),
        ..Default::default()
    });
    let p = client
        .write(request.clone())
        .await
        .expect("write")
        .into_inner()
        .provenance
        .unwrap();
    assert!(p.no_history, "the rejected batch was half-written");
    // An empty batch is refused, not silently accepted.
    let status = client
        .ingest(IngestRequest { documents: vec![] })
        .await
        .expect_err("must fail");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // An ingested document is visible to the next request; a batch naming it twice stores and
    // counts it once.
    let response = client
        .ingest(IngestRequest {
            documents: vec![good.clone(), good.clone()],
        })
        .await
        .expect("ingest")
        .into_inner();
    assert_eq!(response.ingested, 1);
    // Another user re-using the id does not take the document away.
    client
        .ingest(IngestRequest {
            documents: vec![Document {
                user_id: "batch-intruder".into(),
                ..good.clone()
            }],
        })
        .await
        .expect("ingest");
    let p = client
        .write(request)
        .await
        .expect("write")
        .into_inner()
        .provenance
        .unwrap();
    assert_eq!(p.doc_ids, vec!["good-1".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_history_gets_text_from_the_context_alone() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = data() else { return };
    let mut client = common::client(&data.url).await;
    let request = WriteRequest {
        title: "First review".into(),
        ..common::short_write(
            "nobody-at-all",
            "This is my first guitar strap and",
            "full",
            8,
        )
    };
    let r = client.write(request).await.expect("write").into_inner();
    let p = r.provenance.unwrap();
    assert!(p.no_history && p.doc_ids.is_empty() && p.summary.is_empty());
    assert!(!r.text.is_empty());
}

/// The guessing probe: a caller who sends exactly the text another user wrote (a right guess)
/// gets no more of the prefix cache than one who sends other text (a wrong guess): only the
/// instruction every caller shares, so neither the cached count nor the timing confirms a
/// guess; a user's own repeated write still reuses its blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_confirms_no_guess_of_another_users_text() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = data() else { return };
    let mut client = common::client(&data.url).await;
    let secret = "My divorce lawyer told me to sell the Gibson before the hearing, so this is \
                  the last review I write about that guitar and its long, warm sustain.";
    let wrong = "My brother-in-law told me to keep the Fender until the summer, so this is \
                 the first review I write about that guitar and its short, bright attack.";
    let cached = |r: ghostwriter::proto::WriteResponse| {
        r.generation.expect("a generation").cached_prompt_tokens
    };
    let mut write = async |user: &str, start: &str| {
        let r = client
            .write(common::short_write(user, start, "immediate-context", 2))
            .await
            .expect("write")
            .into_inner();
        cached(r)
    };
    // Fresh users: what the cache holds for them is only what these writes put there.
    let tag = std::process::id();
    let (victim, right, wrong_user) = (
        format!("cache-victim-{tag}"),
        format!("cache-guesser-right-{tag}"),
        format!("cache-guesser-wrong-{tag}"),
    );
    write(&victim, secret).await;
    let own = write(&victim, secret).await;
    let by_right_guess = write(&right, secret).await;
    let by_wrong_guess = write(&wrong_user, wrong).await;
    assert_eq!(
        by_right_guess, by_wrong_guess,
        "a right guess reuses more cached tokens than a wrong one"
    );
    assert!(
        own > by_right_guess,
        "the user's own repeated write reuses its blocks ({own} cached) beyond the shared \
         instruction ({by_right_guess})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinguish_judges_a_text_by_style_against_the_most_recent_earlier_documents() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = data() else { return };
    let user = users(&data, 6).remove(0);
    let docs = &data.by_user[&user];
    let target = docs
        .iter()
        .max_by_key(|d| (d.timestamp, d.doc_id.clone()))
        .unwrap();
    let mut client = common::client(&data.url).await;
    let request = |user: &str, text: &str, max: u32, method: DistinguishMethod| {
        ghostwriter::proto::DistinguishRequest {
            user_id: user.into(),
            text: text.into(),
            timestamp: Some(target.timestamp),
            doc_id: target.doc_id.clone(),
            max_documents: max,
            method: method as i32,
            consistency_token: Default::default(),
        }
    };
    let r = client
        .distinguish(request(
            &user,
            &target.text,
            3,
            DistinguishMethod::Unspecified,
        ))
        .await
        .unwrap()
        .into_inner();
    // The three most recent documents before the target, newest first.
    let mut before: Vec<&Document> = docs.iter().filter(|d| earlier(d, target)).collect();
    before.sort_by(|a, b| (b.timestamp, &b.doc_id).cmp(&(a.timestamp, &a.doc_id)));
    let expected: Vec<String> = before.iter().take(3).map(|d| d.doc_id.clone()).collect();
    assert_eq!(r.profile_doc_ids, expected);
    assert_eq!(r.profile_documents, 3);
    assert_eq!(r.method, DistinguishMethod::Style as i32);
    assert!(!r.abstained && r.abstention_reason.is_empty(), "{r:?}");
    assert!((0.0..=1.0).contains(&r.probability) && r.prior_same_author == 0.5);
    assert!(!r.top_features.is_empty() && r.top_features.len() <= 5);
    assert!(
        r.top_features
            .windows(2)
            .all(|w| w[0].contribution.abs() >= w[1].contribution.abs())
    );
    assert!(r.model.contains("train-style"), "{}", r.model);
    assert!(r.documents.is_empty());

    // Too short to judge: an abstention with its reason, at the prior.
    let short = client
        .distinguish(request(
            &user,
            "Great strings!",
            0,
            DistinguishMethod::Style,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(short.abstained && short.abstention_reason.contains("too short"));
    assert_eq!(short.probability, 0.5);
    // No history at all: an abstention too.
    let nobody = client
        .distinguish(request(
            "nobody-has-this-id",
            &target.text,
            0,
            DistinguishMethod::Style,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        nobody.abstained && nobody.profile_documents == 0,
        "{nobody:?}"
    );

    // The generator's judgement on request: one score per compared document, averaged.
    let llm = client
        .distinguish(request(&user, &target.text, 2, DistinguishMethod::Llm))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(llm.method, DistinguishMethod::Llm as i32);
    assert!(!llm.documents.is_empty() && llm.documents.len() <= 2);
    let mean =
        llm.documents.iter().map(|d| d.probability).sum::<f32>() / llm.documents.len() as f32;
    assert!((llm.probability - mean).abs() < 1e-6);
    let err = client
        .distinguish(request(
            "nobody-has-this-id",
            "some text",
            0,
            DistinguishMethod::Llm,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    for (bad, why) in [
        (
            request(&user, "  ", 0, DistinguishMethod::Style),
            "text is empty",
        ),
        (
            request("", "some text", 0, DistinguishMethod::Style),
            "user_id is empty",
        ),
        (
            request(&user, "some text", 17, DistinguishMethod::Style),
            "max_documents",
        ),
    ] {
        let err = client.distinguish(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains(why), "{}", err.message());
    }
    let mut unknown = request(&user, "some text", 0, DistinguishMethod::Style);
    unknown.method = 9;
    let err = client.distinguish(unknown).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

/// Known pairs on held-out users: validation users' reviews (the `profile` protocol's first 12
/// targets) judged against their authors' earlier reviews score above the same reviews judged
/// against the user whose review matches each best (BM25) — impostors on the same topic — for
/// most of them, through the served Distinguish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinguish_scores_the_author_above_a_matched_impostor() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = data() else { return };
    use ghostwriter::eval::authorship::{self, Corpus, Protocol};
    let corpus = Corpus::load(&common::amazon_docs().unwrap()).unwrap();
    let pairs = authorship::pairs(
        &corpus,
        ghostwriter::eval::protocol::Split::Validation,
        Protocol::Profile,
        42,
    );
    let mut client = common::client(&data.url).await;
    let (mut wins, mut judged) = (0, 0);
    for two in pairs.chunks(2).take(12) {
        let (own, other) = (&two[0], &two[1]);
        assert!(own.same && !other.same);
        let text = &corpus.dataset.documents[own.text];
        let impostor = &corpus.dataset.documents[other.profile[0]].user_id;
        let judge = |user: &str, before: bool| ghostwriter::proto::DistinguishRequest {
            user_id: user.into(),
            text: corpus.texts[own.text].clone(),
            timestamp: before.then_some(text.timestamp),
            doc_id: if before {
                text.doc_id.clone()
            } else {
                String::new()
            },
            max_documents: 0,
            method: 0,
            consistency_token: Default::default(),
        };
        let a = client
            .distinguish(judge(&own.author, true))
            .await
            .unwrap()
            .into_inner();
        let b = client
            .distinguish(judge(impostor, false))
            .await
            .unwrap()
            .into_inner();
        assert!(!a.abstained && !b.abstained);
        judged += 1;
        wins += usize::from(a.probability > b.probability);
    }
    assert_eq!(judged, 12);
    assert!(
        wins >= 8,
        "the author scored higher in only {wins} of {judged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_bind_callers_to_their_users() {
    let _slot = crate::common::slot(module_path!());
    let Some(data) = data() else { return };
    let names = users(&data, 3);
    let (alice, bob) = (names[0].clone(), names[1].clone());
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("alice-token-0123456789 {alice}\nadmin-token-0123456789 *\n"),
    )
    .unwrap();
    let config = |tokens| {
        let mut c = ghostwriter_orchestrator::OrchestratorConfig::at(|k| data.stages[&k].clone());
        c.writes.request_timeout_secs = 120;
        c.auth.tokens = tokens;
        c
    };
    // Without tokens, the public API refuses a non-loopback address.
    let open = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let (_t, handle) = ghostwriter_common::shutdown::channel();
    let transport = ghostwriter_transport::Transport::default();
    let err = ghostwriter_orchestrator::serve(config(None), open, handle, &transport)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--auth-tokens"), "{err}");

    let config = config(Some(tokens));
    let server =
        common::InProcess::start(std::time::Duration::from_secs(30), |l, stop| async move {
            ghostwriter_orchestrator::serve(config, l, stop, &transport).await
        })
        .await;
    let url = server.url.clone();
    let mut client = common::client(&url).await;
    let write = |user: &str, token: Option<&str>| {
        let mut r = tonic::Request::new(common::short_write(
            user,
            "These strings",
            "immediate-context",
            2,
        ));
        ghostwriter_transport::client::bearer(&mut r, token).unwrap();
        r
    };
    for (user, token, code) in [
        (&alice, None, Some(tonic::Code::Unauthenticated)),
        (
            &alice,
            Some("wrong-token-0123456789"),
            Some(tonic::Code::Unauthenticated),
        ),
        (&alice, Some("alice-token-0123456789"), None),
        (
            &bob,
            Some("alice-token-0123456789"),
            Some(tonic::Code::PermissionDenied),
        ),
        (&bob, Some("admin-token-0123456789"), None),
    ] {
        let got = client
            .write(write(user, token))
            .await
            .err()
            .map(|s| s.code());
        assert_eq!(got, code, "{user} with {token:?}");
    }
    // Distinguish and Ingest are bound the same way: alice cannot read or write as bob.
    let mut d = tonic::Request::new(ghostwriter::proto::DistinguishRequest {
        user_id: bob.clone(),
        text: "Great strings".into(),
        ..Default::default()
    });
    ghostwriter_transport::client::bearer(&mut d, Some("alice-token-0123456789")).unwrap();
    assert_eq!(
        client.distinguish(d).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let mut i = tonic::Request::new(IngestRequest {
        documents: vec![Document {
            user_id: bob.clone(),
            doc_id: "planted".into(),
            timestamp: 1,
            title: String::new(),
            text: "planted text".into(),
        }],
    });
    ghostwriter_transport::client::bearer(&mut i, Some("alice-token-0123456789")).unwrap();
    assert_eq!(
        client.ingest(i).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_presets_and_reflection_describe_the_deployment() {
    let _slot = crate::common::slot(module_path!());
    use tonic_reflection::pb::{v1, v1alpha};
    let Some(data) = data() else { return };
    let mut c = common::client(&data.url).await;
    let info = c
        .info(ghostwriter::proto::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    let generator = info.generator.unwrap();
    assert!(
        generator.model.to_lowercase().contains("smollm2"),
        "{generator:?}"
    );
    assert!(generator.context_tokens >= 2048, "{generator:?}");
    assert!(!generator.backend.is_empty());
    assert_eq!(generator.adapter, "", "no adapter in the default topology");
    assert!(
        !info.authentication,
        "the test topology runs on loopback without tokens"
    );

    let presets = c
        .list_presets(ghostwriter::proto::ListPresetsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = presets.presets.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        info.presets.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(presets.default_preset, info.default_preset);
    assert!(
        names.contains(&"syn-ctx") && names.contains(&"copy-best"),
        "{names:?}"
    );
    let none = presets
        .presets
        .iter()
        .find(|p| p.name == "immediate-context")
        .unwrap();
    assert_eq!((none.ranking, none.summary, none.synthesis), (0, 0, 0));
    let full = presets
        .presets
        .iter()
        .find(|p| p.name == "syn-ctx")
        .unwrap();
    assert!(full.ranking != 0 && full.summary != 0 && full.synthesis != 0 && full.generate);

    // Server reflection answers in both versions (many GUI clients still speak v1alpha).
    let channel = tonic::transport::Endpoint::from_shared(data.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let services = |names: Vec<String>| {
        assert!(
            names.iter().any(|n| n == "ghostwriter.v1.Ghostwriter"),
            "{names:?}"
        );
    };
    let mut r1 = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = r1
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match answers.message().await.unwrap().unwrap().message_response {
        Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            services(l.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("{other:?}"),
    }
    let mut r0 = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = r0
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match answers.message().await.unwrap().unwrap().message_response {
        Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            services(l.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("{other:?}"),
    }
}

/// Lowercase words (letters and digits) of `text`.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_sees_another_users_or_a_later_document() {
    let _slot = crate::common::slot(module_path!());
    // The isolation property over the real Amazon users: writes for random (user, time) pairs,
    // 16 at once (500 here, about 3.5 minutes on 2 cores; GHOSTWRITER_ISOLATION_WRITES=10000
    // for the full property run).
    // Most are `copy-best` (retrieval and ranking, the text is the best earlier entry: no
    // generation); every 50th is `syn-ctx` (a SumCtx summary and SynCtx words) with one new
    // token. Nothing in a result, its provenance, its summary or its words may come from
    // another user or from the user's later documents.
    use std::collections::HashSet;
    let Some(data) = data() else { return };
    let picked = users(&data, 2);
    let writes: usize = std::env::var("GHOSTWRITER_ISOLATION_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut rng = common::Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    let jobs: Vec<(String, Document, &str)> = (0..writes)
        .map(|i| {
            let user = &picked[next() as usize % picked.len()];
            let docs = &data.by_user[user];
            let target = docs[next() as usize % docs.len()].clone();
            let preset = if i % 50 == 0 { "syn-ctx" } else { "copy-best" };
            (user.clone(), target, preset)
        })
        .collect();
    let url = data.url.clone();
    let by_user = &data.by_user;
    let started = std::time::Instant::now();
    let calls = futures::stream::iter(jobs.into_iter().map(|(user, target, preset)| {
        let url = url.clone();
        async move {
            let mut client = common::client(&url).await;
            let response = client
                .write(write_request(&user, &target, preset, 1))
                .await
                .map_err(|e| format!("{preset} for {user}: {e}"))?
                .into_inner();
            let history: Vec<&Document> = by_user[&user]
                .iter()
                .filter(|d| earlier(d, &target))
                .collect();
            let known: HashSet<String> = history
                .iter()
                .flat_map(|d| words(&d.title).into_iter().chain(words(&d.text)))
                .collect();
            let p = response.provenance.unwrap_or_default();
            let leak = |what: &str, detail: String| {
                Err(format!(
                    "{preset} for {user} at {}: {what}: {detail}",
                    target.timestamp
                ))
            };
            for id in &p.doc_ids {
                if !history.iter().any(|d| &d.doc_id == id) {
                    return leak(
                        "provenance",
                        format!("{id} is not an earlier document of the user"),
                    );
                }
            }
            let mut checked = 0;
            for (what, text) in [
                (
                    "text",
                    if preset == "copy-best" {
                        response.text.as_str()
                    } else {
                        ""
                    },
                ),
                ("summary", p.summary.as_str()),
            ] {
                for w in words(text) {
                    if !known.contains(&w) {
                        return leak(
                            what,
                            format!("{w:?} is in none of the user's earlier documents"),
                        );
                    }
                    checked += 1;
                }
            }
            for w in &p.important_words {
                // Split as the history was ("musician's" is "musician" and "s").
                if !words(w).iter().all(|part| known.contains(part)) {
                    return leak("important words", format!("{w:?}"));
                }
                checked += 1;
            }
            Ok(checked)
        }
    }));
    let outcomes: Vec<Result<usize, String>> =
        futures::StreamExt::collect(futures::StreamExt::buffer_unordered(calls, 16)).await;
    let leaks: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    let checked: usize = outcomes.iter().filter_map(|o| o.as_ref().ok()).sum();
    eprintln!(
        "isolation: {writes} writes over {} users in {:.1}s, {checked} words checked, {} leaks",
        picked.len(),
        started.elapsed().as_secs_f64(),
        leaks.len()
    );
    assert!(
        leaks.is_empty(),
        "{} leaks: {:?}",
        leaks.len(),
        &leaks[..leaks.len().min(5)]
    );
    assert!(checked > writes, "too little was checked: {checked} words");
}
