//! `serve STAGE`: one stage (or the orchestrator) as its own server, how Kubernetes runs it,
//! and the settings every serving process shares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use ghostwriter_common::shutdown;
use ghostwriter_common::stage::StageKind;
use ghostwriter_transport::{Metrics, Tls, Transport};
use tokio::net::TcpListener;

/// Options of `serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: the OS picks one; the first line on stdout, `listening on
    /// URL`, says which).
    #[arg(long, env = "GHOSTWRITER_LISTEN", default_value = "0.0.0.0:50051", global = true)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub discovery: ghostwriter_discovery::DiscoveryArgs,
    /// URL other processes reach this one at, registered in etcd. Default: http://LISTEN, with
    /// 127.0.0.1 for an unspecified address.
    #[arg(long, env = "GHOSTWRITER_ADVERTISE", global = true)]
    pub advertise: Option<String>,
    /// Retriever shard this process serves (registered in etcd; see --retriever-shards).
    #[arg(long, env = "GHOSTWRITER_SHARD", global = true)]
    pub shard: Option<u32>,
    #[command(subcommand)]
    pub stage: Stage,
}

/// Settings of a serving process (`serve` and `up`).
#[derive(clap::Args)]
#[command(next_help_heading = "Server")]
pub struct ProcessArgs {
    /// RPCs each service runs at once; past it, RESOURCE_EXHAUSTED at once (0 = no limit).
    /// Health checks are never limited.
    #[arg(long, env = "GHOSTWRITER_MAX_CONCURRENCY", default_value_t = 256, global = true)]
    pub max_concurrency: usize,
    /// Seconds a stopping server (SIGTERM, ctrl-c) keeps accepting calls after it turns
    /// NOT_SERVING, so that callers see it leave (readiness probes, DNS, etcd) and move away
    /// before it stops accepting; then it drains (--drain-timeout-secs). In Kubernetes, set it
    /// (or a preStop sleep) to the time the Endpoints and callers' DNS take to drop the pod.
    #[arg(
        long,
        visible_alias = "drain-delay",
        env = "GHOSTWRITER_DRAIN_DELAY_SECS",
        default_value_t = 0.0,
        global = true
    )]
    pub drain_delay_secs: f64,
    /// Seconds a stopping server then waits for the RPCs in flight; the generator hands the
    /// streams still running over to another generator (through the orchestrator) just before
    /// this ends, so they are continued, not cut.
    #[arg(long, env = "GHOSTWRITER_DRAIN_TIMEOUT_SECS", default_value_t = 30.0, global = true)]
    pub drain_timeout_secs: f64,
    /// Seconds after which a caller's connection is asked to go away (HTTP/2 GOAWAY; its calls
    /// in flight go on), so callers spread over replicas started after they connected (0 =
    /// never).
    #[arg(
        long,
        env = "GHOSTWRITER_MAX_CONNECTION_AGE_SECS",
        default_value_t = 300.0,
        global = true
    )]
    pub max_connection_age_secs: f64,
    /// Seconds a connection asked to go away keeps its calls in flight before it is closed.
    #[arg(
        long,
        env = "GHOSTWRITER_MAX_CONNECTION_AGE_GRACE_SECS",
        default_value_t = 300.0,
        global = true
    )]
    pub max_connection_age_grace_secs: f64,
    /// Seconds between HTTP/2 keepalive pings on every connection with calls in flight (as a
    /// client) or open (as a server): a peer that hangs without closing its connection (a lost
    /// node, a partition, a stopped process) is found by the missing answer.
    #[arg(
        long,
        env = "GHOSTWRITER_KEEPALIVE_INTERVAL_SECS",
        default_value_t = 10.0,
        global = true
    )]
    pub keepalive_interval_secs: f64,
    /// Seconds a keepalive ping may go unanswered before the connection is closed (its calls
    /// fail, and are retried or continued elsewhere).
    #[arg(long, env = "GHOSTWRITER_KEEPALIVE_TIMEOUT_SECS", default_value_t = 5.0, global = true)]
    pub keepalive_timeout_secs: f64,
    /// Ingest budget, MiB: encoded ingest batches this process holds at once (the public API
    /// and the retriever each); past it, RESOURCE_EXHAUSTED with a retry delay, so concurrent
    /// maximum-size batches cannot exhaust memory. A batch larger than the whole budget is told
    /// to split.
    #[arg(long, env = "GHOSTWRITER_INGEST_BUDGET_MB", default_value_t = ghostwriter_common::ingest::DEFAULT_BUDGET_MB, global = true)]
    pub ingest_budget_mb: usize,
    /// Address of the Prometheus endpoint (`/metrics`, plain HTTP); unset = no endpoint.
    #[arg(long, env = "GHOSTWRITER_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,
}

impl ProcessArgs {
    /// The transport these flags describe, over `tls`; starts the metrics endpoint when asked.
    pub async fn transport(
        &self,
        tls: Option<Tls>,
        shutdown: ghostwriter_common::shutdown::Shutdown,
    ) -> anyhow::Result<Transport> {
        let secs = |flag: &str, value: f64| {
            Duration::try_from_secs_f64(value)
                .map_err(|_| anyhow::anyhow!("{flag} must be a non-negative number of seconds"))
        };
        let positive = |flag: &str, value: f64| {
            let d = secs(flag, value)?;
            anyhow::ensure!(!d.is_zero(), "{flag} must be a positive number of seconds");
            Ok(d)
        };
        let age = secs("--max-connection-age-secs", self.max_connection_age_secs)?;
        let transport = Transport {
            tls,
            max_concurrency: self.max_concurrency,
            drain_delay: secs("--drain-delay-secs", self.drain_delay_secs)?,
            drain_timeout: secs("--drain-timeout-secs", self.drain_timeout_secs)?,
            max_connection_age: (!age.is_zero()).then_some(age),
            max_connection_age_grace: secs(
                "--max-connection-age-grace-secs",
                self.max_connection_age_grace_secs,
            )?,
            keepalive: ghostwriter_transport::Keepalive {
                interval: positive("--keepalive-interval-secs", self.keepalive_interval_secs)?,
                timeout: positive("--keepalive-timeout-secs", self.keepalive_timeout_secs)?,
            },
            metrics: Metrics::new(),
        };
        if let Some(addr) = self.metrics_listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics on {addr}"))?;
            tokio::spawn(ghostwriter_transport::metrics::serve(
                transport.metrics.clone(),
                listener,
                shutdown,
            ));
        }
        Ok(transport)
    }
}

#[derive(Subcommand)]
pub enum Stage {
    /// The tantivy index of users' documents.
    Retriever {
        #[command(flatten)]
        config: ghostwriter_retriever::RetrieverConfig,
    },
    /// RankDocBM25, RankDocDense, RankSnippet, RankDocBySnpt and RecentDoc.
    Ranker {
        #[command(flatten)]
        config: ghostwriter_ranker::RankerConfig,
    },
    /// SumCtxInd (through the generator's LLM) and SumCtx.
    Summarizer {
        #[command(flatten)]
        config: ghostwriter_summarizer::SummarizerConfig,
    },
    /// SynCtxInd and SynCtx important words.
    Synthesizer {
        #[command(flatten)]
        config: ghostwriter_synthesizer::SynthesizerConfig,
    },
    /// The LLM worker.
    Generator {
        #[command(flatten)]
        config: ghostwriter_generator::GeneratorConfig,
    },
    /// The public API, fanning out to the stages.
    Orchestrator {
        #[command(flatten)]
        config: Box<ghostwriter_orchestrator::OrchestratorConfig>,
    },
}

impl Stage {
    /// Which process this is.
    pub fn kind(&self) -> StageKind {
        match self {
            Stage::Retriever { .. } => StageKind::Retriever,
            Stage::Ranker { .. } => StageKind::Ranker,
            Stage::Summarizer { .. } => StageKind::Summarizer,
            Stage::Synthesizer { .. } => StageKind::Synthesizer,
            Stage::Generator { .. } => StageKind::Generator,
            Stage::Orchestrator { .. } => StageKind::Orchestrator,
        }
    }
}

/// The URL a process bound to `local` is reached at on this machine: 127.0.0.1 for an
/// unspecified address, `https` with TLS.
pub fn reachable_url(local: SocketAddr, tls: bool) -> String {
    let ip = if local.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        local.ip().to_string()
    };
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{ip}:{}", local.port())
}

/// Prints the first line on stdout, `listening on URL`, once bound: where the process listens
/// (what `--listen 127.0.0.1:0` chose), so a parent that starts processes
/// (`ghostwriter_runtime::stage_process`) need not guess a free port. A closed stdout is no
/// reason to stop serving.
pub fn announce(url: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {url}").and_then(|()| out.flush());
}

/// Runs the stage `args` names until a signal: serves, registers in etcd when discovery
/// uses it, and on SIGTERM/ctrl-c deregisters, then drains.
pub async fn serve(args: ServeArgs, model_dir: PathBuf, tls: Option<Tls>) -> anyhow::Result<()> {
    let ServeArgs {
        listen,
        process,
        discovery: discovery_args,
        advertise,
        shard,
        stage,
    } = args;
    let transport = process.transport(tls, shutdown::Shutdown::never()).await?;
    use ghostwriter_discovery::{EndpointInfo, Registration};
    // What can be refused is refused before binding: nothing says "listening" for a stage that
    // will not serve.
    if let Stage::Orchestrator { config } = &stage {
        config.check(listen.ip())?;
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let reachable = reachable_url(listener.local_addr()?, transport.tls.is_some());
    announce(&reachable);
    let name = stage.kind().name();
    let (trigger, stop) = shutdown::channel();
    let discovery = discovery_args.clone();
    let budget = process.ingest_budget_mb;
    let t = transport.clone();
    let server: tokio::task::JoinHandle<anyhow::Result<()>> = tokio::spawn(async move {
        match stage {
            Stage::Retriever { mut config } => {
                // The users it keeps from the store are those of its shard.
                config.shard = shard;
                config.ingest_budget_mb = budget;
                ghostwriter_retriever::serve(config, listener, stop, &t).await
            }
            Stage::Ranker { config } => {
                ghostwriter_ranker::serve(config, model_dir, listener, stop, &t).await
            }
            Stage::Summarizer { mut config } => {
                // It finds the generators the way the orchestrator does.
                config.discovery = discovery;
                ghostwriter_summarizer::serve(config, model_dir, listener, stop, &t).await
            }
            Stage::Synthesizer { config } => {
                ghostwriter_synthesizer::serve(config, model_dir, listener, stop, &t).await
            }
            Stage::Generator { mut config } => {
                config.shipped_by_default = true;
                ghostwriter_generator::serve(config, model_dir, listener, stop, &t).await
            }
            Stage::Orchestrator { mut config } => {
                // The orchestrator watches what the stages register under the same etcd.
                config.discovery = discovery;
                config.ingest_budget_mb = budget;
                ghostwriter_orchestrator::serve(*config, listener, stop, &t).await
            }
        }
    });
    let registration = (!discovery_args.etcd.is_empty()).then(|| {
        let advertise = advertise.clone().unwrap_or_else(|| reachable.clone());
        let info = EndpointInfo {
            url: advertise,
            stage: name.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capacity: process.max_concurrency as u32,
            shard,
        };
        let d = discovery_args.clone();
        let local_url = reachable.clone();
        let tls = transport.tls.clone();
        tokio::spawn(async move {
            ghostwriter_transport::client::wait_until_serving(
                &local_url,
                "",
                Duration::from_secs(600),
                tls.as_ref(),
            )
            .await
            .map_err(|s| anyhow::anyhow!(s.message().to_string()))?;
            Registration::register(&d.etcd_target(tls.as_ref()), &d.prefix, d.ttl_secs, info).await
        })
    });
    tokio::pin!(server);
    tokio::select! {
        done = &mut server => return done?,
        _ = shutdown::os_signal() => {}
    }
    if let Some(task) = registration {
        if task.is_finished() {
            if let Ok(Ok(r)) = task.await {
                r.deregister().await;
            }
        } else {
            task.abort();
        }
    }
    trigger.trigger();
    server.await?
}
