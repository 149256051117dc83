//! The scheduler: one task that owns the queue (priority, then FIFO) and the machines' free slots, hands
//! jobs to machines, publishes queue positions and enforces queue deadlines.
//!
//! Exit policy: runs until shutdown; a failure to write a position event is logged and skipped.

use std::{
    cmp::Reverse,
    collections::{BTreeSet, HashMap},
    sync::atomic::Ordering,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use super::{EventKind, FailureReason, JobFailure, JobId, JobManager, JobState, model::now_ms};

/// Queue positions beyond this are not re-published on every change (they would cost O(n²) events);
/// a job gets fresh position events once it is within this many of the head.
const POSITION_WINDOW: u32 = 32;

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
        /// Machine index.
        machine: usize,
    },
}

/// Queue order: higher priority first, then older first, then id.
type Key = (Reverse<i32>, i64, JobId);

pub(super) struct Scheduler {
    manager: JobManager,
    rx: mpsc::UnboundedReceiver<SchedMsg>,
    queue: BTreeSet<Key>,
    keys: HashMap<JobId, Key>,
    published: HashMap<JobId, u32>,
}

impl Scheduler {
    pub(super) fn new(
        manager: JobManager,
        rx: mpsc::UnboundedReceiver<SchedMsg>,
        running: Vec<(JobId, usize)>,
    ) -> Self {
        for (_, idx) in &running {
            manager.inner.machines[*idx].assigned.fetch_add(1, Ordering::Relaxed);
        }
        Self { manager, rx, queue: BTreeSet::new(), keys: HashMap::new(), published: HashMap::new() }
    }

    pub(super) async fn run(mut self) {
        let shutdown = self.manager.inner.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
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
                _ = tick.tick() => {
                    self.expire().await;
                }
            }
            self.dispatch();
            self.publish_positions().await;
        }
    }

    fn handle(&mut self, msg: SchedMsg) {
        match msg {
            SchedMsg::Enqueue { id, priority, created_ms } => {
                let key = (Reverse(priority), created_ms, id);
                self.queue.insert(key);
                self.keys.insert(id, key);
            }
            SchedMsg::Remove { id, reply } => {
                let removed = match self.keys.remove(&id) {
                    Some(key) => self.queue.remove(&key),
                    None => false,
                };
                self.published.remove(&id);
                let _ = reply.send(removed);
            }
            SchedMsg::Done { machine } => {
                if let Some(m) = self.manager.inner.machines.get(machine) {
                    m.assigned.fetch_sub(1, Ordering::Relaxed);
                    m.completed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Picks the machine for the next job: connected, not draining, with a free slot; the least loaded
    /// first, preferring one that last ran the same workflow (its models are warm).
    fn pick_machine(&self, workflow: &str) -> Option<usize> {
        let machines = &self.manager.inner.machines;
        machines
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.is_draining() && m.conn.is_connected() && m.assigned() < m.capacity)
            .min_by_key(|(_, m)| (m.assigned(), m.last_workflow() != workflow))
            .map(|(i, _)| i)
    }

    fn dispatch(&mut self) {
        while let Some(&key) = self.queue.first() {
            let id = key.2;
            let Some(live) = self.manager.live(id) else {
                // Finished meanwhile (cancelled, expired): drop it.
                self.queue.pop_first();
                self.keys.remove(&id);
                continue;
            };
            let workflow = match live.job.try_lock() {
                Ok(job) => job.workflow.clone(),
                Err(_) => String::new(),
            };
            let Some(idx) = self.pick_machine(&workflow) else { return };
            self.queue.pop_first();
            self.keys.remove(&id);
            self.published.remove(&id);
            let machine = &self.manager.inner.machines[idx];
            machine.assigned.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut w) = machine.last_workflow.lock()
                && !workflow.is_empty()
            {
                *w = workflow;
            }
            self.manager.spawn_runner(live, idx, false);
        }
    }

    /// Publishes the position of every job within the window whose position changed.
    async fn publish_positions(&mut self) {
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

    /// Fails queued jobs past their queue timeout or deadline.
    async fn expire(&mut self) {
        let now = now_ms();
        let timeout = self.manager.inner.config.queue_timeout.as_millis() as i64;
        let mut expired = Vec::new();
        for key in &self.queue {
            let Some(live) = self.manager.live(key.2) else { continue };
            let Ok(job) = live.job.try_lock() else { continue };
            if job.state != JobState::Queued {
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
            let failure = JobFailure::new(reason, message);
            if let Err(e) = self.manager.finish(&live, EventKind::Failed { error: failure }, |_| {}).await {
                tracing::error!(job_id = %key.2, error = %e, "cannot expire a queued job");
            }
        }
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("queued", &self.queue.len()).finish()
    }
}
