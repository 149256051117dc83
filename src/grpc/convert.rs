//! Conversions between `pb::` messages and domain types. Requests are destructured with every field named,
//! so a field added to the proto fails the build here until it is handled.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost_types::{Duration as PbDuration, Timestamp};

use super::status::BadField;
use crate::{
    catalog::{ImageInput, JobInputs, ParamValue, WorkflowSource, read_image_header},
    jobs::{
        Event, EventKind, FailureReason, Job, JobFailure, JobId, JobState, JobStatus, ListRequest,
        OutputFile, OutputView, SubmitRequest, Violation, model::CancelStepKind,
    },
    limits::{self, Exceeded, RequestLimits, Unit, echo},
    proto::pb,
};

/// A timestamp from ms since the epoch.
pub(crate) fn ts(ms: i64) -> Timestamp {
    Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn ts_opt(ms: Option<i64>) -> Option<Timestamp> {
    ms.map(ts)
}

fn dur_ms(ms: Option<u64>) -> Option<PbDuration> {
    ms.map(|ms| PbDuration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 })
}

/// Parses a job id field.
pub(crate) fn job_id(field: &str, s: &str) -> Result<JobId, Violation> {
    s.parse().map_err(|_| Violation::new(field, "must be a job id (a UUID)"))
}

/// The size bounds of one image field, checked before anything else.
fn image_sizes(field: &str, img: &pb::InputImage, out: &mut Vec<BadField>) {
    let pb::InputImage { data: _, filename, content_type } = img;
    if filename.len() > limits::MAX_FILENAME_BYTES {
        out.push(too_long(format!("{field}.filename"), filename, limits::MAX_FILENAME_BYTES));
    }
    if content_type.len() > limits::MAX_CONTENT_TYPE_BYTES {
        out.push(too_long(format!("{field}.content_type"), content_type, limits::MAX_CONTENT_TYPE_BYTES));
    }
}

fn too_long(field: impl Into<String>, value: &str, limit: usize) -> BadField {
    Exceeded::new(field, value.len() as u64, limit as u64, Unit::Bytes).into()
}

/// Whether `s` is a MIME type `type/subtype` (RFC 6838 restricted names: letters, digits and
/// `!#$&^_.+-`, starting with a letter or digit); parameters, spaces and control characters are refused,
/// since the value ends up in an HTTP header of the upload to ComfyUI.
fn is_mime_type(s: &str) -> bool {
    let name = |part: &str| {
        let mut bytes = part.bytes();
        bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
            && part.len() <= 127
    };
    matches!(s.split_once('/'), Some((t, sub)) if name(t) && name(sub))
}

fn image_input(
    field: &str,
    img: pb::InputImage,
    limits: &RequestLimits,
    violations: &mut Vec<BadField>,
) -> Option<ImageInput> {
    let pb::InputImage { data, filename, content_type } = img;
    if data.is_empty() {
        violations.push(BadField::new(format!("{field}.data"), "must not be empty"));
        return None;
    }
    // The header, not only the signature: a PNG signature followed by junk is refused here rather than
    // failing in LoadImage, and the declared size is checked without decoding a pixel.
    let header = match read_image_header(&data) {
        Ok(header) => header,
        Err(e) => {
            violations.push(BadField::new(format!("{field}.data"), e.to_string()));
            return None;
        }
    };
    if header.pixels() > limits.max_image_pixels {
        let e = Exceeded::new(field, header.pixels(), limits.max_image_pixels, Unit::Pixels)
            .with_setting(limits::SETTING_MAX_IMAGE_PIXELS);
        let description = format!("declares {}×{} pixels: {}", header.width, header.height, e.description());
        violations.push(BadField { description, ..e.into() });
    }
    let content_type = if content_type.is_empty() { header.mime.to_string() } else { content_type };
    if !is_mime_type(&content_type) {
        violations.push(BadField::new(
            format!("{field}.content_type"),
            "must be a MIME type such as image/png (type/subtype of letters, digits and !#$&^_.+-; no \
             parameters, spaces or control characters)",
        ));
    } else if !content_type.to_ascii_lowercase().starts_with("image/") {
        violations.push(BadField::new(format!("{field}.content_type"), "must be an image/* type"));
    }
    let filename = if filename.is_empty() { format!("input.{}", header.extension) } else { filename };
    if filename.contains('/') || filename.contains('\\') || filename.contains("..") {
        violations.push(BadField::new(format!("{field}.filename"), "must be a plain file name (no path)"));
    }
    Some(ImageInput { data, filename, content_type })
}

/// Checks every size bound of a `SubmitJobRequest` before anything is parsed or decoded: the request is
/// refused early, naming each field and its limit, when one is exceeded.
fn submit_sizes(req: &pb::SubmitJobRequest, limits: &RequestLimits) -> Vec<BadField> {
    let pb::SubmitJobRequest {
        source,
        image,
        prompt,
        parameters,
        request_id,
        priority: _,
        labels,
        deadline: _,
    } = req;
    let mut out = Vec::new();
    match source {
        Some(pb::submit_job_request::Source::Workflow(name)) if name.len() > limits::MAX_NAME_BYTES => {
            out.push(too_long("workflow", name, limits::MAX_NAME_BYTES));
        }
        Some(pb::submit_job_request::Source::GraphJson(graph)) if graph.len() > limits.max_graph_bytes => {
            out.push(
                Exceeded::new("graph_json", graph.len() as u64, limits.max_graph_bytes as u64, Unit::Bytes)
                    .with_setting(limits::SETTING_MAX_GRAPH_BYTES)
                    .into(),
            );
        }
        Some(pb::submit_job_request::Source::GraphJson(graph))
            if limits::exceeds_json_depth(graph, limits::MAX_JSON_DEPTH) =>
        {
            out.push(
                Exceeded::new("graph_json", 0, limits::MAX_JSON_DEPTH as u64, Unit::Levels)
                    .without_actual()
                    .into(),
            );
        }
        _ => {}
    }
    if let Some(img) = image {
        image_sizes("image", img, &mut out);
    }
    let text = |field: String, value: &str, out: &mut Vec<BadField>| {
        if value.len() > limits.max_text_bytes {
            out.push(
                Exceeded::new(field, value.len() as u64, limits.max_text_bytes as u64, Unit::Bytes)
                    .with_setting(limits::SETTING_MAX_TEXT_BYTES)
                    .into(),
            );
        }
    };
    text("prompt".into(), prompt, &mut out);
    if parameters.len() > limits::MAX_PARAMETERS {
        out.push(
            Exceeded::new(
                "parameters",
                parameters.len() as u64,
                limits::MAX_PARAMETERS as u64,
                Unit::Entries,
            )
            .into(),
        );
    }
    for (name, value) in parameters.iter().take(limits::MAX_PARAMETERS + 1) {
        let field = format!("parameters[{}]", echo(name));
        if name.len() > limits::MAX_NAME_BYTES {
            out.push(BadField::new(
                field,
                format!(
                    "the parameter name has {} bytes; at most {} are allowed",
                    name.len(),
                    limits::MAX_NAME_BYTES
                ),
            ));
            continue;
        }
        match &value.kind {
            Some(pb::parameter_value::Kind::StringValue(s)) => text(field, s, &mut out),
            Some(pb::parameter_value::Kind::ImageValue(img)) => image_sizes(&field, img, &mut out),
            _ => {}
        }
    }
    if request_id.len() > limits::MAX_REQUEST_ID_BYTES {
        out.push(too_long("request_id", request_id, limits::MAX_REQUEST_ID_BYTES));
    }
    labels_sizes("labels", labels, &mut out);
    out
}

/// The size bounds of a label map (keys and values), naming over-long keys cut short.
fn labels_sizes(field: &str, labels: &std::collections::HashMap<String, String>, out: &mut Vec<BadField>) {
    if labels.len() > limits::MAX_LABELS {
        out.push(Exceeded::new(field, labels.len() as u64, limits::MAX_LABELS as u64, Unit::Entries).into());
        return;
    }
    for (key, value) in labels {
        let entry = format!("{field}[{}]", echo(key));
        if key.len() > limits::MAX_LABEL_KEY_BYTES {
            out.push(BadField::new(
                entry.clone(),
                format!(
                    "the key has {} bytes; at most {} are allowed",
                    key.len(),
                    limits::MAX_LABEL_KEY_BYTES
                ),
            ));
        }
        if value.len() > limits::MAX_LABEL_VALUE_BYTES {
            out.push(too_long(entry, value, limits::MAX_LABEL_VALUE_BYTES));
        }
    }
}

/// Decodes `SubmitJobRequest`, refusing it early when a field is over its bound.
pub(crate) fn submit_request(
    req: pb::SubmitJobRequest,
    limits: &RequestLimits,
) -> Result<SubmitRequest, Vec<BadField>> {
    let over = submit_sizes(&req, limits);
    if !over.is_empty() {
        return Err(over);
    }
    let pb::SubmitJobRequest { source, image, prompt, parameters, request_id, priority, labels, deadline } =
        req;
    let mut violations = Vec::new();
    let source = match source {
        Some(pb::submit_job_request::Source::Workflow(name)) => Some(WorkflowSource::Named(name)),
        Some(pb::submit_job_request::Source::GraphJson(graph)) => Some(WorkflowSource::Inline(graph)),
        None => {
            violations.push(BadField::new("workflow", "set either workflow (a catalog name) or graph_json"));
            None
        }
    };
    let image = image.and_then(|img| image_input("image", img, limits, &mut violations));
    let mut params = BTreeMap::new();
    for (name, value) in parameters {
        let field = format!("parameters[{name}]");
        let pb::ParameterValue { kind } = value;
        let v = match kind {
            Some(pb::parameter_value::Kind::StringValue(s)) => ParamValue::String(s),
            Some(pb::parameter_value::Kind::IntValue(i)) => ParamValue::Int(i),
            Some(pb::parameter_value::Kind::FloatValue(f)) => ParamValue::Float(f),
            Some(pb::parameter_value::Kind::BoolValue(b)) => ParamValue::Bool(b),
            Some(pb::parameter_value::Kind::ImageValue(img)) => {
                match image_input(&field, img, limits, &mut violations) {
                    Some(i) => ParamValue::Image(i),
                    None => continue,
                }
            }
            None => {
                violations.push(BadField::new(field, "has no value"));
                continue;
            }
        };
        params.insert(name, v);
    }
    let deadline_ms = deadline.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000);
    let Some(source) = source else { return Err(violations) };
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(SubmitRequest {
        tenant: String::new(),
        source,
        inputs: JobInputs { image, prompt: (!prompt.is_empty()).then_some(prompt), parameters: params },
        request_id: (!request_id.is_empty()).then_some(request_id),
        priority,
        labels: labels.into_iter().collect(),
        deadline_ms,
    })
}

/// Decodes `ListJobsRequest`.
pub(crate) fn list_request(req: pb::ListJobsRequest) -> Result<ListRequest, Vec<BadField>> {
    let pb::ListJobsRequest { page_size, page_token, states, workflow, labels } = req;
    let mut violations = Vec::new();
    if page_token.len() > limits::MAX_PAGE_TOKEN_BYTES {
        violations.push(too_long("page_token", &page_token, limits::MAX_PAGE_TOKEN_BYTES));
    }
    if workflow.len() > limits::MAX_NAME_BYTES {
        violations.push(too_long("workflow", &workflow, limits::MAX_NAME_BYTES));
    }
    if states.len() > limits::MAX_STATE_FILTERS {
        violations.push(
            Exceeded::new("states", states.len() as u64, limits::MAX_STATE_FILTERS as u64, Unit::Entries)
                .into(),
        );
    }
    labels_sizes("labels", &labels, &mut violations);
    if page_size < 0 {
        violations.push(BadField::new("page_size", "must not be negative"));
    }
    let mut parsed = Vec::new();
    for s in states.iter().take(limits::MAX_STATE_FILTERS) {
        match pb::JobState::try_from(*s).ok().and_then(state_from_pb) {
            Some(s) => parsed.push(s),
            None => violations.push(BadField::new("states", format!("{s} is not a job state"))),
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(ListRequest {
        page_size: page_size.max(0) as u32,
        page_token,
        states: parsed,
        workflow: (!workflow.is_empty()).then_some(workflow),
        labels: labels.into_iter().collect(),
    })
}

fn state_from_pb(s: pb::JobState) -> Option<JobStatus> {
    Some(match s {
        pb::JobState::Unspecified => return None,
        pb::JobState::Queued => JobStatus::Queued,
        pb::JobState::Provisioning => JobStatus::Provisioning,
        pb::JobState::Running => JobStatus::Running,
        pb::JobState::Succeeded => JobStatus::Succeeded,
        pb::JobState::Failed => JobStatus::Failed,
        pb::JobState::Cancelled => JobStatus::Cancelled,
    })
}

fn state_to_pb(s: JobStatus) -> pb::JobState {
    match s {
        JobStatus::Queued => pb::JobState::Queued,
        JobStatus::Provisioning => pb::JobState::Provisioning,
        JobStatus::Running => pb::JobState::Running,
        JobStatus::Succeeded => pb::JobState::Succeeded,
        JobStatus::Failed => pb::JobState::Failed,
        JobStatus::Cancelled => pb::JobState::Cancelled,
    }
}

fn reason_to_pb(r: FailureReason) -> pb::FailureReason {
    match r {
        FailureReason::Validation => pb::FailureReason::Validation,
        FailureReason::Execution => pb::FailureReason::Execution,
        FailureReason::Lost => pb::FailureReason::Lost,
        FailureReason::BackendUnavailable => pb::FailureReason::BackendUnavailable,
        FailureReason::QueueTimeout => pb::FailureReason::QueueTimeout,
        FailureReason::UploadTimeout => pb::FailureReason::UploadTimeout,
        FailureReason::ExecutionTimeout => pb::FailureReason::ExecutionTimeout,
        FailureReason::DownloadTimeout => pb::FailureReason::DownloadTimeout,
        FailureReason::DeadlineExceeded => pb::FailureReason::DeadlineExceeded,
        FailureReason::OutputInvalid => pb::FailureReason::OutputInvalid,
        FailureReason::Provisioning => pb::FailureReason::Provisioning,
        FailureReason::MachineLost => pb::FailureReason::MachineLost,
        FailureReason::Internal => pb::FailureReason::Internal,
        FailureReason::Interrupted => pb::FailureReason::Interrupted,
        FailureReason::OutputsMissing => pb::FailureReason::OutputsMissing,
    }
}

fn error_to_pb(e: &JobFailure) -> pb::JobError {
    pb::JobError {
        reason: reason_to_pb(e.reason) as i32,
        message: e.message.clone(),
        node_errors: e
            .node_errors
            .iter()
            .map(|n| pb::NodeError {
                node_id: n.node_id.clone(),
                class_type: n.class_type.clone(),
                error_type: n.error_type.clone(),
                message: n.message.clone(),
                details: n.details.clone(),
            })
            .collect(),
    }
}

/// An output, with its inline bytes if given.
pub(crate) fn output_to_pb(o: &OutputFile, inline: Option<Bytes>) -> pb::Output {
    pb::Output {
        node_id: o.node_id.clone(),
        filename: o.filename.clone(),
        mime_type: o.mime_type.clone(),
        size_bytes: o.size,
        sha256: o.sha256.clone(),
        width: o.width,
        height: o.height,
        inline_data: inline.unwrap_or_default(),
        kind: o.kind.clone(),
    }
}

/// An output view (metadata plus inline bytes).
pub(crate) fn output_view_to_pb(v: OutputView) -> pb::Output {
    output_to_pb(&v.output, v.inline)
}

/// A job; `outputs` are given separately so the caller decides about inline bytes.
pub(crate) fn job_to_pb(job: &Job, outputs: Vec<pb::Output>) -> pb::Job {
    let (spec, r) = (&job.spec, &job.record);
    let (machine_id, prompt_id) = match &r.state {
        JobState::Running { machine_id, prompt_id, .. } => (machine_id.clone(), prompt_id.clone()),
        // The job id is the prompt id of every attempt.
        _ => (
            r.machine_id.clone().unwrap_or_default(),
            r.started_ms.map(|_| spec.id.to_string()).unwrap_or_default(),
        ),
    };
    let waiting_reason = match &r.state {
        JobState::Queued { reason, .. } => reason.clone(),
        _ => String::new(),
    };
    pb::Job {
        id: spec.id.to_string(),
        state: state_to_pb(r.state.status()) as i32,
        workflow: spec.workflow.clone(),
        workflow_version: spec.workflow_version.clone(),
        inputs: spec.inputs.clone().into_iter().collect(),
        labels: spec.labels.clone().into_iter().collect(),
        priority: spec.priority,
        request_id: spec.request_id.clone().unwrap_or_default(),
        create_time: Some(ts(spec.created_ms)),
        provision_time: ts_opt(r.provision_ms),
        start_time: ts_opt(r.started_ms),
        end_time: ts_opt(r.ended_ms),
        timings: Some(pb::JobTimings {
            queue_wait: dur_ms(r.timings.queue_wait_ms),
            provisioning: dur_ms(r.timings.provisioning_ms),
            upload: dur_ms(r.timings.upload_ms),
            execution: dur_ms(r.timings.execution_ms),
            download: dur_ms(r.timings.download_ms),
        }),
        machine_id,
        comfy_prompt_id: prompt_id,
        outputs,
        error: job.error().map(error_to_pb),
        last_sequence: r.last_sequence,
        machine_seconds: r.machine_seconds,
        cost: (r.cost_usd > 0.0).then(|| pb::Cost { amount: r.cost_usd, currency: "USD".into() }),
        queue_position: r.queue_position(),
        attempt: r.attempt,
        deadline: ts_opt(spec.deadline_ms),
        waiting_reason,
        cancel_requested: r.cancel_reason.is_some() && !r.state.is_terminal(),
    }
}

fn phase_to_pb(phase: &str) -> pb::ProvisioningPhase {
    match phase {
        "launch_requested" => pb::ProvisioningPhase::LaunchRequested,
        "starting" => pb::ProvisioningPhase::Starting,
        "ready" => pb::ProvisioningPhase::Ready,
        "comfyui_reachable" => pb::ProvisioningPhase::ComfyuiReachable,
        "waiting_for_machine" => pb::ProvisioningPhase::WaitingForMachine,
        _ => pb::ProvisioningPhase::Unspecified,
    }
}

fn cancel_step_to_pb(step: CancelStepKind) -> pb::CancelStepKind {
    match step {
        CancelStepKind::Interrupt => pb::CancelStepKind::Interrupt,
        CancelStepKind::Free => pb::CancelStepKind::Free,
        CancelStepKind::ReplaceMachine => pb::CancelStepKind::ReplaceMachine,
        CancelStepKind::Abandoned => pb::CancelStepKind::Abandoned,
    }
}

/// An event; `outputs` carries the pb form of outputs the event holds (with inline bytes if any).
pub(crate) fn event_to_pb(e: &Event, mut outputs: Vec<pb::Output>) -> pb::JobEvent {
    use pb::job_event::Kind;
    let kind = match &e.kind {
        EventKind::Queued { position, reason } => {
            Kind::Queued(pb::Queued { position: *position, reason: reason.clone() })
        }
        EventKind::PromptSubmitted { upload_ms } => {
            Kind::PromptSubmitted(pb::PromptSubmitted { upload: dur_ms(Some(*upload_ms)) })
        }
        EventKind::Warning { code, message, node_ids } => Kind::Warning(pb::Warning {
            code: code.clone(),
            message: message.clone(),
            node_ids: node_ids.clone(),
        }),
        EventKind::CancelRequested { reason } => {
            Kind::CancelRequested(pb::CancelRequested { reason: reason.clone() })
        }
        EventKind::Requeued { reason } => Kind::Requeued(pb::Requeued { reason: reason.clone() }),
        EventKind::CancelStep { step, elapsed_ms } => Kind::CancelStep(pb::CancelStep {
            step: cancel_step_to_pb(*step) as i32,
            elapsed: dur_ms(Some(*elapsed_ms)),
        }),
        EventKind::Provisioning { phase, machine_id, server_type, elapsed_ms } => {
            Kind::Provisioning(pb::MachineProvisioning {
                phase: phase_to_pb(phase) as i32,
                machine_id: machine_id.clone(),
                server_type: server_type.clone(),
                elapsed: dur_ms(Some(*elapsed_ms)),
            })
        }
        EventKind::Started { machine_id, prompt_id } => {
            Kind::Started(pb::Started { machine_id: machine_id.clone(), comfy_prompt_id: prompt_id.clone() })
        }
        EventKind::NodeStarted { node_id, display_node_id, class_type } => {
            Kind::NodeStarted(pb::NodeStarted {
                node_id: node_id.clone(),
                display_node_id: display_node_id.clone(),
                class_type: class_type.clone(),
            })
        }
        EventKind::NodesCached { node_ids } => {
            Kind::NodesCached(pb::NodesCached { node_ids: node_ids.clone() })
        }
        EventKind::Progress { node_id, value, max } => {
            Kind::Progress(pb::Progress { node_id: node_id.clone(), value: *value, max: *max })
        }
        EventKind::Preview { mime_type, node_id, data } => Kind::Preview(pb::Preview {
            image: data.clone(),
            mime_type: mime_type.clone(),
            node_id: node_id.clone(),
        }),
        EventKind::OutputReady { output } => Kind::OutputReady(pb::OutputReady {
            output: Some(if outputs.is_empty() { output_to_pb(output, None) } else { outputs.remove(0) }),
        }),
        EventKind::NodeExecuted { node_id, output_json } => Kind::NodeExecuted(pb::NodeExecuted {
            node_id: node_id.clone(),
            output_json: output_json.clone(),
        }),
        EventKind::ProgressText { node_id, text } => {
            Kind::ProgressText(pb::ProgressText { node_id: node_id.clone(), text: text.clone() })
        }
        EventKind::Retrying { attempt, reason } => {
            Kind::Retrying(pb::Retrying { attempt: *attempt, reason: reason.clone() })
        }
        EventKind::Comfy { kind, data_json } => {
            Kind::ComfyMessage(pb::ComfyMessage { r#type: kind.clone(), data_json: data_json.clone() })
        }
        EventKind::Succeeded { outputs: outs, usage: _ } => Kind::Succeeded(pb::Succeeded {
            outputs: if outputs.len() == outs.len() {
                outputs
            } else {
                outs.iter().map(|o| output_to_pb(o, None)).collect()
            },
        }),
        EventKind::Failed { error, usage: _ } => Kind::Failed(pb::Failed { error: Some(error_to_pb(error)) }),
        EventKind::Cancelled { reason, usage: _ } => {
            Kind::Cancelled(pb::Cancelled { reason: reason.clone() })
        }
    };
    pb::JobEvent {
        job_id: e.job_id.to_string(),
        sequence: e.seq,
        time: Some(ts(e.time_ms)),
        kind: Some(kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_handle_negative_and_sub_second_values() {
        assert_eq!(ts(1_500), Timestamp { seconds: 1, nanos: 500_000_000 });
        assert_eq!(ts(-1), Timestamp { seconds: -1, nanos: 999_000_000 });
    }

    #[test]
    fn submit_without_a_source_names_the_field() {
        let err = submit_request(pb::SubmitJobRequest::default(), &RequestLimits::default()).unwrap_err();
        assert_eq!(err[0].field, "workflow");
    }

    #[test]
    fn images_must_be_images() {
        let req = pb::SubmitJobRequest {
            source: Some(pb::submit_job_request::Source::Workflow("invert".into())),
            image: Some(pb::InputImage { data: Bytes::from_static(b"not an image"), ..Default::default() }),
            ..Default::default()
        };
        let err = submit_request(req, &RequestLimits::default()).unwrap_err();
        assert_eq!(err[0].field, "image.data");
    }
}
