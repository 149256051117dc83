//! The leader lease of replicas sharing one PostgreSQL database: a session-level advisory lock held on a
//! connection of its own.
//!
//! PostgreSQL releases the lock when the session ends: at once when the holder stops or is killed (its
//! socket closes), and after the TCP keepalive settings below (about 11 s) when it is cut off from the
//! database. The holder checks its connection every `CHECK_EVERY` (1 s) and gives the lease up (the
//! [`LeaderLease::lost`] token) when a check fails or takes longer than `CHECK_TIMEOUT` (3 s), well before the
//! database can drop its session and hand the lock to another replica: two replicas never lead at once.
//! A standby asks for the lock every `ASK_EVERY` (0.5 s) with `pg_try_advisory_lock` (never a blocking
//! `pg_advisory_lock`, whose waiting backend would outlive a standby that stops).
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
/// How often a standby asks for the lease.
const ASK_EVERY: Duration = Duration::from_millis(500);

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
                loop {
                    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(LEADER_LOCK)
                        .fetch_one(&mut conn)
                        .await?;
                    if held {
                        // Waits for the previous leader's transactions that still hold its term.
                        let term: i64 = sqlx::query_scalar(
                            "UPDATE leader_term SET term = term + 1 WHERE id = 1 RETURNING term",
                        )
                        .fetch_one(&mut conn)
                        .await?;
                        return Ok::<_, sqlx::Error>((conn, term));
                    }
                    if !waiting_logged {
                        tracing::info!("standby: another replica leads; waiting for its lease");
                        waiting_logged = true;
                    }
                    tokio::time::sleep(ASK_EVERY).await;
                }
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
                        () = tokio::time::sleep(ASK_EVERY * 4) => {}
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
