//! Synthesizer stage: the important words of a user's past writing (`SynCtxInd`).

pub mod synth;
pub mod text;

use ghostwriter_common::server::StageServer;
use ghostwriter_common::shutdown::Shutdown;
use ghostwriter_proto::v1::synthesizer_server::{Synthesizer, SynthesizerServer};
use ghostwriter_proto::v1::{ImportantWord, SynthesizeRequest, SynthesizeResponse};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Most words a request may ask for.
const MAX_WORDS_LIMIT: u32 = 1_000;

/// The gRPC adapter over [`synth::important_words`].
#[derive(Clone, Default)]
pub struct SynthesizerService;

#[tonic::async_trait]
impl Synthesizer for SynthesizerService {
    async fn synthesize(
        &self,
        request: Request<SynthesizeRequest>,
    ) -> Result<Response<SynthesizeResponse>, Status> {
        let r = request.into_inner();
        if r.max_words > MAX_WORDS_LIMIT {
            return Err(Status::invalid_argument(format!(
                "max_words is limited to {MAX_WORDS_LIMIT}"
            )));
        }
        let max = if r.max_words == 0 {
            synth::DEFAULT_MAX_WORDS
        } else {
            r.max_words as usize
        };
        let words = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = r.documents.iter().map(String::as_str).collect();
            synth::important_words(&refs, max)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(SynthesizeResponse {
            words: words
                .into_iter()
                .map(|w| ImportantWord {
                    word: w.word,
                    frequency: w.frequency,
                    idf: w.idf,
                })
                .collect(),
        }))
    }
}

/// Serves the synthesizer on `listener` until `shutdown` (nothing to load: SERVING at once).
pub async fn serve(listener: TcpListener, shutdown: Shutdown) -> anyhow::Result<()> {
    let (server, routes) = StageServer::new("ghostwriter.v1.Synthesizer").await;
    let routes = routes.add_service(
        SynthesizerServer::new(SynthesizerService).max_decoding_message_size(256 << 20),
    );
    server
        .serve_after(routes, listener, shutdown, async { Ok(()) })
        .await
}
