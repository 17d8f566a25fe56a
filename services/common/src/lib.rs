//! Shared tonic-level plumbing of every Ghostwriter process: server assembly (health,
//! reflection, graceful shutdown), client channels with stage-named errors, deadlines, mutual
//! TLS, caller authentication, ingest checks and budget, status details, logging and tracing,
//! RPC metrics, text helpers, and where the model store is ([`models`]: its directory and file
//! names, a file's sha256).
//!
//! It carries no model runtime: embeddings and compute devices (candle, tokenizers) are in
//! `ghostwriter-embed`, discovery and balancing in `ghostwriter-discovery`, and fetching the
//! models in the `ghostwriter` CLI, so a stage without a model (the retriever) builds without
//! them.

pub mod auth;
pub mod client;
pub mod deadline;
pub mod ingest;
pub mod layers;
pub mod metrics;
pub mod models;
pub mod server;
pub mod shutdown;
pub mod stage;
pub mod status;
pub mod telemetry;
pub mod text;
pub mod tls;

/// Most beams a beam search may ask for.
pub const MAX_BEAMS: u32 = 16;

/// Most characters one document (title and text together) may have.
pub const MAX_DOCUMENT_CHARS: usize = 100_000;

/// Checks the ranges of caller-set sampling and beam-search settings (the orchestrator before
/// any stage runs, the generator for its direct callers); each also checks its own token limit.
pub fn check_sampling(g: &ghostwriter_proto::v1::GenerationParams) -> Result<(), tonic::Status> {
    let message = "temperature must be in [0, 10] and top_p in [0, 1]";
    if !(0.0..=10.0).contains(&g.temperature) {
        return Err(status::bad_field("generation.temperature", message));
    }
    if !(0.0..=1.0).contains(&g.top_p) {
        return Err(status::bad_field("generation.top_p", message));
    }
    if g.num_beams > MAX_BEAMS {
        return Err(status::bad_field(
            "generation.num_beams",
            format!("num_beams must be at most {MAX_BEAMS}"),
        ));
    }
    if g.num_beams > 1 && g.temperature > 0.0 {
        return Err(status::bad_field(
            "generation.num_beams",
            "beam search is deterministic: set temperature 0 or num_beams 1",
        ));
    }
    if g.length_penalty.is_some_and(|l| !(0.0..=5.0).contains(&l)) {
        return Err(status::bad_field(
            "generation.length_penalty",
            "length_penalty must be in [0, 5]",
        ));
    }
    Ok(())
}
