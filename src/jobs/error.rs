//! Errors of the job engine's operations (not of jobs themselves: those are `JobFailure`s).

use std::sync::Arc;

use crate::store::{ArtifactError, StoreError};

/// One problem with a request field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field, e.g. `parameters[steps]`.
    pub field: String,
    /// What is wrong.
    pub description: String,
}

impl Violation {
    /// A violation.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// Why a job operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request is wrong; every problem is listed.
    #[error("invalid request")]
    InvalidArgument(Vec<Violation>),
    /// No such job or output.
    #[error("{0} not found")]
    NotFound(String),
    /// The idempotency key was used with a different request.
    #[error("request_id {request_id} was already used for job {job_id} with a different request")]
    AlreadyExists {
        /// The key.
        request_id: String,
        /// The job it created.
        job_id: String,
    },
    /// Too much is waiting: the caller should retry later.
    #[error("{what} is at its limit of {limit} (setting {setting})")]
    ResourceExhausted {
        /// What is full.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The setting that raises it.
        setting: &'static str,
    },
    /// A tenant's quota would be exceeded: the caller should retry later.
    #[error("quota {} of {} reached", .0.quota.setting(), .0.limit)]
    QuotaExceeded(super::quota::QuotaExceeded),
    /// The service is shutting down.
    #[error("comfyrelay is shutting down")]
    ShuttingDown,
    /// Storage failed.
    #[error("storage failed")]
    Store(#[source] Arc<StoreError>),
    /// The artifact directory failed.
    #[error("artifact storage failed")]
    Artifact(#[from] ArtifactError),
    /// A stored body could not be decoded.
    #[error("corrupt stored record")]
    Corrupt(#[from] serde_json::Error),
    /// The job log refused or lost an event (a comfyrelay bug when it reaches a caller).
    #[error("job log: {0}")]
    Log(String),
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        JobError::Store(Arc::new(e))
    }
}
