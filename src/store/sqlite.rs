//! The SQLite implementation of [`Store`]: one file in the data directory, WAL, versioned migrations.

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    Row,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous},
};

use super::{
    CreateOutcome, EventRow, IdempotencyKey, JobQuery, JobRow, MachineRow, MachineStore, Store, StoreError,
};

/// SQLite-backed store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) `comfyrelay.db` in `data_dir` and runs pending migrations.
    ///
    /// # Errors
    /// The file cannot be opened or a migration fails.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        tokio::fs::create_dir_all(data_dir).await?;
        let path = data_dir.join("comfyrelay.db");
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL under WAL: a committed transaction survives a process crash (SIGKILL); only an OS
            // crash can lose the last few, which is the usual trade for throughput.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::migrate!("src/store/migrations").run(&pool).await?;
        Ok(Self { pool })
    }
}

fn job_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<JobRow, sqlx::Error> {
    Ok(JobRow {
        id: row.try_get("id")?,
        state: row.try_get("state")?,
        terminal: row.try_get::<i64, _>("terminal")? != 0,
        workflow: row.try_get("workflow")?,
        priority: row.try_get::<i64, _>("priority")? as i32,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        ended_ms: row.try_get("ended_ms")?,
        request_id: row.try_get("request_id")?,
        labels: Default::default(),
        artifacts: Vec::new(),
        body: row.try_get("body")?,
    })
}

async fn insert_refs(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    job: &JobRow,
    labels: bool,
) -> Result<(), sqlx::Error> {
    if labels {
        for (k, v) in &job.labels {
            sqlx::query("INSERT INTO job_labels (job_id, key, value) VALUES (?, ?, ?)")
                .bind(&job.id)
                .bind(k)
                .bind(v)
                .execute(&mut **tx)
                .await?;
        }
    }
    for sha in &job.artifacts {
        sqlx::query("INSERT OR IGNORE INTO job_artifacts (job_id, sha256) VALUES (?, ?)")
            .bind(&job.id)
            .bind(sha)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn insert_event(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, e: &EventRow) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO job_events (job_id, seq, time_ms, body) VALUES (?, ?, ?, ?)")
        .bind(&e.job_id)
        .bind(e.seq as i64)
        .bind(e.time_ms)
        .bind(&e.body)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

// Every write transaction starts with BEGIN IMMEDIATE: it takes SQLite's write lock up front (waiting up to
// the busy timeout), so a transaction that reads and then writes can never fail with SQLITE_BUSY when
// another connection committed in between.
#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create_job(
        &self,
        job: &JobRow,
        first_event: &EventRow,
        key: Option<&IdempotencyKey>,
    ) -> Result<CreateOutcome, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(key) = key {
            let existing = sqlx::query("SELECT request_hash, job_id FROM idempotency WHERE request_id = ?")
                .bind(&key.request_id)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = existing {
                let hash: String = row.try_get("request_hash")?;
                let job_id: String = row.try_get("job_id")?;
                tx.rollback().await?;
                if hash != key.request_hash {
                    return Ok(CreateOutcome::Conflict { job_id });
                }
                return match self.get_job(&job_id).await? {
                    Some(j) => Ok(CreateOutcome::Existing(j)),
                    None => Ok(CreateOutcome::Conflict { job_id }),
                };
            }
        }
        sqlx::query(
            "INSERT INTO jobs (id, state, terminal, workflow, priority, created_ms, updated_ms, ended_ms, \
             request_id, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&job.id)
        .bind(&job.state)
        .bind(job.terminal as i64)
        .bind(&job.workflow)
        .bind(job.priority as i64)
        .bind(job.created_ms)
        .bind(job.updated_ms)
        .bind(job.ended_ms)
        .bind(&job.request_id)
        .bind(&job.body)
        .execute(&mut *tx)
        .await?;
        insert_refs(&mut tx, job, true).await?;
        insert_event(&mut tx, first_event).await?;
        if let Some(key) = key {
            sqlx::query("INSERT INTO idempotency (request_id, request_hash, job_id) VALUES (?, ?, ?)")
                .bind(&key.request_id)
                .bind(&key.request_hash)
                .bind(&job.id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(CreateOutcome::Created)
    }

    async fn commit(&self, job: &JobRow, events: &[EventRow]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "UPDATE jobs SET state = ?, terminal = ?, updated_ms = ?, ended_ms = ?, body = ? WHERE id = ?",
        )
        .bind(&job.state)
        .bind(job.terminal as i64)
        .bind(job.updated_ms)
        .bind(job.ended_ms)
        .bind(&job.body)
        .bind(&job.id)
        .execute(&mut *tx)
        .await?;
        insert_refs(&mut tx, job, false).await?;
        for e in events {
            insert_event(&mut tx, e).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = ?").bind(id).fetch_optional(&self.pool).await?;
        let Some(row) = row else { return Ok(None) };
        let mut job = job_from_row(&row)?;
        let labels = sqlx::query("SELECT key, value FROM job_labels WHERE job_id = ?")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        for l in labels {
            job.labels.insert(l.try_get("key")?, l.try_get("value")?);
        }
        Ok(Some(job))
    }

    async fn list_jobs(&self, q: &JobQuery) -> Result<Vec<JobRow>, StoreError> {
        let mut sql = String::from("SELECT * FROM jobs j WHERE 1 = 1");
        if !q.states.is_empty() {
            sql.push_str(" AND j.state IN (");
            sql.push_str(&vec!["?"; q.states.len()].join(", "));
            sql.push(')');
        }
        if q.workflow.is_some() {
            sql.push_str(" AND j.workflow = ?");
        }
        for _ in &q.labels {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = j.id AND l.key = ? AND l.value = ?)",
            );
        }
        if q.before.is_some() {
            sql.push_str(" AND (j.created_ms < ? OR (j.created_ms = ? AND j.id < ?))");
        }
        sql.push_str(" ORDER BY j.created_ms DESC, j.id DESC LIMIT ?");
        let mut query = sqlx::query(&sql);
        for s in &q.states {
            query = query.bind(s);
        }
        if let Some(w) = &q.workflow {
            query = query.bind(w);
        }
        for (k, v) in &q.labels {
            query = query.bind(k).bind(v);
        }
        if let Some((ms, id)) = &q.before {
            query = query.bind(ms).bind(ms).bind(id);
        }
        query = query.bind(q.limit as i64);
        let rows = query.fetch_all(&self.pool).await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut job = job_from_row(row)?;
            let labels = sqlx::query("SELECT key, value FROM job_labels WHERE job_id = ?")
                .bind(&job.id)
                .fetch_all(&self.pool)
                .await?;
            for l in labels {
                job.labels.insert(l.try_get("key")?, l.try_get("value")?);
            }
            jobs.push(job);
        }
        Ok(jobs)
    }

    async fn events_after(&self, job_id: &str, after: u64, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT job_id, seq, time_ms, body FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(job_id)
        .bind(after as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    job_id: r.try_get("job_id")?,
                    seq: r.try_get::<i64, _>("seq")? as u64,
                    time_ms: r.try_get("time_ms")?,
                    body: r.try_get("body")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn unfinished_jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM jobs WHERE terminal = 0 ORDER BY created_ms, id")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(job_from_row(row)?);
        }
        Ok(out)
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
}

#[async_trait::async_trait]
impl MachineStore for SqliteStore {
    async fn put_machine(&self, m: &MachineRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO machines (id, kind, state, created_ms, updated_ms, body) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, state = excluded.state, \
             updated_ms = excluded.updated_ms, body = excluded.body",
        )
        .bind(&m.id)
        .bind(&m.kind)
        .bind(&m.state)
        .bind(m.created_ms)
        .bind(m.updated_ms)
        .bind(&m.body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_machine(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM machines WHERE id = ?").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    async fn list_machines(&self) -> Result<Vec<MachineRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM machines ORDER BY created_ms").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(MachineRow {
                    id: r.try_get("id")?,
                    kind: r.try_get("kind")?,
                    state: r.try_get("state")?,
                    created_ms: r.try_get("created_ms")?,
                    updated_ms: r.try_get("updated_ms")?,
                    body: r.try_get("body")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, created: i64) -> JobRow {
        JobRow {
            id: id.into(),
            state: "QUEUED".into(),
            terminal: false,
            workflow: "invert".into(),
            priority: 0,
            created_ms: created,
            updated_ms: created,
            ended_ms: None,
            request_id: None,
            labels: [("team".to_string(), "a".to_string())].into(),
            artifacts: vec!["ab".repeat(32)],
            body: "{}".into(),
        }
    }

    fn event(id: &str, seq: u64) -> EventRow {
        EventRow { job_id: id.into(), seq, time_ms: 1, body: format!("{{\"n\":{seq}}}") }
    }

    #[tokio::test]
    async fn jobs_events_and_keys_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let key = IdempotencyKey { request_id: "r1".into(), request_hash: "h1".into() };
        assert_eq!(
            store.create_job(&job("a", 1), &event("a", 1), Some(&key)).await.unwrap(),
            CreateOutcome::Created
        );
        let again = store.create_job(&job("b", 2), &event("b", 1), Some(&key)).await.unwrap();
        assert!(matches!(again, CreateOutcome::Existing(ref j) if j.id == "a"));
        let other = IdempotencyKey { request_id: "r1".into(), request_hash: "h2".into() };
        let conflict = store.create_job(&job("c", 3), &event("c", 1), Some(&other)).await.unwrap();
        assert_eq!(conflict, CreateOutcome::Conflict { job_id: "a".into() });
        assert!(store.get_job("b").await.unwrap().is_none(), "nothing stored on a replay");

        let mut a = store.get_job("a").await.unwrap().unwrap();
        assert_eq!(a.labels.get("team").map(String::as_str), Some("a"));
        a.state = "SUCCEEDED".into();
        a.terminal = true;
        a.ended_ms = Some(10);
        store.commit(&a, &[event("a", 2), event("a", 3)]).await.unwrap();
        let evs = store.events_after("a", 1, 100).await.unwrap();
        assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert!(store.commit(&a, &[event("a", 3)]).await.is_err(), "duplicate sequence refused");
        assert!(store.unfinished_jobs().await.unwrap().is_empty());

        let (deleted, orphaned) = store.delete_finished_before(11, 10).await.unwrap();
        assert_eq!(deleted, vec!["a".to_string()]);
        assert_eq!(orphaned, vec!["ab".repeat(32)]);
        assert!(store.get_job("a").await.unwrap().is_none());
        assert!(store.events_after("a", 0, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn list_filters_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        for i in 0..5 {
            let mut j = job(&format!("j{i}"), i);
            if i % 2 == 0 {
                j.labels.insert("even".into(), "yes".into());
            }
            store.create_job(&j, &event(&j.id, 1), None).await.unwrap();
        }
        let page = store.list_jobs(&JobQuery { limit: 2, ..Default::default() }).await.unwrap();
        assert_eq!(page.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["j4", "j3"]);
        let next = store
            .list_jobs(&JobQuery { limit: 2, before: Some((3, "j3".into())), ..Default::default() })
            .await
            .unwrap();
        assert_eq!(next.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["j2", "j1"]);
        let even = store
            .list_jobs(&JobQuery {
                limit: 10,
                labels: vec![("even".into(), "yes".into())],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(even.len(), 3);
        let none = store
            .list_jobs(&JobQuery { limit: 10, states: vec!["FAILED".into()], ..Default::default() })
            .await
            .unwrap();
        assert!(none.is_empty());
    }
}
