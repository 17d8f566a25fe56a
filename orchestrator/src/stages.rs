//! The orchestrator's view of the stages: an [`EndpointSet`] per stage (static, resolved from
//! DNS or watched in etcd), power-of-two-choices balancing, retries of idempotent calls on another endpoint when
//! one is UNAVAILABLE (bounded by a retry budget, so failures cannot multiply load), and routing
//! of a user's retrieval and ingest to the retriever shard that owns the user.

use std::time::Instant;

use ghostwriter_common::deadline;
use ghostwriter_discovery::{Balancer, EndpointInfo, EndpointSet, shard_of, urls};
use ghostwriter_proto::v1::generator_client::GeneratorClient;
use ghostwriter_proto::v1::ranker_client::RankerClient;
use ghostwriter_proto::v1::retriever_client::RetrieverClient;
use ghostwriter_proto::v1::summarizer_client::SummarizerClient;
use ghostwriter_proto::v1::synthesizer_client::SynthesizerClient;
use ghostwriter_proto::v1::{
    DeleteRequest, DeleteResponse, Document, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, GeneratorInfo, GeneratorInfoRequest, IngestRequest, IngestResponse,
    RankRequest, RankResponse, RetrieveRequest, RetrieveResponse, SummarizeRequest,
    SummarizeResponse, SynthesizeRequest, SynthesizeResponse,
};
use tonic::{Status, Streaming};

use crate::OrchestratorConfig;

pub(crate) const LIMIT: usize = 256 << 20;

/// Every stage's endpoints.
pub struct Stages {
    retriever: EndpointSet,
    ranker: EndpointSet,
    summarizer: EndpointSet,
    synthesizer: EndpointSet,
    generator: EndpointSet,
    shards: u32,
    balancer: Balancer,
    /// Where the next write to a shard starts among its replicas (writes spread over them).
    next_replica: std::sync::atomic::AtomicUsize,
}

impl Stages {
    /// Static, DNS-resolved (`dns:///HOST:PORT`) or etcd-watched (`--etcd`) endpoint sets.
    pub fn new(c: &OrchestratorConfig) -> Result<Self, Status> {
        let d = &c.discovery;
        let set = |stage: &str, list: &str| d.stage_set(stage, list);
        let retriever = if d.etcd.is_empty() && c.retriever_shards > 1 {
            // Static shards: the i-th URL serves shard i.
            EndpointSet::fixed_sharded("retriever", &urls(&c.retriever_url))?
        } else {
            set("retriever", &c.retriever_url)?
        };
        Ok(Self {
            retriever,
            ranker: set("ranker", &c.ranker_url)?,
            summarizer: set("summarizer", &c.summarizer_url)?,
            synthesizer: set("synthesizer", &c.synthesizer_url)?,
            generator: set("generator", &c.generator_url)?,
            shards: c.retriever_shards.max(1),
            balancer: Balancer::default(),
            next_replica: Default::default(),
        })
    }

    /// The generator endpoints (for tests and tools).
    pub fn generator_set(&self) -> &EndpointSet {
        &self.generator
    }

    fn shard_filter(&self, user: &str) -> (u32, impl Fn(&EndpointInfo) -> bool + use<>) {
        let shards = self.shards;
        let shard = shard_of(user, shards);
        (shard, move |info: &EndpointInfo| {
            shards <= 1 || info.shard == Some(shard)
        })
    }

    /// Retrieve from the shard that owns the user.
    pub async fn retrieve(
        &self,
        r: RetrieveRequest,
        deadline: Option<Instant>,
    ) -> Result<RetrieveResponse, Status> {
        let (shard, filter) = self.shard_filter(&r.user_id);
        let what = if self.shards > 1 {
            format!("retriever (shard {shard})")
        } else {
            "retriever".into()
        };
        self.balancer
            .call(&self.retriever, &what, filter, true, |e| {
                let r = r.clone();
                async move {
                    let mut c =
                        RetrieverClient::new(e.channel.clone()).max_decoding_message_size(LIMIT);
                    Ok(c.retrieve(deadline::request(r, deadline)?)
                        .await?
                        .into_inner())
                }
            })
            .await
    }

    /// Ingest, each user's documents to the shard that owns the user. With a store, one replica
    /// of the shard commits the batch there and answers with a consistency token, and every
    /// replica applies it from the store (one that is restarting catches up); without one, each
    /// replica's index is its own store, so every replica in the endpoint set gets the batch.
    pub async fn ingest(
        &self,
        documents: Vec<Document>,
        deadline: Option<Instant>,
    ) -> Result<IngestResponse, Status> {
        if documents.is_empty() {
            return Err(Status::invalid_argument("no documents to ingest"));
        }
        let mut by_shard: std::collections::BTreeMap<u32, Vec<Document>> = Default::default();
        for d in documents {
            by_shard
                .entry(shard_of(&d.user_id, self.shards))
                .or_default()
                .push(d);
        }
        let mut total = IngestResponse::default();
        for (shard, docs) in by_shard {
            let docs = std::sync::Arc::new(docs);
            let response = self
                .to_shard(shard, |channel| {
                    let docs = docs.clone();
                    async move {
                        let mut c = RetrieverClient::new(channel).max_encoding_message_size(LIMIT);
                        let request = IngestRequest {
                            documents: docs.as_ref().clone(),
                        };
                        let r = c
                            .ingest(deadline::request(request, deadline)?)
                            .await?
                            .into_inner();
                        let token = r.consistency_token.clone();
                        Ok((r, token))
                    }
                })
                .await?;
            total.total_documents = total.total_documents.max(response.total_documents);
            total.ingested += response.ingested;
            total.consistency_token =
                crate::tokens::later(&total.consistency_token, &response.consistency_token);
        }
        Ok(total)
    }

    /// Deletes one document or a user's every document, on the shard that owns the user (as
    /// [`Self::ingest`]: one replica with a store, every replica without).
    pub async fn delete(
        &self,
        r: DeleteRequest,
        deadline: Option<Instant>,
    ) -> Result<DeleteResponse, Status> {
        let shard = shard_of(&r.user_id, self.shards);
        self.to_shard(shard, |channel| {
            let r = r.clone();
            async move {
                let response = RetrieverClient::new(channel)
                    .delete(deadline::request(r, deadline)?)
                    .await?
                    .into_inner();
                let token = response.consistency_token.clone();
                Ok((response, token))
            }
        })
        .await
    }

    /// A write to the retriever shard `shard`: to the replicas in turn until one answers with a
    /// consistency token (a store took the write: every replica gets it from there), else to
    /// every replica (no store: each index is its own). While it is not known which, a replica
    /// that is unavailable is passed over; once the answers say there is no store, it is an
    /// error (it would miss the write for good). Writes are idempotent (upserts and deletions by
    /// key), so a write retried after an ambiguous failure stores nothing twice.
    async fn to_shard<R, F, Fut>(&self, shard: u32, call: F) -> Result<R, Status>
    where
        F: Fn(tonic::transport::Channel) -> Fut,
        Fut: std::future::Future<Output = Result<(R, String), Status>>,
    {
        let what = if self.shards > 1 {
            format!("retriever (shard {shard})")
        } else {
            "retriever".into()
        };
        let mut replicas: Vec<_> = self
            .retriever
            .snapshot()
            .into_iter()
            .filter(|e| self.shards <= 1 || e.info.shard.is_none() || e.info.shard == Some(shard))
            .collect();
        if !replicas.is_empty() {
            let start = self
                .next_replica
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let len = replicas.len();
            replicas.rotate_left(start % len);
        }
        if replicas.is_empty() {
            return Err(Status::unavailable(format!(
                "{what} stage: no endpoint available"
            )));
        }
        let mut passed_over: Option<Status> = None;
        let mut answer: Option<R> = None;
        for replica in replicas {
            let url = replica.info.url.clone();
            let result = self
                .balancer
                .call(
                    &self.retriever,
                    &what,
                    |info| info.url == url,
                    true,
                    |e| call(e.channel.clone()),
                )
                .await;
            match result {
                Ok((r, token)) if !token.is_empty() => return Ok(r),
                Ok((r, _)) => {
                    // No store: every replica needs the write; one passed over missed it.
                    if let Some(e) = passed_over.take() {
                        return Err(e);
                    }
                    answer = Some(r);
                }
                Err(e) if answer.is_none() && e.code() == tonic::Code::Unavailable => {
                    passed_over = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        match (answer, passed_over) {
            (Some(r), None) => Ok(r),
            (_, Some(e)) => Err(e),
            (None, None) => Err(Status::unavailable(format!(
                "{what} stage: no endpoint available"
            ))),
        }
    }

    /// Rank.
    pub async fn rank(
        &self,
        r: RankRequest,
        deadline: Option<Instant>,
    ) -> Result<RankResponse, Status> {
        self.balancer
            .call(
                &self.ranker,
                "ranker",
                |_| true,
                true,
                |e| {
                    let r = r.clone();
                    async move {
                        let mut c =
                            RankerClient::new(e.channel.clone()).max_encoding_message_size(LIMIT);
                        Ok(c.rank(deadline::request(r, deadline)?).await?.into_inner())
                    }
                },
            )
            .await
    }

    /// Summarize.
    pub async fn summarize(
        &self,
        r: SummarizeRequest,
        deadline: Option<Instant>,
    ) -> Result<SummarizeResponse, Status> {
        self.balancer
            .call(
                &self.summarizer,
                "summarizer",
                |_| true,
                true,
                |e| {
                    let r = r.clone();
                    async move {
                        let mut c = SummarizerClient::new(e.channel.clone())
                            .max_encoding_message_size(LIMIT);
                        Ok(c.summarize(deadline::request(r, deadline)?)
                            .await?
                            .into_inner())
                    }
                },
            )
            .await
    }

    /// Synthesize.
    pub async fn synthesize(
        &self,
        r: SynthesizeRequest,
        deadline: Option<Instant>,
    ) -> Result<SynthesizeResponse, Status> {
        self.balancer
            .call(
                &self.synthesizer,
                "synthesizer",
                |_| true,
                true,
                |e| {
                    let r = r.clone();
                    async move {
                        let mut c = SynthesizerClient::new(e.channel.clone())
                            .max_encoding_message_size(LIMIT);
                        Ok(c.synthesize(deadline::request(r, deadline)?)
                            .await?
                            .into_inner())
                    }
                },
            )
            .await
    }

    /// Unary generation (idempotent: greedy or seeded), retried on another worker.
    pub async fn generate(
        &self,
        r: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<GenerateResponse, Status> {
        self.balancer
            .call(
                &self.generator,
                "generator",
                |_| true,
                true,
                |e| {
                    let r = r.clone();
                    async move {
                        Ok(GeneratorClient::new(e.channel.clone())
                            .generate(deadline::request(r, deadline)?)
                            .await?
                            .into_inner())
                    }
                },
            )
            .await
    }

    /// One generator worker's model and engine.
    pub async fn generator_info(&self, deadline: Option<Instant>) -> Result<GeneratorInfo, Status> {
        self.balancer
            .call(
                &self.generator,
                "generator",
                |_| true,
                true,
                |e| async move {
                    Ok(GeneratorClient::new(e.channel.clone())
                        .info(deadline::request(GeneratorInfoRequest {}, deadline)?)
                        .await?
                        .into_inner())
                },
            )
            .await
    }

    /// Streaming generation: the stream is opened once (tokens already sent cannot be retried).
    pub async fn generate_stream(
        &self,
        r: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<Streaming<GenerateStreamResponse>, Status> {
        self.balancer
            .call(
                &self.generator,
                "generator",
                |_| true,
                false,
                |e| {
                    let r = r.clone();
                    async move {
                        Ok(GeneratorClient::new(e.channel.clone())
                            .generate_stream(deadline::request(r, deadline)?)
                            .await?
                            .into_inner())
                    }
                },
            )
            .await
    }
}
