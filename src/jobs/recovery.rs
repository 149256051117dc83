//! Start-up: rows of an earlier version are converted, unfinished jobs are made live again, and each is
//! settled through events like any other change: queued jobs go back to the queue, jobs whose prompt may
//! be on ComfyUI are re-attached to it, and an attempt the process died in before its prompt was sent
//! counts as an attempt (so a job that crashes the process cannot be retried into the same crash forever).

use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;

use super::{
    FailureReason, JobError, JobId, JobManager,
    model::{
        DeclaredOutput, JobFailure, JobRecord, JobSpec, JobState, JobStatus, OutputFile, StoredImage,
        Timings, Usage,
    },
    scheduler::{SchedMsg, Waiting},
};
use crate::machine::Machine;

/// Legacy rows converted per store round trip.
const LEGACY_PAGE: u32 = 200;

impl JobManager {
    /// Loads unfinished jobs and settles them. Returns the jobs re-attached to their machines, so the
    /// scheduler counts their slots, and the running jobs held until the pool reports
    /// `PoolEvent::Reconciled` (their RunComfy machine may yet be adopted).
    pub(super) async fn recover(&self) -> Result<(Vec<(JobId, Arc<Machine>)>, Vec<JobId>), JobError> {
        self.migrate_legacy().await?;
        let rows = self.inner.store.unfinished_jobs().await?;
        let (mut running, mut held) = (Vec::new(), Vec::new());
        for row in rows {
            let job = match super::log::decode_job(&row) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(job_id = %row.id, error = %crate::telemetry::ErrorChain(&e), "cannot decode a stored job; skipping it");
                    continue;
                }
            };
            let live = self.inner.log.register(job.spec.clone(), (*job.record).clone());
            self.track_tenant(&job.spec);
            let id = job.spec.id;
            if job.record.cancel_reason.is_some() {
                // A cancel asked for before the restart still holds: the re-attached runner interrupts.
                live.cancel.cancel();
            }
            match &job.record.state {
                JobState::Running { machine_id, submitted: true, .. } => {
                    let machine = self.machines().into_iter().find(|m| &m.id == machine_id);
                    match machine {
                        Some(machine) => {
                            tracing::info!(job_id = %id, machine = %machine.id, "re-attaching to a prompt that was running before the restart");
                            running.push((id, machine.clone()));
                            self.spawn_runner(live, machine, true);
                        }
                        // A RunComfy machine the pool may still adopt once it has reconciled the account.
                        None if self.spec_of(&job.spec).is_some() => held.push(id),
                        None => {
                            let reason = format!("its machine {machine_id} is no longer known");
                            self.retry_or(&live, reason, FailureReason::Lost, Usage::default()).await?;
                        }
                    }
                }
                JobState::Running { machine_id, submitted: false, .. } => {
                    // A graceful stop re-queues such a job; finding it here means the process died during
                    // the attempt (perhaps because of it): the attempt counts.
                    let reason = format!(
                        "comfyrelay stopped during attempt {} on {machine_id}, before the prompt reached ComfyUI",
                        job.record.attempt
                    );
                    self.retry_or(&live, reason, FailureReason::Internal, Usage::default()).await?;
                }
                JobState::Queued { .. } | JobState::Provisioning { .. } => {
                    if live.record().cancel_reason.is_some() {
                        self.end_cancelled(&live, Usage::default()).await?;
                        continue;
                    }
                    let _ = self
                        .inner
                        .sched
                        .send(SchedMsg::Enqueue(Waiting::of(&job.spec, self.spec_of(&job.spec))));
                }
                JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled { .. } => {}
            }
        }
        Ok((running, held))
    }

    /// Converts rows written by the previous schema (one body per job) into a spec and a record.
    async fn migrate_legacy(&self) -> Result<(), JobError> {
        let mut converted = 0usize;
        loop {
            let rows = self.inner.store.legacy_jobs(LEGACY_PAGE).await?;
            if rows.is_empty() {
                break;
            }
            for row in rows {
                let (spec, record) = match serde_json::from_str::<LegacyJob>(&row.body) {
                    Ok(old) => old.convert(),
                    Err(e) => {
                        return Err(
                            crate::store::StoreError::Legacy { id: row.id, reason: e.to_string() }.into()
                        );
                    }
                };
                self.inner
                    .store
                    .migrate_legacy(
                        &row.id,
                        &serde_json::to_string(&spec)?,
                        &serde_json::to_string(&record)?,
                        record.last_sequence,
                    )
                    .await?;
                converted += 1;
            }
        }
        if converted > 0 {
            tracing::info!(jobs = converted, "converted jobs stored by the previous version");
        }
        Ok(())
    }
}

/// The whole-job body the previous schema stored (comfyrelay 0.1, schema 0001).
#[derive(Debug, Deserialize)]
struct LegacyJob {
    id: JobId,
    state: JobStatus,
    workflow: String,
    workflow_version: String,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    priority: i32,
    request_id: Option<String>,
    graph: serde_json::Value,
    #[serde(default)]
    images: Vec<StoredImage>,
    #[serde(default)]
    output_nodes: Vec<String>,
    #[serde(default)]
    runcomfy_workflow_version_id: String,
    #[serde(default)]
    server_type: String,
    created_ms: i64,
    provision_ms: Option<i64>,
    started_ms: Option<i64>,
    ended_ms: Option<i64>,
    #[serde(default)]
    timings: Timings,
    machine_id: Option<String>,
    comfy_prompt_id: Option<String>,
    #[serde(default)]
    submitted: bool,
    #[serde(default)]
    outputs: Vec<OutputFile>,
    error: Option<JobFailure>,
    last_sequence: u64,
    attempt: u32,
    deadline_ms: Option<i64>,
    cancel_reason: Option<String>,
    #[serde(default)]
    cancel_requested: bool,
    #[serde(default)]
    queue_position: u32,
    #[serde(default)]
    machine_seconds: f64,
    #[serde(default)]
    cost_usd: f64,
}

impl LegacyJob {
    fn convert(self) -> (JobSpec, JobRecord) {
        let classes = crate::catalog::node_classes(&self.graph);
        let outputs = self
            .output_nodes
            .iter()
            .map(|n| DeclaredOutput {
                node_id: n.clone(),
                streamed: classes.get(n).is_some_and(|c| crate::catalog::streams_over_websocket(c)),
            })
            .collect();
        let state = match self.state {
            JobStatus::Queued => JobState::Queued { position: self.queue_position, reason: String::new() },
            JobStatus::Provisioning => JobState::Provisioning {
                position: self.queue_position,
                phase: String::new(),
                machine_id: String::new(),
                since_ms: self.provision_ms.unwrap_or(self.created_ms),
            },
            JobStatus::Running => JobState::Running {
                machine_id: self.machine_id.clone().unwrap_or_default(),
                prompt_id: self.comfy_prompt_id.clone().unwrap_or_else(|| self.id.to_string()),
                since_ms: self.started_ms.unwrap_or(self.created_ms),
                submitted: self.submitted,
            },
            JobStatus::Succeeded => JobState::Succeeded,
            JobStatus::Failed => JobState::Failed {
                error: self
                    .error
                    .clone()
                    .unwrap_or_else(|| JobFailure::new(FailureReason::Internal, "failed")),
            },
            JobStatus::Cancelled => {
                JobState::Cancelled { reason: self.cancel_reason.clone().unwrap_or_default() }
            }
        };
        let cancel_reason = match (self.cancel_requested, &self.cancel_reason) {
            (true, r) => Some(r.clone().unwrap_or_default()),
            (false, _) => None,
        };
        let spec = JobSpec {
            id: self.id,
            tenant: crate::auth::DEFAULT_TENANT.to_string(),
            workflow: self.workflow,
            workflow_version: self.workflow_version,
            inputs: self.inputs,
            labels: self.labels,
            priority: self.priority,
            request_id: self.request_id,
            node_classes: classes,
            graph: self.graph,
            images: self.images,
            outputs,
            runcomfy_workflow_version_id: Some(self.runcomfy_workflow_version_id).filter(|s| !s.is_empty()),
            server_type: Some(self.server_type).filter(|s| !s.is_empty()),
            created_ms: self.created_ms,
            deadline_ms: self.deadline_ms,
        };
        let record = JobRecord {
            state,
            last_sequence: self.last_sequence,
            attempt: self.attempt.max(1),
            outputs: self.outputs,
            cancel_reason,
            timings: self.timings,
            provision_ms: self.provision_ms,
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            machine_id: self.machine_id,
            machine_seconds: self.machine_seconds,
            cost_usd: self.cost_usd,
        };
        (spec, record)
    }
}
