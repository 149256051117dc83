//! The PostgreSQL implementation of [`Store`], [`MachineStore`] and [`KeyStore`], beside the SQLite one
//! and with the same semantics: one pool, versioned migrations (`src/store/migrations_postgres`, the
//! schema the SQLite migrations end with), one transaction per batch.
//!
//! A batch costs a handful of statements whatever its size: every table's rows go in with one
//! `INSERT ... SELECT * FROM UNNEST(...)` of column arrays, the state updates with one
//! `UPDATE ... FROM UNNEST(...)`, and the idempotency keys are looked up with one query and then honoured in
//! the batch's order in memory.
//!
//! Several replicas may share the database. Migrations are serialised by sqlx's advisory lock, so replicas
//! starting at once are fine. Every commit that grows job logs also sends, in its transaction, one
//! `NOTIFY comfyrelay_events` per such job (payload `"{job_id} {last_seq}"`), which PostgreSQL delivers at
//! commit: [`PgStore::listen_events`] hears of committed events only.
//!
//! The leader's writes are fenced ([`PgStore::fenced`]): each write transaction first reads the lease's
//! term (`leader_term`) `FOR SHARE` and is refused with [`StoreError::Fenced`] when another replica has
//! taken the lease since, so a deposed leader never writes after its successor started.
//!
//! Every connection asks the server for TCP keepalives (a silent client is dropped after about 11 s), so an
//! open transaction of a replica cut off from the database does not hold its row locks (the term's among
//! them) for the operating system's default of two hours.
//!
//! The connection URL (which may hold a password) is never logged or displayed: [`PgStore`]'s `Debug`
//! leaves the connect options out, and sqlx's errors do not include it.

use std::{collections::HashMap, str::FromStr, time::Duration};

use sqlx::{
    Postgres, QueryBuilder, Row, Transaction,
    postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions},
};
use tokio_util::sync::CancellationToken;

use super::{
    Batch, CreateOutcome, EventRow, JobQuery, JobRow, LegacyJob, Store, StoreError,
    rows::{self, JOB_COLUMNS},
};

#[cfg(test)]
#[path = "../../tests/support/postgres.rs"]
mod pg_server;

/// The channel every commit notifies of the job logs it grew.
pub const EVENTS_CHANNEL: &str = "comfyrelay_events";

/// Connections of [`PgStore::connect`]'s pool.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// How long a statement waits for a free connection of the pool before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a batch is tried again when a concurrent transaction (another replica) committed one of its
/// idempotency keys first: the next attempt finds that key and reports `Existing`/`Conflict`.
const KEY_RACE_ATTEMPTS: u32 = 5;

/// PostgreSQL-backed store.
#[derive(Clone)]
pub struct PgStore {
    /// Every statement.
    pool: PgPool,
    /// For the listener's own connection ([`PgStore::listen_events`]); holds the password, never printed.
    options: PgConnectOptions,
    /// With [`PgStore::fenced`], the leader's term every write checks.
    fence: Option<Fence>,
}

/// The term a leader's writes must still find, and its lease's `lost` token, cancelled when they do not.
#[derive(Debug, Clone)]
struct Fence {
    term: i64,
    lost: CancellationToken,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the connect options: they hold the password.
        f.debug_struct("PgStore")
            .field("pool", &self.pool)
            .field("term", &self.fence.as_ref().map(|f| f.term))
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db?sslmode=...`) with a pool of
    /// [`DEFAULT_MAX_CONNECTIONS`] and runs pending migrations.
    ///
    /// # Errors
    /// The URL is invalid, the database cannot be reached or a migration fails.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, DEFAULT_MAX_CONNECTIONS).await
    }

    /// [`PgStore::connect`] with a pool of `max_connections` (at least 1).
    ///
    /// # Errors
    /// The URL is invalid, the database cannot be reached or a migration fails.
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = keepalives(PgConnectOptions::from_str(url)?);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        // Takes a session advisory lock on the database: a replica starting at the same moment waits, then
        // finds the migrations applied.
        sqlx::migrate!("src/store/migrations_postgres").run(&pool).await?;
        Ok(Self { pool, options, fence: None })
    }

    /// This store with every write fenced by `lease`'s term: a write that finds another term (a replica
    /// took the lease since) is refused with [`StoreError::Fenced`] and cancels `lease.lost()`.
    #[must_use]
    pub fn fenced(&self, lease: &super::LeaderLease) -> Self {
        Self { fence: Some(Fence { term: lease.term(), lost: lease.lost().clone() }), ..self.clone() }
    }

    /// A write transaction: with a fence, one that holds the term (`FOR SHARE`, so that a replica taking
    /// the lease waits for it) after checking it is still this store's.
    pub(super) async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(fence) = &self.fence {
            let current: i64 = sqlx::query_scalar("SELECT term FROM leader_term WHERE id = 1 FOR SHARE")
                .fetch_one(&mut *tx)
                .await?;
            if current != fence.term {
                tracing::error!(
                    term = fence.term,
                    current,
                    "another replica took the leader lease: refusing to write"
                );
                fence.lost.cancel();
                return Err(StoreError::Fenced { term: fence.term, current });
            }
        }
        Ok(tx)
    }

    /// The instance id every replica of this database shares: the one stored, or `candidate` when this is
    /// the first replica to ask (two asking at once get the same one).
    ///
    /// # Errors
    /// Database failures.
    pub async fn shared_instance_id(&self, candidate: &str) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO replica_settings (key, value) VALUES ('instance_id', $1) ON CONFLICT DO NOTHING",
        )
        .bind(candidate)
        .execute(&self.pool)
        .await?;
        Ok(self.setting("instance_id").await?.unwrap_or_default())
    }

    /// A value the replicas share (`replica_settings`).
    ///
    /// # Errors
    /// Database failures.
    pub async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT value FROM replica_settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Sets a shared value (`None` removes it).
    ///
    /// # Errors
    /// Database failures; [`StoreError::Fenced`].
    pub async fn set_setting(&self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        match value {
            Some(value) => sqlx::query(
                "INSERT INTO replica_settings (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            )
            .bind(key)
            .bind(value),
            None => sqlx::query("DELETE FROM replica_settings WHERE key = $1").bind(key),
        }
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Starts listening for the notifications of committed events, on a connection of its own (not one of
    /// the pool's). Notifications of commits before this returns are not heard: a caller reads the logs
    /// after listening, not before.
    ///
    /// # Errors
    /// The database cannot be reached.
    pub async fn listen_events(&self) -> Result<EventNotifications, StoreError> {
        // A pool of one, without idle timeout or lifetime, is how PgListener reconnects.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(self.options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        // The pool is this listener's own and never closed.
        listener.ignore_pool_close_event(true);
        listener.listen(EVENTS_CHANNEL).await?;
        Ok(EventNotifications { listener, resync: false })
    }

    /// One attempt at a batch, in one transaction.
    async fn try_commit(&self, batch: &Batch) -> Result<Vec<CreateOutcome>, StoreError> {
        let mut tx = self.begin_write().await?;

        // The keys already stored, in one query; then the batch's creates in order, each key it stores
        // found by the creates after it.
        let wanted: Vec<(&str, &str)> = batch
            .creates
            .iter()
            .filter_map(|c| c.key.as_ref().map(|k| (c.row.tenant.as_str(), k.request_id.as_str())))
            .collect();
        let mut keys: HashMap<(String, String), (String, String)> = HashMap::new();
        if !wanted.is_empty() {
            let rows = sqlx::query(
                "SELECT i.tenant, i.request_id, i.request_hash, i.job_id FROM idempotency i \
                 JOIN UNNEST($1::text[], $2::text[]) AS w (tenant, request_id) \
                 ON i.tenant = w.tenant AND i.request_id = w.request_id",
            )
            .bind(wanted.iter().map(|w| w.0).collect::<Vec<_>>())
            .bind(wanted.iter().map(|w| w.1).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            for r in &rows {
                keys.insert(
                    (r.try_get("tenant")?, r.try_get("request_id")?),
                    (r.try_get("request_hash")?, r.try_get("job_id")?),
                );
            }
        }

        let mut outcomes = Vec::with_capacity(batch.creates.len());
        let mut jobs = JobColumns::default();
        let mut new_keys = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut labels = (Vec::new(), Vec::new(), Vec::new());
        let mut artifacts: (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        let mut events = EventColumns::default();
        for new in &batch.creates {
            let job = &new.row;
            if let Some(key) = &new.key {
                let id = (job.tenant.clone(), key.request_id.clone());
                if let Some((hash, job_id)) = keys.get(&id) {
                    let job_id = job_id.clone();
                    outcomes.push(if *hash == key.request_hash {
                        CreateOutcome::Existing { job_id }
                    } else {
                        CreateOutcome::Conflict { job_id }
                    });
                    continue;
                }
                keys.insert(id, (key.request_hash.clone(), job.id.clone()));
                new_keys.0.push(job.tenant.as_str());
                new_keys.1.push(key.request_id.as_str());
                new_keys.2.push(key.request_hash.as_str());
                new_keys.3.push(job.id.as_str());
            }
            jobs.push(job);
            for (k, v) in &job.labels {
                labels.0.push(job.id.as_str());
                labels.1.push(k.as_str());
                labels.2.push(v.as_str());
            }
            for sha in &job.artifacts {
                artifacts.0.push(job.id.as_str());
                artifacts.1.push(sha.as_str());
            }
            events.push(&new.first_event);
            outcomes.push(CreateOutcome::Created);
        }
        for e in &batch.events {
            events.push(e);
        }
        for (job, sha) in &batch.artifacts {
            artifacts.0.push(job.as_str());
            artifacts.1.push(sha.as_str());
        }

        if !jobs.id.is_empty() {
            sqlx::query(
                "INSERT INTO jobs (id, state, terminal, workflow, priority, created_ms, updated_ms, ended_ms, \
                 request_id, last_seq, spec, record, tenant) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::text[], $5::int4[], $6::int8[], \
                 $7::int8[], $8::int8[], $9::text[], $10::int8[], $11::text[], $12::text[], $13::text[])",
            )
            .bind(jobs.id)
            .bind(jobs.state)
            .bind(jobs.terminal)
            .bind(jobs.workflow)
            .bind(jobs.priority)
            .bind(jobs.created_ms)
            .bind(jobs.updated_ms)
            .bind(jobs.ended_ms)
            .bind(jobs.request_id)
            .bind(jobs.last_seq)
            .bind(jobs.spec)
            .bind(jobs.record)
            .bind(jobs.tenant)
            .execute(&mut *tx)
            .await?;
        }
        if !new_keys.0.is_empty() {
            sqlx::query(
                "INSERT INTO idempotency (tenant, request_id, request_hash, job_id) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[])",
            )
            .bind(new_keys.0)
            .bind(new_keys.1)
            .bind(new_keys.2)
            .bind(new_keys.3)
            .execute(&mut *tx)
            .await?;
        }
        if !labels.0.is_empty() {
            sqlx::query(
                "INSERT INTO job_labels (job_id, key, value) SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])",
            )
            .bind(labels.0)
            .bind(labels.1)
            .bind(labels.2)
            .execute(&mut *tx)
            .await?;
        }
        if !events.job_id.is_empty() {
            sqlx::query(
                "INSERT INTO job_events (job_id, seq, time_ms, body) \
                 SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[])",
            )
            .bind(&events.job_id)
            .bind(&events.seq)
            .bind(events.time_ms)
            .bind(events.body)
            .execute(&mut *tx)
            .await?;
        }
        if !batch.updates.is_empty() {
            // One row per job, the last of the batch winning, as when they are applied in order (an UPDATE
            // ... FROM with two rows for one job would apply either).
            let mut last: HashMap<&str, usize> = HashMap::new();
            for (i, u) in batch.updates.iter().enumerate() {
                last.insert(u.id.as_str(), i);
            }
            let mut updates: Vec<_> = last.into_values().collect();
            updates.sort_unstable();
            let updates: Vec<_> = updates.into_iter().map(|i| &batch.updates[i]).collect();
            sqlx::query(
                "UPDATE jobs SET state = u.state, terminal = u.terminal, updated_ms = u.updated_ms, \
                 ended_ms = u.ended_ms, last_seq = u.last_seq, record = u.record \
                 FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[], $5::int8[], $6::int8[], $7::text[]) \
                 AS u (id, state, terminal, updated_ms, ended_ms, last_seq, record) WHERE jobs.id = u.id",
            )
            .bind(updates.iter().map(|u| u.id.as_str()).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| u.state.as_str()).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| i32::from(u.terminal)).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| u.updated_ms).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| u.ended_ms).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| seq_param(u.last_seq)).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| u.record.as_str()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        if !artifacts.0.is_empty() {
            sqlx::query(
                "INSERT INTO job_artifacts (job_id, sha256) SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(artifacts.0)
            .bind(artifacts.1)
            .execute(&mut *tx)
            .await?;
        }
        if !events.job_id.is_empty() {
            // One notification per job whose log grew, naming its last event; delivered at commit.
            let mut grew: Vec<(&str, i64)> = Vec::new();
            let mut at: HashMap<&str, usize> = HashMap::new();
            for (job, &seq) in events.job_id.iter().zip(&events.seq) {
                match at.get(job) {
                    Some(&i) => grew[i].1 = grew[i].1.max(seq),
                    None => {
                        at.insert(job, grew.len());
                        grew.push((job, seq));
                    }
                }
            }
            let payloads: Vec<String> = grew.iter().map(|(job, seq)| format!("{job} {seq}")).collect();
            sqlx::query("SELECT pg_notify($1, p) FROM UNNEST($2::text[]) AS p")
                .bind(EVENTS_CHANNEL)
                .bind(payloads)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

/// The `jobs` columns of a batch's creates, as arrays for `UNNEST`.
#[derive(Default)]
struct JobColumns<'a> {
    id: Vec<&'a str>,
    state: Vec<&'a str>,
    terminal: Vec<i32>,
    workflow: Vec<&'a str>,
    priority: Vec<i32>,
    created_ms: Vec<i64>,
    updated_ms: Vec<i64>,
    ended_ms: Vec<Option<i64>>,
    request_id: Vec<Option<&'a str>>,
    last_seq: Vec<i64>,
    spec: Vec<&'a str>,
    record: Vec<&'a str>,
    tenant: Vec<&'a str>,
}

impl<'a> JobColumns<'a> {
    fn push(&mut self, job: &'a JobRow) {
        self.id.push(&job.id);
        self.state.push(&job.state);
        self.terminal.push(i32::from(job.terminal));
        self.workflow.push(&job.workflow);
        self.priority.push(job.priority);
        self.created_ms.push(job.created_ms);
        self.updated_ms.push(job.updated_ms);
        self.ended_ms.push(job.ended_ms);
        self.request_id.push(job.request_id.as_deref());
        self.last_seq.push(seq_param(job.last_seq));
        self.spec.push(&job.spec);
        self.record.push(&job.record);
        self.tenant.push(&job.tenant);
    }
}

/// The `job_events` columns of a batch, as arrays for `UNNEST`.
#[derive(Default)]
struct EventColumns<'a> {
    job_id: Vec<&'a str>,
    seq: Vec<i64>,
    time_ms: Vec<i64>,
    body: Vec<&'a str>,
}

impl<'a> EventColumns<'a> {
    fn push(&mut self, e: &'a EventRow) {
        self.job_id.push(&e.job_id);
        self.seq.push(seq_param(e.seq));
        self.time_ms.push(e.time_ms);
        self.body.push(&e.body);
    }
}

/// Whether a batch failed because a concurrent transaction stored one of its idempotency keys first.
fn lost_key_race(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(sqlx::Error::Database(db)) if db.constraint() == Some("idempotency_pkey"))
}

/// `options` with the server asked to drop the session after 5 + 3 × 2 s of unanswered keepalives.
pub(super) fn keepalives(options: PgConnectOptions) -> PgConnectOptions {
    options.options([
        ("tcp_keepalives_idle", "5"),
        ("tcp_keepalives_interval", "2"),
        ("tcp_keepalives_count", "3"),
    ])
}

/// What [`EventNotifications::next`] heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventNotice {
    /// A committed batch grew this job's log up to `last_seq`.
    Appended {
        /// The job.
        job_id: String,
        /// Sequence of its last event when the batch committed.
        last_seq: u64,
    },
    /// The listener's connection was lost and is listening again: notifications of the commits in between
    /// are lost, so whatever the caller follows must be read again from the database.
    Resync,
}

/// The notifications of committed events ([`PgStore::listen_events`]), on a connection of their own.
pub struct EventNotifications {
    listener: PgListener,
    /// The last call failed: the next one reconnects and then says [`EventNotice::Resync`].
    resync: bool,
}

impl std::fmt::Debug for EventNotifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventNotifications").field("resync", &self.resync).finish_non_exhaustive()
    }
}

impl EventNotifications {
    /// Waits for the next notification. Malformed payloads (not sent by comfyrelay) are skipped with a
    /// warning.
    ///
    /// A lost connection is re-established here (PostgreSQL does not keep notifications for a listener
    /// that is gone): then this returns [`EventNotice::Resync`], once listening again, and the caller must
    /// re-read from the database whatever it follows. After an error, the caller may call again: that call
    /// reconnects and returns [`EventNotice::Resync`] first, since notifications may have been lost.
    ///
    /// # Errors
    /// The database cannot be reached (the reconnection failed) or the connection failed otherwise.
    pub async fn next(&mut self) -> Result<EventNotice, StoreError> {
        if self.resync {
            // Any statement through the listener reconnects it (and listens again) if needed.
            sqlx::query("SELECT 1").execute(&mut self.listener).await?;
            self.resync = false;
            return Ok(EventNotice::Resync);
        }
        loop {
            let received = self.listener.try_recv().await;
            let notification = match received {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(EventNotice::Resync),
                Err(e) => {
                    self.resync = true;
                    return Err(e.into());
                }
            };
            match parse_notice(notification.payload()) {
                Some(notice) => return Ok(notice),
                None => tracing::warn!(
                    channel = notification.channel(),
                    payload = notification.payload(),
                    "ignoring a malformed event notification"
                ),
            }
        }
    }
}

/// `"{job_id} {last_seq}"`.
fn parse_notice(payload: &str) -> Option<EventNotice> {
    let (job_id, seq) = payload.rsplit_once(' ')?;
    if job_id.is_empty() || job_id.contains(' ') {
        return None;
    }
    Some(EventNotice::Appended { job_id: job_id.to_owned(), last_seq: seq.parse().ok()? })
}

/// A sequence as SQL's BIGINT: sequences are far below 2⁶³; a caller's larger number clamps (it matches no
/// event) instead of wrapping to a negative one (which would match them all).
fn seq_param(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn commit(&self, batch: &Batch) -> Result<Vec<CreateOutcome>, StoreError> {
        let mut attempt = 1;
        loop {
            match self.try_commit(batch).await {
                Err(e) if attempt < KEY_RACE_ATTEMPTS && lost_key_race(&e) => attempt += 1,
                result => return result,
            }
        }
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(rows::job).transpose()?)
    }

    async fn list_jobs(&self, q: &JobQuery) -> Result<Vec<JobRow>, StoreError> {
        let mut sql = QueryBuilder::<Postgres>::new(format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE 1 = 1"));
        if !q.states.is_empty() {
            sql.push(" AND j.state = ANY(").push_bind(q.states.clone()).push(")");
        }
        rows::push_job_filters(&mut sql, q);
        let rows = sql.build().fetch_all(&self.pool).await?;
        Ok(rows.iter().map(rows::job).collect::<Result<_, _>>()?)
    }

    async fn events_after(&self, job_id: &str, after: u64, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT job_id, seq, time_ms, body FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(job_id)
        .bind(seq_param(after))
        .bind(i64::from(limit))
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
        let mut tx = self.begin_write().await?;
        // Rows another replica is deleting at the same moment are skipped, not waited for.
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM jobs WHERE terminal = 1 AND ended_ms < $1 ORDER BY ended_ms LIMIT $2 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(before_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("id"))
        .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok((ids, Vec::new()));
        }
        let shas: Vec<String> =
            sqlx::query("SELECT DISTINCT sha256 FROM job_artifacts WHERE job_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get("sha256"))
                .collect::<Result<_, _>>()?;
        // Explicit deletes rather than relying on ON DELETE CASCADE, as in the SQLite store.
        for table in ["job_events", "job_labels", "job_artifacts", "idempotency"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE job_id = ANY($1)"))
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM jobs WHERE id = ANY($1)").bind(&ids).execute(&mut *tx).await?;
        let orphaned: Vec<String> = sqlx::query(
            "SELECT s FROM UNNEST($1::text[]) AS s \
             WHERE NOT EXISTS (SELECT 1 FROM job_artifacts a WHERE a.sha256 = s)",
        )
        .bind(&shas)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("s"))
        .collect::<Result<_, _>>()?;
        tx.commit().await?;
        Ok((ids, orphaned))
    }

    async fn legacy_jobs(&self, limit: u32) -> Result<Vec<LegacyJob>, StoreError> {
        let rows = sqlx::query("SELECT id, spec FROM jobs WHERE record IS NULL ORDER BY created_ms LIMIT $1")
            .bind(i64::from(limit))
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
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE jobs SET spec = $1, record = $2, last_seq = $3 WHERE id = $4 AND record IS NULL")
            .bind(spec)
            .bind(record)
            .bind(seq_param(last_seq))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

impl rows::Dialect for PgStore {
    fn sql(sql: &str) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(sql)
    }
}

rows::machine_and_key_stores!(PgStore);

#[cfg(test)]
mod tests {
    use sqlx::{Connection as _, postgres::PgConnection};

    use super::{pg_server::PgServer, *};
    use crate::store::{
        IdempotencyKey,
        contract::{self, create, event},
    };

    /// A server and a store on a fresh database of it; `None` (the test returns) without PostgreSQL.
    async fn store() -> Option<(PgServer, PgStore)> {
        let server = PgServer::start().await?;
        let url = server.database("contract").await;
        let store = PgStore::connect(&url).await.expect("connecting the store");
        Some((server, store))
    }

    #[tokio::test]
    async fn postgres_batches_create_append_and_honour_keys() {
        let Some((_server, store)) = store().await else { return };
        contract::batches_create_append_and_honour_keys(&store).await;
    }

    #[tokio::test]
    async fn postgres_list_filters_and_pages() {
        let Some((_server, store)) = store().await else { return };
        contract::list_filters_and_pages(&store).await;
    }

    #[tokio::test]
    async fn postgres_request_ids_and_lists_are_per_tenant() {
        let Some((_server, store)) = store().await else { return };
        contract::request_ids_and_lists_are_per_tenant(&store).await;
    }

    #[tokio::test]
    async fn postgres_keys_are_stored_listed_and_revoked_once() {
        let Some((_server, store)) = store().await else { return };
        contract::keys_are_stored_listed_and_revoked_once(&store).await;
    }

    #[tokio::test]
    async fn postgres_machines_are_upserted_listed_and_deleted() {
        let Some((_server, store)) = store().await else { return };
        contract::machines_are_upserted_listed_and_deleted(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_two_replicas_migrating_a_new_database_at_once_both_succeed() {
        let Some(server) = PgServer::start().await else { return };
        for i in 0..3 {
            let url = server.database(&format!("race{i}")).await;
            let (a, b) = tokio::join!(PgStore::connect(&url), PgStore::connect(&url));
            let (a, b) = (a.expect("first replica"), b.expect("second replica"));
            // Both see one schema: what one writes, the other reads.
            a.commit(&Batch { creates: vec![create("j", 1, None)], ..Default::default() }).await.unwrap();
            assert_eq!(b.get_job("j").await.unwrap().map(|j| j.last_seq), Some(1));
        }
    }

    #[tokio::test]
    async fn postgres_listeners_hear_committed_batches_only() {
        let Some((_server, store)) = store().await else { return };
        let mut events = store.listen_events().await.unwrap();
        let appended = |job: &str, seq: u64| EventNotice::Appended { job_id: job.into(), last_seq: seq };

        // A create and, in the same batch, two more events of another job: one notice per job, naming the
        // last event.
        store.commit(&Batch { creates: vec![create("a", 1, None)], ..Default::default() }).await.unwrap();
        assert_eq!(events.next().await.unwrap(), appended("a", 1));
        let batch = Batch {
            creates: vec![create("b", 2, None)],
            events: vec![event("a", 2), event("a", 3)],
            ..Default::default()
        };
        store.commit(&batch).await.unwrap();
        let mut heard = vec![events.next().await.unwrap(), events.next().await.unwrap()];
        heard.sort_by_key(|n| format!("{n:?}"));
        assert_eq!(heard, vec![appended("a", 3), appended("b", 1)]);

        // A batch that fails (a duplicate sequence) rolls its notifications back with it: the next notice
        // is the one of the batch committed after it.
        let failing = Batch {
            creates: vec![create("c", 3, None)],
            events: vec![event("b", 2), event("a", 3)],
            ..Default::default()
        };
        assert!(store.commit(&failing).await.is_err(), "duplicate sequence refused");
        store.commit(&Batch { events: vec![event("a", 4)], ..Default::default() }).await.unwrap();
        assert_eq!(events.next().await.unwrap(), appended("a", 4));
        assert!(store.get_job("c").await.unwrap().is_none(), "the failed batch wrote nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_a_key_another_replica_stores_first_is_found_not_refused() {
        let Some(server) = PgServer::start().await else { return };
        let url = server.database("race_key").await;
        let store = PgStore::connect(&url).await.unwrap();
        let key = IdempotencyKey { request_id: "r1".into(), request_hash: "h1".into() };
        // "Another replica": a transaction of its own that stores job `a` with the key and has not committed.
        let mut other = PgConnection::connect(&url).await.unwrap();
        let mut tx = other.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO jobs (id, state, terminal, workflow, priority, created_ms, updated_ms, spec, record, tenant) \
             VALUES ('a', 'QUEUED', 0, 'invert', 0, 1, 1, '{}', '{}', 't1')",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query("INSERT INTO idempotency (tenant, request_id, request_hash, job_id) VALUES ('t1', 'r1', 'h1', 'a')")
            .execute(&mut *tx)
            .await
            .unwrap();
        // This batch finds no key, then waits on the other's row in the key's index ...
        let batch = Batch { creates: vec![create("b", 2, Some(&key))], ..Default::default() };
        let writer = store.clone();
        let commit = tokio::spawn(async move { writer.commit(&batch).await });
        until_waiting_on_a_lock(&store, "race_key").await;
        // ... and once the other commits, is tried again and finds the key.
        tx.commit().await.unwrap();
        assert_eq!(commit.await.unwrap().unwrap(), vec![CreateOutcome::Existing { job_id: "a".into() }]);
        assert!(store.get_job("b").await.unwrap().is_none());
    }

    /// Ends the session holding the leader lease in database `db` without its holder noticing yet: the
    /// database releases the lock, as when the holder is cut off from it.
    async fn cut_lease(store: &PgStore, db: &str) {
        let cut: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'comfyrelay-leader-lease'",
        )
        .bind(db)
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(cut, [true], "one lease session");
    }

    /// Waits until a session of `db` waits on a lock (a probe with a deadline, not a fixed sleep).
    async fn until_waiting_on_a_lock(store: &PgStore, db: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
            )
            .bind(db)
            .fetch_one(&store.pool)
            .await
            .unwrap();
            if waiting > 0 {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "no session ever waited on a lock");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_a_deposed_leaders_writes_are_refused_once_another_replica_leads() {
        use crate::store::{LeaderLease, MachineStore as _};
        let Some(server) = PgServer::start().await else { return };
        let url = server.database("fence").await;
        let store = PgStore::connect(&url).await.unwrap();
        let stop = CancellationToken::new();
        let machine = |id: &str| crate::store::MachineRow {
            id: id.into(),
            kind: "runcomfy".into(),
            state: "ready".into(),
            created_ms: 1,
            updated_ms: 1,
            body: "{}".into(),
        };

        // The first leader writes under its term.
        let first = LeaderLease::acquire(&url, &stop).await.unwrap().expect("the first lease");
        let a = store.fenced(&first);
        a.commit(&Batch { creates: vec![create("j", 1, None)], ..Default::default() }).await.unwrap();
        a.put_machine(&machine("m1")).await.unwrap();

        // It is cut off and a second replica leads, with the next term, before the first notices.
        cut_lease(&store, "fence").await;
        let second = LeaderLease::acquire(&url, &stop).await.unwrap().expect("the second lease");
        assert_eq!(second.term(), first.term() + 1);

        // The first's late writes are refused, and it learns it lost the lease.
        let late = a.commit(&Batch { events: vec![event("j", 2)], ..Default::default() }).await;
        assert!(
            matches!(late, Err(StoreError::Fenced { term, current }) if term == first.term() && current == second.term()),
            "{late:?}"
        );
        assert!(first.lost().is_cancelled());
        assert!(matches!(a.put_machine(&machine("m2")).await, Err(StoreError::Fenced { .. })));
        assert!(matches!(a.delete_machine("m1").await, Err(StoreError::Fenced { .. })));
        assert!(matches!(
            a.set_setting("leader_url", Some("http://a")).await,
            Err(StoreError::Fenced { .. })
        ));
        assert_eq!(store.get_job("j").await.unwrap().map(|j| j.last_seq), Some(1), "nothing of it landed");
        assert_eq!(
            store.list_machines().await.unwrap().iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["m1"]
        );

        // The second writes; a transaction of it still open when a third replica takes the lease holds the
        // third back until it ends, and lands before the third's term begins ...
        let b = store.fenced(&second);
        b.commit(&Batch { events: vec![event("j", 2)], ..Default::default() }).await.unwrap();
        let mut open = b.begin_write().await.unwrap();
        sqlx::query("INSERT INTO replica_settings (key, value) VALUES ('probe', 'second')")
            .execute(&mut *open)
            .await
            .unwrap();
        cut_lease(&store, "fence").await;
        let third = tokio::spawn({
            let (url, stop) = (url.clone(), stop.clone());
            async move { LeaderLease::acquire(&url, &stop).await }
        });
        until_waiting_on_a_lock(&store, "fence").await;
        assert!(!third.is_finished(), "the third lease waits for the second's open transaction");
        open.commit().await.unwrap();
        let third = third.await.unwrap().unwrap().expect("the third lease");
        assert_eq!(third.term(), second.term() + 1);
        assert_eq!(store.setting("probe").await.unwrap().as_deref(), Some("second"));
        // ... and nothing after it.
        assert!(matches!(
            b.commit(&Batch { events: vec![event("j", 3)], ..Default::default() }).await,
            Err(StoreError::Fenced { .. })
        ));
        let c = store.fenced(&third);
        c.commit(&Batch { events: vec![event("j", 3)], ..Default::default() }).await.unwrap();
        let seqs: Vec<u64> = store.events_after("j", 0, 10).await.unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_a_standby_that_stops_while_it_waits_for_the_lease_leaves_it_to_the_next() {
        use crate::store::LeaderLease;
        let Some(server) = PgServer::start().await else { return };
        let url = server.database("waiting").await;
        let store = PgStore::connect(&url).await.unwrap();
        let never = CancellationToken::new();
        let holder = LeaderLease::acquire(&url, &never).await.unwrap().expect("the first lease");

        // A standby waits for the lock in the database, then stops while it waits.
        let stop = CancellationToken::new();
        let waiting = tokio::spawn({
            let (url, stop) = (url.clone(), stop.clone());
            async move { LeaderLease::acquire(&url, &stop).await }
        });
        until_waiting_on_a_lock(&store, "waiting").await;
        // Each wait is bounded (`lock_timeout`): the waiting backend starts its query again.
        let waits_since = || {
            sqlx::query_scalar::<_, f64>(
                "SELECT extract(epoch FROM query_start)::float8 FROM pg_stat_activity \
                 WHERE datname = 'waiting' AND application_name = 'comfyrelay-leader-lease' \
                 AND wait_event_type = 'Lock'",
            )
            .fetch_optional(&store.pool)
        };
        let first = waits_since().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = waits_since().await.unwrap();
            if now.is_some() && now != first {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the standby's wait for the lock never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        assert!(waiting.await.unwrap().unwrap().is_none(), "a standby that stopped takes no lease");

        // The holder goes: the next standby leads, with the next term. Had the stopped standby's backend
        // gone on waiting, it would have taken the lock and held it for nobody.
        drop(holder);
        let next = tokio::time::timeout(Duration::from_secs(20), LeaderLease::acquire(&url, &never))
            .await
            .expect("the next standby leads within 20 s")
            .unwrap()
            .expect("the next lease");
        assert_eq!(next.term(), 2);
        let holders: Vec<String> = sqlx::query_scalar(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
             WHERE l.locktype = 'advisory' AND l.granted",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(holders, ["comfyrelay-leader-lease"], "one session holds the lock: the next lease's");
    }

    #[tokio::test]
    async fn postgres_a_listener_whose_connection_is_killed_says_resync_and_hears_again() {
        let Some((_server, store)) = store().await else { return };
        let mut events = store.listen_events().await.unwrap();
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap();
        assert_eq!(killed, [true], "one listening connection");
        // sqlx sees the connection end and reconnects (`Resync`); were the server's goodbye to surface as an
        // error instead, the call after it reconnects and says `Resync`.
        let notice = match events.next().await {
            Err(_) => events.next().await.unwrap(),
            Ok(notice) => notice,
        };
        assert_eq!(notice, EventNotice::Resync);
        store.commit(&Batch { creates: vec![create("a", 1, None)], ..Default::default() }).await.unwrap();
        assert_eq!(events.next().await.unwrap(), EventNotice::Appended { job_id: "a".into(), last_seq: 1 });
    }

    #[tokio::test]
    async fn postgres_the_store_never_shows_its_password() {
        let Some(server) = PgServer::start().await else { return };
        let url = server.database("secret").await;
        // Trust authentication ignores the password, so the URL with one connects.
        let url = url.replacen("://comfyrelay@", "://comfyrelay:hunter2@", 1);
        let store = PgStore::connect(&url).await.unwrap();
        assert!(!format!("{store:?}").contains("hunter2"));
        let events = store.listen_events().await.unwrap();
        assert!(!format!("{events:?}").contains("hunter2"));
        let bad = PgStore::connect(&url.replace("/secret", "/absent")).await.unwrap_err();
        assert!(!format!("{bad} {bad:?}").contains("hunter2"));
    }

    #[test]
    fn notices_parse_job_and_sequence() {
        let appended =
            |job: &str, seq: u64| Some(EventNotice::Appended { job_id: job.into(), last_seq: seq });
        assert_eq!(parse_notice("0198-ab 42"), appended("0198-ab", 42));
        assert_eq!(parse_notice("a 18446744073709551615"), appended("a", u64::MAX));
        for bad in ["", "a", "a b c", " 1", "a -1", "a x", "a 1 "] {
            assert_eq!(parse_notice(bad), None, "{bad:?}");
        }
    }
}
