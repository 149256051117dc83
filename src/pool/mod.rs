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
//! All timing is `tokio::time`, so the pool runs under `tokio::time::pause()` (the simulated-day benchmark).

pub mod sim;

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
    runcomfy::{LaunchRequest, RunComfyClient, RunComfyError, Server, ServerType},
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
    /// The provisioning phase last announced (for jobs that start waiting later).
    announced: ProvisionPhase,
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
    stats: PoolStats,
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

    /// Totals so far.
    pub fn stats(&self) -> PoolStats {
        let now = Instant::now();
        let st = self.state();
        let mut stats = st.stats.clone();
        stats.billed_seconds = 0.0;
        stats.cost_usd = 0.0;
        for e in st.machines.values() {
            let b = e.billed(now).as_secs_f64();
            stats.billed_seconds += b;
            stats.cost_usd += b * e.price / 3600.0;
        }
        stats.running = st.machines.values().filter(|e| e.phase != MachinePhase::Stopped).count();
        stats
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
        if let Some(e) = self.state().machines.get_mut(id) {
            e.announced = phase;
        }
        self.send(PoolEvent::Provisioning {
            spec: spec.clone(),
            machine_id: id.to_string(),
            phase,
            elapsed: since.elapsed(),
        });
    }

    // ---- planning ----

    /// Exit policy: runs until shutdown; every failure is handled inside the action that met it.
    async fn run(self) {
        let mut tick = tokio::time::interval(PLAN_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.shutdown.cancelled() => return,
                () = self.inner.wake.notified() => {}
                _ = tick.tick() => {}
            }
            let actions = self.plan();
            for action in actions {
                match action {
                    Action::Launch(spec) => self.spawn_launch(spec),
                    Action::Stop { id, reason } => self.spawn_stop(id, reason),
                    Action::Renew(id) => self.spawn_renew(id),
                    Action::Health(id) => self.spawn_health(id),
                    Action::Reconcile => match self.reconcile().await {
                        Ok(adopted) => {
                            for machine in adopted {
                                self.send(PoolEvent::Ready(machine));
                            }
                        }
                        Err(e) => warn!(error = %e, "reconciling RunComfy machines failed; retrying"),
                    },
                }
            }
        }
    }

    /// Decides what to do now. Never awaits; marks machines busy for the actions it returns.
    fn plan(&self) -> Vec<Action> {
        let now = Instant::now();
        let config = &self.inner.config;
        let mut st = self.state();
        if st.closing {
            return Vec::new();
        }
        if !st.reconciled {
            return vec![Action::Reconcile];
        }
        let mut actions = Vec::new();
        let st = &mut *st;

        // Specs to look at: those with demand, with a warm minimum, and with machines.
        let mut specs: BTreeSet<MachineSpec> = st.demand.keys().cloned().collect();
        for p in &config.pools {
            let server_type = if p.server_type.is_empty() {
                config.default_server_type.clone()
            } else {
                p.server_type.clone()
            };
            specs.insert(MachineSpec { workflow_version_id: p.workflow_version_id.clone(), server_type });
        }
        specs.extend(st.machines.values().filter(|e| e.phase.is_live()).map(|e| e.spec.clone()));

        let mut total: usize = st.machines.values().filter(|e| e.phase != MachinePhase::Stopped).count()
            + st.launching.values().sum::<usize>();
        let demand_changed = std::mem::take(&mut st.demand_changed);

        for spec in specs {
            let policy = self.policy(&spec);
            let queued = st.demand.get(&spec).copied().unwrap_or(0);
            let live: Vec<&Entry> =
                st.machines.values().filter(|e| e.spec == spec && e.phase.is_live()).collect();
            let assigned: usize = live.iter().filter_map(|e| e.machine.as_ref()).map(|m| m.assigned()).sum();
            let launching = st.launching.get(&spec).copied().unwrap_or(0);
            let have = live.len() + launching;
            let needed = (queued + assigned).div_ceil(policy.jobs_per_machine);
            let target = needed.max(policy.min_warm).min(policy.max_machines);

            // Jobs that started waiting after a launch was announced hear where it is.
            if demand_changed && queued > 0 {
                for e in live.iter().filter(|e| e.phase != MachinePhase::Ready) {
                    self.send(PoolEvent::Provisioning {
                        spec: spec.clone(),
                        machine_id: e.id.clone(),
                        phase: e.announced,
                        elapsed: now.saturating_duration_since(e.launched_at),
                    });
                }
            }

            if have < target {
                let backoff = st.failures.get(&spec).and_then(|f| f.retry_at).is_some_and(|t| now < t);
                let room = config.max_machines_total.saturating_sub(total);
                let n = (target - have).min(room);
                if backoff {
                    debug!(?spec, "launch postponed after failures");
                } else if n == 0 {
                    debug!(?spec, "at runcomfy.max_machines_total; not launching");
                } else {
                    for _ in 0..n {
                        *st.launching.entry(spec.clone()).or_default() += 1;
                        actions.push(Action::Launch(spec.clone()));
                    }
                    total += n;
                }
            }

            // Scale down: idle machines above the warm minimum, oldest idle first; and machines too old.
            let mut ready: Vec<(&String, Option<Instant>)> = st
                .machines
                .values()
                .filter(|e| e.spec == spec && e.phase == MachinePhase::Ready && !e.busy)
                .filter_map(|e| e.machine.as_ref().map(|m| (&e.id, m.idle_since())))
                .collect();
            ready.sort_by_key(|(_, idle)| *idle);
            let mut keep =
                st.machines.values().filter(|e| e.spec == spec && e.phase == MachinePhase::Ready).count();
            let mut stop_idle = Vec::new();
            for (id, idle_since) in ready {
                let Some(idle_since) = idle_since else { continue };
                if keep <= policy.min_warm || queued > 0 {
                    break;
                }
                if now.saturating_duration_since(idle_since) >= policy.idle_stop {
                    stop_idle.push(id.clone());
                    keep -= 1;
                }
            }
            for id in stop_idle {
                let Some(e) = st.machines.get_mut(&id) else { continue };
                if e.machine.as_ref().is_some_and(|m| m.drain_if_idle()) {
                    e.phase = MachinePhase::Draining;
                    e.reason = format!("idle for {}", humantime::format_duration(policy.idle_stop));
                    e.busy = true;
                    actions.push(Action::Stop { id, reason: e.reason.clone() });
                }
            }
            for e in st.machines.values_mut().filter(|e| e.spec == spec && e.phase == MachinePhase::Ready) {
                if e.ready_at.is_some_and(|r| now.saturating_duration_since(r) >= policy.max_lifetime) {
                    info!(machine = %e.id, "machine reached its maximum lifetime; draining");
                    e.phase = MachinePhase::Draining;
                    e.reason =
                        format!("reached max_lifetime {}", humantime::format_duration(policy.max_lifetime));
                    if let Some(m) = &e.machine {
                        m.drain();
                    }
                }
            }
        }

        for e in st.machines.values_mut() {
            if e.busy {
                continue;
            }
            match e.phase {
                MachinePhase::Draining => {
                    let idle = e.machine.as_ref().is_none_or(|m| m.assigned() == 0);
                    if idle {
                        e.busy = true;
                        actions.push(Action::Stop { id: e.id.clone(), reason: e.reason.clone() });
                        continue;
                    }
                }
                MachinePhase::Unhealthy => {
                    e.busy = true;
                    actions.push(Action::Stop { id: e.id.clone(), reason: e.reason.clone() });
                    continue;
                }
                _ => {}
            }
            if !matches!(e.phase, MachinePhase::Ready | MachinePhase::Draining | MachinePhase::Checking) {
                continue;
            }
            let renew_due = e
                .lease_until
                .is_some_and(|l| l.saturating_duration_since(now) < config.lease / 2 && now >= e.next_renew);
            if renew_due {
                e.busy = true;
                actions.push(Action::Renew(e.id.clone()));
            } else if e.phase != MachinePhase::Checking && now >= e.next_health {
                e.busy = true;
                actions.push(Action::Health(e.id.clone()));
            }
        }
        actions
    }

    // ---- launching ----

    fn spawn_launch(&self, spec: MachineSpec) {
        let pool = self.clone();
        let span = tracing::info_span!("launch", workflow_version_id = %spec.workflow_version_id, server_type = %spec.server_type);
        self.inner.tracker.spawn(async move { pool.launch(spec).await }.instrument(span));
    }

    async fn launch(&self, spec: MachineSpec) {
        let started = Instant::now();
        self.send(PoolEvent::Provisioning {
            spec: spec.clone(),
            machine_id: String::new(),
            phase: ProvisionPhase::LaunchRequested,
            elapsed: Duration::ZERO,
        });
        let lease = self.inner.config.lease;
        let record_id = format!("launch-{}", uuid::Uuid::new_v4().simple());
        let record = LaunchRecord {
            workflow_version_id: spec.workflow_version_id.clone(),
            server_type: spec.server_type.clone(),
            duration_secs: lease.as_secs(),
            requested_ms: now_ms(),
        };
        // Written before the call: if comfyrelay dies before it learns the server id, the next start
        // recognises the server as ours and stops it.
        let row = MachineRow {
            id: record_id.clone(),
            kind: KIND_LAUNCH.into(),
            state: "launching".into(),
            created_ms: record.requested_ms,
            updated_ms: record.requested_ms,
            body: serde_json::to_string(&record).unwrap_or_default(),
        };
        if let Err(e) = self.inner.store.put_machine(&row).await {
            self.launch_done(&spec);
            self.launch_failed(&spec, format!("cannot record the launch: {e}"), true);
            return;
        }
        let request = LaunchRequest {
            workflow_version_id: spec.workflow_version_id.clone(),
            server_type: ServerType::parse(&spec.server_type),
            estimated_duration: lease,
        };
        let result = tokio::select! {
            r = self.inner.client.launch(&request) => Some(r),
            () = self.inner.shutdown.cancelled() => None,
        };
        let server = match result {
            None => {
                self.launch_done(&spec);
                return; // The launch record stays: the next start finds the server if it was launched.
            }
            Some(Err(e)) => {
                self.launch_done(&spec);
                if !e.is_ambiguous() {
                    let _ = self.inner.store.delete_machine(&record_id).await;
                }
                self.launch_failed(&spec, format!("launch failed: {}", public_error(&e)), true);
                return;
            }
            Some(Ok(server)) => server,
        };
        let id = server.server_id.clone();
        {
            let mut st = self.state();
            if let Some(n) = st.launching.get_mut(&spec) {
                *n = n.saturating_sub(1);
            }
            st.stats.launched += 1;
            let mut entry = self.new_entry(&id, spec.clone(), MachinePhase::Starting, started);
            entry.busy = true;
            st.machines.insert(id.clone(), entry);
        }
        self.persist(&id).await;
        let _ = self.inner.store.delete_machine(&record_id).await;
        info!(machine = %id, "RunComfy machine launched; waiting for Ready");
        self.announce(&spec, &id, ProvisionPhase::Starting, started);
        self.bring_up(id, spec, started).await;
    }

    fn launch_done(&self, spec: &MachineSpec) {
        let mut st = self.state();
        if let Some(n) = st.launching.get_mut(spec) {
            *n = n.saturating_sub(1);
        }
    }

    fn new_entry(&self, id: &str, spec: MachineSpec, phase: MachinePhase, launched_at: Instant) -> Entry {
        let now = Instant::now();
        Entry {
            id: id.to_string(),
            price: self.price(&spec.server_type),
            spec,
            phase,
            launched_ms: now_ms() - now.saturating_duration_since(launched_at).as_millis() as i64,
            launched_at,
            ready_ms: None,
            ready_at: None,
            stopped_ms: None,
            stopped_at: None,
            lease_until: None,
            url: None,
            reason: String::new(),
            machine: None,
            busy: false,
            next_health: now + self.inner.config.health_interval,
            next_renew: now,
            health_checks: 0,
            unreachable_since: None,
            announced: ProvisionPhase::Starting,
        }
    }

    /// Starting → Ready at the provider → ComfyUI answers → jobs. On failure the machine is stopped.
    async fn bring_up(&self, id: String, spec: MachineSpec, started: Instant) {
        let policy = self.policy(&spec);
        let left = policy.ready_timeout.saturating_sub(started.elapsed());
        let waited = tokio::select! {
            r = self.inner.client.wait_ready(&id, left) => r,
            () = self.inner.shutdown.cancelled() => return self.release(&id),
        };
        let server = match waited {
            Ok(server) => server,
            Err(e) => {
                let reason = format!("did not become ready: {}", public_error(&e));
                self.launch_failed(&spec, format!("machine {id} {reason}"), false);
                self.mark_for_stop(&id, MachinePhase::Unhealthy, reason);
                return;
            }
        };
        let Some(url) = server.main_service_url.clone() else { return self.release(&id) };
        {
            let now = Instant::now();
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(&id) else { return };
            if e.phase == MachinePhase::Starting {
                e.phase = MachinePhase::Checking;
            }
            e.ready_at = Some(now);
            e.ready_ms = Some(now_ms());
            e.url = Some(url.clone());
            e.lease_until = Some(lease_end(&server, now, self.inner.client.options().ready_poll_interval));
        }
        self.persist(&id).await;
        self.announce(&spec, &id, ProvisionPhase::Ready, started);
        let machine = match self.connect(&id, &url, &spec) {
            Ok(m) => m,
            Err(e) => {
                self.launch_failed(&spec, format!("machine {id}: bad ComfyUI URL: {e}"), false);
                self.mark_for_stop(&id, MachinePhase::Unhealthy, "its ComfyUI URL is invalid".into());
                return;
            }
        };
        let healthy = tokio::select! {
            ok = self.wait_comfyui(&machine, self.inner.config.health_timeout) => ok,
            () = self.inner.shutdown.cancelled() => return self.release(&id),
        };
        if !healthy {
            machine.retire("its ComfyUI never answered");
            let timeout = humantime::format_duration(self.inner.config.health_timeout);
            self.launch_failed(
                &spec,
                format!("machine {id}: ComfyUI did not answer within {timeout}"),
                false,
            );
            self.mark_for_stop(&id, MachinePhase::Unhealthy, "its ComfyUI never answered".into());
            return;
        }
        let announce = {
            let now = Instant::now();
            let mut st = self.state();
            st.failures.remove(&spec);
            match st.machines.get_mut(&id) {
                Some(e) => {
                    e.machine = Some(machine.clone());
                    e.busy = false;
                    e.next_health = now + self.inner.config.health_interval;
                    if e.phase == MachinePhase::Checking {
                        e.phase = MachinePhase::Ready;
                        true
                    } else {
                        // Drained while starting: it gets no jobs and the planner stops it.
                        machine.drain();
                        false
                    }
                }
                None => false,
            }
        };
        self.persist(&id).await;
        if announce {
            info!(machine = %id, after = ?started.elapsed(), "RunComfy machine ready for jobs");
            self.announce(&spec, &id, ProvisionPhase::ComfyuiReachable, started);
            self.send(PoolEvent::Ready(machine));
        }
        self.inner.wake.notify_one();
    }

    fn connect(&self, id: &str, url: &str, spec: &MachineSpec) -> Result<Arc<Machine>, comfy::ComfyError> {
        Machine::connect_runcomfy(
            id,
            url,
            spec.clone(),
            self.price(&spec.server_type),
            self.inner.comfy.clone(),
            Some(stable_client_id(&self.inner.instance, id)),
            self.inner.prequeue,
            self.inner.shutdown.child_token(),
        )
    }

    /// Whether the machine's ComfyUI answers `/system_stats` and accepts the WebSocket within `timeout`.
    async fn wait_comfyui(&self, machine: &Machine, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(250);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let probe = tokio::time::timeout(left.min(PROBE_TIMEOUT), machine.client.system_stats()).await;
            if matches!(probe, Ok(Ok(_))) {
                let left = deadline.saturating_duration_since(Instant::now());
                return machine.conn.wait_connected(left).await.is_ok();
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// A launch (or bring-up) failed: back off, and tell the engine whether waiting jobs should fail.
    fn launch_failed(&self, spec: &MachineSpec, reason: String, launch_call_failed: bool) {
        let gave_up = {
            let mut st = self.state();
            st.stats.launch_failures += 1;
            let f = st.failures.entry(spec.clone()).or_default();
            f.consecutive += 1;
            let backoff = self.inner.config.launch_retry_backoff * 2u32.saturating_pow(f.consecutive - 1);
            f.retry_at = Some(Instant::now() + backoff.min(Duration::from_secs(300)));
            let gave_up = f.consecutive >= self.inner.config.max_launch_failures;
            if gave_up {
                f.consecutive = 0;
            }
            gave_up
        };
        warn!(?spec, %reason, gave_up, launch_call_failed, "provisioning failed");
        self.send(PoolEvent::ProvisioningFailed { spec: spec.clone(), reason, gave_up });
        self.inner.wake.notify_one();
    }

    /// Clears the busy flag of a machine whose task ended without a verdict (shutdown).
    fn release(&self, id: &str) {
        if let Some(e) = self.state().machines.get_mut(id) {
            e.busy = false;
        }
    }

    /// Hands the machine to the planner for stopping (it spawns the DELETE on its next round).
    fn mark_for_stop(&self, id: &str, phase: MachinePhase, reason: String) {
        let machine = {
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(id) else { return };
            if matches!(e.phase, MachinePhase::Stopping | MachinePhase::Stopped) {
                return;
            }
            e.phase = phase;
            e.reason = reason.clone();
            e.busy = false;
            e.machine.clone()
        };
        if let Some(m) = machine {
            m.retire(&reason);
        }
        self.inner.wake.notify_one();
    }

    // ---- stopping ----

    fn spawn_stop(&self, id: String, reason: String) {
        let pool = self.clone();
        let span = tracing::info_span!("stop", machine = %id);
        self.inner.tracker.spawn(async move { pool.stop(id, reason).await }.instrument(span));
    }

    /// DELETEs the machine until the API confirms it. Not cut by shutdown (a stop must finish); bounded by
    /// the caller of [`Pool::close`].
    async fn stop(&self, id: String, reason: String) {
        let (machine, was_ready) = {
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(&id) else { return };
            if e.phase == MachinePhase::Stopped {
                return;
            }
            let was_ready = e.machine.is_some();
            e.phase = MachinePhase::Stopping;
            e.busy = true;
            if e.reason.is_empty() {
                e.reason = reason.clone();
            }
            (e.machine.clone(), was_ready)
        };
        if let Some(m) = &machine {
            m.retire(&reason);
        }
        if was_ready {
            self.send(PoolEvent::Removed { machine_id: id.clone(), reason: reason.clone() });
        }
        self.persist(&id).await;
        info!(machine = %id, %reason, "stopping RunComfy machine");
        let mut attempt = 0u32;
        loop {
            match self.inner.client.delete_server(&id).await {
                Ok(outcome) => {
                    debug!(?outcome, "DELETE confirmed");
                    break;
                }
                Err(e) => {
                    attempt += 1;
                    error!(error = %public_error(&e), attempt, "DELETE failed; the machine is still billed; retrying");
                    tokio::time::sleep(STOP_RETRY.min(Duration::from_secs(u64::from(attempt) * 2))).await;
                }
            }
        }
        let now = Instant::now();
        let billed = {
            let mut st = self.state();
            st.stats.stopped += 1;
            let Some(e) = st.machines.get_mut(&id) else { return };
            e.phase = MachinePhase::Stopped;
            e.stopped_at = Some(now);
            e.stopped_ms = Some(now_ms());
            e.busy = false;
            e.billed(now)
        };
        self.persist(&id).await;
        self.prune_stopped();
        info!(machine = %id, billed_s = billed.as_secs(), "RunComfy machine stopped");
        if let Some(m) = machine {
            m.conn.shutdown().await;
        }
        self.inner.wake.notify_one();
    }

    fn prune_stopped(&self) {
        let mut st = self.state();
        let stopped: Vec<(i64, String)> = st
            .machines
            .values()
            .filter(|e| e.phase == MachinePhase::Stopped)
            .map(|e| (e.stopped_ms.unwrap_or_default(), e.id.clone()))
            .collect();
        if stopped.len() > KEEP_STOPPED {
            let mut stopped = stopped;
            stopped.sort();
            for (_, id) in stopped.iter().take(stopped.len() - KEEP_STOPPED) {
                st.machines.remove(id);
            }
        }
    }

    // ---- leases and health ----

    fn spawn_renew(&self, id: String) {
        let pool = self.clone();
        let span = tracing::debug_span!("renew", machine = %id);
        self.inner.tracker.spawn(async move { pool.renew(id).await }.instrument(span));
    }

    /// Extends the lease: the total duration becomes (time since Ready) + lease.
    async fn renew(&self, id: String) {
        let lease = self.inner.config.lease;
        let Some(ready_at) = self.state().machines.get(&id).and_then(|e| e.ready_at) else {
            return self.release(&id);
        };
        let total = Instant::now().saturating_duration_since(ready_at) + lease;
        let total = Duration::from_secs(total.as_secs_f64().ceil() as u64);
        let result = tokio::select! {
            r = self.inner.client.update_estimated_duration(&id, total) => r,
            () = self.inner.shutdown.cancelled() => return self.release(&id),
        };
        match result {
            Ok(_) => {
                {
                    let mut st = self.state();
                    st.stats.renewals += 1;
                    if let Some(e) = st.machines.get_mut(&id) {
                        // Ready was seen up to one status poll late: count the lease from a poll earlier.
                        let slack = self.inner.client.options().ready_poll_interval;
                        e.lease_until =
                            Some((ready_at + total).checked_sub(slack).unwrap_or_else(Instant::now));
                        e.busy = false;
                    }
                }
                debug!(total_s = total.as_secs(), "lease extended");
                self.persist(&id).await;
            }
            Err(RunComfyError::NotFound { .. }) => {
                self.gone(&id, "the provider no longer knows it".into());
            }
            Err(e) => {
                warn!(error = %public_error(&e), "cannot extend the lease; retrying");
                if let Some(e) = self.state().machines.get_mut(&id) {
                    e.busy = false;
                    e.next_renew = Instant::now() + RENEW_RETRY;
                }
            }
        }
    }

    fn spawn_health(&self, id: String) {
        let pool = self.clone();
        let span = tracing::debug_span!("health", machine = %id);
        self.inner.tracker.spawn(async move { pool.health(id).await }.instrument(span));
    }

    /// Probes the machine's ComfyUI (every time) and its provider status (every [`STATUS_EVERY`] times).
    async fn health(&self, id: String) {
        let (machine, check_status) = {
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(&id) else { return };
            e.health_checks += 1;
            (e.machine.clone(), e.health_checks % STATUS_EVERY == 0)
        };
        let Some(machine) = machine else { return self.release(&id) };
        if check_status {
            let status = tokio::select! {
                r = self.inner.client.get_server(&id) => r,
                () = self.inner.shutdown.cancelled() => return self.release(&id),
            };
            match status {
                Ok(s) if s.current_status.is_terminal() => {
                    return self.gone(&id, format!("the provider reports it {}", s.current_status));
                }
                Err(RunComfyError::NotFound { .. }) => {
                    return self.gone(&id, "the provider no longer knows it".into());
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(error = %public_error(&e), "status check failed; not counted against the machine")
                }
            }
        }
        let answered =
            matches!(tokio::time::timeout(PROBE_TIMEOUT, machine.client.system_stats()).await, Ok(Ok(_)));
        let now = Instant::now();
        let unhealthy = {
            let mut st = self.state();
            let Some(e) = st.machines.get_mut(&id) else { return };
            e.busy = false;
            e.next_health = now + self.inner.config.health_interval;
            if answered {
                e.unreachable_since = None;
                None
            } else {
                let since = *e.unreachable_since.get_or_insert(now);
                let down = now.saturating_duration_since(since);
                warn!(machine = %id, down = ?down, "ComfyUI health check failed");
                (down >= self.inner.config.unhealthy_after
                    && matches!(e.phase, MachinePhase::Ready | MachinePhase::Draining))
                .then(|| format!("its ComfyUI did not answer for {}", humantime::format_duration(down)))
            }
        };
        if let Some(reason) = unhealthy {
            self.state().stats.unhealthy += 1;
            error!(machine = %id, %reason, "machine unhealthy; replacing it");
            self.mark_for_stop(&id, MachinePhase::Unhealthy, reason);
        }
    }

    /// The provider stopped the machine by itself (lease ran out, failure): retire it and confirm.
    fn gone(&self, id: &str, reason: String) {
        warn!(machine = %id, %reason, "RunComfy machine gone");
        self.state().stats.unhealthy += 1;
        self.mark_for_stop(id, MachinePhase::Unhealthy, reason);
    }

    // ---- persistence and reconciliation ----

    async fn persist(&self, id: &str) {
        let row = {
            let now = Instant::now();
            let st = self.state();
            let Some(e) = st.machines.get(id) else { return };
            MachineRow {
                id: e.id.clone(),
                kind: KIND_MACHINE.into(),
                state: serde_json::to_value(e.phase)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                created_ms: e.launched_ms,
                updated_ms: now_ms(),
                body: serde_json::to_string(&e.record(now)).unwrap_or_default(),
            }
        };
        if let Err(e) = self.inner.store.put_machine(&row).await {
            // The machine is still tracked in memory and its lease bounds the cost if we die now.
            error!(machine = %id, error = %e, "cannot record a machine's state");
        }
    }

    fn persist_later(&self, id: &str) {
        let pool = self.clone();
        let id = id.to_string();
        self.inner.tracker.spawn(async move { pool.persist(&id).await });
    }

    /// Lists the account's servers and settles each against the store. Returns the adopted machines ready
    /// for jobs.
    async fn reconcile(&self) -> Result<Vec<Arc<Machine>>, ReconcileError> {
        let rows = self.inner.store.list_machines().await.map_err(|e| ReconcileError(e.to_string()))?;
        let servers = self.inner.client.list_servers().await.map_err(|e| ReconcileError(public_error(&e)))?;
        let mut records: HashMap<String, (MachineRow, Record)> = HashMap::new();
        let mut launches: Vec<(String, LaunchRecord)> = Vec::new();
        for row in rows {
            match row.kind.as_str() {
                KIND_MACHINE => match serde_json::from_str::<Record>(&row.body) {
                    Ok(r) => {
                        records.insert(row.id.clone(), (row, r));
                    }
                    Err(e) => warn!(machine = %row.id, error = %e, "unreadable machine record"),
                },
                KIND_LAUNCH => {
                    if let Ok(r) = serde_json::from_str::<LaunchRecord>(&row.body) {
                        launches.push((row.id.clone(), r));
                    }
                }
                _ => {}
            }
        }
        let now = Instant::now();
        let mut adopted = Vec::new();
        let mut to_stop: Vec<(String, String)> = Vec::new();
        let mut to_bring_up: Vec<(String, MachineSpec)> = Vec::new();
        let mut seen = BTreeSet::new();
        for server in &servers {
            let id = server.server_id.clone();
            seen.insert(id.clone());
            if server.current_status.is_terminal() {
                continue;
            }
            if let Some((_, record)) = records.get(&id) {
                let spec = MachineSpec {
                    workflow_version_id: record.workflow_version_id.clone(),
                    server_type: record.server_type.clone(),
                };
                let mut entry = self.new_entry(&id, spec.clone(), MachinePhase::Starting, now);
                entry.launched_ms = record.launched_ms;
                entry.price = record.price_per_hour_usd;
                match record.phase {
                    MachinePhase::Stopping | MachinePhase::Stopped | MachinePhase::Unhealthy => {
                        entry.phase = MachinePhase::Unhealthy;
                        entry.reason = format!("left running ({:?}) by an earlier run", record.phase);
                        adopt_timing(&mut entry, server, record, now);
                        to_stop.push((id.clone(), entry.reason.clone()));
                        entry.busy = true;
                        self.state().machines.insert(id.clone(), entry);
                    }
                    _ if server.current_status.is_ready() && server.main_service_url.is_some() => {
                        adopt_timing(&mut entry, server, record, now);
                        let url = server.main_service_url.clone().unwrap_or_default();
                        entry.url = Some(url.clone());
                        let drained = record.phase == MachinePhase::Draining;
                        match self.connect(&id, &url, &spec) {
                            Ok(machine) if self.wait_comfyui(&machine, PROBE_TIMEOUT).await => {
                                entry.phase =
                                    if drained { MachinePhase::Draining } else { MachinePhase::Ready };
                                entry.reason = record.reason.clone();
                                if drained {
                                    machine.drain();
                                }
                                // Its idle time died with the previous process: unless a recovered job
                                // uses it within ADOPT_GRACE (or it is part of the warm minimum), it is
                                // stopped rather than billed for another idle period.
                                let policy = self.policy(&spec);
                                let idle = policy.idle_stop.saturating_sub(ADOPT_GRACE);
                                machine.set_idle_since(now.checked_sub(idle).unwrap_or(now));
                                entry.machine = Some(machine.clone());
                                info!(machine = %id, "adopted a RunComfy machine launched before the restart");
                                adopted.push(machine);
                            }
                            Ok(machine) => {
                                machine.retire("its ComfyUI did not answer after a restart");
                                entry.phase = MachinePhase::Unhealthy;
                                entry.reason = "its ComfyUI did not answer after a restart".into();
                                entry.busy = true;
                                to_stop.push((id.clone(), entry.reason.clone()));
                            }
                            Err(_) => {
                                entry.phase = MachinePhase::Unhealthy;
                                entry.reason = "its ComfyUI URL is invalid".into();
                                entry.busy = true;
                                to_stop.push((id.clone(), entry.reason.clone()));
                            }
                        }
                        self.state().machines.insert(id.clone(), entry);
                    }
                    _ => {
                        // Still starting: wait for it as for a fresh launch.
                        entry.busy = true;
                        self.state().machines.insert(id.clone(), entry);
                        to_bring_up.push((id.clone(), spec));
                    }
                }
                continue;
            }
            // Not tracked: a launch we recorded but never learned the id of?
            let claim = launches.iter().position(|(_, l)| {
                server.server_type.as_ref().is_some_and(|t| t.as_str() == l.server_type)
                    && server.estimated_duration.is_none_or(|d| d == l.duration_secs)
            });
            let reason = match claim {
                Some(i) => {
                    launches.remove(i);
                    Some("launched by an earlier run that did not record it".to_string())
                }
                None if self.inner.config.stop_unknown_servers => {
                    Some("not launched by this comfyrelay (runcomfy.stop_unknown_servers)".to_string())
                }
                None => {
                    warn!(machine = %id, status = %server.current_status, "a RunComfy server this comfyrelay did not launch is running; left alone");
                    None
                }
            };
            if let Some(reason) = reason {
                let spec = MachineSpec {
                    workflow_version_id: String::new(),
                    server_type: server
                        .server_type
                        .as_ref()
                        .map(|t| t.as_str().to_string())
                        .unwrap_or_default(),
                };
                let mut entry = self.new_entry(&id, spec, MachinePhase::Unhealthy, now);
                entry.reason = reason.clone();
                entry.busy = true;
                if server.current_status.is_ready() {
                    entry.ready_at = Some(now);
                    entry.ready_ms = Some(now_ms());
                }
                self.state().machines.insert(id.clone(), entry);
                to_stop.push((id.clone(), reason));
            }
        }
        // Tracked machines the API no longer lists stopped by themselves (lease) or were deleted.
        for (id, (row, record)) in &records {
            if seen.contains(id) || record.phase == MachinePhase::Stopped {
                continue;
            }
            let mut record = record.clone();
            record.phase = MachinePhase::Stopped;
            let stopped = record.lease_until_ms.unwrap_or(row.updated_ms).min(now_ms());
            record.stopped_ms = Some(stopped);
            if let Some(r) = record.ready_ms {
                record.billed_seconds = ((stopped - r).max(0) as f64) / 1000.0;
            }
            if record.reason.is_empty() {
                record.reason = "stopped while comfyrelay was not running".into();
            }
            info!(machine = %id, "a machine tracked before the restart has stopped meanwhile");
            let row = MachineRow {
                state: "stopped".into(),
                updated_ms: now_ms(),
                body: serde_json::to_string(&record).unwrap_or_default(),
                ..row.clone()
            };
            let _ = self.inner.store.put_machine(&row).await;
        }
        for (launch_id, _) in launches {
            let _ = self.inner.store.delete_machine(&launch_id).await;
        }
        self.state().reconciled = true;
        for id in adopted.iter().map(|m| m.id.clone()).collect::<Vec<_>>() {
            self.persist(&id).await;
        }
        for (id, reason) in to_stop {
            self.spawn_stop(id, reason);
        }
        for (id, spec) in to_bring_up {
            let pool = self.clone();
            let started = Instant::now();
            self.inner.tracker.spawn(
                async move { pool.bring_up(id, spec, started).await }
                    .instrument(tracing::info_span!("adopt_starting")),
            );
        }
        info!(servers = servers.len(), adopted = adopted.len(), "RunComfy machines reconciled");
        self.inner.wake.notify_one();
        Ok(adopted)
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

/// An API error as it may be shown to callers and logs: the client's errors never carry the token.
fn public_error(e: &RunComfyError) -> String {
    e.to_string()
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
