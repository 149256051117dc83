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
