//! The ComfyUI machines jobs run on, and the contract between the job engine and the machine pool.
//!
//! A [`Machine`] owns one `ComfyClient` and one long-lived `ComfyConnection` (the WebSocket every prompt's
//! events arrive on). Static machines are named in the configuration; RunComfy machines are launched by the
//! pool, which tells the engine about them through [`PoolEvent`]s and learns the demand through
//! [`Provisioner`]. Knows nothing of jobs or gRPC.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::comfy::{
    CancelOutcome, Capabilities, ClientOptions, ComfyClient, ComfyConnection, ComfyError, PromptState,
};

/// What a job needs from a machine: jobs of catalog workflows with RunComfy requirements carry one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MachineSpec {
    /// The RunComfy workflow version whose machines have the models.
    pub workflow_version_id: String,
    /// The RunComfy server type.
    pub server_type: String,
}

/// Where a machine comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineKind {
    /// Named in the configuration.
    Static,
    /// Launched on RunComfy.
    RunComfy,
}

/// A ComfyUI machine.
#[derive(Debug)]
pub struct Machine {
    /// Id (the configured name, or the provider's server id).
    pub id: String,
    /// Kind.
    pub kind: MachineKind,
    /// What it was launched for (RunComfy machines).
    pub spec: Option<MachineSpec>,
    /// HTTP client.
    pub client: ComfyClient,
    /// The WebSocket connection.
    pub conn: ComfyConnection,
    /// Prompts it may hold at once (1 running + the pre-queue).
    pub capacity: usize,
    /// Configured or launch time, ms since the epoch.
    pub created_ms: i64,
    /// Price while billed, USD per hour (0 for static machines).
    pub price_per_hour_usd: f64,
    assigned: AtomicUsize,
    completed: AtomicU64,
    draining: AtomicBool,
    /// Prompts of cancelled jobs that ComfyUI never confirmed stopped and that still run on it: while any
    /// does, the machine takes no new jobs (see [`Machine::hold_abandoned`]).
    abandoned: AtomicUsize,
    /// The last workflow it ran, and since when it has been idle. A std mutex: never held across `.await`.
    /// Changes of `assigned` and `draining` that must not race (assigning a job to a machine the pool is
    /// about to stop) happen under it.
    status: Mutex<Status>,
    /// Cancelled when the machine is gone for good (stopped, dead): runners of its jobs stop waiting for
    /// it and retry elsewhere.
    retired: CancellationToken,
    retire_reason: Mutex<String>,
}

#[derive(Debug)]
struct Status {
    last_workflow: String,
    idle_since: Option<Instant>,
}

impl Machine {
    #[expect(clippy::too_many_arguments, reason = "a private constructor of plain fields")]
    fn new(
        id: &str,
        kind: MachineKind,
        spec: Option<MachineSpec>,
        url: &str,
        price_per_hour_usd: f64,
        options: ClientOptions,
        options_client_id: Option<String>,
        prequeue: usize,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ComfyError> {
        let client = ComfyClient::new(url, options)?;
        let client_id =
            options_client_id.unwrap_or_else(|| format!("comfyrelay-{}", uuid::Uuid::new_v4().simple()));
        // Metrics are per configured server; RunComfy machines come and go, so they count per pool.
        let label = match &spec {
            Some(spec) => crate::metrics::pool_server_label(spec),
            None => crate::metrics::server_label(id),
        };
        let conn = ComfyConnection::spawn_labelled(client.clone(), client_id, label, cancel);
        let created_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        Ok(Arc::new(Self {
            id: id.to_string(),
            kind,
            spec,
            client,
            conn,
            capacity: 1 + prequeue,
            created_ms,
            price_per_hour_usd,
            assigned: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            abandoned: AtomicUsize::new(0),
            status: Mutex::new(Status { last_workflow: String::new(), idle_since: Some(Instant::now()) }),
            retired: CancellationToken::new(),
            retire_reason: Mutex::new(String::new()),
        }))
    }

    /// Connects to a static ComfyUI server (the socket connects in the background, reconnecting as needed).
    ///
    /// `client_id`, when given, is the WebSocket clientId: keep it stable across restarts of this
    /// comfyrelay (see [`stable_client_id`]) so prompts re-attached after a restart keep streaming live.
    ///
    /// # Errors
    /// An invalid URL.
    pub fn connect_static(
        id: &str,
        url: &str,
        options: ClientOptions,
        client_id: Option<String>,
        prequeue: usize,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ComfyError> {
        Self::new(id, MachineKind::Static, None, url, 0.0, options, client_id, prequeue, cancel)
    }

    /// Connects to a RunComfy machine's ComfyUI (`client_id` as for [`Machine::connect_static`]).
    ///
    /// # Errors
    /// An invalid URL.
    #[expect(clippy::too_many_arguments, reason = "plain fields of a machine")]
    pub fn connect_runcomfy(
        id: &str,
        url: &str,
        spec: MachineSpec,
        price_per_hour_usd: f64,
        options: ClientOptions,
        client_id: Option<String>,
        prequeue: usize,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ComfyError> {
        Self::new(
            id,
            MachineKind::RunComfy,
            Some(spec),
            url,
            price_per_hour_usd,
            options,
            client_id,
            prequeue,
            cancel,
        )
    }

    /// Step 1 of a cancel escalation: cancels the prompt on this machine's ComfyUI (per-job cancel where the
    /// server has the jobs API, else dequeue or interrupt-if-running). See [`crate::comfy`] for the
    /// escalation and [`ComfyClient::cancel_prompt`] for the semantics.
    ///
    /// # Errors
    /// As [`ComfyClient::cancel_prompt`].
    pub async fn cancel_prompt(&self, prompt_id: &str) -> Result<CancelOutcome, ComfyError> {
        self.client.cancel_prompt(prompt_id).await
    }

    /// Step 2 of a cancel escalation, after the grace period: `/free` (unload models, free memory), then the
    /// per-job cancel again. See [`ComfyClient::free_and_interrupt`].
    ///
    /// # Errors
    /// As [`ComfyClient::free_and_interrupt`].
    pub async fn free_and_interrupt(&self, prompt_id: &str) -> Result<CancelOutcome, ComfyError> {
        self.client.free_and_interrupt(prompt_id).await
    }

    /// Where the machine's ComfyUI has the prompt (pending, running, ended, unknown): the check between the
    /// steps of an escalation.
    ///
    /// # Errors
    /// As [`ComfyClient::prompt_state`].
    pub async fn prompt_state(&self, prompt_id: &str) -> Result<PromptState, ComfyError> {
        self.client.prompt_state(prompt_id).await
    }

    /// What its ComfyUI can do, as detected for the current socket (`None` until detected).
    pub fn capabilities(&self) -> Option<Arc<Capabilities>> {
        self.conn.capabilities()
    }

    /// Jobs assigned now (running and pre-queued).
    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    /// Jobs finished.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Whether it takes no new jobs.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops giving it new jobs.
    pub fn drain(&self) {
        let _s = self.status.lock();
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Gives it new jobs again after [`Machine::drain`]; a retired machine stays drained.
    pub fn undrain(&self) {
        let _s = self.status.lock();
        if !self.is_retired() {
            self.draining.store(false, Ordering::Relaxed);
        }
    }

    /// The last workflow it ran.
    pub fn last_workflow(&self) -> String {
        self.status.lock().map(|s| s.last_workflow.clone()).unwrap_or_default()
    }

    /// Since when it has had no job; `None` while it has some.
    pub fn idle_since(&self) -> Option<Instant> {
        self.status.lock().ok().and_then(|s| s.idle_since)
    }

    /// Whether it can take a job now.
    pub fn has_room(&self) -> bool {
        !self.is_draining()
            && !self.holds_abandoned()
            && self.conn.is_connected()
            && self.assigned() < self.capacity
    }

    /// Marks a prompt of a cancelled job as still running on this machine after its cancel gave up waiting
    /// for ComfyUI: the machine takes no new jobs until every such guard is dropped (the prompt ended, or
    /// ComfyUI no longer knows it), so no job is sent into a server a wedged node holds.
    pub fn hold_abandoned(&self) -> AbandonedGuard<'_> {
        self.abandoned.fetch_add(1, Ordering::Relaxed);
        AbandonedGuard(self)
    }

    /// Whether a prompt whose cancel was abandoned still runs on it (it then takes no new jobs).
    pub fn holds_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed) > 0
    }

    /// Hands it a job if it still has room and is not draining, atomically with respect to
    /// [`Machine::drain_if_idle`]: a machine the pool decided to stop never gets a job after that decision.
    pub fn try_assign(&self, workflow: &str) -> bool {
        let Ok(mut s) = self.status.lock() else { return false };
        if self.is_draining() || self.holds_abandoned() || self.assigned() >= self.capacity {
            return false;
        }
        self.assigned.fetch_add(1, Ordering::Relaxed);
        s.idle_since = None;
        if !workflow.is_empty() {
            s.last_workflow = workflow.to_string();
        }
        true
    }

    /// Drains it if it has no job; returns whether it did (it is then safe to stop).
    pub fn drain_if_idle(&self) -> bool {
        let Ok(_s) = self.status.lock() else { return false };
        if self.assigned() > 0 {
            return false;
        }
        self.draining.store(true, Ordering::Relaxed);
        true
    }

    /// Marks the machine gone for good: runners of its jobs stop waiting and retry elsewhere.
    pub fn retire(&self, reason: &str) {
        self.drain();
        if let Ok(mut r) = self.retire_reason.lock()
            && r.is_empty()
        {
            *r = reason.to_string();
        }
        self.retired.cancel();
    }

    /// Resolves once the machine is retired.
    pub async fn retired(&self) {
        self.retired.cancelled().await;
    }

    /// Whether it is retired.
    pub fn is_retired(&self) -> bool {
        self.retired.is_cancelled()
    }

    /// Why it was retired.
    pub fn retire_reason(&self) -> String {
        self.retire_reason.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Sets since when it has been idle, if it is (an adopted machine's idle time is not known).
    pub fn set_idle_since(&self, since: Instant) {
        if let Ok(mut s) = self.status.lock()
            && s.idle_since.is_some()
        {
            s.idle_since = Some(since);
        }
    }

    /// Records a job handed to it regardless of room (a job re-attached after a restart).
    pub fn job_assigned(&self, workflow: &str) {
        self.assigned.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.status.lock() {
            s.idle_since = None;
            if !workflow.is_empty() {
                s.last_workflow = workflow.to_string();
            }
        }
    }

    /// Records a job that left it.
    pub fn job_done(&self) {
        let Ok(mut s) = self.status.lock() else { return };
        let before = self.assigned.fetch_sub(1, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
        if before <= 1 {
            s.idle_since = Some(Instant::now());
        }
    }
}

/// Held while a prompt whose cancel was abandoned still runs on a machine: see [`Machine::hold_abandoned`].
#[derive(Debug)]
pub struct AbandonedGuard<'a>(&'a Machine);

impl Drop for AbandonedGuard<'_> {
    fn drop(&mut self) {
        self.0.abandoned.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A WebSocket clientId for machine `machine_id` that is the same every time this comfyrelay instance
/// (identified by `instance`, kept in its data directory) starts.
pub fn stable_client_id(instance: &str, machine_id: &str) -> String {
    let safe: String = machine_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .take(64)
        .collect();
    format!("comfyrelay-{instance}-{safe}")
}

/// Phases of provisioning a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionPhase {
    /// A launch was requested.
    LaunchRequested,
    /// The provider reports it starting.
    Starting,
    /// The provider reports it ready.
    Ready,
    /// Its ComfyUI answered a health check.
    ComfyuiReachable,
    /// Waiting for a machine already launching.
    WaitingForMachine,
}

impl ProvisionPhase {
    /// The phase's event name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProvisionPhase::LaunchRequested => "launch_requested",
            ProvisionPhase::Starting => "starting",
            ProvisionPhase::Ready => "ready",
            ProvisionPhase::ComfyuiReachable => "comfyui_reachable",
            ProvisionPhase::WaitingForMachine => "waiting_for_machine",
        }
    }
}

/// Pool → job engine.
#[derive(Debug)]
pub enum PoolEvent {
    /// Progress of provisioning a machine for `spec`.
    Provisioning {
        /// The spec.
        spec: MachineSpec,
        /// The machine.
        machine_id: String,
        /// The phase reached.
        phase: ProvisionPhase,
        /// Since the launch was requested.
        elapsed: Duration,
    },
    /// A machine is ready and its ComfyUI answered: it may get jobs.
    Ready(Arc<Machine>),
    /// The pool's start-up reconciliation of the provider's machines is done (sent once, in the
    /// background after start, before any `Ready`). `adopted` are the machines launched before a restart
    /// that are ready for jobs: a job recovered as running on one of them is re-attached to it; a job
    /// recovered as running on a RunComfy machine not among them lost its machine.
    Reconciled {
        /// The adopted machines.
        adopted: Vec<Arc<Machine>>,
    },
    /// The machine must get no more jobs.
    Removed {
        /// The machine.
        machine_id: String,
        /// Why.
        reason: String,
    },
    /// Provisioning for `spec` failed.
    ProvisioningFailed {
        /// The spec.
        spec: MachineSpec,
        /// Why.
        reason: String,
        /// Whether the pool gave up (jobs waiting for the spec should fail).
        gave_up: bool,
    },
}

/// Job engine → pool: after every queue change, how many queued jobs wait for each spec.
pub trait Provisioner: Send + Sync + std::fmt::Debug + 'static {
    /// Reports the demand.
    fn demand(&self, queued: &BTreeMap<MachineSpec, usize>);

    /// The server type of jobs whose workflow names none.
    fn default_server_type(&self) -> String;

    /// Stops the machine `machine_id` (so it is billed no further) and retires it at once (its jobs stop
    /// waiting for it); a new machine is launched only if the demand needs one. For a machine whose prompt
    /// ignores every interrupt. Returns whether the machine is the pool's and is now being stopped.
    fn replace(&self, machine_id: &str, reason: &str) -> bool;
}
