//! ComfyUI misbehaving under a running job, end to end through gRPC.

use std::time::Duration;

use comfyrelay::proto::pb;
use pb::job_event::Kind;

use crate::helpers::{
    assert_gap_free, collect_events, png, spawn_app, spawn_app_with, submit_request, terminal,
};

#[tokio::test]
async fn a_websocket_dropped_mid_job_loses_nothing() {
    let mut app = spawn_app().await;
    app.comfy.faults().set_node_delay(Duration::from_millis(150));
    app.comfy.faults().drop_sockets_after(4);
    let job = app.jobs.submit_job(submit_request("invert", png(6, 6))).await.unwrap().into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    assert_gap_free(&events, 0);
    let Some(Kind::Succeeded(done)) = &events.last().unwrap().kind else { unreachable!() };
    assert_eq!(done.outputs.len(), 1, "the output survived the drop");
}

#[tokio::test]
async fn a_node_error_fails_the_job_with_comfyuis_details() {
    let mut app = spawn_app().await;
    app.comfy.faults().fail_node("ImageInvert", "boom: out of memory");
    let job = app.jobs.submit_job(submit_request("invert", png(6, 6))).await.unwrap().into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    let Some(Kind::Failed(f)) = &events.last().unwrap().kind else { panic!("{events:?}") };
    let error = f.error.as_ref().unwrap();
    assert_eq!(error.reason(), pb::FailureReason::Execution);
    assert_eq!(error.node_errors[0].class_type, "ImageInvert");
    assert!(error.node_errors[0].message.contains("boom"), "{error:?}");
}

#[tokio::test]
async fn a_prompt_that_vanishes_is_lost_never_done() {
    let mut app = spawn_app_with(|c| {
        c.jobs.max_attempts = 1;
        c.comfyui.silence_reconcile = Duration::from_millis(300);
    })
    .await;
    app.comfy.faults().vanish_next_prompt();
    let job = app.jobs.submit_job(submit_request("invert", png(6, 6))).await.unwrap().into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    let Some(Kind::Failed(f)) = &events.last().unwrap().kind else { panic!("{events:?}") };
    assert_eq!(f.error.as_ref().unwrap().reason(), pb::FailureReason::Lost);
    assert!(!events.iter().any(|e| matches!(e.kind, Some(Kind::Succeeded(_)))));
}

#[tokio::test]
async fn a_vanished_prompt_is_retried_under_the_attempts_policy() {
    let mut app = spawn_app_with(|c| c.comfyui.silence_reconcile = Duration::from_millis(300)).await;
    app.comfy.faults().vanish_next_prompt();
    let job = app.jobs.submit_job(submit_request("invert", png(6, 6))).await.unwrap().into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    assert!(events.iter().any(|e| matches!(e.kind, Some(Kind::Retrying(_)))), "{events:?}");
    let got = app.jobs.get_job(pb::GetJobRequest { job_id: job.id }).await.unwrap().into_inner();
    assert_eq!(got.attempt, 2);
}
