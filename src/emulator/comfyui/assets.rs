//! The 0.38 asset registry, on by default: every upload is registered as an asset named by its blake3
//! content hash (`image_upload` answers with it), the seeder registers what `input/` and `output/` hold on
//! the first `/object_info` and broadcasts `assets.seed.*` to every socket, and the basic routes of
//! `app/assets/api/routes.py` @`07eea23` answer: list, detail, content, `HEAD` by hash. `/view` resolves
//! `blake3:<hex>` through [`by_hash`]. Knows nothing about prompts.

use super::routes::json_response;
use super::state::{Asset, Shared, httpdate_iso};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as AxPath, Query, State as AxState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, head};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

type Shr = AxState<Arc<Shared>>;

/// The asset routes (registered on the app, not repeated under `/api`).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/assets", get(list))
        .route("/api/assets/{id}", get(detail))
        .route("/api/assets/{id}/content", get(content))
        .route("/api/assets/hash/{hash}", head(head_by_hash))
}

fn mime_of(name: &str) -> &'static str {
    match Path::new(name).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("txt") => "text/plain",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// Registers (or finds) the asset for the file at `path`; the hash is blake3 of its bytes.
pub(crate) fn register_file(shared: &Shared, path: &Path, name: &str, kind: &str) -> Asset {
    let bytes = std::fs::read(path).unwrap_or_default();
    let hash = format!("blake3:{}", blake3::hash(&bytes).to_hex());
    let mut st = shared.lock();
    if let Some(a) = st.assets.iter().find(|a| a.path == path && a.hash == hash) {
        return a.clone();
    }
    let asset = Asset {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_owned(),
        hash,
        size: bytes.len() as u64,
        mime_type: mime_of(name).to_owned(),
        tags: vec![kind.to_owned()],
        path: path.to_path_buf(),
        created_at: httpdate_iso(std::time::SystemTime::now()),
    };
    st.assets.retain(|a| a.path != path);
    st.assets.push(asset.clone());
    asset
}

/// The `asset` object of an upload answer.
pub(crate) fn upload_view(a: &Asset) -> Value {
    json!({"id": a.id, "name": a.name, "asset_hash": a.hash, "size": a.size, "mime_type": a.mime_type, "tags": a.tags})
}

fn asset_json(a: &Asset) -> Value {
    let kind = a.tags.first().cloned().unwrap_or_else(|| "input".into());
    json!({
        "id": a.id, "name": a.name, "hash": a.hash, "display_name": a.name, "size": a.size,
        "mime_type": a.mime_type, "tags": a.tags,
        "preview_url": format!("/api/view?type={kind}&filename={}", url::form_urlencoded::byte_serialize(a.name.as_bytes()).collect::<String>()),
        "user_metadata": {}, "created_at": a.created_at, "updated_at": a.created_at, "last_access_time": a.created_at
    })
}

/// The asset whose content hash is `hash` (`blake3:<hex>`).
pub(crate) fn by_hash(shared: &Shared, hash: &str) -> Option<Asset> {
    shared.lock().assets.iter().find(|a| a.hash == hash).cloned()
}

/// `asset_manager.ensure_scan_started()`: the first call registers every file of `input/` and `output/`
/// and broadcasts `assets.seed.started` and `assets.seed.completed` (no sid: every socket gets them).
pub(crate) fn ensure_scan_started(shared: &Shared) {
    {
        let mut st = shared.lock();
        if st.seeded {
            return;
        }
        st.seeded = true;
    }
    let started = std::time::Instant::now();
    let mut files = Vec::new();
    for (kind, dir) in [("input", &shared.dirs.input), ("output", &shared.dirs.output)] {
        let entries = std::fs::read_dir(dir).map(|rd| rd.filter_map(Result::ok).collect::<Vec<_>>());
        for e in entries.unwrap_or_default() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                files.push((kind, e.path(), e.file_name().to_string_lossy().into_owned()));
            }
        }
    }
    let total = files.len();
    {
        let mut st = shared.lock();
        let data = json!({"roots": ["models", "input", "output"], "total": total});
        st.send_json(&shared.faults, "assets.seed.started", data, None);
    }
    let before = shared.lock().assets.len();
    for (kind, path, name) in &files {
        register_file(shared, path, name, kind);
    }
    let mut st = shared.lock();
    let created = st.assets.len().saturating_sub(before);
    let elapsed = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    let data = json!({"scanned": total, "total": total, "created": created, "skipped": total - created, "elapsed": elapsed});
    st.send_json(&shared.faults, "assets.seed.completed", data, None);
}

fn error(status: StatusCode, code: &str, message: String, details: Value) -> Response {
    json_response(status, &json!({"error": {"code": code, "message": message, "details": details}}))
}

fn not_found() -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp
}

/// The route only matches a UUID (`UUID_RE`); anything else is aiohttp's plain 404.
fn reference_id(raw: &str) -> Option<String> {
    uuid::Uuid::parse_str(raw).ok().filter(|_| raw.len() == 36).map(|u| u.to_string())
}

/// `GET /api/assets?limit=&offset=`: `{"assets", "total", "has_more"}`, oldest first.
async fn list(AxState(shared): Shr, Query(q): Query<HashMap<String, String>>) -> Response {
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(20).clamp(1, 500);
    let offset = q.get("offset").and_then(|o| o.parse::<usize>().ok()).unwrap_or(0);
    let st = shared.lock();
    let total = st.assets.len();
    let page: Vec<Value> = st.assets.iter().skip(offset).take(limit).map(asset_json).collect();
    let has_more = offset + page.len() < total;
    json_response(StatusCode::OK, &json!({"assets": page, "total": total, "has_more": has_more}))
}

/// `GET /api/assets/{uuid}`.
async fn detail(AxState(shared): Shr, AxPath(raw): AxPath<String>) -> Response {
    let Some(id) = reference_id(&raw) else { return not_found() };
    let found = shared.lock().assets.iter().find(|a| a.id == id).cloned();
    match found {
        Some(a) => json_response(StatusCode::OK, &asset_json(&a)),
        None => error(
            StatusCode::NOT_FOUND,
            "ASSET_NOT_FOUND",
            format!("AssetReference {id} not found"),
            json!({"id": id}),
        ),
    }
}

/// `GET /api/assets/{uuid}/content`: the bytes, as an attachment.
async fn content(AxState(shared): Shr, AxPath(raw): AxPath<String>) -> Response {
    let Some(id) = reference_id(&raw) else { return not_found() };
    let found = shared.lock().assets.iter().find(|a| a.id == id).cloned();
    let Some(a) = found else {
        return error(StatusCode::NOT_FOUND, "ASSET_NOT_FOUND", format!("Asset {id} not found"), json!({}));
    };
    let Ok(bytes) = tokio::fs::read(&a.path).await else {
        return error(
            StatusCode::NOT_FOUND,
            "FILE_NOT_FOUND",
            "Underlying file not found on disk.".into(),
            json!({}),
        );
    };
    let mut resp = Response::new(Body::from(bytes));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime_of(&a.name)));
    let encoded: String = url::form_urlencoded::byte_serialize(a.name.as_bytes()).collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename*=UTF-8''{encoded}")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    resp
}

/// `HEAD /api/assets/hash/{blake3:<hex>}`: 200 when content with that hash is registered, else 404; 400
/// `INVALID_HASH` for anything not `blake3:` + 64 hex digits.
async fn head_by_hash(AxState(shared): Shr, AxPath(raw): AxPath<String>) -> Response {
    let hash = raw.trim().to_ascii_lowercase();
    let valid = hash
        .strip_prefix("blake3:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if !valid {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_HASH",
            "hash must be like 'blake3:<hex>'".into(),
            json!({}),
        );
    }
    let exists = shared.lock().assets.iter().any(|a| a.hash == hash);
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = if exists { StatusCode::OK } else { StatusCode::NOT_FOUND };
    resp
}
