//! The `comfyrelay` binary: parse the command line, load config, init telemetry, bind, run.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use comfyrelay::{
    Config, cli,
    emulator::{
        comfyui::{ComfyVersion, EmulatorConfig},
        runcomfy::RunComfyEmulatorConfig,
    },
    shutdown, telemetry,
};
use tokio_util::sync::CancellationToken;

/// Exit code for bad configuration or usage (sysexits `EX_USAGE`).
const EX_USAGE: u8 = 64;

/// Longest wait for buffered spans to reach the collector at exit.
const TRACE_FLUSH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs ComfyUI workflows durably behind a gRPC API.
#[derive(Debug, Parser)]
#[command(name = "comfyrelay", version, about)]
struct Cli {
    /// The server's TOML configuration file (serve, dev); `COMFYRELAY_*` variables override it.
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
        /// Port of the emulated ComfyUI on 127.0.0.1 [default: 8188, or a free port when 8188 is taken].
        #[arg(long)]
        comfy_port: Option<u16>,
        /// Also run an emulated RunComfy account and enable the pool: jobs of workflows with RunComfy
        /// requirements run on machines it launches.
        #[arg(long)]
        runcomfy: bool,
        /// The ComfyUI generation the emulators reproduce: 0.3.64 or 0.38.
        #[arg(long, default_value = "0.3.64")]
        comfyui_version: ComfyVersion,
        /// Port of the emulated RunComfy API on 127.0.0.1 [default: 8190, or a free port when taken].
        #[arg(long, requires = "runcomfy")]
        runcomfy_port: Option<u16>,
        /// Time each emulated ComfyUI node takes, e.g. `1s`, to watch progress (default: as fast as it can).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        node_delay: std::time::Duration,
        /// Progress steps each delayed node reports, as a sampler would.
        #[arg(long, default_value_t = 0)]
        progress_steps: u64,
    },
    /// Run an emulator of an external system on its own.
    Emulate {
        #[command(subcommand)]
        target: EmulateTarget,
    },
    /// Manage API keys in the server's database (the same configuration and data_dir as serve).
    Keys {
        #[command(subcommand)]
        command: cli::keys::KeysCommand,
    },
    /// Print the version.
    Version,
    #[command(flatten)]
    Client(Box<cli::ClientCommand>),
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; usage errors exit 64 like bad configuration (clap's
            // own 2 is the client's "call failed").
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    match cli.command {
        Command::Version => {
            println!("comfyrelay {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        // Client commands never load the server's configuration.
        Command::Client(command) => return ExitCode::from(cli::main(*command).code()),
        Command::Serve | Command::Dev { .. } | Command::Emulate { .. } | Command::Keys { .. } => {}
    }
    let config = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("comfyrelay: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    // `serve` without authentication beyond loopback is a configuration error, refused before binding.
    if let Command::Serve = cli.command
        && let Err(e) = config.check_auth_for(config.grpc.listen)
    {
        eprintln!("comfyrelay: {e}");
        return ExitCode::from(EX_USAGE);
    }
    if let Command::Keys { command } = cli.command {
        // No telemetry: stdout carries the created key alone.
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(cli::keys::run(command, &config)));
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("comfyrelay: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
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
            let listener =
                comfyrelay::listen::bind(config.grpc.listen, "grpc.listen (COMFYRELAY_GRPC__LISTEN)").await?;
            comfyrelay::run(listener, config, shutdown).await
        }
        Command::Dev { comfy_port, runcomfy, comfyui_version, runcomfy_port, node_delay, progress_steps } => {
            let options = comfyrelay::dev::DevOptions {
                comfy_port,
                runcomfy,
                comfyui_version,
                runcomfy_port,
                node_delay,
                progress_steps,
            };
            comfyrelay::dev::run(options, config, shutdown).await
        }
        Command::Emulate { target: EmulateTarget::Comfyui { port, host, comfyui_version } } => {
            comfyrelay::emulator::comfyui::run_standalone(
                (host, port).into(),
                EmulatorConfig { comfyui_version, ..EmulatorConfig::default() },
                shutdown,
            )
            .await
            .with_context(|| format!("emulated ComfyUI on {host}:{port} (set by --host, --port)"))
        }
        Command::Emulate { target: EmulateTarget::Runcomfy { port, host, boot_seconds } } => {
            let config = RunComfyEmulatorConfig {
                boot_time: std::time::Duration::from_secs(boot_seconds),
                ..RunComfyEmulatorConfig::default()
            };
            comfyrelay::emulator::runcomfy::run_standalone((host, port).into(), config, shutdown)
                .await
                .with_context(|| format!("emulated RunComfy API on {host}:{port} (set by --host, --port)"))
        }
        Command::Version | Command::Client(_) | Command::Keys { .. } => Ok(()),
    }
}
