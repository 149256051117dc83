//! The RunComfy pool through gRPC against the RunComfy emulator: launch, provisioning events, warm reuse,
//! scale up and down, rate limits, crashes, restarts, dying machines, and no machine left running.

use std::{path::Path, time::Duration};

use comfyrelay::{
    Config,
    emulator::{
        comfyui::EmulatorConfig,
        runcomfy::{
            DEFAULT_TOKEN, DEFAULT_USER_ID, DEFAULT_WORKFLOW_VERSION_ID, RunComfyEmulator,
            RunComfyEmulatorConfig,
        },
    },
    proto::pb,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::helpers::{collect_events, png, submit_request, terminal};

#[path = "../support/pool_day.rs"]
mod pool_day;

/// The test workflow: `invert` with RunComfy requirements.
pub(crate) const WORKFLOW: &str = "invert-rc";

/// A RunComfy emulator on 127.0.0.1:0.
async fn runcomfy(config: RunComfyEmulatorConfig) -> RunComfyEmulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    RunComfyEmulator::start(listener, config).await.expect("start RunComfy emulator")
}

/// A quick emulator: boots in 200 ms, generous rate limit, jobs take `node_delay` per node.
pub(crate) fn fast_emulator(node_delay: Duration) -> RunComfyEmulatorConfig {
    RunComfyEmulatorConfig {
        boot_time: Duration::from_millis(200),
        deleting_time: Duration::from_millis(50),
        requests_per_second: 200,
        burst: 200,
        comfyui: EmulatorConfig { node_delay, ..crate::helpers::emulator_config() },
        ..RunComfyEmulatorConfig::default()
    }
}

/// A workflows directory holding `invert` plus `invert-rc`, which needs a RunComfy machine.
fn workflows_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows").join("invert");
    let target = dir.path().join(WORKFLOW);
    std::fs::create_dir_all(&target).expect("mkdir");
    std::fs::copy(repo.join("workflow.json"), target.join("workflow.json")).expect("copy graph");
    let manifest = std::fs::read_to_string(repo.join("manifest.toml")).expect("manifest");
    let manifest = manifest.replace("name = \"invert\"", &format!("name = \"{WORKFLOW}\""));
    let manifest = format!(
        "{manifest}\n[requirements]\nruncomfy_workflow_version_id = \"{DEFAULT_WORKFLOW_VERSION_ID}\"\nserver_type = \"medium\"\n"
    );
    std::fs::write(target.join("manifest.toml"), manifest).expect("write manifest");
    dir
}

/// Test configuration: no static ComfyUI, the pool against `emu`, with timings short enough for tests.
fn pool_config(data_dir: &Path, workflows: &Path, emu: &RunComfyEmulator) -> Config {
    let mut config = crate::helpers::test_config(data_dir);
    config.workflows_dir = Some(workflows.to_path_buf());
    config.comfyui.servers.clear();
    let r = &mut config.runcomfy;
    r.enabled = true;
    r.base_url = emu.url();
    r.user_id = DEFAULT_USER_ID.into();
    r.api_token = comfyrelay::config::Secret::new(DEFAULT_TOKEN);
    r.requests_per_second = 100;
    r.burst = 100;
    r.status_poll = Duration::from_millis(50);
    r.lease = Duration::from_secs(30);
    r.health_interval = Duration::from_millis(200);
    r.unhealthy_after = Duration::from_millis(600);
    r.health_timeout = Duration::from_secs(10);
    r.launch_retry_backoff = Duration::from_millis(100);
    r.default_pool.idle_stop = Duration::from_secs(60);
    r.default_pool.ready_timeout = Duration::from_secs(10);
    config
}

/// An emulated RunComfy account with comfyrelay's test configuration for it (private data and workflow
/// directories): each test adjusts `config`, starts comfyrelay, and ends with [`Account::finish`].
pub(crate) struct Account {
    pub(crate) emu: RunComfyEmulator,
    pub(crate) config: Config,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Account {
    pub(crate) async fn new(emu: RunComfyEmulatorConfig) -> Self {
        let emu = runcomfy(emu).await;
        let (data, workflows) = (tempfile::tempdir().expect("tempdir"), workflows_dir());
        let config = pool_config(data.path(), workflows.path(), &emu);
        Self { emu, config, _dirs: (data, workflows) }
    }

    /// Starts comfyrelay (again, after a stop or a kill: same data directory) and connects to it.
    pub(crate) async fn start(&self) -> (Process, Channel) {
        let p = Process::start(self.config.clone()).await;
        let channel = p.channel().await;
        (p, channel)
    }

    /// Stops comfyrelay gracefully; no machine may be left running at the provider.
    pub(crate) async fn finish(self, p: Process) {
        p.stop().await;
        let running = self.emu.running_machines();
        assert!(running.is_empty(), "a machine was left running: {running:?}");
        self.emu.shutdown().await;
    }
}

/// comfyrelay on its own runtime (a separate thread), so a test can kill it the way a crash would: every
/// task stops at once, nothing shuts down gracefully.
pub(crate) struct Process {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Process {
    pub(crate) async fn start(config: Config) -> Self {
        comfyrelay::telemetry::init_for_tests(std::env::var_os("TEST_LOG").is_some());
        let std_listener = std::net::TcpListener::bind(config.grpc.listen).expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                tokio::select! {
                    r = comfyrelay::run(listener, config, token) => { r.expect("comfyrelay ran"); }
                    _ = killed => {}
                }
            });
            // Dropping the runtime here kills every task comfyrelay spawned, as a crash would.
            rt.shutdown_background();
        });
        Self { addr, shutdown, thread: Some(thread), kill: Some(kill) }
    }

    pub(crate) async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).expect("uri").connect().await.expect("connect")
    }

    pub(crate) async fn jobs(&self) -> pb::job_service_client::JobServiceClient<Channel> {
        pb::job_service_client::JobServiceClient::new(self.channel().await)
    }

    async fn machines(&self) -> pb::machine_service_client::MachineServiceClient<Channel> {
        pb::machine_service_client::MachineServiceClient::new(self.channel().await)
    }

    /// Polls `GetMachine` (every 20 ms, up to 10 s) until `pred` holds: comfyrelay records a machine's
    /// changes as the provider confirms them, which the test cannot be notified of.
    async fn machine_when(
        &self,
        machine_id: &str,
        what: &str,
        pred: impl Fn(&pb::Machine) -> bool,
    ) -> pb::Machine {
        let mut client = self.machines().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let request = pb::GetMachineRequest { machine_id: machine_id.into() };
            let m = client.get_machine(request).await.expect("get machine").into_inner();
            if pred(&m) {
                return m;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}: {m:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Like [`Process::machine_when`], over `ListMachines(include_stopped)`.
    async fn machines_when(&self, what: &str, pred: impl Fn(&[pb::Machine]) -> bool) -> Vec<pb::Machine> {
        let mut client = self.machines().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let request = pb::ListMachinesRequest { include_stopped: true, ..Default::default() };
            let listed = client.list_machines(request).await.expect("list machines").into_inner().machines;
            if pred(&listed) {
                return listed;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}: {listed:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful stop (SIGTERM).
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        let thread = self.thread.take().expect("running");
        tokio::task::spawn_blocking(move || thread.join().expect("comfyrelay thread")).await.expect("join");
    }

    /// Crash: every task dies where it is.
    pub(crate) async fn kill(mut self) {
        let _ = self.kill.take().expect("running").send(());
        let thread = self.thread.take().expect("running");
        tokio::task::spawn_blocking(move || thread.join().expect("comfyrelay thread")).await.expect("join");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits (bounded) until `cond` holds, checking every 20 ms: a readiness probe on state the test cannot be
/// notified of (the emulator's machine table).
pub(crate) async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn submit(p: &Process) -> String {
    let mut jobs = p.jobs().await;
    jobs.submit_job(submit_request(WORKFLOW, png(8, 8))).await.expect("submit").into_inner().id
}

fn provisioning_phases(events: &[pb::JobEvent]) -> Vec<i32> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::job_event::Kind::Provisioning(p)) => Some(p.phase),
            _ => None,
        })
        .collect()
}

fn started_machine(events: &[pb::JobEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(pb::job_event::Kind::Started(s)) => Some(s.machine_id.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_a_launched_machine_with_provisioning_events_and_cost() {
    let acc = Account::new(fast_emulator(Duration::ZERO)).await;
    let (p, channel) = acc.start().await;

    let id = submit(&p).await;
    let events = collect_events(&channel, &id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    use pb::ProvisioningPhase as P;
    let phases = provisioning_phases(&events);
    let order = [P::LaunchRequested, P::Starting, P::Ready, P::ComfyuiReachable].map(|p| p as i32);
    assert_eq!(phases, order, "provisioning phases in order, once each: {events:#?}");
    let launched = acc.emu.machines();
    assert_eq!(launched.len(), 1, "one machine launched");
    assert_eq!(started_machine(&events), vec![launched[0].server_id.clone()]);

    // The machine, its lease and its cost through MachineService (the finished job is counted once the
    // scheduler hears the slot is free, just after the terminal event).
    let machine_id = &launched[0].server_id;
    let m = p.machine_when(machine_id, "the finished job is counted", |m| m.jobs_completed == 1).await;
    assert_eq!(m.kind, pb::MachineKind::Runcomfy as i32);
    assert_eq!(m.state, pb::MachineState::Ready as i32);
    assert_eq!(m.server_type, "medium");
    assert_eq!(m.workflow_version_id, DEFAULT_WORKFLOW_VERSION_ID);
    assert_eq!(m.jobs_completed, 1);
    assert!(m.ready_time.is_some() && m.lease_expire_time.is_some(), "{m:?}");
    assert!(m.billed_seconds > 0.0, "{m:?}");
    assert!(m.cost.as_ref().is_some_and(|c| c.amount > 0.0 && c.currency == "USD"), "{m:?}");

    // Machine time and cost on the job.
    let job = p.jobs().await.get_job(pb::GetJobRequest { job_id: id.clone() }).await.unwrap().into_inner();
    assert!(job.machine_seconds > 0.0, "{job:?}");
    assert!(job.cost.as_ref().is_some_and(|c| c.amount > 0.0), "{job:?}");

    // A graceful stop deletes the machine; the emulator's billing matches ours within a second.
    p.stop().await;
    assert!(
        acc.emu.running_machines().is_empty(),
        "a machine was left running: {:?}",
        acc.emu.running_machines()
    );
    let billed = acc.emu.billed_seconds(&launched[0].server_id).expect("billed");
    assert!(billed > 0.0 && billed < 30.0, "billed {billed}");
    acc.emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_machine_is_reused_without_a_new_launch() {
    let acc = Account::new(fast_emulator(Duration::ZERO)).await;
    let (p, channel) = acc.start().await;

    let first = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&first), "succeeded");
    let second = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&second), "succeeded");
    assert!(provisioning_phases(&second).is_empty(), "the second job provisioned nothing: {second:#?}");
    assert_eq!(started_machine(&first), started_machine(&second), "same machine");
    assert_eq!(acc.emu.machines_launched(), 1);

    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_scales_up_to_its_maximum_under_load_and_down_when_idle() {
    let mut acc = Account::new(fast_emulator(Duration::from_millis(150))).await;
    acc.config.runcomfy.default_pool.max_machines = 3;
    acc.config.runcomfy.default_pool.jobs_per_machine = 2;
    acc.config.runcomfy.default_pool.idle_stop = Duration::from_secs(1);
    let (p, channel) = acc.start().await;

    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(submit(&p).await);
    }
    let mut used = std::collections::BTreeSet::new();
    for id in &ids {
        let events = collect_events(&channel, id, 0).await;
        assert_eq!(terminal(&events), "succeeded", "{events:#?}");
        used.extend(started_machine(&events));
    }
    assert_eq!(acc.emu.machines_launched(), 3, "scaled up to max_machines, no further");
    assert_eq!(used.len(), 3, "jobs spread over the three machines: {used:?}");

    // Idle for idle_stop: every machine is stopped (min_warm is 0) and shows as STOPPED.
    eventually("the idle machines are stopped", Duration::from_secs(20), || {
        acc.emu.running_machines().is_empty()
    })
    .await;
    // comfyrelay records each stop once the API confirmed it.
    let stopped = |m: &pb::Machine| m.state == pb::MachineState::Stopped as i32;
    let listed = p.machines_when("all are recorded as stopped", |l| l.iter().all(stopped)).await;
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|m| m.stop_time.is_some() && m.billed_seconds > 0.0), "{listed:?}");
    let current =
        p.machines().await.list_machines(pb::ListMachinesRequest::default()).await.unwrap().into_inner();
    assert!(current.machines.is_empty(), "stopped machines are listed only on request");
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_429s_is_ridden_out_within_the_rate_limit() {
    let mut emu_config = fast_emulator(Duration::ZERO);
    // The account allows 2 requests/s with bursts of 3; comfyrelay is set to 2/s without bursts, so any
    // 429 beyond the injected ones means it went over the rate (not that two clocks disagreed by a tick).
    emu_config.requests_per_second = 2;
    emu_config.burst = 3;
    let mut acc = Account::new(emu_config).await;
    acc.config.runcomfy.requests_per_second = 2;
    acc.config.runcomfy.burst = 1;
    acc.config.runcomfy.status_poll = Duration::from_millis(500);
    acc.emu.faults().rate_limit_requests(6, Duration::from_millis(300));
    let (p, channel) = acc.start().await;

    let events = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    p.stop().await;
    // Only the six injected 429s: comfyrelay itself never went over the account's rate.
    assert_eq!(
        acc.emu.rate_limited_responses(),
        6,
        "429s beyond the injected ones mean the limiter was exceeded"
    );
    assert!(acc.emu.running_machines().is_empty());
    acc.emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_comfyrelay_leaves_machines_that_stop_by_their_lease() {
    let mut acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.config.runcomfy.lease = Duration::from_secs(3);
    let (p, channel) = acc.start().await;
    let events = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&events), "succeeded");
    let machine = acc.emu.machines()[0].server_id.clone();
    p.kill().await;
    assert_eq!(acc.emu.running_machines().len(), 1, "the crash stopped nothing");

    // Nobody renews the lease: the machine stops itself within it.
    eventually("the lease stops the machine", Duration::from_secs(10), || {
        acc.emu.running_machines().is_empty()
    })
    .await;
    let billed = acc.emu.billed_seconds(&machine).expect("billed");
    assert!(billed <= 3.0 + 0.5, "billed {billed} s with a 3 s lease");

    // A restart finds it stopped, records it so (with its billing up to the lease) and keeps it as history.
    let (p, _) = acc.start().await;
    let listed = p.machines_when("the machine is listed", |l| !l.is_empty()).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let m = &listed[0];
    assert_eq!(m.id, machine);
    assert_eq!(m.state, pb::MachineState::Stopped as i32, "{m:?}");
    assert!(m.stop_time.is_some() && m.billed_seconds > 0.0 && m.billed_seconds <= 4.0, "{m:?}");
    assert_eq!(acc.emu.machines_launched(), 1, "the restart launched nothing");
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_adopts_tracked_machines_and_stops_the_ones_it_meant_to_stop() {
    let mut acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.config.runcomfy.default_pool.max_machines = 2;
    acc.config.runcomfy.default_pool.jobs_per_machine = 1;
    let (p, channel) = acc.start().await;
    let (a, b) = (submit(&p).await, submit(&p).await);
    for id in [&a, &b] {
        assert_eq!(terminal(&collect_events(&channel, id, 0).await), "succeeded");
    }
    let ids: Vec<String> = acc.emu.running_machines().iter().map(|m| m.server_id.clone()).collect();
    assert_eq!(ids.len(), 2);
    // The operator drains one while every DELETE fails: it stays tracked as stopping; then comfyrelay dies.
    acc.emu.faults().fail_requests(10_000, 503);
    let drained = p
        .machines()
        .await
        .drain_machine(pb::DrainMachineRequest { machine_id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.draining);
    let stopping = pb::MachineState::Stopping as i32;
    p.machine_when(&ids[0], "the drained machine is being stopped", |m| m.state == stopping).await;
    p.kill().await;
    acc.emu.faults().clear();
    assert_eq!(acc.emu.running_machines().len(), 2);

    // The restart stops the machine it was stopping and adopts the other, which takes the next job.
    let (p, channel) = acc.start().await;
    let next = submit(&p).await;
    let events = collect_events(&channel, &next, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    assert_eq!(started_machine(&events), vec![ids[1].clone()], "ran on the adopted machine");
    assert!(provisioning_phases(&events).is_empty(), "no launch for the adopted machine");
    eventually("the drained machine is stopped", Duration::from_secs(10), || {
        acc.emu.running_machines().iter().all(|m| m.server_id != ids[0])
    })
    .await;
    assert_eq!(acc.emu.machines_launched(), 2, "nothing new launched");
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_dying_mid_job_is_replaced_and_the_job_retried_elsewhere() {
    let acc = Account::new(fast_emulator(Duration::from_millis(400))).await;
    let (p, channel) = acc.start().await;
    let id = submit(&p).await;
    // Executing (past the upload): the machine dies under a running prompt.
    executing(&channel, &id).await;
    let first = acc.emu.machines()[0].server_id.clone();
    assert!(acc.emu.kill_machine(&first).await, "killed the machine's ComfyUI");

    let events = collect_events(&channel, &id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    let retried = events.iter().find_map(|e| match &e.kind {
        Some(pb::job_event::Kind::Retrying(r)) => Some(r.reason.clone()),
        _ => None,
    });
    let reason = retried.expect("a retrying event");
    assert!(reason.contains(&first), "the reason names the machine: {reason}");
    let machines = started_machine(&events);
    assert_eq!(machines.len(), 2, "{machines:?}");
    assert_eq!(machines[0], first);
    assert_ne!(machines[1], first, "retried on a replacement");
    // The dead machine was deleted (its billing ended) while the API still called it Ready.
    eventually("the dead machine is deleted", Duration::from_secs(10), || {
        acc.emu.running_machines().iter().all(|m| m.server_id != first)
    })
    .await;
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_that_never_become_ready_fail_waiting_jobs_with_a_clear_reason() {
    let mut acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.config.runcomfy.default_pool.ready_timeout = Duration::from_millis(600);
    acc.config.runcomfy.max_launch_failures = 2;
    acc.emu.faults().never_ready(2);
    let (p, channel) = acc.start().await;
    let events = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&events), "failed", "{events:#?}");
    let Some(pb::job_event::Kind::Failed(f)) = &events.last().unwrap().kind else { unreachable!() };
    let error = f.error.as_ref().expect("error");
    assert_eq!(error.reason, pb::FailureReason::Provisioning as i32, "{error:?}");
    assert!(error.message.contains("did not become ready"), "{error:?}");
    // Both stuck machines were deleted, not left starting.
    eventually("the stuck machines are deleted", Duration::from_secs(10), || {
        acc.emu.running_machines().is_empty()
    })
    .await;
    assert_eq!(acc.emu.machines_launched(), 2);
    acc.finish(p).await;
}

#[tokio::test(start_paused = true)]
async fn the_real_pool_runs_hours_of_simulated_traffic_under_paused_time() {
    use pool_day::{DayParams, simulate_day};
    let params = DayParams {
        length: Duration::from_secs(6 * 3600),
        peak_jobs_per_hour: 300.0,
        ..DayParams::default()
    };
    let max = params.policy.max_machines;
    let r = simulate_day(params).await.expect("simulation");
    println!("{r:#?}");
    assert!(r.jobs > 300, "{r:?}");
    assert_eq!(r.completed, r.jobs, "every job ran: {r:?}");
    assert_eq!(r.left_running, 0, "no machine left running: {r:?}");
    assert!(r.peak_machines <= max, "{r:?}");
    assert_eq!(r.rate_limited, 0, "never above the account's rate: {r:?}");
    assert!(r.pool.launched >= 1 && r.pool.stopped == r.pool.launched, "{r:?}");
    // The pool's bill agrees with the provider's within a status poll per machine.
    let slack = 5.0 * r.pool.launched as f64 + 1.0;
    assert!((r.pool.billed_seconds - r.provider_billed_seconds).abs() <= slack, "{r:?}");
    assert!(r.busy_seconds < r.pool.billed_seconds, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_extended_while_a_machine_has_work() {
    // Each node takes 1.5 s: the job runs well past the 3 s lease the machine was launched with.
    let mut acc = Account::new(fast_emulator(Duration::from_millis(1500))).await;
    acc.config.runcomfy.lease = Duration::from_secs(3);
    let (p, channel) = acc.start().await;
    let started = std::time::Instant::now();
    let events = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    assert!(started.elapsed() > Duration::from_secs(4), "the job outlived one lease");
    assert!(!events.iter().any(|e| matches!(e.kind, Some(pb::job_event::Kind::Retrying(_)))), "{events:#?}");
    assert_eq!(acc.emu.machines_launched(), 1);
    assert_eq!(acc.emu.running_machines().len(), 1, "still running: its lease was extended");
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_pool_machine_is_stopped_once_idle() {
    let acc = Account::new(fast_emulator(Duration::ZERO)).await;
    let (p, channel) = acc.start().await;
    assert_eq!(terminal(&collect_events(&channel, &submit(&p).await, 0).await), "succeeded");
    let id = acc.emu.machines()[0].server_id.clone();
    let mut machines = p.machines().await;
    let drained = machines
        .drain_machine(pb::DrainMachineRequest { machine_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.draining, "{drained:?}");
    let stopped = pb::MachineState::Stopped as i32;
    let m = p.machine_when(&id, "the drained machine is stopped", |m| m.state == stopped).await;
    assert!(m.billed_seconds > 0.0 && m.stop_time.is_some(), "{m:?}");
    assert!(acc.emu.running_machines().is_empty());
    let missing =
        machines.get_machine(pb::GetMachineRequest { machine_id: "nope".into() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_past_its_maximum_lifetime_is_replaced() {
    let mut acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.config.runcomfy.default_pool.max_lifetime = Duration::from_secs(1);
    let (p, channel) = acc.start().await;
    let first = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&first), "succeeded");
    let old = started_machine(&first);
    // idle_stop is a minute, but the machine is over its lifetime: it is drained and stopped.
    eventually("the old machine is stopped", Duration::from_secs(10), || {
        acc.emu.running_machines().is_empty()
    })
    .await;
    let second = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&second), "succeeded");
    assert_ne!(started_machine(&second), old, "a fresh machine took the next job");
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_faults_while_provisioning_cost_no_extra_machine() {
    use comfyrelay::emulator::runcomfy::LaunchFailure;
    let acc = Account::new(fast_emulator(Duration::ZERO)).await;
    // The start-up reconcile meets a 5xx burst and an error carried in a 200; the launch creates the machine
    // but answers 500; the new machine is unknown (404) to the first lookups.
    acc.emu.faults().fail_requests(2, 503);
    acc.emu.faults().errors_in_200(1, 500001, "internal error");
    acc.emu.faults().fail_next_launch(LaunchFailure::CreatedButFailed);
    acc.emu.faults().not_found_after_launch(2);
    let (p, channel) = acc.start().await;
    let events = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    assert_eq!(acc.emu.machines_launched(), 1, "the failed-looking launch was found, not repeated");
    assert_eq!(started_machine(&events), vec![acc.emu.machines()[0].server_id.clone()]);
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_arriving_during_a_launch_hears_it_waits_for_that_machine() {
    let acc = Account::new(RunComfyEmulatorConfig {
        boot_time: Duration::from_secs(2),
        ..fast_emulator(Duration::ZERO)
    })
    .await;
    let (p, channel) = acc.start().await;
    let first = submit(&p).await;
    let starting = pb::ProvisioningPhase::Starting as i32;
    crate::helpers::wait_for_event(
        &channel,
        &first,
        |e| matches!(&e.kind, Some(pb::job_event::Kind::Provisioning(p)) if p.phase == starting),
    )
    .await;
    let second = submit(&p).await;
    let events = collect_events(&channel, &second, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    use pb::ProvisioningPhase as P;
    let expected = [P::WaitingForMachine, P::Ready, P::ComfyuiReachable].map(|p| p as i32);
    assert_eq!(provisioning_phases(&events), expected, "{events:#?}");
    assert_eq!(acc.emu.machines_launched(), 1);
    let first_events = collect_events(&channel, &first, 0).await;
    assert!(
        !provisioning_phases(&first_events).contains(&(P::WaitingForMachine as i32)),
        "{first_events:#?}"
    );
    acc.finish(p).await;
}

/// Waits until the job executes on its machine (past the upload: a node started).
async fn executing(channel: &Channel, id: &str) {
    crate::helpers::wait_for_event(channel, id, |e| {
        matches!(e.kind, Some(pb::job_event::Kind::NodeStarted(_)))
    })
    .await;
}

/// Asserts that comfyrelay answers a MachineService call within a bounded wait (without the fix for an
/// unreachable API it answers only once each API request has timed out, minutes later).
async fn answers_within_bounds(p: &Process) {
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        let mut machines = p.machines().await;
        machines.list_machines(pb::ListMachinesRequest::default()).await
    })
    .await;
    assert!(matches!(answered, Ok(Ok(_))), "no answer while RunComfy is unreachable: {answered:?}");
}

impl Account {
    /// Stops comfyrelay gracefully; `theirs` (a server another client launched) must never have been sent
    /// a DELETE and must still run; then its owner deletes it.
    async fn finish_leaving(self, p: Process, theirs: &str) {
        p.stop().await;
        assert!(!self.emu.delete_requests().iter().any(|d| d == theirs), "their server was sent a DELETE");
        let running: Vec<String> = self.emu.running_machines().into_iter().map(|m| m.server_id).collect();
        assert_eq!(running, vec![theirs.to_string()], "only their server is left, and it runs");
        self.emu.delete_by_someone_else(theirs).await;
        self.emu.shutdown().await;
    }
}

/// The failure a job ended with.
fn failure(events: &[pb::JobEvent]) -> pb::JobError {
    match events.last().and_then(|e| e.kind.as_ref()) {
        Some(pb::job_event::Kind::Failed(f)) => f.error.clone().expect("a failure carries its error"),
        other => panic!("not failed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_never_deletes_a_server_someone_else_launched_while_a_launch_was_in_flight() {
    use comfyrelay::emulator::runcomfy::LaunchFailure;
    // runcomfy.stop_unknown_servers is off (the default).
    let acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.emu.faults().fail_next_launch(LaunchFailure::Stalled(Duration::from_secs(60)));
    let (p, _) = acc.start().await;
    let job = submit(&p).await;
    eventually("the launch is in flight", Duration::from_secs(10), || acc.emu.launches_in_flight() == 1)
        .await;
    // Meanwhile another client of the account launches the same server type for the same duration; then
    // comfyrelay dies with its launch unanswered.
    let lease = acc.config.runcomfy.lease;
    let theirs = acc.emu.launch_by_someone_else(DEFAULT_WORKFLOW_VERSION_ID, "medium", lease);
    p.kill().await;

    let (p, channel) = acc.start().await;
    let events = collect_events(&channel, &job, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    assert!(!started_machine(&events).contains(&theirs), "ran on a machine comfyrelay launched: {events:#?}");
    acc.finish_leaving(p, &theirs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_during_a_launch_waits_for_it_and_stops_the_machine() {
    use comfyrelay::emulator::runcomfy::LaunchFailure;
    let acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.emu.faults().fail_next_launch(LaunchFailure::CreatedButStalled(Duration::from_secs(2)));
    let (p, _) = acc.start().await;
    submit(&p).await;
    eventually("the machine exists while its launch is unanswered", Duration::from_secs(10), || {
        acc.emu.launches_in_flight() == 1 && acc.emu.machines_launched() == 1
    })
    .await;
    let machine = acc.emu.machines()[0].server_id.clone();
    // SIGTERM now: the answer comes within the grace period, and the machine it names is deleted.
    p.stop().await;
    assert!(acc.emu.running_machines().is_empty(), "left running: {:?}", acc.emu.running_machines());
    assert_eq!(acc.emu.delete_requests(), vec![machine], "the launched machine was deleted");
    acc.emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_fails_waiting_jobs_at_once_without_echoing_it() {
    const WRONG: &str = "rc_not_the_right_token_0123456789";
    let mut acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.config.runcomfy.api_token = comfyrelay::config::Secret::new(WRONG);
    acc.config.jobs.queue_timeout = Duration::from_secs(20);
    // The API quotes the presented token in its 401 (some gateways do): comfyrelay must not pass it on.
    acc.emu.faults().echo_token_in_auth_errors(true);
    let (p, channel) = acc.start().await;
    for _ in 0..2 {
        let events = collect_events(&channel, &submit(&p).await, 0).await;
        assert_eq!(terminal(&events), "failed", "{events:#?}");
        let error = failure(&events);
        assert_eq!(error.reason, pb::FailureReason::Provisioning as i32, "{error:?}");
        assert!(error.message.contains("401") && error.message.contains("api_token"), "{error:?}");
        assert!(!format!("{events:?}").contains(WRONG), "the token leaked into the job: {events:#?}");
    }
    assert_eq!(acc.emu.machines_launched(), 0);
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_the_api_refused_for_certain_fails_waiting_jobs_without_waiting_for_more_failures() {
    use comfyrelay::emulator::runcomfy::LaunchFailure;
    let mut acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.config.runcomfy.max_launch_failures = 50;
    acc.config.runcomfy.launch_confirm_grace = Duration::from_millis(300);
    // Every attempt the client makes is answered 500, and the server list shows no machine after each.
    for _ in 0..3 {
        acc.emu.faults().fail_next_launch(LaunchFailure::Rejected);
    }
    let (p, channel) = acc.start().await;
    let events = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&events), "failed", "{events:#?}");
    let error = failure(&events);
    assert_eq!(error.reason, pb::FailureReason::Provisioning as i32, "{error:?}");
    assert!(error.message.contains("did not launch"), "{error:?}");
    assert_eq!(acc.emu.machines_launched(), 0);
    // The API launches again: the next job gets a machine.
    let events = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_whose_api_record_vanished_after_ready_is_retired_and_billed_as_the_provider_did() {
    let acc = Account::new(fast_emulator(Duration::ZERO)).await;
    let (p, channel) = acc.start().await;
    let first = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&first), "succeeded", "{first:#?}");
    let lost = started_machine(&first)[0].clone();
    // The provider loses the machine's record (404, unlisted, no longer billed); its ComfyUI still answers.
    assert!(acc.emu.forget_machine(&lost));
    let stopped = pb::MachineState::Stopped as i32;
    let m = p.machine_when(&lost, "the machine the provider lost is retired", |m| m.state == stopped).await;
    let provider = acc.emu.billed_seconds(&lost).expect("billed");
    assert!(
        m.billed_seconds <= provider + 1.0,
        "billed {} s; the provider billed {provider} s",
        m.billed_seconds
    );
    let second = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&second), "succeeded", "{second:#?}");
    assert!(!started_machine(&second).contains(&lost), "a job went to the lost machine: {second:#?}");
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_unreachable_comfyrelay_serves_at_once_and_a_stop_is_not_held_up() {
    let mut acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.config.grpc.shutdown_grace = Duration::from_secs(2);
    acc.emu.faults().set_unreachable(true);
    let p = Process::start(acc.config.clone()).await;
    answers_within_bounds(&p).await;
    // A job for a RunComfy workflow is accepted and waits for the pool.
    let id = submit(&p).await;
    let job = p.jobs().await.get_job(pb::GetJobRequest { job_id: id }).await.expect("get job").into_inner();
    assert_eq!(job.state, pb::JobState::Queued as i32, "{job:?}");
    let stopped = tokio::time::timeout(Duration::from_secs(10), p.stop()).await;
    assert!(stopped.is_ok(), "a graceful stop waited on the unreachable API");
    acc.emu.faults().set_unreachable(false);
    assert_eq!(acc.emu.machines_launched(), 0);
    acc.emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_at_a_crash_is_reattached_to_its_machine_after_a_late_reconcile() {
    let acc = Account::new(fast_emulator(Duration::from_millis(700))).await;
    let (p, channel) = acc.start().await;
    let id = submit(&p).await;
    executing(&channel, &id).await;
    let machine = acc.emu.machines()[0].server_id.clone();
    p.kill().await;

    // comfyrelay restarts while RunComfy is unreachable: it serves, and the running job waits for the pool.
    acc.emu.faults().set_unreachable(true);
    let (p, channel) = acc.start().await;
    answers_within_bounds(&p).await;
    acc.emu.faults().set_unreachable(false);
    let events = collect_events(&channel, &id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    assert!(!events.iter().any(|e| matches!(e.kind, Some(pb::job_event::Kind::Retrying(_)))), "{events:#?}");
    assert!(started_machine(&events).iter().all(|m| m == &machine), "{events:#?}");
    assert_eq!(acc.emu.machines_launched(), 1, "the adopted machine finished the job; nothing launched");
    acc.finish(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_comfyrelay_does_not_manage_are_listed_as_unmanaged_and_left_alone() {
    let acc = Account::new(fast_emulator(Duration::ZERO)).await;
    let theirs =
        acc.emu.launch_by_someone_else(DEFAULT_WORKFLOW_VERSION_ID, "large", Duration::from_secs(600));
    eventually("their server is ready", Duration::from_secs(10), || {
        acc.emu.machines().iter().any(|m| m.server_id == theirs && m.status == "Ready")
    })
    .await;
    let (p, _) = acc.start().await;
    let unmanaged = pb::MachineState::Unmanaged as i32;
    let is_theirs = |m: &pb::Machine| m.id == theirs && m.state == unmanaged;
    p.machines_when("their server is listed as unmanaged", |l| l.iter().any(is_theirs)).await;
    // Listed among current machines (it bills), with what the API tells of it, but not its URL.
    let mut machines = p.machines().await;
    let listed = machines.list_machines(pb::ListMachinesRequest::default()).await.unwrap().into_inner();
    let m = listed.machines.iter().find(|m| m.id == theirs).expect("listed without include_stopped").clone();
    assert_eq!((m.kind, m.server_type.as_str()), (pb::MachineKind::Runcomfy as i32, "large"), "{m:?}");
    assert!(m.comfy_url.is_empty(), "an unmanaged machine's URL is its credential: {m:?}");
    assert!(m.ready_time.is_some() && m.lease_expire_time.is_some(), "{m:?}");
    assert!(m.billed_seconds > 0.0 && m.cost.as_ref().is_some_and(|c| c.amount > 0.0), "{m:?}");
    let got = machines.get_machine(pb::GetMachineRequest { machine_id: theirs.clone() }).await.unwrap();
    assert_eq!(got.into_inner().state, unmanaged);
    // Operators cannot drain what comfyrelay does not manage.
    let err =
        machines.drain_machine(pb::DrainMachineRequest { machine_id: theirs.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err =
        machines.undrain_machine(pb::UndrainMachineRequest { machine_id: theirs.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    acc.finish_leaving(p, &theirs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_pool_machine_can_be_undrained_until_it_is_being_stopped() {
    let acc = Account::new(fast_emulator(Duration::from_millis(500))).await;
    let (p, channel) = acc.start().await;
    let first = submit(&p).await;
    executing(&channel, &first).await;
    let id = acc.emu.machines()[0].server_id.clone();
    let mut machines = p.machines().await;
    // Drained while it runs a job: it is not stopped before the job ends, so it can be undrained.
    let drained = machines
        .drain_machine(pb::DrainMachineRequest { machine_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.state, pb::MachineState::Draining as i32, "{drained:?}");
    let undrained = machines
        .undrain_machine(pb::UndrainMachineRequest { machine_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(undrained.state, pb::MachineState::Ready as i32, "{undrained:?}");
    assert!(!undrained.draining, "{undrained:?}");
    assert_eq!(terminal(&collect_events(&channel, &first, 0).await), "succeeded");
    // It takes the next job: nothing else was launched.
    let second = collect_events(&channel, &submit(&p).await, 0).await;
    assert_eq!(terminal(&second), "succeeded", "{second:#?}");
    assert_eq!(started_machine(&second), vec![id.clone()]);
    assert_eq!(acc.emu.machines_launched(), 1);

    // Drained while idle, it is stopped: too late to undrain.
    machines.drain_machine(pb::DrainMachineRequest { machine_id: id.clone() }).await.unwrap();
    let stopped = pb::MachineState::Stopped as i32;
    p.machine_when(&id, "the idle drained machine is stopped", |m| m.state == stopped).await;
    let err =
        machines.undrain_machine(pb::UndrainMachineRequest { machine_id: id.clone() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err =
        machines.undrain_machine(pb::UndrainMachineRequest { machine_id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    acc.finish(p).await;
}
