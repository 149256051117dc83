//! Many jobs and many subscribers at once; a thousand millisecond jobs back to back.

use std::sync::Arc;

use comfyrelay::proto::pb;

use crate::helpers::{
    assert_gap_free, collect_events, png, spawn_app, spawn_app_with, submit_request, terminal,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_jobs_with_ten_subscribers_each_all_finish_with_equal_streams() {
    let app = spawn_app_with(|c| c.comfyui.prequeue = 2).await;
    let input = png(8, 8);
    let mut submits = Vec::new();
    for _ in 0..100 {
        let mut client = app.jobs.clone();
        let req = submit_request("invert", input.clone());
        submits.push(tokio::spawn(async move { client.submit_job(req).await.map(|r| r.into_inner().id) }));
    }
    let mut ids = Vec::new();
    for s in submits {
        ids.push(s.await.unwrap().expect("submit"));
    }
    let channel = Arc::new(app.channel.clone());
    let mut readers = Vec::new();
    for id in &ids {
        for _ in 0..10 {
            let channel = channel.clone();
            let id = id.clone();
            readers.push(tokio::spawn(async move { (id.clone(), collect_events(&channel, &id, 0).await) }));
        }
    }
    let mut by_job: std::collections::HashMap<String, Vec<Vec<pb::JobEvent>>> = Default::default();
    for r in readers {
        let (id, events) = r.await.unwrap();
        by_job.entry(id).or_default().push(events);
    }
    assert_eq!(by_job.len(), 100);
    for (id, streams) in by_job {
        assert_eq!(streams.len(), 10);
        for s in &streams {
            assert_eq!(terminal(s), "succeeded", "job {id}: {s:?}");
            assert_gap_free(s, 0);
            assert_eq!(s, &streams[0], "every subscriber of {id} saw the same stream");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_back_to_back_trivial_jobs_all_succeed_with_their_outputs() {
    let mut app = spawn_app().await;
    let input = png(4, 4);
    for i in 0..1000 {
        let job = app.jobs.submit_job(submit_request("invert", input.clone())).await.unwrap().into_inner();
        let events = collect_events(&app.channel, &job.id, 0).await;
        assert_eq!(terminal(&events), "succeeded", "job #{i} {}: {events:?}", job.id);
        let Some(pb::job_event::Kind::Succeeded(done)) = &events.last().unwrap().kind else { unreachable!() };
        assert_eq!(done.outputs.len(), 1, "job #{i} has its output");
    }
    let page = app
        .jobs
        .list_jobs(pb::ListJobsRequest {
            page_size: 500,
            states: vec![pb::JobState::Succeeded as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 500);
    assert!(!page.next_page_token.is_empty());
}
