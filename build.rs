//! Compiles the gRPC contract with a vendored `protoc`, so a fresh machine needs only the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let include = protoc_bin_vendored::include_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("comfyrelay_descriptor.bin"))
        .bytes(".comfyrelay.v1")
        .compile_with_config(
            config,
            &[std::path::PathBuf::from("proto/comfyrelay/v1/comfyrelay.proto")],
            &[std::path::PathBuf::from("proto"), include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
