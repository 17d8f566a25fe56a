//! Clients of the public API: `write`, `ingest`, `distinguish`, `presets`, `info`.

use ghostwriter::remote::RemoteArgs;
use std::io::Write as _;
use std::time::{Duration, Instant};

use clap::Parser;
use ghostwriter::proto::ghostwriter_client::GhostwriterClient;
use ghostwriter::proto::write_stream_response::Event;
use ghostwriter::proto::{GenerationParams, WriteOptions, WriteRequest};
use ghostwriter::{loaders, output};
use ghostwriter_common::MAX_MESSAGE_BYTES;
use ghostwriter_transport::{Tls, client};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_stream::StreamExt;

/// Where the public API is, the credential it is called with, and the TLS it is called over.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// The TLS this command calls with (from the global --tls-* flags).
    #[arg(skip)]
    pub tls: Option<Tls>,
}

impl ApiArgs {
    /// Calls `url` with `token`, plain or over TLS as the global flags say.
    pub fn to(url: String, token: Option<String>, tls: Option<Tls>) -> Self {
        Self {
            remote: RemoteArgs {
                to: Some(url),
                token,
            },
            tls,
        }
    }

    /// The API's URL: `--to` (or the default), with a scheme when it names none.
    pub fn url(&self) -> String {
        client::url(self.remote.to_or_default(), self.tls.is_some())
    }

    /// The bearer token, if any.
    pub fn token(&self) -> Option<&str> {
        self.remote.token.as_deref()
    }

    /// A request to the API: `body` with a deadline `timeout` seconds away and the token.
    pub fn request<T>(&self, body: T, timeout: u64) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(body);
        request.set_timeout(Duration::from_secs(timeout));
        client::bearer(&mut request, self.token())?;
        Ok(request)
    }

    /// A client of the API (connected at its first call).
    pub fn connect(&self) -> anyhow::Result<GhostwriterClient<tonic::transport::Channel>> {
        let url = self.url();
        let channel = client::channel(&url, self.tls.as_ref())?;
        Ok(GhostwriterClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// One unary call: `call` with a client and `body` as a request (its deadline `timeout`
    /// seconds away, the token attached); a failure as [`Self::error`] reads it.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        body: Req,
        timeout: u64,
        call: F,
    ) -> anyhow::Result<Resp>
    where
        F: FnOnce(GhostwriterClient<tonic::transport::Channel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let request = self.request(body, timeout)?;
        call(self.connect()?, request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.error(s))
    }

    /// A failed call, as a person reads it: the code, the message, the URL called, and the
    /// likely fix.
    pub fn error(&self, s: tonic::Status) -> anyhow::Error {
        let url = self.url();
        let hint = match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown
                if client::is_transport_failure(&s) || s.message().contains("connect") =>
            {
                if self.tls.is_none() {
                    format!(
                        "nothing answers at {url}: is Ghostwriter running there (`ghostwriter up`)? \
                         Set --to or GHOSTWRITER_URL; a server that speaks TLS needs --tls-ca"
                    )
                } else {
                    format!(
                        "nothing answers at {url} over TLS: is Ghostwriter running there, and \
                         does its certificate chain to --tls-ca?"
                    )
                }
            }
            tonic::Code::Unauthenticated => {
                "send a token the server accepts: --token or GHOSTWRITER_TOKEN".to_string()
            }
            tonic::Code::PermissionDenied => {
                "the token may not act for this user: use one issued for it".to_string()
            }
            _ => String::new(),
        };
        if hint.is_empty() {
            anyhow::anyhow!("{:?} from {url}: {}", s.code(), s.message())
        } else {
            anyhow::anyhow!("{:?} from {url}: {}\n  {hint}", s.code(), s.message())
        }
    }
}

/// Options of `ingest`.
#[derive(clap::Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Documents per request.
    #[arg(long, env = "GHOSTWRITER_INGEST_BATCH", default_value_t = 1000)]
    pub batch: usize,
    /// Print the result as JSON on stdout: documents sent, documents in the index, and the
    /// consistency token (give it to `write --after`).
    #[arg(long)]
    pub json: bool,
    /// The file.
    pub file: std::path::PathBuf,
}

/// Options of `presets`: with --to, a running Ghostwriter's (its ListPresets RPC); without,
/// the built-in ones.
#[derive(clap::Args)]
pub struct PresetsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Options of `delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The user whose documents are deleted.
    #[arg(long, env = "GHOSTWRITER_USER")]
    user: String,
    /// Delete only this document (default: every document of the user).
    #[arg(long)]
    doc_id: Option<String>,
    /// Print the result as JSON (deleted count and consistency token).
    #[arg(long)]
    json: bool,
    /// Deadline of the request in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Debug, clap::Args)]
pub struct DistinguishArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The supposed author.
    #[arg(long, env = "GHOSTWRITER_USER")]
    user: String,
    /// The text (judged whole; the LLM method compares its first 150 characters).
    #[arg(long)]
    text: String,
    /// Compare only with documents written before this unix time.
    #[arg(long)]
    timestamp: Option<i64>,
    /// Earlier documents compared: the most recent (style; 0 = 8) or the best matches (llm;
    /// 0 = 4); at most 16.
    #[arg(long, default_value_t = 0)]
    max_documents: u32,
    /// How to judge: `style` (the style verifier, calibrated at 1:1) or `llm` (the generator's
    /// author-distinction answer; at chance on unseen users, for comparison only).
    #[arg(long, value_enum, default_value_t = Method::Style)]
    method: Method,
    /// See the ingest or deletion of this consistency token (printed by `ingest --json`).
    #[arg(long, env = "GHOSTWRITER_AFTER")]
    after: Option<String>,
    /// Deadline of the request in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// How `distinguish` judges.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Method {
    /// The style verifier.
    Style,
    /// The generator's author-distinction answer.
    Llm,
}

#[derive(Parser)]
pub struct WriteArgs {
    /// The author.
    #[arg(long, env = "GHOSTWRITER_USER", help_heading = "Document")]
    user: String,
    /// Title of the document.
    #[arg(long, default_value = "", env = "GHOSTWRITER_TITLE", help_heading = "Document")]
    title: String,
    /// The start of the document.
    #[arg(long, env = "GHOSTWRITER_START", help_heading = "Document")]
    start: String,
    /// When the document is written (unix seconds); only earlier documents are used.
    #[arg(long, env = "GHOSTWRITER_TIMESTAMP", help_heading = "Document")]
    timestamp: Option<i64>,
    /// Id of the document being written.
    #[arg(long, default_value = "", env = "GHOSTWRITER_DOC_ID", help_heading = "Document")]
    doc_id: String,
    /// The generators' LoRA adapter to write with, by name (empty: their default; `base`: the
    /// base model alone).
    #[arg(long, default_value = "", env = "GHOSTWRITER_WRITE_ADAPTER", help_heading = "Pipeline")]
    adapter: String,
    /// Preset (see `ghostwriter presets`).
    #[arg(long, default_value = "full", env = "GHOSTWRITER_PRESET", help_heading = "Pipeline")]
    preset: String,
    /// Characters of title+start used as the immediate context (0 = the paper's 150).
    #[arg(long, default_value_t = 0, env = "GHOSTWRITER_CONTEXT_CHARS", help_heading = "Pipeline")]
    context_chars: u32,
    /// See the ingest or deletion of this consistency token (printed by `ingest --json` and
    /// `delete --json`), through any orchestrator.
    #[arg(long, env = "GHOSTWRITER_AFTER", help_heading = "Pipeline")]
    after: Option<String>,
    /// Tokens to generate at most (0 = server default).
    #[arg(
        long,
        default_value_t = 0,
        env = "GHOSTWRITER_WRITE_MAX_NEW_TOKENS",
        help_heading = "Generation"
    )]
    max_new_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(
        long,
        default_value_t = 0.0,
        env = "GHOSTWRITER_TEMPERATURE",
        help_heading = "Generation"
    )]
    temperature: f32,
    /// Nucleus sampling threshold (0 or 1 = off).
    #[arg(long, default_value_t = 0.0, env = "GHOSTWRITER_TOP_P", help_heading = "Generation")]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0, env = "GHOSTWRITER_SEED", help_heading = "Generation")]
    seed: u64,
    /// Stop string (repeatable).
    #[arg(long, env = "GHOSTWRITER_STOP", help_heading = "Generation")]
    stop: Vec<String>,
    /// Beam search with this many beams (needs temperature 0; 0 or 1 = off). The text comes
    /// in one piece when the search ends, also with --stream.
    #[arg(long, default_value_t = 0, env = "GHOSTWRITER_NUM_BEAMS", help_heading = "Generation")]
    num_beams: u32,
    /// Beam hypotheses are ranked by log-probability / length^this (default 1).
    #[arg(long, env = "GHOSTWRITER_LENGTH_PENALTY", help_heading = "Generation")]
    length_penalty: Option<f32>,
    /// Print the whole response, provenance included, as JSON.
    #[arg(long, env = "GHOSTWRITER_JSON", help_heading = "Output")]
    json: bool,
    /// Print the text as it is generated.
    #[arg(long, env = "GHOSTWRITER_STREAM", help_heading = "Output")]
    stream: bool,
    /// Deadline of the request in seconds.
    #[arg(long, default_value_t = 300, env = "GHOSTWRITER_TIMEOUT", help_heading = "Output")]
    timeout: u64,
    #[command(flatten)]
    pub api: ApiArgs,
}

pub async fn distinguish(args: DistinguishArgs) -> anyhow::Result<()> {
    let request = ghostwriter::proto::DistinguishRequest {
        user_id: args.user,
        text: args.text,
        timestamp: args.timestamp,
        doc_id: String::new(),
        max_documents: args.max_documents,
        method: match args.method {
            Method::Style => ghostwriter::proto::DistinguishMethod::Style,
            Method::Llm => ghostwriter::proto::DistinguishMethod::Llm,
        } as i32,
        consistency_token: args.after.unwrap_or_default(),
    };
    let r = args
        .api
        .call(request, args.timeout, |mut c, r| async move {
            c.distinguish(r).await
        })
        .await?;
    if r.abstained {
        println!("abstained: {}", r.abstention_reason);
    } else {
        println!("{:.3}", r.probability);
    }
    for d in &r.documents {
        eprintln!("  {:.3}  {}", d.probability, d.doc_id);
    }
    eprintln!(
        "profile: {} documents ({})",
        r.profile_documents,
        r.profile_doc_ids.join(", ")
    );
    for f in &r.top_features {
        eprintln!("  {:+.3}  {} = {:.3}", f.contribution, f.name, f.value);
    }
    eprintln!("model: {}", r.model);
    Ok(())
}

/// Sends every document of `file` in batches, with a progress bar; returns the count and what
/// the batches answered.
pub async fn ingest(
    api: &ApiArgs,
    batch: usize,
    file: &std::path::Path,
) -> anyhow::Result<(usize, ghostwriter::embedded::Ingested)> {
    let path = file.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || loaders::load(&path)).await??;
    if loaded.skipped_empty > 0 {
        eprintln!(
            "skipping {} documents with neither title nor text",
            loaded.skipped_empty
        );
    }
    let bar = ProgressBar::new(loaded.documents.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} docs ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("ingesting");
    let started = Instant::now();
    let ingested = ghostwriter::embedded::ingest_batches(
        api.connect()?,
        &loaded.documents,
        batch,
        api.token(),
        |n| bar.inc(n as u64),
    )
    .await
    .map_err(|e| match e.downcast::<tonic::Status>() {
        Ok(s) => api.error(s),
        Err(e) => e,
    })?;
    bar.finish_and_clear();
    eprintln!(
        "ingested {} documents from {} in {:.1}s ({} in the index)",
        loaded.documents.len(),
        file.display(),
        started.elapsed().as_secs_f64(),
        ingested.total
    );
    Ok((loaded.documents.len(), ingested))
}

/// `ingest`: the file's documents, printed as JSON with `--json`.
pub async fn ingest_command(a: IngestArgs) -> anyhow::Result<()> {
    let (sent, ingested) = ingest(&a.api, a.batch, &a.file).await?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "ingested": sent,
                "total_documents": ingested.total,
                "consistency_token": ingested.consistency_token,
            })
        );
    }
    Ok(())
}

/// `delete`: one document of a user, or all of them.
pub async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let request = ghostwriter::proto::DeleteRequest {
        user_id: args.user.clone(),
        doc_id: args.doc_id.clone().unwrap_or_default(),
    };
    let r = args
        .api
        .call(request, args.timeout, |mut c, r| async move {
            c.delete(r).await
        })
        .await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "deleted": r.deleted,
                "consistency_token": r.consistency_token,
            })
        );
    } else {
        eprintln!("deleted {} documents of {}", r.deleted, args.user);
    }
    Ok(())
}

fn write_request(a: &WriteArgs) -> WriteRequest {
    WriteRequest {
        user_id: a.user.clone(),
        title: a.title.clone(),
        start: a.start.clone(),
        preset: a.preset.clone(),
        timestamp: a.timestamp,
        doc_id: a.doc_id.clone(),
        consistency_token: a.after.clone().unwrap_or_default(),
        adapter: a.adapter.clone(),
        options: Some(WriteOptions {
            generation: Some(GenerationParams {
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed,
                stop: a.stop.clone(),
                num_beams: a.num_beams,
                length_penalty: a.length_penalty,
            }),
            context_chars: a.context_chars,
            ..Default::default()
        }),
    }
}

pub async fn write(args: WriteArgs) -> anyhow::Result<()> {
    let mut client = args.api.connect()?;
    let request = args.api.request(write_request(&args), args.timeout)?;
    if !args.stream {
        let response = client
            .write(request)
            .await
            .map_err(|s| args.api.error(s))?
            .into_inner();
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&output::write_response_json(&response))?
            );
        } else {
            println!("{}", response.document);
            if let Some(p) = &response.provenance {
                eprintln!("\n{}", output::provenance_text(p));
            }
        }
        return Ok(());
    }
    let mut stream = client
        .write_stream(request)
        .await
        .map_err(|s| args.api.error(s))?
        .into_inner();
    let mut stdout = std::io::stdout();
    while let Some(message) = stream.next().await {
        match message.map_err(|s| args.api.error(s))?.event {
            Some(Event::Provenance(p)) if !args.json => {
                print!("{}", p.immediate_context);
                stdout.flush()?;
            }
            Some(Event::Text(t)) if !args.json => {
                print!("{t}");
                stdout.flush()?;
            }
            Some(Event::Done(done)) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&output::write_response_json(&done))?
                    );
                } else {
                    println!();
                    if let Some(p) = &done.provenance {
                        eprintln!("\n{}", output::provenance_text(p));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `presets`: the built-in ones, or with `--to` those of a running Ghostwriter.
pub async fn presets(args: PresetsArgs) -> anyhow::Result<()> {
    let api = args.api;
    if api.remote.to.is_none() {
        for p in ghostwriter_orchestrator::PRESETS {
            println!("{:<18} {}", p.name, p.description);
        }
        return Ok(());
    }
    let r = api
        .call(
            ghostwriter::proto::ListPresetsRequest {},
            30,
            |mut c, r| async move { c.list_presets(r).await },
        )
        .await?;
    for p in r.presets {
        let default = if p.name == r.default_preset {
            " (default)"
        } else {
            ""
        };
        println!("{:<18} {}{default}", p.name, p.description);
    }
    Ok(())
}

/// `info`: what a running Ghostwriter serves.
pub async fn info(api: ApiArgs) -> anyhow::Result<()> {
    let r = api
        .call(
            ghostwriter::proto::InfoRequest {},
            30,
            |mut c, r| async move { c.info(r).await },
        )
        .await?;
    let g = r.generator.unwrap_or_default();
    let info = serde_json::json!({
        "version": r.version,
        "model": g.model,
        "adapter": g.adapter,
        "backend": g.backend,
        "context_tokens": g.context_tokens,
        "default_preset": r.default_preset,
        "presets": r.presets,
        "authentication": r.authentication,
    });
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(())
}
