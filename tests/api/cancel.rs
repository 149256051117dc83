//! CancelJob in every state, and the escalation that ends a cancelled job whose node ignores interrupts:
//! on a static server and on a RunComfy machine, against the emulators of the generation under test.

use std::time::Duration;

use comfyrelay::{Config, proto::pb};
use pb::{CancelStepKind as Step, job_event::Kind};

use crate::helpers::{
    collect_events, png, spawn_app, spawn_app_with, submit_request, terminal, wait_for_event,
};
use crate::pool::{Account, WORKFLOW, eventually, fast_emulator};

/// Short cancel bounds, so the escalation runs in well under a second per step.
const GRACE: Duration = Duration::from_millis(300);
const DEADLINE: Duration = Duration::from_millis(1500);
/// What the bound may be overshot by on a loaded 2-core machine (the calls to ComfyUI, the commit).
const SLACK: Duration = Duration::from_millis(1500);

fn short_cancel(config: &mut Config) {
    config.jobs.cancel_grace = GRACE;
    config.jobs.cancel_deadline = DEADLINE;
}

/// The cancel steps of a stream, in order, with their elapsed times.
fn cancel_steps(events: &[pb::JobEvent]) -> Vec<(Step, Duration)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::CancelStep(c)) => Some((c.step(), duration(c.elapsed.as_ref()))),
            _ => None,
        })
        .collect()
}

fn steps(events: &[pb::JobEvent]) -> Vec<Step> {
    cancel_steps(events).into_iter().map(|(s, _)| s).collect()
}

fn duration(d: Option<&prost_types::Duration>) -> Duration {
    let d = d.expect("a duration");
    Duration::new(d.seconds as u64, d.nanos as u32)
}

fn ms(t: Option<&prost_types::Timestamp>) -> i64 {
    let t = t.expect("a time");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// Time from the first cancel step to the terminal event.
fn cancel_took(events: &[pb::JobEvent]) -> Duration {
    let first = events.iter().find(|e| matches!(e.kind, Some(Kind::CancelStep(_)))).expect("a cancel step");
    let last = events.last().expect("events");
    Duration::from_millis((ms(last.time.as_ref()) - ms(first.time.as_ref())).max(0) as u64)
}

/// Waits until the job's `ImageInvert` node (the one the tests wedge) executes.
async fn inverting(channel: &tonic::transport::Channel, id: &str) {
    wait_for_event(
        channel,
        id,
        |e| matches!(&e.kind, Some(Kind::NodeStarted(n)) if n.class_type == "ImageInvert"),
    )
    .await;
}

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
    // ComfyUI honoured the interrupt: one step ended it.
    assert_eq!(steps(&events), [Step::Interrupt], "{events:#?}");
    assert_eq!(app.comfy.free_calls(), 0);
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

#[tokio::test]
async fn a_wedged_node_that_free_releases_ends_cancelled_after_the_free_step() {
    let mut app = spawn_app_with(short_cancel).await;
    app.comfy.faults().wedge_node("ImageInvert", Duration::from_secs(60));
    let a = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    inverting(&app.channel, &a.id).await;
    app.jobs.cancel_job(pb::CancelJobRequest { job_id: a.id.clone(), reason: "stuck".into() }).await.unwrap();
    let events = collect_events(&app.channel, &a.id, 0).await;
    assert_eq!(terminal(&events), "cancelled", "{events:#?}");
    let taken = cancel_steps(&events);
    assert_eq!(steps(&events), [Step::Interrupt, Step::Free], "{events:#?}");
    assert!(taken[1].1 >= GRACE, "the free waited a grace period: {taken:?}");
    assert!(cancel_took(&events) < DEADLINE, "ComfyUI confirmed it before the deadline: {events:#?}");
    assert_eq!(app.comfy.free_calls(), 1);
    let Some(Kind::Cancelled(c)) = &events.last().unwrap().kind else { unreachable!() };
    assert_eq!(c.reason, "stuck");
    // The server is trusted again: the next job runs.
    app.comfy.faults().clear();
    let b = app.jobs.submit_job(submit_request("invert", png(5, 5))).await.unwrap().into_inner();
    assert_eq!(terminal(&collect_events(&app.channel, &b.id, 0).await), "succeeded");
}

#[tokio::test]
async fn a_node_that_ignores_every_interrupt_ends_cancelled_at_the_deadline_and_holds_its_server() {
    let mut app = spawn_app_with(short_cancel).await;
    // Ignores interrupts and /free; ends by itself after a while, as a long driver call would.
    let wedged_for = DEADLINE + Duration::from_secs(2);
    app.comfy.faults().wedge_node_past_free("ImageInvert", wedged_for);
    let a = app.jobs.submit_job(submit_request("invert", png(4, 4))).await.unwrap().into_inner();
    inverting(&app.channel, &a.id).await;
    app.jobs.cancel_job(pb::CancelJobRequest { job_id: a.id.clone(), reason: String::new() }).await.unwrap();
    let events = collect_events(&app.channel, &a.id, 0).await;
    assert_eq!(terminal(&events), "cancelled", "{events:#?}");
    assert_eq!(steps(&events), [Step::Interrupt, Step::Free, Step::Abandoned], "{events:#?}");
    let abandoned = cancel_steps(&events)[2].1;
    assert!(abandoned >= DEADLINE, "abandoned at the deadline, not before: {abandoned:?}");
    let took = cancel_took(&events);
    assert!(took < DEADLINE + SLACK, "cancelled within the bound: {took:?}");
    let got = app.jobs.get_job(pb::GetJobRequest { job_id: a.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got.state(), pb::JobState::Cancelled);

    // The static server is not stopped, and the next job is not sent into it while the prompt runs: it
    // waits, saying why.
    let b = app.jobs.submit_job(submit_request("invert", png(5, 5))).await.unwrap().into_inner();
    wait_for_event(
        &app.channel,
        &b.id,
        |e| matches!(&e.kind, Some(Kind::Queued(q)) if q.reason.contains("cancelled prompt")),
    )
    .await;
    assert_eq!(app.comfy.running_prompt().await.as_deref(), Some(a.id.as_str()), "still wedged");
    assert_eq!(app.comfy.posted_times(&b.id), 0, "nothing was sent behind the wedged prompt");
    let local = || pb::GetMachineRequest { machine_id: "local".into() };
    let m = app.machines.get_machine(local()).await.unwrap().into_inner();
    assert_eq!(m.state(), pb::MachineState::Unhealthy, "{m:?}");
    // Once the wedged prompt ends by itself, the server takes jobs again.
    let events = collect_events(&app.channel, &b.id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:#?}");
    assert_eq!(app.comfy.posted_ids(), [a.id.clone(), b.id.clone()]);
    let m = app.machines.get_machine(local()).await.unwrap().into_inner();
    assert_eq!(m.state(), pb::MachineState::Ready, "{m:?}");
    // ComfyUI sends `execution_success` (which can end the job) before its `task_done` writes the
    // history, so `b` reaches the history just after its terminal event: probed for, then the order.
    eventually("b is in ComfyUI's history", Duration::from_secs(10), || {
        app.comfy.history_ids().contains(&b.id)
    })
    .await;
    let history = app.comfy.history_ids();
    assert!(history.iter().position(|h| *h == a.id) < history.iter().position(|h| *h == b.id), "{history:?}");
}

/// A job on a RunComfy machine whose node ignores interrupts and `/free`, cancelled with `grace` and
/// `deadline`: it ends `CANCELLED` by replacing the machine, which the provider then shows stopped.
async fn wedged_on_runcomfy(grace: Duration, deadline: Duration) -> Vec<pb::JobEvent> {
    let mut acc = Account::new(fast_emulator(Duration::ZERO)).await;
    acc.config.jobs.cancel_grace = grace;
    acc.config.jobs.cancel_deadline = deadline;
    let (p, channel) = acc.start().await;
    // A first job brings a machine up; its ComfyUI then gets the fault.
    let warm = crate::pool::submit(&p).await;
    assert_eq!(terminal(&collect_events(&channel, &warm, 0).await), "succeeded");
    let machine = acc.emu.machines()[0].server_id.clone();
    let comfy = acc.emu.comfyui(&machine).expect("the machine's ComfyUI");
    comfy.faults().wedge_node_past_free("ImageInvert", Duration::from_secs(60));

    // Another image than the first job's, so ComfyUI does not answer from its cache.
    let mut jobs = p.jobs().await;
    let id = jobs.submit_job(submit_request(WORKFLOW, png(9, 7))).await.unwrap().into_inner().id;
    inverting(&channel, &id).await;
    jobs.cancel_job(pb::CancelJobRequest { job_id: id.clone(), reason: String::new() }).await.unwrap();
    let events = collect_events(&channel, &id, 0).await;
    assert_eq!(terminal(&events), "cancelled", "{events:#?}");
    assert_eq!(steps(&events), [Step::Interrupt, Step::Free, Step::ReplaceMachine], "{events:#?}");
    assert_eq!(comfy.free_calls(), 1);

    // The machine is stopped at the provider (billed no further); no job waits, so none replaces it.
    eventually("the wedged machine is stopped", Duration::from_secs(10), || {
        acc.emu.running_machines().iter().all(|m| m.server_id != machine)
    })
    .await;
    assert!(acc.emu.delete_requests().contains(&machine), "{:?}", acc.emu.delete_requests());
    assert_eq!(acc.emu.machines_launched(), 1);
    acc.finish(p).await;
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_ignores_every_interrupt_on_a_runcomfy_machine_ends_cancelled_and_the_machine_stopped() {
    let events = wedged_on_runcomfy(GRACE, DEADLINE).await;
    let replaced = cancel_steps(&events)[2].1;
    assert!(replaced >= 2 * GRACE, "replaced after two grace periods: {replaced:?}");
    let took = cancel_took(&events);
    assert!(took < DEADLINE, "the replacement ended it before the deadline: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_shorter_than_two_grace_periods_still_replaces_the_wedged_runcomfy_machine() {
    let (grace, deadline) = (Duration::from_millis(600), Duration::from_millis(900));
    let events = wedged_on_runcomfy(grace, deadline).await;
    let replaced = cancel_steps(&events)[2].1;
    // The deadline came before a second grace: the machine is replaced then, not abandoned still running.
    assert!(replaced >= deadline, "replaced at the deadline: {replaced:?}");
    let took = cancel_took(&events);
    assert!(took < deadline + SLACK, "cancelled within the bound: {took:?}");
}
