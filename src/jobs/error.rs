//! Errors of the job engine's operations (not of jobs themselves: those are `JobFailure`s).

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
    /// The service is shutting down.
    #[error("comfyrelay is shutting down")]
    ShuttingDown,
    /// Storage failed.
    #[error("storage failed")]
    Store(#[from] StoreError),
    /// The artifact directory failed.
    #[error("artifact storage failed")]
    Artifact(#[from] ArtifactError),
    /// A stored body could not be decoded.
    #[error("corrupt stored record")]
    Corrupt(#[from] serde_json::Error),
}
