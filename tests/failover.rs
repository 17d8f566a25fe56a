//! Streams and writes that survive their generator, with real processes: two generators behind
//! one orchestrator, eight concurrent `WriteStream`s, and one generator killed (kill -9),
//! stopped (SIGTERM, streams longer than its drain) or hung (SIGSTOP) mid-generation: every
//! stream completes with the text of an undisturbed greedy run, and at least one says it moved.
//! Also: a scale-in (SIGTERM under steady streaming load) fails no stream; unary writes survive
//! a killed replica of every stage they use; the public API's metrics count a stream by how it
//! really ended (an error mid-way, its deadline, its caller going away).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Served, serve, serving};
use ghostwriter::proto::ghostwriter_client::GhostwriterClient;
use ghostwriter::proto::write_stream_response::Event;
use ghostwriter::proto::{GenerationParams, WriteOptions, WriteRequest};
use tonic::transport::Channel;

/// One heavy scenario at a time: they share two cores.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts of the eight streamed writes: structured ones, which the small model continues at
/// length (a plain review start gets a sentence and the end-of-turn token).
const STARTS: [&str; 8] = [
    "Here is my detailed review of these acoustic strings, section by section.\n\nTone:",
    "Here is my detailed review of this capo, section by section.\n\nBuild:",
    "Here is my detailed review of this distortion pedal, section by section.\n\nSound:",
    "Here is my detailed review of this folding guitar stand, section by section.\n\nStability:",
    "Here is my detailed review of this digital piano, section by section.\n\nKeys:",
    "Here is my detailed review of this ukulele, section by section.\n\nTuning:",
    "Here is my detailed review of this bass guitar, section by section.\n\nNeck:",
    "Here is my detailed review of this harmonica, section by section.\n\nReeds:",
];

/// Tokens each streamed write generates at most.
const TOKENS: u32 = 96;

fn write(i: usize, tokens: u32) -> WriteRequest {
    WriteRequest {
        user_id: format!("writer-{i}"),
        start: STARTS[i % STARTS.len()].into(),
        preset: "immediate-context".into(),
        options: Some(WriteOptions {
            generation: Some(GenerationParams {
                max_new_tokens: tokens,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Two generators (one compute thread each) and an orchestrator balancing over them.
struct Mesh {
    /// Their logs.
    _dir: tempfile::TempDir,
    generators: Vec<Served>,
    orchestrator: Served,
    metrics: String,
}

async fn mesh(generators: usize, generator_args: &[&str], orchestrator_args: &[&str]) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let owned = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut gens = Vec::new();
    for i in 0..generators {
        let mut args = owned(&["--threads", "1"]);
        args.extend(owned(generator_args));
        gens.push(serve(
            dir.path(),
            &format!("generator-{i}"),
            "generator",
            &args,
        ));
    }
    let urls: Vec<String> = gens.iter().map(|g| g.url.clone()).collect();
    let metrics = format!("127.0.0.1:{}", common::port());
    let mut args = vec![
        "--generator-url".to_string(),
        urls.join(","),
        "--metrics-listen".into(),
        metrics.clone(),
    ];
    args.extend(owned(orchestrator_args));
    let orchestrator = serve(dir.path(), "orchestrator", "orchestrator", &args);
    for g in &gens {
        serving(&g.url).await;
    }
    serving(&orchestrator.url).await;
    Mesh {
        _dir: dir,
        generators: gens,
        orchestrator,
        metrics,
    }
}

impl Mesh {
    fn client(&self) -> GhostwriterClient<Channel> {
        common::client_over(&self.orchestrator.url, None)
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

/// Eight concurrent streams; `disturb` runs once they are well under way (every stream has
/// sent text, a quarter of the pieces are out).
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

/// The scenario: a reference run undisturbed, then the same eight streams with one generator
/// disturbed; every stream must match its reference and at least one must have moved.
async fn survives(generator_args: &[&str], orchestrator_args: &[&str], signal: &str) {
    let _heavy = HEAVY.lock().await;
    let m = mesh(2, generator_args, orchestrator_args).await;
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
    let victim = &m.generators[0];
    let disturbed = eight_streams(&m, || victim.signal(signal)).await;
    let mut moved = 0;
    for (i, (got, want)) in disturbed.iter().zip(&reference).enumerate() {
        let (text, resumptions) = got.as_ref().unwrap_or_else(|e| {
            panic!(
                "stream {i} failed after kill -{signal}: {e:?}\norchestrator:\n{}",
                m.orchestrator.log()
            )
        });
        assert_eq!(text, want, "stream {i} differs from its undisturbed run");
        moved += resumptions;
    }
    assert!(moved >= 1, "no stream reports a resumption");
    if signal == "STOP" {
        victim.signal("CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_survive_a_killed_generator() {
    survives(&[], &[], "KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_longer_than_the_drain_are_handed_over() {
    // The generator drains for a second, far less than the streams take: it hands them over.
    survives(&["--drain-timeout-secs", "1"], &[], "TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_survive_a_hung_generator() {
    // SIGSTOP: the process keeps its connections open and answers nothing.
    survives(
        &[],
        &[
            "--generator-stall-timeout-secs",
            "2",
            "--keepalive-interval-secs",
            "1",
            "--keepalive-timeout-secs",
            "1",
        ],
        "STOP",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scale_in_under_streaming_load_fails_no_stream() {
    let _heavy = HEAVY.lock().await;
    let mut m = mesh(2, &[], &[]).await;
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
    // Steady load, then the scale-in: SIGTERM as Kubernetes sends it.
    while pieces.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m.generators[0].signal("TERM");
    let left = Instant::now();
    let status = loop {
        if let Some(s) = m.generators[0].child.try_wait().unwrap() {
            break s;
        }
        assert!(left.elapsed() < Duration::from_secs(40), "it did not leave");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the generator left with {status:?}");
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
        "{} of {} streams failed: {failed:?}",
        failed.len(),
        done + failed.len()
    );
    assert!(done >= 8, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streams_metrics_say_how_it_ended() {
    let _heavy = HEAVY.lock().await;
    // One generator: a stream that loses it has nowhere to go.
    let m = mesh(1, &[], &["--generator-failover-secs", "1"]).await;
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
    m.generators[0].signal("KILL");
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
    let Some(path) = common::amazon_docs() else {
        return;
    };
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

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let owned = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let embedder = owned(&["--embedder-threads", "1"]);
    let retriever = serve(
        d,
        "retriever",
        "retriever",
        &["--index-dir".into(), d.join("index").display().to_string()],
    );
    let two = |stage: &str, args: &[String]| -> Vec<Served> {
        (0..2)
            .map(|i| serve(d, &format!("{stage}-{i}"), stage, args))
            .collect()
    };
    let generators = two("generator", &owned(&["--threads", "1"]));
    let generator_urls = generators
        .iter()
        .map(|g| g.url.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let rankers = two("ranker", &embedder);
    let mut summarizer_args = embedder.clone();
    summarizer_args.extend(["--generator-url".to_string(), generator_urls.clone()]);
    let summarizers = two("summarizer", &summarizer_args);
    let synthesizers = two("synthesizer", &embedder);
    let join = |s: &[Served]| {
        s.iter()
            .map(|p| p.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let orchestrator = serve(
        d,
        "orchestrator",
        "orchestrator",
        &[
            "--retriever-url".into(),
            retriever.url.clone(),
            "--ranker-url".into(),
            join(&rankers),
            "--summarizer-url".into(),
            join(&summarizers),
            "--synthesizer-url".into(),
            join(&synthesizers),
            "--generator-url".into(),
            generator_urls,
        ],
    );
    for p in [&retriever, &orchestrator]
        .into_iter()
        .chain(&generators)
        .chain(&rankers)
        .chain(&summarizers)
        .chain(&synthesizers)
    {
        serving(&p.url).await;
    }
    let url = orchestrator.url.clone();
    let history: Vec<ghostwriter::proto::Document> = users
        .iter()
        .flat_map(|docs| docs[..docs.len() - 1].to_vec())
        .collect();
    common::ingest(&url, &history).await;
    let requests: Vec<WriteRequest> = users
        .iter()
        .enumerate()
        .map(|(i, docs)| {
            let last = docs.last().unwrap();
            WriteRequest {
                user_id: last.user_id.clone(),
                title: last.title.clone(),
                start: last.text.chars().take(80).collect(),
                timestamp: Some(last.timestamp),
                doc_id: last.doc_id.clone(),
                // The LLM summary (summarizer, then a generator) and the important words
                // (synthesizer), in turn.
                preset: if i % 2 == 0 { "sum-ctx-ind" } else { "syn-ctx" }.into(),
                options: Some(WriteOptions {
                    generation: Some(GenerationParams {
                        max_new_tokens: 24,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    let batch = |requests: Vec<WriteRequest>| {
        let url = url.clone();
        async move {
            let calls: Vec<_> = requests
                .into_iter()
                .map(|r| {
                    let mut c = common::client_over(&url, None);
                    tokio::spawn(async move {
                        let t = Instant::now();
                        let out = c.write(r).await.map(|_| ());
                        (out, t.elapsed().as_secs_f64() * 1e3)
                    })
                })
                .collect();
            calls
        }
    };
    // Undisturbed, then with one replica of the generator, ranker, summarizer and synthesizer
    // killed while the writes are in flight.
    let mut normal = Vec::new();
    for call in batch(requests.clone()).await {
        let (out, ms) = call.await.unwrap();
        out.expect("an undisturbed write");
        normal.push(ms);
    }
    let calls = batch(requests).await;
    for (after, victim) in [
        (100, &rankers[0]),
        (300, &summarizers[0]),
        (300, &synthesizers[0]),
        (600, &generators[0]),
    ] {
        tokio::time::sleep(Duration::from_millis(after)).await;
        victim.signal("KILL");
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
        orchestrator.log()
    );
    println!(
        "{}",
        serde_json::json!({
            "undisturbed_ms": {"p50": percentile(&normal, 50.0), "p99": percentile(&normal, 99.0)},
            "replicas_killed_ms": {"p50": percentile(&during, 50.0), "p99": percentile(&during, 99.0)},
        })
    );
}
