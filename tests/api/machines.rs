//! MachineService over the configured ComfyUI servers.

use comfyrelay::proto::pb;
use tonic::Code;

use crate::helpers::{collect_events, png, spawn_app, submit_request, terminal};

#[tokio::test]
async fn lists_gets_and_drains_the_configured_servers() {
    let mut app = spawn_app().await;
    // The first job proves the machine is connected and counts toward jobs_completed.
    let job = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    assert_eq!(terminal(&collect_events(&app.channel, &job.id, 0).await), "succeeded");

    // The machine counts the job when its runner hands the slot back to the scheduler, just after the
    // terminal event: a list at once can come before that.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let list = loop {
        let list = app.machines.list_machines(pb::ListMachinesRequest::default()).await.unwrap().into_inner();
        if list.machines.first().is_some_and(|m| m.jobs_completed == 1)
            || tokio::time::Instant::now() > deadline
        {
            break list;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(list.machines.len(), 1);
    let m = &list.machines[0];
    assert_eq!(m.id, "local");
    assert_eq!(m.kind(), pb::MachineKind::Static);
    assert_eq!(m.state(), pb::MachineState::Ready);
    assert_eq!(m.comfy_url.trim_end_matches('/'), app.comfy.url().trim_end_matches('/'));
    assert_eq!(m.jobs_completed, 1);
    assert_eq!(m.last_workflow, "invert");

    let got = app
        .machines
        .get_machine(pb::GetMachineRequest { machine_id: "local".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, "local");
    let err =
        app.machines.get_machine(pb::GetMachineRequest { machine_id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        app.machines.get_machine(pb::GetMachineRequest { machine_id: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Drained: new jobs wait in the queue instead of going to it.
    let drained = app
        .machines
        .drain_machine(pb::DrainMachineRequest { machine_id: "local".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(drained.draining);
    assert_eq!(drained.state(), pb::MachineState::Draining);
    let waiting = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    let again =
        app.jobs.get_job(pb::GetJobRequest { job_id: waiting.id.clone() }).await.unwrap().into_inner();
    assert_eq!(again.state(), pb::JobState::Queued);
    let cancelled = app
        .jobs
        .cancel_job(pb::CancelJobRequest { job_id: waiting.id, reason: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), pb::JobState::Cancelled);
}

#[tokio::test]
async fn a_drained_static_server_can_be_undrained_and_its_queued_jobs_run() {
    let mut app = spawn_app().await;
    let drained = app
        .machines
        .drain_machine(pb::DrainMachineRequest { machine_id: "local".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.state(), pb::MachineState::Draining);
    let waiting = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    let queued =
        app.jobs.get_job(pb::GetJobRequest { job_id: waiting.id.clone() }).await.unwrap().into_inner();
    assert_eq!(queued.state(), pb::JobState::Queued);

    let undrained = app
        .machines
        .undrain_machine(pb::UndrainMachineRequest { machine_id: "local".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!undrained.draining);
    assert_eq!(undrained.state(), pb::MachineState::Ready);
    assert_eq!(terminal(&collect_events(&app.channel, &waiting.id, 0).await), "succeeded");
    let err = app
        .machines
        .undrain_machine(pb::UndrainMachineRequest { machine_id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
