//! The command-line client in the `comfyrelay` binary: `run`, `submit`, `watch`, `get`, `list`,
//! `cancel`, `download`, `workflows`, `machines`, over gRPC to a comfyrelay server.
//!
//! A gRPC *client* adapter, the mirror image of `grpc/`: speaking the wire contract is its whole job, so
//! it is the one module outside `grpc/` and `proto` that uses tonic and `pb::` types. It knows nothing of
//! the server's domain (jobs, catalog, store, pool) and never loads the server's configuration: it sees
//! only what any gRPC client sees. Its flags come from `main` (clap, which also reads
//! `COMFYRELAY_SERVER` and `COMFYRELAY_API_KEY`).
//!
//! Layout: `connect` (channel, API key), `params` (typed `--param`), `follow` (an event stream that
//! resumes after a disconnect), `render` (progress bars, human lines), `json` (`--json` lines),
//! `commands` (one function per subcommand), [`error`] (exit codes, decoded `google.rpc` details).
//! [`keys`] is the exception: the operator's API key commands, which open the server's database.

mod commands;
mod connect;
pub mod error;
mod follow;
mod json;
pub mod keys;
mod params;
mod render;

use std::path::PathBuf;
use std::time::Duration;

pub use connect::ConnectArgs;
pub use error::Exit;

/// The client subcommands (flattened into the binary's top-level commands).
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Submit a job, show its progress, and save its outputs.
    Run(RunArgs),
    /// Submit a job and print its id (or the job, with --json) without waiting.
    Submit(SubmitCmd),
    /// Follow a job's events to its end; resumes by itself after a lost connection.
    Watch(WatchArgs),
    /// Show one job.
    Get(JobArgs),
    /// List jobs, newest first.
    List(ListArgs),
    /// Cancel a job.
    Cancel(CancelArgs),
    /// Save a job's outputs.
    Download(DownloadArgs),
    /// List the workflows and their inputs, or show one.
    Workflows(WorkflowsArgs),
    /// List the machines jobs run on.
    Machines(MachinesArgs),
}

/// What to submit.
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// The catalog workflow to run (see `comfyrelay workflows`).
    pub workflow: String,
    /// The input image (PNG, JPEG or WebP), for workflows that take one.
    pub image: Option<PathBuf>,
    /// A workflow input, typed by the workflow's schema, e.g. `--param width=64`; image inputs take
    /// `name=@file.png`. Repeatable.
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE", value_parser = params::split_pair)]
    pub params: Vec<(String, String)>,
    /// The prompt text, for workflows that take one.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Idempotency key: resubmitting with the same key returns the same job. Without it a fresh one
    /// (`cli-<uuid>`) is sent, so a submit retried after a lost answer never makes a second job.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Scheduling priority (-100..100; higher runs first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// A label to filter `list` by, e.g. `--label order=42`. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = params::split_pair)]
    pub labels: Vec<(String, String)>,
}

/// `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub submit: SubmitArgs,
    /// Directory the outputs are saved in (created if missing).
    #[arg(long, short, default_value = ".")]
    pub out: PathBuf,
    /// Give up when the event stream has stayed broken this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub reconnect_for: Duration,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitCmd {
    #[command(flatten)]
    pub submit: SubmitArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The job's id.
    pub job: String,
    /// Start after this event sequence (0: from the first event).
    #[arg(long, default_value_t = 0)]
    pub after: u64,
    /// Also save the outputs in this directory when the job succeeds.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Give up when the event stream has stayed broken this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub reconnect_for: Duration,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `get`.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    /// The job's id.
    pub job: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only jobs in this state (queued, provisioning, running, succeeded, failed, cancelled). Repeatable.
    #[arg(long = "state")]
    pub states: Vec<String>,
    /// Only jobs of this workflow.
    #[arg(long)]
    pub workflow: Option<String>,
    /// Only jobs with this label. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = params::split_pair)]
    pub labels: Vec<(String, String)>,
    /// At most this many jobs.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `cancel`.
#[derive(Debug, clap::Args)]
pub struct CancelArgs {
    /// The job's id.
    pub job: String,
    /// Recorded on the job's `cancelled` event.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `download`.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// The job's id.
    pub job: String,
    /// Only these outputs (by file name); all when none are given.
    pub filenames: Vec<String>,
    /// Directory the outputs are saved in (created if missing).
    #[arg(long, short, default_value = ".")]
    pub out: PathBuf,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `workflows`.
#[derive(Debug, clap::Args)]
pub struct WorkflowsArgs {
    /// Show only this workflow, with its inputs in full.
    pub name: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// `machines`.
#[derive(Debug, clap::Args)]
pub struct MachinesArgs {
    /// Include stopped machines.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Runs a client command to its end and returns the exit code. Errors are printed here: on stderr, or as
/// a `{"type": "error"}` line on stdout with `--json`.
pub fn main(command: ClientCommand) -> Exit {
    let json = match &command {
        ClientCommand::Run(a) => a.connect.json,
        ClientCommand::Submit(a) => a.connect.json,
        ClientCommand::Watch(a) => a.connect.json,
        ClientCommand::Get(a) => a.connect.json,
        ClientCommand::List(a) => a.connect.json,
        ClientCommand::Cancel(a) => a.connect.json,
        ClientCommand::Download(a) => a.connect.json,
        ClientCommand::Workflows(a) => a.connect.json,
        ClientCommand::Machines(a) => a.connect.json,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("comfyrelay: cannot start the runtime: {e}");
            return Exit::CallFailed;
        }
    };
    match runtime.block_on(commands::run(command)) {
        Ok(exit) => exit,
        Err(e) => {
            if json {
                println!("{}", e.to_json());
            } else {
                eprintln!("comfyrelay: {e}");
            }
            e.exit()
        }
    }
}
