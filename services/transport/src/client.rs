//! Client channels to other stages, and errors that name the stage that failed.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::tls::Tls;

/// `address` as a URL: `host:port` (grpcurl's habit) gets `http://`, or `https://` when the
/// caller speaks TLS; a URL is kept as it is.
pub fn url(address: &str, tls: bool) -> String {
    let address = address.trim();
    if address.contains("://") {
        address.to_string()
    } else if tls {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    }
}

/// A URL that names no endpoint.
#[derive(Debug, thiserror::Error)]
#[error("bad endpoint URL {url:?}: {reason}")]
pub struct BadUrl {
    /// The URL.
    pub url: String,
    /// What is wrong with it.
    pub reason: String,
}

/// HTTP/2 keepalive: every `interval` a PING goes to the peer of a connection with calls in
/// flight (clients) or of any connection (servers); no answer within `timeout` closes the
/// connection, failing its calls, so a peer that hangs without closing (a lost node, a network
/// partition, a stopped process) is found in at most `interval + timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// How often to ping.
    pub interval: Duration,
    /// How long to wait for the answer.
    pub timeout: Duration,
}

/// The keepalive of a process that sets none: ping every 10 s, give up after 5 s more.
pub const DEFAULT_KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_secs(10),
    timeout: Duration::from_secs(5),
};

impl Default for Keepalive {
    fn default() -> Self {
        DEFAULT_KEEPALIVE
    }
}

/// How a process dials other stages: over its TLS (when on), with its keepalive.
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    /// Mutual TLS for `https://` URLs.
    pub tls: Option<Tls>,
    /// HTTP/2 keepalive of every channel.
    pub keepalive: Keepalive,
}

impl From<Option<&Tls>> for Dialer {
    fn from(tls: Option<&Tls>) -> Self {
        Self {
            tls: tls.cloned(),
            keepalive: Keepalive::default(),
        }
    }
}

impl Dialer {
    /// A lazy channel to `url` (see [`channel`]).
    pub fn channel(&self, url: &str) -> Result<Channel, BadUrl> {
        channel_with(url, self)
    }
}

/// The Unix socket path of a `unix:PATH` or `unix:///PATH` URL; None for other schemes.
pub fn unix_path(url: &str) -> Option<&str> {
    let rest = url.trim().strip_prefix("unix:")?;
    Some(rest.strip_prefix("//").unwrap_or(rest))
}

/// The `unix:` URL of a socket at `path`.
pub fn unix_url(path: &std::path::Path) -> String {
    format!("unix:{}", path.display())
}

/// The endpoint of `url`, with the settings every channel shares: a stage that is down fails a
/// call quickly (connect timeout) instead of hanging; keepalive pings find a dead connection.
/// A `unix:` URL gets a placeholder authority (its socket is dialed by [`channel`]).
pub fn endpoint(url: &str) -> Result<Endpoint, BadUrl> {
    endpoint_with(url, DEFAULT_KEEPALIVE)
}

fn endpoint_with(url: &str, keepalive: Keepalive) -> Result<Endpoint, BadUrl> {
    let target = if unix_path(url).is_some() {
        "http://localhost"
    } else {
        url
    };
    Ok(Endpoint::from_shared(target.to_string())
        .map_err(|e| BadUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(keepalive.interval)
        .keep_alive_timeout(keepalive.timeout))
}

/// Opens a lazy channel to a stage: no connection is made until the first call. Over mutual
/// TLS when `tls` is given; `unix:PATH` dials a Unix socket (never TLS: the socket's directory
/// is what keeps others out).
pub fn channel(url: &str, tls: Option<&Tls>) -> Result<Channel, BadUrl> {
    channel_with(url, &Dialer::from(tls))
}

/// [`channel`] with a [`Dialer`]'s TLS and keepalive.
pub fn channel_with(url: &str, dialer: &Dialer) -> Result<Channel, BadUrl> {
    let endpoint = endpoint_with(url, dialer.keepalive)?;
    if let Some(path) = unix_path(url) {
        if path.is_empty() {
            return Err(BadUrl {
                url: url.to_string(),
                reason: "no socket path".into(),
            });
        }
        return Ok(endpoint.connect_with_connector_lazy(UnixConnector { path: path.into() }));
    }
    Ok(match &dialer.tls {
        Some(tls) => endpoint.connect_with_connector_lazy(tls.connector()),
        None => endpoint.connect_lazy(),
    })
}

/// Connects channels to a Unix socket.
#[derive(Clone)]
struct UnixConnector {
    path: std::path::PathBuf,
}

type UnixConnected = hyper_util::rt::TokioIo<tokio::net::UnixStream>;

impl tower_service::Service<http::Uri> for UnixConnector {
    type Response = UnixConnected;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<UnixConnected>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let path = self.path.clone();
        Box::pin(async move {
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        })
    }
}

/// Connects `endpoint` now; over `tls` when `https` (an https:// URL), which then needs it.
pub async fn connect_now(
    endpoint: Endpoint,
    https: bool,
    tls: Option<&Tls>,
) -> Result<Channel, String> {
    let url = endpoint.uri().to_string();
    let connected = match (https, tls) {
        (true, Some(tls)) => endpoint.connect_with_connector(tls.connector()).await,
        (true, None) => {
            return Err(format!(
                "{url}: an https:// endpoint needs this process's TLS flags (--tls-cert, \
                 --tls-key, --tls-ca)"
            ));
        }
        (false, _) => endpoint.connect().await,
    };
    connected.map_err(|e| format!("{url}: {}", transport_error(&e)))
}

/// Adds `authorization: Bearer TOKEN` to a request (clients: `--token`).
pub fn bearer<T>(request: &mut tonic::Request<T>, token: Option<&str>) -> anyhow::Result<()> {
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(())
}

/// A transport error with its causes (tonic's own message is only "transport error").
pub fn transport_error(e: &tonic::transport::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Whether a failed call never reached, or lost, the stage (it is down, unreachable, or its
/// connection broke mid-call): UNAVAILABLE, or an UNKNOWN/INTERNAL/CANCELLED status whose cause
/// is the connection itself (a transport, HTTP/2 or I/O error, told apart by type, never by the
/// message, which a stage's own error could echo). A downstream stage's failure reported by the
/// stage ([`is_downstream`]) is not. Such a call can be retried on another endpoint.
pub fn is_transport_failure(status: &tonic::Status) -> bool {
    if is_downstream(status) {
        return false;
    }
    match status.code() {
        tonic::Code::Unavailable => true,
        // CANCELLED by the connection, not by this caller: a request that was never sent
        // because its connection went away (GOAWAY), or a stream the server reset as it left.
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => {
            caused_by_connection(status)
        }
        _ => false,
    }
}

/// Whether an error in the status's source chain is the connection's.
fn caused_by_connection(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = cause {
        if e.is::<tonic::transport::Error>()
            || e.is::<hyper::Error>()
            || e.is::<h2::Error>()
            || e.is::<std::io::Error>()
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Rewrites a failed call's status so it names the stage. Transport failures (the stage is down
/// or unreachable) become UNAVAILABLE; the stage's own errors keep their code, their
/// `google.rpc` details (a `RetryInfo`, a `BadRequest`) and their metadata.
pub fn stage_status(stage: &str, status: tonic::Status) -> tonic::Status {
    let message = format!("{stage} stage: {}", status.message());
    if is_transport_failure(&status) {
        tonic::Status::unavailable(message)
    } else {
        tonic::Status::with_details_and_metadata(
            status.code(),
            message,
            status.details().to_vec().into(),
            status.metadata().clone(),
        )
    }
}

/// Metadata key a stage sets on an error that came from a stage *it* called, so its own
/// callers do not count the failure against it (nor retry it elsewhere).
pub const DOWNSTREAM: &str = "ghostwriter-downstream";

/// [`stage_status`] for a failure of a downstream stage: marked with [`DOWNSTREAM`].
pub fn downstream_status(stage: &str, status: tonic::Status) -> tonic::Status {
    mark_downstream(stage, stage_status(stage, status))
}

/// Marks an already stage-named status as a failure of the downstream `stage` ([`DOWNSTREAM`]).
pub fn mark_downstream(stage: &str, mut status: tonic::Status) -> tonic::Status {
    if let Ok(v) = stage.parse() {
        status.metadata_mut().insert(DOWNSTREAM, v);
    }
    status
}

/// Whether a status reports a downstream stage's failure (see [`downstream_status`]).
pub fn is_downstream(status: &tonic::Status) -> bool {
    status.metadata().get(DOWNSTREAM).is_some()
}

/// [`wait_until_serving`] for a whole server at a plain (not TLS) `url`, its error naming it.
pub async fn serving(url: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_until_serving(url, "", timeout, None)
        .await
        .map_err(|s| anyhow::anyhow!("{url} did not report SERVING: {}", s.message()))
}

/// Polls the standard health service at `url` until `service` (`""` for the whole server)
/// reports SERVING, or fails after `timeout` with the last status seen.
pub async fn wait_until_serving(
    url: &str,
    service: &str,
    timeout: Duration,
    tls: Option<&Tls>,
) -> Result<(), tonic::Status> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let started = std::time::Instant::now();
    let channel = channel(url, tls).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let mut client = HealthClient::new(channel);
    let mut last = String::from("no answer");
    while started.elapsed() < timeout {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: service.into(),
        });
        request.set_timeout(Duration::from_secs(1));
        match client.check(request).await {
            Ok(r) if r.get_ref().status() == ServingStatus::Serving => return Ok(()),
            Ok(r) => last = format!("{:?}", r.get_ref().status()),
            Err(e) => last = e.message().to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(tonic::Status::unavailable(format!(
        "{url} not SERVING after {timeout:?}: {last}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_told_by_type_not_text() {
        // A stage's own error that merely says "transport" or "connection" is not one.
        let echoed = tonic::Status::unknown("bad input: transport error, connection reset");
        assert!(!is_transport_failure(&echoed));
        let internal = tonic::Status::internal("h2 protocol error (quoted from the caller)");
        assert!(!is_transport_failure(&internal));
        // A call whose connection broke is.
        let broken = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert_eq!(broken.code(), tonic::Code::Unknown);
        assert!(is_transport_failure(&broken));
        // A CANCELLED that a stage reported (in its trailers) is the stage's answer, not a
        // lost connection.
        assert!(!is_transport_failure(&tonic::Status::cancelled(
            "the caller went away"
        )));
        assert!(is_transport_failure(&tonic::Status::unavailable("down")));
        // A downstream failure reported by the stage is not held against it.
        assert!(!is_transport_failure(&downstream_status(
            "generator",
            tonic::Status::unavailable("down")
        )));
    }

    #[test]
    fn a_stages_error_keeps_its_details_when_named() {
        use tonic_types::StatusExt;
        let refused = ghostwriter_common::status::overloaded("the queue is full");
        let named = stage_status("generator", refused);
        assert_eq!(named.code(), tonic::Code::ResourceExhausted);
        assert_eq!(named.message(), "generator stage: the queue is full");
        assert!(named.get_details_retry_info().is_some(), "{named:?}");
        let twice = downstream_status("summarizer", named);
        assert!(twice.get_details_retry_info().is_some());
        assert!(is_downstream(&twice));
    }
}
