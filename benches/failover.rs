//! Failover: how long clients go without service when the comfyrelay running their jobs is killed, and
//! what they lose. Run: `cargo bench --bench failover` (needs PostgreSQL's binaries for the second
//! set-up). Settings: `BENCH_ROUNDS` (6), `BENCH_CLIENTS` (4), `BENCH_STANDBYS` (2), `BENCH_BEFORE_KILL_MS`
//! (3000, plus 97 ms more each round, so the kills land at different points of any polling),
//! `BENCH_AFTER_KILL_MS` (2000), `BENCH_NODE_DELAY_MS` (2 per node of the emulated ComfyUI).
//!
//! Two set-ups in one run, on one emulated ComfyUI, each SIGKILLed once a round under the same load:
//! 1. **one replica on SQLite, restarted at once** on the same data directory and port (the baseline: the
//!    best a supervisor that restarts a single replica can do; a real one waits seconds more);
//! 2. **a leader and `BENCH_STANDBYS` standbys on PostgreSQL** (durable settings): a standby takes over,
//!    nothing is restarted. The clients are spread over the standbys' addresses, which forward to the
//!    leader before the kill; after it one of them leads and the others forward to it (as a load balancer
//!    over the replicas would route).
//!
//! The load: `BENCH_CLIENTS` clients, each running `invert` jobs one after another (a new image each, so
//! ComfyUI caches nothing), submitting with a request id (retried every 20 ms while refused or
//! unreachable, so a retry never makes a second job) and following each to its terminal event (resumed
//! after the last sequence received).
//!
//! Printed per set-up, median and worst over the rounds, from the instant the killed process was reaped:
//! the time until the next leader serves, until the first job submitted after it is accepted, until the
//! last job in flight ends, and the longest a client went without a job ending; and every job's outcome
//! (all must succeed, each once: the prompts ComfyUI received beside the jobs), and the streams with a gap
//! or a duplicate.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use comfyrelay::{emulator::comfyui::ComfyEmulator, proto::pb};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

#[path = "../tests/support/postgres.rs"]
mod pg_server;
#[path = "support/serve.rs"]
mod serve;

type JobClient = pb::job_service_client::JobServiceClient<Channel>;

/// How often a refused or unreachable call is tried again (the resolution of the gaps measured).
const RETRY_EVERY: Duration = Duration::from_millis(20);
/// How long a call may stay refused before the bench gives up.
const GIVE_UP: Duration = Duration::from_secs(60);

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One `comfyrelay serve` process.
struct Replica {
    child: tokio::process::Child,
    /// When it logged `serving gRPC` after its start (a standby does when it starts leading).
    serving: Arc<Mutex<Vec<Instant>>>,
}

impl Replica {
    /// Starts one with `env` and waits for its log line `ready` (`serving gRPC`, or a standby's).
    async fn start(
        data_dir: &Path,
        comfy_url: &str,
        env: &[(String, String)],
        ready: &str,
    ) -> anyhow::Result<Self> {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut child = serve::serve_command(data_dir, comfy_url, &env).spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if v["fields"]["message"] == ready {
                    return Ok(());
                }
            }
            anyhow::bail!("comfyrelay exited before logging {ready:?}")
        })
        .await??;
        let serving = Arc::new(Mutex::new(Vec::new()));
        let log = serving.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if serde_json::from_str::<serde_json::Value>(&line)
                    .is_ok_and(|v| v["fields"]["message"] == "serving gRPC")
                {
                    log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Instant::now());
                }
            }
        });
        Ok(Self { child, serving })
    }

    /// SIGKILL, and waits for the process to be gone.
    async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// A free port on loopback, for a replica that must come back on the same address.
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// What one job went through, seen by its client.
#[derive(Debug)]
struct JobRun {
    /// When its submit was first sent, and when a submit of it was accepted.
    submitted: Instant,
    accepted: Instant,
    /// When its terminal event arrived, and which it was.
    ended: Instant,
    outcome: &'static str,
    /// The stream's sequences were 1..=n, each once.
    gap_free: bool,
}

/// Whether a failed call is the kind a client retries (the server refused it for now, or could not be
/// reached).
fn retried(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// One job, as a careful client runs it across a failover: the submit retried under its request id, the
/// stream resumed after the last sequence it received.
async fn run_job(client: &mut JobClient, image: Bytes) -> anyhow::Result<JobRun> {
    let request = pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::Workflow("invert".into())),
        image: Some(pb::InputImage {
            data: image,
            filename: "b.png".into(),
            content_type: "image/png".into(),
        }),
        request_id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let submitted = Instant::now();
    let job = loop {
        match client.submit_job(request.clone()).await {
            Ok(job) => break job.into_inner(),
            Err(status) if retried(&status) && submitted.elapsed() < GIVE_UP => {
                tokio::time::sleep(RETRY_EVERY).await
            }
            Err(status) => anyhow::bail!("submit: {status:?}"),
        }
    };
    let accepted = Instant::now();
    let mut sequences = Vec::new();
    let mut broken_since: Option<Instant> = None;
    let outcome = 'follow: loop {
        let after_sequence = sequences.last().copied().unwrap_or(0);
        let request = pb::StreamJobRequest { job_id: job.id.clone(), after_sequence, skip_previews: true };
        let status = match client.stream_job(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            broken_since = None;
                            sequences.push(event.sequence);
                            match event.kind {
                                Some(pb::job_event::Kind::Succeeded(_)) => break 'follow "succeeded",
                                Some(pb::job_event::Kind::Failed(_)) => break 'follow "failed",
                                Some(pb::job_event::Kind::Cancelled(_)) => break 'follow "cancelled",
                                _ => {}
                            }
                        }
                        Ok(None) => break tonic::Status::unavailable("the stream ended early"),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        let since = *broken_since.get_or_insert_with(Instant::now);
        anyhow::ensure!(retried(&status) && since.elapsed() < GIVE_UP, "stream: {status:?}");
        tokio::time::sleep(RETRY_EVERY).await;
    };
    let gap_free = sequences.iter().copied().eq(1..=sequences.len() as u64);
    Ok(JobRun { submitted, accepted, ended: Instant::now(), outcome, gap_free })
}

/// The load and the kill: `kill` starts `before` after the start and returns when the process is gone (the
/// instant returned); the clients go on for `BENCH_AFTER_KILL_MS` more. Returns that instant and each
/// client's jobs.
async fn under_load<F>(
    addresses: &[SocketAddr],
    before: Duration,
    kill: F,
) -> anyhow::Result<(Instant, Vec<Vec<JobRun>>)>
where
    F: std::future::Future<Output = anyhow::Result<Instant>>,
{
    let clients = env_u64("BENCH_CLIENTS", 4);
    let after = Duration::from_millis(env_u64("BENCH_AFTER_KILL_MS", 2000));
    let start = Instant::now();
    let stop_at = start + before + after;
    let mut tasks = Vec::new();
    for n in 0..clients {
        // A lazy channel: it connects again by itself after the server went away.
        let address = addresses[n as usize % addresses.len()];
        let mut client = JobClient::new(Channel::from_shared(format!("http://{address}"))?.connect_lazy());
        tasks.push(tokio::spawn(async move {
            let mut runs = Vec::new();
            while Instant::now() < stop_at {
                // A new image each job: ComfyUI would answer a repeated graph from its cache.
                let image = Bytes::from(png_8x8((n << 24) as u32 | runs.len() as u32));
                runs.push(run_job(&mut client, image).await?);
            }
            anyhow::Ok(runs)
        }));
    }
    tokio::time::sleep_until((start + before).into()).await;
    let dead = kill.await?;
    let mut runs = Vec::new();
    for task in tasks {
        runs.push(task.await??);
    }
    Ok((dead, runs))
}

/// What one round measured around `dead`, the instant the killed process was gone.
#[derive(Debug, Default)]
struct Round {
    /// A job, submit to terminal event, median over the round.
    job: Duration,
    /// Jobs submitted before and ended after `dead`, and the time until the last of them ended.
    in_flight: usize,
    last_in_flight: Duration,
    /// The longest a client went without a job ending, across `dead`.
    pause: Duration,
    /// From `dead` until the first job submitted after it was accepted (`None`: no job was).
    first_new: Option<Duration>,
    /// From `dead` until the next leader logged `serving gRPC` (replicas only).
    leading: Option<Duration>,
    jobs: usize,
    succeeded: usize,
    prompts: usize,
    gaps: usize,
}

impl Round {
    fn of(dead: Instant, clients: &[Vec<JobRun>], prompts: usize, leading: Option<Instant>) -> Self {
        let runs: Vec<&JobRun> = clients.iter().flatten().collect();
        let mut durations: Vec<Duration> = runs.iter().map(|r| r.ended - r.submitted).collect();
        durations.sort();
        let in_flight: Vec<&&JobRun> =
            runs.iter().filter(|r| r.submitted <= dead && r.ended > dead).collect();
        Self {
            job: durations.get(durations.len() / 2).copied().unwrap_or_default(),
            in_flight: in_flight.len(),
            last_in_flight: in_flight.iter().map(|r| r.ended - dead).max().unwrap_or_default(),
            pause: clients
                .iter()
                .filter_map(|runs| {
                    runs.windows(2)
                        .find(|w| w[0].ended <= dead && dead < w[1].ended)
                        .map(|w| w[1].ended - w[0].ended)
                })
                .max()
                .unwrap_or_default(),
            first_new: runs.iter().filter(|r| r.submitted > dead).map(|r| r.accepted - dead).min(),
            leading: leading.map(|at| at.saturating_duration_since(dead)),
            jobs: runs.len(),
            succeeded: runs.iter().filter(|r| r.outcome == "succeeded").count(),
            prompts,
            gaps: runs.iter().filter(|r| !r.gap_free).count(),
        }
    }
}

/// Prints the rounds of one set-up: each timing's median and worst over the rounds, and the totals.
fn summary(label: &str, rounds: &[Round]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let line = |what: &str, pick: &dyn Fn(&Round) -> Option<Duration>| {
        let mut values: Vec<Duration> = rounds.iter().filter_map(pick).collect();
        if values.is_empty() {
            return;
        }
        values.sort();
        let (median, worst) = (values[values.len() / 2], values[values.len() - 1]);
        println!("  {what:<52} median {:>6.0} ms, worst {:>6.0} ms", ms(median), ms(worst));
    };
    println!("{label} ({} rounds)", rounds.len());
    line("a job, submit to terminal event (median of a round)", &|r| Some(r.job));
    line("gone → the next leader serves", &|r| r.leading);
    line("gone → first job submitted after it accepted", &|r| r.first_new);
    line("gone → the last job in flight ended", &|r| Some(r.last_in_flight));
    line("longest a client went without a job ending", &|r| Some(r.pause));
    let total = |f: fn(&Round) -> usize| rounds.iter().map(f).sum::<usize>();
    println!(
        "  {:<52} {} jobs ({} in flight at a kill), {} succeeded; {} prompts on ComfyUI; {} streams with a gap",
        "outcomes, all rounds",
        total(|r| r.jobs),
        total(|r| r.in_flight),
        total(|r| r.succeeded),
        total(|r| r.prompts),
        total(|r| r.gaps),
    );
}

/// An 8×8 PNG that differs for each `seed`.
fn png_8x8(seed: u32) -> Vec<u8> {
    let [a, b, c, d] = seed.to_le_bytes();
    let img = image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 32) as u8 ^ a ^ d, (y * 32) as u8 ^ b, c.wrapping_add((x + y) as u8)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let emulator =
        ComfyEmulator::start(tokio::net::TcpListener::bind("127.0.0.1:0").await?, Default::default()).await?;
    emulator.faults().set_node_delay(Duration::from_millis(env_u64("BENCH_NODE_DELAY_MS", 2)));
    let comfy = emulator.url();
    let rounds = env_u64("BENCH_ROUNDS", 6);
    // The kills land at different points of the standby's 0.5 s lease polls: 3 s, then 97 ms later each
    // round.
    let before = |round: u64| {
        Duration::from_millis(env_u64("BENCH_BEFORE_KILL_MS", 3000)) + Duration::from_millis(97 * round)
    };
    println!(
        "{} clients, emulated ComfyUI with {} ms per node; each round SIGKILLs once, under load",
        env_u64("BENCH_CLIENTS", 4),
        env_u64("BENCH_NODE_DELAY_MS", 2)
    );

    // 1. One replica on SQLite, killed and restarted at once on the same directory and port.
    let mut measured = Vec::new();
    for round in 0..rounds {
        let data = tempfile::tempdir()?;
        let address = free_port()?;
        let listen = vec![("COMFYRELAY_GRPC__LISTEN".to_string(), address.to_string())];
        let replica = Replica::start(data.path(), &comfy, &listen, "serving gRPC").await?;
        let prompts_before = emulator.queued_total();
        let restarted = Arc::new(Mutex::new(None));
        let slot = restarted.clone();
        let (dead, runs) = under_load(&[address], before(round), async {
            replica.kill().await?;
            let dead = Instant::now();
            let again = Replica::start(data.path(), &comfy, &listen, "serving gRPC").await?;
            *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(again);
            Ok(dead)
        })
        .await?;
        measured.push(Round::of(dead, &runs, emulator.queued_total() - prompts_before, None));
    }
    summary("one replica on SQLite, SIGKILLed and restarted at once (the baseline)", &measured);

    // 2. A leader and a standby on PostgreSQL; the clients call the standby.
    let Some(pg) = pg_server::PgServer::start_durable().await else {
        println!("a leader and a standby on PostgreSQL: skipped (no PostgreSQL binaries)");
        return Ok(());
    };
    let mut measured = Vec::new();
    for round in 0..rounds {
        let artifacts = tempfile::tempdir()?;
        let shared = vec![
            ("COMFYRELAY_STORAGE__DATABASE_URL".to_string(), pg.database(&format!("failover{round}")).await),
            ("COMFYRELAY_STORAGE__ARTIFACTS_DIR".to_string(), artifacts.path().display().to_string()),
        ];
        let with_port = |addr: SocketAddr| {
            let mut env = shared.clone();
            env.push(("COMFYRELAY_GRPC__LISTEN".to_string(), addr.to_string()));
            env
        };
        let leader_dir = tempfile::tempdir()?;
        let leader =
            Replica::start(leader_dir.path(), &comfy, &with_port(free_port()?), "serving gRPC").await?;
        let mut standbys = Vec::new();
        for _ in 0..env_u64("BENCH_STANDBYS", 2) {
            let (dir, address) = (tempfile::tempdir()?, free_port()?);
            let ready = "standby: serving health only until this replica leads";
            standbys.push((
                Replica::start(dir.path(), &comfy, &with_port(address), ready).await?,
                address,
                dir,
            ));
        }
        let addresses: Vec<SocketAddr> = standbys.iter().map(|(_, address, _)| *address).collect();
        let prompts_before = emulator.queued_total();
        let (dead, runs) = under_load(&addresses, before(round), async {
            leader.kill().await?;
            Ok(Instant::now())
        })
        .await?;
        let leading = standbys
            .iter()
            .filter_map(|(r, _, _)| {
                r.serving.lock().unwrap_or_else(std::sync::PoisonError::into_inner).first().copied()
            })
            .min();
        measured.push(Round::of(dead, &runs, emulator.queued_total() - prompts_before, leading));
    }
    summary(
        &format!(
            "a leader and {} standbys on PostgreSQL, the leader SIGKILLed (the clients spread over the standbys)",
            env_u64("BENCH_STANDBYS", 2)
        ),
        &measured,
    );
    Ok(())
}
