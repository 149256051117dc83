//! What a job costs through comfyrelay, side by side with a direct ComfyUI client on the same emulated
//! ComfyUI, in one run. Prints figures; asserts only that jobs succeed (a benchmark of failures means
//! nothing).
//!
//! comfyrelay runs as its own process (the release binary, `comfyrelay serve`), so its CPU time and
//! resident memory are its own; the emulated ComfyUI and every client run in this process. Phases:
//! 1. sequential jobs (upload → LoadImage → ImageInvert → SaveImage → download): the direct client alone,
//!    then comfyrelay (`SubmitJob` → `StreamJob` to the terminal event, output inline), p50/p99 and CPU;
//! 2. the same with 8 concurrent clients (8 connections each), throughput and CPU;
//! 3. the lag of each frame of a 50-frame SaveImageWebsocket job at a subscriber, behind the emulator's
//!    send time (with standbys, also at a subscriber of a standby, which reads the shared log);
//! 4. jobs until 10,000 have run, then comfyrelay's resident memory;
//! 5. durable `SubmitJob`/s with distinct 256 KiB images from 8 clients (a second comfyrelay whose only
//!    ComfyUI is unreachable, so jobs stay queued and only submission is measured); with standbys, then
//!    the same through the first standby, which forwards each call to the leader (leader, standby,
//!    leader, standby); with `BENCH_TLS=1`, then all of it again on relays serving TLS;
//! 6. 10,000 concurrent `StreamJob` subscribers over 8 connections on 100 live jobs: all complete and
//!    gap-free, the memory each costs, how long after ComfyUI is released the last one ends and the events
//!    delivered per second meanwhile (with standbys, then the same on a standby);
//! 7. reads of 20 finished jobs with 256 KiB outputs (`GetJob`, the output inline, then
//!    `DownloadOutput`) from 8 clients: rate and CPU per read on the leader; with standbys, then on the
//!    first standby, which serves them from the shared database and artifacts (leader, standby, leader,
//!    standby).
//!
//! Run: `cargo bench --bench throughput`. `BENCH_JOBS=N` sets the sequential count (500), `BENCH_TOTAL=N`
//! the jobs before the memory reading (10000), `BENCH_SUBMITS=N` (2000), `BENCH_SUBSCRIBERS=N` (10000),
//! `BENCH_READS=N` (2000).
//! `BENCH_DATABASE=postgres` runs every comfyrelay on a throwaway PostgreSQL server on loopback (durable
//! settings: `fsync` and `synchronous_commit` on) instead of its SQLite file, and `BENCH_STANDBYS=N` starts
//! N standby replicas beside each one (they wait for the leader lease; the figures are the leader's, but
//! for phases 3 and 6, which also stream from the first standby, 5, which also submits through it, and 7,
//! which also reads from it).

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use comfyrelay::{
    comfy::{ClientOptions, ComfyClient, ComfyConnection, FileRef, PromptEvent},
    emulator::comfyui::ComfyEmulator,
    proto::pb,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

type JobClient = pb::job_service_client::JobServiceClient<Channel>;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn png(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        // splitmix64 of the pixel's position and the seed: noise that does not compress, so the PNG is
        // about w*h*3 bytes (a weaker hash left patterns that deflate shrank to a quarter).
        let mut z =
            (u64::from(seed) << 40 | u64::from(y) << 20 | u64::from(x)).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let v = (z ^ (z >> 31)).to_le_bytes();
        image::Rgb([v[0], v[1], v[2]])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

// ---------------------------------------------------------------------------------------------------
// The comfyrelay process
// ---------------------------------------------------------------------------------------------------

#[path = "../tests/support/postgres.rs"]
mod pg_server;
#[path = "support/serve.rs"]
mod serve;

/// Where each comfyrelay stores its jobs: its SQLite file, or a fresh database of one PostgreSQL server.
struct Storage {
    pg: Option<pg_server::PgServer>,
    standbys: usize,
    databases: AtomicUsize,
    artifacts: tempfile::TempDir,
}

impl Storage {
    async fn from_env() -> anyhow::Result<Self> {
        let pg = match std::env::var("BENCH_DATABASE").as_deref() {
            Ok("postgres") => Some(
                pg_server::PgServer::start_durable()
                    .await
                    .ok_or_else(|| anyhow::anyhow!("BENCH_DATABASE=postgres needs PostgreSQL's binaries"))?,
            ),
            Ok("sqlite") | Err(_) => None,
            Ok(other) => anyhow::bail!("BENCH_DATABASE={other}: expected sqlite or postgres"),
        };
        let standbys = if pg.is_some() { env_usize("BENCH_STANDBYS", 0) } else { 0 };
        Ok(Self { pg, standbys, databases: AtomicUsize::new(0), artifacts: tempfile::tempdir()? })
    }

    fn describe(&self) -> String {
        match &self.pg {
            None => "storage: SQLite in the data directory (storage.durability = crash)".into(),
            Some(_) => format!(
                "storage: PostgreSQL on loopback (fsync, synchronous_commit on), artifacts in a shared \
                 directory, {} standby replica(s) beside each comfyrelay",
                self.standbys
            ),
        }
    }

    /// The settings of the next comfyrelay (with PostgreSQL: a database of its own).
    async fn env(&self) -> Vec<(String, String)> {
        let Some(pg) = &self.pg else { return Vec::new() };
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let dir = self.artifacts.path().join(n.to_string());
        vec![
            ("COMFYRELAY_STORAGE__DATABASE_URL".into(), pg.database(&format!("bench{n}")).await),
            ("COMFYRELAY_STORAGE__ARTIFACTS_DIR".into(), dir.display().to_string()),
        ]
    }
}

/// With `BENCH_TLS=1`, phase 5 runs again on relays serving TLS: a CA and a certificate for `localhost`
/// and `127.0.0.1`, made here; the standbys check the leader's against the CA (`grpc.tls.leader_ca_file`).
struct BenchTls {
    _dir: tempfile::TempDir,
    ca: String,
    env: Vec<(String, String)>,
}

impl BenchTls {
    fn new() -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?
            .signed_by(&key, &issuer)?;
        let dir = tempfile::tempdir()?;
        let write = |name: &str, contents: &str| -> anyhow::Result<String> {
            let path = dir.path().join(name);
            std::fs::write(&path, contents)?;
            Ok(path.display().to_string())
        };
        let env = vec![
            ("COMFYRELAY_GRPC__TLS__CERT_FILE".into(), write("tls.crt", &leaf.pem())?),
            ("COMFYRELAY_GRPC__TLS__KEY_FILE".into(), write("tls.key", &key.serialize_pem())?),
            ("COMFYRELAY_GRPC__TLS__LEADER_CA_FILE".into(), write("ca.crt", &issuer.pem())?),
        ];
        Ok(Self { ca: issuer.pem(), env, _dir: dir })
    }

    fn client(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca))
            .domain_name("localhost")
    }
}

struct Relay {
    child: tokio::process::Child,
    pid: u32,
    channels: Vec<Channel>,
    /// Standby replicas on the same database, and their data directories.
    standbys: Vec<(tokio::process::Child, tempfile::TempDir)>,
    /// 8 connections to each standby.
    standby_channels: Vec<Vec<Channel>>,
    /// Where the leader and the standbys listen.
    addr: SocketAddr,
    standby_addrs: Vec<SocketAddr>,
}

/// Starts `comfyrelay serve` on an ephemeral port and reads the bound address from its JSON log.
async fn start_relay(
    data_dir: &Path,
    comfy_url: &str,
    extra: &[(&str, &str)],
    storage: &Storage,
) -> anyhow::Result<Relay> {
    start_relay_tls(data_dir, comfy_url, extra, storage, None).await
}

/// [`start_relay`], serving TLS with `tls`.
async fn start_relay_tls(
    data_dir: &Path,
    comfy_url: &str,
    extra: &[(&str, &str)],
    storage: &Storage,
    tls: Option<&BenchTls>,
) -> anyhow::Result<Relay> {
    let mut env = storage.env().await;
    env.extend(tls.iter().flat_map(|t| t.env.iter().cloned()));
    let mut child = relay_command(data_dir, comfy_url, extra, &env).spawn()?;
    let pid = child.id().unwrap_or_default();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = await_log(&mut lines, "serving gRPC").await?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let mut standbys = Vec::new();
    let mut standby_channels = Vec::new();
    let mut standby_addrs = Vec::new();
    for _ in 0..storage.standbys {
        let dir = tempfile::tempdir()?;
        let mut standby = relay_command(dir.path(), comfy_url, extra, &env).spawn()?;
        let mut lines = BufReader::new(standby.stdout.take().expect("stdout")).lines();
        let addr = await_log(&mut lines, "standby: serving health only until this replica leads").await?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        standbys.push((standby, dir));
        standby_channels.push(connect(addr, 8, tls).await?);
        standby_addrs.push(addr);
    }
    let channels = connect(addr, 8, tls).await?;
    Ok(Relay { child, pid, channels, standbys, standby_channels, addr, standby_addrs })
}

/// `n` connections to `addr` (over TLS with `tls`).
async fn connect(addr: SocketAddr, n: usize, tls: Option<&BenchTls>) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..n {
        let endpoint = match tls {
            None => Channel::from_shared(format!("http://{addr}"))?,
            Some(tls) => Channel::from_shared(format!("https://{addr}"))?.tls_config(tls.client())?,
        };
        channels.push(endpoint.connect().await?);
    }
    Ok(channels)
}

/// Reads a comfyrelay's JSON log until `message`; returns its `addr` field.
async fn await_log(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    message: &str,
) -> anyhow::Result<SocketAddr> {
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if v["fields"]["message"] == message {
                return Ok(v["fields"]["addr"].as_str().unwrap_or_default().parse()?);
            }
        }
        anyhow::bail!("comfyrelay exited before logging {message:?}")
    })
    .await?
}

/// `comfyrelay serve` with the bench's settings, `extra` and the storage's `env`.
fn relay_command(
    data_dir: &Path,
    comfy_url: &str,
    extra: &[(&str, &str)],
    env: &[(String, String)],
) -> tokio::process::Command {
    let env: Vec<(&str, &str)> =
        extra.iter().copied().chain(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).collect();
    serve::serve_command(data_dir, comfy_url, &env)
}

impl Relay {
    fn client(&self, i: usize) -> JobClient {
        job_client(&self.channels, i)
    }

    /// A client of the first standby, when there is one.
    fn standby_client(&self, i: usize) -> Option<JobClient> {
        self.standby_channels.first().map(|channels| job_client(channels, i))
    }

    /// Resident memory of the first standby (0 without one).
    fn standby_rss_kib(&self) -> u64 {
        self.standbys.first().and_then(|(c, _)| c.id()).map_or(0, rss_kib)
    }

    /// User + system CPU time of the process so far.
    fn cpu(&self) -> Duration {
        cpu_of(self.pid)
    }

    /// The same of the first standby (zero without one).
    fn standby_cpu(&self) -> Duration {
        self.standbys.first().and_then(|(c, _)| c.id()).map_or(Duration::ZERO, cpu_of)
    }

    /// Context switches (voluntary + involuntary) of all the process's threads so far: each is a thread
    /// that went to sleep or was preempted, so their count per job is the job's thread hops and wake-ups.
    fn context_switches(&self) -> u64 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else { return 0 };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
        for (mut standby, _dir) in self.standbys {
            let _ = standby.kill().await;
        }
    }
}

fn job_client(channels: &[Channel], i: usize) -> JobClient {
    JobClient::new(channels[i % channels.len()].clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// User + system CPU time of process `pid` so far.
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 1000 / clock_ticks())
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn invert_request(image: &Bytes) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::Workflow("invert".into())),
        image: Some(pb::InputImage {
            data: image.clone(),
            filename: "b.png".into(),
            content_type: "image/png".into(),
        }),
        ..Default::default()
    }
}

/// Submits and follows to the terminal event; returns the arrival time of each event.
async fn relay_job(
    client: &mut JobClient,
    req: pb::SubmitJobRequest,
) -> anyhow::Result<Vec<(Instant, pb::JobEvent)>> {
    let job = client.submit_job(req).await?.into_inner();
    follow(client, job.id).await
}

/// Follows job `id` to its terminal event; returns the arrival time of each event.
async fn follow(client: &mut JobClient, id: String) -> anyhow::Result<Vec<(Instant, pb::JobEvent)>> {
    let mut stream = client
        .stream_job(pb::StreamJobRequest { job_id: id, after_sequence: 0, skip_previews: false })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await? {
        events.push((Instant::now(), e));
    }
    match events.last().and_then(|(_, e)| e.kind.as_ref()) {
        Some(pb::job_event::Kind::Succeeded(s)) if !s.outputs.is_empty() => Ok(events),
        other => anyhow::bail!("job did not succeed: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------
// The direct ComfyUI client: the baseline
// ---------------------------------------------------------------------------------------------------

struct Direct {
    client: ComfyClient,
    conn: ComfyConnection,
}

impl Direct {
    async fn connect(url: &str, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let client = ComfyClient::new(url, ClientOptions::default())?;
        let conn = ComfyConnection::spawn(client.clone(), cancel.child_token());
        conn.wait_connected(Duration::from_secs(10)).await?;
        Ok(Self { client, conn })
    }

    /// Upload → LoadImage → ImageInvert → SaveImage → download, as a careful client does it.
    async fn job(&self, image: &Bytes) -> anyhow::Result<()> {
        let uploaded = self.client.upload_image(image.clone(), "b.png", "image/png").await?;
        let graph = serde_json::json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": uploaded.name}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "direct"}}
        });
        let (_, mut events) = self.conn.submit(&uuid::Uuid::new_v4().to_string(), graph).await?;
        let mut files = Vec::new();
        loop {
            match events.recv().await {
                Some(PromptEvent::Executed { output, .. }) => files.extend(FileRef::from_output(&output)),
                Some(PromptEvent::Succeeded) => break,
                Some(e) if e.is_terminal() => anyhow::bail!("direct job ended {e:?}"),
                Some(_) => {}
                None => anyhow::bail!("direct job stream ended"),
            }
        }
        anyhow::ensure!(!files.is_empty(), "no output");
        for f in &files {
            let mut sink = Vec::new();
            self.client.download(f, &mut sink).await?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------------

fn report_lags(label: &str, lags: &mut [Duration]) {
    let n = lags.len();
    let (p50, p99, max) = (pct(lags, 0.5), pct(lags, 0.99), pct(lags, 1.0));
    println!(
        "{label:<48} n={n} p50={:.2} ms  p99={:.2} ms  max={:.2} ms",
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
}

fn pct(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * q).round() as usize]
}

fn report_latency(
    label: &str,
    mut samples: Vec<Duration>,
    wall: Duration,
    cpu: Option<Duration>,
) -> Duration {
    let n = samples.len();
    let p50 = pct(&mut samples, 0.5);
    let p99 = pct(&mut samples, 0.99);
    let cpu =
        cpu.map(|c| format!("  CPU {:.2} ms/job", c.as_secs_f64() * 1000.0 / n as f64)).unwrap_or_default();
    println!(
        "{label:<48} n={n:<5} p50={:>7.2} ms  p99={:>7.2} ms  {:>6.0} jobs/s{cpu}",
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        n as f64 / wall.as_secs_f64()
    );
    p50
}

/// fsync/fdatasync calls of the relay process per job over `n` sequential jobs, counted by `strace -c`
/// attached to it (`None` when strace is not installed). Timing under strace means nothing: only counts.
async fn count_fsyncs(
    relay: &Relay,
    client: &mut JobClient,
    image: &Bytes,
    n: usize,
) -> anyhow::Result<Option<f64>> {
    let out = tempfile::NamedTempFile::new()?;
    let strace = tokio::process::Command::new("strace")
        .args(["-f", "-qq", "-c", "-e", "trace=fsync,fdatasync,sync_file_range,msync", "-o"])
        .arg(out.path())
        .args(["-p", &relay.pid.to_string()])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut strace) = strace else { return Ok(None) };
    // Attached once every thread of the process names a tracer.
    let traced = || {
        std::fs::read_dir(format!("/proc/{}/task", relay.pid)).is_ok_and(|tasks| {
            tasks.flatten().all(|t| {
                std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                    s.lines().any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
                })
            })
        })
    };
    let attached = Instant::now();
    while !traced() {
        if attached.elapsed() > Duration::from_secs(10) || strace.try_wait()?.is_some() {
            return Ok(None); // not permitted here (ptrace_scope) or strace failed
        }
        tokio::task::yield_now().await;
    }
    for _ in 0..n {
        relay_job(client, invert_request(image)).await?;
    }
    if let Some(pid) = strace.id() {
        // SIGINT: strace detaches and writes its summary.
        let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
    }
    let _ = strace.wait().await;
    let summary = std::fs::read_to_string(out.path())?;
    // Rows: % time, seconds, usecs/call, calls, [errors], syscall.
    let calls: u64 = summary
        .lines()
        .filter(|l| l.split_whitespace().last().is_some_and(|s| s.contains("sync")))
        .filter_map(|l| l.split_whitespace().nth(3).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Ok(Some(calls as f64 / n as f64))
}

/// `count` calls of `work` spread over `clients`, one task each taking the next index until `count`: the
/// wall time and the sum of what the calls returned.
async fn spread<F, Fut>(clients: Vec<JobClient>, count: usize, work: F) -> anyhow::Result<(Duration, u64)>
where
    F: Fn(JobClient, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<u64>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        let (next, work) = (next.clone(), work.clone());
        tasks.push(tokio::spawn(async move {
            let mut sum = 0u64;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= count {
                    return anyhow::Ok(sum);
                }
                sum += work(c.clone(), k).await?;
            }
        }));
    }
    let mut sum = 0;
    for t in tasks {
        sum += t.await??;
    }
    Ok((start.elapsed(), sum))
}

/// `submits` distinct `SubmitJob` calls spread over `clients` (one task each), request ids `{prefix}-{k}`;
/// the wall time they took.
async fn submit_all(
    clients: Vec<JobClient>,
    images: &Arc<Vec<Bytes>>,
    submits: usize,
    prefix: &str,
) -> anyhow::Result<Duration> {
    let (images, prefix) = (images.clone(), Arc::new(prefix.to_string()));
    let (wall, _) = spread(clients, submits, move |mut c, k| {
        let (images, prefix) = (images.clone(), prefix.clone());
        async move {
            let mut req = invert_request(&images[k % images.len()]);
            req.request_id = format!("{prefix}-{k}");
            c.submit_job(req).await?;
            Ok(0)
        }
    })
    .await?;
    Ok(wall)
}

/// `reads` reads of the jobs `ids` spread over `clients` (one task each): `GetJob` (the output inline when
/// small enough), then `DownloadOutput` of its output, checked for its size. The wall time and the bytes
/// received.
async fn read_all(clients: Vec<JobClient>, ids: &[String], reads: usize) -> anyhow::Result<(Duration, u64)> {
    let ids = Arc::new(ids.to_vec());
    spread(clients, reads, move |mut c, k| {
        let job_id = ids[k % ids.len()].clone();
        async move {
            let job = c.get_job(pb::GetJobRequest { job_id: job_id.clone() }).await?.into_inner();
            let output = anyhow::Context::context(job.outputs.first(), "a finished job with an output")?;
            let request = pb::DownloadOutputRequest {
                job_id,
                filename: output.filename.clone(),
                chunk_size: 0,
                offset: 0,
            };
            let mut chunks = c.download_output(request).await?.into_inner();
            let mut size = 0u64;
            while let Some(chunk) = chunks.message().await? {
                size += chunk.data.len() as u64;
            }
            anyhow::ensure!(size == output.size_bytes, "downloaded {size} of {} bytes", output.size_bytes);
            Ok(output.inline_data.len() as u64 + size)
        }
    })
    .await
}

fn report_throughput(label: &str, jobs: usize, wall: Duration, cpu: Option<Duration>) -> f64 {
    let rate = jobs as f64 / wall.as_secs_f64();
    let cpu = cpu
        .map(|c| format!("  CPU {:.2} ms/job", c.as_secs_f64() * 1000.0 / jobs as f64))
        .unwrap_or_default();
    println!("{label:<48} {jobs} jobs in {:.2} s: {rate:>7.0} jobs/s{cpu}", wall.as_secs_f64());
    rate
}

// ---------------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs = env_usize("BENCH_JOBS", 500);
    let total = env_usize("BENCH_TOTAL", 10_000);
    let submits = env_usize("BENCH_SUBMITS", 2_000);
    let subscribers = env_usize("BENCH_SUBSCRIBERS", 10_000);
    let image = Bytes::from(png(8, 8, 1));
    let cancel = CancellationToken::new();
    let emulator =
        ComfyEmulator::start(tokio::net::TcpListener::bind("127.0.0.1:0").await?, Default::default()).await?;
    let data = tempfile::tempdir()?;
    let storage = Storage::from_env().await?;
    println!("{}", storage.describe());
    let relay = start_relay(data.path(), &emulator.url(), &[], &storage).await?;
    let rss_start = relay.rss_kib();
    let mut done = 0usize;
    println!("comfyrelay pid {} (release binary), emulated ComfyUI in the bench process", relay.pid);

    // 1. Sequential.
    let direct = Direct::connect(&emulator.url(), &cancel).await?;
    for _ in 0..20 {
        direct.job(&image).await?; // warm-up
    }
    let mut samples = Vec::with_capacity(jobs);
    let start = Instant::now();
    for _ in 0..jobs {
        let t = Instant::now();
        direct.job(&image).await?;
        samples.push(t.elapsed());
    }
    let direct_p50 = report_latency("direct ComfyUI client, sequential", samples, start.elapsed(), None);

    let mut client = relay.client(0);
    for _ in 0..20 {
        relay_job(&mut client, invert_request(&image)).await?;
    }
    done += 20;
    let mut samples = Vec::with_capacity(jobs);
    let (cpu0, switches0) = (relay.cpu(), relay.context_switches());
    let start = Instant::now();
    for _ in 0..jobs {
        let t = Instant::now();
        relay_job(&mut client, invert_request(&image)).await?;
        samples.push(t.elapsed());
    }
    done += jobs;
    let switches = relay.context_switches() - switches0;
    let relay_p50 =
        report_latency("comfyrelay, sequential", samples, start.elapsed(), Some(relay.cpu() - cpu0));
    println!(
        "{:<48} {:.1} per job (voluntary + involuntary, all threads)",
        "  context switches of the comfyrelay process",
        switches as f64 / jobs as f64
    );
    if let Some(fsyncs) = count_fsyncs(&relay, &mut client, &image, 100).await? {
        println!(
            "{:<48} {:.2} per job (strace, 100 jobs; storage.durability = crash)",
            "  fsync calls", fsyncs
        );
        done += 100;
    }
    println!(
        "{:<48} {:+.2} ms per job at p50 ({:.2}x)",
        "  overhead beyond the direct client",
        (relay_p50.as_secs_f64() - direct_p50.as_secs_f64()) * 1000.0,
        relay_p50.as_secs_f64() / direct_p50.as_secs_f64()
    );

    // 2. Eight concurrent clients.
    let per = (jobs / 8).max(1);
    let mut directs = Vec::new();
    for _ in 0..8 {
        directs.push(Arc::new(Direct::connect(&emulator.url(), &cancel).await?));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for d in &directs {
        let (d, image) = (d.clone(), image.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                d.job(&image).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let direct_rate = report_throughput("direct ComfyUI client, 8 clients", per * 8, start.elapsed(), None);
    let cpu0 = relay.cpu();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (mut c, image) = (relay.client(i), image.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                relay_job(&mut c, invert_request(&image)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    done += per * 8;
    let relay_rate =
        report_throughput("comfyrelay, 8 clients", per * 8, start.elapsed(), Some(relay.cpu() - cpu0));
    println!("{:<48} {:.2}x the direct client's throughput", "", relay_rate / direct_rate);

    // 3. Frame lag of a 50-frame SaveImageWebsocket job, at a subscriber of the leader and (with standbys)
    // at one of a standby, following the same job at the same time.
    let mut lags = Vec::new();
    let mut standby_lags = Vec::new();
    for _ in 0..5 {
        let req = pb::SubmitJobRequest {
            source: Some(pb::submit_job_request::Source::Workflow("progress-websocket".into())),
            parameters: [("width", 64), ("height", 64), ("batch_size", 50)]
                .into_iter()
                .map(|(k, v)| {
                    (k.to_string(), pb::ParameterValue { kind: Some(pb::parameter_value::Kind::IntValue(v)) })
                })
                .collect(),
            ..Default::default()
        };
        emulator.faults().record_frame_times(true);
        let job = client.submit_job(req).await?.into_inner();
        let on_standby = relay.standby_client(0).map(|mut c| {
            let id = job.id.clone();
            tokio::spawn(async move { follow(&mut c, id).await })
        });
        let events = follow(&mut client, job.id).await?;
        let standby_events = match on_standby {
            Some(task) => Some(task.await??),
            None => None,
        };
        let sent = emulator.faults().take_frame_times();
        emulator.faults().record_frame_times(false);
        let received: Vec<Instant> = events
            .iter()
            .filter(|(_, e)| matches!(e.kind, Some(pb::job_event::Kind::OutputReady(_))))
            .map(|(t, _)| *t)
            .collect();
        anyhow::ensure!(
            received.len() == 50 && sent.len() == 50,
            "{} frames sent, {} outputs",
            sent.len(),
            received.len()
        );
        lags.extend(sent.iter().zip(&received).map(|(s, r)| r.saturating_duration_since(*s)));
        if let Some(standby_events) = standby_events {
            anyhow::ensure!(
                standby_events.iter().map(|(_, e)| e).eq(events.iter().map(|(_, e)| e)),
                "the standby streamed other events than the leader"
            );
            let received = standby_events
                .iter()
                .filter(|(_, e)| matches!(e.kind, Some(pb::job_event::Kind::OutputReady(_))))
                .map(|(t, _)| *t);
            standby_lags.extend(sent.iter().zip(received).map(|(s, r)| r.saturating_duration_since(*s)));
        }
        done += 1;
    }
    report_lags("frame lag at a subscriber (50-frame websocket job)", &mut lags);
    if !standby_lags.is_empty() {
        report_lags("  the same frames at a standby's subscriber", &mut standby_lags);
    }

    // 4. Memory after `total` jobs.
    let remaining = total.saturating_sub(done);
    let per = remaining.div_ceil(8);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (mut c, image) = (relay.client(i), image.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                relay_job(&mut c, invert_request(&image)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    done += per * 8;
    println!(
        "{:<48} {} KiB at start, {} KiB after {done} jobs ({:.0} jobs/s for the last {})",
        "comfyrelay resident memory",
        rss_start,
        relay.rss_kib(),
        (per * 8) as f64 / start.elapsed().as_secs_f64(),
        per * 8
    );
    relay.stop().await;

    // 5. Durable submits with 256 KiB images, jobs left queued (the only ComfyUI is unreachable).
    let unreachable = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let dead_url = format!("http://{}", unreachable.local_addr()?);
    drop(unreachable);
    let images: Arc<Vec<Bytes>> =
        Arc::new((0..submits.min(1000) as u32).map(|i| Bytes::from(png(296, 296, i + 7))).collect());
    let size = images[0].len();
    let bench_tls = std::env::var_os("BENCH_TLS").map(|_| BenchTls::new()).transpose()?;
    for tls in std::iter::once(None).chain(bench_tls.as_ref().map(Some)) {
        let data2 = tempfile::tempdir()?;
        let queued = [("COMFYRELAY_JOBS__QUEUE_TIMEOUT", "1h")];
        let relay2 = start_relay_tls(data2.path(), &dead_url, &queued, &storage, tls).await?;
        let transport = if tls.is_some() { " over TLS" } else { "" };
        // Warm-up: the first submit waits for the unreachable backend's /object_info once.
        relay2.client(0).submit_job(invert_request(&images[0])).await?;
        let mut sides = vec![(String::new(), (0..8).map(|i| relay2.client(i)).collect::<Vec<_>>())];
        if let Some(clients) = (0..8).map(|i| relay2.standby_client(i)).collect::<Option<Vec<_>>>() {
            // Twice each, alternating, so a drift of the machine's speed during the phase shows.
            sides.push((" through a standby".to_string(), clients));
            sides.extend_from_within(..);
        }
        for (round, (side, clients)) in sides.into_iter().enumerate() {
            let (cpu0, standby_cpu0) = (relay2.cpu(), relay2.standby_cpu());
            let wall = submit_all(clients, &images, submits, &format!("bench-{round}")).await?;
            let per_submit = |d: Duration| d.as_secs_f64() * 1000.0 / submits as f64;
            println!(
                "{:<48} {submits} in {:.2} s: {:.0} submits/s ({:.0} MiB/s), CPU per submit: leader {:.2} ms, standby {:.2} ms",
                format!("durable SubmitJob{side}{transport}, {} KiB images, 8 clients", size / 1024),
                wall.as_secs_f64(),
                submits as f64 / wall.as_secs_f64(),
                (submits * size) as f64 / wall.as_secs_f64() / (1 << 20) as f64,
                per_submit(relay2.cpu() - cpu0),
                per_submit(relay2.standby_cpu() - standby_cpu0),
            );
        }
        relay2.stop().await;
    }

    // 6. Many subscribers on live jobs.
    let emulator3 =
        ComfyEmulator::start(tokio::net::TcpListener::bind("127.0.0.1:0").await?, Default::default()).await?;
    let data3 = tempfile::tempdir()?;
    let relay3 = start_relay(data3.path(), &emulator3.url(), &[], &storage).await?;
    let live_jobs = 100usize;
    let mut sides = vec![("leader", false)];
    if relay3.standby_client(0).is_some() {
        sides.push(("first standby", true));
    }
    for (round, (side, on_standby)) in sides.into_iter().enumerate() {
        // ComfyUI holds its queue while everyone subscribes, so every job is live until it is released.
        // Each round has an image of its own: ComfyUI runs an image it has seen from its cache, at once.
        emulator3.hold_queue(true);
        let image = Bytes::from(png(8, 8, 100 + round as u32));
        let mut ids = Vec::new();
        for _ in 0..live_jobs {
            ids.push(relay3.client(0).submit_job(invert_request(&image)).await?.into_inner().id);
        }
        let rss = || if on_standby { relay3.standby_rss_kib() } else { relay3.rss_kib() };
        // Enough connections for every subscriber to have a stream (the server allows 1,024 per connection).
        let conns = subscribers.div_ceil(1000).max(8);
        let channels =
            connect(if on_standby { relay3.standby_addrs[0] } else { relay3.addr }, conns, None).await?;
        let rss_before = rss();
        let opened = Arc::new(AtomicUsize::new(0));
        let delivered = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(subscribers);
        for s in 0..subscribers {
            let mut c = job_client(&channels, s);
            let id = ids[s % live_jobs].clone();
            let (opened, delivered) = (opened.clone(), delivered.clone());
            tasks.push(tokio::spawn(async move {
                let mut stream = c
                    .stream_job(pb::StreamJobRequest { job_id: id, after_sequence: 0, skip_previews: false })
                    .await?
                    .into_inner();
                let mut last = 0u64;
                let mut first = true;
                while let Some(e) = stream.message().await? {
                    anyhow::ensure!(e.sequence == last + 1, "gap or duplicate: {} after {last}", e.sequence);
                    last = e.sequence;
                    delivered.fetch_add(1, Ordering::Relaxed);
                    if first {
                        opened.fetch_add(1, Ordering::Relaxed);
                        first = false;
                    }
                    if matches!(e.kind, Some(pb::job_event::Kind::Succeeded(_))) {
                        return Ok(true);
                    }
                }
                Ok(false)
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while opened.load(Ordering::Relaxed) < subscribers && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await; // a bench polling its own counter
        }
        let open_now = opened.load(Ordering::Relaxed);
        let rss_open = rss();
        println!(
            "{:<48} {open_now} of {subscribers} open after {:.2} s on {live_jobs} live jobs: +{} KiB ({:.1} KiB each)",
            format!("StreamJob subscribers on the {side}, {conns} conns"),
            start.elapsed().as_secs_f64(),
            rss_open.saturating_sub(rss_before),
            rss_open.saturating_sub(rss_before) as f64 / open_now.max(1) as f64
        );
        let delivered_before = delivered.load(Ordering::Relaxed);
        emulator3.hold_queue(false);
        let released = Instant::now();
        let mut complete = 0usize;
        let mut failed = 0usize;
        for t in tasks {
            match t.await? {
                Ok(true) => complete += 1,
                Ok(false) | Err(_) => failed += 1,
            }
        }
        let live = released.elapsed();
        let events = delivered.load(Ordering::Relaxed) - delivered_before;
        println!(
            "{:<48} {complete} complete and gap-free, {failed} not; the last {:.2} s after ComfyUI was released",
            "",
            live.as_secs_f64()
        );
        println!(
            "{:<48} {events} events delivered live: {:.0} events/s",
            "",
            events as f64 / live.as_secs_f64()
        );
    }

    // 7. Reads of finished jobs, on the leader and (served from the shared database) on a standby.
    let reads = env_usize("BENCH_READS", 2000);
    let mut finished = Vec::new();
    for image in images.iter().take(20) {
        let events = relay_job(&mut relay3.client(0), invert_request(image)).await?;
        finished.push(events[0].1.job_id.clone());
    }
    let mut sides = vec![("leader", (0..8).map(|i| relay3.client(i)).collect::<Vec<_>>())];
    if let Some(clients) = (0..8).map(|i| relay3.standby_client(i)).collect::<Option<Vec<_>>>() {
        sides.push(("standby", clients));
        sides.extend_from_within(..);
    }
    for (side, clients) in sides {
        let (cpu0, standby_cpu0) = (relay3.cpu(), relay3.standby_cpu());
        let (wall, bytes) = read_all(clients, &finished, reads).await?;
        let per_read = |d: Duration| d.as_secs_f64() * 1000.0 / reads as f64;
        println!(
            "{:<48} {reads} in {:.2} s: {:.0} reads/s ({:.0} MiB/s), CPU per read: leader {:.2} ms, standby {:.2} ms",
            format!("GetJob + DownloadOutput on the {side}, 8 clients"),
            wall.as_secs_f64(),
            reads as f64 / wall.as_secs_f64(),
            bytes as f64 / wall.as_secs_f64() / (1 << 20) as f64,
            per_read(relay3.cpu() - cpu0),
            per_read(relay3.standby_cpu() - standby_cpu0),
        );
    }
    relay3.stop().await;
    cancel.cancel();
    emulator.shutdown().await;
    emulator3.shutdown().await;
    Ok(())
}
