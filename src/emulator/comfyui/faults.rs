//! Scriptable fault injection for one emulator instance. Tests flip these switches; the socket table,
//! the worker, the executor and the HTTP layer consult them. Knows nothing about ComfyUI semantics.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `usize::MAX` means "no drop scheduled".
const NO_DROP: usize = usize::MAX;

#[derive(Debug, Default)]
struct Settings {
    fail_nodes: HashMap<String, String>,
    vanish_next: bool,
    history_delay: Duration,
    upload_delay: Duration,
    fail_http: Vec<(String, usize)>,
    node_delay: Duration,
    node_progress_steps: u64,
    wedged: HashMap<String, Wedge>,
    blockers: HashMap<String, String>,
    loading: Duration,
    lost_answers: Vec<LostAnswer>,
}

/// A wedged node class (see [`Faults::wedge_node`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wedge {
    /// How long such a node runs.
    pub(crate) bound: Duration,
    /// Whether a `/free` makes it honour interrupts again.
    pub(crate) freed_by_free: bool,
}

/// How the answer to a `POST /prompt` is lost *after* the prompt was queued (see
/// [`Faults::lose_prompt_answers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostAnswer {
    /// The connection is cut after the response head: the client sees a transport error reading the body.
    Cut,
    /// No answer for this long (the client's request timeout should fire first), then the normal one.
    Hang(Duration),
    /// A plain-text 500, as a proxy in front of ComfyUI gives when the upstream answer was lost.
    ServerError,
}

/// The fault switches of one emulator (interior mutability; every method takes `&self`).
#[derive(Debug)]
pub struct Faults {
    settings: Mutex<Settings>,
    silent: AtomicBool,
    silent_tx: watch::Sender<bool>,
    drop_after: AtomicUsize,
    /// Cancelled to drop every socket that is open now; replaced by a fresh token for later sockets.
    kill: Mutex<CancellationToken>,
    /// Send times of binary frames while recording (benchmarks measure how far a relay lags behind).
    frame_times: Mutex<Option<Vec<std::time::Instant>>>,
    /// Queued prompts wait in the queue (see [`super::ComfyEmulator::hold_queue`]).
    queue_held: AtomicBool,
}

impl Faults {
    pub(crate) fn new() -> Self {
        let (silent_tx, _) = watch::channel(false);
        Faults {
            settings: Mutex::new(Settings::default()),
            silent: AtomicBool::new(false),
            silent_tx,
            drop_after: AtomicUsize::new(NO_DROP),
            kill: Mutex::new(CancellationToken::new()),
            frame_times: Mutex::new(None),
            queue_held: AtomicBool::new(false),
        }
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After `n_messages` more WebSocket messages are sent (to any socket), every socket is dropped
    /// without a close frame. `0` drops at once.
    pub fn drop_sockets_after(&self, n_messages: usize) {
        if n_messages == 0 {
            self.drop_sockets_now();
        } else {
            self.drop_after.store(n_messages, Ordering::SeqCst);
        }
    }

    /// Drops every open WebSocket now, without a close frame (the peer sees an abrupt EOF).
    pub fn drop_sockets_now(&self) {
        self.drop_after.store(NO_DROP, Ordering::SeqCst);
        let mut kill = self.kill.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        kill.cancel();
        *kill = CancellationToken::new();
    }

    /// Keeps sockets open but sends nothing and reads nothing (client pings go unanswered): a half-dead
    /// connection. Messages produced meanwhile are lost.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
        self.silent_tx.send_replace(silent);
    }

    /// Every execution of `class_type` raises `execution_error` with `message` until cleared.
    pub fn fail_node(&self, class_type: &str, message: &str) {
        self.settings().fail_nodes.insert(class_type.to_string(), message.to_string());
    }

    /// The next prompt the worker takes disappears: no more WebSocket messages about it, absent from
    /// `/queue` and `/history`, no error.
    pub fn vanish_next_prompt(&self) {
        self.settings().vanish_next = true;
    }

    /// Delays every `/history` response by `d`.
    pub fn set_history_delay(&self, d: Duration) {
        self.settings().history_delay = d;
    }

    /// Delays every upload (`/upload/image`, `/upload/mask`) by `d` before it is read.
    pub fn set_upload_delay(&self, d: Duration) {
        self.settings().upload_delay = d;
    }

    pub(crate) fn upload_delay(&self) -> Duration {
        self.settings().upload_delay
    }

    /// The next `count` requests whose path starts with `path_prefix` (with or without the `/api` prefix)
    /// get ComfyUI's plain-text 500.
    pub fn fail_http(&self, path_prefix: &str, count: usize) {
        self.settings().fail_http.push((path_prefix.to_string(), count));
    }

    /// Each executed (uncached) node takes at least `d`.
    pub fn set_node_delay(&self, d: Duration) {
        self.settings().node_delay = d;
    }

    /// During a node delay, report `steps` `progress` updates (0..steps of steps), as a sampler would.
    /// Interrupts are honoured at each step.
    pub fn set_node_progress_steps(&self, steps: u64) {
        self.settings().node_progress_steps = steps;
    }

    /// Nodes of `class_type` ignore interrupts (a node stuck in a CUDA call or a custom node's busy loop): such a
    /// node runs for `bound` and does not look at the interrupt flag until `/free` (with `unload_models` or
    /// `free_memory`) is posted; from then on it honours interrupts again. After `bound` it finishes normally,
    /// so a test that never frees it still ends. A restart or shutdown of the emulator abandons it.
    pub fn wedge_node(&self, class_type: &str, bound: Duration) {
        self.settings().wedged.insert(class_type.to_string(), Wedge { bound, freed_by_free: true });
    }

    /// Like [`Faults::wedge_node`], but `/free` does not release it either (a driver call that only a restart
    /// of the machine ends): the node ignores every interrupt for `bound`, then finishes normally.
    pub fn wedge_node_past_free(&self, class_type: &str, bound: Duration) {
        self.settings().wedged.insert(class_type.to_string(), Wedge { bound, freed_by_free: false });
    }

    /// Nodes of `class_type` output an `ExecutionBlocker(message)` instead of their results (as a switch
    /// node does). The node that receives it sends `execution_error` with `exception_type: "ExecutionBlocked"`
    /// (not terminal: the prompt goes on and ends with `execution_success`); nodes further down are blocked
    /// silently and blocked output nodes produce no output.
    pub fn block_outputs_of(&self, class_type: &str, message: &str) {
        self.settings().blockers.insert(class_type.to_string(), message.to_string());
    }

    /// Each executed node first spends `d` "loading" (moving weights to VRAM). The 0.38 generation reports it
    /// as `activity: "loading"` in `progress_state`; 0.3.64 just takes longer.
    pub fn set_node_loading(&self, d: Duration) {
        self.settings().loading = d;
    }

    /// The answers to the next `count` accepted `POST /prompt`s are lost as `how` says, **after** the prompt
    /// was queued (so a blind retry queues it twice: ComfyUI has no duplicate check).
    pub fn lose_prompt_answers(&self, count: usize, how: LostAnswer) {
        self.settings().lost_answers.extend(std::iter::repeat_n(how, count));
    }

    /// Removes every fault (a silent emulator starts talking again; a scheduled drop is cancelled).
    pub fn clear(&self) {
        *self.settings() = Settings::default();
        self.drop_after.store(NO_DROP, Ordering::SeqCst);
        self.set_silent(false);
    }

    pub(crate) fn set_queue_held(&self, held: bool) {
        self.queue_held.store(held, Ordering::SeqCst);
    }

    pub(crate) fn is_queue_held(&self) -> bool {
        self.queue_held.load(Ordering::SeqCst)
    }

    pub(crate) fn is_silent(&self) -> bool {
        self.silent.load(Ordering::SeqCst)
    }

    pub(crate) fn silent_watch(&self) -> watch::Receiver<bool> {
        self.silent_tx.subscribe()
    }

    /// The token a newly opened socket watches.
    pub(crate) fn kill_token(&self) -> CancellationToken {
        self.kill.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Counts one sent message for `drop_sockets_after`.
    /// Starts (or stops) recording the send time of every binary frame (previews, websocket images), at
    /// most 100 000; [`Faults::take_frame_times`] returns them. Not a fault: an instrument for benchmarks.
    pub fn record_frame_times(&self, on: bool) {
        *self.frame_times.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = on.then(Vec::new);
    }

    /// The binary frames' send times recorded since the last call, oldest first.
    pub fn take_frame_times(&self) -> Vec<std::time::Instant> {
        let mut times = self.frame_times.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        times.as_mut().map(std::mem::take).unwrap_or_default()
    }

    pub(crate) fn note_binary_sent(&self) {
        let mut times = self.frame_times.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = times.as_mut()
            && t.len() < 100_000
        {
            t.push(std::time::Instant::now());
        }
    }

    pub(crate) fn note_sent(&self) {
        let prev = self.drop_after.load(Ordering::SeqCst);
        if prev == NO_DROP {
            return;
        }
        if self
            .drop_after
            .compare_exchange(prev, prev.saturating_sub(1), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            && prev <= 1
        {
            self.drop_sockets_now();
        }
    }

    pub(crate) fn node_failure(&self, class_type: &str) -> Option<String> {
        self.settings().fail_nodes.get(class_type).cloned()
    }

    /// Consumes the vanish flag.
    pub(crate) fn take_vanish(&self) -> bool {
        std::mem::take(&mut self.settings().vanish_next)
    }

    pub(crate) fn history_delay(&self) -> Duration {
        self.settings().history_delay
    }

    pub(crate) fn node_delay(&self) -> (Duration, u64) {
        let s = self.settings();
        (s.node_delay, s.node_progress_steps)
    }

    /// How a node of `class_type` is wedged, if it is.
    pub(crate) fn wedge(&self, class_type: &str) -> Option<Wedge> {
        self.settings().wedged.get(class_type).copied()
    }

    /// The blocker message nodes of `class_type` output, if any.
    pub(crate) fn blocker(&self, class_type: &str) -> Option<String> {
        self.settings().blockers.get(class_type).cloned()
    }

    pub(crate) fn node_loading(&self) -> Duration {
        self.settings().loading
    }

    /// Consumes one scripted lost answer.
    pub(crate) fn take_lost_answer(&self) -> Option<LostAnswer> {
        let mut s = self.settings();
        (!s.lost_answers.is_empty()).then(|| s.lost_answers.remove(0))
    }

    /// Whether this request should get a scripted 500 (consumes one count).
    pub(crate) fn take_http_failure(&self, path: &str) -> bool {
        let stripped = path.strip_prefix("/api").filter(|p| p.starts_with('/'));
        let mut s = self.settings();
        for (prefix, count) in s.fail_http.iter_mut() {
            if *count > 0
                && (path.starts_with(prefix.as_str())
                    || stripped.is_some_and(|p| p.starts_with(prefix.as_str())))
            {
                *count -= 1;
                return true;
            }
        }
        s.fail_http.retain(|(_, c)| *c > 0);
        false
    }
}
