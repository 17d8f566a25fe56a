//! The orchestrator's errors, and their one mapping to a gRPC `Status`.

use ghostwriter_common::status::{DeadlinePassed, Invalid, Overloaded};
use tonic::Status;

use crate::auth::Denied;

/// Why a call to the public API failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field fails its check: INVALID_ARGUMENT naming the field.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// Missing, invalid or insufficient credentials: UNAUTHENTICATED or PERMISSION_DENIED.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// Refused for load (the ingest budget): RESOURCE_EXHAUSTED.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    /// The caller's deadline passed: DEADLINE_EXCEEDED.
    #[error(transparent)]
    Deadline(#[from] DeadlinePassed),
    /// The user has no earlier document to judge a text against: FAILED_PRECONDITION.
    #[error("no earlier documents of this user to compare the text with")]
    NoHistory,
    /// No endpoint of a stage (named) can be called: UNAVAILABLE.
    #[error("{0} stage: no endpoint available")]
    NoEndpoint(String),
    /// No generator holds the adapter an administrator unloads: NOT_FOUND.
    #[error("no generator holds adapter {0:?}")]
    NoSuchAdapter(String),
    /// A generation stream ended before its final message: UNAVAILABLE.
    #[error("generator stage: the stream ended before the text was complete")]
    StreamCut,
    /// A stage's own answer, already named by the stage ("ranker stage: ..."), passing through
    /// with its code, details (such as `RetryInfo`) and metadata.
    #[error("{}", .0.message())]
    Stage(Status),
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::Stage(status)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(e) => e.into(),
            Error::Denied(d @ (Denied::Missing | Denied::Invalid)) => {
                Status::unauthenticated(d.to_string())
            }
            Error::Denied(d @ (Denied::OtherUser | Denied::NotAdmin)) => {
                Status::permission_denied(d.to_string())
            }
            Error::Overloaded(e) => e.into(),
            Error::Deadline(e) => e.into(),
            Error::NoHistory => Status::failed_precondition(e.to_string()),
            Error::NoSuchAdapter(_) => Status::not_found(e.to_string()),
            Error::NoEndpoint(_) | Error::StreamCut => unavailable(e.to_string()),
            // A stage that could not be reached: when to come back, as for a refusal.
            Error::Stage(status)
                if status.code() == tonic::Code::Unavailable && status.details().is_empty() =>
            {
                unavailable(status.message().to_string())
            }
            Error::Stage(status) => status,
        }
    }
}

/// UNAVAILABLE with a `RetryInfo`: the caller may try again after it (another orchestrator, or
/// this one once a stage is back).
fn unavailable(message: String) -> Status {
    use tonic_types::StatusExt as _;
    Status::with_error_details(
        tonic::Code::Unavailable,
        message,
        tonic_types::ErrorDetails::with_retry_info(Some(ghostwriter_common::status::RETRY_AFTER)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn a_stages_status_passes_through_with_its_details() {
        let refused = Status::with_error_details(
            tonic::Code::ResourceExhausted,
            "generator stage: the queue is full",
            ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1))),
        );
        let out = Status::from(Error::from(refused));
        assert_eq!(out.code(), tonic::Code::ResourceExhausted);
        assert_eq!(out.message(), "generator stage: the queue is full");
        assert!(out.get_details_retry_info().is_some(), "{out:?}");
        // No generator left: UNAVAILABLE, with when to come back.
        for lost in [
            Error::NoEndpoint("generator".into()),
            Error::StreamCut,
            Error::Stage(Status::unavailable("generator stage: connection refused")),
        ] {
            let out = Status::from(lost);
            assert_eq!(out.code(), tonic::Code::Unavailable);
            assert!(out.get_details_retry_info().is_some(), "{out:?}");
        }
        let bad = Status::from(Error::from(Invalid::new("user_id", "user_id is empty")));
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            bad.get_details_bad_request().unwrap().field_violations[0].field,
            "user_id"
        );
    }
}
