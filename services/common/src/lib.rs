//! Shared plumbing of every Ghostwriter process: server assembly (health, reflection, graceful
//! shutdown), client channels with stage-named errors, deadlines, logging and the model store.

pub mod client;
pub mod deadline;
pub mod device;
pub mod discovery;
pub mod embed;
pub mod metrics;
pub mod models;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod text;

/// Most characters one document (title and text together) may have.
pub const MAX_DOCUMENT_CHARS: usize = 100_000;
