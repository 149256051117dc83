//! comfyrelay: a gRPC service that runs ComfyUI workflows durably and streams their events.
//!
//! # Layout
//! - [`grpc`]: the only tonic-aware module; decodes requests, calls the domain, encodes answers.
//! - [`jobs`]: the job engine (submission, scheduling, running, event logs, subscriptions).
//! - [`catalog`]: workflows and their typed inputs; validation and injection.
//! - [`comfy`]: the ComfyUI protocol (HTTP and WebSocket).
//! - [`runcomfy`]: the RunComfy Server API client.
//! - [`store`]: durable storage (SQLite; PostgreSQL shared by replicas, with the leader lease) and the
//!   artifact directory.
//! - [`emulator`]: faithful emulators of ComfyUI and RunComfy for tests and `dev` mode.
//! - [`metrics`]: every Prometheus metric, its labels and its `/metrics` listener.
//! - [`auth`]: API keys, roles and the principal a call acts as (checked by the layer in `grpc`).
//! - [`health`]: whether any backend can take a job (the readiness behind `grpc.health.v1`).
//! - [`dev`]: `comfyrelay dev`, the service on emulators.
//! - [`console`]: the web console's static assets (served at `/console` by `grpc`; a gRPC-Web client).
//! - [`cli`]: the command-line gRPC client (a client adapter: tonic and `pb::` like `grpc`).
//! - [`limits`]: the bounds on what a caller can make the service hold, and [`limits::echo`].
//! - [`config`], [`telemetry`], [`shutdown`], [`listen`]: process plumbing.
//!
//! Dependencies point one way: `grpc → jobs → {catalog, comfy, runcomfy, store}`.

pub mod auth;
pub mod catalog;
pub mod cli;
pub mod comfy;
pub mod config;
pub mod console;
pub mod dev;
pub mod emulator;
pub mod grpc;
pub mod health;
pub mod jobs;
pub mod limits;
pub mod listen;
pub mod machine;
pub mod metrics;
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
    let metrics = match config.metrics.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener (metrics.listen = {addr})"))?,
        ),
        None => None,
    };
    run_with_metrics(listener, metrics, config, shutdown).await
}

/// [`run`] with the metrics listener already bound (`dev` binds its preferred port or a free one; with
/// `None` no metrics are served, whatever `metrics.listen` says).
///
/// # Errors
/// As [`run`].
pub async fn run_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Metrics are served until the very end (through the drain), on their own listener.
    let metrics_stop = CancellationToken::new();
    let metrics_task = match metrics_listener {
        Some(listener) => {
            let handle =
                metrics::install().map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
            // Exit policy: ends when `metrics_stop` is cancelled at the end of `run`; awaited there.
            Some(tokio::spawn(metrics::serve(listener, handle, metrics_stop.clone())))
        }
        None => None,
    };
    let result = run_service(listener, config, shutdown).await;
    metrics_stop.cancel();
    if let Some(task) = metrics_task {
        match task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "the metrics listener failed"),
            Err(e) if e.is_panic() => tracing::error!(error = %e, "the metrics listener panicked"),
            _ => {}
        }
    }
    result
}

async fn run_service(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("reading the listener's address")?;
    config.check_auth_for(addr)?;
    if config.auth.effective_mode() == config::AuthMode::None && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "auth.mode = \"none\" on a network address (auth.allow_none_on_network = true): \
            anyone who reaches this port can read, cancel and run every job");
    }
    // Before anything starts: TLS files that do not load stop the start, naming the setting.
    let tls = grpc::tls::Tls::load(&config.grpc.tls, config.grpc.grpc_web).await?;
    let listener = Arc::new(listener);
    let artifacts = open_artifacts(&config).await?;
    // Before the lease: a standby serves the workflows too, and one whose workflows do not load stops at its
    // start, not when it takes over.
    let catalog = catalog::Catalog::with_bundled(config.workflows_dir.as_deref()).with_context(|| {
        match &config.workflows_dir {
            Some(dir) => format!("loading workflows from {} (workflows_dir)", dir.display()),
            None => "loading the bundled workflows".to_string(),
        }
    })?;
    // Owned: aborted when this call returns, on every path.
    let catalog_watch = tokio_util::task::AbortOnDropHandle::new(catalog.watch(shutdown.child_token()));
    // With PostgreSQL this waits, as a standby, until this replica leads.
    let Some(storage) =
        Storage::open(&config, &listener, tls.clone(), &artifacts, &catalog, &shutdown).await?
    else {
        return Ok(());
    };
    let store = storage.jobs.clone();

    let options = comfy::ClientOptions {
        request_timeout: config.comfyui.request_timeout,
        idle_probe: config.comfyui.idle_probe,
        silence_reconcile: config.comfyui.silence_reconcile,
        ..comfy::ClientOptions::default()
    };
    let instance = match &storage.shared {
        // One id for every replica: the leader that takes over opens the sockets ComfyUI routes the
        // events of the old leader's prompts to.
        Some(pg) => {
            pg.shared_instance_id(&new_instance_id()).await.context("reading the shared instance id")?
        }
        None => instance_id(&config.data_dir).await.context("reading the instance id")?,
    };
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
        let mut pool_config = config.runcomfy.clone();
        if storage.shared.is_some() && pool_config.stop_on_shutdown {
            // The next leader adopts the machines and renews their leases; stopping them at a handover
            // would cut every job running on them. Without a next leader they stop at their lease.
            tracing::info!(
                "replicas: this leader leaves its RunComfy machines to the next one when it stops"
            );
            pool_config.stop_on_shutdown = false;
        }
        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let p = pool::Pool::start(
            pool::PoolParts {
                config: pool_config,
                client,
                store: storage.machines.clone(),
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
        store.clone(),
        artifacts,
        catalog.clone(),
        machines,
        engine_pool,
        (config.auth.effective_mode() == config::AuthMode::Keys)
            .then(|| jobs::quota::Quotas::new(&config.auth)),
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

    let authenticator = auth::Authenticator::new(&config.auth, storage.keys.clone());
    // Exit policy: owned by this call (aborted when it returns); a lost lease shuts this replica down.
    let _lease_watch = storage.lease.as_ref().map(|lease| {
        let (lost, shutdown) = (lease.lost().clone(), shutdown.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            lost.cancelled().await;
            tracing::error!("lost the leader lease: stopping at once so that another replica can lead");
            shutdown.cancel();
        }))
    });
    let services = grpc::Services { jobs: jobs.clone(), catalog, pool: pool.clone(), auth: authenticator };
    let grace = config.grpc.shutdown_grace;
    let serve = grpc::serve(listener, &config, services, tls, shutdown.clone());
    tokio::pin!(serve);
    // One budget from the signal on, for everything: the server's drain (open calls end at shutdown), the
    // runners (which re-queue or leave re-attachable what they run) and the log writer, then the pool's
    // machines (a third of it is kept for them). `grpc.shutdown_grace` stays below the Kubernetes grace.
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::Instant::now() + grace
    };
    tokio::pin!(deadline);
    let (served, deadline) = tokio::select! {
        served = &mut serve => (served, tokio::time::Instant::now() + grace),
        at = &mut deadline => {
            tokio::select! {
                served = &mut serve => (served, at),
                () = tokio::time::sleep_until(at) => {
                    tracing::warn!(?grace, "gRPC calls still open at the shutdown deadline; cut");
                    (Ok(()), at)
                }
            }
        }
    };
    let pool_reserve = if pool.is_some() { grace / 3 } else { std::time::Duration::ZERO };
    if !jobs.drain(deadline - pool_reserve).await {
        tracing::warn!(?grace, "job tasks still running at the shutdown deadline; cut");
    }
    if let Some(pool) = &pool {
        pool.close(deadline.saturating_duration_since(tokio::time::Instant::now())).await;
    }
    catalog_watch.abort();
    if let Some(lease) = storage.lease {
        if lease.lost().is_cancelled() {
            metrics::replica_leading(false);
            anyhow::bail!("this replica lost the leader lease (its database connection failed) and stopped");
        }
        // Dropped last, after the drain: a standby takes over now.
        drop(lease);
        metrics::replica_leading(false);
        tracing::info!("gave the leader lease up");
    }
    served
}

/// The artifact store: `storage.artifacts_url`, else `storage.artifacts_dir`, else `artifacts` in
/// `data_dir`.
async fn open_artifacts(config: &Config) -> anyhow::Result<store::ArtifactStore> {
    Ok(match &config.storage.artifacts_url {
        // Not the URL in the message: validated already, and the error names the setting.
        Some(url) => store::ArtifactStore::open_url(url)
            .await
            .context("opening the artifact object store (storage.artifacts_url)")?,
        None => {
            let artifacts_dir =
                config.storage.artifacts_dir.clone().unwrap_or_else(|| config.data_dir.join("artifacts"));
            store::ArtifactStore::open(&artifacts_dir, config.storage.durability)
                .await
                .with_context(|| format!("opening the artifact directory {}", artifacts_dir.display()))?
        }
    })
}

/// Where a replica keeps its jobs: the SQLite file in `data_dir` (one replica), or a PostgreSQL database
/// shared by replicas of which the one holding the leader lease runs (README "Replicas on PostgreSQL").
struct Storage {
    jobs: Arc<dyn store::Store>,
    machines: Arc<dyn store::MachineStore>,
    keys: Arc<dyn store::KeyStore>,
    /// The shared database, with PostgreSQL.
    shared: Option<Arc<store::PgStore>>,
    /// With PostgreSQL, this replica's lease; dropped after the drain, when a standby may take over.
    lease: Option<store::LeaderLease>,
}

impl Storage {
    /// Opens the configured store. With `storage.database_url`, serves as a standby on `listener` (health,
    /// the job reads from the shared log and `artifacts`, the workflows of `catalog`, the rest forwarded)
    /// until this replica holds the leader lease; `None` when `shutdown` came first.
    async fn open(
        config: &Config,
        listener: &Arc<TcpListener>,
        tls: Option<grpc::tls::Tls>,
        artifacts: &store::ArtifactStore,
        catalog: &catalog::Catalog,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        let Some(url) = &config.storage.database_url else {
            let sqlite = Arc::new(
                store::SqliteStore::open(&config.data_dir, config.storage.durability)
                    .await
                    .with_context(|| format!("opening the database in {}", config.data_dir.display()))?,
            );
            sqlite.checkpoint_in_background().context("starting the database's checkpointer")?;
            return Ok(Some(Self {
                jobs: sqlite.clone(),
                machines: sqlite.clone(),
                keys: sqlite,
                shared: None,
                lease: None,
            }));
        };
        let pg = Arc::new(
            store::PgStore::connect(url.expose())
                .await
                .context("connecting to the PostgreSQL database (storage.database_url)")?,
        );
        metrics::replica_leading(false);
        let standby_stop = CancellationToken::new();
        let parts = grpc::StandbyParts {
            store: pg.clone(),
            jobs: jobs::JobFollower::start(
                pg.clone(),
                artifacts.clone(),
                config.jobs.inline_output_max_bytes,
            ),
            auth: auth::Authenticator::new(&config.auth, pg.clone()),
            catalog: catalog.clone(),
        };
        let standby = grpc::serve_standby(listener.clone(), config, tls, parts, standby_stop.clone());
        tokio::pin!(standby);
        let lease = tokio::select! {
            lease = store::LeaderLease::acquire(url.expose(), shutdown) => lease,
            served = &mut standby => {
                served.context("serving as a standby")?;
                anyhow::bail!("the standby's server stopped before this replica led");
            }
        };
        // The standby's connections close; the leader's server takes the listener over.
        standby_stop.cancel();
        standby.await.context("serving as a standby")?;
        let Some(lease) = lease.context("the leader lease (storage.database_url)")? else {
            return Ok(None);
        };
        tracing::info!(term = lease.term(), "leading: this replica runs the jobs");
        // Every write from here on checks the lease's term: once another replica took the lease, this
        // one's late writes are refused (and cancel `lease.lost()`, which stops it).
        let pg = Arc::new(pg.fenced(&lease));
        metrics::replica_leading(true);
        // Where the standbys forward calls while this replica leads.
        let local = listener.local_addr().context("reading the listener's address")?;
        let advertised = config.grpc.advertise_url.clone().or_else(|| {
            // Standbys connect the way clients do: over TLS when this port speaks it.
            let scheme = if config.grpc.tls.cert_file.is_some() { "https" } else { "http" };
            (!local.ip().is_unspecified()).then(|| format!("{scheme}://{local}"))
        });
        if advertised.is_none() {
            tracing::warn!(%local, "standbys cannot forward calls to this leader: set grpc.advertise_url");
        }
        pg.set_setting(grpc::LEADER_URL, advertised.as_deref())
            .await
            .context("advertising this leader's URL to the standbys")?;
        Ok(Some(Self {
            jobs: pg.clone(),
            machines: pg.clone(),
            keys: pg.clone(),
            shared: Some(pg),
            lease: Some(lease),
        }))
    }
}

/// A fresh instance id (12 hex digits): the stem of this instance's WebSocket clientIds.
fn new_instance_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// This instance's id, created once in the data directory: it keeps WebSocket clientIds stable across
/// restarts, so ComfyUI routes the events of prompts queued before a restart to the new socket.
async fn instance_id(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("instance_id");
    match tokio::fs::read_to_string(&path).await {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = new_instance_id();
            let (tmp, data) = (data_dir.join("instance_id.tmp"), id.clone());
            tokio::task::spawn_blocking(move || {
                use std::{io::Write as _, os::unix::fs::OpenOptionsExt};
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(data.as_bytes())?;
                std::fs::rename(&tmp, &path)
            })
            .await
            .map_err(std::io::Error::other)??;
            Ok(id)
        }
    }
}
