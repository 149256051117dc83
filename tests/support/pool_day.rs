//! A simulated day of traffic through the real pool against the RunComfy emulator, under
//! `tokio::time::pause()`: capacity planning and the pool benchmark. Test support, shared by
//! `benches/pool_day.rs` and `tests/api/pool.rs` (each includes it with `#[path]`), so the library never
//! builds the emulator into a pool code path.
//!
//! The pool, the API client (with its rate limiter), the emulated API and every launched machine's emulated
//! ComfyUI run for real over loopback; only the job engine is replaced by a small driver that queues
//! jobs, reports the demand, hands jobs to ready machines (preferring warm ones, through the same
//! `Machine::try_assign` the scheduler uses) and holds each machine for the job's duration.

#![allow(dead_code, reason = "shared by a bench and a test; each reads only part of the report")]

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use comfyrelay::{
    comfy,
    config::{PoolPolicy, RunComfyConfig, Secret},
    emulator::runcomfy::{
        DEFAULT_TOKEN, DEFAULT_USER_ID, DEFAULT_WORKFLOW_VERSION_ID, PausedTimeTicker, RunComfyEmulator,
        RunComfyEmulatorConfig,
    },
    machine::{Machine, MachineSpec, PoolEvent, Provisioner as _},
    pool::{Pool, PoolParts, PoolStats},
    runcomfy::{ClientOptions, RunComfyClient},
    store::{MachineRow, MachineStore, StoreError},
};

/// What to simulate.
#[derive(Debug, Clone)]
pub(crate) struct DayParams {
    /// Simulated length.
    pub(crate) length: Duration,
    /// Arrivals per hour at the daily peak (the rate follows a day curve: 10 % at night, 100 % mid-day).
    pub(crate) peak_jobs_per_hour: f64,
    /// Each job's duration is uniform in this range.
    pub(crate) job_time: (Duration, Duration),
    /// Emulated launch → Ready.
    pub(crate) boot_time: Duration,
    /// The pool policy.
    pub(crate) policy: PoolPolicy,
    /// The lease.
    pub(crate) lease: Duration,
    /// RNG seed (the same seed gives the same arrivals).
    pub(crate) seed: u64,
}

impl Default for DayParams {
    fn default() -> Self {
        Self {
            length: Duration::from_secs(24 * 3600),
            peak_jobs_per_hour: 600.0,
            job_time: (Duration::from_secs(4), Duration::from_secs(20)),
            boot_time: Duration::from_secs(150),
            policy: PoolPolicy {
                min_warm: 0,
                max_machines: 6,
                jobs_per_machine: 3,
                idle_stop: Duration::from_secs(300),
                ..PoolPolicy::default()
            },
            lease: Duration::from_secs(900),
            seed: 7,
        }
    }
}

/// What happened.
#[derive(Debug, Clone)]
pub(crate) struct DayReport {
    /// Jobs that arrived.
    pub(crate) jobs: usize,
    /// Jobs run to the end.
    pub(crate) completed: usize,
    /// Queue wait (arrival → machine) percentiles: p50, p95, max.
    pub(crate) wait_p50: Duration,
    /// See `wait_p50`.
    pub(crate) wait_p95: Duration,
    /// See `wait_p50`.
    pub(crate) wait_max: Duration,
    /// Machine time spent running jobs, seconds.
    pub(crate) busy_seconds: f64,
    /// The pool's totals (billed seconds and cost as the pool counted them).
    pub(crate) pool: PoolStats,
    /// Billed seconds as the emulated provider counted them.
    pub(crate) provider_billed_seconds: f64,
    /// Most machines running at once (as the provider saw them).
    pub(crate) peak_machines: usize,
    /// Machines still running at the provider after the pool closed.
    pub(crate) left_running: usize,
    /// API requests received by the emulated provider.
    pub(crate) api_requests: u64,
    /// 429 answers it gave.
    pub(crate) rate_limited: u64,
}

/// Runs the simulation. Call on a current-thread runtime with time paused (`start_paused = true`).
///
/// # Errors
/// The emulator or the store cannot start.
pub(crate) async fn simulate_day(params: DayParams) -> anyhow::Result<DayReport> {
    let _ticker = PausedTimeTicker::start(Duration::from_millis(50));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let emulator = RunComfyEmulator::start(
        listener,
        RunComfyEmulatorConfig { boot_time: params.boot_time, ..RunComfyEmulatorConfig::default() },
    )
    .await?;
    let store = Arc::new(MemoryMachines::default());
    let config = RunComfyConfig {
        enabled: true,
        base_url: emulator.url(),
        user_id: DEFAULT_USER_ID.into(),
        api_token: Secret::new(DEFAULT_TOKEN),
        default_pool: params.policy.clone(),
        lease: params.lease,
        ..RunComfyConfig::default()
    };
    let client = RunComfyClient::new(ClientOptions::from_config(&config))?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let pool = Pool::start(
        PoolParts {
            config,
            client,
            store,
            comfy: comfy::ClientOptions::default(),
            prequeue: 0,
            instance: "sim".into(),
            events: events_tx,
        },
        shutdown.clone(),
    );

    let spec = MachineSpec {
        workflow_version_id: DEFAULT_WORKFLOW_VERSION_ID.into(),
        server_type: pool.default_server_type(),
    };
    let arrivals = arrivals(&params);
    let start = Instant::now();
    let mut next = 0usize;
    let mut queue: VecDeque<(usize, Instant)> = VecDeque::new();
    let mut machines: Vec<Arc<Machine>> = Vec::new();
    let mut waits = Vec::with_capacity(arrivals.len());
    let mut busy = 0.0;
    let mut completed = 0usize;
    let mut peak = 0usize;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Arc<Machine>>();
    let mut rng = StdRng::seed_from_u64(params.seed ^ 0x5eed);
    let mut running = 0usize;
    let mut sample = tokio::time::interval(Duration::from_secs(30));
    let jobs = TaskTracker::new();
    loop {
        let arrival = arrivals.get(next).map(|a| start + *a);
        tokio::select! {
            () = sleep_until_opt(arrival) => {
                queue.push_back((next, Instant::now()));
                next += 1;
            }
            Some(event) = events.recv() => match event {
                PoolEvent::Ready(m) => machines.push(m),
                PoolEvent::Reconciled { adopted } => machines.extend(adopted),
                PoolEvent::Removed { machine_id, .. } => machines.retain(|m| m.id != machine_id),
                PoolEvent::Provisioning { .. } | PoolEvent::ProvisioningFailed { .. } => {}
            },
            Some(machine) = done_rx.recv() => {
                machine.job_done();
                running -= 1;
                completed += 1;
            }
            _ = sample.tick() => {
                peak = peak.max(emulator.running_machines().len());
            }
        }
        // Dispatch: the least loaded machine with room.
        while let Some(&(_, arrived)) = queue.front() {
            let mut candidates: Vec<&Arc<Machine>> = machines.iter().filter(|m| m.has_room()).collect();
            candidates.sort_by_key(|m| m.assigned());
            let Some(machine) = candidates.into_iter().find(|m| m.try_assign("sim")) else { break };
            queue.pop_front();
            waits.push(arrived.elapsed());
            let (lo, hi) = params.job_time;
            let t = lo + (hi.saturating_sub(lo)).mul_f64(rng.random::<f64>());
            busy += t.as_secs_f64();
            running += 1;
            let (machine, done) = (machine.clone(), done_tx.clone());
            jobs.spawn(async move {
                tokio::time::sleep(t).await;
                let _ = done.send(machine);
            });
        }
        let mut demand = BTreeMap::new();
        if !queue.is_empty() {
            demand.insert(spec.clone(), queue.len());
        }
        pool.demand(&demand);
        if next >= arrivals.len() && queue.is_empty() && running == 0 {
            break;
        }
    }
    jobs.close();
    jobs.wait().await;
    // Let the idle machines reach idle_stop, as the day's end would.
    tokio::time::sleep(params.policy.idle_stop + Duration::from_secs(30)).await;
    let stats = pool.stats();
    pool.close(Duration::from_secs(120)).await;
    let left_running = emulator.running_machines().len();
    let report = DayReport {
        jobs: arrivals.len(),
        completed,
        wait_p50: percentile(&mut waits, 0.5),
        wait_p95: percentile(&mut waits, 0.95),
        wait_max: percentile(&mut waits, 1.0),
        busy_seconds: busy,
        pool: stats,
        provider_billed_seconds: emulator.total_billed_seconds(),
        peak_machines: peak,
        left_running,
        api_requests: emulator.requests_received(),
        rate_limited: emulator.rate_limited_responses(),
    };
    emulator.shutdown().await;
    Ok(report)
}

/// Arrival offsets over the day: a Poisson process whose rate follows `0.1 + 0.9·sin²(π·t/24h)`.
fn arrivals(params: &DayParams) -> Vec<Duration> {
    let mut rng = StdRng::seed_from_u64(params.seed);
    let peak = params.peak_jobs_per_hour / 3600.0;
    let mut t = 0.0f64;
    let mut out = Vec::new();
    let end = params.length.as_secs_f64();
    loop {
        // Thinning: candidates at the peak rate, kept with probability rate(t)/peak.
        t += -rng.random::<f64>().max(1e-12).ln() / peak;
        if t >= end {
            return out;
        }
        let phase = (std::f64::consts::PI * t / 86_400.0).sin();
        if rng.random::<f64>() < 0.1 + 0.9 * phase * phase {
            out.push(Duration::from_secs_f64(t));
        }
    }
}

fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Machine rows in memory: SQLite's worker thread would let the paused clock race past its timeouts.
#[derive(Debug, Default)]
struct MemoryMachines(std::sync::Mutex<BTreeMap<String, MachineRow>>);

#[async_trait::async_trait]
impl MachineStore for MemoryMachines {
    async fn put_machine(&self, machine: &MachineRow) -> Result<(), StoreError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(machine.id.clone(), machine.clone());
        Ok(())
    }

    async fn list_machines(&self) -> Result<Vec<MachineRow>, StoreError> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect())
    }

    async fn delete_machine(&self, id: &str) -> Result<(), StoreError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        Ok(())
    }
}
