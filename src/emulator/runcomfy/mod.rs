//! An emulated RunComfy Server API: launch, status flow, auth, rate limits and billing, with faults. Each
//! launched machine is an emulated ComfyUI on its own port.
//!
//! Shapes and behaviour follow `shared/reference/runcomfy-api.md` §1 and its emulator guidance (§3):
//! `Starting` → (boot time) → `Ready` (with `main_service_url`, `service_ready_at`,
//! `estimated_stopping_at = ready + estimated_duration`) → `Deleting` (after DELETE, or by itself at
//! `estimated_stopping_at`) → gone (404, absent from the list). Billing runs from Ready until DELETE
//! returns or the machine stops itself. Where the reference says UNKNOWN, the choice made here is written
//! next to it. All timing uses `tokio::time`, so tests can run days of machine time under
//! `tokio::time::pause()`.
//!
//! This module imitates the external service only; it must not know comfyrelay's client or pool (it
//! writes its own JSON rather than reuse the client's models, so the two check each other).

mod faults;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, info, warn};

pub use self::faults::{LaunchFailure, RunComfyFaults};
use self::faults::{MachinePlan, RequestFault};
use crate::emulator::comfyui::{ComfyEmulator, EmulatorConfig};

/// The user id the default configuration serves.
pub const DEFAULT_USER_ID: &str = "5e1f6c7a-0000-4000-8000-00000000e001";
/// The API token the default configuration accepts.
pub const DEFAULT_TOKEN: &str = "rc_emulator_token";
/// The workflow version the default configuration lists.
pub const DEFAULT_WORKFLOW_VERSION_ID: &str = "5e1f6c7a-0000-4000-8000-00000000f001";
/// The documented `server_type` values; others are rejected with 400.
pub const SERVER_TYPES: [&str; 5] = ["medium", "large", "extra-large", "2x-large", "2xl-turbo"];

/// A cloud-saved workflow the emulator lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulatedWorkflow {
    /// `workflow_id`.
    pub workflow_id: String,
    /// `workflow_name`.
    pub workflow_name: String,
    /// `version_id` (what launches name as `workflow_version_id`).
    pub version_id: String,
}

/// Emulator settings. `Default` serves [`DEFAULT_USER_ID`] with [`DEFAULT_TOKEN`], boots machines in 2 s
/// and allows 1 request/s with bursts of 3.
#[derive(Clone)]
pub struct RunComfyEmulatorConfig {
    /// The one account served; any other user id in the path gets 403.
    pub user_id: String,
    /// Accepted Bearer tokens (the dashboard shows two, for rotation).
    pub tokens: Vec<String>,
    /// Launch → Ready (the real API takes 1–5 minutes).
    pub boot_time: Duration,
    /// `Deleting` → gone.
    pub deleting_time: Duration,
    /// Requests per second per account (documented: 1).
    pub requests_per_second: u32,
    /// Burst allowance (documented only as "some bursts allowed").
    pub burst: u32,
    /// Send `Retry-After` on 429 (the reference does not know whether RunComfy does).
    pub send_retry_after: bool,
    /// The workflows listed.
    pub workflows: Vec<EmulatedWorkflow>,
    /// Launch any `workflow_version_id`, not only listed ones.
    pub accept_unknown_workflow_versions: bool,
    /// Settings for each machine's ComfyUI.
    pub comfyui: EmulatorConfig,
}

impl Default for RunComfyEmulatorConfig {
    fn default() -> Self {
        Self {
            user_id: DEFAULT_USER_ID.into(),
            tokens: vec![DEFAULT_TOKEN.into()],
            boot_time: Duration::from_secs(2),
            deleting_time: Duration::from_secs(1),
            requests_per_second: 1,
            burst: 3,
            send_retry_after: true,
            workflows: vec![EmulatedWorkflow {
                workflow_id: "5e1f6c7a-0000-4000-8000-00000000d001".into(),
                workflow_name: "comfyrelay emulated workflow".into(),
                version_id: DEFAULT_WORKFLOW_VERSION_ID.into(),
            }],
            accept_unknown_workflow_versions: true,
            comfyui: EmulatorConfig::default(),
        }
    }
}

impl fmt::Debug for RunComfyEmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunComfyEmulatorConfig")
            .field("user_id", &self.user_id)
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("boot_time", &self.boot_time)
            .field("deleting_time", &self.deleting_time)
            .field("requests_per_second", &self.requests_per_second)
            .field("burst", &self.burst)
            .field("send_retry_after", &self.send_retry_after)
            .field("workflows", &self.workflows)
            .field("accept_unknown_workflow_versions", &self.accept_unknown_workflow_versions)
            .field("comfyui", &self.comfyui)
            .finish()
    }
}

/// A machine as the emulator sees it, for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineInfo {
    /// `server_id`.
    pub server_id: String,
    /// `server_type`.
    pub server_type: String,
    /// The version it was launched with.
    pub workflow_version_id: String,
    /// `Starting`, `Ready`, `Deleting` or `Gone`.
    pub status: &'static str,
    /// The ComfyUI URL once Ready.
    pub main_service_url: Option<String>,
    /// Whether its ComfyUI is serving.
    pub comfyui_running: bool,
    /// Billed time so far (Ready → DELETE or stop).
    pub billed: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Deleting,
    Gone,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "Starting",
            Self::Ready => "Ready",
            Self::Deleting => "Deleting",
            Self::Gone => "Gone",
        }
    }
}

#[derive(Debug)]
struct Machine {
    id: String,
    seq: u64,
    workflow_version_id: String,
    server_type: String,
    duration_secs: u64,
    phase: Phase,
    ready_at: Option<Instant>,
    billing_end: Option<Instant>,
    comfy: Option<ComfyEmulator>,
    url: Option<String>,
    not_found_left: usize,
    wake: Arc<Notify>,
}

impl Machine {
    fn stop_at(&self) -> Option<Instant> {
        self.ready_at.map(|r| r + Duration::from_secs(self.duration_secs))
    }

    fn billed(&self, now: Instant) -> Duration {
        match self.ready_at {
            Some(ready) => self.billing_end.unwrap_or(now).saturating_duration_since(ready),
            None => Duration::ZERO,
        }
    }
}

struct Shared {
    config: RunComfyEmulatorConfig,
    /// Maps `tokio::time` instants to wall-clock timestamps (so paused time shows in the JSON too).
    epoch: (Instant, SystemTime),
    limiter: Mutex<TokenBucket>,
    faults: RunComfyFaults,
    machines: Mutex<HashMap<String, Machine>>,
    next_seq: AtomicU64,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    /// Launch requests received and not answered yet.
    launches_in_flight: AtomicU64,
    /// Server ids that were sent a DELETE (accepted by auth), in order.
    deletes: Mutex<Vec<String>>,
    /// Owns every machine lifecycle task; they stop on `cancel`.
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Shared {
    fn machines(&self) -> MutexGuard<'_, HashMap<String, Machine>> {
        // The map stays consistent even if a holder panicked.
        self.machines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wall(&self, at: Instant) -> String {
        let wall = self.epoch.1 + at.saturating_duration_since(self.epoch.0);
        humantime::format_rfc3339_micros(wall).to_string()
    }

    fn server_json(&self, m: &Machine) -> Value {
        let status = match m.phase {
            Phase::Gone => "Deleting",
            p => p.as_str(),
        };
        json!({
            "server_id": m.id,
            "estimated_duration": m.duration_secs,
            "server_type": m.server_type,
            "user_id": self.config.user_id,
            "main_service_url": m.url,
            "current_status": status,
            "service_ready_at": m.ready_at.map(|r| self.wall(r)),
            "estimated_stopping_at": m.stop_at().map(|s| self.wall(s)),
        })
    }

    fn info(&self, m: &Machine, now: Instant) -> MachineInfo {
        MachineInfo {
            server_id: m.id.clone(),
            server_type: m.server_type.clone(),
            workflow_version_id: m.workflow_version_id.clone(),
            status: m.phase.as_str(),
            main_service_url: m.url.clone(),
            comfyui_running: m.comfy.is_some(),
            billed: m.billed(now),
        }
    }
}

/// The account's rate limit as the provider would enforce it: a bucket of `burst` requests, refilled at
/// `per_second`. The emulator's own, written apart from the client's limiter (`governor`), so that the
/// two check each other rather than agree by construction.
#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    capacity: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(per_second: u32, burst: u32) -> Self {
        let capacity = f64::from(burst.max(1));
        Self { per_second: f64::from(per_second.max(1)), capacity, tokens: capacity, at: Instant::now() }
    }

    /// Takes one request's token: zero if admitted, else how long until a token is there.
    fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.at = now;
        // A hair of slack so a client pacing itself at exactly the rate is not refused by rounding.
        if self.tokens >= 1.0 - 1e-6 {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.per_second)
    }
}

/// A running emulated RunComfy Server API (`Arc` inside; cheap to clone). It stops serving, and stops every
/// machine's ComfyUI, on [`RunComfyEmulator::shutdown`] or when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct RunComfyEmulator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        if let Some(server) = self.server.lock().unwrap_or_else(|e| e.into_inner()).take() {
            server.abort();
        }
        // Dropping the last handle of each machine's ComfyUI stops it.
        for m in self.shared.machines().values_mut() {
            m.comfy = None;
        }
    }
}

impl RunComfyEmulator {
    /// Serves the Server API on an already-bound listener (tests bind 127.0.0.1:0).
    ///
    /// # Errors
    /// The listener's address cannot be read.
    pub async fn start(listener: TcpListener, config: RunComfyEmulatorConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            limiter: Mutex::new(TokenBucket::new(config.requests_per_second, config.burst)),
            config,
            epoch: (Instant::now(), SystemTime::now()),
            faults: RunComfyFaults::default(),
            machines: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            launches_in_flight: AtomicU64::new(0),
            deletes: Mutex::new(Vec::new()),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        });
        let app = router(shared.clone());
        let span = tracing::info_span!("runcomfy_emulator", %addr);
        // Exit policy: serves until aborted by `shutdown`/drop; a serve error is logged and ends it.
        let server = tokio::spawn(
            async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(error = %e, "emulated RunComfy API stopped serving");
                }
            }
            .instrument(span),
        );
        Ok(Self { inner: Arc::new(Inner { shared, addr, server: Mutex::new(Some(server)) }) })
    }

    /// The base URL to give the client (`http://127.0.0.1:PORT`); paths start with `/prod/api/users/...`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The account's user id.
    pub fn user_id(&self) -> &str {
        &self.inner.shared.config.user_id
    }

    /// Fault injection.
    pub fn faults(&self) -> &RunComfyFaults {
        &self.inner.shared.faults
    }

    /// Every machine ever launched (gone ones included), in launch order.
    pub fn machines(&self) -> Vec<MachineInfo> {
        let now = Instant::now();
        let machines = self.inner.shared.machines();
        let mut list: Vec<&Machine> = machines.values().collect();
        list.sort_by_key(|m| m.seq);
        list.into_iter().map(|m| self.inner.shared.info(m, now)).collect()
    }

    /// Machines still running (`Starting` or `Ready`), in launch order.
    pub fn running_machines(&self) -> Vec<MachineInfo> {
        self.machines().into_iter().filter(|m| matches!(m.status, "Starting" | "Ready")).collect()
    }

    /// How many machines were ever launched.
    pub fn machines_launched(&self) -> usize {
        self.inner.shared.machines().len()
    }

    /// Billed seconds of one machine so far (Ready → DELETE or stop); `None` for an unknown id.
    pub fn billed_seconds(&self, server_id: &str) -> Option<f64> {
        let now = Instant::now();
        self.inner.shared.machines().get(server_id).map(|m| m.billed(now).as_secs_f64())
    }

    /// Billed seconds of every machine so far.
    pub fn total_billed_seconds(&self) -> f64 {
        let now = Instant::now();
        self.inner.shared.machines().values().map(|m| m.billed(now).as_secs_f64()).sum()
    }

    /// API requests received (all of them, including refused ones).
    pub fn requests_received(&self) -> u64 {
        self.inner.shared.requests.load(Ordering::Relaxed)
    }

    /// 429 answers sent (rate limit and injected).
    pub fn rate_limited_responses(&self) -> u64 {
        self.inner.shared.rate_limited.load(Ordering::Relaxed)
    }

    /// The ComfyUI of a Ready machine, e.g. to inject ComfyUI faults.
    pub fn comfyui(&self, server_id: &str) -> Option<ComfyEmulator> {
        self.inner.shared.machines().get(server_id).and_then(|m| m.comfy.clone())
    }

    /// Launch requests received and not answered yet (e.g. held by [`LaunchFailure::Stalled`]).
    pub fn launches_in_flight(&self) -> u64 {
        self.inner.shared.launches_in_flight.load(Ordering::Relaxed)
    }

    /// Server ids that were sent a DELETE through the API, in order (repeats included).
    pub fn delete_requests(&self) -> Vec<String> {
        self.inner.shared.deletes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Launches a machine on the account the way another client of the same account would (not through
    /// this API, so it costs no request and meets no fault). Returns its server id.
    ///
    /// # Panics
    /// An unknown `server_type` (one of [`SERVER_TYPES`]).
    pub fn launch_by_someone_else(
        &self,
        workflow_version_id: &str,
        server_type: &str,
        duration: Duration,
    ) -> String {
        assert!(SERVER_TYPES.contains(&server_type), "unknown server type {server_type}");
        let shared = &self.inner.shared;
        let (id, _) = create_machine(
            shared,
            workflow_version_id,
            server_type,
            duration.as_secs().max(1),
            MachinePlan::default(),
        );
        id
    }

    /// Deletes a machine the way another client of the account would (no request counted). Returns whether
    /// it was running.
    pub async fn delete_by_someone_else(&self, server_id: &str) -> bool {
        let comfy = {
            let mut machines = self.inner.shared.machines();
            let Some(m) = machines.get_mut(server_id) else { return false };
            if !matches!(m.phase, Phase::Starting | Phase::Ready) {
                return false;
            }
            if m.phase == Phase::Ready {
                m.billing_end = Some(Instant::now());
            }
            m.phase = Phase::Deleting;
            m.wake.notify_one();
            m.comfy.take()
        };
        if let Some(c) = comfy {
            c.shutdown().await;
        }
        true
    }

    /// The provider loses a machine's record: from now on the API answers 404 for it and no longer lists
    /// it, and bills nothing more, while its ComfyUI keeps answering (until [`RunComfyEmulator::kill_machine`]
    /// or shutdown). Returns whether the machine was known and not gone.
    pub fn forget_machine(&self, server_id: &str) -> bool {
        let mut machines = self.inner.shared.machines();
        let Some(m) = machines.get_mut(server_id) else { return false };
        if m.phase == Phase::Gone {
            return false;
        }
        if m.phase == Phase::Ready {
            m.billing_end = Some(Instant::now());
        }
        m.phase = Phase::Gone;
        m.wake.notify_one();
        warn!(server_id, "the emulated provider lost a machine's record");
        true
    }

    /// Kills a machine's ComfyUI while the API keeps reporting it `Ready` (and billing it) until it is
    /// deleted or its duration runs out. Returns whether there was a ComfyUI to kill.
    pub async fn kill_machine(&self, server_id: &str) -> bool {
        kill(&self.inner.shared, server_id).await
    }

    /// Stops serving the API and stops every machine's ComfyUI.
    pub async fn shutdown(&self) {
        let shared = &self.inner.shared;
        shared.cancel.cancel();
        let server = self.inner.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(server) = server {
            server.abort();
            let _ = server.await;
        }
        shared.tasks.close();
        shared.tasks.wait().await;
        let comfys: Vec<ComfyEmulator> =
            shared.machines().values_mut().filter_map(|m| m.comfy.take()).collect();
        for c in comfys {
            c.shutdown().await;
        }
    }
}

/// Keeps a timer firing every `step` so that, under `tokio::time::pause()`, the auto-advancing clock moves
/// at most `step` at a time while real (loopback) I/O is in flight. Without it, a paused runtime waiting
/// on a socket jumps straight to the next timer, which is often a request timeout. Tests and benchmarks
/// that pause time around the emulators start one (10 ms is a good step; a simulated day then takes a
/// few seconds). The timer task stops when this is dropped.
#[derive(Debug)]
pub struct PausedTimeTicker(JoinHandle<()>);

impl PausedTimeTicker {
    /// Starts ticking every `step` on the current runtime.
    pub fn start(step: Duration) -> Self {
        // Exit policy: loops until aborted by `Drop`.
        Self(tokio::spawn(
            async move {
                loop {
                    tokio::time::sleep(step).await;
                }
            }
            .instrument(tracing::trace_span!("paused_time_ticker")),
        ))
    }
}

impl Drop for PausedTimeTicker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `comfyrelay emulate runcomfy --port N` calls this; returns when `shutdown` is cancelled.
///
/// # Errors
/// The address cannot be bound.
pub async fn run_standalone(
    addr: SocketAddr,
    config: RunComfyEmulatorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let emulator = RunComfyEmulator::start(listener, config).await?;
    info!(url = %emulator.url(), user_id = %emulator.user_id(), "emulated RunComfy Server API ready");
    shutdown.cancelled().await;
    emulator.shutdown().await;
    Ok(())
}

// ---- HTTP ----

type AppState = State<Arc<Shared>>;

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/prod/api/users/{user_id}/workflows", get(list_workflows))
        .route("/prod/api/users/{user_id}/servers", get(list_servers).post(launch))
        .route("/prod/api/users/{user_id}/servers/{server_id}", get(get_server).delete(delete_server))
        .route(
            "/prod/api/users/{user_id}/servers/{server_id}/update-estimated-duration",
            post(update_duration),
        )
        .fallback(unknown_route)
        .method_not_allowed_fallback(unknown_route)
        .with_state(shared)
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn api_error(status: StatusCode, code: i64, message: &str) -> Response {
    reply(status, json!({ "error_code": code, "error_message": message }))
}

fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, 404001, "Server not found")
}

fn too_many(shared: &Shared, retry_after: Duration) -> Response {
    shared.rate_limited.fetch_add(1, Ordering::Relaxed);
    let mut response = reply(
        StatusCode::TOO_MANY_REQUESTS,
        json!({ "error_code": "rate_limited", "error_message": "Rate limit exceeded: 1 request per second per account" }),
    );
    if shared.config.send_retry_after {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    response
}

/// API Gateway's stock answer for unknown routes and methods (observed: 403, not 404).
async fn unknown_route(headers: HeaderMap) -> Response {
    let message = if headers.contains_key(header::AUTHORIZATION) {
        "Invalid key=value pair (missing equal-sign) in Authorization header"
    } else {
        "Missing Authentication Token"
    };
    reply(StatusCode::FORBIDDEN, json!({ "message": message }))
}

/// Reachability, auth, account, rate limit and injected request faults, in that order: `Some(answer)`
/// refuses the request.
async fn gate(shared: &Shared, headers: &HeaderMap, user_id: &str) -> Option<Response> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let held = tokio::select! {
        held = shared.faults.wait_reachable() => held,
        () = shared.cancel.cancelled() => true,
    };
    if held {
        return Some(reply(StatusCode::GATEWAY_TIMEOUT, json!({ "message": "Endpoint request timed out" })));
    }
    let Some(auth) = headers.get(header::AUTHORIZATION) else {
        return Some(reply(StatusCode::UNAUTHORIZED, json!({ "message": "Unauthorized" })));
    };
    // With the fault on, the message quotes what was presented (some gateways do).
    let quoted = |message: &str| match shared.faults.echoes_token() {
        true => format!("{message}: {:?}", auth.to_str().unwrap_or_default()),
        false => message.to_string(),
    };
    let token = auth.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    if !token.is_some_and(|t| shared.config.tokens.iter().any(|k| k == t)) {
        return Some(api_error(StatusCode::UNAUTHORIZED, 401001, &quoted("Invalid or expired API token")));
    }
    if user_id != shared.config.user_id {
        let message = quoted("The API token does not belong to this user");
        return Some(api_error(StatusCode::FORBIDDEN, 403003, &message));
    }
    let wait = shared.limiter.lock().unwrap_or_else(|e| e.into_inner()).take(Instant::now());
    if !wait.is_zero() {
        return Some(too_many(shared, wait));
    }
    match shared.faults.take_request_fault() {
        None => None,
        Some(RequestFault::RateLimited(retry_after)) => Some(too_many(shared, retry_after)),
        Some(RequestFault::Status(status)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some(reply(
                status,
                json!({ "message": status.canonical_reason().unwrap_or("Internal server error") }),
            ))
        }
        Some(RequestFault::ErrorIn200 { code, message }) => Some(api_error(StatusCode::OK, code, &message)),
    }
}

/// The machine for a lookup by id: gone machines and injected post-launch 404s answer `None`.
fn lookup<'a>(machines: &'a mut HashMap<String, Machine>, id: &str) -> Option<&'a mut Machine> {
    let m = machines.get_mut(id)?;
    if m.phase == Phase::Gone {
        return None;
    }
    if m.not_found_left > 0 {
        m.not_found_left -= 1;
        return None;
    }
    Some(m)
}

async fn list_workflows(State(s): AppState, Path(user_id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&s, &headers, &user_id).await {
        return r;
    }
    let created = s.wall(s.epoch.0);
    let list: Vec<Value> = s
        .config
        .workflows
        .iter()
        .map(|w| {
            json!({ "workflow_id": w.workflow_id, "workflow_name": w.workflow_name, "version_id": w.version_id,
                    "created_at": created, "updated_at": created })
        })
        .collect();
    reply(StatusCode::OK, Value::Array(list))
}

async fn list_servers(State(s): AppState, Path(user_id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&s, &headers, &user_id).await {
        return r;
    }
    let machines = s.machines();
    let mut live: Vec<&Machine> = machines.values().filter(|m| m.phase != Phase::Gone).collect();
    live.sort_by_key(|m| m.seq);
    reply(StatusCode::OK, Value::Array(live.into_iter().map(|m| s.server_json(m)).collect()))
}

async fn get_server(
    State(s): AppState,
    Path((user_id, server_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&s, &headers, &user_id).await {
        return r;
    }
    let mut machines = s.machines();
    match lookup(&mut machines, &server_id) {
        Some(m) => reply(StatusCode::OK, s.server_json(m)),
        None => not_found(),
    }
}

async fn launch(
    State(s): AppState,
    Path(user_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = gate(&s, &headers, &user_id).await {
        return r;
    }
    let bad = |m: &str| api_error(StatusCode::BAD_REQUEST, 400001, m);
    let Ok(body) = serde_json::from_slice::<Value>(&body) else { return bad("Request body must be JSON") };
    let Some(version) = body.get("workflow_version_id").and_then(Value::as_str).filter(|v| !v.is_empty())
    else {
        return bad("workflow_version_id is required");
    };
    if !s.config.accept_unknown_workflow_versions
        && !s.config.workflows.iter().any(|w| w.version_id == version)
    {
        return bad("workflow version not found");
    }
    let Some(server_type) =
        body.get("server_type").and_then(Value::as_str).filter(|t| SERVER_TYPES.contains(t))
    else {
        return bad("server_type must be one of medium, large, extra-large, 2x-large, 2xl-turbo");
    };
    let Some(duration) = body.get("estimated_duration").and_then(Value::as_u64).filter(|d| *d > 0) else {
        return bad("estimated_duration must be a positive integer (seconds)");
    };
    let failure = s.faults.take_launch_failure();
    let shared = s.clone();
    let hold = |d: Duration| async move {
        shared.launches_in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            () = shared.cancel.cancelled() => {}
            () = tokio::time::sleep(d) => {}
        }
        shared.launches_in_flight.fetch_sub(1, Ordering::Relaxed);
    };
    match failure {
        Some(LaunchFailure::Rejected) => {
            return reply(StatusCode::INTERNAL_SERVER_ERROR, json!({ "message": "Internal server error" }));
        }
        Some(LaunchFailure::Stalled(d)) => {
            hold(d).await;
            return reply(StatusCode::GATEWAY_TIMEOUT, json!({ "message": "Endpoint request timed out" }));
        }
        _ => {}
    }
    let plan = s.faults.take_machine_plan();
    let (_, response) = create_machine(&s, version, server_type, duration, plan);
    match failure {
        Some(LaunchFailure::CreatedButFailed) => {
            reply(StatusCode::INTERNAL_SERVER_ERROR, json!({ "message": "Internal server error" }))
        }
        Some(LaunchFailure::CreatedButStalled(d)) => {
            hold(d).await;
            reply(StatusCode::OK, response)
        }
        _ => reply(StatusCode::OK, response),
    }
}

/// Creates a machine (`Starting`) and spawns its lifecycle; returns its id and its JSON.
fn create_machine(
    s: &Arc<Shared>,
    version: &str,
    server_type: &str,
    duration: u64,
    plan: MachinePlan,
) -> (String, Value) {
    let id = uuid::Uuid::new_v4().to_string();
    let wake = Arc::new(Notify::new());
    let machine = Machine {
        id: id.clone(),
        seq: s.next_seq.fetch_add(1, Ordering::Relaxed),
        workflow_version_id: version.to_string(),
        server_type: server_type.to_string(),
        duration_secs: duration,
        phase: Phase::Starting,
        ready_at: None,
        billing_end: None,
        comfy: None,
        url: None,
        not_found_left: plan.not_found_lookups,
        wake: wake.clone(),
    };
    let response = s.server_json(&machine);
    s.machines().insert(id.clone(), machine);
    info!(server_id = %id, server_type, duration, "emulated machine launched");
    let span = tracing::info_span!("emulated_machine", server_id = %id);
    let cancel = s.cancel.clone();
    let task = lifecycle(s.clone(), id.clone(), wake, plan);
    // Exit policy: runs until the machine is gone; stops at once when the emulator shuts down.
    s.tasks.spawn(
        async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = task => {}
            }
        }
        .instrument(span),
    );
    (id, response)
}

async fn update_duration(
    State(s): AppState,
    Path((user_id, server_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = gate(&s, &headers, &user_id).await {
        return r;
    }
    let duration = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b.get("update_estimated_duration").and_then(Value::as_u64))
        .filter(|d| *d > 0);
    let Some(duration) = duration else {
        return api_error(
            StatusCode::BAD_REQUEST,
            400001,
            "update_estimated_duration must be a positive integer",
        );
    };
    let mut machines = s.machines();
    let Some(m) = lookup(&mut machines, &server_id) else { return not_found() };
    if m.phase != Phase::Starting && m.phase != Phase::Ready {
        return api_error(StatusCode::BAD_REQUEST, 400002, "Server is being deleted");
    }
    // Replaces the total duration, still counted from service_ready_at (reference §1.2).
    m.duration_secs = duration;
    m.wake.notify_one();
    reply(StatusCode::OK, s.server_json(m))
}

async fn delete_server(
    State(s): AppState,
    Path((user_id, server_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&s, &headers, &user_id).await {
        return r;
    }
    s.deletes.lock().unwrap_or_else(|e| e.into_inner()).push(server_id.clone());
    let (body, comfy) = {
        let mut machines = s.machines();
        let Some(m) = lookup(&mut machines, &server_id) else { return not_found() };
        if m.phase == Phase::Ready {
            m.billing_end = Some(Instant::now());
        }
        if m.phase != Phase::Deleting {
            m.phase = Phase::Deleting;
            m.wake.notify_one();
        }
        (s.server_json(m), m.comfy.take())
    };
    if let Some(comfy) = comfy {
        comfy.shutdown().await;
    }
    info!(server_id, "emulated machine deleted");
    reply(StatusCode::OK, body)
}

// ---- machine lifecycle ----

fn phase(shared: &Shared, id: &str) -> Option<Phase> {
    shared.machines().get(id).map(|m| m.phase)
}

async fn kill(shared: &Shared, id: &str) -> bool {
    let comfy = shared.machines().get_mut(id).and_then(|m| m.comfy.take());
    match comfy {
        Some(c) => {
            warn!(server_id = id, "emulated machine died; its ComfyUI stops while the API still says Ready");
            c.shutdown().await;
            true
        }
        None => false,
    }
}

/// Drives one machine: boot, Ready (with its own ComfyUI), self-stop at `estimated_stopping_at`, and
/// removal `deleting_time` after it started deleting.
async fn lifecycle(shared: Arc<Shared>, id: String, wake: Arc<Notify>, plan: MachinePlan) {
    let boot_end = Instant::now() + shared.config.boot_time;
    loop {
        if phase(&shared, &id) != Some(Phase::Starting) {
            return teardown(&shared, &id).await;
        }
        tokio::select! {
            () = tokio::time::sleep_until(boot_end), if !plan.never_ready => break,
            () = wake.notified() => {}
        }
    }
    let comfy = match TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => ComfyEmulator::start(listener, shared.config.comfyui.clone()).await,
        Err(e) => Err(e),
    };
    let comfy = match comfy {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "emulated machine's ComfyUI failed to start; the machine stops");
            if let Some(m) = shared.machines().get_mut(&id) {
                m.phase = Phase::Deleting;
            }
            return teardown(&shared, &id).await;
        }
    };
    let became_ready = {
        let mut machines = shared.machines();
        match machines.get_mut(&id) {
            Some(m) if m.phase == Phase::Starting => {
                m.phase = Phase::Ready;
                m.ready_at = Some(Instant::now());
                m.url = Some(comfy.url());
                m.comfy = Some(comfy.clone());
                true
            }
            _ => false,
        }
    };
    if !became_ready {
        comfy.shutdown().await;
        return teardown(&shared, &id).await;
    }
    info!(server_id = %id, url = %comfy.url(), "emulated machine Ready");
    drop(comfy);
    let mut die_at = plan.die_after_ready.map(|d| Instant::now() + d);
    loop {
        let stop_at = {
            let machines = shared.machines();
            match machines.get(&id) {
                Some(m) if m.phase == Phase::Ready => m.stop_at().unwrap_or_else(Instant::now),
                _ => break,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(stop_at) => {
                let now = Instant::now();
                let comfy = {
                    let mut machines = shared.machines();
                    let Some(m) = machines.get_mut(&id) else { break };
                    if m.phase != Phase::Ready || m.stop_at().is_some_and(|s| s > now) {
                        continue;
                    }
                    m.phase = Phase::Deleting;
                    m.billing_end = Some(now);
                    m.comfy.take()
                };
                info!(server_id = %id, "estimated duration ran out; the machine stops itself");
                if let Some(c) = comfy {
                    c.shutdown().await;
                }
                break;
            }
            () = tokio::time::sleep_until(die_at.unwrap_or(stop_at)), if die_at.is_some() => {
                die_at = None;
                kill(&shared, &id).await;
            }
            () = wake.notified() => {}
        }
    }
    teardown(&shared, &id).await;
}

/// Stops whatever still runs, waits `deleting_time`, then forgets the machine (it stays in the
/// introspection list as `Gone`, with its billing).
async fn teardown(shared: &Shared, id: &str) {
    if shared.machines().get(id).is_some_and(|m| m.phase == Phase::Gone) {
        // Forgotten by the provider (`forget_machine`): its ComfyUI runs on until killed or shutdown.
        return;
    }
    let comfy = shared.machines().get_mut(id).and_then(|m| m.comfy.take());
    if let Some(c) = comfy {
        c.shutdown().await;
    }
    tokio::time::sleep(shared.config.deleting_time).await;
    if let Some(m) = shared.machines().get_mut(id) {
        m.phase = Phase::Gone;
    }
}
