//! An emulated ComfyUI server: the same routes, WebSocket messages, routing quirks and error shapes as the
//! real one, running a few model-free nodes on real pixels, with scriptable fault injection.
//!
//! Built from the captured behaviour of ComfyUI 0.3.64 (`shared/reference/comfyui/`) and, with
//! [`ComfyVersion::V0_38`], the newer generation as `NEWER.md` describes it from ComfyUI's sources
//! (canonical-UUID prompt ids, the jobs API, node replacement, assets, `activity` in `progress_state`,
//! `missing_node_type` and `dependency_cycle`). Layout:
//! - `routes`: the HTTP surface (axum), including uploads and `/view`;
//! - `ws`: the `/ws` endpoint and ComfyUI's per-`clientId` routing;
//! - `state`: queue (CPython heap order), history, cache and the socket table;
//! - `executor`: the single prompt worker (ComfyUI's execution order, caching and message sequence);
//! - `validation`: `validate_prompt` with the same error shapes;
//! - `nodes`: the emulated node classes; `frames`: binary frame layouts; `pyjson`: `json.dumps` output;
//! - `jobs`, `assets`: the 0.38 jobs API and asset registry;
//! - [`Faults`]: fault injection; counters of prompts posted and queued per id for tests.
//!
//! This module knows nothing about comfyrelay's own domain; it only imitates the external server.

mod assets;
mod executor;
mod faults;
mod frames;
mod jobs;
mod nodes;
mod pyjson;
mod routes;
mod state;
mod validation;
mod ws;

#[cfg(test)]
mod tests;

pub use faults::{Faults, LostAnswer};

use nodes::Dirs;
use serde_json::Value;
use state::Shared;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long `shutdown` waits for the HTTP server to drain before aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Which ComfyUI generation the emulator reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ComfyVersion {
    /// ComfyUI 0.3.64, the captured traces (`PROTOCOL.md`).
    #[default]
    V0_3_64,
    /// ComfyUI 0.38.x as `NEWER.md` describes it.
    V0_38,
}

impl ComfyVersion {
    /// Both generations, oldest first.
    pub const ALL: [ComfyVersion; 2] = [ComfyVersion::V0_3_64, ComfyVersion::V0_38];

    /// The name accepted by `--comfyui-version` (`0.3.64`, `0.38`).
    pub fn as_str(self) -> &'static str {
        match self {
            ComfyVersion::V0_3_64 => "0.3.64",
            ComfyVersion::V0_38 => "0.38",
        }
    }

    /// What `/system_stats` reports as `comfyui_version`.
    pub fn comfyui_version(self) -> &'static str {
        match self {
            ComfyVersion::V0_3_64 => "0.3.64",
            ComfyVersion::V0_38 => "0.38.1",
        }
    }
}

impl std::fmt::Display for ComfyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ComfyVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "0.3.64" => Ok(ComfyVersion::V0_3_64),
            "0.38" | "0.38.1" | "0.38.x" => Ok(ComfyVersion::V0_38),
            other => Err(format!("unknown ComfyUI version {other:?} (expected 0.3.64 or 0.38)")),
        }
    }
}

/// Options; `Default` gives a fast emulated ComfyUI 0.3.64 with a fresh temp dir for input/output/temp files.
#[derive(Debug, Clone, Default)]
pub struct EmulatorConfig {
    /// Root of the `input/`, `output/` and `temp/` folders; `None` makes a temp dir removed on drop.
    pub data_dir: Option<PathBuf>,
    /// Time each node takes to execute (see `Faults::set_node_delay`); zero by default.
    pub node_delay: Duration,
    /// The generation reproduced (0.3.64 by default).
    pub comfyui_version: ComfyVersion,
}

/// A running emulated ComfyUI server (`Arc` inside; cheap to clone).
#[derive(Debug, Clone)]
pub struct ComfyEmulator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    _tempdir: Option<tempfile::TempDir>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
        abandon_everything(&self.shared);
        let tasks =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for t in tasks {
            t.abort();
        }
    }
}

/// Bumps the epoch (the running prompt goes silent), empties the socket table and drops every socket
/// without a close frame.
fn abandon_everything(shared: &Shared) {
    {
        let mut st = shared.lock();
        st.epoch += 1;
        st.sockets.clear();
        st.running = None;
        st.client_id = None;
        st.last_node_id = None;
    }
    shared.restarted.notify_waiters();
    shared.faults.drop_sockets_now();
}

impl ComfyEmulator {
    /// Serves on an already-bound listener (tests bind 127.0.0.1:0). The server task is owned by the handle:
    /// it stops on `shutdown()` or when the last clone is dropped.
    ///
    /// # Errors
    /// The listener's address cannot be read, or the data folders cannot be created.
    pub async fn start(listener: TcpListener, config: EmulatorConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (root, tempdir) = match config.data_dir {
            Some(dir) => (dir, None),
            None => {
                let t = tempfile::Builder::new().prefix("comfyrelay-comfyui-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let dirs = Dirs { input: root.join("input"), output: root.join("output"), temp: root.join("temp") };
        for d in [&dirs.input, &dirs.output] {
            tokio::fs::create_dir_all(d).await?;
        }
        // ComfyUI empties its temp folder at startup.
        let _ = tokio::fs::remove_dir_all(&dirs.temp).await;
        tokio::fs::create_dir_all(&dirs.temp).await?;
        let example = dirs.input.join("example.png");
        if !example.exists() {
            let img = image::RgbImage::from_pixel(64, 64, image::Rgb([200, 120, 40]));
            let mut png = std::io::Cursor::new(Vec::new());
            img.write_to(&mut png, image::ImageFormat::Png).map_err(std::io::Error::other)?;
            tokio::fs::write(&example, png.into_inner()).await?;
        }

        let shared = Arc::new(Shared::new(dirs, config.comfyui_version));
        let cancel = CancellationToken::new();
        let app = routes::router(shared.clone());
        let server_cancel = cancel.clone();
        let server = tokio::spawn(
            async move {
                let res =
                    axum::serve(listener, app).with_graceful_shutdown(server_cancel.cancelled_owned()).await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "emulated ComfyUI server failed");
                }
            }
            .instrument(tracing::info_span!("comfyui_emulator", %addr)),
        );
        let emulator_faults = &shared.faults;
        if !config.node_delay.is_zero() {
            emulator_faults.set_node_delay(config.node_delay);
        }
        let worker = executor::spawn_worker(shared.clone(), cancel.child_token());
        tracing::debug!(%addr, "emulated ComfyUI listening");
        Ok(ComfyEmulator {
            inner: Arc::new(Inner {
                shared,
                addr,
                cancel,
                tasks: Mutex::new(vec![server, worker]),
                _tempdir: tempdir,
            }),
        })
    }

    /// `"http://127.0.0.1:PORT"`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Scriptable fault injection.
    pub fn faults(&self) -> &Faults {
        &self.inner.shared.faults
    }

    /// With `true`, queued prompts stay in the queue, pending (as behind another client's long prompt on a
    /// busy GPU), and the running one goes on; with `false`, the queue runs again. `Faults::clear` leaves it.
    pub fn hold_queue(&self, held: bool) {
        self.inner.shared.faults.set_queue_held(held);
        if !held {
            self.inner.shared.work.notify_one();
        }
    }

    /// Simulates a crash + restart on the same port: every WebSocket dropped WITHOUT a close frame,
    /// queue and history wiped, `number` counter reset to 0, running prompt abandoned (no more messages).
    /// Output caches, feature flags and log subscriptions are lost too; files on disk stay.
    pub async fn restart(&self) {
        let shared = &self.inner.shared;
        abandon_everything(shared);
        {
            let mut st = shared.lock();
            st.queue.clear();
            st.history.clear();
            st.number = 0;
            st.cache.clear();
            st.temp_suffixes.clear();
            st.log_subscribers.clear();
            st.log_size_sent = false;
            st.log_entries.clear();
        }
        shared.interrupt.store(false, Ordering::SeqCst);
        tracing::debug!(addr = %self.inner.addr, "emulated ComfyUI restarted");
    }

    /// Drops sockets without a close frame and stops serving.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        abandon_everything(&self.inner.shared);
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for mut t in tasks {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut t).await.is_err() {
                t.abort();
            }
        }
    }

    /// Ids of the prompts in history, oldest first.
    pub fn history_ids(&self) -> Vec<String> {
        self.inner.shared.lock().history.keys().cloned().collect()
    }

    /// The id of the prompt being executed, if any.
    pub async fn running_prompt(&self) -> Option<String> {
        self.inner.shared.lock().running.as_ref().map(|r| r.prompt_id.clone())
    }

    /// Ids of the pending prompts, in the queue's raw heap order.
    pub async fn pending_prompts(&self) -> Vec<String> {
        self.inner.shared.lock().queue.iter().map(|i| i.prompt_id.clone()).collect()
    }

    /// The generation this emulator reproduces.
    pub fn version(&self) -> ComfyVersion {
        self.inner.shared.version
    }

    /// How often a `POST /prompt` named `prompt_id` (accepted or not).
    pub fn posted_times(&self, prompt_id: &str) -> usize {
        self.inner.shared.lock().counters.posted.get(prompt_id).copied().unwrap_or(0)
    }

    /// How often `prompt_id` was queued. ComfyUI never rejects a repeated id, so 2 means a retry queued the
    /// prompt twice.
    pub fn queued_times(&self, prompt_id: &str) -> usize {
        self.inner.shared.lock().counters.queued.get(prompt_id).copied().unwrap_or(0)
    }

    /// Prompts queued since start (restarts included).
    pub fn queued_total(&self) -> usize {
        self.inner.shared.lock().counters.queued_total
    }

    /// Every prompt id a `POST /prompt` named, first-seen order (ids the server minted are not included).
    pub fn posted_ids(&self) -> Vec<String> {
        self.inner.shared.lock().counters.posted.keys().cloned().collect()
    }

    /// `POST /free` calls so far.
    pub fn free_calls(&self) -> usize {
        self.inner.shared.lock().counters.frees
    }

    /// Registers a node replacement as a custom node pack would (`NodeReplace.as_dict()` form:
    /// `{"new_node_id", "old_node_id", "old_widget_ids", "input_mapping", "output_mapping"}`). The 0.38
    /// generation lists it at `/node_replacements` and applies it before validation.
    pub fn register_node_replacement(&self, replacement: Value) {
        self.inner.shared.lock().extra_replacements.push(replacement);
    }

    /// The folder uploads go to (`input/`).
    pub fn input_dir(&self) -> PathBuf {
        self.inner.shared.dirs.input.clone()
    }

    /// The folder SaveImage writes to (`output/`).
    pub fn output_dir(&self) -> PathBuf {
        self.inner.shared.dirs.output.clone()
    }
}

/// `comfyrelay emulate comfyui --port N` calls this; returns when `shutdown` is cancelled.
///
/// # Errors
/// The address cannot be bound or the data folders cannot be created.
pub async fn run_standalone(
    addr: SocketAddr,
    config: EmulatorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let emulator = ComfyEmulator::start(listener, config).await?;
    tracing::info!(url = %emulator.url(), version = %emulator.version(), "emulated ComfyUI ready");
    shutdown.cancelled().await;
    emulator.shutdown().await;
    Ok(())
}
