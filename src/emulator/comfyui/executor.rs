//! The prompt worker and `PromptExecutor.execute` re-implemented: ComfyUI's execution order
//! (`ExecutionList` with `ux_friendly_pick_node`), input-signature output caching, the progress registry
//! (`progress_state` accumulation), and the exact message sequence and routing of 0.3.64. Runs one prompt
//! at a time on a blocking thread; every emission re-checks the state epoch so a restarted emulator
//! abandons the prompt silently. Also: `ExecutionBlocker` propagation (a non-terminal `execution_error`
//! with `ExecutionBlocked`), the 0.38 `activity` field of `progress_state`, and the wedged-node fault.
//! Knows nothing about HTTP.

use super::faults::{Faults, Wedge};
use super::frames;
use super::nodes::{self, Dirs, NodeContext, NodeFailure, NodeValue};
use super::pyjson::{self, py_str};
use super::state::{CacheEntry, QueueItem, Shared, State, heap, now_ms};
use indexmap::IndexMap;
use rand::Rng;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Frames common to every node failure's traceback (captured in e2).
const TB_COMMON: [&str; 4] = [
    "  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n",
    "  File \"/opt/ComfyUI/execution.py\", line 315, in get_output_data\n    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n",
    "  File \"/opt/ComfyUI/execution.py\", line 289, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n",
    "  File \"/opt/ComfyUI/execution.py\", line 277, in process_inputs\n    result = f(**inputs)\n             ^^^^^^^^^^^\n",
];

/// The worker loop (`prompt_worker`): takes one prompt at a time and runs it on a blocking thread.
///
/// Exit policy: returns when `cancel` fires; a panicking execution is logged and the loop continues.
pub(crate) async fn worker(shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let notified = shared.work.notified();
        match take_next(&shared) {
            Some((item, epoch)) => {
                let s = shared.clone();
                let prompt_id = item.prompt_id.clone();
                let restarted = shared.restarted.notified();
                let span = tracing::debug_span!("comfyui_emulator_prompt", prompt_id = %prompt_id);
                let job = tokio::task::spawn_blocking(move || span.in_scope(|| run_prompt(&s, item, epoch)));
                tokio::select! {
                    res = job => {
                        if let Err(e) = res {
                            tracing::error!(error = %e, %prompt_id, "emulated execution panicked");
                        }
                    }
                    // The abandoned execution finishes on its own and emits nothing more.
                    () = restarted => {}
                    () = cancel.cancelled() => return,
                }
            }
            None => {
                tokio::select! {
                    () = notified => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}

/// Spawns the worker with its span.
pub(crate) fn spawn_worker(shared: Arc<Shared>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(worker(shared, cancel).instrument(tracing::info_span!("comfyui_emulator_worker")))
}

/// `PromptQueue.get`: pops the heap into the running slot and broadcasts the queue size.
fn take_next(shared: &Shared) -> Option<(QueueItem, u64)> {
    if shared.faults.is_queue_held() {
        return None;
    }
    let mut st = shared.lock();
    loop {
        let item = heap::pop(&mut st.queue)?;
        if shared.faults.take_vanish() {
            tracing::debug!(prompt_id = %item.prompt_id, "fault: prompt vanishes");
            continue;
        }
        st.running = Some(item.clone());
        st.client_id = item.client_id();
        st.queue_updated(&shared.faults);
        return Some((item, st.epoch));
    }
}

#[derive(Debug, Clone, PartialEq)]
enum NodeState {
    Pending,
    Running,
    Finished,
}

#[derive(Debug, Clone)]
struct Progress {
    state: NodeState,
    value: Value,
    max: Value,
    /// 0.38: what a running node spends its time on (`"loading"`).
    activity: Option<String>,
}

/// ComfyUI's `ExecutionList` (a topological sort with a UX-friendly pick).
struct ExecList<'p> {
    prompt: &'p Map<String, Value>,
    pending: Vec<String>,
    block_count: HashMap<String, usize>,
    blocking: HashMap<String, Vec<String>>,
}

/// `is_link`: `[str, int|float]`.
fn as_link(v: &Value) -> Option<(&str, i64)> {
    let a = v.as_array()?;
    if a.len() != 2 {
        return None;
    }
    let from = a[0].as_str()?;
    let socket = a[1].as_i64().or_else(|| a[1].as_f64().map(|f| f as i64))?;
    Some((from, socket))
}

fn class_of(prompt: &Map<String, Value>, id: &str) -> String {
    prompt.get(id).and_then(|n| n.get("class_type")).map(py_str).unwrap_or_default()
}

fn inputs_of<'a>(prompt: &'a Map<String, Value>, id: &str) -> Option<&'a Map<String, Value>> {
    prompt.get(id).and_then(|n| n.get("inputs")).and_then(Value::as_object)
}

impl<'p> ExecList<'p> {
    fn new(prompt: &'p Map<String, Value>) -> Self {
        ExecList { prompt, pending: Vec::new(), block_count: HashMap::new(), blocking: HashMap::new() }
    }

    fn add_node(&mut self, root: &str, cached: &HashSet<String>) {
        let mut stack = vec![root.to_string()];
        let mut links = Vec::new();
        while let Some(id) = stack.pop() {
            if self.pending.contains(&id) {
                continue;
            }
            self.pending.push(id.clone());
            self.block_count.insert(id.clone(), 0);
            self.blocking.insert(id.clone(), Vec::new());
            if let Some(inputs) = inputs_of(self.prompt, &id) {
                for value in inputs.values() {
                    if let Some((from, _)) = as_link(value) {
                        if !cached.contains(from) {
                            stack.push(from.to_string());
                        }
                        links.push((from.to_string(), id.clone()));
                    }
                }
            }
        }
        for (from, to) in links {
            if cached.contains(&from) || !self.prompt.contains_key(&from) {
                continue;
            }
            let blocked = self.blocking.entry(from).or_default();
            if !blocked.contains(&to) {
                blocked.push(to.clone());
                *self.block_count.entry(to).or_default() += 1;
            }
        }
    }

    fn is_output(&self, id: &str) -> bool {
        nodes::traits(&class_of(self.prompt, id)).is_some_and(|t| t.output_node)
    }

    fn blocks(&self, id: &str) -> &[String] {
        self.blocking.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// `stage_node_execution` + `ux_friendly_pick_node`; `None` when done (or stuck on a cycle).
    fn stage(&self) -> Option<String> {
        let ready: Vec<&String> =
            self.pending.iter().filter(|id| self.block_count.get(*id).copied().unwrap_or(0) == 0).collect();
        if let Some(id) = ready.iter().find(|id| self.is_output(id)) {
            return Some((*id).clone());
        }
        if let Some(id) = ready.iter().find(|id| self.blocks(id).iter().any(|b| self.is_output(b))) {
            return Some((*id).clone());
        }
        if let Some(id) = ready
            .iter()
            .find(|id| self.blocks(id).iter().any(|b| self.blocks(b).iter().any(|b1| self.is_output(b1))))
        {
            return Some((*id).clone());
        }
        ready.first().map(|id| (*id).clone())
    }

    fn complete(&mut self, id: &str) {
        self.pending.retain(|p| p != id);
        for b in self.blocking.remove(id).unwrap_or_default() {
            if let Some(c) = self.block_count.get_mut(&b) {
                *c = c.saturating_sub(1);
            }
        }
    }
}

/// Input signatures (`CacheKeySetInputSignature`), hashed.
fn signatures(prompt: &Map<String, Value>, dirs: &Dirs) -> IndexMap<String, String> {
    fn sig(
        id: &str,
        prompt: &Map<String, Value>,
        dirs: &Dirs,
        memo: &mut IndexMap<String, String>,
        visiting: &mut HashSet<String>,
    ) -> String {
        if let Some(s) = memo.get(id) {
            return s.clone();
        }
        if !visiting.insert(id.to_string()) {
            return uuid::Uuid::new_v4().to_string();
        }
        let class = class_of(prompt, id);
        let traits = nodes::traits(&class);
        let inputs = inputs_of(prompt, id).cloned().unwrap_or_default();
        let is_changed = match class.as_str() {
            "LoadImage" => {
                let name = inputs.get("image").map(py_str).unwrap_or_default();
                match std::fs::read(dirs.annotated_input_path(&name)) {
                    Ok(bytes) => json!(hex::encode(Sha256::digest(&bytes))),
                    Err(_) => json!(uuid::Uuid::new_v4().to_string()),
                }
            }
            _ if traits.is_some_and(|t| t.never_cached) => json!(uuid::Uuid::new_v4().to_string()),
            _ => json!(false),
        };
        let mut parts = vec![json!(class), is_changed];
        if traits.is_some_and(|t| t.unique_id_in_key) {
            parts.push(json!(id));
        }
        let mut keys: Vec<&String> = inputs.keys().collect();
        keys.sort();
        for k in keys {
            let v = &inputs[k];
            match as_link(v) {
                Some((from, socket)) if prompt.contains_key(from) => {
                    let s = sig(from, prompt, dirs, memo, visiting);
                    parts.push(json!([k, "ANCESTOR", s, socket]));
                }
                _ => parts.push(json!([k, v])),
            }
        }
        let digest = hex::encode(Sha256::digest(serde_json::to_vec(&parts).unwrap_or_default()));
        visiting.remove(id);
        memo.insert(id.to_string(), digest.clone());
        digest
    }
    let mut memo = IndexMap::new();
    let mut visiting = HashSet::new();
    let mut out = IndexMap::new();
    for id in prompt.keys() {
        let s = sig(id, prompt, dirs, &mut memo, &mut visiting);
        out.insert(id.clone(), s);
    }
    out
}

/// One prompt's execution (`PromptExecutor` state for one `execute` call).
struct Exec<'a> {
    shared: &'a Shared,
    epoch: u64,
    prompt_id: String,
    client_id: Option<String>,
    prompt: Map<String, Value>,
    sigs: IndexMap<String, String>,
    progress: IndexMap<String, Progress>,
    status_messages: Vec<Value>,
    executed: Vec<String>,
    ui_outputs: IndexMap<String, (Value, Value)>,
    values: HashMap<String, CacheEntry>,
    current_node: String,
    extra_pnginfo: Option<Value>,
}

impl Exec<'_> {
    /// Runs `f` under the state lock unless the emulator restarted since this prompt was taken.
    fn with_state<R>(&self, f: impl FnOnce(&mut State, &Faults) -> R) -> Result<R, NodeFailure> {
        let mut st = self.shared.lock();
        if st.epoch != self.epoch {
            return Err(NodeFailure::Abandoned);
        }
        Ok(f(&mut st, &self.shared.faults))
    }

    fn client(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// `add_message`: recorded for history; sent to the client, or broadcast if `broadcast`.
    fn add_message(&mut self, event: &str, data: Value, broadcast: bool) -> Result<(), NodeFailure> {
        let mut data = data;
        if let Some(obj) = data.as_object_mut() {
            obj.insert("timestamp".into(), json!(now_ms()));
        }
        self.status_messages.push(json!([event, data.clone()]));
        if self.client_id.is_some() || broadcast {
            let client = self.client_id.clone();
            self.with_state(|st, f| st.send_json(f, event, data, client.as_deref()))?;
        }
        Ok(())
    }

    fn ensure_progress(&mut self, node: &str) -> &mut Progress {
        self.progress.entry(node.to_string()).or_insert(Progress {
            state: NodeState::Pending,
            value: json!(0),
            max: json!(1),
            activity: None,
        })
    }

    fn send_progress_state(&self) -> Result<(), NodeFailure> {
        let mut nodes_map = Map::new();
        for (id, p) in &self.progress {
            if p.state == NodeState::Pending {
                continue;
            }
            let state = match p.state {
                NodeState::Running => "running",
                _ => "finished",
            };
            let mut entry = json!({
                "value": p.value, "max": p.max, "state": state, "node_id": id,
                "prompt_id": self.prompt_id, "display_node_id": id, "parent_node_id": null, "real_node_id": id
            });
            if let Some(activity) = &p.activity {
                entry["activity"] = json!(activity);
            }
            nodes_map.insert(id.clone(), entry);
        }
        let data = json!({"prompt_id": self.prompt_id, "nodes": nodes_map});
        self.with_state(|st, f| st.send_json(f, "progress_state", data, self.client()))
    }

    fn start_progress(&mut self, node: &str) -> Result<(), NodeFailure> {
        let p = self.ensure_progress(node);
        p.state = NodeState::Running;
        p.value = json!(0.0);
        p.max = json!(1.0);
        self.send_progress_state()
    }

    fn finish_progress(&mut self, node: &str) -> Result<(), NodeFailure> {
        let p = self.ensure_progress(node);
        p.state = NodeState::Finished;
        p.value = p.max.clone();
        self.send_progress_state()
    }

    fn check_interrupt(&self) -> Result<(), NodeFailure> {
        if self.shared.interrupt.swap(false, Ordering::SeqCst) {
            return Err(NodeFailure::Interrupted);
        }
        Ok(())
    }

    /// Sleeps `d` in small slices, abandoning if the emulator restarts.
    fn sleep(&self, d: Duration) -> Result<(), NodeFailure> {
        let end = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            std::thread::sleep((end - now).min(Duration::from_millis(5)));
            self.with_state(|_, _| ())?;
        }
    }

    fn execute_node(&mut self, node: &str, initially_cached: &HashSet<String>) -> Result<(), NodeFailure> {
        let class = class_of(&self.prompt, node);
        if initially_cached.contains(node) {
            let ui = self.values.get(node).and_then(|e| e.ui.clone());
            if let Some(client) = self.client_id.clone() {
                let data = json!({"node": node, "display_node": node, "output": ui.clone(), "prompt_id": self.prompt_id});
                self.with_state(|st, f| st.send_json(f, "executed", data, Some(&client)))?;
            }
            if let Some(ui) = ui {
                self.ui_outputs.insert(node.to_string(), (ui, meta(node)));
            }
            return self.finish_progress(node);
        }

        self.start_progress(node)?;
        let inputs = inputs_of(&self.prompt, node).cloned().unwrap_or_default();
        let mut links = HashMap::new();
        for (name, value) in &inputs {
            if let Some((from, socket)) = as_link(value) {
                let v = self.values.get(from).and_then(|e| {
                    let idx = if socket < 0 { e.outputs.len() as i64 + socket } else { socket };
                    usize::try_from(idx).ok().and_then(|i| e.outputs.get(i)).cloned()
                });
                if let Some(v) = v {
                    links.insert(name.clone(), v);
                }
            }
        }
        if let Some(client) = self.client_id.clone() {
            let data = json!({"node": node, "display_node": node, "prompt_id": self.prompt_id});
            let node_id = node.to_string();
            self.with_state(|st, f| {
                st.last_node_id = Some(node_id);
                st.send_json(f, "executing", data, Some(&client));
            })?;
        }
        self.current_node = node.to_string();
        let blocker = links.values().find_map(|v| match v {
            NodeValue::Blocked(message) => Some(message.clone()),
            _ => None,
        });
        if let Some(message) = blocker {
            return self.blocked(node, &class, message);
        }
        let result = self.run_node(&class, &inputs, &links);
        let output = match result {
            Ok(o) => o,
            Err(NodeFailure::Error { exception_type, message, traceback }) => {
                let mut tb: Vec<String> = TB_COMMON.iter().map(|s| s.to_string()).collect();
                tb.extend(traceback);
                return Err(NodeFailure::Error { exception_type, message, traceback: tb });
            }
            Err(other) => return Err(other),
        };
        if let Some(ui) = output.ui.clone() {
            if let Some(client) = self.client_id.clone() {
                let data = json!({"node": node, "display_node": node, "output": ui.clone(), "prompt_id": self.prompt_id});
                self.with_state(|st, f| st.send_json(f, "executed", data, Some(&client)))?;
            }
            self.ui_outputs.insert(node.to_string(), (ui, meta(node)));
        }
        let entry = CacheEntry { outputs: output.outputs, ui: output.ui };
        if let Some(sig) = self.sigs.get(node).cloned() {
            let e = entry.clone();
            self.with_state(|st, _| {
                st.cache.insert(sig, e);
            })?;
        }
        self.values.insert(node.to_string(), entry);
        self.finish_progress(node)?;
        self.executed.push(node.to_string());
        Ok(())
    }

    /// A node that received an `ExecutionBlocker`: it does not run. One carrying a message is reported with a
    /// direct `execution_error` (`ExecutionBlocked`, no timestamp, not recorded in history, not terminal);
    /// the node's own outputs become message-less blockers.
    fn blocked(&mut self, node: &str, class: &str, message: Option<String>) -> Result<(), NodeFailure> {
        self.check_interrupt()?;
        if let (Some(message), Some(client)) = (message, self.client_id.clone()) {
            let data = json!({
                "prompt_id": self.prompt_id,
                "node_id": node,
                "node_type": class,
                "executed": self.executed,
                "exception_message": format!("Execution Blocked: {message}"),
                "exception_type": "ExecutionBlocked",
                "traceback": [],
                "current_inputs": [],
                "current_outputs": [],
            });
            self.with_state(|st, f| st.send_json(f, "execution_error", data, Some(&client)))?;
        }
        let outputs = vec![NodeValue::Blocked(None); nodes::return_types(class).len()];
        self.values.insert(node.to_string(), CacheEntry { outputs, ui: None });
        self.finish_progress(node)?;
        self.executed.push(node.to_string());
        Ok(())
    }

    /// The wedged-node fault: runs for `bound`, ignoring the interrupt flag until a `/free` releases it (if
    /// the wedge is one that `/free` releases).
    fn wedged(&self, wedge: Wedge) -> Result<(), NodeFailure> {
        let frees_at_start = self.shared.frees.load(Ordering::SeqCst);
        let end = Instant::now() + wedge.bound;
        tracing::debug!(prompt_id = %self.prompt_id, node = %self.current_node, "fault: node wedged");
        while Instant::now() < end {
            if wedge.freed_by_free && self.shared.frees.load(Ordering::SeqCst) != frees_at_start {
                self.check_interrupt()?;
            }
            std::thread::sleep(Duration::from_millis(5));
            self.with_state(|_, _| ())?;
        }
        Ok(())
    }

    fn run_node(
        &mut self,
        class: &str,
        inputs: &Map<String, Value>,
        links: &HashMap<String, NodeValue>,
    ) -> Result<nodes::NodeOutput, NodeFailure> {
        // `before_node_execution()`: the interrupt is honoured when a node starts.
        self.check_interrupt()?;
        let loading = self.shared.faults.node_loading();
        if !loading.is_zero() {
            let newer = self.shared.newer();
            let node = self.current_node.clone();
            if newer {
                self.ensure_progress(&node).activity = Some("loading".into());
                self.send_progress_state()?;
            }
            self.sleep(loading)?;
            if newer {
                self.ensure_progress(&node).activity = None;
                self.send_progress_state()?;
            }
        }
        if let Some(wedge) = self.shared.faults.wedge(class) {
            self.wedged(wedge)?;
        }
        let (delay, steps) = self.shared.faults.node_delay();
        if !delay.is_zero() {
            if steps > 0 {
                let slice = delay / u32::try_from(steps).unwrap_or(u32::MAX);
                for i in 0..steps {
                    self.sleep(slice)?;
                    self.progress(i, steps, None)?;
                }
            } else {
                self.sleep(delay)?;
            }
        }
        if let Some(message) = self.shared.faults.blocker(class) {
            let outputs = vec![NodeValue::Blocked(Some(message)); nodes::return_types(class).len()];
            return Ok(nodes::NodeOutput { outputs, ui: None });
        }
        if let Some(message) = self.shared.faults.node_failure(class) {
            return Err(NodeFailure::Error {
                exception_type: "Exception".into(),
                message,
                traceback: vec![format!(
                    "  File \"/opt/ComfyUI/nodes.py\", line 1, in {class}\n    raise Exception(message)\n"
                )],
            });
        }
        let dirs = self.shared.dirs.clone();
        let mut ctx = Ctx { exec: self, dirs };
        nodes::run(class, inputs, links, &mut ctx)
    }

    fn current_inputs(&self, node: &str) -> Value {
        let class = class_of(&self.prompt, node);
        let inputs = inputs_of(&self.prompt, node).cloned().unwrap_or_default();
        let mut out = Map::new();
        for name in super::validation::input_names(&class, &self.shared.dirs.input) {
            let Some(v) = inputs.get(&name) else { continue };
            let formatted = match as_link(v) {
                Some((from, socket)) => self
                    .values
                    .get(from)
                    .and_then(|e| usize::try_from(socket).ok().and_then(|i| e.outputs.get(i)))
                    .map(NodeValue::formatted)
                    .unwrap_or(Value::Null),
                None => v.clone(),
            };
            out.insert(name, json!([formatted]));
        }
        Value::Object(out)
    }

    /// The progress hook (`hijack_progress` + `WebUIProgressHandler`).
    fn progress(&mut self, value: u64, max: u64, preview_png: Option<Vec<u8>>) -> Result<(), NodeFailure> {
        self.check_interrupt()?;
        let node = self.current_node.clone();
        let p = self.ensure_progress(&node);
        p.state = NodeState::Running;
        p.value = json!(value);
        p.max = json!(max);
        self.send_progress_state()?;
        let client = self.client_id.clone();
        let prompt_id = self.prompt_id.clone();
        self.with_state(|st, f| {
            let flagged = st.supports_preview_metadata(client.as_deref());
            if let (Some(png), true) = (&preview_png, flagged) {
                let meta = json!({
                    "node_id": node, "prompt_id": prompt_id, "display_node_id": node,
                    "parent_node_id": null, "real_node_id": node, "image_type": "image/png"
                });
                st.send_binary(f, frames::preview_with_metadata(&meta, png), client.as_deref());
            }
            let data = json!({"value": value, "max": max, "prompt_id": prompt_id, "node": node});
            st.send_json(f, "progress", data, client.as_deref());
            if let (Some(png), false) = (&preview_png, flagged) {
                st.send_binary(f, frames::preview_image(png), client.as_deref());
            }
        })
    }
}

fn meta(node: &str) -> Value {
    json!({"node_id": node, "display_node": node, "parent_node": null, "real_node_id": node})
}

/// The [`NodeContext`] handed to a running node.
struct Ctx<'e, 'a> {
    exec: &'e mut Exec<'a>,
    dirs: Dirs,
}

impl NodeContext for Ctx<'_, '_> {
    fn progress(&mut self, value: u64, max: u64, preview_png: Option<Vec<u8>>) -> Result<(), NodeFailure> {
        self.exec.progress(value, max, preview_png)
    }

    fn check_interrupt(&mut self) -> Result<(), NodeFailure> {
        self.exec.check_interrupt()
    }

    fn progress_text(&mut self, text: &str) -> Result<(), NodeFailure> {
        let frame = frames::text(&self.exec.current_node, text);
        self.exec.with_state(|st, f| st.send_binary(f, frame, None))
    }

    fn temp_suffix(&mut self) -> String {
        let key = format!("{}\u{0}PreviewImage", self.exec.current_node);
        self.exec
            .with_state(|st, _| {
                st.temp_suffixes
                    .entry(key)
                    .or_insert_with(|| {
                        const LETTERS: &[u8] = b"abcdefghijklmnopqrstupvxyz";
                        let mut rng = rand::rng();
                        (0..5).map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char).collect()
                    })
                    .clone()
            })
            .unwrap_or_else(|_| "xxxxx".into())
    }

    fn dirs(&self) -> &Dirs {
        &self.dirs
    }

    fn png_text(&self) -> Vec<(String, String)> {
        let mut out = vec![("prompt".to_string(), pyjson::dumps(&Value::Object(self.exec.prompt.clone())))];
        if let Some(Value::Object(extra)) = &self.exec.extra_pnginfo {
            for (k, v) in extra {
                out.push((k.clone(), pyjson::dumps(v)));
            }
        }
        out
    }
}

/// Executes one taken prompt to completion (or abandonment), then `task_done` + `executing {node: null}`.
pub(crate) fn run_prompt(shared: &Shared, item: QueueItem, epoch: u64) {
    let started = Instant::now();
    let prompt = item.prompt.as_object().cloned().unwrap_or_default();
    let sigs = signatures(&prompt, &shared.dirs);
    let mut ex = Exec {
        shared,
        epoch,
        prompt_id: item.prompt_id.clone(),
        client_id: item.client_id(),
        prompt,
        sigs,
        progress: IndexMap::new(),
        status_messages: Vec::new(),
        executed: Vec::new(),
        ui_outputs: IndexMap::new(),
        values: HashMap::new(),
        current_node: String::new(),
        extra_pnginfo: item.extra_data.get("extra_pnginfo").cloned(),
    };
    // A stale interrupt is cleared when a prompt starts.
    shared.interrupt.store(false, Ordering::SeqCst);
    let outcome = execute(&mut ex, &item.outputs);
    if matches!(outcome, Err(NodeFailure::Abandoned)) {
        return;
    }
    let success = outcome.is_ok();
    let mut outputs = Map::new();
    let mut metas = Map::new();
    for (node, (ui, m)) in &ex.ui_outputs {
        outputs.insert(node.clone(), ui.clone());
        metas.insert(node.clone(), m.clone());
    }
    let status = json!({
        "status_str": if success { "success" } else { "error" },
        "completed": success,
        "messages": ex.status_messages,
    });
    let extra = json!({"status": status, "outputs": outputs, "meta": metas});
    let client = ex.client_id.clone();
    let prompt_id = ex.prompt_id.clone();
    let elapsed = started.elapsed().as_secs_f64();
    let _ = ex.with_state(|st, f| {
        st.last_node_id = None;
        st.task_done(f, extra);
        if let Some(client) = client {
            st.send_json(f, "executing", json!({"node": null, "prompt_id": prompt_id}), Some(&client));
        }
        st.log(f, &format!("Prompt executed in {elapsed:.2} seconds"));
    });
}

fn execute(ex: &mut Exec<'_>, outputs: &[String]) -> Result<(), NodeFailure> {
    let pid = ex.prompt_id.clone();
    ex.add_message("execution_start", json!({"prompt_id": pid}), false)?;

    // `cache.set_prompt` + `clean_unused`, then the cached list in prompt order.
    let used: HashSet<String> = ex.sigs.values().cloned().collect();
    let prompt_keys: HashSet<String> = ex
        .prompt
        .iter()
        .map(|(id, n)| format!("{id}\u{0}{}", n.get("class_type").map(py_str).unwrap_or_default()))
        .collect();
    let sigs = ex.sigs.clone();
    let cached_entries: Vec<(String, CacheEntry)> = ex.with_state(|st, _| {
        st.cache.retain(|k, _| used.contains(k));
        st.temp_suffixes.retain(|k, _| prompt_keys.contains(k));
        sigs.iter().filter_map(|(id, sig)| st.cache.get(sig).map(|e| (id.clone(), e.clone()))).collect()
    })?;
    let initially_cached: HashSet<String> = cached_entries.iter().map(|(id, _)| id.clone()).collect();
    let cached_ids: Vec<String> = cached_entries.iter().map(|(id, _)| id.clone()).collect();
    ex.values.extend(cached_entries);
    ex.add_message("execution_cached", json!({"nodes": cached_ids, "prompt_id": pid}), false)?;

    let prompt = ex.prompt.clone();
    let mut list = ExecList::new(&prompt);
    for o in outputs {
        list.add_node(o, &initially_cached);
    }
    let failure = loop {
        let Some(node) = list.stage() else { break None };
        match ex.execute_node(&node, &initially_cached) {
            Ok(()) => list.complete(&node),
            Err(NodeFailure::Abandoned) => return Err(NodeFailure::Abandoned),
            Err(f) => break Some((node, f)),
        }
    };
    match failure {
        None => {
            ex.add_message("execution_success", json!({"prompt_id": pid}), false)?;
            Ok(())
        }
        Some((node, NodeFailure::Interrupted)) => {
            let data = json!({
                "prompt_id": pid, "node_id": node, "node_type": class_of(&prompt, &node), "executed": ex.executed
            });
            ex.add_message("execution_interrupted", data, true)?;
            Err(NodeFailure::Interrupted)
        }
        Some((node, NodeFailure::Error { exception_type, message, traceback })) => {
            let current_outputs: Vec<&String> = prompt.keys().collect();
            let data = json!({
                "prompt_id": pid,
                "node_id": node,
                "node_type": class_of(&prompt, &node),
                "executed": ex.executed,
                "exception_message": format!("{message}\n"),
                "exception_type": exception_type,
                "traceback": traceback,
                "current_inputs": ex.current_inputs(&node),
                "current_outputs": current_outputs,
            });
            ex.add_message("execution_error", data, false)?;
            Err(NodeFailure::Error { exception_type, message, traceback: Vec::new() })
        }
        Some((_, NodeFailure::Abandoned)) => Err(NodeFailure::Abandoned),
    }
}
