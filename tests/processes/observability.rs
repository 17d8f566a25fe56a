//! Operations conventions of a real process (`ghostwriter up`): JSON log lines that carry the
//! request's trace id (the caller's `traceparent`), and spans exported over OTLP/HTTP to a
//! collector endpoint (a plain HTTP server on loopback that records what is posted).

#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// (path, body) of every request posted to the collector.
type Posts = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Accepts OTLP/HTTP posts on loopback; keeps (path, body) of each.
async fn collector() -> (String, Posts) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let posts: Posts = Arc::default();
    let kept = posts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let kept = kept.clone();
            tokio::spawn(async move {
                // One request per connection is enough for the exporter's posts.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                let (head_end, length) = loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, length);
                    }
                };
                while buf.len() < head_end + length {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let path = String::from_utf8_lossy(&buf[..head_end])
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                kept.lock().unwrap().push((path, buf[head_end..].to_vec()));
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    (url, posts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_trace_ids_and_spans_go_over_otlp_http() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (collector_url, posts) = collector().await;
    let mut cmd = common::ghostwriter();
    cmd.args(["--log-format", "json", "up", "--listen", "127.0.0.1:0"])
        .arg("--model-dir")
        .arg(common::model_dir())
        .arg("--index-dir")
        .arg(dir.path().join("index"))
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector_url)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("OTEL_SERVICE_NAME", "ghostwriter-test");
    // Every line of its log is kept: each must be JSON.
    let mut up = common::StageProcess::spawn_keeping("up", cmd, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    common::wait_serving(&mut up, 120).await;
    let url = up.url().to_string();
    let lines = || up.log_lines();
    let mut client = common::client(&url).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut write = tonic::Request::new(common::short_write(
        "obs-user",
        "This strap",
        "immediate-context",
        2,
    ));
    write.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    client.write(write).await.unwrap();

    // Every line is a JSON object; the orchestrator's line about the write names the trace.
    let started = Instant::now();
    loop {
        let found = lines().iter().any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["fields"]["message"] == "write" && v["span"]["trace_id"] == trace_id
        });
        if found {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no JSON line about the write with trace_id {trace_id}:\n{}",
            lines().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for l in lines().iter() {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v.is_object()),
            "not a JSON object: {l}"
        );
    }

    // The spans reach the collector over OTLP/HTTP: the trace id (binary) and the RPC's name
    // are in a body posted to /v1/traces.
    let id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let started = Instant::now();
    loop {
        let got = posts.lock().unwrap().iter().any(|(path, body)| {
            path == "/v1/traces"
                && body.windows(16).any(|w| w == id.as_slice())
                && body
                    .windows(b"ghostwriter.v1.Ghostwriter/Write".len())
                    .any(|w| w == b"ghostwriter.v1.Ghostwriter/Write")
        });
        if got {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no OTLP/HTTP post with the write's span: {:?}",
            posts
                .lock()
                .unwrap()
                .iter()
                .map(|(p, b)| (p.clone(), b.len()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
