//! Operations: a stage past its concurrency limit answers RESOURCE_EXHAUSTED at once (health
//! still answers), a short deadline ends in DEADLINE_EXCEEDED and stops generation downstream, a
//! caller that drops its stream cancels decoding, and every process exposes Prometheus metrics
//! (beam searches and their forks included).

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use ghostwriter::proto::generate_request::Input;
use ghostwriter::proto::generator_client::GeneratorClient;
use ghostwriter::proto::{GenerateRequest, GenerationParams};

fn request(tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::Instruction(
            "Write a long story about a guitar.".into(),
        )),
        params: Some(GenerationParams {
            max_new_tokens: tokens,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    common::http_get(&addr.to_string(), "/metrics").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_deadlines_and_metrics() {
    let _slot = crate::common::slot(module_path!());
    // One RPC at a time in this server.
    let transport = ghostwriter_transport::Transport {
        max_concurrency: 1,
        ..Default::default()
    };
    let config = common::config(std::env::temp_dir()).generator;
    let t = transport.clone();
    let server = common::InProcess::start(Duration::from_secs(60), |l, stop| async move {
        ghostwriter_generator::serve(config, common::model_dir(), l, stop, &t).await
    })
    .await;
    let url = server.url.clone();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = metrics.local_addr().unwrap();
    tokio::spawn(ghostwriter_transport::metrics::serve(
        transport.metrics.clone(),
        metrics,
        server.trigger().subscribe(),
    ));

    let mut a = GeneratorClient::connect(url.clone()).await.unwrap();
    let mut b = a.clone();
    let long = tokio::spawn(async move { a.generate(request(64)).await });
    // Wait until the long request holds the only slot.
    let started = Instant::now();
    while !scrape(metrics_addr)
        .await
        .contains("ghostwriter_generator_running 1")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the first request never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let refused = b.generate(request(4)).await.expect_err("over the limit");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "refusal took {:?}",
        t.elapsed()
    );
    // Health is never shed.
    ghostwriter_transport::client::wait_until_serving(&url, "", Duration::from_secs(1), None)
        .await
        .unwrap();
    let first = long.await.unwrap().unwrap().into_inner();
    assert_eq!(first.generated_tokens, 64);

    // A deadline far shorter than the work: DEADLINE_EXCEEDED, and the engine stops decoding.
    let mut c = GeneratorClient::connect(url.clone()).await.unwrap();
    let mut r = tonic::Request::new(request(1000));
    r.set_timeout(Duration::from_millis(300));
    let status = c.generate(r).await.expect_err("deadline");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    let t = Instant::now();
    let after = c.generate(request(3)).await.unwrap().into_inner();
    assert_eq!(after.generated_tokens, 3);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the abandoned job kept decoding: {:?}",
        t.elapsed()
    );

    // A caller that goes away mid-stream cancels the decoding.
    let mut stream = c.generate_stream(request(1000)).await.unwrap().into_inner();
    use tokio_stream::StreamExt;
    for _ in 0..2 {
        stream.next().await.unwrap().unwrap();
    }
    // The open stream holds the only slot until it ends: another call is refused meanwhile.
    let held = c
        .generate(request(3))
        .await
        .expect_err("the stream holds the permit");
    assert_eq!(held.code(), tonic::Code::ResourceExhausted, "{held:?}");
    {
        use tonic_types::StatusExt;
        let retry = held.get_details_retry_info().expect("google.rpc.RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
    }
    let in_flight = scrape(metrics_addr).await;
    assert!(
        in_flight.contains(r#"ghostwriter_rpc_in_flight{service="ghostwriter.v1.Generator"} 1"#),
        "a streaming call counts as in flight until it ends:\n{in_flight}"
    );
    drop(stream);
    let t = Instant::now();
    // The slot comes back once the server sees the stream go (a reset frame away).
    let after = loop {
        match c.generate(request(3)).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "the permit never came back"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    assert_eq!(after.generated_tokens, 3);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the cancelled stream kept decoding: {:?}",
        t.elapsed()
    );

    // A unary caller that goes away before the answer is still counted, as CANCELLED.
    let mut d = GeneratorClient::connect(url.clone()).await.unwrap();
    let gone = tokio::spawn(async move { d.generate(request(1000)).await });
    let started = Instant::now();
    while !scrape(metrics_addr)
        .await
        .contains("ghostwriter_generator_running 1")
    {
        assert!(started.elapsed() < Duration::from_secs(10), "never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gone.abort();
    let cancelled = r#"ghostwriter_rpc_requests_total{code="Cancelled",method="Generate",service="ghostwriter.v1.Generator"}"#;
    let started = Instant::now();
    while !scrape(metrics_addr).await.contains(cancelled) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the cancelled RPC was never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and its decoding stops.
    let started = Instant::now();
    while !scrape(metrics_addr)
        .await
        .contains("ghostwriter_generator_running 0")
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the cancelled RPC kept decoding"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A beam search, counted with its forks.
    let mut beam = request(8);
    if let Some(p) = beam.params.as_mut() {
        p.num_beams = 2;
    }
    let mut c = GeneratorClient::connect(url.clone()).await.unwrap();
    c.generate(beam).await.unwrap();

    let text = scrape(metrics_addr).await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        text.contains("ghostwriter_generator_beam_searches_total 1\n"),
        "{text}"
    );
    let forks = text
        .lines()
        .find_map(|l| l.strip_prefix("ghostwriter_generator_beam_forks_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(forks.is_some_and(|f| f >= 1), "beam forks: {forks:?}");
    for needle in [
        r#"ghostwriter_rpc_requests_total{code="Ok",method="Generate",service="ghostwriter.v1.Generator"}"#,
        r#"ghostwriter_rpc_requests_total{code="ResourceExhausted",method="Generate",service="ghostwriter.v1.Generator"}"#,
        r#"ghostwriter_rpc_rejected_total{service="ghostwriter.v1.Generator"}"#,
        "ghostwriter_generated_tokens_total",
        "ghostwriter_rpc_duration_seconds_bucket",
        "ghostwriter_generator_queue_depth 0",
        "ghostwriter_generator_running 0",
        "ghostwriter_generator_time_to_first_token_seconds_bucket",
        "ghostwriter_generator_queue_wait_seconds_bucket",
        "ghostwriter_generator_prefix_cache_hit_tokens_total",
        // Every sequence finished: no block is held (cached blocks are free to reuse).
        "ghostwriter_generator_kv_cache_usage_ratio 0\n",
        "ghostwriter_generator_inter_token_latency_seconds_bucket",
    ] {
        assert!(text.contains(needle), "{needle} missing in:\n{text}");
    }
    server.stop().await;
}
