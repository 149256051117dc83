//! Durable storage of jobs, events, idempotency keys, artifact references and machines, behind the narrow
//! [`Store`] trait (SQLite by default; the SQL is kept portable for PostgreSQL), and the content-addressed
//! [`ArtifactStore`] directory for input images and outputs.
//!
//! The store knows rows, not domain types: job and event bodies are opaque JSON text owned by `jobs`.

mod artifacts;
mod sqlite;

use std::collections::BTreeMap;

pub use artifacts::{ArtifactError, ArtifactStore, ArtifactWriter, StoredArtifact};
pub use sqlite::SqliteStore;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The data directory could not be prepared.
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
}

/// One job row.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Job id.
    pub id: String,
    /// State name (opaque to the store).
    pub state: String,
    /// Whether the state is terminal.
    pub terminal: bool,
    /// Workflow name.
    pub workflow: String,
    /// Scheduling priority.
    pub priority: i32,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
    /// Last update, ms since the epoch.
    pub updated_ms: i64,
    /// End time, ms since the epoch.
    pub ended_ms: Option<i64>,
    /// Idempotency key.
    pub request_id: Option<String>,
    /// Labels, for filtering.
    pub labels: BTreeMap<String, String>,
    /// Artifact digests the job references (inputs and outputs), for garbage collection.
    pub artifacts: Vec<String>,
    /// The job's body (JSON owned by the job engine).
    pub body: String,
}

/// One logged event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// Job id.
    pub job_id: String,
    /// Per-job sequence, from 1.
    pub seq: u64,
    /// Time, ms since the epoch.
    pub time_ms: i64,
    /// The event's body (JSON owned by the job engine).
    pub body: String,
}

/// An idempotency key and the digest of the request it was first used with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The caller's `request_id`.
    pub request_id: String,
    /// Digest of the request.
    pub request_hash: String,
}

/// What `create_job` did.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    /// The job was stored.
    Created,
    /// The key was used before with the same request: here is that job.
    Existing(JobRow),
    /// The key was used before with a different request.
    Conflict {
        /// The job created with the key.
        job_id: String,
    },
}

/// A page query over jobs, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    /// Only these states (empty = all).
    pub states: Vec<String>,
    /// Only this workflow.
    pub workflow: Option<String>,
    /// Only jobs with all these labels.
    pub labels: Vec<(String, String)>,
    /// Only jobs strictly before this `(created_ms, id)` cursor.
    pub before: Option<(i64, String)>,
    /// Maximum rows.
    pub limit: u32,
}

/// One machine row.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRow {
    /// Machine id.
    pub id: String,
    /// Kind (opaque).
    pub kind: String,
    /// State (opaque).
    pub state: String,
    /// Creation time, ms.
    pub created_ms: i64,
    /// Last update, ms.
    pub updated_ms: i64,
    /// Body (JSON owned by the pool).
    pub body: String,
}

/// The storage interface the job engine and pool use. Every method is one transaction.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new job with its first event, honouring the idempotency key.
    ///
    /// # Errors
    /// Database failures.
    async fn create_job(
        &self,
        job: &JobRow,
        first_event: &EventRow,
        key: Option<&IdempotencyKey>,
    ) -> Result<CreateOutcome, StoreError>;

    /// Updates the job row and appends `events`, atomically.
    ///
    /// # Errors
    /// Database failures, including a duplicate sequence.
    async fn commit(&self, job: &JobRow, events: &[EventRow]) -> Result<(), StoreError>;

    /// Reads one job.
    ///
    /// # Errors
    /// Database failures.
    async fn get_job(&self, id: &str) -> Result<Option<JobRow>, StoreError>;

    /// Lists jobs, newest first.
    ///
    /// # Errors
    /// Database failures.
    async fn list_jobs(&self, query: &JobQuery) -> Result<Vec<JobRow>, StoreError>;

    /// Reads up to `limit` events of a job with `seq > after`, in order.
    ///
    /// # Errors
    /// Database failures.
    async fn events_after(&self, job_id: &str, after: u64, limit: u32) -> Result<Vec<EventRow>, StoreError>;

    /// Every job not in a terminal state, oldest first.
    ///
    /// # Errors
    /// Database failures.
    async fn unfinished_jobs(&self) -> Result<Vec<JobRow>, StoreError>;

    /// Deletes up to `limit` terminal jobs that ended before `before_ms`, with their events and keys.
    /// Returns the deleted ids and the artifact digests no longer referenced by any job.
    ///
    /// # Errors
    /// Database failures.
    async fn delete_finished_before(
        &self,
        before_ms: i64,
        limit: u32,
    ) -> Result<(Vec<String>, Vec<String>), StoreError>;
}

/// The machine records of the RunComfy pool: the pool's only storage dependency.
#[async_trait::async_trait]
pub trait MachineStore: Send + Sync + std::fmt::Debug + 'static {
    /// Inserts or replaces a machine.
    ///
    /// # Errors
    /// Database failures.
    async fn put_machine(&self, machine: &MachineRow) -> Result<(), StoreError>;

    /// Every machine row.
    ///
    /// # Errors
    /// Database failures.
    async fn list_machines(&self) -> Result<Vec<MachineRow>, StoreError>;

    /// Deletes a machine row (absent: no error).
    ///
    /// # Errors
    /// The database failed.
    async fn delete_machine(&self, id: &str) -> Result<(), StoreError>;
}
