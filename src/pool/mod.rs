//! The RunComfy machine pool: launches machines as the queue needs them, keeps them alive with short leases,
//! stops them when idle, replaces unhealthy ones, and never loses track of one.
//!
//! # Model
//! One pool per [`MachineSpec`] (workflow version × server type), each with a [`PoolPolicy`]. The job
//! engine reports the demand (queued jobs per spec) through [`Provisioner`]; the pool answers with
//! [`PoolEvent`]s (provisioning progress, machines ready for jobs, machines removed).
//!
//! One planning loop decides, under a std mutex and without awaiting, what to do (launch, stop, renew a
//! lease, check health); each action runs as its own task in the pool's tracker and reports back by
//! changing the shared state and waking the loop. Every phase change of a machine is written to the store
//! before anything depends on it, so a restarted comfyrelay finds every machine it launched.
//!
//! # Money
//! - A machine is launched with `estimated_duration` = the lease and extended (the API replaces the total
//!   duration, counted from `Ready`) while the pool wants it; if comfyrelay dies, every machine stops
//!   itself within one lease.
//! - A stop is a `DELETE`, repeated until the API confirms it (200 or already gone).
//! - At start the account's servers are reconciled with the store: machines we track are adopted; machines
//!   we meant to stop, or launched without recording the id, are stopped; others are left alone (or
//!   stopped with `runcomfy.stop_unknown_servers`).
//! - Billing is counted from `Ready` until the DELETE returns, at the configured price of its server type.
//!
//! All timing is `tokio::time`, so the pool runs under `tokio::time::pause()` (the simulated-day benchmark,
//! `tests/support/pool_day.rs`).

mod lifecycle;
mod plan;
mod reconcile;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, debug, error, info, warn};

use crate::{
    comfy,
    config::{PoolPolicy, RunComfyConfig},
    machine::{Machine, MachineSpec, PoolEvent, ProvisionPhase, Provisioner, stable_client_id},
    runcomfy::{
        DeleteOutcome, LaunchRequest, RunComfyClient, RunComfyError, Server, ServerStatus, ServerType,
    },
    store::{MachineRow, MachineStore},
};

/// Store `kind` of a machine row.
const KIND_MACHINE: &str = "runcomfy";
/// Store `kind` of a launch whose server id is not known yet.
const KIND_LAUNCH: &str = "runcomfy-launch";
/// How often the planning loop runs without being woken.
const PLAN_TICK: Duration = Duration::from_secs(1);
/// The machine status is read from the API on every this-many health checks (the API allows 1 call/s for
/// the whole account; the ComfyUI check costs nothing).
const STATUS_EVERY: u32 = 4;
/// Longest wait for one ComfyUI health probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between DELETE attempts that failed.
const STOP_RETRY: Duration = Duration::from_secs(10);
/// Pause after a failed lease renewal.
const RENEW_RETRY: Duration = Duration::from_secs(15);
/// After a restart, how long an adopted idle machine waits for a recovered job before it counts as idle
/// past `idle_stop`.
const ADOPT_GRACE: Duration = Duration::from_secs(3);
/// Stopped machines kept in memory for `ListMachines(include_stopped)`.
const KEEP_STOPPED: usize = 200;

/// Where a pool machine is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachinePhase {
    /// Launched; the provider reports it starting.
    Starting,
    /// Ready at the provider; its ComfyUI is being checked.
    Checking,
    /// Taking jobs.
    Ready,
    /// Finishing its jobs, taking no new ones; stopped once idle.
    Draining,
    /// Being deleted.
    Stopping,
    /// Deleted (no longer billed).
    Stopped,
    /// Its ComfyUI stopped answering; being replaced.
    Unhealthy,
}

impl MachinePhase {
    fn is_live(self) -> bool {
        matches!(self, Self::Starting | Self::Checking | Self::Ready)
    }
}

/// A pool machine as operators see it.
#[derive(Debug, Clone)]
pub struct MachineView {
    /// The server id.
    pub id: String,
    /// What it was launched for.
    pub spec: MachineSpec,
    /// Its phase.
    pub phase: MachinePhase,
    /// Its ComfyUI URL, once Ready.
    pub url: Option<String>,
    /// USD per hour.
    pub price_per_hour_usd: f64,
    /// Launch time, ms since the epoch.
    pub launched_ms: i64,
    /// Ready time, ms since the epoch.
    pub ready_ms: Option<i64>,
    /// Stop time, ms since the epoch.
    pub stopped_ms: Option<i64>,
    /// When it stops by itself unless the lease is renewed, ms since the epoch.
    pub lease_until_ms: Option<i64>,
    /// Seconds billed so far (Ready → DELETE).
    pub billed_seconds: f64,
    /// Cost so far, USD.
    pub cost_usd: f64,
    /// Why it is draining, stopping or stopped.
    pub reason: String,
    /// The engine's handle (jobs, last workflow), while connected.
    pub machine: Option<Arc<Machine>>,
}

/// Totals for benchmarks and logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolStats {
    /// Launches that returned a server.
    pub launched: u64,
    /// Launches that failed (or machines that never became usable).
    pub launch_failures: u64,
    /// Machines stopped.
    pub stopped: u64,
    /// Machines found unhealthy (or gone) while in use.
    pub unhealthy: u64,
    /// Lease renewals.
    pub renewals: u64,
    /// Seconds billed, all machines.
    pub billed_seconds: f64,
    /// Cost, all machines, USD.
    pub cost_usd: f64,
    /// Machines not stopped now.
    pub running: usize,
}

/// The persisted record of a machine (the `body` of its store row).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    workflow_version_id: String,
    server_type: String,
    phase: MachinePhase,
    price_per_hour_usd: f64,
    launched_ms: i64,
    ready_ms: Option<i64>,
    stopped_ms: Option<i64>,
    lease_until_ms: Option<i64>,
    #[serde(default)]
    billed_seconds: f64,
    #[serde(default)]
    reason: String,
}

impl Record {
    fn spec(&self) -> MachineSpec {
        MachineSpec {
            workflow_version_id: self.workflow_version_id.clone(),
            server_type: self.server_type.clone(),
        }
    }
}

/// The persisted record of a launch in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LaunchRecord {
    workflow_version_id: String,
    server_type: String,
    duration_secs: u64,
    requested_ms: i64,
}

#[derive(Debug)]
struct Entry {
    id: String,
    spec: MachineSpec,
    phase: MachinePhase,
    price: f64,
    launched_ms: i64,
    launched_at: Instant,
    ready_ms: Option<i64>,
    ready_at: Option<Instant>,
    stopped_ms: Option<i64>,
    stopped_at: Option<Instant>,
    lease_until: Option<Instant>,
    url: Option<String>,
    reason: String,
    machine: Option<Arc<Machine>>,
    /// A renew, health or stop task is in flight.
    busy: bool,
    next_health: Instant,
    next_renew: Instant,
    health_checks: u32,
    unreachable_since: Option<Instant>,
}

impl Entry {
    fn billed(&self, now: Instant) -> Duration {
        match self.ready_at {
            Some(r) => self.stopped_at.unwrap_or(now).saturating_duration_since(r),
            None => Duration::ZERO,
        }
    }

    fn lease_until_ms(&self, now: Instant) -> Option<i64> {
        self.lease_until.map(|l| now_ms() + signed_ms(l, now))
    }

    fn record(&self, now: Instant) -> Record {
        Record {
            workflow_version_id: self.spec.workflow_version_id.clone(),
            server_type: self.spec.server_type.clone(),
            phase: self.phase,
            price_per_hour_usd: self.price,
            launched_ms: self.launched_ms,
            ready_ms: self.ready_ms,
            stopped_ms: self.stopped_ms,
            lease_until_ms: self.lease_until_ms(now),
            billed_seconds: self.billed(now).as_secs_f64(),
            reason: self.reason.clone(),
        }
    }

    fn view(&self, now: Instant) -> MachineView {
        let billed = self.billed(now).as_secs_f64();
        MachineView {
            id: self.id.clone(),
            spec: self.spec.clone(),
            phase: self.phase,
            url: self.url.clone(),
            price_per_hour_usd: self.price,
            launched_ms: self.launched_ms,
            ready_ms: self.ready_ms,
            stopped_ms: self.stopped_ms,
            lease_until_ms: if self.phase == MachinePhase::Stopped { None } else { self.lease_until_ms(now) },
            billed_seconds: billed,
            cost_usd: billed * self.price / 3600.0,
            reason: self.reason.clone(),
            machine: self.machine.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct Failures {
    consecutive: u32,
    retry_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    machines: BTreeMap<String, Entry>,
    /// Launch calls in flight (no server id yet), per spec.
    launching: BTreeMap<MachineSpec, usize>,
    demand: BTreeMap<MachineSpec, usize>,
    demand_changed: bool,
    failures: HashMap<MachineSpec, Failures>,
    /// The account's servers were reconciled with the store (no launch before that).
    reconciled: bool,
    closing: bool,
    counters: Counters,
}

/// Event counts since start (the rest of [`PoolStats`] is derived from the machines).
#[derive(Debug, Default, Clone)]
struct Counters {
    launched: u64,
    launch_failures: u64,
    stopped: u64,
    unhealthy: u64,
    renewals: u64,
}

/// What the planner decided.
#[derive(Debug)]
enum Action {
    Launch(MachineSpec),
    Stop { id: String, reason: String },
    Renew(String),
    Health(String),
    Reconcile,
}

/// The RunComfy pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RunComfyConfig,
    client: RunComfyClient,
    store: Arc<dyn MachineStore>,
    comfy: comfy::ClientOptions,
    prequeue: usize,
    instance: String,
    events: mpsc::UnboundedSender<PoolEvent>,
    state: Mutex<State>,
    wake: Notify,
    tracker: TaskTracker,
    /// Stops the planning loop and the tasks that wait (launches, health checks).
    shutdown: CancellationToken,
}

/// What [`Pool::start`] needs.
#[derive(Debug)]
pub struct PoolParts {
    /// Pool settings.
    pub config: RunComfyConfig,
    /// The API client (shares the account-wide rate limiter).
    pub client: RunComfyClient,
    /// Durable storage of machine rows.
    pub store: Arc<dyn MachineStore>,
    /// How to talk to each machine's ComfyUI.
    pub comfy: comfy::ClientOptions,
    /// Prompts pre-queued per machine.
    pub prequeue: usize,
    /// This comfyrelay's instance id (stable WebSocket client ids).
    pub instance: String,
    /// Where pool events go (the job engine's scheduler).
    pub events: mpsc::UnboundedSender<PoolEvent>,
}

impl Pool {
    /// Reconciles the account's servers with the store (adopting the machines this comfyrelay tracks,
    /// stopping those it launched and no longer tracks), then starts the planning loop.
    ///
    /// Returns the pool and the adopted machines that are ready for jobs (hand them to the job engine
    /// before it recovers jobs, so jobs running on them are re-attached). If the API cannot be reached,
    /// reconciliation is retried in the background and nothing is launched until it succeeds.
    pub async fn start(parts: PoolParts, shutdown: CancellationToken) -> (Self, Vec<Arc<Machine>>) {
        let pool = Self {
            inner: Arc::new(Inner {
                config: parts.config,
                client: parts.client,
                store: parts.store,
                comfy: parts.comfy,
                prequeue: parts.prequeue,
                instance: parts.instance,
                events: parts.events,
                state: Mutex::new(State::default()),
                wake: Notify::new(),
                tracker: TaskTracker::new(),
                shutdown,
            }),
        };
        let adopted = match pool.reconcile().await {
            Ok(adopted) => adopted,
            Err(e) => {
                error!(error = %e, "cannot reconcile RunComfy machines at start; retrying in the background, launching nothing until then");
                Vec::new()
            }
        };
        let looping = pool.clone();
        pool.inner.tracker.spawn(looping.run().instrument(tracing::info_span!("runcomfy_pool")));
        (pool, adopted)
    }

    /// The pool's machines (stopped ones too, most recent last).
    pub fn machines(&self) -> Vec<MachineView> {
        let now = Instant::now();
        self.state().machines.values().map(|e| e.view(now)).collect()
    }

    /// One machine.
    pub fn machine(&self, id: &str) -> Option<MachineView> {
        let now = Instant::now();
        self.state().machines.get(id).map(|e| e.view(now))
    }

    /// Counts since start, and billing of the machines the pool remembers (stopped ones included, up to the
    /// last 200).
    pub fn stats(&self) -> PoolStats {
        let now = Instant::now();
        let st = self.state();
        let c = st.counters.clone();
        let billed: Vec<(f64, f64)> =
            st.machines.values().map(|e| (e.billed(now).as_secs_f64(), e.price)).collect();
        PoolStats {
            launched: c.launched,
            launch_failures: c.launch_failures,
            stopped: c.stopped,
            unhealthy: c.unhealthy,
            renewals: c.renewals,
            billed_seconds: billed.iter().map(|(b, _)| b).sum(),
            cost_usd: billed.iter().map(|(b, p)| b * p / 3600.0).sum(),
            running: st.machines.values().filter(|e| e.phase != MachinePhase::Stopped).count(),
        }
    }

    /// Takes no new jobs on the machine and stops it once idle. `None` if the pool has no such machine.
    pub fn drain(&self, id: &str) -> Option<MachineView> {
        let now = Instant::now();
        let view = {
            let mut st = self.state();
            let entry = st.machines.get_mut(id)?;
            if let Some(m) = &entry.machine {
                m.drain();
            }
            if matches!(entry.phase, MachinePhase::Ready | MachinePhase::Checking | MachinePhase::Starting) {
                entry.phase = MachinePhase::Draining;
                entry.reason = "drained by an operator".into();
            }
            entry.view(now)
        };
        info!(machine = %id, "machine drained by an operator; it stops once idle");
        self.persist_later(id);
        self.inner.wake.notify_one();
        Some(view)
    }

    /// Stops the planning loop; with `runcomfy.stop_on_shutdown`, deletes every machine (waiting up to
    /// `grace` for the API to confirm). Call after the job engine drained.
    pub async fn close(&self, grace: Duration) {
        self.inner.shutdown.cancel();
        let to_stop: Vec<String> = {
            let mut st = self.state();
            st.closing = true;
            if self.inner.config.stop_on_shutdown {
                st.machines
                    .values()
                    .filter(|e| !matches!(e.phase, MachinePhase::Stopped | MachinePhase::Stopping))
                    .map(|e| e.id.clone())
                    .collect()
            } else {
                Vec::new()
            }
        };
        for id in to_stop {
            self.spawn_stop(id, "comfyrelay is shutting down".into());
        }
        self.inner.tracker.close();
        if tokio::time::timeout(grace, self.inner.tracker.wait()).await.is_err() {
            let left: Vec<String> = self
                .state()
                .machines
                .values()
                .filter(|e| e.phase != MachinePhase::Stopped)
                .map(|e| e.id.clone())
                .collect();
            warn!(?left, "RunComfy machines not confirmed stopped at shutdown; their leases stop them");
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn policy(&self, spec: &MachineSpec) -> PoolPolicy {
        let c = &self.inner.config;
        c.pools
            .iter()
            .find(|p| {
                p.workflow_version_id == spec.workflow_version_id
                    && (if p.server_type.is_empty() { &c.default_server_type } else { &p.server_type })
                        == &spec.server_type
            })
            .map(|p| p.apply(&c.default_pool))
            .unwrap_or_else(|| c.default_pool.clone())
    }

    fn price(&self, server_type: &str) -> f64 {
        self.inner.config.prices.get(server_type).copied().unwrap_or(0.0)
    }

    fn send(&self, event: PoolEvent) {
        let _ = self.inner.events.send(event);
    }

    fn announce(&self, spec: &MachineSpec, id: &str, phase: ProvisionPhase, since: Instant) {
        self.send(PoolEvent::Provisioning {
            spec: spec.clone(),
            machine_id: id.to_string(),
            phase,
            elapsed: since.elapsed(),
        });
    }
}

impl Provisioner for Pool {
    fn demand(&self, queued: &BTreeMap<MachineSpec, usize>) {
        {
            let mut st = self.state();
            if st.demand != *queued {
                st.demand_changed = true;
                st.demand = queued.clone();
            }
        }
        self.inner.wake.notify_one();
    }

    fn default_server_type(&self) -> String {
        self.inner.config.default_server_type.clone()
    }
}

/// Whether the machine's ComfyUI answers within `timeout`: `/system_stats`, or `/queue` for a server
/// without it (both are stock ComfyUI routes; the reference confirms the first only at medium confidence).
async fn comfyui_answers(machine: &Machine, timeout: Duration) -> bool {
    let probe = async {
        if machine.client.system_stats().await.is_ok() {
            return true;
        }
        machine.client.queue().await.is_ok()
    };
    tokio::time::timeout(timeout, probe).await.unwrap_or(false)
}

/// Reconciliation could not read the store or the API.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ReconcileError(String);

/// Timing of an adopted machine from its API record (wall clock) mapped onto this process's clock.
fn adopt_timing(entry: &mut Entry, server: &Server, record: &Record, now: Instant) {
    let wall = SystemTime::now();
    let ready = server.service_ready_at.map(|t| t.0).or_else(|| record.ready_ms.map(ms_to_system));
    if let Some(ready) = ready {
        let ago = wall.duration_since(ready).unwrap_or_default();
        entry.ready_at = Some(now.checked_sub(ago).unwrap_or(now));
        entry.ready_ms = Some(system_to_ms(ready));
    }
    let stopping =
        server.estimated_stopping_at.map(|t| t.0).or_else(|| record.lease_until_ms.map(ms_to_system));
    if let Some(stopping) = stopping {
        let left = stopping.duration_since(wall).unwrap_or_default();
        entry.lease_until = Some(now + left);
    }
}

/// When the provider will stop the server by itself, on this process's clock, for a server seen Ready just
/// now: its total duration (counted by the provider from Ready, which was at most one status poll ago).
fn lease_end(server: &Server, now: Instant, slack: Duration) -> Instant {
    let total = match (server.service_ready_at, server.estimated_stopping_at) {
        (Some(ready), Some(stop)) => stop.since(ready),
        _ => Duration::from_secs(server.estimated_duration.unwrap_or(0)),
    };
    now + total.saturating_sub(slack)
}

fn now_ms() -> i64 {
    system_to_ms(SystemTime::now())
}

fn system_to_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

fn ms_to_system(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// `a - b` in ms, signed.
fn signed_ms(a: Instant, b: Instant) -> i64 {
    if a >= b { (a - b).as_millis() as i64 } else { -((b - a).as_millis() as i64) }
}
