//! The 0.38 jobs API (`GET /api/jobs`, `GET /api/jobs/{id}`, `POST /api/jobs/{id}/cancel`,
//! `POST /api/jobs/cancel`) and node replacement (`/node_replacements`, applied before validation), as
//! `server.py` @`002c3fb9`, `comfy_execution/jobs.py` @`172be43` and `app/node_replace_manager.py`
//! @`b5d74cc` implement them. Job objects are built from the same queue and history the old routes serve;
//! the cancel is atomic (`PromptQueue.interrupt_if_running`: checked and signalled under the queue lock).
//! Knows nothing about execution.

use super::nodes;
use super::pyjson::py_str;
use super::routes::json_response;
use super::state::{QueueItem, Shared, State};
use axum::body::Bytes;
use axum::extract::{Path as AxPath, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

type Shr = AxState<Arc<Shared>>;

/// `JobStatus.ALL`.
const STATUSES: [&str; 5] = ["pending", "in_progress", "completed", "failed", "cancelled"];
const PREVIEWABLE: [&str; 5] = ["images", "video", "audio", "3d", "text"];
const THREE_D: [&str; 5] = [".obj", ".fbx", ".gltf", ".glb", ".usdz"];
const TEXT_FILES: [&str; 3] = [".txt", ".md", ".json"];

fn error(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({"error": message}))
}

/// `prune_dict`: drops `None` values.
fn pruned(pairs: Vec<(&str, Value)>) -> Map<String, Value> {
    pairs.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.to_owned(), v)).collect()
}

/// `_extract_job_metadata`: `(create_time, workflow_id)`.
fn metadata(extra_data: &Map<String, Value>) -> (Value, Value) {
    let create_time = extra_data.get("create_time").cloned().unwrap_or(Value::Null);
    let workflow_id = extra_data
        .get("extra_pnginfo")
        .and_then(|p| p.pointer("/workflow/id"))
        .cloned()
        .unwrap_or(Value::Null);
    (create_time, workflow_id)
}

/// `normalize_queue_item`.
fn queue_job(item: &QueueItem, status: &str, include_workflow: bool) -> Map<String, Value> {
    let (create_time, workflow_id) = metadata(&item.extra_data);
    let mut job = pruned(vec![
        ("id", json!(item.prompt_id)),
        ("status", json!(status)),
        ("priority", item.number.to_json()),
        ("create_time", create_time),
        ("outputs_count", json!(0)),
        ("previewable_outputs_count", json!(0)),
        ("workflow_id", workflow_id),
    ]);
    if include_workflow {
        job.insert("workflow".into(), json!({"prompt": item.prompt, "extra_data": item.extra_data}));
    }
    job
}

fn ends_with_any(name: &str, exts: &[&str]) -> bool {
    let lower = name.to_ascii_lowercase();
    exts.iter().any(|e| lower.ends_with(e))
}

/// `is_previewable`.
fn previewable(media_type: &str, item: &Map<String, Value>) -> bool {
    if PREVIEWABLE.contains(&media_type) {
        return true;
    }
    let format = item.get("format").and_then(Value::as_str).unwrap_or("");
    if format.starts_with("video/") || format.starts_with("audio/") {
        return true;
    }
    let filename = item.get("filename").and_then(Value::as_str).unwrap_or("");
    ends_with_any(filename, &THREE_D) || ends_with_any(filename, &TEXT_FILES)
}

/// `get_outputs_summary` + `count_previewable_outputs`: `(outputs_count, preview_output, previewable)`.
fn outputs_summary(outputs: &Map<String, Value>) -> (u64, Value, u64) {
    let mut count = 0;
    let mut previewable_count = 0;
    let (mut preview, mut fallback, mut text_file, mut text) = (None, None, None, None);
    for (node_id, node_outputs) in outputs {
        let Some(node_outputs) = node_outputs.as_object() else { continue };
        for (media_type, items) in node_outputs {
            let Some(items) = items.as_array().filter(|_| media_type != "animated") else { continue };
            for item in items {
                let item = match item {
                    Value::Object(o) => o.clone(),
                    Value::String(s) if ends_with_any(s, &THREE_D) => {
                        let mut o = Map::new();
                        o.insert("filename".into(), json!(s));
                        o.insert("type".into(), json!("output"));
                        o.insert("subfolder".into(), json!(""));
                        o.insert("mediaType".into(), json!("3d"));
                        o
                    }
                    other => {
                        if media_type == "text" && preview.is_none() && text.is_none() {
                            let s = match other {
                                Value::String(s) => s.clone(),
                                v => py_str(v),
                            };
                            let content: String = s.chars().take(1024).collect();
                            let mut t = Map::new();
                            t.insert("content".into(), json!(content));
                            if s.chars().count() > 1024 {
                                t.insert("truncated".into(), json!(true));
                            }
                            t.insert("nodeId".into(), json!(node_id));
                            t.insert("mediaType".into(), json!(media_type));
                            text = Some(Value::Object(t));
                        }
                        continue;
                    }
                };
                count += 1;
                if previewable(media_type, &item) {
                    previewable_count += 1;
                }
                if preview.is_some() || !previewable(media_type, &item) {
                    continue;
                }
                let mut enriched = item.clone();
                enriched.insert("nodeId".into(), json!(node_id));
                if !item.contains_key("mediaType") {
                    enriched.insert("mediaType".into(), json!(media_type));
                }
                let filename = item.get("filename").and_then(Value::as_str).unwrap_or("");
                let is_text = media_type == "text" || ends_with_any(filename, &TEXT_FILES);
                if is_text {
                    text_file.get_or_insert(Value::Object(enriched));
                } else if item.get("type").and_then(Value::as_str) == Some("output") {
                    preview = Some(Value::Object(enriched));
                } else {
                    fallback.get_or_insert(Value::Object(enriched));
                }
            }
        }
    }
    let preview = preview.or(fallback).or(text_file).or(text).unwrap_or(Value::Null);
    (count, preview, previewable_count)
}

/// `normalize_history_item`.
fn history_job(prompt_id: &str, entry: &Value, include_outputs: bool) -> Map<String, Value> {
    let tuple = entry.get("prompt").and_then(Value::as_array).cloned().unwrap_or_default();
    let priority = tuple.first().cloned().unwrap_or(Value::Null);
    let extra_data = tuple.get(3).and_then(Value::as_object).cloned().unwrap_or_default();
    let (create_time, workflow_id) = metadata(&extra_data);
    let status_info = entry.get("status").cloned().unwrap_or(Value::Null);
    let status_str = status_info.get("status_str").and_then(Value::as_str);
    let outputs = entry.get("outputs").and_then(Value::as_object).cloned().unwrap_or_default();
    let (outputs_count, preview_output, previewable_count) = outputs_summary(&outputs);
    let (mut start, mut end, mut exec_error, mut interrupted) =
        (Value::Null, Value::Null, Value::Null, false);
    for m in status_info.get("messages").and_then(Value::as_array).into_iter().flatten() {
        let (Some(name), Some(data)) = (m.get(0).and_then(Value::as_str), m.get(1).filter(|d| d.is_object()))
        else {
            continue;
        };
        match name {
            "execution_start" => start = data.get("timestamp").cloned().unwrap_or(Value::Null),
            "execution_success" | "execution_error" | "execution_interrupted" => {
                end = data.get("timestamp").cloned().unwrap_or(Value::Null);
                if name == "execution_error" {
                    exec_error = data.clone();
                } else if name == "execution_interrupted" {
                    interrupted = true;
                }
            }
            _ => {}
        }
    }
    let status = match status_str {
        Some("error") if interrupted => "cancelled",
        Some("error") => "failed",
        _ => "completed",
    };
    let mut job = pruned(vec![
        ("id", json!(prompt_id)),
        ("status", json!(status)),
        ("priority", priority),
        ("create_time", create_time),
        ("execution_start_time", start),
        ("execution_end_time", end),
        ("execution_error", exec_error),
        ("outputs_count", json!(outputs_count)),
        ("previewable_outputs_count", json!(previewable_count)),
        ("preview_output", preview_output),
        ("workflow_id", workflow_id),
    ]);
    if include_outputs {
        job.insert("outputs".into(), Value::Object(outputs));
        job.insert("execution_status".into(), status_info);
        job.insert(
            "workflow".into(),
            json!({"prompt": tuple.get(2).cloned().unwrap_or(Value::Null), "extra_data": extra_data}),
        );
    }
    job
}

/// `get_job`: history first, then the running prompt, then the pending ones.
fn find_job(st: &State, prompt_id: &str) -> Option<Map<String, Value>> {
    if let Some(entry) = st.history.get(prompt_id) {
        return Some(history_job(prompt_id, entry, true));
    }
    if let Some(item) = st.running.as_ref().filter(|r| r.prompt_id == prompt_id) {
        return Some(queue_job(item, "in_progress", true));
    }
    st.queue.iter().find(|i| i.prompt_id == prompt_id).map(|i| queue_job(i, "pending", true))
}

fn int_param(v: &str) -> Option<i64> {
    v.trim().parse().ok()
}

/// `GET /api/jobs`: filter by `status` (comma-separated) and `workflow_id`, sort by `created_at` or
/// `execution_duration`, paginate with `limit`/`offset`.
pub(crate) async fn list(AxState(shared): Shr, Query(q): Query<HashMap<String, String>>) -> Response {
    let status_filter: Option<Vec<String>> = q
        .get("status")
        .filter(|s| !s.is_empty())
        .map(|s| s.split(',').map(|x| x.trim().to_lowercase()).filter(|x| !x.is_empty()).collect());
    if let Some(filter) = &status_filter {
        let invalid: Vec<&str> =
            filter.iter().map(String::as_str).filter(|s| !STATUSES.contains(s)).collect();
        if !invalid.is_empty() {
            let message = format!(
                "Invalid status value(s): {}. Valid values: {}",
                invalid.join(", "),
                STATUSES.join(", ")
            );
            return error(StatusCode::BAD_REQUEST, &message);
        }
    }
    let sort_by = q.get("sort_by").map(|s| s.to_lowercase()).unwrap_or_else(|| "created_at".into());
    if sort_by != "created_at" && sort_by != "execution_duration" {
        return error(StatusCode::BAD_REQUEST, "sort_by must be 'created_at' or 'execution_duration'");
    }
    let sort_order = q.get("sort_order").map(|s| s.to_lowercase()).unwrap_or_else(|| "desc".into());
    if sort_order != "asc" && sort_order != "desc" {
        return error(StatusCode::BAD_REQUEST, "sort_order must be 'asc' or 'desc'");
    }
    let limit = match q.get("limit").map(|v| int_param(v)) {
        None => None,
        Some(None) => return error(StatusCode::BAD_REQUEST, "limit must be an integer"),
        Some(Some(n)) if n <= 0 => return error(StatusCode::BAD_REQUEST, "limit must be a positive integer"),
        Some(Some(n)) => Some(n as usize),
    };
    let offset = match q.get("offset").map(|v| int_param(v)) {
        None => 0,
        Some(None) => return error(StatusCode::BAD_REQUEST, "offset must be an integer"),
        Some(Some(n)) => n.max(0) as usize,
    };
    let wanted = |s: &str| status_filter.as_ref().is_none_or(|f| f.iter().any(|x| x == s));
    let mut jobs: Vec<Map<String, Value>> = Vec::new();
    {
        let st = shared.lock();
        if wanted("in_progress") {
            jobs.extend(st.running.iter().map(|i| queue_job(i, "in_progress", false)));
        }
        if wanted("pending") {
            jobs.extend(st.queue.iter().map(|i| queue_job(i, "pending", false)));
        }
        if wanted("completed") || wanted("failed") || wanted("cancelled") {
            for (id, entry) in &st.history {
                let job = history_job(id, entry, false);
                if job.get("status").and_then(Value::as_str).is_some_and(wanted) {
                    jobs.push(job);
                }
            }
        }
    }
    if let Some(workflow_id) = q.get("workflow_id").filter(|w| !w.is_empty()) {
        jobs.retain(|j| j.get("workflow_id").and_then(Value::as_str) == Some(workflow_id.as_str()));
    }
    let num = |j: &Map<String, Value>, k: &str| j.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let key = |j: &Map<String, Value>| -> f64 {
        if sort_by == "execution_duration" {
            let (start, end) = (num(j, "execution_start_time"), num(j, "execution_end_time"));
            if start != 0.0 && end != 0.0 { end - start } else { 0.0 }
        } else {
            num(j, "create_time")
        }
    };
    // Python's `sorted` is stable in both directions, like `sort_by`.
    jobs.sort_by(|a, b| {
        let o = key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal);
        if sort_order == "desc" { o.reverse() } else { o }
    });
    let total = jobs.len();
    let page: Vec<Value> =
        jobs.into_iter().skip(offset).take(limit.unwrap_or(usize::MAX)).map(Value::Object).collect();
    let has_more = offset + page.len() < total;
    json_response(
        StatusCode::OK,
        &json!({"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": total, "has_more": has_more}}),
    )
}

/// `GET /api/jobs/{id}`: the job with its outputs, status messages and workflow; 404 `{"error": "Job not
/// found"}` for an id ComfyUI does not know (unlike `/history/{id}`'s `{}`).
pub(crate) async fn detail(AxState(shared): Shr, AxPath(job_id): AxPath<String>) -> Response {
    let job = find_job(&shared.lock(), &job_id);
    match job {
        Some(job) => json_response(StatusCode::OK, &Value::Object(job)),
        None => error(StatusCode::NOT_FOUND, "Job not found"),
    }
}

/// `_cancel_job_by_id`: a running job is interrupted only if it is still the one running (checked and
/// signalled under the lock), a pending one is dequeued, finished or unknown ids are no-ops. Returns
/// whether a cancel was dispatched.
fn cancel_by_id(shared: &Shared, job_id: &str) -> bool {
    let mut st = shared.lock();
    let interrupt_if_running = |st: &State| {
        let running = st.running.as_ref().is_some_and(|r| r.prompt_id == job_id);
        if running {
            shared.interrupt.store(true, Ordering::SeqCst);
        }
        running
    };
    if st.running.as_ref().is_some_and(|r| r.prompt_id == job_id) {
        return interrupt_if_running(&st);
    }
    if st.queue.iter().any(|i| i.prompt_id == job_id) {
        return st.delete_pending(&shared.faults, job_id) || interrupt_if_running(&st);
    }
    false
}

/// `POST /api/jobs/{id}/cancel` → `{"cancelled": bool}` (200 also for finished or unknown ids).
pub(crate) async fn cancel_one(AxState(shared): Shr, AxPath(job_id): AxPath<String>) -> Response {
    let cancelled = cancel_by_id(&shared, &job_id);
    tracing::debug!(%job_id, cancelled, "emulated ComfyUI: job cancel");
    json_response(StatusCode::OK, &json!({"cancelled": cancelled}))
}

/// `POST /api/jobs/cancel {"job_ids": [...]}`: best effort; a malformed id rejects the whole batch (400).
pub(crate) async fn cancel_batch(AxState(shared): Shr, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "Request body must be valid JSON");
    };
    let Some(ids) = body.get("job_ids").and_then(Value::as_array) else {
        return error(StatusCode::BAD_REQUEST, "job_ids must be a list");
    };
    let invalid: Vec<Value> = ids
        .iter()
        .filter(|id| canonical(id).is_none())
        .map(|id| if id.is_string() { id.clone() } else { json!(super::pyjson::py_repr(id)) })
        .collect();
    if !invalid.is_empty() {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}),
        );
    }
    let mut cancelled = false;
    for id in ids.iter().filter_map(Value::as_str) {
        cancelled |= cancel_by_id(&shared, id);
    }
    json_response(StatusCode::OK, &json!({"cancelled": cancelled}))
}

/// `validate_job_id`: a string in canonical lowercase hyphenated UUID form.
fn canonical(v: &Value) -> Option<&str> {
    let s = v.as_str()?;
    let parsed = uuid::Uuid::parse_str(s).ok()?;
    (parsed.hyphenated().to_string() == s).then_some(s)
}

/// The replacements core ComfyUI registers (`comfy_extras/nodes_replacements.py`), in `as_dict()` form.
fn builtin_replacements() -> Vec<Value> {
    let r = |new: &str, old: &str, widgets: Value, inputs: Value, outputs: Value| json!({"new_node_id": new, "old_node_id": old, "old_widget_ids": widgets, "input_mapping": inputs, "output_mapping": outputs});
    vec![
        r(
            "ImageScaleToMaxDimension",
            "ResizeImagesByLongerEdge",
            json!(["longer_edge"]),
            json!([{"new_id": "image", "old_id": "images"}, {"new_id": "largest_size", "old_id": "longer_edge"}, {"new_id": "upscale_method", "set_value": "lanczos"}]),
            json!([{"new_idx": 0, "old_idx": 0}]),
        ),
        r(
            "BatchImagesNode",
            "ImageBatch",
            Value::Null,
            json!([{"new_id": "images.image0", "old_id": "image1"}, {"new_id": "images.image1", "old_id": "image2"}]),
            Value::Null,
        ),
        r(
            "ResizeImageMaskNode",
            "ImageScaleBy",
            json!(["upscale_method", "scale_by"]),
            json!([{"new_id": "input", "old_id": "image"}, {"new_id": "resize_type", "set_value": "scale by multiplier"}, {"new_id": "resize_type.multiplier", "old_id": "scale_by"}, {"new_id": "scale_method", "old_id": "upscale_method"}]),
            Value::Null,
        ),
        r(
            "ControlNetLoader",
            "T2IAdapterLoader",
            Value::Null,
            json!([{"new_id": "control_net_name", "old_id": "t2i_adapter_name"}]),
            Value::Null,
        ),
        r("Load3D", "Load3DAnimation", Value::Null, Value::Null, Value::Null),
        r("Preview3D", "Preview3DAnimation", Value::Null, Value::Null, Value::Null),
        r("SVD_img2vid_Conditioning", "SDV_img2vid_Conditioning", Value::Null, Value::Null, Value::Null),
        r("ConditioningAverage", "ConditioningAverage ", Value::Null, Value::Null, Value::Null),
        r(
            "GeminiNanoBanana2V2",
            "GeminiNanoBanana2",
            json!([
                "prompt",
                "model",
                "seed",
                "aspect_ratio",
                "resolution",
                "response_modalities",
                "thinking_level",
                "system_prompt"
            ]),
            json!([
                {"new_id": "prompt", "old_id": "prompt"}, {"new_id": "model", "old_id": "model"},
                {"new_id": "seed", "old_id": "seed"}, {"new_id": "aspect_ratio", "old_id": "aspect_ratio"},
                {"new_id": "resolution", "old_id": "resolution"},
                {"new_id": "response_modalities", "old_id": "response_modalities"},
                {"new_id": "thinking_level", "old_id": "thinking_level"}, {"new_id": "images.image_1", "old_id": "images"},
                {"new_id": "files", "old_id": "files"}, {"new_id": "system_prompt", "old_id": "system_prompt"}
            ]),
            Value::Null,
        ),
    ]
}

/// Every registered replacement grouped by `old_node_id` (`NodeReplaceManager._replacements`), duplicates of
/// the same (old, new) pair ignored.
fn registry(extra: &[Value]) -> Vec<(String, Vec<Value>)> {
    let mut out: Vec<(String, Vec<Value>)> = Vec::new();
    for r in builtin_replacements().into_iter().chain(extra.iter().cloned()) {
        let old = r.get("old_node_id").map(py_str).unwrap_or_default();
        let new = r.get("new_node_id").cloned();
        match out.iter_mut().find(|(k, _)| *k == old) {
            Some((_, list)) => {
                if !list.iter().any(|x| x.get("new_node_id") == new.as_ref()) {
                    list.push(r);
                }
            }
            None => out.push((old, vec![r])),
        }
    }
    out
}

/// `GET /node_replacements`.
pub(crate) async fn node_replacements(AxState(shared): Shr) -> Response {
    let extra = shared.lock().extra_replacements.clone();
    let map: Map<String, Value> = registry(&extra).into_iter().map(|(k, v)| (k, Value::Array(v))).collect();
    json_response(StatusCode::OK, &Value::Object(map))
}

fn is_link(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.len() == 2 && a[0].is_string() && a[1].is_number())
}

/// `NodeReplaceManager.apply_replacements`: nodes of an unknown class with a registered replacement whose
/// new class exists become that class, inputs remapped (`old_id` / `set_value`) and links to their outputs
/// re-indexed. An `input_mapping` naming an input the node lacks raises in ComfyUI (the caller answers 500):
/// `Err(())`.
pub(crate) fn apply_replacements(prompt: &mut Value, extra: &[Value]) -> Result<(), ()> {
    let Some(map) = prompt.as_object_mut() else { return Ok(()) };
    let registry = registry(extra);
    let mut connections: HashMap<String, Vec<(String, String, Value)>> = HashMap::new();
    let mut need: Vec<String> = Vec::new();
    for (id, node) in map.iter() {
        let (Some(class), Some(inputs)) =
            (node.get("class_type"), node.get("inputs").and_then(Value::as_object))
        else {
            continue;
        };
        let class = py_str(class);
        if nodes::traits(&class).is_none() && registry.iter().any(|(k, _)| *k == class) {
            need.push(id.clone());
        }
        for (input, value) in inputs {
            if is_link(value) {
                let from = py_str(&value[0]);
                connections.entry(from).or_default().push((id.clone(), input.clone(), value[1].clone()));
            }
        }
    }
    for id in need {
        let node = map[&id].clone();
        let class = node.get("class_type").map(py_str).unwrap_or_default();
        let Some((_, list)) = registry.iter().find(|(k, _)| *k == class) else { continue };
        let replacement = &list[0];
        let new_class = replacement.get("new_node_id").map(py_str).unwrap_or_default();
        if nodes::traits(&new_class).is_none() {
            continue;
        }
        let mut new_node = node.as_object().cloned().unwrap_or_default();
        let meta = node.get("_meta").cloned().unwrap_or_else(|| json!({}));
        new_node.insert("inputs".into(), json!({}));
        new_node.insert("_meta".into(), meta);
        new_node.insert("class_type".into(), json!(new_class));
        for m in replacement.get("input_mapping").and_then(Value::as_array).into_iter().flatten() {
            let new_id = m.get("new_id").map(py_str).unwrap_or_default();
            let value = if let Some(v) = m.get("set_value") {
                v.clone()
            } else if let Some(old) = m.get("old_id") {
                node.get("inputs").and_then(|i| i.get(py_str(old))).cloned().ok_or(())?
            } else {
                continue;
            };
            if let Some(inputs) = new_node.get_mut("inputs").and_then(Value::as_object_mut) {
                inputs.insert(new_id, value);
            }
        }
        map.insert(id.clone(), Value::Object(new_node));
        let outputs =
            replacement.get("output_mapping").and_then(Value::as_array).cloned().unwrap_or_default();
        for (to, input, old_idx) in connections.get(&id).into_iter().flatten() {
            for om in &outputs {
                if om.get("old_idx").and_then(Value::as_f64) == old_idx.as_f64() {
                    let new_idx = om.get("new_idx").cloned().unwrap_or(Value::Null);
                    if let Some(link) =
                        map.get_mut(to).and_then(|n| n.get_mut("inputs")).and_then(|i| i.get_mut(input))
                    {
                        link[1] = new_idx;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_replacement_rewrites_class_inputs_and_links() {
        let extra = [
            json!({"new_node_id": "ImageInvert", "old_node_id": "InvertImageLegacy", "old_widget_ids": null,
            "input_mapping": [{"new_id": "image", "old_id": "pixels"}], "output_mapping": [{"new_idx": 0, "old_idx": 1}]}),
        ];
        let mut prompt = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "InvertImageLegacy", "inputs": {"pixels": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": "x"}},
            "4": {"class_type": "ResizeImagesByLongerEdge", "inputs": {"images": ["1", 0], "longer_edge": 4}}
        });
        apply_replacements(&mut prompt, &extra).unwrap();
        assert_eq!(
            prompt["2"],
            json!({"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}, "_meta": {}})
        );
        assert_eq!(prompt["3"]["inputs"]["images"], json!(["2", 0]));
        // Its new class is not installed here: left alone (validation then reports it missing).
        assert_eq!(prompt["4"]["class_type"], "ResizeImagesByLongerEdge");
        let bad = [
            json!({"new_node_id": "ImageInvert", "old_node_id": "Old", "input_mapping": [{"new_id": "image", "old_id": "nope"}]}),
        ];
        assert!(apply_replacements(&mut json!({"1": {"class_type": "Old", "inputs": {}}}), &bad).is_err());
    }
}
