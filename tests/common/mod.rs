//! Test harness, a module of each of the four test binaries (`models`, `packaging`,
//! `processes`, `services`): real stages on 127.0.0.1:0 (the embedded topology, or `ghostwriter`
//! processes through [`StageProcess`]), real models, real data, and the slot that keeps the
//! tests of one module apart from another module's.

#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Condvar, Mutex, OnceLock};

#[allow(unused_imports)] // not every test binary starts processes
pub use ghostwriter_runtime::stage_process::StageProcess;

use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

use ghostwriter::embedded::{Embedded, EmbeddedConfig};
use ghostwriter::proto::Document;
use ghostwriter::proto::ghostwriter_client::GhostwriterClient;
use tonic::transport::Channel;

/// Whether a test may skip when its data or service is missing (`GHOSTWRITER_ALLOW_SKIP=1`).
/// CI never sets it: there a missing prerequisite fails the test.
pub fn allow_skip() -> bool {
    std::env::var("GHOSTWRITER_ALLOW_SKIP").is_ok_and(|v| v == "1")
}

/// Fails the test for a missing prerequisite, or skips it (returns `None`) when
/// `GHOSTWRITER_ALLOW_SKIP=1`.
pub fn missing<T>(what: &str) -> Option<T> {
    assert!(
        allow_skip(),
        "{what} (set GHOSTWRITER_ALLOW_SKIP=1 to skip instead of failing)"
    );
    eprintln!("SKIPPED: {what}");
    None
}

/// Whether `etcd` is installed; a missing one fails the test unless `GHOSTWRITER_ALLOW_SKIP=1`.
pub fn etcd_installed() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok()
        || missing::<()>("etcd is not installed (Debian: etcd-server; .ci/run installs it)")
            .is_some()
}

/// `../shared/data/amazon-musical-instruments/docs.jsonl`; a missing file fails the test
/// unless `GHOSTWRITER_ALLOW_SKIP=1` (then `None`).
pub fn amazon_docs() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/amazon-musical-instruments/docs.jsonl");
    if path.is_file() {
        Some(path)
    } else {
        missing(&format!(
            "{} is absent (tests on real data need ../shared)",
            path.display()
        ))
    }
}

/// The model directory, pulled if needed (once per test binary).
pub fn model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = ghostwriter_common::models::default_dir();
        ghostwriter::models::ensure(&dir).expect("models pull");
        dir
    })
    .clone()
}

/// Default settings with a fresh index directory.
pub fn config(index_dir: PathBuf) -> EmbeddedConfig {
    let mut c = EmbeddedConfig::defaults();
    c.retriever.index_dir = index_dir;
    c
}

/// The embedded topology with `config`, its public API on a loopback port of its own.
pub async fn embedded(config: EmbeddedConfig) -> Embedded {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let transport = ghostwriter_transport::Transport::default();
    Embedded::start(config, model_dir(), listener, transport)
        .await
        .unwrap_or_else(|e| panic!("the embedded topology did not start: {e:#}"))
}

/// A topology that lives for the whole test binary on its own runtime.
pub struct Shared {
    pub url: String,
    pub stage_urls: std::collections::BTreeMap<ghostwriter_common::stage::StageKind, String>,
    _dir: tempfile::TempDir,
}

/// The module whose tests hold the binary now, and how many of them run.
static SLOT: Mutex<(Option<String>, usize)> = Mutex::new((None, 0));
static SLOT_FREED: Condvar = Condvar::new();

/// A test's place in its binary: the tests of one module run beside each other (as many at
/// once as the harness runs), never beside another module's. Modules time kills against load,
/// storm a server, install the process-wide tracer or count a process's metrics; each was
/// written to have the machine to itself, as when it was a binary of its own.
pub struct Slot;

/// Waits until no other module's test runs; the first line of every test:
/// `let _slot = crate::common::slot(module_path!());`.
pub fn slot(module_path: &str) -> Slot {
    // `binary::module` (a test in a nested module counts as its file's).
    let module: String = module_path
        .split("::")
        .take(2)
        .collect::<Vec<_>>()
        .join("::");
    let mut s = SLOT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match &s.0 {
            None => {
                *s = (Some(module), 1);
                break;
            }
            Some(m) if *m == module => {
                s.1 += 1;
                break;
            }
            Some(_) => s = SLOT_FREED.wait(s).unwrap_or_else(|e| e.into_inner()),
        }
    }
    Slot
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = SLOT.lock().unwrap_or_else(|e| e.into_inner());
        s.1 -= 1;
        if s.1 == 0 {
            s.0 = None;
            SLOT_FREED.notify_all();
        }
    }
}

/// The process-wide tracing of a test binary, installed once: text logs (`RUST_LOG`, default
/// info) and every span kept in memory (the provider, to flush; the exporter, to read).
pub fn telemetry() -> &'static (SdkTracerProvider, InMemorySpanExporter) {
    static TELEMETRY: OnceLock<(SdkTracerProvider, InMemorySpanExporter)> = OnceLock::new();
    TELEMETRY.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        ghostwriter_common::telemetry::init_with_provider(
            Some(provider.clone()),
            ghostwriter_common::telemetry::LogFormat::Text,
        );
        (provider, exporter)
    })
}

/// Installs `packages` (pinned) with pip into `target`, a directory to put on `PYTHONPATH` or
/// run tools from; fails the test if pip does.
pub fn pip_install(target: &std::path::Path, packages: &[&str]) {
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(target)
        .args(packages)
        .status()
        .expect("python3 -m pip");
    assert!(
        status.success(),
        "pip install {packages:?} into {} failed",
        target.display()
    );
}

/// The `ghostwriter` binary (its command's `--model-dir`: [`model_dir`]).
pub fn ghostwriter() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ghostwriter"))
}

/// Starts `cmd` (a `ghostwriter serve ... --listen HOST:0`) as the process `name` and returns
/// once it reports where it listens; panics, with its log, if it does not.
pub async fn start(name: &str, cmd: Command) -> StageProcess {
    StageProcess::spawn(name, cmd)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// [`StageProcess::wait_serving`] (plain HTTP/2) within `secs` seconds, or a panic with its log.
pub async fn wait_serving(process: &mut StageProcess, secs: u64) {
    process
        .wait_serving(None, std::time::Duration::from_secs(secs))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Where a process started with `--metrics-listen 127.0.0.1:0` serves its metrics: the address
/// it listens on besides its API.
pub fn metrics_addr(process: &StageProcess) -> String {
    let api: std::net::SocketAddr = process
        .url()
        .split("://")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{}: no address in {}", process.name(), process.url()));
    let others: Vec<_> = process
        .listening()
        .unwrap()
        .into_iter()
        .filter(|a| *a != api)
        .collect();
    assert_eq!(
        others.len(),
        1,
        "{}: one metrics listener besides {api}: {others:?}",
        process.name()
    );
    others[0].to_string()
}

/// Starts a topology on a runtime that outlives every test, running `setup` once against it.
pub fn shared<F>(setup: F) -> &'static Shared
where
    F: FnOnce(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + 'static,
{
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        telemetry();
        model_dir(); // pulls the models here, on the test's thread, where a failure is reported
        // Tests run inside their own runtimes: the shared topology gets a runtime of its own,
        // built and driven from a plain thread, and never dropped.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let dir = tempfile::tempdir().expect("tempdir");
            let (url, stage_urls) = rt.block_on(async {
                let embedded = embedded(config(dir.path().join("index"))).await;
                let url = embedded.url();
                let stages = embedded
                    .urls
                    .keys()
                    .map(|k| (*k, embedded.stage_url(*k)))
                    .collect();
                std::mem::forget(embedded);
                (url, stages)
            });
            rt.block_on(setup(url.clone()));
            std::mem::forget(rt);
            Shared {
                url,
                stage_urls,
                _dir: dir,
            }
        })
        .join()
        .expect("starting the shared topology")
    })
}

/// A client of the public API (plain HTTP/2).
pub async fn client(url: &str) -> GhostwriterClient<Channel> {
    client_over(url, None)
}

/// A client of the public API, over `tls` when given.
#[allow(dead_code)] // not every test binary speaks TLS
pub fn client_over(
    url: &str,
    tls: Option<&ghostwriter_transport::Tls>,
) -> GhostwriterClient<Channel> {
    GhostwriterClient::new(ghostwriter_transport::client::channel(url, tls).expect("a channel"))
        .max_decoding_message_size(ghostwriter_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ghostwriter_common::MAX_MESSAGE_BYTES)
}

/// Ingests `documents` in batches.
pub async fn ingest(url: &str, documents: &[Document]) {
    ghostwriter::embedded::ingest(url, documents, None)
        .await
        .expect("ingest");
}

#[allow(unused_imports)] // not every test binary writes
pub use ghostwriter::embedded::short_write;

/// Child processes killed (and reaped) when dropped, also when a test fails first.
pub struct Kill(pub Vec<std::process::Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port free on `ip` now.
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A port free on 127.0.0.1 now, below the kernel's range for port 0, so that no process
/// started on port 0 takes it before the one it is for (prefer `--listen 127.0.0.1:0` and
/// [`StageProcess`] where the process reports its address).
pub fn port() -> u16 {
    ghostwriter_common::net::free_port().unwrap()
}

/// The whole HTTP/1.1 response (status line, headers, body) to `GET path` on the plain-HTTP
/// metrics port at `addr`, as a probe or a scraper sends it.
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// `ghostwriter_generated_tokens_total` on a process's `/metrics` at `addr`.
pub async fn generated_tokens(addr: &str) -> u64 {
    http_get(addr, "/metrics")
        .await
        .lines()
        .find(|l| l.starts_with("ghostwriter_generated_tokens_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The workspace's one seeded generator.
#[allow(unused_imports)] // not every test binary draws
pub use ghostwriter_common::rng::Rng;

/// Starts `ghostwriter serve --listen 127.0.0.1:0 --model-dir M STAGE ARGS...` (models from
/// [`model_dir`]) as the process `name`, keeping its whole log (`log_lines`), and returns once
/// it reports where it listens (not yet that it is SERVING: see [`serving`]).
pub async fn serve(name: &str, stage: &str, args: &[String]) -> StageProcess {
    let mut cmd = ghostwriter();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--model-dir"])
        .arg(model_dir())
        .arg(stage)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
    StageProcess::spawn_keeping(name, cmd, usize::MAX)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The first line of a test that needs Postgres: its [`slot`], a throwaway cluster and the URL
/// of a database `gw` on it. `None` (the test returns) only where a missing Postgres may be
/// skipped (`GHOSTWRITER_ALLOW_SKIP=1`); otherwise a missing Postgres fails the test.
pub fn postgres(module_path: &str) -> Option<(Slot, ghostwriter_store::cluster::Cluster, String)> {
    let slot = slot(module_path);
    let pg = ghostwriter_store::cluster::for_test()?;
    let url = pg.database("gw").unwrap();
    Some((slot, pg, url))
}

/// The stage a `ghostwriter serve … STAGE …` command line (`args`) serves.
pub fn served_stage(args: &[String]) -> Option<String> {
    let at = args.iter().position(|a| a == "serve")?;
    let named = |a: &&String| {
        ghostwriter_common::stage::StageKind::ALL
            .iter()
            .any(|k| k.name() == *a)
    };
    args[at + 1..].iter().find(named).cloned()
}

/// A stage server in this test's process, on a loopback port of its own.
pub struct InProcess {
    pub url: String,
    stop: ghostwriter_common::shutdown::ShutdownTrigger,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Starts `serve(listener, shutdown)` and returns once it reports SERVING (within
    /// `ready_within`).
    pub async fn start<F, Fut>(ready_within: std::time::Duration, serve: F) -> Self
    where
        F: FnOnce(tokio::net::TcpListener, ghostwriter_common::shutdown::Shutdown) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, shutdown) = ghostwriter_common::shutdown::channel();
        let mut task = tokio::spawn(serve(listener, shutdown));
        let ready = ghostwriter_transport::client::wait_until_serving(&url, "", ready_within, None);
        tokio::select! {
            ready = ready => {
                ready.unwrap_or_else(|e| panic!("{url}: {}", e.message()));
            }
            // A server that ends before it serves says why, instead of a timeout on its port.
            ended = &mut task => panic!("{url} ended before it was SERVING: {:?}", ended.unwrap()),
        }
        Self { url, stop, task }
    }

    /// The trigger that stops it (other servers of the test subscribe to it, to stop with it).
    pub fn trigger(&self) -> &ghostwriter_common::shutdown::ShutdownTrigger {
        &self.stop
    }

    /// Stops it and waits until it has stopped cleanly.
    pub async fn stop(self) {
        self.stop.trigger();
        let url = self.url;
        if let Err(e) = self.task.await.unwrap() {
            panic!("{url} did not stop cleanly: {e:#}");
        }
    }
}

/// Waits until the process at `url` reports SERVING.
pub async fn serving(url: &str) {
    let within = std::time::Duration::from_secs(120);
    ghostwriter_transport::client::serving(url, within)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// The value of the Prometheus sample `name{labels}` (labels as written in the exposition, in
/// any order) in `metrics`; 0 when absent.
pub fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The children of `pid` and their command lines.
pub fn children(pid: u32) -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: the comm may hold spaces, the fields after it do not.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            out.push((child, args));
        }
    }
    out
}
