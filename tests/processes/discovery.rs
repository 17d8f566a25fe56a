//! Distributed mode against a real etcd and real stage processes: registration and discovery,
//! requests spread over two generators, a generator killed mid-load loses no unary request and
//! leaves the endpoint set when its lease expires, every user's documents live on exactly one of
//! two retriever shards, and writes go on when etcd itself goes away.

#![allow(clippy::unwrap_used)]

use crate::common;

use common::{Kill, StageProcess, generated_tokens};

use std::collections::BTreeMap;
use std::process::Child;
use std::time::{Duration, Instant};

use ghostwriter::proto::ghostwriter_client::GhostwriterClient;
use ghostwriter::proto::retriever_client::RetrieverClient;
use ghostwriter::proto::{Document, RetrieveRequest, WriteRequest};
use ghostwriter_discovery::etcd::Etcd;

fn etcd(dir: &std::path::Path) -> Option<(Child, String)> {
    if !common::etcd_installed() {
        return None;
    }
    let (child, url, _) = ghostwriter::processes::spawn_etcd(&dir.join("etcd"), None).unwrap();
    Some((child, url))
}

/// `ghostwriter serve STAGE` on a port of its own choosing, registered in `etcd` with a
/// 2-second lease.
async fn stage(
    etcd: &str,
    stage: &str,
    extra_serve: &[String],
    extra_stage: &[String],
) -> StageProcess {
    let mut cmd = common::ghostwriter();
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        etcd,
        "--etcd-ttl",
        "2",
    ])
    .args(extra_serve)
    .arg("--model-dir")
    .arg(common::model_dir())
    .arg(stage)
    .args(extra_stage)
    // GHOSTWRITER_TEST_LOG=info shows the stages' logs (endpoint set changes, ...).
    .env(
        "RUST_LOG",
        std::env::var("GHOSTWRITER_TEST_LOG").unwrap_or("warn".into()),
    );
    common::start(stage, cmd).await
}

/// The keys under `prefix`; none while etcd does not answer (yet).
async fn keys(etcd: &str, prefix: &str) -> Vec<String> {
    let Ok(mut c) = Etcd::connect(&ghostwriter_discovery::EtcdTarget::plain(&[
        etcd.to_string()
    ]))
    .await
    else {
        return Vec::new();
    };
    c.get_prefix(prefix, true)
        .await
        .map(|(_, kvs)| kvs.into_iter().map(|kv| kv.key).collect())
        .unwrap_or_default()
}

/// Where the generators register in etcd.
const GENERATORS: &str = "/ghostwriter/v1/generator/";

async fn wait_keys(etcd: &str, prefix: &str, n: usize, within: Duration) -> Vec<String> {
    let started = Instant::now();
    loop {
        let k = keys(etcd, prefix).await;
        if k.len() == n || started.elapsed() > within {
            return k;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write(user: &str, tokens: u32) -> WriteRequest {
    common::short_write(user, "This tuner", "rank-doc-bm25", tokens)
}

/// The provenance of a short write for `user`.
async fn provenance(
    client: &mut GhostwriterClient<tonic::transport::Channel>,
    user: &str,
) -> ghostwriter::proto::Provenance {
    let written = client.write(write(user, 2)).await.unwrap().into_inner();
    written.provenance.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_discovery_sharding_and_failover() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let Some((etcd_child, etcd)) = etcd(dir.path()) else { return };
    let mut etcd_process = Kill(vec![etcd_child]);
    let models = common::model_dir();
    assert!(models.exists());

    let shard_args = |i: u32| vec!["--shard".to_string(), i.to_string()];
    let index = |i: u32| {
        vec![
            "--index-dir".to_string(),
            dir.path().join(format!("index{i}")).display().to_string(),
        ]
    };
    let mut procs = Vec::new();
    let retriever = stage(&etcd, "retriever", &shard_args(0), &index(0)).await;
    let shard0 = retriever.url().to_string();
    procs.push(retriever);
    let retriever = stage(&etcd, "retriever", &shard_args(1), &index(1)).await;
    let shard1 = retriever.url().to_string();
    procs.push(retriever);
    for s in ["ranker", "synthesizer", "summarizer"] {
        procs.push(stage(&etcd, s, &[], &[]).await);
    }
    let metrics_port = ["--metrics-listen".to_string(), "127.0.0.1:0".into()];
    // Killed by the test itself, or on a failure before that (never left running).
    let mut gen_a = stage(&etcd, "generator", &metrics_port, &[]).await;
    let gen_b = stage(&etcd, "generator", &metrics_port, &[]).await;
    let metrics = [common::metrics_addr(&gen_a), common::metrics_addr(&gen_b)];
    procs.push(gen_b);
    let mut orch = stage(
        &etcd,
        "orchestrator",
        &[],
        &["--retriever-shards".into(), "2".into()],
    )
    .await;
    let url = orch.url().to_string();

    common::wait_serving(&mut orch, 60).await;
    procs.push(orch);
    let generators = wait_keys(&etcd, GENERATORS, 2, Duration::from_secs(60)).await;
    assert_eq!(generators.len(), 2, "{generators:?}");
    assert_eq!(
        wait_keys(
            &etcd,
            "/ghostwriter/v1/retriever/",
            2,
            Duration::from_secs(60)
        )
        .await
        .len(),
        2
    );
    for s in ["ranker", "synthesizer", "summarizer"] {
        assert_eq!(
            wait_keys(
                &etcd,
                &format!("/ghostwriter/v1/{s}/"),
                1,
                Duration::from_secs(60)
            )
            .await
            .len(),
            1,
            "{s}"
        );
    }
    // The orchestrator's watch has caught up once a write reaches every stage.
    let mut client = common::client(&url).await;
    let users: Vec<String> = (0..16).map(|u| format!("user-{u}")).collect();
    let docs: Vec<Document> = users
        .iter()
        .flat_map(|u| {
            (0..3).map(move |i| Document {
                user_id: u.clone(),
                doc_id: format!("{u}-{i}"),
                timestamp: i,
                title: String::new(),
                text: format!("My tuner number {i} holds pitch on stage."),
            })
        })
        .collect();
    let started = Instant::now();
    loop {
        match client
            .ingest(ghostwriter::proto::IngestRequest {
                documents: docs.clone(),
            })
            .await
        {
            Ok(_) => break,
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                eprintln!("waiting for discovery: {}", e.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }

    // Every user's documents live on exactly one shard, and retrieval finds them.
    let mut per_shard = BTreeMap::new();
    for u in &users {
        let mut holders = 0;
        for (i, shard) in [&shard0, &shard1].iter().enumerate() {
            let mut r = RetrieverClient::connect(shard.to_string()).await.unwrap();
            let got = r
                .retrieve(RetrieveRequest {
                    user_id: u.clone(),
                    query: "tuner".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if got.total_history > 0 {
                holders += 1;
                assert_eq!(got.total_history, 3);
                *per_shard.entry(i).or_insert(0) += 1;
            }
        }
        assert_eq!(holders, 1, "{u} lives on {holders} shards");
        let p = provenance(&mut client, u).await;
        assert_eq!(p.history_size, 3, "retrieval for {u} goes to its shard");
    }
    assert_eq!(per_shard.len(), 2, "both shards own users: {per_shard:?}");

    // Requests spread over both generators.
    assert!(
        generated_tokens(&metrics[0]).await > 0 && generated_tokens(&metrics[1]).await > 0,
        "both generators served"
    );

    // Kill one generator in the middle of a load of unary writes: none is lost.
    let mut load = Vec::new();
    for i in 0..8 {
        let mut c = client.clone();
        let u = users[i % users.len()].clone();
        load.push(tokio::spawn(async move { c.write(write(&u, 24)).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gen_a.kill();
    assert!(gen_a.try_wait().is_some(), "the generator outlived SIGKILL");
    for (i, w) in load.into_iter().enumerate() {
        let r = w
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("write {i} lost: {e:?}"));
        assert!(r.into_inner().generation.unwrap().generated_tokens > 0);
    }
    // The dead endpoint leaves the set when its 2-second lease expires.
    let started = Instant::now();
    let left = wait_keys(&etcd, GENERATORS, 1, Duration::from_secs(15)).await;
    assert_eq!(left.len(), 1, "{left:?}");
    eprintln!("dead generator left etcd after {:?}", started.elapsed());
    client.write(write(&users[0], 2)).await.unwrap();

    // etcd goes away: the orchestrator keeps serving on the last known endpoints.
    let etcd_child = &mut etcd_process.0[0];
    etcd_child.kill().unwrap();
    etcd_child.wait().unwrap();
    for u in users.iter().take(3) {
        let p = provenance(&mut client, u).await;
        assert_eq!(p.history_size, 3);
    }
}

/// A stage that starts while etcd is down registers once etcd comes up: the first registration
/// is retried, not given up (before, such a stage served on, never discoverable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_started_before_etcd_registers_once_it_is_up() {
    let _slot = crate::common::slot(module_path!());
    if !common::etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // etcd's ports are chosen before it starts: the stage is told its URL first.
    let free = || ghostwriter::processes::free_port().unwrap();
    let (client, peer) = (free(), free());
    let url = format!("http://127.0.0.1:{client}");
    let index = dir.path().join("index").display().to_string();
    let _retriever = stage(&url, "retriever", &[], &["--index-dir".into(), index]).await;
    // Long enough for the stage to serve and find etcd unreachable.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (etcd, _, _) =
        ghostwriter::processes::spawn_etcd_on(&dir.path().join("etcd"), None, client, peer)
            .unwrap();
    let _etcd = Kill(vec![etcd]);
    let registered = wait_keys(
        &url,
        "/ghostwriter/v1/retriever/",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(registered.len(), 1, "the retriever never registered");
}
