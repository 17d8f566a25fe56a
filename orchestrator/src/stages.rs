//! The orchestrator's view of the stages: an [`EndpointSet`] per stage (static, resolved from
//! DNS or watched in etcd), power-of-two-choices balancing, retries of idempotent calls on another endpoint when
//! one is UNAVAILABLE (bounded by a retry budget, so failures cannot multiply load), and routing
//! of a user's retrieval and ingest to the retriever shard that owns the user.

use std::future::Future;
use std::time::Instant;

use ghostwriter_common::stage::StageKind;
use ghostwriter_common::{MAX_MESSAGE_BYTES, deadline};
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
    SummarizeResponse, SynthesizeRequest, SynthesizeResponse, VerifyAuthorRequest,
    VerifyAuthorResponse,
};
use ghostwriter_transport::Tls;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::{Error, OrchestratorConfig};

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

/// How a call may be repeated on another endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// The call has no effect a repeat could double (reads, upserts, greedy or seeded
    /// generation): an endpoint that is down is retried on another.
    Idempotent,
    /// Opened once (a stream whose tokens may already have been sent).
    Once,
}

impl Stages {
    /// Static, DNS-resolved (`dns:///HOST:PORT`) or etcd-watched (`--etcd`) endpoint sets,
    /// dialed over `tls` when given.
    pub fn new(c: &OrchestratorConfig, tls: Option<&Tls>) -> anyhow::Result<Self> {
        let d = &c.discovery;
        let set = |stage: StageKind, list: &str| d.stage_set(stage, list, tls);
        let retriever = if d.etcd.is_empty() && c.retriever_shards > 1 {
            // Static shards: the i-th URL serves shard i.
            EndpointSet::fixed_sharded(
                StageKind::Retriever.name(),
                &urls(&c.retriever_url),
                tls.cloned(),
            )?
        } else {
            set(StageKind::Retriever, &c.retriever_url)?
        };
        Ok(Self {
            retriever,
            ranker: set(StageKind::Ranker, &c.ranker_url)?,
            summarizer: set(StageKind::Summarizer, &c.summarizer_url)?,
            synthesizer: set(StageKind::Synthesizer, &c.synthesizer_url)?,
            generator: set(StageKind::Generator, &c.generator_url)?,
            shards: c.retriever_shards.max(1),
            balancer: Balancer::default(),
            next_replica: Default::default(),
        })
    }

    /// The endpoints of `stage` (the orchestrator has none of its own).
    pub fn set(&self, stage: StageKind) -> Option<&EndpointSet> {
        match stage {
            StageKind::Retriever => Some(&self.retriever),
            StageKind::Ranker => Some(&self.ranker),
            StageKind::Summarizer => Some(&self.summarizer),
            StageKind::Synthesizer => Some(&self.synthesizer),
            StageKind::Generator => Some(&self.generator),
            StageKind::Orchestrator => None,
        }
    }

    /// The generator endpoints (for tests and tools).
    pub fn generator_set(&self) -> &EndpointSet {
        &self.generator
    }

    /// The one balanced call every stage call goes through: `call` with a channel to an
    /// endpoint of `stage` that passes `filter`, and the request carrying the deadline and
    /// trace context; `what` names the stage in errors. See [`Balancer::call`] for retries.
    #[allow(clippy::too_many_arguments)] // each says how this one call goes
    async fn call<Req, Resp, F, Fut>(
        &self,
        stage: StageKind,
        what: &str,
        filter: impl Fn(&EndpointInfo) -> bool,
        retry: Retry,
        request: Req,
        deadline: Option<Instant>,
        call: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let set = self.set(stage).ok_or(Error::NoEndpoint(what.to_string()))?;
        Ok(self
            .balancer
            .call(set, what, filter, retry == Retry::Idempotent, |e| {
                let request = deadline::request(request.clone(), deadline);
                let call = &call;
                async move { Ok(call(e.channel.clone(), request?).await?.into_inner()) }
            })
            .await?)
    }

    /// [`Self::call`] on any endpoint of a stage, retried when idempotent.
    async fn call_any<Req, Resp, F, Fut>(
        &self,
        stage: StageKind,
        request: Req,
        deadline: Option<Instant>,
        call: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let what = stage.name();
        self.call(
            stage,
            what,
            |_| true,
            Retry::Idempotent,
            request,
            deadline,
            call,
        )
        .await
    }

    fn shard_filter(&self, user: &str) -> (u32, impl Fn(&EndpointInfo) -> bool + use<>) {
        let shards = self.shards;
        let shard = shard_of(user, shards);
        (shard, move |info: &EndpointInfo| {
            shards <= 1 || info.shard == Some(shard)
        })
    }

    /// The retriever's name in errors: with its shard when sharded.
    fn retriever_name(&self, shard: u32) -> String {
        if self.shards > 1 {
            format!("retriever (shard {shard})")
        } else {
            StageKind::Retriever.name().into()
        }
    }

    /// Retrieve from the shard that owns the user.
    pub async fn retrieve(
        &self,
        r: RetrieveRequest,
        deadline: Option<Instant>,
    ) -> Result<RetrieveResponse, Error> {
        let (shard, filter) = self.shard_filter(&r.user_id);
        let what = self.retriever_name(shard);
        self.call(
            StageKind::Retriever,
            &what,
            filter,
            Retry::Idempotent,
            r,
            deadline,
            |channel, request| async move {
                RetrieverClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .retrieve(request)
                    .await
            },
        )
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
    ) -> Result<IngestResponse, Error> {
        let mut by_shard: std::collections::BTreeMap<u32, Vec<Document>> = Default::default();
        for d in documents {
            by_shard
                .entry(shard_of(&d.user_id, self.shards))
                .or_default()
                .push(d);
        }
        let mut total = IngestResponse::default();
        for (shard, docs) in by_shard {
            let request = IngestRequest { documents: docs };
            let response = self
                .to_shard(shard, request, deadline, |channel, request| async move {
                    let r = RetrieverClient::new(channel)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES)
                        .ingest(request)
                        .await?;
                    let token = r.get_ref().consistency_token.clone();
                    Ok((r, token))
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
    ) -> Result<DeleteResponse, Error> {
        let shard = shard_of(&r.user_id, self.shards);
        self.to_shard(shard, r, deadline, |channel, request| async move {
            let r = RetrieverClient::new(channel).delete(request).await?;
            let token = r.get_ref().consistency_token.clone();
            Ok((r, token))
        })
        .await
    }

    /// A write to the retriever shard `shard`: to the replicas in turn until one answers with a
    /// consistency token (a store took the write: every replica gets it from there), else to
    /// every replica (no store: each index is its own). While it is not known which, a replica
    /// that is unavailable is passed over; once the answers say there is no store, it is an
    /// error (it would miss the write for good). Writes are idempotent (upserts and deletions by
    /// key), so a write retried after an ambiguous failure stores nothing twice.
    async fn to_shard<Req, Resp, F, Fut>(
        &self,
        shard: u32,
        request: Req,
        deadline: Option<Instant>,
        call: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<(tonic::Response<Resp>, String), Status>>,
    {
        let what = self.retriever_name(shard);
        let mut replicas: Vec<_> = self
            .retriever
            .snapshot()
            .into_iter()
            .filter(|e| self.shards <= 1 || e.info.shard.is_none() || e.info.shard == Some(shard))
            .collect();
        if replicas.is_empty() {
            return Err(Error::NoEndpoint(what));
        }
        let start = self
            .next_replica
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let len = replicas.len();
        replicas.rotate_left(start % len);
        let mut passed_over: Option<Error> = None;
        let mut answer: Option<Resp> = None;
        for replica in replicas {
            let url = replica.info.url.clone();
            let token = std::sync::Mutex::new(String::new());
            let result = self
                .call(
                    StageKind::Retriever,
                    &what,
                    |info| info.url == url,
                    Retry::Idempotent,
                    request.clone(),
                    deadline,
                    |channel, request| {
                        let token = &token;
                        let f = call(channel, request);
                        async move {
                            let (response, t) = f.await?;
                            if let Ok(mut slot) = token.lock() {
                                *slot = t;
                            }
                            Ok(response)
                        }
                    },
                )
                .await;
            let token = token.into_inner().unwrap_or_default();
            match result {
                Ok(r) if !token.is_empty() => return Ok(r),
                Ok(r) => {
                    // No store: every replica needs the write; one passed over missed it.
                    if let Some(e) = passed_over.take() {
                        return Err(e);
                    }
                    answer = Some(r);
                }
                Err(e) if answer.is_none() && unavailable(&e) => {
                    passed_over = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        match (answer, passed_over) {
            (Some(r), None) => Ok(r),
            (_, Some(e)) => Err(e),
            (None, None) => Err(Error::NoEndpoint(what)),
        }
    }

    /// Rank.
    pub async fn rank(
        &self,
        r: RankRequest,
        deadline: Option<Instant>,
    ) -> Result<RankResponse, Error> {
        self.call_any(
            StageKind::Ranker,
            r,
            deadline,
            |channel, request| async move {
                RankerClient::new(channel)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
                    .rank(request)
                    .await
            },
        )
        .await
    }

    /// The ranker's authorship judgement by style.
    pub async fn verify_author(
        &self,
        r: VerifyAuthorRequest,
        deadline: Option<Instant>,
    ) -> Result<VerifyAuthorResponse, Error> {
        self.call_any(
            StageKind::Ranker,
            r,
            deadline,
            |channel, request| async move {
                RankerClient::new(channel)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
                    .verify_author(request)
                    .await
            },
        )
        .await
    }

    /// Summarize.
    pub async fn summarize(
        &self,
        r: SummarizeRequest,
        deadline: Option<Instant>,
    ) -> Result<SummarizeResponse, Error> {
        self.call_any(
            StageKind::Summarizer,
            r,
            deadline,
            |channel, request| async move {
                SummarizerClient::new(channel)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
                    .summarize(request)
                    .await
            },
        )
        .await
    }

    /// Synthesize.
    pub async fn synthesize(
        &self,
        r: SynthesizeRequest,
        deadline: Option<Instant>,
    ) -> Result<SynthesizeResponse, Error> {
        self.call_any(
            StageKind::Synthesizer,
            r,
            deadline,
            |channel, request| async move {
                SynthesizerClient::new(channel)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
                    .synthesize(request)
                    .await
            },
        )
        .await
    }

    /// Unary generation (idempotent: greedy or seeded), retried on another worker.
    pub async fn generate(
        &self,
        r: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<GenerateResponse, Error> {
        self.call_any(
            StageKind::Generator,
            r,
            deadline,
            |channel, request| async move { GeneratorClient::new(channel).generate(request).await },
        )
        .await
    }

    /// One generator worker's model and engine.
    pub async fn generator_info(&self, deadline: Option<Instant>) -> Result<GeneratorInfo, Error> {
        self.call_any(
            StageKind::Generator,
            GeneratorInfoRequest {},
            deadline,
            |channel, request| async move { GeneratorClient::new(channel).info(request).await },
        )
        .await
    }

    /// Streaming generation: the stream is opened once (tokens already sent cannot be retried).
    pub async fn generate_stream(
        &self,
        r: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<Streaming<GenerateStreamResponse>, Error> {
        let what = StageKind::Generator.name();
        self.call(
            StageKind::Generator,
            what,
            |_| true,
            Retry::Once,
            r,
            deadline,
            |channel, request| async move {
                GeneratorClient::new(channel).generate_stream(request).await
            },
        )
        .await
    }
}

/// Whether a stage call failed as UNAVAILABLE (another replica may answer).
fn unavailable(e: &Error) -> bool {
    match e {
        Error::NoEndpoint(_) => true,
        Error::Stage(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}
