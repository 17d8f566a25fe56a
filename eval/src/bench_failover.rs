//! `bench-failover`: what a generator dying mid-generation costs the writes in flight, with real
//! processes on loopback: two generators behind one orchestrator, rounds of concurrent streamed
//! and unary writes, one generator killed (kill -9) in the middle of each round and started
//! again after it. Reports failed writes (the target is none), the added latency of streams and
//! of unary writes against undisturbed rounds, and for each stream that moved, the pause around
//! the failure (the longest gap between its pieces) beside the survivor's own re-prefill of that
//! prompt and the tokens it had (a `Generate` with the same `resume_token_ids`, cache cold).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::generator_client::GeneratorClient;
use ghostwriter_proto::v1::ghostwriter_client::GhostwriterClient;
use ghostwriter_proto::v1::write_stream_response::Event;
use ghostwriter_proto::v1::{GenerateRequest, GenerationParams, PersonalizedInput, WriteRequest};
use serde_json::{Value, json};

/// Options of `bench-failover`.
#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// Streamed writes to measure with a failure (and as many undisturbed).
    #[arg(long, default_value_t = 100)]
    pub streams: usize,
    /// Unary writes to measure with a failure (and as many undisturbed).
    #[arg(long, default_value_t = 100)]
    pub writes: usize,
    /// Writes in flight in each round (one generator dies in each).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Tokens each write generates at most.
    #[arg(long, default_value_t = 64)]
    pub tokens: u32,
    /// Compute threads of each generator (0 = every core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// The generators' device (cpu, cuda; cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where to write the JSON report (also printed).
    #[arg(long, default_value = "bench-failover.json")]
    pub out: PathBuf,
}

/// Starts the small model continues at length (a plain review start gets a sentence and the
/// end-of-turn token): structured ones, so a stream outlasts a kill.
pub const STARTS: [&str; 8] = [
    "Here is my detailed review of these acoustic strings, section by section.\n\nTone:",
    "Here is my detailed review of this capo, section by section.\n\nBuild:",
    "Here is my detailed review of this distortion pedal, section by section.\n\nSound:",
    "Here is my detailed review of this folding guitar stand, section by section.\n\nStability:",
    "Here is my detailed review of this digital piano, section by section.\n\nKeys:",
    "Here is my detailed review of this ukulele, section by section.\n\nTuning:",
    "Here is my detailed review of this bass guitar, section by section.\n\nNeck:",
    "Here is my detailed review of this harmonica, section by section.\n\nReeds:",
];

/// Write `i` of `user`: start `i` (of [`STARTS`]) continued by `tokens` tokens at most, on the
/// immediate-context preset.
pub fn write(i: usize, user: &str, tokens: u32) -> WriteRequest {
    ghostwriter_runtime::embedded::short_write(
        user,
        STARTS[i % STARTS.len()],
        "immediate-context",
        tokens,
    )
}

/// The generator's input the orchestrator builds for [`write`] (the immediate-context preset:
/// the passage start alone).
fn input(i: usize) -> Input {
    Input::Personalized(PersonalizedInput {
        passage_start: ghostwriter_orchestrator::immediate_context(
            "",
            STARTS[i % STARTS.len()],
            ghostwriter_orchestrator::DEFAULT_CONTEXT_CHARS,
        ),
        ..Default::default()
    })
}

/// A generator process on a fixed port (started again on the same one after a kill).
struct Generator {
    port: u16,
    child: Option<std::process::Child>,
}

impl Generator {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn start(
        &mut self,
        exe: &Path,
        model_dir: &Path,
        a: &FailoverArgs,
    ) -> anyhow::Result<()> {
        let threads = a.threads.to_string();
        let child = std::process::Command::new(exe)
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--model-dir")
            .arg(model_dir)
            .args([
                "generator",
                "--zero-shot",
                "--threads",
                &threads,
                "--device",
                &a.device,
            ])
            .env("RUST_LOG", "error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        self.child = Some(child);
        crate::bench::wait_until(&self.url()).await
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One streamed write: when it opened, each piece (time, text length so far), its outcome.
struct Streamed {
    start: usize,
    opened: Instant,
    pieces: Vec<(Instant, usize)>,
    done: Option<Instant>,
    text: String,
    resumptions: u32,
    error: Option<String>,
}

impl Streamed {
    fn total_ms(&self) -> f64 {
        self.done
            .map_or(0.0, |d| d.duration_since(self.opened).as_secs_f64() * 1e3)
    }

    /// The longest gap between two pieces (the pause around a failure), and the text length
    /// before it.
    fn pause(&self) -> (f64, usize) {
        let mut best = (0.0, 0);
        for w in self.pieces.windows(2) {
            let gap = w[1].0.duration_since(w[0].0).as_secs_f64() * 1e3;
            if gap > best.0 {
                best = (gap, w[0].1);
            }
        }
        best
    }
}

async fn stream(
    url: String,
    request: WriteRequest,
    start: usize,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Streamed {
    let opened = Instant::now();
    let mut out = Streamed {
        start,
        opened,
        pieces: Vec::new(),
        done: None,
        text: String::new(),
        resumptions: 0,
        error: None,
    };
    let result = async {
        let mut client = GhostwriterClient::connect(url).await?;
        let mut s = client.write_stream(request).await?.into_inner();
        while let Some(m) = s.message().await? {
            match m.event {
                Some(Event::Text(t)) if !t.is_empty() => {
                    out.text.push_str(&t);
                    out.pieces.push((Instant::now(), out.text.len()));
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Some(Event::Done(d)) => {
                    out.done = Some(Instant::now());
                    out.resumptions = d.provenance.map_or(0, |p| p.generator_resumptions);
                    return Ok(());
                }
                _ => {}
            }
        }
        anyhow::bail!("the stream ended without its final message")
    }
    .await;
    if let Err(e) = result {
        out.error = Some(format!("{e:#}"));
    }
    out
}

/// A direct stream from a generator: its pieces as (text length so far, token ids so far).
async fn reference(
    url: &str,
    i: usize,
    tokens: u32,
) -> anyhow::Result<(Vec<u32>, Vec<(usize, usize)>)> {
    let mut g = GeneratorClient::connect(url.to_string()).await?;
    let mut s = g
        .generate_stream(GenerateRequest {
            input: Some(input(i)),
            params: Some(GenerationParams {
                max_new_tokens: tokens,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let (mut ids, mut marks, mut len) = (Vec::new(), Vec::new(), 0);
    while let Some(m) = s.message().await? {
        ids.extend_from_slice(&m.token_ids);
        len += m.text.len();
        marks.push((len, ids.len()));
    }
    Ok((ids, marks))
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
        }
    };
    json!({"n": v.len(), "p50": at(0.5), "p99": at(0.99), "max": v.last().copied().unwrap_or(0.0)})
}

/// Runs the benchmark (see the module docs).
pub async fn run(exe: &Path, model_dir: &Path, a: &FailoverArgs) -> anyhow::Result<Value> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    anyhow::ensure!(a.concurrency >= 1, "--concurrency must be at least 1");
    let port = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let mut gens = [
        Generator {
            port: port()?,
            child: None,
        },
        Generator {
            port: port()?,
            child: None,
        },
    ];
    for g in &mut gens {
        g.start(exe, model_dir, a).await?;
    }
    let o = port()?;
    let mut orchestrator = std::process::Command::new(exe)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{o}"),
            "orchestrator",
        ])
        .arg("--generator-url")
        .arg(format!("{},{}", gens[0].url(), gens[1].url()))
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting the orchestrator")?;
    let url = format!("http://127.0.0.1:{o}");
    let result = async {
        crate::bench::wait_until(&url).await?;
        // Each start's undisturbed token ids, from a generator directly.
        let mut references = Vec::new();
        for i in 0..STARTS.len() {
            references.push(reference(&gens[0].url(), i, a.tokens).await?);
        }
        let rounds = |n: usize| n.div_ceil(a.concurrency);
        let mut user = 0usize;
        let mut next_user = || {
            user += 1;
            format!("bench-{user}")
        };

        // Streams, undisturbed then with a kill in each round.
        let mut undisturbed: Vec<Streamed> = Vec::new();
        let mut disturbed: Vec<Streamed> = Vec::new();
        let mut reprefill: Vec<(f64, f64)> = Vec::new();
        for kill in [false, true] {
            for round in 0..rounds(a.streams) {
                let progress = Arc::new(AtomicUsize::new(0));
                let tasks: Vec<_> = (0..a.concurrency)
                    .map(|j| {
                        let i = round * a.concurrency + j;
                        tokio::spawn(stream(
                            url.clone(),
                            write(i, &next_user(), a.tokens),
                            i % STARTS.len(),
                            progress.clone(),
                        ))
                    })
                    .collect();
                let victim = round % 2;
                if kill {
                    // Mid-generation: every stream has sent a few pieces.
                    let started = Instant::now();
                    while progress.load(Ordering::Relaxed) < a.concurrency * 6
                        && started.elapsed() < Duration::from_secs(120)
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    gens[victim].kill();
                }
                let mut done = Vec::new();
                for t in tasks {
                    done.push(t.await?);
                }
                if kill {
                    // The survivor's own re-prefill of each moved stream's prompt and tokens.
                    let survivor = gens[1 - victim].url();
                    for s in done.iter().filter(|s| s.resumptions > 0 && s.error.is_none()) {
                        let (pause, before) = s.pause();
                        let (ids, marks) = &references[s.start];
                        let resumed = marks
                            .iter()
                            .take_while(|(len, _)| *len <= before)
                            .last()
                            .map_or(0, |(_, n)| *n);
                        let mut g = GeneratorClient::connect(survivor.clone()).await?;
                        let mut salt = [0u8; 16];
                        salt[..8].copy_from_slice(&(reprefill.len() as u64 + 1).to_le_bytes());
                        salt[8..].copy_from_slice(b"reprefil");
                        let t = Instant::now();
                        g.generate(GenerateRequest {
                            input: Some(input(s.start)),
                            params: Some(GenerationParams {
                                max_new_tokens: resumed as u32 + 1,
                                ..Default::default()
                            }),
                            resume_token_ids: ids[..resumed].to_vec(),
                            // A salt of its own: nothing cached but the fixed instruction.
                            cache_salt: salt.to_vec(),
                            adapter: String::new(),
                        })
                        .await?;
                        reprefill.push((pause, t.elapsed().as_secs_f64() * 1e3));
                    }
                    gens[victim].start(exe, model_dir, a).await?;
                    disturbed.extend(done);
                } else {
                    undisturbed.extend(done);
                }
            }
        }

        // Unary writes, undisturbed then with a kill halfway through each round.
        let mut normal: Vec<f64> = Vec::new();
        let mut during: Vec<f64> = Vec::new();
        let mut failed_writes = Vec::new();
        let mut failed_during = 0;
        for kill in [false, true] {
            let halfway = Duration::from_secs_f64(
                summary(normal.clone())["p50"].as_f64().unwrap_or(0.0) / 2e3,
            );
            for round in 0..rounds(a.writes) {
                let tasks: Vec<_> = (0..a.concurrency)
                    .map(|j| {
                        let request = write(round * a.concurrency + j, &next_user(), a.tokens);
                        let url = url.clone();
                        tokio::spawn(async move {
                            let t = Instant::now();
                            let mut c = GhostwriterClient::connect(url).await?;
                            c.write(request).await?;
                            Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64() * 1e3)
                        })
                    })
                    .collect();
                let victim = round % 2;
                if kill {
                    tokio::time::sleep(halfway).await;
                    gens[victim].kill();
                }
                for t in tasks {
                    match t.await? {
                        Ok(ms) if kill => during.push(ms),
                        Ok(ms) => normal.push(ms),
                        Err(e) => {
                            failed_during += usize::from(kill);
                            failed_writes.push(format!("{e:#}"));
                        }
                    }
                }
                if kill {
                    gens[victim].start(exe, model_dir, a).await?;
                }
            }
        }

        let totals = |s: &[Streamed]| summary(s.iter().filter(|s| s.error.is_none()).map(Streamed::total_ms).collect());
        let texts: std::collections::HashMap<usize, &str> = undisturbed
            .iter()
            .filter(|s| s.error.is_none())
            .map(|s| (s.start, s.text.as_str()))
            .collect();
        let equal = disturbed
            .iter()
            .filter(|s| s.error.is_none() && texts.get(&s.start) == Some(&s.text.as_str()))
            .count();
        let failed_streams: Vec<&str> = undisturbed
            .iter()
            .chain(&disturbed)
            .filter_map(|s| s.error.as_deref())
            .collect();
        let normal_p50 = summary(normal.clone())["p50"].as_f64().unwrap_or(0.0);
        let undisturbed_p50 = totals(&undisturbed)["p50"].as_f64().unwrap_or(0.0);
        let within = reprefill
            .iter()
            .filter(|(pause, prefill)| *pause <= prefill + 200.0)
            .count();
        Ok(json!({
            "setup": {
                "generators": 2,
                "device": a.device,
                "threads_per_generator": a.threads,
                "concurrency": a.concurrency,
                "max_new_tokens": a.tokens,
                "failure": "kill -9 of one generator in every round (started again after it)",
            },
            "streams": {
                "undisturbed": undisturbed.len(),
                "with_failure": disturbed.len(),
                "failed": failed_streams.len(),
                "failures": failed_streams,
                "moved": disturbed.iter().filter(|s| s.resumptions > 0).count(),
                "text_equal_to_undisturbed": equal,
                "total_ms_undisturbed": totals(&undisturbed),
                "total_ms_with_failure": totals(&disturbed),
                "added_ms": summary(disturbed.iter().filter(|s| s.error.is_none()).map(|s| s.total_ms() - undisturbed_p50).collect()),
                "pause_ms_of_moved": summary(reprefill.iter().map(|r| r.0).collect()),
                "survivor_reprefill_ms": summary(reprefill.iter().map(|r| r.1).collect()),
                "pause_minus_reprefill_ms": summary(reprefill.iter().map(|r| r.0 - r.1).collect()),
                "pause_within_reprefill_plus_200ms": format!("{within}/{}", reprefill.len()),
            },
            "unary": {
                "undisturbed": normal.len(),
                "with_failure": during.len() + failed_during,
                "failed": failed_writes.len(),
                "failures": failed_writes,
                "ms_undisturbed": summary(normal.clone()),
                "ms_with_failure": summary(during.clone()),
                "added_ms": summary(during.iter().map(|ms| ms - normal_p50).collect()),
                "worst_added_in_undisturbed_writes": during.iter().map(|ms| (ms - normal_p50) / normal_p50.max(1e-9)).fold(0.0, f64::max),
            },
        }))
    }
    .await;
    let _ = orchestrator.kill();
    let _ = orchestrator.wait();
    result
}
