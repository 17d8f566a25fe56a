//! The orchestrator's view of the stages: an [`EndpointSet`] per stage (static, resolved from
//! DNS or watched in etcd), power-of-two-choices balancing, retries of idempotent calls on another endpoint when
//! one is UNAVAILABLE (bounded by a retry budget, so failures cannot multiply load), and routing
//! of a user's retrieval and ingest to the retriever shard that owns the user.

use std::future::Future;
use std::time::{Duration, Instant};

use ghostwriter_common::stage::StageKind;
use ghostwriter_common::{MAX_MESSAGE_BYTES, deadline};
use ghostwriter_discovery::{
    Balancer, Endpoint, EndpointInfo, EndpointSet, InFlight, shard_of, urls,
};
use ghostwriter_proto::v1::generator_client::GeneratorClient;
use ghostwriter_proto::v1::ranker_client::RankerClient;
use ghostwriter_proto::v1::retriever_client::RetrieverClient;
use ghostwriter_proto::v1::summarizer_client::SummarizerClient;
use ghostwriter_proto::v1::synthesizer_client::SynthesizerClient;
use ghostwriter_proto::v1::{
    DeleteRequest, DeleteResponse, Document, GenerateRequest, GenerateResponse,
    GenerateStreamResponse, GeneratorAdapters, GeneratorInfo, GeneratorInfoRequest, IngestRequest,
    IngestResponse, ListAdaptersRequest, LoadAdapterRequest, RankRequest, RankResponse,
    RetrieveRequest, RetrieveResponse, SummarizeRequest, SummarizeResponse, SynthesizeRequest,
    SynthesizeResponse, UnloadAdapterRequest, VerifyAuthorRequest, VerifyAuthorResponse,
};
use ghostwriter_transport::client::{self, Dialer};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::{Error, OrchestratorConfig};

/// The unary calls that any endpoint of a stage may answer: each one method on [`Stages`] that
/// goes through [`Stages::call`] on any endpoint of the stage, with the stage's client.
macro_rules! balanced_calls {
    ($($(#[$doc:meta])* $name:ident($req:ty) -> $resp:ty = $stage:ident via $client:ident;)*) => {
        $(
            $(#[$doc])*
            pub async fn $name(&self, r: $req, deadline: Option<Instant>) -> Result<$resp, Error> {
                let stage = StageKind::$stage;
                let pick = |set: &EndpointSet, tried: &[String]| set.pick(tried);
                self.call(stage, stage.name(), pick, r, deadline, |channel, request| async move {
                    $client::new(channel)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES)
                        .$name(request)
                        .await
                })
                .await
            }
        )*
    };
}

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
    /// Static, DNS-resolved (`dns:///HOST:PORT`) or etcd-watched (`--etcd`) endpoint sets,
    /// dialed with `dialer` (its TLS when given).
    pub fn new(c: &OrchestratorConfig, dialer: &Dialer) -> anyhow::Result<Self> {
        let d = &c.discovery;
        let set = |stage: StageKind, list: &str| d.stage_set(stage, list, dialer.clone());
        let retriever = if d.etcd.is_empty() && c.retriever_shards > 1 {
            // Static shards: the i-th URL serves shard i.
            EndpointSet::fixed_sharded(
                StageKind::Retriever.name(),
                &urls(&c.retriever_url),
                dialer.clone(),
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

    /// The one balanced unary call every stage call goes through: `call` with a channel to the
    /// endpoint of `stage` that `pick` chooses (given the set and those tried already), and the
    /// request carrying the deadline and trace context; `what` names the stage in errors. Every
    /// unary call is idempotent (reads, upserts, greedy or seeded generation), so one that
    /// never reached or lost its endpoint is retried on another ([`Balancer::call`]).
    async fn call<Req, Resp, F, Fut>(
        &self,
        stage: StageKind,
        what: &str,
        pick: impl Fn(&EndpointSet, &[String]) -> Option<std::sync::Arc<Endpoint>>,
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
            .call(
                set,
                what,
                |tried| pick(set, tried),
                true,
                |e| {
                    let request = deadline::request(request.clone(), deadline);
                    let call = &call;
                    async move { Ok(call(e.channel.clone(), request?).await?.into_inner()) }
                },
            )
            .await?)
    }

    /// `call` on every endpoint of `targets` at once, the request carrying the deadline: each
    /// endpoint's URL with its answer.
    async fn each<Req, Resp, F, Fut>(
        targets: Vec<std::sync::Arc<Endpoint>>,
        request: &Req,
        deadline: Option<Instant>,
        call: F,
    ) -> Result<Vec<(String, Result<Resp, Status>)>, Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let calls = targets.into_iter().map(|e| {
            let request = deadline::request(request.clone(), deadline);
            let call = &call;
            async move {
                let answer = call(e.channel.clone(), request?).await;
                Ok::<_, Error>((e.info.url.clone(), answer.map(tonic::Response::into_inner)))
            }
        });
        futures::future::try_join_all(calls).await
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
            |set, tried| set.pick_where(tried, &filter),
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
                    |set, tried| set.pick_where(tried, |info| info.url == url),
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

    balanced_calls! {
        /// Rank.
        rank(RankRequest) -> RankResponse = Ranker via RankerClient;
        /// The ranker's authorship judgement by style.
        verify_author(VerifyAuthorRequest) -> VerifyAuthorResponse = Ranker via RankerClient;
        /// Summarize.
        summarize(SummarizeRequest) -> SummarizeResponse = Summarizer via SummarizerClient;
        /// Synthesize.
        synthesize(SynthesizeRequest) -> SynthesizeResponse = Synthesizer via SynthesizerClient;
    }

    /// Unary generation (idempotent: greedy or seeded), retried on another worker; a request
    /// naming an adapter goes to the worker that owns it ([`pick_generator`]).
    pub async fn generate(
        &self,
        r: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<GenerateResponse, Error> {
        let adapter = r.adapter.clone();
        self.call(
            StageKind::Generator,
            StageKind::Generator.name(),
            |set, tried| pick_generator(set, &adapter, tried),
            r,
            deadline,
            |channel, request| async move { GeneratorClient::new(channel).generate(request).await },
        )
        .await
    }

    /// Loads an adapter: by name on the generator that owns it (writes naming it go there),
    /// with bytes on every generator (no other could load it on demand).
    pub async fn load_adapter(
        &self,
        r: LoadAdapterRequest,
        deadline: Option<Instant>,
    ) -> Result<Vec<GeneratorAdapters>, Error> {
        let targets = if r.safetensors.is_empty() {
            pick_generator(&self.generator, &r.name, &[])
                .into_iter()
                .collect()
        } else {
            self.generator.snapshot()
        };
        if targets.is_empty() {
            return Err(Error::NoEndpoint(StageKind::Generator.name().into()));
        }
        let loaded = Self::each(targets, &r, deadline, |channel, request| async move {
            GeneratorClient::new(channel)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
                .load_adapter(request)
                .await
        })
        .await?;
        loaded
            .into_iter()
            .map(|(generator, answer)| {
                Ok(GeneratorAdapters {
                    generator,
                    adapters: vec![answer.map_err(generator_error)?],
                })
            })
            .collect()
    }

    /// Unloads an adapter from every generator that holds it.
    pub async fn unload_adapter(
        &self,
        r: UnloadAdapterRequest,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        let targets = self.generator.snapshot();
        let answers = Self::each(targets, &r, deadline, |channel, request| async move {
            GeneratorClient::new(channel).unload_adapter(request).await
        })
        .await?;
        let mut unloaded = false;
        for (_, answer) in answers {
            match answer {
                Ok(_) => unloaded = true,
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(generator_error(s)),
            }
        }
        if unloaded {
            Ok(())
        } else {
            Err(Error::NoSuchAdapter(r.name))
        }
    }

    /// Every generator's adapters.
    pub async fn list_adapters(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Vec<GeneratorAdapters>, Error> {
        let targets = self.generator.snapshot();
        let lists =
            Self::each(
                targets,
                &ListAdaptersRequest {},
                deadline,
                |channel, request| async move {
                    GeneratorClient::new(channel).list_adapters(request).await
                },
            )
            .await?;
        lists
            .into_iter()
            .map(|(generator, answer)| {
                Ok(GeneratorAdapters {
                    generator,
                    adapters: answer.map_err(generator_error)?.adapters,
                })
            })
            .collect()
    }

    /// One generator worker's model and engine.
    pub async fn generator_info(&self, deadline: Option<Instant>) -> Result<GeneratorInfo, Error> {
        let stage = StageKind::Generator;
        self.call(
            stage,
            stage.name(),
            |set, tried| set.pick(tried),
            GeneratorInfoRequest {},
            deadline,
            |channel, request| async move { GeneratorClient::new(channel).info(request).await },
        )
        .await
    }

    /// Streaming generation that survives its generator: opened on a balanced endpoint (an
    /// open that cannot connect moves on to another), then continued on another generator when
    /// the one streaming fails, is cut, hangs (nothing for `settings.stall` after its first
    /// message) or hands the stream over while it drains. The next generator gets the token ids
    /// received so far (`resume_token_ids`) and continues where the stream stood: the caller
    /// sees one stream, nothing repeated, nothing missing. A beam search, which sends its text
    /// at the end, starts again instead. The stream fails, UNAVAILABLE, only when no generator
    /// takes it within `settings.window` (or the deadline).
    pub async fn generate_stream(
        self: &std::sync::Arc<Self>,
        r: GenerateRequest,
        deadline: Option<Instant>,
        settings: StreamSettings,
    ) -> Result<GenerationStream, Error> {
        let mut stream = GenerationStream {
            stages: self.clone(),
            beam: r.params.as_ref().is_some_and(|p| p.num_beams > 1),
            request: r,
            deadline,
            settings,
            current: None,
            received: Vec::new(),
            earlier_text: String::new(),
            current_text: String::new(),
            text_sent: false,
            first_message: false,
            resumptions: 0,
            opened: Instant::now(),
            first_text: None,
            done: false,
        };
        stream.open(None, false).await?;
        Ok(stream)
    }
}

/// How a generation stream moves between generators.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// A generator that sends nothing for this long, after its first message, is taken for
    /// hung.
    pub stall: Duration,
    /// How long a stream whose generator failed looks for another before it fails.
    pub window: Duration,
}

/// A piece of a generation stream.
#[derive(Debug)]
pub enum Piece {
    /// Newly generated text.
    Text(String),
    /// The end: the whole generation's statistics (its text is every piece's), and how many
    /// times it moved to another generator.
    Done(GenerateResponse, u32),
}

/// The stream being read now.
struct Upstream {
    endpoint: std::sync::Arc<Endpoint>,
    _in_flight: InFlight,
    messages: Streaming<GenerateStreamResponse>,
}

/// A generation stream that survives its generator (see [`Stages::generate_stream`]).
pub struct GenerationStream {
    stages: std::sync::Arc<Stages>,
    request: GenerateRequest,
    deadline: Option<Instant>,
    settings: StreamSettings,
    beam: bool,
    current: Option<Upstream>,
    /// Every token id received, in order (what a continuation resumes from).
    received: Vec<u32>,
    /// Whether any text reached the caller.
    text_sent: bool,
    /// The text that reached the caller from the generators before the current one: a
    /// continuation's final message holds only what it generated after it.
    earlier_text: String,
    /// The text that reached the caller from the current generator.
    current_text: String,
    /// Whether the current upstream sent a message yet (the stall timeout starts after it).
    first_message: bool,
    resumptions: u32,
    /// When the stream was opened, and when its first text came (a continuation's own time to
    /// first token is not the stream's).
    opened: Instant,
    first_text: Option<Instant>,
    done: bool,
}

/// Why the current upstream is given up.
enum Lost {
    /// It failed, was cut or hung: continue on another generator.
    Resumable(Cut),
    /// Its own answer (an invalid request, the deadline): the stream ends with it.
    Final(Error),
}

/// Why a generator's stream was cut, in a way another generator can continue.
#[derive(Debug)]
enum Cut {
    /// No stream was open.
    NoGenerator,
    /// Nothing came for this long after its first message.
    Hung(Duration),
    /// It ended without its final message.
    EndedEarly,
    /// The connection failed.
    Transport(Status),
}

impl From<Cut> for Status {
    /// How the cut counts against its endpoint (and is reported when no generator takes over).
    fn from(cut: Cut) -> Self {
        match cut {
            Cut::NoGenerator => Status::unavailable("no generator"),
            Cut::Hung(d) => Status::unavailable(format!("sent nothing for {d:?} (hung)")),
            Cut::EndedEarly => Status::unavailable("the stream ended before the text was complete"),
            Cut::Transport(status) => status,
        }
    }
}

impl GenerationStream {
    /// The next piece; None after [`Piece::Done`] or an error.
    pub async fn next(&mut self) -> Option<Result<Piece, Error>> {
        if self.done {
            return None;
        }
        loop {
            let lost = match self.read().await {
                Ok(Some(piece)) => return Some(Ok(piece)),
                Ok(None) => return None,
                Err(Lost::Final(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Err(Lost::Resumable(cut)) => Status::from(cut),
            };
            if let Err(e) = self.resume(lost).await {
                self.done = true;
                return Some(Err(e));
            }
        }
    }

    /// The current upstream's next piece.
    async fn read(&mut self) -> Result<Option<Piece>, Lost> {
        let Some(up) = self.current.as_mut() else {
            return Err(Lost::Resumable(Cut::NoGenerator));
        };
        let message = if self.first_message {
            match tokio::time::timeout(self.settings.stall, up.messages.message()).await {
                Ok(m) => m,
                Err(_) => return Err(Lost::Resumable(Cut::Hung(self.settings.stall))),
            }
        } else {
            up.messages.message().await
        };
        match message {
            Ok(Some(m)) => {
                self.first_message = true;
                self.received.extend_from_slice(&m.token_ids);
                if let Some(mut summary) = m.summary {
                    up.endpoint.succeeded();
                    self.done = true;
                    self.current = None;
                    if self.resumptions > 0 {
                        // The text and statistics of the whole generation, not of its last part.
                        summary.text = std::mem::take(&mut self.earlier_text) + &summary.text;
                        summary.generated_tokens = self.received.len() as u32;
                        if let Some(first) = self.first_text {
                            summary.time_to_first_token =
                                first.duration_since(self.opened).as_secs_f64();
                        }
                    }
                    return Ok(Some(Piece::Done(summary, self.resumptions)));
                }
                if !m.text.is_empty() && !self.text_sent {
                    self.text_sent = true;
                    self.first_text = Some(Instant::now());
                }
                self.current_text.push_str(&m.text);
                Ok(Some(Piece::Text(m.text)))
            }
            Ok(None) => Err(Lost::Resumable(Cut::EndedEarly)),
            Err(status) if client::is_transport_failure(&status) => {
                Err(Lost::Resumable(Cut::Transport(status)))
            }
            Err(status) => Err(Lost::Final(Error::Stage(client::stage_status(
                StageKind::Generator.name(),
                status,
            )))),
        }
    }

    /// Moves the stream to another generator after `lost` ended the current one.
    async fn resume(&mut self, lost: Status) -> Result<(), Error> {
        let what = StageKind::Generator.name();
        if let Some(up) = self.current.take() {
            self.stages
                .balancer
                .failed(&self.stages.generator, &up.endpoint, &lost);
            tracing::info!(url = %up.endpoint.info.url, received = self.received.len(), error = %lost.message(), "continuing a generation stream on another generator");
            let failed = Some(up.endpoint.info.url.clone());
            if self.text_sent && (self.beam || self.received.is_empty()) {
                // Text reached the caller that no continuation could follow without repeating
                // it (a beam's, or a generator's that sends no token ids).
                return Err(Error::Stage(client::stage_status(what, lost)));
            }
            if self.beam {
                self.received.clear();
            }
            // What the caller has is what the continuation follows.
            let current = std::mem::take(&mut self.current_text);
            self.earlier_text.push_str(&current);
            self.open(failed, true).await?;
            self.resumptions += 1;
            Ok(())
        } else {
            self.open(None, true).await
        }
    }

    /// Opens the stream on a generator (not `avoid` while another is there), resuming from the
    /// ids received so far; tries the generators in turn. A stream under way (`resuming`)
    /// keeps looking for one while the failover window (and the deadline) lasts; a new one
    /// fails at once when every generator refused or could not be reached, as a unary call
    /// does (the caller has lost nothing, and a refusal says when to come back).
    async fn open(&mut self, avoid: Option<String>, resuming: bool) -> Result<(), Error> {
        let what = StageKind::Generator.name();
        let set = &self.stages.generator;
        let started = Instant::now();
        let mut request = self.request.clone();
        request.resume_token_ids = self.received.clone();
        let mut tried: Vec<String> = avoid.into_iter().collect();
        let mut last: Option<Status> = None;
        let mut pause = Duration::from_millis(50);
        loop {
            if deadline::remaining(self.deadline).is_err() {
                return Err(Error::Deadline(deadline::DeadlinePassed));
            }
            let endpoint = match pick_generator(set, &request.adapter, &tried) {
                Some(e) => e,
                None => {
                    // Every generator known was tried: wait for one to come (back), within the
                    // window.
                    if !resuming || started.elapsed() + pause > self.settings.window {
                        return Err(match last {
                            // A refusal for load is the answer to pass on (with its RetryInfo).
                            Some(s) if s.code() == tonic::Code::ResourceExhausted => {
                                Error::Stage(client::stage_status(what, s))
                            }
                            Some(s) => Error::Stage(client::stage_status(what, s)),
                            None => Error::NoEndpoint(what.into()),
                        });
                    }
                    set.refresh();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    tried.clear();
                    continue;
                }
            };
            tried.push(endpoint.info.url.clone());
            let in_flight = endpoint.start();
            let call = deadline::request(request.clone(), self.deadline)?;
            match GeneratorClient::new(endpoint.channel.clone())
                .generate_stream(call)
                .await
            {
                Ok(messages) => {
                    self.current = Some(Upstream {
                        endpoint,
                        _in_flight: in_flight,
                        messages: messages.into_inner(),
                    });
                    self.first_message = false;
                    return Ok(());
                }
                Err(status) if client::is_transport_failure(&status) => {
                    self.stages.balancer.failed(set, &endpoint, &status);
                    last = Some(status);
                }
                // Full: another generator may have room.
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    last = Some(status);
                }
                Err(status) => return Err(Error::Stage(client::stage_status(what, status))),
            }
        }
    }
}

/// A generator's own answer, named as its stage's.
fn generator_error(status: Status) -> Error {
    Error::Stage(client::stage_status(StageKind::Generator.name(), status))
}

/// The generator for a request naming `adapter`: the one that owns it by rendezvous hashing
/// while that one is not overloaded (so a pool of generators does not load every adapter
/// everywhere), else the least loaded of two random choices, which then loads it; a request
/// naming none (or the base model) goes to the least loaded of two.
fn pick_generator(
    set: &EndpointSet,
    adapter: &str,
    tried: &[String],
) -> Option<std::sync::Arc<Endpoint>> {
    match adapter {
        "" | ghostwriter_common::BASE_ADAPTER => set.pick(tried),
        a => set.pick_affine(a, tried),
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
