//! The scheduler: one task that owns the queue (priority, then a fair share between tenants, then FIFO)
//! and hands jobs to machines with room,
//! publishes queue positions (and why the head of the queue waits), enforces queue deadlines, reports the
//! demand per machine spec to the RunComfy pool and applies the pool's events (machines ready or removed,
//! provisioning progress).
//!
//! It decides in memory and never waits on the disk: its decisions are events sent to the job log's
//! writer without awaiting their commit. Queue positions use [`Log::try_append`] (dropped when the inbox
//! is full and published again on the next tick); events that must not be lost (a job expired, a
//! provisioning phase, a pool that gave up) are queued without waiting, or, when the inbox is full, by a
//! short task of the engine's tracker.
//!
//! # Fair share
//! Among jobs of equal priority, tenants take turns (start-time fair queuing): each queued job gets a
//! round, one more than its tenant's previous job at that priority but never below the round last
//! dispatched. A tenant with 500 jobs queued holds rounds far ahead; another tenant's single job gets the
//! current round, so it is dispatched next (within one dispatch). With quotas on, a tenant's jobs running
//! at once are capped by its `max_running`; the rest wait while other tenants' jobs pass them.
//!
//! Exit policy: runs until shutdown.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use super::{
    EventKind, FailureReason, JobFailure, JobId, JobManager,
    model::{Usage, now_ms},
};
use crate::machine::{Machine, MachineSpec, PoolEvent, ProvisionPhase};

/// Queue positions beyond this are not re-published on every change (they would cost O(n²) events);
/// a job gets fresh position events once it is within this many of the head.
const POSITION_WINDOW: u32 = 32;

/// Queue positions are published at most this often: with millisecond jobs the queue moves on every
/// dispatch, and re-publishing each move would cost more writes than the jobs themselves.
const POSITION_INTERVAL: Duration = Duration::from_millis(200);

/// At most this many queued jobs are examined per dispatch round (bounds the cost of a long queue of jobs
/// whose spec has no machine yet).
const DISPATCH_SCAN: usize = 1024;

/// A job waiting in the queue, with what the scheduler needs to decide without reading it.
#[derive(Debug, Clone)]
pub(super) struct Waiting {
    /// The job.
    pub(super) id: JobId,
    /// Its tenant (for the fair share and `max_running`).
    pub(super) tenant: String,
    /// Its priority.
    pub(super) priority: i32,
    /// Its creation time.
    pub(super) created_ms: i64,
    /// Its deadline.
    pub(super) deadline_ms: Option<i64>,
    /// Its workflow (machines that last ran it are preferred).
    pub(super) workflow: String,
    /// The machine spec it needs (RunComfy), if any.
    pub(super) spec: Option<MachineSpec>,
}

/// Messages to the scheduler. The channel is unbounded but each job has at most one `Enqueue` in flight
/// and one `Done` per attempt, so it holds at most about two messages per live job (and live jobs are
/// bounded by `jobs.max_unfinished`).
#[derive(Debug)]
pub(super) enum SchedMsg {
    /// A job is waiting.
    Enqueue(Waiting),
    /// Remove a job from the queue; replies whether it was queued.
    Remove {
        /// The job.
        id: JobId,
        /// Whether it was queued (and is now removed).
        reply: oneshot::Sender<bool>,
    },
    /// A runner on this machine finished.
    Done {
        /// The machine.
        machine: Arc<Machine>,
        /// The tenant of the job it ran.
        tenant: String,
    },
}

/// Queue order: higher priority first, then the tenant's fair-share round, then older first, then id.
type Key = (Reverse<i32>, u64, i64, JobId);

pub(super) struct Scheduler {
    manager: JobManager,
    rx: mpsc::UnboundedReceiver<SchedMsg>,
    pool_rx: Option<mpsc::UnboundedReceiver<PoolEvent>>,
    queue: BTreeSet<Key>,
    waiting: HashMap<JobId, (Key, Waiting)>,
    /// What was last published to each job: its position and why it waits.
    published: HashMap<JobId, (u32, String)>,
    last_published: Option<tokio::time::Instant>,
    last_demand: BTreeMap<MachineSpec, usize>,
    /// The last (machine, provisioning phase) told to each waiting job: the pool announces to every job
    /// waiting for a spec, and a job must not hear the same news twice.
    provisioning: HashMap<JobId, (String, &'static str)>,
    /// Running jobs recovered on a RunComfy machine not known yet, until `PoolEvent::Reconciled`.
    held: Vec<JobId>,
    /// The last fair-share round given to each (tenant, priority).
    rounds: HashMap<(String, i32), u64>,
    /// The round of the last job dispatched at each priority.
    served: HashMap<i32, u64>,
    /// Jobs running per tenant (for `max_running`).
    running: HashMap<String, usize>,
}

impl Scheduler {
    pub(super) fn new(
        manager: JobManager,
        rx: mpsc::UnboundedReceiver<SchedMsg>,
        pool_rx: Option<mpsc::UnboundedReceiver<PoolEvent>>,
        running: Vec<(JobId, Arc<Machine>)>,
        held: Vec<JobId>,
    ) -> Self {
        let mut per_tenant: HashMap<String, usize> = HashMap::new();
        for (id, machine) in &running {
            machine.job_assigned("");
            if let Some(live) = manager.inner.log.live(*id) {
                *per_tenant.entry(live.spec.tenant.clone()).or_default() += 1;
            }
        }
        Self {
            manager,
            rx,
            pool_rx,
            queue: BTreeSet::new(),
            waiting: HashMap::new(),
            published: HashMap::new(),
            last_published: None,
            last_demand: BTreeMap::new(),
            provisioning: HashMap::new(),
            held,
            rounds: HashMap::new(),
            served: HashMap::new(),
            running: per_tenant,
        }
    }

    pub(super) async fn run(mut self) {
        let shutdown = self.manager.inner.shutdown.clone();
        let mut tick = tokio::time::interval(POSITION_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { return };
                    self.handle(msg);
                    // Take everything already waiting before dispatching, so a burst is ordered by priority.
                    while let Ok(msg) = self.rx.try_recv() {
                        self.handle(msg);
                    }
                }
                Some(event) = recv_pool(&mut self.pool_rx) => {
                    self.pool_event(event).await;
                }
                _ = tick.tick() => {
                    self.expire().await;
                }
            }
            self.dispatch();
            crate::metrics::queue_depth(self.queue.len());
            self.publish_positions();
            self.report_demand();
        }
    }

    fn handle(&mut self, msg: SchedMsg) {
        match msg {
            SchedMsg::Enqueue(w) => {
                let served = self.served.get(&w.priority).copied().unwrap_or(0);
                let last = self.rounds.entry((w.tenant.clone(), w.priority)).or_insert(0);
                let round = (*last + 1).max(served);
                *last = round;
                let key = (Reverse(w.priority), round, w.created_ms, w.id);
                self.queue.insert(key);
                self.waiting.insert(w.id, (key, w));
            }
            SchedMsg::Remove { id, reply } => {
                let removed = self.forget(id);
                let _ = reply.send(removed);
            }
            SchedMsg::Done { machine, tenant } => {
                machine.job_done();
                if let Some(n) = self.running.get_mut(&tenant) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }

    /// Drops a job from the queue and the scheduler's memory; returns whether it was queued.
    fn forget(&mut self, id: JobId) -> bool {
        self.published.remove(&id);
        self.provisioning.remove(&id);
        match self.waiting.remove(&id) {
            Some((key, _)) => self.queue.remove(&key),
            None => false,
        }
    }

    /// Picks the machine for a job: one with room whose spec matches; the least loaded first, preferring one
    /// that last ran the same workflow (its models are warm).
    fn pick_machine(&self, spec: Option<&MachineSpec>, workflow: &str) -> Option<Arc<Machine>> {
        let machines = self.manager.machines();
        machines
            .into_iter()
            .filter(|m| m.has_room() && m.spec.as_ref() == spec)
            .min_by_key(|m| (m.assigned(), m.last_workflow() != workflow))
    }

    fn dispatch(&mut self) {
        let mut demand = self.demand();
        let mut taken = Vec::new();
        let mut full_specs: BTreeSet<Option<MachineSpec>> = BTreeSet::new();
        for key in self.queue.iter().take(DISPATCH_SCAN) {
            let Some((_, w)) = self.waiting.get(&key.3) else { continue };
            if full_specs.contains(&w.spec) {
                continue;
            }
            if let Some(quotas) = &self.manager.inner.quotas
                && self.running.get(&w.tenant).copied().unwrap_or(0) >= quotas.of(&w.tenant).max_running
            {
                continue;
            }
            let Some(live) = self.manager.inner.log.live(w.id) else {
                // Ended meanwhile (cancelled, expired): drop it.
                taken.push(w.id);
                continue;
            };
            let Some(machine) = self.pick_machine(w.spec.as_ref(), &w.workflow) else {
                full_specs.insert(w.spec.clone());
                continue;
            };
            // The pool sizes itself on queued + assigned jobs, read from another task: a job must leave the
            // demand before it counts as assigned, or the pool sees it twice and launches a machine for it.
            if let Some(spec) = &w.spec {
                demand.entry(spec.clone()).and_modify(|n| *n = n.saturating_sub(1));
                tell_demand(&self.manager, &mut self.last_demand, &demand);
            }
            if !machine.try_assign(&w.workflow) {
                // Drained by the pool between the pick and now: try again next round.
                if let Some(spec) = &w.spec {
                    *demand.entry(spec.clone()).or_default() += 1;
                }
                continue;
            }
            taken.push(w.id);
            *self.running.entry(w.tenant.clone()).or_default() += 1;
            let served = self.served.entry(w.priority).or_insert(0);
            *served = (*served).max(key.1);
            self.manager.spawn_runner(live, machine, false);
        }
        for id in taken {
            self.forget(id);
        }
    }

    /// Why jobs for static servers wait, when it is not just that every server is busy.
    fn static_wait_reason(&self) -> String {
        let statics: Vec<Arc<Machine>> =
            self.manager.machines().into_iter().filter(|m| m.spec.is_none()).collect();
        if statics.is_empty() {
            return "no ComfyUI server is configured".into();
        }
        if statics.iter().all(|m| m.is_draining()) {
            return "every ComfyUI server is drained (UndrainMachine takes one back)".into();
        }
        if statics.iter().all(|m| m.is_draining() || !m.conn.is_connected()) {
            return "no ComfyUI server is reachable".into();
        }
        if statics.iter().all(|m| m.is_draining() || !m.conn.is_connected() || m.holds_abandoned()) {
            return "every ComfyUI server still runs a cancelled prompt that ignored interrupts (it takes jobs \
                    again once that prompt ends)"
                .into();
        }
        String::new()
    }

    /// Publishes the position (and wait reason) of every job within the window whose position changed.
    fn publish_positions(&mut self) {
        let now = tokio::time::Instant::now();
        if self.last_published.is_some_and(|t| now - t < POSITION_INTERVAL) {
            return;
        }
        self.last_published = Some(now);
        let mut reason_static: Option<String> = None;
        let mut changes = Vec::new();
        for (i, key) in self.queue.iter().take(POSITION_WINDOW as usize).enumerate() {
            let Some((_, w)) = self.waiting.get(&key.3) else { continue };
            let reason = match &w.spec {
                None => reason_static.get_or_insert_with(|| self.static_wait_reason()).clone(),
                Some(_) => String::new(),
            };
            let told = (i as u32 + 1, reason);
            if self.published.get(&key.3) != Some(&told) {
                changes.push((key.3, told));
            }
        }
        for (id, told) in changes {
            let kind = EventKind::Queued { position: told.0, reason: told.1.clone() };
            // Never waits: a position the full inbox cannot take is published again next time.
            if self.manager.inner.log.try_append(id, kind).is_ok() {
                self.published.insert(id, told);
            }
        }
    }

    /// Tells the pool how many queued jobs wait for each spec, when that changed.
    fn report_demand(&mut self) {
        let demand = self.demand();
        tell_demand(&self.manager, &mut self.last_demand, &demand);
    }

    /// Queued jobs per machine spec.
    fn demand(&self) -> BTreeMap<MachineSpec, usize> {
        let mut demand: BTreeMap<MachineSpec, usize> = BTreeMap::new();
        for (_, w) in self.waiting.values() {
            if let Some(spec) = &w.spec {
                *demand.entry(spec.clone()).or_default() += 1;
            }
        }
        demand
    }

    async fn pool_event(&mut self, event: PoolEvent) {
        match event {
            PoolEvent::Ready(machine) => {
                tracing::info!(machine = %machine.id, "machine ready for jobs");
                if let Ok(mut list) = self.manager.inner.machines.write() {
                    list.retain(|m| m.id != machine.id);
                    list.push(machine);
                }
            }
            PoolEvent::Reconciled { adopted } => {
                if let Ok(mut list) = self.manager.inner.machines.write() {
                    list.retain(|m| !adopted.iter().any(|a| a.id == m.id));
                    list.extend(adopted);
                }
                for id in std::mem::take(&mut self.held) {
                    let Some(live) = self.manager.inner.log.live(id) else { continue };
                    let on = live.record().machine_id.clone();
                    match self.manager.machines().into_iter().find(|m| on.as_ref() == Some(&m.id)) {
                        Some(machine) => {
                            machine.job_assigned("");
                            *self.running.entry(live.spec.tenant.clone()).or_default() += 1;
                            self.manager.spawn_runner(live, machine, true);
                        }
                        None => {
                            // Settled by a short task: the scheduler does not wait on the log.
                            let manager = self.manager.clone();
                            let reason = "its RunComfy machine did not survive the restart".to_string();
                            self.manager.inner.tracker.spawn(async move {
                                let usage = super::model::Usage::default();
                                if let Err(e) = manager.retry_or(&live, reason, FailureReason::Lost, usage).await {
                                    tracing::error!(job_id = %id, error = %crate::telemetry::ErrorChain(&e), "cannot settle a job whose machine is gone");
                                }
                            });
                        }
                    }
                }
            }
            PoolEvent::Removed { machine_id, reason } => {
                tracing::info!(machine = %machine_id, %reason, "machine removed");
                if let Ok(mut list) = self.manager.inner.machines.write() {
                    for m in list.iter().filter(|m| m.id == machine_id) {
                        m.drain();
                    }
                    list.retain(|m| m.id != machine_id);
                }
            }
            PoolEvent::Provisioning { spec, machine_id, phase, elapsed } => {
                for id in self.waiting_for(&spec) {
                    let told = (machine_id.clone(), phase.as_str());
                    let last = self.provisioning.get(&id);
                    // "Waiting for machine M" is news only to a job that has heard nothing of M.
                    let stale = last == Some(&told)
                        || (phase == ProvisionPhase::WaitingForMachine
                            && last.is_some_and(|(m, _)| m == &machine_id));
                    if stale {
                        continue;
                    }
                    self.provisioning.insert(id, told);
                    let kind = EventKind::Provisioning {
                        phase: phase.as_str().to_string(),
                        machine_id: machine_id.clone(),
                        server_type: spec.server_type.clone(),
                        elapsed_ms: elapsed.as_millis() as u64,
                    };
                    self.manager.emit_reliably(id, kind);
                }
            }
            PoolEvent::ProvisioningFailed { spec, reason, gave_up } => {
                tracing::warn!(?spec, %reason, gave_up, "provisioning failed");
                if !gave_up {
                    return;
                }
                let all: Vec<JobId> = self
                    .waiting
                    .iter()
                    .filter(|(_, (_, w))| w.spec.as_ref() == Some(&spec))
                    .map(|(id, _)| *id)
                    .collect();
                for id in all {
                    self.forget(id);
                    let error = JobFailure::new(FailureReason::Provisioning, format!("no machine: {reason}"));
                    self.manager.emit_reliably(id, EventKind::Failed { error, usage: Usage::default() });
                }
            }
        }
    }

    /// Queued jobs that need `spec`, within the position window (head of the queue first).
    fn waiting_for(&self, spec: &MachineSpec) -> Vec<JobId> {
        self.queue
            .iter()
            .filter(|k| self.waiting.get(&k.3).and_then(|(_, w)| w.spec.as_ref()) == Some(spec))
            .take(POSITION_WINDOW as usize)
            .map(|k| k.3)
            .collect()
    }

    /// Fails queued jobs past their queue timeout or deadline.
    async fn expire(&mut self) {
        let now = now_ms();
        let timeout = self.manager.inner.config.queue_timeout.as_millis() as i64;
        let expired: Vec<(JobId, FailureReason, &'static str)> = self
            .waiting
            .values()
            .filter_map(|(_, w)| {
                if w.deadline_ms.is_some_and(|d| d <= now) {
                    Some((w.id, FailureReason::DeadlineExceeded, "the deadline passed in the queue"))
                } else if now - w.created_ms >= timeout {
                    Some((w.id, FailureReason::QueueTimeout, "waited in the queue too long"))
                } else {
                    None
                }
            })
            .collect();
        for (id, reason, message) in expired {
            self.forget(id);
            let error = JobFailure::new(reason, message);
            self.manager.emit_reliably(id, EventKind::Failed { error, usage: Usage::default() });
        }
    }
}

async fn recv_pool(rx: &mut Option<mpsc::UnboundedReceiver<PoolEvent>>) -> Option<PoolEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("queued", &self.queue.len()).finish()
    }
}

/// Tells the pool how many jobs wait for each spec, when that changed since `last`.
fn tell_demand(
    manager: &JobManager,
    last: &mut BTreeMap<MachineSpec, usize>,
    demand: &BTreeMap<MachineSpec, usize>,
) {
    let Some(provisioner) = &manager.inner.provisioner else { return };
    let mut demand = demand.clone();
    demand.retain(|_, n| *n > 0);
    if demand != *last {
        provisioner.demand(&demand);
        *last = demand;
    }
}
