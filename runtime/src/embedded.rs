//! The embedded default: every stage and the orchestrator in one process, each its own gRPC
//! server, wired together with static endpoints. No external services. The stages listen on
//! loopback ports, or, when the public API authenticates its callers, on Unix sockets in a
//! directory only this process's user can open: then nobody on the machine reaches a stage API
//! (such as `Retrieve`, which answers for any user) around the authentication.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ghostwriter_common::MAX_MESSAGE_BYTES;
use ghostwriter_common::shutdown::{self, Shutdown, ShutdownTrigger};
use ghostwriter_generator::GeneratorConfig;
use ghostwriter_orchestrator::auth::AuthArgs;
use ghostwriter_orchestrator::{OrchestratorConfig, WriteDefaults};
use ghostwriter_proto::v1::ghostwriter_client::GhostwriterClient;
use ghostwriter_proto::v1::{
    Document, GenerationParams, IngestRequest, WriteOptions, WriteRequest,
};
use ghostwriter_ranker::RankerConfig;
use ghostwriter_retriever::RetrieverConfig;
use ghostwriter_summarizer::{SummarizerConfig, SummaryOptions};
use ghostwriter_synthesizer::{SynthesisOptions, SynthesizerConfig};
use ghostwriter_transport::Transport;
use ghostwriter_transport::client::{self, wait_until_serving};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use ghostwriter_common::stage::StageKind;

/// A stage's server, to be spawned.
type BoxedServe = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Settings of every stage of the embedded topology: each stage's own options, flattened
/// from the stage's configuration (said once, there).
#[derive(Debug, Clone, clap::Args)]
pub struct EmbeddedConfig {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub retriever: RetrieverConfig,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub ranker: RankerConfig,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub generator: GeneratorConfig,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub summary: SummaryOptions,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub synthesis: SynthesisOptions,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub writes: WriteDefaults,
    /// Authentication of the public API (off without a token file or JWT key; the embedded
    /// pipeline listens on loopback unless `up --listen` names another address, which then
    /// needs one).
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Seconds to wait for every stage to load its models and report SERVING.
    #[arg(
        long = "ready-timeout",
        env = "GHOSTWRITER_READY_TIMEOUT",
        default_value_t = 120,
        help_heading = "Server"
    )]
    pub ready_timeout_secs: u64,
}

impl EmbeddedConfig {
    /// Every default applied (environment variables still override them).
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: EmbeddedConfig,
        }
        <Wrapper as clap::Parser>::parse_from(["ghostwriter"]).config
    }
}

/// A running embedded topology.
pub struct Embedded {
    /// URL of each stage (`http://127.0.0.1:PORT`, or `unix:PATH` when the public API
    /// authenticates) and of the orchestrator (`http://ADDR`).
    pub urls: BTreeMap<StageKind, String>,
    /// The settings its orchestrator runs with (stage URLs included).
    pub orchestrator: OrchestratorConfig,
    /// What its servers share: limits, metrics and readiness (one process).
    pub transport: Transport,
    triggers: BTreeMap<StageKind, ShutdownTrigger>,
    tasks: Vec<(StageKind, JoinHandle<anyhow::Result<()>>)>,
    /// The private directory of the stages' sockets, when they use them.
    _sockets: Option<tempfile::TempDir>,
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// Stage listeners by stage, paired with their URLs: loopback ports, or with `private`, Unix
/// sockets in a new directory only this user can open (returned, to be removed when dropped).
async fn stage_listeners(
    private: bool,
) -> anyhow::Result<(
    BTreeMap<StageKind, ghostwriter_transport::Listener>,
    BTreeMap<StageKind, String>,
    Option<tempfile::TempDir>,
)> {
    let mut listeners = BTreeMap::new();
    let mut urls = BTreeMap::new();
    let dir = if private {
        // tempfile makes the directory 0700; said again here, since it is the point.
        let dir = tempfile::Builder::new()
            .prefix("ghostwriter-stages-")
            .tempdir()
            .context("creating the stages' socket directory")?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        Some(dir)
    } else {
        None
    };
    for stage in StageKind::STAGES {
        match &dir {
            Some(dir) => {
                let path = dir.path().join(format!("{}.sock", stage.name()));
                let listener = tokio::net::UnixListener::bind(&path)
                    .with_context(|| format!("binding {}", path.display()))?;
                urls.insert(stage, client::unix_url(&path));
                listeners.insert(stage, listener.into());
            }
            None => {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                urls.insert(stage, url(listener.local_addr()?));
                listeners.insert(stage, listener.into());
            }
        }
    }
    Ok((listeners, urls, dir))
}

impl Embedded {
    /// Starts every stage on `127.0.0.1:0` and the orchestrator on `public` (all must report
    /// SERVING before this returns), with models from `model_dir`, over `transport`.
    pub async fn start(
        config: EmbeddedConfig,
        model_dir: PathBuf,
        public: TcpListener,
        transport: Transport,
    ) -> anyhow::Result<Self> {
        // One retriever serves every user here: it must keep every user of the store.
        anyhow::ensure!(
            config.retriever.shards <= 1 && config.retriever.shard.unwrap_or(0) == 0,
            "the embedded topology runs one retriever for every user: --retriever-shards must be 1"
        );
        // Credentials that do not load stop everything now, with the reason, before any model
        // loads.
        let private = config.auth.configured();
        if private {
            config.auth.check()?;
        }
        let (listeners, urls, sockets) = stage_listeners(private).await?;
        let mut urls = urls;
        urls.insert(StageKind::Orchestrator, url(public.local_addr()?));
        let stage_url = |k: StageKind| urls[&k].clone();
        let orchestrator = OrchestratorConfig {
            writes: config.writes.clone(),
            max_new_tokens_limit: config.generator.max_new_tokens_limit,
            auth: config.auth.clone(),
            retriever_shards: 1,
            ..OrchestratorConfig::at(stage_url)
        };
        let summarizer = SummarizerConfig {
            generator_url: stage_url(StageKind::Generator),
            summary: config.summary.clone(),
            embedder: config.ranker.embedder.clone(),
            discovery: Default::default(),
        };
        let synthesizer = SynthesizerConfig {
            synthesis: config.synthesis.clone(),
            embedder: config.ranker.embedder.clone(),
        };
        let mut me = Self {
            urls: urls.clone(),
            orchestrator: orchestrator.clone(),
            transport: transport.clone(),
            triggers: BTreeMap::new(),
            tasks: Vec::new(),
            _sockets: sockets,
        };
        let mut listeners = listeners;
        for stage in StageKind::STAGES {
            let listener = listeners
                .remove(&stage)
                .expect("every stage has a listener");
            let stop = me.trigger(stage);
            let (t, dir) = (transport.clone(), model_dir.clone());
            let served: BoxedServe = match stage {
                StageKind::Retriever => {
                    let c = config.retriever.clone();
                    Box::pin(
                        async move { ghostwriter_retriever::serve(c, listener, stop, &t).await },
                    )
                }
                StageKind::Ranker => {
                    let c = config.ranker.clone();
                    Box::pin(
                        async move { ghostwriter_ranker::serve(c, dir, listener, stop, &t).await },
                    )
                }
                StageKind::Synthesizer => {
                    let c = synthesizer.clone();
                    Box::pin(async move {
                        ghostwriter_synthesizer::serve(c, dir, listener, stop, &t).await
                    })
                }
                StageKind::Generator => {
                    let c = config.generator.clone();
                    Box::pin(async move {
                        ghostwriter_generator::serve(c, dir, listener, stop, &t).await
                    })
                }
                StageKind::Summarizer => {
                    let c = summarizer.clone();
                    Box::pin(async move {
                        ghostwriter_summarizer::serve(c, dir, listener, stop, &t).await
                    })
                }
                StageKind::Orchestrator => unreachable!("not a stage"),
            };
            me.spawn(stage, served);
        }

        let timeout = Duration::from_secs(config.ready_timeout_secs);
        for stage in StageKind::STAGES {
            if let Err(why) = me.ready(stage, &stage_url(stage), timeout).await {
                me.shutdown().await;
                anyhow::bail!("{stage} did not become ready: {why}");
            }
        }
        let stop = me.trigger(StageKind::Orchestrator);
        let t = transport.clone();
        me.spawn(
            StageKind::Orchestrator,
            Box::pin(async move {
                ghostwriter_orchestrator::serve(orchestrator, public, stop, &t).await
            }),
        );
        let url = stage_url(StageKind::Orchestrator);
        if let Err(why) = me.ready(StageKind::Orchestrator, &url, timeout).await {
            me.shutdown().await;
            anyhow::bail!("the orchestrator did not become ready: {why}");
        }
        Ok(me)
    }

    /// Waits until `stage` at `url` reports SERVING; a stage that stops first (it failed to
    /// start) fails this at once with its reason, not after `timeout`.
    async fn ready(
        &mut self,
        stage: StageKind,
        url: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let Some(i) = self.tasks.iter().position(|(s, _)| *s == stage) else {
            return Err("not started".into());
        };
        let serving = wait_until_serving(url, "", timeout, None);
        let stopped = tokio::select! {
            serving = serving => return serving.map_err(|e| e.message().to_string()),
            stopped = &mut self.tasks[i].1 => stopped,
        };
        self.tasks.remove(i);
        Err(match stopped {
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) => e.to_string(),
            Ok(Ok(())) => "it stopped".into(),
        })
    }

    fn trigger(&mut self, stage: StageKind) -> Shutdown {
        let (trigger, handle) = shutdown::channel();
        self.triggers.insert(stage, trigger);
        handle
    }

    fn spawn(&mut self, stage: StageKind, future: BoxedServe) {
        self.tasks.push((stage, tokio::spawn(future)));
    }

    /// Runs `f` against a fresh embedded pipeline — models ensured, the index in a temporary
    /// directory, `documents` ingested, `adapter` served — and shuts it down after.
    pub async fn with_pipeline<T>(
        model_dir: PathBuf,
        adapter: Option<PathBuf>,
        documents: &[Document],
        f: impl AsyncFnOnce(&Embedded) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let dir = model_dir.clone();
        tokio::task::spawn_blocking(move || crate::models::ensure(&dir)).await??;
        let work = tempfile::tempdir()?;
        let mut config = EmbeddedConfig::defaults();
        config.retriever.index_dir = work.path().join("index");
        config.generator.adapter = adapter;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let embedded = Self::start(config, model_dir, listener, Transport::default()).await?;
        let result = async {
            ingest(&embedded.url(), documents, None).await?;
            f(&embedded).await
        }
        .await;
        embedded.shutdown().await;
        result
    }

    /// The public endpoint URL.
    pub fn url(&self) -> String {
        self.urls[&StageKind::Orchestrator].clone()
    }

    /// The endpoint URL of one stage.
    pub fn stage_url(&self, stage: StageKind) -> String {
        self.urls[&stage].clone()
    }

    /// Stops one stage (gracefully) and waits for it, leaving the rest running.
    pub async fn stop_stage(&mut self, stage: StageKind) -> anyhow::Result<()> {
        if let Some(t) = self.triggers.get(&stage) {
            t.trigger();
        }
        if let Some(i) = self.tasks.iter().position(|(s, _)| *s == stage) {
            let (_, task) = self.tasks.remove(i);
            task.await??;
        }
        Ok(())
    }

    /// Stops everything: the orchestrator first, so in-flight writes drain through the stages.
    pub async fn shutdown(mut self) {
        let _ = self.stop_stage(StageKind::Orchestrator).await;
        for t in self.triggers.values() {
            t.trigger();
        }
        for (stage, task) in self.tasks.drain(..) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%stage, error = %e, "stage stopped with an error"),
                Err(e) => tracing::warn!(%stage, error = %e, "stage task failed"),
            }
        }
    }
}

/// A write of `start` for `user` with `preset`, generating at most `tokens` tokens (everything
/// else default).
pub fn short_write(user: &str, start: &str, preset: &str, tokens: u32) -> WriteRequest {
    WriteRequest {
        user_id: user.into(),
        start: start.into(),
        preset: preset.into(),
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

/// The write that continues `target` for `user`: its title, its text as the start, its time and
/// id (so that only the user's earlier documents count), as [`short_write`] otherwise.
pub fn write_of(user: &str, target: &Document, preset: &str, tokens: u32) -> WriteRequest {
    WriteRequest {
        title: target.title.clone(),
        timestamp: Some(target.timestamp),
        doc_id: target.doc_id.clone(),
        ..short_write(user, &target.text, preset, tokens)
    }
}

/// Ingests `documents` through the public API at `url` (plain HTTP/2), 1,000 at a time, with
/// `token`.
pub async fn ingest(url: &str, documents: &[Document], token: Option<&str>) -> anyhow::Result<()> {
    let channel = client::channel(url, None).with_context(|| format!("connecting to {url}"))?;
    let client = GhostwriterClient::new(channel).max_encoding_message_size(MAX_MESSAGE_BYTES);
    ingest_batches(client, documents, 1000, token, |_| {})
        .await
        .map(|_| ())
}

/// What [`ingest_batches`] stored.
#[derive(Debug, Clone, Default)]
pub struct Ingested {
    /// Documents in the index after the last batch (with a store: in the answering replica's).
    pub total: u64,
    /// The consistency token covering every batch (empty without a store).
    pub consistency_token: String,
}

/// Ingests `documents` through `client` in batches of `batch`, with `token`, calling
/// `progress(documents sent)` after each. A refused call's error is its `tonic::Status` (for
/// callers that explain it).
pub async fn ingest_batches(
    mut client: GhostwriterClient<tonic::transport::Channel>,
    documents: &[Document],
    batch: usize,
    token: Option<&str>,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Ingested> {
    let mut ingested = Ingested::default();
    for chunk in documents.chunks(batch.max(1)) {
        let mut request = tonic::Request::new(IngestRequest {
            documents: chunk.to_vec(),
        });
        client::bearer(&mut request, token)?;
        let response = client.ingest(request).await?.into_inner();
        ingested.total = response.total_documents;
        ingested.consistency_token = ghostwriter_orchestrator::tokens::later(
            &ingested.consistency_token,
            &response.consistency_token,
        );
        progress(chunk.len());
    }
    Ok(ingested)
}
