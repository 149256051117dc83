//! The one mapping from domain errors to `tonic::Status`, with `google.rpc` details (AIP-193).
//!
//! Each `From` impl matches exhaustively (no `_ =>` arm), so a new error variant fails the build here.
//! Every status carries an `ErrorInfo` (domain [`ERROR_DOMAIN`], a stable reason, and metadata such as
//! the field, the limit and the setting that moves it), and stays small whatever the request held:
//! quoted values are cut ([`crate::limits::echo`]), and the message and the details each have a byte
//! budget, because some clients refuse a response whose headers exceed 8–16 KiB (grpc C-core, so Python),
//! which would hide the real error behind `RESOURCE_EXHAUSTED: Stream removed`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    jobs::{JobError, Violation, quota::QuotaKind},
    limits::{Exceeded, SETTING_MAX_MESSAGE_BYTES, clip, echo},
    pool::PoolError,
    store::StoreError,
};

/// The `ErrorInfo.domain` of every error comfyrelay returns.
pub const ERROR_DOMAIN: &str = "comfyrelay.dev";

/// Characters of one violation's field path.
const FIELD_MAX_CHARS: usize = 128;
/// Characters of one violation's description.
const DESCRIPTION_MAX_CHARS: usize = 400;
/// Bytes of violations put in the `BadRequest` (a violation that does not fit is counted, not sent).
const DETAILS_BUDGET_BYTES: usize = 3 * 1024;
/// Bytes of the `grpc-message` text.
const MESSAGE_BUDGET_BYTES: usize = 1024;

/// One problem with a request field, with the bound it broke when it is a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadField {
    /// The field path, e.g. `parameters[steps]`.
    pub(crate) field: String,
    /// What is wrong.
    pub(crate) description: String,
    /// The limit, when the problem is a size, count, depth or pixel bound.
    pub(crate) bound: Option<Exceeded>,
}

impl BadField {
    /// A problem that is not a bound.
    pub(crate) fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into(), bound: None }
    }
}

impl From<Violation> for BadField {
    fn from(v: Violation) -> Self {
        Self::new(v.field, v.description)
    }
}

impl From<Exceeded> for BadField {
    fn from(e: Exceeded) -> Self {
        Self { field: e.field.clone(), description: e.description(), bound: Some(e) }
    }
}

/// A caller fault: `INVALID_ARGUMENT` with one field violation per problem (as many as the budget holds)
/// and an `ErrorInfo` naming the first field; for a bound (reason `LIMIT_EXCEEDED`), also its `limit`,
/// `unit` and `setting`.
pub(crate) fn bad_request(problems: Vec<BadField>) -> Status {
    let total = problems.len();
    let mut details = ErrorDetails::new();
    let (mut message, mut detail_bytes, mut shown, mut in_message) = (String::new(), 0, 0, 0);
    for p in &problems {
        let field = clip(&p.field, FIELD_MAX_CHARS);
        let description = clip(&p.description, DESCRIPTION_MAX_CHARS);
        let size = field.len() + description.len();
        if shown == 0 || detail_bytes + size <= DETAILS_BUDGET_BYTES {
            details.add_bad_request_violation(field.clone().into_owned(), description.clone().into_owned());
            detail_bytes += size;
            shown += 1;
        }
        let line = format!("{field}: {description}");
        if in_message == 0 || message.len() + line.len() + 2 <= MESSAGE_BUDGET_BYTES {
            if in_message > 0 {
                message.push_str("; ");
            }
            message.push_str(&clip(&line, MESSAGE_BUDGET_BYTES));
            in_message += 1;
        }
    }
    if in_message < total {
        message.push_str(&format!("; and {} more (see the BadRequest details)", total - in_message));
    }
    let mut metadata = HashMap::from([("violations".to_string(), total.to_string())]);
    if shown < total {
        metadata.insert("violations_shown".into(), shown.to_string());
    }
    let first = problems.first();
    if let Some(first) = first {
        metadata.insert("field".into(), clip(&first.field, FIELD_MAX_CHARS).into_owned());
    }
    let reason = match first.and_then(|p| p.bound.as_ref()) {
        Some(bound) => {
            metadata.insert("limit".into(), bound.limit.to_string());
            metadata.insert("unit".into(), bound.unit.as_str().into());
            if let Some(setting) = bound.setting {
                metadata.insert("setting".into(), setting.into());
            }
            "LIMIT_EXCEEDED"
        }
        None => "INVALID_ARGUMENT",
    };
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// `INVALID_ARGUMENT` from `(field, description)` pairs.
pub fn invalid_argument(violations: &[(String, String)]) -> Status {
    bad_request(violations.iter().map(|(f, d)| BadField::new(f.clone(), d.clone())).collect())
}

/// `INVALID_ARGUMENT` for one field.
pub fn invalid_field(field: &str, description: impl Into<String>) -> Status {
    bad_request(vec![BadField::new(field, description)])
}

/// A status with an `ErrorInfo` reason (the message is cut to the budget).
pub fn with_reason(code: Code, reason: &str, message: impl Into<String>) -> Status {
    with_metadata(code, reason, message, HashMap::new())
}

/// A status with an `ErrorInfo` reason and metadata (the message is cut to the budget).
pub fn with_metadata(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: HashMap<String, String>,
) -> Status {
    let message = message.into();
    let mut details = ErrorDetails::new();
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, clip(&message, MESSAGE_BUDGET_BYTES).into_owned(), details)
}

/// `NOT_FOUND` for a named thing (`what` is e.g. `workflow`, `name` the caller's value, quoted cut short).
pub(crate) fn not_found(reason: &str, what: &str, name: &str, hint: &str) -> Status {
    let shown = echo(name);
    with_metadata(
        Code::NotFound,
        reason,
        format!("{what} {shown:?} not found{hint}"),
        HashMap::from([(what.to_string(), shown.into_owned())]),
    )
}

/// A request message over `grpc.max_message_bytes`: `RESOURCE_EXHAUSTED`, reason `MESSAGE_TOO_LARGE`, with
/// the setting, the limit and (when known) the size. No `RetryInfo`: the same message can never pass.
pub(crate) fn message_too_large(size: Option<u64>, limit: usize) -> Status {
    let mut metadata = HashMap::from([
        ("setting".to_string(), SETTING_MAX_MESSAGE_BYTES.to_string()),
        ("limit".to_string(), limit.to_string()),
    ]);
    let size_text = match size {
        Some(size) => {
            metadata.insert("size".into(), size.to_string());
            format!("is {size} bytes")
        }
        None => "is too large".to_string(),
    };
    with_metadata(
        Code::ResourceExhausted,
        "MESSAGE_TOO_LARGE",
        format!(
            "the request message {size_text}; the limit is {limit} bytes (setting {SETTING_MAX_MESSAGE_BYTES}); \
             send large inputs in smaller requests"
        ),
        metadata,
    )
}

/// A response message over `grpc.max_message_bytes` (e.g. many large inline outputs).
pub(crate) fn response_too_large(limit: usize) -> Status {
    with_metadata(
        Code::ResourceExhausted,
        "RESPONSE_TOO_LARGE",
        format!(
            "the response would exceed {limit} bytes (setting {SETTING_MAX_MESSAGE_BYTES}); \
             fetch outputs with DownloadOutput"
        ),
        HashMap::from([
            ("setting".to_string(), SETTING_MAX_MESSAGE_BYTES.to_string()),
            ("limit".to_string(), limit.to_string()),
        ]),
    )
}

/// The `ErrorInfo.reason` given to a bare status of `code` (one produced by tonic, not by us).
pub(crate) fn reason_of(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An internal failure: logs the full cause chain and returns a generic message.
pub fn internal(error: &(dyn std::error::Error + 'static)) -> Status {
    tracing::error!(error = %crate::telemetry::ErrorChain(error), "internal error");
    with_reason(Code::Internal, "INTERNAL", "internal error; see the server log")
}

/// A storage failure: `UNAVAILABLE` with `RetryInfo` and reason `STORAGE_UNAVAILABLE` when the database
/// cannot be reached or this replica no longer leads ([`StoreError::is_unavailable`]), so clients retry;
/// else `INTERNAL`. Neither says more than that: the cause (which may name the database's host) is logged.
pub fn store_error(e: &StoreError) -> Status {
    if !e.is_unavailable() {
        return internal(e);
    }
    tracing::warn!(error = %crate::telemetry::ErrorChain(e), "storage unavailable; the caller is told to retry");
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(std::time::Duration::from_secs(1)));
    details.set_error_info(
        "STORAGE_UNAVAILABLE",
        ERROR_DOMAIN,
        std::collections::HashMap::<String, String>::new(),
    );
    Status::with_error_details(Code::Unavailable, "the database cannot be reached now; retry", details)
}

/// Why a standby did not forward a call to the leader (README "Replicas on PostgreSQL").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotForwarded {
    /// No replica has advertised itself as the leader yet (a takeover under way).
    NoLeader,
    /// The leader's URL is known but it did not take the call (unreachable, or its certificate not the
    /// replicas').
    LeaderUnreachable,
    /// With mTLS, the caller's certificate subject cannot be named in a header: only the leader serves it.
    CallerNotForwardable,
}

/// A standby's `UNAVAILABLE` for a call it could not forward, with an `ErrorInfo` reason (`NO_LEADER`,
/// `LEADER_UNREACHABLE`, `CALLER_NOT_FORWARDABLE`) and, when a retry here may work, `RetryInfo`.
pub fn not_forwarded(why: NotForwarded) -> Status {
    let (reason, message, retry) = match why {
        NotForwarded::NoLeader => {
            ("NO_LEADER", "this replica is a standby and knows no leader yet; retry", true)
        }
        NotForwarded::LeaderUnreachable => {
            ("LEADER_UNREACHABLE", "this replica is a standby and cannot reach the leader; retry", true)
        }
        NotForwarded::CallerNotForwardable => (
            "CALLER_NOT_FORWARDABLE",
            "this standby cannot forward a caller whose certificate subject is not printable ASCII; call the leader",
            false,
        ),
    };
    let mut details = ErrorDetails::new();
    if retry {
        details.set_retry_info(Some(std::time::Duration::from_secs(1)));
    }
    details.set_error_info(reason, ERROR_DOMAIN, std::collections::HashMap::<String, String>::new());
    Status::with_error_details(Code::Unavailable, message, details)
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
            bad_request(violations.into_iter().map(BadField::from).collect())
        }
        JobError::NotFound(what) => with_reason(
            Code::NotFound,
            "NOT_FOUND",
            format!("{} not found", clip(&what, 2 * crate::limits::ECHO_MAX_CHARS)),
        ),
        JobError::AlreadyExists { request_id, job_id } => {
            let shown = echo(&request_id).into_owned();
            with_metadata(
                Code::AlreadyExists,
                "REQUEST_ID_REUSED",
                format!("request_id {shown:?} was already used for job {job_id} with a different request"),
                HashMap::from([("request_id".to_string(), shown), ("job_id".to_string(), job_id)]),
            )
        }
        JobError::ShuttingDown => shutting_down("comfyrelay is shutting down; retry".into()),
        JobError::QuotaExceeded(q) => {
            let mut details = ErrorDetails::new();
            details.set_retry_info(Some(q.retry_after));
            let reason = match q.quota {
                QuotaKind::MaxQueued => "QUOTA_MAX_QUEUED",
                QuotaKind::SubmitsPerSecond => "QUOTA_SUBMITS_PER_SECOND",
                QuotaKind::MachineSecondsPerDay => "QUOTA_MACHINE_SECONDS_PER_DAY",
            };
            let setting = q.quota.setting();
            details.set_error_info(
                reason,
                ERROR_DOMAIN,
                HashMap::from([
                    ("quota".to_string(), setting.to_string()),
                    ("limit".to_string(), q.limit.to_string()),
                ]),
            );
            Status::with_error_details(
                Code::ResourceExhausted,
                format!(
                    "the tenant's quota {setting} of {} is reached (setting auth.tenants.<tenant>.{setting}); \
                     retry later",
                    q.limit
                ),
                details,
            )
        }
        JobError::ResourceExhausted { what, limit, setting } => {
            let mut details = ErrorDetails::new();
            details.set_retry_info(Some(std::time::Duration::from_secs(5)));
            details.set_error_info(
                "LIMIT_REACHED",
                ERROR_DOMAIN,
                HashMap::from([
                    ("limit".to_string(), limit.to_string()),
                    ("setting".to_string(), setting.to_string()),
                ]),
            );
            Status::with_error_details(
                Code::ResourceExhausted,
                format!("{what} are at the limit of {limit} (setting {setting}); retry later"),
                details,
            )
        }
        JobError::Store(e) => store_error(&e),
        e @ (JobError::Artifact(_) | JobError::Corrupt(_) | JobError::Log(_)) => internal(&e),
    }
}

/// The one mapping from the pool's operator errors to `Status`: exhaustive, no wildcard arm.
pub fn pool_error(e: PoolError) -> Status {
    // The message names the machine the caller gave: clipped like every echoed value.
    let message = clip(&e.to_string(), 2 * crate::limits::ECHO_MAX_CHARS).into_owned();
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
    use crate::limits::Unit;

    #[test]
    fn invalid_argument_carries_every_violation() {
        let s = invalid_argument(&[("a".into(), "bad".into()), ("b".into(), "worse".into())]);
        assert_eq!(s.code(), Code::InvalidArgument);
        let br = s.get_details_bad_request().expect("bad request details");
        assert_eq!(br.field_violations.len(), 2);
        assert_eq!(br.field_violations[1].field, "b");
        let info = s.get_details_error_info().expect("error info");
        assert_eq!((info.reason.as_str(), info.metadata["field"].as_str()), ("INVALID_ARGUMENT", "a"));
    }

    #[test]
    fn storage_out_of_reach_is_unavailable_with_a_retry_delay_and_a_failing_disk_internal() {
        for unreachable in [
            StoreError::Database(sqlx::Error::PoolTimedOut),
            StoreError::Database(sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into())),
            StoreError::Fenced { term: 1, current: 2 },
        ] {
            let s = store_error(&unreachable);
            assert_eq!(s.code(), Code::Unavailable, "{unreachable:?}");
            assert_eq!(s.get_details_error_info().expect("ErrorInfo").reason, "STORAGE_UNAVAILABLE");
            assert!(s.get_details_retry_info().and_then(|r| r.retry_delay).is_some(), "{unreachable:?}");
        }
        let disk = StoreError::Io(std::io::Error::other("No space left on device: /var/lib/comfyrelay"));
        let s = store_error(&disk);
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("/var/lib"), "{s:?}");
    }

    #[test]
    fn internal_hides_the_cause() {
        let e = std::io::Error::other("secret path /root/token");
        let s = internal(&e);
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
    }

    #[test]
    fn many_or_huge_violations_stay_within_the_budget() {
        let huge = "x".repeat(1 << 20);
        let problems: Vec<BadField> =
            (0..10_000).map(|i| BadField::new(format!("parameters[{i}{huge}]"), huge.clone())).collect();
        let s = bad_request(problems);
        assert!(s.message().len() <= MESSAGE_BUDGET_BYTES + 100, "{}", s.message().len());
        assert!(s.details().len() <= DETAILS_BUDGET_BYTES + 1024, "{}", s.details().len());
        let info = s.get_details_error_info().expect("error info");
        assert_eq!(info.metadata["violations"], "10000");
        assert!(s.message().contains("more (see the BadRequest details)"));
    }

    #[test]
    fn a_bound_names_its_limit_and_setting() {
        let e = Exceeded::new("graph_json", 5_000_000, 2_097_152, Unit::Bytes)
            .with_setting(crate::limits::SETTING_MAX_GRAPH_BYTES);
        let s = bad_request(vec![e.into()]);
        let info = s.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "LIMIT_EXCEEDED");
        assert_eq!(info.metadata["field"], "graph_json");
        assert_eq!(info.metadata["limit"], "2097152");
        assert_eq!(info.metadata["setting"], "jobs.max_graph_bytes");
    }
}
