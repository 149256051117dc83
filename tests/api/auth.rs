//! Authentication, tenants, roles and quotas through gRPC (and gRPC-Web, and the built binary): no key, a
//! wrong, revoked or expired key are UNAUTHENTICATED on every RPC while health and reflection answer; a
//! tenant never sees another's jobs; quotas refuse with RetryInfo; a flooding tenant does not delay
//! another's job beyond one dispatch; `serve` refuses to run without authentication off loopback; keys
//! are managed by `comfyrelay keys`; no key or token reaches a log line or an error.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command as StdCommand, Stdio},
    time::Duration,
};

use comfyrelay::{auth::Role, config::TenantOverride, proto::pb};
use futures::StreamExt as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::helpers::{Clients, TestApp, png, spawn_app_with_auth, submit_request};

/// Calls every RPC of the three services once; returns each one's outcome (Ok, or the error's status).
async fn call_every_rpc(c: &mut Clients) -> Vec<(&'static str, Result<(), Status>)> {
    let id = comfyrelay::jobs::JobId::new().to_string();
    let ok = |r: Result<(), Status>| r;
    vec![
        ("SubmitJob", ok(c.jobs.submit_job(submit_request("invert", png(4, 4))).await.map(drop))),
        (
            "StreamJob",
            ok(c.jobs
                .stream_job(pb::StreamJobRequest { job_id: id.clone(), ..Default::default() })
                .await
                .map(drop)),
        ),
        ("GetJob", ok(c.jobs.get_job(pb::GetJobRequest { job_id: id.clone() }).await.map(drop))),
        ("ListJobs", ok(c.jobs.list_jobs(pb::ListJobsRequest::default()).await.map(drop))),
        (
            "CancelJob",
            ok(c.jobs
                .cancel_job(pb::CancelJobRequest { job_id: id.clone(), reason: String::new() })
                .await
                .map(drop)),
        ),
        (
            "DownloadOutput",
            ok(c.jobs
                .download_output(pb::DownloadOutputRequest {
                    job_id: id.clone(),
                    filename: "out.png".into(),
                    chunk_size: 0,
                    offset: 0,
                })
                .await
                .map(drop)),
        ),
        (
            "ListWorkflows",
            ok(c.workflows.list_workflows(pb::ListWorkflowsRequest::default()).await.map(drop)),
        ),
        (
            "GetWorkflow",
            ok(c.workflows.get_workflow(pb::GetWorkflowRequest { name: "invert".into() }).await.map(drop)),
        ),
        ("ListMachines", ok(c.machines.list_machines(pb::ListMachinesRequest::default()).await.map(drop))),
        (
            "GetMachine",
            ok(c.machines.get_machine(pb::GetMachineRequest { machine_id: "nope".into() }).await.map(drop)),
        ),
        (
            "DrainMachine",
            ok(c.machines
                .drain_machine(pb::DrainMachineRequest { machine_id: "nope".into() })
                .await
                .map(drop)),
        ),
        (
            "UndrainMachine",
            ok(c.machines
                .undrain_machine(pb::UndrainMachineRequest { machine_id: "nope".into() })
                .await
                .map(drop)),
        ),
    ]
}

fn code_of(r: &Result<(), Status>) -> Code {
    match r {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn no_wrong_revoked_or_expired_key_is_unauthenticated_on_every_rpc_while_health_and_reflection_answer()
{
    let app = spawn_app_with_auth(|_| {}).await;
    let admin = app.create_key("ops", Role::Admin, false).await;
    let revoked = app.create_key("ops", Role::Admin, false).await;
    app.revoke_key(&revoked).await;
    let expired = app.create_key("ops", Role::Admin, true).await;
    let prefix = comfyrelay::auth::parse_key(&admin).unwrap();
    let wrong_secret = format!("Bearer cr_{prefix}_{}", "0".repeat(64));
    let unknown = format!("Bearer cr_00000000_{}", "1".repeat(64));

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no key", None, "API_KEY_MISSING"),
        ("not a key", Some("Bearer hunter2".into()), "API_KEY_MALFORMED"),
        ("not bearer", Some(format!("Basic {admin}")), "API_KEY_MALFORMED"),
        ("unknown prefix", Some(unknown), "API_KEY_UNKNOWN"),
        ("wrong secret", Some(wrong_secret), "API_KEY_UNKNOWN"),
        ("revoked", Some(format!("Bearer {revoked}")), "API_KEY_REVOKED"),
        ("expired", Some(format!("Bearer {expired}")), "API_KEY_EXPIRED"),
    ];
    for (case, header, reason) in cases {
        let mut clients = app.clients_with_header(header.as_deref());
        for (rpc, result) in call_every_rpc(&mut clients).await {
            let Err(status) = result else { panic!("{case}: {rpc} answered without a valid key") };
            assert_eq!(status.code(), Code::Unauthenticated, "{case}: {rpc}: {status:?}");
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, reason, "{case}: {rpc}");
            for secret in [&admin, &revoked, &expired] {
                assert!(!format!("{status:?}").contains(secret.as_str()), "{case}: {rpc} echoes a key");
            }
        }
    }

    // The valid key passes the layer on every RPC (whatever the handler then says).
    let mut clients = app.clients(&admin);
    for (rpc, result) in call_every_rpc(&mut clients).await {
        assert!(
            !matches!(code_of(&result), Code::Unauthenticated | Code::PermissionDenied),
            "{rpc} refused an admin: {result:?}"
        );
    }

    // Health and reflection answer without a key.
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let health = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("health answers without a key");
    assert_eq!(health.into_inner().status, 1, "SERVING");
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection answers without a key")
        .into_inner();
    assert!(reflection.message().await.expect("a reflection response").is_some());

    // gRPC-Web carries the same metadata: refused without a key, answered with one.
    let web = |key: Option<&str>| {
        let mut req = reqwest::Client::new()
            .post(format!("http://{}/comfyrelay.v1.WorkflowService/ListWorkflows", app.addr))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(vec![0u8, 0, 0, 0, 0]);
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        req.send()
    };
    let refused = web(None).await.expect("grpc-web request");
    assert_eq!(refused.headers().get("grpc-status").and_then(|v| v.to_str().ok()), Some("16"));
    let answered = web(Some(&admin)).await.expect("grpc-web request");
    assert_eq!(answered.status(), 200);
    assert!(answered.headers().get("grpc-status").is_none(), "{:?}", answered.headers());
    let body = answered.bytes().await.expect("grpc-web body");
    assert!(String::from_utf8_lossy(&body).contains("grpc-status:0"), "trailers in the body: {body:?}");
}

/// Follows a job to its end with `clients`; returns the final job.
async fn finished(c: &mut Clients, job_id: &str) -> pb::Job {
    let mut stream = c
        .jobs
        .stream_job(pb::StreamJobRequest { job_id: job_id.into(), ..Default::default() })
        .await
        .expect("stream_job")
        .into_inner();
    tokio::time::timeout(Duration::from_secs(60), async {
        while stream.message().await.expect("event").is_some() {}
    })
    .await
    .expect("the job ends within 60 s");
    c.jobs.get_job(pb::GetJobRequest { job_id: job_id.into() }).await.expect("get_job").into_inner()
}

#[tokio::test]
async fn a_tenant_cannot_see_stream_download_cancel_list_or_reuse_the_request_id_of_another_and_an_admin_sees_both()
 {
    let app = spawn_app_with_auth(|_| {}).await;
    let mut a = app.clients(&app.create_key("team-a", Role::Submitter, false).await);
    let mut b = app.clients(&app.create_key("team-b", Role::Submitter, false).await);
    let mut admin = app.clients(&app.create_key("ops", Role::Admin, false).await);
    let mut viewer_a = app.clients(&app.create_key("team-a", Role::Viewer, false).await);

    let mut req = submit_request("invert", png(8, 8));
    req.request_id = "shared-request-id".into();
    req.labels.insert("team".into(), "shared".into());
    let job_a = a.jobs.submit_job(req.clone()).await.expect("A submits").into_inner();
    let done = finished(&mut a, &job_a.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    let filename = done.outputs[0].filename.clone();

    // B: A's job does not exist.
    let not_found = |r: Result<(), Status>, what: &str| {
        let status = r.expect_err(what);
        assert_eq!(status.code(), Code::NotFound, "{what}: {status:?}");
    };
    not_found(b.jobs.get_job(pb::GetJobRequest { job_id: job_a.id.clone() }).await.map(drop), "GetJob");
    not_found(
        b.jobs
            .stream_job(pb::StreamJobRequest { job_id: job_a.id.clone(), ..Default::default() })
            .await
            .map(drop),
        "StreamJob",
    );
    not_found(
        b.jobs
            .cancel_job(pb::CancelJobRequest { job_id: job_a.id.clone(), reason: String::new() })
            .await
            .map(drop),
        "CancelJob",
    );
    not_found(
        b.jobs
            .download_output(pb::DownloadOutputRequest {
                job_id: job_a.id.clone(),
                filename: filename.clone(),
                chunk_size: 0,
                offset: 0,
            })
            .await
            .map(drop),
        "DownloadOutput",
    );
    let listed = |c: &mut Clients| {
        let mut jobs = c.jobs.clone();
        async move {
            let all = jobs.list_jobs(pb::ListJobsRequest::default()).await.expect("list").into_inner().jobs;
            let labelled = jobs
                .list_jobs(pb::ListJobsRequest {
                    labels: [("team".to_string(), "shared".to_string())].into(),
                    ..Default::default()
                })
                .await
                .expect("list by label")
                .into_inner()
                .jobs;
            (
                all.into_iter().map(|j| j.id).collect::<Vec<_>>(),
                labelled.into_iter().map(|j| j.id).collect::<Vec<_>>(),
            )
        }
    };
    let (all_b, labelled_b) = listed(&mut b).await;
    assert!(!all_b.contains(&job_a.id) && labelled_b.is_empty(), "B lists A's job: {all_b:?} {labelled_b:?}");

    // The same request id is B's own: a new job, not A's.
    let job_b = b.jobs.submit_job(req.clone()).await.expect("B submits").into_inner();
    assert_ne!(job_b.id, job_a.id, "B reached A's job through its request id");
    // And within A it still finds A's job.
    let again = a.jobs.submit_job(req.clone()).await.expect("A repeats").into_inner();
    assert_eq!(again.id, job_a.id);
    finished(&mut b, &job_b.id).await;

    // A's own listing and download work.
    let (all_a, labelled_a) = listed(&mut a).await;
    assert_eq!((all_a.clone(), labelled_a), (vec![job_a.id.clone()], vec![job_a.id.clone()]));
    let mut chunks = a
        .jobs
        .download_output(pb::DownloadOutputRequest {
            job_id: job_a.id.clone(),
            filename,
            chunk_size: 0,
            offset: 0,
        })
        .await
        .expect("A downloads")
        .into_inner();
    assert!(chunks.message().await.expect("a chunk").is_some());

    // The admin sees both.
    for id in [&job_a.id, &job_b.id] {
        admin.jobs.get_job(pb::GetJobRequest { job_id: id.clone() }).await.expect("admin reads every tenant");
    }
    let (all_admin, labelled_admin) = listed(&mut admin).await;
    for id in [&job_a.id, &job_b.id] {
        assert!(all_admin.contains(id) && labelled_admin.contains(id), "{all_admin:?}");
    }

    // Roles: a viewer reads but neither submits nor cancels; only an admin uses MachineService.
    viewer_a.jobs.get_job(pb::GetJobRequest { job_id: job_a.id.clone() }).await.expect("a viewer reads");
    let denied = |r: Result<(), Status>, what: &str| {
        let status = r.expect_err(what);
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    };
    denied(viewer_a.jobs.submit_job(req.clone()).await.map(drop), "viewer SubmitJob");
    denied(
        viewer_a
            .jobs
            .cancel_job(pb::CancelJobRequest { job_id: job_a.id.clone(), reason: String::new() })
            .await
            .map(drop),
        "viewer CancelJob",
    );
    denied(
        a.machines.list_machines(pb::ListMachinesRequest::default()).await.map(drop),
        "submitter ListMachines",
    );
    denied(
        a.machines.drain_machine(pb::DrainMachineRequest { machine_id: "local".into() }).await.map(drop),
        "submitter DrainMachine",
    );
    admin.machines.list_machines(pb::ListMachinesRequest::default()).await.expect("admin ListMachines");
}

/// Drains the only ComfyUI server, so submitted jobs stay queued.
async fn drain(admin: &mut Clients) {
    admin
        .machines
        .drain_machine(pb::DrainMachineRequest { machine_id: "local".into() })
        .await
        .expect("drain");
}

fn assert_quota(status: &Status, reason: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry = status.get_details_retry_info().expect("RetryInfo");
    assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()), "{retry:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, reason, "{info:?}");
}

#[tokio::test]
async fn a_submit_past_a_tenants_quota_is_resource_exhausted_with_retry_info() {
    let app = spawn_app_with_auth(|c| {
        c.auth.tenants.insert("small".into(), TenantOverride { max_queued: Some(2), ..Default::default() });
        c.auth
            .tenants
            .insert("slow".into(), TenantOverride { submits_per_second: Some(1), ..Default::default() });
    })
    .await;
    drain(&mut app.clients(&app.create_key("ops", Role::Admin, false).await)).await;

    let mut small = app.clients(&app.create_key("small", Role::Submitter, false).await);
    for _ in 0..2 {
        small.jobs.submit_job(submit_request("invert", png(4, 4))).await.expect("within max_queued");
    }
    let status =
        small.jobs.submit_job(submit_request("invert", png(4, 4))).await.expect_err("past max_queued");
    assert_quota(&status, "QUOTA_MAX_QUEUED");
    assert_eq!(status.get_details_error_info().unwrap().metadata["quota"], "max_queued");
    // Another tenant is not held back by it.
    let mut other = app.clients(&app.create_key("other", Role::Submitter, false).await);
    other.jobs.submit_job(submit_request("invert", png(4, 4))).await.expect("another tenant submits");

    // 1 a second, bursts of 2: of five at once, some are refused.
    let slow = app.clients(&app.create_key("slow", Role::Submitter, false).await);
    let results = futures::future::join_all((0..5).map(|_| {
        let mut jobs = slow.jobs.clone();
        async move { jobs.submit_job(submit_request("invert", png(4, 4))).await }
    }))
    .await;
    let refused: Vec<&Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(results.iter().filter(|r| r.is_ok()).count() >= 1, "{results:?}");
    assert!(!refused.is_empty(), "five submits at once passed a rate of 1/s");
    for status in refused {
        assert_quota(status, "QUOTA_SUBMITS_PER_SECOND");
    }
}

#[tokio::test]
async fn while_tenant_a_keeps_500_jobs_queued_tenant_bs_job_starts_within_one_dispatch() {
    let app = spawn_app_with_auth(|c| {
        c.auth.tenant_defaults.submits_per_second = 100_000;
    })
    .await;
    let mut admin = app.clients(&app.create_key("ops", Role::Admin, false).await);
    drain(&mut admin).await;
    let mut a = app.clients(&app.create_key("flood", Role::Submitter, false).await);
    let mut b = app.clients(&app.create_key("single", Role::Submitter, false).await);
    let image = png(2, 2);
    let submitted: Vec<Result<_, Status>> = futures::stream::iter(0..500)
        .map(|_| {
            let mut jobs = a.jobs.clone();
            let req = submit_request("invert", image.clone());
            async move { jobs.submit_job(req).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(submitted.iter().all(Result::is_ok), "{:?}", submitted.iter().find(|r| r.is_err()));
    let job_b =
        b.jobs.submit_job(submit_request("invert", image.clone())).await.expect("B submits").into_inner();
    admin
        .machines
        .undrain_machine(pb::UndrainMachineRequest { machine_id: "local".into() })
        .await
        .expect("undrain");

    let done = finished(&mut b, &job_b.id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    let b_started = done.start_time.expect("B's start time");
    let started_before_b = {
        let mut n = 0;
        let mut token = String::new();
        loop {
            let page = a
                .jobs
                .list_jobs(pb::ListJobsRequest { page_size: 500, page_token: token, ..Default::default() })
                .await
                .expect("list A's jobs")
                .into_inner();
            n += page
                .jobs
                .iter()
                .filter_map(|j| j.start_time)
                .filter(|t| (t.seconds, t.nanos) < (b_started.seconds, b_started.nanos))
                .count();
            if page.next_page_token.is_empty() {
                break n;
            }
            token = page.next_page_token;
        }
    };
    assert!(started_before_b <= 1, "{started_before_b} of A's jobs started before B's single job");
}

fn comfyrelay(data_dir: &Path) -> StdCommand {
    let mut cmd = StdCommand::new(env!("CARGO_BIN_EXE_comfyrelay"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("COMFYRELAY_DATA_DIR", data_dir);
    cmd
}

#[test]
fn serve_without_authentication_on_a_network_address_exits_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let out = comfyrelay(dir.path())
        .arg("serve")
        .env("COMFYRELAY_AUTH__MODE", "none")
        .env("COMFYRELAY_GRPC__LISTEN", "0.0.0.0:0")
        .output()
        .expect("run comfyrelay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("auth.mode") && stderr.contains("auth.allow_none_on_network"), "{stderr}");
}

/// Runs `comfyrelay keys ARGS` on `data_dir`; returns (success, stdout, stderr).
/// Runs `comfyrelay keys` without blocking the test's runtime, which also runs the server under test.
async fn keys(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = comfyrelay(data_dir);
    cmd.arg("keys").args(args);
    let out = tokio::process::Command::from(cmd).output().await.expect("run comfyrelay keys");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn keys_are_created_listed_and_revoked_with_the_binary_on_the_servers_data_directory() {
    let app: TestApp = spawn_app_with_auth(|_| {}).await;
    let dir = app.data_dir.path().to_path_buf();
    let (ok, stdout, stderr) =
        keys(&dir, &["create", "--tenant", "team-cli", "--role", "viewer", "--expires", "30d"]).await;
    assert!(ok, "{stderr}");
    let key = stdout.trim().to_string();
    let prefix = comfyrelay::auth::parse_key(&key).unwrap_or_else(|| panic!("stdout is the key: {stdout:?}"));
    assert!(stderr.contains(prefix) && stderr.contains("team-cli") && stderr.contains("viewer"), "{stderr}");

    let (ok, list, _) = keys(&dir, &["list"]).await;
    assert!(ok);
    let line = list.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains("team-cli") && line.contains("viewer") && line.ends_with("active"), "{line}");
    assert!(!list.contains(&key[12..]), "keys list shows the secret");

    // The running server accepts it at once, with its role.
    let mut c = app.clients(&key);
    c.jobs.list_jobs(pb::ListJobsRequest::default()).await.expect("the new key is accepted");
    let status = c.jobs.submit_job(submit_request("invert", png(4, 4))).await.expect_err("a viewer");
    assert_eq!(status.code(), Code::PermissionDenied);

    let (ok, _, stderr) = keys(&dir, &["revoke", prefix]).await;
    assert!(ok, "{stderr}");
    let status = c.jobs.list_jobs(pb::ListJobsRequest::default()).await.expect_err("revoked");
    assert_eq!(status.code(), Code::Unauthenticated);
    let (_, list, _) = keys(&dir, &["list"]).await;
    assert!(list.lines().any(|l| l.starts_with(prefix) && l.ends_with("revoked")), "{list}");
    let (ok, _, stderr) = keys(&dir, &["revoke", prefix]).await;
    assert!(!ok && stderr.contains(prefix), "revoking twice: {stderr}");
    let (ok, _, stderr) = keys(&dir, &["create", "--tenant", "Not A Tenant"]).await;
    assert!(!ok && stderr.contains("--tenant"), "{stderr}");
}

#[tokio::test]
async fn a_runcomfy_token_and_an_api_key_appear_in_no_log_line_or_error() {
    const TOKEN: &str = "rc-tok-5f1e9b7c-distinctive-token";
    let comfy = crate::helpers::spawn_comfy().await;
    let data = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = keys(data.path(), &["create", "--tenant", "team-a", "--role", "admin"]).await;
    assert!(ok, "{stderr}");
    let key = stdout.trim().to_string();
    let prefix = comfyrelay::auth::parse_key(&key).unwrap().to_string();
    let secret = key[12..].to_string();

    let workflows = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_comfyrelay"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0")
        .env("COMFYRELAY_LOG__FORMAT", "json")
        .env("COMFYRELAY_LOG__FILTER", "debug")
        .env("COMFYRELAY_DATA_DIR", data.path())
        .env("COMFYRELAY_WORKFLOWS_DIR", &workflows)
        .env("COMFYRELAY_COMFYUI__SERVERS", format!("[{{name = \"local\", url = \"{}\"}}]", comfy.url()))
        // RunComfy on, its API unreachable: the pool logs its failures (with the URL, never the token).
        .env("COMFYRELAY_RUNCOMFY__ENABLED", "true")
        .env("COMFYRELAY_RUNCOMFY__USER_ID", "u-1")
        .env("COMFYRELAY_RUNCOMFY__API_TOKEN", TOKEN)
        .env("COMFYRELAY_RUNCOMFY__BASE_URL", "http://127.0.0.1:9")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn comfyrelay serve");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut log = Vec::new();
    let addr: SocketAddr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = stdout.next_line().await.expect("read log") {
            log.push(line.clone());
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if v["fields"]["message"] == "serving gRPC" {
                return v["fields"]["addr"].as_str().expect("addr").parse().expect("socket addr");
            }
        }
        panic!("comfyrelay exited before serving: {log:#?}");
    })
    .await
    .expect("serves within 60 s");
    // Keep reading both outputs while the calls run, so the child never blocks on a full pipe.
    let stdout_rest = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = stdout.next_line().await {
            rest.push(line);
        }
        rest
    });
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_rest = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr_pipe, &mut text).await;
        text
    });
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();

    // Calls that succeed, and calls that fail with the key's prefix and a wrong secret, or mangled.
    let mut errors = Vec::new();
    let call = |authorization: String| {
        let channel = channel.clone();
        async move {
            let bearer = crate::helpers::Bearer(Some(authorization.parse().unwrap()));
            let svc = tonic::service::interceptor::InterceptedService::new(channel, bearer);
            let mut jobs = pb::job_service_client::JobServiceClient::new(svc);
            let submitted = jobs.submit_job(submit_request("invert", png(4, 4))).await.map(drop);
            let listed = jobs.list_jobs(pb::ListJobsRequest::default()).await.map(drop);
            [submitted, listed]
        }
    };
    for auth in [
        format!("Bearer {key}"),
        format!("Bearer cr_{prefix}_{}", "0".repeat(64)),
        format!("Bearer {key}x"),
        format!("Bearer {}", &key[..key.len() - 1]),
        key.clone(),
    ] {
        for r in call(auth).await {
            if let Err(s) = r {
                errors.push(format!("{s:?}"));
            }
        }
    }
    assert!(errors.len() >= 8, "the wrong keys were refused: {errors:#?}");
    // A flood of refusals is logged at a bounded rate (5 a second, bursts of 10).
    let mut flood = pb::workflow_service_client::WorkflowServiceClient::new(
        tonic::service::interceptor::InterceptedService::new(
            channel.clone(),
            crate::helpers::Bearer(Some(format!("Bearer cr_{prefix}_{}", "0".repeat(64)).parse().unwrap())),
        ),
    );
    for _ in 0..60 {
        let status = flood.list_workflows(pb::ListWorkflowsRequest::default()).await.expect_err("wrong key");
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    child.kill().await.expect("stop comfyrelay");
    log.extend(stdout_rest.await.expect("stdout reader"));
    log.extend(stderr_rest.await.expect("stderr reader").lines().map(str::to_string));

    assert!(
        log.iter().any(|l| l.contains("call refused") && l.contains(&prefix) && l.contains("127.0.0.1")),
        "a refused call is logged with the key prefix and the peer: {log:#?}"
    );
    let refusals = log.iter().filter(|l| l.contains("call refused")).count();
    assert!(refusals < 40, "68 refusals logged {refusals} lines");
    for text in log.iter().chain(&errors) {
        for secret in [TOKEN, key.as_str(), secret.as_str()] {
            assert!(!text.contains(secret), "a secret leaked: {text}");
        }
    }
}

/// A workflows directory holding `invert-rc`: `invert` with RunComfy requirements.
fn runcomfy_workflows() -> tempfile::TempDir {
    use comfyrelay::emulator::runcomfy::DEFAULT_WORKFLOW_VERSION_ID;
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows").join("invert");
    let target = dir.path().join("invert-rc");
    std::fs::create_dir_all(&target).expect("mkdir");
    std::fs::copy(repo.join("workflow.json"), target.join("workflow.json")).expect("copy graph");
    let manifest = std::fs::read_to_string(repo.join("manifest.toml")).expect("manifest");
    let manifest = format!(
        "{}\n[requirements]\nruncomfy_workflow_version_id = \"{DEFAULT_WORKFLOW_VERSION_ID}\"\nserver_type = \"medium\"\n",
        manifest.replace("name = \"invert\"", "name = \"invert-rc\"")
    );
    std::fs::write(target.join("manifest.toml"), manifest).expect("write manifest");
    dir
}

#[tokio::test]
async fn a_tenant_past_its_machine_seconds_of_the_day_is_resource_exhausted_with_retry_info() {
    use comfyrelay::emulator::runcomfy::{
        DEFAULT_TOKEN, DEFAULT_USER_ID, RunComfyEmulator, RunComfyEmulatorConfig,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let emu = RunComfyEmulator::start(
        listener,
        RunComfyEmulatorConfig {
            boot_time: Duration::from_millis(200),
            deleting_time: Duration::from_millis(50),
            requests_per_second: 200,
            burst: 200,
            comfyui: crate::helpers::emulator_config(),
            ..RunComfyEmulatorConfig::default()
        },
    )
    .await
    .expect("start the RunComfy emulator");
    let workflows = runcomfy_workflows();
    let mut app = spawn_app_with_auth(|c| {
        c.workflows_dir = Some(workflows.path().to_path_buf());
        c.comfyui.servers.clear();
        let r = &mut c.runcomfy;
        r.enabled = true;
        r.base_url = emu.url();
        r.user_id = DEFAULT_USER_ID.into();
        r.api_token = comfyrelay::config::Secret::new(DEFAULT_TOKEN);
        (r.requests_per_second, r.burst) = (100, 100);
        r.status_poll = Duration::from_millis(50);
        r.health_interval = Duration::from_millis(200);
        r.unhealthy_after = Duration::from_millis(600);
        c.auth.tenants.insert(
            "metered".into(),
            TenantOverride { machine_seconds_per_day: Some(0.001), ..Default::default() },
        );
    })
    .await;
    let mut admin = app.clients(&app.create_key("ops", Role::Admin, false).await);
    let mut metered = app.clients(&app.create_key("metered", Role::Submitter, false).await);
    let mut other = app.clients(&app.create_key("other", Role::Submitter, false).await);

    let job = metered.jobs.submit_job(submit_request("invert-rc", png(4, 4))).await.expect("within quota");
    let done = finished(&mut metered, &job.into_inner().id).await;
    assert_eq!(done.state(), pb::JobState::Succeeded, "{done:?}");
    assert!(done.machine_seconds > 0.0, "{done:?}");
    // The job is counted when its runner is done, which the machine's completed count shows.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let machines = admin
            .machines
            .list_machines(pb::ListMachinesRequest::default())
            .await
            .expect("list machines")
            .into_inner()
            .machines;
        if machines.iter().any(|m| m.jobs_completed >= 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job is never counted on its machine: {machines:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let status = metered
        .jobs
        .submit_job(submit_request("invert-rc", png(4, 4)))
        .await
        .expect_err("past machine_seconds_per_day");
    assert_quota(&status, "QUOTA_MACHINE_SECONDS_PER_DAY");
    let retry = status.get_details_retry_info().unwrap().retry_delay.unwrap();
    assert!(retry > Duration::from_secs(23 * 3600), "the usage leaves the window in a day: {retry:?}");
    other
        .jobs
        .submit_job(submit_request("invert-rc", png(4, 4)))
        .await
        .expect("another tenant is not metered");
    app.stop().await.expect("clean stop");
    emu.shutdown().await;
}

#[tokio::test]
async fn the_open_services_are_configurable() {
    let app = spawn_app_with_auth(|c| c.auth.open_services = vec!["grpc.health.v1.Health".into()]).await;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let request = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let status = ServerReflectionClient::new(app.channel.clone())
        .server_reflection_info(tokio_stream::iter([request()]))
        .await
        .expect_err("reflection is no longer open");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let key = app.create_key("ops", Role::Viewer, false).await;
    let bearer = crate::helpers::Bearer(Some(format!("Bearer {key}").parse().unwrap()));
    let keyed = tonic::service::interceptor::InterceptedService::new(app.channel.clone(), bearer);
    ServerReflectionClient::new(keyed)
        .server_reflection_info(tokio_stream::iter([request()]))
        .await
        .expect("reflection with a key");
}
