//! The HTTP surface of the emulated server (aiohttp routes of server.py and app/), served by axum:
//! every main route also under `/api`, `/internal/*` only at the root, aiohttp's 404/405/500 shapes, the
//! loopback Origin check, and the scripted HTTP faults. Handlers translate HTTP to state operations and
//! nothing else; prompt execution lives in [`super::executor`]. The 0.38 generation adds the jobs API
//! ([`super::jobs`]), `/node_replacements`, the asset routes ([`super::assets`]), the canonical-UUID check
//! of `prompt_id` and `create_time`/`comfy_usage_source` in `extra_data`.

use super::faults::LostAnswer;
use super::nodes::{self, Dirs, split_annotation};
use super::pyjson;
use super::state::{Num, QueueItem, Shared, heap, now_ms};
use super::validation::{Validation, validate_prompt};
use super::ws;
use super::{assets, jobs};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, Multipart, Path as AxPath, Query, Request, State, WebSocketUpgrade,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tracing::Instrument;

type Shr = State<Arc<Shared>>;

/// aiohttp's body for an unhandled exception.
const INTERNAL_ERROR: &str = "500 Internal Server Error\n\nServer got itself in trouble";

/// Builds the full router.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let internal = Router::new()
        .route("/internal/logs", get(internal_logs))
        .route("/internal/logs/raw", get(internal_logs_raw))
        .route("/internal/logs/subscribe", patch(logs_subscribe))
        .route("/internal/folder_paths", get(folder_paths))
        .route("/internal/files/{kind}", get(internal_files));
    let newer = shared.newer();
    let mut app = Router::new()
        .route("/", get(index))
        .merge(api_routes(newer))
        .nest("/api", api_routes(newer))
        .merge(internal);
    if newer {
        // Registered on the app itself (`asset_manager.register_routes`), so not repeated under `/api`.
        app = app.merge(assets::routes());
    }
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(104_857_600 + 1024 * 1024))
        .layer(middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

fn api_routes(newer: bool) -> Router<Arc<Shared>> {
    let routes = Router::new()
        .route("/ws", get(ws_handler))
        .route("/system_stats", get(system_stats))
        .route("/features", get(features))
        .route("/prompt", get(get_prompt).post(post_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(post_interrupt))
        .route("/free", post(post_free))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{prompt_id}", get(get_history_item))
        .route("/object_info", get(object_info_all))
        .route("/object_info/{class}", get(object_info_one))
        .route("/embeddings", get(|| async { json_ok(&json!([])) }))
        .route("/models", get(models))
        .route("/models/{folder}", get(models_folder))
        .route("/extensions", get(|| async { json_ok(&json!([])) }))
        .route("/settings", get(|| async { json_ok(&json!({})) }).post(empty_ok))
        .route("/settings/{id}", get(|| async { json_ok(&Value::Null) }).post(empty_ok))
        .route("/users", get(|| async { json_ok(&json!({"storage": "server", "migrated": true})) }))
        .route("/i18n", get(|| async { json_ok(&json!({})) }))
        .route("/workflow_templates", get(|| async { json_ok(&json!({})) }))
        .route("/experiment/models", get(|| async { json_ok(&json!([])) }))
        .route("/upload/image", post(upload_image))
        .route("/upload/mask", post(upload_mask))
        .route("/view", get(view));
    if !newer {
        return routes;
    }
    // server.py declares these as `/api/jobs...`; like every route they are also served with one more
    // `/api` prefix.
    routes
        .route("/api/jobs", get(jobs::list))
        .route("/api/jobs/cancel", post(jobs::cancel_batch))
        .route("/api/jobs/{job_id}", get(jobs::detail))
        .route("/api/jobs/{job_id}/cancel", post(jobs::cancel_one))
        .route("/node_replacements", get(jobs::node_replacements))
}

/// `web.json_response`: Python-style JSON, `application/json; charset=utf-8`.
pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut resp = Response::new(Body::from(pyjson::dumps(value)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    resp
}

fn json_ok(value: &Value) -> Response {
    json_response(StatusCode::OK, value)
}

/// `web.Response(status=...)`: empty body, no Content-Type.
fn empty(status: StatusCode) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

async fn empty_ok() -> Response {
    empty(StatusCode::OK)
}

/// aiohttp's plain-text 500.
pub(crate) fn internal_error() -> Response {
    let mut resp = Response::new(Body::from(INTERNAL_ERROR));
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

async fn not_found() -> Response {
    let mut resp = empty(StatusCode::NOT_FOUND);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp
}

async fn method_not_allowed() -> Response {
    let mut resp = Response::new(Body::from("405: Method Not Allowed"));
    *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Scripted 500s, then ComfyUI's loopback Origin check (403 with an empty body).
async fn guard(State(shared): Shr, req: Request, next: Next) -> Response {
    if shared.faults.take_http_failure(req.uri().path()) {
        tracing::debug!(path = %req.uri().path(), "fault: scripted 500");
        return internal_error();
    }
    let mut resp =
        if origin_mismatch(req.headers()) { empty(StatusCode::FORBIDDEN) } else { next.run(req).await };
    resp.headers_mut().insert(header::SERVER, HeaderValue::from_static("Python/3.11 aiohttp/3.14.5"));
    resp
}

/// `create_origin_only_middleware`: when Host names a loopback address, Host must equal Origin's netloc
/// (both as written, lowercased).
fn origin_mismatch(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
    let Some(origin) = headers.get(header::ORIGIN).and_then(|h| h.to_str().ok()) else { return false };
    let host = host.to_ascii_lowercase();
    let origin = origin.to_ascii_lowercase();
    let origin_netloc = origin
        .split_once("//")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
        .unwrap_or("");
    let hostname = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(&host)
    };
    let loopback =
        hostname == "localhost" || hostname.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    loopback && !host.is_empty() && !origin_netloc.is_empty() && host != origin_netloc
}

async fn index() -> Response {
    let mut resp = Response::new(Body::from(
        "<!DOCTYPE html>\n<html><head><title>ComfyUI</title></head><body>comfyrelay ComfyUI emulator</body></html>\n",
    ));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert(header::EXPIRES, HeaderValue::from_static("0"));
    resp
}

async fn ws_handler(
    State(shared): Shr,
    Query(q): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        let mut resp = Response::new(Body::from(
            "No WebSocket UPGRADE hdr: None\n Can \"Upgrade\" only to \"WebSocket\".",
        ));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        return resp;
    };
    let client_id = q.get("clientId").cloned().unwrap_or_default();
    let span = tracing::debug_span!("comfyui_emulator_ws", client_id = %client_id);
    upgrade.on_upgrade(move |socket| ws::serve_socket(shared, socket, client_id).instrument(span))
}

async fn system_stats(State(shared): Shr) -> Response {
    let ram_total: u64 = 25_276_502_016;
    let ram_free: u64 = 24_199_811_072;
    if shared.newer() {
        return json_ok(&json!({
            "system": {
                "os": "linux",
                "ram_total": ram_total,
                "ram_free": ram_free,
                "comfyui_version": shared.version.comfyui_version(),
                "required_frontend_version": "1.41.3",
                "installed_templates_version": "0.9.12",
                "required_templates_version": "0.9.12",
                "comfy_package_versions": [
                    {"name": "comfyui-frontend-package", "installed": "1.41.3", "required": "1.41.3"},
                    {"name": "comfyui-workflow-templates", "installed": "0.9.12", "required": "0.9.12"},
                    {"name": "comfyui-embedded-docs", "installed": "0.4.1", "required": "0.4.1"}
                ],
                "python_version": "3.12.9 (main, Feb  4 2026, 14:38:38) [GCC 12.2.0]",
                "pytorch_version": "2.15.0+cu132",
                "embedded_python": false,
                "deploy_environment": "local-git",
                "argv": ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", "8188", "--disable-auto-launch"]
            },
            "devices": [{
                "name": "cpu", "type": "cpu", "index": null,
                "vram_total": ram_total, "vram_free": ram_free, "torch_vram_total": ram_total, "torch_vram_free": ram_free
            }]
        }));
    }
    json_ok(&json!({
        "system": {
            "os": "posix",
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": "3.11.7 (main, May  9 2026, 07:35:25) [GCC 12.2.0]",
            "pytorch_version": "2.15.0+cu132",
            "embedded_python": false,
            "argv": ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", "8188", "--disable-auto-launch"]
        },
        "devices": [{
            "name": "cpu", "type": "cpu", "index": null,
            "vram_total": ram_total, "vram_free": ram_free, "torch_vram_total": ram_total, "torch_vram_free": ram_free
        }]
    }))
}

async fn features(State(shared): Shr) -> Response {
    json_ok(&ws::server_features(shared.version))
}

async fn get_prompt(State(shared): Shr) -> Response {
    let info = shared.lock().queue_info();
    json_ok(&info)
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// `float(x)` for an explicit `number`.
fn py_float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A client-given `prompt_id` in the form 0.38 accepts (`validate_job_id`: `str(uuid.UUID(v)) == v`).
fn canonical_uuid(v: &Value) -> Option<String> {
    let s = v.as_str()?;
    let parsed = uuid::Uuid::parse_str(s).ok()?;
    (parsed.hyphenated().to_string() == s).then(|| s.to_owned())
}

async fn post_prompt(State(shared): Shr, headers: HeaderMap, body: Bytes) -> Response {
    {
        let mut st = shared.lock();
        st.log(&shared.faults, "got prompt");
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else { return internal_error() };
    let number = match body.get("number") {
        Some(n) => match py_float(n) {
            Some(f) => Num::Float(f),
            None => return internal_error(),
        },
        None => {
            let mut st = shared.lock();
            let n = st.number;
            st.number += 1;
            let front = body.get("front").is_some_and(truthy);
            Num::Int(if front { -n } else { n })
        }
    };
    let Some(prompt) = body.get("prompt") else {
        let error = json!({"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}});
        return json_response(StatusCode::BAD_REQUEST, &json!({"error": error, "node_errors": {}}));
    };
    let client_prompt_id = body.get("prompt_id").filter(|v| !(shared.newer() && v.is_null()));
    if let Some(v) = client_prompt_id {
        *shared.lock().counters.posted.entry(pyjson::py_str(v)).or_default() += 1;
    }
    let prompt_id = match client_prompt_id {
        None => uuid::Uuid::new_v4().to_string(),
        // 0.3.64: `str(json_data.get("prompt_id", uuid4()))`, any string goes.
        Some(v) if !shared.newer() => pyjson::py_str(v),
        Some(v) => match canonical_uuid(v) {
            Some(id) => id,
            None => {
                let error = json!({
                    "type": "invalid_prompt_id",
                    "message": "prompt_id must be a valid UUID",
                    "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one",
                    "extra_info": {}
                });
                return json_response(StatusCode::BAD_REQUEST, &json!({"error": error, "node_errors": {}}));
            }
        },
    };
    let partial: Option<Vec<String>> = body
        .get("partial_execution_targets")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(pyjson::py_str).collect());
    let mut prompt = prompt.clone();
    if shared.newer() {
        let extra = shared.lock().extra_replacements.clone();
        if jobs::apply_replacements(&mut prompt, &extra).is_err() {
            return internal_error();
        }
    }
    let validation = validate_prompt(&mut prompt, partial.as_deref(), &shared.dirs, shared.version);
    let mut extra_data = match body.get("extra_data") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    if let Some(client_id) = body.get("client_id") {
        extra_data.insert("client_id".into(), client_id.clone());
    }
    if shared.newer()
        && !extra_data.contains_key("comfy_usage_source")
        && let Some(source) = headers.get("comfy-usage-source").and_then(|v| v.to_str().ok())
    {
        extra_data.insert("comfy_usage_source".into(), json!(source));
    }
    match validation {
        Validation::Crash => internal_error(),
        Validation::Rejected { error, node_errors } => {
            tracing::debug!(error = %error["type"], "emulated ComfyUI rejected a prompt");
            json_response(StatusCode::BAD_REQUEST, &json!({"error": error, "node_errors": node_errors}))
        }
        Validation::Accepted { outputs, node_errors } => {
            for key in ["auth_token_comfy_org", "api_key_comfy_org"] {
                extra_data.remove(key);
            }
            if shared.newer() {
                extra_data.insert("create_time".into(), json!(now_ms()));
            }
            let item = QueueItem { number, prompt_id: prompt_id.clone(), prompt, extra_data, outputs };
            {
                let mut st = shared.lock();
                heap::push(&mut st.queue, item);
                *st.counters.queued.entry(prompt_id.clone()).or_default() += 1;
                st.counters.queued_total += 1;
                st.queue_updated(&shared.faults);
            }
            shared.work.notify_one();
            let answer =
                json!({"prompt_id": prompt_id, "number": number.to_json(), "node_errors": node_errors});
            match shared.faults.take_lost_answer() {
                None => json_ok(&answer),
                Some(how) => lost_answer(how, &answer).await,
            }
        }
    }
}

/// The answer to a queued prompt, lost as the fault says.
async fn lost_answer(how: LostAnswer, answer: &Value) -> Response {
    tracing::debug!(?how, "fault: the answer to POST /prompt is lost after queueing");
    match how {
        LostAnswer::Cut => {
            // The head goes out, then the body fails: hyper drops the connection mid-response.
            let body = futures::stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::other("fault: connection cut"))
            });
            let mut resp = Response::new(Body::from_stream(body));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
            resp
        }
        LostAnswer::Hang(d) => {
            tokio::time::sleep(d).await;
            json_ok(answer)
        }
        LostAnswer::ServerError => internal_error(),
    }
}

/// `POST /free`: sets the worker's `unload_models`/`free_memory` flags. A wedged node (the fault) is released.
async fn post_free(State(shared): Shr, body: Bytes) -> Response {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else { return internal_error() };
    let unload = body.get("unload_models").is_some_and(truthy);
    let free = body.get("free_memory").is_some_and(truthy);
    shared.lock().counters.frees += 1;
    if unload || free {
        shared.frees.fetch_add(1, Ordering::SeqCst);
    }
    empty(StatusCode::OK)
}

async fn get_queue(State(shared): Shr) -> Response {
    let st = shared.lock();
    let running: Vec<Value> = st.running.iter().map(QueueItem::to_json).collect();
    let pending: Vec<Value> = st.queue.iter().map(QueueItem::to_json).collect();
    drop(st);
    json_ok(&json!({"queue_running": running, "queue_pending": pending}))
}

async fn post_queue(State(shared): Shr, body: Bytes) -> Response {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else { return internal_error() };
    let mut st = shared.lock();
    if body.get("clear").is_some_and(truthy) {
        st.queue.clear();
        st.queue_updated(&shared.faults);
    }
    if let Some(ids) = body.get("delete").and_then(Value::as_array) {
        for id in ids {
            st.delete_pending(&shared.faults, &pyjson::py_str(id));
        }
    }
    drop(st);
    empty(StatusCode::OK)
}

async fn post_interrupt(State(shared): Shr, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
    let target = body.get("prompt_id").filter(|v| truthy(v)).map(pyjson::py_str);
    let interrupt = match target {
        Some(id) => shared.lock().running.as_ref().is_some_and(|r| r.prompt_id == id),
        None => true,
    };
    if interrupt {
        shared.interrupt.store(true, Ordering::SeqCst);
    }
    empty(StatusCode::OK)
}

async fn history_delay(shared: &Shared) {
    let d = shared.faults.history_delay();
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

async fn get_history(State(shared): Shr, Query(q): Query<HashMap<String, String>>) -> Response {
    history_delay(&shared).await;
    let max_items = match q.get("max_items").map(|s| s.trim().parse::<i64>()) {
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return internal_error(),
        None => None,
    };
    let mut offset = match q.get("offset").map(|s| s.trim().parse::<i64>()) {
        Some(Ok(n)) => n,
        Some(Err(_)) => return internal_error(),
        None => -1,
    };
    let st = shared.lock();
    if offset < 0
        && let Some(m) = max_items
    {
        offset = st.history.len() as i64 - m;
    }
    let mut out = Map::new();
    for (i, (k, v)) in st.history.iter().enumerate() {
        if i as i64 >= offset {
            out.insert(k.clone(), v.clone());
            if max_items.is_some_and(|m| out.len() as i64 >= m) {
                break;
            }
        }
    }
    drop(st);
    json_ok(&Value::Object(out))
}

async fn get_history_item(State(shared): Shr, AxPath(prompt_id): AxPath<String>) -> Response {
    history_delay(&shared).await;
    let entry = shared.lock().history.get(&prompt_id).cloned();
    match entry {
        Some(e) => json_ok(&json!({prompt_id: e})),
        None => json_ok(&json!({})),
    }
}

async fn post_history(State(shared): Shr, body: Bytes) -> Response {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else { return internal_error() };
    let mut st = shared.lock();
    if body.get("clear").is_some_and(truthy) {
        st.history.clear();
    }
    if let Some(ids) = body.get("delete").and_then(Value::as_array) {
        for id in ids {
            st.history.shift_remove(&pyjson::py_str(id));
        }
    }
    drop(st);
    empty(StatusCode::OK)
}

async fn object_info_all(State(shared): Shr) -> Response {
    if shared.newer() {
        // `asset_manager.ensure_scan_started()`: the first call seeds the asset registry.
        assets::ensure_scan_started(&shared);
    }
    let mut out = Map::new();
    for class in nodes::class_names() {
        if let Some(info) = nodes::object_info(class, &shared.dirs.input) {
            out.insert(class.clone(), info);
        }
    }
    json_ok(&Value::Object(out))
}

async fn object_info_one(State(shared): Shr, AxPath(class): AxPath<String>) -> Response {
    match nodes::object_info(&class, &shared.dirs.input) {
        Some(info) => json_ok(&json!({class: info})),
        None => json_ok(&json!({})),
    }
}

const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

async fn models() -> Response {
    json_ok(&json!(MODEL_FOLDERS))
}

async fn models_folder(AxPath(folder): AxPath<String>) -> Response {
    if MODEL_FOLDERS.contains(&folder.as_str()) { json_ok(&json!([])) } else { empty(StatusCode::NOT_FOUND) }
}

async fn internal_logs(State(shared): Shr) -> Response {
    let text: String = shared.lock().log_entries.iter().map(|e| pyjson::py_str(&e["m"])).collect();
    json_ok(&json!(text))
}

async fn internal_logs_raw(State(shared): Shr) -> Response {
    let entries: Vec<Value> = shared.lock().log_entries.iter().cloned().collect();
    json_ok(&json!({"entries": entries, "size": {"cols": 80, "rows": 24}}))
}

async fn logs_subscribe(State(shared): Shr, body: Bytes) -> Response {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&body) else { return internal_error() };
    let (Some(client_id), Some(enabled)) = (body.get("clientId"), body.get("enabled")) else {
        return internal_error();
    };
    let client_id = pyjson::py_str(client_id);
    let mut st = shared.lock();
    st.log_subscribers.retain(|c| c != &client_id);
    if truthy(enabled) {
        st.log_subscribers.push(client_id);
    }
    drop(st);
    empty(StatusCode::OK)
}

async fn folder_paths(State(shared): Shr) -> Response {
    let d = &shared.dirs;
    json_ok(&json!({
        "input": [d.input.display().to_string()],
        "output": [d.output.display().to_string()],
        "temp": [d.temp.display().to_string()],
    }))
}

async fn internal_files(State(shared): Shr, AxPath(kind): AxPath<String>) -> Response {
    let Some(dir) = shared.dirs.by_type(&kind) else {
        return json_response(StatusCode::BAD_REQUEST, &json!({"error": "Invalid directory type"}));
    };
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    files.sort();
    json_ok(&json!(files))
}

/// Lexically resolves `rel` under `base`; `None` if it escapes `base`.
fn join_inside(base: &Path, rel: &str) -> Option<PathBuf> {
    let mut parts: Vec<String> = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    let mut out = base.to_path_buf();
    for p in parts {
        out.push(p);
    }
    Some(out)
}

struct UploadForm {
    image: Option<(String, Bytes)>,
    overwrite: Option<String>,
    subfolder: String,
    kind: Option<String>,
    original_ref: Option<String>,
}

/// Reads the multipart form; `Err` is the response to return.
async fn read_form(req: Request, shared: &Arc<Shared>) -> Result<UploadForm, Response> {
    let mut mp = Multipart::from_request(req, shared).await.map_err(|_| empty(StatusCode::BAD_REQUEST))?;
    let mut form =
        UploadForm { image: None, overwrite: None, subfolder: String::new(), kind: None, original_ref: None };
    let mut image_without_file = false;
    while let Some(field) = mp.next_field().await.map_err(|_| empty(StatusCode::BAD_REQUEST))? {
        let name = field.name().unwrap_or_default().to_string();
        let file_name = field.file_name().map(str::to_string);
        let data = field.bytes().await.map_err(|_| empty(StatusCode::BAD_REQUEST))?;
        let text = || String::from_utf8_lossy(&data).into_owned();
        match name.as_str() {
            "image" => match file_name {
                Some(f) if !f.is_empty() => form.image = Some((f, data.clone())),
                _ => image_without_file = true,
            },
            "overwrite" => form.overwrite = Some(text()),
            "subfolder" => form.subfolder = text(),
            "type" => form.kind = Some(text()),
            "original_ref" => form.original_ref = Some(text()),
            _ => {}
        }
    }
    if form.image.is_none() && image_without_file {
        // aiohttp hands a plain string field to `image.file`: AttributeError.
        return Err(internal_error());
    }
    Ok(form)
}

/// `image_upload` of server.py; `mask` merges the upload's alpha into `original_ref`.
async fn do_upload(shared: Arc<Shared>, req: Request, mask: bool) -> Response {
    let delay = shared.faults.upload_delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let form = match read_form(req, &shared).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let kind = form.kind.clone().unwrap_or_else(|| "input".to_string());
    let Some(upload_dir) = shared.dirs.by_type(&kind).map(Path::to_path_buf) else { return internal_error() };
    let Some((filename, data)) = form.image.clone() else { return empty(StatusCode::BAD_REQUEST) };
    let Some(folder) = join_inside(&upload_dir, &form.subfolder) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let Some(mut filepath) = join_inside(&folder, &filename) else { return empty(StatusCode::BAD_REQUEST) };
    if !filepath.starts_with(&upload_dir) {
        return empty(StatusCode::BAD_REQUEST);
    }
    if std::fs::create_dir_all(&folder).is_err() {
        return internal_error();
    }
    let data = if mask {
        match merge_mask(&shared.dirs, form.original_ref.as_deref(), &data) {
            Ok(Some(bytes)) => Bytes::from(bytes),
            Ok(None) => return empty(StatusCode::BAD_REQUEST),
            Err(()) => return internal_error(),
        }
    } else {
        data
    };
    let mut name = filename.clone();
    let overwrite = matches!(form.overwrite.as_deref(), Some("true") | Some("1"));
    let mut duplicate = false;
    if !overwrite {
        let (stem, ext) = match filename.rfind('.') {
            Some(i) if i > 0 => (filename[..i].to_string(), filename[i..].to_string()),
            _ => (filename.clone(), String::new()),
        };
        let mut i = 1;
        while filepath.exists() {
            if std::fs::read(&filepath).is_ok_and(|existing| existing == data.as_ref()) {
                duplicate = true;
                break;
            }
            name = format!("{stem} ({i}){ext}");
            filepath = folder.join(&name);
            i += 1;
        }
    }
    if !duplicate && std::fs::write(&filepath, &data).is_err() {
        return internal_error();
    }
    let mut answer = json!({"name": name, "subfolder": form.subfolder, "type": kind});
    if shared.newer() {
        // `asset_manager.register_upload`: the answer names the asset and its blake3 content hash.
        let asset = assets::register_file(&shared, &filepath, &name, &kind);
        answer["asset"] = assets::upload_view(&asset);
    }
    json_ok(&answer)
}

/// Copies the uploaded mask's alpha channel onto the referenced original; `Ok(None)` = 400.
fn merge_mask(dirs: &Dirs, original_ref: Option<&str>, mask: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    let original: Value = serde_json::from_str(original_ref.ok_or(())?).map_err(|_| ())?;
    let name = original.get("filename").map(pyjson::py_str).ok_or(())?;
    let (file, annotated) = split_annotation(&name);
    if file.is_empty() || file.starts_with('/') || file.contains("..") {
        return Ok(None);
    }
    let kind = annotated
        .map(str::to_string)
        .unwrap_or_else(|| original.get("type").map(pyjson::py_str).unwrap_or("output".into()));
    let Some(dir) = dirs.by_type(&kind) else { return Ok(None) };
    let sub = original.get("subfolder").map(pyjson::py_str).unwrap_or_default();
    let Some(dir) = join_inside(dir, &sub) else { return Ok(None) };
    let path = dir.join(file);
    let orig = nodes::decode_bounded(&std::fs::read(&path).map_err(|_| ())?).map_err(|_| ())?.to_rgba8();
    let m = nodes::decode_bounded(mask).map_err(|_| ())?.to_rgba8();
    let mut merged = orig.clone();
    for (x, y, px) in merged.enumerate_pixels_mut() {
        px.0[3] = m.get_pixel_checked(x, y).map(|p| p.0[3]).unwrap_or(255);
    }
    let mut out = std::io::Cursor::new(Vec::new());
    merged.write_to(&mut out, image::ImageFormat::Png).map_err(|_| ())?;
    Ok(Some(out.into_inner()))
}

async fn upload_image(State(shared): Shr, req: Request) -> Response {
    do_upload(shared, req, false).await
}

async fn upload_mask(State(shared): Shr, req: Request) -> Response {
    do_upload(shared, req, true).await
}

fn content_type_for(name: &str) -> &'static str {
    let ext = Path::new(name).extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "txt" => "text/plain",
        "json" => "application/json",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "wav" => "audio/x-wav",
        "mp3" => "audio/mpeg",
        "html" | "htm" | "js" | "css" => "application/octet-stream",
        _ => "application/octet-stream",
    }
}

/// `/view`: a FileResponse with Content-Disposition, Etag, Last-Modified and Content-Length.
async fn view(State(shared): Shr, method: Method, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(raw) = q.get("filename") else { return empty(StatusCode::NOT_FOUND) };
    if raw.starts_with("blake3:") {
        // 0.38 resolves an asset hash (the frontend uses hashes as LoadImage values); 0.3.64 looks for a
        // file of that name.
        if shared.newer() {
            let Some(asset) = assets::by_hash(&shared, raw) else { return empty(StatusCode::NOT_FOUND) };
            let Ok(bytes) = tokio::fs::read(&asset.path).await else { return empty(StatusCode::NOT_FOUND) };
            let disposition = HeaderValue::from_str(&format!("filename=\"{}\"", asset.name))
                .unwrap_or(HeaderValue::from_static("inline"));
            let modified = tokio::fs::metadata(&asset.path).await.ok().and_then(|m| m.modified().ok());
            return bytes_response(bytes, content_type_for(&asset.name), disposition, modified, &method);
        }
    }
    let (filename, annotated) = split_annotation(raw);
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") {
        return empty(StatusCode::BAD_REQUEST);
    }
    let kind = annotated
        .map(str::to_string)
        .unwrap_or_else(|| q.get("type").cloned().unwrap_or_else(|| "output".into()));
    let Some(mut dir) = shared.dirs.by_type(&kind).map(Path::to_path_buf) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if let Some(sub) = q.get("subfolder") {
        match join_inside(&dir, sub) {
            Some(d) => dir = d,
            None => return empty(StatusCode::FORBIDDEN),
        }
    }
    let base = Path::new(filename).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let path = dir.join(&base);
    let Ok(meta) = tokio::fs::metadata(&path).await else { return empty(StatusCode::NOT_FOUND) };
    if !meta.is_file() {
        return empty(StatusCode::NOT_FOUND);
    }
    let Ok(bytes) = tokio::fs::read(&path).await else { return empty(StatusCode::NOT_FOUND) };
    let disposition =
        HeaderValue::from_str(&format!("filename=\"{base}\"")).unwrap_or(HeaderValue::from_static("inline"));

    if let Some(preview) = q.get("preview") {
        let (fmt, quality) = preview.split_once(';').unwrap_or((preview.as_str(), "90"));
        let quality: u8 = quality.parse().unwrap_or(90);
        if let Ok(img) = nodes::decode_bounded(&bytes) {
            let rgb = image::DynamicImage::ImageRgb8(img.to_rgb8());
            let mut out = std::io::Cursor::new(Vec::new());
            let (ok, ctype) = if fmt == "webp" {
                (rgb.write_to(&mut out, image::ImageFormat::WebP).is_ok(), "image/webp")
            } else {
                let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
                (rgb.write_with_encoder(enc).is_ok(), "image/jpeg")
            };
            if ok {
                return bytes_response(out.into_inner(), ctype, disposition, None, &method);
            }
        }
    }
    let channel = q.get("channel").map(String::as_str).unwrap_or("rgba");
    if (channel == "rgb" || channel == "a")
        && let Ok(img) = nodes::decode_bounded(&bytes)
    {
        let mut out = std::io::Cursor::new(Vec::new());
        let converted = if channel == "rgb" {
            image::DynamicImage::ImageRgb8(img.to_rgb8())
        } else {
            let rgba = img.to_rgba8();
            let mut alpha = rgba.clone();
            for px in alpha.pixels_mut() {
                px.0 = [0, 0, 0, px.0[3]];
            }
            image::DynamicImage::ImageRgba8(alpha)
        };
        if converted.write_to(&mut out, image::ImageFormat::Png).is_ok() {
            return bytes_response(out.into_inner(), "image/png", disposition, None, &method);
        }
    }
    let modified = meta.modified().ok();
    bytes_response(bytes, content_type_for(&base), disposition, modified, &method)
}

fn bytes_response(
    bytes: Vec<u8>,
    content_type: &'static str,
    disposition: HeaderValue,
    modified: Option<std::time::SystemTime>,
    method: &Method,
) -> Response {
    let len = bytes.len();
    let body = if method == Method::HEAD { Body::empty() } else { Body::from(bytes) };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_DISPOSITION, disposition);
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(m) = modified {
        let nanos = m.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        if let Ok(v) = HeaderValue::from_str(&format!("\"{nanos:x}-{len:x}\"")) {
            h.insert(header::ETAG, v);
        }
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(m)) {
            h.insert(header::LAST_MODIFIED, v);
        }
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str, origin: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).expect("host"));
        h.insert(header::ORIGIN, HeaderValue::from_str(origin).expect("origin"));
        h
    }

    #[test]
    fn origin_check_compares_host_and_origin_netloc_as_written() {
        assert!(!origin_mismatch(&headers("127.0.0.1:8188", "http://127.0.0.1:8188")));
        assert!(origin_mismatch(&headers("127.0.0.1:8188", "http://evil.example")));
        assert!(origin_mismatch(&headers("localhost", "http://localhost:80")));
        assert!(!origin_mismatch(&headers("example.com:8188", "http://evil.example")));
        assert!(!origin_mismatch(&headers("127.0.0.1:8188", "null")));
        assert!(origin_mismatch(&headers("[::1]:8188", "http://[::1]:9999")));
    }
}
