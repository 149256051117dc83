//! The Python package's pytest suite (`clients/python/tests`), against the built binary's `dev`.
//!
//! It needs a Python with the package and its test dependencies installed: `target/py` (which `.ci/run`
//! creates), else `COMFYRELAY_PYTHON`, else `python3`. Without them the test says it is skipped, except
//! when `CI` is set: then it fails, so CI can never skip it silently.

use std::path::PathBuf;
use std::process::Command;

use crate::helpers::{BIN, repo, run_for};

fn python() -> PathBuf {
    let venv = repo().join("target/py/bin/python");
    if let Some(p) = std::env::var_os("COMFYRELAY_PYTHON") {
        PathBuf::from(p)
    } else if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

#[test]
fn the_python_package_tests_pass_against_dev() {
    let python = python();
    let probe = Command::new(&python)
        .args(["-c", "import grpc, grpc_status, pytest, comfyrelay.v1.comfyrelay_pb2, comfyrelay.client"])
        .output();
    let ready = probe.as_ref().is_ok_and(|o| o.status.success());
    if !ready {
        let why = match &probe {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        let message = format!(
            "{} lacks the Python client or its test dependencies ({}); `.ci/run` installs them in target/py",
            python.display(),
            why.lines().last().unwrap_or("")
        );
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        eprintln!("SKIPPED the Python client tests: {message}");
        return;
    }
    let out = run_for(
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "clients/python/tests"])
            .current_dir(repo())
            .env("COMFYRELAY_BIN", BIN),
        std::time::Duration::from_secs(600),
    );
    println!("{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.code, Some(0), "pytest failed:\n{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("passed"), "{}", out.stdout);
}
