//! The job engine: submission, scheduling, running on ComfyUI machines, event logs and subscriptions.
//!
//! A job is an immutable [`JobSpec`] written once at submit and a log of events; its current
//! [`JobRecord`] (with the per-state data of its [`JobState`]) is what `apply::apply` makes of the
//! log, one event at a time, and nothing else changes it. Knows the catalog, the ComfyUI client's event
//! types and the store; knows nothing of gRPC.
//!
//! # Layout
//! - `model`: ids, spec, state, record, events, failures.
//! - `apply`: the one transition function.
//! - `log`: the one writer (group commit, then install and broadcast) and the registry of live jobs.
//! - `scheduler`: the queue and dispatch, decided in memory.
//! - `runner`: one attempt on one machine.
//! - `recovery`: start-up (conversion of the previous schema, re-attach, re-queue).
//! - `subscribe`: one subscriber's gap-free stream (log, then live).
//! - `follow`: the same streams on a standby, from the shared log, woken by PostgreSQL notifications, and
//!   the same reads, from the shared database.

mod apply;
mod error;
mod follow;
mod log;
pub mod model;
pub mod quota;
mod recovery;
mod runner;
mod scheduler;
mod subscribe;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

pub use crate::machine::{Machine, MachineKind};
pub use error::{JobError, Violation};
pub use follow::JobFollower;
pub use model::{
    Event, EventKind, FailureReason, Job, JobFailure, JobId, JobRecord, JobSpec, JobState, JobStatus,
    OutputFile,
};
pub use subscribe::EventStream;

use crate::{
    catalog::{Catalog, JobInputs, ParamValue, WorkflowSource},
    config::JobsConfig,
    machine::{MachineSpec, PoolEvent, Provisioner},
    store::{ArtifactStore, IdempotencyKey, JobQuery, Store},
};
use log::{Created, Log};
use model::{DeclaredOutput, StoredImage, now_ms};
use scheduler::{SchedMsg, Waiting};

/// Which tenants' jobs a call may see: its own, or (an admin's) every tenant's. Another tenant's job is
/// answered as not found, so its existence is not revealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant's jobs.
    All,
    /// This tenant's jobs only.
    Tenant(String),
}

impl Scope {
    /// Whether a job of `tenant` is visible.
    pub fn sees(&self, tenant: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Tenant(t) => t == tenant,
        }
    }
}

/// A request to run a job, already decoded from the wire.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// The tenant submitting it (the job, its request id and labels belong to it).
    pub tenant: String,
    /// What to run.
    pub source: WorkflowSource,
    /// The inputs.
    pub inputs: JobInputs,
    /// Idempotency key.
    pub request_id: Option<String>,
    /// Priority, -100..=100.
    pub priority: i32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Deadline, ms since the epoch.
    pub deadline_ms: Option<i64>,
}

/// A filter and page over jobs.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    /// Page size (0 = 50).
    pub page_size: u32,
    /// Opaque token from a previous page.
    pub page_token: String,
    /// States to include (empty = all).
    pub states: Vec<JobStatus>,
    /// Workflow.
    pub workflow: Option<String>,
    /// Labels that must all match.
    pub labels: BTreeMap<String, String>,
}

/// A page of jobs.
#[derive(Debug, Clone)]
pub struct JobPage {
    /// Jobs, newest first.
    pub jobs: Vec<Job>,
    /// Token for the next page; empty at the end.
    pub next_page_token: String,
}

/// A job's output together with its bytes when small enough to send inline.
#[derive(Debug, Clone)]
pub struct OutputView {
    /// The output.
    pub output: OutputFile,
    /// Inline bytes, when at most the configured limit.
    pub inline: Option<Bytes>,
}

/// The handle through which everything talks to the job engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: JobsConfig,
    store: Arc<dyn Store>,
    artifacts: ArtifactStore,
    catalog: Catalog,
    /// The job log's writer and the registry of live jobs.
    log: Log,
    /// Machines jobs may be given. Read often, changed rarely (the pool adds and removes RunComfy machines).
    machines: std::sync::RwLock<Vec<Arc<Machine>>>,
    /// The RunComfy pool, when enabled: it hears the demand per spec.
    provisioner: Option<Arc<dyn Provisioner>>,
    /// When fetching a backend's `/object_info` last failed (to not delay every submit while it is down).
    object_info_failed: StdMutex<Option<std::time::Instant>>,
    sched: mpsc::UnboundedSender<SchedMsg>,
    /// Runners, the scheduler and the retention task; drained at shutdown.
    tracker: TaskTracker,
    /// The writer's task: it stops last, after everything else has emitted its final events.
    writer: StdMutex<Option<tokio::task::JoinHandle<()>>>,
    /// Cancelled at shutdown: runners stop where they are (jobs stay resumable in the store).
    shutdown: CancellationToken,
    /// Per-tenant quotas; `None` with authentication off (one tenant: only `jobs.max_unfinished` applies).
    quotas: Option<quota::Quotas>,
    /// With quotas: the ids of each tenant's live jobs (finished ones are dropped when next counted), so a
    /// submit counts its tenant's waiting jobs without scanning every tenant's.
    by_tenant: StdMutex<std::collections::HashMap<String, std::collections::HashSet<JobId>>>,
}

impl JobManager {
    /// Starts the log writer, recovers unfinished jobs, then starts the scheduler and the retention task.
    ///
    /// `machines` are the machines known at start (static ones; the pool announces the RunComfy machines
    /// it adopts with `PoolEvent::Reconciled`, and jobs recovered as running on one wait for that);
    /// `pool`, when RunComfy is enabled, is the pool's demand sink and the channel of its events.
    /// Background tasks stop when `shutdown` is cancelled; call [`JobManager::drain`] to wait for them.
    ///
    /// # Errors
    /// The store cannot be read.
    #[expect(
        clippy::too_many_arguments,
        reason = "the engine's parts, each built by `run` from its own settings; a struct would only rename them"
    )]
    pub async fn start(
        config: JobsConfig,
        store: Arc<dyn Store>,
        artifacts: ArtifactStore,
        catalog: Catalog,
        machines: Vec<Arc<Machine>>,
        pool: Option<(Arc<dyn Provisioner>, mpsc::UnboundedReceiver<PoolEvent>)>,
        quotas: Option<quota::Quotas>,
        shutdown: CancellationToken,
    ) -> Result<Self, JobError> {
        let (sched_tx, sched_rx) = mpsc::unbounded_channel();
        let (provisioner, pool_rx) = match pool {
            Some((p, rx)) => (Some(p), Some(rx)),
            None => (None, None),
        };
        let (log, writer) = Log::new(store.clone())
            .map_err(|e| JobError::Store(Arc::new(crate::store::StoreError::Io(e))))?;
        let writer = tokio::spawn(writer);
        let inner = Arc::new(Inner {
            config,
            store,
            artifacts,
            catalog,
            log,
            machines: std::sync::RwLock::new(machines),
            provisioner,
            object_info_failed: StdMutex::new(None),
            sched: sched_tx,
            tracker: TaskTracker::new(),
            writer: StdMutex::new(Some(writer)),
            shutdown,
            quotas,
            by_tenant: StdMutex::new(Default::default()),
        });
        let manager = Self { inner };
        let (recovered, held) = match manager.recover().await {
            Ok(r) => r,
            Err(e) => {
                manager.inner.log.close().await;
                return Err(e);
            }
        };
        if let Err(e) = manager.seed_machine_seconds().await {
            manager.inner.log.close().await;
            return Err(e);
        }
        let scheduler = scheduler::Scheduler::new(manager.clone(), sched_rx, pool_rx, recovered, held);
        manager.inner.tracker.spawn(scheduler.run().instrument(tracing::info_span!("scheduler")));
        let retention = manager.clone();
        manager.inner.tracker.spawn(retention.retention_loop().instrument(tracing::info_span!("retention")));
        Ok(manager)
    }

    /// After the shutdown token was cancelled: waits until `deadline` for runners and background tasks
    /// (which emit their last events: re-queued jobs, finished ones), then for the log writer to commit
    /// them. Returns whether everything stopped in time.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> bool {
        self.inner.tracker.close();
        let tasks = tokio::time::timeout_at(deadline, self.inner.tracker.wait()).await.is_ok();
        self.inner.log.close().await;
        let writer = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        let written = match writer {
            Some(w) => tokio::time::timeout_at(deadline, w).await.is_ok(),
            None => true,
        };
        tasks && written
    }

    /// The machines jobs may run on now.
    pub fn machines(&self) -> Vec<Arc<Machine>> {
        self.inner.machines.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// The spec a job needs, when a RunComfy pool decides where it runs.
    fn spec_of(&self, spec: &JobSpec) -> Option<MachineSpec> {
        let provisioner = self.inner.provisioner.as_ref()?;
        let workflow_version_id = spec.runcomfy_workflow_version_id.clone()?;
        let server_type = spec.server_type.clone().unwrap_or_else(|| provisioner.default_server_type());
        Some(MachineSpec { workflow_version_id, server_type })
    }

    /// Queues an event without waiting, even when the log's inbox is full (then a short task of the
    /// tracker waits for room): for the scheduler's events that must not be dropped.
    fn emit_reliably(&self, id: JobId, kind: EventKind) {
        if let Err(kind) = self.inner.log.try_append(id, kind) {
            let log = self.inner.log.clone();
            self.inner.tracker.spawn(async move { drop(log.append(id, *kind).await) });
        }
    }

    /// Validates, stores durably and queues a job. Returns it in `QUEUED` (or the earlier job for a
    /// repeated `request_id`).
    ///
    /// # Errors
    /// `InvalidArgument` with every problem, `AlreadyExists` for a reused key, `ResourceExhausted` when
    /// `jobs.max_unfinished` jobs are not finished, storage failures.
    pub async fn submit(&self, req: SubmitRequest) -> Result<Job, JobError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(JobError::ShuttingDown);
        }
        let limit = self.inner.config.max_unfinished;
        if self.inner.log.live_count() >= limit {
            return Err(JobError::ResourceExhausted {
                what: "unfinished jobs",
                limit: limit as u64,
                setting: "jobs.max_unfinished",
            });
        }
        self.check_quotas(&req.tenant)?;
        let mut violations = validate_envelope(&req);
        let request_hash = request_hash(&req);
        let SubmitRequest { tenant, source, inputs, request_id, priority, labels, deadline_ms } = req;
        let scope = Scope::Tenant(tenant.clone());
        // A job for a RunComfy machine is checked against the manifest only: a configured ComfyUI's nodes
        // say nothing about what that machine has installed.
        let runs_on_pool = self.inner.provisioner.is_some()
            && matches!(&source, WorkflowSource::Named(name)
                if self.inner.catalog.get(name).is_some_and(|w| w.requirements.runcomfy_workflow_version_id.is_some()));
        let object_info = if runs_on_pool { None } else { self.backend_object_info().await };
        let prepared = match self.inner.catalog.prepare(source, inputs, object_info.as_deref()) {
            Ok(p) => Some(p),
            Err(v) => {
                violations.extend(v.into_iter().map(|v| Violation::new(v.field, v.description)));
                None
            }
        };
        let Some(prepared) = prepared.filter(|_| violations.is_empty()) else {
            return Err(JobError::InvalidArgument(violations));
        };

        let mut images = Vec::with_capacity(prepared.images.len());
        for slot in &prepared.images {
            let stored = self.inner.artifacts.put(slot.image.data.clone()).await?;
            images.push(StoredImage {
                input: slot.input.clone(),
                sha256: stored.sha256,
                size: stored.size,
                filename: slot.image.filename.clone(),
                content_type: slot.image.content_type.clone(),
                targets: slot.targets.iter().map(|t| (t.node_id.clone(), t.input_name.clone())).collect(),
            });
        }
        let workflow = self.inner.catalog.get(&prepared.workflow);
        let outputs = crate::catalog::declared_outputs(workflow.as_deref(), &prepared.graph)
            .into_iter()
            .map(|(node_id, streamed)| DeclaredOutput { node_id, streamed })
            .collect();
        let spec = Arc::new(JobSpec {
            id: JobId::new(),
            tenant,
            workflow: prepared.workflow,
            workflow_version: prepared.workflow_version,
            inputs: prepared.summary,
            labels,
            priority,
            request_id: request_id.clone(),
            node_classes: crate::catalog::node_classes(&prepared.graph),
            graph: prepared.graph,
            images,
            outputs,
            runcomfy_workflow_version_id: prepared.requirements.runcomfy_workflow_version_id,
            server_type: prepared.requirements.server_type,
            created_ms: now_ms(),
            deadline_ms,
        });
        let position = self.inner.log.live_count() as u32 + 1;
        let key = request_id.map(|request_id| IdempotencyKey { request_id, request_hash });
        let request_id = key.as_ref().map(|k| k.request_id.clone()).unwrap_or_default();
        let first = EventKind::Queued { position, reason: String::new() };
        // Created here, in the SubmitJob call's span: the job's trace continues the caller's.
        let telemetry = crate::telemetry::JobTelemetry::new(spec.id, &spec.workflow);
        match self.inner.log.create(spec.clone(), first, key, telemetry).await? {
            Created::New(live) => {
                self.track_tenant(&spec);
                live.telemetry.submitted();
                tracing::info!(job_id = %spec.id, workflow = %spec.workflow, "job accepted");
                let _ = self.inner.sched.send(SchedMsg::Enqueue(Waiting::of(&spec, self.spec_of(&spec))));
                Ok(live.job())
            }
            Created::Existing(job_id) => match job_id.parse() {
                Ok(id) => self.get(id, &scope).await,
                Err(_) => Err(JobError::Log(format!("stored job id {job_id:?} is not an id"))),
            },
            Created::Conflict(job_id) => Err(JobError::AlreadyExists { request_id, job_id }),
        }
    }

    /// The node catalogue (`/object_info`) of the first static server, so a graph is checked against what
    /// the backend can run before anything is paid for. Cached by the client; `None` when the server does
    /// not answer within 2 s (then not asked again for 30 s, and validation relies on the manifest and
    /// ComfyUI's own checks).
    async fn backend_object_info(&self) -> Option<Arc<serde_json::Value>> {
        let machine = self.machines().into_iter().find(|m| m.spec.is_none())?;
        let recently_failed = self
            .inner
            .object_info_failed
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(30));
        if recently_failed {
            return None;
        }
        let result = tokio::time::timeout(Duration::from_secs(2), machine.client.object_info()).await;
        match result {
            Ok(Ok(info)) => Some(info),
            other => {
                if let Ok(Err(e)) = other {
                    tracing::debug!(machine = %machine.id, error = %e, "no /object_info to validate against");
                }
                if let Ok(mut t) = self.inner.object_info_failed.lock() {
                    *t = Some(std::time::Instant::now());
                }
                None
            }
        }
    }

    /// With quotas, remembers a live job under its tenant (for `max_queued`).
    fn track_tenant(&self, spec: &JobSpec) {
        if self.inner.quotas.is_some() {
            let mut by_tenant =
                self.inner.by_tenant.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            by_tenant.entry(spec.tenant.clone()).or_default().insert(spec.id);
        }
    }

    /// Counts the machine-seconds of the jobs that ended in the last 24 hours, when a tenant has that quota.
    async fn seed_machine_seconds(&self) -> Result<(), JobError> {
        let Some(quotas) = self.inner.quotas.as_ref().filter(|q| q.counts_machine_seconds()) else {
            return Ok(());
        };
        let mut query =
            JobQuery { ended_since: Some(now_ms() - 24 * 3600 * 1000), limit: 1000, ..Default::default() };
        loop {
            let rows = self.inner.store.list_jobs(&query).await?;
            for row in &rows {
                let job = log::decode_job(row)?;
                quotas.job_ended(&row.tenant, row.ended_ms.unwrap_or_default(), job.record.machine_seconds);
            }
            match rows.last() {
                Some(last) if rows.len() == query.limit as usize => {
                    query.before = Some((last.created_ms, last.id.clone()));
                }
                _ => return Ok(()),
            }
        }
    }

    /// A submit of `tenant` past one of its quotas is refused (see [`quota`]).
    fn check_quotas(&self, tenant: &str) -> Result<(), JobError> {
        let Some(quotas) = &self.inner.quotas else { return Ok(()) };
        let limit = quotas.of(tenant).max_queued;
        let waiting = {
            let mut by_tenant =
                self.inner.by_tenant.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let ids = by_tenant.entry(tenant.to_string()).or_default();
            let mut waiting = 0;
            ids.retain(|id| match self.inner.log.live(*id) {
                Some(live) => {
                    waiting += usize::from(matches!(
                        live.record().state,
                        JobState::Queued { .. } | JobState::Provisioning { .. }
                    ));
                    true
                }
                None => false,
            });
            waiting
        };
        if waiting >= limit {
            return Err(JobError::QuotaExceeded(quota::QuotaExceeded {
                quota: quota::QuotaKind::MaxQueued,
                limit: limit as u64,
                retry_after: Duration::from_secs(5),
            }));
        }
        quotas.check_machine_seconds(tenant, now_ms()).map_err(JobError::QuotaExceeded)?;
        quotas.take_submit(tenant).map_err(JobError::QuotaExceeded)
    }

    /// Reads one job, if `scope` sees it.
    ///
    /// # Errors
    /// `NotFound` (also for a job of a tenant `scope` does not see), storage failures.
    pub async fn get(&self, id: JobId, scope: &Scope) -> Result<Job, JobError> {
        if let Some(live) = self.inner.log.live(id) {
            if !scope.sees(&live.spec.tenant) {
                return Err(not_found(id));
            }
            return Ok(live.job());
        }
        stored_job(&*self.inner.store, id, scope).await
    }

    /// Lists jobs, newest first.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad page token or size, storage failures.
    pub async fn list(&self, req: ListRequest, scope: &Scope) -> Result<JobPage, JobError> {
        list_stored(&*self.inner.store, req, scope, |id| self.inner.log.live(id).map(|live| live.job())).await
    }

    /// Cancels a job: at once if queued; by interrupting its prompt if running; no change if finished.
    /// Waits briefly for the end, so the caller usually sees the final state.
    ///
    /// # Errors
    /// `NotFound`, storage failures.
    pub async fn cancel(&self, id: JobId, reason: String, scope: &Scope) -> Result<Job, JobError> {
        let Some(live) = self.inner.log.live(id).filter(|l| scope.sees(&l.spec.tenant)) else {
            return self.get(id, scope).await;
        };
        let reason = if reason.is_empty() { "cancelled by caller".to_string() } else { reason };
        let mut watch = live.watch();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.inner.sched.send(SchedMsg::Remove { id, reply: tx });
        if rx.await.unwrap_or(false) {
            let done = EventKind::Cancelled { reason, usage: model::Usage::default() };
            match self.inner.log.append(id, done).await.durable().await {
                Ok(_) | Err(log::AppendError::NotLive | log::AppendError::Rejected(_)) => {}
                Err(e) => return Err(e.into()),
            }
        } else {
            // Running (or about to run): say so, then let the runner interrupt ComfyUI and end the job.
            match self.inner.log.append(id, EventKind::CancelRequested { reason }).await.durable().await {
                Ok(_) | Err(log::AppendError::NotLive | log::AppendError::Rejected(_)) => {}
                Err(e) => return Err(e.into()),
            }
            live.cancel.cancel();
        }
        let ended = watch.wait_for(|r| r.state.is_terminal());
        let _ = tokio::time::timeout(Duration::from_secs(5), ended).await;
        self.get(id, scope).await
    }

    /// Streams a job's events after `after_sequence`: logged ones, then live ones, ending after the terminal
    /// event. Progress and previews may be coalesced for a subscriber that falls behind.
    ///
    /// A sequence beyond the job's last event streams nothing for a finished job (and only later events
    /// for a live one); sequences past 2⁶³ clamp rather than wrap.
    ///
    /// # Errors
    /// `NotFound`, storage failures.
    pub async fn subscribe(
        &self,
        id: JobId,
        after_sequence: u64,
        skip_previews: bool,
        scope: &Scope,
    ) -> Result<EventStream, JobError> {
        // Subscribe to the live feed FIRST, then read the log: an event committed in between is in one or
        // the other, and duplicates are dropped by sequence.
        let live_rx = match self.inner.log.live(id) {
            Some(live) if !scope.sees(&live.spec.tenant) => return Err(not_found(id)),
            Some(live) => Some(live.subscribe()),
            None => {
                let row = self.inner.store.get_job(&id.to_string()).await?.ok_or_else(|| not_found(id))?;
                if !scope.sees(&row.tenant) {
                    return Err(not_found(id));
                }
                None
            }
        };
        Ok(EventStream::new(self.clone(), id, after_sequence, skip_previews, live_rx))
    }

    /// Reads logged events after `after`, at most `limit`.
    async fn events_after(&self, id: JobId, after: u64, limit: u32) -> Result<Vec<Event>, JobError> {
        let rows = self.inner.store.events_after(&id.to_string(), after, limit).await?;
        rows.iter().map(log::decode_event).collect()
    }

    /// The output's metadata with inline bytes when small enough.
    ///
    /// # Errors
    /// Artifact failures.
    pub async fn output_view(&self, output: &OutputFile) -> Result<OutputView, JobError> {
        output_view(&self.inner.artifacts, self.inner.config.inline_output_max_bytes, output).await
    }

    /// Opens an output of a job for streaming, from byte `offset` on.
    ///
    /// # Errors
    /// `NotFound` for an unknown job or file name; `InvalidArgument` for an `offset` past its end.
    pub async fn open_output(
        &self,
        id: JobId,
        filename: &str,
        offset: u64,
        scope: &Scope,
    ) -> Result<(OutputFile, crate::store::ArtifactReader), JobError> {
        let job = self.get(id, scope).await?;
        open_output_of(&self.inner.artifacts, &job, filename, offset).await
    }

    /// Spawns the runner of `live` on `machine`; it reports the freed slot to the scheduler when done.
    fn spawn_runner(&self, live: Arc<log::LiveJob>, machine: Arc<Machine>, reattach: bool) {
        let manager = self.clone();
        let span = live.telemetry.run(&machine.id, live.record().attempt, reattach);
        self.inner.tracker.spawn(
            async move {
                // Exit policy: a runner never panics the service; an error fails the job with INTERNAL.
                let result = runner::run(&manager, &live, machine.clone(), reattach).await;
                let record = live.record();
                if let (Some(quotas), Some(ended)) = (&manager.inner.quotas, record.ended_ms) {
                    quotas.job_ended(&live.spec.tenant, ended, record.machine_seconds);
                }
                if let Err(e) = result {
                    tracing::error!(error = %crate::telemetry::ErrorChain(&e), "job runner failed");
                    if !manager.inner.shutdown.is_cancelled() {
                        let error =
                            JobFailure::new(FailureReason::Internal, "internal error; see the server log");
                        let done = EventKind::Failed { error, usage: model::Usage::default() };
                        drop(manager.inner.log.append(live.spec.id, done).await);
                    }
                }
                let tenant = live.spec.tenant.clone();
                let _ = manager.inner.sched.send(SchedMsg::Done { machine, tenant });
            }
            .instrument(span),
        );
    }

    /// Deletes finished jobs, their events and unreferenced artifacts after the retention period.
    async fn retention_loop(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(600).min(self.inner.config.retention));
        loop {
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let cutoff = now_ms() - self.inner.config.retention.as_millis() as i64;
            loop {
                match self.inner.store.delete_finished_before(cutoff, 500).await {
                    Ok((ids, orphaned)) => {
                        for sha in &orphaned {
                            if let Err(e) = self.inner.artifacts.delete(sha).await {
                                tracing::warn!(error = %crate::telemetry::ErrorChain(&e), sha256 = %sha, "cannot delete an expired artifact");
                            }
                        }
                        if !ids.is_empty() {
                            tracing::info!(
                                jobs = ids.len(),
                                artifacts = orphaned.len(),
                                "expired jobs deleted"
                            );
                        }
                        if ids.len() < 500 {
                            break;
                        }
                    }
                    Err(e) => {
                        // Exit policy: log and try again at the next tick.
                        tracing::error!(error = %crate::telemetry::ErrorChain(&e), "retention sweep failed");
                        break;
                    }
                }
            }
        }
    }
}

/// `output` with its bytes read from `artifacts` when it is at most `inline_max` bytes.
async fn output_view(
    artifacts: &ArtifactStore,
    inline_max: u64,
    output: &OutputFile,
) -> Result<OutputView, JobError> {
    let inline = if output.size <= inline_max {
        Some(Bytes::from(artifacts.read(&output.sha256).await?))
    } else {
        None
    };
    Ok(OutputView { output: output.clone(), inline })
}

/// A job as it is stored, if `scope` sees it: what a replica that does not hold it in memory answers.
async fn stored_job(store: &dyn Store, id: JobId, scope: &Scope) -> Result<Job, JobError> {
    let row = store.get_job(&id.to_string()).await?.ok_or_else(|| not_found(id))?;
    if !scope.sees(&row.tenant) {
        return Err(not_found(id));
    }
    log::decode_job(&row)
}

/// A page of stored jobs, newest first, each as `live` has it when this replica holds it in memory (the
/// store has it as of its last commit).
async fn list_stored(
    store: &dyn Store,
    req: ListRequest,
    scope: &Scope,
    live: impl Fn(JobId) -> Option<Job>,
) -> Result<JobPage, JobError> {
    let limit = match req.page_size {
        0 => 50,
        n if n > 500 => {
            return Err(JobError::InvalidArgument(vec![Violation::new("page_size", "must be at most 500")]));
        }
        n => n,
    };
    let before = if req.page_token.is_empty() {
        None
    } else {
        Some(decode_page_token(&req.page_token).ok_or_else(|| {
            JobError::InvalidArgument(vec![Violation::new("page_token", "is not a token from ListJobs")])
        })?)
    };
    let query = JobQuery {
        tenant: match scope {
            Scope::All => None,
            Scope::Tenant(t) => Some(t.clone()),
        },
        states: req.states.iter().map(|s| s.as_str().to_string()).collect(),
        workflow: req.workflow,
        labels: req.labels.into_iter().collect(),
        before,
        ended_since: None,
        limit: limit + 1,
    };
    let mut rows = store.list_jobs(&query).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_page_token = match (more, rows.last()) {
        (true, Some(last)) => encode_page_token(last.created_ms, &last.id),
        _ => String::new(),
    };
    let mut jobs = Vec::with_capacity(rows.len());
    for row in rows {
        match row.id.parse().ok().and_then(&live) {
            Some(job) => jobs.push(job),
            None => jobs.push(log::decode_job(&row)?),
        }
    }
    Ok(JobPage { jobs, next_page_token })
}

/// The output of `job` named `filename`, opened for reading.
async fn open_output_of(
    artifacts: &ArtifactStore,
    job: &Job,
    filename: &str,
    offset: u64,
) -> Result<(OutputFile, crate::store::ArtifactReader), JobError> {
    let output = job
        .record
        .outputs
        .iter()
        .find(|o| o.filename == filename)
        .cloned()
        .ok_or_else(|| JobError::NotFound(format!("output {filename:?} of job {}", job.spec.id)))?;
    if offset > output.size {
        return Err(JobError::InvalidArgument(vec![Violation::new(
            "offset",
            format!("must be at most the output's size, {} bytes", output.size),
        )]));
    }
    let file = artifacts.open_file(&output.sha256, offset).await?;
    Ok((output, file))
}

fn not_found(id: JobId) -> JobError {
    JobError::NotFound(format!("job {id}"))
}

fn encode_page_token(created_ms: i64, id: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_ms}:{id}"))
}

fn decode_page_token(token: &str) -> Option<(i64, String)> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (ms, id) = text.split_once(':')?;
    Some((ms.parse().ok()?, id.to_string()))
}

/// Checks the request fields the catalog does not know.
fn validate_envelope(req: &SubmitRequest) -> Vec<Violation> {
    let mut v = Vec::new();
    if !(-100..=100).contains(&req.priority) {
        v.push(Violation::new("priority", "must be between -100 and 100"));
    }
    if let Some(id) = &req.request_id
        && (id.is_empty() || id.len() > 128)
    {
        v.push(Violation::new("request_id", "must be 1 to 128 characters"));
    }
    if req.labels.len() > 64 {
        v.push(Violation::new("labels", "at most 64 labels"));
    }
    for (k, val) in &req.labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if !key_ok {
            v.push(Violation::new(
                format!("labels[{k}]"),
                "keys are 1 to 63 characters of letters, digits, '-', '_', '.', '/'",
            ));
        }
        if val.len() > 256 {
            v.push(Violation::new(format!("labels[{k}]"), "values are at most 256 bytes"));
        }
    }
    if let Some(d) = req.deadline_ms
        && d <= now_ms()
    {
        v.push(Violation::new("deadline", "is in the past"));
    }
    v
}

/// A digest of everything that defines the request, for idempotency (AIP-155).
fn request_hash(req: &SubmitRequest) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        h.update((name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_be_bytes());
        h.update(value);
    };
    match &req.source {
        WorkflowSource::Named(n) => field("workflow", n.as_bytes()),
        WorkflowSource::Inline(g) => field("graph_json", g.as_bytes()),
    }
    if let Some(img) = &req.inputs.image {
        field("image", &img.data);
        field("image.filename", img.filename.as_bytes());
        field("image.content_type", img.content_type.as_bytes());
    }
    if let Some(p) = &req.inputs.prompt {
        field("prompt", p.as_bytes());
    }
    for (k, v) in &req.inputs.parameters {
        let key = format!("parameters[{k}]");
        match v {
            ParamValue::String(s) => field(&key, format!("s:{s}").as_bytes()),
            ParamValue::Int(i) => field(&key, format!("i:{i}").as_bytes()),
            ParamValue::Float(f) => field(&key, format!("f:{}", f.to_bits()).as_bytes()),
            ParamValue::Bool(b) => field(&key, format!("b:{b}").as_bytes()),
            ParamValue::Image(img) => {
                field(&key, &img.data);
                field(&format!("{key}.filename"), img.filename.as_bytes());
            }
        }
    }
    field("priority", &req.priority.to_be_bytes());
    for (k, v) in &req.labels {
        field(&format!("labels[{k}]"), v.as_bytes());
    }
    field("tenant", req.tenant.as_bytes());
    field("deadline", &req.deadline_ms.unwrap_or_default().to_be_bytes());
    hex::encode(h.finalize())
}
