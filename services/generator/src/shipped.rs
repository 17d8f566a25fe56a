//! The shipped LoRA adapter (`adapters/smollm2-135m-reviews.safetensors`; its README says how it
//! was trained and what it scores): what `up`, `serve generator` and `demo` serve by default when
//! the model loaded is the one it was trained on, the paper's best configuration. Another model
//! runs alone; `--zero-shot` turns the default off.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The adapter's file name.
pub const FILE_NAME: &str = "smollm2-135m-reviews.safetensors";

/// The adapter's bytes, built into the binary (9.8 MB) so that it is found from any directory.
pub const BYTES: &[u8] = include_bytes!("../../../adapters/smollm2-135m-reviews.safetensors");

/// sha256 of the base model the adapter was trained on (its `base_sha256` metadata).
pub fn base_sha256() -> anyhow::Result<String> {
    let (_, header) = safetensors::SafeTensors::read_metadata(BYTES)
        .context("the shipped adapter is not a safetensors file")?;
    header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("base_sha256"))
        .cloned()
        .context("the shipped adapter names no base model")
}

/// The shipped adapter as a file when `model` (whose sha256 is `model_sha256`) is its base
/// (None for another model): written once under the system's temporary directory (atomically,
/// so processes starting together do not see half a file) and reused while its bytes are the
/// shipped ones.
pub fn for_model(model: &Path, model_sha256: &str) -> anyhow::Result<Option<PathBuf>> {
    if model_sha256 != base_sha256()? {
        tracing::info!(model = %model.display(), "the shipped adapter was trained on another model: serving the model alone");
        return Ok(None);
    }
    let dir = std::env::temp_dir().join("ghostwriter-shipped-adapter");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(FILE_NAME);
    if std::fs::read(&path).is_ok_and(|b| b == BYTES) {
        return Ok(Some(path));
    }
    let mut file = tempfile::NamedTempFile::new_in(&dir)?;
    std::io::Write::write_all(&mut file, BYTES)?;
    file.persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shipped_adapter_names_its_base() {
        let base = super::base_sha256().unwrap();
        assert_eq!(base.len(), 64, "{base}");
    }
}
