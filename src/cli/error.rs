//! How a client command ends: the exit codes, and errors a person (or a script) can act on, with the
//! server's `google.rpc` details decoded rather than shown as bytes.

use std::fmt::Write as _;

use tonic::Status;
use tonic_types::StatusExt as _;

/// The process exit codes of the client commands (documented in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: the call succeeded (and the job, if the command waited for one, succeeded).
    Success,
    /// 1: the job ended `FAILED` or `CANCELLED`.
    JobFailed,
    /// 2: the call failed: the server could not be reached, or it answered with an error.
    CallFailed,
    /// 64: bad usage (flags, parameters, files), found before anything was sent.
    Usage,
}

impl Exit {
    /// The numeric code.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::JobFailed => 1,
            Exit::CallFailed => 2,
            Exit::Usage => 64,
        }
    }
}

/// Why a client command could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line or its inputs are wrong.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached.
    #[error("cannot reach the comfyrelay server at {server} (set --server or COMFYRELAY_SERVER): {cause}")]
    Unreachable {
        /// The address tried.
        server: String,
        /// The transport error and its causes.
        cause: String,
    },
    /// The server answered with an error.
    #[error("{}", describe_status(.0))]
    Rpc(Box<Status>),
    /// A local file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server sent something the contract does not allow (e.g. an output whose checksum differs).
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

impl CliError {
    /// The exit code this error ends the process with.
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Unreachable { .. } | CliError::Rpc(_) | CliError::Io { .. } | CliError::Protocol(_) => {
                Exit::CallFailed
            }
        }
    }

    /// A JSON object for `--json` output.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::json!({ "type": "error", "message": self.to_string() });
        match self {
            CliError::Usage(_) => value["kind"] = "usage".into(),
            CliError::Unreachable { server, .. } => {
                value["kind"] = "unreachable".into();
                value["server"] = server.clone().into();
            }
            CliError::Rpc(status) => {
                value["kind"] = "rpc".into();
                value["code"] = format!("{:?}", status.code()).into();
                value["status_message"] = status.message().into();
                value["details"] = details_json(status);
            }
            CliError::Io { .. } => value["kind"] = "io".into(),
            CliError::Protocol(_) => value["kind"] = "protocol".into(),
        }
        value
    }
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        CliError::Rpc(Box::new(status))
    }
}

/// The error chain of `e`, joined by `: `.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A status as lines: the code and message, then each decoded detail (field violations, reason,
/// retry delay, quota and precondition violations, resources, help links).
pub fn describe_status(status: &Status) -> String {
    let details = status.get_error_details();
    // The message of an INVALID_ARGUMENT repeats its violations; they are listed one per line below.
    let mut out = match details.bad_request() {
        Some(br) if !br.field_violations.is_empty() => format!("{:?}: the request is invalid", status.code()),
        _ => format!("{:?}: {}", status.code(), status.message()),
    };
    if let Some(br) = details.bad_request() {
        for v in &br.field_violations {
            let _ = write!(out, "\n  field `{}`: {}", v.field, v.description);
        }
    }
    if let Some(info) = details.error_info() {
        let _ = write!(out, "\n  reason: {} ({})", info.reason, info.domain);
        let mut metadata: Vec<_> = info.metadata.iter().collect();
        metadata.sort();
        for (k, v) in metadata {
            let _ = write!(out, "\n  {k}: {v}");
        }
    }
    if let Some(delay) = details.retry_info().and_then(|r| r.retry_delay) {
        let _ = write!(out, "\n  retry after {}", humantime::format_duration(delay));
    }
    if let Some(q) = details.quota_failure() {
        for v in &q.violations {
            let _ = write!(out, "\n  quota `{}`: {}", v.subject, v.description);
        }
    }
    if let Some(p) = details.precondition_failure() {
        for v in &p.violations {
            let _ = write!(out, "\n  precondition {} `{}`: {}", v.r#type, v.subject, v.description);
        }
    }
    if let Some(r) = details.resource_info() {
        let _ = write!(out, "\n  resource {} `{}`: {}", r.resource_type, r.resource_name, r.description);
    }
    if let Some(h) = details.help() {
        for l in &h.links {
            let _ = write!(out, "\n  see {}: {}", l.description, l.url);
        }
    }
    out
}

/// The decoded details as JSON, for `--json`.
fn details_json(status: &Status) -> serde_json::Value {
    let details = status.get_error_details();
    let mut out = serde_json::Map::new();
    if let Some(br) = details.bad_request() {
        out.insert(
            "field_violations".into(),
            br.field_violations
                .iter()
                .map(|v| serde_json::json!({ "field": v.field, "description": v.description }))
                .collect(),
        );
    }
    if let Some(info) = details.error_info() {
        out.insert(
            "error_info".into(),
            serde_json::json!({ "reason": info.reason, "domain": info.domain, "metadata": info.metadata }),
        );
    }
    if let Some(delay) = details.retry_info().and_then(|r| r.retry_delay) {
        out.insert("retry_delay_seconds".into(), delay.as_secs_f64().into());
    }
    if let Some(q) = details.quota_failure() {
        out.insert(
            "quota_violations".into(),
            q.violations
                .iter()
                .map(|v| serde_json::json!({ "subject": v.subject, "description": v.description }))
                .collect(),
        );
    }
    if let Some(p) = details.precondition_failure() {
        out.insert(
            "precondition_violations".into(),
            p.violations
                .iter()
                .map(|v| serde_json::json!({ "type": v.r#type, "subject": v.subject, "description": v.description }))
                .collect(),
        );
    }
    serde_json::Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn details_are_decoded() {
        let mut details = ErrorDetails::new();
        details.add_bad_request_violation("parameters.width", "must be at most 16384");
        details.set_error_info(
            "INVALID_ARGUMENT",
            "comfyrelay.dev",
            [("limit".to_string(), "16384".to_string())],
        );
        details.set_retry_info(Some(std::time::Duration::from_secs(2)));
        let status = Status::with_error_details(tonic::Code::InvalidArgument, "bad", details);
        let text = describe_status(&status);
        assert!(text.contains("field `parameters.width`: must be at most 16384"), "{text}");
        assert!(text.contains("reason: INVALID_ARGUMENT (comfyrelay.dev)"), "{text}");
        assert!(text.contains("limit: 16384") && text.contains("retry after 2s"), "{text}");
        let json = CliError::from(status).to_json();
        assert_eq!(json["details"]["field_violations"][0]["field"], "parameters.width");
        assert_eq!(json["code"], "InvalidArgument");
    }
}
