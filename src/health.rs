//! Readiness that tells the truth: whether any backend can take a job right now.
//!
//! A job can be taken when at least one machine's ComfyUI is connected, not draining and not held by a
//! cancelled prompt that ignored every interrupt (a configured server, or a RunComfy machine already up), or when a RunComfy pool is able to launch one. [`watch`]
//! re-evaluates this every [`POLL`] and reports each change; the gRPC adapter turns it into the
//! `grpc.health.v1` status of `comfyrelay.v1.JobService`. Knows machines and the pool, not gRPC.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{jobs::JobManager, machine::Machine, pool::Pool};

/// How often readiness is re-evaluated (a handful of atomic reads). A Kubernetes probe every 5 s sees a
/// change at its next probe.
pub const POLL: Duration = Duration::from_millis(500);

/// Whether a job submitted now has a backend: a connected machine taking jobs, or a pool able to launch.
pub fn can_take_jobs(machines: &[Arc<Machine>], pool: Option<&Pool>) -> bool {
    let takes_jobs = |m: &Arc<Machine>| !m.is_draining() && !m.holds_abandoned() && m.conn.is_connected();
    machines.iter().any(takes_jobs) || pool.is_some_and(pool_can_launch)
}

/// Whether the RunComfy pool can launch a machine: every state but a refused token or user id (jobs for
/// RunComfy workflows then fail at once until the configuration is fixed); see [`Pool::launch_health`].
fn pool_can_launch(pool: &Pool) -> bool {
    pool.launch_health().state != crate::pool::LaunchState::Misconfigured
}

/// Calls `report(ready)` with the first readiness and then on every change, until `shutdown` is
/// cancelled. Runs in the caller's task (the gRPC server's shutdown future), so it needs no owner.
pub async fn watch<F, Fut>(jobs: JobManager, pool: Option<Pool>, shutdown: CancellationToken, mut report: F)
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut last = None;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ready = can_take_jobs(&jobs.machines(), pool.as_ref());
        if last != Some(ready) {
            if last.is_some() {
                if ready {
                    tracing::info!("a backend can take jobs again: JobService SERVING");
                } else {
                    tracing::warn!("no backend can take a job: JobService NOT_SERVING");
                }
            }
            last = Some(ready);
            report(ready).await;
        }
    }
}
