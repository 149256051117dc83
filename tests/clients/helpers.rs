//! A `comfyrelay dev` process in an empty temporary directory, the CLI pointed at it, test images, and a
//! TCP proxy whose connections a test can cut.

use std::io::{BufRead as _, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use comfyrelay::proto::pb;

/// The binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_comfyrelay");

/// How long a `dev` may take to say it listens (a cold debug binary on a loaded machine).
const START_DEADLINE: Duration = Duration::from_secs(90);

/// A command for the binary with a clean environment: no `COMFYRELAY_*` from the machine.
pub(crate) fn comfyrelay() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

/// A running `comfyrelay dev`, killed on drop.
pub(crate) struct Dev {
    child: Child,
    /// The gRPC address, `http://127.0.0.1:PORT`.
    pub(crate) server: String,
    /// The gRPC socket address.
    pub(crate) addr: SocketAddr,
    /// The emulated ComfyUI's URL.
    pub(crate) comfy_url: String,
    /// The directory it was started in (empty before), where `./data` goes.
    pub(crate) dir: tempfile::TempDir,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Dev {
    /// `comfyrelay dev ARGS` in a new empty directory, its gRPC on a free port.
    pub(crate) fn start(args: &[&str]) -> Dev {
        Self::start_with(args, &[])
    }

    /// Like [`Dev::start`], with extra environment variables.
    pub(crate) fn start_with(args: &[&str], env: &[(&str, &str)]) -> Dev {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0);
        let mut cmd = comfyrelay();
        cmd.arg("dev")
            .args(args)
            .current_dir(dir.path())
            .env("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0")
            .env("COMFYRELAY_GRPC__SHUTDOWN_GRACE", "2s")
            .env("COMFYRELAY_LOG__FILTER", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn comfyrelay dev");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        // Drain both pipes for the process's life (a full pipe would block it), keeping every line.
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let (lines, tx) = (lines.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line.clone());
                    lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
                }
            });
        }
        drop(tx);
        let deadline = std::time::Instant::now() + START_DEADLINE;
        let (mut server, mut comfy_url) = (None, None);
        while server.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("comfyrelay dev: emulated ComfyUI on ") {
                        comfy_url = Some(url.trim().to_string());
                    }
                    if let Some(url) = line.strip_prefix("comfyrelay dev: gRPC on ") {
                        server = Some(url.trim().to_string());
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let seen = lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).join("\n");
                    panic!("comfyrelay dev did not start ({e:?}); it printed:\n{seen}");
                }
            }
        }
        let server = server.expect("set above");
        let addr = server
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .parse()
            .expect("socket address");
        Dev { child, server, addr, comfy_url: comfy_url.expect("printed before gRPC"), dir, lines }
    }

    /// Everything the process printed so far.
    pub(crate) fn printed(&self) -> String {
        self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).join("\n")
    }

    /// The CLI pointed at this server (`COMFYRELAY_SERVER`), run in its directory.
    pub(crate) fn cli(&self) -> Command {
        let mut cmd = comfyrelay();
        cmd.env("COMFYRELAY_SERVER", &self.server).current_dir(self.dir.path());
        cmd
    }

    /// Writes a test image into the directory and returns its path.
    pub(crate) fn image(&self, name: &str, salt: u8) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, png(24, 16, salt)).expect("write image");
        path
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished command returned.
#[derive(Debug)]
pub(crate) struct Out {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Out {
    /// Each stdout line parsed as JSON.
    pub(crate) fn json(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{self:?}")))
            .collect()
    }

    /// The `{"type": "event"}` lines.
    pub(crate) fn events(&self) -> Vec<serde_json::Value> {
        self.json().into_iter().filter(|v| v["type"] == "event").collect()
    }
}

/// Runs `cmd` to its end (bounded: a hung client fails the test instead of hanging it).
pub(crate) fn run(cmd: &mut Command) -> Out {
    run_for(cmd, Duration::from_secs(120))
}

/// Runs `cmd` to its end, killing it after `limit`.
pub(crate) fn run_for(cmd: &mut Command, limit: Duration) -> Out {
    let child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => {
            let out = out.expect("wait");
            Out {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("command did not finish within {limit:?}: {cmd:?}");
        }
    }
}

/// A PNG of `w`×`h` with a gradient offset by `salt`: every pixel differs from its inverse, and each salt
/// gives other bytes (so ComfyUI's cache does not skip the nodes).
pub(crate) fn png(w: u32, h: u32, salt: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 70u8.wrapping_add(salt)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

/// Asserts `events` are numbered 1, 2, 3, ... with no gap and no duplicate.
pub(crate) fn assert_gap_free(events: &[serde_json::Value]) {
    let seqs: Vec<u64> = events.iter().map(|e| e["sequence"].as_u64().expect("sequence")).collect();
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "sequences must be 1..=n without gap or duplicate");
}

/// A TCP proxy on 127.0.0.1 whose open connections [`Proxy::cut`] drops (new ones are still accepted).
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// Connections accepted so far.
    pub(crate) accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Forwards every connection to `upstream`.
    pub(crate) fn start(upstream: SocketAddr) -> Proxy {
        Self::cutting_first_after(upstream, u64::MAX)
    }

    /// Forwards every connection to `upstream`, cutting the first one (both ways, without a goodbye) once
    /// it has carried `bytes` from the server; later connections are carried whole.
    pub(crate) fn cutting_first_after(upstream: SocketAddr, bytes: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let open = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, a, s) = (open.clone(), accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut open = o.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    open.extend([client.try_clone(), server.try_clone()].into_iter().flatten());
                }
                let limit = if a.load(Ordering::SeqCst) == 1 { bytes } else { u64::MAX };
                pump(client.try_clone(), server.try_clone(), u64::MAX);
                pump(server.try_clone(), client.try_clone(), limit);
            }
        });
        Proxy { addr, open, accepted, stop }
    }

    /// Drops every open connection, both ways, without a goodbye.
    pub(crate) fn cut(&self) {
        for s in self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` (at most `limit` bytes), then shuts both down.
fn pump(from: std::io::Result<TcpStream>, to: std::io::Result<TcpStream>, limit: u64) {
    let (Ok(from), Ok(mut to)) = (from, to) else { return };
    std::thread::spawn(move || {
        let mut from = std::io::Read::take(from, limit);
        let _ = std::io::copy(&mut from, &mut to);
        let from = from.into_inner();
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// The repository root.
pub(crate) fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A comfyrelay server that breaks the contract, for the clients' defences: it says every job succeeded
/// with one output, `out.png`, of `announced` bytes (not inline), and streams `sent` bytes when it is
/// downloaded. Every other call is `UNIMPLEMENTED`. It serves on 127.0.0.1 from a runtime of its own until
/// dropped.
pub(crate) struct LyingServer {
    pub(crate) url: String,
    _runtime: tokio::runtime::Runtime,
}

impl LyingServer {
    pub(crate) fn start(announced: u64, sent: u64) -> LyingServer {
        use comfyrelay::proto::pb::job_service_server::JobServiceServer;
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(JobServiceServer::new(Lies { announced, sent }))
                .serve_with_incoming(incoming),
        );
        LyingServer { url, _runtime: runtime }
    }
}

struct Lies {
    announced: u64,
    sent: u64,
}

type Answer<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl comfyrelay::proto::pb::job_service_server::JobService for Lies {
    type StreamJobStream = tokio_stream::Empty<Result<pb::JobEvent, tonic::Status>>;
    type DownloadOutputStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::DownloadOutputResponse, tonic::Status>>>;

    async fn submit_job(&self, _: tonic::Request<pb::SubmitJobRequest>) -> Answer<pb::Job> {
        Err(tonic::Status::unimplemented("a lying server"))
    }

    async fn stream_job(&self, _: tonic::Request<pb::StreamJobRequest>) -> Answer<Self::StreamJobStream> {
        Err(tonic::Status::unimplemented("a lying server"))
    }

    async fn get_job(&self, req: tonic::Request<pb::GetJobRequest>) -> Answer<pb::Job> {
        let output = pb::Output {
            filename: "out.png".into(),
            mime_type: "image/png".into(),
            size_bytes: self.announced,
            sha256: "0".repeat(64),
            ..Default::default()
        };
        Ok(tonic::Response::new(pb::Job {
            id: req.into_inner().job_id,
            state: pb::JobState::Succeeded as i32,
            outputs: vec![output],
            ..Default::default()
        }))
    }

    async fn list_jobs(&self, _: tonic::Request<pb::ListJobsRequest>) -> Answer<pb::ListJobsResponse> {
        Err(tonic::Status::unimplemented("a lying server"))
    }

    async fn cancel_job(&self, _: tonic::Request<pb::CancelJobRequest>) -> Answer<pb::Job> {
        Err(tonic::Status::unimplemented("a lying server"))
    }

    async fn download_output(
        &self,
        req: tonic::Request<pb::DownloadOutputRequest>,
    ) -> Answer<Self::DownloadOutputStream> {
        const CHUNK: u64 = 1024;
        let mut offset = req.into_inner().offset;
        let mut chunks = Vec::new();
        while offset < self.sent {
            let n = CHUNK.min(self.sent - offset);
            chunks.push(Ok(pb::DownloadOutputResponse {
                offset,
                data: vec![7u8; n as usize].into(),
                output: None,
            }));
            offset += n;
        }
        Ok(tonic::Response::new(tokio_stream::iter(chunks)))
    }
}
