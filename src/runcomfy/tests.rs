//! The client against the emulated RunComfy Server API on 127.0.0.1, mostly under paused time.

use std::time::Duration;

use tokio::{net::TcpListener, time::Instant};

use super::*;
use crate::{
    config::Secret,
    emulator::runcomfy::{
        DEFAULT_TOKEN, DEFAULT_USER_ID, DEFAULT_WORKFLOW_VERSION_ID, LaunchFailure, PausedTimeTicker,
        RunComfyEmulator, RunComfyEmulatorConfig,
    },
};

const STEP: Duration = Duration::from_millis(50);

struct Harness {
    emu: RunComfyEmulator,
    client: RunComfyClient,
    _ticker: PausedTimeTicker,
}

async fn harness(config: RunComfyEmulatorConfig, tweak: impl FnOnce(&mut ClientOptions)) -> Harness {
    let ticker = PausedTimeTicker::start(STEP);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emu = RunComfyEmulator::start(listener, config).await.unwrap();
    let mut options = ClientOptions {
        base_url: emu.url(),
        user_id: DEFAULT_USER_ID.into(),
        api_token: Secret::new(DEFAULT_TOKEN),
        ..ClientOptions::default()
    };
    tweak(&mut options);
    Harness { client: RunComfyClient::new(options).unwrap(), emu, _ticker: ticker }
}

fn request(duration_s: u64) -> LaunchRequest {
    LaunchRequest {
        workflow_version_id: DEFAULT_WORKFLOW_VERSION_ID.into(),
        server_type: ServerType::Large,
        estimated_duration: Duration::from_secs(duration_s),
    }
}

fn boot(secs: u64) -> RunComfyEmulatorConfig {
    RunComfyEmulatorConfig { boot_time: Duration::from_secs(secs), ..RunComfyEmulatorConfig::default() }
}

fn assert_approx(actual: f64, expected: f64) {
    assert!((actual - expected).abs() < 0.05, "{actual} != {expected}");
}

#[tokio::test(start_paused = true)]
async fn full_lifecycle_launch_ready_comfyui_delete_gone_billed() {
    let h = harness(boot(120), |_| {}).await;
    let workflows = h.client.list_workflows().await.unwrap();
    assert_eq!(workflows[0].version_id, DEFAULT_WORKFLOW_VERSION_ID);

    let launched = h.client.launch(&request(3600)).await.unwrap();
    assert_eq!(launched.current_status, ServerStatus::Starting);
    assert_eq!(launched.server_type, Some(ServerType::Large));
    assert_eq!(launched.main_service_url, None);

    let ready = h.client.wait_ready(&launched.server_id, Duration::from_secs(600)).await.unwrap();
    assert!(ready.current_status.is_ready());
    let url = ready.main_service_url.clone().unwrap();
    let stats = reqwest::get(format!("{url}/system_stats")).await.unwrap();
    assert!(stats.status().is_success(), "ComfyUI serves on main_service_url");
    assert_eq!(
        ready.estimated_stopping_at.unwrap().since(ready.service_ready_at.unwrap()),
        Duration::from_secs(3600)
    );
    let listed = h.client.list_servers().await.unwrap();
    assert_eq!(listed.iter().map(|s| &s.server_id).collect::<Vec<_>>(), [&launched.server_id]);

    tokio::time::sleep(Duration::from_secs(300)).await;
    let outcome = h.client.delete_server(&launched.server_id).await.unwrap();
    let DeleteOutcome::Deleting(deleting) = outcome else { panic!("{outcome:?}") };
    assert_eq!(deleting.current_status, ServerStatus::Deleting);
    assert!(reqwest::get(format!("{url}/system_stats")).await.is_err(), "ComfyUI stopped with the machine");
    let billed = h.emu.billed_seconds(&launched.server_id).unwrap();
    assert!((300.0..330.0).contains(&billed), "billed {billed}");

    tokio::time::sleep(Duration::from_secs(10)).await;
    match h.client.get_server(&launched.server_id).await {
        Err(RunComfyError::NotFound { server_id }) => assert_eq!(server_id, launched.server_id),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.client.delete_server(&launched.server_id).await.unwrap(), DeleteOutcome::AlreadyGone);
    assert!(h.client.list_servers().await.unwrap().is_empty());
    assert!(h.emu.running_machines().is_empty());
    assert_eq!(h.emu.billed_seconds(&launched.server_id), Some(billed));
    assert_eq!(h.emu.rate_limited_responses(), 0);
}

#[tokio::test(start_paused = true)]
async fn auth_failures_are_typed_and_not_retried() {
    let h = harness(boot(1), |o| o.api_token = Secret::new("wrong")).await;
    let err = h.client.list_servers().await.unwrap_err();
    assert!(matches!(err, RunComfyError::Unauthorized { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(!err.to_string().contains("wrong"), "the token is never echoed");

    let other = RunComfyClient::new(ClientOptions {
        user_id: "someone-else".into(),
        api_token: Secret::new(DEFAULT_TOKEN),
        ..h.client.options().clone()
    })
    .unwrap();
    let err = other.get_server("x").await.unwrap_err();
    assert!(matches!(err, RunComfyError::Forbidden { .. }), "{err:?}");
    assert_eq!(h.emu.requests_received(), 2, "no retries of auth failures");
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_20_calls_stays_within_the_limit() {
    // Emulator: 1 request/s, bursts of 3. Client: 1 request/s, bursts of 1, shared by every clone.
    let h = harness(boot(1), |_| {}).await;
    let start = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let client = h.client.clone();
        calls.spawn(async move { client.list_servers().await });
    }
    while let Some(result) = calls.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(h.emu.rate_limited_responses(), 0, "no 429 was even sent");
    assert_eq!(h.emu.requests_received(), 20);
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(19) && elapsed < Duration::from_secs(21), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn a_429_storm_is_ridden_out_honouring_retry_after() {
    let h = harness(boot(1), |_| {}).await;
    h.emu.faults().rate_limit_requests(4, Duration::from_secs(7));
    let start = Instant::now();
    let (a, b) = tokio::join!(h.client.list_servers(), h.client.list_workflows());
    a.unwrap();
    b.unwrap();
    assert_eq!(h.emu.rate_limited_responses(), 4);
    // Every 429 blocks the whole account for Retry-After; the four arrive one after another.
    assert!(start.elapsed() >= Duration::from_secs(28), "{:?}", start.elapsed());

    // A real storm: a client far faster than the account's limit still gets every answer.
    let fast = RunComfyClient::new(ClientOptions {
        requests_per_second: 50,
        burst: 50,
        ..h.client.options().clone()
    })
    .unwrap();
    let before = h.emu.rate_limited_responses();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let client = fast.clone();
        calls.spawn(async move { client.list_servers().await });
    }
    while let Some(result) = calls.join_next().await {
        result.unwrap().unwrap();
    }
    assert!(h.emu.rate_limited_responses() > before, "the storm did hit the limit");
}

#[tokio::test(start_paused = true)]
async fn transient_5xx_bursts_are_retried() {
    let h = harness(boot(1), |_| {}).await;
    h.emu.faults().fail_requests(3, 503);
    assert!(h.client.list_servers().await.unwrap().is_empty());
    assert_eq!(h.emu.requests_received(), 4);

    h.emu.faults().fail_requests(10, 502);
    let err = h.client.list_servers().await.unwrap_err();
    assert!(matches!(err, RunComfyError::Http { status: 502, .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_404_right_after_launch_is_tolerated() {
    let h = harness(boot(30), |_| {}).await;
    h.emu.faults().not_found_after_launch(3);
    let launched = h.client.launch(&request(600)).await.unwrap();
    let got = h.client.get_server(&launched.server_id).await.unwrap();
    assert_eq!(got.server_id, launched.server_id);
    // An unknown server (not launched by us) is reported at once.
    let err = h.client.get_server("00000000-0000-0000-0000-000000000000").await.unwrap_err();
    assert!(matches!(err, RunComfyError::NotFound { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn errors_in_200_bodies_are_typed() {
    let h = harness(boot(1), |_| {}).await;
    h.emu.faults().errors_in_200(1, 10001, "Insufficient funds");
    match h.client.list_servers().await {
        Err(RunComfyError::Api { http_status: 200, code, message }) => {
            assert_eq!(code, "10001");
            assert_eq!(message, "Insufficient funds");
        }
        other => panic!("{other:?}"),
    }
    // An internal error carried in a 200 is transient: retried.
    h.emu.faults().errors_in_200(1, 500001, "Internal error");
    assert!(h.client.list_servers().await.is_ok());
    // And a launch answered that way is not blindly repeated: nothing was created, so exactly one launch.
    h.emu.faults().errors_in_200(1, 500001, "Internal error");
    h.client.launch(&request(600)).await.unwrap();
    assert_eq!(h.emu.machines_launched(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_launch_failure_does_not_launch_twice() {
    let h = harness(boot(60), |o| o.request_timeout = Duration::from_secs(10)).await;
    h.emu.faults().fail_next_launch(LaunchFailure::CreatedButFailed);
    let a = h.client.launch(&request(600)).await.unwrap();
    assert_eq!(h.emu.machines_launched(), 1);
    assert_eq!(h.emu.machines()[0].server_id, a.server_id);

    h.emu.faults().fail_next_launch(LaunchFailure::CreatedButStalled(Duration::from_secs(60)));
    let b = h.client.launch(&request(600)).await.unwrap();
    assert_eq!(h.emu.machines_launched(), 2, "the stalled launch was adopted, not repeated");
    assert_ne!(a.server_id, b.server_id);
    assert_eq!(h.emu.machines()[1].server_id, b.server_id);

    // A launch that really did not happen is repeated, once.
    h.emu.faults().fail_next_launch(LaunchFailure::Rejected);
    let c = h.client.launch(&request(600)).await.unwrap();
    assert_eq!(h.emu.machines_launched(), 3);
    assert_eq!(h.emu.machines()[2].server_id, c.server_id);
    assert_eq!(h.emu.running_machines().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn machines_stop_at_estimated_stopping_at() {
    let h = harness(boot(60), |_| {}).await;
    let launched = h.client.launch(&request(600)).await.unwrap();
    let ready = h.client.wait_ready(&launched.server_id, Duration::from_secs(300)).await.unwrap();
    let url = ready.main_service_url.unwrap();
    tokio::time::sleep(Duration::from_secs(590)).await;
    assert!(h.client.get_server(&launched.server_id).await.unwrap().current_status.is_ready());
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = h.client.get_server(&launched.server_id).await;
    assert!(
        matches!(&after, Ok(s) if s.current_status == ServerStatus::Deleting)
            || matches!(&after, Err(RunComfyError::NotFound { .. })),
        "stopped by itself: {after:?}"
    );
    assert!(reqwest::get(format!("{url}/system_stats")).await.is_err());
    assert_approx(h.emu.billed_seconds(&launched.server_id).unwrap(), 600.0);
    assert!(h.emu.running_machines().is_empty());
}

#[tokio::test(start_paused = true)]
async fn update_estimated_duration_extends_the_machine() {
    let h = harness(boot(60), |_| {}).await;
    let launched = h.client.launch(&request(600)).await.unwrap();
    h.client.wait_ready(&launched.server_id, Duration::from_secs(300)).await.unwrap();
    let updated =
        h.client.update_estimated_duration(&launched.server_id, Duration::from_secs(1800)).await.unwrap();
    assert_eq!(updated.estimated_duration, Some(1800));
    assert_eq!(
        updated.estimated_stopping_at.unwrap().since(updated.service_ready_at.unwrap()),
        Duration::from_secs(1800),
        "the new duration replaces the old one, counted from service_ready_at"
    );
    tokio::time::sleep(Duration::from_secs(1000)).await;
    assert!(h.client.get_server(&launched.server_id).await.unwrap().current_status.is_ready());
    tokio::time::sleep(Duration::from_secs(900)).await;
    assert!(h.emu.running_machines().is_empty());
    assert_approx(h.emu.billed_seconds(&launched.server_id).unwrap(), 1800.0);
}

#[tokio::test(start_paused = true)]
async fn waiting_for_a_machine_that_never_boots_times_out() {
    let h = harness(boot(60), |o| o.ready_poll_interval = Duration::from_secs(10)).await;
    h.emu.faults().never_ready(1);
    let launched = h.client.launch(&request(600)).await.unwrap();
    let err = h.client.wait_ready(&launched.server_id, Duration::from_secs(300)).await.unwrap_err();
    assert!(
        matches!(&err, RunComfyError::ReadyTimeout { last_status, .. } if last_status == "Starting"),
        "{err:?}"
    );
    h.client.delete_server(&launched.server_id).await.unwrap();
    assert_eq!(h.emu.total_billed_seconds(), 0.0, "never billed while Starting");

    // A machine deleted while we wait ends the wait at once.
    let launched = h.client.launch(&request(600)).await.unwrap();
    let waiter = {
        let client = h.client.clone();
        let id = launched.server_id.clone();
        tokio::spawn(async move { client.wait_ready(&id, Duration::from_secs(600)).await })
    };
    h.client.delete_server(&launched.server_id).await.unwrap();
    let err = waiter.await.unwrap().unwrap_err();
    assert!(matches!(err, RunComfyError::ServerEnded { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_dead_machine_still_reports_ready() {
    let h = harness(boot(10), |_| {}).await;
    h.emu.faults().die_after_ready(Duration::from_secs(30));
    let launched = h.client.launch(&request(600)).await.unwrap();
    let ready = h.client.wait_ready(&launched.server_id, Duration::from_secs(60)).await.unwrap();
    let url = ready.main_service_url.unwrap();
    assert!(reqwest::get(format!("{url}/system_stats")).await.is_ok());
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(reqwest::get(format!("{url}/system_stats")).await.is_err());
    assert!(h.client.get_server(&launched.server_id).await.unwrap().current_status.is_ready());
    assert_eq!(h.emu.running_machines().len(), 1, "billed until deleted");
}

#[tokio::test(start_paused = true)]
async fn a_429_without_retry_after_waits_the_default() {
    let config = RunComfyEmulatorConfig { send_retry_after: false, ..boot(1) };
    let h = harness(config, |o| o.default_retry_after = Duration::from_secs(9)).await;
    h.emu.faults().rate_limit_requests(2, Duration::from_secs(1));
    let start = Instant::now();
    h.client.list_servers().await.unwrap();
    assert!(start.elapsed() >= Duration::from_secs(18), "{:?}", start.elapsed());
    assert_eq!(h.emu.rate_limited_responses(), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_launches_get_distinct_machines_even_when_one_is_ambiguous() {
    let h = harness(boot(30), |o| o.request_timeout = Duration::from_secs(10)).await;
    h.emu.faults().fail_next_launch(LaunchFailure::CreatedButStalled(Duration::from_secs(60)));
    let mut launches = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let client = h.client.clone();
        launches.spawn(async move { client.launch(&request(600)).await.map(|s| s.server_id) });
    }
    let mut ids = Vec::new();
    while let Some(result) = launches.join_next().await {
        ids.push(result.unwrap().unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each launch adopted its own machine");
    assert_eq!(h.emu.machines_launched(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_launch_refused_every_time_with_no_machine_listed_is_certain() {
    let h = harness(boot(30), |_| {}).await;
    for _ in 0..3 {
        h.emu.faults().fail_next_launch(LaunchFailure::Rejected);
    }
    let err = h.client.launch(&request(600)).await.unwrap_err();
    assert!(matches!(err, RunComfyError::NotLaunched { attempts: 3, .. }), "{err:?}");
    assert!(!err.is_ambiguous() && !err.is_retryable(), "{err:?}");
    assert_eq!(h.emu.machines_launched(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_launch_is_not_attributed_when_another_client_launched_alike() {
    let h = harness(boot(30), |_| {}).await;
    // Another client launches the same type and duration after our list and before our launch's answer.
    let before: std::collections::HashSet<String> =
        h.client.list_servers().await.unwrap().into_iter().map(|s| s.server_id).collect();
    h.emu.launch_by_someone_else(DEFAULT_WORKFLOW_VERSION_ID, "large", Duration::from_secs(600));
    h.emu.faults().fail_next_launch(LaunchFailure::CreatedButFailed);
    let no_stop = tokio_util::sync::CancellationToken::new();
    let err = h.client.launch_from(&request(600), before, &no_stop).await.unwrap_err();
    assert!(matches!(err, RunComfyError::Unattributable { candidates: 2 }), "{err:?}");
    assert!(err.is_ambiguous(), "a machine may exist: {err:?}");
    assert_eq!(h.emu.machines_launched(), 2, "not launched again");
}

#[tokio::test(start_paused = true)]
async fn a_404_after_the_api_knew_the_server_is_reported_at_once() {
    let h = harness(boot(1), |_| {}).await;
    let launched = h.client.launch(&request(600)).await.unwrap();
    h.client.wait_ready(&launched.server_id, Duration::from_secs(60)).await.unwrap();
    assert!(h.emu.forget_machine(&launched.server_id));
    let asked = Instant::now();
    let err = h.client.get_server(&launched.server_id).await.unwrap_err();
    assert!(matches!(err, RunComfyError::NotFound { .. }), "{err:?}");
    assert!(asked.elapsed() < h.client.options().not_found_poll, "no grace once the API knew it");
}
