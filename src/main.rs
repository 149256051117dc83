//! The `comfyrelay` binary: parse the command line, load config, init telemetry, bind, run.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use comfyrelay::{
    Config,
    emulator::{
        comfyui::{ComfyEmulator, ComfyVersion, EmulatorConfig},
        runcomfy::{RunComfyEmulator, RunComfyEmulatorConfig},
    },
    shutdown, telemetry,
};
use tokio_util::sync::CancellationToken;

/// Exit code for bad configuration or usage (sysexits `EX_USAGE`).
const EX_USAGE: u8 = 64;

/// Longest wait for buffered spans to reach the collector at exit.
const TRACE_FLUSH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Where `dev` serves metrics when `metrics.listen` is unset (a free port if this one is taken).
const DEV_METRICS: &str = "127.0.0.1:9090";

/// Runs ComfyUI workflows durably behind a gRPC API.
#[derive(Debug, Parser)]
#[command(name = "comfyrelay", version, about)]
struct Cli {
    /// A TOML configuration file; `COMFYRELAY_*` variables override it.
    #[arg(long, short, global = true, env = "COMFYRELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gRPC API against real ComfyUI servers or RunComfy machines.
    Serve,
    /// Serve the gRPC API with a built-in emulated ComfyUI: the whole path with no GPU.
    Dev {
        /// Port of the emulated ComfyUI (on 127.0.0.1).
        #[arg(long, default_value_t = 8188)]
        comfy_port: u16,
        /// Also run an emulated RunComfy account (on 127.0.0.1:8190) and enable the pool: jobs of workflows
        /// with RunComfy requirements run on machines it launches.
        #[arg(long)]
        runcomfy: bool,
        /// The ComfyUI generation the emulators reproduce: 0.3.64 or 0.38.
        #[arg(long, default_value = "0.3.64")]
        comfyui_version: ComfyVersion,
    },
    /// Run an emulator of an external system on its own.
    Emulate {
        #[command(subcommand)]
        target: EmulateTarget,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Subcommand)]
enum EmulateTarget {
    /// An emulated ComfyUI server.
    Comfyui {
        /// Port to listen on.
        #[arg(long, default_value_t = 8188)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// The ComfyUI generation to reproduce: 0.3.64 or 0.38.
        #[arg(long, default_value = "0.3.64")]
        comfyui_version: ComfyVersion,
    },
    /// An emulated RunComfy Server API whose machines are emulated ComfyUI servers.
    Runcomfy {
        /// Port to listen on.
        #[arg(long, default_value_t = 8190)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Seconds from launch to Ready.
        #[arg(long, default_value_t = 5)]
        boot_seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Version = cli.command {
        println!("comfyrelay {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("comfyrelay: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.filter.clone());
    let otlp = telemetry::OtlpSettings::from_vars(std::env::vars());
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("comfyrelay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's gRPC channel lives on the runtime.
    let telemetry = match runtime.block_on(async { telemetry::init(config.log.format, &filter, otlp) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("comfyrelay: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let result = runtime.block_on(run(cli.command, config));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "comfyrelay stopped with an error");
        eprintln!("comfyrelay: {e:#}");
    }
    // Spans still buffered are sent before the runtime goes away.
    telemetry.shutdown(TRACE_FLUSH_DEADLINE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown::watch_signals(shutdown.clone()));
    match command {
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(config.grpc.listen).await?;
            comfyrelay::run(listener, config, shutdown).await
        }
        Command::Dev { comfy_port, runcomfy, comfyui_version } => {
            let mut config = config;
            let comfy_listener = tokio::net::TcpListener::bind(("127.0.0.1", comfy_port)).await?;
            let emulated = EmulatorConfig { comfyui_version, ..EmulatorConfig::default() };
            let comfy = ComfyEmulator::start(comfy_listener, emulated.clone()).await?;
            tracing::info!(url = %comfy.url(), "emulated ComfyUI running");
            config.comfyui.servers =
                vec![comfyrelay::config::StaticServer { name: "emulator".into(), url: comfy.url() }];
            if config.metrics.listen.is_none() {
                // Probe the usual port; `run` logs where metrics are served.
                let free = std::net::TcpListener::bind(DEV_METRICS).is_ok();
                let addr = if free { DEV_METRICS } else { "127.0.0.1:0" };
                config.metrics.listen = addr.parse().ok();
            }
            let emulator = if runcomfy {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", 8190)).await?;
                let emulator = RunComfyEmulator::start(
                    listener,
                    RunComfyEmulatorConfig {
                        boot_time: std::time::Duration::from_secs(5),
                        comfyui: emulated,
                        ..RunComfyEmulatorConfig::default()
                    },
                )
                .await?;
                tracing::info!(url = %emulator.url(), "emulated RunComfy account running");
                let r = &mut config.runcomfy;
                r.enabled = true;
                r.base_url = emulator.url();
                r.user_id = comfyrelay::emulator::runcomfy::DEFAULT_USER_ID.into();
                r.api_token = comfyrelay::config::Secret::new(comfyrelay::emulator::runcomfy::DEFAULT_TOKEN);
                r.status_poll = std::time::Duration::from_secs(1);
                Some(emulator)
            } else {
                None
            };
            let listener = tokio::net::TcpListener::bind(config.grpc.listen).await?;
            let result = comfyrelay::run(listener, config, shutdown).await;
            if let Some(emulator) = emulator {
                emulator.shutdown().await;
            }
            comfy.shutdown().await;
            result
        }
        Command::Emulate { target: EmulateTarget::Comfyui { port, host, comfyui_version } } => {
            comfyrelay::emulator::comfyui::run_standalone(
                (host, port).into(),
                EmulatorConfig { comfyui_version, ..EmulatorConfig::default() },
                shutdown,
            )
            .await
        }
        Command::Emulate { target: EmulateTarget::Runcomfy { port, host, boot_seconds } } => {
            let config = RunComfyEmulatorConfig {
                boot_time: std::time::Duration::from_secs(boot_seconds),
                ..RunComfyEmulatorConfig::default()
            };
            comfyrelay::emulator::runcomfy::run_standalone((host, port).into(), config, shutdown).await
        }
        Command::Version => Ok(()),
    }
}
