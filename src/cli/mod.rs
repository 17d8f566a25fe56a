//! The verbs of the `ghostwriter` command, one module each; `main.rs` parses the command line
//! and dispatches.

pub mod api;
pub mod bench;
pub mod serve;
pub mod up;

use std::path::Path;

/// Makes sure the model files are present (pulled and verified if not), off the async threads.
pub async fn ensure_models(dir: &Path) -> anyhow::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || ghostwriter::models::ensure(&dir)).await??;
    Ok(())
}

/// Prints a JSON report, and writes it to `out` when given.
pub fn report(value: &impl serde::Serialize, out: Option<&Path>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    if let Some(out) = out {
        std::fs::write(out, &text)?;
    }
    println!("{text}");
    Ok(())
}
