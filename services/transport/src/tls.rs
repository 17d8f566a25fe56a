//! Mutual TLS between every process (rustls).
//!
//! With `--tls-cert`, `--tls-key` and `--tls-ca`, every server accepts only TLS, and every
//! stage server only callers that present a certificate chaining to the CA (the mesh identity):
//! internal APIs such as `Retrieve` are unreachable without one. The public API (the
//! orchestrator) asks for a client certificate but also accepts callers without one, who
//! authenticate with bearer tokens. Every client (stage to stage, the CLI) speaks TLS, presents
//! its certificate and checks the server's against the CA under one name, `--tls-server-name`
//! (default `ghostwriter`), whatever address it dialed: pods are reached by IP under DNS or etcd
//! discovery, so the mesh identity is a name every certificate carries, not an address.
//!
//! The files are read again when they change (checked every two seconds): new connections use
//! the new certificates, established ones keep theirs. A change that does not load (a key that
//! does not match, a half-written file) is logged and the previous certificates stay.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use ghostwriter_common::watch::{RELOAD_EVERY, Reload, watch_files};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The name every certificate of the mesh carries by default.
pub const DEFAULT_SERVER_NAME: &str = "ghostwriter";
/// How long a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// TLS settings, shared by every command (servers and clients).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "TLS")]
pub struct TlsArgs {
    /// PEM certificate (chain) this process presents, as a server and as a client of other
    /// stages. With --tls-key and --tls-ca: mutual TLS between every process.
    #[arg(long = "tls-cert", env = "GHOSTWRITER_TLS_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key", env = "GHOSTWRITER_TLS_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// PEM CA certificates that peers' certificates must chain to. Alone (no --tls-cert), a
    /// client speaks TLS to a server without presenting a certificate (the public API).
    #[arg(long = "tls-ca", env = "GHOSTWRITER_TLS_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// The name servers' certificates are checked against, whatever address is dialed.
    #[arg(
        long = "tls-server-name",
        env = "GHOSTWRITER_TLS_SERVER_NAME",
        default_value = DEFAULT_SERVER_NAME,
        global = true
    )]
    pub server_name: String,
}

impl TlsArgs {
    /// Whether any TLS file is set.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some() || self.ca.is_some()
    }

    /// The flags for a child process with the same settings.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, path) in [
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
            ("--tls-ca", &self.ca),
        ] {
            if let Some(p) = path {
                args.push(format!("{flag}={}", p.display()));
            }
        }
        if self.enabled() {
            args.push(format!("--tls-server-name={}", self.server_name));
        }
        args
    }
}

/// The configurations built from the files at one moment.
struct Configs {
    /// For stage servers: a client certificate is required.
    mesh: Option<Arc<ServerConfig>>,
    /// For the public API: a client certificate is checked if presented.
    public: Option<Arc<ServerConfig>>,
    client: Arc<ClientConfig>,
}

/// Mutual TLS of a process, as a value: its servers accept with it and its clients connect with
/// it. Cloning shares the configuration (and its reloads); two values from two sets of files
/// can live in one process (tests).
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    name: ServerName<'static>,
    server_name: String,
    configs: RwLock<Arc<Configs>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.inner.server_name)
            .finish_non_exhaustive()
    }
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", path.display());
    Ok(certs)
}

fn load(args: &TlsArgs) -> anyhow::Result<Configs> {
    let ca = args
        .ca
        .as_ref()
        .context("TLS needs --tls-ca (the CA peers' certificates chain to)")?;
    let mut roots = RootCertStore::empty();
    for cert in certs(ca)? {
        roots.add(cert).context("adding a CA certificate")?;
    }
    let roots = Arc::new(roots);
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some((
            certs(cert)?,
            PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading the key {}", key.display()))?,
        )),
        (None, None) => None,
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    };
    let alpn = || vec![b"h2".to_vec()];
    let mut client = match &identity {
        Some((chain, key)) => ClientConfig::builder()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .context("the certificate and key do not match")?,
        None => ClientConfig::builder()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
    };
    client.alpn_protocols = alpn();
    let server = |required: bool| -> anyhow::Result<Option<Arc<ServerConfig>>> {
        let Some((chain, key)) = &identity else {
            return Ok(None);
        };
        let verifier = WebPkiClientVerifier::builder(roots.clone());
        let verifier = if required {
            verifier.build()
        } else {
            verifier.allow_unauthenticated().build()
        }
        .context("building the client certificate verifier")?;
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("the certificate and key do not match")?;
        config.alpn_protocols = alpn();
        Ok(Some(Arc::new(config)))
    };
    Ok(Configs {
        mesh: server(true)?,
        public: server(false)?,
        client: Arc::new(client),
    })
}

impl Tls {
    /// The TLS that `args` describes, or None when it names no file. Loads the files (an error
    /// is the caller's to report) and, inside a tokio runtime, watches them for changes for as
    /// long as a clone of the value lives.
    pub fn from_args(args: &TlsArgs) -> anyhow::Result<Option<Self>> {
        if !args.enabled() {
            return Ok(None);
        }
        let name = ServerName::try_from(args.server_name.clone())
            .with_context(|| format!("bad --tls-server-name {:?}", args.server_name))?;
        let tls = Self {
            inner: Arc::new(Inner {
                name,
                server_name: args.server_name.clone(),
                configs: RwLock::new(Arc::new(load(args)?)),
            }),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            let files = [&args.cert, &args.key, &args.ca]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let (args, weak) = (args.clone(), Arc::downgrade(&tls.inner));
            watch_files("TLS certificates", files, RELOAD_EVERY, move || {
                let Some(inner) = weak.upgrade() else {
                    return Reload::Stop;
                };
                match load(&args) {
                    Ok(configs) => {
                        *inner.configs.write().unwrap_or_else(|e| e.into_inner()) =
                            Arc::new(configs);
                        Reload::Loaded
                    }
                    Err(e) => Reload::Failed(e),
                }
            });
        }
        tracing::info!(server_name = %args.server_name, "mutual TLS on");
        Ok(Some(tls))
    }

    fn configs(&self) -> Arc<Configs> {
        self.inner
            .configs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether this TLS has an identity of its own to serve with (--tls-cert and --tls-key).
    pub fn can_serve(&self) -> bool {
        self.configs().mesh.is_some()
    }

    /// A connector for channels over this TLS.
    pub fn connector(&self) -> Connector {
        Connector { tls: self.clone() }
    }

    /// The TLS connections accepted on `listener`: handshakes run concurrently (a slow client
    /// holds up no one) and are bounded in time; failed ones are dropped. `public` accepts
    /// callers without a client certificate (the public API); other servers require one.
    pub fn incoming(
        &self,
        listener: TcpListener,
        public: bool,
    ) -> anyhow::Result<
        tokio_stream::wrappers::ReceiverStream<
            io::Result<tokio_rustls::server::TlsStream<TcpStream>>,
        >,
    > {
        anyhow::ensure!(
            self.can_serve(),
            "serving with TLS needs --tls-cert and --tls-key"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = tx.closed() => return, // the server stopped: release the port
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let configs = tls.configs();
                let config = if public {
                    &configs.public
                } else {
                    &configs.mesh
                };
                let Some(config) = config.clone() else { return };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    match tokio::time::timeout(HANDSHAKE, TlsAcceptor::from(config).accept(tcp))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// Connects channels over a [`Tls`] with its current client configuration.
#[derive(Clone)]
pub struct Connector {
    tls: Tls,
}

type Connected = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = Connected;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Connected>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let configs = tls.configs();
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = TlsConnector::from(configs.client.clone())
                .connect(tls.inner.name.clone(), tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
