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
pub mod machine;
pub mod pool;
pub mod proto;
pub mod runcomfy;
pub mod shutdown;
pub mod store;
pub mod telemetry;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the service on an already-bound listener until `shutdown` is cancelled, then drains.
///
/// Startup order: storage, catalog, machines, job engine (which reconciles unfinished jobs) and only then
/// the gRPC server, so no request is served before recovered jobs are known.
///
/// # Errors
/// Startup failures (storage, catalog) and a server that fails while serving.
pub async fn run(listener: TcpListener, config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = Arc::new(
        store::SqliteStore::open(&config.data_dir)
            .await
            .with_context(|| format!("opening the database in {}", config.data_dir.display()))?,
    );
    let artifacts = store::ArtifactStore::open(config.data_dir.join("artifacts"))
        .await
        .context("opening the artifact directory")?;
    let catalog = catalog::Catalog::load(&config.workflows_dir)
        .with_context(|| format!("loading workflows from {}", config.workflows_dir.display()))?;
    let catalog_watch = catalog.watch(shutdown.child_token());

    let options = comfy::ClientOptions {
        request_timeout: config.comfyui.request_timeout,
        idle_probe: config.comfyui.idle_probe,
        silence_reconcile: config.comfyui.silence_reconcile,
        ..comfy::ClientOptions::default()
    };
    let instance = instance_id(&config.data_dir).await.context("reading the instance id")?;
    let mut machines = Vec::new();
    for server in &config.comfyui.servers {
        let machine = machine::Machine::connect_static(
            &server.name,
            &server.url,
            options.clone(),
            Some(machine::stable_client_id(&instance, &server.name)),
            config.comfyui.prequeue,
            shutdown.child_token(),
        )
        .with_context(|| format!("ComfyUI server {}", server.name))?;
        machines.push(machine);
    }
    // The RunComfy pool starts at once and reconciles the account's machines in the background (the API may
    // be unreachable); it announces the adopted machines with `PoolEvent::Reconciled`, and the engine holds
    // jobs running on RunComfy machines until then. It outlives the engine's shutdown token: its machines
    // are stopped (or left to their leases) only after the jobs drained.
    let pool_shutdown = CancellationToken::new();
    let mut engine_pool = None;
    let mut pool = None;
    if config.runcomfy.enabled {
        let client = runcomfy::RunComfyClient::new(runcomfy::ClientOptions::from_config(&config.runcomfy))
            .context("RunComfy client")?;
        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let p = pool::Pool::start(
            pool::PoolParts {
                config: config.runcomfy.clone(),
                client,
                store: store.clone(),
                comfy: options.clone(),
                prequeue: config.comfyui.prequeue,
                instance: instance.clone(),
                events,
            },
            pool_shutdown.clone(),
        );
        engine_pool = Some((Arc::new(p.clone()) as Arc<dyn machine::Provisioner>, events_rx));
        pool = Some(p);
    }
    let started = jobs::JobManager::start(
        config.jobs.clone(),
        store,
        artifacts,
        catalog.clone(),
        machines,
        engine_pool,
        shutdown.child_token(),
    )
    .await
    .context("starting the job engine");
    let jobs = match started {
        Ok(jobs) => jobs,
        Err(e) => {
            if let Some(pool) = &pool {
                pool.close(config.grpc.shutdown_grace).await;
            }
            return Err(e);
        }
    };

    let services = grpc::Services { jobs: jobs.clone(), catalog, pool: pool.clone() };
    let served = grpc::serve(listener, &config, services, shutdown.clone()).await;

    // The server has stopped taking calls; give running work the grace period to reach a resumable state,
    // and the pool what is left of it to stop its machines.
    let deadline = tokio::time::Instant::now() + config.grpc.shutdown_grace;
    if !jobs.drain(config.grpc.shutdown_grace).await {
        tracing::warn!(grace = ?config.grpc.shutdown_grace, "job tasks still running after the grace period; cut");
    }
    if let Some(pool) = &pool {
        pool.close(deadline.saturating_duration_since(tokio::time::Instant::now())).await;
    }
    catalog_watch.abort();
    served
}

/// This instance's id, created once in the data directory: it keeps WebSocket clientIds stable across
/// restarts, so ComfyUI routes the events of prompts queued before a restart to the new socket.
async fn instance_id(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("instance_id");
    match tokio::fs::read_to_string(&path).await {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
            let tmp = data_dir.join("instance_id.tmp");
            tokio::fs::write(&tmp, &id).await?;
            tokio::fs::rename(&tmp, &path).await?;
            Ok(id)
        }
    }
}
