//! Rows of both SQL stores read into the store's types: the tables and their SQL types are the same in
//! SQLite and PostgreSQL, so one mapping serves both drivers through [`StoreRow`].

use super::{EventRow, JobRow, KeyRow, MachineRow};

/// The job columns every job query selects, in the order [`job`] reads them.
pub(super) const JOB_COLUMNS: &str = "id, tenant, state, terminal, workflow, priority, created_ms, updated_ms, ended_ms, request_id, last_seq, spec, record";
/// The API key columns, for [`key`].
pub(super) const KEY_COLUMNS: &str =
    "prefix, secret_sha256, tenant, role, created_ms, expires_ms, revoked_ms";
/// The machine columns, for [`machine`].
pub(super) const MACHINE_COLUMNS: &str = "id, kind, state, created_ms, updated_ms, body";

/// A row of either driver, read by SQL type: `TEXT`, `BIGINT` and `INTEGER`, nullable or not.
pub(super) trait StoreRow {
    /// A `TEXT NOT NULL` column.
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    /// A nullable `TEXT` column.
    fn text_or_null(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    /// A `BIGINT NOT NULL` column.
    fn bigint(&self, column: &str) -> Result<i64, sqlx::Error>;
    /// A nullable `BIGINT` column.
    fn bigint_or_null(&self, column: &str) -> Result<Option<i64>, sqlx::Error>;
    /// An `INTEGER NOT NULL` column.
    fn integer(&self, column: &str) -> Result<i32, sqlx::Error>;
}

/// Implements [`StoreRow`] for a driver's row type with `sqlx::Row::try_get`.
macro_rules! store_row {
    ($row:ty) => {
        impl StoreRow for $row {
            fn text(&self, column: &str) -> Result<String, sqlx::Error> {
                sqlx::Row::try_get(self, column)
            }
            fn text_or_null(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
                sqlx::Row::try_get(self, column)
            }
            fn bigint(&self, column: &str) -> Result<i64, sqlx::Error> {
                sqlx::Row::try_get(self, column)
            }
            fn bigint_or_null(&self, column: &str) -> Result<Option<i64>, sqlx::Error> {
                sqlx::Row::try_get(self, column)
            }
            fn integer(&self, column: &str) -> Result<i32, sqlx::Error> {
                sqlx::Row::try_get(self, column)
            }
        }
    };
}

store_row!(sqlx::sqlite::SqliteRow);
store_row!(sqlx::postgres::PgRow);

/// A job row (labels and artifacts are written at creation, not read back).
pub(super) fn job(row: &impl StoreRow) -> Result<JobRow, sqlx::Error> {
    Ok(JobRow {
        id: row.text("id")?,
        tenant: row.text("tenant")?,
        state: row.text("state")?,
        terminal: row.integer("terminal")? != 0,
        workflow: row.text("workflow")?,
        priority: row.integer("priority")?,
        created_ms: row.bigint("created_ms")?,
        updated_ms: row.bigint("updated_ms")?,
        ended_ms: row.bigint_or_null("ended_ms")?,
        request_id: row.text_or_null("request_id")?,
        last_seq: row.bigint("last_seq")? as u64,
        labels: Default::default(),
        artifacts: Vec::new(),
        spec: row.text("spec")?,
        record: row.text_or_null("record")?.unwrap_or_default(),
    })
}

/// An event row.
pub(super) fn event(row: &impl StoreRow) -> Result<EventRow, sqlx::Error> {
    Ok(EventRow {
        job_id: row.text("job_id")?,
        seq: row.bigint("seq")? as u64,
        time_ms: row.bigint("time_ms")?,
        body: row.text("body")?,
    })
}

/// An API key row.
pub(super) fn key(row: &impl StoreRow) -> Result<KeyRow, sqlx::Error> {
    Ok(KeyRow {
        prefix: row.text("prefix")?,
        secret_sha256: row.text("secret_sha256")?,
        tenant: row.text("tenant")?,
        role: row.text("role")?,
        created_ms: row.bigint("created_ms")?,
        expires_ms: row.bigint_or_null("expires_ms")?,
        revoked_ms: row.bigint_or_null("revoked_ms")?,
    })
}

/// A machine row.
pub(super) fn machine(row: &impl StoreRow) -> Result<MachineRow, sqlx::Error> {
    Ok(MachineRow {
        id: row.text("id")?,
        kind: row.text("kind")?,
        state: row.text("state")?,
        created_ms: row.bigint("created_ms")?,
        updated_ms: row.bigint("updated_ms")?,
        body: row.text("body")?,
    })
}
