//! Deadlines per stage, retention, queue positions and slow subscribers.

use std::time::Duration;

use comfyrelay::proto::pb;
use pb::job_event::Kind;
use tonic::Code;

use crate::helpers::{collect_events, png, spawn_app, spawn_app_with, submit_request, terminal};

fn failure(events: &[pb::JobEvent]) -> pb::FailureReason {
    match events.last().and_then(|e| e.kind.as_ref()) {
        Some(Kind::Failed(f)) => f.error.as_ref().unwrap().reason(),
        other => panic!("not a failure: {other:?}"),
    }
}

#[tokio::test]
async fn a_slow_execution_fails_with_execution_timeout() {
    let app = spawn_app_with(|c| c.jobs.execution_timeout = Duration::from_millis(300)).await;
    app.comfy.faults().set_node_delay(Duration::from_millis(400));
    let mut client = app.jobs.clone();
    let job = client.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(failure(&events), pb::FailureReason::ExecutionTimeout, "{events:?}");
}

#[tokio::test]
async fn the_callers_deadline_fails_the_job_with_deadline_exceeded() {
    let app = spawn_app().await;
    app.comfy.faults().set_node_delay(Duration::from_millis(400));
    let mut client = app.jobs.clone();
    let mut req = submit_request("invert", png(4, 4));
    let deadline = std::time::SystemTime::now() + Duration::from_millis(500);
    req.deadline = Some(prost_types::Timestamp::from(deadline));
    let job = client.submit_job(req).await.unwrap().into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(failure(&events), pb::FailureReason::DeadlineExceeded, "{events:?}");

    let mut past = submit_request("invert", png(4, 4));
    past.deadline = Some(prost_types::Timestamp { seconds: 1, nanos: 0 });
    let err = client.submit_job(past).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_job_that_waits_too_long_fails_with_queue_timeout() {
    let mut app = spawn_app_with(|c| c.jobs.queue_timeout = Duration::from_millis(600)).await;
    app.machines.drain_machine(pb::DrainMachineRequest { machine_id: "local".into() }).await.unwrap();
    let job = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(failure(&events), pb::FailureReason::QueueTimeout, "{events:?}");
}

#[tokio::test]
async fn finished_jobs_are_deleted_after_the_retention_period() {
    let mut app = spawn_app_with(|c| c.jobs.retention = Duration::from_secs(1)).await;
    let job = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    assert_eq!(terminal(&collect_events(&app.channel, &job.id, 0).await), "succeeded");
    // Wait for the retention sweep (it runs every `retention`), bounded.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let gone = async {
        loop {
            tick.tick().await;
            match app.jobs.get_job(pb::GetJobRequest { job_id: job.id.clone() }).await {
                Err(e) if e.code() == Code::NotFound => return,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), gone).await.expect("deleted within 20 s");
    let artifacts = app.data_dir.path().join("artifacts");
    let files = walk(&artifacts).into_iter().filter(|p| !p.starts_with(artifacts.join("tmp"))).count();
    assert_eq!(files, 0, "its input and output files are deleted too");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn queued_jobs_see_their_position_move_up() {
    let app = spawn_app().await;
    app.comfy.faults().set_node_delay(Duration::from_millis(200));
    let mut client = app.jobs.clone();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(client.submit_job(submit_request("invert", png(4 + i, 4))).await.unwrap().into_inner().id);
    }
    let last = collect_events(&app.channel, &ids[4], 0).await;
    assert_eq!(terminal(&last), "succeeded");
    let positions: Vec<u32> = last
        .iter()
        .take_while(|e| !matches!(e.kind, Some(Kind::Started(_))))
        .filter_map(|e| match &e.kind {
            Some(Kind::Queued(q)) => Some(q.position),
            _ => None,
        })
        .collect();
    // Positions are published at most every 200 ms, so not every step is seen, but it only moves up.
    assert!(positions.len() >= 2, "the position changed while it waited: {positions:?}");
    assert!(positions.windows(2).all(|w| w[1] < w[0]), "{positions:?}");
}

#[tokio::test]
async fn a_subscriber_that_does_not_read_never_slows_the_job() {
    let app = spawn_app().await;
    let mut client = app.jobs.clone();
    let params = [
        ("width".to_string(), pb::ParameterValue { kind: Some(pb::parameter_value::Kind::IntValue(64)) }),
        ("height".to_string(), pb::ParameterValue { kind: Some(pb::parameter_value::Kind::IntValue(64)) }),
        (
            "batch_size".to_string(),
            pb::ParameterValue { kind: Some(pb::parameter_value::Kind::IntValue(64)) },
        ),
    ];
    let req = pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::Workflow("progress-websocket".into())),
        parameters: params.into(),
        ..Default::default()
    };
    let job = client.submit_job(req).await.unwrap().into_inner();
    // Opened and never read until the job is over.
    let mut slow = client
        .stream_job(pb::StreamJobRequest { job_id: job.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let fast = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(terminal(&fast), "succeeded");
    let mut got = Vec::new();
    while let Some(e) = slow.message().await.unwrap() {
        got.push(e);
    }
    assert_eq!(terminal(&got), "succeeded");
    assert!(got.windows(2).all(|w| w[1].sequence > w[0].sequence));
    let lifecycle = |es: &[pb::JobEvent]| -> Vec<u64> {
        es.iter()
            .filter(|e| {
                !matches!(e.kind, Some(Kind::Progress(_)) | Some(Kind::Preview(_)) | Some(Kind::Queued(_)))
            })
            .map(|e| e.sequence)
            .collect()
    };
    assert_eq!(lifecycle(&got), lifecycle(&fast), "no lifecycle event is dropped for a slow subscriber");
}
