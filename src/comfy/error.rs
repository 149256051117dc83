//! `ComfyError`: every way a call to a ComfyUI server can fail, with the retry classification.
//!
//! Owns the mapping of HTTP answers (status + body) to typed errors, including ComfyUI's validation
//! error shape. Knows nothing about the WebSocket session or the callers' jobs.

use std::time::Duration;

use serde_json::Value;

/// One validation problem of one node, flattened from ComfyUI's `node_errors` map
/// (a node can contribute several entries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeError {
    /// The node id in the API graph (`"3"`).
    pub node_id: String,
    /// The node's class (`"ImageScale"`), empty when ComfyUI did not say.
    pub class_type: String,
    /// ComfyUI's error type (`"value_smaller_than_min"`, `"required_input_missing"`, ...).
    pub error_type: String,
    /// Human-readable message.
    pub message: String,
    /// ComfyUI's `details` text (often empty).
    pub details: String,
    /// The input the error is about, when ComfyUI names one (`extra_info.input_name`).
    pub input_name: Option<String>,
    /// The output nodes this error keeps from running (ComfyUI's `dependent_outputs`).
    pub dependent_outputs: Vec<String>,
}

/// What went wrong while talking to ComfyUI. Each variant is distinguishable; see [`ComfyError::is_retryable`].
#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    /// The configured base URL cannot be used.
    #[error("invalid ComfyUI URL: {0}")]
    InvalidUrl(String),
    /// `POST /prompt` answered 400: the graph did not validate.
    #[error("prompt rejected by ComfyUI validation ({error_type}): {message}")]
    Validation {
        /// `error.type` (`invalid_prompt`, `prompt_outputs_failed_validation`, `no_prompt`, ...).
        error_type: String,
        /// `error.message`.
        message: String,
        /// `error.details`.
        details: String,
        /// Every node error, flattened.
        node_errors: Vec<NodeError>,
    },
    /// 403: ComfyUI's origin check refused the request.
    #[error("ComfyUI refused the request (HTTP 403, origin check) on {path}")]
    Forbidden {
        /// Request path (never the full URL, which may carry credentials).
        path: String,
    },
    /// 404 on a route or file.
    #[error("not found on the ComfyUI server: {path}")]
    NotFound {
        /// Request path.
        path: String,
    },
    /// 5xx: ComfyUI's plain-text "500 Internal Server Error" or a proxy failure. Retryable.
    #[error("ComfyUI server error (HTTP {status}) on {path}: {body}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Request path.
        path: String,
        /// The (truncated) body.
        body: String,
    },
    /// Any other non-success status (4xx other than 400-validation, 403 and 404).
    #[error("ComfyUI rejected the request (HTTP {status}) on {path}: {body}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Request path.
        path: String,
        /// The (truncated) body.
        body: String,
    },
    /// The call did not finish within its deadline.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was being done (`"GET /queue"`, `"websocket connect"`).
        operation: String,
        /// The deadline that was exceeded.
        after: Duration,
    },
    /// Connection refused/reset, DNS, TLS, a body cut short: the request may not have reached ComfyUI.
    #[error("transport error during {operation}: {source}")]
    Transport {
        /// What was being done.
        operation: String,
        /// The cause, with any URL stripped (URLs can carry credentials).
        #[source]
        source: reqwest::Error,
    },
    /// The WebSocket could not be opened or failed.
    #[error("websocket error: {0}")]
    WebSocket(String),
    /// ComfyUI answered something this client cannot understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A download was cut short (fewer/more bytes than Content-Length). Retryable with a fresh sink.
    #[error("download of {filename} truncated: expected {expected} bytes, got {received}")]
    Truncated {
        /// The file.
        filename: String,
        /// Content-Length.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// A download is not a PNG, JPEG or WebP image.
    #[error("download of {filename} is not a PNG, JPEG or WebP image: {reason}")]
    NotAnImage {
        /// The file.
        filename: String,
        /// What was wrong.
        reason: String,
    },
    /// Writing a download to its sink failed.
    #[error("writing the download to its sink failed: {0}")]
    Sink(#[source] std::io::Error),
    /// The connection was not established in time.
    #[error("not connected to ComfyUI within {0:?}")]
    NotConnected(Duration),
    /// The connection was shut down (its cancellation token fired).
    #[error("the ComfyUI connection was shut down")]
    Closed,
    /// A prompt id ComfyUI 0.38 would refuse (`invalid_prompt_id`): not a UUID in canonical lowercase
    /// hyphenated form. Checked before anything is sent.
    #[error("prompt id {0:?} is not a canonical lowercase hyphenated UUID")]
    InvalidPromptId(String),
    /// A `POST /prompt` answer was lost and no lookup could tell whether ComfyUI queued the prompt: it may be
    /// queued (and then runs) or not. Never re-sent blindly.
    #[error("cannot tell whether ComfyUI queued prompt {prompt_id}: {cause}")]
    Unconfirmed {
        /// The prompt.
        prompt_id: String,
        /// The last failure (of the POST or of the lookup).
        #[source]
        cause: Box<ComfyError>,
    },
}

/// What a failed `POST /prompt` attempt says about ComfyUI's queue: the retry classifier of
/// [`super::ComfyClient::queue_prompt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitFailure {
    /// The request never reached ComfyUI (connection refused, DNS, TLS): sending it again cannot queue the
    /// prompt twice.
    NotSent,
    /// ComfyUI may have queued it and the answer was lost (timeout, connection cut after sending, 5xx, 429):
    /// look the prompt id up before sending it again. ComfyUI does not reject a repeated prompt id.
    AnswerLost,
    /// ComfyUI (or the client) refused it for good (validation, other 4xx, an invalid id): never retried.
    Refused,
}

impl ComfyError {
    /// True when retrying the same call later can succeed: transport failures, timeouts, 5xx, 429,
    /// websocket failures and truncated downloads. Never 4xx, validation or protocol errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout { .. }
            | Self::Transport { .. }
            | Self::WebSocket(_)
            | Self::Server { .. }
            | Self::Truncated { .. }
            | Self::NotConnected(_) => true,
            Self::Rejected { status, .. } => *status == 429,
            Self::InvalidUrl(_)
            | Self::Validation { .. }
            | Self::Forbidden { .. }
            | Self::NotFound { .. }
            | Self::Protocol(_)
            | Self::NotAnImage { .. }
            | Self::Sink(_)
            | Self::Closed
            | Self::InvalidPromptId(_) => false,
            // A later lookup can settle it.
            Self::Unconfirmed { .. } => true,
        }
    }

    /// How a failed `POST /prompt` must be retried (see [`SubmitFailure`]).
    pub fn submit_failure(&self) -> SubmitFailure {
        match self {
            Self::Transport { source, .. } if source.is_connect() => SubmitFailure::NotSent,
            Self::Timeout { .. }
            | Self::Transport { .. }
            | Self::Server { .. }
            | Self::Unconfirmed { .. } => SubmitFailure::AnswerLost,
            Self::Rejected { status, .. } if *status == 429 => SubmitFailure::AnswerLost,
            Self::Rejected { .. }
            | Self::InvalidUrl(_)
            | Self::Validation { .. }
            | Self::Forbidden { .. }
            | Self::NotFound { .. }
            | Self::WebSocket(_)
            | Self::Protocol(_)
            | Self::Truncated { .. }
            | Self::NotAnImage { .. }
            | Self::Sink(_)
            | Self::NotConnected(_)
            | Self::Closed
            | Self::InvalidPromptId(_) => SubmitFailure::Refused,
        }
    }

    /// Maps a reqwest failure; `after` is the deadline the request ran under.
    pub(crate) fn transport(operation: impl Into<String>, after: Duration, source: reqwest::Error) -> Self {
        let operation = operation.into();
        if source.is_timeout() {
            return Self::Timeout { operation, after };
        }
        Self::Transport { operation, source: source.without_url() }
    }

    /// Maps a non-success HTTP answer to an error. `path` is the request path, never the full URL.
    pub(crate) fn from_status(status: u16, path: &str, body: &str) -> Self {
        let path = path.to_owned();
        match status {
            400 => parse_validation(body).unwrap_or_else(|| Self::Rejected {
                status,
                path,
                body: truncate(body),
            }),
            403 => Self::Forbidden { path },
            404 => Self::NotFound { path },
            500..=599 => Self::Server { status, path, body: truncate(body) },
            _ => Self::Rejected { status, path, body: truncate(body) },
        }
    }
}

fn truncate(body: &str) -> String {
    const MAX: usize = 512;
    let body = body.trim();
    if body.len() <= MAX {
        return body.to_owned();
    }
    let mut end = MAX;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &body[..end])
}

fn str_field(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Parses ComfyUI's 400 body `{"error": {type, message, details, extra_info}, "node_errors": {...}}`.
fn parse_validation(body: &str) -> Option<ComfyError> {
    let v: Value = serde_json::from_str(body).ok()?;
    let error = v.get("error")?;
    let (error_type, message, details) = match error {
        Value::Object(_) => {
            (str_field(error, "type"), str_field(error, "message"), str_field(error, "details"))
        }
        Value::String(s) => (String::new(), s.clone(), String::new()),
        _ => return None,
    };
    Some(ComfyError::Validation {
        error_type,
        message,
        details,
        node_errors: v.get("node_errors").map(parse_node_errors).unwrap_or_default(),
    })
}

/// Flattens a `node_errors` object (`{node_id: {errors: [...], class_type, dependent_outputs}}`).
pub(crate) fn parse_node_errors(v: &Value) -> Vec<NodeError> {
    let Some(map) = v.as_object() else { return Vec::new() };
    let mut out = Vec::new();
    for (node_id, entry) in map {
        let class_type = str_field(entry, "class_type");
        let dependent_outputs: Vec<String> = entry
            .get("dependent_outputs")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).collect())
            .unwrap_or_default();
        let errors = entry.get("errors").and_then(Value::as_array).cloned().unwrap_or_default();
        if errors.is_empty() {
            out.push(NodeError {
                node_id: node_id.clone(),
                class_type: class_type.clone(),
                error_type: String::new(),
                message: String::new(),
                details: String::new(),
                input_name: None,
                dependent_outputs: dependent_outputs.clone(),
            });
        }
        for e in errors {
            out.push(NodeError {
                node_id: node_id.clone(),
                class_type: class_type.clone(),
                error_type: str_field(&e, "type"),
                message: str_field(&e, "message"),
                details: str_field(&e, "details"),
                input_name: e
                    .get("extra_info")
                    .and_then(|x| x.get("input_name"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                dependent_outputs: dependent_outputs.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_body_is_typed_with_flattened_node_errors() {
        let body = r#"{"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}}, "node_errors": {"2": {"errors": [{"type": "value_smaller_than_min", "message": "Value smaller than min", "details": "width", "extra_info": {"input_name": "width", "input_config": ["INT", {"min": 1}], "received_value": 0}}, {"type": "required_input_missing", "message": "Required input is missing", "details": "height", "extra_info": {"input_name": "height"}}], "dependent_outputs": ["3"], "class_type": "EmptyImage"}}}"#;
        let ComfyError::Validation { error_type, node_errors, .. } =
            ComfyError::from_status(400, "/prompt", body)
        else {
            panic!("not a validation error");
        };
        assert_eq!(error_type, "prompt_outputs_failed_validation");
        assert_eq!(node_errors.len(), 2);
        assert_eq!(node_errors[0].node_id, "2");
        assert_eq!(node_errors[0].class_type, "EmptyImage");
        assert_eq!(node_errors[0].error_type, "value_smaller_than_min");
        assert_eq!(node_errors[0].input_name.as_deref(), Some("width"));
        assert_eq!(node_errors[1].input_name.as_deref(), Some("height"));
    }

    #[test]
    fn invalid_prompt_without_node_errors() {
        let body = r#"{"error": {"type": "invalid_prompt", "message": "Cannot execute because node NoSuchNode does not exist.", "details": "Node ID '#2'", "extra_info": {}}, "node_errors": {}}"#;
        let e = ComfyError::from_status(400, "/prompt", body);
        assert!(matches!(&e, ComfyError::Validation { error_type, node_errors, details, .. }
            if error_type == "invalid_prompt" && node_errors.is_empty() && details == "Node ID '#2'"));
        assert!(!e.is_retryable());
    }

    #[test]
    fn classification() {
        let plain500 = "500 Internal Server Error\n\nServer got itself in trouble";
        let e = ComfyError::from_status(500, "/prompt", plain500);
        assert!(matches!(e, ComfyError::Server { status: 500, .. }));
        assert!(e.is_retryable());
        assert!(matches!(ComfyError::from_status(403, "/ws", ""), ComfyError::Forbidden { .. }));
        assert!(!ComfyError::from_status(403, "/ws", "").is_retryable());
        assert!(matches!(ComfyError::from_status(404, "/x", ""), ComfyError::NotFound { .. }));
        assert!(!ComfyError::from_status(400, "/upload/image", "").is_retryable());
        assert!(matches!(
            ComfyError::from_status(400, "/upload/image", ""),
            ComfyError::Rejected { status: 400, .. }
        ));
        assert!(ComfyError::from_status(429, "/prompt", "").is_retryable());
        assert!(!ComfyError::from_status(405, "/prompt", "405: Method Not Allowed").is_retryable());
        assert!(ComfyError::Timeout { operation: "x".into(), after: Duration::from_secs(1) }.is_retryable());
        assert!(!ComfyError::Protocol("x".into()).is_retryable());
    }
}
