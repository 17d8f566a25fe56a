//! Local multi-process topologies: every stage its own `ghostwriter serve` process on loopback,
//! wired by static URLs ([`Processes::start`], used by `bench`) or through a local etcd
//! ([`Processes::start_with_etcd`], used by `up --processes`), so the distributed mode can be
//! seen on one machine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use ghostwriter_common::stage::StageKind;
use ghostwriter_transport::Tls;

use crate::stage_process::{BIND_TIMEOUT, StageProcess};

/// Stage processes of a local multi-process topology; killed on drop.
pub struct Processes {
    /// Every stage process, by name, in start order.
    stages: Vec<(String, StageProcess)>,
    /// The local etcd, if the topology has one.
    etcd: Option<Child>,
    /// URL of each process: by stage name, `NAME-2`, `NAME-3`... for further replicas.
    pub urls: BTreeMap<String, String>,
    /// Where each process serves its metrics, when asked (named as in `urls`).
    pub metrics: BTreeMap<String, SocketAddr>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        // The stage processes are killed as they are dropped; etcd is a plain child.
        if let Some(etcd) = &mut self.etcd {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
    }
}

/// A port free on 127.0.0.1 now, for etcd (see [`ghostwriter_common::net::free_port`]).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(ghostwriter_common::net::free_port()?)
}

impl Processes {
    fn empty() -> Self {
        Self {
            stages: Vec::new(),
            etcd: None,
            urls: BTreeMap::new(),
            metrics: BTreeMap::new(),
        }
    }

    /// Starts `cmd` as the process `name` and records its URL.
    async fn spawn(&mut self, name: String, cmd: Command) -> anyhow::Result<()> {
        let process = StageProcess::spawn(name.clone(), cmd).await?;
        self.urls.insert(name.clone(), process.url().to_string());
        self.stages.push((name, process));
        Ok(())
    }

    /// Waits until every stage process reports SERVING (called over `tls` when given); one
    /// that exits first fails this at once, with its log.
    async fn wait_serving(&mut self, tls: Option<&Tls>, limit: Duration) -> anyhow::Result<()> {
        for (_, process) in &mut self.stages {
            process.wait_serving(tls, limit).await?;
        }
        Ok(())
    }

    /// Starts every stage and the orchestrator as its own `ghostwriter serve` process on
    /// loopback ports, wired by static URLs, and waits until each reports SERVING.
    pub async fn start(exe: &Path, model_dir: &Path, index_dir: &Path) -> anyhow::Result<Self> {
        let mut me = Self::empty();
        // In StageKind::ALL order, so a stage's dependencies report their URLs first.
        for stage in StageKind::ALL.map(StageKind::name) {
            let url = |s: &str| me.urls[s].clone();
            let args: Vec<String> = match stage {
                "retriever" => vec!["--index-dir".into(), index_dir.display().to_string()],
                "summarizer" => vec!["--generator-url".into(), url("generator")],
                "orchestrator" => [
                    "retriever",
                    "ranker",
                    "summarizer",
                    "synthesizer",
                    "generator",
                ]
                .into_iter()
                .flat_map(|s| [format!("--{s}-url"), url(s)])
                .collect(),
                _ => Vec::new(),
            };
            let mut cmd = Command::new(exe);
            own_group(&mut cmd)
                .args(["serve", "--listen", "127.0.0.1:0"])
                .arg("--model-dir")
                .arg(model_dir)
                .arg(stage)
                .args(&args)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null());
            me.spawn(stage.to_string(), cmd).await?;
        }
        me.wait_serving(None, BIND_TIMEOUT).await?;
        Ok(me)
    }

    /// Resident memory of each process, in MB (Linux `/proc`).
    pub fn rss_mb(&self) -> BTreeMap<String, f64> {
        self.stages
            .iter()
            .filter_map(|(name, process)| {
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", process.pid())).ok()?;
                let kb: f64 = status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some((name.clone(), kb / 1024.0))
            })
            .collect()
    }
}

/// Starts a single-member etcd (Debian's `etcd-server`) on free loopback ports with its data in
/// `data_dir`; returns the process, its client URL and client port. With `tls`, clients must
/// speak TLS and present a certificate of its CA (etcd gets the processes' certificate, whose
/// names include the mesh name), and the URL is `https://`.
pub fn spawn_etcd(
    data_dir: &Path,
    tls: Option<&ghostwriter_transport::tls::TlsArgs>,
) -> anyhow::Result<(Child, String, u16)> {
    spawn_etcd_on(data_dir, tls, free_port()?, free_port()?)
}

/// [`spawn_etcd`] on the given loopback client and peer ports (for a client that was told the
/// URL before etcd started).
pub fn spawn_etcd_on(
    data_dir: &Path,
    tls: Option<&ghostwriter_transport::tls::TlsArgs>,
    client: u16,
    peer: u16,
) -> anyhow::Result<(Child, String, u16)> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = Command::new("etcd");
    own_group(&mut cmd)
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("default={peer_url}")]);
    if let Some(tls) = tls {
        let (Some(cert), Some(key), Some(ca)) = (&tls.cert, &tls.key, &tls.ca) else {
            anyhow::bail!("etcd over TLS needs a certificate, its key and a CA");
        };
        cmd.arg("--cert-file")
            .arg(cert)
            .arg("--key-file")
            .arg(key)
            .arg("--trusted-ca-file")
            .arg(ca)
            .arg("--client-cert-auth");
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting etcd (install Debian's etcd-server)")?;
    Ok((child, url, client))
}

/// A certificate authority and one certificate it signed for every process of a topology
/// (mesh name `ghostwriter`, plus `localhost` and 127.0.0.1; server and client auth), as PEM.
pub struct Authority {
    /// The CA's certificate.
    pub ca: String,
    /// The processes' certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
}

impl Authority {
    /// A new CA named `name` and a certificate it signed.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, name);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, &ca_key);
        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(vec![
            ghostwriter_transport::tls::DEFAULT_SERVER_NAME.to_string(),
            "localhost".into(),
            "127.0.0.1".into(),
        ])?;
        leaf.distinguished_name
            .push(DnType::CommonName, "ghostwriter process");
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = leaf.signed_by(&key, &issuer)?;
        Ok(Self {
            ca: ca_cert.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// Writes a throwaway [`Authority`] under `dir`, a directory only this user can open (0700),
/// the private key readable by this user alone (0600): whoever reads the key is one of the
/// mesh, and reaches every stage API. Returns the flags that use it.
pub fn throwaway_ca(dir: &Path) -> anyhow::Result<ghostwriter_transport::tls::TlsArgs> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    let authority = Authority::new("ghostwriter throwaway CA")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // An existing directory keeps its mode through create: make it private either way.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&ca, authority.ca)?;
    std::fs::write(&cert, authority.cert)?;
    // Created 0600, never readable by others even for a moment.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .and_then(|mut f| f.write_all(authority.key.as_bytes()))
        .with_context(|| format!("writing {}", key.display()))?;
    Ok(ghostwriter_transport::tls::TlsArgs {
        cert: Some(cert),
        key: Some(key),
        ca: Some(ca),
        server_name: ghostwriter_transport::tls::DEFAULT_SERVER_NAME.into(),
    })
}

/// What the processes of `up --processes` share besides their stages' own flags.
pub struct Mesh<'a> {
    /// Mutual TLS between the processes, etcd included.
    pub tls: &'a ghostwriter_transport::tls::TlsArgs,
    /// The public API's authentication (the orchestrator's).
    pub auth: &'a ghostwriter_orchestrator::auth::AuthArgs,
    /// How every process writes its log lines.
    pub log_format: ghostwriter_common::telemetry::LogFormat,
    /// The retrievers' store, when Postgres is the system of record (its URL reaches them
    /// through the environment, never a command line).
    pub store: &'a ghostwriter_store::StoreArgs,
    /// Processes per stage (absent: 1).
    pub replicas: &'a BTreeMap<String, u32>,
    /// Flags for each stage's `serve STAGE` (from `up`'s command line).
    pub flags: &'a BTreeMap<&'static str, Vec<std::ffi::OsString>>,
    /// Metrics endpoints: the processes get consecutive ports from this one, in start order
    /// (port 0: each its own, chosen by the OS); None = none.
    pub metrics: Option<SocketAddr>,
    /// How long each process may take to report SERVING.
    pub ready_timeout: Duration,
}

/// Parses `--replicas`: `STAGE=N[,STAGE=N]` (stages: retriever, ranker, summarizer,
/// synthesizer, generator; N from 1 to 16).
pub fn parse_replicas(text: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut out = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (stage, n) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: expected STAGE=N"))?;
        let stage = stage.trim();
        if !StageKind::STAGES.iter().any(|k| k.name() == stage) {
            return Err(format!(
                "{stage:?} is not a stage with replicas (retriever, ranker, summarizer, synthesizer, generator)"
            ));
        }
        let n: u32 = n
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=16).contains(n))
            .ok_or_else(|| format!("{part:?}: N must be a number from 1 to 16"))?;
        if out.insert(stage.to_string(), n).is_some() {
            return Err(format!("{stage} is named twice"));
        }
    }
    Ok(out)
}

impl Processes {
    /// Starts etcd (Debian's `etcd-server`) on loopback with its data in `work`, then every
    /// stage as its own process registered in it, and the orchestrator on `public`, which finds
    /// the stages through etcd. The processes speak mutual TLS with `mesh.tls`.
    pub async fn start_with_etcd(
        exe: &Path,
        model_dir: &Path,
        work: &Path,
        index_dir: &Path,
        public: SocketAddr,
        mesh: Mesh<'_>,
    ) -> anyhow::Result<Self> {
        let Mesh {
            tls,
            auth,
            log_format,
            store,
            replicas,
            flags,
            metrics,
            ready_timeout,
        } = mesh;
        let count = |stage: &str| replicas.get(stage).copied().unwrap_or(1);
        if count("retriever") > 1 && store.url.is_none() {
            anyhow::bail!(
                "--replicas retriever=N needs --store: without a store each retriever's index is \
                 its own store, and replicas would diverge (one that misses an ingest never gets it)"
            );
        }
        let (etcd, etcd_url, client) = spawn_etcd(&work.join("etcd"), Some(tls))?;
        let mut me = Self::empty();
        me.etcd = Some(etcd);
        // Stages register as soon as they are ready: have etcd listening first.
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", client))
            .await
            .is_err()
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "etcd did not start on port {client}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        me.urls.insert("etcd".into(), etcd_url.clone());
        // In StageKind::ALL order: the summarizer dials the generator directly, which has
        // reported its address by then.
        for stage in StageKind::ALL.map(StageKind::name) {
            for replica in 1..=count(stage) {
                let name = if replica == 1 {
                    stage.to_string()
                } else {
                    format!("{stage}-{replica}")
                };
                let listen = match stage {
                    "orchestrator" => public.to_string(),
                    _ => "127.0.0.1:0".to_string(),
                };
                let mut cmd = Command::new(exe);
                own_group(&mut cmd);
                cmd.args(tls.to_args())
                    .args(["--log-format", log_format.as_arg()])
                    .args(["serve", "--listen", &listen, "--etcd", &etcd_url])
                    .arg("--model-dir")
                    .arg(model_dir)
                    .arg(stage);
                if stage == "retriever" {
                    // Each replica its own index (a derived copy of the store).
                    let dir = if count(stage) > 1 {
                        index_dir.join(format!("replica-{replica}"))
                    } else {
                        index_dir.to_path_buf()
                    };
                    cmd.arg("--index-dir").arg(dir);
                    if let Some(url) = &store.url {
                        cmd.env("GHOSTWRITER_STORE", url).args(store.to_args());
                    }
                }
                if stage == "summarizer" {
                    // Every generator replica, balanced.
                    let generators: Vec<&str> = me
                        .urls
                        .iter()
                        .filter(|(k, _)| *k == "generator" || k.starts_with("generator-"))
                        .map(|(_, v)| v.as_str())
                        .collect();
                    cmd.arg("--generator-url").arg(generators.join(","));
                }
                if stage == "orchestrator" {
                    for (flag, path) in [
                        ("--auth-tokens", &auth.tokens),
                        ("--auth-jwt-secret-file", &auth.jwt_secret_file),
                        ("--auth-jwt-keys", &auth.jwt_keys),
                    ] {
                        if let Some(p) = path {
                            cmd.arg(flag).arg(p);
                        }
                    }
                    if let Some(issuer) = &auth.jwt_issuer {
                        cmd.arg("--auth-jwt-issuer").arg(issuer);
                    }
                    cmd.arg("--auth-jwt-audience").arg(&auth.jwt_audience);
                }
                if let Some(base) = metrics {
                    let port = match base.port() {
                        0 => 0,
                        p => p
                            .checked_add(me.metrics.len() as u16)
                            .context("--metrics-listen: no port left for every process")?,
                    };
                    let addr = SocketAddr::new(base.ip(), port);
                    cmd.arg("--metrics-listen").arg(addr.to_string());
                    me.metrics.insert(name.clone(), addr);
                }
                if let Some(extra) = flags.get(stage) {
                    cmd.args(extra);
                }
                cmd.env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null());
                me.spawn(name, cmd).await?;
            }
        }
        // This process checks their health as one of the mesh.
        let client_tls = Tls::from_args(tls)?;
        me.wait_serving(client_tls.as_ref(), ready_timeout).await?;
        Ok(me)
    }

    /// Stops the topology in order, each step waiting for the last: the orchestrator first (it
    /// stops admitting and drains the writes in flight through the stages), then the stages
    /// (they deregister from etcd), then etcd. Each gets SIGTERM.
    pub async fn terminate(mut self) {
        let orchestrator = |name: &str| name == "orchestrator";
        for first in [true, false] {
            let step = |name: &str| orchestrator(name) == first;
            for (name, process) in self.stages.iter().filter(|(n, _)| step(n)) {
                tracing::debug!(process = %name, "stopping");
                let _ = process.signal("TERM");
            }
            for (_, process) in self.stages.iter_mut().filter(|(n, _)| step(n)) {
                // The drain is bounded by the process's own --drain-timeout-secs.
                let _ = process.wait_exit(Duration::from_secs(120)).await;
            }
        }
        self.stages.clear();
        if let Some(mut etcd) = self.etcd.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(etcd.id().to_string())
                .status();
            let _ = etcd.wait();
        }
    }
}

/// Puts a child in its own process group, so a terminal's ctrl-c reaches only the parent, which
/// then stops the children in order ([`Processes::terminate`]).
fn own_group(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
}
