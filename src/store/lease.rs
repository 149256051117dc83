//! The leader lease of replicas sharing one PostgreSQL database: a session-level advisory lock held on a
//! connection of its own.
//!
//! PostgreSQL releases the lock when the session ends: at once when the holder stops or is killed (its
//! socket closes), and after the TCP keepalive settings below (about 11 s) when it is cut off from the
//! database. The holder checks its connection every `CHECK_EVERY` (1 s) and gives the lease up (the
//! [`LeaderLease::lost`] token) when a check fails or takes longer than `CHECK_TIMEOUT` (3 s), well before the
//! database can drop its session and hand the lock to another replica: two replicas never lead at once.
//! A standby waits for the lock with `pg_advisory_lock`, so it takes the lease as soon as the holder's
//! session ends (a poll every 0.5 s made a takeover wait 0.25 s on average for nothing), but never for
//! long: each wait ends after `WAIT_AT_MOST` (1 s, `lock_timeout`) and starts again, and the backend checks
//! every `CLIENT_CHECK` (0.25 s, `client_connection_check_interval`, PostgreSQL 14+) that the standby is
//! still there. So a standby that stops, or is killed, while it waits leaves no backend that would take the
//! lock after it and hold it for nobody.
//!
//! A lease also has a fencing **term** (`leader_term`, migration 0003): the holder adds one to it as it
//! takes the lock, after the transactions that still hold the previous term ended, and the store's writes
//! under [`super::PgStore::fenced`] check it. A deposed leader whose writes arrive late (its partition
//! healed, it was paused past its checks) is refused by the database and learns it lost the lease.

use std::{str::FromStr, time::Duration};

use sqlx::{
    Connection as _, Executor as _,
    postgres::{PgConnectOptions, PgConnection},
};
use tokio_util::sync::CancellationToken;

use super::StoreError;

/// The advisory lock's key (in the database's own lock space): "comfyrelay leader" in ASCII, truncated. A
/// session holding it (`pg_locks`, `locktype = 'advisory'`) is the leader's.
pub const LEADER_LOCK: i64 = 0x636f_6d66_7972_6c64;
/// How often the leader checks its lease connection.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a check may take before the leader gives the lease up.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest one wait for the lock lasts before it is asked again.
const WAIT_AT_MOST: &str = "1s";
/// How often a waiting backend checks that its standby is still connected.
const CLIENT_CHECK: &str = "250ms";
/// How long a standby waits before it connects again after a failure.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// This replica's lease on leadership. Dropping it ends the session, which releases the lock at once.
#[derive(Debug)]
pub struct LeaderLease {
    /// The fencing term this lease took.
    term: i64,
    lost: CancellationToken,
    /// Owned: the checker, aborted when the lease is dropped (closing the connection it holds).
    checker: tokio::task::JoinHandle<()>,
}

impl LeaderLease {
    /// Waits until this replica holds the lease, or returns `None` when `stop` is cancelled first.
    /// Connection failures while waiting are logged and retried.
    ///
    /// # Errors
    /// The URL does not parse.
    pub async fn acquire(url: &str, stop: &CancellationToken) -> Result<Option<Self>, StoreError> {
        // The database drops a silent session after 5 + 3 × 2 s of unanswered keepalives.
        let options = super::postgres::keepalives(PgConnectOptions::from_str(url)?)
            .application_name("comfyrelay-leader-lease");
        let mut waiting_logged = false;
        loop {
            let attempt = async {
                let mut conn = PgConnection::connect_with(&options).await?;
                conn.execute(format!("SET lock_timeout = '{WAIT_AT_MOST}'").as_str()).await?;
                // Before PostgreSQL 14 the setting does not exist: the waits are still bounded.
                if let Err(e) = conn
                    .execute(format!("SET client_connection_check_interval = '{CLIENT_CHECK}'").as_str())
                    .await
                {
                    tracing::debug!(error = %e, "the database does not check a waiting standby's connection");
                }
                loop {
                    match sqlx::query("SELECT pg_advisory_lock($1)")
                        .bind(LEADER_LOCK)
                        .execute(&mut conn)
                        .await
                    {
                        Ok(_) => break,
                        // `lock_not_available`: another replica still leads; wait again.
                        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {}
                        Err(e) => return Err(e),
                    }
                    if !waiting_logged {
                        tracing::info!("standby: another replica leads; waiting for its lease");
                        waiting_logged = true;
                    }
                }
                // Waits, however long it takes, for the previous leader's transactions that still hold its
                // term.
                conn.execute("SET lock_timeout = 0").await?;
                let term: i64 =
                    sqlx::query_scalar("UPDATE leader_term SET term = term + 1 WHERE id = 1 RETURNING term")
                        .fetch_one(&mut conn)
                        .await?;
                Ok::<_, sqlx::Error>((conn, term))
            };
            let result = tokio::select! {
                () = stop.cancelled() => return Ok(None),
                result = attempt => result,
            };
            match result {
                Ok((conn, term)) => return Ok(Some(Self::hold(conn, term))),
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::ErrorChain(&e), "asking for the leader lease failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return Ok(None),
                        () = tokio::time::sleep(RETRY_AFTER) => {}
                    }
                }
            }
        }
    }

    fn hold(mut conn: PgConnection, term: i64) -> Self {
        let lost = CancellationToken::new();
        let token = lost.clone();
        // Exit policy: runs until a check fails (then cancels `lost` and ends) or the lease is dropped
        // (aborted; the connection closes with it).
        let checker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(CHECK_EVERY).await;
                match tokio::time::timeout(CHECK_TIMEOUT, conn.execute("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %crate::telemetry::ErrorChain(&e), "the leader lease's connection failed: giving the lead up");
                        break;
                    }
                    Err(_) => {
                        tracing::error!(timeout = ?CHECK_TIMEOUT, "the leader lease's connection did not answer: giving the lead up");
                        break;
                    }
                }
            }
            token.cancel();
        });
        Self { term, lost, checker }
    }

    /// The fencing term this lease took: one more than the previous leader's.
    pub fn term(&self) -> i64 {
        self.term
    }

    /// Cancelled when this replica lost the lease: it must stop leading at once.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }
}

impl Drop for LeaderLease {
    fn drop(&mut self) {
        self.checker.abort();
    }
}
