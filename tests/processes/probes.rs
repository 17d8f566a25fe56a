//! What hostile probing of a running Ghostwriter found, each fixed and kept fixed, through the
//! real binary: bad credential files stop `up` and `serve` at once with the reason; `up
//! --processes` passes every flag on or refuses it, and keeps its mesh key private (0600 in a
//! 0700 directory); embedded `up` with authentication serves no stage API on a port; a full
//! generator's RESOURCE_EXHAUSTED reaches the caller with its `RetryInfo`; a stage that is
//! down does not flood the log.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ghostwriter::proto::WriteRequest;
use ghostwriter::proto::write_stream_response::Event;
use tonic_types::StatusExt as _;

fn ghostwriter(args: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ghostwriter"))
        .arg("--model-dir")
        .arg(common::model_dir())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit within `limit`; its status.
fn exits_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Runs `ghostwriter ARGS`, which must fail within 5 s saying `reason`.
fn refused(args: &[&str], reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = ghostwriter(args, &log);
    let status = exits_within(&mut child, Duration::from_secs(5));
    let said = std::fs::read_to_string(&log).unwrap();
    let status = status.unwrap_or_else(|| panic!("{args:?} still ran after 5 s:\n{said}"));
    assert!(!status.success(), "{args:?} succeeded");
    assert!(
        said.contains(reason),
        "{args:?} did not say {reason:?}:\n{said}"
    );
}

#[test]
fn bad_credential_files_stop_up_and_serve_at_once_with_the_reason() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let short_token = dir.path().join("tokens");
    std::fs::write(&short_token, "short maya\n").unwrap();
    let short_secret = dir.path().join("secret");
    std::fs::write(&short_secret, "too short").unwrap();
    let tokens = short_token.to_str().unwrap();
    let secret = short_secret.to_str().unwrap();
    let index = dir.path().join("index");
    let index = index.to_str().unwrap();
    let port = format!("127.0.0.1:{}", common::port());
    let sixteen = "tokens must be at least 16 characters";
    let up = ["up", "--listen", &port, "--index-dir", index];
    refused(&[&up[..], &["--auth-tokens", tokens]].concat(), sixteen);
    refused(
        &[&up[..], &["--processes", "--auth-tokens", tokens]].concat(),
        sixteen,
    );
    let jwt = [
        "--auth-jwt-secret-file",
        secret,
        "--auth-jwt-issuer",
        "https://idp.example",
    ];
    refused(&[&up[..], &jwt].concat(), "at least 32 bytes");
    refused(
        &[
            "serve",
            "orchestrator",
            "--listen",
            "127.0.0.1:0",
            "--auth-tokens",
            tokens,
        ],
        sixteen,
    );
}

#[test]
fn up_takes_no_discovery_flags() {
    let _slot = crate::common::slot(module_path!());
    // A local topology runs its own discovery (one shard, its own etcd, its own addresses):
    // the flags that only `serve` takes are refused by name.
    let port = format!("127.0.0.1:{}", common::port());
    for (flag, value) in [
        ("--shard", "1"),
        ("--advertise", "http://10.0.0.1:1"),
        ("--etcd", "http://127.0.0.1:1"),
    ] {
        refused(
            &["up", "--processes", "--listen", &port, flag, value],
            &format!("unexpected argument '{flag}'"),
        );
    }
}

/// Stops `up` with ctrl-c when dropped (its stage processes stop with it).
struct Interrupt(Child);

impl Drop for Interrupt {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        if exits_within(&mut self.0, Duration::from_secs(30)).is_none() {
            let _ = self.0.kill();
        }
    }
}

/// Waits until `log` says the topology is ready and has printed what `done` looks for (the
/// lines `up` prints after "ready in"); its text.
async fn ready(log: &Path, child: &mut Child, done: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("ready in") && done(&text) {
            return text;
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("up exited with {s}:\n{text}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(150),
            "up did not start:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_processes_passes_its_flags_on_and_keeps_its_key_private() {
    let _slot = crate::common::slot(module_path!());
    if !common::etcd_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("up.log");
    let listen = format!("127.0.0.1:{}", common::port());
    // Six processes, six metrics ports from here.
    let metrics = common::port();
    let index = dir.path().join("index");
    let up = ghostwriter(
        &[
            "up",
            "--processes",
            "--listen",
            &listen,
            "--index-dir",
            index.to_str().unwrap(),
            "--max-concurrency",
            "7",
            "--request-timeout",
            "9",
            "--max-candidates",
            "50",
            "--summary-tokens",
            "40",
            "--max-running",
            "4",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
        ],
        &log,
    );
    let pid = up.id();
    let mut up = Interrupt(up);
    let text = ready(&log, &mut up.0, |t| t.contains("callers: --tls-ca ")).await;

    // The mesh's private key: 0600, in a directory only its owner opens.
    let ca = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("callers: --tls-ca "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no CA in the log:\n{text}"));
    let tls = Path::new(ca).parent().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(tls), 0o700, "{}", tls.display());
    assert_eq!(mode(&tls.join("key.pem")), 0o600);

    // Every flag reached the processes that take it.
    let stages: Vec<(String, Vec<String>)> = common::children(pid)
        .into_iter()
        .filter_map(|(_, args)| Some((common::served_stage(&args)?, args)))
        .collect();
    assert_eq!(stages.len(), 6, "{stages:?}");
    let has = |stage: &str, flag: &str| {
        stages
            .iter()
            .any(|(s, args)| s == stage && args.iter().any(|a| a == flag))
    };
    for (stage, _) in &stages {
        assert!(has(stage, "--max-concurrency=7"), "{stage}: {stages:?}");
    }
    assert!(has("orchestrator", "--request-timeout=9"), "{stages:?}");
    assert!(has("orchestrator", "--max-candidates=50"), "{stages:?}");
    assert!(has("summarizer", "--summary-tokens=40"), "{stages:?}");
    assert!(has("generator", "--max-running=4"), "{stages:?}");
    assert!(!has("retriever", "--max-running=4"), "{stages:?}");
    // And every process serves its metrics, on consecutive ports.
    for port in metrics..metrics + 6 {
        let body = common::http_get(&format!("127.0.0.1:{port}"), "/metrics").await;
        assert!(body.contains("ghostwriter_build_info"), "{port}: {body}");
    }
}

/// The TCP ports `pid` listens on (Linux `/proc`).
fn listening_tcp_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|l| {
            l.to_string_lossy()
                .strip_prefix("socket:[")
                .map(|s| s.trim_end_matches(']').to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state 0A = LISTEN, inode.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit_once(':').unwrap().1;
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_up_with_auth_serves_no_stage_on_a_port() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "admin-token-0123456789 *\n").unwrap();
    let log = dir.path().join("up.log");
    let port = common::port();
    let index = dir.path().join("index");
    let up = ghostwriter(
        &[
            "up",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--index-dir",
            index.to_str().unwrap(),
            "--auth-tokens",
            tokens.to_str().unwrap(),
        ],
        &log,
    );
    let pid = up.id();
    let mut up = Interrupt(up);
    let socket = |l: &str| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|u| u.starts_with("unix:"))
    };
    let stages = |t: &str| t.lines().filter(|l| socket(l)).count() >= 5;
    let text = ready(&log, &mut up.0, stages).await;
    // The only port is the public API's.
    assert_eq!(listening_tcp_ports(pid), vec![port], "{text}");
    // The stages are on Unix sockets in a directory no other user may open.
    let sockets: Vec<&str> = text
        .lines()
        .filter(|l| socket(l))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(sockets.len(), 5, "{text}");
    let retriever = sockets
        .iter()
        .find(|u| u.ends_with("retriever.sock"))
        .unwrap()
        .trim_start_matches("unix:");
    let private = Path::new(retriever).parent().unwrap();
    assert_eq!(
        std::fs::metadata(private).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Another user (nobody) cannot even see the socket; its owner can.
    let sees = |user: &[&str]| {
        Command::new("setpriv")
            .args(user)
            .args(["/bin/sh", "-c", "test -S \"$1\"", "sh", retriever])
            .status()
            .unwrap()
            .success()
    };
    assert!(sees(&["--reuid=0"]));
    assert!(
        !sees(&["--reuid=65534", "--regid=65534", "--clear-groups"]),
        "another user reaches the retriever's socket"
    );
    // The pipeline works through them, behind the token.
    let url = format!("http://127.0.0.1:{port}");
    let mut client = common::client_over(&url, None);
    let mut request = tonic::Request::new(common::short_write(
        "maya",
        "These strings",
        "immediate-context",
        4,
    ));
    let denied = client.write(request).await.expect_err("no token");
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);
    request = tonic::Request::new(common::short_write(
        "maya",
        "These strings",
        "immediate-context",
        4,
    ));
    ghostwriter_transport::bearer(&mut request, Some("admin-token-0123456789")).unwrap();
    client.write(request).await.expect("a write with the token");
}

/// A write that takes the generator a while.
fn long_write(i: usize) -> WriteRequest {
    let start = "Here is my detailed review of this capo, section by section.\n\nBuild:";
    common::short_write(&format!("u{i}"), start, "immediate-context", 64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_generators_refusal_reaches_the_caller_with_retry_info() {
    let _slot = crate::common::slot(module_path!());
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let generator = common::serve(
        "generator",
        "generator",
        &args(&[
            "--queue-capacity",
            "1",
            "--max-running",
            "1",
            "--threads",
            "1",
        ]),
    )
    .await;
    let orchestrator = common::serve(
        "orchestrator",
        "orchestrator",
        &["--generator-url".into(), generator.url().to_string()],
    )
    .await;
    common::serving(generator.url()).await;
    common::serving(orchestrator.url()).await;
    let unary: Vec<_> = (0..12)
        .map(|i| {
            let mut c = common::client_over(orchestrator.url(), None);
            tokio::spawn(async move { c.write(long_write(i)).await.map(|_| ()) })
        })
        .collect();
    let streams: Vec<_> = (0..12)
        .map(|i| {
            let mut c = common::client_over(orchestrator.url(), None);
            tokio::spawn(async move {
                let mut s = c.write_stream(long_write(i)).await?.into_inner();
                while let Some(m) = s.message().await? {
                    if matches!(m.event, Some(Event::Done(_))) {
                        break;
                    }
                }
                Ok::<(), tonic::Status>(())
            })
        })
        .collect();
    for (kind, calls) in [("Write", unary), ("WriteStream", streams)] {
        let mut refused = 0;
        for call in calls {
            if let Err(e) = call.await.unwrap() {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{kind}: {e:?}");
                assert!(e.get_details_retry_info().is_some(), "{kind}: {e:?}");
                refused += 1;
            }
        }
        assert!(refused > 0, "{kind}: the full generator refused nothing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_is_down_does_not_flood_the_log() {
    let _slot = crate::common::slot(module_path!());
    // Nothing listens there.
    let dead = format!("http://127.0.0.1:{}", common::port());
    let orchestrator = common::serve(
        "orchestrator",
        "orchestrator",
        &["--generator-url".into(), dead],
    )
    .await;
    common::serving(orchestrator.url()).await;
    let mut client = common::client_over(orchestrator.url(), None);
    let write = || common::short_write("maya", "These strings", "immediate-context", 4);
    for _ in 0..300 {
        let e = client.write(write()).await.expect_err("no generator");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.get_details_retry_info().is_some(), "{e:?}");
    }
    let lines = |log: &str, what: &str| log.lines().filter(|l| l.contains(what)).count();
    let log = orchestrator.log_lines().join("\n");
    assert_eq!(lines(&log, "stage unavailable"), 1, "{log}");
    assert!(lines(&log, "endpoint ejected") <= 1, "{log}");
    // The next one, an interval later, says how many were held back.
    tokio::time::sleep(ghostwriter_common::throttle::DEFAULT_EVERY + Duration::from_millis(300))
        .await;
    client.write(write()).await.expect_err("no generator");
    let log = orchestrator.log_lines().join("\n");
    assert_eq!(lines(&log, "stage unavailable"), 2, "{log}");
    assert!(log.contains("repeated=299"), "{log}");
}
