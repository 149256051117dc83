//! `comfyrelay dev`: the service with a built-in emulated ComfyUI (and optionally an emulated RunComfy
//! account), so the whole path runs on a laptop with no GPU, from any directory.
//!
//! Owns the emulators' lifetime in dev mode and the lines that tell the person at the terminal where
//! everything listens. Preferred ports that are taken (a real ComfyUI on 8188) give way to free ones.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{
    Config,
    config::{Secret, StaticServer},
    emulator::{
        comfyui::{ComfyEmulator, EmulatorConfig},
        runcomfy::{self, RunComfyEmulator, RunComfyEmulatorConfig},
    },
    listen,
};

/// ComfyUI's own default port, which the emulator prefers.
pub const COMFY_PORT: u16 = 8188;
/// The port the emulated RunComfy API prefers.
pub const RUNCOMFY_PORT: u16 = 8190;
/// Where `dev` serves metrics when `metrics.listen` is unset (a free port if this one is taken).
pub const METRICS_PORT: u16 = 9090;

/// What `dev` was asked for on the command line.
#[derive(Debug, Clone, Default)]
pub struct DevOptions {
    /// The emulated ComfyUI's port; `None`: 8188, or a free port when 8188 is taken.
    pub comfy_port: Option<u16>,
    /// Also run an emulated RunComfy account and enable the pool against it.
    pub runcomfy: bool,
    /// The emulated RunComfy API's port; `None`: 8190, or a free port when taken.
    pub runcomfy_port: Option<u16>,
    /// Time each emulated node takes, to watch progress; zero: as fast as it can.
    pub node_delay: Duration,
    /// Progress steps each delayed node reports.
    pub progress_steps: u64,
    /// The ComfyUI generation the emulators reproduce.
    pub comfyui_version: crate::emulator::comfyui::ComfyVersion,
}

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Starts the emulators, points `config` at them and serves until `shutdown`; then stops the emulators.
///
/// # Errors
/// A port that cannot be bound (naming it and its flag or key), and whatever [`crate::run`] returns.
pub async fn run(options: DevOptions, mut config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // `dev` is a local playground: no keys unless asked for (and `none` is still refused off loopback).
    config.auth.mode.get_or_insert(crate::config::AuthMode::None);
    let comfy_listener = bind("emulated ComfyUI", options.comfy_port, COMFY_PORT, "--comfy-port").await?;
    let emulated = EmulatorConfig {
        node_delay: options.node_delay,
        comfyui_version: options.comfyui_version,
        ..EmulatorConfig::default()
    };
    let comfy = ComfyEmulator::start(comfy_listener, emulated.clone()).await?;
    if options.progress_steps > 0 {
        comfy.faults().set_node_progress_steps(options.progress_steps);
    }
    // The line tests and people read: where the emulated ComfyUI is.
    println!("comfyrelay dev: emulated ComfyUI on {}", comfy.url());
    config.comfyui.servers = vec![StaticServer { name: "emulator".into(), url: comfy.url() }];
    // Metrics on the configured address, else on the usual port or, when it is taken, any free one
    // (bound here, so two dev servers starting at once cannot both pick 9090); `run` logs where.
    let metrics = match config.metrics.listen {
        Some(addr) => listen::bind(addr, "metrics.listen (COMFYRELAY_METRICS__LISTEN)").await?,
        None => {
            listen::bind_preferred(LOCALHOST, METRICS_PORT, "metrics.listen (COMFYRELAY_METRICS__LISTEN)")
                .await?
                .0
        }
    };

    let emulator = if options.runcomfy {
        let listener =
            bind("emulated RunComfy API", options.runcomfy_port, RUNCOMFY_PORT, "--runcomfy-port").await?;
        let emulator = RunComfyEmulator::start(
            listener,
            RunComfyEmulatorConfig {
                boot_time: Duration::from_secs(5),
                comfyui: emulated,
                ..RunComfyEmulatorConfig::default()
            },
        )
        .await?;
        println!("comfyrelay dev: emulated RunComfy API on {}", emulator.url());
        let r = &mut config.runcomfy;
        r.enabled = true;
        r.base_url = emulator.url();
        r.user_id = runcomfy::DEFAULT_USER_ID.into();
        r.api_token = Secret::new(runcomfy::DEFAULT_TOKEN);
        r.status_poll = Duration::from_secs(1);
        Some(emulator)
    } else {
        None
    };

    let result = match listen::bind(config.grpc.listen, "grpc.listen (COMFYRELAY_GRPC__LISTEN)").await {
        Ok(listener) => {
            let addr = listener.local_addr()?;
            let scheme = if config.grpc.tls.cert_file.is_some() { "https" } else { "http" };
            println!("comfyrelay dev: gRPC on {scheme}://{addr}");
            let server = if addr == crate::config::GrpcConfig::default().listen && scheme == "http" {
                String::new()
            } else {
                format!(" --server {scheme}://{addr}")
            };
            println!("comfyrelay dev: try `comfyrelay run invert photo.png --out out/{server}`");
            crate::run_with_metrics(listener, Some(metrics), config, shutdown).await
        }
        Err(e) => Err(e.into()),
    };
    if let Some(emulator) = emulator {
        emulator.shutdown().await;
    }
    comfy.shutdown().await;
    result
}

/// Binds an emulator's port: the one asked for exactly, or the preferred one with a fallback.
async fn bind(
    what: &str,
    asked: Option<u16>,
    preferred: u16,
    flag: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    if let Some(port) = asked {
        return Ok(listen::bind((LOCALHOST, port).into(), flag).await?);
    }
    let (listener, fell_back) = listen::bind_preferred(LOCALHOST, preferred, flag).await?;
    if fell_back {
        let port = listener.local_addr()?.port();
        println!(
            "comfyrelay dev: port {preferred} is in use, so the {what} took port {port} (choose with {flag})"
        );
    }
    Ok(listener)
}
