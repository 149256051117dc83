//! The scheduler: one task that owns the queue (priority, then FIFO) and hands jobs to machines with room,
//! publishes queue positions, enforces queue deadlines, reports the demand per machine spec to the RunComfy
//! pool and applies the pool's events (machines ready or removed, provisioning progress).
//!
//! Exit policy: runs until shutdown; a failure to write an event is logged and skipped.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use super::{EventKind, FailureReason, JobFailure, JobId, JobManager, JobState, model::now_ms};
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

/// Messages to the scheduler.
#[derive(Debug)]
pub(super) enum SchedMsg {
    /// A job is waiting.
    Enqueue {
        /// The job.
        id: JobId,
        /// Its priority.
        priority: i32,
        /// Its creation time.
        created_ms: i64,
        /// The machine spec it needs (RunComfy), if any.
        spec: Option<MachineSpec>,
    },
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
    },
}

/// Queue order: higher priority first, then older first, then id.
type Key = (Reverse<i32>, i64, JobId);

pub(super) struct Scheduler {
    manager: JobManager,
    rx: mpsc::UnboundedReceiver<SchedMsg>,
    pool_rx: Option<mpsc::UnboundedReceiver<PoolEvent>>,
    queue: BTreeSet<Key>,
    keys: HashMap<JobId, (Key, Option<MachineSpec>)>,
    published: HashMap<JobId, u32>,
    last_published: Option<tokio::time::Instant>,
    last_demand: BTreeMap<MachineSpec, usize>,
    /// The last (machine, provisioning phase) told to each waiting job: the pool announces to every job
    /// waiting for a spec, and a job must not hear the same news twice.
    provisioning: HashMap<JobId, (String, &'static str)>,
    /// Running jobs recovered on a RunComfy machine not known yet, until `PoolEvent::Reconciled`.
    held: Vec<JobId>,
}

impl Scheduler {
    pub(super) fn new(
        manager: JobManager,
        rx: mpsc::UnboundedReceiver<SchedMsg>,
        pool_rx: Option<mpsc::UnboundedReceiver<PoolEvent>>,
        running: Vec<(JobId, Arc<Machine>)>,
        held: Vec<JobId>,
    ) -> Self {
        for (_, machine) in &running {
            machine.job_assigned("");
        }
        Self {
            manager,
            rx,
            pool_rx,
            queue: BTreeSet::new(),
            keys: HashMap::new(),
            published: HashMap::new(),
            last_published: None,
            last_demand: BTreeMap::new(),
            provisioning: HashMap::new(),
            held,
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
            self.publish_positions().await;
            self.report_demand();
        }
    }

    fn handle(&mut self, msg: SchedMsg) {
        match msg {
            SchedMsg::Enqueue { id, priority, created_ms, spec } => {
                let key = (Reverse(priority), created_ms, id);
                self.queue.insert(key);
                self.keys.insert(id, (key, spec));
            }
            SchedMsg::Remove { id, reply } => {
                let removed = match self.keys.remove(&id) {
                    Some((key, _)) => self.queue.remove(&key),
                    None => false,
                };
                self.published.remove(&id);
                self.provisioning.remove(&id);
                let _ = reply.send(removed);
            }
            SchedMsg::Done { machine } => machine.job_done(),
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
        let mut taken = Vec::new();
        let mut full_specs: BTreeSet<Option<MachineSpec>> = BTreeSet::new();
        for key in self.queue.iter().take(DISPATCH_SCAN) {
            let id = key.2;
            let spec = self.keys.get(&id).and_then(|(_, s)| s.clone());
            if full_specs.contains(&spec) {
                continue;
            }
            let Some(live) = self.manager.live(id) else {
                // Finished meanwhile (cancelled, expired): drop it.
                taken.push(*key);
                continue;
            };
            let workflow = live.job.try_lock().map(|j| j.workflow.clone()).unwrap_or_default();
            let Some(machine) = self.pick_machine(spec.as_ref(), &workflow) else {
                full_specs.insert(spec);
                continue;
            };
            if !machine.try_assign(&workflow) {
                // Drained by the pool between the pick and now: try again next round.
                continue;
            }
            taken.push(*key);
            self.manager.spawn_runner(live, machine, false);
        }
        for key in taken {
            self.queue.remove(&key);
            self.keys.remove(&key.2);
            self.published.remove(&key.2);
            self.provisioning.remove(&key.2);
        }
    }

    /// Publishes the position of every job within the window whose position changed.
    async fn publish_positions(&mut self) {
        let now = tokio::time::Instant::now();
        if self.last_published.is_some_and(|t| now - t < POSITION_INTERVAL) {
            return;
        }
        self.last_published = Some(now);
        let mut changes = Vec::new();
        for (i, key) in self.queue.iter().take(POSITION_WINDOW as usize).enumerate() {
            let position = i as u32 + 1;
            if self.published.get(&key.2) != Some(&position) {
                changes.push((key.2, position));
            }
        }
        for (id, position) in changes {
            self.published.insert(id, position);
            let Some(live) = self.manager.live(id) else { continue };
            let current = live.job.lock().await.queue_position;
            if current == position {
                continue;
            }
            let result = self
                .manager
                .append(&live, EventKind::Queued { position }, |job| {
                    job.queue_position = position;
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(job_id = %id, error = %e, "cannot record a queue position");
            }
        }
    }

    /// Tells the pool how many queued jobs wait for each spec, when that changed.
    fn report_demand(&mut self) {
        let Some(provisioner) = &self.manager.inner.provisioner else { return };
        let mut demand: BTreeMap<MachineSpec, usize> = BTreeMap::new();
        for (_, spec) in self.keys.values() {
            if let Some(spec) = spec {
                *demand.entry(spec.clone()).or_default() += 1;
            }
        }
        if demand != self.last_demand {
            provisioner.demand(&demand);
            self.last_demand = demand;
        }
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
                    let Some(live) = self.manager.live(id) else { continue };
                    let on = live.job.lock().await.machine_id.clone();
                    match self.manager.machines().into_iter().find(|m| on.as_ref() == Some(&m.id)) {
                        Some(machine) => {
                            machine.job_assigned("");
                            self.manager.spawn_runner(live, machine, true);
                        }
                        None => {
                            let reason = "its RunComfy machine did not survive the restart".to_string();
                            if let Err(e) = super::runner::lost_or_retry(&self.manager, &live, reason).await {
                                tracing::error!(job_id = %id, error = %e, "cannot settle a job whose machine is gone");
                            }
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
                let waiting = self.waiting_for(&spec);
                for id in waiting {
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
                    let Some(live) = self.manager.live(id) else { continue };
                    let kind = EventKind::Provisioning {
                        phase: phase.as_str().to_string(),
                        machine_id: machine_id.clone(),
                        server_type: spec.server_type.clone(),
                        elapsed_ms: elapsed.as_millis() as u64,
                    };
                    let now = now_ms();
                    let result = self
                        .manager
                        .append(&live, kind, |job| {
                            if job.state == JobState::Queued {
                                job.state = JobState::Provisioning;
                                job.provision_ms = Some(now);
                            }
                        })
                        .await;
                    if let Err(e) = result {
                        tracing::warn!(job_id = %id, error = %e, "cannot record provisioning progress");
                    }
                }
            }
            PoolEvent::ProvisioningFailed { spec, reason, gave_up } => {
                tracing::warn!(?spec, %reason, gave_up, "provisioning failed");
                if !gave_up {
                    return;
                }
                let all: Vec<JobId> = self
                    .keys
                    .iter()
                    .filter(|(_, (_, s))| s.as_ref() == Some(&spec))
                    .map(|(id, _)| *id)
                    .collect();
                for id in all {
                    if let Some((key, _)) = self.keys.remove(&id) {
                        self.queue.remove(&key);
                    }
                    self.published.remove(&id);
                    self.provisioning.remove(&id);
                    let Some(live) = self.manager.live(id) else { continue };
                    let failure =
                        JobFailure::new(FailureReason::Provisioning, format!("no machine: {reason}"));
                    if let Err(e) =
                        self.manager.finish(&live, EventKind::Failed { error: failure }, |_| {}).await
                    {
                        tracing::error!(job_id = %id, error = %e, "cannot fail a job waiting for a machine");
                    }
                }
            }
        }
    }

    /// Queued jobs that need `spec`, within the position window (head of the queue first).
    fn waiting_for(&self, spec: &MachineSpec) -> Vec<JobId> {
        self.queue
            .iter()
            .filter(|k| self.keys.get(&k.2).and_then(|(_, s)| s.as_ref()) == Some(spec))
            .take(POSITION_WINDOW as usize)
            .map(|k| k.2)
            .collect()
    }

    /// Fails queued jobs past their queue timeout or deadline.
    async fn expire(&mut self) {
        let now = now_ms();
        let timeout = self.manager.inner.config.queue_timeout.as_millis() as i64;
        let mut expired = Vec::new();
        for key in &self.queue {
            let Some(live) = self.manager.live(key.2) else { continue };
            let Ok(job) = live.job.try_lock() else { continue };
            if job.state.is_terminal() {
                continue;
            }
            if job.deadline_ms.is_some_and(|d| d <= now) {
                expired.push((
                    *key,
                    live.clone(),
                    FailureReason::DeadlineExceeded,
                    "the deadline passed in the queue",
                ));
            } else if now - job.created_ms >= timeout {
                expired.push((
                    *key,
                    live.clone(),
                    FailureReason::QueueTimeout,
                    "waited in the queue too long",
                ));
            }
        }
        for (key, live, reason, message) in expired {
            self.queue.remove(&key);
            self.keys.remove(&key.2);
            self.published.remove(&key.2);
            self.provisioning.remove(&key.2);
            let failure = JobFailure::new(reason, message);
            if let Err(e) = self.manager.finish(&live, EventKind::Failed { error: failure }, |_| {}).await {
                tracing::error!(job_id = %key.2, error = %e, "cannot expire a queued job");
            }
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
