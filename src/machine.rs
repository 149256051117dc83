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

use crate::comfy::{ClientOptions, ComfyClient, ComfyConnection, ComfyError};

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
    /// The last workflow it ran, and since when it has been idle. A std mutex: never held across `.await`.
    status: Mutex<Status>,
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
        prequeue: usize,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ComfyError> {
        let client = ComfyClient::new(url, options)?;
        let conn = ComfyConnection::spawn(client.clone(), cancel);
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
            status: Mutex::new(Status { last_workflow: String::new(), idle_since: Some(Instant::now()) }),
        }))
    }

    /// Connects to a static ComfyUI server (the socket connects in the background, reconnecting as needed).
    ///
    /// # Errors
    /// An invalid URL.
    pub fn connect_static(
        id: &str,
        url: &str,
        options: ClientOptions,
        prequeue: usize,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ComfyError> {
        Self::new(id, MachineKind::Static, None, url, 0.0, options, prequeue, cancel)
    }

    /// Connects to a RunComfy machine's ComfyUI.
    ///
    /// # Errors
    /// An invalid URL.
    pub fn connect_runcomfy(
        id: &str,
        url: &str,
        spec: MachineSpec,
        price_per_hour_usd: f64,
        options: ClientOptions,
        prequeue: usize,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ComfyError> {
        Self::new(id, MachineKind::RunComfy, Some(spec), url, price_per_hour_usd, options, prequeue, cancel)
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
        self.draining.store(true, Ordering::Relaxed);
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
        !self.is_draining() && self.conn.is_connected() && self.assigned() < self.capacity
    }

    /// Records a job handed to it (the scheduler's side).
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
        let before = self.assigned.fetch_sub(1, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
        if before <= 1
            && let Ok(mut s) = self.status.lock()
        {
            s.idle_since = Some(Instant::now());
        }
    }
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
}
