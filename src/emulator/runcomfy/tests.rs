//! The emulator's wire behaviour, checked with plain HTTP (not comfyrelay's client) on 127.0.0.1.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::*;

const STEP: Duration = Duration::from_millis(10);

async fn emulator(config: RunComfyEmulatorConfig) -> RunComfyEmulator {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    RunComfyEmulator::start(listener, config).await.unwrap()
}

fn fast() -> RunComfyEmulatorConfig {
    RunComfyEmulatorConfig { requests_per_second: 1000, burst: 1000, ..Default::default() }
}

struct Raw {
    http: reqwest::Client,
    base: String,
}

impl Raw {
    fn new(emu: &RunComfyEmulator) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: format!("{}/prod/api/users/{}", emu.url(), DEFAULT_USER_ID),
        }
    }

    async fn send_as(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(auth) = auth {
            req = req.header("Authorization", auth);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, _, body) =
            self.send_as(method, path, Some(&format!("Bearer {DEFAULT_TOKEN}")), body).await;
        (status, body)
    }
}

/// Timers land on millisecond ticks, so billed times are exact to within a few milliseconds.
fn assert_approx(actual: f64, expected: f64) {
    assert!((actual - expected).abs() < 0.05, "{actual} != {expected}");
}

fn launch_body(duration: u64) -> Value {
    json!({ "workflow_version_id": DEFAULT_WORKFLOW_VERSION_ID, "server_type": "medium", "estimated_duration": duration })
}

#[tokio::test(start_paused = true)]
async fn lifecycle_follows_the_reference_shapes_and_bills_ready_time() {
    let _ticker = PausedTimeTicker::start(STEP);
    let emu = emulator(RunComfyEmulatorConfig { boot_time: Duration::from_secs(120), ..fast() }).await;
    let raw = Raw::new(&emu);

    let (status, launched) = raw.send(Method::POST, "/servers", Some(launch_body(600))).await;
    assert_eq!(status, 200);
    let keys: Vec<&str> = launched.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "server_id",
            "estimated_duration",
            "server_type",
            "user_id",
            "main_service_url",
            "current_status",
            "service_ready_at",
            "estimated_stopping_at"
        ]
    );
    assert_eq!(launched["current_status"], "Starting");
    assert_eq!(launched["main_service_url"], Value::Null);
    assert_eq!(launched["service_ready_at"], Value::Null);
    let id = launched["server_id"].as_str().unwrap().to_string();
    let path = format!("/servers/{id}");

    tokio::time::sleep(Duration::from_secs(119)).await;
    assert_eq!(raw.send(Method::GET, &path, None).await.1["current_status"], "Starting");
    assert_eq!(emu.billed_seconds(&id), Some(0.0));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, ready) = raw.send(Method::GET, &path, None).await;
    assert_eq!(ready["current_status"], "Ready");
    let url = ready["main_service_url"].as_str().unwrap().to_string();
    let ready_at = humantime::parse_rfc3339(ready["service_ready_at"].as_str().unwrap()).unwrap();
    let stop_at = humantime::parse_rfc3339(ready["estimated_stopping_at"].as_str().unwrap()).unwrap();
    assert_eq!(stop_at.duration_since(ready_at).unwrap(), Duration::from_secs(600));
    assert!(ready["service_ready_at"].as_str().unwrap().ends_with('Z'));
    let stats = reqwest::get(format!("{url}/system_stats")).await.unwrap();
    assert!(stats.status().is_success());
    let (_, list) = raw.send(Method::GET, "/servers", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    tokio::time::sleep(Duration::from_secs(100)).await;
    let (status, deleting) = raw.send(Method::DELETE, &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(deleting["current_status"], "Deleting");
    assert!(reqwest::get(format!("{url}/system_stats")).await.is_err(), "ComfyUI stops with its machine");
    let billed = emu.billed_seconds(&id).unwrap();
    assert!((101.0..101.1).contains(&billed), "billed {billed}: Ready at 120 s, deleted at 221 s");

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(raw.send(Method::GET, &path, None).await.0, 404);
    assert_eq!(raw.send(Method::GET, "/servers", None).await.1, json!([]));
    assert!(emu.running_machines().is_empty());
    assert_eq!(emu.billed_seconds(&id), Some(billed), "billing stopped at DELETE");
    assert_eq!(emu.total_billed_seconds(), billed);
}

#[tokio::test]
async fn auth_and_unknown_routes_answer_like_the_gateway() {
    let emu = emulator(fast()).await;
    let raw = Raw::new(&emu);
    let (status, _, body) = raw.send_as(Method::GET, "/servers", None, None).await;
    assert_eq!((status, body), (401, json!({ "message": "Unauthorized" })));
    let (status, _, body) = raw.send_as(Method::GET, "/servers", Some("Bearer nope"), None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error_code"], 401001);

    let other = Raw { base: format!("{}/prod/api/users/someone-else", emu.url()), ..Raw::new(&emu) };
    let (status, body) = other.send(Method::GET, "/servers", None).await;
    assert_eq!(status, 403);
    assert_eq!(body["error_code"], 403003);

    let (status, body) = raw.send(Method::GET, "/machines", None).await;
    assert_eq!(status, 403);
    assert!(body["message"].as_str().unwrap().contains("Authorization header"));
    let (status, body) = raw.send(Method::PUT, "/servers", None).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn launch_validates_its_body() {
    let emu = emulator(fast()).await;
    let raw = Raw::new(&emu);
    let bad = [
        json!({ "server_type": "medium", "estimated_duration": 60 }),
        json!({ "workflow_version_id": "v", "server_type": "huge", "estimated_duration": 60 }),
        json!({ "workflow_version_id": "v", "server_type": "medium", "estimated_duration": 0 }),
    ];
    for body in bad {
        let (status, answer) = raw.send(Method::POST, "/servers", Some(body)).await;
        assert_eq!(status, 400);
        assert!(answer["error_message"].is_string());
    }
    assert_eq!(emu.machines_launched(), 0);
    let (status, workflows) = raw.send(Method::GET, "/workflows", None).await;
    assert_eq!(status, 200);
    assert_eq!(workflows[0]["version_id"], DEFAULT_WORKFLOW_VERSION_ID);
    assert!(workflows[0]["workflow_name"].is_string());
}

#[tokio::test(start_paused = true)]
async fn requests_above_the_rate_get_429_with_retry_after() {
    let _ticker = PausedTimeTicker::start(STEP);
    let emu =
        emulator(RunComfyEmulatorConfig { requests_per_second: 1, burst: 3, ..Default::default() }).await;
    let raw = Raw::new(&emu);
    let auth = format!("Bearer {DEFAULT_TOKEN}");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (status, headers, body) = raw.send_as(Method::GET, "/servers", Some(&auth), None).await;
        if status == 429 {
            assert_eq!(body["error_code"], "rate_limited");
            assert_eq!(headers["retry-after"], "1");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(emu.rate_limited_responses(), 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(raw.send_as(Method::GET, "/servers", Some(&auth), None).await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn machines_stop_themselves_at_estimated_stopping_at_unless_extended() {
    let _ticker = PausedTimeTicker::start(STEP);
    let emu = emulator(RunComfyEmulatorConfig { boot_time: Duration::from_secs(10), ..fast() }).await;
    let raw = Raw::new(&emu);
    let (_, a) = raw.send(Method::POST, "/servers", Some(launch_body(60))).await;
    let (_, b) = raw.send(Method::POST, "/servers", Some(launch_body(60))).await;
    let (a, b) = (a["server_id"].as_str().unwrap().to_string(), b["server_id"].as_str().unwrap().to_string());
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (status, extended) = raw
        .send(
            Method::POST,
            &format!("/servers/{b}/update-estimated-duration"),
            Some(json!({"update_estimated_duration": 120})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(extended["estimated_duration"], 120);
    let ready_at = humantime::parse_rfc3339(extended["service_ready_at"].as_str().unwrap()).unwrap();
    let stop_at = humantime::parse_rfc3339(extended["estimated_stopping_at"].as_str().unwrap()).unwrap();
    assert_eq!(stop_at.duration_since(ready_at).unwrap(), Duration::from_secs(120), "counted from ready");

    tokio::time::sleep(Duration::from_secs(60)).await;
    let running: Vec<String> = emu.running_machines().into_iter().map(|m| m.server_id).collect();
    assert_eq!(running.as_slice(), std::slice::from_ref(&b));
    assert_approx(emu.billed_seconds(&a).unwrap(), 60.0);
    assert!(emu.comfyui(&a).is_none());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(emu.running_machines().is_empty());
    assert_approx(emu.billed_seconds(&b).unwrap(), 120.0);
    assert_eq!(raw.send(Method::GET, &format!("/servers/{a}"), None).await.0, 404);
}

#[tokio::test(start_paused = true)]
async fn faults_fire_once_each_in_order() {
    let _ticker = PausedTimeTicker::start(STEP);
    let emu = emulator(fast()).await;
    let raw = Raw::new(&emu);
    emu.faults().fail_requests(1, 503);
    emu.faults().errors_in_200(1, 10001, "Insufficient funds");
    emu.faults().not_found_after_launch(1);
    emu.faults().fail_next_launch(LaunchFailure::CreatedButFailed);
    assert_eq!(raw.send(Method::GET, "/servers", None).await.0, 503);
    let (status, body) = raw.send(Method::GET, "/servers", None).await;
    assert_eq!((status, body["error_code"].as_i64()), (200, Some(10001)));
    assert_eq!(raw.send(Method::POST, "/servers", Some(launch_body(60))).await.0, 500);
    let (_, list) = raw.send(Method::GET, "/servers", None).await;
    let id = list[0]["server_id"].as_str().unwrap().to_string();
    assert_eq!(raw.send(Method::GET, &format!("/servers/{id}"), None).await.0, 404);
    assert_eq!(raw.send(Method::GET, &format!("/servers/{id}"), None).await.0, 200);

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(emu.kill_machine(&id).await);
    let (_, server) = raw.send(Method::GET, &format!("/servers/{id}"), None).await;
    assert_eq!(server["current_status"], "Ready", "a dead machine still looks Ready");
    let url = server["main_service_url"].as_str().unwrap();
    assert!(reqwest::get(format!("{url}/system_stats")).await.is_err());
}

#[tokio::test]
async fn run_standalone_serves_until_cancelled() {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_standalone("127.0.0.1:0".parse().unwrap(), fast(), shutdown.clone()));
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn deleting_a_starting_machine_bills_nothing_and_never_boots_it() {
    let _ticker = PausedTimeTicker::start(STEP);
    let emu = emulator(RunComfyEmulatorConfig { boot_time: Duration::from_secs(60), ..fast() }).await;
    let raw = Raw::new(&emu);
    let (_, launched) = raw.send(Method::POST, "/servers", Some(launch_body(600))).await;
    let id = launched["server_id"].as_str().unwrap().to_string();
    let (status, extended) = raw
        .send(
            Method::POST,
            &format!("/servers/{id}/update-estimated-duration"),
            Some(json!({"update_estimated_duration": 900})),
        )
        .await;
    assert_eq!((status, extended["estimated_duration"].as_u64()), (200, Some(900)));
    assert_eq!(extended["estimated_stopping_at"], Value::Null, "no stop time before Ready");
    let (status, deleting) = raw.send(Method::DELETE, &format!("/servers/{id}"), None).await;
    assert_eq!((status, deleting["current_status"].as_str()), (200, Some("Deleting")));
    tokio::time::sleep(Duration::from_secs(120)).await;
    let machine = &emu.machines()[0];
    assert_eq!(
        (machine.status, machine.main_service_url.as_deref(), machine.billed),
        ("Gone", None, Duration::ZERO)
    );
}

#[tokio::test(start_paused = true)]
async fn another_client_of_the_account_launches_and_deletes_machines() {
    let _ticker = PausedTimeTicker::start(STEP);
    let emu = emulator(fast()).await;
    let raw = Raw::new(&emu);
    let id = emu.launch_by_someone_else(DEFAULT_WORKFLOW_VERSION_ID, "large", Duration::from_secs(600));
    let (_, list) = raw.send(Method::GET, "/servers", None).await;
    assert_eq!((list[0]["server_id"].as_str(), list[0]["server_type"].as_str()), (Some(&*id), Some("large")));
    assert_eq!(list[0]["estimated_duration"], 600);
    assert_eq!(emu.requests_received(), 1, "the other client's launch is not one of our requests");
    assert!(emu.delete_by_someone_else(&id).await);
    assert!(emu.delete_requests().is_empty(), "no DELETE came through the API");
    raw.send(Method::DELETE, &format!("/servers/{id}"), None).await;
    assert_eq!(emu.delete_requests(), vec![id]);
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_machine_is_404_and_unlisted_while_its_comfyui_answers() {
    let _ticker = PausedTimeTicker::start(STEP);
    let emu = emulator(fast()).await;
    let raw = Raw::new(&emu);
    let (_, launched) = raw.send(Method::POST, "/servers", Some(launch_body(600))).await;
    let id = launched["server_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, server) = raw.send(Method::GET, &format!("/servers/{id}"), None).await;
    let url = server["main_service_url"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(emu.forget_machine(&id));
    assert_eq!(raw.send(Method::GET, &format!("/servers/{id}"), None).await.0, 404);
    assert_eq!(raw.send(Method::GET, "/servers", None).await.1, json!([]));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_approx(emu.billed_seconds(&id).unwrap(), 5.0);
    assert!(reqwest::get(format!("{url}/system_stats")).await.unwrap().status().is_success());
    assert!(emu.running_machines().is_empty());
}

#[tokio::test(start_paused = true)]
async fn stalled_launches_and_an_unreachable_api_answer_nothing_until_released() {
    let _ticker = PausedTimeTicker::start(STEP);
    let emu = emulator(fast()).await;
    let raw = std::sync::Arc::new(Raw::new(&emu));
    emu.faults().fail_next_launch(LaunchFailure::Stalled(Duration::from_secs(30)));
    let held = tokio::spawn({
        let raw = raw.clone();
        async move { raw.send(Method::POST, "/servers", Some(launch_body(600))).await.0 }
    });
    while emu.launches_in_flight() == 0 {
        tokio::time::sleep(STEP).await;
    }
    assert_eq!(held.await.unwrap(), 504);
    assert_eq!(
        (emu.machines_launched(), emu.launches_in_flight()),
        (0, 0),
        "a stalled launch creates nothing"
    );

    emu.faults().set_unreachable(true);
    let pending = tokio::spawn({
        let raw = raw.clone();
        async move { raw.send(Method::GET, "/servers", None).await.0 }
    });
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!pending.is_finished(), "no answer while unreachable");
    emu.faults().set_unreachable(false);
    assert_eq!(pending.await.unwrap(), 504);
    assert_eq!(raw.send(Method::GET, "/servers", None).await.0, 200);
}

#[tokio::test(start_paused = true)]
async fn auth_errors_can_quote_the_presented_token() {
    let _ticker = PausedTimeTicker::start(STEP);
    let emu = emulator(fast()).await;
    let raw = Raw::new(&emu);
    emu.faults().echo_token_in_auth_errors(true);
    let (status, _, body) = raw.send_as(Method::GET, "/servers", Some("Bearer rc_wrong_secret"), None).await;
    assert_eq!(status, 401);
    assert!(body["error_message"].as_str().unwrap().contains("rc_wrong_secret"), "{body}");
}
