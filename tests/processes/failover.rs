//! Streams and writes that survive their generator, with real processes: two generators behind
//! one orchestrator, eight concurrent `WriteStream`s, and one generator killed (kill -9),
//! stopped (SIGTERM, streams longer than its drain) or hung (SIGSTOP) mid-generation: every
//! stream completes with the text of an undisturbed greedy run, and at least one says it moved.
//! Also: a scale-in (SIGTERM under steady streaming load) fails no stream; unary writes survive
//! a killed replica of every stage they use; the public API's metrics count a stream by how it
//! really ended (an error mid-way, its deadline, its caller going away).

#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{StageProcess, serve, serving};
use ghostwriter::proto::WriteRequest;
use ghostwriter::proto::ghostwriter_client::GhostwriterClient;
use ghostwriter::proto::write_stream_response::Event;
use tonic::transport::Channel;

/// One heavy scenario at a time: they share two cores.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Tokens each streamed write generates at most.
const TOKENS: u32 = 96;

/// Write `i` (of the benchmark's structured starts, which the small model continues at length).
fn write(i: usize, tokens: u32) -> WriteRequest {
    ghostwriter::bench_failover::write(i, &format!("writer-{i}"), tokens)
}

/// A topology and how to reach it: `up --processes` (etcd, mutual TLS, the orchestrator finding
/// the stages in etcd), or processes started here (static URLs).
struct Mesh {
    url: String,
    tls: Option<ghostwriter_transport::Tls>,
    /// The generators' process ids.
    generators: Vec<u32>,
    /// Every process of each stage: (stage, pid).
    stages: Vec<(String, u32)>,
    /// The orchestrator's metrics (own topologies).
    metrics: String,
    /// `up --processes` (stopped with ctrl-c: it stops its own processes), or the processes
    /// started here.
    served: Vec<StageProcess>,
    _dir: tempfile::TempDir,
}

impl Mesh {
    fn client(&self) -> GhostwriterClient<Channel> {
        common::client_over(&self.url, self.tls.as_ref())
    }

    fn log(&self) -> String {
        let logs: Vec<String> = self
            .served
            .iter()
            .map(|s| s.log_lines().join("\n"))
            .collect();
        logs.join("\n")
    }

    /// Every process of `stage`.
    fn pids(&self, stage: &str) -> Vec<u32> {
        self.stages
            .iter()
            .filter(|(s, _)| s == stage)
            .map(|(_, p)| *p)
            .collect()
    }
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

/// Whether process `pid` is gone (or a zombie waiting for its parent).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z")
    })
}

/// `up --processes --replicas REPLICAS` with `args` (passed on to the processes) and `env`
/// (which every process inherits), ready and its orchestrator knowing every generator.
async fn up(replicas: &str, args: &[&str], env: &[(&str, &str)]) -> Option<Mesh> {
    if !common::etcd_installed() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = common::ghostwriter();
    cmd.args([
        "up",
        "--processes",
        "--listen",
        "127.0.0.1:0",
        "--model-dir",
    ])
    .arg(common::model_dir())
    // The base model, which continues these starts at length (the shipped adapter ends a
    // review sooner): the streams must outlast a kill.
    .arg("--zero-shot")
    .arg("--index-dir")
    .arg(dir.path().join("index"))
    .args(["--replicas", replicas])
    // Consecutive ports from here, one a process.
    .args(["--metrics-listen", &format!("127.0.0.1:{}", common::port())])
    .args(args)
    .envs(env.iter().copied())
    .env("RUST_LOG", "info")
    .stdin(std::process::Stdio::null());
    let mut up = StageProcess::spawn_keeping("up", cmd, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
        .stopped_by("INT", Duration::from_secs(40));
    let pid = up.pid();
    // Ready, and (the line after "ready in") where its CA is.
    let callers = up
        .wait_log(Duration::from_secs(180), |l| {
            l.contains("callers: --tls-ca ")
        })
        .await
        .unwrap_or_else(|e| panic!("up did not start: {e:#}"));
    let ca = callers
        .split_once("callers: --tls-ca ")
        .and_then(|(_, l)| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no CA in {callers:?}"));
    let tls = ghostwriter_transport::Tls::from_args(&ghostwriter_transport::tls::TlsArgs {
        ca: Some(ca.into()),
        server_name: ghostwriter_transport::tls::DEFAULT_SERVER_NAME.into(),
        ..Default::default()
    })
    .unwrap();
    let children = common::children(pid);
    let stages: Vec<(String, u32)> = children
        .iter()
        .filter_map(|(child, args)| Some((common::served_stage(args)?, *child)))
        .collect();
    // Where each process serves its metrics (its `--metrics-listen`).
    let metrics_of = |pid: u32| {
        children
            .iter()
            .find(|(c, _)| *c == pid)
            .and_then(|(_, args)| {
                let at = args.iter().position(|a| a == "--metrics-listen")?;
                args.get(at + 1).cloned()
            })
            .unwrap_or_default()
    };
    let mut mesh = Mesh {
        url: up.url().to_string(),
        tls,
        generators: Vec::new(),
        stages,
        metrics: String::new(),
        served: vec![up],
        _dir: dir,
    };
    mesh.generators = mesh.pids("generator");
    let generator_metrics: Vec<String> = mesh.generators.iter().map(|p| metrics_of(*p)).collect();
    // Every generator registered and known to the orchestrator: concurrent writes, which
    // balancing spreads, reach each of them.
    let started = Instant::now();
    loop {
        let writes = (0..4).map(|i| {
            let mut c = mesh.client();
            async move { c.write(write(i, 2)).await }
        });
        let ok = futures::future::join_all(writes)
            .await
            .iter()
            .all(Result::is_ok);
        let mut every = true;
        for addr in &generator_metrics {
            every &= common::generated_tokens(addr).await > 0;
        }
        if ok && every {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the orchestrator did not find the generators:\n{}",
            mesh.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Some(mesh)
}

/// One generator (one compute thread) and an orchestrator over it, started here.
async fn own(orchestrator_args: &[&str]) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let owned = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let generator = serve(
        "generator",
        "generator",
        &owned(&["--threads", "1", "--zero-shot"]),
    )
    .await;
    let metrics = format!("127.0.0.1:{}", common::port());
    let mut args = vec![
        "--generator-url".to_string(),
        generator.url().to_string(),
        "--metrics-listen".into(),
        metrics.clone(),
    ];
    args.extend(owned(orchestrator_args));
    let orchestrator = serve("orchestrator", "orchestrator", &args).await;
    serving(generator.url()).await;
    serving(orchestrator.url()).await;
    Mesh {
        url: orchestrator.url().to_string(),
        tls: None,
        generators: vec![generator.pid()],
        stages: Vec::new(),
        metrics,
        served: vec![generator, orchestrator],
        _dir: dir,
    }
}

/// What one stream produced: its text and how many times it moved, or its error.
type Streamed = Result<(String, u32), tonic::Status>;

/// Streams `request`, counting text pieces into `pieces` as they come.
async fn stream(
    mut client: GhostwriterClient<Channel>,
    request: WriteRequest,
    pieces: Arc<AtomicUsize>,
) -> Streamed {
    let mut stream = client.write_stream(request).await?.into_inner();
    let mut text = String::new();
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(Event::Text(t)) => {
                text.push_str(&t);
                pieces.fetch_add(1, Ordering::Relaxed);
            }
            Some(Event::Done(done)) => {
                assert_eq!(done.text, text, "the final message holds the streamed text");
                let moved = done.provenance.unwrap().generator_resumptions;
                return Ok((text, moved));
            }
            _ => {}
        }
    }
    Err(tonic::Status::unavailable(
        "the stream ended without its final message",
    ))
}

/// Eight concurrent streams; `disturb` runs once they are well under way (a quarter of their
/// pieces are out).
async fn eight_streams(m: &Mesh, disturb: impl FnOnce()) -> Vec<Streamed> {
    let pieces = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|i| tokio::spawn(stream(m.client(), write(i, TOKENS), pieces.clone())))
        .collect();
    let started = Instant::now();
    while pieces.load(Ordering::Relaxed) < 8 * TOKENS as usize / 4 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the streams did not get going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    disturb();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The scenario: `up --processes --replicas generator=2`, a reference run undisturbed, then the
/// same eight streams with one generator sent `signal`; every stream must match its reference
/// and at least one must have moved.
async fn survives(args: &[&str], env: &[(&str, &str)], sig: &str) {
    let _heavy = HEAVY.lock().await;
    let Some(m) = up("generator=2", args, env).await else { return };
    assert_eq!(m.generators.len(), 2, "{:?}", m.stages);
    let reference: Vec<String> = eight_streams(&m, || {})
        .await
        .into_iter()
        .map(|r| r.expect("an undisturbed stream").0)
        .collect();
    for (i, text) in reference.iter().enumerate() {
        assert!(
            text.split_whitespace().count() > 20,
            "stream {i} is too short to be cut mid-way: {text:?}"
        );
    }
    let victim = m.generators[0];
    let disturbed = eight_streams(&m, || signal(victim, sig)).await;
    if sig == "STOP" {
        // Let it go on, so that `up` can stop it.
        signal(victim, "CONT");
    }
    let mut moved = 0;
    for (i, (got, want)) in disturbed.iter().zip(&reference).enumerate() {
        let (text, resumptions) = got.as_ref().unwrap_or_else(|e| {
            panic!(
                "stream {i} failed after kill -{sig}: {e:?}\nlog:\n{}",
                m.log()
            )
        });
        assert_eq!(text, want, "stream {i} differs from its undisturbed run");
        moved += resumptions;
    }
    assert!(moved >= 1, "no stream reports a resumption");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_survive_a_killed_generator() {
    let _slot = crate::common::slot(module_path!());
    survives(&[], &[], "KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_longer_than_the_drain_are_handed_over() {
    let _slot = crate::common::slot(module_path!());
    // The generator drains for a second, far less than the streams take: it hands them over.
    survives(&["--drain-timeout-secs", "1"], &[], "TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_survive_a_hung_generator() {
    let _slot = crate::common::slot(module_path!());
    // SIGSTOP: the process keeps its connections open and answers nothing.
    survives(
        &[
            "--keepalive-interval-secs",
            "1",
            "--keepalive-timeout-secs",
            "1",
        ],
        &[("GHOSTWRITER_GENERATOR_STALL_TIMEOUT_SECS", "2")],
        "STOP",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scale_in_under_streaming_load_fails_no_stream() {
    let _slot = crate::common::slot(module_path!());
    let _heavy = HEAVY.lock().await;
    let Some(m) = up("generator=2", &[], &[]).await else { return };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pieces = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (client, stop, pieces) = (m.client(), stop.clone(), pieces.clone());
            tokio::spawn(async move {
                let (mut done, mut failed) = (0, Vec::new());
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    match stream(client.clone(), write(i, 24), pieces.clone()).await {
                        Ok(_) => done += 1,
                        Err(e) => failed.push(e),
                    }
                    i += 4;
                }
                (done, failed)
            })
        })
        .collect();
    // Steady load, then the scale-in: SIGTERM as Kubernetes sends it. The generator leaves
    // etcd, drains and exits.
    while pieces.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = m.generators[0];
    signal(victim, "TERM");
    let left = Instant::now();
    while !gone(victim) {
        assert!(left.elapsed() < Duration::from_secs(40), "it did not leave");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the load goes on on the other.
    let after = pieces.load(Ordering::Relaxed);
    while pieces.load(Ordering::Relaxed) < after + 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut done, mut failed) = (0, Vec::new());
    for w in workers {
        let (d, f) = w.await.unwrap();
        done += d;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} of {} streams failed: {failed:?}\n{}",
        failed.len(),
        done + failed.len(),
        m.log()
    );
    assert!(done >= 8, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streams_metrics_say_how_it_ended() {
    let _slot = crate::common::slot(module_path!());
    let _heavy = HEAVY.lock().await;
    // One generator: a stream that loses it has nowhere to go.
    let m = own(&["--generator-failover-secs", "1"]).await;
    let pieces = Arc::new(AtomicUsize::new(0));
    // Cancelled: the caller goes away mid-stream.
    {
        let mut s = m
            .client()
            .write_stream(write(0, 400))
            .await
            .unwrap()
            .into_inner();
        while !matches!(
            s.message().await.unwrap().unwrap().event,
            Some(Event::Text(_))
        ) {}
    }
    // Cut by its deadline.
    let mut request = tonic::Request::new(write(1, 400));
    request.set_timeout(Duration::from_millis(1500));
    let started = Instant::now();
    let mut s = m.client().write_stream(request).await.unwrap().into_inner();
    let cut = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a 400-token write finished within 1.5 s"),
            Err(e) => break e,
        }
    };
    assert_eq!(cut.code(), tonic::Code::DeadlineExceeded, "{cut:?}");
    assert!(started.elapsed() >= Duration::from_millis(1400));
    // Failed mid-way: its only generator is killed.
    let failing = tokio::spawn(stream(m.client(), write(2, 400), pieces.clone()));
    while pieces.load(Ordering::Relaxed) < 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(m.generators[0], "KILL");
    let lost = failing.await.unwrap().expect_err("no generator is left");
    assert_eq!(lost.code(), tonic::Code::Unavailable, "{lost:?}");
    {
        use tonic_types::StatusExt as _;
        assert!(lost.get_details_retry_info().is_some(), "{lost:?}");
    }
    // The counts come at each stream's end: give the cancelled one a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = common::http_get(&m.metrics, "/metrics").await;
    let count = |code: &str| {
        common::sample(
            &metrics,
            "ghostwriter_rpc_requests_total",
            &[("method", "WriteStream"), ("code", code)],
        )
    };
    assert_eq!(count("Cancelled"), 1.0, "{metrics}");
    assert_eq!(count("DeadlineExceeded"), 1.0, "{metrics}");
    assert_eq!(count("Unavailable"), 1.0, "{metrics}");
    assert_eq!(count("Ok"), 0.0, "{metrics}");
    // Their durations run to their ends: the deadline alone took 1.5 s.
    let seconds = common::sample(
        &metrics,
        "ghostwriter_rpc_duration_seconds_sum",
        &[("method", "WriteStream")],
    );
    assert!(seconds >= 1.4, "{seconds}");
    assert_eq!(
        common::sample(
            &metrics,
            "ghostwriter_rpc_in_flight",
            &[("service", "ghostwriter.v1.Ghostwriter")]
        ),
        0.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("ghostwriter_build_info{version=\""),
        "{metrics}"
    );
}

/// A percentile (nearest rank) of `xs`, milliseconds.
fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[((p / 100.0 * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unary_writes_survive_a_killed_replica_of_every_stage() {
    let _slot = crate::common::slot(module_path!());
    let Some(path) = common::amazon_docs() else { return };
    let _heavy = HEAVY.lock().await;
    // Real users with a history: their earlier reviews are what the stages retrieve, rank,
    // summarize and mine for words.
    let loaded = ghostwriter::loaders::load(&path).unwrap();
    let mut by_user: std::collections::BTreeMap<String, Vec<ghostwriter::proto::Document>> =
        Default::default();
    for d in loaded.documents {
        by_user.entry(d.user_id.clone()).or_default().push(d);
    }
    let users: Vec<Vec<ghostwriter::proto::Document>> = by_user
        .into_values()
        .filter(|docs| docs.len() >= 6)
        .take(8)
        .collect();
    assert_eq!(users.len(), 8);

    let Some(m) = up(
        "generator=2,ranker=2,summarizer=2,synthesizer=2",
        &["--embedder-threads", "1"],
        &[],
    )
    .await
    else {
        return;
    };
    for stage in ["generator", "ranker", "summarizer", "synthesizer"] {
        assert_eq!(m.pids(stage).len(), 2, "{stage}: {:?}", m.stages);
    }
    let history: Vec<ghostwriter::proto::Document> = users
        .iter()
        .flat_map(|docs| docs[..docs.len() - 1].to_vec())
        .collect();
    ghostwriter::embedded::ingest_batches(m.client(), &history, 1000, None, |_| {})
        .await
        .unwrap();
    let requests: Vec<WriteRequest> = users
        .iter()
        .enumerate()
        .map(|(i, docs)| {
            let last = docs.last().unwrap();
            // The LLM summary (summarizer, then a generator) and the important words
            // (synthesizer), in turn.
            let preset = if i % 2 == 0 { "sum-ctx-ind" } else { "syn-ctx" };
            WriteRequest {
                start: last.text.chars().take(80).collect(),
                ..ghostwriter::embedded::write_of(&last.user_id, last, preset, 24)
            }
        })
        .collect();
    let batch = |requests: Vec<WriteRequest>| {
        requests
            .into_iter()
            .map(|r| {
                let mut c = m.client();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let out = c.write(r).await.map(|_| ());
                    (out, t.elapsed().as_secs_f64() * 1e3)
                })
            })
            .collect::<Vec<_>>()
    };
    // Undisturbed, then with one replica of the generator, ranker, summarizer and synthesizer
    // killed while the writes are in flight.
    let mut normal = Vec::new();
    for call in batch(requests.clone()) {
        let (out, ms) = call.await.unwrap();
        out.expect("an undisturbed write");
        normal.push(ms);
    }
    let calls = batch(requests);
    for (after, stage) in [
        (100, "ranker"),
        (300, "summarizer"),
        (300, "synthesizer"),
        (600, "generator"),
    ] {
        tokio::time::sleep(Duration::from_millis(after)).await;
        signal(m.pids(stage)[0], "KILL");
    }
    let mut during = Vec::new();
    let mut failed = Vec::new();
    for call in calls {
        let (out, ms) = call.await.unwrap();
        match out {
            Ok(()) => during.push(ms),
            Err(e) => failed.push(e),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 8 writes failed: {failed:?}\n{}",
        failed.len(),
        m.log()
    );
    println!(
        "{}",
        serde_json::json!({
            "undisturbed_ms": {"p50": percentile(&normal, 50.0), "p99": percentile(&normal, 99.0)},
            "replicas_killed_ms": {"p50": percentile(&during, 50.0), "p99": percentile(&during, 99.0)},
        })
    );
}

/// `up --processes --store URL --replicas retriever=2,generator=2`: every preset reads its
/// writes (a consistency token), and keeps working with a retriever replica killed (-9): the
/// orchestrator retries its reads on the other replica, which follows the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn up_processes_with_a_store_serves_every_preset_through_a_killed_retriever() {
    let _slot = crate::common::slot(module_path!());
    let Some(pg) = ghostwriter_store::cluster::for_test() else { return };
    let _heavy = HEAVY.lock().await;
    let store = pg.database("gw").unwrap();
    let Some(m) = up(
        "retriever=2,generator=2",
        &["--store", &store, "--embedder-threads", "1"],
        &[],
    )
    .await
    else {
        return;
    };
    let retrievers = m.pids("retriever");
    assert_eq!(retrievers.len(), 2, "{:?}", m.stages);
    let docs: Vec<ghostwriter::proto::Document> = (0..6)
        .map(|i| ghostwriter::proto::Document {
            user_id: "maya".into(),
            doc_id: format!("m{i}"),
            timestamp: 100 + i,
            title: "A clip-on tuner".into(),
            text: format!(
                "Tuner number {i} clips on the headstock and holds pitch through a whole gig; \
                 the display is bright on a dark stage."
            ),
        })
        .collect();
    let token = m
        .client()
        .ingest(ghostwriter::proto::IngestRequest { documents: docs })
        .await
        .unwrap()
        .into_inner()
        .consistency_token;
    assert!(!token.is_empty(), "the retriever commits to the store");
    let every_preset = async |round: &str| {
        for preset in ghostwriter_orchestrator::PRESETS {
            let mut w = common::short_write("maya", "The tuner", preset.name, 2);
            w.consistency_token = token.clone();
            w.timestamp = Some(1_000);
            let r = m
                .client()
                .write(w)
                .await
                .unwrap_or_else(|e| panic!("{round}: {} failed: {e}\n{}", preset.name, m.log()))
                .into_inner();
            if preset.ranking.is_some() {
                let p = r.provenance.unwrap();
                assert!(
                    !p.doc_ids.is_empty(),
                    "{round}: {} read none of the user's writes",
                    preset.name
                );
            }
        }
    };
    every_preset("both replicas").await;
    signal(retrievers[0], "KILL");
    every_preset("one replica killed").await;
}
