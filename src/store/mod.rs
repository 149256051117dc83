//! Durable storage of jobs, their event logs, idempotency keys, artifact references and machines, behind
//! the narrow [`Store`] trait (SQLite by default, [`SqliteStore`]; or PostgreSQL, [`PgStore`], for several
//! replicas sharing one database), and the content-addressed [`ArtifactStore`] directory for input images and outputs.
//!
//! The store knows rows, not domain types: a job is an immutable spec written once at submit plus a small
//! record of its current state, both opaque JSON owned by `jobs`; events are small rows appended to a
//! per-job log. Writes are append-shaped and come in batches ([`Batch`]): the job engine's one writer
//! commits what has arrived together in one transaction (group commit).
//!
//! # Durability ([`Durability`])
//! - `crash` (default): SQLite in WAL mode with `synchronous = NORMAL`, artifacts written without fsync.
//!   Everything acknowledged (a submitted job, an event a subscriber saw, an output a terminal event
//!   names) survives a crash of the process (SIGKILL, OOM, panic), because the kernel already holds it.
//!   A power loss or kernel crash can lose the transactions of the last moments and artifact contents
//!   not yet written back; the database stays consistent and a damaged artifact is detected by its digest.
//! - `power`: `synchronous = FULL` and every artifact fsynced (file and directory) before the event that
//!   references it commits: what was acknowledged also survives a power loss, for about two more fsyncs
//!   per job and one per group commit.
//!
//! On PostgreSQL ([`PgStore`]) what survives is the server's configuration (`synchronous_commit`, `fsync`,
//! replication); [`Durability`] then governs the artifacts only.

mod artifacts;
#[cfg(test)]
mod contract;
mod lease;
mod postgres;
mod rows;
mod sqlite;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use artifacts::{
    ArtifactError, ArtifactReader, ArtifactStore, ArtifactWriter, StoredArtifact, check_artifacts_url,
};
pub use lease::{LEADER_LOCK, LeaderLease};
pub use postgres::{DEFAULT_MAX_CONNECTIONS, EVENTS_CHANNEL, EventNotice, EventNotifications, PgStore};
pub use sqlite::SqliteStore;

/// What survives what; see the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Survives a process crash; no fsync on the job path.
    #[default]
    Crash,
    /// Also survives a power loss: fsync per commit and per artifact.
    Power,
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The job log's write connection failed.
    #[error("database error")]
    Write(#[from] rusqlite::Error),
    /// A migration failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The data directory could not be prepared.
    #[error("data directory")]
    Io(#[from] std::io::Error),
    /// Another replica took the leader lease since this one's (term `term`; the database holds `current`):
    /// this replica no longer leads and must not write.
    #[error("this replica's leader term {term} was superseded by term {current}")]
    Fenced {
        /// This replica's term.
        term: i64,
        /// The term the database holds.
        current: i64,
    },
    /// A row written by an earlier version could not be converted.
    #[error("cannot migrate stored job {id}: {reason}")]
    Legacy {
        /// The job.
        id: String,
        /// Why.
        reason: String,
    },
}

impl StoreError {
    /// Whether the database could not be reached or could not take the statement now (the server is down
    /// or restarting, out of connections, the pool waited too long for one), or this replica no longer
    /// leads: a caller should retry, soon, here or on another replica. Failures of the data itself, the
    /// disk or a migration are not.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Database(e) => match e {
                sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed => true,
                // SQLSTATE classes 08 (connection exception) and 53 (insufficient resources: too many
                // connections), and 57P01–57P03 (the server shutting down, crashed, or not yet accepting).
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    code.starts_with("08")
                        || code.starts_with("53")
                        || matches!(&*code, "57P01" | "57P02" | "57P03")
                }),
                _ => false,
            },
            Self::Fenced { .. } => true,
            Self::Write(_) | Self::Migrate(_) | Self::Io(_) | Self::Legacy { .. } => false,
        }
    }
}

/// One job row: the columns the store filters and sorts on, and two opaque bodies.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Job id.
    pub id: String,
    /// The tenant it belongs to (`default` for jobs stored before tenants existed).
    pub tenant: String,
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
    /// Sequence of the last event in the log.
    pub last_seq: u64,
    /// Labels, for filtering (written at creation; not read back: they are in the spec).
    pub labels: BTreeMap<String, String>,
    /// Artifact digests the job references at creation (its inputs), for garbage collection.
    pub artifacts: Vec<String>,
    /// The immutable spec (JSON owned by the job engine), written once.
    pub spec: String,
    /// The current state record (JSON owned by the job engine).
    pub record: String,
}

/// One logged event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    /// Job id.
    pub job_id: String,
    /// Per-job sequence, from 1, gap-free.
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

/// A job to create: its row, its first event and its idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// The row.
    pub row: JobRow,
    /// Event 1.
    pub first_event: EventRow,
    /// The key, if the caller gave one.
    pub key: Option<IdempotencyKey>,
}

/// The new state of a job after a batch's events.
#[derive(Debug, Clone, PartialEq)]
pub struct StateUpdate {
    /// Job id.
    pub id: String,
    /// State name.
    pub state: String,
    /// Whether it is terminal.
    pub terminal: bool,
    /// Update time, ms.
    pub updated_ms: i64,
    /// End time, ms.
    pub ended_ms: Option<i64>,
    /// Sequence of its last event.
    pub last_seq: u64,
    /// The state record.
    pub record: String,
}

/// Everything one group commit writes, in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// New jobs (checked against their idempotency keys first, in order).
    pub creates: Vec<NewJob>,
    /// Events appended to existing jobs.
    pub events: Vec<EventRow>,
    /// The resulting state of every job those events touched.
    pub updates: Vec<StateUpdate>,
    /// Artifacts newly referenced by existing jobs `(job_id, sha256)` (outputs).
    pub artifacts: Vec<(String, String)>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.creates.is_empty() && self.events.is_empty() && self.updates.is_empty()
    }
}

/// What happened to one [`NewJob`] of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The job was stored.
    Created,
    /// The key was used before with the same request: this job has it.
    Existing {
        /// The job created with the key.
        job_id: String,
    },
    /// The key was used before with a different request.
    Conflict {
        /// The job created with the key.
        job_id: String,
    },
}

/// A page query over jobs, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    /// Only this tenant's jobs (`None`: every tenant's).
    pub tenant: Option<String>,
    /// Only these states (empty = all).
    pub states: Vec<String>,
    /// Only this workflow.
    pub workflow: Option<String>,
    /// Only jobs with all these labels.
    pub labels: Vec<(String, String)>,
    /// Only jobs strictly before this `(created_ms, id)` cursor.
    pub before: Option<(i64, String)>,
    /// Only jobs that ended at or after this time, ms (so finished ones).
    pub ended_since: Option<i64>,
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

/// A job row written by an earlier version of comfyrelay, whose single body held the whole job. The job
/// engine converts it into a spec and a record when the store opens ([`Store::migrate_legacy`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyJob {
    /// Job id.
    pub id: String,
    /// The old body.
    pub body: String,
}

/// The storage interface of the job engine: few operations, append-shaped, portable SQL. Every method is
/// one transaction.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Writes a batch atomically: creates (honouring idempotency keys, in order, so a key repeated within
    /// the batch finds the first), appended events, state updates and artifact references. Returns one
    /// outcome per create, in order.
    ///
    /// # Errors
    /// Database failures, including a duplicate sequence; then nothing of the batch is written.
    async fn commit(&self, batch: &Batch) -> Result<Vec<CreateOutcome>, StoreError>;

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

    /// Rows written by an earlier version (one body per job), at most `limit`.
    ///
    /// # Errors
    /// Database failures.
    async fn legacy_jobs(&self, limit: u32) -> Result<Vec<LegacyJob>, StoreError>;

    /// Replaces a legacy row's body by its converted spec and record.
    ///
    /// # Errors
    /// Database failures.
    async fn migrate_legacy(
        &self,
        id: &str,
        spec: &str,
        record: &str,
        last_seq: u64,
    ) -> Result<(), StoreError>;
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

/// One API key: its public prefix, the SHA-256 of its secret (the key itself is never stored), whose it is
/// and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// The public prefix that names the key (in logs, `keys list`, `keys revoke`).
    pub prefix: String,
    /// Hex SHA-256 of the whole key.
    pub secret_sha256: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// Its role (opaque to the store).
    pub role: String,
    /// Creation, ms since the epoch.
    pub created_ms: i64,
    /// Expiry, ms since the epoch.
    pub expires_ms: Option<i64>,
    /// Revocation, ms since the epoch.
    pub revoked_ms: Option<i64>,
}

/// The API keys: the authenticator's and the operator CLI's only storage dependency.
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new key.
    ///
    /// # Errors
    /// Database failures (a prefix already used included).
    async fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError>;

    /// The key with this prefix.
    ///
    /// # Errors
    /// Database failures.
    async fn get_key(&self, prefix: &str) -> Result<Option<KeyRow>, StoreError>;

    /// Every key, oldest first.
    ///
    /// # Errors
    /// Database failures.
    async fn list_keys(&self) -> Result<Vec<KeyRow>, StoreError>;

    /// Marks the key revoked at `now_ms`; returns whether a key not yet revoked had this prefix.
    ///
    /// # Errors
    /// Database failures.
    async fn revoke_key(&self, prefix: &str, now_ms: i64) -> Result<bool, StoreError>;
}
