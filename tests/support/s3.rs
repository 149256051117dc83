//! A throwaway S3-compatible server for tests: moto's server (`moto_server`, Python), in memory, on a free
//! loopback port, killed when the [`S3Server`] drops. It signs nothing and checks no credentials, but speaks
//! the S3 REST API that object_store's `AmazonS3` client sends (PUT, GET with ranges, HEAD, DELETE,
//! multipart uploads, list).
//!
//! Found in `target/py/bin` (where `.ci/run` installs `tests/support/requirements-s3.txt`), else on
//! `PATH`. Without it [`S3Server::start`] returns `None` and the test returns early, unless `CI` is set:
//! then it panics, since `.ci/run` installs it.

#![allow(dead_code, unreachable_pub, reason = "shared test support; each includer uses part of it")]

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::io::{AsyncBufReadExt as _, BufReader};

/// How long the server may take to listen (Python imports moto's S3 backend first).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running moto server.
#[derive(Debug)]
pub struct S3Server {
    child: tokio::process::Child,
    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub endpoint: String,
}

fn moto_server() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/moto_server");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
}

impl S3Server {
    /// Starts a server, or `None` (with a message) when `moto_server` is not installed outside CI.
    pub async fn start() -> Option<Self> {
        let Some(bin) = moto_server() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "moto_server is missing; .ci/run installs it (tests/support/requirements-s3.txt)"
            );
            eprintln!(
                "skipping: moto_server (pip install -r tests/support/requirements-s3.txt) is not installed"
            );
            return None;
        };
        let mut child = tokio::process::Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn moto_server");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let endpoint = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.expect("moto_server's output") {
                if let Some(at) = line.find("Running on http://127.0.0.1:") {
                    return line[at + "Running on ".len()..].trim().to_string();
                }
            }
            panic!("moto_server exited before listening");
        })
        .await
        .expect("moto_server listens within 60 s");
        // It logs every request: read its output to the end so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Some(Self { child, endpoint })
    }

    /// Creates bucket `name`.
    pub async fn create_bucket(&self, name: &str) {
        let resp = reqwest::Client::new()
            .put(format!("{}/{name}", self.endpoint))
            .send()
            .await
            .expect("create the bucket");
        assert!(resp.status().is_success(), "creating bucket {name}: {}", resp.status());
    }

    /// The keys in bucket `name` (the first 1,000).
    pub async fn keys(&self, name: &str) -> Vec<String> {
        let body = reqwest::get(format!("{}/{name}?list-type=2", self.endpoint))
            .await
            .expect("list the bucket")
            .text()
            .await
            .expect("the listing");
        body.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()).map(str::to_string).collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
