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
const WORKFLOW: &str = "invert-rc";

/// A RunComfy emulator on 127.0.0.1:0.
async fn runcomfy(config: RunComfyEmulatorConfig) -> RunComfyEmulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    RunComfyEmulator::start(listener, config).await.expect("start RunComfy emulator")
}

/// A quick emulator: boots in 200 ms, generous rate limit, jobs take `node_delay` per node.
fn fast_emulator(node_delay: Duration) -> RunComfyEmulatorConfig {
    RunComfyEmulatorConfig {
        boot_time: Duration::from_millis(200),
        deleting_time: Duration::from_millis(50),
        requests_per_second: 200,
        burst: 200,
        comfyui: EmulatorConfig { node_delay, ..EmulatorConfig::default() },
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
    config.workflows_dir = workflows.to_path_buf();
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
struct Account {
    emu: RunComfyEmulator,
    config: Config,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Account {
    async fn new(emu: RunComfyEmulatorConfig) -> Self {
        let emu = runcomfy(emu).await;
        let (data, workflows) = (tempfile::tempdir().expect("tempdir"), workflows_dir());
        let config = pool_config(data.path(), workflows.path(), &emu);
        Self { emu, config, _dirs: (data, workflows) }
    }

    /// Starts comfyrelay (again, after a stop or a kill: same data directory) and connects to it.
    async fn start(&self) -> (Process, Channel) {
        let p = Process::start(self.config.clone()).await;
        let channel = p.channel().await;
        (p, channel)
    }

    /// Stops comfyrelay gracefully; no machine may be left running at the provider.
    async fn finish(self, p: Process) {
        p.stop().await;
        let running = self.emu.running_machines();
        assert!(running.is_empty(), "a machine was left running: {running:?}");
        self.emu.shutdown().await;
    }
}

/// comfyrelay on its own runtime (a separate thread), so a test can kill it the way a crash would: every
/// task stops at once, nothing shuts down gracefully.
struct Process {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Process {
    async fn start(config: Config) -> Self {
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

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).expect("uri").connect().await.expect("connect")
    }

    async fn jobs(&self) -> pb::job_service_client::JobServiceClient<Channel> {
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
    async fn stop(mut self) {
        self.shutdown.cancel();
        let thread = self.thread.take().expect("running");
        tokio::task::spawn_blocking(move || thread.join().expect("comfyrelay thread")).await.expect("join");
    }

    /// Crash: every task dies where it is.
    async fn kill(mut self) {
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
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn submit(p: &Process) -> String {
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
    crate::helpers::wait_for_event(&channel, &id, |e| {
        matches!(e.kind, Some(pb::job_event::Kind::NodeStarted(_)))
    })
    .await;
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
