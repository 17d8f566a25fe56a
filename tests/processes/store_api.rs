//! The store end to end, over a real throwaway Postgres and real stages: read your writes over
//! two retriever replicas and two orchestrators, a retriever replica killed (-9) during writes
//! and caught up after, deletion through the public API (bound to the caller's token), and
//! Postgres down.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ghostwriter::proto::retriever_client::RetrieverClient;
use ghostwriter::proto::{DeleteRequest, Document, IngestRequest, ReplicaRequest, WriteRequest};
use ghostwriter_common::stage::StageKind;
use ghostwriter_orchestrator::OrchestratorConfig;
use ghostwriter_store::StoreArgs;
use tonic::Code;

use common::InProcess as Server;

async fn retriever(dir: &Path, store: &str) -> Server {
    let mut config = common::config(dir.to_path_buf()).retriever;
    config.store = StoreArgs {
        poll_ms: 200,
        ..StoreArgs::with_url(store)
    };
    Server::start(Duration::from_secs(60), |l, shutdown| async move {
        ghostwriter_retriever::serve(config, l, shutdown, &Default::default()).await
    })
    .await
}

/// Two retriever replicas following `store`, and their index directories.
async fn replicas(store: &str) -> ([tempfile::TempDir; 2], [Server; 2]) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let first = retriever(dirs[0].path(), store).await;
    let second = retriever(dirs[1].path(), store).await;
    (dirs, [first, second])
}

async fn ranker() -> Server {
    let config = common::config(std::env::temp_dir()).ranker;
    Server::start(Duration::from_secs(120), |l, shutdown| async move {
        ghostwriter_ranker::serve(
            config,
            common::model_dir(),
            l,
            shutdown,
            &Default::default(),
        )
        .await
    })
    .await
}

/// An orchestrator over `retrievers` and `ranker` (copy-best writes need no other stage: the
/// others point at a closed port), with `auth` as its token file.
async fn orchestrator(retrievers: &[String], ranker: &str, auth: Option<&Path>) -> Server {
    let nowhere = "http://127.0.0.1:9".to_string();
    let mut config = OrchestratorConfig::at(|stage| match stage {
        StageKind::Retriever => retrievers.join(","),
        StageKind::Ranker => ranker.into(),
        _ => nowhere.clone(),
    });
    config.writes.request_timeout_secs = 30;
    config.max_new_tokens_limit = 64;
    config.auth.tokens = auth.map(Path::to_path_buf);
    Server::start(Duration::from_secs(30), |l, shutdown| async move {
        ghostwriter_orchestrator::serve(config, l, shutdown, &Default::default()).await
    })
    .await
}

fn doc(user: &str, id: &str, timestamp: i64, text: &str) -> Document {
    Document {
        user_id: user.into(),
        doc_id: id.into(),
        timestamp,
        title: String::new(),
        text: text.into(),
    }
}

/// A copy-best write for `user` starting with `start`, after `token` (may be empty).
fn write(user: &str, start: &str, token: &str) -> WriteRequest {
    WriteRequest {
        user_id: user.into(),
        start: start.into(),
        preset: "copy-best".into(),
        timestamp: Some(1_000_000),
        consistency_token: token.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_over_two_replicas_and_two_orchestrators() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let (_dirs, [r1, r2]) = replicas(&url).await;
    let ranker = ranker().await;
    let urls = [r1.url.clone(), r2.url.clone()];
    let a = orchestrator(&urls, &ranker.url, None).await;
    let b = orchestrator(&urls, &ranker.url, None).await;
    let (mut ca, mut cb) = (common::client(&a.url).await, common::client(&b.url).await);
    const ROUNDS: usize = 500;
    let started = Instant::now();
    for i in 0..ROUNDS {
        let user = format!("user{}", i % 50);
        let n = i / 50 + 1;
        let marker = format!("marker{i} tuner pedal strings review number {i}");
        let token = ca
            .ingest(IngestRequest {
                documents: vec![doc(&user, &format!("d{i}"), 1000 + i as i64, &marker)],
            })
            .await
            .unwrap()
            .into_inner()
            .consistency_token;
        assert!(!token.is_empty());
        // Even rounds: the other orchestrator, carrying the token; odd: the same orchestrator,
        // with no token (it remembers the user's latest).
        let (client, carried) = if i % 2 == 0 {
            (&mut cb, token.as_str())
        } else {
            (&mut ca, "")
        };
        let r = client
            .write(write(&user, &marker, carried))
            .await
            .unwrap()
            .into_inner();
        let p = r.provenance.unwrap();
        assert_eq!(
            p.history_size as usize, n,
            "round {i}: the history misses the new document"
        );
        assert!(
            r.document.contains(&format!("marker{i} ")),
            "round {i}: {}",
            r.document
        );
    }
    eprintln!(
        "{ROUNDS} ingest-then-write rounds in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // A malformed token is bad input.
    let status = ca
        .write(write("user0", "x", "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    for s in [a, b, ranker, r1, r2] {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_through_the_api_is_bound_to_the_callers_token_and_reaches_every_replica() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let (_dirs, [r1, r2]) = replicas(&url).await;
    let ranker = ranker().await;
    let tokens = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        tokens.path(),
        "alice-token-0123456789 alice\nbob-token-0123456789ab bob\n",
    )
    .unwrap();
    let o = orchestrator(
        &[r1.url.clone(), r2.url.clone()],
        &ranker.url,
        Some(tokens.path()),
    )
    .await;
    let mut c = common::client(&o.url).await;
    c.ingest(authed(
        IngestRequest {
            documents: vec![
                doc("alice", "a1", 10, "alice likes the warm fuzz pedal"),
                doc("alice", "a2", 11, "alice finds the capo stiff"),
            ],
        },
        "alice-token-0123456789",
    ))
    .await
    .unwrap();
    // Bob's token cannot delete Alice's documents.
    let status = c
        .delete(authed(
            DeleteRequest {
                user_id: "alice".into(),
                doc_id: String::new(),
            },
            "bob-token-0123456789ab",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let deleted = c
        .delete(authed(
            DeleteRequest {
                user_id: "alice".into(),
                doc_id: "a1".into(),
            },
            "alice-token-0123456789",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    let r = c
        .write(authed(
            write(
                "alice",
                "alice likes the warm fuzz pedal",
                &deleted.consistency_token,
            ),
            "alice-token-0123456789",
        ))
        .await
        .unwrap()
        .into_inner();
    let p = r.provenance.unwrap();
    assert_eq!(p.history_size, 1);
    assert_eq!(p.doc_ids, ["a2"]);
    // The user: gone from every replica.
    let deleted = c
        .delete(authed(
            DeleteRequest {
                user_id: "alice".into(),
                doc_id: String::new(),
            },
            "alice-token-0123456789",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    for r in [&r1, &r2] {
        let mut retriever =
            RetrieverClient::new(ghostwriter_transport::client::channel(&r.url, None).unwrap());
        let found = retriever
            .retrieve(ghostwriter::proto::RetrieveRequest {
                user_id: "alice".into(),
                before_timestamp: Some(i64::MAX),
                consistency_token: deleted.consistency_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found.total_history, 0);
    }
    for s in [o, ranker, r1, r2] {
        s.stop().await;
    }
}

fn authed<T>(body: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// A `ghostwriter serve retriever` process following `store` with its index in `dir`, and its
/// URL.
async fn retriever_process(dir: &Path, store: &str) -> (common::StageProcess, String) {
    let mut cmd = common::ghostwriter();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "retriever"])
        .arg("--index-dir")
        .arg(dir)
        .args(["--store-poll-ms", "200"])
        .env("GHOSTWRITER_STORE", store)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    let process = common::start("retriever", cmd).await;
    let url = process.url().to_string();
    (process, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_during_writes_fails_none_and_catches_up_after() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (mut victim, victim_url) = retriever_process(dirs[0].path(), &url).await;
    let (_survivor, survivor_url) = retriever_process(dirs[1].path(), &url).await;
    for u in [&victim_url, &survivor_url] {
        ghostwriter_transport::client::wait_until_serving(u, "", Duration::from_secs(60), None)
            .await
            .unwrap();
    }
    let ranker = ranker().await;
    let o = orchestrator(
        &[victim_url.clone(), survivor_url.clone()],
        &ranker.url,
        None,
    )
    .await;
    let mut c = common::client(&o.url).await;
    let history: Vec<Document> = (0..20)
        .map(|i| {
            doc(
                &format!("w{}", i % 4),
                &format!("h{i}"),
                10 + i,
                "a guitar tuner review",
            )
        })
        .collect();
    c.ingest(IngestRequest { documents: history })
        .await
        .unwrap();

    // 8 concurrent writers; the victim is killed (-9) while they run.
    let mut writers = Vec::new();
    for w in 0..8 {
        let url = o.url.clone();
        writers.push(tokio::spawn(async move {
            let mut c = common::client(&url).await;
            let mut failed = 0;
            for _ in 0..25 {
                if c.write(write(&format!("w{}", w % 4), "a guitar tuner", ""))
                    .await
                    .is_err()
                {
                    failed += 1;
                }
            }
            failed
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    victim.kill();
    let mut failed = 0;
    for w in writers {
        failed += w.await.unwrap();
    }
    assert_eq!(failed, 0, "writes failed while a replica died");

    // 1,000 documents while it is down, then it comes back and catches up.
    let docs: Vec<Document> = (0..1000)
        .map(|i| {
            doc(
                &format!("late{}", i % 40),
                &format!("l{i}"),
                20 + i,
                "a strap review",
            )
        })
        .collect();
    c.ingest(IngestRequest { documents: docs }).await.unwrap();
    let restarted = Instant::now();
    let (_victim, victim_url) = retriever_process(dirs[0].path(), &url).await;
    ghostwriter_transport::client::wait_until_serving(
        &victim_url,
        "",
        Duration::from_secs(60),
        None,
    )
    .await
    .unwrap();
    let catch_up = restarted.elapsed();
    let replica =
        RetrieverClient::new(ghostwriter_transport::client::channel(&victim_url, None).unwrap())
            .replica(ReplicaRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(replica.documents, 1020);
    assert_eq!(replica.rebuilds, 0, "it resumed from its recorded position");
    eprintln!(
        "the restarted replica served all 1,020 documents {:.2}s after its start",
        catch_up.as_secs_f64()
    );
    o.stop().await;
    ranker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_writes_keep_working_and_ingest_is_unavailable() {
    let Some((_slot, pg, url)) = crate::common::postgres(module_path!()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let r = retriever(dir.path(), &url).await;
    let ranker = ranker().await;
    let o = orchestrator(std::slice::from_ref(&r.url), &ranker.url, None).await;
    let mut c = common::client(&o.url).await;
    let token = c
        .ingest(IngestRequest {
            documents: vec![doc("u", "1", 10, "the tuner holds pitch")],
        })
        .await
        .unwrap()
        .into_inner()
        .consistency_token;
    c.write(write("u", "the tuner", &token)).await.unwrap();
    pg.stop().unwrap();
    let status = c
        .ingest(IngestRequest {
            documents: vec![doc("u", "2", 11, "written while down")],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    for _ in 0..5 {
        let w = c
            .write(write("u", "the tuner", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(w.provenance.unwrap().history_size, 1);
    }
    pg.restart().unwrap();
    let started = Instant::now();
    let token = loop {
        match c
            .ingest(IngestRequest {
                documents: vec![doc("u", "3", 12, "after the outage")],
            })
            .await
        {
            Ok(r) => break r.into_inner().consistency_token,
            Err(s)
                if s.code() == Code::Unavailable && started.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    let w = c
        .write(write("u", "the tuner", &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        w.provenance.unwrap().history_size,
        2,
        "nothing lost, nothing doubled"
    );
    for s in [o, ranker, r] {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn up_with_a_store_serves_every_preset_and_deletes() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path().join("index"));
    config.retriever.store = StoreArgs::with_url(&url);
    let embedded = common::embedded(config).await;
    let mut c = common::client(&embedded.url()).await;
    let docs: Vec<Document> = (0..6)
        .map(|i| {
            doc(
                "maya",
                &format!("m{i}"),
                100 + i,
                "The tuner clips on the headstock and holds pitch through a whole gig.",
            )
        })
        .collect();
    let token = c
        .ingest(IngestRequest { documents: docs })
        .await
        .unwrap()
        .into_inner()
        .consistency_token;
    assert!(
        !token.is_empty(),
        "the embedded retriever commits to the store"
    );
    for preset in ghostwriter_orchestrator::PRESETS {
        let mut w = common::short_write("maya", "The tuner", preset.name, 2);
        w.consistency_token = token.clone();
        w.timestamp = Some(1_000);
        let r = c.write(w).await.unwrap().into_inner();
        let p = r.provenance.unwrap();
        if preset.ranking.is_some() {
            assert_eq!(p.history_size, 6, "{}", preset.name);
        }
    }
    let deleted = c
        .delete(DeleteRequest {
            user_id: "maya".into(),
            doc_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, 6);
    let mut w = common::short_write("maya", "The tuner", "copy-best", 0);
    w.consistency_token = deleted.consistency_token;
    w.timestamp = Some(1_000);
    let p = c.write(w).await.unwrap().into_inner().provenance.unwrap();
    assert!(p.no_history);
    embedded.shutdown().await;
}

#[test]
fn retriever_replicas_without_a_store_are_refused_with_the_reason() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let up = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ghostwriter"))
            .arg("up")
            .arg("--model-dir")
            .arg(common::model_dir())
            .args(args)
            .arg("--index-dir")
            .arg(dir.path())
            .env_remove("GHOSTWRITER_STORE")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let listen = format!("127.0.0.1:{}", common::port());
    let why = up(&[
        "--processes",
        "--listen",
        &listen,
        "--replicas",
        "retriever=2",
    ]);
    assert!(
        why.contains("needs --store") && why.contains("diverge"),
        "{why}"
    );
    let why = up(&["--listen", &listen, "--replicas", "generator=2"]);
    assert!(why.contains("needs --processes"), "{why}");
    let why = up(&["--processes", "--listen", &listen, "--replicas", "etcd=2"]);
    assert!(why.contains("not a stage"), "{why}");
    let why = up(&["--processes", "--listen", &listen, "--replicas", "ranker=0"]);
    assert!(why.contains("1 to 16"), "{why}");
}
