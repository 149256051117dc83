//! Routing of parsed ComfyUI messages to the prompts they belong to, and each prompt's delivery state
//! (outputs seen, last node, terminal reached).
//!
//! Owns the guarantees "exactly one terminal event per prompt" and "no duplicate events across a
//! reconnect": every event goes through here under one lock, and a route is removed the moment its
//! terminal event is sent. Synchronous and I/O-free (the connection task does the I/O and calls in);
//! knows nothing about sockets or HTTP.
//!
//! # Delivery bounds
//! Each prompt's events go through a bounded channel ([`ROUTE_EVENTS`] events and [`ROUTE_BYTES`] of image
//! payload): the connection task serves every prompt of the server and must never wait for one slow
//! reader. When a reader is that far behind, further events of its prompt are dropped and the prompt's
//! stream is marked lossy (see [`PromptEvents::lossless`]); outputs that history can give back are
//! recovered at the end as after any gap. The terminal event (with outputs recovered from history) has
//! a slot of its own and always arrives.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::messages::{PromptEvent, ServerMessage};
use super::types::{HistoryEntry, HistoryStatus};

/// Events buffered per prompt for a reader that has not taken them yet.
pub(crate) const ROUTE_EVENTS: usize = 4096;
/// Image bytes (previews, WebSocket outputs) buffered per prompt.
pub(crate) const ROUTE_BYTES: usize = 64 << 20;

/// State one prompt's route and its reader share.
#[derive(Debug, Default)]
struct Shared {
    /// Image bytes sent and not yet received.
    bytes: AtomicUsize,
    /// An event was dropped because the reader was too far behind.
    overflowed: AtomicBool,
    /// The stream may miss what ComfyUI sent while no socket of ours was routed for it: set by attaching
    /// and by every socket change, cleared when `execution_start` arrives afterwards (the prompt started
    /// on a socket we hear, so nothing of its execution went unheard).
    unheard: AtomicBool,
}

/// The receiving end of one prompt's events.
#[derive(Debug)]
pub struct PromptEvents {
    prompt_id: String,
    rx: mpsc::Receiver<PromptEvent>,
    tail: Option<oneshot::Receiver<Vec<PromptEvent>>>,
    pending: VecDeque<PromptEvent>,
    shared: Arc<Shared>,
}

impl PromptEvents {
    /// The next event. `None` only after the terminal event was delivered, or when the connection was
    /// shut down before the prompt ended.
    pub async fn recv(&mut self) -> Option<PromptEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if let Some(e) = self.rx.recv().await {
                self.shared.bytes.fetch_sub(payload_bytes(&e), Ordering::Relaxed);
                return Some(e);
            }
            // The route is gone: its tail (terminal and recovered outputs) is all that is left.
            let tail = self.tail.take()?;
            self.pending = tail.await.ok()?.into();
        }
    }

    /// Whether every event ComfyUI sent for this prompt while it executed was delivered: no socket change
    /// during its execution, not attached after a restart without seeing it start, and never too far
    /// behind. Outputs that exist only as WebSocket frames (SaveImageWebsocket) are complete only when
    /// this is true at the terminal event; files are recovered from history either way.
    pub fn lossless(&self) -> bool {
        !self.shared.overflowed.load(Ordering::Relaxed) && !self.shared.unheard.load(Ordering::Relaxed)
    }

    /// A stream that is already over (refused registration).
    pub(crate) fn closed(prompt_id: &str) -> Self {
        let (_, rx) = mpsc::channel(1);
        Self {
            prompt_id: prompt_id.to_owned(),
            rx,
            tail: None,
            pending: VecDeque::new(),
            shared: Arc::default(),
        }
    }

    /// The prompt these events belong to.
    pub fn prompt_id(&self) -> &str {
        &self.prompt_id
    }
}

fn payload_bytes(e: &PromptEvent) -> usize {
    match e {
        PromptEvent::Preview { data, .. } => data.len(),
        _ => 0,
    }
}

/// What the connection task must do after a message was routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Followup {
    /// Read /queue then /history for these prompts (a terminal may have been missed).
    Reconcile(String),
    /// `execution_success` arrived for a prompt that lived through a reconnect: fetch its history entry
    /// (retrying briefly) so outputs missed during the gap are emitted before `Succeeded`.
    ConfirmSuccess(String),
}

#[derive(Debug)]
struct Route {
    tx: mpsc::Sender<PromptEvent>,
    tail: Option<oneshot::Sender<Vec<PromptEvent>>>,
    /// Recovered from history, delivered with the terminal event.
    recovered: Vec<PromptEvent>,
    shared: Arc<Shared>,
    /// POST /prompt was answered (or the prompt was attached): only then may it be declared lost.
    acked: bool,
    /// clientId the prompt was queued under (`None` when attached: unknown).
    client_id: Option<String>,
    /// A socket change happened while this prompt was in flight (events may have been missed).
    gap: bool,
    seen_outputs: HashSet<String>,
    last_executing: Option<String>,
    /// Every node delivered as `Executing`, so a re-sent one is never delivered twice.
    seen_executing: HashSet<String>,
    /// Last event or reconcile: drives the silence reconcile.
    last_activity: Instant,
    /// A success is being confirmed from history: everything else for this prompt is ignored.
    finishing: bool,
    reconciling: bool,
}

impl Route {
    /// The reader is too far behind: drop the event, mark the stream lossy, and treat it like a gap, so
    /// a success is confirmed from history (which recovers file outputs).
    fn overflow(&mut self, prompt_id: &str) {
        if !self.shared.overflowed.swap(true, Ordering::Relaxed) {
            tracing::warn!(prompt_id, "prompt reader fell behind; dropping its events until it ends");
        }
        self.gap = true;
    }
}

/// All routes of one connection.
#[derive(Debug)]
pub(crate) struct Router {
    routes: HashMap<String, Route>,
    /// The prompt of ours currently executing on the server (for frames without a prompt id).
    running: Option<String>,
    /// An `executing` without prompt id that arrived while the running prompt was unknown (right after a
    /// reconnect): delivered once a reconcile learns from /queue which of our prompts is running, unless a
    /// message naming its prompt comes first.
    unattributed: Option<(String, Option<String>)>,
    /// The prompt we saw running when the last socket went away.
    running_before_gap: Option<String>,
    /// clientId of the current (or last) socket.
    socket_client_id: String,
}

/// Registration refused: the id is already in flight on this connection.
#[derive(Debug)]
pub(crate) struct AlreadyInFlight;

impl Router {
    pub(crate) fn new(socket_client_id: String) -> Self {
        Self {
            routes: HashMap::new(),
            running: None,
            unattributed: None,
            running_before_gap: None,
            socket_client_id,
        }
    }

    pub(crate) fn socket_client_id(&self) -> &str {
        &self.socket_client_id
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.routes.len()
    }

    /// Registers a prompt before it is queued (or when attaching, with `client_id: None, acked: true`).
    pub(crate) fn register(
        &mut self,
        prompt_id: &str,
        client_id: Option<String>,
        acked: bool,
    ) -> Result<PromptEvents, AlreadyInFlight> {
        if self.routes.contains_key(prompt_id) {
            return Err(AlreadyInFlight);
        }
        let (tx, rx) = mpsc::channel(ROUTE_EVENTS);
        let (tail_tx, tail_rx) = oneshot::channel();
        // Attached (after a restart): whatever ran before now went to no socket of ours.
        let shared = Arc::new(Shared { unheard: AtomicBool::new(client_id.is_none()), ..Shared::default() });
        self.routes.insert(
            prompt_id.to_owned(),
            Route {
                tx,
                tail: Some(tail_tx),
                recovered: Vec::new(),
                shared: shared.clone(),
                acked,
                client_id,
                gap: false,
                seen_outputs: HashSet::new(),
                last_executing: None,
                seen_executing: HashSet::new(),
                last_activity: Instant::now(),
                finishing: false,
                reconciling: false,
            },
        );
        Ok(PromptEvents {
            prompt_id: prompt_id.to_owned(),
            rx,
            tail: Some(tail_rx),
            pending: VecDeque::new(),
            shared,
        })
    }

    /// POST /prompt answered. Returns true when the prompt must be reconciled now (the socket changed
    /// while the POST was in flight, so its events may have gone to a dead socket).
    pub(crate) fn ack(&mut self, prompt_id: &str) -> bool {
        match self.routes.get_mut(prompt_id) {
            Some(r) => {
                r.acked = true;
                r.gap || r.client_id.as_deref() != Some(self.socket_client_id.as_str())
            }
            None => false,
        }
    }

    /// Submission failed: forget the prompt.
    pub(crate) fn unregister(&mut self, prompt_id: &str) {
        self.routes.remove(prompt_id);
        if self.running.as_deref() == Some(prompt_id) {
            self.running = None;
        }
    }

    /// A new socket was opened with this clientId: prompts submitted from now on use it. What ran while
    /// no socket was up is unknown: the prompt we last saw running may have ended and another started, so
    /// frames without a prompt id are not attributed again until a message or /queue says who runs.
    pub(crate) fn set_socket_client_id(&mut self, client_id: &str) {
        self.socket_client_id = client_id.to_owned();
        for r in self.routes.values() {
            r.shared.unheard.store(true, Ordering::Relaxed);
        }
        if let Some(id) = self.running.take() {
            self.running_before_gap = Some(id);
        }
        self.unattributed = None;
    }

    /// The new socket is registered by ComfyUI (greeted). Every prompt in flight may have missed events;
    /// returns the acknowledged ones, which must be reconciled now.
    pub(crate) fn on_new_socket(&mut self) -> Vec<String> {
        let mut due = Vec::new();
        for (id, r) in &mut self.routes {
            r.gap = true;
            if r.acked && !r.finishing {
                due.push(id.clone());
            }
        }
        due
    }

    /// Prompts to reconcile now: silent for `silence`, or (for orphans, whose events cannot reach this
    /// socket) not checked for `orphan_poll`. Marks them as reconciling.
    pub(crate) fn due(&mut self, now: Instant, silence: Duration, orphan_poll: Duration) -> Vec<String> {
        let socket = self.socket_client_id.as_str();
        let mut due = Vec::new();
        for (id, r) in &mut self.routes {
            if !r.acked || r.finishing || r.reconciling {
                continue;
            }
            let orphan = r.client_id.as_deref() != Some(socket);
            let quiet = now.saturating_duration_since(r.last_activity);
            if quiet >= silence || (orphan && quiet >= orphan_poll) {
                r.reconciling = true;
                due.push(id.clone());
            }
        }
        due
    }

    /// Marks prompts as being reconciled; returns those that were not already (and still exist).
    pub(crate) fn begin_reconcile(&mut self, ids: Vec<String>) -> Vec<String> {
        ids.into_iter()
            .filter(|id| match self.routes.get_mut(id) {
                Some(r) if r.acked && !r.finishing && !r.reconciling => {
                    r.reconciling = true;
                    true
                }
                _ => false,
            })
            .collect()
    }

    /// End of a reconcile round for a prompt found alive (or whose check failed).
    pub(crate) fn end_reconcile(&mut self, prompt_id: &str, alive_running: bool) {
        if let Some(r) = self.routes.get_mut(prompt_id) {
            r.reconciling = false;
            r.last_activity = Instant::now();
            if alive_running && self.running.is_none() && !r.finishing {
                self.running = Some(prompt_id.to_owned());
                // The node ComfyUI re-sent without a prompt id on reconnect described the prompt running
                // *then*; /queue was read later and may name the next prompt. Attribute it only when the
                // prompt running before the gap is still the one running (prompts never run twice, so it
                // ran throughout); otherwise drop it: a wrong attribution is worse than none.
                let held = self.unattributed.take();
                let same = self.running_before_gap.take().as_deref() == Some(prompt_id);
                if let (true, Some((node, display_node))) = (same, held) {
                    self.route_executing(prompt_id.to_owned(), node, display_node, true);
                }
            }
        }
    }

    fn route_executing(&mut self, id: String, node: String, display_node: Option<String>, resent: bool) {
        let Some(route) = self.routes.get_mut(&id) else { return };
        // After a reconnect ComfyUI re-sends the current node without a prompt id: not news if seen.
        if resent
            && (route.last_executing.as_deref() == Some(node.as_str())
                || route.seen_executing.contains(&node))
        {
            return;
        }
        route.seen_executing.insert(node.clone());
        route.last_executing = Some(node.clone());
        self.deliver(&id, PromptEvent::Executing { node, display_node });
    }

    /// Applies a history entry: unseen outputs as `Executed`, then the terminal event. Returns false when
    /// the entry is not final (the prompt stays in flight).
    pub(crate) fn apply_history(&mut self, entry: HistoryEntry) -> bool {
        let id = entry.prompt_id.as_str();
        let Some(route) = self.routes.get_mut(id) else { return true };
        let terminal = match entry.status {
            HistoryStatus::Incomplete => return false,
            HistoryStatus::Success => {
                for (node, output) in entry.outputs {
                    if route.seen_outputs.insert(node.clone()) {
                        route.recovered.push(PromptEvent::Executed { node, display_node: None, output });
                    }
                }
                PromptEvent::Succeeded
            }
            HistoryStatus::Failed(e) => PromptEvent::Failed(e),
            HistoryStatus::Interrupted { node_id, node_type } => {
                PromptEvent::Interrupted { node_id, node_type }
            }
        };
        let id = id.to_owned();
        self.finish(&id, terminal);
        true
    }

    /// Delivers a terminal event (if the prompt is still in flight) and removes the route.
    pub(crate) fn finish(&mut self, prompt_id: &str, terminal: PromptEvent) {
        debug_assert!(terminal.is_terminal());
        if let Some(mut route) = self.routes.remove(prompt_id) {
            let mut tail = std::mem::take(&mut route.recovered);
            tail.push(terminal);
            if let Some(t) = route.tail.take() {
                let _ = t.send(tail);
            }
        }
        if self.running.as_deref() == Some(prompt_id) {
            self.running = None;
        }
    }

    /// Drops every route: subscribers see the end of their stream (connection shut down).
    pub(crate) fn close_all(&mut self) {
        self.routes.clear();
        self.running = None;
    }

    fn resolve(&self, prompt_id: Option<String>) -> Option<String> {
        prompt_id.or_else(|| self.running.clone())
    }

    /// Sends a non-terminal event to a live route.
    fn deliver(&mut self, prompt_id: &str, event: PromptEvent) {
        let closed = match self.routes.get_mut(prompt_id) {
            Some(r) if !r.finishing => {
                r.last_activity = Instant::now();
                if matches!(event, PromptEvent::ExecutionStart) {
                    // Started on a socket we hear: nothing of its execution can have gone unheard.
                    r.shared.unheard.store(false, Ordering::Relaxed);
                }
                let bytes = payload_bytes(&event);
                if r.shared.bytes.load(Ordering::Relaxed) + bytes > ROUTE_BYTES {
                    r.overflow(prompt_id);
                    false
                } else {
                    r.shared.bytes.fetch_add(bytes, Ordering::Relaxed);
                    match r.tx.try_send(event) {
                        Ok(()) => false,
                        Err(mpsc::error::TrySendError::Full(e)) => {
                            r.shared.bytes.fetch_sub(payload_bytes(&e), Ordering::Relaxed);
                            r.overflow(prompt_id);
                            false
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => true,
                    }
                }
            }
            _ => false,
        };
        if closed {
            // The subscriber went away: stop tracking the prompt.
            tracing::debug!(prompt_id, "prompt subscriber dropped; route removed");
            self.unregister(prompt_id);
        }
    }

    /// Routes one server message.
    pub(crate) fn handle(&mut self, msg: ServerMessage) -> Option<Followup> {
        match msg {
            ServerMessage::Status { .. } | ServerMessage::FeatureFlags(_) | ServerMessage::Logs(_) => None,
            ServerMessage::ExecutionStart { prompt_id } => {
                let id = self.resolve(prompt_id)?;
                self.running = Some(id.clone());
                self.unattributed = None;
                self.running_before_gap = None;
                self.deliver(&id, PromptEvent::ExecutionStart);
                None
            }
            ServerMessage::ExecutionCached { prompt_id, nodes } => {
                let id = self.resolve(prompt_id)?;
                self.deliver(&id, PromptEvent::Cached { nodes });
                None
            }
            ServerMessage::Executing { prompt_id: Some(id), node: Some(node), display_node } => {
                self.running = Some(id.clone());
                self.unattributed = None;
                self.running_before_gap = None;
                self.route_executing(id, node, display_node, false);
                None
            }
            ServerMessage::Executing { prompt_id: None, node: Some(node), display_node } => {
                match self.running.clone() {
                    Some(id) => self.route_executing(id, node, display_node, true),
                    None => self.unattributed = Some((node, display_node)),
                }
                None
            }
            ServerMessage::Executing { prompt_id, node: None, .. } => {
                let id = self.resolve(prompt_id)?;
                if self.running.as_deref() == Some(id.as_str()) {
                    self.running = None;
                }
                // The terminal message precedes `executing{null}`; a route still here missed it.
                match self.routes.get(&id) {
                    Some(r) if r.acked && !r.finishing => Some(Followup::Reconcile(id)),
                    _ => None,
                }
            }
            ServerMessage::Progress { prompt_id, node, value, max } => {
                let id = self.resolve(prompt_id)?;
                self.deliver(&id, PromptEvent::Progress { node, value, max });
                None
            }
            ServerMessage::ProgressState { prompt_id, data } => {
                let id = self.resolve(prompt_id)?;
                self.deliver(&id, PromptEvent::ProgressState { data });
                None
            }
            ServerMessage::Executed { prompt_id, node, display_node, output } => {
                let id = self.resolve(prompt_id)?;
                let route = self.routes.get_mut(&id)?;
                if !route.seen_outputs.insert(node.clone()) {
                    return None;
                }
                self.deliver(&id, PromptEvent::Executed { node, display_node, output });
                None
            }
            ServerMessage::ExecutionSuccess { prompt_id } => {
                let id = self.resolve(prompt_id)?;
                let route = self.routes.get_mut(&id)?;
                if route.finishing {
                    return None;
                }
                if route.gap {
                    route.finishing = true;
                    if self.running.as_deref() == Some(id.as_str()) {
                        self.running = None;
                    }
                    return Some(Followup::ConfirmSuccess(id));
                }
                self.finish(&id, PromptEvent::Succeeded);
                None
            }
            ServerMessage::ExecutionError { prompt_id, error } => {
                let id = self.resolve(prompt_id)?;
                self.finish(&id, PromptEvent::Failed(error));
                None
            }
            ServerMessage::ExecutionInterrupted { prompt_id, node_id, node_type } => {
                let id = self.resolve(prompt_id)?;
                self.finish(&id, PromptEvent::Interrupted { node_id, node_type });
                None
            }
            ServerMessage::Other { kind, prompt_id, data } => {
                let id = prompt_id?;
                self.deliver(&id, PromptEvent::Other { kind, data });
                None
            }
            ServerMessage::Preview { mime, data } => {
                let id = self.running.clone()?;
                let node = self.routes.get(&id)?.last_executing.clone();
                self.deliver(&id, PromptEvent::Preview { node, mime, data });
                None
            }
            ServerMessage::PreviewWithMetadata { prompt_id, node, mime, data } => {
                let id = self.resolve(prompt_id)?;
                self.deliver(&id, PromptEvent::Preview { node, mime, data });
                None
            }
            ServerMessage::Text { node, text } => {
                let id = self.running.clone()?;
                self.deliver(&id, PromptEvent::Text { node, text });
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comfy::types::ExecutionError;
    use bytes::Bytes;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn msg(s: &str) -> ServerMessage {
        ServerMessage::parse_text(s).unwrap()
    }

    fn drain(ev: &mut PromptEvents) -> Vec<PromptEvent> {
        let mut out = Vec::new();
        while let Ok(e) = ev.rx.try_recv() {
            out.push(e);
        }
        if let Some(Ok(tail)) = ev.tail.as_mut().map(|t| t.try_recv()) {
            out.extend(tail);
            ev.tail = None;
        }
        out
    }

    #[tokio::test]
    async fn routes_by_prompt_id_and_running_prompt() {
        let mut r = Router::new("c1".into());
        let mut a = r.register("a", Some("c1".into()), false).unwrap();
        let mut b = r.register("b", Some("c1".into()), true).unwrap();
        assert!(r.register("a", None, true).is_err());
        // Events can arrive before the HTTP answer: they are routed all the same.
        r.handle(msg(r#"{"type": "execution_start", "data": {"prompt_id": "a", "timestamp": 1}}"#));
        assert!(!r.ack("a"));
        r.handle(msg(
            r#"{"type": "executing", "data": {"node": "2", "display_node": "2", "prompt_id": "a"}}"#,
        ));
        // Legacy preview and text frames carry no prompt id: they go to the running prompt.
        r.handle(ServerMessage::Preview { mime: "image/png".into(), data: Bytes::from_static(b"x") });
        r.handle(ServerMessage::Text { node: "2".into(), text: "hi".into() });
        // Reconnect re-send of the current node: deduplicated. A new node without prompt id: routed.
        r.handle(msg(r#"{"type": "executing", "data": {"node": "2"}}"#));
        r.handle(msg(r#"{"type": "executing", "data": {"node": "3"}}"#));
        let out = r#"{"type": "executed", "data": {"node": "3", "display_node": "3", "output": {"images": []}, "prompt_id": "a"}}"#;
        r.handle(msg(out));
        r.handle(msg(out));
        r.handle(msg(r#"{"type": "execution_success", "data": {"prompt_id": "a", "timestamp": 2}}"#));
        // A second terminal for the same prompt is ignored.
        r.handle(msg(r#"{"type": "execution_error", "data": {"prompt_id": "a", "node_id": "1"}}"#));
        assert_eq!(r.handle(msg(r#"{"type": "executing", "data": {"node": null, "prompt_id": "a"}}"#)), None);
        let events = drain(&mut a);
        let kinds: Vec<_> = events
            .iter()
            .map(|e| format!("{e:?}").split([' ', '(', '{']).next().unwrap().to_owned())
            .collect();
        assert_eq!(
            kinds,
            ["ExecutionStart", "Executing", "Preview", "Text", "Executing", "Executed", "Succeeded"]
        );
        assert!(matches!(&events[2], PromptEvent::Preview { node: Some(n), .. } if n == "2"));
        assert!(a.recv().await.is_none(), "stream ends after the terminal event");
        assert!(drain(&mut b).is_empty());
        assert_eq!(r.in_flight(), 1);
    }

    #[test]
    fn resent_executing_after_reconnect_is_never_misattributed() {
        tokio_test_block(|| {
            let mut r = Router::new("c1".into());
            let mut a = r.register("a", Some("c1".into()), true).unwrap();
            let mut b = r.register("b", Some("c1".into()), true).unwrap();
            r.handle(msg(r#"{"type": "executing", "data": {"node": "3", "prompt_id": "a"}}"#));
            drain(&mut a);
            // Socket lost; meanwhile `a` ended and `b` started. The re-sent node is `b`'s, not `a`'s.
            r.set_socket_client_id("c1");
            r.handle(msg(r#"{"type": "executing", "data": {"node": "2"}}"#));
            assert!(drain(&mut a).is_empty() && drain(&mut b).is_empty());
            // /queue (read later) names `b`, but `a` ran before the gap: the held node may be `a`'s, so it is
            // dropped rather than guessed (a burst test saw `b` get `a`'s node before its execution_start).
            r.end_reconcile("b", true);
            assert!(drain(&mut b).is_empty());
            assert!(drain(&mut a).is_empty());
            r.handle(msg(r#"{"type": "executing", "data": {"node": "3", "prompt_id": "b"}}"#));
            assert_eq!(drain(&mut b), [PromptEvent::Executing { node: "3".into(), display_node: None }]);
        });
    }

    #[test]
    fn resent_executing_goes_to_the_prompt_that_ran_through_the_gap() {
        tokio_test_block(|| {
            let mut r = Router::new("c1".into());
            let mut a = r.register("a", Some("c1".into()), true).unwrap();
            r.handle(msg(r#"{"type": "executing", "data": {"node": "3", "prompt_id": "a"}}"#));
            drain(&mut a);
            r.set_socket_client_id("c1");
            r.handle(msg(r#"{"type": "executing", "data": {"node": "4"}}"#));
            assert!(drain(&mut a).is_empty(), "held until /queue says who runs");
            r.end_reconcile("a", true);
            assert_eq!(drain(&mut a), [PromptEvent::Executing { node: "4".into(), display_node: None }]);
        });
    }

    #[test]
    fn missed_terminal_triggers_reconcile_and_gap_success_is_confirmed() {
        let mut r = Router::new("c1".into());
        let mut a = r.register("a", Some("c1".into()), true).unwrap();
        assert_eq!(
            r.handle(msg(r#"{"type": "executing", "data": {"node": null, "prompt_id": "a"}}"#)),
            Some(Followup::Reconcile("a".into()))
        );
        r.set_socket_client_id("c1");
        assert_eq!(r.on_new_socket(), vec!["a".to_owned()]);
        assert_eq!(
            r.handle(msg(r#"{"type": "execution_success", "data": {"prompt_id": "a"}}"#)),
            Some(Followup::ConfirmSuccess("a".into()))
        );
        // While confirming, nothing else is delivered.
        r.handle(msg(
            r#"{"type": "progress", "data": {"value": 0, "max": 1, "prompt_id": "a", "node": "2"}}"#,
        ));
        assert!(drain(&mut a).is_empty());
        let mut outputs = BTreeMap::new();
        outputs.insert(
            "9".to_owned(),
            json!({"images": [{"filename": "f.png", "subfolder": "", "type": "output"}]}),
        );
        assert!(r.apply_history(HistoryEntry {
            prompt_id: "a".into(),
            status: HistoryStatus::Success,
            completed: true,
            outputs,
            messages: vec![]
        }));
        let ev = drain(&mut a);
        assert!(matches!(&ev[0], PromptEvent::Executed { node, .. } if node == "9"));
        assert_eq!(ev[1], PromptEvent::Succeeded);
        assert_eq!(ev.len(), 2);
    }

    #[test]
    fn due_for_reconcile_respects_silence_orphans_and_ack() {
        tokio_test_block(|| {
            let mut r = Router::new("c1".into());
            let _a = r.register("a", Some("c1".into()), true).unwrap();
            let _b = r.register("b", None, true).unwrap(); // attached: orphan
            let _c = r.register("c", Some("c1".into()), false).unwrap(); // not acked yet
            let now = Instant::now() + Duration::from_secs(2);
            let mut due = r.due(now, Duration::from_secs(30), Duration::from_secs(1));
            due.sort();
            assert_eq!(due, ["b"]);
            assert!(
                r.due(now, Duration::from_secs(30), Duration::from_secs(1)).is_empty(),
                "already reconciling"
            );
            r.end_reconcile("b", true);
            let later = Instant::now() + Duration::from_secs(31);
            let mut due = r.due(later, Duration::from_secs(30), Duration::from_secs(1));
            due.sort();
            assert_eq!(due, ["a", "b"]);
            r.finish("a", PromptEvent::Failed(ExecutionError::from_data(&json!({}))));
            assert_eq!(r.begin_reconcile(vec!["a".into(), "c".into()]), Vec::<String>::new());
        });
    }

    fn tokio_test_block(f: impl FnOnce()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async { f() });
    }
}
