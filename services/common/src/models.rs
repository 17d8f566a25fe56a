//! Where the model store is and the names of the files servers load from it. Fetching the
//! models (`ghostwriter models pull`: pip packages, sha256 pins) is the CLI's business.
//!
//! Layout under the model directory:
//! - `smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf`: the file as shipped;
//! - `smollm2-135m-instruct/SmolLM2-135M-Instruct.Q8_0.gguf`: re-quantized at pull (Q4_1 has
//!   no SIMD kernel in candle, Q8_0 decodes ~3x faster with the same output quality);
//! - `qwen2.5-coder-1.5b-instruct/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf`: the GPU tier's
//!   generator, only with `models pull --gpu-tier`;
//! - `all-minilm-l6-v2/{model.safetensors,tokenizer.json,config.json}` (the embedder's
//!   directory, `ghostwriter_embed::EMBEDDER_DIR`).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Environment variable that overrides the model directory.
pub const MODEL_DIR_ENV: &str = "GHOSTWRITER_MODEL_DIR";

/// The default generator model (re-quantized at pull), relative to the model directory.
pub const GENERATOR_Q8_0: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q8_0.gguf";
/// The GPU-tier generator (Qwen2.5-Coder-1.5B-Instruct Q4_K_M, qwen2), fetched by `models pull
/// --gpu-tier`, relative to the model directory; served with `--model`.
pub const GPU_TIER_GENERATOR: &str =
    "qwen2.5-coder-1.5b-instruct/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf";
/// The shipped generator model, relative to the model directory.
pub const GENERATOR_SOURCE: &str = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model directory: `$GHOSTWRITER_MODEL_DIR`, else `~/.cache/ghostwriter/models`.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(MODEL_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("ghostwriter")
        .join("models")
}

/// sha256 of a file, hex (a model's identity: adapters name the base model they were trained
/// on by it). Errors name the file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(named)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(named)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// sha256 of bytes in memory, hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_of_a_file_and_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            super::sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let err = super::sha256_file(&dir.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
