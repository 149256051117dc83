//! The `comfyrelay` binary: parse the command line, load config, init telemetry, bind, run.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use comfyrelay::{Config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit code for bad configuration or usage (sysexits `EX_USAGE`).
const EX_USAGE: u8 = 64;

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
    /// Print the version.
    Version,
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
    telemetry::init(config.log.format, &filter);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("comfyrelay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "comfyrelay stopped with an error");
            eprintln!("comfyrelay: {e:#}");
            ExitCode::FAILURE
        }
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
        Command::Version => Ok(()),
    }
}
