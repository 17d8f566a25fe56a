//! Client channels to other stages, and errors that name the stage that failed.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Opens a lazy channel to a stage: no connection is made until the first call, and a stage
/// that is down fails that call quickly (connect timeout) instead of hanging. Over mutual TLS
/// when the process has it on ([`crate::tls`]).
pub fn channel(url: &str) -> Result<Channel, tonic::Status> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| tonic::Status::invalid_argument(format!("bad endpoint URL {url:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    Ok(if crate::tls::enabled() {
        endpoint.connect_with_connector_lazy(crate::tls::Connector)
    } else {
        endpoint.connect_lazy()
    })
}

/// Whether a failed call never reached, or lost, the stage (it is down, unreachable, or its
/// connection broke mid-call): UNAVAILABLE, or the UNKNOWN status tonic gives a broken
/// connection. Such a call can be retried on another endpoint.
pub fn is_transport_failure(status: &tonic::Status) -> bool {
    if is_downstream(status) {
        return false;
    }
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown | tonic::Code::Internal => {
            let m = status.message();
            m.contains("transport")
                || m.contains("connection")
                || m.contains("h2 protocol")
                || m.contains("broken pipe")
        }
        _ => false,
    }
}

/// Rewrites a failed call's status so it names the stage. Transport failures (the stage is down
/// or unreachable) become UNAVAILABLE; the stage's own errors keep their code.
pub fn stage_status(stage: &str, status: tonic::Status) -> tonic::Status {
    let message = format!("{stage} stage: {}", status.message());
    if is_transport_failure(&status) {
        tonic::Status::unavailable(message)
    } else {
        tonic::Status::new(status.code(), message)
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

/// Polls the standard health service at `url` until `service` (`""` for the whole server)
/// reports SERVING, or fails after `timeout` with the last status seen.
pub async fn wait_until_serving(
    url: &str,
    service: &str,
    timeout: Duration,
) -> Result<(), tonic::Status> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let started = std::time::Instant::now();
    let mut client = HealthClient::new(channel(url)?);
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
