//! Statuses with `google.rpc` error details, so clients act on errors without parsing messages:
//! `BadRequest` names the field of an INVALID_ARGUMENT, `RetryInfo` says when to come back after a
//! RESOURCE_EXHAUSTED.

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
