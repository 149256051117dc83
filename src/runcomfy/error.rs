//! The RunComfy client's error type and its retry classification.
//!
//! Knows HTTP status codes and RunComfy's error codes; knows nothing about pools or jobs.

use std::time::Duration;

/// Everything a RunComfy Server API call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RunComfyError {
    /// The client was configured wrongly (bad base URL, empty user id...).
    #[error("invalid RunComfy client configuration: {0}")]
    Config(String),
    /// No complete answer within the per-request timeout.
    #[error("RunComfy request timed out after {0:?}")]
    Timeout(Duration),
    /// The request could not be sent or the answer not read.
    #[error("RunComfy transport error")]
    Transport(#[source] reqwest::Error),
    /// HTTP 429: the account's rate limit was exceeded (the call was not processed).
    #[error("RunComfy rate limit exceeded (retry after {retry_after:?})")]
    RateLimited {
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// HTTP 401: the token is missing, invalid or expired.
    #[error("RunComfy rejected the API token (HTTP 401): {message}")]
    Unauthorized {
        /// The server's message.
        message: String,
    },
    /// HTTP 403: the token does not own this user id or resource (or, behind API Gateway, an unknown route).
    #[error("RunComfy refused access (HTTP 403): {message}")]
    Forbidden {
        /// The server's message.
        message: String,
    },
    /// HTTP 404 for a server (after any grace period for freshly launched servers).
    #[error("RunComfy server {server_id} not found")]
    NotFound {
        /// The server asked for (empty for collection calls).
        server_id: String,
    },
    /// An error reported in the body, including RunComfy's "HTTP 200 with `error_code`" style.
    #[error("RunComfy API error {code} (HTTP {http_status}): {message}")]
    Api {
        /// The HTTP status that carried it (often 200).
        http_status: u16,
        /// `error_code`, verbatim (numeric codes as decimal text), or empty.
        code: String,
        /// `error_message` (or `message`/`error`/`detail`).
        message: String,
    },
    /// Any other non-success HTTP status.
    #[error("RunComfy answered HTTP {status}: {message}")]
    Http {
        /// The HTTP status.
        status: u16,
        /// The message extracted from the body, or a prefix of it.
        message: String,
    },
    /// A success status with a body that is not what the API documents.
    #[error("unexpected RunComfy response: {0}")]
    Decode(String),
    /// A launched server did not become Ready in time.
    #[error("RunComfy server {server_id} not ready after {waited:?} (last status {last_status})")]
    ReadyTimeout {
        /// The server.
        server_id: String,
        /// How long we waited.
        waited: Duration,
        /// Its last status.
        last_status: String,
    },
    /// Every launch attempt failed, and after each the server list showed that no machine was created:
    /// the API's refusal is certain.
    #[error(
        "RunComfy did not launch a machine ({attempts} attempts; the server list showed none after each)"
    )]
    NotLaunched {
        /// Attempts made.
        attempts: usize,
        /// The last attempt's failure.
        #[source]
        last: Box<RunComfyError>,
    },
    /// After an ambiguous launch failure, several new servers on the account match the request: one may
    /// be the machine launched, but another client of the account launched alike, so none is taken.
    #[error(
        "cannot tell which of {candidates} new servers is the one launched (another client launched alike)"
    )]
    Unattributable {
        /// Matching new servers.
        candidates: usize,
    },
    /// A server waited on stopped for good (deleted, stopped, expired or failed) instead of becoming Ready.
    #[error("RunComfy server {server_id} ended with status {status} instead of becoming Ready")]
    ServerEnded {
        /// The server.
        server_id: String,
        /// Its terminal status (or `gone` if the API no longer knows it).
        status: String,
    },
}

/// Server-side error codes that mean "internal error, try again" (Serverless scheme, reused defensively).
const RETRYABLE_API_CODES: &[&str] = &["500001", "10000", "10007", "internal_error", "rate_limited"];

impl RunComfyError {
    /// Whether the same call may succeed if repeated later (for a launch: only after checking whether the
    /// first attempt happened, see [`RunComfyError::is_ambiguous`]).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Transport(_) | Self::RateLimited { .. } => true,
            Self::Http { status, .. } => *status >= 500 || *status == 408,
            Self::Api { http_status, code, .. } => {
                *http_status >= 500 || *http_status == 429 || RETRYABLE_API_CODES.contains(&code.as_str())
            }
            Self::Config(_)
            | Self::Unauthorized { .. }
            | Self::Forbidden { .. }
            | Self::NotFound { .. }
            | Self::Decode(_)
            | Self::ReadyTimeout { .. }
            | Self::ServerEnded { .. }
            | Self::NotLaunched { .. }
            | Self::Unattributable { .. } => false,
        }
    }

    /// Whether a failed call may nevertheless have taken effect on the server: a timeout, a connection lost
    /// after sending, a 5xx, an internal error in the body, or a success status with an unreadable body.
    /// A rate-limited call (429) or one that never connected did not.
    pub fn is_ambiguous(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Decode(_) | Self::Unattributable { .. } => true,
            Self::Transport(e) => !e.is_connect(),
            Self::RateLimited { .. } => false,
            Self::Api { http_status: 429, .. } => false,
            Self::Http { .. } | Self::Api { .. } => self.is_retryable(),
            Self::Config(_)
            | Self::Unauthorized { .. }
            | Self::Forbidden { .. }
            | Self::NotFound { .. }
            | Self::ReadyTimeout { .. }
            | Self::ServerEnded { .. }
            | Self::NotLaunched { .. } => false,
        }
    }

    /// The delay the server asked for, if this is a 429 that carried one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let api = |http_status, code: &str| RunComfyError::Api {
            http_status,
            code: code.into(),
            message: String::new(),
        };
        assert!(api(200, "500001").is_retryable() && api(200, "500001").is_ambiguous());
        assert!(!api(200, "10001").is_retryable() && !api(200, "10001").is_ambiguous());
        assert!(RunComfyError::RateLimited { retry_after: None }.is_retryable());
        assert!(!RunComfyError::RateLimited { retry_after: None }.is_ambiguous());
        assert!(RunComfyError::Http { status: 503, message: String::new() }.is_ambiguous());
        assert!(!RunComfyError::Http { status: 400, message: String::new() }.is_retryable());
        assert!(!RunComfyError::Unauthorized { message: String::new() }.is_retryable());
    }
}
