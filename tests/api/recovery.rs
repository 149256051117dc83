//! The real binary killed (SIGKILL) or stopped (SIGTERM) mid-job and restarted over the same data
//! directory: every job reaches the right terminal state, none stuck.

use std::{net::SocketAddr, path::Path, process::Stdio, time::Duration};

use comfyrelay::proto::pb;
use pb::job_event::Kind;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

use crate::helpers::{collect_events, png, spawn_comfy, submit_request, terminal, wait_for_event};

struct Relay {
    child: tokio::process::Child,
    channel: Channel,
}

/// Starts `comfyrelay serve` on an ephemeral port; reads the bound address from its JSON log.
async fn start_relay(data_dir: &Path, comfy_url: &str, extra: &[(&str, &str)]) -> Relay {
    let workflows = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_comfyrelay"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("COMFYRELAY_GRPC__LISTEN", "127.0.0.1:0")
        .env("COMFYRELAY_AUTH__MODE", "none")
        .env("COMFYRELAY_LOG__FORMAT", "json")
        .env(
            "COMFYRELAY_LOG__FILTER",
            if std::env::var_os("TEST_LOG").is_some() { "info,comfyrelay=debug" } else { "info" },
        )
        .env("COMFYRELAY_DATA_DIR", data_dir)
        .env("COMFYRELAY_WORKFLOWS_DIR", &workflows)
        .env("COMFYRELAY_COMFYUI__SERVERS", format!("[{{name = \"local\", url = \"{comfy_url}\"}}]"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn comfyrelay");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if std::env::var_os("TEST_LOG").is_some() {
                eprintln!("relay: {line}");
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if v["fields"]["message"] == "serving gRPC" {
                return v["fields"]["addr"].as_str().expect("addr").parse().expect("socket addr");
            }
        }
        panic!("comfyrelay exited before serving");
    })
    .await
    .expect("comfyrelay serves within 60 s");
    // Keep draining the log so the child never blocks on a full pipe.
    let echo = std::env::var_os("TEST_LOG").is_some();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if echo {
                eprintln!("relay: {line}");
            }
        }
    });
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect");
    Relay { child, channel }
}

impl Relay {
    fn jobs(&self) -> pb::job_service_client::JobServiceClient<Channel> {
        pb::job_service_client::JobServiceClient::new(self.channel.clone())
    }

    async fn kill9(mut self) {
        self.child.kill().await.expect("SIGKILL");
    }
}

async fn wait_started(channel: &Channel, job_id: &str) {
    wait_for_event(channel, job_id, |e| matches!(e.kind, Some(Kind::NodeStarted(_)))).await;
}

#[tokio::test]
async fn sigkill_mid_job_then_restart_finishes_every_job() {
    let comfy = spawn_comfy().await;
    comfy.faults().set_node_delay(Duration::from_millis(200));
    let data = tempfile::tempdir().unwrap();
    let relay = start_relay(data.path(), &comfy.url(), &[]).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            relay.jobs().submit_job(submit_request("invert", png(4 + i, 4))).await.unwrap().into_inner().id,
        );
    }
    wait_started(&relay.channel, &ids[0]).await;
    relay.kill9().await;

    // ComfyUI kept going meanwhile; the restarted relay re-attaches and reconciles.
    let relay = start_relay(data.path(), &comfy.url(), &[]).await;
    for id in &ids {
        let events = collect_events(&relay.channel, id, 0).await;
        assert_eq!(terminal(&events), "succeeded", "job {id}: {events:?}");
        crate::helpers::assert_gap_free(&events, 0);
        let Some(Kind::Succeeded(done)) = &events.last().unwrap().kind else { unreachable!() };
        assert_eq!(done.outputs.len(), 1, "job {id} has its output");
    }
    relay.kill9().await;
}

#[tokio::test]
async fn prompts_the_backend_forgot_fail_as_lost_when_no_retry_is_allowed() {
    let comfy = spawn_comfy().await;
    comfy.faults().set_node_delay(Duration::from_millis(300));
    let data = tempfile::tempdir().unwrap();
    let no_retry = [("COMFYRELAY_JOBS__MAX_ATTEMPTS", "1")];
    let relay = start_relay(data.path(), &comfy.url(), &no_retry).await;
    let first = relay.jobs().submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner().id;
    wait_started(&relay.channel, &first).await;
    relay.kill9().await;
    // ComfyUI restarts too, forgetting its queue and history.
    comfy.restart().await;
    comfy.faults().clear();

    let relay = start_relay(data.path(), &comfy.url(), &no_retry).await;
    let events = collect_events(&relay.channel, &first, 0).await;
    assert_eq!(terminal(&events), "failed", "{events:?}");
    let Some(Kind::Failed(f)) = &events.last().unwrap().kind else { unreachable!() };
    assert_eq!(f.error.as_ref().unwrap().reason(), pb::FailureReason::Lost);
    relay.kill9().await;
}

#[tokio::test]
async fn prompts_the_backend_forgot_are_retried_under_the_attempts_policy() {
    let comfy = spawn_comfy().await;
    comfy.faults().set_node_delay(Duration::from_millis(300));
    let data = tempfile::tempdir().unwrap();
    let relay = start_relay(data.path(), &comfy.url(), &[]).await;
    let first = relay.jobs().submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner().id;
    wait_started(&relay.channel, &first).await;
    relay.kill9().await;
    comfy.restart().await;
    comfy.faults().clear();

    let relay = start_relay(data.path(), &comfy.url(), &[]).await;
    let events = collect_events(&relay.channel, &first, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    assert!(events.iter().any(|e| matches!(e.kind, Some(Kind::Retrying(_)))), "{events:?}");
    relay.kill9().await;
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero_and_the_job_resumes_after_restart() {
    let comfy = spawn_comfy().await;
    comfy.faults().set_node_delay(Duration::from_millis(200));
    let data = tempfile::tempdir().unwrap();
    let mut relay = start_relay(data.path(), &comfy.url(), &[]).await;
    let id = relay.jobs().submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner().id;
    wait_started(&relay.channel, &id).await;
    let pid = relay.child.id().expect("pid") as i32;
    // SIGTERM through the shell's kill, to avoid unsafe libc calls in tests.
    let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(40), relay.child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert_eq!(exit.code(), Some(0));

    let relay = start_relay(data.path(), &comfy.url(), &[]).await;
    let events = collect_events(&relay.channel, &id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    relay.kill9().await;
}

/// Issue 17, defect 1: images that arrive only over the WebSocket (SaveImageWebsocket) and that ComfyUI
/// sends while comfyrelay is down are gone for good (history has no record of them). The re-attached job
/// must not end SUCCEEDED with fewer outputs than it produced: it is retried, and the retry stores all.
#[tokio::test]
async fn websocket_outputs_sent_while_comfyrelay_was_down_are_never_a_false_success() {
    let comfy = spawn_comfy().await;
    comfy.faults().set_node_delay(Duration::from_millis(400));
    let data = tempfile::tempdir().unwrap();
    let relay = start_relay(data.path(), &comfy.url(), &[]).await;
    let id = relay.jobs().submit_job(websocket_request(64)).await.unwrap().into_inner().id;
    // Killed once the node that sends the images has started: its 64 frames go to nobody.
    wait_for_event(
        &relay.channel,
        &id,
        |e| matches!(&e.kind, Some(Kind::NodeStarted(n)) if n.class_type == "SaveImageWebsocket"),
    )
    .await;
    relay.kill9().await;

    let relay = start_relay(data.path(), &comfy.url(), &[]).await;
    let events = collect_events(&relay.channel, &id, 0).await;
    crate::helpers::assert_gap_free(&events, 0);
    let retried = events.iter().find_map(|e| match &e.kind {
        Some(Kind::Retrying(r)) => Some(r.reason.clone()),
        _ => None,
    });
    let retried = retried.unwrap_or_else(|| panic!("the lossy attempt is retried: {events:?}"));
    assert!(retried.contains("WebSocket"), "{retried}");
    let Some(Kind::Succeeded(done)) = &events.last().unwrap().kind else { panic!("{events:?}") };
    assert_eq!(done.outputs.len(), 64, "the retry stored every image");
    relay.kill9().await;
}

/// The same with no attempt left: FAILED with a reason that says the outputs could not be recovered.
#[tokio::test]
async fn unrecoverable_websocket_outputs_fail_the_job_when_no_attempt_is_left() {
    let comfy = spawn_comfy().await;
    comfy.faults().set_node_delay(Duration::from_millis(400));
    let data = tempfile::tempdir().unwrap();
    let no_retry = [("COMFYRELAY_JOBS__MAX_ATTEMPTS", "1")];
    let relay = start_relay(data.path(), &comfy.url(), &no_retry).await;
    let id = relay.jobs().submit_job(websocket_request(16)).await.unwrap().into_inner().id;
    wait_for_event(
        &relay.channel,
        &id,
        |e| matches!(&e.kind, Some(Kind::NodeStarted(n)) if n.class_type == "SaveImageWebsocket"),
    )
    .await;
    relay.kill9().await;

    let relay = start_relay(data.path(), &comfy.url(), &no_retry).await;
    let events = collect_events(&relay.channel, &id, 0).await;
    let Some(Kind::Failed(f)) = &events.last().unwrap().kind else { panic!("{events:?}") };
    let error = f.error.as_ref().unwrap();
    assert_eq!(error.reason(), pb::FailureReason::OutputsMissing, "{error:?}");
    assert!(error.message.contains("cannot be recovered"), "{error:?}");
    relay.kill9().await;
}

/// A crash while an attempt uploads (before its prompt reached ComfyUI) counts the attempt: a job whose
/// attempts keep killing the process ends FAILED instead of being retried into the same crash forever.
#[tokio::test]
async fn an_attempt_cut_by_a_crash_before_its_prompt_was_sent_counts() {
    let comfy = spawn_comfy().await;
    // Uploads hang, so the job is RUNNING (started, not submitted) when the process dies.
    comfy.faults().set_upload_delay(Duration::from_secs(30));
    let data = tempfile::tempdir().unwrap();
    let no_retry = [("COMFYRELAY_JOBS__MAX_ATTEMPTS", "1")];
    let relay = start_relay(data.path(), &comfy.url(), &no_retry).await;
    let id = relay.jobs().submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner().id;
    wait_for_event(&relay.channel, &id, |e| matches!(e.kind, Some(Kind::Started(_)))).await;
    relay.kill9().await;

    comfy.faults().set_upload_delay(Duration::ZERO);
    let relay = start_relay(data.path(), &comfy.url(), &no_retry).await;
    let events = collect_events(&relay.channel, &id, 0).await;
    let Some(Kind::Failed(f)) = &events.last().unwrap().kind else { panic!("{events:?}") };
    let error = f.error.as_ref().unwrap();
    assert!(error.message.contains("stopped during attempt 1"), "{error:?}");
    relay.kill9().await;
}

fn websocket_request(batch: i64) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::Workflow("progress-websocket".into())),
        parameters: [("width", 4), ("height", 4), ("batch_size", batch)]
            .into_iter()
            .map(|(k, v)| {
                (k.to_string(), pb::ParameterValue { kind: Some(pb::parameter_value::Kind::IntValue(v)) })
            })
            .collect(),
        ..Default::default()
    }
}
