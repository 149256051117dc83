//! Hardening (issue 17): what an independent attack broke, through the real interfaces. Connections that
//! never speak, never answer pings or exhaust file descriptors (raw TCP and the built binary); request
//! fields over their bounds; decompression bombs at submit and in the ComfyUI emulator; errors that must
//! neither echo the input nor lack an `ErrorInfo`; configuration errors that must not print a value;
//! content types and corrupt images refused at submit.

use std::process::Command;

// ---------------------------------------------------------------------------------------------------
// Defect 7: configuration errors never echo values.

fn comfyrelay() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_comfyrelay"));
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

#[test]
fn configuration_errors_name_the_key_and_never_print_the_value() {
    const SECRET: &str = "sk-live-7f3a9c1e5b2d";
    let cases: Vec<(&str, String, &str)> = vec![
        ("COMFYRELAY_RUNCOMFY__LEASE", SECRET.into(), "runcomfy.lease"),
        ("COMFYRELAY_JOBS__RETENTION", SECRET.into(), "jobs.retention"),
        ("COMFYRELAY_JOBS__MAX_ATTEMPTS", SECRET.into(), "jobs.max_attempts"),
        ("COMFYRELAY_GRPC__LISTEN", SECRET.into(), "grpc.listen"),
        ("COMFYRELAY_GRPC__GRPC_WEB", SECRET.into(), "grpc.grpc_web"),
        ("COMFYRELAY_LOG__FORMAT", SECRET.into(), "log.format"),
        ("COMFYRELAY_RUNCOMFY__PRICES", format!(r#"{{medium = "{SECRET}"}}"#), "runcomfy.prices.medium"),
        (
            "COMFYRELAY_COMFYUI__SERVERS",
            format!(r#"[{{name = "a", url = "http://h:1", token = "{SECRET}"}}]"#),
            "comfyui.servers",
        ),
    ];
    for (var, value, key) in cases {
        let out = comfyrelay().arg("serve").env(var, &value).output().expect("run comfyrelay");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{var}: {stderr}");
        assert!(stderr.contains(key), "{var}: the key is named: {stderr}");
        assert!(stderr.contains(var), "{var}: the variable is named: {stderr}");
        assert!(!stderr.contains(SECRET), "{var}: the value is echoed: {stderr}");
    }

    // From a file: a value of the wrong kind, and a syntax error on a line holding a secret.
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, body) in [
        ("value.toml", format!("[runcomfy]\nlease = \"{SECRET}\"\n")),
        ("syntax.toml", format!("[runcomfy]\napi_token = {SECRET}\n")),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, body).expect("write config");
        let out = comfyrelay().arg("serve").arg("--config").arg(&file).output().expect("run comfyrelay");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(!stderr.contains(SECRET), "{name}: the value is echoed: {stderr}");
    }
}
