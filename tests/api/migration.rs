//! A data directory written by comfyrelay 0.1 (schema 0001: one whole-job body per row, events holding the
//! whole event) is converted at start, not discarded: finished jobs keep their state, outputs and logs,
//! idempotency keys still hold, and a job queued before the upgrade runs. The fixture was made by the 0.1
//! binary with `tests/fixtures/make_datadir_0.1.py`.

use std::path::Path;

use comfyrelay::proto::pb;
use pb::job_event::Kind;

use crate::helpers::{assert_gap_free, collect_events, png, spawn_app_with, submit_request, terminal};

const SUCCEEDED: [&str; 3] = [
    "01a23400-a34c-7407-971d-fc4c7d2d13ea",
    "01a23400-a40c-7077-a36f-8ed0fb068037",
    "01a23400-a4be-7287-b81a-97a6fe86abe8",
];
const QUEUED: &str = "01a23400-ac14-7557-bc8b-986527e813f1";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn a_data_directory_of_the_previous_version_is_migrated() {
    let old = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datadir-0.1");
    copy_dir(&fixture, old.path());
    let data = old.path().to_path_buf();
    let mut app = spawn_app_with(move |c| c.data_dir = data).await;

    for id in SUCCEEDED {
        let job = app.jobs.get_job(pb::GetJobRequest { job_id: id.into() }).await.unwrap().into_inner();
        assert_eq!(job.state(), pb::JobState::Succeeded, "{job:?}");
        assert!(!job.outputs.is_empty(), "{job:?}");
        assert!(job.outputs.iter().all(|o| !o.inline_data.is_empty()), "outputs still readable");
        let events = collect_events(&app.channel, id, 0).await;
        assert_gap_free(&events, 0);
        assert_eq!(terminal(&events), "succeeded", "{events:?}");
        assert_eq!(events.len() as u64, job.last_sequence);
    }
    let labelled = app
        .jobs
        .list_jobs(pb::ListJobsRequest {
            labels: [("fixture".into(), "v0.1".into())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(labelled.jobs.len(), 2, "labels still filter");

    // The job queued before the upgrade runs now.
    let events = collect_events(&app.channel, QUEUED, 0).await;
    assert_gap_free(&events, 0);
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    assert!(events.iter().any(|e| matches!(e.kind, Some(Kind::PromptSubmitted(_)))));

    // Its idempotency key still maps to it: the same key with another request is refused.
    let mut reused = submit_request("invert", png(3, 3));
    reused.request_id = "old-queued".into();
    let err = app.jobs.submit_job(reused).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    app.stop().await.unwrap();
}
