//! One job's trace and metrics: the job engine calls a [`JobTelemetry`] at each step of a job's life, and
//! this turns the steps into spans (one trace per job) and into the job metrics of [`crate::metrics`].
//!
//! The trace of a job:
//!
//! ```text
//! comfyrelay.v1.JobService/SubmitJob   (the RPC; parented to the caller's `traceparent`)
//! └─ job {job_id, workflow, machine, state, reason}    submit → terminal event
//!    ├─ queue                                          waiting in comfyrelay's queue (per attempt)
//!    ├─ provisioning {machine}                         waiting for a RunComfy machine; phases as events
//!    └─ run {job_id, machine, attempt}                 on the machine (per attempt)
//!       ├─ upload
//!       ├─ node {node_id, class_type}                  one per executed node
//!       └─ download {filename}                         one per stored output
//! ```
//!
//! The span context lives here, with the job in memory, from submit to the runner. A job recovered after
//! a restart starts a new trace. Knows the job engine's vocabulary; owns no task.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::{Span, field::Empty};

use crate::{
    jobs::{Event, EventKind, FailureReason, JobId, JobStatus as JobState},
    metrics,
};

/// A job's trace and metrics. Created with the job (in the submit call's span), kept with it in memory.
#[derive(Debug)]
pub struct JobTelemetry {
    id: JobId,
    workflow: String,
    /// The job's span: from submit to its terminal event. Taken (closed) when the job finishes.
    job: Mutex<Option<Span>>,
    phase: Mutex<Phase>,
}

#[derive(Debug, Default)]
struct Phase {
    /// `queue` or `provisioning` (`true`), while the job waits, and since when it waits.
    wait: Option<(Span, Instant, bool)>,
    /// The current attempt's `run` span.
    run: Option<Span>,
    /// The node executing now.
    node: Option<Span>,
}

impl JobTelemetry {
    /// A job `id` of `workflow` entered the queue. Its span is a child of the current span (the SubmitJob
    /// call, whose parent is the caller's `traceparent`).
    pub fn new(id: JobId, workflow: &str) -> Self {
        let job = tracing::info_span!(
            "job",
            job_id = %id,
            workflow = %workflow,
            machine = Empty,
            state = Empty,
            reason = Empty,
            otel.status_code = Empty,
        );
        let telemetry = Self {
            id,
            workflow: workflow.to_owned(),
            job: Mutex::new(Some(job)),
            phase: Mutex::new(Phase::default()),
        };
        telemetry.queued();
        telemetry
    }

    fn job_span(&self) -> Span {
        self.job.lock().ok().and_then(|j| j.clone()).unwrap_or_else(Span::none)
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job was accepted by SubmitJob (not recovered, not a repeated request).
    pub fn submitted(&self) {
        metrics::job_submitted(&self.workflow);
    }

    /// The job waits in the queue (again, after a retry).
    pub fn queued(&self) {
        let span = tracing::info_span!(parent: &self.job_span(), "queue");
        let mut phase = self.phase();
        phase.node = None;
        phase.run = None;
        phase.wait = Some((span, Instant::now(), false));
    }

    /// A RunComfy machine is being provisioned for the job: `phase` reached (machine id empty before the
    /// launch answered).
    pub fn provisioning(&self, machine_id: &str, phase: &str) {
        let mut p = self.phase();
        let since = p.wait.as_ref().map_or_else(Instant::now, |(_, t, _)| *t);
        if !p.wait.as_ref().is_some_and(|(_, _, provisioning)| *provisioning) {
            let span = tracing::info_span!(parent: &self.job_span(), "provisioning", machine = Empty);
            p.wait = Some((span, since, true));
        }
        if let Some((span, _, _)) = &p.wait {
            if !machine_id.is_empty() {
                span.record("machine", machine_id);
            }
            tracing::info!(parent: span, phase, machine = machine_id, "provisioning");
        }
    }

    /// The job starts (or, with `reattach`, resumes after a restart) on `machine`: ends the wait, records
    /// the queue wait, and returns the attempt's `run` span, to instrument the runner with.
    pub fn run(&self, machine: &str, attempt: u32, reattach: bool) -> Span {
        let job = self.job_span();
        job.record("machine", machine);
        let run = tracing::info_span!(parent: &job, "run", job_id = %self.id, machine = %machine, attempt, reattach);
        let mut phase = self.phase();
        if let Some((_, since, _)) = phase.wait.take()
            && !reattach
        {
            metrics::queue_wait(&self.workflow, since.elapsed());
        }
        phase.node = None;
        phase.run = Some(run.clone());
        run
    }

    /// The inputs were uploaded in `d`.
    pub fn uploaded(&self, d: Duration) {
        metrics::stage(&self.workflow, metrics::Stage::Upload, d);
    }

    /// ComfyUI started executing `node_id`: the previous node's span ends, this one's begins.
    pub fn node(&self, node_id: &str, class_type: &str) {
        let mut phase = self.phase();
        phase.node = None;
        let parent = phase.run.clone().unwrap_or_else(|| self.job_span());
        phase.node =
            Some(tracing::info_span!(parent: &parent, "node", node_id = %node_id, class_type = %class_type));
    }

    /// The job succeeded after executing for `execution` and downloading its outputs for `download`.
    pub fn ran(&self, execution: Duration, download: Duration) {
        metrics::stage(&self.workflow, metrics::Stage::Execution, execution);
        metrics::stage(&self.workflow, metrics::Stage::Download, download);
    }

    /// An event of the job was logged and broadcast: the job log's writer calls this after each commit,
    /// so the trace and the metrics follow exactly what is durable.
    pub fn observe(&self, event: &Event) {
        metrics::event_relayed(&event.kind);
        match &event.kind {
            EventKind::Provisioning { phase, machine_id, .. } => self.provisioning(machine_id, phase),
            EventKind::NodeStarted { node_id, class_type, .. } => self.node(node_id, class_type),
            EventKind::PromptSubmitted { upload_ms } => self.uploaded(Duration::from_millis(*upload_ms)),
            EventKind::Retrying { .. } | EventKind::Requeued { .. } => self.queued(),
            EventKind::Succeeded { usage, .. } => {
                let ms = |v: Option<u64>| Duration::from_millis(v.unwrap_or_default());
                self.ran(ms(usage.execution_ms), ms(usage.download_ms));
                self.finished(JobState::Succeeded, None);
            }
            EventKind::Failed { error, .. } => self.finished(JobState::Failed, Some(error.reason)),
            EventKind::Cancelled { .. } => self.finished(JobState::Cancelled, None),
            _ => {}
        }
    }

    /// The job reached its terminal `state` (`reason` for a failed job): records it and ends its spans.
    pub fn finished(&self, state: JobState, reason: Option<FailureReason>) {
        metrics::job_finished(&self.workflow, state, reason);
        {
            let mut phase = self.phase();
            phase.node = None;
            phase.wait = None;
            phase.run = None;
        }
        let Some(job) = self.job.lock().ok().and_then(|mut j| j.take()) else { return };
        // In the job's span, so the line carries the job's trace id.
        tracing::info!(parent: &job, job_id = %self.id, state = state.as_str(), ?reason, "job finished");
        job.record("state", state.as_str());
        if let Some(reason) = reason {
            job.record("reason", tracing::field::debug(reason));
        }
        if state == JobState::Failed {
            job.record("otel.status_code", "ERROR");
        }
    }
}
