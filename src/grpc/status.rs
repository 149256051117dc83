//! The one mapping from domain errors to `tonic::Status`, with `google.rpc` details (AIP-193).
//!
//! Each `From` impl matches exhaustively (no `_ =>` arm), so a new error variant fails the build here.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::jobs::JobError;

/// The `ErrorInfo.domain` of every error comfyrelay returns.
pub const ERROR_DOMAIN: &str = "comfyrelay.dev";

/// A caller fault: `INVALID_ARGUMENT` with one field violation per problem.
pub fn invalid_argument(violations: &[(String, String)]) -> Status {
    let message = violations.iter().map(|(f, d)| format!("{f}: {d}")).collect::<Vec<_>>().join("; ");
    let mut details = ErrorDetails::new();
    for (field, description) in violations {
        details.add_bad_request_violation(field.clone(), description.clone());
    }
    details.set_error_info(
        "INVALID_ARGUMENT",
        ERROR_DOMAIN,
        std::collections::HashMap::<String, String>::new(),
    );
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// `INVALID_ARGUMENT` for one field.
pub fn invalid_field(field: &str, description: impl Into<String>) -> Status {
    invalid_argument(&[(field.to_string(), description.into())])
}

/// A status with an `ErrorInfo` reason.
pub fn with_reason(code: Code, reason: &str, message: impl Into<String>) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(reason, ERROR_DOMAIN, std::collections::HashMap::<String, String>::new());
    Status::with_error_details(code, message.into(), details)
}

/// An internal failure: logs the full cause chain and returns a generic message.
pub fn internal(error: &(dyn std::error::Error + 'static)) -> Status {
    tracing::error!(error = %crate::telemetry::chain(error), "internal error");
    with_reason(Code::Internal, "INTERNAL", "internal error; see the server log")
}

/// `UNAVAILABLE` with `RetryInfo`: comfyrelay is draining.
fn shutting_down(message: String) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(std::time::Duration::from_secs(1)));
    details.set_error_info("SHUTTING_DOWN", ERROR_DOMAIN, std::collections::HashMap::<String, String>::new());
    Status::with_error_details(Code::Unavailable, message, details)
}

/// A `StreamJob` cut by the drain: the client resumes elsewhere after the last sequence it received.
pub fn shutting_down_resume(last_sequence: u64) -> Status {
    shutting_down(format!("comfyrelay is shutting down; resume with after_sequence={last_sequence}"))
}

/// The one mapping from job-engine errors to `Status`: exhaustive, no wildcard arm.
pub fn job_error(e: JobError) -> Status {
    match e {
        JobError::InvalidArgument(violations) => {
            invalid_argument(&violations.into_iter().map(|v| (v.field, v.description)).collect::<Vec<_>>())
        }
        JobError::NotFound(what) => with_reason(Code::NotFound, "NOT_FOUND", format!("{what} not found")),
        JobError::AlreadyExists { request_id, job_id } => with_reason(
            Code::AlreadyExists,
            "REQUEST_ID_REUSED",
            format!("request_id {request_id:?} was already used for job {job_id} with a different request"),
        ),
        JobError::ShuttingDown => shutting_down("comfyrelay is shutting down; retry".into()),
        JobError::ResourceExhausted { what, limit, setting } => {
            let mut details = ErrorDetails::new();
            details.set_retry_info(Some(std::time::Duration::from_secs(5)));
            details.set_error_info(
                "LIMIT_REACHED",
                ERROR_DOMAIN,
                [("limit".to_string(), limit.to_string()), ("setting".to_string(), setting.to_string())]
                    .into_iter()
                    .collect::<std::collections::HashMap<String, String>>(),
            );
            Status::with_error_details(
                Code::ResourceExhausted,
                format!("{what} are at the limit of {limit} (setting {setting}); retry later"),
                details,
            )
        }
        e @ (JobError::Store(_) | JobError::Artifact(_) | JobError::Corrupt(_) | JobError::Log(_)) => {
            internal(&e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_every_violation() {
        let s = invalid_argument(&[("a".into(), "bad".into()), ("b".into(), "worse".into())]);
        assert_eq!(s.code(), Code::InvalidArgument);
        let br = s.get_details_bad_request().expect("bad request details");
        assert_eq!(br.field_violations.len(), 2);
        assert_eq!(br.field_violations[1].field, "b");
    }

    #[test]
    fn internal_hides_the_cause() {
        let e = std::io::Error::other("secret path /root/token");
        let s = internal(&e);
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
    }
}
