//! Reaching Postgres: the `--store` flags, the URL (its password never logged), TLS through
//! rustls (`sslmode=verify-full` against `--store-ca`), the password re-read from its file for
//! every new connection (so a rotated password takes effect without a restart), the pool, and
//! the direct connections `LISTEN` needs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::FutureExt as _;
use futures::future::BoxFuture;
use tokio_postgres::config::SslMode;

use crate::Error;

/// Where the store is and how to reach it (`--store` and its companions).
#[derive(Clone, clap::Args)]
#[command(next_help_heading = "Store")]
pub struct StoreArgs {
    /// Postgres URL of the system of record (`postgres://USER@HOST:PORT/DB` or `postgresql://`;
    /// `?sslmode=verify-full` for TLS). Unset: no store, the local index is the store. The
    /// password comes from `--store-password-file`, else `PGPASSWORD`, else the URL; it is
    /// never logged.
    #[arg(id = "store", long, env = "GHOSTWRITER_STORE", hide_env_values = true)]
    pub url: Option<String>,
    /// File holding the store's password, read again for every new connection (a rotated
    /// password takes effect without a restart).
    #[arg(id = "store-password-file", long, env = "GHOSTWRITER_STORE_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the Postgres server's certificate; turns on
    /// `sslmode=verify-full` (the chain and the host name are checked) unless the URL says
    /// otherwise.
    #[arg(id = "store-ca", long, env = "GHOSTWRITER_STORE_CA")]
    pub ca: Option<PathBuf>,
    /// Connections in the pool (ingests and reads; `LISTEN` uses one more, direct).
    #[arg(
        id = "store-pool-size",
        long,
        env = "GHOSTWRITER_STORE_POOL_SIZE",
        default_value_t = 8,
        value_parser = clap::value_parser!(u32).range(1..=1024)
    )]
    pub pool_size: u32,
    /// Longest a store statement may run, in milliseconds (a write past it fails whole).
    #[arg(
        id = "store-statement-timeout-ms",
        long,
        env = "GHOSTWRITER_STORE_STATEMENT_TIMEOUT_MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000)
    )]
    pub statement_timeout_ms: u64,
    /// How long the change log keeps a change, in hours; a replica further behind rebuilds
    /// from a snapshot.
    #[arg(
        id = "store-retention-hours",
        long,
        env = "GHOSTWRITER_STORE_RETENTION_HOURS",
        default_value_t = 168,
        value_parser = clap::value_parser!(u64).range(1..=87_600)
    )]
    pub retention_hours: u64,
    /// Polling interval of a replica in milliseconds, the fallback when a `LISTEN`
    /// notification is lost.
    #[arg(
        id = "store-poll-ms",
        long,
        env = "GHOSTWRITER_STORE_POLL_MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(10..=600_000)
    )]
    pub poll_ms: u64,
}

impl std::fmt::Debug for StoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreArgs")
            .field("url", &self.url.as_deref().map(redact))
            .field("password_file", &self.password_file)
            .field("ca", &self.ca)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("retention_hours", &self.retention_hours)
            .field("poll_ms", &self.poll_ms)
            .finish()
    }
}

impl Default for StoreArgs {
    fn default() -> Self {
        Self {
            url: None,
            password_file: None,
            ca: None,
            pool_size: 8,
            statement_timeout_ms: 10_000,
            retention_hours: 168,
            poll_ms: 1000,
        }
    }
}

impl StoreArgs {
    /// The same settings for the store at `url`.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            ..Self::default()
        }
    }

    /// The statement timeout.
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.statement_timeout_ms)
    }

    /// The change log's retention.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_hours * 3600)
    }

    /// The polling interval.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }

    /// The other flags that pass these settings on to a child process (`up --processes`); the
    /// URL goes by the environment instead ([`Self::url`] to `GHOSTWRITER_STORE`), so it never
    /// shows in a process list.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(p) = &self.password_file {
            args.extend(["--store-password-file".into(), p.display().to_string()]);
        }
        if let Some(p) = &self.ca {
            args.extend(["--store-ca".into(), p.display().to_string()]);
        }
        args.extend([
            format!("--store-pool-size={}", self.pool_size),
            format!("--store-statement-timeout-ms={}", self.statement_timeout_ms),
            format!("--store-retention-hours={}", self.retention_hours),
            format!("--store-poll-ms={}", self.poll_ms),
        ]);
        args
    }
}

/// `url` with its password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{user}@{host}")
        }
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<&str> = query
                .split('&')
                .filter(|kv| !kv.starts_with("password="))
                .collect();
            if query.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", query.join("&"))
            }
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// How the connection is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// Plain TCP (`sslmode=disable`, the default without `--store-ca`).
    Disable,
    /// TLS, the server's chain checked against the CA and its name against the host
    /// (`sslmode=verify-full`, the default with `--store-ca`).
    VerifyFull,
}

/// A parsed, validated store configuration.
pub(crate) struct Target {
    pub(crate) config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    password_file: Option<PathBuf>,
    /// For logs: the URL without its password.
    pub(crate) display: String,
}

impl Target {
    /// Parses and checks `args` (a bad URL or flag is an [`Error::Config`], said at start-up).
    pub(crate) fn new(args: &StoreArgs) -> Result<Self, Error> {
        let url = args
            .url
            .as_deref()
            .ok_or_else(|| Error::Config("no store URL (--store)".into()))?;
        let display = redact(url);
        let (scheme, _) = url
            .split_once("://")
            .ok_or_else(|| Error::Config(format!("{display}: not a postgres:// URL")))?;
        if scheme != "postgres" && scheme != "postgresql" {
            return Err(Error::Config(format!(
                "{display}: the scheme must be postgres:// or postgresql://"
            )));
        }
        // tokio-postgres knows disable/prefer/require only: take sslmode (and libpq's
        // sslrootcert) out of the query and decide here, so verify-full means what libpq means.
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut mode: Option<String> = None;
        let mut root_cert: Option<PathBuf> = None;
        let mut kept = Vec::new();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.to_string()),
                Some(("sslrootcert", v)) => root_cert = Some(PathBuf::from(v)),
                _ => kept.push(kv),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| Error::Config(format!("{display}: {e}")))?;
        let ca = args.ca.clone().or(root_cert);
        let tls = match (mode.as_deref(), &ca) {
            (None, None) | (Some("disable"), _) => Tls::Disable,
            (None, Some(_)) | (Some("verify-full"), _) => Tls::VerifyFull,
            (Some(other), _) => {
                return Err(Error::Config(format!(
                    "{display}: sslmode={other} is not supported: use verify-full (with --store-ca) or disable"
                )));
            }
        };
        let tls = match tls {
            Tls::Disable => {
                config.ssl_mode(SslMode::Disable);
                None
            }
            Tls::VerifyFull => {
                let ca = ca.ok_or_else(|| {
                    Error::Config(format!(
                        "{display}: sslmode=verify-full needs the server's CA (--store-ca)"
                    ))
                })?;
                config.ssl_mode(SslMode::Require);
                Some(rustls_connector(&ca)?)
            }
        };
        if config.get_dbname().is_none() {
            return Err(Error::Config(format!(
                "{display}: name the database (postgres://USER@HOST:PORT/DB)"
            )));
        }
        if let Ok(password) = std::env::var("PGPASSWORD") {
            config.password(password);
        }
        config.application_name("ghostwriter");
        // Every statement bounded; the snapshot's long read lifts it for its own transaction.
        config.options(format!(
            "-c statement_timeout={}",
            args.statement_timeout_ms
        ));
        config.connect_timeout(Duration::from_secs(5));
        Ok(Self {
            config,
            tls,
            password_file: args.password_file.clone(),
            display,
        })
    }

    /// The configuration for one new connection: the password file read now.
    fn config_now(&self) -> Result<tokio_postgres::Config, Error> {
        let mut config = self.config.clone();
        if let Some(file) = &self.password_file {
            let password = std::fs::read_to_string(file).map_err(|e| {
                Error::Config(format!("reading the password file {}: {e}", file.display()))
            })?;
            config.password(password.trim_end_matches(['\n', '\r']));
        }
        Ok(config)
    }

    /// Opens one direct connection (not pooled: `LISTEN`, snapshots, migrations), its driver
    /// task spawned; returns the client and the connection's asynchronous messages.
    pub(crate) async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
        ),
        Error,
    > {
        let config = self.config_now()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = match &self.tls {
            None => {
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(Error::from)?;
                tokio::spawn(drive(connection, tx));
                client
            }
            Some(tls) => {
                let (client, connection) =
                    config.connect(tls.clone()).await.map_err(Error::from)?;
                tokio::spawn(drive(connection, tx));
                client
            }
        };
        Ok((client, rx))
    }

    /// The pool of `size` connections.
    pub(crate) fn pool(self: &Arc<Self>, size: u32) -> Result<Pool, Error> {
        let manager = Manager::from_connect(
            self.config.clone(),
            Connector(self.clone()),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size as usize)
            .runtime(Runtime::Tokio1)
            // A dead store answers at once (UNAVAILABLE), not after every queued caller waited.
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| Error::Config(e.to_string()))
    }
}

/// Drives a connection, forwarding its notifications.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    tx: tokio::sync::mpsc::UnboundedSender<tokio_postgres::AsyncMessage>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = futures::StreamExt::next(&mut messages).await {
        match message {
            Ok(m) => {
                let _ = tx.send(m);
            }
            Err(e) => {
                tracing::debug!(error = %e, "store connection closed");
                break;
            }
        }
    }
}

/// The pool's way to open a connection: [`Target::connect`]'s, password re-read each time.
struct Connector(Arc<Target>);

impl deadpool_postgres::Connect for Connector {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        async move {
            let config = match self.0.config_now() {
                Ok(c) => c,
                // The pool's error type is tokio-postgres's: an unreadable password file
                // surfaces as a failed connection (the store is then unavailable).
                Err(e) => {
                    tracing::warn!(error = %e, "store password file");
                    self.0.config.clone()
                }
            };
            match &self.0.tls {
                None => {
                    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                    let task = tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    Ok((client, task))
                }
                Some(tls) => {
                    let (client, connection) = config.connect(tls.clone()).await?;
                    let task = tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    Ok((client, task))
                }
            }
        }
        .boxed()
    }
}

/// A rustls client trusting only the CA in `ca` (PEM): chain and host name are verified.
fn rustls_connector(
    ca: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| Error::Config(format!("reading the store CA {}: {e}", ca.display())))?;
    for cert in certs {
        let cert =
            cert.map_err(|e| Error::Config(format!("the store CA {}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("the store CA {}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!(
            "the store CA {} holds no certificate",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_shows() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/app?sslmode=verify-full"),
            "postgres://app@db:5432/app?sslmode=verify-full"
        );
        assert_eq!(
            redact("postgresql://app@db/app?password=s3cret"),
            "postgresql://app@db/app"
        );
        let args = StoreArgs::with_url("postgres://u:s3cret@h/d");
        assert!(!format!("{args:?}").contains("s3cret"));
    }

    #[test]
    fn urls_are_checked_at_start_up() {
        let bad = |url: &str| match Target::new(&StoreArgs::with_url(url)) {
            Err(Error::Config(m)) => m,
            Err(e) => panic!("{url}: {e}"),
            Ok(_) => panic!("{url} was accepted"),
        };
        assert!(bad("mysql://u@h/d").contains("scheme"));
        assert!(bad("postgres://u@h/d?sslmode=require").contains("verify-full"));
        assert!(bad("postgres://u@h/d?sslmode=verify-full").contains("--store-ca"));
        assert!(bad("postgres://u@h").contains("database"));
        assert!(!bad("postgres://u:s3cret@h?sslmode=prefer").contains("s3cret"));
        assert!(Target::new(&StoreArgs::with_url("postgresql://u@h:5433/d")).is_ok());
    }
}
