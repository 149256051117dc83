//! Replays of the captured traces: the trace's HTTP requests, WebSocket opens, sends and closes are
//! driven against a fresh emulator in order, with a barrier before each request (every socket must first
//! have received as many frames as the real client had at that point). Then each socket's frames are
//! compared with the capture: same types in the same order, same field sets in the same key order, same
//! values except ids (mapped), timestamps, `number`, temp-file random parts, paths and tracebacks.
//! HTTP responses are compared for status, Content-Type and body shape; images are decoded and compared
//! pixel by pixel with the real server's output where the trace kept the bytes.
//!
//! The same captures are replayed against the 0.38 generation too, after [`to_newer`] rewrote what the
//! capture expects by NEWER.md's rules (the newer `/features` and `feature_flags`, `create_time` in queued
//! `extra_data`, an `asset` in upload answers, `missing_node_type`, canonical prompt ids). Everything else
//! a capture shows must come out of the 0.38 emulator unchanged: message order, routing, caching, errors.

use super::super::{ComfyEmulator, ComfyVersion};
use super::harness::*;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Deserialize)]
struct Trace {
    case: String,
    events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Event {
    WsOpen {
        ws: String,
        url: String,
    },
    WsSend {
        ws: String,
        opcode: String,
        text: Option<String>,
    },
    WsRecv {
        seq: u64,
        t_rel: f64,
        ws: String,
        opcode: String,
        raw: Option<String>,
        decoded: Option<Value>,
    },
    WsClosed {
        ws: String,
    },
    HttpRequest {
        seq: u64,
        t_rel: f64,
        method: String,
        path: String,
        headers: Map<String, Value>,
        body: Option<ReqBody>,
    },
    HttpResponse {
        seq: u64,
        status: u16,
        headers: Vec<(String, String)>,
        body: Option<RespBody>,
    },
    HttpError {},
    Signal {},
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct ReqBody {
    text: Option<String>,
    b64: Option<String>,
}

/// Matches any value in an expected body (a field whose value the capture cannot know, e.g. a new id).
const ANY: &str = "\u{1}any";

/// The 0.38 server flags (`comfy_api/feature_flags.py` @`1924b05`).
fn newer_flags() -> Value {
    serde_json::json!({"supports_preview_metadata": true, "supports_model_type_tags": true, "max_upload_size": 104857600,
        "extension": {"manager": {"supports_v4": true}}, "node_replacements": true, "assets": true})
}

/// Adds `create_time` to the `extra_data` of a `[number, id, prompt, extra_data, outputs]` tuple.
fn add_create_time(tuple: &mut Value) {
    if let Some(extra) = tuple.get_mut(3).and_then(Value::as_object_mut) {
        extra.insert("create_time".into(), serde_json::json!(0));
    }
}

/// Rewrites a 0.3.64 capture into what 0.38 answers to the same requests (NEWER.md #1, #5, #7, #9, and
/// `create_time` of `server.py`'s `post_prompt`). Returns the response seqs not to compare: `/system_stats`
/// (its 0.38 shape is checked in `newer`) and the cycle case of e1 (0.38 gives node errors the 0.3.64
/// capture cannot predict; checked in `newer`).
fn to_newer(trace: &mut Trace) -> Vec<u64> {
    let mut skip = Vec::new();
    let mut last: Option<(String, String, Option<Value>)> = None;
    for ev in &mut trace.events {
        match ev {
            Event::HttpRequest { method, path, body, .. } => {
                let mut parsed = body
                    .as_ref()
                    .and_then(|b| b.text.as_deref())
                    .and_then(|t| serde_json::from_str::<Value>(t).ok());
                if method == "POST"
                    && path == "/prompt"
                    && let Some(Value::Object(o)) = parsed.as_mut()
                {
                    let canonical = o
                        .get("prompt_id")
                        .and_then(Value::as_str)
                        .is_none_or(|id| uuid::Uuid::parse_str(id).is_ok_and(|u| u.to_string() == id));
                    if !canonical {
                        // 0.38 refuses it (invalid_prompt_id, tested in `newer`); a client must send a UUID.
                        o.insert("prompt_id".into(), Value::String(uuid::Uuid::new_v4().to_string()));
                        if let Some(b) = body.as_mut() {
                            b.text = Some(Value::Object(o.clone()).to_string());
                        }
                    }
                }
                last = Some((method.clone(), path.clone(), parsed));
            }
            Event::HttpResponse { seq, status, body, .. } => {
                let Some((method, path, request)) = last.take() else { continue };
                let route = path.split('?').next().unwrap_or("").trim_start_matches("/api");
                let Some(json) = body.as_mut().and_then(|b| b.json.as_mut()) else { continue };
                match (method.as_str(), route) {
                    ("GET", "/features") => *json = newer_flags(),
                    ("GET", "/system_stats") => skip.push(*seq),
                    ("GET", "/queue") => {
                        for key in ["queue_running", "queue_pending"] {
                            for t in json.get_mut(key).and_then(Value::as_array_mut).into_iter().flatten() {
                                add_create_time(t);
                            }
                        }
                    }
                    ("GET", r) if r.starts_with("/history") => {
                        for entry in json.as_object_mut().into_iter().flat_map(|o| o.values_mut()) {
                            if let Some(t) = entry.get_mut("prompt") {
                                add_create_time(t);
                            }
                        }
                    }
                    ("POST", "/upload/image" | "/upload/mask") if *status == 200 => {
                        let name = json["name"].clone();
                        json["asset"] = serde_json::json!({"id": ANY, "name": name, "asset_hash": ANY, "size": ANY, "mime_type": ANY, "tags": ANY});
                    }
                    ("POST", "/prompt") if *status == 400 => {
                        let error = json["error"].clone();
                        let node = error["details"]
                            .as_str()
                            .and_then(|d| d.strip_prefix("Node ID '#"))
                            .map(|d| d.trim_end_matches('\'').to_string());
                        let message = error["message"].as_str().unwrap_or("");
                        if let (Some(node), "invalid_prompt") = (node, error["type"].as_str().unwrap_or("")) {
                            let class = message
                                .strip_prefix("Cannot execute because node ")
                                .and_then(|m| m.strip_suffix(" does not exist."))
                                .map(str::to_string);
                            let title = request
                                .as_ref()
                                .and_then(|r| r.pointer(&format!("/prompt/{node}/_meta/title")))
                                .cloned();
                            json["error"] = match class {
                                Some(class) => {
                                    let title = title.unwrap_or_else(|| Value::String(class.clone()));
                                    serde_json::json!({"type": "missing_node_type",
                                        "message": format!("Node '{}' not found. The custom node may not be installed.", title.as_str().unwrap_or("")),
                                        "details": error["details"], "extra_info": {"node_id": node, "class_type": class, "node_title": title}})
                                }
                                None => {
                                    let shown = title
                                        .as_ref()
                                        .and_then(Value::as_str)
                                        .map_or(format!("ID #{node}"), str::to_string);
                                    serde_json::json!({"type": "missing_node_type",
                                        "message": format!("Node '{shown}' has no class_type. The workflow may be corrupted or a custom node is missing."),
                                        "details": error["details"], "extra_info": {"node_id": node, "class_type": null, "node_title": title}})
                                }
                            };
                        } else if error["type"] == "prompt_outputs_failed_validation"
                            && json["node_errors"] == serde_json::json!({})
                        {
                            skip.push(*seq);
                        }
                    }
                    _ => {}
                }
            }
            Event::WsRecv { raw: Some(raw), .. } => {
                if let Ok(mut v) = serde_json::from_str::<Value>(raw)
                    && v["type"] == "feature_flags"
                {
                    v["data"] = newer_flags();
                    *raw = v.to_string();
                }
            }
            _ => {}
        }
    }
    skip
}

#[derive(Debug, Deserialize)]
struct RespBody {
    text: Option<String>,
    json: Option<Value>,
    b64: Option<String>,
    image_size: Option<(u32, u32)>,
    len: Option<usize>,
}

fn load(name: &str) -> Trace {
    let path = format!("{}/src/emulator/comfyui/tests/traces/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// An expected WebSocket frame.
#[derive(Debug)]
struct Expected {
    seq: u64,
    frame: ExpectedFrame,
}

#[derive(Debug)]
enum ExpectedFrame {
    Json(Value),
    Binary(Value),
    Closed { clean: bool },
}

struct Actual {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
}

struct Replayer {
    emu: ComfyEmulator,
    root: String,
    sockets: HashMap<String, Ws>,
    /// Sockets whose URL had no clientId (their `sid` is server-made).
    anonymous: Vec<String>,
    expected: HashMap<String, Vec<Expected>>,
    ids: Vec<(String, String)>,
    last: Option<(String, String, Actual)>,
    skip: Vec<u64>,
    loose_status: bool,
    failures: Vec<String>,
}

impl Replayer {
    fn substitute(&self, s: &str) -> String {
        let mut out = s.to_string();
        for (from, to) in &self.ids {
            out = out.replace(from.as_str(), to.as_str());
        }
        out
    }

    fn learn(&mut self, from: &str, to: &str) {
        if from != to && !self.ids.iter().any(|(f, _)| f == from) {
            self.ids.push((from.to_string(), to.to_string()));
        }
    }

    /// Waits until every socket has received at least as many frames as the capture shows so far.
    async fn barrier(&mut self) {
        let names: Vec<String> = self.sockets.keys().cloned().collect();
        for name in names {
            let want = self.expected.get(&name).map(Vec::len).unwrap_or(0);
            let Some(ws) = self.sockets.get_mut(&name) else { continue };
            while ws.log.len() < want {
                if matches!(ws.log.last(), Some(Frame::Closed { .. })) {
                    break;
                }
                if ws.next_within(WAIT).await.is_none() {
                    let got = kinds(&ws.log);
                    let exp: Vec<String> =
                        self.expected[&name].iter().map(|e| expected_kind(&e.frame)).collect();
                    panic!(
                        "socket {name}: waited for {want} frames, got {}:\n got      {got:?}\n expected {exp:?}",
                        ws.log.len()
                    );
                }
            }
            // Learn server-made sids and temp-file names as soon as they arrive.
            let pairs: Vec<(Value, Value)> = ws
                .log
                .iter()
                .zip(self.expected[&name].iter())
                .filter_map(|(a, e)| match (&e.frame, a) {
                    (ExpectedFrame::Json(ev), Frame::Json(av)) => Some((ev.clone(), av.clone())),
                    _ => None,
                })
                .collect();
            let anonymous = self.anonymous.contains(&name);
            for (e, a) in pairs {
                if anonymous
                    && let (Some(es), Some(as_)) = (e["data"]["sid"].as_str(), a["data"]["sid"].as_str())
                {
                    self.learn(es, as_);
                }
                self.learn_temp_names(&e, &a);
            }
        }
    }

    /// Maps the capture's `ComfyUI_temp_xxxxx_` prefixes to the emulator's.
    fn learn_temp_names(&mut self, e: &Value, a: &Value) {
        match (e, a) {
            (Value::String(es), Value::String(as_)) => {
                if let (Some(i), Some(j)) = (es.find("ComfyUI_temp_"), as_.find("ComfyUI_temp_"))
                    && es.len() >= i + 19
                    && as_.len() >= j + 19
                {
                    let (ep, ap) = (es[i..i + 19].to_string(), as_[j..j + 19].to_string());
                    self.learn(&ep, &ap);
                }
            }
            (Value::Array(ea), Value::Array(aa)) => {
                for (x, y) in ea.iter().zip(aa) {
                    self.learn_temp_names(x, y);
                }
            }
            (Value::Object(eo), Value::Object(ao)) => {
                for (k, x) in eo {
                    if let Some(y) = ao.get(k) {
                        self.learn_temp_names(x, y);
                    }
                }
            }
            _ => {}
        }
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &Map<String, Value>,
        body: Option<&ReqBody>,
    ) {
        let path = self.substitute(path);
        let url = format!("{}{path}", self.emu.url());
        let mut req = http().request(method.parse().expect("method"), &url);
        if let Some(ct) = headers.get("Content-Type").and_then(Value::as_str) {
            req = req.header("Content-Type", ct);
        }
        if let Some(b) = body {
            let bytes = match (&b.b64, &b.text) {
                (Some(b64), _) => base64::engine::general_purpose::STANDARD.decode(b64).expect("b64"),
                (None, Some(t)) => self.substitute(t).into_bytes(),
                (None, None) => Vec::new(),
            };
            req = req.body(bytes);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(String::from);
        let body = resp.bytes().await.expect("body").to_vec();
        self.last = Some((method.to_string(), path, Actual { status, content_type, body }));
    }

    async fn check_response(
        &mut self,
        seq: u64,
        status: u16,
        headers: &[(String, String)],
        body: Option<&RespBody>,
    ) {
        let Some((method, path, mut actual)) = self.last.take() else { return };
        if self.skip.contains(&seq) {
            return;
        }
        let expected_json = body.and_then(|b| b.json.clone());
        // A history poll that the capture saw complete: poll (bounded) until the emulator has it too.
        if method == "GET"
            && path.starts_with("/history/")
            && let Some(exp) = &expected_json
        {
            let deadline = tokio::time::Instant::now() + WAIT;
            while exp.as_object().is_some_and(|o| !o.is_empty()) && actual.body == b"{}" {
                assert!(tokio::time::Instant::now() < deadline, "history never filled for {path}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                let resp = http().get(format!("{}{path}", self.emu.url())).send().await.expect("get");
                actual.body = resp.bytes().await.expect("body").to_vec();
            }
            if exp.as_object().is_some_and(Map::is_empty) {
                // The capture polled before completion; the emulator may be faster.
                return;
            }
        }
        let here = format!("seq {seq} {method} {path}");
        if actual.status != status {
            self.failures.push(format!(
                "{here}: status {} != {status}: {}",
                actual.status,
                String::from_utf8_lossy(&actual.body)
            ));
            return;
        }
        let exp_ct =
            headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.clone());
        let ct_ok = match (&exp_ct, &actual.content_type) {
            (None, None) => true,
            (Some(e), Some(a)) => e == a,
            (Some(e), None) => e == "application/octet-stream" && actual.body.is_empty(),
            _ => false,
        };
        if !ct_ok {
            self.failures.push(format!("{here}: content-type {:?} != {exp_ct:?}", actual.content_type));
        }
        let Some(body) = body else { return };
        if let Some(exp) = expected_json {
            match serde_json::from_slice::<Value>(&actual.body) {
                Ok(act) => {
                    let exp = self.subst_value(&exp);
                    if let Err(e) = compare(&exp, &act, &mut Vec::new(), &self.root) {
                        self.failures.push(format!("{here}: {e}\n expected {exp}\n actual   {act}"));
                    }
                }
                Err(_) => self
                    .failures
                    .push(format!("{here}: body is not JSON: {}", String::from_utf8_lossy(&actual.body))),
            }
        } else if let Some(size) = body.image_size {
            match image::load_from_memory(&actual.body) {
                Ok(img) => {
                    if (img.width(), img.height()) != size {
                        self.failures.push(format!(
                            "{here}: image size {:?} != {size:?}",
                            (img.width(), img.height())
                        ));
                    }
                    let lossy = matches!(actual.content_type.as_deref(), Some("image/jpeg" | "image/webp"));
                    if let (Some(b64), false) = (&body.b64, lossy) {
                        let exp_bytes = base64::engine::general_purpose::STANDARD.decode(b64).expect("b64");
                        let exp_img = image::load_from_memory(&exp_bytes).expect("trace image").to_rgb8();
                        let act_img = img.to_rgb8();
                        let worst = exp_img
                            .as_raw()
                            .iter()
                            .zip(act_img.as_raw())
                            .map(|(a, b)| a.abs_diff(*b))
                            .max()
                            .unwrap_or(0);
                        if worst > 2 {
                            self.failures.push(format!(
                                "{here}: pixels differ from the real server's by up to {worst}"
                            ));
                        }
                    }
                }
                Err(e) => self.failures.push(format!("{here}: not an image: {e}")),
            }
        } else if let Some(text) = &body.text {
            if body.len.unwrap_or(0) > 0 && String::from_utf8_lossy(&actual.body) != *text {
                self.failures
                    .push(format!("{here}: body {:?} != {text:?}", String::from_utf8_lossy(&actual.body)));
            }
        } else if body.len == Some(0) && !actual.body.is_empty() {
            self.failures.push(format!("{here}: expected an empty body"));
        }
    }

    fn subst_value(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.substitute(s)),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.subst_value(x)).collect()),
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, x)| (self.substitute(k), self.subst_value(x))).collect())
            }
            other => other.clone(),
        }
    }

    fn compare_sockets(&mut self) {
        let names: Vec<String> = self.expected.keys().cloned().collect();
        for name in names {
            let Some(ws) = self.sockets.get(&name) else { continue };
            let expected = &self.expected[&name];
            let (got, exp): (Vec<&Frame>, Vec<&Expected>) = if self.loose_status {
                let got_status = ws.log.iter().filter(|f| f.kind() == "status").count();
                let exp_status = expected.iter().filter(|e| expected_kind(&e.frame) == "status").count();
                if got_status != exp_status {
                    self.failures
                        .push(format!("socket {name}: {got_status} status messages, expected {exp_status}"));
                }
                (
                    ws.log.iter().filter(|f| f.kind() != "status").collect(),
                    expected.iter().filter(|e| expected_kind(&e.frame) != "status").collect(),
                )
            } else {
                (ws.log.iter().collect(), expected.iter().collect())
            };
            let got_kinds: Vec<String> = got.iter().map(|f| f.kind()).collect();
            let exp_kinds: Vec<String> = exp.iter().map(|e| expected_kind(&e.frame)).collect();
            if got_kinds != exp_kinds {
                self.failures.push(format!(
                    "socket {name}: frame types differ\n got      {got_kinds:?}\n expected {exp_kinds:?}"
                ));
                continue;
            }
            for (e, a) in exp.iter().zip(got.iter()) {
                let res = match (&e.frame, a) {
                    (ExpectedFrame::Json(ev), Frame::Json(av)) => {
                        compare(&self.subst_value(ev), av, &mut Vec::new(), &self.root)
                    }
                    (ExpectedFrame::Binary(dec), Frame::Binary(bytes)) => {
                        compare_binary(&self.subst_value(dec), bytes, &self.root)
                    }
                    (ExpectedFrame::Closed { clean }, Frame::Closed { clean: c }) if clean == c => Ok(()),
                    _ => Err("frame kind mismatch".to_string()),
                };
                if let Err(err) = res {
                    self.failures.push(format!("socket {name} frame (trace seq {}): {err}", e.seq));
                }
            }
        }
    }
}

fn expected_kind(f: &ExpectedFrame) -> String {
    match f {
        ExpectedFrame::Json(v) => v["type"].as_str().unwrap_or("?").to_string(),
        ExpectedFrame::Binary(d) => format!("binary{}", d["event_type"]),
        ExpectedFrame::Closed { clean } => format!("closed(clean={clean})"),
    }
}

fn compare_binary(decoded: &Value, bytes: &[u8], root: &str) -> Result<(), String> {
    let header = |i: usize| bytes.get(i * 4..i * 4 + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    match decoded["event_type"].as_u64() {
        Some(1) => {
            if header(1) != decoded["image_format"].as_u64().map(|v| v as u32) {
                return Err("type-1 image format differs".into());
            }
            check_image(&bytes[8..], &decoded["image_size"])
        }
        Some(3) => {
            let len = header(1).ok_or("short frame")? as usize;
            let node = std::str::from_utf8(&bytes[8..8 + len]).map_err(|e| e.to_string())?;
            let text = std::str::from_utf8(&bytes[8 + len..]).map_err(|e| e.to_string())?;
            if node != decoded["node_id"] || text != decoded["text"] {
                return Err(format!("text frame ({node:?}, {text:?}) != {decoded}"));
            }
            Ok(())
        }
        Some(4) => {
            let len = header(1).ok_or("short frame")? as usize;
            let meta: Value = serde_json::from_slice(&bytes[8..8 + len]).map_err(|e| e.to_string())?;
            let raw = decoded["metadata_raw"].as_str().unwrap_or("");
            let exp_meta: Value = serde_json::from_str(raw).unwrap_or(decoded["metadata"].clone());
            compare(&exp_meta, &meta, &mut Vec::new(), root)?;
            if std::str::from_utf8(&bytes[8..8 + len]).map_err(|e| e.to_string())?.contains("\":\"") {
                return Err("metadata is not json.dumps-formatted".into());
            }
            check_image(&bytes[8 + len..], &decoded["image_size"])
        }
        other => Err(format!("unexpected binary type {other:?}")),
    }
}

fn check_image(bytes: &[u8], size: &Value) -> Result<(), String> {
    let img = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    let want = (size[0].as_u64().unwrap_or(0) as u32, size[1].as_u64().unwrap_or(0) as u32);
    if (img.width(), img.height()) != want {
        return Err(format!("preview size {:?} != {want:?}", (img.width(), img.height())));
    }
    Ok(())
}

/// Replaces PreviewImage's random `ComfyUI_temp_xxxxx_` part.
fn normalize_temp(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("ComfyUI_temp_") {
        out.push_str(&rest[..i + 13]);
        rest = &rest[i + 13..];
        if rest.len() >= 6 && rest.as_bytes()[5] == b'_' && rest[..5].bytes().all(|b| b.is_ascii_lowercase())
        {
            // The random part, and the counter (it depends on the temp files earlier captures left).
            out.push_str("?????_");
            rest = rest[6..].trim_start_matches(|c: char| c.is_ascii_digit());
        }
    }
    out.push_str(rest);
    out
}

fn lenient_number(path: &[String]) -> bool {
    let last = path.last().map(String::as_str).unwrap_or("");
    if matches!(last, "timestamp" | "number" | "ram_free" | "vram_free" | "torch_vram_free" | "create_time") {
        return true;
    }
    // `[number, prompt_id, ...]` tuples in /queue and /history.
    let n = path.len();
    last == "0"
        && n >= 2
        && (path[n - 2] == "prompt"
            || (n >= 3 && (path[n - 3] == "queue_running" || path[n - 3] == "queue_pending")))
}

/// Structural comparison with the capture (see module docs for what is lenient).
fn compare(exp: &Value, act: &Value, path: &mut Vec<String>, root: &str) -> Result<(), String> {
    let at = || format!("at /{}", path.join("/"));
    let last = path.last().cloned().unwrap_or_default();
    let in_traceback = path.iter().any(|p| p == "traceback");
    if exp.as_str() == Some(ANY) {
        return Ok(());
    }
    match (exp, act) {
        (Value::Object(e), Value::Object(a)) => {
            let ek: Vec<&String> = e.keys().collect();
            let ak: Vec<&String> = a.keys().collect();
            if ek != ak {
                return Err(format!("{}: keys {ak:?} != {ek:?}", at()));
            }
            for (k, ev) in e {
                path.push(k.clone());
                compare(ev, &a[k], path, root)?;
                path.pop();
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) => {
            if in_traceback {
                return Ok(());
            }
            if e.len() != a.len() {
                return Err(format!("{}: {} items != {}", at(), a.len(), e.len()));
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                path.push(i.to_string());
                compare(ev, av, path, root)?;
                path.pop();
            }
            Ok(())
        }
        (Value::Number(e), Value::Number(a)) => {
            if e.is_f64() != a.is_f64() {
                return Err(format!("{}: number kind {a} vs {e}", at()));
            }
            if lenient_number(path) {
                let sign = |n: &serde_json::Number| n.as_f64().map(|f| f < 0.0);
                if sign(e) != sign(a) {
                    return Err(format!("{}: sign of {a} vs {e}", at()));
                }
                return Ok(());
            }
            if e.as_f64() != a.as_f64() {
                return Err(format!("{}: {a} != {e}", at()));
            }
            Ok(())
        }
        (Value::String(e), Value::String(a)) => {
            if in_traceback || last == "t" {
                return Ok(());
            }
            if last == "m" && e.starts_with("Prompt executed in") && a.starts_with("Prompt executed in") {
                return Ok(());
            }
            let a = a.replace(root, "/opt/ComfyUI");
            if normalize_temp(e) != normalize_temp(&a) {
                return Err(format!("{}: {a:?} != {e:?}", at()));
            }
            Ok(())
        }
        (e, a) if e == a => Ok(()),
        (e, a) => Err(format!("{}: {a} != {e}", at())),
    }
}

/// Options for one replay.
#[derive(Default, Clone)]
struct Opts {
    /// Responses (trace seq of the response) not compared: they depend on other captured cases.
    skip: &'static [u64],
    /// Requests (trace seq) not sent at all.
    skip_requests: &'static [u64],
    /// Emulated node duration, standing in for the captured slow CPU work.
    node_delay: Option<Duration>,
    /// Compare `status` broadcasts apart from the other frames (their interleaving with another
    /// client's prompt is a race in the capture itself): each subsequence in order, statuses by count.
    loose_status: bool,
    /// Files the capture had in input/ before it started.
    preload: Vec<(&'static str, Vec<u8>)>,
    /// The generation replayed against (0.38: the capture rewritten by [`to_newer`]).
    version: ComfyVersion,
}

async fn replay(name: &str, opts: Opts) {
    let mut trace = load(name);
    let mut skip = opts.skip.to_vec();
    if opts.version == ComfyVersion::V0_38 {
        skip.extend(to_newer(&mut trace));
    }
    let emu = start_version(opts.version).await;
    if let Some(d) = opts.node_delay {
        emu.faults().set_node_delay(d);
    }
    for (f, bytes) in &opts.preload {
        std::fs::write(emu.input_dir().join(f), bytes).expect("preload");
    }
    let root = emu.input_dir().parent().expect("root").display().to_string();
    let mut r = Replayer {
        emu,
        root,
        sockets: HashMap::new(),
        anonymous: Vec::new(),
        expected: HashMap::new(),
        ids: Vec::new(),
        last: None,
        skip,
        loose_status: opts.loose_status,
        failures: Vec::new(),
    };
    let events = trace.events;
    let mut last_ws_t = 0.0f64;
    for (i, ev) in events.iter().enumerate() {
        match ev {
            Event::WsOpen { ws, url } => {
                r.barrier().await;
                let client_id = url.split_once("clientId=").map(|(_, id)| id.to_string());
                if client_id.is_none() {
                    r.anonymous.push(ws.clone());
                }
                let sock = Ws::connect(&r.emu, client_id.as_deref()).await;
                r.sockets.insert(ws.clone(), sock);
            }
            Event::WsSend { ws, opcode, text } => {
                if opcode == "close" {
                    r.barrier().await;
                    if let Some(sock) = r.sockets.get_mut(ws) {
                        sock.send_close().await;
                    }
                } else if let (Some(t), Some(sock)) = (text, r.sockets.get_mut(ws)) {
                    sock.send_text(t).await;
                }
            }
            Event::WsRecv { seq, t_rel, ws, opcode, raw, decoded } => {
                last_ws_t = *t_rel;
                let frame = match opcode.as_str() {
                    "text" => ExpectedFrame::Json(
                        serde_json::from_str(raw.as_deref().unwrap_or("null")).expect("raw"),
                    ),
                    "close" => ExpectedFrame::Closed { clean: true },
                    _ => ExpectedFrame::Binary(decoded.clone().unwrap_or(Value::Null)),
                };
                r.expected.entry(ws.clone()).or_default().push(Expected { seq: *seq, frame });
            }
            Event::WsClosed { ws } => {
                r.expected
                    .entry(ws.clone())
                    .or_default()
                    .push(Expected { seq: 0, frame: ExpectedFrame::Closed { clean: false } });
            }
            Event::HttpRequest { seq, t_rel, method, path, headers, body } => {
                if opts.skip_requests.contains(seq) {
                    r.last = None;
                    continue;
                }
                if matches!(events.get(i + 1), Some(Event::HttpError {})) {
                    continue; // the capture's server was down; the emulator restarts instantly
                }
                r.barrier().await;
                // Reproduce the client's think time (capped), so e.g. an interrupt meant for the middle
                // of a node does not land in the microseconds between `executing` and the node's start.
                let gap = t_rel - last_ws_t;
                if gap >= 0.1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r.request(method, path, headers, body.as_ref()).await;
            }
            Event::HttpResponse { seq, status, headers, body } => {
                let learned = body
                    .as_ref()
                    .and_then(|b| b.json.as_ref())
                    .and_then(|j| j["prompt_id"].as_str())
                    .map(String::from);
                let actual_pid = r
                    .last
                    .as_ref()
                    .and_then(|(_, _, a)| serde_json::from_slice::<Value>(&a.body).ok())
                    .and_then(|j| j["prompt_id"].as_str().map(String::from));
                if let (Some(e), Some(a)) = (learned, actual_pid) {
                    r.learn(&e, &a);
                }
                r.check_response(*seq, *status, headers, body.as_ref()).await;
            }
            Event::Signal {} => {
                r.barrier().await;
                r.emu.restart().await;
            }
            Event::HttpError {} | Event::Other => {}
        }
    }
    r.barrier().await;
    r.compare_sockets();
    assert!(
        r.failures.is_empty(),
        "replay {} ({}) against {} differs:\n{}",
        trace.case,
        name,
        opts.version,
        r.failures.join("\n\n")
    );
}

/// Replays a capture against 0.3.64 as captured, then against 0.38 rewritten by [`to_newer`].
async fn replay_both(name: &str, opts: Opts) {
    for version in ComfyVersion::ALL {
        replay(name, Opts { version, ..opts.clone() }).await;
    }
}

#[tokio::test]
async fn replay_c1_load_invert_save() {
    // The capture uploaded its input before recording; rebuild it from the real server's inverted output.
    let trace = load("c1_load_invert_save");
    let out_b64 = trace
        .events
        .iter()
        .find_map(|e| match e {
            Event::HttpResponse { body: Some(RespBody { b64: Some(b), .. }), .. } => Some(b.clone()),
            _ => None,
        })
        .expect("the /view body");
    let out = base64::engine::general_purpose::STANDARD.decode(out_b64).expect("b64");
    let mut img = image::load_from_memory(&out).expect("png").to_rgb8();
    for px in img.pixels_mut() {
        for c in px.0.iter_mut() {
            *c = 255 - *c;
        }
    }
    let mut input = std::io::Cursor::new(Vec::new());
    img.write_to(&mut input, image::ImageFormat::Png).expect("png");
    replay_both(
        "c1_load_invert_save",
        Opts { preload: vec![("trace_c1_85c6c9.png", input.into_inner())], ..Opts::default() },
    )
    .await;
}

#[tokio::test]
async fn replay_c2_empty_blur_scale_save_preview() {
    replay_both("c2_empty_blur_scale_save_preview", Opts::default()).await;
}

#[tokio::test]
async fn replay_c3_progress_binary_legacy() {
    replay_both("c3_progress_binary_legacy", Opts::default()).await;
}

#[tokio::test]
async fn replay_c4_progress_binary_metadata() {
    replay_both("c4_progress_binary_metadata", Opts::default()).await;
}

#[tokio::test]
async fn replay_c5_text_frame_broadcast() {
    replay_both("c5_text_frame_broadcast", Opts::default()).await;
}

#[tokio::test]
async fn replay_d1_cached() {
    replay_both("d1_cached", Opts::default()).await;
}

#[tokio::test]
async fn replay_e1_validation_errors() {
    replay_both("e1_validation_errors", Opts::default()).await;
}

#[tokio::test]
async fn replay_e2_runtime_error() {
    replay_both("e2_runtime_error", Opts::default()).await;
}

#[tokio::test]
async fn replay_e4_queue_ops() {
    // seq 62: /history?max_items=2 lists a prompt from another captured case.
    replay_both(
        "e4_queue_ops",
        Opts { skip: &[62], node_delay: Some(Duration::from_millis(400)), ..Opts::default() },
    )
    .await;
}

#[tokio::test]
async fn replay_f1_multi_client() {
    replay_both(
        "f1_multi_client",
        Opts { node_delay: Some(Duration::from_millis(300)), loose_status: true, ..Opts::default() },
    )
    .await;
}

#[tokio::test]
async fn replay_f2_reconnect_same_client_id() {
    replay_both(
        "f2_reconnect_same_client_id",
        Opts { node_delay: Some(Duration::from_millis(200)), ..Opts::default() },
    )
    .await;
}

#[tokio::test]
async fn replay_g_logs() {
    replay_both("g_logs", Opts { skip: &[35], ..Opts::default() }).await;
}

#[tokio::test]
async fn replay_e5_server_stop() {
    replay_both("e5_server_stop", Opts { node_delay: Some(Duration::from_millis(300)), ..Opts::default() })
        .await;
}

#[tokio::test]
async fn replay_b_upload() {
    replay_both("b_upload", Opts::default()).await;
}

#[tokio::test]
async fn replay_a_http_gets() {
    // Not emulated byte for byte: folder paths and file listings of the captured machine, the model
    // browser, /extensions, the full 496-class /object_info and the frontend's index.html.
    replay_both("a_http_gets", Opts { skip: &[23, 29, 31, 49, 53, 75, 78], ..Opts::default() }).await;
}

#[tokio::test]
async fn replay_e3_interrupt() {
    // seq 35: the capture's global interrupt reached aiohttp only after the worker had passed its last
    // check (the event loop was busy streaming previews), so the prompt succeeded; sending nothing is
    // the equivalent here.
    replay_both(
        "e3_interrupt",
        Opts { skip_requests: &[35], node_delay: Some(Duration::from_millis(500)), ..Opts::default() },
    )
    .await;
}

#[tokio::test]
async fn replay_h_timing() {
    replay_both("h_timing", Opts::default()).await;
}
