//! Statuses with `google.rpc` error details, so clients act on errors without parsing messages:
//! `BadRequest` names the field of an INVALID_ARGUMENT, `RetryInfo` says when to come back after a
//! RESOURCE_EXHAUSTED. The errors every stage shares ([`Invalid`], [`Overloaded`],
//! [`DeadlinePassed`]) are typed here with their one mapping to a `Status`; each stage's own error
//! enum carries them as variants.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Characters of an input a message quotes at most.
const QUOTE: usize = 100;

/// `s` quoted for an error message: at most [`QUOTE`] characters, marked when cut.
pub fn quote(s: &str) -> String {
    let shown: String = s.chars().take(QUOTE).collect();
    if shown.len() < s.len() {
        format!("{shown:?} (cut)")
    } else {
        format!("{shown:?}")
    }
}

/// How long a caller refused for load should wait before trying again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// INVALID_ARGUMENT about `field` (its path in the request, e.g. `options.generation.top_p`),
/// with a `BadRequest` field violation carrying the same message.
pub fn bad_field(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    Status::with_error_details(
        Code::InvalidArgument,
        message.clone(),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// RESOURCE_EXHAUSTED with a `RetryInfo` of [`RETRY_AFTER`].
pub fn overloaded(message: impl Into<String>) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
    )
}

/// A request field that fails its check: INVALID_ARGUMENT with a `BadRequest` violation naming
/// the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    /// The field's path in the request (`options.generation.top_p`).
    pub field: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl Invalid {
    /// `field` fails with `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same violation with its field under `parent` (a check of `generation` reported
    /// inside `options`).
    pub fn under(self, parent: &str) -> Self {
        Self {
            field: format!("{parent}.{}", self.field),
            ..self
        }
    }
}

impl From<Invalid> for Status {
    fn from(e: Invalid) -> Self {
        bad_field(&e.field, e.message)
    }
}

/// Refused for load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Overloaded {
    /// Busy now: RESOURCE_EXHAUSTED with a `RetryInfo` of [`RETRY_AFTER`].
    #[error("{0}")]
    Busy(String),
    /// Larger than the whole capacity: RESOURCE_EXHAUSTED without a `RetryInfo` (retrying
    /// cannot help).
    #[error("{0}")]
    TooLarge(String),
}

impl From<Overloaded> for Status {
    fn from(e: Overloaded) -> Self {
        match e {
            Overloaded::Busy(m) => overloaded(m),
            Overloaded::TooLarge(m) => Status::resource_exhausted(m),
        }
    }
}

/// The caller's deadline passed: DEADLINE_EXCEEDED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the caller's deadline has passed")]
pub struct DeadlinePassed;

impl From<DeadlinePassed> for Status {
    fn from(e: DeadlinePassed) -> Self {
        Status::deadline_exceeded(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_short() {
        assert_eq!(quote("abc"), "\"abc\"");
        let long = quote(&"x".repeat(20_000));
        assert!(long.len() < 120 && long.ends_with("(cut)"), "{long}");
    }

    #[test]
    fn details_round_trip() {
        let s = bad_field("options.generation.top_p", "top_p must be in [0, 1]");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "top_p must be in [0, 1]");
        let v = &s.get_details_bad_request().unwrap().field_violations[0];
        assert_eq!(v.field, "options.generation.top_p");
        let s = overloaded("busy");
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.get_details_retry_info().unwrap().retry_delay,
            Some(RETRY_AFTER)
        );
    }
}
