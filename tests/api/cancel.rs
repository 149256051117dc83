//! CancelJob in every state.

use std::time::Duration;

use comfyrelay::proto::pb;
use pb::job_event::Kind;

use crate::helpers::{collect_events, png, spawn_app, submit_request, terminal, wait_for_event};

#[tokio::test]
async fn cancelling_a_queued_job_is_immediate() {
    let mut app = spawn_app().await;
    app.comfy.faults().set_node_delay(Duration::from_millis(400));
    // Capacity is one running + one pre-queued prompt: the third job waits in comfyrelay's queue.
    let a = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    let b = app.jobs.submit_job(submit_request("invert", png(5, 5))).await.unwrap().into_inner();
    let c = app.jobs.submit_job(submit_request("invert", png(6, 6))).await.unwrap().into_inner();
    let got = app
        .jobs
        .cancel_job(pb::CancelJobRequest { job_id: c.id.clone(), reason: "changed my mind".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), pb::JobState::Cancelled);
    let events = collect_events(&app.channel, &c.id, 0).await;
    assert_eq!(terminal(&events), "cancelled");
    assert!(!events.iter().any(|e| matches!(e.kind, Some(Kind::Started(_)))), "never ran: {events:?}");
    let Some(Kind::Cancelled(x)) = &events.last().unwrap().kind else { unreachable!() };
    assert_eq!(x.reason, "changed my mind");
    // The others are unaffected.
    app.comfy.faults().clear();
    assert_eq!(terminal(&collect_events(&app.channel, &a.id, 0).await), "succeeded");
    assert_eq!(terminal(&collect_events(&app.channel, &b.id, 0).await), "succeeded");
}

#[tokio::test]
async fn cancelling_a_running_job_interrupts_only_its_prompt() {
    let mut app = spawn_app().await;
    app.comfy.faults().set_node_delay(Duration::from_millis(500));
    let a = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    wait_for_event(&app.channel, &a.id, |e| matches!(e.kind, Some(Kind::NodeStarted(_)))).await;
    let b = app.jobs.submit_job(submit_request("invert", png(5, 5))).await.unwrap().into_inner();
    app.jobs.cancel_job(pb::CancelJobRequest { job_id: a.id.clone(), reason: String::new() }).await.unwrap();
    let events = collect_events(&app.channel, &a.id, 0).await;
    assert_eq!(terminal(&events), "cancelled", "{events:?}");
    let got = app.jobs.get_job(pb::GetJobRequest { job_id: a.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.state(), pb::JobState::Cancelled);
    // The next prompt on the same ComfyUI still runs to success.
    assert_eq!(terminal(&collect_events(&app.channel, &b.id, 0).await), "succeeded");
}

#[tokio::test]
async fn cancelling_a_finished_job_changes_nothing() {
    let mut app = spawn_app().await;
    let a = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    let before = collect_events(&app.channel, &a.id, 0).await;
    assert_eq!(terminal(&before), "succeeded");
    let got = app
        .jobs
        .cancel_job(pb::CancelJobRequest { job_id: a.id.clone(), reason: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), pb::JobState::Succeeded);
    assert_eq!(collect_events(&app.channel, &a.id, 0).await, before);
}
