//! The one mapping from domain errors to `tonic::Status`, with `google.rpc` details (AIP-193).
//!
//! Each `From` impl matches exhaustively (no `_ =>` arm), so a new error variant fails the build here.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{jobs::JobError, pool::PoolError};

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
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    tracing::error!(error = %chain, "internal error");
    with_reason(Code::Internal, "INTERNAL", "internal error; see the server log")
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
        JobError::ShuttingDown => {
            let mut details = ErrorDetails::new();
            details.set_retry_info(Some(std::time::Duration::from_secs(1)));
            details.set_error_info(
                "SHUTTING_DOWN",
                ERROR_DOMAIN,
                std::collections::HashMap::<String, String>::new(),
            );
            Status::with_error_details(Code::Unavailable, "comfyrelay is shutting down; retry", details)
        }
        e @ (JobError::Store(_) | JobError::Artifact(_) | JobError::Corrupt(_)) => internal(&e),
    }
}

/// The one mapping from the pool's operator errors to `Status`: exhaustive, no wildcard arm.
pub fn pool_error(e: PoolError) -> Status {
    let message = e.to_string();
    match e {
        PoolError::NotFound(_) => with_reason(Code::NotFound, "NOT_FOUND", message),
        PoolError::Unmanaged(_) => with_reason(Code::FailedPrecondition, "MACHINE_UNMANAGED", message),
        PoolError::Ending { .. } => with_reason(Code::FailedPrecondition, "MACHINE_STOPPING", message),
        PoolError::PastLifetime(_) => with_reason(Code::FailedPrecondition, "MACHINE_PAST_LIFETIME", message),
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
