//! `ComfyConnection`: the one long-lived WebSocket per ComfyUI server, its reconnect loop, liveness probe
//! and reconciliation of in-flight prompts: from `/api/jobs/{id}` on servers with the jobs API (one read
//! per prompt, 404 for an unknown one), from /queue then /history on older ones. The server's
//! [`Capabilities`] are detected again for every new socket (the server may have been replaced).
//!
//! Owns the socket lifecycle and the background tasks; delegates routing to [`super::router`] and HTTP
//! to [`super::ComfyClient`]. Knows nothing about jobs, gRPC or storage.
//!
//! # clientId policy (why not always reuse the same id)
//! ComfyUI routes a prompt's events to the socket registered under the prompt's `client_id`, and has a
//! bug (PROTOCOL.md, f2): when an *older* socket with the same clientId finally closes, its cleanup
//! unregisters the *newer* one, which then silently gets nothing. So:
//! - when the **server** ended the socket (EOF, reset, close frame: its handler is gone), we reconnect
//!   with the **same** clientId, so prompts already queued under it keep streaming to us (ComfyUI even
//!   re-sends the current `executing` node);
//! - when **we** abandon a socket (idle probe unanswered: half-dead, the server may still hold it and
//!   close it much later), we close it and reconnect with a **fresh** clientId, so a late cleanup of the
//!   old socket can never unroute the new one. Prompts queued under the old id become *orphans*: their
//!   events can no longer reach us, so they are polled from /queue + /history every `orphan_poll` until
//!   they end (outputs are recovered from history; live progress is lost for them).
//!
//! In both cases every in-flight prompt is reconciled once ComfyUI has registered the new socket (its
//! `status`+`sid` greeting: subscribe first, then read state), and a prompt silent for
//! `silence_reconcile` is reconciled even on a healthy socket.
//!
//! Unrouting is also detected directly: ComfyUI broadcasts `status` to every routed socket on each queue
//! change (and sends nothing at all to an unrouted one), so after one of our prompts is queued at least
//! one frame must arrive within `probe_timeout`. If none does, the socket is unrouted (the f2 bug, or a
//! half-dead socket) and is replaced under a fresh clientId.
//!
//! # Tasks
//! One supervisor task per connection (spawned by [`ComfyConnection::spawn`], instrumented with a span).
//! It owns the socket and a `JoinSet` of short reconcile tasks. Exit policy: it never exits on errors
//! (connect failures are retried forever with capped exponential backoff and jitter); it exits when the
//! cancellation token fires or every `ComfyConnection` clone is dropped, aborting its reconcile tasks and
//! ending every prompt stream (`recv()` → `None`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use super::capabilities::Capabilities;
use super::error::ComfyError;
use super::http::ComfyClient;
use super::messages::{PromptEvent, ServerMessage};
use super::router::{Followup, PromptEvents, Router};
use super::types::{HistoryEntry, HistoryStatus, QueuePrompt, QueuedPrompt};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One long-lived WebSocket per ComfyUI server, owning its reader task, reconnect loop and liveness
/// probe. Cheap to clone; the background task stops when `cancel` fires or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct ComfyConnection {
    shared: Arc<Shared>,
    owner: Arc<Owner>,
}

/// Owns the supervisor task: dropping the last `ComfyConnection` cancels it (it then stops by itself);
/// [`ComfyConnection::shutdown`] cancels and awaits it.
#[derive(Debug)]
struct Owner {
    _cancel_on_drop: DropGuard,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    client: ComfyClient,
    /// The connection's identity; the first socket's clientId.
    base_client_id: String,
    // A std Mutex: held only for synchronous routing, never across an await.
    router: Mutex<Router>,
    connected: watch::Sender<bool>,
    requests: mpsc::UnboundedSender<Request>,
    /// Greeted sockets so far (identifies the current socket in routing checks).
    generation: AtomicU64,
    /// Data frames (text/binary) received so far, on any socket. ComfyUI sends nothing at all, not even
    /// broadcasts, to a socket missing from its routing table, so each one proves the socket is routed.
    frames: AtomicU64,
    cancel: CancellationToken,
    connects: AtomicU64,
    /// `status.exec_info.queue_remaining` from the last `status` message.
    queue_remaining: watch::Sender<Option<u64>>,
    /// The `server` label of this connection's metrics.
    label: String,
}

impl Shared {
    /// Sets whether a socket is open, counting the change in the metrics.
    fn set_connected(&self, connected: bool) {
        if self.connected.send_replace(connected) != connected {
            crate::metrics::comfyui_connected(&self.label, connected);
        }
    }
}

impl Shared {
    fn router(&self) -> MutexGuard<'_, Router> {
        // A panic while holding the lock cannot leave routes half-updated in a way worse than losing
        // the lock, so recover the guard instead of propagating the poison.
        self.router.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a registered route unless disarmed (submit succeeded).
struct Registration<'a> {
    shared: &'a Shared,
    prompt_id: &'a str,
    armed: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.router().unregister(self.prompt_id);
        }
    }
}

/// Work for the supervisor from the public API.
#[derive(Debug)]
enum Request {
    /// Reconcile these prompts now.
    Reconcile(Vec<String>),
    /// A prompt was queued while socket `generation` was up and `frames` frames had been received: ComfyUI
    /// broadcasts `status` on every queue change to every routed socket, so one more frame must arrive.
    VerifyRouting { generation: u64, frames: u64 },
}

/// Why a socket session ended.
enum SessionEnd {
    Cancelled,
    /// The server closed or dropped the socket: its side is gone, the clientId can be reused.
    ServerGone(String),
    /// We gave up on a silent socket: the server may still hold it; use a fresh clientId.
    Abandoned,
}

impl ComfyConnection {
    /// Starts the connection task with a random clientId (`comfyrelay-<uuid>`). Must be called inside a
    /// Tokio runtime.
    pub fn spawn(client: ComfyClient, cancel: CancellationToken) -> Self {
        let id = format!("comfyrelay-{}", uuid::Uuid::new_v4().simple());
        Self::spawn_with_client_id(client, id, cancel)
    }

    /// Starts the connection task with a chosen clientId (e.g. stable across comfyrelay restarts, so
    /// prompts re-attached after a restart keep streaming).
    pub fn spawn_with_client_id(client: ComfyClient, client_id: String, cancel: CancellationToken) -> Self {
        Self::spawn_labelled(client, client_id, "unnamed".into(), cancel)
    }

    /// [`ComfyConnection::spawn_with_client_id`], with `label` as the `server` label of its metrics
    /// (connection state, reconnects, reconciles).
    pub fn spawn_labelled(
        client: ComfyClient,
        client_id: String,
        label: String,
        cancel: CancellationToken,
    ) -> Self {
        let cancel = cancel.child_token();
        let (connected, _) = watch::channel(false);
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            router: Mutex::new(Router::new(client_id.clone())),
            base_client_id: client_id,
            client,
            connected,
            requests,
            cancel: cancel.clone(),
            connects: AtomicU64::new(0),
            queue_remaining: watch::channel(None).0,
            generation: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            label,
        });
        let span = tracing::info_span!("comfy_connection", server = %shared.client.base_url(), client_id = %shared.base_client_id);
        let task = tokio::spawn(supervise(shared.clone(), requests_rx).instrument(span));
        let owner = Owner { _cancel_on_drop: cancel.drop_guard(), task: Mutex::new(Some(task)) };
        Self { shared, owner: Arc::new(owner) }
    }

    /// Stops the connection: closes the socket, ends every prompt stream (`recv()` → `None`) and waits for
    /// the background task to finish.
    pub async fn shutdown(&self) {
        self.shared.cancel.cancel();
        let task = self.owner.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            match task.await {
                Err(e) if e.is_panic() => tracing::error!(error = %e, "ComfyUI connection task panicked"),
                _ => {}
            }
        }
    }

    /// Waits until a socket is open.
    ///
    /// # Errors
    /// `NotConnected` after `timeout`; `Closed` when the connection was shut down.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), ComfyError> {
        let mut rx = self.shared.connected.subscribe();
        tokio::select! {
            biased;
            () = self.shared.cancel.cancelled() => Err(ComfyError::Closed),
            r = rx.wait_for(|c| *c) => r.map(drop).map_err(|_| ComfyError::Closed),
            () = sleep(timeout) => Err(ComfyError::NotConnected(timeout)),
        }
    }

    /// The connection's identity (the first socket's clientId). See [`ComfyConnection::socket_client_id`].
    pub fn client_id(&self) -> &str {
        &self.shared.base_client_id
    }

    /// The clientId of the current socket (differs from [`ComfyConnection::client_id`] after a half-dead
    /// socket was replaced; see the module docs).
    pub fn socket_client_id(&self) -> String {
        self.shared.router().socket_client_id().to_owned()
    }

    /// Whether a socket is open right now.
    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// ComfyUI's queue length (running + pending, all clients) from the last `status` message, updated
    /// live; `None` before the first one.
    pub fn queue_remaining(&self) -> watch::Receiver<Option<u64>> {
        self.shared.queue_remaining.subscribe()
    }

    /// How many sockets were opened so far (1 after the first connect).
    pub fn connects(&self) -> u64 {
        self.shared.connects.load(Ordering::Relaxed)
    }

    /// Prompts currently tracked.
    pub fn in_flight(&self) -> usize {
        self.shared.router().in_flight()
    }

    /// The HTTP client of this server.
    pub fn client(&self) -> &ComfyClient {
        &self.shared.client
    }

    /// The server's capabilities as detected for the current socket (`None` until detected; detection runs
    /// when a socket is greeted, and on first use by any call that needs it).
    pub fn capabilities(&self) -> Option<Arc<Capabilities>> {
        self.shared.client.cached_capabilities()
    }

    /// Registers the prompt's route FIRST, then POSTs /prompt with our `prompt_id` and the current socket's
    /// clientId, so events arriving before the HTTP answer are not lost. On any error nothing stays
    /// registered. The submit never queues the prompt twice (see [`ComfyClient::queue_prompt`]), and a
    /// non-canonical id is refused before anything is registered or sent.
    ///
    /// # Errors
    /// `InvalidPromptId`, `Validation` (HTTP 400, typed node errors), `Protocol` when `prompt_id` is already
    /// in flight here, `Closed` after shutdown, and every error of [`ComfyClient::queue_prompt`].
    pub async fn submit(
        &self,
        prompt_id: &str,
        graph: Value,
    ) -> Result<(QueuedPrompt, PromptEvents), ComfyError> {
        if self.shared.cancel.is_cancelled() {
            return Err(ComfyError::Closed);
        }
        super::http::check_prompt_id(prompt_id)?;
        let (client_id, events) = {
            let mut router = self.shared.router();
            let client_id = router.socket_client_id().to_owned();
            let events = router
                .register(prompt_id, Some(client_id.clone()), false)
                .map_err(|_| ComfyError::Protocol(format!("prompt {prompt_id} is already in flight")))?;
            (client_id, events)
        };
        // Unregisters on error, and also if the caller drops this future mid-POST.
        let mut registration = Registration { shared: &self.shared, prompt_id, armed: true };
        let generation = self.shared.generation.load(Ordering::SeqCst);
        let frames = self.shared.frames.load(Ordering::SeqCst);
        let req = QueuePrompt { prompt_id: prompt_id.to_owned(), graph, client_id };
        let queued = self.shared.client.queue_prompt(&req).await?;
        registration.armed = false;
        if self.shared.router().ack(prompt_id) {
            let _ = self.shared.requests.send(Request::Reconcile(vec![prompt_id.to_owned()]));
        }
        let _ = self.shared.requests.send(Request::VerifyRouting { generation, frames });
        Ok((queued, events))
    }

    /// Re-attaches to a prompt queued earlier (e.g. before a comfyrelay restart): registers the route and
    /// immediately reconciles from /queue then /history. A prompt that already finished yields its outputs
    /// and terminal event; one the server does not know ends in [`PromptEvent::Lost`]. Attaching to a
    /// prompt already in flight here gives a stream that only ends when the connection does.
    pub fn attach(&self, prompt_id: &str) -> PromptEvents {
        let events = {
            let mut router = self.shared.router();
            match router.register(prompt_id, None, true) {
                Ok(ev) => ev,
                Err(_) => {
                    tracing::warn!(prompt_id, "attach to a prompt already in flight on this connection");
                    return PromptEvents::closed(prompt_id);
                }
            }
        };
        let _ = self.shared.requests.send(Request::Reconcile(vec![prompt_id.to_owned()]));
        events
    }
}

/// The supervisor: connect, run a session, reconnect; see the module docs for the exit policy.
async fn supervise(shared: Arc<Shared>, mut requests: mpsc::UnboundedReceiver<Request>) {
    let options = shared.client.options().clone();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut failures: u32 = 0;
    let mut fresh_ids: u64 = 0;
    let mut client_id = shared.base_client_id.clone();
    loop {
        let connect = tokio::select! {
            () = shared.cancel.cancelled() => break,
            r = connect(&shared.client, &client_id) => r,
        };
        let mut ws = match connect {
            Ok(ws) => ws,
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = backoff_delay(&options, failures);
                tracing::warn!(error = %e, ?delay, "ComfyUI websocket connect failed");
                tokio::select! {
                    () = shared.cancel.cancelled() => break,
                    () = sleep(delay) => continue,
                }
            }
        };
        failures = 0;
        if shared.connects.fetch_add(1, Ordering::Relaxed) > 0 {
            crate::metrics::comfyui_reconnected(&shared.label);
        }
        // A new socket may face another build (the server restarted or was replaced): detect again.
        shared.client.invalidate_capabilities();
        // Feature flags must be the first message: they select preview frames with metadata (type 4).
        let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}).to_string();
        let sent = timeout(options.request_timeout, ws.send(Message::text(flags))).await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::warn!("sending feature_flags failed; reconnecting");
            drop(ws);
            tokio::select! {
                () = shared.cancel.cancelled() => break,
                () = sleep(backoff_delay(&options, 1)) => continue,
            }
        }
        // New prompts go to this socket from now on; in-flight ones are reconciled once ComfyUI has
        // registered the socket (its greeting), see `session`.
        shared.router().set_socket_client_id(&client_id);
        let end = session(&shared, &client_id, ws, &mut tasks, &mut requests).await;
        shared.set_connected(false);
        match end {
            SessionEnd::Cancelled => break,
            SessionEnd::ServerGone(why) => {
                tracing::warn!(reason = %why, "ComfyUI websocket lost; reconnecting with the same clientId");
            }
            SessionEnd::Abandoned => {
                fresh_ids += 1;
                client_id = format!("{}-{fresh_ids}", shared.base_client_id);
                tracing::warn!(new_client_id = %client_id, "ComfyUI websocket silent; replaced it, new clientId");
            }
        }
        tokio::select! {
            () = shared.cancel.cancelled() => break,
            () = sleep(backoff_delay(&options, 1)) => {}
        }
    }
    shared.set_connected(false);
    shared.router().close_all();
    tasks.shutdown().await;
    tracing::debug!("ComfyUI connection stopped");
}

fn backoff_delay(options: &super::ClientOptions, attempt: u32) -> Duration {
    let exp = options.backoff_min.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(options.backoff_max);
    // Jitter: uniformly in [50 %, 100 %] of the delay.
    capped.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

/// Opens `/ws?clientId=…` (credentials as a basic-auth header, never in a logged URL).
async fn connect(client: &ComfyClient, client_id: &str) -> Result<Ws, ComfyError> {
    let mut url = client.url(&["ws"]);
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme).map_err(|()| ComfyError::InvalidUrl("cannot derive the websocket URL".into()))?;
    url.query_pairs_mut().append_pair("clientId", client_id);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ComfyError::WebSocket(format!("bad websocket request: {e}")))?;
    if let Some((user, pass)) = client.credentials() {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{user}:{}", pass.as_deref().unwrap_or_default()));
        let value = format!("Basic {token}")
            .parse()
            .map_err(|_| ComfyError::InvalidUrl("credentials are not a valid header".into()))?;
        request.headers_mut().insert(http::header::AUTHORIZATION, value);
    }
    let after = client.options().request_timeout;
    let (ws, _) = timeout(after, tokio_tungstenite::connect_async(request))
        .await
        .map_err(|_| ComfyError::Timeout { operation: "websocket connect".into(), after })?
        .map_err(|e| match e {
            tungstenite::Error::Http(resp) => ComfyError::from_status(resp.status().as_u16(), "/ws", ""),
            other => ComfyError::WebSocket(other.to_string()),
        })?;
    Ok(ws)
}

/// Reads one socket until it ends; answers the idle probe, routes frames, runs reconciles.
async fn session(
    shared: &Arc<Shared>,
    client_id: &str,
    mut ws: Ws,
    tasks: &mut JoinSet<()>,
    requests: &mut mpsc::UnboundedReceiver<Request>,
) -> SessionEnd {
    let o = shared.client.options().clone();
    let tick_every = o.silence_reconcile.min(o.orphan_poll).max(Duration::from_millis(10)) / 2;
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_frame = Instant::now();
    let mut probe_sent: Option<Instant> = None;
    // ComfyUI registers a socket for routing only after the upgrade, then greets it with `status`+`sid`.
    // Until the greeting, events for our prompts may still go nowhere, so in-flight prompts are
    // reconciled (subscribe first, then read state) only once it arrived.
    let mut greeted = false;
    let greeting_deadline = Instant::now() + o.request_timeout;
    // Pending routing check: (deadline, status count to exceed).
    let mut verify: Option<(Instant, u64)> = None;
    let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        let deadline = match probe_sent {
            None => last_frame + o.idle_probe,
            Some(at) => at + o.probe_timeout,
        };
        tokio::select! {
            () = shared.cancel.cancelled() => {
                close(ws, o.probe_timeout).await;
                return SessionEnd::Cancelled;
            }
            frame = ws.next() => {
                let msg = match frame {
                    None => return SessionEnd::ServerGone("socket closed".into()),
                    Some(Err(e)) => return SessionEnd::ServerGone(e.to_string()),
                    Some(Ok(m)) => m,
                };
                last_frame = Instant::now();
                probe_sent = None;
                let parsed = match msg {
                    Message::Text(t) => ServerMessage::parse_text(&t),
                    Message::Binary(b) => ServerMessage::parse_binary(&b),
                    // Pongs are answered by the server's WebSocket layer, routed or not.
                    Message::Close(frame) => {
                        return SessionEnd::ServerGone(format!("close frame {frame:?}"));
                    }
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                };
                let seen = shared.frames.fetch_add(1, Ordering::SeqCst) + 1;
                if verify.is_some_and(|(_, mark)| seen > mark) {
                    verify = None;
                }
                match parsed {
                    Ok(m) => {
                        if let ServerMessage::Status { queue_remaining: Some(n), .. } = &m {
                            shared.queue_remaining.send_replace(Some(*n));
                        }
                        if !greeted
                            && let ServerMessage::Status { sid: Some(sid), .. } = &m {
                                greeted = true;
                                if sid != client_id {
                                    tracing::warn!(%sid, client_id, "ComfyUI greeted with another sid");
                                }
                                shared.generation.fetch_add(1, Ordering::SeqCst);
                                let due = shared.router().on_new_socket();
                                shared.set_connected(true);
                                tracing::info!(client_id, reconciling = due.len(), "ComfyUI websocket connected");
                                let client = shared.client.clone();
                                let span = tracing::debug_span!("detect_capabilities");
                                tasks.spawn(async move {
                                    if let Err(e) = client.capabilities().await {
                                        tracing::debug!(error = %e, "capability detection failed; retried on next use");
                                    }
                                }.instrument(span));
                                spawn_reconcile(shared, tasks, due);
                            }
                        let follow = shared.router().handle(m);
                        if let Some(f) = follow {
                            followup(shared, tasks, f);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "ignoring unparseable ComfyUI frame"),
                }
            }
            () = sleep_until(greeting_deadline), if !greeted => {
                tracing::warn!("no greeting from ComfyUI on the new socket; replacing it");
                close(ws, o.probe_timeout).await;
                return SessionEnd::Abandoned;
            }
            () = sleep_until(deadline) => {
                if probe_sent.is_some() {
                    tracing::warn!(idle = ?o.idle_probe, "idle probe unanswered: the socket is half-dead");
                    close(ws, o.probe_timeout).await;
                    return SessionEnd::Abandoned;
                }
                // ComfyUI never pings; aiohttp answers ours automatically.
                let sent = timeout(o.probe_timeout, ws.send(Message::Ping(Default::default()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    close(ws, o.probe_timeout).await;
                    return SessionEnd::Abandoned;
                }
                probe_sent = Some(Instant::now());
            }
            Some(request) = requests.recv() => match request {
                Request::Reconcile(ids) => spawn_reconcile(shared, tasks, ids),
                Request::VerifyRouting { generation, frames } => {
                    let current = greeted && generation == shared.generation.load(Ordering::SeqCst);
                    if current && verify.is_none() && shared.frames.load(Ordering::SeqCst) <= frames {
                        verify = Some((Instant::now() + o.probe_timeout, frames));
                    }
                }
            },
            () = sleep_until(verify.map_or(far_future, |(at, _)| at)), if verify.is_some() => {
                let mark = verify.map_or(0, |(_, m)| m);
                if shared.frames.load(Ordering::SeqCst) <= mark {
                    // The f2 bug (an older socket's cleanup removed our registration) or any other
                    // unrouting: this socket will never get events. Replace it under a fresh clientId.
                    tracing::warn!("no frame after our prompt was queued: the socket is not routed");
                    close(ws, o.probe_timeout).await;
                    return SessionEnd::Abandoned;
                }
                verify = None;
            }
            _ = tick.tick() => {
                let due = shared.router().due(Instant::now(), o.silence_reconcile, o.orphan_poll);
                spawn_reconcile_marked(shared, tasks, due);
            }
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                match res {
                    Err(e) if e.is_panic() => tracing::error!(error = %e, "a reconcile task panicked"),
                    _ => {}
                }
            }
        }
    }
}

/// Closes a socket fully: close handshake (bounded), then the TCP connection is dropped.
async fn close(mut ws: Ws, within: Duration) {
    let _ = timeout(within, ws.close(None)).await;
    drop(ws);
}

fn followup(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, f: Followup) {
    match f {
        Followup::Reconcile(id) => {
            let ids = shared.router().begin_reconcile(vec![id]);
            spawn_reconcile_marked(shared, tasks, ids);
        }
        Followup::ConfirmSuccess(id) => {
            let shared = shared.clone();
            let span = tracing::debug_span!("confirm_success", prompt_id = %id);
            tasks.spawn(async move { confirm_success(&shared, &id).await }.instrument(span));
        }
    }
}

/// Marks `ids` as reconciling (skipping those already being reconciled) and spawns the round.
fn spawn_reconcile(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, ids: Vec<String>) {
    let ids = shared.router().begin_reconcile(ids);
    spawn_reconcile_marked(shared, tasks, ids);
}

fn spawn_reconcile_marked(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, ids: Vec<String>) {
    if ids.is_empty() {
        return;
    }
    crate::metrics::comfyui_reconciled(&shared.label, ids.len());
    let shared = shared.clone();
    let span = tracing::debug_span!("reconcile", prompts = ids.len());
    tasks.spawn(async move { reconcile(&shared, ids).await }.instrument(span));
}

/// Reconciles prompts from /queue first, then /history (a prompt finishing between the two reads is in
/// the second), and re-checks both before declaring a prompt lost. Failures of the reads leave the
/// prompts in flight (they are retried by the next round).
async fn reconcile(shared: &Arc<Shared>, ids: Vec<String>) {
    let missing = check_round(shared, &ids).await;
    if missing.is_empty() {
        return;
    }
    // Re-check: never conclude "gone" from one pair of reads.
    sleep(shared.client.options().backoff_min).await;
    for id in check_round(shared, &missing).await {
        tracing::warn!(prompt_id = %id, "prompt is neither queued nor in history: lost");
        shared.router().finish(
            &id,
            PromptEvent::Lost {
                reason: "ComfyUI no longer knows the prompt (not queued, no history entry): the server \
                         restarted or the prompt died without reporting an error"
                    .to_owned(),
            },
        );
    }
}

/// One round of reads: `/queue`, then `/history` for each prompt not queued. Prompts found are settled
/// (still in flight, or finished from their history entry); returns those found in neither. A failed read
/// leaves its prompts in flight for the next round.
async fn check_round(shared: &Arc<Shared>, ids: &[String]) -> Vec<String> {
    let client = &shared.client;
    match client.capabilities().await {
        Ok(caps) if caps.jobs_api => return check_round_jobs(shared, ids).await,
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, "reconcile: capability detection failed; will retry");
            end_all(shared, ids);
            return Vec::new();
        }
    }
    let queue = match client.queue().await {
        Ok(q) => q,
        Err(e) => {
            tracing::debug!(error = %e, "reconcile: /queue failed; will retry");
            end_all(shared, ids);
            return Vec::new();
        }
    };
    let mut missing = Vec::new();
    for id in ids {
        if queue.contains(id) {
            shared.router().end_reconcile(id, queue.running.contains(id));
            continue;
        }
        match client.history(id).await {
            Ok(Some(entry)) => {
                if !shared.router().apply_history(entry) {
                    shared.router().end_reconcile(id, false);
                }
            }
            Ok(None) => missing.push(id.clone()),
            Err(e) => {
                tracing::debug!(prompt_id = %id, error = %e, "reconcile: /history failed; will retry");
                shared.router().end_reconcile(id, false);
            }
        }
    }
    missing
}

/// One round with the jobs API: one `GET /api/jobs/{id}` per prompt, which answers pending, running, ended
/// (with outputs and status messages: the history entry) or 404. Returns the 404s.
async fn check_round_jobs(shared: &Arc<Shared>, ids: &[String]) -> Vec<String> {
    let mut missing = Vec::new();
    for id in ids {
        let job = match shared.client.job_once(id).await {
            Ok(Some(job)) => job,
            Ok(None) => {
                missing.push(id.clone());
                continue;
            }
            Err(e) => {
                tracing::debug!(prompt_id = %id, error = %e, "reconcile: /api/jobs failed; will retry");
                shared.router().end_reconcile(id, false);
                continue;
            }
        };
        match job.get("status").and_then(serde_json::Value::as_str) {
            Some("pending") => shared.router().end_reconcile(id, false),
            Some("in_progress") => shared.router().end_reconcile(id, true),
            _ => match HistoryEntry::from_job(id, &job) {
                Ok(Some(entry)) => {
                    if !shared.router().apply_history(entry) {
                        shared.router().end_reconcile(id, false);
                    }
                }
                Ok(None) => shared.router().end_reconcile(id, false),
                Err(e) => {
                    tracing::debug!(prompt_id = %id, error = %e, "reconcile: unreadable job; will retry");
                    shared.router().end_reconcile(id, false);
                }
            },
        }
    }
    missing
}

fn end_all(shared: &Arc<Shared>, ids: &[String]) {
    let mut router = shared.router();
    for id in ids {
        router.end_reconcile(id, false);
    }
}

/// `execution_success` for a prompt that lived through a reconnect: read its history entry (retrying
/// briefly: success can reach us before history is written) so every output is emitted before the
/// terminal event. If history never shows it, the socket's word is taken and `Succeeded` is sent.
async fn confirm_success(shared: &Arc<Shared>, id: &str) {
    let mut delay = Duration::from_millis(20);
    for _ in 0..8 {
        match shared.client.history(id).await {
            Ok(Some(entry)) if entry.status != HistoryStatus::Incomplete => {
                shared.router().apply_history(entry);
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "history read while confirming success failed"),
        }
        sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
    tracing::warn!(prompt_id = id, "success not found in history; trusting the websocket");
    shared.router().finish(id, PromptEvent::Succeeded);
}
