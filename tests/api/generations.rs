//! Both ComfyUI generations through gRPC: a prompt whose `POST /prompt` answer was lost is queued once,
//! and only canonical UUIDs ever reach ComfyUI as prompt ids (0.38 refuses anything else).

use comfyrelay::{
    comfy::check_prompt_id,
    emulator::comfyui::{ComfyVersion, LostAnswer},
};

use crate::helpers::{collect_events, png, spawn_app_on, submit_request, terminal};

#[tokio::test]
async fn a_lost_prompt_answer_and_the_retry_queue_the_prompt_once() {
    for version in ComfyVersion::ALL {
        for how in [LostAnswer::Cut, LostAnswer::ServerError] {
            let mut app = spawn_app_on(version, |_| {}).await;
            app.comfy.faults().lose_prompt_answers(1, how);
            let job = app.jobs.submit_job(submit_request("invert", png(6, 4))).await.unwrap().into_inner();
            let events = collect_events(&app.channel, &job.id, 0).await;
            assert_eq!(terminal(&events), "succeeded", "{version} {how:?}: {events:#?}");
            assert_eq!(
                (app.comfy.posted_times(&job.id), app.comfy.queued_times(&job.id)),
                (1, 1),
                "{version} {how:?}: the retry found the prompt instead of sending it again"
            );
            assert_eq!(app.comfy.queued_total(), 1, "{version} {how:?}");
        }
    }
}

#[tokio::test]
async fn only_canonical_uuids_are_sent_as_prompt_ids() {
    for version in ComfyVersion::ALL {
        let mut app = spawn_app_on(version, |_| {}).await;
        let mut ids = Vec::new();
        for i in 0..3 {
            let job =
                app.jobs.submit_job(submit_request("invert", png(4 + i, 4))).await.unwrap().into_inner();
            let events = collect_events(&app.channel, &job.id, 0).await;
            // 0.38 answers 400 invalid_prompt_id to anything else: success proves it was accepted.
            assert_eq!(terminal(&events), "succeeded", "{version}: {events:#?}");
            ids.push(job.id);
        }
        let posted = app.comfy.posted_ids();
        assert_eq!(posted, ids, "{version}: the job ids are the prompt ids, each sent once");
        for id in &posted {
            check_prompt_id(id).unwrap_or_else(|e| panic!("{version}: {e}"));
        }
    }
}

#[tokio::test]
async fn partial_validation_shows_the_warning_and_the_outputs_that_ran() {
    use comfyrelay::proto::pb::{self, job_event::Kind};
    // Node 3's `upscale_method` is not a choice: ComfyUI drops output 4 (which needs it) and runs output 2.
    let graph = serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 45}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "good"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus",
              "width": 4, "height": 4, "crop": "disabled"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bad"}}
    });
    for version in ComfyVersion::ALL {
        let mut app = spawn_app_on(version, |_| {}).await;
        // No /object_info to check the graph against at submit: it reaches ComfyUI's own validation.
        app.comfy.faults().fail_http("/object_info", 1_000);
        let request = pb::SubmitJobRequest {
            source: Some(pb::submit_job_request::Source::GraphJson(graph.to_string())),
            ..Default::default()
        };
        let job = app.jobs.submit_job(request).await.unwrap().into_inner();
        let events = collect_events(&app.channel, &job.id, 0).await;
        let warning = events.iter().find_map(|e| match &e.kind {
            Some(Kind::Warning(w)) => Some(w.clone()),
            _ => None,
        });
        let warning = warning.unwrap_or_else(|| panic!("{version}: no warning: {events:#?}"));
        assert_eq!(warning.code, "OUTPUTS_DROPPED", "{version}");
        assert_eq!(warning.node_ids, ["3"], "{version}: {warning:?}");
        assert!(warning.message.contains("ImageScale"), "{version}: {warning:?}");
        // An inline graph declares no outputs: the job succeeds with what ran, and only that.
        assert_eq!(terminal(&events), "succeeded", "{version}: {events:#?}");
        let Some(Kind::Succeeded(done)) = &events.last().unwrap().kind else { unreachable!() };
        let nodes: Vec<&str> = done.outputs.iter().map(|o| o.node_id.as_str()).collect();
        assert_eq!(nodes, ["2"], "{version}: only the valid output ran");
    }
}
