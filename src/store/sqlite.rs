//! The SQLite implementation of [`Store`] and [`MachineStore`]: one file in the data directory, WAL,
//! versioned migrations, one transaction per batch.
//!
//! Every write transaction starts with `BEGIN IMMEDIATE`: it takes SQLite's write lock up front (waiting up
//! to the busy timeout), so a transaction that reads and then writes can never fail with `SQLITE_BUSY`
//! when another connection committed in between.
//!
//! Two kinds of connection share the file: an sqlx pool for reads, migrations and machine rows (async, each
//! statement a round trip to sqlx's connection thread), and one rusqlite connection for the job log's group
//! commit, called synchronously from the log writer's own thread with cached prepared statements: a batch
//! of any size costs one lock and no thread hop.

use std::{
    path::Path,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::{
    QueryBuilder, Row, Sqlite,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};

use super::{
    Batch, CreateOutcome, Durability, EventRow, JobQuery, JobRow, LegacyJob, Store, StoreError,
    rows::{self, JOB_COLUMNS},
};

/// SQLite-backed store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Reads, migrations and the machine rows (sqlx, async).
    pool: SqlitePool,
    /// The job log's group commit: one rusqlite connection, used synchronously by its caller (the log
    /// writer, on its own thread), so a batch costs no hop to a connection thread per statement.
    writer: Arc<Mutex<rusqlite::Connection>>,
    /// The database file, for the checkpointer's connection.
    path: std::path::PathBuf,
    /// Moves the WAL into the database file off the writer's thread, once started by
    /// [`SqliteStore::checkpoint_in_background`] (see [`Checkpointer`]).
    checkpointer: Arc<std::sync::OnceLock<Checkpointer>>,
}

/// How often the checkpointer copies committed WAL frames into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The WAL checkpoints, on a thread of their own with their own connection. SQLite would otherwise run them
/// inside the commit that crosses 1,000 WAL pages, on the job log's writer, which then waits for the
/// checkpoint's fsync of the database file (tens of milliseconds here) while every job's events queue up
/// behind it. `PASSIVE` never blocks the writer; the WAL stays bounded by what commits in one interval.
/// The thread stops when the store's last clone is dropped (its channel closes). Only the serving process
/// starts one; a short-lived one (`comfyrelay keys`) keeps SQLite's own checkpoints.
#[derive(Debug)]
struct Checkpointer {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Self, StoreError> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new().name("sqlite-checkpoint".into()).spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY)
            {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; retried at the next interval");
                }
            }
        })?;
        Ok(Self { _stop: stop })
    }
}

/// Creates `dir` (and parents) readable by this user only.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // An existing directory keeps its mode from an earlier version: tighten it.
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl SqliteStore {
    /// A write transaction on the sqlx pool (machine rows; one replica, so nothing to fence).
    pub(super) async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// Opens (creating if needed, readable by this user only) `comfyrelay.db` in `data_dir` and runs
    /// pending migrations.
    ///
    /// # Errors
    /// The file cannot be opened or a migration fails.
    pub async fn open(data_dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        let path = data_dir.join("comfyrelay.db");
        {
            let (dir, path) = (data_dir.to_path_buf(), path.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
                create_private_dir(&dir)?;
                // SQLite gives the -wal and -shm files the mode of the database file.
                std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            })
            .await
            .map_err(std::io::Error::other)??;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL under WAL: a commit survives a process crash and costs no fsync; FULL also syncs
            // the WAL on every commit so it survives a power loss (see `Durability`).
            .synchronous(match durability {
                Durability::Crash => SqliteSynchronous::Normal,
                Durability::Power => SqliteSynchronous::Full,
            })
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // Another process may be opening the same new file at the same moment (`comfyrelay keys` while the
        // server starts): switching it to WAL can then find it busy, and sqlx takes no lock on SQLite for
        // migrations, so both can find one pending and one fails on what the other created. That one tries
        // again: it then finds the other's migrations applied (each commits on its own) and waits on SQLite's
        // write lock for the rest.
        let mut attempt = 0;
        let pool = loop {
            let result = match SqlitePoolOptions::new().max_connections(4).connect_with(options.clone()).await
            {
                Ok(pool) => sqlx::migrate!("src/store/migrations")
                    .run(&pool)
                    .await
                    .map(|()| pool)
                    .map_err(StoreError::from),
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(pool) => break pool,
                Err(e) if attempt < 10 && lost_a_race(&e) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let writer = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open_writer(&path, durability))
                .await
                .map_err(std::io::Error::other)??
        };
        Ok(Self { pool, writer: Arc::new(Mutex::new(writer)), path, checkpointer: Default::default() })
    }

    /// Moves WAL checkpoints off the job log's writer onto a thread of their own (see `Checkpointer`): for
    /// the process that runs the job engine. Idempotent.
    ///
    /// # Errors
    /// The checkpointer's connection or thread cannot be made.
    pub fn checkpoint_in_background(&self) -> Result<(), StoreError> {
        if self.checkpointer.get().is_some() {
            return Ok(());
        }
        let checkpointer = Checkpointer::start(&self.path)?;
        // Checkpoints are the checkpointer's from now on, never inside a commit of the writer.
        self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pragma_update(
            None,
            "wal_autocheckpoint",
            0,
        )?;
        drop(self.checkpointer.set(checkpointer));
        Ok(())
    }
}

/// Opens the job log's write connection with the pool's settings.
fn open_writer(path: &Path, durability: Durability) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Crash => "NORMAL",
            Durability::Power => "FULL",
        },
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// One group commit in one `BEGIN IMMEDIATE` transaction, with cached prepared statements.
fn commit_batch(
    conn: &mut rusqlite::Connection,
    batch: &Batch,
) -> Result<Vec<CreateOutcome>, rusqlite::Error> {
    use rusqlite::{OptionalExtension, TransactionBehavior, params};
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(batch.creates.len());
    {
        let mut find_key = tx.prepare_cached(
            "SELECT request_hash, job_id FROM idempotency WHERE tenant = ?1 AND request_id = ?2",
        )?;
        let mut insert_job = tx.prepare_cached(
            "INSERT INTO jobs (id, state, terminal, workflow, priority, created_ms, updated_ms, ended_ms, \
             request_id, last_seq, spec, record, tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        let mut insert_key = tx.prepare_cached(
            "INSERT INTO idempotency (tenant, request_id, request_hash, job_id) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut insert_label =
            tx.prepare_cached("INSERT INTO job_labels (job_id, key, value) VALUES (?1, ?2, ?3)")?;
        let mut insert_event =
            tx.prepare_cached("INSERT INTO job_events (job_id, seq, time_ms, body) VALUES (?1, ?2, ?3, ?4)")?;
        let mut insert_artifact = tx.prepare_cached(
            "INSERT INTO job_artifacts (job_id, sha256) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?;
        let mut update_job = tx.prepare_cached(
            "UPDATE jobs SET state = ?1, terminal = ?2, updated_ms = ?3, ended_ms = ?4, last_seq = ?5, record = ?6 \
             WHERE id = ?7",
        )?;
        let event = |stmt: &mut rusqlite::CachedStatement<'_>, e: &EventRow| {
            stmt.execute(params![e.job_id, seq_param(e.seq), e.time_ms, e.body]).map(drop)
        };
        for new in &batch.creates {
            if let Some(key) = &new.key {
                let existing = find_key
                    .query_row(params![new.row.tenant, key.request_id], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })
                    .optional()?;
                if let Some((hash, job_id)) = existing {
                    outcomes.push(if hash == key.request_hash {
                        CreateOutcome::Existing { job_id }
                    } else {
                        CreateOutcome::Conflict { job_id }
                    });
                    continue;
                }
            }
            let job = &new.row;
            insert_job.execute(params![
                job.id,
                job.state,
                job.terminal as i64,
                job.workflow,
                job.priority as i64,
                job.created_ms,
                job.updated_ms,
                job.ended_ms,
                job.request_id,
                seq_param(job.last_seq),
                job.spec,
                job.record,
                job.tenant,
            ])?;
            if let Some(key) = &new.key {
                insert_key.execute(params![job.tenant, key.request_id, key.request_hash, job.id])?;
            }
            for (k, v) in &job.labels {
                insert_label.execute(params![job.id, k, v])?;
            }
            for sha in &job.artifacts {
                insert_artifact.execute(params![job.id, sha])?;
            }
            event(&mut insert_event, &new.first_event)?;
            outcomes.push(CreateOutcome::Created);
        }
        for e in &batch.events {
            event(&mut insert_event, e)?;
        }
        for u in &batch.updates {
            update_job.execute(params![
                u.state,
                u.terminal as i64,
                u.updated_ms,
                u.ended_ms,
                seq_param(u.last_seq),
                u.record,
                u.id,
            ])?;
        }
        for (job, sha) in &batch.artifacts {
            insert_artifact.execute(params![job, sha])?;
        }
    }
    tx.commit()?;
    Ok(outcomes)
}

/// Whether opening failed because another process was opening the same database at the same moment.
fn lost_a_race(e: &StoreError) -> bool {
    // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with or without an extended code.
    let busy = |e: &sqlx::Error| {
        matches!(e, sqlx::Error::Database(db)
            if db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| matches!(c & 0xff, 5 | 6)))
    };
    match e {
        StoreError::Database(e) => busy(e),
        StoreError::Migrate(
            sqlx::migrate::MigrateError::Execute(_) | sqlx::migrate::MigrateError::ExecuteMigration(..),
        ) => true,
        StoreError::Migrate(_)
        | StoreError::Write(_)
        | StoreError::Io(_)
        | StoreError::Fenced { .. }
        | StoreError::Legacy { .. } => false,
    }
}

/// A sequence as SQL's BIGINT: sequences are far below 2⁶³; a caller's larger number clamps (it matches no
/// event) instead of wrapping to a negative one (which would match them all).
fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn commit(&self, batch: &Batch) -> Result<Vec<CreateOutcome>, StoreError> {
        // Synchronous on the caller's thread: the job log's writer runs on a thread of its own (see
        // `jobs::log`), where a transaction blocking it blocks nothing else.
        let mut conn = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(commit_batch(&mut conn, batch)?)
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(rows::job).transpose()?)
    }

    async fn list_jobs(&self, q: &JobQuery) -> Result<Vec<JobRow>, StoreError> {
        let mut sql = QueryBuilder::<Sqlite>::new(format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE 1 = 1"));
        if !q.states.is_empty() {
            sql.push(" AND j.state IN (");
            let mut list = sql.separated(", ");
            for s in &q.states {
                list.push_bind(s);
            }
            sql.push(")");
        }
        rows::push_job_filters(&mut sql, q);
        let rows = sql.build().fetch_all(&self.pool).await?;
        Ok(rows.iter().map(rows::job).collect::<Result<_, _>>()?)
    }

    async fn events_after(&self, job_id: &str, after: u64, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT job_id, seq, time_ms, body FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(job_id)
        .bind(seq_param(after))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(rows::event).collect::<Result<_, _>>()?)
    }

    async fn unfinished_jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE terminal = 0 ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(rows::job).collect::<Result<_, _>>()?)
    }

    async fn delete_finished_before(
        &self,
        before_ms: i64,
        limit: u32,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let ids: Vec<String> =
            sqlx::query("SELECT id FROM jobs WHERE terminal = 1 AND ended_ms < ? ORDER BY ended_ms LIMIT ?")
                .bind(before_ms)
                .bind(limit as i64)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get("id"))
                .collect::<Result<_, _>>()?;
        let mut orphaned = Vec::new();
        for id in &ids {
            let shas: Vec<String> = sqlx::query("SELECT sha256 FROM job_artifacts WHERE job_id = ?")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get("sha256"))
                .collect::<Result<_, _>>()?;
            // Explicit deletes rather than relying on ON DELETE CASCADE, which some deployments disable.
            for table in ["job_events", "job_labels", "job_artifacts", "idempotency"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE job_id = ?"))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM jobs WHERE id = ?").bind(id).execute(&mut *tx).await?;
            for sha in shas {
                let still: Option<sqlx::sqlite::SqliteRow> =
                    sqlx::query("SELECT 1 FROM job_artifacts WHERE sha256 = ? LIMIT 1")
                        .bind(&sha)
                        .fetch_optional(&mut *tx)
                        .await?;
                if still.is_none() && !orphaned.contains(&sha) {
                    orphaned.push(sha);
                }
            }
        }
        tx.commit().await?;
        Ok((ids, orphaned))
    }

    async fn legacy_jobs(&self, limit: u32) -> Result<Vec<LegacyJob>, StoreError> {
        let rows = sqlx::query("SELECT id, spec FROM jobs WHERE record IS NULL ORDER BY created_ms LIMIT ?")
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(LegacyJob { id: r.try_get("id")?, body: r.try_get("spec")? }))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn migrate_legacy(
        &self,
        id: &str,
        spec: &str,
        record: &str,
        last_seq: u64,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET spec = ?, record = ?, last_seq = ? WHERE id = ? AND record IS NULL")
            .bind(spec)
            .bind(record)
            .bind(seq_param(last_seq))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl rows::Dialect for SqliteStore {
    fn sql(sql: &str) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Owned(rows::sqlite_placeholders(sql))
    }
}

rows::machine_and_key_stores!(SqliteStore);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract;

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Durability::Crash).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn committed_events_reach_the_database_file_by_the_checkpointer_not_the_writer() {
        let (dir, store) = store().await;
        store.checkpoint_in_background().unwrap();
        let autocheckpoint: i64 =
            store.writer.lock().unwrap().query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)).unwrap();
        assert_eq!(autocheckpoint, 0, "the writer never checkpoints inside a commit");
        store
            .commit(&Batch { creates: vec![contract::create("a", 1, None)], ..Default::default() })
            .await
            .unwrap();
        let db = dir.path().join("comfyrelay.db");
        let before = std::fs::metadata(&db).unwrap().len();
        // About 4 MiB of events in 1,000 commits: the writer never checkpoints (wal_autocheckpoint = 0).
        let body = "x".repeat(4096);
        for seq in 2..1002 {
            let event = EventRow { job_id: "a".into(), seq, time_ms: 1, body: body.clone() };
            store.commit(&Batch { events: vec![event], ..Default::default() }).await.unwrap();
        }
        // Only a checkpoint writes pages into the database file; the checkpointer's thread does.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&db).unwrap().len() < before + (4 << 20) {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was never checkpointed into {}",
                db.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.events_after("a", 0, 2000).await.unwrap().len(), 1001);
    }

    #[tokio::test]
    async fn batches_create_append_and_honour_keys() {
        let (_dir, store) = store().await;
        contract::batches_create_append_and_honour_keys(&store).await;
    }

    #[tokio::test]
    async fn list_filters_and_pages() {
        let (_dir, store) = store().await;
        contract::list_filters_and_pages(&store).await;
    }

    #[tokio::test]
    async fn request_ids_and_lists_are_per_tenant() {
        let (_dir, store) = store().await;
        contract::request_ids_and_lists_are_per_tenant(&store).await;
    }

    #[tokio::test]
    async fn keys_are_stored_listed_and_revoked_once() {
        let (_dir, store) = store().await;
        contract::keys_are_stored_listed_and_revoked_once(&store).await;
    }

    #[tokio::test]
    async fn machines_are_upserted_listed_and_deleted() {
        let (_dir, store) = store().await;
        contract::machines_are_upserted_listed_and_deleted(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_processes_opening_a_new_database_at_once_both_migrate_it() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let (a, b) = tokio::join!(
                SqliteStore::open(dir.path(), Durability::Crash),
                SqliteStore::open(dir.path(), Durability::Crash)
            );
            a.expect("first opener");
            b.expect("second opener");
        }
    }

    #[tokio::test]
    async fn the_data_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let _store = SqliteStore::open(&data, Durability::Crash).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("comfyrelay.db")), 0o600);
    }
}
