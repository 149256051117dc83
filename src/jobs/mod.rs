//! The job engine: submission, scheduling, running on ComfyUI machines, event logs and subscriptions.
//!
//! Owns the lifecycle of every job. Knows the catalog, the ComfyUI client and the store; knows nothing of
//! gRPC. Every state change is an event appended to the job's log in the same store transaction that
//! updates the job, and only then broadcast to live subscribers, so a subscriber that attaches first and
//! reads the log second never misses an event (see `subscribe`).

mod error;
pub mod model;
mod runner;
mod scheduler;
mod subscribe;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

pub use crate::machine::{Machine, MachineKind};
pub use error::{JobError, Violation};
pub use model::{Event, EventKind, FailureReason, Job, JobFailure, JobId, JobState, OutputFile};
pub use subscribe::EventStream;

use crate::{
    catalog::{Catalog, JobInputs, ParamValue, WorkflowSource},
    config::JobsConfig,
    machine::{MachineSpec, PoolEvent, Provisioner},
    store::{ArtifactStore, CreateOutcome, EventRow, IdempotencyKey, JobQuery, JobRow, Store},
};
use model::{StoredImage, now_ms};
use scheduler::SchedMsg;

/// Capacity of each job's live broadcast; a subscriber further behind catches up from the log.
const LIVE_CAPACITY: usize = 256;

/// A request to run a job, already decoded from the wire.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
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
    pub states: Vec<JobState>,
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

/// A job that is not finished: its record (the single writer's lock) and its live feed.
#[derive(Debug)]
struct LiveJob {
    job: tokio::sync::Mutex<Job>,
    tx: broadcast::Sender<Arc<Event>>,
    /// Cancelled when a caller cancels the job or the job must stop.
    cancel: CancellationToken,
}

#[derive(Debug)]
struct Inner {
    config: JobsConfig,
    store: Arc<dyn Store>,
    artifacts: ArtifactStore,
    catalog: Catalog,
    /// Machines jobs may be given. Read often, changed rarely (the pool adds and removes RunComfy machines).
    machines: std::sync::RwLock<Vec<Arc<Machine>>>,
    /// The RunComfy pool, when enabled: it hears the demand per spec.
    provisioner: Option<Arc<dyn Provisioner>>,
    /// When fetching a backend's `/object_info` last failed (to not delay every submit while it is down).
    object_info_failed: StdMutex<Option<std::time::Instant>>,
    /// Jobs not yet terminal. A std mutex: held only for map operations, never across `.await`.
    live: StdMutex<HashMap<JobId, Arc<LiveJob>>>,
    sched: mpsc::UnboundedSender<SchedMsg>,
    /// Job runners and background tasks; drained at shutdown.
    tracker: TaskTracker,
    /// Cancelled at shutdown: runners stop where they are (jobs stay resumable in the store).
    shutdown: CancellationToken,
}

impl JobManager {
    /// Recovers unfinished jobs from the store, then starts the scheduler and the retention task.
    ///
    /// `machines` are the machines known at start (static ones; the pool announces the RunComfy machines
    /// it adopts with `PoolEvent::Reconciled`, and jobs recovered as running on one wait for that);
    /// `pool`, when RunComfy is enabled, is the pool's demand sink and the channel of its events.
    /// Background tasks live in the manager's tracker and stop when `shutdown` is cancelled; call
    /// [`JobManager::drain`] to wait for them.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn start(
        config: JobsConfig,
        store: Arc<dyn Store>,
        artifacts: ArtifactStore,
        catalog: Catalog,
        machines: Vec<Arc<Machine>>,
        pool: Option<(Arc<dyn Provisioner>, mpsc::UnboundedReceiver<PoolEvent>)>,
        shutdown: CancellationToken,
    ) -> Result<Self, JobError> {
        let (sched_tx, sched_rx) = mpsc::unbounded_channel();
        let (provisioner, pool_rx) = match pool {
            Some((p, rx)) => (Some(p), Some(rx)),
            None => (None, None),
        };
        let inner = Arc::new(Inner {
            config,
            store,
            artifacts,
            catalog,
            machines: std::sync::RwLock::new(machines),
            provisioner,
            object_info_failed: StdMutex::new(None),
            live: StdMutex::new(HashMap::new()),
            sched: sched_tx,
            tracker: TaskTracker::new(),
            shutdown,
        });
        let manager = Self { inner };
        let (recovered, held) = manager.recover().await?;
        let scheduler = scheduler::Scheduler::new(manager.clone(), sched_rx, pool_rx, recovered, held);
        manager.inner.tracker.spawn(scheduler.run().instrument(tracing::info_span!("scheduler")));
        let retention = manager.clone();
        manager.inner.tracker.spawn(retention.retention_loop().instrument(tracing::info_span!("retention")));
        Ok(manager)
    }

    /// Waits (up to `grace`) for runners and background tasks after the shutdown token was cancelled.
    /// Returns whether everything stopped in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.inner.tracker.close();
        tokio::time::timeout(grace, self.inner.tracker.wait()).await.is_ok()
    }

    /// The machines jobs may run on now.
    pub fn machines(&self) -> Vec<Arc<Machine>> {
        self.inner.machines.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// The spec a job needs, when a RunComfy pool decides where it runs.
    fn spec_of(&self, job: &Job) -> Option<MachineSpec> {
        let provisioner = self.inner.provisioner.as_ref()?;
        if job.runcomfy_workflow_version_id.is_empty() {
            return None;
        }
        let server_type = if job.server_type.is_empty() {
            provisioner.default_server_type()
        } else {
            job.server_type.clone()
        };
        Some(MachineSpec { workflow_version_id: job.runcomfy_workflow_version_id.clone(), server_type })
    }

    /// Validates, stores durably and queues a job. Returns it in `QUEUED` (or the earlier job for a
    /// repeated `request_id`).
    ///
    /// # Errors
    /// `InvalidArgument` with every problem, `AlreadyExists` for a reused key, storage failures.
    pub async fn submit(&self, req: SubmitRequest) -> Result<Job, JobError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(JobError::ShuttingDown);
        }
        let mut violations = validate_envelope(&req);
        let request_hash = request_hash(&req);
        let SubmitRequest { source, inputs, request_id, priority, labels, deadline_ms } = req;
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
            let stored = self.inner.artifacts.put(&slot.image.data).await?;
            images.push(StoredImage {
                input: slot.input.clone(),
                sha256: stored.sha256,
                size: stored.size,
                filename: slot.image.filename.clone(),
                content_type: slot.image.content_type.clone(),
                targets: slot.targets.iter().map(|t| (t.node_id.clone(), t.input_name.clone())).collect(),
            });
        }
        let output_nodes = self
            .inner
            .catalog
            .get(&prepared.workflow)
            .map(|w| w.outputs.iter().map(|o| o.node_id.clone()).collect())
            .unwrap_or_default();
        let now = now_ms();
        let position = self.queued_count() as u32 + 1;
        let job = Job {
            id: JobId::new(),
            state: JobState::Queued,
            workflow: prepared.workflow,
            workflow_version: prepared.workflow_version,
            inputs: prepared.summary,
            labels,
            priority,
            request_id: request_id.clone(),
            graph: prepared.graph,
            images,
            output_nodes,
            runcomfy_workflow_version_id: prepared
                .requirements
                .runcomfy_workflow_version_id
                .unwrap_or_default(),
            server_type: prepared.requirements.server_type.unwrap_or_default(),
            created_ms: now,
            provision_ms: None,
            started_ms: None,
            ended_ms: None,
            timings: Default::default(),
            machine_id: None,
            comfy_prompt_id: None,
            submitted: false,
            outputs: Vec::new(),
            error: None,
            last_sequence: 1,
            attempt: 1,
            deadline_ms,
            cancel_reason: None,
            cancel_requested: false,
            queue_position: position,
            machine_seconds: 0.0,
            cost_usd: 0.0,
        };
        let event = Event { job_id: job.id, seq: 1, time_ms: now, kind: EventKind::Queued { position } };
        let key = request_id.map(|request_id| IdempotencyKey { request_id, request_hash });
        match self.inner.store.create_job(&job_row(&job)?, &event_row(&event)?, key.as_ref()).await? {
            CreateOutcome::Created => {}
            CreateOutcome::Existing(row) => return Ok(serde_json::from_str(&row.body)?),
            CreateOutcome::Conflict { job_id } => {
                return Err(JobError::AlreadyExists {
                    request_id: key.map(|k| k.request_id).unwrap_or_default(),
                    job_id,
                });
            }
        }
        tracing::info!(job_id = %job.id, workflow = %job.workflow, "job accepted");
        self.register(job.clone());
        let _ = self.inner.sched.send(SchedMsg::Enqueue {
            id: job.id,
            priority: job.priority,
            created_ms: job.created_ms,
            spec: self.spec_of(&job),
        });
        Ok(job)
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

    fn queued_count(&self) -> usize {
        // An estimate for the first `queued` event; the scheduler corrects it at once.
        self.inner.live.lock().map(|m| m.len()).unwrap_or(0)
    }

    fn register(&self, job: Job) -> Arc<LiveJob> {
        let (tx, _) = broadcast::channel(LIVE_CAPACITY);
        let id = job.id;
        let live = Arc::new(LiveJob {
            job: tokio::sync::Mutex::new(job),
            tx,
            cancel: self.inner.shutdown.child_token(),
        });
        if let Ok(mut map) = self.inner.live.lock() {
            map.insert(id, live.clone());
        }
        live
    }

    fn live(&self, id: JobId) -> Option<Arc<LiveJob>> {
        self.inner.live.lock().ok().and_then(|m| m.get(&id).cloned())
    }

    /// Reads one job.
    ///
    /// # Errors
    /// `NotFound`, storage failures.
    pub async fn get(&self, id: JobId) -> Result<Job, JobError> {
        if let Some(live) = self.live(id) {
            return Ok(live.job.lock().await.clone());
        }
        let row = self.inner.store.get_job(&id.to_string()).await?.ok_or_else(|| not_found(id))?;
        Ok(serde_json::from_str(&row.body)?)
    }

    /// Lists jobs, newest first.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad page token or size, storage failures.
    pub async fn list(&self, req: ListRequest) -> Result<JobPage, JobError> {
        let limit = match req.page_size {
            0 => 50,
            n if n > 500 => {
                return Err(JobError::InvalidArgument(vec![Violation::new(
                    "page_size",
                    "must be at most 500",
                )]));
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
            states: req.states.iter().map(|s| s.as_str().to_string()).collect(),
            workflow: req.workflow,
            labels: req.labels.into_iter().collect(),
            before,
            limit: limit + 1,
        };
        let mut rows = self.inner.store.list_jobs(&query).await?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => encode_page_token(last.created_ms, &last.id),
            _ => String::new(),
        };
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            let id: Option<JobId> = row.id.parse().ok();
            match id.and_then(|id| self.live(id)) {
                Some(live) => jobs.push(live.job.lock().await.clone()),
                None => jobs.push(serde_json::from_str(&row.body)?),
            }
        }
        Ok(JobPage { jobs, next_page_token })
    }

    /// Cancels a job: at once if queued; by interrupting its prompt if running; no change if finished.
    ///
    /// # Errors
    /// `NotFound`, storage failures.
    pub async fn cancel(&self, id: JobId, reason: String) -> Result<Job, JobError> {
        let Some(live) = self.live(id) else {
            return self.get(id).await;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.inner.sched.send(SchedMsg::Remove { id, reply: tx });
        let was_queued = rx.await.unwrap_or(false);
        if was_queued {
            let reason = if reason.is_empty() { "cancelled by caller".to_string() } else { reason };
            self.finish(&live, EventKind::Cancelled { reason: reason.clone() }, |job| {
                job.cancel_requested = true;
                job.cancel_reason = Some(reason);
            })
            .await?;
        } else {
            // Running (or about to run): mark it and let the runner interrupt ComfyUI and finish the job.
            let mut job = live.job.lock().await;
            if !job.state.is_terminal() {
                job.cancel_requested = true;
                job.cancel_reason = Some(reason);
                self.persist(&job).await?;
            }
            drop(job);
            live.cancel.cancel();
        }
        let job = live.job.lock().await.clone();
        if job.state.is_terminal() {
            return Ok(job);
        }
        // Wait briefly for the runner so the caller usually sees the final state.
        let mut rx = live.tx.subscribe();
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(e) if e.kind.is_terminal() => break,
                    Err(broadcast::error::RecvError::Closed) => break,
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        self.get(id).await
    }

    /// Streams a job's events after `after_sequence`: logged ones, then live ones, ending after the terminal
    /// event. Progress and previews may be coalesced for a subscriber that falls behind.
    ///
    /// # Errors
    /// `NotFound`, storage failures.
    pub async fn subscribe(
        &self,
        id: JobId,
        after_sequence: u64,
        skip_previews: bool,
    ) -> Result<EventStream, JobError> {
        // Subscribe to the live feed FIRST, then read the log: an event committed in between is in one or
        // the other, and duplicates are dropped by sequence.
        let live_rx = self.live(id).map(|l| l.tx.subscribe());
        if live_rx.is_none() && self.inner.store.get_job(&id.to_string()).await?.is_none() {
            return Err(not_found(id));
        }
        Ok(EventStream::new(self.clone(), id, after_sequence, skip_previews, live_rx))
    }

    /// Reads logged events after `after`, at most `limit`.
    async fn events_after(&self, id: JobId, after: u64, limit: u32) -> Result<Vec<Event>, JobError> {
        let rows = self.inner.store.events_after(&id.to_string(), after, limit).await?;
        rows.iter().map(|r| serde_json::from_str(&r.body).map_err(JobError::from)).collect()
    }

    /// The output's metadata with inline bytes when small enough.
    ///
    /// # Errors
    /// Artifact failures.
    pub async fn output_view(&self, output: &OutputFile) -> Result<OutputView, JobError> {
        let inline = if output.size <= self.inner.config.inline_output_max_bytes {
            Some(Bytes::from(self.inner.artifacts.read(&output.sha256).await?))
        } else {
            None
        };
        Ok(OutputView { output: output.clone(), inline })
    }

    /// Opens an output of a job for streaming.
    ///
    /// # Errors
    /// `NotFound` for an unknown job or file name.
    pub async fn open_output(
        &self,
        id: JobId,
        filename: &str,
    ) -> Result<(OutputFile, tokio::fs::File), JobError> {
        let job = self.get(id).await?;
        let output = job
            .outputs
            .iter()
            .find(|o| o.filename == filename)
            .cloned()
            .ok_or_else(|| JobError::NotFound(format!("output {filename:?} of job {id}")))?;
        let file = self.inner.artifacts.open_file(&output.sha256).await?;
        Ok((output, file))
    }

    /// Appends one event to a live job after applying `mutate` to its record, in one store transaction,
    /// then broadcasts it. Returns the event.
    async fn append(
        &self,
        live: &LiveJob,
        kind: EventKind,
        mutate: impl FnOnce(&mut Job),
    ) -> Result<(), JobError> {
        let mut job = live.job.lock().await;
        self.append_locked(live, &mut job, kind, mutate).await
    }

    /// `append` with the job's lock held. Nothing is ever appended after a terminal event.
    async fn append_locked(
        &self,
        live: &LiveJob,
        job: &mut Job,
        kind: EventKind,
        mutate: impl FnOnce(&mut Job),
    ) -> Result<(), JobError> {
        if job.state.is_terminal() {
            return Ok(());
        }
        let mut next = job.clone();
        mutate(&mut next);
        next.last_sequence += 1;
        let event = Event { job_id: next.id, seq: next.last_sequence, time_ms: now_ms(), kind };
        self.inner.store.commit(&job_row(&next)?, &[event_row(&event)?]).await?;
        *job = next;
        // No receivers is fine: nobody is watching.
        let _ = live.tx.send(Arc::new(event));
        Ok(())
    }

    /// Persists the record without an event.
    async fn persist(&self, job: &Job) -> Result<(), JobError> {
        self.inner.store.commit(&job_row(job)?, &[]).await?;
        Ok(())
    }

    /// Appends the terminal event, sets the terminal state, and retires the live entry.
    async fn finish(
        &self,
        live: &LiveJob,
        kind: EventKind,
        mutate: impl FnOnce(&mut Job),
    ) -> Result<(), JobError> {
        let state = match &kind {
            EventKind::Succeeded { .. } => JobState::Succeeded,
            EventKind::Cancelled { .. } => JobState::Cancelled,
            _ => JobState::Failed,
        };
        let failure = match &kind {
            EventKind::Failed { error } => Some(error.clone()),
            _ => None,
        };
        // The check and the terminal append happen under one lock: two finishers cannot both succeed.
        let mut job = live.job.lock().await;
        if job.state.is_terminal() {
            return Ok(());
        }
        let id = job.id;
        // Machine time and cost are on the job by the time its terminal event is seen.
        let price = job
            .machine_id
            .as_ref()
            .and_then(|m| self.machines().into_iter().find(|x| &x.id == m))
            .map(|m| m.price_per_hour_usd)
            .unwrap_or(0.0);
        self.append_locked(live, &mut job, kind, |job| {
            mutate(job);
            job.state = state;
            job.error = failure;
            job.queue_position = 0;
            let end = now_ms();
            job.ended_ms = Some(end);
            if price > 0.0
                && let Some(start) = job.started_ms
            {
                job.machine_seconds = ((end - start).max(0) as f64) / 1000.0;
                job.cost_usd = job.machine_seconds * price / 3600.0;
            }
        })
        .await?;
        drop(job);
        tracing::info!(job_id = %id, state = state.as_str(), "job finished");
        // Retire after the terminal event is durable: a subscriber that finds no live entry reads it from the log.
        if let Ok(mut map) = self.inner.live.lock() {
            map.remove(&id);
        }
        live.cancel.cancel();
        Ok(())
    }

    /// Loads unfinished jobs: queued ones are queued again, running ones re-attached to their machine.
    /// Returns the running jobs re-attached, with their machines, so the scheduler counts their slots, and
    /// the running jobs held until the pool reports `PoolEvent::Reconciled` (their RunComfy machine may
    /// yet be adopted).
    async fn recover(&self) -> Result<(Vec<(JobId, Arc<Machine>)>, Vec<JobId>), JobError> {
        let rows = self.inner.store.unfinished_jobs().await?;
        let (mut running, mut held) = (Vec::new(), Vec::new());
        for row in rows {
            let job: Job = match serde_json::from_str(&row.body) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(job_id = %row.id, error = %e, "cannot decode a stored job; skipping it");
                    continue;
                }
            };
            let id = job.id;
            let machine =
                job.machine_id.as_ref().and_then(|m| self.machines().into_iter().find(|x| &x.id == m));
            let state = job.state;
            let submitted = job.submitted;
            let (priority, created_ms) = (job.priority, job.created_ms);
            let spec = self.spec_of(&job);
            let live = self.register(job);
            match (state, submitted, machine) {
                (JobState::Running, true, Some(machine)) => {
                    tracing::info!(job_id = %id, "re-attaching to a prompt that was running before the restart");
                    running.push((id, machine.clone()));
                    self.spawn_runner(live, machine, true);
                }
                (JobState::Running, true, None) if spec.is_some() => held.push(id),
                (JobState::Running, true, None) => {
                    // Its machine is no longer configured: treat like a lost prompt.
                    runner::lost_or_retry(self, &live, "its machine is no longer configured".into()).await?;
                }
                _ => {
                    if state != JobState::Queued {
                        self.append(&live, EventKind::Queued { position: 0 }, |job| {
                            job.state = JobState::Queued;
                            job.machine_id = None;
                            job.submitted = false;
                        })
                        .await?;
                    }
                    let _ = self.inner.sched.send(SchedMsg::Enqueue { id, priority, created_ms, spec });
                }
            }
        }
        Ok((running, held))
    }

    /// Spawns the runner of `live` on `machine`; it reports the freed slot to the scheduler when done.
    fn spawn_runner(&self, live: Arc<LiveJob>, machine: Arc<Machine>, reattach: bool) {
        let manager = self.clone();
        let span = tracing::info_span!("job", job_id = tracing::field::Empty, machine = %machine.id);
        self.inner.tracker.spawn(
            async move {
                let id = live.job.lock().await.id;
                tracing::Span::current().record("job_id", tracing::field::display(id));
                // Exit policy: a runner never panics the service; any error fails the job with INTERNAL.
                if let Err(e) = runner::run(&manager, &live, machine.clone(), reattach).await {
                    tracing::error!(error = %e, "job runner failed");
                    if !manager.inner.shutdown.is_cancelled() {
                        let failure =
                            JobFailure::new(FailureReason::Internal, "internal error; see the server log");
                        let _ = manager.finish(&live, EventKind::Failed { error: failure }, |_| {}).await;
                    }
                }
                manager.attribute_cost(&live, &machine).await;
                let _ = manager.inner.sched.send(SchedMsg::Done { machine });
            }
            .instrument(span),
        );
    }

    /// Attributes machine time and cost to a finished job that ran on a billed machine, if `finish` could
    /// not (the machine had already left the list).
    async fn attribute_cost(&self, live: &LiveJob, machine: &Machine) {
        if machine.price_per_hour_usd <= 0.0 {
            return;
        }
        let mut job = live.job.lock().await;
        if !job.state.is_terminal() || job.machine_seconds > 0.0 {
            return;
        }
        let (Some(start), Some(end)) = (job.started_ms, job.ended_ms) else { return };
        let seconds = ((end - start).max(0) as f64) / 1000.0;
        job.machine_seconds = seconds;
        job.cost_usd = seconds * machine.price_per_hour_usd / 3600.0;
        if let Err(e) = self.persist(&job).await {
            tracing::warn!(error = %e, "cannot record the job's cost");
        }
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
                                tracing::warn!(error = %e, sha256 = %sha, "cannot delete an expired artifact");
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
                        tracing::error!(error = %e, "retention sweep failed");
                        break;
                    }
                }
            }
        }
    }
}

fn not_found(id: JobId) -> JobError {
    JobError::NotFound(format!("job {id}"))
}

fn job_row(job: &Job) -> Result<JobRow, JobError> {
    let mut artifacts: Vec<String> = job.images.iter().map(|i| i.sha256.clone()).collect();
    artifacts.extend(job.outputs.iter().map(|o| o.sha256.clone()));
    Ok(JobRow {
        id: job.id.to_string(),
        state: job.state.as_str().to_string(),
        terminal: job.state.is_terminal(),
        workflow: job.workflow.clone(),
        priority: job.priority,
        created_ms: job.created_ms,
        updated_ms: now_ms(),
        ended_ms: job.ended_ms,
        request_id: job.request_id.clone(),
        labels: job.labels.clone(),
        artifacts,
        body: serde_json::to_string(job)?,
    })
}

fn event_row(event: &Event) -> Result<EventRow, JobError> {
    Ok(EventRow {
        job_id: event.job_id.to_string(),
        seq: event.seq,
        time_ms: event.time_ms,
        body: serde_json::to_string(event)?,
    })
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
    field("deadline", &req.deadline_ms.unwrap_or_default().to_be_bytes());
    hex::encode(h.finalize())
}
