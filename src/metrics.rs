//! Every Prometheus metric comfyrelay exports: names, labels and help text in one place, with small typed
//! recording functions, so other modules call `metrics::job_submitted(workflow)`, never a string.
//!
//! Recording goes through the `metrics` facade: without an installed recorder (`metrics.listen` unset, and
//! in-process tests) each call is a no-op. [`install`] installs the process-wide Prometheus recorder once;
//! [`serve`] answers `GET /metrics` on its own listener, off the gRPC port.
//!
//! Label values are bounded: workflow names come from the catalog (inline graphs are `inline`), states,
//! reasons, stages, event kinds and endpoints are fixed sets, servers are the configured names (RunComfy
//! machines are labelled by their pool, not their id), and there are no job ids and no tenants.
//!
//! Knows the domain's vocabulary (job states, failure reasons, event kinds) to name label values, and
//! nothing of tonic.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use ::metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    jobs::{EventKind, FailureReason, JobStatus as JobState},
    machine::MachineSpec,
};

const JOBS_SUBMITTED: &str = "comfyrelay_jobs_submitted_total";
const JOBS_FINISHED: &str = "comfyrelay_jobs_finished_total";
const QUEUE_DEPTH: &str = "comfyrelay_queue_depth";
const QUEUE_WAIT: &str = "comfyrelay_job_queue_wait_seconds";
const STAGE: &str = "comfyrelay_job_stage_seconds";
const EVENTS_RELAYED: &str = "comfyrelay_events_relayed_total";
const SUBSCRIBERS: &str = "comfyrelay_stream_subscribers";
const SUBSCRIBERS_COALESCED: &str = "comfyrelay_stream_subscribers_coalesced_total";
const FOLLOWER_LOG_READS: &str = "comfyrelay_follower_log_reads_total";
const GRPC_REQUESTS: &str = "comfyrelay_grpc_requests_total";
const GRPC_DURATION: &str = "comfyrelay_grpc_request_duration_seconds";
const COMFYUI_CONNECTED: &str = "comfyrelay_comfyui_connected";
const COMFYUI_RECONNECTS: &str = "comfyrelay_comfyui_reconnects_total";
const COMFYUI_RECONCILES: &str = "comfyrelay_comfyui_reconciles_total";
const POOL_MACHINES: &str = "comfyrelay_pool_machines";
const POOL_IDLE: &str = "comfyrelay_pool_machines_idle";
const POOL_MIN_WARM: &str = "comfyrelay_pool_min_warm";
const POOL_LAUNCHES: &str = "comfyrelay_pool_launches_total";
const POOL_LAUNCH_FAILURES: &str = "comfyrelay_pool_launch_failures_total";
const POOL_BILLED: &str = "comfyrelay_pool_billed_seconds_total";
const POOL_COST: &str = "comfyrelay_pool_cost_usd";
const RUNCOMFY_REQUESTS: &str = "comfyrelay_runcomfy_requests_total";
const RUNCOMFY_RATE_LIMITED: &str = "comfyrelay_runcomfy_rate_limited_total";
const RUNCOMFY_LIMITER_WAIT: &str = "comfyrelay_runcomfy_limiter_wait_seconds";
const STORE_COMMIT: &str = "comfyrelay_store_commit_seconds";
const STORE_BATCH: &str = "comfyrelay_store_commit_batch_size";
const BUILD_INFO: &str = "comfyrelay_build_info";
const REPLICA_LEADING: &str = "comfyrelay_replica_leading";

/// Histogram buckets for durations, in seconds: a 5 ms job to an hour in the queue.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];
/// Histogram buckets for batch sizes.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
///
/// # Errors
/// Another `metrics` recorder was installed first.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(STORE_BATCH.into()), BATCH_BUCKETS))
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

/// Serves `GET /metrics` (Prometheus text format) on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// The listener fails.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::{Router, http::header, routing::get};
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, url = %format!("http://{addr}/metrics"), "serving metrics");
    let render = handle.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = render.clone();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()) }
            }),
        )
        // Scrapes are cheap but unbounded callers are not: a handful at a time, each bounded in time.
        .layer(tower::limit::ConcurrencyLimitLayer::new(8));
    // Histograms keep raw samples until drained; drain them even if nobody scrapes.
    let upkeep = async {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tokio::select! {
        r = server => r,
        () = upkeep => Ok(()),
    }
}

fn describe() {
    describe_counter!(
        JOBS_SUBMITTED,
        "Jobs accepted by SubmitJob (not repeats of a request_id), by workflow."
    );
    describe_counter!(
        JOBS_FINISHED,
        "Jobs that reached a terminal state, by workflow, state (succeeded, failed, cancelled) and failure reason."
    );
    describe_gauge!(QUEUE_DEPTH, "Jobs waiting in comfyrelay's queue for a machine.");
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time from entering the queue to starting on a machine, per attempt, by workflow."
    );
    describe_histogram!(
        STAGE,
        Unit::Seconds,
        "Time of each stage of a job on its machine (upload of inputs, execution on ComfyUI, download of outputs), by workflow; execution and download of succeeded jobs."
    );
    describe_counter!(EVENTS_RELAYED, "Job events logged and broadcast to subscribers, by kind.");
    describe_gauge!(SUBSCRIBERS, "Open StreamJob calls.");
    describe_counter!(
        SUBSCRIBERS_COALESCED,
        "Times a subscriber fell behind the live feed and caught up from the log with progress coalesced."
    );
    describe_counter!(
        FOLLOWER_LOG_READS,
        "Reads of the shared database a standby made for the StreamJob subscribers of jobs another replica runs (one per notice of a followed job, shared by its subscribers)."
    );
    describe_counter!(GRPC_REQUESTS, "gRPC calls that ended, by method and status code.");
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "gRPC call duration (streaming calls: until the stream ended), by method."
    );
    describe_gauge!(
        COMFYUI_CONNECTED,
        "Open ComfyUI WebSockets by server (configured name, or pool:<pool> for RunComfy machines)."
    );
    describe_counter!(COMFYUI_RECONNECTS, "ComfyUI WebSockets re-opened after the first, by server.");
    describe_counter!(
        COMFYUI_RECONCILES,
        "In-flight prompts checked against ComfyUI's /queue and /history, by server."
    );
    describe_gauge!(POOL_MACHINES, "RunComfy machines the pool knows, by pool and state.");
    describe_gauge!(POOL_IDLE, "Ready RunComfy machines with no job (billed, idle), by pool.");
    describe_gauge!(POOL_MIN_WARM, "Machines the pool keeps running without jobs (its min_warm), by pool.");
    describe_counter!(POOL_LAUNCHES, "RunComfy machines launched, by pool.");
    describe_counter!(POOL_LAUNCH_FAILURES, "RunComfy launches (or bring-ups) that failed, by pool.");
    describe_counter!(POOL_BILLED, "RunComfy machine-seconds billed (Ready until DELETE), by pool.");
    describe_gauge!(
        POOL_COST,
        "USD billed by the pool's machines since this process started (price of the server type)."
    );
    describe_counter!(
        RUNCOMFY_REQUESTS,
        "RunComfy Server API requests, by endpoint (method and templated path) and status (HTTP code, timeout, transport)."
    );
    describe_counter!(RUNCOMFY_RATE_LIMITED, "RunComfy answers 429 Too Many Requests.");
    describe_histogram!(
        RUNCOMFY_LIMITER_WAIT,
        Unit::Seconds,
        "Time a RunComfy request waited for the account-wide rate limiter (and a 429 back-off)."
    );
    describe_histogram!(STORE_COMMIT, Unit::Seconds, "Duration of one store commit.");
    describe_histogram!(STORE_BATCH, "Events written by one store commit.");
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which build runs.");
    describe_gauge!(
        REPLICA_LEADING,
        "With replicas on PostgreSQL: 1 while this replica holds the leader lease (runs the jobs), 0 while it \
         is a standby."
    );
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

// ---- replicas ----

/// This replica leads (holds the leader lease) or waits as a standby.
pub fn replica_leading(leading: bool) {
    gauge!(REPLICA_LEADING).set(if leading { 1.0 } else { 0.0 });
}

// ---- jobs ----

/// A job was accepted (a new job, not a repeated `request_id`). `workflow` is the catalog name, or
/// `inline` for an inline graph (what the job records as its workflow).
pub fn job_submitted(workflow: &str) {
    counter!(JOBS_SUBMITTED, "workflow" => workflow.to_owned()).increment(1);
}

/// A job reached its terminal `state`; `reason` is the failure reason of a failed job.
pub fn job_finished(workflow: &str, state: JobState, reason: Option<FailureReason>) {
    let reason = match state {
        JobState::Failed => reason.map_or("unknown", failure_label),
        _ => "",
    };
    counter!(JOBS_FINISHED, "workflow" => workflow.to_owned(), "state" => state_label(state), "reason" => reason)
        .increment(1);
}

/// Jobs waiting in the queue now.
pub fn queue_depth(n: usize) {
    gauge!(QUEUE_DEPTH).set(n as f64);
}

/// One attempt of a job waited `d` in the queue before it started.
pub fn queue_wait(workflow: &str, d: Duration) {
    histogram!(QUEUE_WAIT, "workflow" => workflow.to_owned()).record(d.as_secs_f64());
}

/// A stage of a job on its machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Uploading the inputs.
    Upload,
    /// Executing on ComfyUI (queued there, then running).
    Execution,
    /// Downloading and storing the outputs.
    Download,
}

/// A job's `stage` took `d`.
pub fn stage(workflow: &str, stage: Stage, d: Duration) {
    let stage = match stage {
        Stage::Upload => "upload",
        Stage::Execution => "execution",
        Stage::Download => "download",
    };
    histogram!(STAGE, "workflow" => workflow.to_owned(), "stage" => stage).record(d.as_secs_f64());
}

/// An event was logged and broadcast.
pub fn event_relayed(kind: &EventKind) {
    counter!(EVENTS_RELAYED, "kind" => event_label(kind)).increment(1);
}

/// A StreamJob call opened; the gauge goes down when the guard is dropped.
pub fn subscriber() -> SubscriberGuard {
    gauge!(SUBSCRIBERS).increment(1.0);
    SubscriberGuard(())
}

/// Counts one open StreamJob call while it lives.
#[derive(Debug)]
pub struct SubscriberGuard(());

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        gauge!(SUBSCRIBERS).decrement(1.0);
    }
}

/// A subscriber fell behind the live feed and catches up from the log, coalescing progress.
pub fn subscriber_coalesced() {
    counter!(SUBSCRIBERS_COALESCED).increment(1);
}

/// A standby read a followed job's log (or its row) from the shared database for its subscribers.
pub fn follower_log_read() {
    counter!(FOLLOWER_LOG_READS).increment(1);
}

// ---- store ----

/// One store commit took `latency` and wrote `batch_size` events.
pub fn store_commit(latency: Duration, batch_size: usize) {
    histogram!(STORE_COMMIT).record(latency.as_secs_f64());
    histogram!(STORE_BATCH).record(batch_size as f64);
}

// ---- gRPC ----

/// A gRPC call to `method` (`package.Service/Method`, or `unknown`) ended with status `code` (the number in
/// `grpc-status`; `None` when it ended without one: the client went away or the transport failed) after `d`.
pub fn grpc_request(method: &'static str, code: Option<i32>, d: Duration) {
    counter!(GRPC_REQUESTS, "method" => method, "code" => grpc_code_label(code)).increment(1);
    histogram!(GRPC_DURATION, "method" => method).record(d.as_secs_f64());
}

fn grpc_code_label(code: Option<i32>) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    match code {
        // A call that ended without a status was cut short: that is what CANCELLED means to a client.
        None => "CANCELLED",
        Some(n) => usize::try_from(n).ok().and_then(|n| NAMES.get(n)).copied().unwrap_or("UNKNOWN"),
    }
}

// ---- ComfyUI ----

/// The label of a static server (its configured name).
pub fn server_label(name: &str) -> String {
    name.to_owned()
}

/// The label of a RunComfy machine's ComfyUI: its pool (machine ids are unbounded over time).
pub fn pool_server_label(spec: &MachineSpec) -> String {
    format!("pool:{}", pool_label(spec))
}

/// A ComfyUI socket of `server` opened (`true`) or closed (`false`).
pub fn comfyui_connected(server: &str, connected: bool) {
    let g = gauge!(COMFYUI_CONNECTED, "server" => server.to_owned());
    if connected { g.increment(1.0) } else { g.decrement(1.0) }
}

/// A ComfyUI socket of `server` was re-opened after a loss.
pub fn comfyui_reconnected(server: &str) {
    counter!(COMFYUI_RECONNECTS, "server" => server.to_owned()).increment(1);
}

/// `prompts` in-flight prompts of `server` are being reconciled.
pub fn comfyui_reconciled(server: &str, prompts: usize) {
    counter!(COMFYUI_RECONCILES, "server" => server.to_owned()).increment(prompts as u64);
}

// ---- RunComfy pool ----

/// The label of a pool: `<server type>/<RunComfy workflow version id>` (both from the configuration and
/// the catalog, so bounded).
pub fn pool_label(spec: &MachineSpec) -> String {
    format!("{}/{}", spec.server_type, spec.workflow_version_id)
}

/// The pool of `spec` keeps `min_warm` machines even when idle (idle machines above it are waste).
pub fn pool_min_warm(spec: &MachineSpec, min_warm: usize) {
    gauge!(POOL_MIN_WARM, "pool" => pool_label(spec)).set(min_warm as f64);
}

/// A machine of `spec`'s pool was launched.
pub fn machine_launched(spec: &MachineSpec) {
    counter!(POOL_LAUNCHES, "pool" => pool_label(spec)).increment(1);
}

/// A launch (or bring-up) for `spec`'s pool failed.
pub fn machine_launch_failed(spec: &MachineSpec) {
    counter!(POOL_LAUNCH_FAILURES, "pool" => pool_label(spec)).increment(1);
}

/// One pool machine as the pool sees it at a planning tick.
#[derive(Debug, Clone)]
pub struct MachineSample<'a> {
    /// Its pool.
    pub spec: &'a MachineSpec,
    /// The server id (kept here only to accrue billing; never a label).
    pub id: &'a str,
    /// Its state (`starting`, `checking`, `ready`, `draining`, `stopping`, `stopped`, `unhealthy`).
    pub state: &'static str,
    /// Whether it is ready and has no job.
    pub idle: bool,
    /// Seconds billed so far (Ready → DELETE).
    pub billed: Duration,
    /// USD per hour.
    pub price_per_hour_usd: f64,
}

/// Every state a pool machine can be in, so a state that empties reads 0 rather than its last count.
pub const MACHINE_STATES: [&str; 8] =
    ["starting", "checking", "ready", "draining", "stopping", "stopped", "unhealthy", "unmanaged"];

/// The pool's machines now: sets the per-state and idle gauges and accrues billed seconds and cost.
///
/// Billing is accrued from the difference since the last sample of each machine; a machine first seen
/// already billed (adopted after a restart) starts from what it had, so a restart does not count twice.
pub fn pool_machines(samples: &[MachineSample<'_>]) {
    static BILLED: OnceLock<Mutex<HashMap<String, u64>>> = OnceLock::new();
    let mut counts: HashMap<String, (HashMap<&'static str, usize>, usize)> = HashMap::new();
    let mut billed = BILLED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let mut seen = Vec::with_capacity(samples.len());
    for s in samples {
        let pool = pool_label(s.spec);
        let entry = counts.entry(pool.clone()).or_default();
        *entry.0.entry(s.state).or_default() += 1;
        entry.1 += usize::from(s.idle);
        let secs = s.billed.as_secs();
        let before = *billed.entry(s.id.to_owned()).or_insert(secs);
        if secs > before {
            let delta = secs - before;
            counter!(POOL_BILLED, "pool" => pool.clone()).increment(delta);
            gauge!(POOL_COST, "pool" => pool).increment(delta as f64 * s.price_per_hour_usd / 3600.0);
            billed.insert(s.id.to_owned(), secs);
        }
        seen.push(s.id);
    }
    billed.retain(|id, _| seen.contains(&id.as_str()));
    drop(billed);
    for (pool, (states, idle)) in counts {
        for state in MACHINE_STATES {
            let n = states.get(state).copied().unwrap_or(0);
            gauge!(POOL_MACHINES, "pool" => pool.clone(), "state" => state).set(n as f64);
        }
        gauge!(POOL_IDLE, "pool" => pool).set(idle as f64);
    }
}

// ---- RunComfy API ----

/// A RunComfy request to `endpoint` (e.g. `GET /servers/{server_id}`) ended with `status` (an HTTP code,
/// `timeout` or `transport`).
pub fn runcomfy_request(endpoint: &'static str, status: &str) {
    if status == "429" {
        counter!(RUNCOMFY_RATE_LIMITED).increment(1);
    }
    counter!(RUNCOMFY_REQUESTS, "endpoint" => endpoint, "status" => status.to_owned()).increment(1);
}

/// A RunComfy request waited `d` for its turn.
pub fn runcomfy_limiter_wait(d: Duration) {
    histogram!(RUNCOMFY_LIMITER_WAIT).record(d.as_secs_f64());
}

/// Every metric name, for the check that the dashboard and the alerts only use metrics that exist.
#[cfg(test)]
const ALL: &[&str] = &[
    JOBS_SUBMITTED,
    JOBS_FINISHED,
    QUEUE_DEPTH,
    QUEUE_WAIT,
    STAGE,
    EVENTS_RELAYED,
    SUBSCRIBERS,
    SUBSCRIBERS_COALESCED,
    FOLLOWER_LOG_READS,
    GRPC_REQUESTS,
    GRPC_DURATION,
    COMFYUI_CONNECTED,
    COMFYUI_RECONNECTS,
    COMFYUI_RECONCILES,
    POOL_MACHINES,
    POOL_IDLE,
    POOL_MIN_WARM,
    POOL_LAUNCHES,
    POOL_LAUNCH_FAILURES,
    POOL_BILLED,
    POOL_COST,
    RUNCOMFY_REQUESTS,
    RUNCOMFY_RATE_LIMITED,
    RUNCOMFY_LIMITER_WAIT,
    STORE_COMMIT,
    STORE_BATCH,
    BUILD_INFO,
    REPLICA_LEADING,
];

// ---- labels of domain values (exhaustive: a new variant must be named here) ----

fn state_label(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Provisioning => "provisioning",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

fn failure_label(reason: FailureReason) -> &'static str {
    match reason {
        FailureReason::Validation => "validation",
        FailureReason::Execution => "execution",
        FailureReason::Lost => "lost",
        FailureReason::BackendUnavailable => "backend_unavailable",
        FailureReason::QueueTimeout => "queue_timeout",
        FailureReason::UploadTimeout => "upload_timeout",
        FailureReason::ExecutionTimeout => "execution_timeout",
        FailureReason::DownloadTimeout => "download_timeout",
        FailureReason::DeadlineExceeded => "deadline_exceeded",
        FailureReason::OutputInvalid => "output_invalid",
        FailureReason::Provisioning => "provisioning",
        FailureReason::MachineLost => "machine_lost",
        FailureReason::Internal => "internal",
        FailureReason::Interrupted => "interrupted",
        FailureReason::OutputsMissing => "outputs_missing",
    }
}

fn event_label(kind: &EventKind) -> &'static str {
    // The job engine's own short names: a fixed set.
    kind.name()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric names (`comfyrelay_…`) in `text`, without the `_bucket`/`_count`/`_sum` of histogram series.
    fn names_in(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("comfyrelay_") {
            let tail = &rest[at..];
            let end = tail.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| ALL.contains(b)))
                .unwrap_or(name);
            names.push(base.to_owned());
            rest = &tail[end..];
        }
        names
    }

    #[test]
    fn the_dashboard_and_the_alerts_use_only_exported_metrics() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        for file in ["grafana/comfyrelay.json", "prometheus/comfyrelay-rules.yaml"] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let names = names_in(&text);
            assert!(names.len() > 5, "{file} uses metrics");
            for name in names {
                assert!(ALL.contains(&name.as_str()), "{file} uses {name}, which comfyrelay does not export");
            }
        }
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("grafana/comfyrelay.json")).unwrap())
                .unwrap();
        assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 10), "the dashboard has panels");
    }

    #[test]
    fn grpc_codes_are_named() {
        assert_eq!(grpc_code_label(Some(0)), "OK");
        assert_eq!(grpc_code_label(Some(16)), "UNAUTHENTICATED");
        assert_eq!(grpc_code_label(Some(99)), "UNKNOWN");
        assert_eq!(grpc_code_label(None), "CANCELLED");
    }
}
