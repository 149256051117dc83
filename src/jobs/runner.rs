//! One job on one machine: upload inputs, queue the prompt under the job's id, relay every ComfyUI event
//! into the job's log, store and verify outputs as `executed` messages arrive, and record the outcome.
//!
//! At shutdown a runner stops where it is and leaves the job `RUNNING` and `submitted`: on the next start
//! it is re-attached to its prompt and reconciled from ComfyUI's queue and history.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{
    EventKind, FailureReason, JobError, JobFailure, JobManager, JobState, LiveJob, Machine, OutputFile,
    model::{NodeErrorInfo, now_ms},
    scheduler::SchedMsg,
};
use crate::comfy::{ComfyError, FileRef, PromptEvent, PromptEvents};

/// How long a cancelled prompt may take to acknowledge the interrupt before the job is cancelled anyway.
const CANCEL_GRACE: Duration = Duration::from_secs(30);

/// Runs (or, with `reattach`, resumes) the job on `machine`.
pub(super) async fn run(
    manager: &JobManager,
    live: &Arc<LiveJob>,
    machine: Arc<Machine>,
    reattach: bool,
) -> Result<(), JobError> {
    let cfg = manager.inner.config.clone();
    let shutdown = manager.inner.shutdown.clone();
    let (id, prompt_id) = {
        let job = live.job.lock().await;
        (job.id, job.id.to_string())
    };

    let mut events = if reattach {
        machine.conn.attach(&prompt_id)
    } else {
        let now = now_ms();
        manager
            .append(
                live,
                EventKind::Started { machine_id: machine.id.clone(), prompt_id: prompt_id.clone() },
                |job| {
                    job.state = JobState::Running;
                    job.machine_id = Some(machine.id.clone());
                    job.comfy_prompt_id = Some(prompt_id.clone());
                    job.started_ms = Some(now);
                    job.queue_position = 0;
                    job.timings.queue_wait_ms = Some((now - job.created_ms).max(0) as u64);
                },
            )
            .await?;
        if live.cancel.is_cancelled() {
            if shutdown.is_cancelled() {
                return requeue_quietly(manager, live).await;
            }
            return cancelled(manager, live).await;
        }

        // Upload inputs.
        let upload_started = Instant::now();
        let upload = tokio::time::timeout(cfg.upload_timeout, upload_inputs(manager, live, &machine))
            .instrument(tracing::info_span!("upload"))
            .await;
        let graph = match upload {
            Ok(Ok(graph)) => graph,
            Ok(Err(UploadError::Comfy(e))) => {
                return backend_error(manager, live, &machine, format!("uploading inputs failed: {e}")).await;
            }
            Ok(Err(UploadError::Job(e))) => return Err(e),
            Err(_) => {
                return fail(manager, live, FailureReason::UploadTimeout, "uploading inputs took too long")
                    .await;
            }
        };
        {
            let mut job = live.job.lock().await;
            job.submitted = true;
            job.timings.upload_ms = Some(upload_started.elapsed().as_millis() as u64);
            live.telemetry.uploaded(upload_started.elapsed());
            manager.persist(&job).await?;
        }

        match machine.conn.submit(&prompt_id, graph).await {
            Ok((queued, events)) => {
                if !queued.node_errors.is_empty() {
                    // ComfyUI runs the valid outputs and skips the others: tell the caller which.
                    let data = serde_json::to_string(
                        &queued.node_errors.iter().map(node_error_json).collect::<Vec<_>>(),
                    )
                    .unwrap_or_default();
                    manager
                        .append(
                            live,
                            EventKind::Comfy { kind: "node_errors".into(), data_json: data },
                            |_| {},
                        )
                        .await?;
                }
                events
            }
            Err(ComfyError::Validation { message, node_errors, .. }) => {
                let mut failure = JobFailure::new(
                    FailureReason::Validation,
                    format!("ComfyUI rejected the graph: {message}"),
                );
                failure.node_errors = node_errors.iter().map(node_error_info).collect();
                return finish_failed(manager, live, failure).await;
            }
            Err(e) => {
                // The POST may or may not have reached ComfyUI: make sure it does not run, then retry.
                let _ = machine.client.delete_pending(std::slice::from_ref(&prompt_id)).await;
                let _ = machine.client.interrupt(&prompt_id).await;
                return backend_error(manager, live, &machine, format!("queueing the prompt failed: {e}"))
                    .await;
            }
        }
    };

    relay(manager, live, &machine, &mut events, id.to_string()).await
}

/// Consumes the prompt's events until its terminal one.
async fn relay(
    manager: &JobManager,
    live: &Arc<LiveJob>,
    machine: &Arc<Machine>,
    events: &mut PromptEvents,
    prompt_id: String,
) -> Result<(), JobError> {
    let cfg = &manager.inner.config;
    let shutdown = manager.inner.shutdown.clone();
    let started = Instant::now();
    let (deadline_ms, graph, output_nodes) = {
        let job = live.job.lock().await;
        (job.deadline_ms, job.graph.clone(), job.output_nodes.clone())
    };
    let mut deadline = started + cfg.execution_timeout;
    let mut deadline_reason = FailureReason::ExecutionTimeout;
    if let Some(d) = deadline_ms {
        let left = Duration::from_millis((d - now_ms()).max(0) as u64);
        if started + left < deadline {
            deadline = started + left;
            deadline_reason = FailureReason::DeadlineExceeded;
        }
    }
    let mut interrupting: Option<Instant> = None;
    let mut cancel_grace = CANCEL_GRACE;
    let mut download_ms = 0u64;
    let mut ws_counter = 0usize;

    loop {
        let cancel_deadline = interrupting.map(|t| t + cancel_grace);
        let event = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            () = live.cancel.cancelled(), if interrupting.is_none() => {
                interrupting = Some(Instant::now());
                if !interrupt(machine, &prompt_id).await {
                    // It was only queued on ComfyUI (now removed) or already done: no interrupt message will
                    // come, so a terminal event already on its way gets a short grace and nothing more.
                    cancel_grace = Duration::from_millis(500);
                }
                continue;
            }
            () = sleep_until_opt(cancel_deadline) => {
                return cancelled(manager, live).await;
            }
            () = tokio::time::sleep_until(deadline) => {
                interrupt(machine, &prompt_id).await;
                let message = match deadline_reason {
                    FailureReason::DeadlineExceeded => "the deadline passed while executing",
                    _ => "execution took too long",
                };
                return fail(manager, live, deadline_reason, message).await;
            }
            () = machine.retired() => {
                if interrupting.is_some() {
                    return cancelled(manager, live).await;
                }
                let reason = format!("machine {} is gone: {}", machine.id, machine.retire_reason());
                return lost_or_retry(manager, live, reason).await;
            }
            event = events.recv() => event,
        };
        let Some(event) = event else {
            // The connection stopped (shutdown): leave the job resumable.
            return Ok(());
        };
        match event {
            PromptEvent::ExecutionStart => {
                manager
                    .append(
                        live,
                        EventKind::Comfy { kind: "execution_start".into(), data_json: "{}".into() },
                        |_| {},
                    )
                    .await?;
            }
            PromptEvent::Cached { nodes } => {
                if !nodes.is_empty() {
                    manager.append(live, EventKind::NodesCached { node_ids: nodes }, |_| {}).await?;
                }
            }
            PromptEvent::Executing { node, display_node } => {
                let class_type = graph
                    .get(&node)
                    .and_then(|n| n.get("class_type"))
                    .and_then(|c| c.as_str())
                    .unwrap_or_default()
                    .to_string();
                let display_node_id = display_node.unwrap_or_else(|| node.clone());
                live.telemetry.node(&node, &class_type);
                manager
                    .append(
                        live,
                        EventKind::NodeStarted { node_id: node, display_node_id, class_type },
                        |_| {},
                    )
                    .await?;
            }
            PromptEvent::Progress { node, value, max } => {
                manager.append(live, EventKind::Progress { node_id: node, value, max }, |_| {}).await?;
            }
            PromptEvent::ProgressState { .. } => {
                // Folded into node_started/progress: it repeats their content for every node at every step.
            }
            PromptEvent::Executed { node, output, .. } => {
                let output_json = serde_json::to_string(&output).unwrap_or_default();
                manager
                    .append(live, EventKind::NodeExecuted { node_id: node.clone(), output_json }, |_| {})
                    .await?;
                let keep_all_of_node = output_nodes.iter().any(|n| n == &node);
                let files = image_refs(&output);
                for file in files {
                    if !(keep_all_of_node || (output_nodes.is_empty() && file.kind == "output")) {
                        continue;
                    }
                    let t = Instant::now();
                    let stored =
                        tokio::time::timeout(cfg.download_timeout, download(manager, machine, &file))
                            .instrument(tracing::info_span!("download", filename = %file.filename))
                            .await;
                    download_ms += t.elapsed().as_millis() as u64;
                    match stored {
                        Ok(Ok(mut out)) => {
                            out.node_id = node.clone();
                            record_output(manager, live, out).await?;
                        }
                        Ok(Err(DownloadError::Invalid(msg))) => {
                            interrupt(machine, &prompt_id).await;
                            return fail(manager, live, FailureReason::OutputInvalid, msg).await;
                        }
                        Ok(Err(DownloadError::Job(e))) => return Err(e),
                        Err(_) => {
                            interrupt(machine, &prompt_id).await;
                            return fail(
                                manager,
                                live,
                                FailureReason::DownloadTimeout,
                                "downloading outputs took too long",
                            )
                            .await;
                        }
                    }
                }
            }
            PromptEvent::Preview { node, mime, data } => {
                let node_id = node.unwrap_or_default();
                if !node_id.is_empty() && output_nodes.iter().any(|n| n == &node_id) {
                    // An image sent over the socket by an output node (SaveImageWebsocket) is an output.
                    ws_counter += 1;
                    let out = store_bytes(manager, &data, &mime, &node_id, ws_counter).await?;
                    record_output(manager, live, out).await?;
                } else {
                    manager
                        .append(live, EventKind::Preview { mime_type: mime, node_id, data }, |_| {})
                        .await?;
                }
            }
            PromptEvent::Text { node, text } => {
                manager.append(live, EventKind::ProgressText { node_id: node, text }, |_| {}).await?;
            }
            PromptEvent::Other { kind, data } => {
                let data_json = serde_json::to_string(&data).unwrap_or_default();
                manager.append(live, EventKind::Comfy { kind, data_json }, |_| {}).await?;
            }
            PromptEvent::Succeeded => {
                let execution_ms = started.elapsed().as_millis() as u64;
                live.telemetry.ran(started.elapsed(), Duration::from_millis(download_ms));
                let outputs = live.job.lock().await.outputs.clone();
                return manager
                    .finish(live, EventKind::Succeeded { outputs }, |job| {
                        job.timings.execution_ms = Some(execution_ms);
                        job.timings.download_ms = Some(download_ms);
                    })
                    .await;
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
                return finish_failed(manager, live, failure).await;
            }
            PromptEvent::Interrupted { node_id, node_type } => {
                if interrupting.is_some() || live.job.lock().await.cancel_requested {
                    return cancelled(manager, live).await;
                }
                let at = match (node_type, node_id) {
                    (Some(t), Some(n)) => format!(" at node {n} ({t})"),
                    (None, Some(n)) => format!(" at node {n}"),
                    _ => String::new(),
                };
                return fail(
                    manager,
                    live,
                    FailureReason::Interrupted,
                    format!("ComfyUI interrupted the prompt{at}"),
                )
                .await;
            }
            PromptEvent::Lost { reason } => {
                if interrupting.is_some() {
                    return cancelled(manager, live).await;
                }
                return lost_or_retry(manager, live, reason).await;
            }
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

/// Uploads every input image and writes ComfyUI's answered names into the graph.
async fn upload_inputs(
    manager: &JobManager,
    live: &LiveJob,
    machine: &Machine,
) -> Result<serde_json::Value, UploadError> {
    let (mut graph, images) = {
        let job = live.job.lock().await;
        (job.graph.clone(), job.images.clone())
    };
    for image in images {
        let data =
            manager.inner.artifacts.read(&image.sha256).await.map_err(|e| UploadError::Job(e.into()))?;
        let uploaded = machine
            .client
            .upload_image(Bytes::from(data), &image.filename, &image.content_type)
            .await
            .map_err(UploadError::Comfy)?;
        let name = if uploaded.subfolder.is_empty() {
            uploaded.name.clone()
        } else {
            format!("{}/{}", uploaded.subfolder, uploaded.name)
        };
        for (node, input) in &image.targets {
            if let Some(inputs) =
                graph.get_mut(node).and_then(|n| n.get_mut("inputs")).and_then(|i| i.as_object_mut())
            {
                inputs.insert(input.clone(), serde_json::Value::String(name.clone()));
            }
        }
    }
    Ok(graph)
}

enum DownloadError {
    Invalid(String),
    Job(JobError),
}

/// Image references in an `executed` output.
fn image_refs(output: &serde_json::Value) -> Vec<FileRef> {
    let mut refs = Vec::new();
    for key in ["images", "gifs", "videos"] {
        let Some(items) = output.get(key).and_then(|v| v.as_array()) else { continue };
        for item in items {
            let Some(filename) = item.get("filename").and_then(|f| f.as_str()) else { continue };
            refs.push(FileRef {
                filename: filename.to_string(),
                subfolder: item.get("subfolder").and_then(|s| s.as_str()).unwrap_or_default().to_string(),
                kind: item.get("type").and_then(|s| s.as_str()).unwrap_or("output").to_string(),
            });
        }
    }
    refs
}

/// Streams one output from ComfyUI into the artifact store, verified on the way.
async fn download(
    manager: &JobManager,
    machine: &Machine,
    file: &FileRef,
) -> Result<OutputFile, DownloadError> {
    let mut writer = manager.inner.artifacts.writer().await.map_err(|e| DownloadError::Job(e.into()))?;
    let downloaded = match machine.client.download(file, &mut writer).await {
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
async fn store_bytes(
    manager: &JobManager,
    data: &Bytes,
    mime: &str,
    node_id: &str,
    n: usize,
) -> Result<OutputFile, JobError> {
    let stored = manager.inner.artifacts.put(data).await?;
    let (width, height) = image_size(data);
    let ext = if mime == "image/jpeg" { "jpg" } else { "png" };
    Ok(OutputFile {
        node_id: node_id.to_string(),
        filename: format!("ws_{node_id}_{n:05}.{ext}"),
        mime_type: mime.to_string(),
        size: stored.size,
        sha256: stored.sha256,
        width,
        height,
        kind: "websocket".into(),
    })
}

fn image_size(data: &[u8]) -> (u32, u32) {
    image::ImageReader::new(std::io::Cursor::new(data))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok())
        .unwrap_or((0, 0))
}

/// Adds an output to the job (unique file name) and logs `output_ready`.
async fn record_output(manager: &JobManager, live: &LiveJob, mut out: OutputFile) -> Result<(), JobError> {
    {
        let job = live.job.lock().await;
        if job.outputs.iter().any(|o| o.sha256 == out.sha256 && o.filename == out.filename) {
            // Already stored (a completion recovered from history re-sends what we saw live).
            return Ok(());
        }
        if job.outputs.iter().any(|o| o.filename == out.filename) {
            out.filename = format!("{}_{}", out.node_id, out.filename);
        }
    }
    let stored = out.clone();
    manager
        .append(live, EventKind::OutputReady { output: out }, move |job| {
            job.outputs.push(stored);
        })
        .await?;
    Ok(())
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

fn node_error_json(e: &crate::comfy::NodeError) -> serde_json::Value {
    serde_json::json!({
        "node_id": e.node_id, "class_type": e.class_type, "type": e.error_type,
        "message": e.message, "details": e.details,
    })
}

async fn fail(
    manager: &JobManager,
    live: &LiveJob,
    reason: FailureReason,
    message: impl Into<String>,
) -> Result<(), JobError> {
    finish_failed(manager, live, JobFailure::new(reason, message)).await
}

async fn finish_failed(manager: &JobManager, live: &LiveJob, failure: JobFailure) -> Result<(), JobError> {
    manager.finish(live, EventKind::Failed { error: failure }, |_| {}).await
}

async fn cancelled(manager: &JobManager, live: &LiveJob) -> Result<(), JobError> {
    let reason = live.job.lock().await.cancel_reason.clone().unwrap_or_default();
    let reason = if reason.is_empty() { "cancelled by caller".to_string() } else { reason };
    manager.finish(live, EventKind::Cancelled { reason }, |_| {}).await
}

/// A backend failure before the prompt ran: retry under the attempts policy, else fail.
async fn backend_error(
    manager: &JobManager,
    live: &Arc<LiveJob>,
    machine: &Machine,
    reason: String,
) -> Result<(), JobError> {
    tracing::warn!(machine = %machine.id, %reason, "backend error");
    let reason = format!("{reason} (machine {})", machine.id);
    retry_or(manager, live, reason, FailureReason::BackendUnavailable).await
}

/// The prompt vanished from its ComfyUI: retry under the attempts policy, else fail with `LOST`.
pub(super) async fn lost_or_retry(
    manager: &JobManager,
    live: &Arc<LiveJob>,
    reason: String,
) -> Result<(), JobError> {
    retry_or(manager, live, reason, FailureReason::Lost).await
}

async fn retry_or(
    manager: &JobManager,
    live: &Arc<LiveJob>,
    reason: String,
    failure: FailureReason,
) -> Result<(), JobError> {
    let (attempt, priority, created_ms, cancel_requested, spec) = {
        let job = live.job.lock().await;
        (job.attempt, job.priority, job.created_ms, job.cancel_requested, manager.spec_of(&job))
    };
    if cancel_requested {
        return cancelled(manager, live).await;
    }
    if attempt >= manager.inner.config.max_attempts {
        let message = match failure {
            FailureReason::Lost => format!("the backend lost the prompt: {reason}"),
            _ => reason,
        };
        return fail(manager, live, failure, message).await;
    }
    let next = attempt + 1;
    manager
        .append(live, EventKind::Retrying { attempt: next, reason }, |job| {
            job.attempt = next;
            job.state = JobState::Queued;
            job.machine_id = None;
            job.submitted = false;
            job.outputs.clear();
        })
        .await?;
    live.telemetry.queued();
    let id = live.job.lock().await.id;
    let _ = manager.inner.sched.send(SchedMsg::Enqueue { id, priority, created_ms, spec });
    Ok(())
}

/// At shutdown before anything reached ComfyUI: back to the queue without a retry being counted.
async fn requeue_quietly(manager: &JobManager, live: &LiveJob) -> Result<(), JobError> {
    let mut job = live.job.lock().await;
    job.state = JobState::Queued;
    job.machine_id = None;
    job.submitted = false;
    manager.persist(&job).await
}
