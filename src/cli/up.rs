//! `up` (every stage in this process, or one process per stage with `--processes`) and `demo`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ghostwriter::embedded::{Embedded, EmbeddedConfig};
use ghostwriter_common::{shutdown, telemetry};
use ghostwriter_transport::{Tls, TlsArgs, Transport};
use tokio::net::TcpListener;

use super::api::{ApiArgs, WriteArgs, ingest, write};
use super::serve::ProcessArgs;

/// Options of `up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// Address of the public Ghostwriter API (port 0: the OS picks one; the first line on
    /// stdout, `listening on URL`, says which).
    #[arg(long, env = "GHOSTWRITER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Run etcd and every stage as its own process instead (the distributed mode on one
    /// machine; needs Debian's etcd-server). Every flag given is passed on to the processes
    /// whose `serve STAGE` takes it (environment variables reach them all); one that none
    /// takes (--advertise, --shard, --etcd: up runs its own etcd) is refused. --metrics-listen
    /// HOST:PORT gives the processes consecutive ports from PORT, in start order.
    #[arg(long, env = "GHOSTWRITER_UP_PROCESSES")]
    pub processes: bool,
    /// With --processes: how many processes of a stage to run, `STAGE=N[,STAGE=N]` (for
    /// example `retriever=2,generator=2`); each retriever replica gets its own index directory
    /// under --index-dir, and needs --store (without one, replicas would diverge).
    #[arg(long, env = "GHOSTWRITER_UP_REPLICAS")]
    pub replicas: Option<String>,
    #[command(flatten)]
    pub config: EmbeddedConfig,
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// Options of `demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Address of the public API while the demo runs (port 0 = any free port).
    #[arg(long, env = "GHOSTWRITER_DEMO_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Write with the zero-shot model instead of the shipped fine-tuned adapter
    /// (`adapters/smollm2-135m-reviews.safetensors`; `--adapter`/GHOSTWRITER_ADAPTER picks another).
    #[arg(long, env = "GHOSTWRITER_DEMO_ZERO_SHOT")]
    pub zero_shot: bool,
}

/// The command line as given: `up`'s matches (which flags came from the command line) and the
/// whole command (which flags each `serve STAGE` takes).
pub struct Given {
    /// `up`'s matches, when `up` ran.
    pub matches: Option<clap::ArgMatches>,
    /// The `ghostwriter` command.
    pub command: clap::Command,
}

/// Flags of `up` that `up --processes` applies itself instead of passing them on.
const APPLIED_BY_UP: &[&str] = &[
    "listen",
    "processes",
    "replicas",
    "model_dir",
    "log_format",
    // TLS (cert, key, ca, server_name) and the orchestrator's authentication go to the
    // processes through the mesh's settings.
    "cert",
    "key",
    "ca",
    "server_name",
    "tokens",
    "jwt_secret_file",
    "jwt_keys",
    "jwt_issuer",
    "jwt_audience",
    "index_dir",
    "metrics_listen",
    "ready_timeout_secs",
    // The store reaches the retrievers through the mesh's settings (its URL through the
    // environment, never a command line).
    "store",
    "store-password-file",
    "store-ca",
    "store-pool-size",
    "store-statement-timeout-ms",
    "store-retention-hours",
    "store-poll-ms",
];

/// The flags given on `up`'s command line that each stage process takes, as arguments to
/// append to its `serve STAGE` command line; an error names a flag no process would take.
pub fn forwarded(given: &Given) -> anyhow::Result<BTreeMap<&'static str, Vec<OsString>>> {
    use clap::parser::ValueSource;
    let mut out: BTreeMap<&'static str, Vec<OsString>> = BTreeMap::new();
    let Some(matches) = &given.matches else {
        return Ok(out);
    };
    let serve = given
        .command
        .find_subcommand("serve")
        .ok_or_else(|| anyhow::anyhow!("no serve command"))?;
    let stages = ghostwriter_common::stage::StageKind::ALL.map(|s| s.name());
    let up = given
        .command
        .find_subcommand("up")
        .ok_or_else(|| anyhow::anyhow!("no up command"))?;
    // Arguments only (the ids also name the groups of flattened settings), of `up` or global.
    let is_arg = |id: &str| {
        up.get_arguments()
            .chain(given.command.get_arguments())
            .any(|a| a.get_id().as_str() == id)
    };
    for id in matches.ids() {
        let id = id.as_str();
        if !is_arg(id)
            || matches.value_source(id) != Some(ValueSource::CommandLine)
            || APPLIED_BY_UP.contains(&id)
        {
            continue;
        }
        let flag = || format!("--{}", id.replace('_', "-"));
        let raw: Vec<OsString> = matches
            .get_raw_occurrences(id)
            .map(|o| o.flatten().map(OsString::from).collect())
            .unwrap_or_default();
        let mut taken = false;
        for stage in stages {
            let Some(sub) = serve.find_subcommand(stage) else {
                continue;
            };
            let Some(arg) = serve
                .get_arguments()
                .chain(sub.get_arguments())
                .find(|a| a.get_id().as_str() == id)
            else {
                continue;
            };
            let Some(long) = arg.get_long() else { continue };
            taken = true;
            let args = out.entry(stage).or_default();
            if arg.get_action().takes_values() {
                for value in &raw {
                    let mut a = OsString::from(format!("--{long}="));
                    a.push(value);
                    args.push(a);
                }
            } else {
                args.push(format!("--{long}").into());
            }
        }
        anyhow::ensure!(
            taken,
            "up --processes cannot pass {} to any process (no `serve STAGE` takes it)",
            flag()
        );
    }
    Ok(out)
}

/// `up`: the embedded topology, or with `--processes` one process per stage. Credential files
/// that do not load stop it at once, with the reason, before anything starts.
pub async fn run(
    args: UpArgs,
    given: Given,
    model_dir: PathBuf,
    tls_args: TlsArgs,
    tls: Option<Tls>,
    log_format: telemetry::LogFormat,
) -> anyhow::Result<()> {
    if args.config.auth.configured() {
        args.config.auth.check()?;
    }
    let replicas = ghostwriter::processes::parse_replicas(args.replicas.as_deref().unwrap_or(""))
        .map_err(|e| anyhow::anyhow!("--replicas: {e}"))?;
    if args.processes {
        let flags = forwarded(&given)?;
        return up_processes(args, &replicas, flags, model_dir, tls_args, log_format).await;
    }
    if !replicas.is_empty() {
        anyhow::bail!(
            "--replicas needs --processes (the embedded topology runs one of each stage)"
        );
    }
    let mut config = args.config;
    config.retriever.ingest_budget_mb = args.process.ingest_budget_mb;
    config.generator.shipped_by_default = true;
    let transport = args
        .process
        .transport(tls, shutdown::Shutdown::never())
        .await?;
    up(args.listen, config, model_dir, transport).await
}

async fn up(
    listen: SocketAddr,
    config: EmbeddedConfig,
    model_dir: PathBuf,
    transport: Transport,
) -> anyhow::Result<()> {
    let started = Instant::now();
    super::ensure_models(&model_dir).await?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    // Like `serve`: the first line on stdout says where it listens, once bound.
    super::serve::announce(&super::serve::reachable_url(
        listener.local_addr()?,
        transport.tls.is_some(),
    ));
    let embedded = Embedded::start(config, model_dir, listener, transport).await?;
    telemetry::status(&format!(
        "ghostwriter ready in {:.1}s on {}",
        started.elapsed().as_secs_f64(),
        embedded.url()
    ));
    for (stage, url) in &embedded.urls {
        telemetry::status(&format!("  {stage:<12} {url}"));
    }
    shutdown::os_signal().await;
    embedded.shutdown().await;
    Ok(())
}

/// Runs etcd and every stage as its own process, speaking mutual TLS: with the `--tls-*` files
/// given, or else with a throwaway CA made here (its `ca.pem` is what callers of the public API
/// pass as `--tls-ca`). `flags` are each stage's flags from `up`'s command line.
async fn up_processes(
    args: UpArgs,
    replicas: &BTreeMap<String, u32>,
    flags: BTreeMap<&'static str, Vec<OsString>>,
    model_dir: PathBuf,
    tls: TlsArgs,
    log_format: telemetry::LogFormat,
) -> anyhow::Result<()> {
    let listen = args.listen;
    let config = args.config;
    let started = Instant::now();
    super::ensure_models(&model_dir).await?;
    let work = tempfile::tempdir()?;
    let tls = if tls.cert.is_some() {
        tls
    } else {
        ghostwriter::processes::throwaway_ca(&work.path().join("tls"))?
    };
    let exe = std::env::current_exe()?;
    // The stage processes have their own process groups (a terminal's ctrl-c reaches only this
    // one): a signal while they start stops them too (dropping the half-started set kills it).
    let start = ghostwriter::processes::Processes::start_with_etcd(
        &exe,
        &model_dir,
        work.path(),
        &config.retriever.index_dir,
        listen,
        ghostwriter::processes::Mesh {
            tls: &tls,
            auth: &config.auth,
            log_format,
            store: &config.retriever.store,
            replicas,
            flags: &flags,
            metrics: args.process.metrics_listen,
            ready_timeout: Duration::from_secs(config.ready_timeout_secs),
        },
    );
    let procs = tokio::select! {
        procs = start => procs?,
        () = shutdown::os_signal() => {
            telemetry::status("interrupted while starting");
            return Ok(());
        }
    };
    let public = procs.urls["orchestrator"].clone();
    super::serve::announce(&public);
    telemetry::status(&format!(
        "ghostwriter ready in {:.1}s on {public} (one process per stage, discovery through etcd, mutual TLS)",
        started.elapsed().as_secs_f64()
    ));
    if let Some(ca) = &tls.ca {
        telemetry::status(&format!(
            "  callers: --tls-ca {} (or GHOSTWRITER_TLS_CA)",
            ca.display()
        ));
    }
    for (name, url) in &procs.urls {
        telemetry::status(&format!("  {name:<12} {url}"));
    }
    for (name, addr) in &procs.metrics {
        telemetry::status(&format!("  metrics of {name:<12} http://{addr}/metrics"));
    }
    shutdown::os_signal().await;
    procs.terminate().await;
    Ok(())
}

/// The demo corpus: a few users' documents, written for this project.
const DEMO_CORPUS: &str = include_str!("../../demo/corpus.jsonl");

/// `demo`: pull the models, start the embedded pipeline, ingest the demo corpus, write once.
pub async fn demo(args: DemoArgs, model_dir: PathBuf) -> anyhow::Result<()> {
    let listen = args.listen;
    let started = Instant::now();
    super::ensure_models(&model_dir).await?;
    let work = tempfile::tempdir()?;
    let corpus = work.path().join("corpus.jsonl");
    std::fs::write(&corpus, DEMO_CORPUS)?;
    let mut config = EmbeddedConfig::defaults();
    config.retriever.index_dir = work.path().join("index");
    config.generator.shipped_by_default = true;
    config.generator.zero_shot = args.zero_shot;
    if args.zero_shot {
        config.generator.adapter = None;
    }
    let listener = TcpListener::bind(listen).await?;
    let embedded = Embedded::start(config, model_dir, listener, Transport::default()).await?;
    eprintln!(
        "pipeline ready in {:.1}s at {}",
        started.elapsed().as_secs_f64(),
        embedded.url()
    );
    let result = async {
        let api = ApiArgs::to(embedded.url(), None, None);
        ingest(&api, 1000, &corpus).await?;
        let args = WriteArgs::parse_from([
            "write",
            "--to",
            &embedded.url(),
            "--user",
            "maya",
            "--title",
            "Finally, a capo that stays put",
            "--start",
            "I have gone through three capos in two years, so I did not expect much from this one.",
            "--preset",
            "full",
        ]);
        eprintln!("\nwriting for user maya (preset full):\n");
        write(args).await
    }
    .await;
    embedded.shutdown().await;
    result
}
