//! What every Ghostwriter crate shares: shutdown, deadlines, the errors every stage shares and
//! their `google.rpc` details ([`status`]), request checks (ingest batches, sampling settings),
//! text helpers, files re-read when they change ([`watch`]), logging and tracing, repeated
//! warnings rate-limited ([`throttle`]), and where the
//! model store is ([`models`]: its directory and file names, a file's sha256).
//!
//! It carries no transport (TLS, channels, servers: `ghostwriter-transport`), no model runtime
//! (embeddings and compute devices: `ghostwriter-embed`) and no authentication (the
//! orchestrator's), so a stage without a model (the retriever) builds without them.

pub mod consistency;
pub mod deadline;
pub mod ingest;
pub mod models;
pub mod net;
pub mod rng;
pub mod shutdown;
pub mod stage;
pub mod status;
pub mod telemetry;
pub mod text;
pub mod throttle;
pub mod watch;

use status::Invalid;

/// Largest gRPC message any process sends or accepts (ingest batches, ranked candidates).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// The adapter name that asks a generator for its base model alone (`WriteRequest.adapter`,
/// `GenerateRequest.adapter`).
pub const BASE_ADAPTER: &str = "base";

/// Most beams a beam search may ask for.
pub const MAX_BEAMS: u32 = 16;

/// Most characters one document (title and text together) may have.
pub const MAX_DOCUMENT_CHARS: usize = 100_000;

/// Checks the ranges of caller-set sampling and beam-search settings (the orchestrator before
/// any stage runs, the generator for its direct callers); each also checks its own token limit.
pub fn check_sampling(g: &ghostwriter_proto::v1::GenerationParams) -> Result<(), Invalid> {
    let message = "temperature must be in [0, 10] and top_p in [0, 1]";
    if !(0.0..=10.0).contains(&g.temperature) {
        return Err(Invalid::new("generation.temperature", message));
    }
    if !(0.0..=1.0).contains(&g.top_p) {
        return Err(Invalid::new("generation.top_p", message));
    }
    if g.num_beams > MAX_BEAMS {
        return Err(Invalid::new(
            "generation.num_beams",
            format!("num_beams must be at most {MAX_BEAMS}"),
        ));
    }
    if g.num_beams > 1 && g.temperature > 0.0 {
        return Err(Invalid::new(
            "generation.num_beams",
            "beam search is deterministic: set temperature 0 or num_beams 1",
        ));
    }
    if g.length_penalty.is_some_and(|l| !(0.0..=5.0).contains(&l)) {
        return Err(Invalid::new(
            "generation.length_penalty",
            "length_penalty must be in [0, 5]",
        ));
    }
    Ok(())
}
