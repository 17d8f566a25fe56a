//! The embedded default: every stage and the orchestrator in one process, each its own gRPC
//! server on a loopback port, wired together with static endpoints. No external services.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ghostwriter_common::client::wait_until_serving;
use ghostwriter_common::shutdown::{self, Shutdown, ShutdownTrigger};
use ghostwriter_generator::GeneratorConfig;
use ghostwriter_orchestrator::OrchestratorConfig;
use ghostwriter_proto::v1::ghostwriter_client::GhostwriterClient;
use ghostwriter_proto::v1::{
    Document, GenerationParams, IngestRequest, WriteOptions, WriteRequest,
};
use ghostwriter_ranker::RankerConfig;
use ghostwriter_retriever::RetrieverConfig;
use ghostwriter_summarizer::SummarizerConfig;
use ghostwriter_synthesizer::SynthesizerConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use ghostwriter_common::stage::StageKind;

/// Settings of every stage of the embedded topology.
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
    /// Summary length in tokens.
    #[arg(
        long = "summary-tokens",
        env = "GHOSTWRITER_SUMMARY_TOKENS",
        default_value_t = 96
    )]
    pub summary_tokens: u32,
    /// Beams of the LLM summary's beam search (the paper uses 4); 1 = greedy.
    #[arg(
        long = "summary-num-beams",
        env = "GHOSTWRITER_SUMMARY_NUM_BEAMS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=ghostwriter_common::MAX_BEAMS as i64)
    )]
    pub summary_num_beams: u32,
    /// Character budget of a SumCtx summary.
    #[arg(long = "summary-chars", env = "GHOSTWRITER_SUMMARY_CHARS", default_value_t = ghostwriter_summarizer::DEFAULT_SUMMARY_CHARS)]
    pub summary_chars: u32,
    /// SynCtx word-similarity threshold (MiniLM cosine).
    #[arg(long = "word-similarity", env = "GHOSTWRITER_WORD_SIMILARITY", default_value_t = ghostwriter_synthesizer::DEFAULT_WORD_SIMILARITY)]
    pub word_similarity: f32,
    /// Past documents fetched per write.
    #[arg(
        long = "max-candidates",
        env = "GHOSTWRITER_MAX_CANDIDATES",
        default_value_t = 200
    )]
    pub max_candidates: u32,
    /// Authentication of the public API (off without a token file or JWT key; the embedded
    /// pipeline listens on loopback unless `up --listen` names another address, which then
    /// needs one).
    #[command(flatten)]
    pub auth: ghostwriter_common::auth::AuthArgs,
    /// Corpus of the synthesizer's IDF: the whole index, or the user's own documents.
    #[arg(
        long = "idf-corpus",
        env = "GHOSTWRITER_IDF_CORPUS",
        value_enum,
        default_value_t = ghostwriter_orchestrator::IdfCorpus::Index
    )]
    pub idf_corpus: ghostwriter_orchestrator::IdfCorpus,
    /// Deadline of a write whose caller sets none, in seconds.
    #[arg(
        long = "request-timeout",
        env = "GHOSTWRITER_REQUEST_TIMEOUT",
        default_value_t = 300
    )]
    pub request_timeout_secs: u64,
    /// Seconds to wait for every stage to load its models and report SERVING.
    #[arg(
        long = "ready-timeout",
        env = "GHOSTWRITER_READY_TIMEOUT",
        default_value_t = 120
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
    /// Address of each stage (`retriever`, ..., `orchestrator`).
    pub addrs: BTreeMap<&'static str, SocketAddr>,
    /// The settings its orchestrator runs with (stage URLs included).
    pub orchestrator: OrchestratorConfig,
    triggers: BTreeMap<&'static str, ShutdownTrigger>,
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

impl Embedded {
    /// Starts every stage on `127.0.0.1:0` and the orchestrator on `public` (all must report
    /// SERVING before this returns), with models from `model_dir`.
    pub async fn start(
        config: EmbeddedConfig,
        model_dir: PathBuf,
        public: TcpListener,
    ) -> anyhow::Result<Self> {
        // One retriever serves every user here: it must keep every user of the store.
        anyhow::ensure!(
            config.retriever.shards <= 1 && config.retriever.shard.unwrap_or(0) == 0,
            "the embedded topology runs one retriever for every user: --retriever-shards must be 1"
        );
        let mut listeners = BTreeMap::new();
        for stage in StageKind::STAGES {
            listeners.insert(stage.name(), TcpListener::bind("127.0.0.1:0").await?);
        }
        let mut addrs: BTreeMap<&'static str, SocketAddr> = listeners
            .iter()
            .map(|(k, l)| Ok((*k, l.local_addr()?)))
            .collect::<std::io::Result<_>>()?;
        addrs.insert("orchestrator", public.local_addr()?);
        let mut take = |s: &str| listeners.remove(s).expect("every stage has a listener");
        let orchestrator = OrchestratorConfig {
            retriever_url: url(addrs["retriever"]),
            ranker_url: url(addrs["ranker"]),
            summarizer_url: url(addrs["summarizer"]),
            generator_url: url(addrs["generator"]),
            synthesizer_url: url(addrs["synthesizer"]),
            max_candidates: config.max_candidates,
            idf_corpus: config.idf_corpus,
            request_timeout_secs: config.request_timeout_secs,
            max_new_tokens_limit: config.generator.max_new_tokens_limit,
            retriever_shards: 1,
            auth: config.auth.clone(),
            insecure_no_auth: false,
            discovery: Default::default(),
        };
        let mut me = Self {
            addrs: addrs.clone(),
            orchestrator: orchestrator.clone(),
            triggers: BTreeMap::new(),
            tasks: Vec::new(),
        };
        let summarizer = SummarizerConfig {
            generator_url: url(addrs["generator"]),
            max_new_tokens: config.summary_tokens,
            num_beams: config.summary_num_beams,
            summary_chars: config.summary_chars,
            embedder: config.ranker.embedder.clone(),
            discovery: Default::default(),
        };
        let synthesizer = SynthesizerConfig {
            word_similarity: config.word_similarity,
            embedder: config.ranker.embedder.clone(),
        };

        let l = take("retriever");
        let s = me.trigger("retriever");
        me.spawn(
            "retriever",
            ghostwriter_retriever::serve(config.retriever.clone(), l, s),
        );
        let l = take("ranker");
        let s = me.trigger("ranker");
        me.spawn(
            "ranker",
            ghostwriter_ranker::serve(config.ranker.clone(), model_dir.clone(), l, s),
        );
        let l = take("synthesizer");
        let s = me.trigger("synthesizer");
        me.spawn(
            "synthesizer",
            ghostwriter_synthesizer::serve(synthesizer, model_dir.clone(), l, s),
        );
        let l = take("generator");
        let s = me.trigger("generator");
        me.spawn(
            "generator",
            ghostwriter_generator::serve(config.generator.clone(), model_dir.clone(), l, s),
        );
        let l = take("summarizer");
        let s = me.trigger("summarizer");
        me.spawn(
            "summarizer",
            ghostwriter_summarizer::serve(summarizer, model_dir, l, s),
        );

        let timeout = Duration::from_secs(config.ready_timeout_secs);
        for stage in StageKind::STAGES.map(StageKind::name) {
            if let Err(e) = wait_until_serving(&url(addrs[stage]), "", timeout).await {
                // A stage that failed to start says why in its task's result.
                let why = me
                    .stage_error(stage)
                    .await
                    .unwrap_or_else(|| e.message().to_string());
                me.shutdown().await;
                anyhow::bail!("{stage} did not become ready: {why}");
            }
        }
        let s = me.trigger("orchestrator");
        me.spawn(
            "orchestrator",
            ghostwriter_orchestrator::serve(orchestrator, public, s),
        );
        wait_until_serving(&url(addrs["orchestrator"]), "", timeout)
            .await
            .map_err(|e| anyhow::anyhow!(e.message().to_string()))
            .context("orchestrator did not become ready")?;
        Ok(me)
    }

    fn trigger(&mut self, stage: &'static str) -> Shutdown {
        let (trigger, handle) = shutdown::channel();
        self.triggers.insert(stage, trigger);
        handle
    }

    fn spawn<F>(&mut self, stage: &'static str, future: F)
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.tasks.push((stage, tokio::spawn(future)));
    }

    async fn stage_error(&mut self, stage: &str) -> Option<String> {
        let i = self
            .tasks
            .iter()
            .position(|(s, t)| *s == stage && t.is_finished())?;
        let (_, task) = self.tasks.remove(i);
        match task.await {
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(e.to_string()),
            Ok(Ok(())) => None,
        }
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
        let embedded = Self::start(config, model_dir, listener).await?;
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
        url(self.addrs["orchestrator"])
    }

    /// The endpoint URL of one stage.
    pub fn stage_url(&self, stage: &str) -> Option<String> {
        self.addrs.get(stage).map(|a| url(*a))
    }

    /// Stops one stage (gracefully) and waits for it, leaving the rest running.
    pub async fn stop_stage(&mut self, stage: &str) -> anyhow::Result<()> {
        if let Some(t) = self.triggers.get(stage) {
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
        let _ = self.stop_stage("orchestrator").await;
        for t in self.triggers.values() {
            t.trigger();
        }
        for (stage, task) in self.tasks.drain(..) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(stage, error = %e, "stage stopped with an error"),
                Err(e) => tracing::warn!(stage, error = %e, "stage task failed"),
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

/// Ingests `documents` through the public API at `url`, 1,000 at a time, with `token`.
pub async fn ingest(url: &str, documents: &[Document], token: Option<&str>) -> anyhow::Result<()> {
    ingest_batches(url, documents, 1000, token, |_| {})
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

/// Ingests `documents` through the public API at `url` in batches of `batch`, with `token`,
/// calling `progress(documents sent)` after each.
pub async fn ingest_batches(
    url: &str,
    documents: &[Document],
    batch: usize,
    token: Option<&str>,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Ingested> {
    let mut client = GhostwriterClient::new(
        ghostwriter_common::client::channel(url).with_context(|| format!("connecting to {url}"))?,
    )
    .max_encoding_message_size(256 << 20);
    let mut ingested = Ingested::default();
    for chunk in documents.chunks(batch.max(1)) {
        let mut request = tonic::Request::new(IngestRequest {
            documents: chunk.to_vec(),
        });
        ghostwriter_common::auth::bearer(&mut request, token)?;
        let response = client
            .ingest(request)
            .await
            .map_err(|s| anyhow::anyhow!("ingest failed ({:?}): {}", s.code(), s.message()))?
            .into_inner();
        ingested.total = response.total_documents;
        ingested.consistency_token = ghostwriter_orchestrator::tokens::later(
            &ingested.consistency_token,
            &response.consistency_token,
        );
        progress(chunk.len());
    }
    Ok(ingested)
}
