//! Jobs end to end through gRPC against the emulated ComfyUI: outputs, replay, resume, idempotency, lists.

use comfyrelay::proto::pb;
use pb::job_event::Kind;
use tonic::Code;

use crate::helpers::{
    assert_gap_free, assert_violations, collect_events, png, spawn_app, submit_request, terminal,
};

#[tokio::test]
async fn invert_job_succeeds_with_the_inverted_pixels_and_its_output_downloads_from_any_offset() {
    let mut app = spawn_app().await;
    let input = png(16, 8);
    let job = app.jobs.submit_job(submit_request("invert", input.clone())).await.unwrap().into_inner();
    assert_eq!(job.state(), pb::JobState::Queued);
    assert!(!job.id.is_empty());

    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_gap_free(&events, 0);
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    assert!(matches!(events[0].kind, Some(Kind::Queued(_))));
    assert!(events.iter().any(|e| matches!(e.kind, Some(Kind::Started(_)))));
    assert!(events.iter().any(|e| matches!(e.kind, Some(Kind::NodeStarted(_)))));

    let Some(Kind::Succeeded(done)) = &events.last().unwrap().kind else { unreachable!() };
    assert_eq!(done.outputs.len(), 1, "{done:?}");
    let out = &done.outputs[0];
    assert_eq!(out.mime_type, "image/png");
    assert_eq!((out.width, out.height), (16, 8));
    assert!(!out.inline_data.is_empty(), "small outputs are inline");

    let got = image::load_from_memory(&out.inline_data).unwrap().to_rgb8();
    let original = image::load_from_memory(&input).unwrap().to_rgb8();
    // ComfyUI inverts float32 pixels (1 - v/255) and saves with a truncating cast to u8.
    let inv = |v: u8| ((1.0f32 - f32::from(v) / 255.0) * 255.0).clamp(0.0, 255.0) as u8;
    assert_eq!(got.dimensions(), original.dimensions());
    for (a, b) in got.pixels().zip(original.pixels()) {
        assert_eq!(a.0, [inv(b.0[0]), inv(b.0[1]), inv(b.0[2])]);
    }
    use sha2::Digest;
    assert_eq!(out.sha256, hex::encode(sha2::Sha256::digest(&out.inline_data)));

    // GetJob agrees, with per-stage timings.
    let got = app.jobs.get_job(pb::GetJobRequest { job_id: job.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.state(), pb::JobState::Succeeded);
    assert_eq!(got.outputs.len(), 1);
    assert_eq!(got.last_sequence, events.last().unwrap().sequence);
    assert!(got.timings.as_ref().unwrap().execution.is_some());
    assert!(got.end_time.is_some());

    // DownloadOutput streams the same bytes in chunks.
    let mut stream = app
        .jobs
        .download_output(pb::DownloadOutputRequest {
            job_id: job.id.clone(),
            filename: out.filename.clone(),
            chunk_size: 1024,
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    let mut first = None;
    while let Some(chunk) = stream.message().await.unwrap() {
        assert_eq!(chunk.offset as usize, bytes.len());
        if first.is_none() {
            first = chunk.output.clone();
        }
        bytes.extend_from_slice(&chunk.data);
    }
    assert_eq!(bytes, out.inline_data.to_vec());
    assert_eq!(first.unwrap().sha256, out.sha256);

    // A cut download resumes at the bytes received: from an offset, the rest; at the end, nothing but the
    // metadata; past the end, an INVALID_ARGUMENT naming `offset`.
    let download = |offset: u64| {
        let mut jobs = app.jobs.clone();
        let request = pb::DownloadOutputRequest {
            job_id: job.id.clone(),
            filename: out.filename.clone(),
            chunk_size: 1024,
            offset,
        };
        async move {
            let mut stream = jobs.download_output(request).await?.into_inner();
            let mut chunks = Vec::new();
            while let Some(chunk) = stream.message().await? {
                chunks.push(chunk);
            }
            Ok::<_, tonic::Status>(chunks)
        }
    };
    let size = bytes.len() as u64;
    for offset in [size / 2, size - 1, size] {
        let chunks = download(offset).await.expect("download from an offset");
        assert_eq!(chunks[0].offset, offset);
        assert_eq!(chunks[0].output.as_ref().map(|o| o.sha256.as_str()), Some(out.sha256.as_str()));
        let rest: Vec<u8> = chunks.iter().flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(rest, bytes[offset as usize..], "from {offset}");
    }
    let past = download(size + 1).await.expect_err("past the end");
    assert_eq!(past.code(), Code::InvalidArgument);
    assert_violations(&past, &["offset"]);
}

#[tokio::test]
async fn late_subscribers_replay_exactly_and_resume_after_any_sequence() {
    let mut app = spawn_app().await;
    let job = app.jobs.submit_job(submit_request("invert", png(8, 8))).await.unwrap().into_inner();
    let live = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(terminal(&live), "succeeded");

    let replay = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(replay, live, "a late subscriber gets exactly the live stream");
    for k in 0..live.len() as u64 {
        let resumed = collect_events(&app.channel, &job.id, k).await;
        assert_eq!(resumed.as_slice(), &live[k as usize..], "resume after {k}");
    }
    let past_end = collect_events(&app.channel, &job.id, 10_000).await;
    assert!(past_end.is_empty());
}

#[tokio::test]
async fn same_request_id_returns_the_same_job_and_a_different_request_is_refused() {
    let mut app = spawn_app().await;
    let mut req = submit_request("invert", png(8, 8));
    req.request_id = "order-42".into();
    let a = app.jobs.submit_job(req.clone()).await.unwrap().into_inner();
    let b = app.jobs.submit_job(req.clone()).await.unwrap().into_inner();
    assert_eq!(a.id, b.id);
    assert_eq!(b.request_id, "order-42");

    let mut other = req.clone();
    other.image = Some(pb::InputImage { data: png(9, 9).into(), ..Default::default() });
    let err = app.jobs.submit_job(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains(&a.id));

    let list = app.jobs.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    assert_eq!(list.jobs.len(), 1, "a replay stores nothing new");
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_with_every_field_named() {
    let mut app = spawn_app().await;
    let mut req = submit_request("no-such-workflow", png(4, 4));
    req.priority = 1000;
    req.labels.insert("bad key!".into(), "v".into());
    let err = app.jobs.submit_job(req).await.unwrap_err();
    assert_violations(&err, &["workflow", "priority", "labels[bad key!]"]);

    let err = app.jobs.submit_job(pb::SubmitJobRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = app.jobs.get_job(pb::GetJobRequest { job_id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("job_id"));

    let missing = uuid::Uuid::new_v4().to_string();
    let err = app.jobs.get_job(pb::GetJobRequest { job_id: missing.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = app
        .jobs
        .stream_job(pb::StreamJobRequest { job_id: missing.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = app
        .jobs
        .cancel_job(pb::CancelJobRequest { job_id: missing, reason: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Nothing was stored by any of these.
    let list = app.jobs.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    assert!(list.jobs.is_empty());
}

#[tokio::test]
async fn list_jobs_filters_by_state_workflow_and_label_and_pages() {
    let mut app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut req = submit_request("invert", png(4, 4));
        req.labels.insert("batch".into(), if i % 2 == 0 { "even".into() } else { "odd".into() });
        let job = app.jobs.submit_job(req).await.unwrap().into_inner();
        ids.push(job.id);
    }
    for id in &ids {
        assert_eq!(terminal(&collect_events(&app.channel, id, 0).await), "succeeded");
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .jobs
            .list_jobs(pb::ListJobsRequest { page_size: 2, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.jobs.len() <= 2);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected, "newest first, every job once");

    let even = app
        .jobs
        .list_jobs(pb::ListJobsRequest {
            labels: [("batch".to_string(), "even".to_string())].into(),
            states: vec![pb::JobState::Succeeded as i32],
            workflow: "invert".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(even.jobs.len(), 3);
    let none = app
        .jobs
        .list_jobs(pb::ListJobsRequest { states: vec![pb::JobState::Failed as i32], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(none.jobs.is_empty());
    let err = app
        .jobs
        .list_jobs(pb::ListJobsRequest { page_token: "garbage".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Issue 17, defect 5: a resume point beyond 2⁶³ (which once wrapped to a negative number in SQL and
/// replayed forever) ends at once on a finished job, as any point past its end does.
#[tokio::test]
async fn a_huge_after_sequence_ends_the_stream_of_a_finished_job() {
    let mut app = spawn_app().await;
    let job = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    assert_eq!(terminal(&collect_events(&app.channel, &job.id, 0).await), "succeeded");
    for after in [1u64 << 63, u64::MAX, (1u64 << 63) + 5] {
        assert!(collect_events(&app.channel, &job.id, after).await.is_empty(), "after {after}");
    }
}

#[tokio::test]
async fn the_data_directory_and_everything_in_it_are_readable_by_the_service_user_only() {
    use std::os::unix::fs::PermissionsExt;
    // A data directory comfyrelay creates itself (the test's temporary directory is private already).
    let mut app = crate::helpers::spawn_app_with(|c| c.data_dir = c.data_dir.join("fresh")).await;
    let job = app.jobs.submit_job(submit_request("invert", png(8, 8))).await.unwrap().into_inner();
    assert_eq!(terminal(&collect_events(&app.channel, &job.id, 0).await), "succeeded");

    let root = app.data_dir.path().join("fresh");
    let mut seen = (0, 0);
    let mut stack = vec![root.clone()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", path.display());
            seen.0 += 1;
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
            seen.1 += 1;
        }
    }
    // The database with its WAL, and the input and output artifacts, in their directories.
    assert!(seen.0 >= 3 && seen.1 >= 4, "directories and files seen: {seen:?}");
}
