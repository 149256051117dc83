//! What the two SQL stores share: the tables and their SQL types are the same in SQLite and PostgreSQL,
//! so one mapping of rows serves both drivers ([`StoreRow`]), and the machine and API key stores, whose
//! statements are the same but for the placeholders, are written once ([`machine_and_key_stores!`], with
//! PostgreSQL's `$n`, which [`sqlite_placeholders`] turns into SQLite's `?n`).

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

/// SQLite's `?n` for PostgreSQL's `$n` in `sql` (whose strings hold no `$`).
pub(super) fn sqlite_placeholders(sql: &str) -> String {
    sql.replace('$', "?")
}

/// The statement text for a driver: as written (PostgreSQL) or through [`sqlite_placeholders`].
pub(super) trait Dialect {
    /// `sql` (written with `$n` placeholders) in this driver's dialect.
    fn sql(sql: &str) -> std::borrow::Cow<'_, str>;
}

/// Implements `MachineStore` and `KeyStore` for a store with a `pool` field of its driver, with the
/// store's [`Dialect`], and machine writes in the store's `begin_write` transactions (fenced by the leader's
/// term on PostgreSQL).
macro_rules! machine_and_key_stores {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl super::MachineStore for $store {
            async fn put_machine(&self, m: &super::MachineRow) -> Result<(), super::StoreError> {
                let sql = <$store as super::rows::Dialect>::sql(
                    "INSERT INTO machines (id, kind, state, created_ms, updated_ms, body) \
                     VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, state = excluded.state, \
                     updated_ms = excluded.updated_ms, body = excluded.body",
                );
                let mut tx = self.begin_write().await?;
                sqlx::query(&sql)
                    .bind(&m.id)
                    .bind(&m.kind)
                    .bind(&m.state)
                    .bind(m.created_ms)
                    .bind(m.updated_ms)
                    .bind(&m.body)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn delete_machine(&self, id: &str) -> Result<(), super::StoreError> {
                let sql = <$store as super::rows::Dialect>::sql("DELETE FROM machines WHERE id = $1");
                let mut tx = self.begin_write().await?;
                sqlx::query(&sql).bind(id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn list_machines(&self) -> Result<Vec<super::MachineRow>, super::StoreError> {
                let sql =
                    format!("SELECT {} FROM machines ORDER BY created_ms, id", super::rows::MACHINE_COLUMNS);
                let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
                Ok(rows.iter().map(super::rows::machine).collect::<Result<_, _>>()?)
            }
        }

        #[async_trait::async_trait]
        impl super::KeyStore for $store {
            async fn insert_key(&self, k: &super::KeyRow) -> Result<(), super::StoreError> {
                let sql = format!(
                    "INSERT INTO api_keys ({}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    super::rows::KEY_COLUMNS
                );
                sqlx::query(&<$store as super::rows::Dialect>::sql(&sql))
                    .bind(&k.prefix)
                    .bind(&k.secret_sha256)
                    .bind(&k.tenant)
                    .bind(&k.role)
                    .bind(k.created_ms)
                    .bind(k.expires_ms)
                    .bind(k.revoked_ms)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn get_key(&self, prefix: &str) -> Result<Option<super::KeyRow>, super::StoreError> {
                let sql = format!("SELECT {} FROM api_keys WHERE prefix = $1", super::rows::KEY_COLUMNS);
                let row = sqlx::query(&<$store as super::rows::Dialect>::sql(&sql))
                    .bind(prefix)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.as_ref().map(super::rows::key).transpose()?)
            }

            async fn list_keys(&self) -> Result<Vec<super::KeyRow>, super::StoreError> {
                let sql =
                    format!("SELECT {} FROM api_keys ORDER BY created_ms, prefix", super::rows::KEY_COLUMNS);
                let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
                Ok(rows.iter().map(super::rows::key).collect::<Result<_, _>>()?)
            }

            async fn revoke_key(&self, prefix: &str, now_ms: i64) -> Result<bool, super::StoreError> {
                let sql = <$store as super::rows::Dialect>::sql(
                    "UPDATE api_keys SET revoked_ms = $1 WHERE prefix = $2 AND revoked_ms IS NULL",
                );
                let done = sqlx::query(&sql).bind(now_ms).bind(prefix).execute(&self.pool).await?;
                Ok(done.rows_affected() > 0)
            }
        }
    };
}
pub(super) use machine_and_key_stores;

/// The filters of `ListJobs` after the state filter (which each database spells its own way), then the
/// newest-first order and the page size: one text for both stores, so a filter cannot exist in one only.
pub(super) fn push_job_filters<'args, DB>(sql: &mut sqlx::QueryBuilder<'args, DB>, q: &'args super::JobQuery)
where
    DB: sqlx::Database,
    &'args String: sqlx::Encode<'args, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'args, DB> + sqlx::Type<DB>,
{
    if let Some(t) = &q.tenant {
        sql.push(" AND j.tenant = ").push_bind(t);
    }
    if let Some(since) = q.ended_since {
        sql.push(" AND j.ended_ms >= ").push_bind(since);
    }
    if let Some(w) = &q.workflow {
        sql.push(" AND j.workflow = ").push_bind(w);
    }
    for (k, v) in &q.labels {
        sql.push(" AND EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = j.id AND l.key = ")
            .push_bind(k)
            .push(" AND l.value = ")
            .push_bind(v)
            .push(")");
    }
    if let Some((ms, id)) = &q.before {
        sql.push(" AND (j.created_ms < ")
            .push_bind(*ms)
            .push(" OR (j.created_ms = ")
            .push_bind(*ms)
            .push(" AND j.id < ")
            .push_bind(id)
            .push("))");
    }
    sql.push(" ORDER BY j.created_ms DESC, j.id DESC LIMIT ").push_bind(i64::from(q.limit));
}
