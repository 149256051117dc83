//! comfyrelay: a gRPC service that runs ComfyUI workflows durably and streams their events.
//!
//! # Layout
//! - [`grpc`]: the only tonic-aware module; decodes requests, calls the domain, encodes answers.
//! - [`jobs`]: the job engine (submission, scheduling, running, event logs, subscriptions).
//! - [`catalog`]: workflows and their typed inputs; validation and injection.
//! - [`comfy`]: the ComfyUI protocol (HTTP and WebSocket).
//! - [`runcomfy`]: the RunComfy Server API client.
//! - [`store`]: durable storage (SQLite) and the artifact directory.
//! - [`emulator`]: faithful emulators of ComfyUI and RunComfy for tests and `dev` mode.
//! - [`config`], [`telemetry`], [`shutdown`]: process plumbing.
//!
//! Dependencies point one way: `grpc → jobs → {catalog, comfy, runcomfy, store}`.

pub mod catalog;
pub mod comfy;
pub mod config;
pub mod emulator;
pub mod grpc;
pub mod jobs;
pub mod proto;
pub mod runcomfy;
pub mod shutdown;
pub mod store;
pub mod telemetry;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the service on an already-bound listener until `shutdown` is cancelled, then drains.
///
/// # Errors
/// Startup failures (storage, catalog) and a server that fails while serving.
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    grpc::serve(listener, &config, shutdown).await
}
