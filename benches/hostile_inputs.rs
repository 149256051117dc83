//! Peak memory of comfyrelay under hostile request bodies (issue 17, defect 3): the built binary in front of
//! an emulated ComfyUI (run in this process); each scenario starts a fresh comfyrelay process, sends its
//! requests over gRPC and reads the process's peak resident memory (`VmHWM` in `/proc/PID/status`).
//! Prints figures; asserts nothing.
//!
//! Run: `cargo bench --bench hostile_inputs` (add `--profile dev` to reuse the debug build: allocation
//! sizes, which these figures measure, do not depend on the optimisation level).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use comfyrelay::{emulator::comfyui::ComfyEmulator, proto::pb};
use tonic::transport::Channel;

/// A comfyrelay process serving on an ephemeral port.
struct Relay {
    child: Child,
    addr: String,
    _data: tempfile::TempDir,
}

impl Relay {
    fn start(comfy_url: &str) -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        let workflows = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
        let mut child = Command::new(env!("CARGO_BIN_EXE_comfyrelay"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0")
            .env("COMFYRELAY_AUTH__MODE", "none")
            .env("COMFYRELAY_DATA_DIR", data.path())
            .env("COMFYRELAY_WORKFLOWS_DIR", workflows)
            .env("COMFYRELAY_COMFYUI__SERVERS", format!(r#"[{{name = "emu", url = "{comfy_url}"}}]"#))
            .env("COMFYRELAY_LOG__FORMAT", "json")
            .env("COMFYRELAY_LOG__FILTER", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start comfyrelay");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sent {
                    continue; // keep draining so the child never blocks on a full pipe
                }
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if v["fields"]["message"] == "serving gRPC"
                    && let Some(addr) = v["fields"]["addr"].as_str()
                {
                    let _ = tx.send(addr.to_string());
                    sent = true;
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("comfyrelay serves within 60 s");
        Self { child, addr, _data: data }
    }

    fn peak_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }

    async fn client(&self) -> pb::job_service_client::JobServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        pb::job_service_client::JobServiceClient::new(channel)
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(64 << 20)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// About `bytes` of API-format graph made of many small nodes (the shape that amplifies most when parsed).
fn many_nodes_graph(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 128);
    out.push_str(r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}"#);
    let mut i = 2u64;
    while out.len() < bytes {
        out.push_str(&format!(
            r#", "{i}": {{"class_type": "ImageInvert", "inputs": {{"image": ["1", 0]}}}}"#
        ));
        i += 1;
    }
    out.push('}');
    out
}

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 77]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

fn inline(graph: String) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::GraphJson(graph)),
        ..Default::default()
    }
}

fn text_parameter(len: usize) -> pb::SubmitJobRequest {
    let mut req = pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::Workflow("invert".into())),
        image: Some(pb::InputImage { data: png().into(), ..Default::default() }),
        ..Default::default()
    };
    req.parameters.insert(
        "filename_prefix".into(),
        pb::ParameterValue { kind: Some(pb::parameter_value::Kind::StringValue("x".repeat(len))) },
    );
    req
}

async fn scenario(comfy: &ComfyEmulator, label: &str, requests: Vec<pb::SubmitJobRequest>) {
    let relay = Relay::start(&comfy.url());
    let mut client = relay.client().await;
    // Warm up: one small valid job, so the baseline includes a loaded catalog and a used connection.
    let _ = client.submit_job(text_parameter(8)).await;
    let before = relay.peak_mib();
    let mut calls = Vec::new();
    for req in requests {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move { c.submit_job(req).await.map(|_| ()).map_err(|s| s.code()) }));
    }
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(match call.await.expect("join") {
            Ok(()) => "OK".to_string(),
            Err(code) => format!("{code:?}"),
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = relay.peak_mib();
    println!(
        "{label:<48} peak {after:>7.1} MiB (+{:>6.1} over {before:.1} MiB before)  answers: {}",
        after - before,
        outcomes.join(", ")
    );
}

#[tokio::main]
async fn main() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let comfy = ComfyEmulator::start(listener, Default::default()).await.expect("emulator");
    let mb = 1024 * 1024;
    scenario(&comfy, "baseline (one small job)", Vec::new()).await;
    scenario(&comfy, "one 30 MB inline graph (small nodes)", vec![inline(many_nodes_graph(30 * mb))]).await;
    scenario(
        &comfy,
        "one 1 MB inline graph (small nodes, within the limit)",
        vec![inline(many_nodes_graph(mb - 1024))],
    )
    .await;
    scenario(
        &comfy,
        "four 30 MB inline graphs at once",
        (0..4).map(|_| inline(many_nodes_graph(30 * mb))).collect(),
    )
    .await;
    scenario(
        &comfy,
        "one 30 MB inline graph (one long string)",
        vec![inline(format!(
            r#"{{"1": {{"class_type": "LoadImage", "inputs": {{"image": "{}"}}}}}}"#,
            "x".repeat(30 * mb)
        ))],
    )
    .await;
    scenario(&comfy, "a 5 MB text parameter", vec![text_parameter(5 * mb)]).await;
    comfy.shutdown().await;
}
