//! The caller's deadline, read from the `grpc-timeout` header, so it can reach every stage.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

pub use crate::status::DeadlinePassed;

/// Parses a `grpc-timeout` value (`<digits><unit>`, unit one of H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The absolute deadline a request carries, if any.
pub fn from_metadata(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value).map(|d| received + d)
}

/// Time left before `deadline`; [`DeadlinePassed`] once it has passed.
pub fn remaining(deadline: Option<Instant>) -> Result<Option<Duration>, DeadlinePassed> {
    match deadline {
        None => Ok(None),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                Err(DeadlinePassed)
            } else {
                Ok(Some(d - now))
            }
        }
    }
}

/// Wraps `message` in a request that carries the time left before `deadline` and the current
/// trace context.
pub fn request<T>(
    message: T,
    deadline: Option<Instant>,
) -> Result<tonic::Request<T>, DeadlinePassed> {
    let mut request = tonic::Request::new(message);
    if let Some(left) = remaining(deadline)? {
        request.set_timeout(left);
    }
    crate::telemetry::inject(request.metadata_mut());
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }

    #[test]
    fn past_deadline_is_exceeded() {
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(
            tonic::Status::from(remaining(Some(past)).unwrap_err()).code(),
            tonic::Code::DeadlineExceeded
        );
        assert!(remaining(None).unwrap().is_none());
    }
}
