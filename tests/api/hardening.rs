//! Hardening (issue 17): what an independent attack broke, through the real interfaces. Connections that
//! never speak, never answer pings or exhaust file descriptors (raw TCP and the built binary); request
//! fields over their bounds; decompression bombs at submit and in the ComfyUI emulator; errors that must
//! neither echo the input nor lack an `ErrorInfo`; configuration errors that must not print a value;
//! content types and corrupt images refused at submit.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use comfyrelay::{
    comfy::{ClientOptions, ComfyClient, QueuePrompt},
    proto::pb,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

use crate::helpers::{assert_violations, png, spawn_app_with, spawn_comfy, submit_request};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_PING: u8 = 0x6;

/// One HTTP/2 frame as read off the wire.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    #[allow(dead_code, reason = "shown by Debug in assertion messages")]
    len: usize,
}

/// Reads frames until the server closes the connection (EOF or reset), or panics after `within`.
async fn frames_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<Frame> {
    let read = async {
        let mut frames = Vec::new();
        loop {
            let mut header = [0u8; 9];
            if stream.read_exact(&mut header).await.is_err() {
                return frames;
            }
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return frames;
            }
            frames.push(Frame { kind: header[3], flags: header[4], len: payload.len() });
        }
    };
    tokio::time::timeout(within, read).await.expect("the server closes the connection in time")
}

/// Waits until a connection that sends nothing is closed by the server (EOF or reset).
async fn closed_by_server(stream: &mut TcpStream, within: Duration) {
    let mut buf = [0u8; 64];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // whatever the server says first (e.g. its SETTINGS)
            }
        }
    };
    tokio::time::timeout(within, read).await.expect("the server closes the connection in time");
}

fn error_info(status: &Status) -> tonic_types::ErrorInfo {
    status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo on {status:?}"))
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect")
}

fn jobs_client(channel: Channel) -> pb::job_service_client::JobServiceClient<Channel> {
    pb::job_service_client::JobServiceClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(64 << 20)
}

fn text(v: impl Into<String>) -> pb::ParameterValue {
    pb::ParameterValue { kind: Some(pb::parameter_value::Kind::StringValue(v.into())) }
}

fn image_value(data: Vec<u8>, content_type: &str) -> pb::ParameterValue {
    pb::ParameterValue {
        kind: Some(pb::parameter_value::Kind::ImageValue(pb::InputImage {
            data: data.into(),
            filename: String::new(),
            content_type: content_type.into(),
        })),
    }
}

fn inline(graph: impl Into<String>) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::GraphJson(graph.into())),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------------
// Defect 2: connections.

#[tokio::test]
async fn a_connection_that_never_sends_is_closed_within_the_handshake_timeout() {
    let app = spawn_app_with(|c| c.grpc.handshake_timeout = Duration::from_millis(300)).await;
    let mut silent = TcpStream::connect(app.addr).await.expect("connect");
    closed_by_server(&mut silent, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn a_connection_with_no_call_is_closed_after_the_idle_timeout() {
    let app = spawn_app_with(|c| {
        c.grpc.idle_timeout = Duration::from_millis(300);
        c.grpc.keepalive_interval = Duration::from_secs(3600);
    })
    .await;
    let mut idle = TcpStream::connect(app.addr).await.expect("connect");
    idle.write_all(PREFACE).await.expect("preface");
    idle.write_all(&EMPTY_SETTINGS).await.expect("settings");
    let frames = frames_until_closed(&mut idle, Duration::from_secs(20)).await;
    assert!(frames.iter().any(|f| f.kind == FRAME_SETTINGS), "the handshake was answered: {frames:?}");
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_dropped() {
    let app = spawn_app_with(|c| {
        c.grpc.idle_timeout = Duration::from_secs(3600);
        c.grpc.keepalive_interval = Duration::from_millis(200);
        c.grpc.keepalive_timeout = Duration::from_millis(200);
    })
    .await;
    let mut deaf = TcpStream::connect(app.addr).await.expect("connect");
    deaf.write_all(PREFACE).await.expect("preface");
    deaf.write_all(&EMPTY_SETTINGS).await.expect("settings");
    let frames = frames_until_closed(&mut deaf, Duration::from_secs(20)).await;
    assert!(
        frames.iter().any(|f| f.kind == FRAME_PING && f.flags & 1 == 0),
        "the server pinged before giving up: {frames:?}"
    );
}

#[tokio::test]
async fn the_bound_on_streams_per_connection_is_advertised() {
    let app = spawn_app_with(|c| c.grpc.max_concurrent_streams = 7).await;
    let mut raw = TcpStream::connect(app.addr).await.expect("connect");
    raw.write_all(PREFACE).await.expect("preface");
    raw.write_all(&EMPTY_SETTINGS).await.expect("settings");
    let mut header = [0u8; 9];
    let first = async {
        raw.read_exact(&mut header).await.expect("a frame");
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        raw.read_exact(&mut payload).await.expect("its payload");
        payload
    };
    let payload = tokio::time::timeout(Duration::from_secs(20), first).await.expect("SETTINGS in time");
    assert_eq!(header[3], FRAME_SETTINGS, "the server speaks first with SETTINGS");
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
    assert!(settings.contains(&(0x3, 7)), "{settings:?}");
}

#[tokio::test]
async fn idle_connections_past_the_limit_do_not_stop_a_real_client() {
    let app = spawn_app_with(|c| {
        c.grpc.max_connections = 4;
        c.grpc.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(app.addr).await.expect("connect"));
    }
    // A new client queues behind them in the listen backlog; the idle ones are closed one batch of
    // permits at a time, so it gets its turn.
    let submit = async {
        let mut client = jobs_client(channel(app.addr).await);
        client.submit_job(submit_request("invert", png(8, 8))).await
    };
    let job = tokio::time::timeout(Duration::from_secs(60), submit)
        .await
        .expect("the real client is served within 60 s")
        .expect("SubmitJob succeeds");
    assert_eq!(job.into_inner().workflow, "invert");
    for conn in &mut idle {
        closed_by_server(conn, Duration::from_secs(20)).await;
    }
}

#[tokio::test]
async fn an_open_stream_keeps_its_connection_past_the_idle_timeout() {
    let app = spawn_app_with(|c| {
        c.grpc.idle_timeout = Duration::from_secs(1);
        c.grpc.keepalive_interval = Duration::from_millis(200);
    })
    .await;
    // Three nodes of 700 ms: the job, and its stream, last twice the idle timeout.
    app.comfy.faults().set_node_delay(Duration::from_millis(700));
    let mut client = jobs_client(channel(app.addr).await);
    let job = client.submit_job(submit_request("invert", png(8, 8))).await.expect("submit").into_inner();
    let mut stream = client
        .stream_job(pb::StreamJobRequest { job_id: job.id, ..Default::default() })
        .await
        .expect("stream_job")
        .into_inner();
    let read = async {
        let mut last = None;
        while let Some(event) = stream.message().await.expect("the stream is not cut") {
            last = event.kind;
        }
        last
    };
    let last = tokio::time::timeout(Duration::from_secs(60), read).await.expect("the job ends");
    assert!(matches!(last, Some(pb::job_event::Kind::Succeeded(_))), "{last:?}");
}

/// A comfyrelay process started from the built binary, serving on an ephemeral port.
struct ChildRelay {
    child: Child,
    addr: std::net::SocketAddr,
    _data: tempfile::TempDir,
}

impl ChildRelay {
    /// Runs `comfyrelay serve` under `sh -c 'ulimit -n FDS; exec ...'` with the given extra variables.
    fn start(fds: u32, comfy_url: &str, env: &[(&str, &str)]) -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        let workflows = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {fds} && exec \"$0\" serve"))
            .arg(env!("CARGO_BIN_EXE_comfyrelay"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0")
            .env("COMFYRELAY_AUTH__MODE", "none")
            .env("COMFYRELAY_DATA_DIR", data.path())
            .env("COMFYRELAY_WORKFLOWS_DIR", workflows)
            .env("COMFYRELAY_COMFYUI__SERVERS", format!(r#"[{{name = "emu", url = "{comfy_url}"}}]"#))
            .env("COMFYRELAY_LOG__FORMAT", "json")
            .env("COMFYRELAY_LOG__FILTER", "warn,comfyrelay=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start comfyrelay");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Drains the pipe for the child's whole life, so logging never blocks it.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if v["fields"]["message"] == "serving gRPC"
                    && let Some(addr) = v["fields"]["addr"].as_str().and_then(|a| a.parse().ok())
                {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("comfyrelay serves within 60 s");
        Self { child, addr, _data: data }
    }

    /// CPU time the process has used (user + system), from `/proc/PID/stat`.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ") ".
        let fields: Vec<&str> =
            stat.rsplit_once(") ").map(|(_, f)| f.split(' ').collect()).unwrap_or_default();
        let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
        Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
    }
}

impl Drop for ChildRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The attack: more never-sending connections than the process has file descriptors (96 here). The
/// server keeps its connections below the open-file limit (leaving descriptors for the database and the
/// input images), closes the silent ones at their handshake timeout, and serves a real client queued
/// behind them. (Before the fix it spun on `accept` failing with EMFILE and never answered.)
#[tokio::test]
async fn more_silent_connections_than_file_descriptors_do_not_stop_the_service() {
    let comfy = spawn_comfy().await;
    let relay = ChildRelay::start(96, &comfy.url(), &[("COMFYRELAY_GRPC__HANDSHAKE_TIMEOUT", "1s")]);
    let cpu_before = relay.cpu_time();
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(TcpStream::connect(relay.addr).await.expect("connect"));
    }
    let submit = async {
        let mut client = jobs_client(channel(relay.addr).await);
        client.submit_job(submit_request("invert", png(8, 8))).await
    };
    let job = tokio::time::timeout(Duration::from_secs(90), submit)
        .await
        .expect("the real client is served within 90 s")
        .expect("SubmitJob succeeds");
    assert_eq!(job.into_inner().workflow, "invert");
    // A figure, not an assertion: the CPU the server burnt while descriptors were exhausted.
    println!("comfyrelay CPU while flooded: {:?}", relay.cpu_time().saturating_sub(cpu_before));
    drop(silent);
}

// ---------------------------------------------------------------------------------------------------
// Defect 3: bounded parsing, refused early, naming the field and the limit.

#[tokio::test]
async fn an_oversized_inline_graph_is_refused_before_it_is_parsed() {
    let mut app = spawn_app_with(|_| {}).await;
    let graph = format!(
        r#"{{"1": {{"class_type": "LoadImage", "inputs": {{"image": "{}"}}}}}}"#,
        "x".repeat(3 << 20)
    );
    let err = app.jobs.submit_job(inline(graph)).await.unwrap_err();
    assert_violations(&err, &["graph_json"]);
    let info = error_info(&err);
    assert_eq!(info.reason, "LIMIT_EXCEEDED");
    assert_eq!(info.domain, "comfyrelay.dev");
    assert_eq!(info.metadata["field"], "graph_json");
    assert_eq!(info.metadata["limit"], (1024 * 1024).to_string());
    assert_eq!(info.metadata["setting"], "jobs.max_graph_bytes");
    assert!(err.message().len() < 512, "{}", err.message());
}

#[tokio::test]
async fn a_deeply_nested_inline_graph_is_refused_naming_the_depth_limit() {
    let mut app = spawn_app_with(|_| {}).await;
    let depth = 5000;
    let graph = format!(
        r#"{{"1": {{"class_type": "A", "inputs": {{"x": {}{}}}}}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let err = app.jobs.submit_job(inline(graph)).await.unwrap_err();
    assert_violations(&err, &["graph_json"]);
    let info = error_info(&err);
    assert_eq!((info.metadata["limit"].as_str(), info.metadata["unit"].as_str()), ("32", "levels"));
}

#[tokio::test]
async fn oversized_text_and_names_are_refused_naming_each_field_and_limit() {
    let mut app = spawn_app_with(|c| c.jobs.max_text_bytes = 1024).await;

    let mut req = submit_request("invert", png(8, 8));
    req.parameters.insert("filename_prefix".into(), text("p".repeat(5 << 20)));
    let err = app.jobs.submit_job(req).await.unwrap_err();
    assert_violations(&err, &["parameters[filename_prefix]"]);
    let info = error_info(&err);
    assert_eq!(
        (info.metadata["limit"].as_str(), info.metadata["setting"].as_str()),
        ("1024", "jobs.max_text_bytes")
    );

    let mut req = submit_request("invert", png(8, 8));
    req.prompt = "q".repeat(2000);
    req.request_id = "r".repeat(1000);
    req.labels.insert("k".repeat(1 << 20), "v".into());
    req.labels.insert("team".into(), "v".repeat(10_000));
    let err = app.jobs.submit_job(req).await.unwrap_err();
    let fields = assert_violations(&err, &["prompt", "request_id", "labels[team]"]);
    assert!(fields.iter().any(|f| f.starts_with("labels[kkkk") && f.ends_with("…]")), "{fields:?}");
    let details = err.details().len();
    assert!(
        err.message().len() < 2048 && details < 4096,
        "message {} / details {details}",
        err.message().len()
    );
}

// ---------------------------------------------------------------------------------------------------
// Defect 4: decompression bombs.

/// CRC-32 (IEEE), for hand-made PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A valid 1×1 grayscale PNG whose header is rewritten to declare `w`×`h` (the pixel data is not there:
/// only the header matters to a check that must not decode).
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 1, 1);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::One);
        let mut writer = enc.write_header().expect("header");
        writer.write_image_data(&[0]).expect("data");
    }
    // Signature (8), IHDR length (4), "IHDR" (4), width, height, ..., CRC at 29..33.
    out[16..20].copy_from_slice(&w.to_be_bytes());
    out[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}

/// A genuine `w`×`h` black 1-bit PNG: tiny on disk, large once decoded.
fn black_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::One);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header().expect("header");
        writer.write_image_data(&vec![0u8; w.div_ceil(8) as usize * h as usize]).expect("data");
    }
    out
}

#[tokio::test]
async fn an_image_declaring_more_pixels_than_the_limit_is_refused_at_submit() {
    let mut app = spawn_app_with(|_| {}).await;
    let bomb = png_declaring(20_000, 20_000);
    assert!(bomb.len() < 1024, "a small file");
    let err = app.jobs.submit_job(submit_request("invert", bomb.clone())).await.unwrap_err();
    assert_violations(&err, &["image"]);
    let info = error_info(&err);
    assert_eq!(info.metadata["field"], "image");
    assert_eq!(info.metadata["limit"], (64u64 << 20).to_string());
    assert_eq!(
        (info.metadata["unit"].as_str(), info.metadata["setting"].as_str()),
        ("pixels", "jobs.max_image_pixels")
    );
    assert!(err.message().contains("20000×20000"), "{}", err.message());

    // As an image parameter, of a catalog workflow and of an inline graph.
    let mut req = submit_request("invert", png(8, 8));
    req.image = None;
    req.parameters.insert("image".into(), image_value(bomb.clone(), ""));
    assert_violations(&app.jobs.submit_job(req).await.unwrap_err(), &["parameters[image]"]);
    let mut req = inline(
        r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}"#,
    );
    req.parameters.insert("1.image".into(), image_value(bomb, "image/png"));
    assert_violations(&app.jobs.submit_job(req).await.unwrap_err(), &["parameters[1.image]"]);
}

#[tokio::test]
async fn the_pixel_limit_is_configurable() {
    let mut app = spawn_app_with(|c| c.jobs.max_image_pixels = 10_000).await;
    let err = app.jobs.submit_job(submit_request("invert", png(101, 100))).await.unwrap_err();
    assert_violations(&err, &["image"]);
    assert_eq!(error_info(&err).metadata["limit"], "10000");
    app.jobs.submit_job(submit_request("invert", png(100, 100))).await.expect("at the limit is accepted");
}

async fn run_on_emulator(client: &ComfyClient, image: Vec<u8>) -> Vec<(String, serde_json::Value)> {
    let uploaded = client.upload_image(image.into(), "bomb.png", "image/png").await.expect("upload");
    let prompt_id = uuid::Uuid::new_v4().to_string();
    let graph = serde_json::json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": uploaded.name}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    });
    client
        .queue_prompt(&QueuePrompt { prompt_id: prompt_id.clone(), graph, client_id: "hardening".into() })
        .await
        .expect("queued");
    let done = async {
        loop {
            if let Some(entry) = client.history(&prompt_id).await.expect("history") {
                return entry.messages;
            }
            tokio::time::sleep(Duration::from_millis(20)).await; // bounded polling, see the timeout
        }
    };
    tokio::time::timeout(Duration::from_secs(60), done).await.expect("the prompt ends within 60 s")
}

fn execution_error(messages: &[(String, serde_json::Value)]) -> (String, String) {
    let (_, data) = messages
        .iter()
        .find(|(kind, _)| kind == "execution_error")
        .unwrap_or_else(|| panic!("no execution_error in {messages:?}"));
    (
        data["exception_type"].as_str().unwrap_or_default().into(),
        data["exception_message"].as_str().unwrap_or_default().into(),
    )
}

#[tokio::test]
async fn the_comfyui_emulator_bounds_its_own_decoding() {
    let comfy = spawn_comfy().await;
    let client = ComfyClient::new(&comfy.url(), ClientOptions::default()).expect("client");

    // Declares 400 MP: Pillow's bomb check refuses it before decoding, and so does the emulator.
    let (kind, message) = execution_error(&run_on_emulator(&client, png_declaring(20_000, 20_000)).await);
    assert_eq!(kind, "PIL.Image.DecompressionBombError");
    assert!(message.contains("400000000 pixels"), "{message}");

    // 25 MP of real pixels (a 3 KB file): above the emulator's frame bound, so LoadImage fails like an
    // out-of-memory allocation instead of expanding it (300 MB as float32).
    let genuine = black_png(5000, 5000);
    assert!(genuine.len() < 200_000, "{}", genuine.len());
    let (kind, message) = execution_error(&run_on_emulator(&client, genuine).await);
    assert_eq!(kind, "RuntimeError");
    assert!(message.contains("not enough memory"), "{message}");

    // The emulator is still serving.
    client.system_stats().await.expect("alive");
}

// ---------------------------------------------------------------------------------------------------
// Defect 6: errors never echo the input, and all carry an ErrorInfo.

#[tokio::test]
async fn errors_quote_caller_values_cut_short() {
    let mut app = spawn_app_with(|_| {}).await;
    let huge = "w".repeat(1 << 20);

    // A 1 MiB workflow name: refused on its size, and not echoed.
    let mut req = submit_request("invert", png(8, 8));
    req.source = Some(pb::submit_job_request::Source::Workflow(huge.clone()));
    let err = app.jobs.submit_job(req).await.unwrap_err();
    assert_violations(&err, &["workflow"]);
    assert!(err.message().len() < 512 && err.details().len() < 1024, "{}", err.message());

    // An unknown name within the bound: quoted, cut to 64 characters.
    let name = "n".repeat(120);
    let mut req = submit_request("invert", png(8, 8));
    req.source = Some(pb::submit_job_request::Source::Workflow(name.clone()));
    let err = app.jobs.submit_job(req).await.unwrap_err();
    assert_violations(&err, &["workflow"]);
    assert!(err.message().contains(&format!("{}…", "n".repeat(64))), "{}", err.message());
    assert!(!err.message().contains(&name));

    // A choice value, and a node id of an inline graph.
    let mut req = submit_request("scale-blur", png(8, 8));
    req.parameters.insert("upscale_method".into(), text("c".repeat(10_000)));
    let err = app.jobs.submit_job(req).await.unwrap_err();
    assert_violations(&err, &["parameters[upscale_method]"]);
    assert!(!err.message().contains(&"c".repeat(65)), "{}", err.message());
    let node = "d".repeat(100_000);
    let err = app.jobs.submit_job(inline(format!(r#"{{"{node}": {{"inputs": {{}}}}}}"#))).await.unwrap_err();
    assert_violations(&err, &["graph_json"]);
    assert!(!err.message().contains(&"d".repeat(65)) && err.details().len() < 4096, "{}", err.message());

    // NOT_FOUND names.
    let err = app.workflows.get_workflow(pb::GetWorkflowRequest { name: "x".repeat(100) }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&format!("{}…", "x".repeat(64))), "{}", err.message());
    let err = app.workflows.get_workflow(pb::GetWorkflowRequest { name: huge.clone() }).await.unwrap_err();
    assert_eq!((err.code(), error_info(&err).metadata["field"].as_str()), (Code::InvalidArgument, "name"));
    let err = app.machines.get_machine(pb::GetMachineRequest { machine_id: huge }).await.unwrap_err();
    assert!(err.message().len() < 512, "{}", err.message());
}

#[tokio::test]
async fn a_request_over_the_message_limit_is_resource_exhausted_naming_the_setting() {
    let app = spawn_app_with(|c| {
        c.grpc.max_message_bytes = 1 << 20;
        c.jobs.max_graph_bytes = 1 << 19;
        c.jobs.max_text_bytes = 1 << 19;
    })
    .await;
    let mut client = jobs_client(app.channel.clone());
    let mut req = submit_request("invert", png(8, 8));
    req.image.as_mut().expect("image").data = vec![0u8; 2 << 20].into();
    let err = client.submit_job(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let info = error_info(&err);
    assert_eq!(info.reason, "MESSAGE_TOO_LARGE");
    assert_eq!(info.metadata["setting"], "grpc.max_message_bytes");
    assert_eq!(info.metadata["limit"], (1u64 << 20).to_string());
    assert!(err.message().contains("grpc.max_message_bytes"), "{}", err.message());
}

#[tokio::test]
async fn every_error_carries_an_error_info() {
    let mut app = spawn_app_with(|_| {}).await;
    let mut errors = vec![
        app.jobs.get_job(pb::GetJobRequest { job_id: uuid::Uuid::new_v4().to_string() }).await.unwrap_err(),
        app.jobs.get_job(pb::GetJobRequest { job_id: "not-a-uuid".into() }).await.unwrap_err(),
        app.jobs.submit_job(submit_request("nope", png(8, 8))).await.unwrap_err(),
        app.workflows.get_workflow(pb::GetWorkflowRequest { name: "nope".into() }).await.unwrap_err(),
        app.machines.get_machine(pb::GetMachineRequest { machine_id: "nope".into() }).await.unwrap_err(),
    ];
    let mut req = submit_request("invert", png(8, 8));
    req.request_id = "same".into();
    app.jobs.submit_job(req.clone()).await.expect("first");
    req.priority = 5;
    errors.push(app.jobs.submit_job(req).await.unwrap_err());

    // A method the server does not have: answered by tonic itself, before any handler.
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static("/comfyrelay.v1.JobService/NoSuchMethod");
    let codec = tonic_prost::ProstCodec::<pb::GetJobRequest, pb::Job>::default();
    errors
        .push(grpc.unary(tonic::Request::new(pb::GetJobRequest::default()), path, codec).await.unwrap_err());

    for err in &errors {
        let info = error_info(err);
        assert_eq!(info.domain, "comfyrelay.dev", "{err:?}");
        assert!(!info.reason.is_empty(), "{err:?}");
    }
    assert_eq!(errors.last().map(|e| error_info(e).reason), Some("UNIMPLEMENTED".to_string()));
}

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

// ---------------------------------------------------------------------------------------------------
// Defect 8: content types and corrupt images, refused at submit.

#[tokio::test]
async fn content_types_must_be_mime_types() {
    let mut app = spawn_app_with(|_| {}).await;
    for bad in [
        "image/png\r\nX-Injected: 1",
        "image/png\0",
        "image/png\n",
        "not a mime type",
        "image/png; q=1",
        "image/",
    ] {
        let mut req = submit_request("invert", png(8, 8));
        req.image.as_mut().expect("image").content_type = bad.into();
        let err = app.jobs.submit_job(req).await.unwrap_err();
        assert_violations(&err, &["image.content_type"]);
        assert!(!err.message().contains('\r') && !err.message().contains('\0'), "{bad:?}: {}", err.message());

        let mut req = submit_request("invert", png(8, 8));
        req.image = None;
        req.parameters.insert("image".into(), image_value(png(8, 8), bad));
        assert_violations(&app.jobs.submit_job(req).await.unwrap_err(), &["parameters[image].content_type"]);
    }
    let mut req = submit_request("invert", png(8, 8));
    req.image.as_mut().expect("image").content_type = "IMAGE/PNG".into();
    app.jobs.submit_job(req).await.expect("MIME types are case-insensitive");
}

#[tokio::test]
async fn a_png_signature_followed_by_junk_is_refused_at_submit() {
    let mut app = spawn_app_with(|_| {}).await;
    let mut junk = b"\x89PNG\r\n\x1a\n".to_vec();
    junk.extend_from_slice(&[0x5a; 4096]);
    let err = app.jobs.submit_job(submit_request("invert", junk.clone())).await.unwrap_err();
    assert_violations(&err, &["image.data"]);
    assert!(err.message().contains("PNG"), "{}", err.message());

    let mut req = inline(
        r#"{"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}"#,
    );
    req.parameters.insert("1.image".into(), image_value(junk, "image/png"));
    assert_violations(&app.jobs.submit_job(req).await.unwrap_err(), &["parameters[1.image].data"]);
}
