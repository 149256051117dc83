//! The emulator's shared state: the prompt queue (a CPython-`heapq`-exact min-heap, so `/queue` shows the
//! same raw heap order), the running slot, history, output cache, and the socket table with ComfyUI's
//! routing rules (`send_sync(event, data, sid)`: a sid that is not registered gets nothing; `None`
//! broadcasts). Everything here is synchronous and guarded by one `std::sync::Mutex`, never held across
//! an `.await`. Knows nothing about HTTP routing or how nodes run.

use super::ComfyVersion;
use super::faults::Faults;
use super::nodes::{Dirs, NodeValue};
use super::pyjson;
use bytes::Bytes;
use indexmap::IndexMap;
use serde_json::{Map, Value, json};
use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Mutex, MutexGuard};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Entries kept for `/internal/logs` (ComfyUI's `logger` ring buffer).
const MAX_LOG_ENTRIES: usize = 300;

/// The most history entries ComfyUI keeps.
const MAX_HISTORY: usize = 10_000;

/// A frame queued for one socket.
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    Text(String),
    Binary(Bytes),
}

/// A registered WebSocket (`PromptServer.sockets[sid]` + `sockets_metadata[sid]`).
#[derive(Debug)]
pub(crate) struct SocketEntry {
    pub(crate) conn_id: u64,
    pub(crate) tx: mpsc::UnboundedSender<Outgoing>,
    pub(crate) feature_flags: Value,
    pub(crate) kill: CancellationToken,
}

/// `number` as ComfyUI keeps it: the server counter (int) or a client-given value (`float()`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    pub(crate) fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    pub(crate) fn to_json(self) -> Value {
        match self {
            Num::Int(i) => json!(i),
            Num::Float(f) => json!(f),
        }
    }
}

/// `(number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive)`.
#[derive(Debug, Clone)]
pub(crate) struct QueueItem {
    pub(crate) number: Num,
    pub(crate) prompt_id: String,
    pub(crate) prompt: Value,
    pub(crate) extra_data: Map<String, Value>,
    pub(crate) outputs: Vec<String>,
}

impl QueueItem {
    /// The first five tuple members, as `/queue` and `/history` show them.
    pub(crate) fn to_json(&self) -> Value {
        json!([self.number.to_json(), self.prompt_id, self.prompt, self.extra_data, self.outputs])
    }

    /// The client id the worker routes by (`extra_data["client_id"]`).
    pub(crate) fn client_id(&self) -> Option<String> {
        self.extra_data.get("client_id").map(pyjson::py_str)
    }

    fn cmp_key(&self, other: &Self) -> Ordering {
        self.number
            .as_f64()
            .partial_cmp(&other.number.as_f64())
            .unwrap_or(Ordering::Equal)
            .then_with(|| self.prompt_id.cmp(&other.prompt_id))
    }
}

/// CPython's `heapq`, reproduced so the raw pending order matches.
pub(crate) mod heap {
    use super::QueueItem;
    use std::cmp::Ordering;

    fn less(a: &QueueItem, b: &QueueItem) -> bool {
        a.cmp_key(b) == Ordering::Less
    }

    fn sift_down(heap: &mut [QueueItem], startpos: usize, mut pos: usize) {
        while pos > startpos {
            let parentpos = (pos - 1) >> 1;
            if less(&heap[pos], &heap[parentpos]) {
                heap.swap(pos, parentpos);
                pos = parentpos;
            } else {
                break;
            }
        }
    }

    fn sift_up(heap: &mut [QueueItem], mut pos: usize) {
        let endpos = heap.len();
        let startpos = pos;
        let mut childpos = 2 * pos + 1;
        while childpos < endpos {
            let rightpos = childpos + 1;
            if rightpos < endpos && !less(&heap[childpos], &heap[rightpos]) {
                childpos = rightpos;
            }
            heap.swap(pos, childpos);
            pos = childpos;
            childpos = 2 * pos + 1;
        }
        sift_down(heap, startpos, pos);
    }

    pub(crate) fn push(heap: &mut Vec<QueueItem>, item: QueueItem) {
        heap.push(item);
        let last = heap.len() - 1;
        sift_down(heap, 0, last);
    }

    pub(crate) fn pop(heap: &mut Vec<QueueItem>) -> Option<QueueItem> {
        let last = heap.pop()?;
        if heap.is_empty() {
            return Some(last);
        }
        let top = std::mem::replace(&mut heap[0], last);
        sift_up(heap, 0);
        Some(top)
    }

    pub(crate) fn heapify(heap: &mut [QueueItem]) {
        for i in (0..heap.len() / 2).rev() {
            sift_up(heap, i);
        }
    }
}

/// One cached node result, keyed by input signature.
#[derive(Debug, Clone)]
pub(crate) struct CacheEntry {
    pub(crate) outputs: Vec<NodeValue>,
    pub(crate) ui: Option<Value>,
}

/// Everything behind the lock.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// Bumped by `restart`/`shutdown`: an execution from an older epoch must not emit anything.
    pub(crate) epoch: u64,
    pub(crate) number: i64,
    pub(crate) queue: Vec<QueueItem>,
    pub(crate) running: Option<QueueItem>,
    pub(crate) history: IndexMap<String, Value>,
    pub(crate) sockets: HashMap<String, SocketEntry>,
    /// `PromptServer.client_id`: the running (or last run) prompt's client.
    pub(crate) client_id: Option<String>,
    /// `PromptServer.last_node_id`: set while a node of a client prompt executes.
    pub(crate) last_node_id: Option<String>,
    pub(crate) cache: HashMap<String, CacheEntry>,
    /// PreviewImage's per-node random prefix part (`caches.objects`).
    pub(crate) temp_suffixes: HashMap<String, String>,
    pub(crate) log_subscribers: Vec<String>,
    pub(crate) log_size_sent: bool,
    /// The terminal log (`/internal/logs`), newest last, bounded like ComfyUI's 300-entry ring.
    pub(crate) log_entries: std::collections::VecDeque<Value>,
    pub(crate) next_conn_id: u64,
    /// Prompts per id: how often `POST /prompt` named it, and how often it was queued (ComfyUI has no
    /// duplicate check, so a blind retry shows up here as 2).
    pub(crate) counters: Counters,
    /// The asset registry (0.38: assets are on by default).
    pub(crate) assets: Vec<Asset>,
    /// The asset seeder ran (`ensure_scan_started` on the first `/object_info`).
    pub(crate) seeded: bool,
    /// Node replacements registered beyond the built-in ones (as a custom node pack would), in
    /// `NodeReplace.as_dict()` form.
    pub(crate) extra_replacements: Vec<Value>,
}

/// What tests count (see [`super::ComfyEmulator::queued_times`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) posted: IndexMap<String, usize>,
    pub(crate) queued: IndexMap<String, usize>,
    pub(crate) queued_total: usize,
    pub(crate) frees: usize,
}

/// One registered asset (`AssetReference` + its content): an upload or a saved output.
#[derive(Debug, Clone)]
pub(crate) struct Asset {
    pub(crate) id: String,
    pub(crate) name: String,
    /// `blake3:<hex>`.
    pub(crate) hash: String,
    pub(crate) size: u64,
    pub(crate) mime_type: String,
    pub(crate) tags: Vec<String>,
    pub(crate) path: std::path::PathBuf,
    pub(crate) created_at: String,
}

impl State {
    /// `get_tasks_remaining`.
    pub(crate) fn tasks_remaining(&self) -> usize {
        self.queue.len() + usize::from(self.running.is_some())
    }

    /// `{"exec_info": {"queue_remaining": n}}`.
    pub(crate) fn queue_info(&self) -> Value {
        json!({"exec_info": {"queue_remaining": self.tasks_remaining()}})
    }

    /// `send_sync(event, data, sid)` for JSON messages.
    pub(crate) fn send_json(&mut self, faults: &Faults, event: &str, data: Value, sid: Option<&str>) {
        let text = pyjson::dumps(&json!({"type": event, "data": data}));
        self.send(faults, Outgoing::Text(text), sid);
    }

    /// `send_sync` for a binary frame (`[u32 type][payload]`).
    pub(crate) fn send_binary(&mut self, faults: &Faults, frame: Bytes, sid: Option<&str>) {
        if !faults.is_silent() {
            faults.note_binary_sent();
        }
        self.send(faults, Outgoing::Binary(frame), sid);
    }

    fn send(&mut self, faults: &Faults, msg: Outgoing, sid: Option<&str>) {
        if faults.is_silent() {
            return;
        }
        let targets: Vec<&SocketEntry> = match sid {
            None => self.sockets.values().collect(),
            Some(sid) => self.sockets.get(sid).into_iter().collect(),
        };
        for entry in targets {
            if entry.kill.is_cancelled() {
                continue;
            }
            if entry.tx.send(msg.clone()).is_ok() {
                faults.note_sent();
            }
        }
    }

    /// `PromptQueue.delete_queue_item` for one id: removes it from the pending heap (never the running
    /// prompt) and broadcasts the queue size; returns whether it was pending.
    pub(crate) fn delete_pending(&mut self, faults: &Faults, prompt_id: &str) -> bool {
        let Some(pos) = self.queue.iter().position(|i| i.prompt_id == prompt_id) else { return false };
        if self.queue.len() == 1 {
            // `wipe_queue()` broadcasts too: two status messages, as captured in e4.
            self.queue.clear();
            self.queue_updated(faults);
        } else {
            self.queue.remove(pos);
            heap::heapify(&mut self.queue);
        }
        self.queue_updated(faults);
        true
    }

    /// `queue_updated()`: broadcast the queue size.
    pub(crate) fn queue_updated(&mut self, faults: &Faults) {
        let info = self.queue_info();
        self.send_json(faults, "status", json!({"status": info}), None);
    }

    /// Whether the socket registered under `sid` negotiated `supports_preview_metadata`.
    pub(crate) fn supports_preview_metadata(&self, sid: Option<&str>) -> bool {
        sid.and_then(|s| self.sockets.get(s))
            .and_then(|e| e.feature_flags.get("supports_preview_metadata"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// `task_done`: moves the running prompt to history and broadcasts the queue size.
    pub(crate) fn task_done(&mut self, faults: &Faults, entry_extra: Value) {
        if let Some(item) = self.running.take() {
            if self.history.len() > MAX_HISTORY {
                self.history.shift_remove_index(0);
            }
            let mut entry = Map::new();
            entry.insert("prompt".into(), item.to_json());
            entry.insert("outputs".into(), json!({}));
            if let Value::Object(extra) = entry_extra {
                for (k, v) in extra {
                    entry.insert(k, v);
                }
            }
            self.history.insert(item.prompt_id.clone(), Value::Object(entry));
        }
        self.queue_updated(faults);
    }

    /// Sends a `logs` message to every subscribed client.
    pub(crate) fn log(&mut self, faults: &Faults, message: &str) {
        let t = httpdate_iso(std::time::SystemTime::now());
        let entry = json!({"t": t, "m": format!("{message}\n")});
        if self.log_entries.len() >= MAX_LOG_ENTRIES {
            self.log_entries.pop_front();
        }
        self.log_entries.push_back(entry.clone());
        if self.log_subscribers.is_empty() {
            return;
        }
        let size = if self.log_size_sent { Value::Null } else { json!({"cols": 80, "rows": 24}) };
        self.log_size_sent = true;
        let data = json!({"entries": [entry], "size": size});
        for sid in self.log_subscribers.clone() {
            self.send_json(faults, "logs", data.clone(), Some(&sid));
        }
    }
}

/// `datetime.now().isoformat()` in UTC (the emulator has no local time zone database).
pub(crate) fn httpdate_iso(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Howard Hinnant's days-to-civil conversion.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// What the server task, the worker and the socket tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) dirs: Dirs,
    pub(crate) faults: Faults,
    pub(crate) state: Mutex<State>,
    /// Wakes the worker when a prompt is queued.
    pub(crate) work: Notify,
    /// `nodes.interrupt_processing()` flag.
    pub(crate) interrupt: AtomicBool,
    /// Fired by restart/shutdown so the worker stops waiting for an abandoned execution.
    pub(crate) restarted: Notify,
    /// The generation reproduced.
    pub(crate) version: ComfyVersion,
    /// Bumped by every `/free` that unloads models or frees memory (releases wedged nodes).
    pub(crate) frees: AtomicU64,
}

impl Shared {
    pub(crate) fn new(dirs: Dirs, version: ComfyVersion) -> Self {
        Shared {
            dirs,
            faults: Faults::new(),
            state: Mutex::new(State::default()),
            work: Notify::new(),
            interrupt: AtomicBool::new(false),
            restarted: Notify::new(),
            version,
            frees: AtomicU64::new(0),
        }
    }

    /// Whether the 0.38 behaviour applies.
    pub(crate) fn newer(&self) -> bool {
        self.version == ComfyVersion::V0_38
    }

    /// Locks the state; a poisoned lock is recovered (state stays consistent per operation).
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Milliseconds since the epoch, like `int(time.time() * 1000)`.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(number: Num, id: &str) -> QueueItem {
        QueueItem { number, prompt_id: id.into(), prompt: json!({}), extra_data: Map::new(), outputs: vec![] }
    }

    #[test]
    fn heap_order_matches_cpython_e4() {
        // e4 pushes 30, 31, 32, -33 (front), -100.0 (explicit), 34: CPython's raw heap order follows.
        let mut h = Vec::new();
        for (n, id) in [(Num::Int(30), "a"), (Num::Int(31), "b"), (Num::Int(32), "c"), (Num::Int(-33), "d")] {
            heap::push(&mut h, item(n, id));
        }
        heap::push(&mut h, item(Num::Float(-100.0), "e"));
        heap::push(&mut h, item(Num::Int(34), "f"));
        let order: Vec<f64> = h.iter().map(|i| i.number.as_f64()).collect();
        assert_eq!(order, vec![-100.0, -33.0, 32.0, 31.0, 30.0, 34.0]);
        let popped: Vec<f64> = std::iter::from_fn(|| heap::pop(&mut h)).map(|i| i.number.as_f64()).collect();
        assert_eq!(popped, vec![-100.0, -33.0, 30.0, 31.0, 32.0, 34.0]);
    }
}
