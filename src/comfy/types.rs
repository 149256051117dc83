//! Plain data exchanged with ComfyUI's HTTP API: options, upload/queue/history/download records,
//! and the parsers that turn ComfyUI's loosely shaped JSON into them.
//!
//! Owns no I/O. Knows nothing about the WebSocket session.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::error::{ComfyError, NodeError};

/// Tuning for a [`super::ComfyClient`] and its [`super::ComfyConnection`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Deadline of every HTTP request (headers and body; for downloads: headers and each chunk) and of the
    /// WebSocket handshake.
    pub request_timeout: Duration,
    /// Retries after the first attempt for retryable failures (transport, timeout, 5xx, 429).
    pub max_retries: u32,
    /// With no frame for this long, the connection sends a WebSocket ping; no answer within
    /// [`ClientOptions::probe_timeout`] means the socket is half-dead and is replaced.
    pub idle_probe: Duration,
    /// How long to wait for the answer to an idle probe.
    pub probe_timeout: Duration,
    /// An in-flight prompt with no event for this long is reconciled from /queue then /history
    /// (cheap; detects prompts that vanished while the socket stayed healthy).
    pub silence_reconcile: Duration,
    /// Poll interval for prompts whose events can no longer reach this connection (submitted under an
    /// earlier clientId, see [`super::ComfyConnection`]).
    pub orphan_poll: Duration,
    /// First delay between retries and reconnects (doubles, with jitter).
    pub backoff_min: Duration,
    /// Cap of the retry/reconnect delay.
    pub backoff_max: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            max_retries: 4,
            idle_probe: Duration::from_secs(15),
            probe_timeout: Duration::from_secs(5),
            silence_reconcile: Duration::from_secs(30),
            orphan_poll: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// A file ComfyUI stored from `/upload/image`. `name` is what ComfyUI answered with, which can differ
/// from the name sent (`x (1).png`): always use this one in the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedFile {
    /// Stored file name.
    pub name: String,
    /// Subfolder (usually empty).
    pub subfolder: String,
    /// Folder type: `input`, `temp` or `output`.
    pub kind: String,
}

/// A prompt to queue.
#[derive(Debug, Clone)]
pub struct QueuePrompt {
    /// Our own id (a UUID), chosen before submission so early events can be attributed.
    pub prompt_id: String,
    /// The API-format graph.
    pub graph: Value,
    /// The clientId of the WebSocket that must receive the prompt's events.
    pub client_id: String,
}

/// ComfyUI's answer to a queued prompt.
///
/// ComfyUI accepts a graph when at least one output node validates: the answer is then a 200 *with*
/// `node_errors`, and only the valid outputs run (partial validation). `dropped_outputs` names the requested
/// outputs that will not run; a job must not be reported as a plain success while any is listed.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedPrompt {
    /// The prompt id (ours).
    pub prompt_id: String,
    /// ComfyUI's queue number (negative for `front`, can be a float when set explicitly).
    pub number: f64,
    /// Validation problems of the nodes whose outputs were dropped (partial validity, HTTP 200), flattened.
    pub node_errors: Vec<NodeError>,
    /// The output nodes of the graph that ComfyUI will not run, sorted by node id; empty when every output
    /// validated.
    pub dropped_outputs: Vec<DroppedOutput>,
    /// The answer to `POST /prompt` was lost and the prompt was found queued (or already finished) by a
    /// lookup instead of being sent again. `node_errors` are then unknown (empty); `dropped_outputs` was
    /// derived from the outputs ComfyUI's queue or history says it runs, when that could be read.
    pub recovered: bool,
}

impl QueuedPrompt {
    /// True when ComfyUI accepted the graph but will not run some of its outputs.
    pub fn is_partial(&self) -> bool {
        !self.dropped_outputs.is_empty()
    }
}

/// A requested output node that will not run because it (or a node it depends on) failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedOutput {
    /// The output node's id.
    pub node_id: String,
    /// Its class (from the graph).
    pub class_type: String,
    /// The validation problems that dropped it (they can be on upstream nodes); empty when recovered.
    pub errors: Vec<NodeError>,
}

/// Where ComfyUI has a prompt right now.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptState {
    /// Waiting in ComfyUI's queue.
    Pending,
    /// Being executed.
    Running,
    /// In history: it ended.
    Finished(HistoryStatus),
    /// Neither queued, running nor in history (never queued, or the server restarted).
    Unknown,
}

impl PromptState {
    /// Pending or running.
    pub fn is_active(&self) -> bool {
        matches!(self, PromptState::Pending | PromptState::Running)
    }
}

/// A prompt ComfyUI knows, as a lookup found it.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundPrompt {
    /// Its queue number (priority).
    pub number: f64,
    /// Where it is.
    pub state: PromptState,
    /// The output nodes ComfyUI runs for it (`outputs_to_execute`), when the queue or history was read.
    pub outputs_to_execute: Option<Vec<String>>,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was pending and was removed from the queue: it will never run.
    Dequeued,
    /// It was running and an interrupt was signalled for it. ComfyUI honours interrupts only between
    /// steps, so it ends later, or never for a node that ignores them: check with `prompt_state`.
    Interrupted,
    /// Neither pending nor running (it already ended, or ComfyUI never had it): nothing was done.
    NotActive,
}

/// The ids in ComfyUI's queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// The running prompt (at most one on stock ComfyUI).
    pub running: Vec<String>,
    /// Pending prompts, in ComfyUI's heap order (not sorted).
    pub pending: Vec<String>,
}

impl QueueSnapshot {
    /// True if the prompt is running or pending.
    pub fn contains(&self, prompt_id: &str) -> bool {
        self.running.iter().chain(&self.pending).any(|p| p == prompt_id)
    }

    pub(crate) fn parse(v: &Value) -> Result<Self, ComfyError> {
        let ids = |key: &str| -> Result<Vec<String>, ComfyError> {
            let items = v
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| ComfyError::Protocol(format!("/queue answer has no `{key}` list")))?;
            Ok(items.iter().filter_map(queue_item_id).collect())
        };
        Ok(Self { running: ids("queue_running")?, pending: ids("queue_pending")? })
    }
}

/// `(number, outputs_to_execute)` of `prompt_id` in a `/queue` answer, and whether it is the running one.
pub(crate) fn queue_item(v: &Value, prompt_id: &str) -> Option<(f64, Option<Vec<String>>, bool)> {
    for (key, running) in [("queue_running", true), ("queue_pending", false)] {
        for item in v.get(key).and_then(Value::as_array).into_iter().flatten() {
            if queue_item_id(item).as_deref() == Some(prompt_id) {
                return Some((
                    item.get(0).and_then(Value::as_f64).unwrap_or(f64::NAN),
                    outputs_list(item.get(4)),
                    running,
                ));
            }
        }
    }
    None
}

pub(crate) fn outputs_list(v: Option<&Value>) -> Option<Vec<String>> {
    v.and_then(Value::as_array).map(|a| a.iter().map(value_to_string).collect())
}

/// A queue item is `[number, prompt_id, prompt, extra_data, outputs]`; newer builds may use objects.
fn queue_item_id(item: &Value) -> Option<String> {
    match item {
        Value::Array(a) => a.get(1).and_then(Value::as_str).map(str::to_owned),
        Value::Object(o) => {
            o.get("prompt_id").or_else(|| o.get("id")).and_then(Value::as_str).map(str::to_owned)
        }
        _ => None,
    }
}

/// An `execution_error`, as sent over the WebSocket or stored in history.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionError {
    /// The failing node.
    pub node_id: String,
    /// Its class.
    pub node_type: String,
    /// Python exception type (`PIL.UnidentifiedImageError`, `ExecutionBlocked`, ...).
    pub exception_type: String,
    /// Exception message.
    pub exception_message: String,
    /// Traceback lines.
    pub traceback: Vec<String>,
}

impl ExecutionError {
    pub(crate) fn from_data(data: &Value) -> Self {
        let s = |k: &str| data.get(k).map(value_to_string).unwrap_or_default();
        Self {
            node_id: s("node_id"),
            node_type: s("node_type"),
            exception_type: s("exception_type"),
            exception_message: s("exception_message"),
            traceback: data
                .get("traceback")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(value_to_string).collect())
                .unwrap_or_default(),
        }
    }
}

pub(crate) fn value_to_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// How a prompt in history ended.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryStatus {
    /// `status_str: "success"`.
    Success,
    /// `status_str: "error"` with an `execution_error` message.
    Failed(ExecutionError),
    /// Interrupted (`status_str: "error"`, `completed: false`, an `execution_interrupted` message).
    Interrupted {
        /// The node that was interrupted.
        node_id: Option<String>,
        /// Its class.
        node_type: Option<String>,
    },
    /// An entry without a final status (not written by stock ComfyUI; treated as still running).
    Incomplete,
}

/// One `/history/{id}` entry (or the same read from a `/api/jobs/{id}` detail).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// The prompt id.
    pub prompt_id: String,
    /// Outcome.
    pub status: HistoryStatus,
    /// `status.completed`.
    pub completed: bool,
    /// UI outputs per output node (`{"images": [{filename, subfolder, type}]}`).
    pub outputs: BTreeMap<String, Value>,
    /// `status.messages` as `(type, data)` pairs.
    pub messages: Vec<(String, Value)>,
}

impl HistoryEntry {
    /// Reads a finished job's `/api/jobs/{id}` detail (`outputs` + `execution_status`, which is the history
    /// entry's `status`). `None` while the job is still pending or running.
    pub(crate) fn from_job(prompt_id: &str, job: &Value) -> Result<Option<Self>, ComfyError> {
        match job.get("status").and_then(Value::as_str) {
            Some("pending" | "in_progress") => return Ok(None),
            Some(_) => {}
            None => return Err(ComfyError::Protocol(format!("job {prompt_id} has no status"))),
        }
        let mut entry = serde_json::Map::new();
        entry.insert("outputs".into(), job.get("outputs").cloned().unwrap_or_else(|| serde_json::json!({})));
        let status = job.get("execution_status").cloned().unwrap_or(Value::Null);
        // `normalize_history_item`: history without a status counts as completed.
        let status = if status.is_object() {
            status
        } else {
            serde_json::json!({"status_str": "success", "completed": true, "messages": []})
        };
        entry.insert("status".into(), status);
        Self::parse(prompt_id, &Value::Object(entry)).map(Some)
    }

    /// Parses the value under the prompt id in a `/history/{id}` answer.
    pub(crate) fn parse(prompt_id: &str, v: &Value) -> Result<Self, ComfyError> {
        if !v.is_object() {
            return Err(ComfyError::Protocol(format!("history entry for {prompt_id} is not an object")));
        }
        let outputs = v
            .get("outputs")
            .and_then(Value::as_object)
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let status = v.get("status").filter(|s| s.is_object());
        let messages: Vec<(String, Value)> = status
            .and_then(|s| s.get("messages"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        let pair = m.as_array()?;
                        Some((
                            pair.first()?.as_str()?.to_owned(),
                            pair.get(1).cloned().unwrap_or(Value::Null),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let completed = status.and_then(|s| s.get("completed")).and_then(Value::as_bool).unwrap_or(false);
        let status_str = status.and_then(|s| s.get("status_str")).and_then(Value::as_str);
        let find = |kind: &str| messages.iter().find(|(k, _)| k == kind).map(|(_, d)| d);
        let status = match status_str {
            Some("success") => HistoryStatus::Success,
            Some(_) => {
                if let Some(d) = find("execution_error") {
                    HistoryStatus::Failed(ExecutionError::from_data(d))
                } else if let Some(d) = find("execution_interrupted") {
                    HistoryStatus::Interrupted {
                        node_id: d.get("node_id").and_then(Value::as_str).map(str::to_owned),
                        node_type: d.get("node_type").and_then(Value::as_str).map(str::to_owned),
                    }
                } else if completed {
                    HistoryStatus::Success
                } else {
                    HistoryStatus::Failed(ExecutionError {
                        node_id: String::new(),
                        node_type: String::new(),
                        exception_type: "unknown".to_owned(),
                        exception_message: format!(
                            "ComfyUI recorded status {:?} without an error message",
                            status_str.unwrap_or_default()
                        ),
                        traceback: Vec::new(),
                    })
                }
            }
            None => HistoryStatus::Incomplete,
        };
        Ok(Self { prompt_id: prompt_id.to_owned(), status, completed, outputs, messages })
    }
}

/// A file to download with `/view`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// File name.
    pub filename: String,
    /// Subfolder (may be empty).
    pub subfolder: String,
    /// `output`, `temp` or `input`.
    pub kind: String,
}

impl FileRef {
    /// Every file listed in an `executed` output / history output (`images`, `gifs`, `audio`, ... lists of
    /// `{filename, subfolder, type}`), in order.
    pub fn from_output(output: &Value) -> Vec<FileRef> {
        let Some(map) = output.as_object() else { return Vec::new() };
        map.values()
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(|item| {
                Some(FileRef {
                    filename: item.get("filename")?.as_str()?.to_owned(),
                    subfolder: item.get("subfolder").and_then(Value::as_str).unwrap_or_default().to_owned(),
                    kind: item.get("type").and_then(Value::as_str).unwrap_or("output").to_owned(),
                })
            })
            .collect()
    }
}

/// What a finished download looked like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Bytes written to the sink.
    pub size: u64,
    /// Lowercase hex sha256 of those bytes.
    pub sha256: String,
    /// `image/png`, `image/jpeg` or `image/webp`, from the file's signature (not the Content-Type).
    pub mime: String,
    /// Width in pixels, from the image header.
    pub width: u32,
    /// Height in pixels, from the image header.
    pub height: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn queue_shapes() {
        let v = json!({"queue_running": [[33, "b503", {}, {"client_id": "c"}, ["9"]]],
                       "queue_pending": [[-100.0, "p1", {}, {}, []], [36, "p2", {}, {}, []]]});
        let q = QueueSnapshot::parse(&v).unwrap();
        assert_eq!(q.running, vec!["b503"]);
        assert_eq!(q.pending, vec!["p1", "p2"]);
        assert!(q.contains("p2") && !q.contains("zz"));
        assert!(QueueSnapshot::parse(&json!({})).is_err());
    }

    #[test]
    fn history_success_error_interrupted() {
        let ok = json!({"prompt": [1, "a", {}, {}, ["3"]], "outputs": {"3": {"images": [{"filename": "x.png", "subfolder": "", "type": "output"}]}},
            "status": {"status_str": "success", "completed": true, "messages": [["execution_start", {"prompt_id": "a"}], ["execution_success", {"prompt_id": "a"}]]}});
        let e = HistoryEntry::parse("a", &ok).unwrap();
        assert_eq!(e.status, HistoryStatus::Success);
        assert_eq!(FileRef::from_output(&e.outputs["3"])[0].filename, "x.png");

        let err = json!({"outputs": {}, "status": {"status_str": "error", "completed": false, "messages": [
            ["execution_error", {"prompt_id": "b", "node_id": "1", "node_type": "LoadImage", "exception_message": "cannot identify image file\n", "exception_type": "PIL.UnidentifiedImageError", "traceback": ["  File x"]}]]}});
        let HistoryStatus::Failed(f) = HistoryEntry::parse("b", &err).unwrap().status else { panic!() };
        assert_eq!(f.node_type, "LoadImage");
        assert_eq!(f.traceback.len(), 1);

        let int = json!({"outputs": {}, "status": {"status_str": "error", "completed": false, "messages": [
            ["execution_interrupted", {"prompt_id": "c", "node_id": "11", "node_type": "ImageBlur", "executed": ["1"]}]]}});
        assert_eq!(
            HistoryEntry::parse("c", &int).unwrap().status,
            HistoryStatus::Interrupted { node_id: Some("11".into()), node_type: Some("ImageBlur".into()) }
        );
        assert_eq!(
            HistoryEntry::parse("d", &json!({"outputs": {}})).unwrap().status,
            HistoryStatus::Incomplete
        );
    }
}
