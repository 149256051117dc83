//! The binary refuses bad configuration with exit code 64 and names the key.

use std::process::Command;

fn comfyrelay() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfyrelay"));
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

#[test]
fn invalid_env_value_exits_64_naming_the_key() {
    let out = comfyrelay()
        .arg("serve")
        .env("COMFYRELAY_GRPC__MAX_MESSAGE_BYTES", "a-lot")
        .output()
        .expect("run comfyrelay");
    assert_eq!(out.status.code(), Some(64), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("grpc.max_message_bytes"), "{stderr}");
}

#[test]
fn unknown_key_in_file_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[grpc]\nlisten = \"127.0.0.1:0\"\nmax_mesage_bytes = 5\n").unwrap();
    let out = comfyrelay().arg("serve").arg("--config").arg(&file).output().expect("run comfyrelay");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_mesage_bytes"), "{stderr}");
}

#[test]
fn missing_runcomfy_token_exits_64_and_never_echoes_secrets() {
    let out = comfyrelay()
        .arg("serve")
        .env("COMFYRELAY_RUNCOMFY__ENABLED", "true")
        .env("COMFYRELAY_RUNCOMFY__USER_ID", "u-1")
        .output()
        .expect("run comfyrelay");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("runcomfy.api_token"));

    let out = comfyrelay()
        .arg("serve")
        .env("COMFYRELAY_RUNCOMFY__API_TOKEN", "tok-should-not-appear")
        .env("COMFYRELAY_GRPC__LISTEN", "not-an-address")
        .output()
        .expect("run comfyrelay");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("grpc.listen"), "{stderr}");
    assert!(!stderr.contains("tok-should-not-appear"), "{stderr}");
}

#[test]
fn version_prints_the_version() {
    let out = comfyrelay().arg("version").output().expect("run comfyrelay");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_database_url_that_is_not_postgresql_exits_64_naming_the_key_and_never_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let out = comfyrelay()
        .arg("serve")
        .env("COMFYRELAY_DATA_DIR", dir.path())
        .env("COMFYRELAY_STORAGE__DATABASE_URL", "mysql://app:pw-should-not-appear@db/comfyrelay")
        .output()
        .expect("run comfyrelay");
    assert_eq!(out.status.code(), Some(64), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("storage.database_url") && stderr.contains("postgres://"), "{stderr}");
    assert!(!stderr.contains("pw-should-not-appear"), "{stderr}");
}
