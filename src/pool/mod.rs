//! The RunComfy machine pool: launches machines as the queue needs them, keeps them alive with short leases,
//! stops them when idle, replaces unhealthy ones, and never loses track of one.
//!
//! # Model
//! One pool per [`MachineSpec`] (workflow version × server type), each with a [`PoolPolicy`]. The job
//! engine reports the demand (queued jobs per spec) through [`Provisioner`]; the pool answers with
//! [`PoolEvent`]s (provisioning progress, machines ready for jobs, machines removed).
//!
//! One planning loop decides, under a std mutex and without awaiting, what to do (reconcile, launch, stop,
//! renew a lease, check health, survey the account); each action runs as its own task in the pool's
//! tracker and reports back by changing the shared state and waking the loop. Every phase change of a
//! machine is written to the store before anything depends on it, so a restarted comfyrelay finds every
//! machine it launched.
//!
//! [`Pool::start`] returns at once: the account is reconciled in the background (retried with backoff
//! while the API is unreachable), nothing is launched before that, and its outcome reaches the engine as
//! [`PoolEvent::Reconciled`]. [`Pool::launch_health`] says whether the pool can launch, for health checks.
//!
//! # Money
//! - A machine is launched with `estimated_duration` = the lease and extended (the API replaces the total
//!   duration, counted from `Ready`) while the pool wants it; if comfyrelay dies, every machine stops
//!   itself within one lease.
//! - A stop is a `DELETE`, repeated until the API confirms it (200 or already gone).
//! - At start the account's servers are reconciled with the store: machines we track are adopted; machines
//!   we meant to stop are stopped; every other server is left alone and listed as unmanaged (or stopped
//!   with `runcomfy.stop_unknown_servers`). A server is ours only by the id the launch answered (or the
//!   one new matching server the list showed right after an ambiguous answer); a launch interrupted by a
//!   crash before that claims nothing, since another client of the account may have launched the same
//!   server type meanwhile: if the server was ours, its lease stops it.
//! - The account's server list is read again every minute, so servers comfyrelay does not track stay
//!   visible (as unmanaged) while they bill.
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

use crate::telemetry::ErrorChain;

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
/// How often the account's server list is read again (unmanaged servers; a recheck after auth failures).
const SURVEY_INTERVAL: Duration = Duration::from_secs(60);
/// First and longest pause between failed start-up reconciliations.
const RECONCILE_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

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
    /// A server on the account that this comfyrelay does not track (launched by someone else, or by a
    /// launch whose answer was lost): listed so operators see what bills, never used or stopped.
    Unmanaged,
}

impl MachinePhase {
    /// The phase as a metrics label (one of [`crate::metrics::MACHINE_STATES`]).
    fn label(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Checking => "checking",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Unhealthy => "unhealthy",
            Self::Unmanaged => "unmanaged",
        }
    }

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

/// The persisted record of a launch in flight (deleted once the machine's own row is written). If it
/// survives a crash it claims no server (see the module docs); it only explains the servers that may be
/// its machine: those listed after `requested_ms` that were not in `known_before`, of its type and
/// duration.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LaunchRecord {
    workflow_version_id: String,
    server_type: String,
    duration_secs: u64,
    requested_ms: i64,
    /// The account's servers listed just before the launch was sent.
    #[serde(default)]
    known_before: Vec<String>,
}

/// A server on the account this comfyrelay does not track, as last listed.
#[derive(Debug, Clone)]
struct Unmanaged {
    server_type: String,
    /// Its `service_ready_at`, ms since the epoch.
    ready_ms: Option<i64>,
    /// Its `estimated_stopping_at`, ms since the epoch.
    stopping_ms: Option<i64>,
    /// When this comfyrelay first listed it, ms since the epoch.
    first_seen_ms: i64,
    note: String,
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
    /// When the API last reported it running (the end of its billing, if the API then forgets it).
    seen_at: Option<Instant>,
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
    /// The last failure's reason, and since when (ms) launches of the spec have been failing.
    last: Option<(String, i64)>,
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
    /// A reconciliation is running.
    reconciling: bool,
    /// Failed reconciliations in a row, and when to try again.
    reconcile_failures: u32,
    reconcile_retry_at: Option<Instant>,
    /// Servers on the account this comfyrelay does not track, by id.
    unmanaged: BTreeMap<String, Unmanaged>,
    /// When the account's list is read next, and whether a read is running.
    next_survey: Option<Instant>,
    surveying: bool,
    /// RunComfy refused the credentials (401/403): why (never with the token), and since when (ms).
    misconfigured: Option<(String, i64)>,
    /// The last API or launch failure not followed by a success: why, and since when (ms).
    trouble: Option<(String, i64)>,
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
    Survey,
}

/// Whether the pool can launch machines, for health checks ([`Pool::launch_health`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchState {
    /// The start-up reconciliation of the account has not succeeded yet (the API may be unreachable; it is
    /// retried with backoff). Nothing is launched; jobs for RunComfy workflows wait.
    Reconciling,
    /// Launches go ahead.
    Ready,
    /// Launches go ahead, but the last API call or launch failed (5xx, timeout, a machine that never
    /// became ready) and is retried with backoff; see the reason. Jobs wait, and fail after
    /// `runcomfy.max_launch_failures` uncertain failures in a row, or at once after a certain one.
    Degraded,
    /// RunComfy refused the configured credentials (HTTP 401 or 403): a configuration error that retrying
    /// will not fix. Nothing is launched, and jobs waiting for the pool fail at once with the reason.
    Misconfigured,
}

/// The pool's ability to launch, as [`Pool::launch_health`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchHealth {
    /// The state.
    pub state: LaunchState,
    /// Why the state is not `Ready`, in words for operators (empty when `Ready`). Never contains the API
    /// token or a machine's URL.
    pub reason: String,
    /// Since when the state holds (ms since the epoch), when it is not `Ready`.
    pub since_ms: Option<i64>,
}

impl LaunchHealth {
    /// Whether launches go ahead (`Ready` or `Degraded`).
    pub fn can_launch(&self) -> bool {
        matches!(self.state, LaunchState::Ready | LaunchState::Degraded)
    }
}

/// Why an operator's request about a pool machine was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No machine with this id.
    #[error("machine {0:?} not found")]
    NotFound(String),
    /// The server is on the account but not managed by this comfyrelay.
    #[error("machine {0:?} is not managed by comfyrelay (it was not launched by it)")]
    Unmanaged(String),
    /// The machine is being stopped, or stopped, or unhealthy: it cannot take jobs again.
    #[error("machine {id:?} is {phase} and cannot take jobs again")]
    Ending {
        /// The machine.
        id: String,
        /// Its phase, in words.
        phase: &'static str,
    },
    /// The machine reached `max_lifetime`: it is drained for good.
    #[error("machine {0:?} reached its maximum lifetime and is drained for good")]
    PastLifetime(String),
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
    /// Stops the planning loop and the tasks that wait (bring-ups, health checks); not a launch already sent.
    shutdown: CancellationToken,
    /// When the pool started, ms since the epoch.
    started_ms: i64,
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
    /// Starts the planning loop and returns at once (call it inside a Tokio runtime).
    ///
    /// The loop first reconciles the account's servers with the store in the background (adopting the
    /// machines this comfyrelay tracks, stopping those it meant to stop), retrying with backoff while the
    /// API cannot be reached; nothing is launched before that succeeds. It then sends
    /// [`PoolEvent::Reconciled`] with the adopted machines that are ready for jobs, so the engine
    /// re-attaches the jobs that were running on them.
    pub fn start(parts: PoolParts, shutdown: CancellationToken) -> Self {
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
                started_ms: now_ms(),
            }),
        };
        let looping = pool.clone();
        pool.inner.tracker.spawn(looping.run().instrument(tracing::info_span!("runcomfy_pool")));
        pool
    }

    /// The pool's machines (stopped ones too), then the account's servers it does not manage.
    pub fn machines(&self) -> Vec<MachineView> {
        let now = Instant::now();
        let st = self.state();
        let mut views: Vec<MachineView> = st.machines.values().map(|e| e.view(now)).collect();
        views.extend(st.unmanaged.iter().map(|(id, u)| self.unmanaged_view(id, u)));
        views
    }

    /// One machine (or unmanaged server).
    pub fn machine(&self, id: &str) -> Option<MachineView> {
        let now = Instant::now();
        let st = self.state();
        st.machines
            .get(id)
            .map(|e| e.view(now))
            .or_else(|| st.unmanaged.get(id).map(|u| self.unmanaged_view(id, u)))
    }

    /// Whether the pool can launch machines now, and why not: for the service's health checks.
    ///
    /// A health endpoint should report the RunComfy side `NOT_SERVING` in [`LaunchState::Misconfigured`]
    /// (a wrong token or user id: jobs for RunComfy workflows fail at once until the configuration is
    /// fixed and comfyrelay restarted), and `SERVING` otherwise: while `Reconciling` jobs wait for the
    /// API, and `Degraded` means launches are being retried. The reason is safe to show (no token).
    /// Cheap: reads the pool's state under its lock, without any API call.
    pub fn launch_health(&self) -> LaunchHealth {
        let st = self.state();
        let (state, why) = if let Some(m) = &st.misconfigured {
            (LaunchState::Misconfigured, Some(m.clone()))
        } else if !st.reconciled {
            let starting = || ("reconciling the account's servers".to_string(), self.inner.started_ms);
            let why = st.trouble.clone().unwrap_or_else(starting);
            (LaunchState::Reconciling, Some(why))
        } else if let Some(t) = &st.trouble {
            (LaunchState::Degraded, Some(t.clone()))
        } else if let Some(last) = st.failures.values().filter_map(|f| f.last.clone()).min_by_key(|l| l.1) {
            (LaunchState::Degraded, Some(last))
        } else {
            (LaunchState::Ready, None)
        };
        match why {
            Some((reason, since)) => LaunchHealth { state, reason, since_ms: Some(since) },
            None => LaunchHealth { state, reason: String::new(), since_ms: None },
        }
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

    /// Takes no new jobs on the machine and stops it once idle.
    ///
    /// # Errors
    /// [`PoolError::NotFound`], or [`PoolError::Unmanaged`] for a server this comfyrelay does not manage.
    pub fn drain(&self, id: &str) -> Result<MachineView, PoolError> {
        let now = Instant::now();
        let view = {
            let mut st = self.state();
            if st.unmanaged.contains_key(id) {
                return Err(PoolError::Unmanaged(id.into()));
            }
            let entry = st.machines.get_mut(id).ok_or_else(|| PoolError::NotFound(id.into()))?;
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
        Ok(view)
    }

    /// Undoes a drain: the machine takes jobs again. Only while it is draining and not yet being stopped
    /// (a drained machine is stopped once idle); a machine that is not drained is returned unchanged.
    ///
    /// # Errors
    /// [`PoolError::NotFound`], [`PoolError::Unmanaged`], [`PoolError::Ending`] for a machine being stopped,
    /// stopped or unhealthy, and [`PoolError::PastLifetime`] for one drained because of its age.
    pub fn undrain(&self, id: &str) -> Result<MachineView, PoolError> {
        let now = Instant::now();
        let (view, announce) = {
            let mut st = self.state();
            if st.unmanaged.contains_key(id) {
                return Err(PoolError::Unmanaged(id.into()));
            }
            let entry = st.machines.get_mut(id).ok_or_else(|| PoolError::NotFound(id.into()))?;
            let ending = match entry.phase {
                MachinePhase::Stopping => Some("being stopped"),
                MachinePhase::Stopped => Some("stopped"),
                MachinePhase::Unhealthy => Some("unhealthy"),
                MachinePhase::Unmanaged => Some("unmanaged"),
                MachinePhase::Starting
                | MachinePhase::Checking
                | MachinePhase::Ready
                | MachinePhase::Draining => None,
            };
            if let Some(phase) = ending {
                return Err(PoolError::Ending { id: id.into(), phase });
            }
            if entry.machine.as_ref().is_some_and(|m| m.is_retired()) {
                return Err(PoolError::Ending { id: id.into(), phase: "retired" });
            }
            let policy = self.policy(&entry.spec);
            if entry.ready_at.is_some_and(|r| now.saturating_duration_since(r) >= policy.max_lifetime) {
                return Err(PoolError::PastLifetime(id.into()));
            }
            let mut announce = None;
            if entry.phase == MachinePhase::Draining {
                entry.phase = match (&entry.machine, entry.ready_at) {
                    (Some(_), _) => MachinePhase::Ready,
                    (None, Some(_)) => MachinePhase::Checking,
                    (None, None) => MachinePhase::Starting,
                };
                entry.reason.clear();
                if let Some(m) = &entry.machine {
                    m.undrain();
                    // The engine may never have been told of it (drained before it was ready), and it
                    // dispatches to it again either way.
                    announce = Some(m.clone());
                }
            }
            (entry.view(now), announce)
        };
        info!(machine = %id, "machine undrained by an operator; it takes jobs again");
        if let Some(m) = announce {
            self.send(PoolEvent::Ready(m));
        }
        self.persist_later(id);
        self.inner.wake.notify_one();
        Ok(view)
    }

    /// Stops the planning loop; with `runcomfy.stop_on_shutdown`, deletes every machine, including one
    /// whose launch is in flight (its answer is awaited, then it is deleted). Waits up to `grace` for all
    /// of it (the rest of the shutdown deadline); what is not confirmed by then stops at its lease. Call
    /// after the job engine drained.
    pub async fn close(&self, grace: Duration) {
        // Cancels the loop and every wait (bring-up, health, renewals, reconciliation); a launch already
        // sent is not cut (see `launch`), so the machine it creates is known and stopped.
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
            warn!(
                ?left,
                "RunComfy machines (or launches) not confirmed stopped at shutdown; their leases stop them"
            );
        }
    }

    /// Reports the machines to the metrics (states, idle ones, billing); called at every planning round.
    fn observe(&self) {
        let now = Instant::now();
        let st = self.state();
        let samples: Vec<crate::metrics::MachineSample<'_>> = st
            .machines
            .values()
            .map(|e| crate::metrics::MachineSample {
                spec: &e.spec,
                id: &e.id,
                state: e.phase.label(),
                idle: e.phase == MachinePhase::Ready && e.machine.as_ref().is_some_and(|m| m.assigned() == 0),
                billed: e.billed(now),
                price_per_hour_usd: e.price,
            })
            .collect();
        crate::metrics::pool_machines(&samples);
        let specs: BTreeSet<&MachineSpec> = st.machines.values().map(|e| &e.spec).collect();
        for spec in specs {
            crate::metrics::pool_min_warm(spec, self.policy(spec).min_warm);
        }
    }

    /// The view of a server this comfyrelay does not manage (no URL: it is the machine's only credential).
    fn unmanaged_view(&self, id: &str, u: &Unmanaged) -> MachineView {
        let price = self.price(&u.server_type);
        let now = now_ms();
        let billed = u.ready_ms.map(|r| ((now - r).max(0) as f64) / 1000.0).unwrap_or(0.0);
        MachineView {
            id: id.to_string(),
            spec: MachineSpec { workflow_version_id: String::new(), server_type: u.server_type.clone() },
            phase: MachinePhase::Unmanaged,
            url: None,
            price_per_hour_usd: price,
            launched_ms: u.ready_ms.unwrap_or(u.first_seen_ms).min(u.first_seen_ms),
            ready_ms: u.ready_ms,
            stopped_ms: None,
            lease_until_ms: u.stopping_ms,
            billed_seconds: billed,
            cost_usd: billed * price / 3600.0,
            reason: u.note.clone(),
            machine: None,
        }
    }

    /// Notes an API failure: a 401/403 makes the pool misconfigured (jobs waiting for it fail at once);
    /// anything else is trouble that a later success clears. Returns whether it was an auth failure.
    fn api_failed(&self, context: &str, e: &RunComfyError) -> bool {
        let auth = match e {
            RunComfyError::Unauthorized { .. } => {
                Some("RunComfy rejected the API token (HTTP 401): check runcomfy.api_token".to_string())
            }
            RunComfyError::Forbidden { .. } => Some(
                "RunComfy refused access (HTTP 403): check runcomfy.user_id and runcomfy.api_token (and \
                 runcomfy.base_url: an unknown path also answers 403)"
                    .to_string(),
            ),
            _ => None,
        };
        // The API's own words may quote what was sent: logged with the token blanked, never passed on.
        let detail = redact(&ErrorChain(e).to_string(), self.inner.config.api_token.expose());
        let mut st = self.state();
        match auth {
            Some(reason) => {
                if st.misconfigured.is_none() {
                    error!(%context, error = %detail, "{reason}; jobs waiting for RunComfy machines fail until it is fixed");
                    st.misconfigured = Some((reason, now_ms()));
                }
                drop(st);
                self.inner.wake.notify_one();
                true
            }
            None => {
                let reason = format!("{context}: {}", truncate(&detail, 300));
                st.trouble.get_or_insert_with(|| (String::new(), now_ms())).0 = reason;
                false
            }
        }
    }

    /// An API call succeeded: credentials work and the API answers.
    fn api_ok(&self) {
        let mut st = self.state();
        if st.misconfigured.take().is_some() {
            info!("RunComfy accepts the credentials again");
        }
        st.trouble = None;
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

    fn replace(&self, machine_id: &str, reason: &str) -> bool {
        let stoppable = self.state().machines.get(machine_id).is_some_and(|e| {
            !matches!(e.phase, MachinePhase::Stopping | MachinePhase::Stopped | MachinePhase::Unmanaged)
        });
        if !stoppable {
            return false;
        }
        warn!(machine = %machine_id, %reason, "replacing a RunComfy machine");
        // Unhealthy: the planner stops it on its next round, and launches for the demand as it stands.
        self.mark_for_stop(machine_id, MachinePhase::Unhealthy, reason.to_string());
        true
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
enum ReconcileError {
    #[error("cannot read the machine records")]
    Store(#[source] crate::store::StoreError),
    #[error("cannot list the account's servers")]
    Api(#[source] RunComfyError),
    #[error("comfyrelay is shutting down")]
    ShuttingDown,
}

/// `text` with every occurrence of `secret` blanked.
fn redact(text: &str, secret: &str) -> String {
    if secret.len() < 4 { text.to_string() } else { text.replace(secret, "[redacted]") }
}

/// At most `max` characters of `text`.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_blanked_and_long_texts_cut() {
        let text = "401: Invalid or expired API token: \"Bearer rc_secret_123\"";
        assert_eq!(redact(text, "rc_secret_123"), "401: Invalid or expired API token: \"Bearer [redacted]\"");
        assert_eq!(redact("abc", ""), "abc", "an empty secret blanks nothing");
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hi", 2), "hi");
    }

    #[test]
    fn only_a_server_new_since_the_launch_and_of_its_kind_may_be_its_machine() {
        let server = |id: &str, server_type: &str, duration: u64| -> Server {
            serde_json::from_value(serde_json::json!({
                "server_id": id, "server_type": server_type, "estimated_duration": duration,
                "current_status": "Ready",
            }))
            .unwrap()
        };
        let launch = LaunchRecord {
            workflow_version_id: "v".into(),
            server_type: "medium".into(),
            duration_secs: 900,
            requested_ms: 0,
            known_before: vec!["old".into()],
        };
        assert!(reconcile::may_be_launch_of(&server("new", "medium", 900), &launch));
        assert!(!reconcile::may_be_launch_of(&server("old", "medium", 900), &launch));
        assert!(!reconcile::may_be_launch_of(&server("new", "large", 900), &launch));
        assert!(!reconcile::may_be_launch_of(&server("new", "medium", 600), &launch));
    }

    #[test]
    fn launch_health_says_whether_launches_go_ahead() {
        let health = |state| LaunchHealth { state, reason: String::new(), since_ms: None };
        assert!(health(LaunchState::Ready).can_launch() && health(LaunchState::Degraded).can_launch());
        assert!(!health(LaunchState::Reconciling).can_launch());
        assert!(!health(LaunchState::Misconfigured).can_launch());
    }
}
