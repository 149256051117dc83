//! The `--json` lines: each `pb::` message the client prints, as a flat JSON object with short enum
//! names (`"state": "succeeded"`). Bytes are never printed: images appear as their size.

use serde_json::{Value, json};

use crate::proto::pb;

/// `JOB_STATE_SUCCEEDED` with prefix `JOB_STATE_` becomes `succeeded`.
pub(crate) fn short(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
}

pub(crate) fn state_name(state: i32) -> String {
    short(pb::JobState::try_from(state).unwrap_or_default().as_str_name(), "JOB_STATE_")
}

pub(crate) fn reason_name(reason: i32) -> String {
    short(pb::FailureReason::try_from(reason).unwrap_or_default().as_str_name(), "FAILURE_REASON_")
}

pub(crate) fn phase_name(phase: i32) -> String {
    short(pb::ProvisioningPhase::try_from(phase).unwrap_or_default().as_str_name(), "PROVISIONING_PHASE_")
}

/// A cancel step's short name (`interrupt`, `free`, `replace_machine`, `abandoned`).
pub(crate) fn cancel_step_name(step: i32) -> String {
    short(pb::CancelStepKind::try_from(step).unwrap_or_default().as_str_name(), "CANCEL_STEP_KIND_")
}

/// RFC 3339, or null.
pub(crate) fn time(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(|t| {
        let d = std::time::Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
        Some(humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + d).to_string())
    })
    .map_or(Value::Null, Value::String)
}

fn seconds(d: Option<&prost_types::Duration>) -> Value {
    d.map_or(Value::Null, |d| json!(d.seconds as f64 + f64::from(d.nanos) / 1e9))
}

pub(crate) fn output(o: &pb::Output) -> Value {
    let pb::Output { node_id, filename, mime_type, size_bytes, sha256, width, height, inline_data: _, kind } =
        o;
    json!({
        "node_id": node_id, "filename": filename, "mime_type": mime_type, "size_bytes": size_bytes,
        "sha256": sha256, "width": width, "height": height, "kind": kind,
    })
}

pub(crate) fn error(e: Option<&pb::JobError>) -> Value {
    let Some(pb::JobError { reason, message, node_errors }) = e else { return Value::Null };
    json!({
        "reason": reason_name(*reason),
        "message": message,
        "node_errors": node_errors.iter().map(|n| json!({
            "node_id": n.node_id, "class_type": n.class_type, "error_type": n.error_type,
            "message": n.message, "details": n.details,
        })).collect::<Vec<_>>(),
    })
}

/// One event: `{"type": "event", "job_id", "sequence", "time", "kind", ...the kind's fields}`.
pub(crate) fn event(e: &pb::JobEvent) -> Value {
    use pb::job_event::Kind;
    let mut v =
        json!({ "type": "event", "job_id": e.job_id, "sequence": e.sequence, "time": time(e.time.as_ref()) });
    let (kind, fields) = match &e.kind {
        Some(Kind::Queued(q)) => ("queued", json!({ "position": q.position, "reason": q.reason })),
        Some(Kind::PromptSubmitted(p)) => {
            ("prompt_submitted", json!({ "upload_seconds": seconds(p.upload.as_ref()) }))
        }
        Some(Kind::Warning(w)) => {
            ("warning", json!({ "code": w.code, "message": w.message, "node_ids": w.node_ids }))
        }
        Some(Kind::CancelRequested(c)) => ("cancel_requested", json!({ "reason": c.reason })),
        Some(Kind::Requeued(r)) => ("requeued", json!({ "reason": r.reason })),
        Some(Kind::CancelStep(c)) => (
            "cancel_step",
            json!({ "step": cancel_step_name(c.step), "elapsed_seconds": seconds(c.elapsed.as_ref()) }),
        ),
        Some(Kind::Provisioning(p)) => (
            "provisioning",
            json!({ "phase": phase_name(p.phase), "machine_id": p.machine_id, "server_type": p.server_type,
                    "elapsed_seconds": seconds(p.elapsed.as_ref()) }),
        ),
        Some(Kind::Started(s)) => {
            ("started", json!({ "machine_id": s.machine_id, "comfy_prompt_id": s.comfy_prompt_id }))
        }
        Some(Kind::NodeStarted(n)) => (
            "node_started",
            json!({ "node_id": n.node_id, "display_node_id": n.display_node_id, "class_type": n.class_type }),
        ),
        Some(Kind::NodesCached(n)) => ("nodes_cached", json!({ "node_ids": n.node_ids })),
        Some(Kind::Progress(p)) => {
            ("progress", json!({ "node_id": p.node_id, "value": p.value, "max": p.max }))
        }
        Some(Kind::Preview(p)) => (
            "preview",
            json!({ "node_id": p.node_id, "mime_type": p.mime_type, "size_bytes": p.image.len() }),
        ),
        Some(Kind::OutputReady(o)) => ("output_ready", json!({ "output": o.output.as_ref().map(output) })),
        Some(Kind::Succeeded(s)) => {
            ("succeeded", json!({ "outputs": s.outputs.iter().map(output).collect::<Vec<_>>() }))
        }
        Some(Kind::Failed(f)) => ("failed", json!({ "error": error(f.error.as_ref()) })),
        Some(Kind::Cancelled(c)) => ("cancelled", json!({ "reason": c.reason })),
        Some(Kind::NodeExecuted(n)) => {
            ("node_executed", json!({ "node_id": n.node_id, "output_json": n.output_json }))
        }
        Some(Kind::ProgressText(p)) => ("progress_text", json!({ "node_id": p.node_id, "text": p.text })),
        Some(Kind::Retrying(r)) => ("retrying", json!({ "attempt": r.attempt, "reason": r.reason })),
        Some(Kind::ComfyMessage(m)) => {
            ("comfy_message", json!({ "comfy_type": m.r#type, "data_json": m.data_json }))
        }
        None => ("unknown", json!({})),
    };
    v["kind"] = kind.into();
    if let (Some(obj), Value::Object(fields)) = (v.as_object_mut(), fields) {
        obj.extend(fields);
    }
    v
}

/// A job: `{"type": "job", ...}`.
pub(crate) fn job(j: &pb::Job) -> Value {
    let pb::Job {
        id,
        state,
        workflow,
        workflow_version,
        inputs,
        labels,
        priority,
        request_id,
        create_time,
        provision_time,
        start_time,
        end_time,
        timings: _,
        machine_id,
        comfy_prompt_id,
        outputs,
        error: job_error,
        last_sequence,
        machine_seconds,
        cost,
        queue_position,
        attempt,
        deadline,
        waiting_reason,
        cancel_requested,
    } = j;
    json!({
        "type": "job", "id": id, "state": state_name(*state), "workflow": workflow,
        "workflow_version": workflow_version, "inputs": inputs, "labels": labels, "priority": priority,
        "request_id": request_id, "create_time": time(create_time.as_ref()),
        "provision_time": time(provision_time.as_ref()), "start_time": time(start_time.as_ref()),
        "end_time": time(end_time.as_ref()), "machine_id": machine_id, "comfy_prompt_id": comfy_prompt_id,
        "outputs": outputs.iter().map(output).collect::<Vec<_>>(), "error": error(job_error.as_ref()),
        "last_sequence": last_sequence, "machine_seconds": machine_seconds,
        "cost": cost.as_ref().map(|c| json!({ "amount": c.amount, "currency": c.currency })),
        "queue_position": queue_position, "attempt": attempt, "deadline": time(deadline.as_ref()),
        "waiting_reason": waiting_reason, "cancel_requested": cancel_requested,
    })
}

fn param_value(v: Option<&pb::ParameterValue>) -> Value {
    use pb::parameter_value::Kind;
    match v.and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::IntValue(i)) => json!(i),
        Some(Kind::FloatValue(f)) => json!(f),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::ImageValue(i)) => json!({ "filename": i.filename, "size_bytes": i.data.len() }),
        None => Value::Null,
    }
}

pub(crate) fn input_type_name(t: i32) -> String {
    short(pb::InputType::try_from(t).unwrap_or_default().as_str_name(), "INPUT_TYPE_")
}

/// A workflow with its inputs: `{"type": "workflow", ...}`.
pub(crate) fn workflow(w: &pb::Workflow) -> Value {
    json!({
        "type": "workflow", "name": w.name, "description": w.description, "version": w.version,
        "inputs": w.inputs.iter().map(|i| json!({
            "name": i.name, "description": i.description, "type": input_type_name(i.r#type),
            "required": i.required, "default": param_value(i.default_value.as_ref()), "min": i.min,
            "max": i.max, "choices": i.choices,
        })).collect::<Vec<_>>(),
        "outputs": w.outputs.iter().map(|o| json!({ "node_id": o.node_id, "name": o.name, "description": o.description })).collect::<Vec<_>>(),
        "requirements": w.requirements.as_ref().map(|r| json!({
            "runcomfy_workflow_version_id": r.runcomfy_workflow_version_id, "server_type": r.server_type,
        })),
    })
}

/// A machine: `{"type": "machine", ...}`.
pub(crate) fn machine(m: &pb::Machine) -> Value {
    json!({
        "type": "machine", "id": m.id,
        "kind": short(pb::MachineKind::try_from(m.kind).unwrap_or_default().as_str_name(), "MACHINE_KIND_"),
        "state": short(pb::MachineState::try_from(m.state).unwrap_or_default().as_str_name(), "MACHINE_STATE_"),
        "comfy_url": m.comfy_url, "server_type": m.server_type, "workflow_version_id": m.workflow_version_id,
        "running_jobs": m.running_jobs, "queued_jobs": m.queued_jobs, "draining": m.draining,
        "create_time": time(m.create_time.as_ref()), "ready_time": time(m.ready_time.as_ref()),
        "stop_time": time(m.stop_time.as_ref()), "lease_expire_time": time(m.lease_expire_time.as_ref()),
        "billed_seconds": m.billed_seconds,
        "cost": m.cost.as_ref().map(|c| json!({ "amount": c.amount, "currency": c.currency })),
        "last_workflow": m.last_workflow, "jobs_completed": m.jobs_completed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_flat_with_short_names() {
        let e = pb::JobEvent {
            job_id: "j".into(),
            sequence: 7,
            time: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
            kind: Some(pb::job_event::Kind::Failed(pb::Failed {
                error: Some(pb::JobError {
                    reason: pb::FailureReason::Execution as i32,
                    ..Default::default()
                }),
            })),
        };
        let v = event(&e);
        assert_eq!((v["kind"].as_str(), v["sequence"].as_u64()), (Some("failed"), Some(7)));
        assert_eq!(v["error"]["reason"], "execution");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
    }
}
