//! Summarizer stage: `SumCtxInd`, a context-independent summary of the ranked entries written by
//! the instruction LLM. The LLM is the generator stage's (called over gRPC), so model weights
//! live only on generator workers and the summarizer stays a light CPU process.

use std::time::Instant;

use ghostwriter_common::server::StageServer;
use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_common::{client, deadline};
use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::generator_client::GeneratorClient;
use ghostwriter_proto::v1::summarizer_server::{Summarizer, SummarizerServer};
use ghostwriter_proto::v1::{
    GenerateRequest, GenerationParams, RankedEntry, SummarizeRequest, SummarizeResponse,
};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Summarizer settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SummarizerConfig {
    /// Generator endpoint that runs the instruction LLM, e.g. http://127.0.0.1:50055.
    #[arg(
        long = "generator-url",
        env = "GHOSTWRITER_GENERATOR_URL",
        default_value = "http://127.0.0.1:50055"
    )]
    pub generator_url: String,
    /// Summary length in tokens when the request sets none.
    #[arg(
        long = "summary-tokens",
        env = "GHOSTWRITER_SUMMARY_TOKENS",
        default_value_t = 96
    )]
    pub max_new_tokens: u32,
}

/// Characters of entries given to the LLM (the paper's ranked-entry budget).
const MAX_INPUT_CHARS: usize = 2_500;
/// Longest summary a request may ask for.
const MAX_SUMMARY_TOKENS: u32 = 512;

/// The instruction for `SumCtxInd`.
pub fn instruction(entries: &[RankedEntry]) -> String {
    let mut passages = String::new();
    let mut left = MAX_INPUT_CHARS;
    for (i, e) in entries.iter().enumerate() {
        if left == 0 {
            break;
        }
        let text: String = e.text.chars().take(left).collect();
        left -= text.chars().count();
        passages.push_str(&format!("Passage {}: {}\n", i + 1, text.trim()));
    }
    format!(
        "Summarize the following passages, all written by the same person, in two or three \
         sentences: what they write about, what they like or dislike, and how they write.\n\n{passages}"
    )
}

/// The gRPC adapter.
#[derive(Clone)]
pub struct SummarizerService {
    generator: GeneratorClient<Channel>,
    default_tokens: u32,
}

#[tonic::async_trait]
impl Summarizer for SummarizerService {
    async fn summarize(
        &self,
        request: Request<SummarizeRequest>,
    ) -> Result<Response<SummarizeResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        let r = request.into_inner();
        if r.max_new_tokens > MAX_SUMMARY_TOKENS {
            return Err(Status::invalid_argument(format!(
                "max_new_tokens is limited to {MAX_SUMMARY_TOKENS}"
            )));
        }
        if r.entries.iter().all(|e| e.text.trim().is_empty()) {
            return Ok(Response::new(SummarizeResponse {
                summary: String::new(),
            }));
        }
        let tokens = if r.max_new_tokens == 0 {
            self.default_tokens
        } else {
            r.max_new_tokens
        };
        let generate = GenerateRequest {
            input: Some(Input::Instruction(instruction(&r.entries))),
            params: Some(GenerationParams {
                max_new_tokens: tokens,
                ..Default::default()
            }),
        };
        let response = self
            .generator
            .clone()
            .generate(deadline::request(generate, deadline)?)
            .await
            .map_err(|s| client::stage_status("generator (for the summarizer)", s))?;
        Ok(Response::new(SummarizeResponse {
            summary: response.into_inner().text.trim().to_string(),
        }))
    }
}

/// Serves the summarizer on `listener` until `shutdown`.
pub async fn serve(
    config: SummarizerConfig,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let (server, routes) = StageServer::new("ghostwriter.v1.Summarizer").await;
    let generator = GeneratorClient::new(client::channel(&config.generator_url)?);
    let service = SummarizerService {
        generator,
        default_tokens: config.max_new_tokens,
    };
    let routes =
        routes.add_service(SummarizerServer::new(service).max_decoding_message_size(64 << 20));
    server
        .serve_after(routes, listener, shutdown, async { Ok(()) })
        .await
}
