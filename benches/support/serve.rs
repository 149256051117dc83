//! `comfyrelay serve` as the benches start it: the release binary, auth off, JSON logs on stdout (the
//! benches read `serving gRPC` and the standbys' line from them), the repository's workflows, one
//! configured ComfyUI, listening on a free port of loopback unless `env` names `COMFYRELAY_GRPC__LISTEN`.

use std::{path::Path, process::Stdio};

/// The command, with `env` added last (so it overrides the defaults above).
pub(crate) fn serve_command(
    data_dir: &Path,
    comfy_url: &str,
    env: &[(&str, &str)],
) -> tokio::process::Command {
    let workflows = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_comfyrelay"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0")
        .env("COMFYRELAY_AUTH__MODE", "none")
        .env("COMFYRELAY_LOG__FORMAT", "json")
        .env("COMFYRELAY_LOG__FILTER", "warn,comfyrelay::grpc=info")
        .env("COMFYRELAY_DATA_DIR", data_dir)
        .env("COMFYRELAY_WORKFLOWS_DIR", &workflows)
        .env("COMFYRELAY_COMFYUI__SERVERS", format!("[{{name = \"local\", url = \"{comfy_url}\"}}]"))
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd
}
