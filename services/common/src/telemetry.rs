//! Structured logging for every process.

use tracing_subscriber::{EnvFilter, fmt};

/// Initializes logging once per process; `RUST_LOG` overrides the default level (`info`).
/// Safe to call more than once (later calls do nothing), which tests rely on.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}
