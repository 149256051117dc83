//! The catalog through gRPC: schemas for callers, every validation problem at once, inline graphs, and
//! workflows whose outputs arrive over the WebSocket.

use std::collections::HashMap;

use comfyrelay::proto::pb;
use pb::job_event::Kind;
use tonic::Code;
use tonic_types::StatusExt;

use crate::helpers::{assert_violations, collect_events, png, spawn_app, submit_request, terminal};

fn int(v: i64) -> pb::ParameterValue {
    pb::ParameterValue { kind: Some(pb::parameter_value::Kind::IntValue(v)) }
}

fn text(v: &str) -> pb::ParameterValue {
    pb::ParameterValue { kind: Some(pb::parameter_value::Kind::StringValue(v.into())) }
}

#[tokio::test]
async fn list_and_get_return_typed_schemas() {
    let mut app = spawn_app().await;
    let list = app.workflows.list_workflows(pb::ListWorkflowsRequest {}).await.unwrap().into_inner();
    let names: Vec<&str> = list.workflows.iter().map(|w| w.name.as_str()).collect();
    for expected in ["invert", "progress-websocket", "scale-blur", "sd15-img2img", "sdxl-img2img"] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    let w = app
        .workflows
        .get_workflow(pb::GetWorkflowRequest { name: "scale-blur".into() })
        .await
        .unwrap()
        .into_inner();
    let inputs: HashMap<&str, &pb::WorkflowInput> = w.inputs.iter().map(|i| (i.name.as_str(), i)).collect();
    assert_eq!(inputs["image"].r#type(), pb::InputType::Image);
    assert!(inputs["image"].required);
    assert_eq!(inputs["width"].r#type(), pb::InputType::Int);
    assert_eq!(inputs["width"].max, Some(16384.0));
    assert_eq!(inputs["upscale_method"].r#type(), pb::InputType::Choice);
    assert!(inputs["upscale_method"].choices.contains(&"lanczos".to_string()));
    assert_eq!(inputs["blur_radius"].targets[0].node_id, "3");
    assert!(!w.outputs.is_empty());

    let sd = app
        .workflows
        .get_workflow(pb::GetWorkflowRequest { name: "sd15-img2img".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(sd.inputs.iter().any(|i| i.r#type() == pb::InputType::Seed));
    assert!(!sd.requirements.unwrap().server_type.is_empty());

    let err = app.workflows.get_workflow(pb::GetWorkflowRequest { name: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn every_problem_of_a_request_is_reported_at_once() {
    let mut app = spawn_app().await;
    let mut req = submit_request("scale-blur", png(8, 8));
    req.parameters.insert("width".into(), int(99_999));
    req.parameters.insert("height".into(), text("tall"));
    req.parameters.insert("upscale_method".into(), text("magic"));
    req.parameters.insert("bogus".into(), int(1));
    let err = app.jobs.submit_job(req).await.unwrap_err();
    assert_violations(
        &err,
        &["parameters[width]", "parameters[height]", "parameters[upscale_method]", "parameters[bogus]"],
    );

    // A missing required image.
    let mut req = submit_request("invert", png(4, 4));
    req.image = None;
    let err = app.jobs.submit_job(req).await.unwrap_err();
    let fields: Vec<String> =
        err.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, vec!["image".to_string()]);

    // A UI-format graph is refused with a hint about the API format.
    let ui = r#"{"nodes": [], "links": [], "version": 0.4}"#;
    let req = pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::GraphJson(ui.into())),
        ..Default::default()
    };
    let err = app.jobs.submit_job(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let v = err.get_details_bad_request().unwrap().field_violations;
    assert_eq!(v[0].field, "graph_json");
    assert!(v[0].description.contains("API"), "{}", v[0].description);
    let list = app.jobs.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    assert!(list.jobs.is_empty(), "nothing was stored");
}

#[tokio::test]
async fn an_inline_api_graph_runs_with_its_inputs_addressed_by_node() {
    let mut app = spawn_app().await;
    let graph =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/workflows/scale-blur/workflow.json"))
            .unwrap();
    let req = pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::GraphJson(graph)),
        image: Some(pb::InputImage { data: png(16, 16).into(), ..Default::default() }),
        parameters: [("2.width".to_string(), int(8)), ("2.height".to_string(), int(4))].into(),
        ..Default::default()
    };
    let job = app.jobs.submit_job(req).await.unwrap().into_inner();
    assert_eq!(job.workflow, "inline");
    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    let Some(Kind::Succeeded(done)) = &events.last().unwrap().kind else { unreachable!() };
    assert_eq!((done.outputs[0].width, done.outputs[0].height), (8, 4));
}

#[tokio::test]
async fn websocket_outputs_progress_and_are_stored() {
    let mut app = spawn_app().await;
    let req = pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::Workflow("progress-websocket".into())),
        parameters: [
            ("width".to_string(), int(32)),
            ("height".to_string(), int(16)),
            ("batch_size".to_string(), int(3)),
        ]
        .into(),
        ..Default::default()
    };
    let job = app.jobs.submit_job(req).await.unwrap().into_inner();
    let events = collect_events(&app.channel, &job.id, 0).await;
    assert_eq!(terminal(&events), "succeeded", "{events:?}");
    let progress: Vec<&pb::Progress> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::Progress(p)) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(progress.len(), 3, "one progress step per image: {events:?}");
    assert!(progress.iter().all(|p| p.max == 3.0));
    let Some(Kind::Succeeded(done)) = &events.last().unwrap().kind else { unreachable!() };
    assert_eq!(done.outputs.len(), 3);
    for o in &done.outputs {
        assert_eq!(o.kind, "websocket");
        assert_eq!((o.width, o.height), (32, 16));
        let img = image::load_from_memory(&o.inline_data).expect("a decodable image");
        assert_eq!(img.width(), 32);
    }
}

#[tokio::test]
async fn graphs_are_checked_against_the_backends_nodes_before_anything_runs() {
    let mut app = spawn_app().await;
    let graph = r#"{
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "NoSuchNode", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}
    }"#;
    let req = pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::GraphJson(graph.into())),
        ..Default::default()
    };
    let err = app.jobs.submit_job(req).await.unwrap_err();
    let fields = assert_violations(&err, &["graph_json"]);
    assert!(err.message().contains("NoSuchNode"), "{err:?} {fields:?}");
    let list = app.jobs.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner();
    assert!(list.jobs.is_empty(), "rejected before it was stored");
}
