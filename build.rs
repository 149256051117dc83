//! Compiles the gRPC contract with a vendored `protoc`, so a fresh machine needs only the Rust toolchain,
//! and embeds the bundled `workflows/` so the binary runs from any directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let include = protoc_bin_vendored::include_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("comfyrelay_descriptor.bin"))
        .bytes(".comfyrelay.v1")
        .compile_with_config(
            config,
            &[PathBuf::from("proto/comfyrelay/v1/comfyrelay.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    embed_workflows(Path::new("workflows"), &out_dir.join("bundled_workflows.rs"))?;
    println!("cargo:rerun-if-changed=workflows");
    Ok(())
}

/// Writes `&[(name, manifest, graph)]` with one `include_str!` per file of each workflow directory, so
/// an edited file rebuilds the crate and a new directory reruns this script (`rerun-if-changed` scans
/// the whole directory). The catalog parses them at start like files on disk.
fn embed_workflows(dir: &Path, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = std::fs::canonicalize(dir)?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            names.push(name);
        }
    }
    names.sort();
    let mut code = String::from("&[\n");
    for name in names {
        let file = |f: &str| root.join(&name).join(f).to_string_lossy().into_owned();
        writeln!(
            code,
            "    ({name:?}, include_str!({:?}), include_str!({:?})),",
            file("manifest.toml"),
            file("workflow.json")
        )?;
    }
    code.push_str("]\n");
    std::fs::write(out, code)?;
    Ok(())
}
