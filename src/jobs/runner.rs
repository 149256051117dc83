//! One attempt of a job on one machine: upload inputs, queue the prompt under the job's id, relay every
//! ComfyUI event into the job's log, store and verify outputs as they arrive, and end the attempt with
//! one event (terminal, retry or requeue).
//!
//! The runner never changes a job: it emits events, and the log's writer applies them. Events that order
//! the world are awaited until durable: `started` (so a crash during the upload counts the attempt),
//! `prompt_submitted` (before `POST /prompt`, so a restart re-attaches instead of queueing twice) and the
//! end of the attempt (after every output it names is stored). The others are queued without waiting.
//!
//! What ComfyUI's messages mean is the `comfy` module's business, the graph the catalog's: the runner
//! asks them (`FileRef::from_output`, `catalog::inject_uploaded`) and knows jobs only.
//!
//! # Cancelling a running job
//! ComfyUI honours an interrupt only between steps, so a wedged node ignores it. A cancel therefore
//! escalates, each step logged as a `cancel_step` event and given `jobs.cancel_grace` for ComfyUI to
//! confirm (the prompt's terminal event) before the next: `interrupt` (the per-job cancel where the server
//! has it), `free` (`/free`, then the interrupt again), and on a RunComfy machine `replace_machine` (the pool
//! stops it, so it is billed no further, and the job ends at once). At `jobs.cancel_deadline` after the
//! first step the job ends `CANCELLED` regardless (`abandoned`). A static server is never stopped: after an
//! abandoned cancel the runner keeps the job's slot and the server takes no new jobs until ComfyUI reports
//! the prompt ended (or no longer knows it, after a restart of ComfyUI).
//!
//! At shutdown a runner stops where it is: before the prompt was sent the job goes back to the queue
//! (`requeued`, no attempt counted); after, the job stays `RUNNING` and the next start re-attaches to
//! its prompt and reconciles it from ComfyUI.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{
    EventKind, FailureReason, JobError, JobFailure, JobManager, Machine, MachineKind, OutputFile,
    log::{AppendError, LiveJob},
    model::{CancelStepKind, NodeErrorInfo, Usage, now_ms},
    scheduler::{SchedMsg, Waiting},
};
use crate::{
    catalog::InputTarget,
    comfy::{CancelOutcome, ComfyError, FileRef, PromptEvent, PromptEvents},
};

/// After ComfyUI said the prompt is not (or no longer) running, how long a terminal event already on its
/// way may take before the job is cancelled without it.
const NOT_RUNNING_GRACE: Duration = Duration::from_millis(500);

/// A cancel being escalated on the machine.
#[derive(Debug)]
struct Escalation {
    /// When the first step was taken.
    began: Instant,
    /// The last step taken.
    step: CancelStepKind,
    /// When the next step is due (or, once ComfyUI said the prompt does not run, when the job is cancelled).
    next_at: Instant,
    /// ComfyUI said the prompt is not running (dequeued, or already ended): no further step, the job is
    /// cancelled at `next_at` if its terminal event has not come by then.
    settled: bool,
}

/// What the runner does when an escalation's timer fires.
enum Escalated {
    /// Wait for ComfyUI until the next timer.
    Wait,
    /// End the job `CANCELLED` now.
    Cancel,
    /// The deadline passed: end the job `CANCELLED`, then keep the slot until the prompt ends.
    Abandon,
}

/// One attempt: the job, its machine, and what the attempt has stored so far.
struct Attempt<'a> {
    manager: &'a JobManager,
    live: &'a Arc<LiveJob>,
    machine: Arc<Machine>,
    prompt_id: String,
    outputs: Vec<OutputFile>,
    download_ms: u64,
    ws_counter: usize,
    /// Nodes ComfyUI refused while accepting the rest of the graph (partial validation).
    dropped: Vec<NodeErrorInfo>,
}

/// Runs (or, with `reattach`, resumes) the job on `machine`.
pub(super) async fn run(
    manager: &JobManager,
    live: &Arc<LiveJob>,
    machine: Arc<Machine>,
    reattach: bool,
) -> Result<(), JobError> {
    let record = live.record();
    let mut attempt = Attempt {
        manager,
        live,
        machine,
        prompt_id: live.spec.id.to_string(),
        outputs: if reattach { record.outputs.clone() } else { Vec::new() },
        download_ms: 0,
        ws_counter: record.outputs.iter().filter(|o| o.kind == "websocket").count(),
        dropped: Vec::new(),
    };
    let mut events = if reattach {
        attempt.machine.conn.attach(&attempt.prompt_id)
    } else {
        match attempt.start().await? {
            Some(events) => events,
            None => return Ok(()),
        }
    };
    attempt.relay(&mut events).await
}

impl Attempt<'_> {
    fn id(&self) -> super::JobId {
        self.live.spec.id
    }

    /// Queues an event without waiting for its commit.
    async fn emit(&self, kind: EventKind) {
        drop(self.manager.inner.log.append(self.id(), kind).await);
    }

    /// Appends an event and waits until it is durable.
    async fn emit_durable(&self, kind: EventKind) -> Result<(), AppendError> {
        self.manager.inner.log.append(self.id(), kind).await.durable().await.map(drop)
    }

    /// Ends the attempt with a terminal or re-queueing event, durable. A refusal means another path ended
    /// the job first (a cancel of a queued job, an expiry): nothing more to do.
    async fn end(&self, kind: EventKind) -> Result<(), JobError> {
        match self.emit_durable(kind).await {
            Ok(()) | Err(AppendError::NotLive) => Ok(()),
            Err(AppendError::Rejected(r)) => {
                tracing::debug!(rejected = %r, "the job ended by another path");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Hands the job to the machine, uploads its inputs and queues the prompt. `None`: the attempt ended
    /// before anything reached ComfyUI.
    async fn start(&mut self) -> Result<Option<PromptEvents>, JobError> {
        let cfg = &self.manager.inner.config;
        let shutdown = self.manager.inner.shutdown.clone();
        let started =
            EventKind::Started { machine_id: self.machine.id.clone(), prompt_id: self.prompt_id.clone() };
        // Not awaited here: the upload needs nothing from it, and the log keeps order, so `PromptSubmitted`
        // below, awaited before anything is queued on ComfyUI, is durable only after it. Its answer is read
        // before then (a job cancelled or expired since the dispatch refuses it).
        let started = self.manager.inner.log.append(self.id(), started).await;
        if self.live.cancel.is_cancelled() || shutdown.is_cancelled() {
            return self.stopped_before_submit().await.map(|()| None);
        }

        let upload_started = Instant::now();
        let upload = tokio::select! {
            r = tokio::time::timeout(cfg.upload_timeout, self.upload_inputs()).instrument(tracing::info_span!("upload")) => r,
            () = shutdown.cancelled() => return self.stopped_before_submit().await.map(|()| None),
        };
        let graph = match upload {
            Ok(Ok(graph)) => graph,
            Ok(Err(UploadError::Comfy(e))) => {
                self.backend_error(format!("uploading inputs failed: {e}")).await?;
                return Ok(None);
            }
            Ok(Err(UploadError::Job(e))) => return Err(e),
            Err(_) => {
                self.fail(FailureReason::UploadTimeout, "uploading inputs took too long").await?;
                return Ok(None);
            }
        };
        if self.live.cancel.is_cancelled() || shutdown.is_cancelled() {
            return self.stopped_before_submit().await.map(|()| None);
        }
        match started.durable().await {
            Ok(_) => {}
            // Cancelled or expired between the dispatch and now.
            Err(AppendError::NotLive | AppendError::Rejected(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let upload_ms = upload_started.elapsed().as_millis() as u64;
        match self.emit_durable(EventKind::PromptSubmitted { upload_ms }).await {
            Ok(()) => {}
            Err(AppendError::NotLive | AppendError::Rejected(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }

        match self.machine.conn.submit(&self.prompt_id, graph).await {
            Ok((queued, events)) => {
                if !queued.node_errors.is_empty() {
                    self.dropped = queued.node_errors.iter().map(node_error_info).collect();
                    // ComfyUI runs the valid outputs and drops the others: say which, now.
                    let node_ids: Vec<String> =
                        queued.node_errors.iter().map(|e| e.node_id.clone()).collect();
                    let detail: Vec<String> = queued
                        .node_errors
                        .iter()
                        .map(|e| format!("node {} ({}): {}", e.node_id, e.class_type, e.message))
                        .collect();
                    self.emit(EventKind::Warning {
                        code: "OUTPUTS_DROPPED".into(),
                        message: format!("ComfyUI dropped part of the graph: {}", detail.join("; ")),
                        node_ids,
                    })
                    .await;
                }
                Ok(Some(events))
            }
            Err(ComfyError::Validation { message, node_errors, .. }) => {
                let mut failure = JobFailure::new(
                    FailureReason::Validation,
                    format!("ComfyUI rejected the graph: {message}"),
                );
                failure.node_errors = node_errors.iter().map(node_error_info).collect();
                self.end_failed(failure).await?;
                Ok(None)
            }
            Err(e) => {
                // The POST may or may not have reached ComfyUI: make sure it does not run, then retry.
                let _ = self.machine.client.delete_pending(std::slice::from_ref(&self.prompt_id)).await;
                let _ = self.machine.client.interrupt(&self.prompt_id).await;
                self.backend_error(format!("queueing the prompt failed: {e}")).await?;
                Ok(None)
            }
        }
    }

    /// Cancelled, or shutting down, before the prompt was sent.
    async fn stopped_before_submit(&self) -> Result<(), JobError> {
        if self.manager.inner.shutdown.is_cancelled() {
            return self.end(EventKind::Requeued { reason: "comfyrelay is shutting down".into() }).await;
        }
        self.cancelled().await
    }

    /// Consumes the prompt's events until its terminal one.
    async fn relay(&mut self, events: &mut PromptEvents) -> Result<(), JobError> {
        let cfg = self.manager.inner.config.clone();
        let shutdown = self.manager.inner.shutdown.clone();
        let started = Instant::now();
        let mut deadline = started + cfg.execution_timeout;
        let mut deadline_reason = FailureReason::ExecutionTimeout;
        if let Some(d) = self.live.spec.deadline_ms {
            let left = Duration::from_millis((d - now_ms()).max(0) as u64);
            if started + left < deadline {
                deadline = started + left;
                deadline_reason = FailureReason::DeadlineExceeded;
            }
        }
        let mut escalation: Option<Escalation> = None;
        let cancel = self.live.cancel.clone();
        let machine = self.machine.clone();

        loop {
            let interrupting = escalation.is_some();
            let next_step = escalation.as_ref().map(|e| e.next_at);
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                () = cancel.cancelled(), if !interrupting => {
                    escalation = Some(self.begin_cancel().await);
                    continue;
                }
                () = sleep_until_opt(next_step) => {
                    let Some(esc) = escalation.as_mut() else { continue };
                    match self.escalate(esc).await {
                        Escalated::Wait => continue,
                        Escalated::Cancel => return self.cancelled().await,
                        Escalated::Abandon => {
                            self.cancelled().await?;
                            self.hold_until_ended(events).await;
                            return Ok(());
                        }
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    interrupt(&machine, &self.prompt_id).await;
                    let message = match deadline_reason {
                        FailureReason::DeadlineExceeded => "the deadline passed while executing",
                        _ => "execution took too long",
                    };
                    return self.fail(deadline_reason, message).await;
                }
                () = machine.retired() => {
                    if interrupting {
                        return self.cancelled().await;
                    }
                    let reason = format!("machine {} is gone: {}", machine.id, machine.retire_reason());
                    return self.retry_or(reason, FailureReason::Lost).await;
                }
                event = events.recv() => event,
            };
            let Some(event) = event else {
                // The connection stopped (shutdown): leave the job resumable.
                return Ok(());
            };
            match event {
                PromptEvent::ExecutionStart => {
                    self.emit(EventKind::Comfy { kind: "execution_start".into(), data_json: "{}".into() })
                        .await;
                }
                PromptEvent::Cached { nodes } => {
                    if !nodes.is_empty() {
                        self.emit(EventKind::NodesCached { node_ids: nodes }).await;
                    }
                }
                PromptEvent::Executing { node, display_node } => {
                    let class_type = self.live.spec.node_classes.get(&node).cloned().unwrap_or_default();
                    let display_node_id = display_node.unwrap_or_else(|| node.clone());
                    self.emit(EventKind::NodeStarted { node_id: node, display_node_id, class_type }).await;
                }
                PromptEvent::Progress { node, value, max } => {
                    self.emit(EventKind::Progress { node_id: node, value, max }).await;
                }
                PromptEvent::ProgressState { .. } => {
                    // Folded into node_started/progress: it repeats their content for every node at every step.
                }
                PromptEvent::Executed { node, output, .. } => {
                    let output_json = serde_json::to_string(&output).unwrap_or_default();
                    self.emit(EventKind::NodeExecuted { node_id: node.clone(), output_json }).await;
                    for file in FileRef::from_output(&output) {
                        if !self.live.spec.keeps(&node, &file.kind) {
                            continue;
                        }
                        let t = Instant::now();
                        let span = tracing::info_span!("download", filename = %file.filename);
                        let stored = tokio::time::timeout(cfg.download_timeout, self.download(&file))
                            .instrument(span)
                            .await;
                        self.download_ms += t.elapsed().as_millis() as u64;
                        match stored {
                            Ok(Ok(mut out)) => {
                                out.node_id = node.clone();
                                self.record_output(out).await;
                            }
                            Ok(Err(DownloadError::Invalid(msg))) => {
                                interrupt(&machine, &self.prompt_id).await;
                                return self.fail(FailureReason::OutputInvalid, msg).await;
                            }
                            Ok(Err(DownloadError::Job(e))) => return Err(e),
                            Err(_) => {
                                interrupt(&machine, &self.prompt_id).await;
                                return self
                                    .fail(FailureReason::DownloadTimeout, "downloading outputs took too long")
                                    .await;
                            }
                        }
                    }
                }
                PromptEvent::Preview { node, mime, data } => {
                    let node_id = node.unwrap_or_default();
                    if !node_id.is_empty() && self.live.spec.outputs.iter().any(|o| o.node_id == node_id) {
                        // An image sent over the socket by an output node (SaveImageWebsocket) is an output.
                        self.ws_counter += 1;
                        let out = self.store_bytes(data, &mime, &node_id).await?;
                        self.record_output(out).await;
                    } else {
                        self.emit(EventKind::Preview { mime_type: mime, node_id, data }).await;
                    }
                }
                PromptEvent::Text { node, text } => {
                    self.emit(EventKind::ProgressText { node_id: node, text }).await;
                }
                PromptEvent::Other { kind, data } => {
                    let data_json = serde_json::to_string(&data).unwrap_or_default();
                    self.emit(EventKind::Comfy { kind, data_json }).await;
                }
                PromptEvent::Succeeded => {
                    let execution_ms = started.elapsed().as_millis() as u64;
                    return self.succeeded(events.lossless(), execution_ms).await;
                }
                PromptEvent::Failed(err) => {
                    let mut failure = JobFailure::new(
                        FailureReason::Execution,
                        format!("{} failed: {}", err.node_type, err.exception_message.trim()),
                    );
                    failure.node_errors = vec![NodeErrorInfo {
                        node_id: err.node_id.clone(),
                        class_type: err.node_type.clone(),
                        error_type: err.exception_type.clone(),
                        message: err.exception_message.trim().to_string(),
                        details: String::new(),
                    }];
                    return self.end_failed(failure).await;
                }
                PromptEvent::Interrupted { node_id, node_type } => {
                    if interrupting || self.live.record().cancel_reason.is_some() {
                        return self.cancelled().await;
                    }
                    let at = match (node_type, node_id) {
                        (Some(t), Some(n)) => format!(" at node {n} ({t})"),
                        (None, Some(n)) => format!(" at node {n}"),
                        _ => String::new(),
                    };
                    return self
                        .fail(FailureReason::Interrupted, format!("ComfyUI interrupted the prompt{at}"))
                        .await;
                }
                PromptEvent::Lost { reason } => {
                    if interrupting {
                        return self.cancelled().await;
                    }
                    return self.retry_or(reason, FailureReason::Lost).await;
                }
            }
        }
    }

    /// The first step of a cancel: the per-job cancel (or interrupt) on ComfyUI.
    async fn begin_cancel(&self) -> Escalation {
        let began = Instant::now();
        self.emit(EventKind::CancelStep { step: CancelStepKind::Interrupt, elapsed_ms: 0 }).await;
        let outcome = self.machine.cancel_prompt(&self.prompt_id).await;
        let mut esc = Escalation { began, step: CancelStepKind::Interrupt, next_at: began, settled: false };
        self.after_step(&mut esc, outcome);
        esc
    }

    /// Sets when the next step is due after a step whose call to ComfyUI answered `outcome`.
    fn after_step(&self, esc: &mut Escalation, outcome: Result<CancelOutcome, ComfyError>) {
        let cfg = &self.manager.inner.config;
        let deadline = esc.began + cfg.cancel_deadline;
        match outcome {
            Ok(CancelOutcome::Dequeued | CancelOutcome::NotActive) => {
                // Only queued on ComfyUI (now removed) or already ended: no interrupt message will come, so a
                // terminal event already on its way gets a short grace and no more.
                esc.settled = true;
                esc.next_at = (Instant::now() + NOT_RUNNING_GRACE).min(deadline);
            }
            Ok(CancelOutcome::Interrupted) | Err(_) => {
                if let Err(e) = &outcome {
                    tracing::warn!(error = %e, step = esc.step.as_str(), "a cancel step failed; escalating");
                }
                let next = match (esc.step, self.machine.kind) {
                    (CancelStepKind::Interrupt, _) => Instant::now() + cfg.cancel_grace,
                    (CancelStepKind::Free, MachineKind::RunComfy) => Instant::now() + cfg.cancel_grace,
                    // A static server is never stopped: wait for ComfyUI until the deadline.
                    _ => deadline,
                };
                esc.next_at = next.min(deadline);
            }
        }
    }

    /// The escalation's timer fired: takes the next step.
    async fn escalate(&self, esc: &mut Escalation) -> Escalated {
        let cfg = &self.manager.inner.config;
        let elapsed = esc.began.elapsed();
        let step_event =
            |step: CancelStepKind| EventKind::CancelStep { step, elapsed_ms: elapsed.as_millis() as u64 };
        if esc.settled {
            return Escalated::Cancel;
        }
        let runcomfy = self.machine.kind == MachineKind::RunComfy;
        let past_deadline = elapsed >= cfg.cancel_deadline;
        match esc.step {
            CancelStepKind::Interrupt if !past_deadline => {
                self.emit(step_event(CancelStepKind::Free)).await;
                esc.step = CancelStepKind::Free;
                let outcome = self.machine.free_and_interrupt(&self.prompt_id).await;
                self.after_step(esc, outcome);
                return Escalated::Wait;
            }
            // Due after the free's grace, or at the deadline if that came first (a deadline shorter than two
            // grace periods): a wedged RunComfy machine is never left running and billed.
            CancelStepKind::Interrupt | CancelStepKind::Free if runcomfy => {
                esc.step = CancelStepKind::ReplaceMachine;
                if self.replace_machine(elapsed) {
                    self.emit(step_event(CancelStepKind::ReplaceMachine)).await;
                    return Escalated::Cancel;
                }
                // Not the pool's to stop (already being stopped): wait for the deadline.
            }
            _ => {}
        }
        if past_deadline {
            tracing::warn!(
                machine = %self.machine.id,
                "the cancelled prompt did not stop by jobs.cancel_deadline; the job is cancelled without ComfyUI"
            );
            self.emit(step_event(CancelStepKind::Abandoned)).await;
            return Escalated::Abandon;
        }
        esc.next_at = esc.began + cfg.cancel_deadline;
        Escalated::Wait
    }

    /// Asks the pool to stop and replace this RunComfy machine; whether it will.
    fn replace_machine(&self, elapsed: Duration) -> bool {
        let reason = format!(
            "a cancelled prompt ignored interrupts (and /free) for {}",
            humantime::format_duration(Duration::from_millis(elapsed.as_millis() as u64))
        );
        self.manager.inner.provisioner.as_ref().is_some_and(|p| p.replace(&self.machine.id, &reason))
    }

    /// After an abandoned cancel: the job has ended, but its prompt still runs on the machine. Keeps the
    /// job's slot (the scheduler hears it is free when this returns) and keeps the machine from taking new
    /// jobs until ComfyUI reports the prompt ended or no longer knows it, the machine is retired, or
    /// comfyrelay shuts down.
    async fn hold_until_ended(&self, events: &mut PromptEvents) {
        let machine = self.machine.clone();
        let _held = machine.hold_abandoned();
        let shutdown = self.manager.inner.shutdown.clone();
        tracing::warn!(machine = %machine.id, "the machine takes no new jobs until the abandoned prompt ends");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = machine.retired() => return,
                event = events.recv() => match event {
                    None => return,
                    Some(e) if e.is_terminal() => {
                        tracing::info!(machine = %machine.id, "the abandoned prompt ended; the machine takes jobs again");
                        return;
                    }
                    Some(_) => {}
                },
            }
        }
    }

    /// ComfyUI says the prompt succeeded: succeed only with every declared output stored.
    async fn succeeded(&mut self, lossless: bool, execution_ms: u64) -> Result<(), JobError> {
        let spec = self.live.spec.clone();
        let missing: Vec<String> = spec
            .outputs
            .iter()
            .filter(|d| !self.outputs.iter().any(|o| o.node_id == d.node_id))
            .map(|d| d.node_id.clone())
            .collect();
        let streamed: Vec<String> =
            spec.outputs.iter().filter(|d| d.streamed).map(|d| d.node_id.clone()).collect();
        if !lossless && !streamed.is_empty() {
            // Images of these nodes arrive only over the WebSocket, and this prompt's stream had a gap
            // (comfyrelay restarted, or the socket was replaced, while it ran): some may never have arrived.
            let reason = format!(
                "the images of output node(s) {} arrive only over ComfyUI's WebSocket, and the stream had a gap \
                 while the prompt ran ({} stored): they cannot be recovered",
                streamed.join(", "),
                self.outputs.len()
            );
            return self.retry_or(reason, FailureReason::OutputsMissing).await;
        }
        if !missing.is_empty() && !self.dropped.is_empty() {
            // Partial validation: the valid part ran (its outputs stay on the job), the rest never will.
            let mut failure = JobFailure::new(
                FailureReason::Validation,
                format!(
                    "ComfyUI dropped part of the graph, so output node(s) {} did not run",
                    missing.join(", ")
                ),
            );
            failure.node_errors = self.dropped.clone();
            return self.end_failed(failure).await;
        }
        if !missing.is_empty() {
            let reason = format!("ComfyUI finished without outputs of node(s) {}", missing.join(", "));
            return self.retry_or(reason, FailureReason::OutputsMissing).await;
        }
        let usage = self.usage(Some(execution_ms));
        let done = EventKind::Succeeded { outputs: self.outputs.clone(), usage };
        match self.emit_durable(done).await {
            Ok(()) | Err(AppendError::NotLive) => Ok(()),
            Err(AppendError::Rejected(super::apply::Rejected::MissingOutputs(nodes))) => {
                // The backstop in `apply`: never falsely done.
                self.fail(
                    FailureReason::OutputsMissing,
                    format!("outputs of node(s) {} are missing", nodes.join(", ")),
                )
                .await
            }
            Err(AppendError::Rejected(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Machine time and stage durations of this attempt, for its terminal event.
    fn usage(&self, execution_ms: Option<u64>) -> Usage {
        let price = self.machine.price_per_hour_usd;
        let mut usage = Usage { execution_ms, download_ms: Some(self.download_ms), ..Usage::default() };
        if price > 0.0
            && let Some(start) = self.live.record().started_ms
        {
            usage.machine_seconds = ((now_ms() - start).max(0) as f64) / 1000.0;
            usage.cost_usd = usage.machine_seconds * price / 3600.0;
        }
        usage
    }

    /// Uploads every input image and writes ComfyUI's answered names into the graph.
    async fn upload_inputs(&self) -> Result<serde_json::Value, UploadError> {
        let spec = &self.live.spec;
        let mut graph = spec.graph.clone();
        for image in &spec.images {
            let data = self
                .manager
                .inner
                .artifacts
                .read(&image.sha256)
                .await
                .map_err(|e| UploadError::Job(e.into()))?;
            let uploaded = self
                .machine
                .client
                .upload_image(Bytes::from(data), &image.filename, &image.content_type)
                .await
                .map_err(UploadError::Comfy)?;
            let name = if uploaded.subfolder.is_empty() {
                uploaded.name.clone()
            } else {
                format!("{}/{}", uploaded.subfolder, uploaded.name)
            };
            let targets: Vec<InputTarget> =
                image.targets.iter().map(|(node, input)| InputTarget::new(node, input)).collect();
            crate::catalog::inject_uploaded(&mut graph, &targets, &name);
        }
        Ok(graph)
    }

    /// Streams one output from ComfyUI into the artifact store, verified on the way.
    async fn download(&self, file: &FileRef) -> Result<OutputFile, DownloadError> {
        let mut writer = self.manager.inner.artifacts.writer();
        let downloaded = match self.machine.client.download(file, &mut writer).await {
            Ok(d) => d,
            Err(e) => {
                return Err(DownloadError::Invalid(format!(
                    "output {} could not be fetched: {e}",
                    file.filename
                )));
            }
        };
        let stored = writer.finish().await.map_err(|e| DownloadError::Job(e.into()))?;
        if stored.sha256 != downloaded.sha256 || stored.size != downloaded.size {
            return Err(DownloadError::Invalid(format!("output {} changed while stored", file.filename)));
        }
        Ok(OutputFile {
            node_id: String::new(),
            filename: file.filename.clone(),
            mime_type: downloaded.mime,
            size: stored.size,
            sha256: stored.sha256,
            width: downloaded.width,
            height: downloaded.height,
            kind: file.kind.clone(),
        })
    }

    /// Stores bytes that arrived over the socket as an output.
    async fn store_bytes(&self, data: Bytes, mime: &str, node_id: &str) -> Result<OutputFile, JobError> {
        let (width, height) = image_size(&data);
        let stored = self.manager.inner.artifacts.put(data).await?;
        let ext = if mime == "image/jpeg" { "jpg" } else { "png" };
        Ok(OutputFile {
            node_id: node_id.to_string(),
            filename: format!("ws_{node_id}_{:05}.{ext}", self.ws_counter),
            mime_type: mime.to_string(),
            size: stored.size,
            sha256: stored.sha256,
            width,
            height,
            kind: "websocket".into(),
        })
    }

    /// Adds a stored output to the attempt (unique file name) and logs `output_ready`.
    async fn record_output(&mut self, mut out: OutputFile) {
        if self.outputs.iter().any(|o| o.sha256 == out.sha256 && o.filename == out.filename) {
            // Already stored (a completion recovered from history re-sends what was seen live).
            return;
        }
        if self.outputs.iter().any(|o| o.filename == out.filename) {
            out.filename = format!("{}_{}", out.node_id, out.filename);
        }
        self.outputs.push(out.clone());
        self.emit(EventKind::OutputReady { output: out }).await;
    }

    async fn fail(&self, reason: FailureReason, message: impl Into<String>) -> Result<(), JobError> {
        self.end_failed(JobFailure::new(reason, message)).await
    }

    async fn end_failed(&self, error: JobFailure) -> Result<(), JobError> {
        self.end(EventKind::Failed { error, usage: self.usage(None) }).await
    }

    async fn cancelled(&self) -> Result<(), JobError> {
        self.manager.end_cancelled(self.live, self.usage(None)).await
    }

    /// A backend failure before the prompt ran: retry under the attempts policy, else fail.
    async fn backend_error(&self, reason: String) -> Result<(), JobError> {
        tracing::warn!(machine = %self.machine.id, %reason, "backend error");
        let reason = format!("{reason} (machine {})", self.machine.id);
        self.retry_or(reason, FailureReason::BackendUnavailable).await
    }

    async fn retry_or(&self, reason: String, failure: FailureReason) -> Result<(), JobError> {
        self.manager.retry_or(self.live, reason, failure, self.usage(None)).await
    }
}

impl JobManager {
    /// Ends the current attempt of `live`: a new attempt when attempts remain (back to the queue), else the
    /// job fails with `failure`. A job whose cancel was requested is cancelled instead.
    pub(super) async fn retry_or(
        &self,
        live: &Arc<LiveJob>,
        reason: String,
        failure: FailureReason,
        usage: Usage,
    ) -> Result<(), JobError> {
        let record = live.record();
        if record.cancel_reason.is_some() {
            return self.end_cancelled(live, usage).await;
        }
        if record.attempt >= self.inner.config.max_attempts {
            let message = match failure {
                FailureReason::Lost => format!("the backend lost the prompt: {reason}"),
                _ => reason,
            };
            let error = JobFailure::new(failure, message);
            return self.end_event(live, EventKind::Failed { error, usage }).await;
        }
        let next = record.attempt + 1;
        match self
            .inner
            .log
            .append(live.spec.id, EventKind::Retrying { attempt: next, reason })
            .await
            .durable()
            .await
        {
            Ok(_) => {
                let _ = self
                    .inner
                    .sched
                    .send(SchedMsg::Enqueue(Waiting::of(&live.spec, self.spec_of(&live.spec))));
                Ok(())
            }
            Err(AppendError::NotLive | AppendError::Rejected(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Cancels `live` with the reason its cancel request gave.
    pub(super) async fn end_cancelled(&self, live: &Arc<LiveJob>, usage: Usage) -> Result<(), JobError> {
        let reason = live.record().cancel_reason.clone().unwrap_or_default();
        let reason = if reason.is_empty() { "cancelled by caller".to_string() } else { reason };
        self.end_event(live, EventKind::Cancelled { reason, usage }).await
    }

    async fn end_event(&self, live: &Arc<LiveJob>, kind: EventKind) -> Result<(), JobError> {
        match self.inner.log.append(live.spec.id, kind).await.durable().await {
            Ok(_) | Err(AppendError::NotLive | AppendError::Rejected(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Waiting {
    /// The queue entry of a job.
    pub(super) fn of(spec: &super::JobSpec, machine: Option<crate::machine::MachineSpec>) -> Self {
        Self {
            id: spec.id,
            tenant: spec.tenant.clone(),
            priority: spec.priority,
            created_ms: spec.created_ms,
            deadline_ms: spec.deadline_ms,
            workflow: spec.workflow.clone(),
            spec: machine,
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Stops the prompt on ComfyUI: removed from the queue if pending, interrupted (that prompt only) if
/// running. Returns whether it was running (an `execution_interrupted` will then follow).
async fn interrupt(machine: &Machine, prompt_id: &str) -> bool {
    if let Err(e) = machine.client.delete_pending(&[prompt_id.to_string()]).await {
        tracing::warn!(error = %e, "cannot remove the prompt from ComfyUI's queue");
    }
    let running = match machine.client.queue().await {
        Ok(q) => q.running.iter().any(|p| p == prompt_id),
        Err(_) => true,
    };
    if running && let Err(e) = machine.client.interrupt(prompt_id).await {
        tracing::warn!(error = %e, "cannot interrupt the prompt");
    }
    running
}

enum UploadError {
    Comfy(ComfyError),
    Job(JobError),
}

enum DownloadError {
    Invalid(String),
    Job(JobError),
}

fn image_size(data: &[u8]) -> (u32, u32) {
    image::ImageReader::new(std::io::Cursor::new(data))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .unwrap_or((0, 0))
}

fn node_error_info(e: &crate::comfy::NodeError) -> NodeErrorInfo {
    NodeErrorInfo {
        node_id: e.node_id.clone(),
        class_type: e.class_type.clone(),
        error_type: e.error_type.clone(),
        message: e.message.clone(),
        details: e.details.clone(),
    }
}
