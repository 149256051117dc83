//! The ComfyUI machines jobs run on: for now the servers the operator names in the configuration.
//!
//! Each machine owns one `ComfyClient` and one long-lived `ComfyConnection` (the WebSocket every prompt's
//! events arrive on). The RunComfy pool adds machines of its own kind behind the same struct.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};

use tokio_util::sync::CancellationToken;

use crate::comfy::{ClientOptions, ComfyClient, ComfyConnection, ComfyError};

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
    /// Id (the configured name, or the provider's id).
    pub id: String,
    /// Kind.
    pub kind: MachineKind,
    /// HTTP client.
    pub client: ComfyClient,
    /// The WebSocket connection.
    pub conn: ComfyConnection,
    /// Prompts it may hold at once (1 running + the pre-queue).
    pub capacity: usize,
    /// Configured or launch time, ms.
    pub created_ms: i64,
    /// Jobs assigned now.
    pub(crate) assigned: AtomicUsize,
    /// Jobs finished.
    pub(crate) completed: AtomicU64,
    /// Taking no new jobs.
    pub(crate) draining: AtomicBool,
    /// The last workflow it ran.
    pub(crate) last_workflow: std::sync::Mutex<String>,
}

impl Machine {
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
        let client = ComfyClient::new(url, options)?;
        let conn = ComfyConnection::spawn(client.clone(), cancel);
        Ok(Arc::new(Self {
            id: id.to_string(),
            kind: MachineKind::Static,
            client,
            conn,
            capacity: 1 + prequeue,
            created_ms: super::model::now_ms(),
            assigned: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            last_workflow: std::sync::Mutex::new(String::new()),
        }))
    }

    /// Jobs assigned now.
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
        self.last_workflow.lock().map(|w| w.clone()).unwrap_or_default()
    }
}
